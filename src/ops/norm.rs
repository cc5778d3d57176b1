//! RMSNorm (LLaMA) and LayerNorm (CLIP, DINOv2), computed in f32 over the last dim.

use candle_core::{D, Result, Tensor};

/// What the RMSNorm backward needs: the input and 1/rms per row.
pub struct RmsNormCtx {
    pub x: Tensor,    // (.., C)
    pub rstd: Tensor, // (.., 1)
}

/// y = w ⊙ x · rsqrt(mean(x²) + eps). x (.., C) f32, w (C) f32.
pub fn rmsnorm_forward(x: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, RmsNormCtx)> {
    let rstd = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?; // (.., 1)
    let y = x.broadcast_mul(&rstd)?.broadcast_mul(w)?;
    Ok((
        y,
        RmsNormCtx {
            x: x.clone(),
            rstd,
        },
    ))
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
    let mean = x.mean_keepdim(D::Minus1)?; // (.., 1)
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let rstd = (var + eps)?.sqrt()?.recip()?;
    let xhat = xc.broadcast_mul(&rstd)?;
    let y = xhat.broadcast_mul(w)?.broadcast_add(b)?;
    Ok((y, LayerNormCtx { xhat, rstd }))
}
