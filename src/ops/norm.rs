//! RMSNorm (LLaMA) and LayerNorm (CLIP, DINOv2) over the last dim, f32.

use candle_core::{D, Result, Tensor};
use rayon::prelude::*;

use crate::util::profile::{Kind, span};

/// What the RMSNorm backward needs: the input and 1/rms per row.
pub struct RmsNormCtx {
    pub x: Tensor,    // (.., C)
    pub rstd: Tensor, // (.., 1)
}

/// y = w ⊙ x · rsqrt(mean(x²) + eps). x (.., C), w (C).
pub fn rmsnorm_forward(x: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, RmsNormCtx)> {
    let _span = span(Kind::Norm);
    if let Some(r) = rmsnorm_forward_cpu(x, w, eps)? {
        return Ok(r);
    }
    let rstd = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?; // (.., 1)
    let y = x.broadcast_mul(&rstd)?.broadcast_mul(w)?;
    Ok((y, RmsNormCtx { x: x.clone(), rstd }))
}

/// With x̂ = x·rstd and g = dy ⊙ w: dx = rstd·(g − x̂·mean(g ⊙ x̂)), dw = Σ_rows dy ⊙ x̂.
pub fn rmsnorm_backward(
    dy: &Tensor,
    ctx: &RmsNormCtx,
    w: &Tensor,
    need_dw: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let _span = span(Kind::Norm);
    if let Some(r) = rmsnorm_backward_cpu(dy, ctx, w, need_dw)? {
        return Ok(r);
    }
    let xhat = ctx.x.broadcast_mul(&ctx.rstd)?;
    let g = dy.broadcast_mul(w)?;
    let proj = (&g * &xhat)?.mean_keepdim(D::Minus1)?;
    let dx = (g - xhat.broadcast_mul(&proj)?)?.broadcast_mul(&ctx.rstd)?;
    let dw = if need_dw {
        Some(super::rows2(&(dy * &xhat)?)?.sum(0)?)
    } else {
        None
    };
    Ok((dx, dw))
}

/// Rows per parallel task of the fused norm kernels.
const NORM_ROWS: usize = 64;

/// Fused CPU forward (one pass per row, on the rayon threads): the same formula as the
/// composed ops, f32 throughout, the row's mean of squares summed in order.
fn rmsnorm_forward_cpu(x: &Tensor, w: &Tensor, eps: f64) -> Result<Option<(Tensor, RmsNormCtx)>> {
    let computed = super::cpu::with_f32_slices(&[x, w], |v| {
        let (xv, wv) = (v[0], v[1]);
        let c = wv.len();
        if c == 0 || x.dims().last() != Some(&c) {
            return None;
        }
        let mut y = vec![0f32; xv.len()];
        let mut rstd = vec![0f32; xv.len() / c];
        let eps = eps as f32;
        y.par_chunks_mut(NORM_ROWS * c)
            .zip(rstd.par_chunks_mut(NORM_ROWS))
            .zip(xv.par_chunks(NORM_ROWS * c))
            .for_each(|((y, r), x)| super::cpu::vectorised!(rmsnorm_rows(x, wv, eps, y, r)));
        Some((y, rstd))
    });
    let Some((y, rstd)) = computed.flatten() else {
        return Ok(None);
    };
    let mut rdims = x.dims().to_vec();
    *rdims.last_mut().expect("rank >= 1") = 1;
    let y = Tensor::from_vec(y, x.shape(), x.device())?;
    let rstd = Tensor::from_vec(rstd, rdims, x.device())?;
    Ok(Some((y, RmsNormCtx { x: x.clone(), rstd })))
}

/// Rows of x (C each) -> y = x·rstd·w and rstd per row.
#[inline(always)]
fn rmsnorm_rows(x: &[f32], w: &[f32], eps: f32, y: &mut [f32], rstd: &mut [f32]) {
    let c = w.len();
    for ((y, r), x) in y.chunks_mut(c).zip(rstd.iter_mut()).zip(x.chunks(c)) {
        let ms = super::cpu::lane_sum(c, |i| x[i] * x[i]) / c as f32;
        *r = 1.0 / (ms + eps).sqrt();
        for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
            *y = x * *r * w;
        }
    }
}

/// Rows of the backward: dx per row, dw (empty when not asked for) summed over the rows.
#[inline(always)]
fn rmsnorm_backward_rows(
    dy: &[f32],
    x: &[f32],
    rstd: &[f32],
    w: &[f32],
    dx: &mut [f32],
    dw: &mut [f32],
) {
    let c = w.len();
    for (((dx, dy), x), &r) in dx
        .chunks_mut(c)
        .zip(dy.chunks(c))
        .zip(x.chunks(c))
        .zip(rstd)
    {
        let proj = super::cpu::lane_sum(c, |i| dy[i] * w[i] * (x[i] * r)) / c as f32;
        for (i, dx) in dx.iter_mut().enumerate() {
            *dx = (dy[i] * w[i] - x[i] * r * proj) * r;
        }
        for ((dw, &dy), &x) in dw.iter_mut().zip(dy).zip(x) {
            *dw += dy * (x * r);
        }
    }
}

