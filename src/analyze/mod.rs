//! The paper's analyses: how similar the decoder layers' hidden states are (its argument
//! about expressive power), and how noisy the gradients are during training.

pub mod gradvar;
pub mod similarity;
