//! Scaled dot-product attention with an additive mask and grouped KV heads (GQA), the way
//! transformers' eager attention computes it: scores = q·kᵀ·scale + mask, softmax in f32.
//!
//! GQA without copying K/V: query head h uses KV head h / G, so the G query heads of a group
//! are stacked along the query axis, (B, NH, T, HD) -> (B, NKV, G·T, HD), and multiplied
//! against the group's single K/V.

mod blocked;
mod rows;

use candle_core::{D, DType, Device, Result, Tensor};

use crate::util::profile::{Kind, matmul_flops, span_flops};
use rows::{masked_softmax_row, softmax_backward_row};

pub use rows::MASKED;

/// What the attention backward needs. `probs` may be dropped to save memory (selective
/// recompute); the backward then recomputes them from q, k and the mask.
pub struct AttentionCtx {
    pub q: Tensor,             // (B, NKV, G·T, HD)
    pub k: Tensor,             // (B, NKV, S, HD)
    pub v: Tensor,             // (B, NKV, S, HD)
    pub probs: Option<Tensor>, // (B, NKV, G·T, S)
    /// Set when the forward ran in blocks of query rows (`blocked`, CPU f32 under a causal
    /// mask): the backward then skips the same keys.
    key_extents: Option<blocked::KeyExtents>,
}

/// q (B, NH, T, HD), k/v (B, NKV, S, HD), mask (B, 1, T, S) additive f32 or None
/// -> out (B, NH, T, HD) f32. Matmuls run in `mm_dtype`.
pub fn attention_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    mm_dtype: DType,
) -> Result<(Tensor, AttentionCtx)> {
    let (b, nh, t, hd) = q.dims4()?;
    let s = k.dim(2)?;
    let nkv = k.dim(1)?;
    if nh % nkv != 0 {
        candle_core::bail!("attention: {nh} query heads are not a multiple of {nkv} KV heads");
    }
    let g = nh / nkv;
    let q = q.contiguous()?.reshape((b, nkv, g * t, hd))?;
    let key_extents = match mask {
        Some(m) => blocked::extents(&q, k, m, g, mm_dtype)?,
        None => None,
    };
    // q·kᵀ and p·v per head, over the keys each query row multiplies against
    let row_keys = key_extents.as_ref().map_or(b * t * s, |e| e.row_keys());
    let _span = span_flops(
        Kind::Attention,
        2 * nh as u64 * matmul_flops(1, hd, row_keys),
    );
    let (out, probs) = match (&key_extents, mask) {
        (Some(ext), Some(m)) => blocked::forward(&q, k, v, m, ext, g, scale)?,
        _ => {
            let probs = attention_probs(&q, k, mask, g, scale, mm_dtype)?;
            (super::matmul_in(&probs, v, mm_dtype)?, probs) // (B, NKV, G·T, HD)
        }
    };
    let out = out.reshape((b, nh, t, hd))?;
    Ok((
        out,
        AttentionCtx {
            q,
            k: k.clone(),
            v: v.clone(),
            probs: Some(probs),
            key_extents,
        },
    ))
}

/// Bytes of attention probabilities the inference forward holds at once: longer prompts
/// are taken in blocks of query rows (each row's softmax is its own, so the result does
/// not change), which keeps a prompt at the end of an 8k context to a few hundred MB.
pub const INFERENCE_PROBS_BYTES: usize = 128 << 20;

/// `attention_forward` without what the backward needs, over blocks of query rows so
/// that the probabilities held at once stay under `INFERENCE_PROBS_BYTES`.
pub fn attention_inference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    mm_dtype: DType,
) -> Result<Tensor> {
    let (b, nh, _, _) = q.dims4()?;
    let per_row = 4 * b * nh * k.dim(2)?;
    let rows = (INFERENCE_PROBS_BYTES / per_row.max(1)).max(1);
    attention_in_row_blocks(q, k, v, mask, scale, mm_dtype, rows)
}

