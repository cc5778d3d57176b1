//! Reading and writing the files people have: safetensors (single, sharded), GGUF,
//! tokenizers and chat templates.

pub mod adapter;
pub mod assets;
pub mod gguf;
pub mod onnx;
pub mod store;
pub mod tokenizer;
