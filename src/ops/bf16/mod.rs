//! bf16 matrix products for mixed precision on the CPU: `C (M, N) f32 = A (M, K) · B (K, N)`
//! with f32 operands rounded to bf16 (as PyTorch's autocast does; bf16 operands, the
//! frozen weights, as they are), accumulated in f32. Two kernels over the same packed
//! operands:
//! - Intel AMX (Sapphire Rapids and later): the tile unit's `tdpbf16ps`. At a training
//!   step's shapes 2 to 3.5 times the f32 gemm's speed on the same cores (`lntune bench
//!   --profile`, matmul GFLOP/s).
//! - AVX-512 BF16 (AMD Zen 4 and later, Intel Cooper Lake and later): `vdpbf16ps`, 32
//!   products per instruction against 16 for an f32 FMA.
//!
//! `LNTUNE_BF16_PRODUCTS=amx|avx512bf16|f32` forces one (`f32`: neither; bf16 products are
//! then computed in f32 from widened operands, `ops::matmul_in`); by default the best the
//! CPU has is used.
//!
//! The AMX tile unit holds eight 16 x 64-byte registers. One step of its kernel takes a
//! 32 x 32 block of C in four f32 tiles (tmm0-3) and adds A's 32 x 32 bf16 block (tmm4-5)
//! times B's 32 x 32 block (tmm6-7), which must be in the pair-interleaved ("VNNI") layout:
//! row r of a B tile holds, for 16 columns j, the pair B[2r][j], B[2r+1][j]. The AVX-512
//! kernel reads the same tiles: one B tile row is one `vdpbf16ps` operand, and an A row's
//! pair, broadcast, the other. A is copied into tiles once per product; B is repacked per
//! 32-column strip into a small buffer that stays in cache while every row block of A
//! passes it. Either operand may be row-major or the transposed view of a row-major matrix
//! (a linear's `w.t()`, attention's `k.t()`); both orientations pack with AVX-512 shuffles
//! (a 16 x 16 transpose of bf16 pairs for the crosswise one).

mod pack;
mod strip;

use std::sync::OnceLock;

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use pack::{A_TILES, ATiles, BTile, PANEL, View};
#[cfg(test)]
use pack::{Elems, bf16_bits};
use strip::{Strip, amx_strip, dpbf16_strip};

/// Rows of A per block: with K at most `K_CHUNK`, a block's bf16 rows (<= 1 MiB) stay in
/// the L2 cache while every column strip passes them.
const M_BLOCK: usize = 512;
/// K per pass; a longer K (the LM head's dX: K = vocabulary) adds pass after pass into C.
const K_CHUNK: usize = 1024;

/// A bf16 product kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Amx,
    Avx512Bf16,
}

/// The bf16 product kernel of this process: `LNTUNE_BF16_PRODUCTS` (amx, avx512bf16, f32)
/// if set and the CPU can run it, else the best one the CPU has; `None` if it has neither
/// (or `f32` was asked for).
pub fn kernel() -> Option<Kernel> {
    static KERNEL: OnceLock<Option<Kernel>> = OnceLock::new();
    *KERNEL.get_or_init(|| {
        let wanted = std::env::var("LNTUNE_BF16_PRODUCTS").unwrap_or_default();
        let avx = has_avx512_bf16();
        match wanted.as_str() {
            "f32" => None,
            "avx512bf16" => avx.then_some(Kernel::Avx512Bf16),
            _ if avx && amx_granted() => Some(Kernel::Amx),
            _ => avx.then_some(Kernel::Avx512Bf16),
        }
    })
}

/// Whether the CPU has AVX-512 BF16 (and the BW shuffles the packing uses).
pub fn has_avx512_bf16() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512bf16")
}

/// Whether the CPU has AMX bf16 tiles and Linux granted this process the tile state
/// (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), asked once.
pub fn amx_granted() -> bool {
    static GRANTED: OnceLock<bool> = OnceLock::new();
    *GRANTED.get_or_init(|| {
        // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
        let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
        if leaf7.edx & (1 << 22) == 0 || leaf7.edx & (1 << 24) == 0 {
            return false;
        }
        const ARCH_REQ_XCOMP_PERM: libc::c_ulong = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_ulong = 18;
        // SAFETY: asks the kernel to enable the tile data state for this process; it fails
        // cleanly (non-zero) where the kernel or the CPU has no AMX.
        let granted = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        granted == 0
    })
}