/// `attention_forward`'s output, `rows` query rows at a time.
fn attention_in_row_blocks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    mm_dtype: DType,
    rows: usize,
) -> Result<Tensor> {
    let t = q.dim(2)?;
    if rows >= t {
        return Ok(attention_forward(q, k, v, mask, scale, mm_dtype)?.0);
    }
    let mut outs = Vec::with_capacity(t.div_ceil(rows));
    for start in (0..t).step_by(rows) {
        let n = rows.min(t - start);
        let qc = q.narrow(2, start, n)?;
        let mc = mask.map(|m| m.narrow(2, start, n)).transpose()?;
        outs.push(attention_forward(&qc, k, v, mc.as_ref(), scale, mm_dtype)?.0);
    }
    Tensor::cat(&outs, 2)
}

/// softmax(q·kᵀ·scale + mask) for grouped queries q (B, NKV, G·T, HD), k (B, NKV, S, HD),
/// mask (B, 1, T, S) -> (B, NKV, G·T, S).
pub fn attention_probs(
    q: &Tensor,
    k: &Tensor,
    mask: Option<&Tensor>,
    g: usize,
    scale: f64,
    mm_dtype: DType,
) -> Result<Tensor> {
    let (b, nkv, gt, _) = q.dims4()?;
    let s = k.dim(2)?;
    let scores = super::matmul_in(q, &k.t()?, mm_dtype)?; // (B, NKV, G·T, S)
    match mask {
        Some(m) if super::cpu::fused_on(&scores) && scores.dtype() == DType::F32 => scores
            .apply_op2_no_bwd(
                &m.contiguous()?,
                &MaskedSoftmax {
                    scale: scale as f32,
                    t: gt / g,
                },
            ),
        Some(m) => softmax_last_dim(
            &(scores * scale)?
                .reshape((b, nkv, g, gt / g, s))?
                .broadcast_add(&m.unsqueeze(1)?)?
                .reshape((b, nkv, gt, s))?,
        ),
        None => softmax_last_dim(&(scores * scale)?),
    }
}

/// softmax(scale·x + mask) over rows of S, one pass per row (CPU). x is (.., T', S) where
/// every (B, ·) block of rows cycles through the T query positions of the (B, 1, T, S)
/// mask. Blocked entries are exactly 0 without calling exp on −3.4e38 (a slow path in libm);
/// a row with no allowed key is uniform, which is what transformers' min-value mask gives.
struct MaskedSoftmax {
    scale: f32,
    t: usize,
}

