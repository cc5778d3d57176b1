//! Scaled dot-product attention with an additive mask and grouped KV heads (GQA), the way
//! transformers' eager attention computes it: scores = q·kᵀ·scale + mask, softmax in f32.
//!
//! GQA without copying K/V: query head h uses KV head h / G, so the G query heads of a group
//! are stacked along the query axis, (B, NH, T, HD) -> (B, NKV, G·T, HD), and multiplied
//! against the group's single K/V.

use candle_core::{D, DType, Device, Result, Tensor};

/// Additive mask value for blocked keys: transformers uses the dtype minimum, so a row with
/// no allowed key becomes a uniform distribution instead of NaN.
pub const MASKED: f32 = f32::MIN;

/// What the attention backward needs.
pub struct AttentionCtx {
    pub q: Tensor,     // (B, NKV, G·T, HD)
    pub k: Tensor,     // (B, NKV, S, HD)
    pub v: Tensor,     // (B, NKV, S, HD)
    pub probs: Tensor, // (B, NKV, G·T, S)
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
    let (_, nkv, s, _) = k.dims4()?;
    if nh % nkv != 0 {
        candle_core::bail!("attention: {nh} query heads are not a multiple of {nkv} KV heads");
    }
    let g = nh / nkv;
    let q = q.contiguous()?.reshape((b, nkv, g * t, hd))?;
    let scores = (super::matmul_in(&q, &k.t()?, mm_dtype)? * scale)?; // (B, NKV, G·T, S)
    let scores = match mask {
        Some(m) => scores
            .reshape((b, nkv, g, t, s))?
            .broadcast_add(&m.unsqueeze(1)?)?
            .reshape((b, nkv, g * t, s))?,
        None => scores,
    };
    let probs = softmax_last_dim(&scores)?;
    let out = super::matmul_in(&probs, v, mm_dtype)?; // (B, NKV, G·T, HD)
    let out = out.reshape((b, nh, t, hd))?;
    Ok((
        out,
        AttentionCtx {
            q,
            k: k.clone(),
            v: v.clone(),
            probs,
        },
    ))
}

/// Numerically stable softmax over the last dim, f32.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&sum)
}

/// The decoder's mask: query i may attend key j iff j <= i + offset and key j is not padding.
/// `key_valid` is (B, S) with 1 for real tokens; T = S − offset queries (offset > 0 when a
/// KV cache holds earlier keys). Returns (B, 1, T, S) additive f32.
pub fn causal_padding_mask(
    key_valid: &[Vec<bool>],
    t: usize,
    device: &Device,
) -> Result<Tensor> {
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
