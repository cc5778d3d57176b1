//! One forward + backward over a micro-batch, frozen-weight-aware.
//!
//! Forward: vision tower (no gradient, no context) -> projector -> embeddings with the
//! image features spliced in -> decoder blocks, keeping only each block's input -> final
//! norm and head on the scored positions only -> cross-entropy.
//! Backward, the forward in reverse: cross-entropy -> head -> final norm -> for each block
//! from the last down to the lowest one that matters: recompute the block from its saved
//! input (keeping its intermediates this time), propagate dY, emit gradients of its
//! trainable tensors -> embeddings (scatter-add) and projector.
//! A frozen linear costs one dX matmul; a frozen block below every trainable tensor is never
//! revisited. The block's own forward and backward are in `block`, the gradients in
//! `grads`.

use anyhow::{Result, bail};
use candle_core::{DType, Tensor};

use super::Recompute;
use super::block::{BlockCtx, block_backward, block_forward_ctx};
use super::grads::Grads;
use crate::methods::setup::{TrainFlags, TrainSetup};
use crate::model::batch::{Batch, shifted_targets};
use crate::model::llama::DecoderInputs;
use crate::model::mllm::Mllm;
use crate::ops::act::{act_backward, act_forward};
use crate::ops::embedding::embedding_backward;
use crate::ops::linear::{linear_backward, linear_forward};
use crate::ops::loss::{IGNORE_INDEX, cross_entropy_backward, cross_entropy_forward};
use crate::ops::norm::{rmsnorm_backward, rmsnorm_forward};

/// Loss of a micro-batch: Σ of per-token cross-entropy and the number of scored tokens.
#[derive(Debug, Clone, Copy)]
pub struct LossSum {
    pub sum: f64,
    pub tokens: usize,
}

/// Scored positions of a batch: rows (into B·T) whose shifted label is not ignored.
pub fn scored_rows(batch: &Batch) -> Result<(Vec<u32>, Vec<u32>)> {
    let labels = batch
        .labels
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("training batch has no labels"))?;
    let (_, t) = batch.dims();
    let targets = shifted_targets(labels, t)?;
    let mut rows = Vec::new();
    let mut tgt = Vec::new();
    for (i, &x) in targets.iter().enumerate() {
        if x != IGNORE_INDEX {
            rows.push(i as u32);
            tgt.push(x as u32);
        }
    }
    Ok((rows, tgt))
}

/// Scored tokens of a batch (for the token-mean denominator across micro-batches).
pub fn count_scored(batch: &Batch) -> Result<usize> {
    Ok(scored_rows(batch)?.0.len())
}

/// What the projector's backward needs: each linear's input and each pre-activation.
struct ProjectorCtx {
    inputs: Vec<Tensor>,
    pre: Vec<Tensor>,
}

/// Projector forward keeping its backward context.
fn projector_forward_train(
    p: &crate::model::projector::Projector,
    x: &Tensor,
) -> Result<(Tensor, ProjectorCtx)> {
    let x = p.normalize_input(x)?;
    let mut inputs = vec![x.clone()];
    let mut pre = Vec::new();
    let mut y = p.linears[0].forward(&x)?;
    for lin in &p.linears[1..] {
        pre.push(y.clone());
        let a = act_forward(&y, p.cfg.act)?;
        inputs.push(a.clone());
        y = lin.forward(&a)?;
    }
    Ok((y, ProjectorCtx { inputs, pre }))
}

/// Projector backward, mirroring `projector_forward_train`: gradients of every linear.
fn projector_backward(
    model: &Mllm,
    dy: &Tensor,
    ctx: &ProjectorCtx,
    grads: &mut Grads,
) -> Result<()> {
    let (inputs, pre) = (&ctx.inputs, &ctx.pre);
    let p = &model.vision.as_ref().expect("projector").projector;
    let mut dy = dy.clone();
    for k in (0..p.linears.len()).rev() {
        let lin = &p.linears[k];
        let g = linear_backward(
            &dy,
            &inputs[k],
            &lin.weight,
            k > 0,
            true,
            lin.bias.is_some(),
        )?;
        let name = format!("{}.linear_{}", model.keys.projector, k + 1);
        grads.add(format!("{name}.weight"), g.dw.expect("dw"))?;
        if let Some(db) = g.db {
            grads.add(format!("{name}.bias"), db)?;
        }
        if k > 0 {
            dy = act_backward(&g.dx.expect("dx"), &pre[k - 1], p.cfg.act)?;
        }
    }
    Ok(())
}

