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
    if let Some(y) = rotate_cpu(x, cos, sin, sign)? {
        return Ok(y);
    }
    let hd = x.dim(D::Minus1)?;
    let half = hd / 2;
    let (cos, sin) = (cos.to_dtype(x.dtype())?, (sin.to_dtype(x.dtype())? * sign)?);
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let o1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let o2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    Tensor::cat(&[o1, o2], D::Minus1)
}

/// The rotation in one pass on the CPU (f32; x made contiguous, cos/sin (B or 1, 1, T, HD/2)
/// contiguous), on the rayon threads. The same products and sums as the composed ops, so
/// the same bits. `None` for other dtypes, devices or shapes.
fn rotate_cpu(x: &Tensor, cos: &Tensor, sin: &Tensor, sign: f64) -> Result<Option<Tensor>> {
    use candle_core::{CpuStorage, DType, Storage};
    use rayon::prelude::*;
    let f32_cpu = [x, cos, sin]
        .iter()
        .all(|t| super::cpu::fused_on(t) && t.dtype() == DType::F32);
    if !f32_cpu || x.rank() != 4 || cos.rank() != 4 || cos.dims() != sin.dims() {
        return Ok(None);
    }
    let (b, h, t, hd) = x.dims4()?;
    let (cb, one, ct, half) = cos.dims4()?;
    if hd % 2 != 0 || half * 2 != hd || one != 1 || ct != t || !(cb == b || cb == 1) {
        return Ok(None);
    }
    if !(cos.is_contiguous() && sin.is_contiguous()) || b * h * t == 0 {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let mut out = vec![0f32; b * h * t * hd];
    {
        let (xs, xl) = x.storage_and_layout();
        let (cs, cl) = cos.storage_and_layout();
        let (ss, sl) = sin.storage_and_layout();
        let (
            Storage::Cpu(CpuStorage::F32(xv)),
            Storage::Cpu(CpuStorage::F32(cv)),
            Storage::Cpu(CpuStorage::F32(sv)),
        ) = (&*xs, &*cs, &*ss)
        else {
            return Ok(None);
        };
        let (Some((xa, xb)), Some((ca, cb_)), Some((sa, sb))) = (
            xl.contiguous_offsets(),
            cl.contiguous_offsets(),
            sl.contiguous_offsets(),
        ) else {
            return Ok(None);
        };
        let (xv, cv, sv) = (&xv[xa..xb], &cv[ca..cb_], &sv[sa..sb]);
        let sign = sign as f32;
        // one task per (batch, head) plane of T x HD values
        out.par_chunks_mut(t * hd)
            .zip(xv.par_chunks(t * hd))
            .enumerate()
            .for_each(|(plane, (o, x))| {
                let bi = if cb == 1 { 0 } else { plane / h };
                let c = &cv[bi * t * half..(bi + 1) * t * half];
                let s = &sv[bi * t * half..(bi + 1) * t * half];
                for ti in 0..t {
                    let (xr, or) = (&x[ti * hd..(ti + 1) * hd], &mut o[ti * hd..(ti + 1) * hd]);
                    let (cr, sr) = (
                        &c[ti * half..(ti + 1) * half],
                        &s[ti * half..(ti + 1) * half],
                    );
                    for j in 0..half {
                        let (x1, x2) = (xr[j], xr[j + half]);
                        let (cj, sj) = (cr[j], sr[j] * sign);
                        or[j] = x1 * cj - x2 * sj;
                        or[j + half] = x2 * cj + x1 * sj;
                    }
                }
            });
    }
    Ok(Some(Tensor::from_vec(out, (b, h, t, hd), x.device())?))
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
    fn fused_rotation_equals_the_composed_ops() {
        // f32 on the CPU takes the fused kernel: compare with the composed ops on the
        // strided view a head split gives, for per-sample and shared cos/sin
        let dev = Device::Cpu;
        let x = crate::util::rng::Rng::new(5)
            .normal_tensor(&[2, 7, 3, 8], 1.0, candle_core::DType::F32, &dev)
            .unwrap()
            .transpose(1, 2)
            .unwrap(); // (2, 3, 7, 8), not contiguous
        let pos: Vec<u32> = (0..14).map(|i| i * 5).collect();
        let (cos, sin) = rope_cos_sin(&[1.0, 0.3, 0.05, 0.01], &pos, 2, 7, 1.0, &dev).unwrap();
        let shared = (
            cos.get(0).unwrap().unsqueeze(0).unwrap(),
            sin.get(0).unwrap().unsqueeze(0).unwrap(),
        );
        for (c, s) in [(&cos, &sin), (&shared.0, &shared.1)] {
            for sign in [1.0, -1.0] {
                let fused = rotate(&x, c, s, sign).unwrap();
                let half = 4;
                let (c2, s2) = (c.clone(), (s * sign).unwrap());
                let x1 = x.narrow(D::Minus1, 0, half).unwrap();
                let x2 = x.narrow(D::Minus1, half, half).unwrap();
                let o1 = (x1.broadcast_mul(&c2).unwrap() - x2.broadcast_mul(&s2).unwrap()).unwrap();
                let o2 = (x2.broadcast_mul(&c2).unwrap() + x1.broadcast_mul(&s2).unwrap()).unwrap();
                let composed = Tensor::cat(&[o1, o2], D::Minus1).unwrap();
                assert_close("rope", &fused, &composed, 0.0);
            }
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
