//! Attention on the CPU in blocks of query rows, each block multiplied only against the
//! keys one of its rows may see. Under a causal mask the block of rows i0..i1 sees keys
//! 0..i1 at most, so the four per-head products (q·kᵀ, p·v, and in the backward dO·vᵀ,
//! dSᵀ·q, dS·k, pᵀ·dO) do about half the work of the whole T x S matrices. The skipped
//! probabilities are exactly 0 in the full computation too (a blocked key's entry is 0, see
//! `masked_softmax_row`), so the result is the full attention's up to the order of sums.
//!
//! A block that holds a row with no allowed key (a left-padded query) multiplies against
//! every key: such a row is uniform over all S keys, as with transformers' min-value mask.
//! f32 only, contiguous data; each block's products are single-threaded gemm calls and the
//! blocks spread over the rayon threads.

use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

use super::rows::{self, MASKED_HALF};
use crate::ops::cpu::{vectorised, with_f32_slices};

/// Query rows per block: smaller blocks skip more keys (the skipped share tends to half as
/// blocks shrink) but make thinner products.
pub const QUERY_BLOCK: usize = 32;

/// For every (sample, block of query rows), how many leading keys the block multiplies
/// against, from the additive mask (B, 1, T, S).
#[derive(Debug, Clone)]
pub struct KeyExtents {
    t: usize,
    s: usize,
    blocks: usize,
    ends: Vec<usize>, // (B, blocks)
}

impl KeyExtents {
    /// The extents of `mask` (contiguous f32 data of shape (b, 1, t, s)): one past the last
    /// allowed key of any row in the block, or s when a row has none.
    fn of(mask: &[f32], b: usize, t: usize, s: usize) -> Self {
        let blocks = t.div_ceil(QUERY_BLOCK);
        let mut ends = Vec::with_capacity(b * blocks);
        for bi in 0..b {
            for blk in 0..blocks {
                let rows = blk * QUERY_BLOCK..((blk + 1) * QUERY_BLOCK).min(t);
                let mut end = 0;
                for i in rows {
                    let row = &mask[(bi * t + i) * s..(bi * t + i + 1) * s];
                    match row.iter().rposition(|&m| m > MASKED_HALF) {
                        Some(last) => end = end.max(last + 1),
                        None => {
                            end = s;
                            break;
                        }
                    }
                }
                ends.push(end);
            }
        }
        KeyExtents { t, s, blocks, ends }
    }

    /// Query rows times keys multiplied for one head, summed over the samples.
    pub fn row_keys(&self) -> usize {
        self.ends
            .iter()
            .enumerate()
            .map(|(i, &end)| {
                let blk = i % self.blocks;
                let rows = ((blk + 1) * QUERY_BLOCK).min(self.t) - blk * QUERY_BLOCK;
                rows * end
            })
            .sum()
    }

    fn end(&self, sample: usize, block: usize) -> usize {
        self.ends[sample * self.blocks + block]
    }
}

/// The extents to run attention in blocks with, or `None` where the blocked kernels do
/// not apply (not f32 CPU data, products not in f32, a mask that is not (B, 1, T, S)) or
/// would skip less than an eighth of the keys.
pub fn extents(
    q: &Tensor,
    k: &Tensor,
    mask: &Tensor,
    g: usize,
    mm_dtype: DType,
) -> Result<Option<KeyExtents>> {
    let f32_cpu = |x: &Tensor| crate::ops::cpu::fused_on(x) && x.dtype() == DType::F32;
    if !(f32_cpu(q) && f32_cpu(k) && f32_cpu(mask) && crate::ops::cpu_products_f32(mm_dtype)) {
        return Ok(None);
    }
    let (b, _, gt, _) = q.dims4()?;
    let s = k.dim(2)?;
    let t = gt / g;
    if mask.dims() != [b, 1, t, s] || t == 0 || s == 0 {
        return Ok(None);
    }
    let mask = mask.contiguous()?;
    let Some(ext) = with_f32_slices(&[&mask], |m| KeyExtents::of(m[0], b, t, s)) else {
        return Ok(None);
    };
    Ok((ext.row_keys() * 8 < b * t * s * 7).then_some(ext))
}

/// A row-major matrix view: element (i, j) at `i·rs + j·cs` of `data`.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    cs: usize,
    rs: usize,
}

impl<'a> View<'a> {
    fn rows(data: &'a [f32], rs: usize) -> Self {
        View { data, cs: 1, rs }
    }

    /// The transpose of a row-major matrix with row stride `rs`.
    fn transposed(data: &'a [f32], rs: usize) -> Self {
        View {
            data,
            cs: rs,
            rs: 1,
        }
    }

