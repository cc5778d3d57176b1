//! The server's one generation worker: it owns the model, takes the requests waiting in the
//! bounded queue (up to `max_batch` at a time), and decodes those that ask for the same
//! adapter as one batch on the key/value-cache generator (each row with its own length,
//! sampling and stops); different adapters are decoded one group after another, each group
//! with its adapter swapped into the shared base. Adapters load on first use and stay in a
//! cache of at most `adapter_cache` patches (least recently used goes first).
//!
//! Every request streams its events back on its own channel; a request whose channel is
//! closed (the client went away) or whose deadline passed stops at its next token.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc::Receiver;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::api::{ApiError, ChatRequest};
use crate::eval::chat::ChatSession;
use crate::eval::generate::{Finish, GenConfig, Prompt, generate_rows};
use crate::methods::swap::{Patch, adapter_patch, swap_in};

/// What a request hears back, in order: `Started`, `Token`s, then `Done`; or `Failed`.
#[derive(Debug)]
pub enum Event {
    Started {
        prompt_tokens: usize,
    },
    Token(String),
    /// `text`: the whole answer (stop strings cut off)
    Done {
        finish: Finish,
        completion_tokens: usize,
        text: String,
    },
    Failed(ApiError),
}

/// One request in the queue.
pub struct Job {
    /// `chatcmpl-N`, for the server's log
    pub id: String,
    pub received: Instant,
    /// `None`: the base model
    pub adapter: Option<String>,
    pub request: ChatRequest,
    pub events: UnboundedSender<Event>,
    pub deadline: Instant,
}

pub struct Engine {
    pub session: ChatSession,
    pub adapters: BTreeMap<String, PathBuf>,
    pub adapter_cache: usize,
    pub max_batch: usize,
    pub default_max_tokens: usize,
    /// most recently used first
    cache: Vec<(String, Patch)>,
}

impl Engine {
    pub fn new(
        session: ChatSession,
        adapters: BTreeMap<String, PathBuf>,
        adapter_cache: usize,
        max_batch: usize,
        default_max_tokens: usize,
    ) -> Self {
        Self {
            session,
            adapters,
            adapter_cache,
            max_batch,
            default_max_tokens,
            cache: Vec::new(),
        }
    }

    /// Serves until every sender of the queue is gone.
    pub fn run(mut self, queue: Receiver<Job>) {
        while let Ok(first) = queue.recv() {
            let mut jobs = vec![first];
            while jobs.len() < self.max_batch {
                match queue.try_recv() {
                    Ok(j) => jobs.push(j),
                    Err(_) => break,
                }
            }
            // one group per adapter, in order of arrival
            let mut groups: Vec<(Option<String>, Vec<Job>)> = Vec::new();
            for j in jobs {
                match groups.iter_mut().find(|(a, _)| *a == j.adapter) {
                    Some((_, g)) => g.push(j),
                    None => groups.push((j.adapter.clone(), vec![j])),
                }
            }
            for (adapter, group) in groups {
                self.run_group(adapter.as_deref(), group);
            }
        }
    }

    /// The patch of adapter `name`, loaded on first use.
    fn patch(&mut self, name: &str) -> Result<Patch, ApiError> {
        if let Some(i) = self.cache.iter().position(|(n, _)| n == name) {
            let hit = self.cache.remove(i);
            let p = hit.1.clone();
            self.cache.insert(0, hit);
            return Ok(p);
        }
        let dir = &self.adapters[name];
        let p = adapter_patch(&mut self.session.model, dir).map_err(|e| {
            ApiError::new(
                500,
                "server_error",
                format!(
                    "adapter `{name}` ({}) cannot be loaded: {e:#}",
                    dir.display()
                ),
            )
        })?;
        self.cache.insert(0, (name.to_string(), p.clone()));
        self.cache.truncate(self.adapter_cache);
        Ok(p)
    }

