//! The bf16 kernels' operands: matrix views of f32 or bf16 storage, A copied into tiles and
//! B into pair-interleaved tiles (see the module comment of `ops::bf16`).

use candle_core::{CpuStorage, Storage};

/// One B tile: 16 rows of 16 bf16 pairs.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub(super) struct BTile(pub(super) [u16; 512]);

/// A matrix operand in f32 or bf16: element (i, j) at `ptr[i·rs + j·cs]`.
#[derive(Clone, Copy)]
pub(super) struct View {
    pub(super) ptr: Elems,
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) rs: usize,
    pub(super) cs: usize,
}

#[derive(Clone, Copy)]
pub(super) enum Elems {
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
    pub(super) fn of(
        s: &Storage,
        start: usize,
        st: &[usize],
        rows: usize,
        cols: usize,
    ) -> Option<View> {
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
    pub(super) unsafe fn get(&self, i: usize, j: usize) -> u16 {
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
    pub(super) unsafe fn load16(&self, i: usize, j: usize) -> std::arch::x86_64::__m256i {
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
    pub(super) unsafe fn b_tile(&self, k0: usize, c0: usize, tile: &mut [u16; 512]) {
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
    pub(super) unsafe fn a_tile(&self, r0: usize, k0: usize, tile: &mut [u16; 512]) {
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
    pub(super) unsafe fn load32(&self, i: usize, j: usize, down: bool, dst: *mut u16) {
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
    pub(super) static A_TILES: std::cell::RefCell<Vec<BTile>> = const { std::cell::RefCell::new(Vec::new()) };
    /// B panels, per thread.
    pub(super) static PANEL: std::cell::RefCell<Vec<BTile>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A in tiles: 16-row groups, each `kp / 32` tiles of 16 x 32 bf16 in K order (K padded
/// with zeros to `kp`, a multiple of 32, and the rows with zero rows to a multiple of 32).
/// The kernel then reads A as contiguous 1 KiB tiles, which streams from L2 much faster
/// than 16 rows a row-length apart.
pub(super) struct ATiles<'a> {
    pub(super) tiles: &'a [BTile],
    pub(super) kp: usize,
}

/// f32 -> bf16 bits, rounding to nearest even (NaN stays NaN).
pub(super) fn bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    let round = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
}

/// One B tile row from 16 bf16 of row 2r and 16 of row 2r + 1: interleaved.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(super) unsafe fn interleave(
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
pub(super) unsafe fn transpose_pairs(src: &[u16; 512], tile: &mut [u16; 512]) {
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