    fn covers(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
}

/// dst (m x n, row stride `dst_rs`) = [dst +] beta · a (m x k) · b (k x n), on this
/// thread. Panics if a view does not hold its matrix (a bug, not an input error).
#[allow(clippy::too_many_arguments)]
fn product(
    dst: &mut [f32],
    dst_rs: usize,
    (m, k, n): (usize, usize, usize),
    a: View,
    b: View,
    beta: f32,
    accumulate: bool,
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    let out = View::rows(dst, dst_rs);
    assert!(
        out.covers(m, n) && a.covers(m, k) && b.covers(k, n),
        "attention block product out of bounds"
    );
    // SAFETY: the three views were checked to hold their m x n, m x k and k x n matrices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Shapes shared by the kernels: q and dO (B, NKV, G·T, HD), k and v (B, NKV, S, HD).
#[derive(Clone, Copy)]
struct Dims {
    nkv: usize,
    g: usize,
    t: usize,
    s: usize,
}

/// softmax(q·kᵀ·scale + mask) (B, NKV, G·T, S) and, with `v`, its product with v
/// (B, NKV, G·T, HD); every tensor contiguous f32.
fn probs_and_out(
    q: &Tensor,
    k: &Tensor,
    v: Option<&Tensor>,
    mask: &Tensor,
    ext: &KeyExtents,
    g: usize,
    scale: f64,
) -> Result<(Tensor, Option<Tensor>)> {
    let (b, nkv, gt, hd) = q.dims4()?;
    let d = Dims {
        nkv,
        g,
        t: gt / g,
        s: ext.s,
    };
    let (q, k, mask) = (q.contiguous()?, k.contiguous()?, mask.contiguous()?);
    let v = v.map(|v| v.contiguous()).transpose()?;
    let mut probs = vec![0f32; b * nkv * gt * d.s];
    let mut out = vec![0f32; if v.is_some() { b * nkv * gt * hd } else { 0 }];
    let mut tensors = vec![&q, &k, &mask];
    tensors.extend(v.as_ref());
    let done = with_f32_slices(&tensors, |x| {
        let (q, k, mask) = (x[0], x[1], x[2]);
        let v = x.get(3).copied();
        let head = d.t * d.s; // probabilities of one (sample, KV head, group member)
        let out_head = if v.is_some() { d.t * hd } else { 0 };
        let outs: Vec<&mut [f32]> = if v.is_some() {
            out.chunks_mut(out_head).collect()
        } else {
            (0..b * nkv * g).map(|_| <&mut [f32]>::default()).collect()
        };
        probs
            .par_chunks_mut(head)
            .zip(outs)
            .enumerate()
            .for_each(|(p, (ph, oh))| {
                let (bi, kv) = (p / (d.nkv * d.g), p / d.g % d.nkv);
                let qh = &q[p * d.t * hd..(p + 1) * d.t * hd];
                let kh = &k[(bi * d.nkv + kv) * d.s * hd..(bi * d.nkv + kv + 1) * d.s * hd];
                let mut scores = vec![0f32; QUERY_BLOCK * d.s];
                for blk in 0..ext.blocks {
                    let (i0, i1) = (blk * QUERY_BLOCK, ((blk + 1) * QUERY_BLOCK).min(d.t));
                    let (m, n) = (i1 - i0, ext.end(bi, blk));
                    product(
                        &mut scores,
                        n,
                        (m, hd, n),
                        View::rows(&qh[i0 * hd..], hd),
                        View::transposed(kh, hd),
                        1.0,
                        false,
                    );
                    for r in 0..m {
                        let i = i0 + r;
                        let mrow = &mask[(bi * d.t + i) * d.s..][..n];
                        let prow = &mut ph[i * d.s..][..n];
                        let srow = &scores[r * n..(r + 1) * n];
                        vectorised!(masked_row(srow, mrow, scale as f32, prow));
                    }
                    if let Some(v) = v {
                        let vh = &v[(bi * d.nkv + kv) * d.s * hd..];
                        product(
                            &mut oh[i0 * hd..],
                            hd,
                            (m, n, hd),
                            View::rows(&ph[i0 * d.s..], d.s),
                            View::rows(vh, hd),
                            1.0,
                            false,
                        );
                    }
                }
            });
    });
    if done.is_none() {
        candle_core::bail!("blocked attention: inputs are not f32 CPU tensors");
    }
    let dev = q.device();
    let probs = Tensor::from_vec(probs, (b, nkv, gt, d.s), dev)?;
    let out = match v {
        Some(_) => Some(Tensor::from_vec(out, (b, nkv, gt, hd), dev)?),
        None => None,
    };
    Ok((probs, out))
}

#[inline(always)]
fn masked_row(x: &[f32], mask: &[f32], scale: f32, out: &mut [f32]) {
    rows::masked_softmax_row(x, mask, scale, out)
}

#[inline(always)]
fn softmax_backward_row(dp: &[f32], p: &[f32], out: &mut [f32]) {
    rows::softmax_backward_row(dp, p, out)
}

/// The attention output (B, NKV, G·T, HD) and probabilities (B, NKV, G·T, S) of grouped
/// queries q (B, NKV, G·T, HD) against k, v (B, NKV, S, HD) under `mask` (B, 1, T, S).
pub fn forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    ext: &KeyExtents,
    g: usize,
    scale: f64,
) -> Result<(Tensor, Tensor)> {
    let (probs, out) = probs_and_out(q, k, Some(v), mask, ext, g, scale)?;
    Ok((out.expect("asked for the output"), probs))
}

/// The probabilities alone (the backward's recompute when they were dropped).
pub fn probs(
    q: &Tensor,
    k: &Tensor,
    mask: &Tensor,
    ext: &KeyExtents,
    g: usize,
    scale: f64,
) -> Result<Tensor> {
    Ok(probs_and_out(q, k, None, mask, ext, g, scale)?.0)
}

/// dq (B, NKV, G·T, HD), dk and dv (B, NKV, S, HD) from dO (B, NKV, G·T, HD) and the
/// forward's probabilities, block by block: dV += Pᵀ·dO, dP = dO·Vᵀ,
/// dS = P ⊙ (dP − Σ dP ⊙ P), dQ = scale·dS·K, dK += scale·dSᵀ·Q, each over the block's keys.
/// One task per (sample, KV head), which owns that head's dK and dV.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    dout: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    probs: &Tensor,
    ext: &KeyExtents,
    g: usize,
    scale: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, nkv, gt, hd) = q.dims4()?;
    let d = Dims {
        nkv,
        g,
        t: gt / g,
        s: ext.s,
    };
    let c = |x: &Tensor| x.contiguous();
    let (dout, q, k, v, probs) = (c(dout)?, c(q)?, c(k)?, c(v)?, c(probs)?);
    let mut dq = vec![0f32; b * nkv * gt * hd];
    let mut dk = vec![0f32; b * nkv * d.s * hd];
    let mut dv = vec![0f32; b * nkv * d.s * hd];
    let scale = scale as f32;
    let done = with_f32_slices(&[&dout, &q, &k, &v, &probs], |x| {
        let (dout, q, k, v, probs) = (x[0], x[1], x[2], x[3], x[4]);
        let kv_len = d.s * hd;
        dq.par_chunks_mut(gt * hd)
            .zip(dk.par_chunks_mut(kv_len).zip(dv.par_chunks_mut(kv_len)))
            .enumerate()
            .for_each(|(h, (dqh, (dkh, dvh)))| {
                let bi = h / d.nkv;
                let (kh, vh) = (&k[h * kv_len..], &v[h * kv_len..]);
                let mut dp = vec![0f32; QUERY_BLOCK * d.s];
                let mut ds = vec![0f32; QUERY_BLOCK * d.s];
                for gi in 0..d.g {
                    let row0 = (h * d.g + gi) * d.t; // first row of this group member
                    for blk in 0..ext.blocks {
                        let (i0, i1) = (blk * QUERY_BLOCK, ((blk + 1) * QUERY_BLOCK).min(d.t));
                        let (m, n) = (i1 - i0, ext.end(bi, blk));
                        let r0 = row0 + i0;
                        let dob = View::rows(&dout[r0 * hd..], hd);
                        let pb = &probs[r0 * d.s..];
                        product(
                            &mut dp,
                            n,
                            (m, hd, n),
                            dob,
                            View::transposed(vh, hd),
                            1.0,
                            false,
                        );
                        for r in 0..m {
                            let (dpr, dsr) = (&dp[r * n..(r + 1) * n], &mut ds[r * n..(r + 1) * n]);
                            vectorised!(softmax_backward_row(dpr, &pb[r * d.s..][..n], dsr));
                        }
                        let local = (gi * d.t + i0) * hd; // this block's rows in dqh
                        product(
                            &mut dqh[local..],
                            hd,
                            (m, n, hd),
                            View::rows(&ds, n),
                            View::rows(kh, hd),
                            scale,
                            false,
                        );
                        product(
                            dkh,
                            hd,
                            (n, m, hd),
                            View::transposed(&ds, n),
                            View::rows(&q[r0 * hd..], hd),
                            scale,
                            true,
                        );
                        product(
                            dvh,
                            hd,
                            (n, m, hd),
                            View::transposed(pb, d.s),
                            dob,
                            1.0,
                            true,
                        );
                    }
                }
            });
    });
    if done.is_none() {
        candle_core::bail!("blocked attention backward: inputs are not f32 CPU tensors");
    }
    let dev = q.device();
    Ok((
        Tensor::from_vec(dq, (b, nkv, gt, hd), dev)?,
        Tensor::from_vec(dk, (b, nkv, d.s, hd), dev)?,
        Tensor::from_vec(dv, (b, nkv, d.s, hd), dev)?,
    ))
}
