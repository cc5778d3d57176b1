//! Rotary position embedding in the HF `rotate_half` layout: dim j pairs with dim j + HD/2.
//!
//! out[..HD/2] = x1·cos − x2·sin
//! out[HD/2..] = x2·cos + x1·sin        (x1 = x[..HD/2], x2 = x[HD/2..])
//!
//! which is `x·cos + rotate_half(x)·sin` with `cos = cat(cos_half, cos_half)`. The map is a
//! rotation, so its backward is the inverse rotation (sin → −sin).

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
    rotate(x, cos, sin, 1.0)
}

/// dy (B, H, T, HD) -> dx: the transpose of the rotation, i.e. rotation by −angle.
pub fn rope_backward(dy: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rotate(dy, cos, sin, -1.0)
}

fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor, sign: f64) -> Result<Tensor> {
    let _span = crate::util::profile::span(crate::util::profile::Kind::Elementwise);
    let hd = x.dim(D::Minus1)?;
    let half = hd / 2;
    let (cos, sin) = (cos.to_dtype(x.dtype())?, (sin.to_dtype(x.dtype())? * sign)?);
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let o1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let o2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    Tensor::cat(&[o1, o2], D::Minus1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::*;

    #[test]
    fn rotation_by_hand() {
        // HD = 4, inv_freq = [1, 0.5]; position 1 rotates pair (x0, x2) by 1 rad and (x1, x3)
        // by 0.5 rad; position 0 is the identity.
        let x = Tensor::new(&[1f32, 2., 3., 4.], &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 1, 4))
            .unwrap();
        let x2 = Tensor::cat(&[&x, &x], 2).unwrap(); // (1, 1, 2, 4)
        let (cos, sin) = rope_cos_sin(&[1.0, 0.5], &[0, 1], 1, 2, 1.0, &Device::Cpu).unwrap();
        let y = rope_forward(&x2, &cos, &sin).unwrap();
        let y = y.squeeze(0).unwrap().to_vec3::<f32>().unwrap();
        let y = &y[0];
        assert_eq!(y[0], vec![1., 2., 3., 4.]);
        let (c1, s1, c2, s2) = (1f32.cos(), 1f32.sin(), 0.5f32.cos(), 0.5f32.sin());
        let want = [
            1. * c1 - 3. * s1,
            2. * c2 - 4. * s2,
            3. * c1 + 1. * s1,
            4. * c2 + 2. * s2,
        ];
        for (a, b) in y[1].iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn rope_backward_matches_finite_differences() {
        let (x, r) = (randn(&[2, 3, 4, 6], 1), randn(&[2, 3, 4, 6], 2));
        let pos: Vec<u32> = (0..8).map(|i| i * 3).collect();
        let (cos, sin) = rope_cos_sin(&[1.0, 0.3, 0.01], &pos, 2, 4, 1.0, &Device::Cpu).unwrap();
        let dx = rope_backward(&r, &cos, &sin).unwrap();
        let fd = fd_grad(&x, |x| Ok(dot(&rope_forward(x, &cos, &sin)?, &r)));
        assert_close("dx", &dx, &fd, 1e-6);
    }
}
