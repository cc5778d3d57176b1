//! The method flags shared by `plan` and `train`.

use anyhow::Result;
use clap::Args;

use crate::methods::{LoraConfig, Method, MethodConfig};

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
    /// LoRA rank
    #[arg(long, default_value_t = 8)]
    pub lora_r: usize,
    /// LoRA alpha (scale = alpha / r)
    #[arg(long, default_value_t = 16.0)]
    pub lora_alpha: f64,
    /// LoRA dropout on the adapter input
    #[arg(long, default_value_t = 0.0)]
    pub lora_dropout: f64,
    /// LoRA target linears, comma separated among q,k,v,o,gate,up,down
    #[arg(long, default_value = "q,k,v,o,gate,up,down")]
    pub lora_targets: String,
    /// Also train parameters whose checkpoint name fully matches this regex
    #[arg(long)]
    pub include: Option<String>,
    /// Never train parameters whose checkpoint name fully matches this regex
    #[arg(long)]
    pub exclude: Option<String>,
}

impl MethodArgs {
    pub fn config(&self) -> Result<MethodConfig> {
        self.config_or(Method::Ln)
    }

    /// The method config, with `default` when --method was not given.
    pub fn config_or(&self, default: Method) -> Result<MethodConfig> {
        let method = self.method.unwrap_or(default);
        let mut m = MethodConfig::new(method);
        m.final_norm = !self.no_final_norm;
        m.train_projector &= !self.freeze_projector;
        m.train_embed &= !self.freeze_embed;
        m.train_head &= !self.freeze_head;
        m.lora = LoraConfig {
            r: self.lora_r,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            targets: self
                .lora_targets
                .split(',')
                .map(|t| t.trim().to_string())
                .collect(),
        };
        if method == Method::Lora {
            m.lora.validate()?;
        }
        m.include = self.include.clone();
        m.exclude = self.exclude.clone();
        Ok(m)
    }
}
