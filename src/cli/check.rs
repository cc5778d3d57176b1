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
    /// Storage dtype of the frozen weights; bf16 also runs every product in bf16 (mixed
    /// precision, as training does) and compares against the f32 references with the bf16
    /// tolerances below
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: WeightDtype,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Tolerance on the max abs error of logits (and debug intermediates) [default: 1e-4;
    /// bf16: 2e-2]
    #[arg(long)]
    pub atol_logits: Option<f64>,
    /// Tolerance on the abs error of the loss [default: 1e-5; bf16: 1e-3]
    #[arg(long)]
    pub atol_loss: Option<f64>,
    /// Tolerance on gradients: max abs error relative to the reference tensor's max abs
    /// [default: 1e-4; bf16: 5e-2]
    #[arg(long)]
    pub rtol_grad: Option<f64>,
    /// Tolerance on the parameters after one AdamW step (abs) [default: 1e-6; bf16:
    /// 2·lr + 1e-6 + 2^-8 · the tensor's max abs: a first AdamW step moves each parameter
    /// by about lr·sign(grad), bf16 may flip the sign of a near-zero gradient, and the f32
    /// masters start from the bf16-rounded checkpoint values]
    #[arg(long)]
    pub atol_adamw: Option<f64>,
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
    // bf16 tolerances: 3 to 4 times the largest errors measured on the tiny-llava fixtures
    // (logits 5.3e-3, gradients 1.8e-2 relative, loss 7e-6)
    let bf16 = args.dtype == WeightDtype::Bf16;
    let pick = |given: Option<f64>, f32_default: f64, bf16_default: f64| {
        given.unwrap_or(if bf16 { bf16_default } else { f32_default })
    };
    let cfg = CheckConfig {
        model: args.model,
        batch: args.batch,
        expected: args.expected,
        dtype: args.dtype,
        atol_logits: pick(args.atol_logits, 1e-4, 2e-2),
        atol_loss: pick(args.atol_loss, 1e-5, 1e-3),
        rtol_grad: pick(args.rtol_grad, 1e-4, 5e-2),
        atol_adamw: pick(args.atol_adamw, 1e-6, 2.0 * args.adamw_lr + 1e-6),
        rtol_adamw: match (bf16, args.atol_adamw) {
            (true, None) => 1.0 / 256.0,
            _ => 0.0,
        },
        adamw_lr: args.adamw_lr,
        adamw_weight_decay: args.adamw_weight_decay,
        lora_alpha: args.lora_alpha,
    };
    check(&cfg, &args.device.device.device()?)
}
