//! RMSNorm (LLaMA) and LayerNorm (CLIP, DINOv2) over the last dim, f32.

use candle_core::{D, Result, Tensor};

use crate::util::profile::{Kind, span};

/// What the RMSNorm backward needs: the input and 1/rms per row.
pub struct RmsNormCtx {
    pub x: Tensor,    // (.., C)
    pub rstd: Tensor, // (.., 1)
}

/// y = w ⊙ x · rsqrt(mean(x²) + eps). x (.., C), w (C).
pub fn rmsnorm_forward(x: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, RmsNormCtx)> {
    let _span = span(Kind::Norm);
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
