//! Reading and writing the files people have: safetensors (single, sharded), GGUF,
//! tokenizers and chat templates.

pub mod gguf;
pub mod store;
pub mod tokenizer;
