//! LLaMA-family decoder (LLaMA, Vicuna, Mistral, Qwen2 layout), following transformers'
//! `modeling_llama.py`: pre-norm blocks `x += o(attn(rms(x)))`, `x += down(silu(gate(rms(x)))
//! ⊙ up(rms(x)))`, rotate-half RoPE, GQA, final norm, lm_head (tied or not).
//!
//! Checkpoint layout under the body prefix: `embed_tokens.weight`, `layers.{i}.…`,
//! `norm.weight`; `lm_head.weight` lives under a separate head prefix (llava-hf puts it next
//! to `model.`).

use anyhow::Result;
use candle_core::{DType, Tensor};

use super::config::LlmConfig;
use super::{Linear, RmsNorm, merge_heads, split_heads};
use crate::io::store::Weights;
use crate::ops::act::silu_mul_forward;
use crate::ops::attention::{attention_inference, causal_padding_mask};
use crate::ops::embedding::embedding_forward;
use crate::ops::linear::linear_forward;
use crate::ops::rope::{rope_cos_sin, rope_forward};

pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
}

pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

pub struct Block {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

pub struct Llama {
    pub cfg: LlmConfig,
    /// (V, C), matmul dtype; also the head when embeddings are tied
    pub embed_tokens: Tensor,
    pub layers: Vec<Block>,
    pub norm: RmsNorm,
    /// (V, C); the same tensor as `embed_tokens` when tied (no copy)
    pub lm_head: Tensor,
    pub inv_freq: Vec<f32>,
}

/// What every block of one forward shares: the mask and the RoPE angles.
pub struct DecoderInputs {
    pub mask: Tensor, // (B, 1, T, S) additive
    pub cos: Tensor,  // (B, 1, T, HD/2)
    pub sin: Tensor,  // (B, 1, T, HD/2)
}

impl Block {
    /// The tensor named `rest` inside this block (`self_attn.q_proj.weight`, ...).
    pub fn param_mut(&mut self, rest: &str) -> Option<&mut Tensor> {
        let (module, tail) = rest.split_once('.')?;
        match module {
            "input_layernorm" => self.input_layernorm.param_mut(tail),
            "post_attention_layernorm" => self.post_attention_layernorm.param_mut(tail),
            "self_attn" | "mlp" => {
                let (lin, tail) = tail.split_once('.')?;
                self.linear_mut(&format!("{module}.{lin}"))?.param_mut(tail)
            }
            _ => None,
        }
    }

    /// The linear at `self_attn.q_proj`, `mlp.down_proj`, ...
    pub fn linear_mut(&mut self, path: &str) -> Option<&mut Linear> {
        Some(match path {
            "self_attn.q_proj" => &mut self.self_attn.q_proj,
            "self_attn.k_proj" => &mut self.self_attn.k_proj,
            "self_attn.v_proj" => &mut self.self_attn.v_proj,
            "self_attn.o_proj" => &mut self.self_attn.o_proj,
            "mlp.gate_proj" => &mut self.mlp.gate_proj,
            "mlp.up_proj" => &mut self.mlp.up_proj,
            "mlp.down_proj" => &mut self.mlp.down_proj,
            _ => return None,
        })
    }

