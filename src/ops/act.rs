//! Activations: SiLU-gated MLP product, GELU (erf and tanh), quick-GELU.

use candle_core::{Result, Tensor};
use serde::Deserialize;

/// The activation names used in HF configs (`hidden_act`, `projector_hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
pub enum Act {
    /// exact GELU, x·Φ(x)
    #[serde(rename = "gelu", alias = "gelu_erf")]
    GeluErf,
    /// tanh approximation of GELU
    #[serde(
        rename = "gelu_pytorch_tanh",
        alias = "gelu_new",
        alias = "gelu_fast",
        alias = "gelu_tanh"
    )]
    GeluTanh,
    /// CLIP's x·σ(1.702x)
    #[serde(rename = "quick_gelu")]
    QuickGelu,
    #[serde(rename = "silu", alias = "swish")]
    Silu,
    #[serde(rename = "relu")]
    Relu,
}

/// Elementwise activation, f32 in and out.
pub fn act_forward(x: &Tensor, act: Act) -> Result<Tensor> {
    match act {
        Act::GeluErf => x.gelu_erf(),
        Act::GeluTanh => x.gelu(),
        Act::QuickGelu => x.broadcast_div(&((x * -1.702)?.exp()? + 1.0)?),
        Act::Silu => x.silu(),
        Act::Relu => x.relu(),
    }
}

/// SwiGLU product of the LLaMA MLP: silu(gate) ⊙ up.
pub fn silu_mul_forward(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.silu()? * up
}
