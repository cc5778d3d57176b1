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

use std::arch::asm;
use std::sync::OnceLock;

use candle_core::{CpuStorage, Result, Storage, Tensor};
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
    // the element offset of matrix `i` of the batch, from its multi-index
    let offset = |i: usize, start: usize, st: &[usize]| {
        let (mut rest, mut off) = (i, start);
        for d in (0..batch.len()).rev() {
            off += (rest % batch[d]) * st[d];
            rest /= batch[d];
        }
        off
    };
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

/// A matrix operand in f32 or bf16: element (i, j) at `ptr[i·rs + j·cs]`.
#[derive(Clone, Copy)]
struct View {
    ptr: Elems,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

#[derive(Clone, Copy)]
enum Elems {
    F32(*const f32),
    Bf16(*const u16),
}

// SAFETY: a view is only read, and `View::of` checked its extent against its buffer.
unsafe impl Sync for View {}
unsafe impl Send for View {}

impl View {
    /// The (rows, cols) matrix at `start` with strides `st` (the last two of a layout) in a
    /// CPU f32 or bf16 storage; `None` for other storages, or if it would reach past the
    /// buffer.
    fn of(s: &Storage, start: usize, st: &[usize], rows: usize, cols: usize) -> Option<View> {
        let (rs, cs) = (st[st.len() - 2], st[st.len() - 1]);
        let last = start + (rows - 1) * rs + (cols - 1) * cs;
        let ptr = match s {
            Storage::Cpu(CpuStorage::F32(v)) if last < v.len() => Elems::F32(v[start..].as_ptr()),
            Storage::Cpu(CpuStorage::BF16(v)) if last < v.len() => {
                Elems::Bf16(v[start..].as_ptr() as *const u16)
            }
            _ => return None,
        };
        Some(View {
            ptr,
            rows,
            cols,
            rs,
            cs,
        })
    }

    /// Element (i, j) in bf16; the caller keeps i < rows, j < cols.
    unsafe fn get(&self, i: usize, j: usize) -> u16 {
        let at = i * self.rs + j * self.cs;
        // SAFETY: (i, j) lies in the view, checked against its buffer in `View::of`
        unsafe {
            match self.ptr {
                Elems::F32(p) => bf16_bits(*p.add(at)),
                Elems::Bf16(p) => *p.add(at),
            }
        }
    }

