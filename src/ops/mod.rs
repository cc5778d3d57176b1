//! Differentiable ops, each a forward/backward pair in one file (llm.c style).
//!
//! Dims, used in every shape comment: B batch, T query length, S key length, C channels
//! (hidden size), OC/IC out/in features, NH query heads, NKV key/value heads, G = NH/NKV
//! (GQA group), HD head dim, V vocabulary, N rows (B·T flattened), R LoRA rank.
//!
//! Conventions:
//! - Activations (the residual stream, norms, softmax, loss, gradients) are f32 (f64 in the
//!   finite-difference tests). A frozen matmul weight may be bf16: the matmul then runs in
//!   bf16 on devices with fast bf16 kernels and in f32 from the widened weight on the CPU
//!   (see `matmul_in`); its result is f32 either way.
//! - A forward returns its output and, where the backward needs more than the op's inputs,
//!   a context struct naming what it keeps.
//! - A backward takes dY and returns fresh gradients (nothing is accumulated into caller
//!   buffers): dX only where the caller asks for it, and parameter gradients only for
//!   trainable parameters. The caller sums the two branches of the residual stream.
//! - Ops use only candle tensor primitives, so they run on every candle device.

pub mod act;
pub mod attention;
#[cfg(target_arch = "x86_64")]
pub mod bf16;
#[cfg(feature = "openblas")]
pub mod blas;
pub mod cpu;
pub mod embedding;
pub mod linear;
pub mod loss;
pub mod norm;
pub mod rope;

#[cfg(test)]
pub mod gradcheck;

use candle_core::{DType, Result, Tensor};

thread_local! {
    static AUTOCAST_BF16: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// While alive, this thread's f32 products also run in bf16 where the device has bf16
/// products (AMX, AVX-512 BF16, CUDA), as under `torch.autocast(dtype=torch.bfloat16)`: set for the training
/// step of a bf16 run, so that trainable f32 weights (full finetuning) and attention take
/// the same products as the frozen bf16 weights. Restores the previous setting on drop.
pub struct Autocast {
    previous: bool,
}

/// An `Autocast` guard for products in `dtype` (bf16 turns it on, anything else off).
pub fn autocast(dtype: DType) -> Autocast {
    let previous = AUTOCAST_BF16.with(|c| c.replace(dtype == DType::BF16));
    Autocast { previous }
}

impl Drop for Autocast {
    fn drop(&mut self) {
        AUTOCAST_BF16.with(|c| c.set(self.previous));
    }
}

/// `a @ b` computed in `dtype` (bf16 for bf16 weights, or any f32 product under
/// `autocast(BF16)`), returned in `a`'s dtype. On the CPU a bf16 product runs on AMX tiles
/// or AVX-512 BF16 where the CPU has them (`bf16`: operands rounded to bf16, f32
/// accumulation); elsewhere it
/// is computed in f32 (bf16 operands widened, exactly): the gemm crate's bf16 kernels run
/// at about half its f32 speed on CPUs with AVX-512, so the bf16 storage saves memory and
/// the f32 product is the faster one (`lntune bench --profile`).
pub fn matmul_in(a: &Tensor, b: &Tensor, dtype: DType) -> Result<Tensor> {
    let out = a.dtype();
    // under autocast an f32 product (a trainable weight's) runs as a bf16 one
    let dtype = if dtype == DType::F32 && AUTOCAST_BF16.with(|c| c.get()) {
        DType::BF16
    } else {
        dtype
    };
    #[cfg(target_arch = "x86_64")]
    if cpu::fused_on(a) && dtype == DType::BF16 {
        let y = if a.rank() == 2 {
            bf16::matmul(a, b)?
        } else {
            bf16::batched_matmul(a, b)?
        };
        if let Some(y) = y {
            return if y.dtype() == out {
                Ok(y)
            } else {
                y.to_dtype(out)
            };
        }
    }
    let dtype = compute_dtype(dtype, a.device());
    let (a, b) = (
        to_dtype_in_place_order(a, dtype)?,
        to_dtype_in_place_order(b, dtype)?,
    );
    if let Some(y) = cpu::batched_matmul_f32(&a, &b)? {
        return if out == y.dtype() {
            Ok(y)
        } else {
            y.to_dtype(out)
        };
    }
    #[cfg(feature = "openblas")]
    let y = match blas::sgemm(&a, &b)? {
        Some(y) => y,
        None => a.matmul(&b)?,
    };
    #[cfg(not(feature = "openblas"))]
    let y = a.matmul(&b)?;
    if y.dtype() == out {
        Ok(y)
    } else {
        y.to_dtype(out)
    }
}

/// Whether a CPU product asked for in `dtype` (under the current autocast) is computed in
/// f32, as `matmul_in` computes it: f32 products, or bf16 ones on a CPU without a bf16
/// kernel.
pub fn cpu_products_f32(dtype: DType) -> bool {
    let bf16 = dtype == DType::BF16 || (dtype == DType::F32 && AUTOCAST_BF16.with(|c| c.get()));
    if !bf16 {
        return dtype == DType::F32;
    }
    #[cfg(target_arch = "x86_64")]
    if bf16::kernel().is_some() {
        return false;
    }
    true
}

/// How products asked for in `dtype` run on `device`: `f32`, `bf16 on AMX`, `bf16 on
/// AVX-512 BF16`, or `f32 from bf16` (no bf16 kernel on this CPU), `bf16` elsewhere.
pub fn products_name(dtype: DType, device: &candle_core::Device) -> &'static str {
    if dtype != DType::BF16 {
        return "f32";
    }
    if !device.is_cpu() {
        return "bf16";
    }
    #[cfg(target_arch = "x86_64")]
    match bf16::kernel() {
        Some(bf16::Kernel::Amx) => return "bf16 on AMX",
        Some(bf16::Kernel::Avx512Bf16) => return "bf16 on AVX-512 BF16",
        None => {}
    }
    "f32 from bf16"
}