impl candle_core::CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let x = super::cpu::f32_data(s1, l1, "masked softmax")?;
        let mask = super::cpu::f32_data(s2, l2, "masked softmax mask")?;
        let dims = l1.dims();
        let s = *dims.last().expect("rank 4");
        let b = dims[0];
        let rows_per_b = x.len() / s / b;
        let t = self.t;
        let mut out = vec![0f32; x.len()];
        let per = super::cpu::rows_per_task(s);
        out.par_chunks_mut(s * per)
            .enumerate()
            .for_each(|(chunk, o)| {
                for (i, orow) in o.chunks_mut(s).enumerate() {
                    let r = chunk * per + i;
                    let (bi, ri) = (r / rows_per_b, r % rows_per_b);
                    let xr = &x[r * s..(r + 1) * s];
                    let mr = &mask[(bi * t + ri % t) * s..(bi * t + ri % t + 1) * s];
                    super::cpu::vectorised!(masked_softmax_row(xr, mr, self.scale, orow));
                }
            });
        Ok((candle_core::CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// dS = P ⊙ (dP − Σ_j dP ⊙ P), one pass per row (CPU).
struct SoftmaxBackward;

impl candle_core::CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "softmax-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let dp = super::cpu::f32_data(s1, l1, "softmax backward dP")?;
        let p = super::cpu::f32_data(s2, l2, "softmax backward P")?;
        let s = *l1.dims().last().expect("rank >= 1");
        let mut out = vec![0f32; dp.len()];
        let per = super::cpu::rows_per_task(s);
        out.par_chunks_mut(s * per)
            .enumerate()
            .for_each(|(chunk, o)| {
                for (i, orow) in o.chunks_mut(s).enumerate() {
                    let r = chunk * per + i;
                    let (dpr, pr) = (&dp[r * s..(r + 1) * s], &p[r * s..(r + 1) * s]);
                    super::cpu::vectorised!(softmax_backward_row(dpr, pr, orow));
                }
            });
        Ok((candle_core::CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// dS from dP and P (fused on the CPU).
fn softmax_backward(dp: &Tensor, p: &Tensor) -> Result<Tensor> {
    if super::cpu::fused_on(dp) && dp.dtype() == DType::F32 && p.dtype() == DType::F32 {
        return dp
            .contiguous()?
            .apply_op2_no_bwd(&p.contiguous()?, &SoftmaxBackward);
    }
    let row = (dp * p)?.sum_keepdim(D::Minus1)?;
    p * dp.broadcast_sub(&row)?
}

/// Gradients of attention_forward: dq (B, NH, T, HD), dk and dv (B, NKV, S, HD). The GQA
/// grouping makes dK and dV sum over the G query heads of a group automatically.
///
/// dV = Pᵀ·dO, dP = dO·Vᵀ, dS = P ⊙ (dP − Σ_j dP ⊙ P), dQ = scale·dS·K, dK = scale·dSᵀ·Q.
/// `mask` is the forward's mask, used only when `ctx.probs` was dropped.
pub fn attention_backward(
    dout: &Tensor,
    ctx: &AttentionCtx,
    mask: Option<&Tensor>,
    scale: f64,
    mm_dtype: DType,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, nh, t, hd) = dout.dims4()?;
    let s = ctx.k.dim(2)?;
    let recompute = if ctx.probs.is_none() { 1 } else { 0 };
    let nkv = ctx.k.dim(1)?;
    let g = nh / nkv;
    // dV, dP, dQ, dK per head (and q·kᵀ again when the probabilities were dropped)
    let row_keys = ctx.key_extents.as_ref().map_or(b * t * s, |e| e.row_keys());
    let _span = span_flops(
        Kind::Attention,
        (4 + recompute) * nh as u64 * matmul_flops(1, hd, row_keys),
    );
    let dout = dout.contiguous()?.reshape((b, nkv, g * t, hd))?; // (B, NKV, G·T, HD)
    if let Some(ext) = &ctx.key_extents {
        let probs = match (&ctx.probs, mask) {
            (Some(p), _) => p.clone(),
            (None, Some(m)) => blocked::probs(&ctx.q, &ctx.k, m, ext, g, scale)?,
            (None, None) => candle_core::bail!("attention backward: recompute needs the mask"),
        };
        let (dq, dk, dv) = blocked::backward(&dout, &ctx.q, &ctx.k, &ctx.v, &probs, ext, g, scale)?;
        return Ok((dq.reshape((b, nh, t, hd))?, dk, dv));
    }
    let probs = match &ctx.probs {
        Some(p) => p.clone(),
        None => attention_probs(&ctx.q, &ctx.k, mask, g, scale, mm_dtype)?,
    };
    let dv = super::matmul_in(&probs.t()?, &dout, mm_dtype)?; // (B, NKV, S, HD)
    let dp = super::matmul_in(&dout, &ctx.v.t()?, mm_dtype)?; // (B, NKV, G·T, S)
    let ds = softmax_backward(&dp, &probs)?;
    let dq = (super::matmul_in(&ds, &ctx.k, mm_dtype)? * scale)?.reshape((b, nh, t, hd))?;
    let dk = (super::matmul_in(&ds.t()?, &ctx.q, mm_dtype)? * scale)?; // (B, NKV, S, HD)
    Ok((dq, dk, dv))
}

/// Numerically stable softmax over the last dim. f32 uses candle-nn's fused kernel (one
/// pass instead of five; CPU and CUDA): forward only, our backward uses its output. Other
/// dtypes (f64 in the finite-difference tests) use the composed form.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.dtype() == DType::F32 {
        return candle_nn::ops::softmax_last_dim(&x.contiguous()?);
    }
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&sum)
}

