//! Linear layer: y = x·Wᵀ + b, with W stored `[OC, IC]` as in PyTorch checkpoints.

use candle_core::{Result, Tensor};

/// x (.., IC) f32, w (OC, IC) f32 or bf16, b (OC) f32 -> y (.., OC) f32.
/// With a bf16 weight the matmul runs in bf16 and its output is widened to f32.
pub fn linear_forward(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let ic = *dims.last().expect("linear input has at least one dim");
    let (oc, w_ic) = w.dims2()?;
    if w_ic != ic {
        candle_core::bail!(
            "linear: input {:?} does not match weight {:?}",
            dims,
            w.dims()
        );
    }
    let n: usize = dims[..dims.len() - 1].iter().product();
    let x2 = x.reshape((n, ic))?; // (N, IC)
    let y = super::matmul_in(&x2, &w.t()?, w.dtype())?; // (N, OC)
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out_dims = dims;
    *out_dims.last_mut().expect("non-empty") = oc;
    y.reshape(out_dims)
}
