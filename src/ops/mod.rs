//! Differentiable ops, each a forward/backward pair in one file (llm.c style).
//!
//! Dims, used in every shape comment: B batch, T query length, S key length, C channels
//! (hidden size), OC/IC out/in features, NH query heads, NKV key/value heads, G = NH/NKV
//! (GQA group), HD head dim, V vocabulary, N rows (B·T flattened).
//!
//! Conventions:
//! - Activations (the residual stream, norms, softmax, loss) are f32. A matmul weight may be
//!   bf16; `linear_forward` then casts its input to bf16, multiplies in bf16 and returns f32.
//! - A forward returns its output and, where a backward needs more than the op's inputs, a
//!   context struct naming what it keeps. Backwards return fresh gradients (no `+=` into
//!   caller buffers); the caller sums the residual stream's two branches.
//! - Ops use only candle tensor primitives, so they run on every candle device.

pub mod act;
pub mod attention;
pub mod embedding;
pub mod linear;
pub mod loss;
pub mod norm;
pub mod rope;

use candle_core::{DType, Result, Tensor};

/// `a @ b` computed in `dtype` (bf16 or f32), returned in f32.
pub fn matmul_in(a: &Tensor, b: &Tensor, dtype: DType) -> Result<Tensor> {
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
    if y.dtype() == DType::F32 {
        Ok(y)
    } else {
        y.to_dtype(DType::F32)
    }
}