/// Vision tower (frozen: no context kept; or the batch's cached features) and projector:
/// the projected image features (N, P, C), and the projector's context when it trains.
fn image_features_forward(
    model: &Mllm,
    batch: &Batch,
    projector_trains: bool,
) -> Result<(Option<Tensor>, Option<ProjectorCtx>)> {
    let tower_out = match (&batch.vision_features, &batch.pixel_values, &model.vision) {
        (Some(f), _, _) => Some(f.clone()),
        (None, Some(px), Some(v)) => Some(v.tower.features(px, &v.select)?), // frozen: no context
        (None, Some(_), None) => {
            bail!("this model has no vision tower, but the batch has pixel_values")
        }
        _ => None,
    };
    Ok(match (tower_out, &model.vision) {
        (Some(feats), Some(v)) => {
            if projector_trains {
                let (y, ctx) = projector_forward_train(&v.projector, &feats)?;
                (Some(y), Some(ctx))
            } else {
                (Some(v.projector.forward(&feats)?), None)
            }
        }
        (Some(_), None) => {
            bail!("this model has no vision tower, but the batch has image features")
        }
        _ => (None, None),
    })
}

/// Every decoder block forward from the input embeddings `x0`; for the blocks the backward
/// visits, what the `recompute` policy keeps. Returns the last block's output.
fn blocks_forward(
    model: &Mllm,
    flags: &TrainFlags,
    x0: Tensor,
    inp: &DecoderInputs,
    seed: u64,
    recompute: Recompute,
) -> Result<(Tensor, Vec<Option<Saved>>)> {
    let first = flags.first_block_needed();
    let mut saved: Vec<Option<Saved>> = (0..model.llm.layers.len()).map(|_| None).collect();
    let mut x = x0;
    for (l, slot) in saved.iter_mut().enumerate() {
        let keep = first.is_some_and(|f| l >= f);
        let (y, x2, ctx) =
            block_forward_ctx(model, l, &flags.blocks[l], &x, None, inp, seed, true)?;
        if keep {
            *slot = Some(match recompute {
                Recompute::Full | Recompute::Auto => Saved::Inputs { x: x.clone(), x2 },
                Recompute::Selective => {
                    let mut ctx = ctx;
                    ctx.drop_attention_probs();
                    Saved::Ctx(Box::new(ctx))
                }
                Recompute::None => Saved::Ctx(Box::new(ctx)),
            });
        }
        x = y.expect("forward computes y");
    }
    Ok((x, saved))
}

/// The backward of the inputs: dX (B·T, C) of the embeddings scatter-added into the
/// embedding table's gradient (text positions, when it trains), and into the projector
/// (image positions, when it trains; `projector` is its context and output).
fn inputs_backward(
    model: &Mllm,
    batch: &Batch,
    embed_trains: bool,
    dx: &Tensor,
    projector: Option<(&ProjectorCtx, &Tensor)>,
    grads: &mut Grads,
) -> Result<()> {
    let llm = &model.llm;
    let dev = llm.embed_tokens.device().clone();
    let (b, t) = batch.dims();
    let dx0 = dx.reshape((b * t, llm.cfg.hidden_size))?;
    let image_id = model.vision.as_ref().map(|v| v.image_token_id);
    let (mut text_rows, mut text_ids, mut image_rows) = (Vec::new(), Vec::new(), Vec::new());
    for (i, &id) in batch.input_ids.iter().flatten().enumerate() {
        if Some(id) == image_id {
            image_rows.push(i as u32);
        } else {
            text_rows.push(i as u32);
            text_ids.push(id);
        }
    }
    if embed_trains && !text_rows.is_empty() {
        let n = text_rows.len();
        let d = dx0.index_select(&Tensor::from_vec(text_rows, n, &dev)?, 0)?;
        let ids = Tensor::from_vec(text_ids, n, &dev)?;
        let de = embedding_backward(&d, &ids, llm.cfg.vocab_size)?;
        grads.add(format!("{}.embed_tokens.weight", model.keys.llm_body), de)?;
    }
    if let Some((ctx, y)) = projector {
        let n = image_rows.len();
        let d = dx0
            .index_select(&Tensor::from_vec(image_rows, n, &dev)?, 0)?
            .reshape(y.shape())?;
        projector_backward(model, &d, ctx, grads)?;
    }
    Ok(())
}

/// What the forward keeps of a block for the backward.
enum Saved {
    /// block input and post-attention residual; the backward recomputes the rest
    Inputs { x: Tensor, x2: Tensor },
    /// the whole backward context
    Ctx(Box<BlockCtx>),
}