/// `a @ b` for 2-D f32 or bf16 CPU tensors, computed in bf16 with f32 accumulation,
/// returned in f32. `None` when the CPU has no bf16 kernel or the operands are of another
/// kind.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
    match kernel() {
        Some(k) => matmul_using(k, a, b),
        None => Ok(None),
    }
}

/// `matmul` with the given kernel (the caller checked that the CPU has it).
fn matmul_using(kernel: Kernel, a: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
    if a.rank() != 2 || b.rank() != 2 {
        return Ok(None);
    }
    let ((m, k), (k2, n)) = (a.dims2()?, b.dims2()?);
    if k != k2 {
        candle_core::bail!("matmul: {:?} @ {:?}", a.dims(), b.dims());
    }
    if m == 0 || n == 0 || k == 0 {
        return Ok(None);
    }
    let (sa, la) = a.storage_and_layout();
    let (sb, lb) = b.storage_and_layout();
    let (Some(av), Some(bv)) = (
        View::of(&sa, la.start_offset(), la.stride(), m, k),
        View::of(&sb, lb.start_offset(), lb.stride(), k, n),
    ) else {
        return Ok(None);
    };
    let mut c = Vec::<f32>::with_capacity(m * n);
    // SAFETY: `product` writes every element of C before anything reads it
    product(
        kernel,
        &av,
        &bv,
        c.spare_capacity_mut().as_mut_ptr() as *mut f32,
        true,
        false,
    );
    unsafe { c.set_len(m * n) };
    Ok(Some(Tensor::from_vec(c, (m, n), a.device())?))
}

/// `Σ a_i @ b_i` for 2-D f32 or bf16 CPU operands of one output shape (M, N), computed as
/// `matmul` computes each, the later products added into the first one's output tile by
/// tile (a LoRA linear's `x·Wᵀ + s·(x·Aᵀ)·Bᵀ` without a second (M, N) tensor and the pass
/// that adds it). `None` as for `matmul`.
pub fn matmul_sum(terms: &[(&Tensor, &Tensor)]) -> Result<Option<Tensor>> {
    let Some(kernel) = kernel() else {
        return Ok(None);
    };
    let Some(&(a0, b0)) = terms.first() else {
        return Ok(None);
    };
    if terms.iter().any(|(a, b)| a.rank() != 2 || b.rank() != 2) {
        return Ok(None);
    }
    let (m, n) = (a0.dim(0)?, b0.dim(1)?);
    if m == 0 || n == 0 {
        return Ok(None);
    }
    let mut views = Vec::with_capacity(terms.len());
    let guards: Vec<_> = terms
        .iter()
        .map(|(a, b)| (a.storage_and_layout(), b.storage_and_layout()))
        .collect();
    for (((sa, la), (sb, lb)), (a, b)) in guards.iter().zip(terms) {
        let ((am, k), (k2, bn)) = (a.dims2()?, b.dims2()?);
        if k != k2 || am != m || bn != n {
            candle_core::bail!(
                "matmul sum: {:?} @ {:?} into ({m}, {n})",
                a.dims(),
                b.dims()
            );
        }
        if k == 0 {
            return Ok(None);
        }
        let (Some(av), Some(bv)) = (
            View::of(sa, la.start_offset(), la.stride(), m, k),
            View::of(sb, lb.start_offset(), lb.stride(), k, n),
        ) else {
            return Ok(None);
        };
        views.push((av, bv));
    }
    let mut c = Vec::<f32>::with_capacity(m * n);
    let out = c.spare_capacity_mut().as_mut_ptr() as *mut f32;
    for (i, (av, bv)) in views.iter().enumerate() {
        // SAFETY: the first product writes every element of C, the later ones add to it
        product(kernel, av, bv, out, true, i > 0);
    }
    unsafe { c.set_len(m * n) };
    Ok(Some(Tensor::from_vec(c, (m, n), a0.device())?))
}

