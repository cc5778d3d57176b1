//! Helpers for the fused CPU kernels some ops use (as candle custom ops): contiguous f32
//! access to a storage. Each op keeps a composed-tensor-op path for other devices.

use candle_core::{CpuStorage, Layout, Result};

/// Whether the fused CPU kernels may run on `t`'s device: on the CPU, unless
/// `LNTUNE_COMPOSED_OPS=1` asks for the composed tensor-op paths that other devices (CUDA)
/// take, so that those paths are checked against the references on any machine.
pub fn fused_on(t: &candle_core::Tensor) -> bool {
    static COMPOSED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    t.device().is_cpu()
        && !*COMPOSED.get_or_init(|| std::env::var("LNTUNE_COMPOSED_OPS").is_ok_and(|v| v == "1"))
}

/// The f32 data of a contiguous CPU tensor.
pub fn f32_data<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{what}: input is not contiguous");
    };
    match s {
        CpuStorage::F32(v) => Ok(&v[a..b]),
        _ => candle_core::bail!("{what}: input must be f32"),
    }
}

/// Runs `f` on the f32 data of contiguous CPU f32 tensors, borrowed (no copy) while `f`
/// runs; `None` when a tensor is not of that kind.
pub fn with_f32_slices<R>(
    tensors: &[&candle_core::Tensor],
    f: impl FnOnce(&[&[f32]]) -> R,
) -> Option<R> {
    let of_kind = |t: &&candle_core::Tensor| {
        fused_on(t) && t.dtype() == candle_core::DType::F32 && t.is_contiguous()
    };
    if !tensors.iter().all(of_kind) {
        return None;
    }
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(guards.len());
    for (storage, layout) in &guards {
        let (a, b) = layout.contiguous_offsets()?;
        match &**storage {
            candle_core::Storage::Cpu(CpuStorage::F32(v)) => slices.push(&v[a..b]),
            _ => return None,
        }
    }
    Some(f(&slices))
}

/// Calls `f(args..)` (an `#[inline(always)]` function over slices) compiled for AVX-512
/// where the CPU has it, else as built: the default target has only SSE2, and the fused
/// row kernels' loops vectorise 4 times wider with AVX-512.
macro_rules! vectorised {
    ($f:ident($($arg:expr),* $(,)?)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,avx2,fma")]
            unsafe fn wide<R>(run: impl FnOnce() -> R) -> R {
                run()
            }
            if $crate::ops::cpu::has_avx512() {
                // SAFETY: the CPU has AVX-512F (checked)
                unsafe { wide(|| $f($($arg),*)) }
            } else {
                $f($($arg),*)
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $f($($arg),*)
        }
    }};
}
pub(crate) use vectorised;

/// Whether the CPU has AVX-512F (cached by std).
#[cfg(target_arch = "x86_64")]
#[inline]
pub fn has_avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

/// Σ f(i) for i < n, in 16 lanes: an f32 sum written left to right cannot be vectorised
/// (each add waits for the one before); 16 partial sums can, and differ from it by
/// rounding only.
#[inline(always)]
pub fn lane_sum(n: usize, f: impl Fn(usize) -> f32) -> f32 {
    const L: usize = 16;
    let mut lanes = [0f32; L];
    let full = n / L * L;
    for base in (0..full).step_by(L) {
        for (l, acc) in lanes.iter_mut().enumerate() {
            *acc += f(base + l);
        }
    }
    let mut total: f32 = lanes.iter().sum();
    for i in full..n {
        total += f(i);
    }
    total
}

/// e^x for x <= 0 (softmax's shifted scores) to within 2 ulp, written without branches or
/// calls so that loops over it vectorise (libm's `expf` is one scalar call per element,
/// which made exp the largest part of attention's softmax). x = n·ln2 + r with |r| <= ln2/2,
/// e^r by its Taylor polynomial to r^7/7! (< 1.3e-7 relative), 2^n from the exponent bits.
/// Results below f32's smallest normal (x < -87.33) are 0.
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 in two parts: n·LN2_HI is exact for |n| < 2^9
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // adding and subtracting 1.5·2^23 rounds to the nearest integer without a call
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.33, 0.0);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < -87.33 { 0.0 } else { p * scale }
}

/// σ(x) = 1 / (1 + e^-x) through `exp_nonpositive(-|x|)`, branch-free (vectorises).
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    let e = exp_nonpositive(-x.abs());
    let r = 1.0 / (1.0 + e);
    if x >= 0.0 { r } else { e * r }
}

/// Rows per rayon task: enough work to amortise scheduling.
pub fn rows_per_task(row_len: usize) -> usize {
    (16384 / row_len.max(1)).max(1)
}

