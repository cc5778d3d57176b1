//! The multimodal model: vision tower (frozen) -> projector -> LLaMA-family decoder, with the
//! projected image features replacing the image tokens of `input_ids`. Loading from the
//! supported sources is in `load.rs`.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use candle_core::Tensor;

use super::batch::{Batch, shifted_targets};
use super::config::{FeatureSelect, SelectStrategy};
use super::llama::Llama;
use super::params::{KeyPrefixes, ParamSpec, llm_specs, projector_specs, vision_param_count};
use super::projector::Projector;
use super::vision::VisionTower;
use crate::io::tokenizer::ChatTokenizer;
use crate::ops::loss::cross_entropy_forward;

/// The vision side: tower, which states it exposes, projector, and the image token.
pub struct VisionSide {
    pub tower: VisionTower,
    pub select: FeatureSelect,
    pub projector: Projector,
    pub image_token_id: u32,
    /// the pixel (height, width) the model is used with, when its config names one
    /// (compose.json `input_hw`): the default image size of every command
    pub input_hw: Option<(usize, usize)>,
}

pub struct Mllm {
    pub vision: Option<VisionSide>,
    pub llm: Llama,
    pub keys: KeyPrefixes,
    /// where the model came from (for messages and adapter fingerprints)
    pub source: PathBuf,
    /// tokenizer and chat template when the source carries them (GGUF metadata,
    /// tokenizer.json)
    pub tokenizer: Option<ChatTokenizer>,
}

impl Mllm {
    /// Runs the vision tower and the projector: pixels (N, C, H, W) -> (N, P, Dl).
    pub fn image_features(&self, pixels: &Tensor) -> Result<Tensor> {
        let v = self
            .vision
            .as_ref()
            .context("this model has no vision tower, but the batch has pixel_values")?;
        let f = v.tower.features(pixels, &v.select)?;
        v.projector.forward(&f)
    }

