//! `lntune eval`'s loop: ask a model every benchmark item under a protocol, append each
//! answer to a predictions file as it comes (a rerun skips answered items), then score.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::Device;
use serde::{Deserialize, Serialize};

use super::bench::{Item, Scores, score, submission_answer, write_atomically, write_official};
use super::generate::{GenConfig, Prompt, generate};
use super::harness::Asker;
use crate::train::run::{FeatureCache, progress_bar};

/// How questions are asked: the two harnesses the paper's numbers come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// LLaVA-1.5's: greedy; short questions end with "Answer the question using a single
    /// word or phrase."
    Llava,
    /// The paper authors': sampling (top-k 50, temperature 0.2), three text-only
    /// demonstrations before VQAv2 questions and caption requests
    Authors,
}

/// Text-only demonstrations of the authors' protocol: (user, assistant) turns before the
/// question. They show the answer format, not the image.
pub fn demonstrations(protocol: Protocol, caption: bool) -> Vec<(String, String)> {
    if protocol != Protocol::Authors {
        return vec![];
    }
    let pairs: [(&str, &str); 3] = if caption {
        [
            (
                CAPTION_PROMPT,
                "A man riding a bicycle down a busy city street.",
            ),
            (
                CAPTION_PROMPT,
                "A plate of rice and broccoli on a wooden table.",
            ),
            (
                CAPTION_PROMPT,
                "Two dogs playing with a red frisbee in a park.",
            ),
        ]
    } else {
        [
            ("What color is a ripe banana?", "Yellow"),
            ("How many legs does a spider have?", "8"),
            ("Is the sky blue on a clear day?", "Yes"),
        ]
    };
    pairs
        .iter()
        .map(|(q, a)| {
            let q = if caption {
                q.to_string()
            } else {
                format!("{q}\n{}", super::harness::SHORT_ANSWER)
            };
            (q, a.to_string())
        })
        .collect()
}

/// LLaVA-1.5's caption request.
pub const CAPTION_PROMPT: &str = "Provide a one-sentence caption for the provided image.";

/// Generation settings of a protocol.
pub fn protocol_generation(protocol: Protocol, max_new_tokens: usize, seed: u64) -> GenConfig {
    let mut g = GenConfig::greedy(max_new_tokens);
    if protocol == Protocol::Authors {
        g.temperature = 0.2;
        g.top_k = 50;
        g.seed = seed;
    }
    g
}

/// One line of a predictions file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PredictionLine {
    pub id: String,
    pub image: String,
    pub question: String,
    pub answer: String,
}

/// An append-only predictions file (JSONL). Opening it reads the answers so far; a last line
/// cut short by an interruption is dropped (the file is truncated to its last whole line).
pub struct Predictions {
    pub path: PathBuf,
    pub answers: HashMap<String, String>,
    file: std::fs::File,
}

impl Predictions {
    pub fn open(path: &Path) -> Result<Self> {
        let mut answers = HashMap::new();
        let mut keep = 0u64;
        if path.exists() {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("{}: cannot read", path.display()))?;
            let mut offset = 0usize;
            let lines: Vec<&str> = text.split_inclusive('\n').collect();
            for (i, line) in lines.iter().enumerate() {
                let whole = line.ends_with('\n');
                match serde_json::from_str::<PredictionLine>(line.trim_end()) {
                    Ok(p) if whole => {
                        answers.insert(p.id, p.answer);
                        offset += line.len();
                    }
                    _ if i + 1 == lines.len() => break, // an interrupted last write
                    Err(e) => bail!(
                        "{}: line {}: not a prediction ({e}); remove the line or the file",
                        path.display(),
                        i + 1
                    ),
                    Ok(_) => unreachable!("only the last line can lack its newline"),
                }
            }
            keep = offset as u64;
        } else if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("{}: cannot create", parent.display()))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(path)
            .with_context(|| format!("{}: cannot open for writing", path.display()))?;
        file.set_len(keep)?;
        let mut p = Self {
            path: path.to_path_buf(),
            answers,
            file,
        };
        use std::io::Seek;
        p.file.seek(std::io::SeekFrom::End(0))?;
        Ok(p)
    }

    pub fn append(&mut self, line: &PredictionLine) -> Result<()> {
        let mut s = serde_json::to_string(line)?;
        s.push('\n');
        self.file
            .write_all(s.as_bytes())
            .and_then(|_| self.file.flush())
            .with_context(|| format!("{}: cannot append", self.path.display()))?;
        self.answers.insert(line.id.clone(), line.answer.clone());
        Ok(())
    }
}

/// What an evaluation was run with; kept next to its predictions so that a rerun into the
/// same directory only resumes the same evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalSetup {
    pub bench: String,
    pub model: String,
    pub adapter: Option<String>,
    pub protocol: Protocol,
    pub template: String,
    pub seed: u64,
    pub limit: Option<usize>,
    pub max_new_tokens: usize,
}

/// Everything a run produced.
pub struct EvalOutcome {
    pub scores: Scores,
    pub answered_now: usize,
    pub predictions: PathBuf,
    pub official: Vec<PathBuf>,
}

