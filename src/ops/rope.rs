//! Rotary position embedding in the HF `rotate_half` layout: dim j pairs with dim j + HD/2.
//!
//! out[..j]     = x1·cos − x2·sin
//! out[j+HD/2]  = x2·cos + x1·sin        (x1 = x[..HD/2], x2 = x[HD/2..])
//!
//! which is `x·cos + rotate_half(x)·sin` with `cos = cat(cos_half, cos_half)`.

use candle_core::{D, Device, Result, Tensor};

/// cos and sin of `position · inv_freq` for explicit positions, half width.
///
/// The angle is formed in f32 as PyTorch does (`inv_freq.float() @ position_ids.float()`),
/// so long positions round the same way. Computed per batch from the positions in use, so
/// no table of `max_position_embeddings` rows is kept.
/// `positions` is (B·T) row-major -> cos, sin (B, 1, T, HD/2) f32.
pub fn rope_cos_sin(
    inv_freq: &[f32],
    positions: &[u32],
    b: usize,
    t: usize,
    attention_scaling: f32,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    if positions.len() != b * t {
        candle_core::bail!("rope: {} positions for B={b}, T={t}", positions.len());
    }
    let half = inv_freq.len();
    let mut cos = Vec::with_capacity(b * t * half);
    let mut sin = Vec::with_capacity(b * t * half);
    for &p in positions {
        for &f in inv_freq {
            let angle = p as f32 * f;
            cos.push(angle.cos() * attention_scaling);
            sin.push(angle.sin() * attention_scaling);
        }
    }
    Ok((
        Tensor::from_vec(cos, (b, 1, t, half), device)?,
        Tensor::from_vec(sin, (b, 1, t, half), device)?,
    ))
}

/// x (B, H, T, HD), cos/sin broadcastable to (B, 1, T, HD/2) -> rotated x (B, H, T, HD).
pub fn rope_forward(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let hd = x.dim(D::Minus1)?;
    let half = hd / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let o1 = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let o2 = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Tensor::cat(&[o1, o2], D::Minus1)
}
