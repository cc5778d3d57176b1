//! `lntune serve`: an OpenAI-compatible chat server for one base model and any number of
//! adapters (`model` picks one per request), with streaming, a web chat page at `/`, and
//! the limits a public endpoint needs. `api` (the wire format), `engine` (the generation
//! worker: batching, adapter swapping), `http` (routes, auth, back-pressure).

mod api;
mod engine;
mod http;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use candle_core::Device;

use crate::eval::chat::{ChatConfig, ChatSession};
use crate::methods::adapter::{fingerprint, read_adapter_for};
use crate::methods::peft::is_peft_dir;
pub use api::Limits;

/// Everything `lntune serve` is given.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// the base model, with its decoding defaults (template, dtype, image preprocessing)
    pub chat: ChatConfig,
    /// the base's id in `model` fields
    pub name: String,
    /// (name, directory) of every adapter
    pub adapters: Vec<(String, PathBuf)>,
    pub host: String,
    pub port: u16,
    pub api_key: Option<String>,
    pub max_body_bytes: usize,
    /// requests waiting beyond the batch being decoded; more get 429
    pub queue: usize,
    /// requests decoded together
    pub max_batch: usize,
    pub adapter_cache: usize,
    pub timeout: Duration,
    pub limits: Limits,
}

/// Loads the base, checks every adapter's folder, and serves until interrupted.
pub fn run_serve(cfg: ServeConfig, device: &Device) -> Result<()> {
    for (flag, v) in [
        ("--queue", cfg.queue),
        ("--max-batch", cfg.max_batch),
        ("--adapter-cache", cfg.adapter_cache),
        ("--max-body-bytes", cfg.max_body_bytes),
        ("--max-images", cfg.limits.max_images),
        ("--max-tokens", cfg.limits.default_max_tokens),
    ] {
        if v == 0 {
            bail!("{flag} must be positive");
        }
    }
    if cfg.timeout.is_zero() {
        bail!("--timeout must be positive");
    }
    let mut adapters = BTreeMap::new();
    for (name, dir) in &cfg.adapters {
        if name.is_empty() || *name == cfg.name {
            bail!(
                "--adapter {name}={}: the name must be non-empty and not the base's (`{}`)",
                dir.display(),
                cfg.name
            );
        }
        if !is_peft_dir(dir) && !dir.join("adapter.safetensors").is_file() {
            bail!(
                "--adapter {name}={}: not an adapter folder (no adapter.safetensors or PEFT adapter_config.json)",
                dir.display()
            );
        }
        if adapters.insert(name.clone(), dir.clone()).is_some() {
            bail!("--adapter: the name `{name}` is given twice");
        }
    }
    let mut session = ChatSession::load(&cfg.chat, device)?;
    // every lntune adapter made for this base (PEFT folders are checked at first use)
    let base = fingerprint(&mut session.model)?;
    for (name, dir) in &adapters {
        if !is_peft_dir(dir) {
            read_adapter_for(dir, &base)
                .with_context(|| format!("--adapter {name}={}", dir.display()))?;
        }
    }
    let (queue, jobs) = std::sync::mpsc::sync_channel(cfg.queue);
    let engine = engine::Engine::new(
        session,
        adapters.clone(),
        cfg.adapter_cache,
        cfg.max_batch,
        cfg.limits.default_max_tokens,
    );
    let worker = std::thread::Builder::new()
        .name("generation".into())
        .spawn(move || engine.run(jobs))
        .context("cannot start the generation thread")?;
    let state = Arc::new(http::AppState {
        queue,
        models: std::iter::once(cfg.name.clone())
            .chain(adapters.into_keys())
            .collect(),
        api_key: cfg.api_key.clone(),
        limits: cfg.limits.clone(),
        timeout: cfg.timeout,
        next_id: AtomicU64::new(1),
    });
    let app = http::router(state, cfg.max_body_bytes);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the HTTP runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind((cfg.host.as_str(), cfg.port))
            .await
            .with_context(|| format!("--host {} --port {}: cannot listen", cfg.host, cfg.port))?;
        let addr: SocketAddr = listener.local_addr()?;
        // the line scripts and tests wait for
        println!(
            "lntune serve: listening on http://{addr} (models: {})",
            std::iter::once(cfg.name.as_str())
                .chain(cfg.adapters.iter().map(|a| a.0.as_str()))
                .collect::<Vec<_>>()
                .join(", ")
        );
        use std::io::Write;
        std::io::stdout().flush().ok();
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                tokio::signal::ctrl_c().await.ok();
            })
            .await
            .context("the HTTP server failed")
    })?;
    drop(runtime);
    // the state's queue sender is gone with the router: the worker ends after its batch
    worker.join().ok();
    Ok(())
}
