//! bf16 matrix products on Intel AMX (Advanced Matrix Extensions: Sapphire Rapids and
//! later), for the linears of a bf16 model on the CPU: `C (M, N) f32 = A (M, K) · B (K, N)`
//! with A the f32 activations rounded to bf16 (as PyTorch's autocast does) and B a frozen
//! bf16 weight, accumulated in f32 by the tile unit (`tdpbf16ps`). At a training step's
//! shapes this runs at 2 to 3.5 times the f32 gemm's speed on the same cores (`lntune bench
//! --profile`, matmul GFLOP/s).
//!
//! The tile unit holds eight 16 x 64-byte registers. One step of the kernel takes a 32 x 32
//! block of C in four f32 tiles (tmm0-3) and adds A's 32 x 32 bf16 block (tmm4-5, two
//! 16-row tiles loaded straight from the row-major bf16 copy of A) times B's 32 x 32 block
//! (tmm6-7), which must be in the tile unit's pair-interleaved ("VNNI") layout: row r of a B
//! tile holds, for 16 columns j, the pair B[2r][j], B[2r+1][j]. B is repacked so per 32-column
//! strip into a small buffer that stays in cache while every row block of A passes it.
//!
//! CPUs without AMX, and `LNTUNE_AMX=0`, use the f32 product of the widened weight instead
//! (`ops::matmul_in`).

use std::arch::asm;
use std::sync::OnceLock;

use candle_core::{CpuStorage, DType, Result, Storage, Tensor};
use rayon::prelude::*;

/// The tile configuration: palette 1, tiles 0-7 each 16 rows of 64 bytes (the unused
/// entries 8-15 must be zero).
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

static CONFIG: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    bytes_per_row: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// One B tile: 16 rows of 16 bf16 pairs.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct BTile([u16; 512]);

/// Rows of A per block: with K at most `K_CHUNK`, a block's bf16 rows (<= 1 MiB) stay in
/// the L2 cache while every column strip passes them.
const M_BLOCK: usize = 512;
/// K per pass; a longer K (the LM head's dX: K = vocabulary) adds pass after pass into C.
const K_CHUNK: usize = 1024;

/// Whether this process may use AMX bf16 products: the CPU has them, Linux granted the tile
/// state (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), and `LNTUNE_AMX` is not `0`.
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        if std::env::var("LNTUNE_AMX").is_ok_and(|v| v == "0") {
            return false;
        }
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

/// `a @ b` for a 2-D f32 CPU `a` and a 2-D bf16 CPU `b` (row-major, or the transposed view
/// of a row-major matrix: a linear's `w.t()`), in f32. `None` when AMX is not available
/// or the operands are of another kind.
pub fn matmul_bf16(a: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
    let kinds = a.dtype() == DType::F32
        && b.dtype() == DType::BF16
        && a.device().is_cpu()
        && b.device().is_cpu()
        && a.rank() == 2
        && b.rank() == 2;
    if !kinds || !available() {
        return Ok(None);
    }
    let ((m, k), (k2, n)) = (a.dims2()?, b.dims2()?);
    if k != k2 {
        candle_core::bail!("matmul: {:?} @ {:?}", a.dims(), b.dims());
    }
    if m == 0 || n == 0 || k == 0 {
        return Ok(None);
    }
    let (sb, lb) = b.storage_and_layout();
    let Storage::Cpu(CpuStorage::BF16(vb)) = &*sb else {
        return Ok(None);
    };
    let st = lb.stride();
    let (sk, sn) = (st[0], st[1]);
    let last = lb.start_offset() + (k - 1) * sk + (n - 1) * sn;
    if last >= vb.len() {
        return Ok(None);
    }
    let b_view = BView {
        ptr: vb[lb.start_offset()..].as_ptr() as *const u16,
        sk,
        sn,
        k,
        n,
    };
    let a = a.contiguous()?;
    let (sa, la) = a.storage_and_layout();
    let Storage::Cpu(ca) = &*sa else {
        return Ok(None);
    };
    let a_f32 = super::cpu::f32_data(ca, la, "amx matmul")?;
    let c = A_ROWS.with_borrow_mut(|scratch| {
        let a_rows = BfRows::fill(scratch, a_f32, m, k);
        let mut c = Vec::<f32>::with_capacity(m * n);
        // SAFETY: `gemm` writes every element of C (its first K pass stores all tiles,
        // whole or clipped) before anything reads it
        gemm(
            &a_rows,
            m,
            &b_view,
            c.spare_capacity_mut().as_mut_ptr() as *mut f32,
        );
        unsafe { c.set_len(m * n) };
        c
    });
    Ok(Some(Tensor::from_vec(c, (m, n), a.device())?))
}

