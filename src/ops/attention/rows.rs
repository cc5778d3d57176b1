//! The row kernels attention's fused CPU paths share (the whole-matrix path in `mod.rs` and
//! the blocked one): a masked softmax row and a softmax-backward row, in 16 lanes.

/// Additive mask value for blocked keys: transformers uses the dtype minimum, so a row with
/// no allowed key becomes a uniform distribution instead of NaN.
pub const MASKED: f32 = f32::MIN;

/// Mask entries at or below this are "blocked".
pub const MASKED_HALF: f32 = MASKED * 0.5;

/// One row of `MaskedSoftmax`, in 16 lanes (max, exp and sum vectorise; the sum's order
/// differs from a left-to-right sum by rounding only).
#[inline(always)]
pub fn masked_softmax_row(x: &[f32], mask: &[f32], scale: f32, out: &mut [f32]) {
    const L: usize = 16;
    let score = |x: f32, m: f32| {
        if m > MASKED_HALF {
            x * scale + m
        } else {
            f32::NEG_INFINITY
        }
    };
    let mut lanes = [f32::NEG_INFINITY; L];
    let (xc, mc) = (x.chunks_exact(L), mask.chunks_exact(L));
    let (xt, mt) = (xc.remainder(), mc.remainder());
    for (xs, ms) in xc.zip(mc) {
        for l in 0..L {
            let v = score(xs[l], ms[l]);
            lanes[l] = if v > lanes[l] { v } else { lanes[l] };
        }
    }
    let mut max = lanes
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    for (&xv, &mv) in xt.iter().zip(mt) {
        let v = score(xv, mv);
        max = if v > max { v } else { max };
    }
    if max == f32::NEG_INFINITY {
        out.fill(1.0 / x.len() as f32);
        return;
    }
    // blocked entries are exactly 0 (exp_nonpositive(-inf) = 0)
    let mut sums = [0f32; L];
    for ((os, xs), ms) in out
        .chunks_exact_mut(L)
        .zip(x.chunks_exact(L))
        .zip(mask.chunks_exact(L))
    {
        for l in 0..L {
            os[l] = crate::ops::cpu::exp_nonpositive(score(xs[l], ms[l]) - max);
            sums[l] += os[l];
        }
    }
    let mut sum: f32 = sums.iter().sum();
    let tail = x.len() - xt.len();
    for ((o, &xv), &mv) in out[tail..].iter_mut().zip(xt).zip(mt) {
        *o = crate::ops::cpu::exp_nonpositive(score(xv, mv) - max);
        sum += *o;
    }
    let inv = 1.0 / sum;
    out.iter_mut().for_each(|v| *v *= inv);
}

/// One row of `SoftmaxBackward`: dS = P ⊙ (dP − Σ dP ⊙ P), the dot in 16 lanes.
#[inline(always)]
pub fn softmax_backward_row(dp: &[f32], p: &[f32], out: &mut [f32]) {
    const L: usize = 16;
    let mut lanes = [0f32; L];
    let (dc, pc) = (dp.chunks_exact(L), p.chunks_exact(L));
    let (dt, pt) = (dc.remainder(), pc.remainder());
    for (ds, ps) in dc.zip(pc) {
        for l in 0..L {
            lanes[l] += ds[l] * ps[l];
        }
    }
    let dot: f32 = lanes.iter().sum::<f32>() + dt.iter().zip(pt).map(|(a, b)| a * b).sum::<f32>();
    for ((o, a), b) in out.iter_mut().zip(dp).zip(p) {
        *o = b * (a - dot);
    }
}
