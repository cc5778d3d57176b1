//! Flag groups several commands share: the device, the image preprocessing, and a method
//! with its flags.

use anyhow::Result;
use clap::Args;

use crate::data::image::{ImageProcessing, ImageProcessor};
use crate::methods::{Method, MethodConfig};
use crate::util::device::DeviceChoice;

/// `--device`, chosen once here and passed down.
#[derive(Args, Debug, Clone)]
pub struct DeviceArgs {
    /// Where tensors live: cpu, cuda or cuda:N (CUDA needs a binary built with the `cuda`
    /// feature)
    #[arg(long, default_value = "cpu")]
    pub device: DeviceChoice,
}

/// Image preprocessing flags.
#[derive(Args, Debug, Clone)]
pub struct ImageArgs {
    /// Image processor [default: clip for CLIP towers, dinov2 for DINOv2 towers]
    #[arg(long, value_enum)]
    pub image_processor: Option<ImageProcessor>,
    /// Resize the shortest side to N and center-crop N×N (default: the model's square input
    /// size when its compose.json names one, `input_hw`, else the processor's own)
    #[arg(long)]
    pub image_size: Option<usize>,
}

impl ImageArgs {
    pub fn processing(&self) -> ImageProcessing {
        ImageProcessing {
            processor: self.image_processor,
            size: self.image_size,
        }
    }

    /// The flags given override `base`'s fields.
    pub fn override_in(&self, base: &mut ImageProcessing) {
        if self.image_processor.is_some() {
            base.processor = self.image_processor;
        }
        if self.image_size.is_some() {
            base.size = self.image_size;
        }
    }
}

/// A method and its flags (`plan`, `train`).
#[derive(Args, Debug, Clone)]
pub struct MethodArgs {
    /// Finetuning method [default: ln; projector for `train --stage 1`]
    #[arg(long, value_enum)]
    pub method: Option<Method>,
    /// ln: leave the final `norm` frozen (trained by default, as PEFT does)
    #[arg(long)]
    pub no_final_norm: bool,
    /// Freeze the projector (trainable in every method but ln-simple and custom)
    #[arg(long)]
    pub freeze_projector: bool,
    /// Freeze embed_tokens
    #[arg(long)]
    pub freeze_embed: bool,
    /// Freeze lm_head (with tied embeddings: the shared tensor unless embed stays trainable)
    #[arg(long)]
    pub freeze_head: bool,
    /// LoRA rank [default: 8]
    #[arg(long)]
    pub lora_r: Option<usize>,
    /// LoRA alpha (scale = alpha / r) [default: 16]
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// LoRA dropout on the adapter input [default: 0]
    #[arg(long)]
    pub lora_dropout: Option<f64>,
    /// LoRA target linears, comma separated among q,k,v,o,gate,up,down [default: all seven]
    #[arg(long)]
    pub lora_targets: Option<String>,
    /// Also train parameters whose checkpoint name fully matches this regex
    #[arg(long)]
    pub include: Option<String>,
    /// Never train parameters whose checkpoint name fully matches this regex
    #[arg(long)]
    pub exclude: Option<String>,
}

impl MethodArgs {
    /// The method of the flags, with `default` when --method was not given.
    pub fn config_or(&self, default: Method) -> Result<MethodConfig> {
        self.apply(MethodConfig::new(self.method.unwrap_or(default)))
    }

    /// `base` with the flags given applied: --method starts over from that method's
    /// defaults, the other flags change single fields.
    pub fn apply(&self, base: MethodConfig) -> Result<MethodConfig> {
        let mut m = match self.method {
            Some(method) if method != base.method => MethodConfig::new(method),
            _ => base,
        };
        m.final_norm &= !self.no_final_norm;
        m.train_projector &= !self.freeze_projector;
        m.train_embed &= !self.freeze_embed;
        m.train_head &= !self.freeze_head;
        if let Some(r) = self.lora_r {
            m.lora.r = r;
        }
        if let Some(a) = self.lora_alpha {
            m.lora.alpha = a;
        }
        if let Some(d) = self.lora_dropout {
            m.lora.dropout = d;
        }
        if let Some(t) = &self.lora_targets {
            m.lora.targets = t.split(',').map(|t| t.trim().to_string()).collect();
        }
        if m.method == Method::Lora {
            m.lora.validate()?;
        }
        if self.include.is_some() {
            m.include = self.include.clone();
        }
        if self.exclude.is_some() {
            m.exclude = self.exclude.clone();
        }
        Ok(m)
    }
}