    fn load(w: &Weights, cfg: &LlmConfig) -> Result<Self> {
        let (c, hd) = (cfg.hidden_size, cfg.head_dim);
        let a = w.pp("self_attn");
        let m = w.pp("mlp");
        Ok(Self {
            input_layernorm: RmsNorm::load(w, "input_layernorm", c, cfg.rms_norm_eps)?,
            self_attn: Attention {
                q_proj: Linear::load(&a, "q_proj", cfg.num_heads * hd, c, cfg.qkv_bias)?,
                k_proj: Linear::load(&a, "k_proj", cfg.num_kv_heads * hd, c, cfg.qkv_bias)?,
                v_proj: Linear::load(&a, "v_proj", cfg.num_kv_heads * hd, c, cfg.qkv_bias)?,
                o_proj: Linear::load(&a, "o_proj", c, cfg.num_heads * hd, cfg.o_bias)?,
            },
            post_attention_layernorm: RmsNorm::load(
                w,
                "post_attention_layernorm",
                c,
                cfg.rms_norm_eps,
            )?,
            mlp: Mlp {
                gate_proj: Linear::load(&m, "gate_proj", cfg.intermediate_size, c, cfg.mlp_bias)?,
                up_proj: Linear::load(&m, "up_proj", cfg.intermediate_size, c, cfg.mlp_bias)?,
                down_proj: Linear::load(&m, "down_proj", c, cfg.intermediate_size, cfg.mlp_bias)?,
            },
        })
    }
}

impl Llama {
    /// `body` holds `embed_tokens`, `layers`, `norm`; `head` holds `lm_head.weight` unless
    /// the embeddings are tied. With untied config but no `lm_head.weight` in the checkpoint,
    /// the head is tied to the embeddings and a note says so.
    pub fn load(body: &Weights, head: &Weights, cfg: &LlmConfig) -> Result<Self> {
        let (v, c) = (cfg.vocab_size, cfg.hidden_size);
        let embed_tokens = body.get_mm("embed_tokens.weight", &[v, c])?;
        let layers = (0..cfg.num_layers)
            .map(|i| Block::load(&body.pp(format!("layers.{i}")), cfg))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(body, "norm", c, cfg.rms_norm_eps)?;
        let mut cfg = cfg.clone();
        let lm_head = if cfg.tie_word_embeddings {
            embed_tokens.clone()
        } else if head.contains("lm_head.weight") {
            head.get_mm("lm_head.weight", &[v, c])?
        } else {
            eprintln!(
                "note: {} has no `{}`; tying the output head to the input embeddings",
                body.store().describe(),
                head.key("lm_head.weight")
            );
            cfg.tie_word_embeddings = true;
            embed_tokens.clone()
        };
        let inv_freq = cfg.rope.inv_freq(cfg.head_dim);
        Ok(Self {
            cfg,
            embed_tokens,
            layers,
            norm,
            lm_head,
            inv_freq,
        })
    }

    /// Token ids (N) u32 -> embeddings (N, C) f32.
    pub fn embed(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        embedding_forward(ids, &self.embed_tokens)
    }

    /// The mask and RoPE angles for a batch. `key_valid[b][j]` is false for padded keys;
    /// `positions` (B·T) are the RoPE positions of the T queries (the last T keys).
    pub fn prepare(
        &self,
        key_valid: &[Vec<bool>],
        positions: &[u32],
        t: usize,
    ) -> Result<DecoderInputs> {
        let b = key_valid.len();
        let s = key_valid.first().map(|r| r.len()).unwrap_or(0);
        if let Some(w) = self.cfg.sliding_window
            && s > w
        {
            anyhow::bail!(
                "sequence of {s} tokens exceeds the model's sliding_window {w}, which is not supported"
            );
        }
        let dev = self.embed_tokens.device();
        let mask = causal_padding_mask(key_valid, t, dev)?;
        let (cos, sin) = rope_cos_sin(&self.inv_freq, positions, b, t, 1.0, dev)?;
        Ok(DecoderInputs { mask, cos, sin })
    }

    /// One decoder block: x (B, T, C) f32 -> (B, T, C) f32.
    pub fn block_forward(
        &self,
        layer: usize,
        x: &Tensor,
        inp: &DecoderInputs,
    ) -> candle_core::Result<Tensor> {
        Ok(self.block_forward_kv(layer, x, inp, None)?.0)
    }

    /// One decoder block with a key/value cache: the block's keys and values of earlier
    /// positions (`past`, (B, NKV, S0, HD), RoPE applied) are prepended to the new ones.
    /// Returns the output and the keys/values of all positions. The mask in `inp` covers
    /// S0 + T keys.
    pub fn block_forward_kv(
        &self,
        layer: usize,
        x: &Tensor,
        inp: &DecoderInputs,
        past: Option<&(Tensor, Tensor)>,
    ) -> candle_core::Result<(Tensor, (Tensor, Tensor))> {
        let blk = &self.layers[layer];
        let cfg = &self.cfg;
        let hd = cfg.head_dim;
        // attention branch
        let xn = blk.input_layernorm.forward(x)?;
        let q = split_heads(&blk.self_attn.q_proj.forward(&xn)?, cfg.num_heads, hd)?;
        let k = split_heads(&blk.self_attn.k_proj.forward(&xn)?, cfg.num_kv_heads, hd)?;
        let v = split_heads(&blk.self_attn.v_proj.forward(&xn)?, cfg.num_kv_heads, hd)?;
        let q = rope_forward(&q, &inp.cos, &inp.sin)?;
        let k = rope_forward(&k, &inp.cos, &inp.sin)?;
        let (k, v) = match past {
            Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
            None => (k, v),
        };
        let scale = 1.0 / (hd as f64).sqrt();
        let att = attention_inference(&q, &k, &v, Some(&inp.mask), scale, self.matmul_dtype())?;
        let x = (x + blk.self_attn.o_proj.forward(&merge_heads(&att)?)?)?;
        // MLP branch
        let xn = blk.post_attention_layernorm.forward(&x)?;
        let h = silu_mul_forward(
            &blk.mlp.gate_proj.forward(&xn)?,
            &blk.mlp.up_proj.forward(&xn)?,
        )?;
        Ok(((x + blk.mlp.down_proj.forward(&h)?)?, (k, v)))
    }

