//! Generation and evaluation: decoding with a KV cache, the benchmark metrics, benchmark
//! readers and scoring, the evaluation loop with resumable predictions.

pub mod bench;
pub mod generate;
pub mod harness;
pub mod metrics;
pub mod run;
