//! `lntune eval`'s loop: ask a model every benchmark item under a protocol, append each
//! answer to a predictions file as it comes (a rerun skips answered items), then score and
//! write the official result files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::Device;
use serde::{Deserialize, Serialize};

use super::answer::Answerer;
use super::benchmarks::item::{Item, Truth};
use super::benchmarks::scores::{Scores, score, submission_answer, write_official};
use super::benchmarks::{BenchFiles, BenchName, ItemLimit, PARTS, load_items};
use super::generate::{Prompt, generate};
use super::predictions::{PredictionLine, Predictions};
use super::protocol::{CAPTION_PROMPT, Protocol, demonstrations, protocol_generation};
use crate::data::features::FeatureCache;
use crate::data::image::ImageProcessing;
use crate::data::shapes::read_level;
use crate::data::template::{SHORT_ANSWER, Template, TemplateName};
use crate::methods::adapter::{apply_adapter, fingerprint};
use crate::model::mllm::Mllm;
use crate::util::checks;
use crate::util::device::WeightDtype;
use crate::util::files::{FolderLock, read_json, sha256_file, write_json};
use crate::util::progress::progress_bar;

/// Everything that defines an evaluation (`lntune eval --config FILE` reads one; flags
/// override its fields).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// llava-hf directory, directory with compose.json, or .gguf file
    pub model: PathBuf,
    /// adapter directory (applied without merging)
    #[serde(default)]
    pub adapter: Option<PathBuf>,
    pub bench: BenchFiles,
    #[serde(default = "default_protocol")]
    pub protocol: Protocol,
    /// at most this many questions (images for captions), a random subset chosen with `seed`
    #[serde(default)]
    pub limit: Option<usize>,
    /// a part's own limit (parts: vqa, pope per file, mme, captions), instead of `limit`
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub part_limits: BTreeMap<String, usize>,
    /// seed of the subset and of sampling
    #[serde(default)]
    pub seed: u64,
    /// questions per generation batch
    #[serde(default = "default_eval_batch")]
    pub batch: usize,
    /// new tokens at most for short answers
    #[serde(default = "default_short_tokens")]
    pub max_new_tokens: usize,
    /// new tokens at most for captions
    #[serde(default = "default_caption_tokens")]
    pub caption_tokens: usize,
    /// the model's chat template if it has one, else vicuna_v1, when not given
    #[serde(default)]
    pub template: Option<TemplateName>,
    /// keep the tower's image features on disk here too, shared with other evaluations and
    /// trainings of the same base model (see `data::features`)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feature_dir: Option<PathBuf>,
    /// the user text that asks for a caption (LLaVA's; shapes: "Give a short caption for
    /// the image.")
    #[serde(default)]
    pub caption_prompt: Option<String>,
    #[serde(default)]
    pub dtype: WeightDtype,
    #[serde(default)]
    pub image: ImageProcessing,
}

fn default_protocol() -> Protocol {
    Protocol::Llava
}

fn default_eval_batch() -> usize {
    8
}

fn default_short_tokens() -> usize {
    16
}

fn default_caption_tokens() -> usize {
    64
}

impl EvalConfig {
    /// How many items of each part are asked.
    pub fn item_limit(&self) -> ItemLimit {
        ItemLimit {
            all: self.limit,
            parts: self.part_limits.clone(),
        }
    }

    /// Reads an evaluation config file (JSON).
    pub fn read(path: &Path) -> Result<Self> {
        read_json(path)
    }

    /// Every number in its range (each error names the flag).
    pub fn validate(&self) -> Result<()> {
        checks::positive("--batch", self.batch)?;
        checks::positive("--max-new-tokens", self.max_new_tokens)?;
        checks::positive("--caption-tokens", self.caption_tokens)?;
        checks::positive_if_set("--limit", self.limit)?;
        for (part, &n) in &self.part_limits {
            if !PARTS.contains(&part.as_str()) || n == 0 {
                bail!(
                    "--limit-of {part}={n}: expected a part of {} and a positive count",
                    PARTS.join(", ")
                );
            }
        }
        checks::positive_if_set("--image-size", self.image.size)
    }
}

/// What `evaluate` did: the outcome of the run and the number of items.
pub struct EvalReport {
    pub outcome: EvalOutcome,
    pub items: usize,
}