    /// All blocks and the final norm: embeddings (B, T, C) -> normed hidden (B, T, C).
    pub fn forward_hidden(&self, x: &Tensor, inp: &DecoderInputs) -> candle_core::Result<Tensor> {
        let mut x = x.clone();
        for l in 0..self.layers.len() {
            x = self.block_forward(l, &x, inp)?;
        }
        self.norm.forward(&x)
    }

    /// Every block's output (B, T, C), before the final norm.
    pub fn layer_outputs(
        &self,
        x: &Tensor,
        inp: &DecoderInputs,
    ) -> candle_core::Result<Vec<Tensor>> {
        let mut x = x.clone();
        let mut outs = Vec::with_capacity(self.layers.len());
        for l in 0..self.layers.len() {
            x = self.block_forward(l, &x, inp)?;
            outs.push(x.clone());
        }
        Ok(outs)
    }

    /// All blocks with a key/value cache (one entry per layer, filled on the first call).
    pub fn forward_hidden_cached(
        &self,
        x: &Tensor,
        inp: &DecoderInputs,
        cache: &mut Vec<(Tensor, Tensor)>,
    ) -> candle_core::Result<Tensor> {
        let mut x = x.clone();
        for l in 0..self.layers.len() {
            let (y, kv) = self.block_forward_kv(l, &x, inp, cache.get(l))?;
            if l < cache.len() {
                cache[l] = kv;
            } else {
                cache.push(kv);
            }
            x = y;
        }
        self.norm.forward(&x)
    }

    /// Normed hidden (.., C) -> logits (.., V) f32.
    pub fn logits(&self, h: &Tensor) -> candle_core::Result<Tensor> {
        linear_forward(h, &self.lm_head, None)
    }

    pub fn matmul_dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }
}

impl Llama {
    /// The tensor named `rest` relative to the body prefix (`layers.3.mlp.up_proj.weight`,
    /// `embed_tokens.weight`, `norm.weight`).
    pub fn body_param_mut(&mut self, rest: &str) -> Option<&mut Tensor> {
        match rest {
            "embed_tokens.weight" => return Some(&mut self.embed_tokens),
            "norm.weight" => return Some(&mut self.norm.weight),
            _ => {}
        }
        let rest = rest.strip_prefix("layers.")?;
        let (l, tail) = rest.split_once('.')?;
        self.layers
            .get_mut(l.parse::<usize>().ok()?)?
            .param_mut(tail)
    }

    /// The linear at `layers.{l}.self_attn.q_proj` etc. (relative to the body prefix).
    pub fn linear_mut(&mut self, rest: &str) -> Option<&mut Linear> {
        let rest = rest.strip_prefix("layers.")?;
        let (l, path) = rest.split_once('.')?;
        self.layers
            .get_mut(l.parse::<usize>().ok()?)?
            .linear_mut(path)
    }

    /// Folds every LoRA adapter into its base weight (W ← W + scale·B·A, in W's dtype) and
    /// drops it; returns how many were merged.
    pub fn merge_lora(&mut self) -> candle_core::Result<usize> {
        const LINEARS: [&str; 7] = [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ];
        let mut n = 0;
        for b in &mut self.layers {
            for path in LINEARS {
                let lin = b.linear_mut(path).expect("known linear");
                if let Some(l) = lin.lora.take() {
                    let delta = (l.b.matmul(&l.a)? * l.scale)?; // (OC, IC) f32
                    let w = (lin.weight.to_dtype(candle_core::DType::F32)? + delta)?;
                    lin.weight = w.to_dtype(lin.weight.dtype())?;
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// After the embeddings changed: a tied head is the same tensor again.
    pub fn sync_tied_head(&mut self) {
        if self.cfg.tie_word_embeddings {
            self.lm_head = self.embed_tokens.clone();
        }
    }
}
