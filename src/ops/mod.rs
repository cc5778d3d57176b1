//! Differentiable ops, each a forward/backward pair in one file (llm.c style).
//!
//! Dims, used in every shape comment: B batch, T query length, S key length, C channels
//! (hidden size), OC/IC out/in features, NH query heads, NKV key/value heads, G = NH/NKV
//! (GQA group), HD head dim, V vocabulary, N rows (B·T flattened), R LoRA rank.
//!
//! Conventions:
//! - Activations (the residual stream, norms, softmax, loss, gradients) are f32 (f64 in the
//!   finite-difference tests). A frozen matmul weight may be bf16: the matmul then runs in
//!   bf16 and its result is widened back.
//! - A forward returns its output and, where the backward needs more than the op's inputs,
//!   a context struct naming what it keeps.
//! - A backward takes dY and returns fresh gradients (nothing is accumulated into caller
//!   buffers): dX only where the caller asks for it, and parameter gradients only for
//!   trainable parameters. The caller sums the two branches of the residual stream.
//! - Ops use only candle tensor primitives, so they run on every candle device.

pub mod act;
pub mod attention;
pub mod cpu;
pub mod embedding;
pub mod linear;
pub mod loss;
pub mod norm;
pub mod rope;

#[cfg(test)]
pub mod gradcheck;

use candle_core::{DType, Result, Tensor};

/// `a @ b` computed in `dtype` (bf16 for bf16 weights), returned in `a`'s dtype.
pub fn matmul_in(a: &Tensor, b: &Tensor, dtype: DType) -> Result<Tensor> {
    let out = a.dtype();
    let a = if a.dtype() == dtype {
        a.clone()
    } else {
        a.to_dtype(dtype)?
    };
    let b = if b.dtype() == dtype {
        b.clone()
    } else {
        b.to_dtype(dtype)?
    };
    let y = a.matmul(&b)?;
    if y.dtype() == out {
        Ok(y)
    } else {
        y.to_dtype(out)
    }
}

/// Widens half-precision tensors to f32; f32 and f64 pass through.
pub fn widen(x: Tensor) -> Result<Tensor> {
    match x.dtype() {
        DType::BF16 | DType::F16 => x.to_dtype(DType::F32),
        _ => Ok(x),
    }
}

/// Flattens (.., K) to (N, K).
pub fn rows2(x: &Tensor) -> Result<Tensor> {
    let k = x.dim(candle_core::D::Minus1)?;
    x.reshape(((), k))
}
