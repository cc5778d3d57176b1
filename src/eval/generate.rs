//! Text generation for the multimodal model with a key/value cache: batches of prompts
//! (image features spliced in), left padding, greedy or sampled decoding (temperature,
//! top-k, top-p, seed), EOS ids and stop strings, a token callback for streaming.
//!
//! Positions follow transformers' `generate` with left padding: position = number of real
//! tokens before it in the row (pads get position 1, and are masked as keys).

use anyhow::{Result, bail};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::io::tokenizer::ChatTokenizer;
use crate::model::mllm::Mllm;
use crate::util::rng::Rng;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenConfig {
    pub max_new_tokens: usize,
    /// 0 = greedy
    pub temperature: f64,
    /// 0 = off
    pub top_k: usize,
    /// 1.0 = off
    pub top_p: f64,
    pub seed: u64,
    /// generation ends at any of these token ids
    pub eos_ids: Vec<u32>,
    /// ... or once the text contains any of these (the stop string is cut off)
    pub stop_strings: Vec<String>,
}

impl GenConfig {
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            max_new_tokens,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            eos_ids: vec![],
            stop_strings: vec![],
        }
    }
}

/// One prompt: token ids with the model's image tokens already expanded, and the tower
/// features (P, Dv) of its images in order.
pub struct Prompt {
    pub ids: Vec<u32>,
    pub images: Vec<Tensor>,
    /// this row's sampling seed (default: from `GenConfig::seed` and the row index)
    pub seed: Option<u64>,
}

/// A finished generation.
#[derive(Debug, Clone)]
pub struct Generated {
    pub ids: Vec<u32>,
    pub text: String,
    pub finish: Finish,
}

/// Why a row's generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// an EOS id or a stop string
    Stop,
    /// its token limit or the end of the model's context
    Length,
    /// `cancelled` said so
    Cancelled,
}

/// Picks the next token from a logits row.
fn pick(logits: &[f32], cfg: &GenConfig, rng: &mut Rng) -> u32 {
    if cfg.temperature <= 0.0 {
        let mut best = 0;
        for (i, &v) in logits.iter().enumerate() {
            if v > logits[best] {
                best = i;
            }
        }
        return best as u32;
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if cfg.top_k > 0 {
        idx.truncate(cfg.top_k);
    }
    let max = logits[idx[0]] as f64;
    let mut p: Vec<f64> = idx
        .iter()
        .map(|&i| ((logits[i] as f64 - max) / cfg.temperature).exp())
        .collect();
    let sum: f64 = p.iter().sum();
    p.iter_mut().for_each(|x| *x /= sum);
    if cfg.top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = p.len();
        for (k, x) in p.iter().enumerate() {
            acc += x;
            if acc >= cfg.top_p {
                keep = k + 1;
                break;
            }
        }
        p.truncate(keep);
        let s: f64 = p.iter().sum();
        p.iter_mut().for_each(|x| *x /= s);
    }
    let u = rng.uniform();
    let mut acc = 0.0;
    for (k, x) in p.iter().enumerate() {
        acc += x;
        if u < acc {
            return idx[k] as u32;
        }
    }
    idx[p.len() - 1] as u32
}

/// Generates a continuation for every prompt. `on_token(row, piece)` receives the text of
/// each new token as it is produced (for streaming).
pub fn generate(
    model: &Mllm,
    tools: &ChatTokenizer,
    prompts: &[Prompt],
    cfg: &GenConfig,
    on_token: impl FnMut(usize, &str),
) -> Result<Vec<Generated>> {
    let cfgs = vec![cfg; prompts.len()];
    generate_rows(model, tools, prompts, &cfgs, on_token, |_| false)
}

