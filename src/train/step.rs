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
//! revisited.

use std::collections::HashMap;

use anyhow::{Result, bail};
use candle_core::{DType, Tensor};

use super::Recompute;
use crate::methods::setup::{BlockFlags, LinFlags, TrainFlags, TrainSetup};
use crate::model::batch::{Batch, shifted_targets};
use crate::model::llama::DecoderInputs;
use crate::model::mllm::Mllm;
use crate::model::{Linear, merge_heads, split_heads};
use crate::ops::act::{act_backward, act_forward, silu_mul_backward, silu_mul_forward};
use crate::ops::attention::{AttentionCtx, attention_backward, attention_forward};
use crate::ops::embedding::embedding_backward;
use crate::ops::linear::{linear_backward, linear_forward, lora_backward, lora_forward};
use crate::ops::loss::{IGNORE_INDEX, cross_entropy_backward, cross_entropy_forward};
use crate::ops::norm::{RmsNormCtx, rmsnorm_backward, rmsnorm_forward};
use crate::ops::rope::{rope_backward, rope_forward};
use crate::util::rng::Rng;

/// Gradients by checkpoint key; `add` accumulates (micro-batches, tied embeddings).
#[derive(Default)]
pub struct Grads(pub HashMap<String, Tensor>);

/// Σ x² of a tensor in f64. On the CPU, f32 values are summed in fixed chunks (each in
/// order, then the chunk sums in order), so the result does not depend on the thread count
/// and no f64 copy of the tensor is made.
fn sum_of_squares(g: &Tensor) -> Result<f64> {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    if crate::ops::cpu::fused_on(g) && g.dtype() == DType::F32 {
        let g = g.contiguous()?;
        let (storage, layout) = g.storage_and_layout();
        if let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        {
            let partial: Vec<f64> = v[a..b]
                .par_chunks(CHUNK)
                .map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
                .collect();
            return Ok(partial.iter().sum());
        }
    }
    Ok(g.to_dtype(DType::F64)?
        .sqr()?
        .sum_all()?
        .to_scalar::<f64>()?)
}

impl Grads {
    pub fn add(&mut self, name: String, g: Tensor) -> Result<()> {
        match self.0.remove(&name) {
            Some(prev) => {
                self.0.insert(name, (prev + g)?);
            }
            None => {
                self.0.insert(name, g);
            }
        }
        Ok(())
    }

    pub fn merge(&mut self, other: Grads) -> Result<()> {
        for (k, v) in other.0 {
            self.add(k, v)?;
        }
        Ok(())
    }

    /// The tensors `names` (missing ones as zeros is not allowed: every name must have a
    /// gradient) flattened into one f32 vector, times `scale`.
    pub fn flatten(&self, names: &[String], scale: f64) -> Result<Vec<f32>> {
        let mut v = Vec::new();
        for n in names {
            let g = self
                .0
                .get(n)
                .ok_or_else(|| anyhow::anyhow!("no gradient for `{n}`"))?;
            v.extend(
                g.flatten_all()?
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()?
                    .into_iter()
                    .map(|x| x * scale as f32),
            );
        }
        Ok(v)
    }

    /// sqrt(Σ ‖g‖²), accumulated in f64.
    pub fn global_norm(&self) -> Result<f64> {
        // summed in name order: HashMap order varies between processes
        let mut names: Vec<&String> = self.0.keys().collect();
        names.sort();
        let mut s = 0f64;
        for g in names.into_iter().map(|n| &self.0[n]) {
            s += sum_of_squares(g)?;
        }
        Ok(s.sqrt())
    }

    pub fn scale(&mut self, f: f64) -> Result<()> {
        for g in self.0.values_mut() {
            *g = (&*g * f)?;
        }
        Ok(())
    }
}

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

/// One linear's forward state for its backward.
struct LinCtx {
    /// the input, kept only when the weight or bias needs a gradient
    input: Option<Tensor>,
    /// LoRA: input of the low-rank path (after dropout) and x·Aᵀ
    lora: Option<(Tensor, Tensor)>,
    /// LoRA dropout mask, already divided by (1 − p)
    mask: Option<Tensor>,
}

