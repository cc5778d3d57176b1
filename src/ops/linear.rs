//! Linear layer y = x·Wᵀ + b (W stored (OC, IC) as in PyTorch checkpoints), and its LoRA
//! form y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ with A (R, IC), B (OC, R), s = alpha / r (PEFT).

use candle_core::{Result, Tensor};

use super::{matmul_in, matmul_sum_in, mm, rows2};
use crate::util::profile::{Kind, matmul_flops, span_flops};

/// x (.., IC), w (OC, IC) f32/bf16, b (OC) -> y (.., OC) in x's dtype.
pub fn linear_forward(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (oc, ic) = w.dims2()?;
    if dims.last() != Some(&ic) {
        candle_core::bail!(
            "linear: input {dims:?} does not match weight {:?}",
            w.dims()
        );
    }
    let x2 = rows2(x)?;
    let _span = span_flops(Kind::MatmulForward, matmul_flops(x2.dim(0)?, ic, oc));
    let y = matmul_in(&x2, &w.t()?, w.dtype())?; // (N, OC)
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out = dims;
    *out.last_mut().expect("non-empty") = oc;
    y.reshape(out)
}

/// Gradients of a linear layer; `None` where not requested.
pub struct LinearGrads {
    pub dx: Option<Tensor>, // (.., IC)
    pub dw: Option<Tensor>, // (OC, IC)
    pub db: Option<Tensor>, // (OC)
}

/// dy (.., OC), x (.., IC): dX = dY·W (only if `need_dx`), dW = dYᵀ·X and dB = Σ dY (only for
/// a trainable weight / bias). A frozen weight costs one matmul and no allocation of its size.
pub fn linear_backward(
    dy: &Tensor,
    x: &Tensor,
    w: &Tensor,
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
) -> Result<LinearGrads> {
    let dy2 = rows2(dy)?; // (N, OC)
    let (n, (oc, ic)) = (dy2.dim(0)?, w.dims2()?);
    let dx = if need_dx {
        let _span = span_flops(Kind::MatmulDx, matmul_flops(n, oc, ic));
        let mut dims = dy.dims().to_vec();
        *dims.last_mut().expect("non-empty") = ic;
        Some(matmul_in(&dy2, w, w.dtype())?.reshape(dims)?)
    } else {
        None
    };
    let _span = span_flops(
        Kind::MatmulDw,
        if need_dw { matmul_flops(oc, n, ic) } else { 0 },
    );
    let dw = if need_dw {
        Some(mm(&dy2.t()?, &rows2(x)?)?) // (OC, IC)
    } else {
        None
    };
    let db = if need_db { Some(dy2.sum(0)?) } else { None };
    Ok(LinearGrads { dx, dw, db })
}

/// LoRA forward: base output plus the low-rank path; returns xa = x·Aᵀ (N, R) for backward.
/// `x_in` is the (possibly dropped-out) input of the LoRA path.
pub fn lora_forward(
    x: &Tensor,
    x_in: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    a: &Tensor,
    bm: &Tensor,
    scale: f64,
) -> Result<(Tensor, Tensor)> {
    let dims = x.dims().to_vec();
    let (oc, ic) = w.dims2()?;
    let r = a.dim(0)?;
    let x2 = rows2(x)?;
    let n = x2.dim(0)?;
    let _span = span_flops(
        Kind::MatmulForward,
        matmul_flops(n, ic, oc) + matmul_flops(n, ic, r) + matmul_flops(n, r, oc),
    );
    let xa = mm(&rows2(x_in)?, &a.t()?)?; // (N, R)
    // x·Wᵀ + (s·xa)·Bᵀ as one sum: with bf16 products the low-rank term adds into the
    // base product's output tiles
    let y = matmul_sum_in(&[(&x2, &w.t()?), (&(&xa * scale)?, &bm.t()?)], w.dtype())?;
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out = dims;
    *out.last_mut().expect("non-empty") = oc;
    Ok((y.reshape(out)?, xa))
}