thread_local! {
    /// The bf16 copy of A, kept between products: a fresh buffer per product costs more
    /// in page faults than the conversion itself.
    static A_ROWS: std::cell::RefCell<Vec<u16>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A in bf16 (round to nearest even), as A tiles: 16-row groups, each `kp / 32` tiles of
/// 16 x 32 bf16 in K order (K padded with zeros to `kp`, a multiple of 32, and the rows with
/// zero rows to a multiple of 32). The kernel then reads A as contiguous 1 KiB tiles,
/// which streams from L2 much faster than 16 rows a row-length apart.
struct BfRows<'a> {
    data: &'a [u16],
    kp: usize,
}

impl<'a> BfRows<'a> {
    fn fill(buf: &'a mut Vec<u16>, src: &[f32], m: usize, k: usize) -> BfRows<'a> {
        let kp = k.div_ceil(32) * 32;
        let len = m.div_ceil(32) * 32 * kp;
        if buf.len() < len {
            buf.resize(len, 0);
        }
        let data = &mut buf[..len];
        data.par_chunks_mut(16 * kp)
            .enumerate()
            .for_each(|(group, tiles)| {
                for i in 0..16 {
                    let row = group * 16 + i;
                    for (kb, tile) in tiles.chunks_mut(512).enumerate() {
                        let dst = &mut tile[i * 32..i * 32 + 32];
                        let (k0, k1) = (kb * 32, (kb * 32 + 32).min(k));
                        if row >= m {
                            dst.fill(0);
                            continue;
                        }
                        let s = &src[row * k + k0..row * k + k1];
                        // SAFETY: AMX CPUs have AVX-512 BF16 (Sapphire Rapids and later)
                        unsafe { row_to_bf16(s, &mut dst[..k1 - k0]) };
                        dst[k1 - k0..].fill(0);
                    }
                }
            });
        BfRows { data, kp }
    }
}

/// f32 -> bf16, 16 at a time with `vcvtneps2bf16` (round to nearest even; like PyTorch's
/// CPU conversion it treats subnormal inputs as zero).
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn row_to_bf16(src: &[f32], dst: &mut [u16]) {
    use std::arch::x86_64::*;
    let mut d16 = dst.chunks_exact_mut(16);
    let mut s16 = src.chunks_exact(16);
    for (s, d) in (&mut s16).zip(&mut d16) {
        // SAFETY: both chunks hold 16 elements; unaligned loads and stores
        unsafe {
            let v = _mm512_loadu_ps(s.as_ptr());
            let b: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
            _mm256_storeu_si256(d.as_mut_ptr() as *mut __m256i, b);
        }
    }
    for (d, &s) in d16.into_remainder().iter_mut().zip(s16.remainder()) {
        *d = bf16_bits(s);
    }
}

/// f32 -> bf16 bits, rounding to nearest even (NaN stays NaN).
fn bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    let round = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
}

/// B (K, N) in bf16: element (kk, j) at `ptr[kk·sk + j·sn]`.
struct BView {
    ptr: *const u16,
    sk: usize,
    sn: usize,
    k: usize,
    n: usize,
}

// SAFETY: the view is only read, and its extent was checked against its buffer.
unsafe impl Sync for BView {}