/// `generate` with each row's own settings (`cfgs[row]`: length, sampling, stops; EOS ids
/// too) and a cancellation check: a row for which `cancelled(row)` is true stops before its
/// next token (a server's client that went away, a deadline).
pub fn generate_rows(
    model: &Mllm,
    tools: &ChatTokenizer,
    prompts: &[Prompt],
    cfgs: &[&GenConfig],
    mut on_token: impl FnMut(usize, &str),
    mut cancelled: impl FnMut(usize) -> bool,
) -> Result<Vec<Generated>> {
    let b = prompts.len();
    if b == 0 {
        return Ok(vec![]);
    }
    if cfgs.len() != b {
        bail!("{} generation settings for {b} prompts", cfgs.len());
    }
    let llm = &model.llm;
    let dev = llm.embed_tokens.device().clone();
    let t = prompts.iter().map(|p| p.ids.len()).max().unwrap_or(0);
    if t == 0 {
        bail!("empty prompt");
    }
    // the context policy: a prompt must fit the model's context, and generation stops at
    // its end (as if an EOS came there)
    let context = llm.cfg.max_position_embeddings;
    if t >= context {
        bail!(
            "a prompt of {t} tokens leaves no room in the model's context of {context} tokens (max_position_embeddings)"
        );
    }
    // every row's own length, within the context (the rows share the padded length `t`)
    let max_new: Vec<usize> = cfgs
        .iter()
        .map(|c| c.max_new_tokens.min(context - t))
        .collect();
    let max_new_tokens = max_new.iter().copied().max().unwrap_or(0);
    let pad = tools.eos_id.unwrap_or(0);
    // left padding
    let mut ids = Vec::with_capacity(b);
    let mut valid = Vec::with_capacity(b);
    let mut positions = Vec::with_capacity(b * t);
    for p in prompts {
        let n_pad = t - p.ids.len();
        let mut row = vec![pad; n_pad];
        row.extend_from_slice(&p.ids);
        ids.push(row);
        let mut v = vec![false; n_pad];
        v.extend(std::iter::repeat_n(true, p.ids.len()));
        let mut pos = 0u32;
        for &ok in &v {
            positions.push(if ok { pos } else { 1 });
            if ok {
                pos += 1;
            }
        }
        valid.push(v);
    }
    let images: Vec<Tensor> = prompts
        .iter()
        .flat_map(|p| p.images.iter().cloned())
        .collect();
    let feats = if images.is_empty() {
        None
    } else {
        let v = model.vision.as_ref().ok_or_else(|| {
            anyhow::anyhow!("prompts have images but the model has no vision tower")
        })?;
        Some(v.projector.forward(&Tensor::stack(&images, 0)?)?)
    };
    let x = model.embed_with_images(&ids, feats.as_ref())?;
    let inp = llm.prepare(&valid, &positions, t)?;
    let mut cache = Vec::new();
    let h = llm.forward_hidden_cached(&x, &inp, &mut cache)?;
    let mut last = h.narrow(1, t - 1, 1)?; // (B, 1, C)
    let mut next_pos: Vec<u32> = prompts.iter().map(|p| p.ids.len() as u32).collect();
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); b];
    let mut text: Vec<String> = vec![String::new(); b];
    // bytes of each row's text handed to `on_token` so far
    let mut sent = vec![0usize; b];
    let mut done: Vec<bool> = max_new.iter().map(|&n| n == 0).collect();
    let mut finish = vec![Finish::Length; b];
    let mut rngs: Vec<Rng> = prompts
        .iter()
        .zip(cfgs)
        .enumerate()
        .map(|(i, (p, c))| Rng::new(p.seed.unwrap_or(c.seed ^ ((i as u64) << 16))))
        .collect();
    for _ in 0..max_new_tokens {
        for (r, d) in done.iter_mut().enumerate() {
            if !*d && cancelled(r) {
                *d = true;
                finish[r] = Finish::Cancelled;
            }
        }
        if done.iter().all(|&d| d) {
            break;
        }
        let logits = llm.logits(&last)?.squeeze(1)?; // (B, V)
        let rows = logits.to_vec2::<f32>()?;
        let mut step_ids = Vec::with_capacity(b);
        for (r, row) in rows.iter().enumerate() {
            if done[r] {
                step_ids.push(pad);
                continue;
            }
            let cfg = cfgs[r];
            let id = pick(row, cfg, &mut rngs[r]);
            step_ids.push(id);
            if cfg.eos_ids.contains(&id) {
                done[r] = true;
                finish[r] = Finish::Stop;
                continue;
            }
            out[r].push(id);
            text[r] = tools.decode(&out[r])?;
            if let Some(k) = cfg
                .stop_strings
                .iter()
                .filter_map(|s| text[r].find(s.as_str()))
                .min()
            {
                text[r].truncate(k);
                done[r] = true;
                finish[r] = Finish::Stop;
            } else {
                // a character whose bytes span several tokens decodes as U+FFFD until its
                // last token: hold the text back until then, so that the pieces add up
                // to the final text
                if !text[r].ends_with('\u{FFFD}')
                    && let Some(piece) = text[r].get(sent[r]..)
                {
                    on_token(r, piece);
                    sent[r] = text[r].len();
                }
                if out[r].len() >= max_new[r] {
                    done[r] = true;
                }
            }
        }
        if done.iter().all(|&d| d) {
            break;
        }
        // one more position: keys of finished rows stay valid (their outputs are ignored)
        for v in valid.iter_mut() {
            v.push(true);
        }
        let pos: Vec<u32> = next_pos.clone();
        next_pos.iter_mut().for_each(|p| *p += 1);
        let step = Tensor::from_vec(step_ids, b, &dev)?;
        let x = llm.embed(&step)?.unsqueeze(1)?; // (B, 1, C)
        let inp = llm.prepare(&valid, &pos, 1)?;
        let h = llm.forward_hidden_cached(&x, &inp, &mut cache)?;
        last = h;
    }
    // what was held back (an unfinished character at the end, the text before a stop string
    // in the token that completed it)
    for (r, t) in text.iter().enumerate() {
        if let Some(rest) = t.get(sent[r]..).filter(|p| !p.is_empty()) {
            on_token(r, rest);
        }
    }
    Ok(out
        .into_iter()
        .zip(text)
        .zip(finish)
        .map(|((ids, text), finish)| Generated { ids, text, finish })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_rules() {
        let logits = [0.0f32, 5.0, 4.9, -3.0];
        let mut rng = Rng::new(1);
        assert_eq!(pick(&logits, &GenConfig::greedy(1), &mut rng), 1);
        // top-k 1 is greedy whatever the temperature
        let mut c = GenConfig::greedy(1);
        c.temperature = 10.0;
        c.top_k = 1;
        for _ in 0..20 {
            assert_eq!(pick(&logits, &c, &mut rng), 1);
        }
        // top-k 2 only ever picks ids 1 and 2, both often
        c.top_k = 2;
        let picks: Vec<u32> = (0..200).map(|_| pick(&logits, &c, &mut rng)).collect();
        assert!(picks.iter().all(|&p| p == 1 || p == 2));
        assert!(picks.contains(&1) && picks.contains(&2));
        // top-p small keeps only the best
        c.top_k = 0;
        c.top_p = 0.1;
        assert!((0..50).all(|_| pick(&logits, &c, &mut rng) == 1));
    }
}
