//! Data: images and their preprocessing, LLaVA JSON conversations, chat templates with
//! LLaVA's label masking, batching, the background loader, and the generated `shapes`
//! benchmark.

pub mod dataset;
pub mod features;
pub mod image;
pub mod llava;
pub mod shapes;
pub mod template;