/// The RNG of one linear's LoRA dropout: a function of (step seed, layer, linear), so the
/// recompute in backward draws the same mask as the forward.
fn lin_rng(seed: u64, layer: usize, k: u64) -> Rng {
    Rng::new(seed ^ ((layer as u64) << 32) ^ k.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

fn lin_fwd(lin: &Linear, f: LinFlags, x: &Tensor, mut rng: Rng) -> Result<(Tensor, LinCtx)> {
    let input = (f.weight || f.bias).then(|| x.clone());
    let Some(l) = &lin.lora else {
        let y = linear_forward(x, &lin.weight, lin.bias.as_ref())?;
        return Ok((
            y,
            LinCtx {
                input,
                lora: None,
                mask: None,
            },
        ));
    };
    let mask = if l.dropout > 0.0 {
        let keep = 1.0 - l.dropout;
        let m: Vec<f32> = (0..x.elem_count())
            .map(|_| {
                if rng.uniform() < keep {
                    (1.0 / keep) as f32
                } else {
                    0.0
                }
            })
            .collect();
        Some(Tensor::from_vec(m, x.shape(), x.device())?)
    } else {
        None
    };
    let x_in = match &mask {
        Some(m) => (x * m)?,
        None => x.clone(),
    };
    let (y, xa) = lora_forward(
        x,
        &x_in,
        &lin.weight,
        lin.bias.as_ref(),
        &l.a,
        &l.b,
        l.scale,
    )?;
    Ok((
        y,
        LinCtx {
            input,
            lora: Some((x_in, xa)),
            mask,
        },
    ))
}

/// The state of a linear whose output is not needed (recompute): only its input, when
/// trainable. With a LoRA adapter the low-rank path must run anyway.
fn lin_ctx_only(lin: &Linear, f: LinFlags, x: &Tensor, rng: Rng) -> Result<LinCtx> {
    if lin.lora.is_some() {
        return Ok(lin_fwd(lin, f, x, rng)?.1);
    }
    Ok(LinCtx {
        input: (f.weight || f.bias).then(|| x.clone()),
        lora: None,
        mask: None,
    })
}

/// One linear's backward: grads of its trainable tensors under `name.*`, dX if asked.
fn lin_bwd(
    lin: &Linear,
    f: LinFlags,
    name: &str,
    dy: &Tensor,
    ctx: &LinCtx,
    need_dx: bool,
    grads: &mut Grads,
) -> Result<Option<Tensor>> {
    let plain_dx = need_dx && ctx.lora.is_none();
    let mut dx = None;
    if plain_dx || f.weight || f.bias {
        let x = ctx.input.as_ref().unwrap_or(dy); // dy stands in when only dX is needed
        let g = linear_backward(dy, x, &lin.weight, plain_dx, f.weight, f.bias)?;
        if let Some(dw) = g.dw {
            grads.add(format!("{name}.weight"), dw)?;
        }
        if let Some(db) = g.db {
            grads.add(format!("{name}.bias"), db)?;
        }
        dx = g.dx;
    }
    let (Some((x_in, xa)), Some(l)) = (&ctx.lora, &lin.lora) else {
        return Ok(dx);
    };
    if !f.lora && !need_dx {
        return Ok(None);
    }
    let lg = lora_backward(dy, x_in, xa, &lin.weight, &l.a, &l.b, l.scale, need_dx)?;
    if f.lora {
        grads.add(format!("{name}.lora_A.weight"), lg.da)?;
        grads.add(format!("{name}.lora_B.weight"), lg.db)?;
    }
    match (lg.dx_base, lg.dx_lora) {
        (Some(base), Some(lora)) => {
            let lora = lora.reshape(base.shape())?;
            let lora = match &ctx.mask {
                Some(m) => (lora * m)?,
                None => lora,
            };
            Ok(Some((base + lora)?))
        }
        _ => Ok(None),
    }
}

/// What one block's backward needs. Linear inputs are kept only for trainable weights.
pub(crate) struct BlockCtx {
    rms1: RmsNormCtx, // holds the block input x
    q: LinCtx,
    k: LinCtx,
    v: LinCtx,
    attn: AttentionCtx,
    o: LinCtx,
    rms2: RmsNormCtx, // holds the post-attention residual x2
    gate: Tensor,     // pre-activations of the SiLU gate
    up: Tensor,
    gate_l: LinCtx,
    up_l: LinCtx,
    down: LinCtx,
}

/// Block `l` with its backward context: `y = x2 + down(silu(gate(xn2)) ⊙ up(xn2))`,
/// `x2 = x + o(attn(rope(q(xn1)), rope(k(xn1)), v(xn1)))`, `xn1 = rms(x)`, `xn2 = rms(x2)`.
///
/// As a forward (`x2_saved` None, `need_y`), it returns y and x2. As a recompute in backward
/// (`x2_saved` from the forward, `!need_y`), it skips what the backward does not need: o_proj
/// (x2 is known) and down_proj (its output is never used), unless they are trainable.
#[allow(clippy::too_many_arguments)]
fn block_forward_ctx(
    model: &Mllm,
    l: usize,
    f: &BlockFlags,
    x: &Tensor,
    x2_saved: Option<&Tensor>,
    inp: &DecoderInputs,
    seed: u64,
    need_y: bool,
) -> Result<(Option<Tensor>, Tensor, BlockCtx)> {
    let llm = &model.llm;
    let blk = &llm.layers[l];
    let cfg = &llm.cfg;
    let hd = cfg.head_dim;
    let a = &blk.self_attn;
    let (xn1, rms1) = rmsnorm_forward(x, &blk.input_layernorm.weight, cfg.rms_norm_eps)?;
    let (q, q_c) = lin_fwd(&a.q_proj, f.q, &xn1, lin_rng(seed, l, 0))?;
    let (k, k_c) = lin_fwd(&a.k_proj, f.k, &xn1, lin_rng(seed, l, 1))?;
    let (v, v_c) = lin_fwd(&a.v_proj, f.v, &xn1, lin_rng(seed, l, 2))?;
    let q = rope_forward(&split_heads(&q, cfg.num_heads, hd)?, &inp.cos, &inp.sin)?;
    let k = rope_forward(&split_heads(&k, cfg.num_kv_heads, hd)?, &inp.cos, &inp.sin)?;
    let v = split_heads(&v, cfg.num_kv_heads, hd)?;
    let scale = 1.0 / (hd as f64).sqrt();
    let (att, attn) = attention_forward(&q, &k, &v, Some(&inp.mask), scale, llm.matmul_dtype())?;
    let att = merge_heads(&att)?;
    let (x2, o_c) = match x2_saved {
        Some(x2) => (
            x2.clone(),
            lin_ctx_only(&a.o_proj, f.o, &att, lin_rng(seed, l, 3))?,
        ),
        None => {
            let (o, o_c) = lin_fwd(&a.o_proj, f.o, &att, lin_rng(seed, l, 3))?;
            ((x + o)?, o_c)
        }
    };
    let m = &blk.mlp;
    let (xn2, rms2) = rmsnorm_forward(&x2, &blk.post_attention_layernorm.weight, cfg.rms_norm_eps)?;
    let (gate, gate_l) = lin_fwd(&m.gate_proj, f.gate, &xn2, lin_rng(seed, l, 4))?;
    let (up, up_l) = lin_fwd(&m.up_proj, f.up, &xn2, lin_rng(seed, l, 5))?;
    let (y, down) = if need_y {
        let h = silu_mul_forward(&gate, &up)?;
        let (d, down) = lin_fwd(&m.down_proj, f.down, &h, lin_rng(seed, l, 6))?;
        (Some((&x2 + d)?), down)
    } else if f.down.any() || m.down_proj.lora.is_some() {
        let h = silu_mul_forward(&gate, &up)?;
        (
            None,
            lin_ctx_only(&m.down_proj, f.down, &h, lin_rng(seed, l, 6))?,
        )
    } else {
        (
            None,
            LinCtx {
                input: None,
                lora: None,
                mask: None,
            },
        )
    };
    let ctx = BlockCtx {
        rms1,
        q: q_c,
        k: k_c,
        v: v_c,
        attn,
        o: o_c,
        rms2,
        gate,
        up,
        gate_l,
        up_l,
        down,
    };
    Ok((y, x2, ctx))
}

/// Backward of block `l`, mirroring `block_forward_ctx` line by line in reverse.
/// Returns dX of the block input when `need_dx`.
#[allow(clippy::too_many_arguments)]
fn block_backward(
    model: &Mllm,
    l: usize,
    f: &BlockFlags,
    dy: &Tensor,
    ctx: &BlockCtx,
    inp: &DecoderInputs,
    need_dx: bool,
    grads: &mut Grads,
) -> Result<Option<Tensor>> {
    let llm = &model.llm;
    let blk = &llm.layers[l];
    let cfg = &llm.cfg;
    let body = &model.keys.llm_body;
    let key = |m: &str| format!("{body}.layers.{l}.{m}");
    let (a, m) = (&blk.self_attn, &blk.mlp);
    // MLP branch: y = x2 + down(silu(gate(xn2)) ⊙ up(xn2)), xn2 = rms(x2)
    let dh = lin_bwd(
        &m.down_proj,
        f.down,
        &key("mlp.down_proj"),
        dy,
        &ctx.down,
        true,
        grads,
    )?
    .expect("dX requested");
    let (dgate, dup) = silu_mul_backward(&dh, &ctx.gate, &ctx.up)?;
    let dxn2_g = lin_bwd(
        &m.gate_proj,
        f.gate,
        &key("mlp.gate_proj"),
        &dgate,
        &ctx.gate_l,
        true,
        grads,
    )?
    .expect("dX requested");
    let dxn2_u = lin_bwd(
        &m.up_proj,
        f.up,
        &key("mlp.up_proj"),
        &dup,
        &ctx.up_l,
        true,
        grads,
    )?
    .expect("dX requested");
    let (dx2_mlp, dw_post) = rmsnorm_backward(
        &(dxn2_g + dxn2_u)?,
        &ctx.rms2,
        &blk.post_attention_layernorm.weight,
        f.post_norm,
    )?;
    if let Some(dw) = dw_post {
        grads.add(key("post_attention_layernorm.weight"), dw)?;
    }
    let dx2 = (dy + dx2_mlp)?;
    // attention branch: x2 = x + o(attn(rope(q(xn1)), rope(k(xn1)), v(xn1))), xn1 = rms(x)
    let datt = lin_bwd(
        &a.o_proj,
        f.o,
        &key("self_attn.o_proj"),
        &dx2,
        &ctx.o,
        true,
        grads,
    )?
    .expect("dX requested");
    let hd = cfg.head_dim;
    let datt = split_heads(&datt, cfg.num_heads, hd)?;
    let scale = 1.0 / (hd as f64).sqrt();
    let (dq, dk, dv) =
        attention_backward(&datt, &ctx.attn, Some(&inp.mask), scale, llm.matmul_dtype())?;
    let dq = merge_heads(&rope_backward(&dq, &inp.cos, &inp.sin)?)?;
    let dk = merge_heads(&rope_backward(&dk, &inp.cos, &inp.sin)?)?;
    let dv = merge_heads(&dv)?;
    // dX of xn1 is needed for the input norm's weight or for the block input
    let need_dxn1 = need_dx || f.input_norm;
    let dq_x = lin_bwd(
        &a.q_proj,
        f.q,
        &key("self_attn.q_proj"),
        &dq,
        &ctx.q,
        need_dxn1,
        grads,
    )?;
    let dk_x = lin_bwd(
        &a.k_proj,
        f.k,
        &key("self_attn.k_proj"),
        &dk,
        &ctx.k,
        need_dxn1,
        grads,
    )?;
    let dv_x = lin_bwd(
        &a.v_proj,
        f.v,
        &key("self_attn.v_proj"),
        &dv,
        &ctx.v,
        need_dxn1,
        grads,
    )?;
    if !need_dxn1 {
        return Ok(None);
    }
    let dxn1 = ((dq_x.expect("dX") + dk_x.expect("dX"))? + dv_x.expect("dX"))?;
    let (dx_attn, dw_in) =
        rmsnorm_backward(&dxn1, &ctx.rms1, &blk.input_layernorm.weight, f.input_norm)?;
    if let Some(dw) = dw_in {
        grads.add(key("input_layernorm.weight"), dw)?;
    }
    if need_dx {
        Ok(Some((dx2 + dx_attn)?))
    } else {
        Ok(None)
    }
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
                    ctx.attn.probs = None; // T² per head: recomputed from q, k in backward
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::setup::setup;
    use crate::methods::{Method, MethodConfig};
    use crate::model::presets::preset;

    /// The training block (`block_forward_ctx`) and the inference block
    /// (`Llama::block_forward`) are two implementations of one decoder block: on the same
    /// random hidden states, with padding and with LoRA adapters (dropout off, as inference
    /// has none), every block's output must agree, not only the final loss.
    #[test]
    fn training_and_inference_blocks_agree_layer_by_layer() {
        let dev = candle_core::Device::Cpu;
        let spec = preset("tiny").unwrap();
        for (method, dtype) in [
            (Method::Ln, DType::F32),
            (Method::Lora, DType::F32),
            (Method::Full, DType::BF16),
        ] {
            let mut model = Mllm::random_llava(&spec, dtype, &dev, 7).unwrap();
            let mut m = MethodConfig::new(method);
            m.lora.dropout = 0.0;
            let st = setup(&mut model, &m, 3).unwrap();
            // LoRA's B starts at zero: give the adapters values so that they count
            if method == Method::Lora {
                let mut rng = Rng::new(11);
                for s in st.trainable_specs().filter(|s| s.name.contains("lora_B")) {
                    let t = model.param_mut(&s.name).unwrap();
                    *t = rng.normal_tensor(t.dims(), 0.05, DType::F32, &dev).unwrap();
                }
            }
            let (b, t, c) = (2, 9, spec.text.hidden_size);
            // row 1 has two padded positions at the end
            let mask: Vec<Vec<bool>> = vec![vec![true; t], (0..t).map(|i| i < t - 2).collect()];
            let positions: Vec<u32> = (0..b).flat_map(|_| 0..t as u32).collect();
            let inp = model.llm.prepare(&mask, &positions, t).unwrap();
            let x0 = Rng::new(5)
                .normal_tensor(&[b, t, c], 1.0, DType::F32, &dev)
                .unwrap();
            let (mut x_inf, mut x_train) = (x0.clone(), x0);
            for l in 0..model.llm.layers.len() {
                x_inf = model.llm.block_forward(l, &x_inf, &inp).unwrap();
                let (y, _, _) = block_forward_ctx(
                    &model,
                    l,
                    &st.flags.blocks[l],
                    &x_train,
                    None,
                    &inp,
                    0,
                    true,
                )
                .unwrap();
                x_train = y.unwrap();
                let max_abs = |t: &Tensor| {
                    t.abs()
                        .and_then(|a| a.flatten_all()?.max(0)?.to_scalar::<f32>())
                        .unwrap()
                };
                let diff = max_abs(&(&x_inf - &x_train).unwrap());
                let scale = max_abs(&x_inf);
                assert!(
                    diff <= 1e-5 * scale.max(1.0),
                    "{method:?} {dtype:?} layer {l}: max |inference - training| = {diff} (scale {scale})"
                );
            }
        }
    }
}