/// Fused CPU backward: per row dx = rstd·(g − x̂·mean(g ⊙ x̂)); dw summed over rows per
/// block of `NORM_ROWS` rows, then over the blocks in order (deterministic).
fn rmsnorm_backward_cpu(
    dy: &Tensor,
    ctx: &RmsNormCtx,
    w: &Tensor,
    need_dw: bool,
) -> Result<Option<(Tensor, Option<Tensor>)>> {
    let computed = super::cpu::with_f32_slices(&[dy, &ctx.x, &ctx.rstd, w], |v| {
        let (dyv, xv, rv, wv) = (v[0], v[1], v[2], v[3]);
        let c = wv.len();
        if c == 0 || dyv.len() != xv.len() || xv.len() != rv.len() * c {
            return None;
        }
        let mut dx = vec![0f32; xv.len()];
        let partial: Vec<Vec<f32>> = dx
            .par_chunks_mut(NORM_ROWS * c)
            .zip(dyv.par_chunks(NORM_ROWS * c))
            .zip(xv.par_chunks(NORM_ROWS * c))
            .zip(rv.par_chunks(NORM_ROWS))
            .map(|(((dx, dy), x), r)| {
                let mut dw = if need_dw { vec![0f32; c] } else { Vec::new() };
                super::cpu::vectorised!(rmsnorm_backward_rows(dy, x, r, wv, dx, &mut dw));
                dw
            })
            .collect();
        let dw = need_dw.then(|| {
            let mut total = vec![0f32; c];
            for p in &partial {
                for (t, v) in total.iter_mut().zip(p) {
                    *t += v;
                }
            }
            total
        });
        Some((dx, dw))
    });
    let Some((dx, dw)) = computed.flatten() else {
        return Ok(None);
    };
    let dw = dw
        .map(|d| Tensor::from_vec(d, w.elem_count(), w.device()))
        .transpose()?;
    Ok(Some((Tensor::from_vec(dx, dy.shape(), dy.device())?, dw)))
}

/// What the LayerNorm backward needs: the normalized input and 1/std per row.
pub struct LayerNormCtx {
    pub xhat: Tensor, // (.., C)
    pub rstd: Tensor, // (.., 1)
}

/// y = (x − mean) / sqrt(var + eps) ⊙ w + b, biased variance as in PyTorch.
pub fn layernorm_forward(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
) -> Result<(Tensor, LayerNormCtx)> {
    let _span = span(Kind::Norm);
    let mean = x.mean_keepdim(D::Minus1)?; // (.., 1)
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let rstd = (var + eps)?.sqrt()?.recip()?;
    let xhat = xc.broadcast_mul(&rstd)?;
    let y = xhat.broadcast_mul(w)?.broadcast_add(b)?;
    Ok((y, LayerNormCtx { xhat, rstd }))
}

