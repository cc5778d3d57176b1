//! Masked cross-entropy: token mean over targets that are not `IGNORE_INDEX`.

use candle_core::{D, Result, Tensor};

/// Label value that is not scored (PyTorch's `ignore_index` default, used by LLaVA/HF).
pub const IGNORE_INDEX: i64 = -100;

/// What the cross-entropy backward needs.
pub struct CrossEntropyCtx {
    pub probs: Tensor,   // (M, V) softmax of the scored rows
    pub rows: Tensor,    // (M) u32 row index into the (N, V) logits
    pub targets: Tensor, // (M) u32
    pub n_rows: usize,   // N
}

/// logits (N, V) f32, targets (N) with `IGNORE_INDEX` for unscored rows ->
/// (mean loss over the M scored rows as a scalar f32 tensor, ctx).
/// Errors when no row is scored: the mean would be 0/0.
pub fn cross_entropy_forward(
    logits: &Tensor,
    targets: &[i64],
) -> Result<(Tensor, CrossEntropyCtx)> {
    let _span = crate::util::profile::span(crate::util::profile::Kind::Loss);
    let (n, v) = logits.dims2()?;
    if targets.len() != n {
        candle_core::bail!(
            "cross-entropy: {} targets for {n} logit rows",
            targets.len()
        );
    }
    let mut rows = Vec::new();
    let mut tgt = Vec::new();
    for (i, &t) in targets.iter().enumerate() {
        if t == IGNORE_INDEX {
            continue;
        }
        if t < 0 || t as usize >= v {
            candle_core::bail!(
                "cross-entropy: target {t} at row {i} is outside the vocabulary 0..{v}"
            );
        }
        rows.push(i as u32);
        tgt.push(t as u32);
    }
    if rows.is_empty() {
        candle_core::bail!(
            "cross-entropy: no target differs from {IGNORE_INDEX}, the mean is undefined"
        );
    }
    let m = rows.len();
    let dev = logits.device();
    if let Some((loss, probs)) = fused_cpu(logits, &rows, &tgt)? {
        return Ok((
            loss,
            CrossEntropyCtx {
                probs,
                rows: Tensor::from_vec(rows, m, dev)?,
                targets: Tensor::from_vec(tgt, m, dev)?,
                n_rows: n,
            },
        ));
    }
    let rows = Tensor::from_vec(rows, m, dev)?;
    let targets = Tensor::from_vec(tgt, m, dev)?;
    let x = super::widen(logits.index_select(&rows, 0)?)?; // (M, V)
    let max = x.max_keepdim(D::Minus1)?;
    let shifted = x.broadcast_sub(&max)?;
    let e = shifted.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?; // (M, 1)
    let logp_target = (shifted.gather(&targets.unsqueeze(1)?, 1)? - sum.log()?)?; // (M, 1)
    let loss = (logp_target.sum_all()? * (-1.0 / m as f64))?;
    let probs = e.broadcast_div(&sum)?;
    Ok((
        loss,
        CrossEntropyCtx {
            probs,
            rows,
            targets,
            n_rows: n,
        },
    ))
}

/// The forward on the CPU for contiguous f32 logits: one pass per scored row (max, then
/// exp and sum in 16 lanes, then the probabilities), rows spread over the threads. Returns
/// the mean loss and the (M, V) probabilities; `None` for other tensors.
fn fused_cpu(logits: &Tensor, rows: &[u32], targets: &[u32]) -> Result<Option<(Tensor, Tensor)>> {
    use rayon::prelude::*;
    let v = logits.dim(1)?;
    let computed = super::cpu::with_f32_slices(&[logits], |x| {
        let x = x[0];
        let mut probs = vec![0f32; rows.len() * v];
        let nll: Vec<f64> = probs
            .par_chunks_mut(v)
            .zip(rows.par_iter().zip(targets))
            .map(|(p, (&r, &t))| {
                let row = &x[r as usize * v..(r as usize + 1) * v];
                super::cpu::vectorised!(softmax_nll_row(row, t as usize, p))
            })
            .collect();
        (probs, nll.iter().sum::<f64>() / rows.len() as f64)
    });
    let Some((probs, loss)) = computed else {
        return Ok(None);
    };
    let dev = logits.device();
    Ok(Some((
        Tensor::new(loss as f32, dev)?,
        Tensor::from_vec(probs, (rows.len(), v), dev)?,
    )))
}

/// softmax(row) into `p`; returns −log p[target] (in f64, from the shifted logit and the
/// log of the sum, as the composed form computes it).
#[inline(always)]
fn softmax_nll_row(row: &[f32], target: usize, p: &mut [f32]) -> f64 {
    const L: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; L];
    let chunks = row.chunks_exact(L);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..L {
            lanes[l] = if c[l] > lanes[l] { c[l] } else { lanes[l] };
        }
    }
    let max = lanes
        .iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    for (p, &x) in p.iter_mut().zip(row) {
        *p = super::cpu::exp_nonpositive(x - max);
    }
    let sum = super::cpu::lane_sum(p.len(), |i| p[i]);
    let inv = 1.0 / sum;
    p.iter_mut().for_each(|v| *v *= inv);
    -(((row[target] - max) - sum.ln()) as f64)
}

