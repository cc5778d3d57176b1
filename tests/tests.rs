//! One integration-test binary (fewer links on a 2-core machine).

mod alloc_cap;
mod bad_inputs;
mod common;
mod compare_cli;
mod distributed;
mod eval_cli;
mod export;
mod generation;
mod gguf;
mod interop;
mod kills;
mod layering;
mod loading_errors;
mod metrics;
mod model_fixtures;
mod mutations;
mod preprocess;
mod real_weights;
mod serve;
mod shapes;
mod train_cli;
mod training;