    fn run_group(&mut self, adapter: Option<&str>, jobs: Vec<Job>) {
        let undo = match adapter.map(|a| self.patch(a)).transpose() {
            Ok(p) => p.map(|p| swap_in(&mut self.session.model, &p)),
            Err(e) => {
                for j in jobs {
                    let _ = j.events.send(Event::Failed(e.clone()));
                }
                return;
            }
        };
        // a bug in decoding fails its requests (their channels close: 500), not the server,
        // and the base gets its own tensors back either way
        let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.decode(jobs)));
        if let Some(undo) = undo {
            swap_in(&mut self.session.model, &undo);
        }
        if decoded.is_err() {
            eprintln!("error: a batch's decoding panicked; its requests failed");
        }
    }

    /// A job's prompt and settings, or why it cannot run.
    fn prepare(&self, j: &Job) -> Result<(Prompt, GenConfig), ApiError> {
        let r = &j.request;
        let images = r
            .images
            .iter()
            .enumerate()
            .map(|(i, bytes)| {
                self.session
                    .image_features_of_bytes(bytes)
                    .map_err(|e| ApiError::invalid("messages", format!("image {}: {e:#}", i + 1)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let ids = self
            .session
            .prompt_ids(&r.turns)
            .map_err(|e| ApiError::invalid("messages", format!("{e:#}")))?;
        let context = self.session.model.llm.cfg.max_position_embeddings;
        if ids.len() >= context {
            return Err(ApiError::invalid(
                "messages",
                format!(
                    "this model's context is {context} tokens; the messages take {}",
                    ids.len()
                ),
            )
            .with_code("context_length_exceeded"));
        }
        let max_tokens = r
            .max_tokens
            .unwrap_or(self.default_max_tokens.min(context - ids.len()));
        if ids.len() + max_tokens > context {
            return Err(ApiError::invalid(
                "max_tokens",
                format!(
                    "this model's context is {context} tokens; the messages take {} and max_tokens asks for {} more",
                    ids.len(),
                    max_tokens
                ),
            )
            .with_code("context_length_exceeded"));
        }
        let mut cfg = self.session.generation.clone();
        cfg.max_new_tokens = max_tokens;
        cfg.temperature = r.temperature;
        cfg.top_p = r.top_p;
        cfg.top_k = 0;
        cfg.stop_strings.extend(r.stop.iter().cloned());
        let prompt = Prompt {
            ids,
            images,
            seed: r.seed,
        };
        Ok((prompt, cfg))
    }

    fn decode(&self, jobs: Vec<Job>) {
        let mut live = Vec::new();
        let mut prompts = Vec::new();
        let mut cfgs = Vec::new();
        for j in jobs {
            if j.events.is_closed() {
                continue;
            }
            if Instant::now() > j.deadline {
                let _ = j.events.send(Event::Failed(ApiError::new(
                    504,
                    "timeout",
                    "the request waited past its timeout",
                )));
                continue;
            }
            match self.prepare(&j) {
                Ok((p, c)) => {
                    let _ = j.events.send(Event::Started {
                        prompt_tokens: p.ids.len(),
                    });
                    prompts.push(p);
                    cfgs.push(c);
                    live.push(j);
                }
                Err(e) => {
                    let _ = j.events.send(Event::Failed(e));
                }
            }
        }
        if live.is_empty() {
            return;
        }
        let tools = self
            .session
            .model
            .tokenizer
            .as_ref()
            .expect("serve checks the tokenizer at start");
        let cfg_refs: Vec<&GenConfig> = cfgs.iter().collect();
        let out = generate_rows(
            &self.session.model,
            tools,
            &prompts,
            &cfg_refs,
            |r, piece| {
                if !piece.is_empty() {
                    let _ = live[r].events.send(Event::Token(piece.to_string()));
                }
            },
            |r| live[r].events.is_closed() || Instant::now() > live[r].deadline,
        );
        match out {
            Ok(gens) => {
                for ((j, g), p) in live.iter().zip(gens).zip(&prompts) {
                    // one line per request: what it asked, what it got, how long it took
                    eprintln!(
                        "{} model {} prompt {} completion {} finish {:?} {:.0} ms",
                        j.id,
                        j.request.model,
                        p.ids.len(),
                        g.ids.len(),
                        g.finish,
                        j.received.elapsed().as_secs_f64() * 1e3
                    );
                    let _ = j.events.send(Event::Done {
                        finish: g.finish,
                        completion_tokens: g.ids.len(),
                        text: g.text,
                    });
                }
            }
            Err(e) => {
                for j in &live {
                    let _ = j.events.send(Event::Failed(ApiError::new(
                        500,
                        "server_error",
                        format!("generation failed: {e:#}"),
                    )));
                }
            }
        }
    }
}
