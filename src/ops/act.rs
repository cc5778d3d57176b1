//! Activations: SiLU-gated MLP product, GELU (erf and tanh), quick-GELU.

use candle_core::{Result, Tensor};

use crate::util::profile::{Kind, span};
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
    let _span = span(Kind::Elementwise);
    match act {
        Act::GeluErf => x.gelu_erf(),
        Act::GeluTanh => x.gelu(),
        Act::QuickGelu => x.broadcast_div(&((x * -1.702)?.exp()? + 1.0)?),
        Act::Silu => x.silu(),
        Act::Relu => x.relu(),
    }
}

/// SwiGLU product of the LLaMA MLP: silu(gate) ⊙ up.
/// One fused pass on the CPU (f32), composed tensor ops elsewhere.
pub fn silu_mul_forward(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let _span = span(Kind::Elementwise);
    let both_f32 = [gate, up]
        .iter()
        .all(|t| t.dtype() == candle_core::DType::F32);
    if super::cpu::fused_on(gate) && both_f32 && gate.shape() == up.shape() {
        return gate
            .contiguous()?
            .apply_op2_no_bwd(&up.contiguous()?, &SiluMul);
    }
    gate.silu()? * up
}

/// Fused CPU kernel of `silu_mul_forward`.
struct SiluMul;

