//! The two strip kernels: one column strip of C over one row block and K chunk, on AMX
//! tiles or with AVX-512 BF16.

use std::arch::asm;

use super::pack::{ATiles, BTile};

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

/// One column strip (32 columns from n0) of one row block (rows m0..m0+mb of M), over one
/// K chunk (k0..k0+kc); C (M, N) at `c_addr`, added to when `accumulate`.
#[derive(Clone, Copy)]
pub(super) struct Strip {
    pub(super) m: usize,
    pub(super) m0: usize,
    pub(super) mb: usize,
    pub(super) k0: usize,
    pub(super) kc: usize,
    pub(super) n0: usize,
    pub(super) n: usize,
    pub(super) c_addr: usize,
    pub(super) accumulate: bool,
}

/// `Strip` on the AMX tile unit.
pub(super) unsafe fn amx_strip(a: &ATiles, panel: &[BTile], strip: &Strip) {
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
pub(super) unsafe fn dpbf16_strip(a: &ATiles, panel: &[BTile], strip: &Strip) {
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
