//! Jobs: pipelines made of the layers below, each with its report: the demo, the paper's
//! comparison, the reference check, and the step timing of `lntune bench`.

pub mod check;
pub mod compare;
pub mod demo;
pub mod export;
pub mod export_gguf;
pub mod serve;
pub mod timing;
