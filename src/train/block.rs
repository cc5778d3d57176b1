//! One decoder block's training forward and backward, frozen-weight-aware: each linear
//! keeps its input only when its weight or bias needs a gradient, LoRA's low-rank path
//! and dropout mask are replayed from a seeded RNG, and the backward emits gradients of
//! the block's trainable tensors only.

use anyhow::Result;
use candle_core::Tensor;

use super::grads::Grads;
use crate::methods::setup::{BlockFlags, LinFlags};
use crate::model::llama::DecoderInputs;
use crate::model::mllm::Mllm;
use crate::model::{Linear, merge_heads, split_heads};
use crate::ops::act::{silu_mul_backward, silu_mul_forward};
use crate::ops::attention::{AttentionCtx, attention_backward, attention_forward};
use crate::ops::linear::{linear_backward, linear_forward, lora_backward, lora_forward};
use crate::ops::norm::{RmsNormCtx, rmsnorm_backward, rmsnorm_forward};
use crate::ops::rope::{rope_backward, rope_forward};
use crate::util::rng::Rng;

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

impl BlockCtx {
    /// Selective recompute keeps everything but the attention probabilities (T² per head),
    /// which the backward recomputes from q and k.
    pub(crate) fn drop_attention_probs(&mut self) {
        self.attn.probs = None;
    }
}

/// Block `l` with its backward context: `y = x2 + down(silu(gate(xn2)) ⊙ up(xn2))`,
/// `x2 = x + o(attn(rope(q(xn1)), rope(k(xn1)), v(xn1)))`, `xn1 = rms(x)`, `xn2 = rms(x2)`.
///
/// As a forward (`x2_saved` None, `need_y`), it returns y and x2. As a recompute in backward
/// (`x2_saved` from the forward, `!need_y`), it skips what the backward does not need: o_proj
/// (x2 is known) and down_proj (its output is never used), unless they are trainable.
#[allow(clippy::too_many_arguments)]
pub(crate) fn block_forward_ctx(
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
pub(crate) fn block_backward(
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

#[cfg(test)]
mod tests {
    use candle_core::DType;

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
