//! Generation and evaluation: decoding with a KV cache, the benchmark metrics, harnesses.

pub mod generate;
pub mod metrics;