    /// 16 elements in bf16 from (i, j) on along the contiguous axis (the caller checks
    /// that they lie in the view).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn load16(&self, i: usize, j: usize) -> std::arch::x86_64::__m256i {
        use std::arch::x86_64::*;
        let at = i * self.rs + j * self.cs;
        // SAFETY: 16 elements from `at` lie in the view (caller), unaligned loads
        unsafe {
            match self.ptr {
                Elems::F32(p) => std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(
                    _mm512_loadu_ps(p.add(at)),
                )),
                Elems::Bf16(p) => _mm256_loadu_si256(p.add(at) as *const __m256i),
            }
        }
    }

    /// The pair-interleaved tile of rows k0..k0+32 (pairs) and columns c0..c0+16 of this
    /// matrix taken as B, zero outside it (see the module comment).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn b_tile(&self, k0: usize, c0: usize, tile: &mut [u16; 512]) {
        let full = k0 + 32 <= self.rows && c0 + 16 <= self.cols;
        // SAFETY (every arm): the elements read lie in the view (`full`, or bounds per
        // element); AMX CPUs have AVX-512 BW and BF16.
        if full && self.cs == 1 {
            // row-major: rows 2r and 2r+1 interleaved
            for r in 0..16 {
                unsafe {
                    let (even, odd) =
                        (self.load16(k0 + 2 * r, c0), self.load16(k0 + 2 * r + 1, c0));
                    interleave(even, odd, tile[r * 32..].as_mut_ptr());
                }
            }
        } else if full && self.rs == 1 {
            // the transposed view of a row-major matrix: each column's 32 values are
            // contiguous, pairs adjacent; the tile is the transpose of the 16 x 16 pairs
            let mut cols = [0u16; 512];
            for j in 0..16 {
                unsafe { self.load32(k0, c0 + j, true, cols[j * 32..].as_mut_ptr()) };
            }
            unsafe { transpose_pairs(&cols, tile) };
        } else {
            tile.fill(0);
            for j in 0..16.min(self.cols.saturating_sub(c0)) {
                for kk in 0..32.min(self.rows.saturating_sub(k0)) {
                    tile[(kk / 2) * 32 + 2 * j + kk % 2] = unsafe { self.get(k0 + kk, c0 + j) };
                }
            }
        }
    }

    /// The tile of rows r0..r0+16 and columns k0..k0+32 of this matrix taken as A (plain
    /// row-major bf16), zero outside it.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn a_tile(&self, r0: usize, k0: usize, tile: &mut [u16; 512]) {
        let full = r0 + 16 <= self.rows && k0 + 32 <= self.cols;
        // SAFETY: as in `b_tile`
        if full && self.cs == 1 {
            for i in 0..16 {
                unsafe { self.load32(r0 + i, k0, false, tile[i * 32..].as_mut_ptr()) };
            }
        } else if full && self.rs == 1 {
            // columns contiguous: pairs of columns interleaved give the rows' pairs as
            // columns of a 16 x 16 block, transposed into rows
            let mut pairs = [0u16; 512];
            for p in 0..16 {
                unsafe {
                    let (even, odd) =
                        (self.load16(r0, k0 + 2 * p), self.load16(r0, k0 + 2 * p + 1));
                    interleave(even, odd, pairs[p * 32..].as_mut_ptr());
                }
            }
            unsafe { transpose_pairs(&pairs, tile) };
        } else {
            tile.fill(0);
            for i in 0..16.min(self.rows.saturating_sub(r0)) {
                for kk in 0..32.min(self.cols.saturating_sub(k0)) {
                    tile[i * 32 + kk] = unsafe { self.get(r0 + i, k0 + kk) };
                }
            }
        }
    }

    /// 32 contiguous elements in bf16 to `dst`: from (i, j) along a row (`down` false, the
    /// view's cs is 1) or along a column (`down` true, rs is 1).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn load32(&self, i: usize, j: usize, down: bool, dst: *mut u16) {
        use std::arch::x86_64::*;
        let (i2, j2) = if down { (i + 16, j) } else { (i, j + 16) };
        // SAFETY: 32 elements lie in the view (caller); 64 writable bytes at dst
        unsafe {
            _mm256_storeu_si256(dst as *mut __m256i, self.load16(i, j));
            _mm256_storeu_si256(dst.add(16) as *mut __m256i, self.load16(i2, j2));
        }
    }
}

thread_local! {
    /// A in tiles, kept between products: a fresh buffer per product costs more in page
    /// faults than the copy itself.
    static A_TILES: std::cell::RefCell<Vec<BTile>> = const { std::cell::RefCell::new(Vec::new()) };
    /// B panels, per thread.
    static PANEL: std::cell::RefCell<Vec<BTile>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A in tiles: 16-row groups, each `kp / 32` tiles of 16 x 32 bf16 in K order (K padded
/// with zeros to `kp`, a multiple of 32, and the rows with zero rows to a multiple of 32).
/// The kernel then reads A as contiguous 1 KiB tiles, which streams from L2 much faster
/// than 16 rows a row-length apart.
struct ATiles<'a> {
    tiles: &'a [BTile],
    kp: usize,
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

/// f32 -> bf16 bits, rounding to nearest even (NaN stays NaN).
fn bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    let round = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
}

/// One B tile row from 16 bf16 of row 2r and 16 of row 2r + 1: interleaved.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn interleave(
    even: std::arch::x86_64::__m256i,
    odd: std::arch::x86_64::__m256i,
    dst: *mut u16,
) {
    use std::arch::x86_64::*;
    static ORDER: [u16; 32] = [
        0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23, 8, 24, 9, 25, 10, 26, 11, 27, 12,
        28, 13, 29, 14, 30, 15, 31,
    ];
    // SAFETY: 32 writable bf16 at `dst` (caller)
    unsafe {
        let both = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(even), odd);
        let order = _mm512_loadu_si512(ORDER.as_ptr() as *const __m512i);
        _mm512_storeu_si512(dst as *mut __m512i, _mm512_permutexvar_epi16(order, both));
    }
}

/// The transpose of a 16 x 16 block of 32-bit bf16 pairs: tile row r holds pair r of every
/// row of `src`.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn transpose_pairs(src: &[u16; 512], tile: &mut [u16; 512]) {
    use std::arch::x86_64::*;
    // SAFETY: 16 rows of 64 bytes in `src`
    let r: [__m512i; 16] = std::array::from_fn(|j| unsafe {
        _mm512_loadu_si512(src[j * 32..].as_ptr() as *const __m512i)
    });
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