impl candle_core::CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let g = super::cpu::f32_data(s1, l1, "silu-mul gate")?;
        let u = super::cpu::f32_data(s2, l2, "silu-mul up")?;
        let mut out = vec![0f32; g.len()];
        let chunk = 16384;
        out.par_chunks_mut(chunk)
            .zip(g.par_chunks(chunk).zip(u.par_chunks(chunk)))
            .for_each(|(h, (g, u))| super::cpu::vectorised!(silu_mul_chunk(g, u, h)));
        Ok((candle_core::CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[inline(always)]
fn silu_mul_chunk(g: &[f32], u: &[f32], h: &mut [f32]) {
    for ((h, &x), &up) in h.iter_mut().zip(g).zip(u) {
        *h = x * super::cpu::sigmoid(x) * up;
    }
}

#[inline(always)]
fn silu_mul_backward_chunk(dh: &[f32], g: &[f32], u: &[f32], dg: &mut [f32], du: &mut [f32]) {
    for i in 0..dg
        .len()
        .min(dh.len())
        .min(g.len())
        .min(u.len())
        .min(du.len())
    {
        let (d, x, up) = (dh[i], g[i], u[i]);
        let sig = super::cpu::sigmoid(x);
        dg[i] = d * up * sig * (1.0 + x * (1.0 - sig));
        du[i] = d * x * sig;
    }
}

/// d act(x) / dx ⊙ dy.
/// - GELU erf: Φ(x) + x·φ(x)
/// - GELU tanh: with u = √(2/π)(x + 0.044715x³), t = tanh u:
///   0.5(1 + t) + 0.5x(1 − t²)·√(2/π)(1 + 3·0.044715x²)
/// - quick-GELU: σ(1.702x) + 1.702x·σ(1 − σ)
/// - SiLU: σ(x)(1 + x(1 − σ(x)))
pub fn act_backward(dy: &Tensor, x: &Tensor, act: Act) -> Result<Tensor> {
    let _span = span(Kind::Elementwise);
    let d = match act {
        Act::GeluErf => {
            let cdf = ((x * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)? * 0.5;
            let pdf = (x.sqr()? * -0.5)?.exp()? * (1.0 / (2.0 * std::f64::consts::PI).sqrt());
            (cdf? + (x * pdf?)?)?
        }
        Act::GeluTanh => {
            let k = (2.0 / std::f64::consts::PI).sqrt();
            let u = ((x + (x.powf(3.0)? * 0.044715)?)? * k)?;
            let t = u.tanh()?;
            let left = ((&t + 1.0)? * 0.5)?;
            let sech2 = (t.sqr()?.neg()? + 1.0)?;
            let du = ((x.sqr()? * (3.0 * 0.044715))? + 1.0)? * k;
            (left + ((x * 0.5)? * sech2)?.mul(&du?)?)?
        }
        Act::QuickGelu => {
            let s = sigmoid(&(x * 1.702)?)?;
            let one_minus = (s.neg()? + 1.0)?;
            (&s + ((x * 1.702)? * (&s * one_minus)?)?)?
        }
        Act::Silu => silu_grad(x)?,
        Act::Relu => x.gt(0.0)?.to_dtype(x.dtype())?,
    };
    dy * d
}

fn sigmoid(x: &Tensor) -> Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}

/// d silu(x)/dx = σ(x)(1 + x(1 − σ(x)))
fn silu_grad(x: &Tensor) -> Result<Tensor> {
    let s = sigmoid(x)?;
    let one_minus = (s.neg()? + 1.0)?;
    s * ((x * one_minus)? + 1.0)?
}

/// h = silu(gate) ⊙ up: dgate = dh ⊙ up ⊙ silu'(gate), dup = dh ⊙ silu(gate).
/// One fused pass on the CPU (f32), composed tensor ops elsewhere.
pub fn silu_mul_backward(dh: &Tensor, gate: &Tensor, up: &Tensor) -> Result<(Tensor, Tensor)> {
    let _span = span(Kind::Elementwise);
    let all_f32 = [dh, gate, up]
        .iter()
        .all(|t| t.dtype() == candle_core::DType::F32);
    if super::cpu::fused_on(dh) && all_f32 {
        let both = dh.contiguous()?.apply_op3_no_bwd(
            &gate.contiguous()?,
            &up.contiguous()?,
            &SiluMulBackward,
        )?;
        return Ok((both.get(0)?, both.get(1)?));
    }
    let dgate = ((dh * up)? * silu_grad(gate)?)?;
    let dup = (dh * gate.silu()?)?;
    Ok((dgate, dup))
}

/// Fused CPU kernel of `silu_mul_backward`: output (2, ..) = [dgate, dup].
struct SiluMulBackward;

impl candle_core::CustomOp3 for SiluMulBackward {
    fn name(&self) -> &'static str {
        "silu-mul-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CpuStorage,
        l3: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let dh = super::cpu::f32_data(s1, l1, "silu-mul backward dh")?;
        let g = super::cpu::f32_data(s2, l2, "silu-mul backward gate")?;
        let u = super::cpu::f32_data(s3, l3, "silu-mul backward up")?;
        let n = dh.len();
        let mut out = vec![0f32; 2 * n];
        let (dgate, dup) = out.split_at_mut(n);
        let chunk = 16384;
        dgate
            .par_chunks_mut(chunk)
            .zip(dup.par_chunks_mut(chunk))
            .enumerate()
            .for_each(|(c, (dg, du))| {
                let o = c * chunk;
                let end = o + dg.len();
                let (dh, g, u) = (&dh[o..end], &g[o..end], &u[o..end]);
                super::cpu::vectorised!(silu_mul_backward_chunk(dh, g, u, dg, du));
            });
        let mut dims = vec![2];
        dims.extend_from_slice(l1.dims());
        Ok((
            candle_core::CpuStorage::F32(out),
            candle_core::Shape::from(dims),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::*;
    use candle_core::Device;

    #[test]
    fn backward_matches_finite_differences() {
        let (x, r) = (randn(&[3, 7], 1), randn(&[3, 7], 2));
        for act in [Act::GeluErf, Act::GeluTanh, Act::QuickGelu, Act::Silu] {
            let dx = act_backward(&r, &x, act).unwrap();
            let fd = fd_grad(&x, |x| Ok(dot(&act_forward(x, act)?, &r)));
            assert_close(&format!("{act:?}"), &dx, &fd, 1e-7);
        }
        let (g, u) = (randn(&[3, 7], 3), randn(&[3, 7], 4));
        let (dg, du) = silu_mul_backward(&r, &g, &u).unwrap();
        let l = |g: &Tensor, u: &Tensor| Ok(dot(&silu_mul_forward(g, u)?, &r));
        assert_close("dgate", &dg, &fd_grad(&g, |g| l(g, &u)), 1e-7);
        assert_close("dup", &du, &fd_grad(&u, |u| l(&g, u)), 1e-7);
    }

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
    fn fused_silu_mul_backward_equals_composed() {
        let dev = Device::Cpu;
        let f = |seed| {
            crate::util::rng::Rng::new(seed)
                .normal_tensor(&[3, 5, 7], 2.0, candle_core::DType::F32, &dev)
                .unwrap()
        };
        let (dh, g, u) = (f(1), f(2), f(3));
        let (dg, du) = silu_mul_backward(&dh, &g, &u).unwrap();
        let dg_ref = ((&dh * &u).unwrap() * silu_grad(&g).unwrap()).unwrap();
        let du_ref = (&dh * g.silu().unwrap()).unwrap();
        assert_close("dgate", &dg, &dg_ref, 1e-6);
        assert_close("dup", &du, &du_ref, 1e-6);
        let h = silu_mul_forward(&g, &u).unwrap();
        let h_ref = (g.silu().unwrap() * &u).unwrap();
        assert_close("h", &h, &h_ref, 1e-6);
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