/// `a @ b` for f32 or bf16 CPU tensors of rank >= 3 with the same batch dims (attention's
/// per-head products), in bf16 with f32 accumulation: one single-threaded product per
/// matrix, the matrices spread over the rayon threads. `None` as for `matmul`.
pub fn batched_matmul(a: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
    match kernel() {
        Some(k) => batched_matmul_using(k, a, b),
        None => Ok(None),
    }
}

fn batched_matmul_using(kernel: Kernel, a: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
    let r = a.rank();
    if r < 3 || b.rank() != r {
        return Ok(None);
    }
    let (ad, bd) = (a.dims(), b.dims());
    if ad[..r - 2] != bd[..r - 2] || ad[r - 1] != bd[r - 2] {
        return Ok(None);
    }
    let (m, k, n) = (ad[r - 2], ad[r - 1], bd[r - 1]);
    let batch = &ad[..r - 2];
    let nb: usize = batch.iter().product();
    if nb == 0 || m == 0 || n == 0 || k == 0 {
        return Ok(None);
    }
    let (sa, la) = a.storage_and_layout();
    let (sb, lb) = b.storage_and_layout();
    let (sta, stb) = (la.stride(), lb.stride());
    let offset =
        |i: usize, start: usize, st: &[usize]| super::cpu::batch_offset(i, start, st, batch);
    let views: Option<Vec<(View, View)>> = (0..nb)
        .map(|i| {
            Some((
                View::of(&sa, offset(i, la.start_offset(), sta), &sta[r - 2..], m, k)?,
                View::of(&sb, offset(i, lb.start_offset(), stb), &stb[r - 2..], k, n)?,
            ))
        })
        .collect();
    let Some(views) = views else {
        return Ok(None);
    };
    let mut out = vec![0f32; nb * m * n];
    out.par_chunks_mut(m * n)
        .zip(views.par_iter())
        .for_each(|(dst, (av, bv))| product(kernel, av, bv, dst.as_mut_ptr(), false, false));
    let mut dims = batch.to_vec();
    dims.extend([m, n]);
    Ok(Some(Tensor::from_vec(out, dims, a.device())?))
}

/// C (M, N) row-major = A · B (`add`: C += A · B); `c` points to M·N f32, all written.
/// `parallel`: spread the work over the rayon threads (else this thread does it all).
fn product(kernel: Kernel, a: &View, b: &View, c: *mut f32, parallel: bool, add: bool) {
    let (m, k) = (a.rows, a.cols);
    let (kp, groups) = (k.div_ceil(32) * 32, m.div_ceil(32) * 2);
    let kbs = kp / 32;
    let mut own = Vec::new();
    A_TILES.with(|cell| {
        // a product inside a product's rayon task (work stealing) gets its own buffer
        let mut guard = cell.try_borrow_mut();
        let buf = match guard.as_mut() {
            Ok(b) => &mut **b,
            Err(_) => &mut own,
        };
        if buf.len() < groups * kbs {
            buf.resize(groups * kbs, BTile([0; 512]));
        }
        let tiles = &mut buf[..groups * kbs];
        let fill = |(g, row): (usize, &mut [BTile])| {
            for (kb, t) in row.iter_mut().enumerate() {
                // SAFETY: AMX CPUs have AVX-512 BW and BF16
                unsafe { a.a_tile(g * 16, kb * 32, &mut t.0) };
            }
        };
        if parallel {
            tiles.par_chunks_mut(kbs).enumerate().for_each(fill);
        } else {
            tiles.chunks_mut(kbs).enumerate().for_each(fill);
        }
        let a_tiles = ATiles { tiles, kp };
        gemm(kernel, &a_tiles, m, b, c, parallel, add);
    });
}

