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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn activations_match_pytorch_values() {
        // torch: F.gelu, F.gelu(approximate="tanh"), x·sigmoid(1.702x) at [1, -0.5]
        let x = Tensor::new(&[1f32, -0.5], &Device::Cpu).unwrap();
        let cases = [
            (Act::GeluErf, [0.841_344_7, -0.154_268_79]),
            (Act::GeluTanh, [0.841_192, -0.154_286]),
            (Act::QuickGelu, [0.845_795_75, -0.149_611_56]),
        ];
        for (act, want) in cases {
            let y = act_forward(&x, act).unwrap().to_vec1::<f32>().unwrap();
            for (a, b) in y.iter().zip(want) {
                assert!((a - b).abs() < 1e-6, "{act:?}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn config_names_parse() {
        for (name, act) in [
            ("\"gelu\"", Act::GeluErf),
            ("\"gelu_pytorch_tanh\"", Act::GeluTanh),
            ("\"quick_gelu\"", Act::QuickGelu),
            ("\"silu\"", Act::Silu),
        ] {
            assert_eq!(serde_json::from_str::<Act>(name).unwrap(), act);
        }
        assert!(serde_json::from_str::<Act>("\"mish\"").is_err());
    }
}
