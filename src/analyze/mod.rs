//! The paper's analyses: how similar the decoder layers' hidden states are (its argument
//! about expressive power), and how noisy the gradients were during training.

pub mod gradvar;
pub mod similarity;