impl BView {
    /// Packs rows k0..k0+kc (kc a multiple of 32 after padding) of columns n0..n0+32 into
    /// `panel` as B tiles, [kb][half], zero outside B.
    fn pack(&self, k0: usize, kc: usize, n0: usize, panel: &mut Vec<BTile>) {
        let kbs = kc.div_ceil(32);
        if panel.len() < kbs * 2 {
            panel.resize(kbs * 2, BTile([0; 512]));
        }
        for kb in 0..kbs {
            let kbase = k0 + kb * 32;
            for half in 0..2 {
                let c0 = n0 + 16 * half;
                let tile = &mut panel[kb * 2 + half].0;
                let full = kbase + 32 <= self.k && c0 + 16 <= self.n;
                // SAFETY (all three arms): every element read lies inside B (k < K, j < N),
                // whose extent `matmul_bf16` checked; AMX CPUs have AVX-512 BW.
                if full && self.sk == 1 {
                    // B = Wᵀ of a row-major W: pairs are adjacent in W's rows, so the tile
                    // is a 16 x 16 transpose of 32-bit pairs
                    unsafe { transpose_pairs(self.ptr.add(c0 * self.sn + kbase), self.sn, tile) };
                } else if full && self.sn == 1 {
                    // B row-major: rows 2r and 2r+1 interleaved
                    for r in 0..16 {
                        unsafe {
                            let row = self.ptr.add((kbase + 2 * r) * self.sk + c0);
                            interleave_rows(row, row.add(self.sk), tile[r * 32..].as_mut_ptr())
                        };
                    }
                } else {
                    tile.fill(0);
                    for j in 0..16.min(self.n.saturating_sub(c0)) {
                        for kk in 0..32.min(self.k.saturating_sub(kbase)) {
                            let at = (kbase + kk) * self.sk + (c0 + j) * self.sn;
                            tile[(kk / 2) * 32 + 2 * j + kk % 2] = unsafe { *self.ptr.add(at) };
                        }
                    }
                }
            }
        }
    }
}

/// One B tile row from two rows of a row-major B: 16 bf16 of each, interleaved.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn interleave_rows(even: *const u16, odd: *const u16, dst: *mut u16) {
    use std::arch::x86_64::*;
    static ORDER: [u16; 32] = [
        0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23, 8, 24, 9, 25, 10, 26, 11, 27, 12,
        28, 13, 29, 14, 30, 15, 31,
    ];
    // SAFETY: the caller passes 16 readable bf16 at `even` and `odd`, 32 writable at `dst`
    unsafe {
        let lo = _mm256_loadu_si256(even as *const __m256i);
        let hi = _mm256_loadu_si256(odd as *const __m256i);
        let both = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
        let order = _mm512_loadu_si512(ORDER.as_ptr() as *const __m512i);
        _mm512_storeu_si512(dst as *mut __m512i, _mm512_permutexvar_epi16(order, both));
    }
}

/// A B tile from 16 rows of W (`stride` bf16 apart, 32 bf16 each): tile row r holds pair r
/// of every W row, the transpose of W's 16 x 16 block of 32-bit pairs.
#[target_feature(enable = "avx512f")]
unsafe fn transpose_pairs(w: *const u16, stride: usize, tile: &mut [u16; 512]) {
    use std::arch::x86_64::*;
    // SAFETY: the caller passes 16 rows of 32 readable bf16
    let r: [__m512i; 16] =
        std::array::from_fn(|j| unsafe { _mm512_loadu_si512(w.add(j * stride) as *const __m512i) });
    // 32-bit, then 64-bit interleaves within 128-bit lanes, then two 128-bit lane shuffles
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    let mut u = [_mm512_setzero_si512(); 16];
    for g in 0..4 {
        let b = 4 * g;
        u[b] = _mm512_unpacklo_epi64(t[b], t[b + 2]);
        u[b + 1] = _mm512_unpackhi_epi64(t[b], t[b + 2]);
        u[b + 2] = _mm512_unpacklo_epi64(t[b + 1], t[b + 3]);
        u[b + 3] = _mm512_unpackhi_epi64(t[b + 1], t[b + 3]);
    }
    for h in 0..2 {
        let b = 8 * h;
        for i in 0..4 {
            t[b + i] = _mm512_shuffle_i32x4::<0x88>(u[b + i], u[b + 4 + i]);
            t[b + 4 + i] = _mm512_shuffle_i32x4::<0xdd>(u[b + i], u[b + 4 + i]);
        }
    }
    for i in 0..8 {
        let lo = _mm512_shuffle_i32x4::<0x88>(t[i], t[8 + i]);
        let hi = _mm512_shuffle_i32x4::<0xdd>(t[i], t[8 + i]);
        // SAFETY: rows i and 8 + i of the 1024-byte tile
        unsafe {
            _mm512_storeu_si512(tile[i * 32..].as_mut_ptr() as *mut __m512i, lo);
            _mm512_storeu_si512(tile[(8 + i) * 32..].as_mut_ptr() as *mut __m512i, hi);
        }
    }
}

