//! lntune: LayerNorm tuning (arXiv 2312.11420) and its baselines for LLaVA-style multimodal
//! LLMs, on candle tensors with a hand-written, frozen-weight-aware backward.
//!
//! Layers, top to bottom (docs/ARCHITECTURE.md); a module imports only from its own layer
//! and the layers below, never in a circle (`tests/layering.rs` checks it):
//!
//! | layer | modules | what |
//! |---|---|---|
//! | 5 | `cli` | clap arguments mapped to typed configs |
//! | 4 | `jobs` | pipelines with reports: demo, compare, check, step timing |
//! | 3 | `train`, `eval`, `analyze` | the step, optimizer, run loop; generation, benchmarks, evaluation loop; analyses |
//! | 2 | `data`, `methods`, `model` | datasets, templates, images, features; rules over names, adapters; configs, decoder, towers, loading, parameter specs |
//! | 1 | `ops`, `io` | forward/backward pairs; safetensors, GGUF, ONNX, tokenizers, assets |
//! | 0 | `util` | files, progress, process facts, plots, RNG, device choice |
//!
//! Error policy: ops return `candle_core::Result`; everything that touches files or user
//! input returns `anyhow::Result` with the file and field named in the message.

pub mod analyze;
pub mod cli;
pub mod data;
pub mod eval;
pub mod io;
pub mod jobs;
pub mod methods;
pub mod model;
pub mod ops;
pub mod train;
pub mod util;
