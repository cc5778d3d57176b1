//! `lntune serve`: an OpenAI-compatible chat server (see `jobs::serve`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use super::args::{DeviceArgs, ImageArgs};
use crate::data::template::TemplateName;
use crate::eval::chat::ChatConfig;
use crate::jobs::serve::{Limits, ServeConfig, run_serve};
use crate::util::device::WeightDtype;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Model: llava-hf directory, directory with compose.json, HF LLM directory or .gguf file
    #[arg(long)]
    pub model: PathBuf,
    /// The base's name in requests' `model` field [default: the model path's file name]
    #[arg(long)]
    pub name: Option<String>,
    /// An adapter served as model NAME (repeatable); loaded on first use
    #[arg(long = "adapter", value_name = "NAME=DIR")]
    pub adapters: Vec<String>,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// 0: any free port (the chosen one is printed)
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on /v1 routes [default: $LNTUNE_API_KEY if set]
    #[arg(long)]
    pub api_key: Option<String>,
    /// Conversation template [default: the model's chat template if it has one, else vicuna_v1]
    #[arg(long, value_enum)]
    pub template: Option<TemplateName>,
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: WeightDtype,
    /// Largest request body (images are base64 inside it)
    #[arg(long, default_value_t = 20 << 20)]
    pub max_body_bytes: usize,
    /// Images in one request
    #[arg(long, default_value_t = 4)]
    pub max_images: usize,
    /// max_tokens of a request that gives none
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Requests waiting to be decoded; more are answered 429
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// Requests decoded together in one batch
    #[arg(long, default_value_t = 16)]
    pub max_batch: usize,
    /// Adapters kept loaded (least recently used is dropped)
    #[arg(long, default_value_t = 4)]
    pub adapter_cache: usize,
    /// Seconds a request may take, queueing included
    #[arg(long, default_value_t = 300.0)]
    pub timeout: f64,
    #[command(flatten)]
    pub image: ImageArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
}

pub fn run(a: ServeArgs) -> Result<()> {
    let adapters = a
        .adapters
        .iter()
        .map(|s| {
            s.split_once('=')
                .map(|(n, d)| (n.trim().to_string(), PathBuf::from(d.trim())))
                .with_context(|| format!("--adapter `{s}`: expected NAME=DIR"))
        })
        .collect::<Result<Vec<_>>>()?;
    if !(a.timeout.is_finite() && a.timeout > 0.0 && a.timeout < 1e7) {
        anyhow::bail!(
            "--timeout must be a positive number of seconds, got {}",
            a.timeout
        );
    }
    let name = a.name.clone().unwrap_or_else(|| {
        a.model
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "base".into())
    });
    let cfg = ServeConfig {
        chat: ChatConfig {
            model: a.model.clone(),
            adapter: None,
            template: a.template,
            max_new_tokens: a.max_tokens,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            stop: vec![],
            dtype: a.dtype,
            image: a.image.processing(),
        },
        name,
        adapters,
        host: a.host,
        port: a.port,
        api_key: a
            .api_key
            .or_else(|| std::env::var("LNTUNE_API_KEY").ok())
            .filter(|k| !k.is_empty()),
        max_body_bytes: a.max_body_bytes,
        queue: a.queue,
        max_batch: a.max_batch,
        adapter_cache: a.adapter_cache,
        timeout: Duration::from_secs_f64(a.timeout),
        limits: Limits {
            max_images: a.max_images,
            default_max_tokens: a.max_tokens,
        },
    };
    run_serve(cfg, &a.device.device.device()?)
}
