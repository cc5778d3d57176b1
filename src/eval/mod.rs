//! Generation and evaluation: decoding with a KV cache, conversations, answering benchmark
//! questions under a protocol, the benchmarks (readers, official formats, scoring), the
//! official metrics, and the evaluation loop with resumable predictions.

pub mod answer;
pub mod benchmarks;
pub mod chat;
pub mod generate;
pub mod metrics;
pub mod paired;
pub mod predictions;
pub mod protocol;
pub mod run;