/// LoRA gradients: dB = s·dYᵀ·xa, d(xa) = s·dY·B, dA = d(xa)ᵀ·x_in, and
/// dX = dY·W + d(xa)·A (the dropout mask, if any, is applied by the caller to the second
/// term; with dropout 0, x_in = x).
pub struct LoraGrads {
    pub dx_base: Option<Tensor>, // (.., IC) through W
    pub dx_lora: Option<Tensor>, // (N, IC) through A, before the dropout mask
    pub da: Tensor,              // (R, IC)
    pub db: Tensor,              // (OC, R)
}

#[allow(clippy::too_many_arguments)]
pub fn lora_backward(
    dy: &Tensor,
    x_in: &Tensor,
    xa: &Tensor,
    w: &Tensor,
    a: &Tensor,
    bm: &Tensor,
    scale: f64,
    need_dx: bool,
) -> Result<LoraGrads> {
    let dy2 = rows2(dy)?; // (N, OC)
    let (n, (oc, r), ic) = (dy2.dim(0)?, bm.dims2()?, a.dim(1)?);
    let dw_span = span_flops(
        Kind::MatmulDw,
        matmul_flops(oc, n, r) + matmul_flops(n, oc, r) + matmul_flops(r, n, ic),
    );
    let db = (mm(&dy2.t()?, xa)? * scale)?; // (OC, R)
    let dxa = (mm(&dy2, bm)? * scale)?; // (N, R)
    let da = mm(&dxa.t()?, &rows2(x_in)?)?; // (R, IC)
    drop(dw_span);
    let _span = span_flops(
        Kind::MatmulDx,
        if need_dx {
            matmul_flops(n, oc, ic) + matmul_flops(n, r, ic)
        } else {
            0
        },
    );
    let (dx_base, dx_lora) = if need_dx {
        let mut dims = dy.dims().to_vec();
        *dims.last_mut().expect("non-empty") = w.dim(1)?;
        (
            Some(matmul_in(&dy2, w, w.dtype())?.reshape(dims)?),
            Some(mm(&dxa, a)?),
        )
    } else {
        (None, None)
    };
    Ok(LoraGrads {
        dx_base,
        dx_lora,
        da,
        db,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::*;

    #[test]
    fn linear_backward_matches_finite_differences() {
        let (x, w, b, r) = (
            randn(&[2, 3, 4], 1),
            randn(&[5, 4], 2),
            randn(&[5], 3),
            randn(&[2, 3, 5], 4),
        );
        let g = linear_backward(&r, &x, &w, true, true, true).unwrap();
        let l = |x: &Tensor, w: &Tensor, b: &Tensor| Ok(dot(&linear_forward(x, w, Some(b))?, &r));
        assert_close("dx", &g.dx.unwrap(), &fd_grad(&x, |x| l(x, &w, &b)), 1e-7);
        assert_close("dw", &g.dw.unwrap(), &fd_grad(&w, |w| l(&x, w, &b)), 1e-7);
        assert_close("db", &g.db.unwrap(), &fd_grad(&b, |b| l(&x, &w, b)), 1e-7);
        // a frozen weight gets no gradient at all
        let g = linear_backward(&r, &x, &w, true, false, false).unwrap();
        assert!(g.dw.is_none() && g.db.is_none());
    }

    #[test]
    fn lora_backward_matches_finite_differences() {
        let (x, w) = (randn(&[6, 4], 5), randn(&[3, 4], 6));
        let (a, bm, r) = (randn(&[2, 4], 7), randn(&[3, 2], 8), randn(&[6, 3], 9));
        let s = 1.5;
        let (_, xa) = lora_forward(&x, &x, &w, None, &a, &bm, s).unwrap();
        let g = lora_backward(&r, &x, &xa, &w, &a, &bm, s, true).unwrap();
        let l = |x: &Tensor, a: &Tensor, bm: &Tensor| {
            Ok(dot(&lora_forward(x, x, &w, None, a, bm, s)?.0, &r))
        };
        let dx = (g.dx_base.unwrap() + g.dx_lora.unwrap()).unwrap();
        assert_close("dx", &dx, &fd_grad(&x, |x| l(x, &a, &bm)), 1e-7);
        assert_close("dA", &g.da, &fd_grad(&a, |a| l(&x, a, &bm)), 1e-7);
        assert_close("dB", &g.db, &fd_grad(&bm, |bm| l(&x, &a, bm)), 1e-7);
    }
}