/// One column strip (32 columns from n0) of one row block (rows m0..m0+mb of M), over one
/// K chunk (k0..k0+kc); C (M, N) at `c_addr`, added to when `accumulate`.
#[derive(Clone, Copy)]
struct Strip {
    m: usize,
    m0: usize,
    mb: usize,
    k0: usize,
    kc: usize,
    n0: usize,
    n: usize,
    c_addr: usize,
    accumulate: bool,
}

/// `Strip` on the AMX tile unit.
unsafe fn amx_strip(a: &ATiles, panel: &[BTile], strip: &Strip) {
    let Strip {
        m,
        m0,
        mb,
        k0,
        kc,
        n0,
        n,
        c_addr,
        accumulate,
    } = *strip;
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
            let kbs = a.kp / 32;
            let a0 = a.tiles.as_ptr().add((r0 / 16) * kbs + k0 / 32);
            let a1 = a0.add(kbs);
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
                    a0 = in(reg) a0.add(kb),
                    a1 = in(reg) a1.add(kb),
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

/// `Strip` with AVX-512 BF16: per 8 rows of A and the strip's 32 columns, 16 f32
/// accumulators; each pair of A's row (broadcast) meets one B tile row per `vdpbf16ps`.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn dpbf16_strip(a: &ATiles, panel: &[BTile], strip: &Strip) {
    use std::arch::x86_64::*;
    let Strip {
        m,
        m0,
        mb,
        k0,
        kc,
        n0,
        n,
        c_addr,
        accumulate,
    } = *strip;
    let c = c_addr as *mut f32;
    let kbs = a.kp / 32;
    // columns of the strip's two 16-column halves that lie in C
    let lanes = |half: usize| -> __mmask16 {
        let valid = n.saturating_sub(n0 + 16 * half).min(16);
        ((1u32 << valid) - 1) as __mmask16
    };
    let masks = [lanes(0), lanes(1)];
    for r0 in (m0..m0 + mb).step_by(8) {
        let rows = m.saturating_sub(r0).min(8);
        if rows == 0 {
            break;
        }
        let mut acc = [[_mm512_setzero_ps(); 2]; 8];
        if accumulate {
            for (i, row) in acc.iter_mut().enumerate().take(rows) {
                for (h, v) in row.iter_mut().enumerate() {
                    // SAFETY: row r0 + i < M, the masked lanes' columns < N
                    *v = unsafe {
                        _mm512_maskz_loadu_ps(masks[h], c.add((r0 + i) * n + n0 + 16 * h))
                    };
                }
            }
        }
        let tile_row = (r0 / 16) * kbs + k0 / 32;
        let in_tile = (r0 % 16) * 32;
        for kb in 0..kc / 32 {
            let at = &a.tiles[tile_row + kb].0;
            let (b0, b1) = (&panel[kb * 2].0, &panel[kb * 2 + 1].0);
            for p in 0..16 {
                // SAFETY: row p of each 1 KiB B tile; 64-byte unaligned loads
                let (vb0, vb1): (__m512bh, __m512bh) = unsafe {
                    (
                        std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                            b0[p * 32..].as_ptr() as *const __m512i,
                        )),
                        std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                            b1[p * 32..].as_ptr() as *const __m512i,
                        )),
                    )
                };
                for (i, row) in acc.iter_mut().enumerate() {
                    let o = in_tile + i * 32 + 2 * p;
                    // SAFETY: the pair at `o` lies in the 1 KiB A tile; a 4-byte broadcast
                    // load, reinterpreted as 16 bf16 pairs
                    let va = unsafe {
                        let pair = (at.as_ptr().add(o) as *const i32).read_unaligned();
                        std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(pair))
                    };
                    row[0] = _mm512_dpbf16_ps(row[0], va, vb0);
                    row[1] = _mm512_dpbf16_ps(row[1], va, vb1);
                }
            }
        }
        for (i, row) in acc.iter().enumerate().take(rows) {
            for (h, v) in row.iter().enumerate() {
                // SAFETY: as for the loads
                unsafe { _mm512_mask_storeu_ps(c.add((r0 + i) * n + n0 + 16 * h), masks[h], *v) };
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
