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
    Ok((y, RmsNormCtx { x: x.clone(), rstd }))
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

#[cfg(test)]
mod tests {
    use super::*;
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
}