/// c (M, N) row-major = a · b, a's bf16 rows padded as `BfRows` describes; c points to
/// M·N f32, written in full.
fn gemm(a: &BfRows, m: usize, b: &BView, c: *mut f32) {
    let n = b.n;
    let strips = n.div_ceil(32);
    let c_addr = c as usize;
    for m0 in (0..m).step_by(M_BLOCK) {
        let mb = M_BLOCK.min(m - m0);
        for k0 in (0..a.kp).step_by(K_CHUNK) {
            let kc = K_CHUNK.min(a.kp - k0);
            (0..strips)
                .into_par_iter()
                .for_each_init(Vec::new, |panel, s| {
                    b.pack(k0, kc, s * 32, panel);
                    // SAFETY: the tile kernel reads A's padded rows m0..m0+mb (rounded up to 32,
                    // inside `a.data`) at columns k0..k0+kc, and `panel`'s kc/32 x 2 tiles; it
                    // writes C's rows of this block at this strip's columns only (no other task
                    // writes them), clipped to M and N.
                    unsafe { strip_kernel(a, m, m0, mb, k0, kc, panel, s * 32, n, c_addr, k0 > 0) };
                });
        }
    }
}

/// One column strip (32 columns from n0) of one row block, over one K chunk.
#[allow(clippy::too_many_arguments)]
unsafe fn strip_kernel(
    a: &BfRows,
    m: usize,
    m0: usize,
    mb: usize,
    k0: usize,
    kc: usize,
    panel: &[BTile],
    n0: usize,
    n: usize,
    c_addr: usize,
    accumulate: bool,
) {
    let c = c_addr as *mut f32;
    let mut spill = [[0f32; 256]; 4];
    unsafe {
        asm!("ldtilecfg [{}]", in(reg) &CONFIG as *const TileConfig, options(nostack));
        for r0 in (m0..m0 + mb).step_by(32) {
            let full = r0 + 32 <= m && n0 + 32 <= n;
            // where the four C tiles live: in C itself when whole, else in `spill`
            let (dst, dst_stride) = if full {
                let p = c.add(r0 * n + n0);
                ([p, p.add(16), p.add(16 * n), p.add(16 * n + 16)], n * 4)
            } else {
                if accumulate {
                    for (q, t) in spill.iter_mut().enumerate() {
                        let (tr, tc) = (r0 + 16 * (q / 2), n0 + 16 * (q % 2));
                        for i in 0..16 {
                            for j in 0..16 {
                                t[i * 16 + j] = if tr + i < m && tc + j < n {
                                    *c.add((tr + i) * n + tc + j)
                                } else {
                                    0.0
                                };
                            }
                        }
                    }
                }
                let [s0, s1, s2, s3] = &mut spill;
                (
                    [
                        s0.as_mut_ptr(),
                        s1.as_mut_ptr(),
                        s2.as_mut_ptr(),
                        s3.as_mut_ptr(),
                    ],
                    64,
                )
            };
            if accumulate {
                asm!(
                    "tileloadd tmm0, [{d0} + {s}*1]",
                    "tileloadd tmm1, [{d1} + {s}*1]",
                    "tileloadd tmm2, [{d2} + {s}*1]",
                    "tileloadd tmm3, [{d3} + {s}*1]",
                    d0 = in(reg) dst[0], d1 = in(reg) dst[1], d2 = in(reg) dst[2],
                    d3 = in(reg) dst[3], s = in(reg) dst_stride, options(nostack)
                );
            } else {
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nostack)
                );
            }
            let a0 = a.data.as_ptr().add(r0 * a.kp + k0 * 16);
            let a1 = a0.add(16 * a.kp);
            for kb in 0..kc / 32 {
                asm!(
                    "tileloadd tmm4, [{a0} + {sa}*1]",
                    "tileloadd tmm5, [{a1} + {sa}*1]",
                    "tileloadd tmm6, [{b0} + {sb}*1]",
                    "tileloadd tmm7, [{b1} + {sb}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a0 = in(reg) a0.add(kb * 512),
                    a1 = in(reg) a1.add(kb * 512),
                    b0 = in(reg) panel.as_ptr().add(kb * 2),
                    b1 = in(reg) panel.as_ptr().add(kb * 2 + 1),
                    sa = in(reg) 64usize,
                    sb = in(reg) 64usize,
                    options(nostack)
                );
            }
            asm!(
                "tilestored [{d0} + {s}*1], tmm0",
                "tilestored [{d1} + {s}*1], tmm1",
                "tilestored [{d2} + {s}*1], tmm2",
                "tilestored [{d3} + {s}*1], tmm3",
                d0 = in(reg) dst[0], d1 = in(reg) dst[1], d2 = in(reg) dst[2],
                d3 = in(reg) dst[3], s = in(reg) dst_stride, options(nostack)
            );
            if !full {
                for (q, t) in spill.iter().enumerate() {
                    let (tr, tc) = (r0 + 16 * (q / 2), n0 + 16 * (q % 2));
                    for i in 0..16.min(m.saturating_sub(tr)) {
                        for j in 0..16.min(n.saturating_sub(tc)) {
                            *c.add((tr + i) * n + tc + j) = t[i * 16 + j];
                        }
                    }
                }
            }
        }
        asm!("tilerelease", options(nostack));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The product of bf16-rounded operands, in f64 from the same bf16 values.
    fn reference(a: &Tensor, b: &Tensor) -> Tensor {
        let a = a
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let b = b.to_dtype(DType::F64).unwrap();
        a.matmul(&b).unwrap()
    }

    #[test]
    fn amx_products_equal_the_rounded_product_in_every_shape_and_layout() {
        if !available() {
            eprintln!("skipped: this CPU (or LNTUNE_AMX=0) has no AMX bf16 products");
            return;
        }
        let dev = Device::Cpu;
        // edges of every kind: below one tile, odd sizes, several K chunks and M blocks
        for (i, &(m, k, n)) in [
            (1, 1, 1),
            (5, 7, 3),
            (32, 32, 32),
            (33, 65, 47),
            (64, 576, 192),
            (600, 40, 70),
            (40, 2100, 50),
        ]
        .iter()
        .enumerate()
        {
            let a = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let w_rows = Tensor::randn(0f32, 1.0, (k, n), &dev).unwrap();
            let w_cols = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            for (what, b) in [
                ("row-major", w_rows.to_dtype(DType::BF16).unwrap()),
                (
                    "transposed",
                    w_cols.to_dtype(DType::BF16).unwrap().t().unwrap(),
                ),
            ] {
                let got = matmul_bf16(&a, &b)
                    .unwrap()
                    .expect("amx takes 2-D f32 x bf16");
                let want = reference(&a, &b);
                let diff = (got.to_dtype(DType::F64).unwrap() - &want)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                // f32 accumulation of exact bf16 products: error ~ K · eps_f32 · |terms|
                let bound = 1e-5 * (k as f64) * 4.0;
                assert!(
                    diff <= bound,
                    "case {i} {what} {m}x{k}x{n}: max |amx - ref| {diff} > {bound}"
                );
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
        let mut got = vec![0u16; xs.len()];
        if available() {
            // SAFETY: AMX CPUs have AVX-512 BF16
            unsafe { row_to_bf16(&xs, &mut got) };
        } else {
            got.iter_mut()
                .zip(&xs)
                .for_each(|(g, &x)| *g = bf16_bits(x));
        }
        for (x, g) in xs.iter().zip(&got) {
            assert_eq!(*g, half::bf16::from_f32(*x).to_bits(), "{x}");
        }
        assert!(half::bf16::from_bits(bf16_bits(f32::NAN)).is_nan());
    }
}