/// With g = dy ⊙ w: dx = rstd·(g − mean(g) − x̂·mean(g ⊙ x̂)), dw = Σ dy ⊙ x̂, db = Σ dy.
pub fn layernorm_backward(
    dy: &Tensor,
    ctx: &LayerNormCtx,
    w: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let _span = span(Kind::Norm);
    let g = dy.broadcast_mul(w)?;
    let mean_g = g.mean_keepdim(D::Minus1)?;
    let proj = (&g * &ctx.xhat)?.mean_keepdim(D::Minus1)?;
    let dx = g
        .broadcast_sub(&mean_g)?
        .sub(&ctx.xhat.broadcast_mul(&proj)?)?
        .broadcast_mul(&ctx.rstd)?;
    let dw = super::rows2(&(dy * &ctx.xhat)?)?.sum(0)?;
    let db = super::rows2(dy)?.sum(0)?;
    Ok((dx, dw, db))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::*;
    use candle_core::Device;

    #[test]
    fn rmsnorm_by_hand() {
        // x = [3, 4]: mean(x²) = 12.5, rstd = 1/sqrt(12.5 + eps); w = [1, 2]
        let x = Tensor::new(&[[3f32, 4.]], &Device::Cpu).unwrap();
        let w = Tensor::new(&[1f32, 2.], &Device::Cpu).unwrap();
        let (y, ctx) = rmsnorm_forward(&x, &w, 1e-6).unwrap();
        let r = 1.0 / (12.5f32 + 1e-6).sqrt();
        assert_eq!(y.to_vec2::<f32>().unwrap(), vec![vec![3. * r, 8. * r]]);
        assert_eq!(ctx.rstd.to_vec2::<f32>().unwrap(), vec![vec![r]]);
    }

    #[test]
    fn fused_rmsnorm_equals_the_composed_ops() {
        let dev = Device::Cpu;
        let f = |shape: &[usize], seed| {
            crate::util::rng::Rng::new(seed)
                .normal_tensor(shape, 2.0, candle_core::DType::F32, &dev)
                .unwrap()
        };
        // more rows than one parallel block, so that dw sums several blocks
        let (x, w, dy) = (f(&[3, 50, 24], 1), f(&[24], 2), f(&[3, 50, 24], 3));
        let (y, ctx) = rmsnorm_forward(&x, &w, 1e-5).unwrap();
        let rstd = (x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + 1e-5)
            .unwrap()
            .sqrt()
            .unwrap()
            .recip()
            .unwrap();
        let y_ref = x.broadcast_mul(&rstd).unwrap().broadcast_mul(&w).unwrap();
        assert_close("y", &y, &y_ref, 1e-6);
        assert_close("rstd", &ctx.rstd, &rstd, 1e-6);
        let (dx, dw) = rmsnorm_backward(&dy, &ctx, &w, true).unwrap();
        let xhat = x.broadcast_mul(&rstd).unwrap();
        let g = dy.broadcast_mul(&w).unwrap();
        let proj = (&g * &xhat).unwrap().mean_keepdim(D::Minus1).unwrap();
        let dx_ref = (g - xhat.broadcast_mul(&proj).unwrap())
            .unwrap()
            .broadcast_mul(&rstd)
            .unwrap();
        let dw_ref = (&dy * &xhat)
            .unwrap()
            .reshape(((), 24))
            .unwrap()
            .sum(0)
            .unwrap();
        assert_close("dx", &dx, &dx_ref, 1e-5);
        assert_close("dw", &dw.unwrap(), &dw_ref, 1e-5);
        let (_, none) = rmsnorm_backward(&dy, &ctx, &w, false).unwrap();
        assert!(none.is_none());
    }

    #[test]
    fn layernorm_by_hand() {
        // x = [1, 3]: mean 2, biased var 1, xhat = [-1, 1] (eps 0); y = xhat·w + b
        let x = Tensor::new(&[[1f32, 3.]], &Device::Cpu).unwrap();
        let w = Tensor::new(&[2f32, 3.], &Device::Cpu).unwrap();
        let b = Tensor::new(&[0.5f32, -0.5], &Device::Cpu).unwrap();
        let (y, _) = layernorm_forward(&x, &w, &b, 0.0).unwrap();
        assert_eq!(y.to_vec2::<f32>().unwrap(), vec![vec![-1.5, 2.5]]);
    }

    #[test]
    fn rmsnorm_backward_matches_finite_differences() {
        let (x, w, r) = (randn(&[2, 3, 6], 1), randn(&[6], 2), randn(&[2, 3, 6], 3));
        let (_, ctx) = rmsnorm_forward(&x, &w, 1e-5).unwrap();
        let (dx, dw) = rmsnorm_backward(&r, &ctx, &w, true).unwrap();
        let l = |x: &Tensor, w: &Tensor| Ok(dot(&rmsnorm_forward(x, w, 1e-5)?.0, &r));
        assert_close("dx", &dx, &fd_grad(&x, |x| l(x, &w)), 1e-7);
        assert_close("dw", &dw.unwrap(), &fd_grad(&w, |w| l(&x, w)), 1e-7);
    }

    #[test]
    fn layernorm_backward_matches_finite_differences() {
        let (x, w, b, r) = (
            randn(&[4, 5], 4),
            randn(&[5], 5),
            randn(&[5], 6),
            randn(&[4, 5], 7),
        );
        let (_, ctx) = layernorm_forward(&x, &w, &b, 1e-5).unwrap();
        let (dx, dw, db) = layernorm_backward(&r, &ctx, &w).unwrap();
        let l =
            |x: &Tensor, w: &Tensor, b: &Tensor| Ok(dot(&layernorm_forward(x, w, b, 1e-5)?.0, &r));
        assert_close("dx", &dx, &fd_grad(&x, |x| l(x, &w, &b)), 1e-7);
        assert_close("dw", &dw, &fd_grad(&w, |w| l(&x, w, &b)), 1e-7);
        assert_close("db", &db, &fd_grad(&b, |b| l(&x, &w, b)), 1e-7);
    }
}
