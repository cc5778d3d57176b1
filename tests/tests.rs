//! One integration-test binary (fewer links on a 2-core machine).

mod common;
mod generation;
mod gguf;
mod loading_errors;
mod metrics;
mod model_fixtures;
mod preprocess;
mod real_weights;
mod training;