/// d loss / d logits for the scored rows: (softmax − onehot(target)) / M, (M, V). The rows
/// are `ctx.rows` of the forward's logits; unscored rows have zero gradient.
pub fn cross_entropy_backward(ctx: &CrossEntropyCtx) -> Result<Tensor> {
    let _span = crate::util::profile::span(crate::util::profile::Kind::Loss);
    let (m, v) = ctx.probs.dims2()?;
    let fused = super::cpu::with_f32_slices(&[&ctx.probs], |p| {
        use rayon::prelude::*;
        let targets = ctx.targets.to_vec1::<u32>().ok()?;
        let scale = 1.0 / m as f32;
        let mut d = vec![0f32; m * v];
        d.par_chunks_mut(v)
            .zip(p[0].par_chunks(v).zip(&targets))
            .for_each(|(d, (p, &t))| {
                for (d, &p) in d.iter_mut().zip(p) {
                    *d = p * scale;
                }
                d[t as usize] -= scale;
            });
        Some(d)
    });
    if let Some(Some(d)) = fused {
        return Tensor::from_vec(d, (m, v), ctx.probs.device());
    }
    let onehot = Tensor::zeros((m, v), ctx.probs.dtype(), ctx.probs.device())?.scatter_add(
        &ctx.targets.unsqueeze(1)?,
        &Tensor::ones((m, 1), ctx.probs.dtype(), ctx.probs.device())?,
        1,
    )?;
    (&ctx.probs - onehot)? / m as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::*;
    use candle_core::Device;

    #[test]
    fn backward_matches_finite_differences() {
        let logits = randn(&[5, 7], 1);
        let targets = [3, IGNORE_INDEX, 0, 6, IGNORE_INDEX];
        let (_, ctx) = cross_entropy_forward(&logits, &targets).unwrap();
        let d_rows = cross_entropy_backward(&ctx).unwrap(); // (3, 7)
        let d = Tensor::zeros((5, 7), candle_core::DType::F64, &Device::Cpu)
            .unwrap()
            .index_add(&ctx.rows, &d_rows, 0)
            .unwrap();
        let fd = fd_grad(&logits, |x| {
            cross_entropy_forward(x, &targets)?.0.to_scalar::<f64>()
        });
        assert_close("dlogits", &d, &fd, 1e-7);
    }

    #[test]
    fn fused_f32_loss_and_gradient_equal_the_composed_f64_ones() {
        // the fused f32 path against the composed path run in f64 on the same logits
        let logits = randn(&[6, 300], 3);
        let targets = [3, IGNORE_INDEX, 299, 0, IGNORE_INDEX, 150];
        let f32_logits = (logits * 8.0)
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap();
        let (l32, c32) = cross_entropy_forward(&f32_logits, &targets).unwrap();
        let d32 = cross_entropy_backward(&c32).unwrap();
        let (l64, c64) = cross_entropy_forward(
            &f32_logits.to_dtype(candle_core::DType::F64).unwrap(),
            &targets,
        )
        .unwrap();
        let d64 = cross_entropy_backward(&c64).unwrap();
        let gap = (l32.to_scalar::<f32>().unwrap() as f64 - l64.to_scalar::<f64>().unwrap()).abs();
        assert!(gap < 1e-5, "loss off by {gap}");
        assert_close(
            "dlogits",
            &d32.to_dtype(candle_core::DType::F64).unwrap(),
            &d64,
            1e-7,
        );
    }

    #[test]
    fn uniform_logits_give_log_v_and_ignored_rows_do_not_count() {
        // 3 rows over V = 4; row 1 ignored. Row 0 uniform: ln 4. Row 2: logits [0, 0, 0, ln 5]
        // target 3: -log(5/8) = ln 8 − ln 5. Mean over the 2 scored rows.
        let l5 = 5f32.ln();
        let logits = Tensor::new(
            &[[0f32, 0., 0., 0.], [9., 9., 9., 9.], [0., 0., 0., l5]],
            &Device::Cpu,
        )
        .unwrap();
        let (loss, ctx) = cross_entropy_forward(&logits, &[2, IGNORE_INDEX, 3]).unwrap();
        let want = (4f32.ln() + 8f32.ln() - l5) / 2.0;
        assert!((loss.to_scalar::<f32>().unwrap() - want).abs() < 1e-6);
        assert_eq!(ctx.rows.to_vec1::<u32>().unwrap(), vec![0, 2]);
        assert!(cross_entropy_forward(&logits, &[IGNORE_INDEX; 3]).is_err());
        assert!(cross_entropy_forward(&logits, &[7, 0, 0]).is_err());
    }
}