/// Askers for the two kinds of item: short questions and captions.
pub struct Askers<'a> {
    pub short: Asker<'a>,
    pub caption: Asker<'a>,
    /// the user text of a caption request (ignored by the `plain` template)
    pub caption_prompt: String,
    /// appended to every short question (LLaVA's instruction), after a newline
    pub short_suffix: String,
    /// text-only demonstrations, given before VQAv2 questions and caption requests
    pub vqa_demos: Vec<(String, String)>,
    pub caption_demos: Vec<(String, String)>,
    /// sampling seed per item (from the run seed and the item id), so that answers do not
    /// depend on how items were batched or on where a run was resumed
    pub seed: u64,
}

fn item_seed(seed: u64, id: &str) -> u64 {
    // FNV-1a of the id, mixed with the run seed
    let mut h = 0xcbf29ce484222325u64 ^ seed.wrapping_mul(0x9e3779b97f4a7c15);
    for b in id.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// Answers every item not yet in `out/predictions.jsonl`, appending as it goes, then scores
/// all items and writes `scores.json` and the official result files under `out/results`.
pub fn run_eval(
    items: &[Item],
    askers: &Askers,
    setup: &EvalSetup,
    out: &Path,
    progress: bool,
) -> Result<EvalOutcome> {
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let setup_path = out.join("eval.json");
    if setup_path.exists() {
        let old: EvalSetup = crate::model::config::read_json(&setup_path)?;
        if &old != setup {
            bail!(
                "{}: this directory holds predictions of another evaluation ({}); use another --out or delete it",
                setup_path.display(),
                diff_fields(&old, setup)
            );
        }
    } else {
        write_atomically(&setup_path, serde_json::to_string_pretty(setup)?.as_bytes())?;
    }
    let mut preds = Predictions::open(&out.join("predictions.jsonl"))?;
    let todo: Vec<&Item> = items
        .iter()
        .filter(|it| !preds.answers.contains_key(&it.id))
        .collect();
    let bar = progress_bar(
        items.len() as u64,
        (items.len() - todo.len()) as u64,
        progress,
        &setup.bench,
    );
    let mut cache = FeatureCache::new(true);
    let dev = Device::Cpu;
    // short questions and captions are generated in separate batches (different settings)
    for caption in [false, true] {
        let group: Vec<&Item> = todo
            .iter()
            .copied()
            .filter(|it| it.truth.is_caption() == caption)
            .collect();
        let ask = if caption {
            &askers.caption
        } else {
            &askers.short
        };
        let tools = ask
            .model
            .text
            .as_ref()
            .context("the model has no tokenizer")?;
        for chunk in group.chunks(ask.batch.max(1)) {
            if cache.len() > 512 {
                cache.clear(); // features of a few hundred images at most stay in memory
            }
            let paths: Vec<PathBuf> = chunk.iter().map(|it| it.image.clone()).collect();
            let feats = cache.for_paths(ask.model, &paths, ask.preprocess, &dev, false)?;
            let prompts = chunk
                .iter()
                .zip(feats)
                .map(|(it, f)| {
                    let (text, demos) = if caption {
                        (askers.caption_prompt.clone(), &askers.caption_demos[..])
                    } else {
                        let demos = if matches!(it.truth, super::bench::Truth::Vqa { .. }) {
                            &askers.vqa_demos[..]
                        } else {
                            &[]
                        };
                        (format!("{}{}", it.question, askers.short_suffix), demos)
                    };
                    Ok(Prompt {
                        ids: ask.prompt_ids_with(demos, &text)?,
                        images: vec![f],
                        seed: Some(item_seed(askers.seed, &it.id)),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let answers = generate(ask.model, tools, &prompts, &ask.generation, |_, _| {})?;
            for (it, a) in chunk.iter().zip(answers) {
                preds.append(&PredictionLine {
                    id: it.id.clone(),
                    image: it.image.display().to_string(),
                    question: it.question.clone(),
                    answer: a.text.trim().to_string(),
                })?;
            }
            bar.inc(chunk.len() as u64);
        }
    }
    bar.finish_and_clear();
    let answers: Vec<String> = items
        .iter()
        .map(|it| submission_answer(it, &preds.answers[&it.id]))
        .collect();
    let scores = score(items, &answers);
    write_atomically(
        &out.join("scores.json"),
        serde_json::to_string_pretty(&scores)?.as_bytes(),
    )?;
    let official = write_official(&out.join("results"), items, &answers)?;
    Ok(EvalOutcome {
        scores,
        answered_now: todo.len(),
        predictions: preds.path.clone(),
        official,
    })
}

fn diff_fields(a: &EvalSetup, b: &EvalSetup) -> String {
    let (ja, jb) = (
        serde_json::to_value(a).unwrap_or_default(),
        serde_json::to_value(b).unwrap_or_default(),
    );
    let mut d = Vec::new();
    if let (Some(oa), Some(ob)) = (ja.as_object(), jb.as_object()) {
        for (k, v) in oa {
            if ob.get(k) != Some(v) {
                d.push(format!(
                    "`{k}` was {v}, now {}",
                    ob.get(k).cloned().unwrap_or_default()
                ));
            }
        }
    }
    d.join(", ")
}
