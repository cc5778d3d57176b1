//! `lntune check`: flags to a `CheckConfig` (see `jobs::check`).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::args::DeviceArgs;
use crate::jobs::check::{CheckConfig, check};
use crate::util::device::WeightDtype;

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Model: llava-hf directory, directory with compose.json, HF LLM directory or .gguf file
    #[arg(long)]
    pub model: PathBuf,
    /// Batch file: input_ids, attention_mask, labels, pixel_values (safetensors)
    #[arg(long)]
    pub batch: PathBuf,
    /// Reference outputs: logits, loss, debug.* (safetensors)
    #[arg(long)]
    pub expected: PathBuf,
    /// Matmul precision of the frozen weights
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: WeightDtype,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Tolerance on the max abs error of logits (and debug intermediates)
    #[arg(long, default_value_t = 1e-4)]
    pub atol_logits: f64,
    /// Tolerance on the abs error of the loss
    #[arg(long, default_value_t = 1e-5)]
    pub atol_loss: f64,
    /// Tolerance on gradients: max abs error relative to the reference tensor's max abs
    #[arg(long, default_value_t = 1e-4)]
    pub rtol_grad: f64,
    /// Tolerance on the parameters after one AdamW step (abs)
    #[arg(long, default_value_t = 1e-6)]
    pub atol_adamw: f64,
    /// AdamW step compared with `after_adamw.*`: learning rate
    #[arg(long, default_value_t = 1e-4)]
    pub adamw_lr: f64,
    /// AdamW step compared with `after_adamw.*`: weight decay (applied to every tensor)
    #[arg(long, default_value_t = 0.01)]
    pub adamw_weight_decay: f64,
    /// LoRA alpha for `lora.*` references (default: lora_adapter/adapter_config.json next to
    /// the expected file)
    #[arg(long)]
    pub lora_alpha: Option<f64>,
}

pub fn run(args: CheckArgs) -> Result<()> {
    let cfg = CheckConfig {
        model: args.model,
        batch: args.batch,
        expected: args.expected,
        dtype: args.dtype,
        atol_logits: args.atol_logits,
        atol_loss: args.atol_loss,
        rtol_grad: args.rtol_grad,
        atol_adamw: args.atol_adamw,
        adamw_lr: args.adamw_lr,
        adamw_weight_decay: args.adamw_weight_decay,
        lora_alpha: args.lora_alpha,
    };
    check(&cfg, &args.device.device.device()?)
}