/// Forward and backward of one micro-batch. Gradients are those of Σ CE / `denom`, so that
/// micro-batches of one optimizer step add up to the token mean over all of them (pass the
/// total number of scored tokens of the step). `seed` drives LoRA dropout; the recompute in
/// backward replays the same masks. `recompute` trades memory for time (see `Recompute`;
/// `auto` decides per batch against `activation_budget` bytes).
pub fn forward_backward(
    model: &Mllm,
    setup: &TrainSetup,
    batch: &Batch,
    denom: f64,
    seed: u64,
    recompute: Recompute,
    activation_budget: usize,
) -> Result<(LossSum, Grads)> {
    let flags = &setup.flags;
    let llm = &model.llm;
    let (b, t) = batch.dims();
    let c = llm.cfg.hidden_size;
    let dev = llm.embed_tokens.device().clone();
    let mut grads = Grads::default();

    // --- forward ---------------------------------------------------------------------
    let (proj_out, proj_ctx) = image_features_forward(model, batch, flags.projector)?;
    let x0 = model.embed_with_images(&batch.input_ids, proj_out.as_ref())?;
    let positions: Vec<u32> = (0..b).flat_map(|_| 0..t as u32).collect();
    let inp = llm.prepare(&batch.attention_mask, &positions, t)?;
    let first = flags.first_block_needed();
    let n_layers = llm.layers.len();
    let recompute = recompute.resolve(&llm.cfg, flags, b, t, activation_budget);
    let (x, mut saved) = blocks_forward(model, flags, x0, &inp, seed, recompute)?;
    let (rows, targets) = scored_rows(batch)?;
    if rows.is_empty() {
        bail!("batch has no supervised token (all shifted labels are -100)");
    }
    let m = rows.len();
    let rows_t = Tensor::from_vec(rows, m, &dev)?;
    let xs = x.reshape((b * t, c))?.index_select(&rows_t, 0)?; // (M, C)
    drop(x);
    let (hn, norm_ctx) = rmsnorm_forward(&xs, &llm.norm.weight, llm.cfg.rms_norm_eps)?;
    let logits = linear_forward(&hn, &llm.lm_head, None)?; // (M, V)
    let targets_i64: Vec<i64> = targets.iter().map(|&x| x as i64).collect();
    let (loss, ce_ctx) = cross_entropy_forward(&logits, &targets_i64)?;
    drop(logits);
    let loss_mean = loss.to_scalar::<f32>()? as f64;
    let loss_sum = LossSum {
        sum: loss_mean * m as f64,
        tokens: m,
    };

    // --- backward: the forward in reverse ----------------------------------------------
    let dlogits = (cross_entropy_backward(&ce_ctx)? * (m as f64 / denom))?; // d(ΣCE/denom)
    drop(ce_ctx);
    let head_trainable = if llm.cfg.tie_word_embeddings {
        flags.embed
    } else {
        flags.head
    };
    let g = linear_backward(&dlogits, &hn, &llm.lm_head, true, head_trainable, false)?;
    if let Some(dw) = g.dw {
        let name = if llm.cfg.tie_word_embeddings {
            format!("{}.embed_tokens.weight", model.keys.llm_body)
        } else {
            model.keys.lm_head.clone()
        };
        grads.add(name, dw)?;
    }
    let (dxs, dnorm) = rmsnorm_backward(
        &g.dx.expect("dx"),
        &norm_ctx,
        &llm.norm.weight,
        flags.final_norm,
    )?;
    if let Some(dw) = dnorm {
        grads.add(format!("{}.norm.weight", model.keys.llm_body), dw)?;
    }
    let Some(first) = first else {
        return Ok((loss_sum, grads));
    };
    let mut dx = Tensor::zeros((b * t, c), DType::F32, &dev)?
        .index_add(&rows_t, &dxs, 0)?
        .reshape((b, t, c))?;
    for l in (first..n_layers).rev() {
        let ctx = match saved[l].take().expect("saved block state") {
            Saved::Ctx(ctx) => *ctx,
            Saved::Inputs { x, x2 } => {
                block_forward_ctx(model, l, &flags.blocks[l], &x, Some(&x2), &inp, seed, false)?.2
            }
        };
        let need_dx = flags.needs_dx_below(l);
        match block_backward(
            model,
            l,
            &flags.blocks[l],
            &dx,
            &ctx,
            &inp,
            need_dx,
            &mut grads,
        )? {
            Some(d) => dx = d,
            None => return Ok((loss_sum, grads)),
        }
    }

    // --- embeddings and projector ------------------------------------------------------
    inputs_backward(
        model,
        batch,
        flags.embed,
        &dx,
        proj_ctx.as_ref().zip(proj_out.as_ref()),
        &mut grads,
    )?;
    Ok((loss_sum, grads))
}
