//! lntune: LayerNorm tuning (arXiv 2312.11420) and its baselines for LLaVA-style multimodal
//! LLMs, on candle tensors with a hand-written, frozen-weight-aware backward.
//!
//! Layers, bottom to top: `ops` (forward/backward pairs), `model` (configs, decoder, vision
//! towers, projector, composition), `io` (checkpoints, GGUF, tokenizers), `cli` (commands).
//!
//! Error policy: ops return `candle_core::Result`; everything that touches files or user
//! input returns `anyhow::Result` with the file and field named in the message.

pub mod analyze;
pub mod cli;
pub mod data;
pub mod eval;
pub mod io;
pub mod methods;
pub mod model;
pub mod ops;
pub mod plot;
pub mod rng;
pub mod train;