/// The decoder's mask: query i may attend key j iff j <= i + offset and key j is not padding.
/// `key_valid` is (B, S) with 1 for real tokens; T = S − offset queries (offset > 0 when a
/// KV cache holds earlier keys). Returns (B, 1, T, S) additive f32.
pub fn causal_padding_mask(key_valid: &[Vec<bool>], t: usize, device: &Device) -> Result<Tensor> {
    let b = key_valid.len();
    let s = key_valid.first().map(|r| r.len()).unwrap_or(0);
    if s < t {
        candle_core::bail!("mask: {s} keys for {t} queries");
    }
    let offset = s - t;
    let mut data = vec![0f32; b * t * s];
    for (bi, row) in key_valid.iter().enumerate() {
        if row.len() != s {
            candle_core::bail!("mask: ragged key_valid rows");
        }
        for i in 0..t {
            for (j, &valid) in row.iter().enumerate() {
                if j > i + offset || !valid {
                    data[(bi * t + i) * s + j] = MASKED;
                }
            }
        }
    }
    Tensor::from_vec(data, (b, 1, t, s), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::*;

    #[test]
    fn row_blocks_give_the_whole_attention() {
        // GQA (4 query heads on 2 KV heads), a left-padded sample, rows in uneven blocks
        let (b, t, hd) = (2, 7, 4);
        let f32r = |shape: &[usize], seed| randn(shape, seed).to_dtype(DType::F32).unwrap();
        let (q, k, v) = (
            f32r(&[b, 4, t, hd], 1),
            f32r(&[b, 2, t, hd], 2),
            f32r(&[b, 2, t, hd], 3),
        );
        let valid = vec![
            vec![false, false, true, true, true, true, true],
            vec![true; t],
        ];
        let mask = causal_padding_mask(&valid, t, &Device::Cpu).unwrap();
        let whole = attention_forward(&q, &k, &v, Some(&mask), 0.5, DType::F32)
            .unwrap()
            .0;
        for rows in [1, 3, 6] {
            let blocks =
                attention_in_row_blocks(&q, &k, &v, Some(&mask), 0.5, DType::F32, rows).unwrap();
            assert_close("row blocks", &blocks, &whole, 1e-6);
        }
    }

    #[test]
    fn fused_cpu_kernels_equal_composed_ops() {
        // f32: masked softmax (with a left-padded, fully masked query row) and its backward
        let (b, g, t, hd) = (2, 3, 5, 4);
        let f32r = |shape: &[usize], seed| randn(shape, seed).to_dtype(DType::F32).unwrap();
        let q = f32r(&[b, 2, g * t, hd], 1);
        let k = f32r(&[b, 2, t, hd], 2);
        let valid = vec![vec![false, false, true, true, true], vec![true; t]];
        let mask = causal_padding_mask(&valid, t, &Device::Cpu).unwrap();
        let fused = attention_probs(&q, &k, Some(&mask), g, 0.5, DType::F32).unwrap();
        let scores = (q.matmul(&k.t().unwrap()).unwrap() * 0.5).unwrap();
        let composed = scores
            .reshape((b, 2, g, t, t))
            .unwrap()
            .broadcast_add(&mask.unsqueeze(1).unwrap())
            .unwrap()
            .reshape((b, 2, g * t, t))
            .unwrap();
        let max = composed.max_keepdim(D::Minus1).unwrap();
        let e = composed.broadcast_sub(&max).unwrap().exp().unwrap();
        let composed = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
        assert_close("probs", &fused, &composed, 1e-6);
        // row 0 of sample 0 (a pad query with no allowed key) is uniform
        let row = fused
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(row, vec![0.2; 5]);
        let dp = f32r(&[b, 2, g * t, t], 3);
        let ds = softmax_backward(&dp, &fused).unwrap();
        let dot = (&dp * &fused).unwrap().sum_keepdim(D::Minus1).unwrap();
        let want = (&fused * dp.broadcast_sub(&dot).unwrap()).unwrap();
        assert_close("ds", &ds, &want, 1e-6);
    }

    #[test]
    fn attention_backward_matches_finite_differences() {
        // NH 4, NKV 2, with a padded key in sample 1
        let (b, t, hd) = (2, 4, 3);
        let (q, k, v) = (
            randn(&[b, 4, t, hd], 1),
            randn(&[b, 2, t, hd], 2),
            randn(&[b, 2, t, hd], 3),
        );
        let r = randn(&[b, 4, t, hd], 4);
        let valid = vec![vec![true; t], vec![true, true, true, false]];
        let mask = causal_padding_mask(&valid, t, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let f = |q: &Tensor, k: &Tensor, v: &Tensor| {
            Ok(dot(
                &attention_forward(q, k, v, Some(&mask), 0.7, DType::F64)?.0,
                &r,
            ))
        };
        let (_, mut ctx) = attention_forward(&q, &k, &v, Some(&mask), 0.7, DType::F64).unwrap();
        let (dq, dk, dv) = attention_backward(&r, &ctx, None, 0.7, DType::F64).unwrap();
        assert_close("dq", &dq, &fd_grad(&q, |q| f(q, &k, &v)), 1e-7);
        assert_close("dk", &dk, &fd_grad(&k, |k| f(&q, k, &v)), 1e-7);
        assert_close("dv", &dv, &fd_grad(&v, |v| f(&q, &k, v)), 1e-7);
        // probabilities dropped: recomputed from q, k and the mask, same result
        ctx.probs = None;
        let (dq2, _, _) = attention_backward(&r, &ctx, Some(&mask), 0.7, DType::F64).unwrap();
        assert_close("dq recomputed", &dq2, &dq, 1e-12);
    }

    #[test]
    fn blocked_attention_equals_the_whole_matrices() {
        // f32 blocks of query rows against the f64 composed path (checked against finite
        // differences above): GQA, T not a multiple of the block, right and left padding
        // (left-padded rows see no key: uniform over all keys), and a KV-cache offset
        // (S > T); forward, backward, and the backward recomputing dropped probabilities
        let cases: [(usize, usize, Vec<Vec<bool>>); 3] = [
            (
                75,
                75,
                vec![vec![true; 75], (0..75).map(|j| j < 60).collect()],
            ),
            (
                70,
                70,
                vec![(0..70).map(|j| j >= 40).collect(), vec![true; 70]],
            ),
            (
                64,
                100,
                vec![vec![true; 100], (0..100).map(|j| j >= 3).collect()],
            ),
        ];
        for (t, s, valid) in cases {
            let (b, hd, scale) = (2, 8, 0.35);
            let (q, k, v) = (
                randn(&[b, 6, t, hd], 1),
                randn(&[b, 2, s, hd], 2),
                randn(&[b, 2, s, hd], 3),
            );
            let r = randn(&[b, 6, t, hd], 4);
            let mask = causal_padding_mask(&valid, t, &Device::Cpu).unwrap();
            let f32s = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
            let (out, mut ctx) = attention_forward(
                &f32s(&q),
                &f32s(&k),
                &f32s(&v),
                Some(&mask),
                scale,
                DType::F32,
            )
            .unwrap();
            assert!(
                ctx.key_extents.is_some(),
                "t {t} s {s}: blocked path not taken"
            );
            let mask64 = mask.to_dtype(DType::F64).unwrap();
            let (want, want_ctx) =
                attention_forward(&q, &k, &v, Some(&mask64), scale, DType::F64).unwrap();
            assert!(want_ctx.key_extents.is_none());
            let case = format!("t {t} s {s}");
            assert_close(&format!("{case} out"), &out, &want, 1e-5);
            let probs = ctx.probs.clone().unwrap();
            assert_close(
                &format!("{case} probs"),
                &probs,
                want_ctx.probs.as_ref().unwrap(),
                1e-6,
            );
            let grads =
                attention_backward(&f32s(&r), &ctx, Some(&mask), scale, DType::F32).unwrap();
            let want = attention_backward(&r, &want_ctx, Some(&mask64), scale, DType::F64).unwrap();
            for (name, a, w) in [
                ("dq", &grads.0, &want.0),
                ("dk", &grads.1, &want.1),
                ("dv", &grads.2, &want.2),
            ] {
                assert_close(&format!("{case} {name}"), a, w, 1e-5);
            }
            ctx.probs = None;
            let again =
                attention_backward(&f32s(&r), &ctx, Some(&mask), scale, DType::F32).unwrap();
            assert_close(&format!("{case} dq recomputed"), &again.0, &grads.0, 1e-6);
        }
        // a mask that blocks nothing gains nothing from blocks: the whole products run
        let q = randn(&[1, 2, 64, 8], 5).to_dtype(DType::F32).unwrap();
        let k = randn(&[1, 2, 64, 8], 6).to_dtype(DType::F32).unwrap();
        let open = Tensor::zeros((1, 1, 64, 64), DType::F32, &Device::Cpu).unwrap();
        let (_, ctx) = attention_forward(&q, &k, &k, Some(&open), 0.3, DType::F32).unwrap();
        assert!(ctx.key_extents.is_none());
    }

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        // small deterministic values without an RNG dependency
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| (((i as u64 * 2654435761 + seed * 97) % 1000) as f32 / 500.0) - 1.0)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn gqa_equals_repeated_kv_heads() {
        // NH = 4, NKV = 2: query head h uses KV head h / 2 (repeat_interleave)
        let (b, t, hd) = (2, 5, 8);
        let q = rand(&[b, 4, t, hd], 1);
        let k = rand(&[b, 2, t, hd], 2);
        let v = rand(&[b, 2, t, hd], 3);
        let valid = vec![vec![true; t], vec![true, true, true, false, false]];
        let mask = causal_padding_mask(&valid, t, &Device::Cpu).unwrap();
        let (out, _) = attention_forward(&q, &k, &v, Some(&mask), 0.3, DType::F32).unwrap();
        let rep = |x: &Tensor| {
            let hs: Vec<Tensor> = (0..4).map(|h| x.narrow(1, h / 2, 1).unwrap()).collect();
            Tensor::cat(&hs, 1).unwrap()
        };
        let (kr, vr) = (rep(&k), rep(&v));
        let (want, _) = attention_forward(&q, &kr, &vr, Some(&mask), 0.3, DType::F32).unwrap();
        let d = (out - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-6, "{d}");
    }

    #[test]
    fn mask_rules() {
        // row 0 sees only key 0; padded keys are never seen; a query with no allowed key
        // (left padding) gets a uniform distribution, as with transformers' min-value mask
        let valid = vec![vec![false, true, true]];
        let m = causal_padding_mask(&valid, 3, &Device::Cpu).unwrap();
        let m = m.reshape((3, 3)).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(m[1], vec![MASKED, 0., MASKED]);
        assert_eq!(m[2], vec![MASKED, 0., 0.]);
        let q = rand(&[1, 1, 3, 4], 5);
        let (_, ctx) = attention_forward(
            &q,
            &q,
            &q,
            Some(&causal_padding_mask(&valid, 3, &Device::Cpu).unwrap()),
            1.0,
            DType::F32,
        )
        .unwrap();
        let p = ctx
            .probs
            .unwrap()
            .reshape((3, 3))
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(p[0], vec![1. / 3.; 3]);
        assert_eq!(p[1], vec![0., 1., 0.]);
    }
}