/// Loads the benchmark and the model (with its adapter), answers every item not answered in
/// `out` yet, and scores all of them (see `run_eval`).
pub fn evaluate(
    cfg: &EvalConfig,
    out: &Path,
    device: &Device,
    progress: bool,
) -> Result<EvalReport> {
    cfg.validate()?;
    let items = load_items(&cfg.bench, &cfg.item_limit(), cfg.seed)?;
    let mut model = Mllm::load(&cfg.model, cfg.dtype.dtype(), device)?;
    let model_fingerprint = fingerprint(&mut model)?;
    let adapter_sha256 = match &cfg.adapter {
        Some(a) => {
            apply_adapter(a, &mut model)?;
            Some(sha256_file(&a.join("adapter.safetensors"))?)
        }
        None => None,
    };
    let tokenizer = model
        .tokenizer
        .as_ref()
        .context("the model has no tokenizer")?;
    let template_name = cfg
        .template
        .unwrap_or_else(|| TemplateName::default_for(Some(tokenizer)));
    let template = Template::new(template_name, Some(tokenizer))?;
    let preprocess = cfg.image.preprocess(&model)?;
    let eos: Vec<u32> = tokenizer.eos_id.into_iter().collect();
    let answerer = |n: usize| {
        let mut g = protocol_generation(cfg.protocol, n, cfg.seed);
        g.eos_ids = eos.clone();
        g.stop_strings = template.stop_strings();
        Answerer {
            model: &model,
            template: &template,
            preprocess: &preprocess,
            generation: g,
            batch: cfg.batch,
            progress: false,
        }
    };
    let shapes = cfg.bench.bench == BenchName::Shapes;
    let plain = template_name == TemplateName::Plain;
    let prompts = ItemPrompts {
        short: answerer(cfg.max_new_tokens),
        caption: answerer(cfg.caption_tokens),
        caption_prompt: cfg.caption_prompt.clone().unwrap_or_else(|| {
            if shapes {
                "Give a short caption for the image.".into()
            } else {
                CAPTION_PROMPT.into()
            }
        }),
        // MME's and POPE's questions are yes/no questions already; LLaVA-1.5 appends its
        // short-answer instruction to all of them (shapes: what its data was written with)
        short_suffix: if plain {
            String::new()
        } else if shapes {
            read_level(&cfg.bench.data)?.question_suffix()
        } else {
            format!("\n{SHORT_ANSWER}")
        },
        vqa_demos: if plain {
            vec![]
        } else {
            demonstrations(cfg.protocol, false)
        },
        caption_demos: if plain {
            vec![]
        } else {
            demonstrations(cfg.protocol, true)
        },
        seed: cfg.seed,
        feature_dir: cfg.feature_dir.clone(),
    };
    let setup = EvalSetup {
        bench: cfg.bench.bench.name().into(),
        model: cfg.model.display().to_string(),
        adapter: cfg.adapter.as_ref().map(|a| a.display().to_string()),
        protocol: cfg.protocol,
        template: format!("{template_name:?}"),
        seed: cfg.seed,
        limit: cfg.limit,
        part_limits: cfg.part_limits.clone(),
        max_new_tokens: cfg.max_new_tokens,
        model_fingerprint,
        adapter_sha256,
        items_digest: items_digest(&items)?,
        dtype: cfg.dtype.name().into(),
        image: cfg.image.clone(),
        caption_prompt: prompts.caption_prompt.clone(),
        caption_tokens: cfg.caption_tokens,
    };
    let outcome = run_eval(&items, &prompts, &setup, out, progress)?;
    Ok(EvalReport {
        outcome,
        items: items.len(),
    })
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
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub part_limits: BTreeMap<String, usize>,
    pub max_new_tokens: usize,
    /// what the answers depend on beyond the settings: the base model's fingerprint, the
    /// adapter file's sha256, and a digest of the items (ids, questions, ground truth, and
    /// each image file's path, size and modification time)
    #[serde(default)]
    pub model_fingerprint: String,
    #[serde(default)]
    pub adapter_sha256: Option<String>,
    #[serde(default)]
    pub items_digest: String,
    #[serde(default)]
    pub dtype: String,
    #[serde(default)]
    pub image: ImageProcessing,
    #[serde(default)]
    pub caption_prompt: String,
    #[serde(default)]
    pub caption_tokens: usize,
}

/// A digest of the items an evaluation asks: ids, questions, ground truth, and each image
/// file's path, size and modification time (an image replaced under the same name changes
/// it).
fn items_digest(items: &[Item]) -> Result<String> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for it in items {
        let meta = std::fs::metadata(&it.image)
            .with_context(|| format!("{}: cannot read", it.image.display()))?;
        let modified = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let line = format!(
            "{}\t{}\t{:?}\t{}\t{}\t{modified}\n",
            it.id,
            it.question,
            it.truth,
            it.image.display(),
            meta.len()
        );
        h.update(line.as_bytes());
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Everything a run produced.
pub struct EvalOutcome {
    pub scores: Scores,
    pub answered_now: usize,
    pub predictions: PathBuf,
    pub official: Vec<PathBuf>,
}

/// How each kind of item is asked: short questions and captions each with their own
/// answerer (generation lengths differ), the caption request, the suffix of short
/// questions, the protocol's demonstrations.
pub struct ItemPrompts<'a> {
    pub short: Answerer<'a>,
    pub caption: Answerer<'a>,
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
    /// the disk store of image features, if any
    pub feature_dir: Option<PathBuf>,
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
    askers: &ItemPrompts,
    setup: &EvalSetup,
    out: &Path,
    progress: bool,
) -> Result<EvalOutcome> {
    let _lock = FolderLock::acquire(out)?;
    let setup_path = out.join("eval.json");
    if setup_path.exists() {
        let old: EvalSetup = read_json(&setup_path)?;
        if &old != setup {
            bail!(
                "{}: this directory holds predictions of another evaluation ({}); use another --out or delete it",
                setup_path.display(),
                diff_fields(&old, setup)
            );
        }
    } else {
        write_json(&setup_path, setup)?;
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
    if let Some(dir) = &askers.feature_dir
        && askers.short.model.vision.is_some()
    {
        cache.attach_disk(
            dir,
            askers.short.model,
            askers.short.preprocess,
            &setup.model_fingerprint,
        )?;
    }
    let dev = askers.short.model.llm.embed_tokens.device().clone();
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
            .tokenizer
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
                        let demos = if matches!(it.truth, Truth::Vqa { .. }) {
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
    write_json(&out.join("scores.json"), &scores)?;
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