/// A contiguous bf16 CPU tensor widened to f32 on the rayon threads (exact; candle's own
/// conversion runs on one thread). `None` for anything else.
pub fn widen_bf16(t: &candle_core::Tensor) -> Result<Option<candle_core::Tensor>> {
    use rayon::prelude::*;
    if t.dtype() != candle_core::DType::BF16 || !fused_on(t) {
        return Ok(None);
    }
    let out = {
        let (storage, layout) = t.storage_and_layout();
        let (candle_core::Storage::Cpu(CpuStorage::BF16(v)), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        else {
            return Ok(None);
        };
        let src = &v[a..b];
        let mut out = vec![0f32; src.len()];
        out.par_chunks_mut(1 << 16)
            .zip(src.par_chunks(1 << 16))
            .for_each(|(o, s)| {
                for (o, s) in o.iter_mut().zip(s) {
                    *o = s.to_f32();
                }
            });
        out
    };
    Ok(Some(candle_core::Tensor::from_vec(
        out,
        t.shape(),
        t.device(),
    )?))
}

/// The element offset of matrix `i` of a batch of matrices with batch dims `batch`, from
/// its multi-index: `start` plus index times stride over the batch dims (`strides` holds
/// the batch dims' strides first).
pub fn batch_offset(i: usize, start: usize, strides: &[usize], batch: &[usize]) -> usize {
    let (mut rest, mut off) = (i, start);
    for d in (0..batch.len()).rev() {
        off += (rest % batch[d]) * strides[d];
        rest /= batch[d];
    }
    off
}

/// `a @ b` for f32 CPU tensors of rank >= 3 with the same batch dims (attention's per-head
/// products): one gemm per matrix, the matrices spread over the rayon threads, each
/// product on one thread. Small per-head products otherwise pay a parallel gemm's start-up
/// each; operand strides are passed to gemm, so transposed views cost no copy. `None` for
/// other tensors.
pub fn batched_matmul_f32(
    a: &candle_core::Tensor,
    b: &candle_core::Tensor,
) -> Result<Option<candle_core::Tensor>> {
    use candle_core::{DType, Storage};
    use rayon::prelude::*;
    let ok = [a, b]
        .iter()
        .all(|t| fused_on(t) && t.dtype() == DType::F32 && t.rank() >= 3);
    if !ok || a.rank() != b.rank() {
        return Ok(None);
    }
    let r = a.rank();
    let (ad, bd) = (a.dims(), b.dims());
    if ad[..r - 2] != bd[..r - 2] || ad[r - 1] != bd[r - 2] {
        return Ok(None);
    }
    let (m, k, n) = (ad[r - 2], ad[r - 1], bd[r - 1]);
    let batch = &ad[..r - 2];
    let nb: usize = batch.iter().product();
    if nb < 2 || m == 0 || n == 0 || k == 0 {
        return Ok(None);
    }
    let mut out = vec![0f32; nb * m * n];
    {
        let (sa, la) = a.storage_and_layout();
        let (sb, lb) = b.storage_and_layout();
        let (Storage::Cpu(CpuStorage::F32(va)), Storage::Cpu(CpuStorage::F32(vb))) = (&*sa, &*sb)
        else {
            return Ok(None);
        };
        let (sta, stb) = (la.stride(), lb.stride());
        let offset = |i: usize, start: usize, st: &[usize]| batch_offset(i, start, st, batch);
        // every element a product reads must lie in its buffer
        let last = |start: usize, st: &[usize], dims: &[usize]| {
            start
                + dims
                    .iter()
                    .zip(st)
                    .map(|(&d, &s)| (d - 1) * s)
                    .sum::<usize>()
        };
        if last(la.start_offset(), sta, ad) >= va.len()
            || last(lb.start_offset(), stb, bd) >= vb.len()
        {
            return Ok(None);
        }
        let (pa, pb) = (va.as_ptr() as usize, vb.as_ptr() as usize);
        out.par_chunks_mut(m * n).enumerate().for_each(|(i, dst)| {
            let oa = offset(i, la.start_offset(), sta);
            let ob = offset(i, lb.start_offset(), stb);
            // SAFETY: the operands' extents were checked above for every index of the
            // batch; `dst` is this matrix's own m·n output, row-major.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    dst.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    (pa as *const f32).add(oa),
                    sta[r - 1] as isize,
                    sta[r - 2] as isize,
                    (pb as *const f32).add(ob),
                    stb[r - 1] as isize,
                    stb[r - 2] as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                )
            };
        });
    }
    let mut dims = batch.to_vec();
    dims.extend([m, n]);
    Ok(Some(candle_core::Tensor::from_vec(out, dims, a.device())?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn exp_nonpositive_is_within_two_ulp_of_libm() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 * i as f32 / 200_000.0;
            let (got, want) = (exp_nonpositive(x) as f64, (x as f64).exp());
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 2.4e-7, "relative error {worst}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-100.0), 0.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn batched_products_equal_candles_in_every_layout() {
        let dev = Device::Cpu;
        let r = |shape: &[usize], seed| {
            crate::util::rng::Rng::new(seed)
                .normal_tensor(shape, 1.0, DType::F32, &dev)
                .unwrap()
        };
        let a = r(&[2, 3, 5, 4], 1);
        let b = r(&[2, 3, 4, 6], 2);
        let bt = r(&[2, 3, 6, 4], 3).transpose(2, 3).unwrap(); // a transposed view
        let at = r(&[2, 5, 3, 4], 4).transpose(1, 2).unwrap(); // heads split from tokens
        let narrow = r(&[2, 3, 5, 9], 5).narrow(3, 2, 4).unwrap(); // a row stride > width
        for (i, (x, y)) in [(&a, &b), (&a, &bt), (&at, &b), (&narrow, &bt)]
            .into_iter()
            .enumerate()
        {
            let want = x
                .contiguous()
                .unwrap()
                .matmul(&y.contiguous().unwrap())
                .unwrap();
            let got = batched_matmul_f32(x, y)
                .unwrap()
                .expect("f32 batched operands");
            let d = (got - want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d < 1e-5, "case {i}: max abs difference {d}");
        }
        // 2-D products and mismatched batches are left to candle
        assert!(
            batched_matmul_f32(&r(&[5, 4], 6), &r(&[4, 3], 7))
                .unwrap()
                .is_none()
        );
        assert!(
            batched_matmul_f32(&a, &r(&[3, 3, 4, 6], 8))
                .unwrap()
                .is_none()
        );
    }
}