    /// Input embeddings with the image features spliced in: (B, T, C) f32.
    /// The k-th image-token position in row-major (batch, position) order receives the k-th
    /// feature row (images in batch order, patches row-major), as transformers'
    /// `masked_scatter` does. `features` is (N, P, C) or None for text-only batches.
    pub fn embed_with_images(
        &self,
        input_ids: &[Vec<u32>],
        features: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, t) = (
            input_ids.len(),
            input_ids.first().map(|r| r.len()).unwrap_or(0),
        );
        let v = self.llm.cfg.vocab_size as u32;
        let image_id = self.vision.as_ref().map(|s| s.image_token_id);
        let mut flat = Vec::with_capacity(b * t);
        let mut gather = Vec::with_capacity(b * t);
        let mut n_img = 0u32;
        for (bi, row) in input_ids.iter().enumerate() {
            if row.len() != t {
                bail!(
                    "input_ids: row {bi} has {} tokens, row 0 has {t}",
                    row.len()
                );
            }
            for (pos, &id) in row.iter().enumerate() {
                if Some(id) == image_id {
                    gather.push((b * t) as u32 + n_img);
                    n_img += 1;
                    // the image token's own embedding row is replaced; look up a valid id
                    flat.push(if id < v { id } else { 0 });
                } else {
                    if id >= v {
                        bail!(
                            "input_ids: token id {id} at [{bi}, {pos}] is outside the vocabulary (size {v})"
                        );
                    }
                    gather.push((bi * t + pos) as u32);
                    flat.push(id);
                }
            }
        }
        let n_feat = match features {
            Some(f) => f.dims3()?.0 * f.dims3()?.1,
            None => 0,
        };
        if n_img as usize != n_feat {
            let per = features.map(|f| f.dim(1).unwrap_or(0)).unwrap_or(0);
            let n_images = features.map(|f| f.dim(0).unwrap_or(0)).unwrap_or(0);
            bail!(
                "input_ids hold {n_img} image tokens (id {}), but {n_images} images give {n_images} x {per} = {n_feat} features",
                image_id.map(|i| i.to_string()).unwrap_or("none".into())
            );
        }
        let dev = self.llm.embed_tokens.device();
        let ids = Tensor::from_vec(flat, b * t, dev)?;
        let text = self.llm.embed(&ids)?; // (B·T, C)
        let c = text.dim(1)?;
        let all = match features {
            Some(f) if n_feat > 0 => Tensor::cat(&[&text, &f.reshape((n_feat, c))?], 0)?,
            _ => text,
        };
        let gather = Tensor::from_vec(gather, b * t, dev)?;
        Ok(all.index_select(&gather, 0)?.reshape((b, t, c))?)
    }

    /// Full forward: batch -> logits (B, T, V) f32.
    pub fn forward(&self, batch: &Batch) -> Result<Tensor> {
        let x = self.input_embeds(batch)?;
        let h = self.hidden_from_embeds(&x, &batch.attention_mask)?;
        Ok(self.llm.logits(&h)?)
    }

    /// Vision tower + projector + splice: the decoder's input embeddings (B, T, C).
    pub fn input_embeds(&self, batch: &Batch) -> Result<Tensor> {
        let feats = match (&batch.vision_features, &batch.pixel_values) {
            (Some(f), _) => Some(
                self.vision
                    .as_ref()
                    .context("no vision tower")?
                    .projector
                    .forward(f)?,
            ),
            (None, Some(p)) => Some(self.image_features(p)?),
            (None, None) => None,
        };
        self.embed_with_images(&batch.input_ids, feats.as_ref())
    }

    /// Decoder blocks and final norm on input embeddings (B, T, C), positions 0..T-1 in
    /// every row (right padding), keys masked by `attention_mask`.
    pub fn hidden_from_embeds(&self, x: &Tensor, attention_mask: &[Vec<bool>]) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let positions: Vec<u32> = (0..b).flat_map(|_| 0..t as u32).collect();
        let inp = self.llm.prepare(attention_mask, &positions, t)?;
        Ok(self.llm.forward_hidden(x, &inp)?)
    }

    /// Token-mean cross-entropy of logits (B, T, V) against labels shifted by one.
    pub fn loss(logits: &Tensor, labels: &[Vec<i64>]) -> Result<Tensor> {
        let (b, t, v) = logits.dims3()?;
        let targets = shifted_targets(labels, t)?;
        let (loss, _) = cross_entropy_forward(&logits.reshape((b * t, v))?, &targets)?;
        Ok(loss)
    }

    /// Every decoder and projector parameter, named by checkpoint key (see `methods`).
    pub fn param_specs(&self) -> Vec<ParamSpec> {
        let mut specs = llm_specs(&self.llm.cfg, &self.keys);
        if let Some(v) = &self.vision {
            specs.extend(projector_specs(&v.projector.cfg, &self.keys));
        }
        specs
    }

    /// Parameters of the (always frozen) vision tower.
    pub fn vision_param_count(&self) -> usize {
        self.vision
            .as_ref()
            .map(|v| vision_param_count(&v.tower.config()))
            .unwrap_or(0)
    }

    /// The tensor with checkpoint key `name` (decoder, head, projector, LoRA adapters).
    pub fn param_mut(&mut self, name: &str) -> Option<&mut Tensor> {
        if !self.llm.cfg.tie_word_embeddings && name == self.keys.lm_head {
            return Some(&mut self.llm.lm_head);
        }
        if let Some(rest) = name.strip_prefix(&format!("{}.", self.keys.llm_body)) {
            return self.llm.body_param_mut(rest);
        }
        let v = self.vision.as_mut()?;
        let rest = name.strip_prefix(&format!("{}.", self.keys.projector))?;
        v.projector.param_mut(rest)
    }

    /// The decoder linear whose weight key is `<stem>.weight` (for LoRA adapters).
    pub fn linear_mut(&mut self, stem: &str) -> Option<&mut super::Linear> {
        let rest = stem.strip_prefix(&format!("{}.", self.keys.llm_body))?;
        self.llm.linear_mut(rest)
    }

    /// The tensor with checkpoint key `name`, read-only.
    pub fn param(&mut self, name: &str) -> Option<Tensor> {
        self.param_mut(name).map(|t| t.clone())
    }

    /// Features per image of `h`×`w` pixels, None for a text-only model.
    pub fn tokens_per_image(&self, h: usize, w: usize) -> Option<usize> {
        self.vision.as_ref().map(|v| v.tokens_per_image(h, w))
    }
}

impl VisionSide {
    /// Features per image of `h`×`w` pixels after the select strategy.
    pub fn tokens_per_image(&self, h: usize, w: usize) -> usize {
        if let Some((a, b)) = self.select.pool {
            return a * b;
        }
        let p = self.tower.num_patches(h, w);
        match self.select.strategy {
            SelectStrategy::Default => p,
            SelectStrategy::Full => p + 1,
        }
    }
}