/// C (M, N) row-major = A · B over A's tiles; B's panels are packed per strip.
fn gemm(kernel: Kernel, a: &ATiles, m: usize, b: &View, c: *mut f32, parallel: bool, add: bool) {
    let n = b.cols;
    let strips = n.div_ceil(32);
    let c_addr = c as usize;
    for m0 in (0..m).step_by(M_BLOCK) {
        let mb = M_BLOCK.min(m - m0);
        for k0 in (0..a.kp).step_by(K_CHUNK) {
            let kc = K_CHUNK.min(a.kp - k0);
            let strip = |panel: &mut Vec<BTile>, s: usize| {
                let kbs = kc / 32;
                if panel.len() < kbs * 2 {
                    panel.resize(kbs * 2, BTile([0; 512]));
                }
                for kb in 0..kbs {
                    for half in 0..2 {
                        // SAFETY: AMX CPUs have AVX-512 BW and BF16
                        unsafe {
                            b.b_tile(
                                k0 + kb * 32,
                                s * 32 + 16 * half,
                                &mut panel[kb * 2 + half].0,
                            )
                        };
                    }
                }
                let strip = Strip {
                    m,
                    m0,
                    mb,
                    k0,
                    kc,
                    n0: s * 32,
                    n,
                    c_addr,
                    accumulate: add || k0 > 0,
                };
                // SAFETY: both kernels read A's tiles of rows m0..m0+mb (rounded up to 32,
                // inside `a.tiles`) at columns k0..k0+kc, and `panel`'s kc/32 x 2 tiles;
                // they write C's rows of this block at this strip's columns only (no other
                // task writes them), clipped to M and N. The kernel was checked to run here.
                unsafe {
                    match kernel {
                        Kernel::Amx => amx_strip(a, panel, &strip),
                        Kernel::Avx512Bf16 => dpbf16_strip(a, panel, &strip),
                    }
                };
            };
            if parallel {
                (0..strips).into_par_iter().for_each_init(Vec::new, strip);
            } else {
                PANEL.with(|cell| match cell.try_borrow_mut() {
                    Ok(mut panel) => (0..strips).for_each(|s| strip(&mut panel, s)),
                    Err(_) => (0..strips).for_each(|s| strip(&mut Vec::new(), s)),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// The product of the operands rounded to bf16, in f64.
    fn reference(a: &Tensor, b: &Tensor) -> Tensor {
        let round = |t: &Tensor| {
            t.to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
        };
        round(a).matmul(&round(b)).unwrap()
    }

    fn max_diff(got: &Tensor, want: &Tensor) -> f64 {
        (got.to_dtype(DType::F64).unwrap() - want)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// `(rows, cols)` of standard normals in `dtype`, row-major or as the transposed view
    /// of a row-major (cols, rows) matrix.
    fn operand(lead: &[usize], rows: usize, cols: usize, dtype: DType, crosswise: bool) -> Tensor {
        let dev = Device::Cpu;
        let r = lead.len();
        let mut dims = lead.to_vec();
        let t = if crosswise {
            dims.extend([cols, rows]);
            Tensor::randn(0f32, 1.0, dims, &dev)
                .unwrap()
                .transpose(r, r + 1)
                .unwrap()
        } else {
            dims.extend([rows, cols]);
            Tensor::randn(0f32, 1.0, dims, &dev).unwrap()
        };
        t.to_dtype(dtype).unwrap()
    }

    /// The kernels this CPU runs, each tested (AMX CPUs have both).
    fn kernels() -> Vec<Kernel> {
        let mut ks = Vec::new();
        if has_avx512_bf16() && amx_granted() {
            ks.push(Kernel::Amx);
        }
        if has_avx512_bf16() {
            ks.push(Kernel::Avx512Bf16);
        } else {
            eprintln!("skipped: this CPU has no bf16 products (AVX-512 BF16 or AMX)");
        }
        ks
    }

    #[test]
    fn bf16_products_equal_the_rounded_product_in_every_shape_and_layout() {
        for kernel in kernels() {
            products_equal_the_rounded_product(kernel);
        }
    }

    fn products_equal_the_rounded_product(kernel: Kernel) {
        // edges of every kind: below one tile, odd sizes, several K chunks and M blocks;
        // every operand f32 or bf16, row-major or transposed
        let shapes = [
            (1, 1, 1),
            (5, 7, 3),
            (32, 32, 32),
            (33, 65, 47),
            (64, 576, 192),
            (600, 40, 70),
            (40, 2100, 50),
        ];
        for (i, &(m, k, n)) in shapes.iter().enumerate() {
            for case in 0..16 {
                let (a_dt, b_dt) = (
                    [DType::F32, DType::BF16][case & 1],
                    [DType::F32, DType::BF16][(case >> 1) & 1],
                );
                let (a_t, b_t) = (case & 4 != 0, case & 8 != 0);
                let a = operand(&[], m, k, a_dt, a_t);
                let b = operand(&[], k, n, b_dt, b_t);
                let got = matmul_using(kernel, &a, &b)
                    .unwrap()
                    .expect("takes 2-D f32/bf16");
                let diff = max_diff(&got, &reference(&a, &b));
                // f32 accumulation of exact bf16 products: error ~ K · eps_f32 · |terms|
                let bound = 4e-5 * k as f64;
                assert!(
                    diff <= bound,
                    "{kernel:?} case {i}/{case} {m}x{k}x{n} {a_dt:?}{} @ {b_dt:?}{}: max |got - ref| {diff} > {bound}",
                    if a_t { "ᵀ" } else { "" },
                    if b_t { "ᵀ" } else { "" },
                );
            }
        }
    }

    #[test]
    fn a_sum_of_products_equals_the_sum_of_the_rounded_products() {
        if kernel().is_none() {
            eprintln!("skipped: this CPU has no bf16 products (AVX-512 BF16 or AMX)");
            return;
        }
        // a LoRA linear: x·Wᵀ + (s·x·Aᵀ)·Bᵀ, W bf16, A and B f32, shapes off the tile grid
        let (m, ic, oc, r) = (45, 70, 90, 8);
        let x = operand(&[], m, ic, DType::F32, false);
        let wt = operand(&[], ic, oc, DType::BF16, true);
        let xa = operand(&[], m, r, DType::F32, false);
        let bt = operand(&[], r, oc, DType::F32, true);
        let got = matmul_sum(&[(&x, &wt), (&xa, &bt)]).unwrap().expect("2-D");
        let want = (reference(&x, &wt) + reference(&xa, &bt)).unwrap();
        let diff = max_diff(&got, &want);
        assert!(diff <= 4e-5 * ic as f64, "max |sum - ref| {diff}");
    }

    #[test]
    fn batched_bf16_products_equal_the_rounded_product() {
        // attention's shapes in small: (B, NKV, G·T, HD) @ (B, NKV, HD, S) and friends
        for kernel in kernels() {
            for &(lead, m, k, n) in &[
                (&[2usize, 3][..], 48, 16, 40),
                (&[3][..], 17, 33, 9),
                (&[2, 2][..], 64, 64, 32),
            ] {
                for case in 0..4 {
                    let a = operand(lead, m, k, DType::F32, case & 1 != 0);
                    let b = operand(lead, k, n, DType::F32, case & 2 != 0);
                    let got = batched_matmul_using(kernel, &a, &b)
                        .unwrap()
                        .expect("rank >= 3, f32");
                    let diff = max_diff(&got, &reference(&a, &b));
                    assert!(
                        diff <= 4e-5 * k as f64,
                        "{kernel:?} {lead:?} {m}x{k}x{n} case {case}: {diff}"
                    );
                }
            }
        }
    }

    #[test]
    fn bf16_rounding_is_to_nearest_even() {
        let xs: Vec<f32> = (0..37)
            .map(|i| (i as f32 - 18.0) * (1.0 + 1.0 / 256.0) + 1.0 / 512.0)
            .chain([
                0.0,
                1.0 + 1.0 / 256.0,
                1.0 + 3.0 / 256.0,
                f32::INFINITY,
                -7e30,
            ])
            .collect();
        for x in &xs {
            assert_eq!(bf16_bits(*x), half::bf16::from_f32(*x).to_bits(), "{x}");
        }
        assert!(half::bf16::from_bits(bf16_bits(f32::NAN)).is_nan());
        if has_avx512_bf16() {
            // the vector conversion (`vcvtneps2bf16`) rounds the same
            let v = View {
                ptr: Elems::F32(xs.as_ptr()),
                rows: 1,
                cols: xs.len(),
                rs: xs.len(),
                cs: 1,
            };
            let mut got = [0u16; 32];
            // SAFETY: 32 elements from 0 lie in the view; the CPU has AVX-512 BF16
            unsafe { v.load32(0, 0, false, got.as_mut_ptr()) };
            for (x, g) in xs.iter().zip(got) {
                assert_eq!(g, half::bf16::from_f32(*x).to_bits(), "{x}");
            }
        }
    }
}