/// `Σ a_i @ b_i` (2-D, one output shape), each product computed as `matmul_in` computes it
/// in `dtype`; with bf16 products the later ones add into the first one's output
/// (`bf16::matmul_sum`), elsewhere the products are added.
pub fn matmul_sum_in(terms: &[(&Tensor, &Tensor)], dtype: DType) -> Result<Tensor> {
    let Some(&(a0, b0)) = terms.first() else {
        candle_core::bail!("matmul sum of no products");
    };
    #[cfg(target_arch = "x86_64")]
    if cpu::fused_on(a0)
        && a0.dtype() == DType::F32
        && (dtype == DType::BF16 || (dtype == DType::F32 && AUTOCAST_BF16.with(|c| c.get())))
        && let Some(y) = bf16::matmul_sum(terms)?
    {
        return Ok(y);
    }
    let mut sum = matmul_in(a0, b0, dtype)?;
    for (a, b) in &terms[1..] {
        sum = (sum + matmul_in(a, b, a.dtype())?)?;
    }
    Ok(sum)
}

/// The dtype a product asked for in `dtype` is computed in on `device` (see `matmul_in`).
pub fn compute_dtype(dtype: DType, device: &candle_core::Device) -> DType {
    if dtype == DType::BF16 && device.is_cpu() {
        DType::F32
    } else {
        dtype
    }
}

/// `t` in `dtype`. A transposed view of a contiguous matrix (a linear's `w.t()`) is
/// converted as the contiguous matrix and transposed back: a strided conversion is
/// several times slower.
fn to_dtype_in_place_order(t: &Tensor, dtype: DType) -> Result<Tensor> {
    if t.dtype() == dtype {
        return Ok(t.clone());
    }
    if t.rank() == 2 && !t.is_contiguous() && t.t()?.is_contiguous() {
        return to_dtype_in_place_order(&t.t()?, dtype)?.t();
    }
    if dtype == DType::F32
        && let Some(w) = cpu::widen_bf16(t)?
    {
        return Ok(w);
    }
    t.to_dtype(dtype)
}

/// `a @ b` in the operands' dtype (the `openblas` feature's sgemm for 2-D f32 on the CPU).
pub fn mm(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    matmul_in(a, b, a.dtype())
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
