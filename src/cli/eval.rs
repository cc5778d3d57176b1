//! `lntune eval` (flags, or an evaluation config file that flags override, to an
//! `EvalConfig`) and `lntune score` (a predictions file in a benchmark's official format).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;

use super::args::{DeviceArgs, ImageArgs};
use crate::data::template::TemplateName;
use crate::eval::benchmarks::scores::{Scores, score};
use crate::eval::benchmarks::{BenchFiles, BenchName, parse_part_limit, read_results};
use crate::eval::protocol::Protocol;
use crate::eval::run::{EvalConfig, evaluate};
use crate::util::device::WeightDtype;
use crate::util::files::write_json;

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Evaluation config (JSON); the flags given override its fields
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Model: llava-hf directory, directory with compose.json, or .gguf file
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Adapter directory from `lntune train` (applied without merging)
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    #[arg(long, value_enum)]
    pub bench: Option<BenchName>,
    /// The benchmark's files: vqav2 → questions JSON; pope → a coco_pope_*.json file or
    /// their folder; mme → the release folder or a llava_mme.jsonl-style file; coco/flickr →
    /// Karpathy-split or COCO-style caption JSON; shapes → the data folder
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Image folder [default: next to --data; <data>/images for shapes]
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// vqav2: the annotations JSON; mme with a JSONL question file: the release folder with
    /// the ground truth
    #[arg(long)]
    pub annotations: Option<PathBuf>,
    /// Karpathy split for coco/flickr [default: test]
    #[arg(long)]
    pub split: Option<String>,
    /// [default: llava]
    #[arg(long, value_enum)]
    pub protocol: Option<Protocol>,
    /// At most N questions (images for captions), a random subset chosen with --seed (per
    /// part for shapes; MME keeps both questions of an image)
    #[arg(long)]
    pub limit: Option<usize>,
    /// A part's own limit instead of --limit, as PART=N (repeatable; parts: vqa, pope (per
    /// file), mme, captions)
    #[arg(long = "limit-of", value_name = "PART=N")]
    pub limit_of: Vec<String>,
    /// Seed of the subset and of sampling [default: 0]
    #[arg(long)]
    pub seed: Option<u64>,
    /// Output folder: predictions.jsonl (resumable), scores.json, results/ in the official
    /// formats, eval.json
    #[arg(long)]
    pub out: PathBuf,
    /// Questions per generation batch [default: 8]
    #[arg(long)]
    pub batch: Option<usize>,
    /// New tokens at most for short answers [default: 16]
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// New tokens at most for captions [default: 64]
    #[arg(long)]
    pub caption_tokens: Option<usize>,
    /// Conversation template [default: the model's chat template if it has one, else vicuna_v1]
    #[arg(long, value_enum)]
    pub template: Option<TemplateName>,
    /// The user text that asks for a caption [default: LLaVA's "Provide a one-sentence
    /// caption for the provided image."; shapes: "Give a short caption for the image."]
    #[arg(long)]
    pub caption_prompt: Option<String>,
    /// Storage dtype of the frozen weights [default: f32]
    #[arg(long, value_enum)]
    pub dtype: Option<WeightDtype>,
    #[command(flatten)]
    pub image: ImageArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// No progress bar
    #[arg(long)]
    pub quiet: bool,
}

impl EvalArgs {
    /// The evaluation: the config file, then every flag given; without a file, --model,
    /// --bench and --data are required.
    pub fn eval_config(&self) -> Result<EvalConfig> {
        let mut c = match &self.config {
            Some(p) => EvalConfig::read(p)?,
            None => EvalConfig {
                model: self.model.clone().context("--model is required")?,
                adapter: None,
                bench: BenchFiles {
                    bench: self.bench.context("--bench is required")?,
                    data: self.data.clone().context("--data is required")?,
                    images: None,
                    annotations: None,
                    split: "test".into(),
                },
                protocol: Protocol::Llava,
                limit: None,
                part_limits: Default::default(),
                seed: 0,
                batch: 8,
                max_new_tokens: 16,
                caption_tokens: 64,
                template: None,
                caption_prompt: None,
                feature_dir: None,
                dtype: WeightDtype::F32,
                image: Default::default(),
            },
        };
        if let Some(m) = &self.model {
            c.model = m.clone();
        }
        if self.adapter.is_some() {
            c.adapter = self.adapter.clone();
        }
        if let Some(b) = self.bench {
            c.bench.bench = b;
        }
        if let Some(d) = &self.data {
            c.bench.data = d.clone();
        }
        if self.images.is_some() {
            c.bench.images = self.images.clone();
        }
        if self.annotations.is_some() {
            c.bench.annotations = self.annotations.clone();
        }
        if let Some(s) = &self.split {
            c.bench.split = s.clone();
        }
        if let Some(p) = self.protocol {
            c.protocol = p;
        }
        if self.limit.is_some() {
            c.limit = self.limit;
        }
        for text in &self.limit_of {
            let (part, n) = parse_part_limit("--limit-of", text)?;
            c.part_limits.insert(part, n);
        }
        if let Some(s) = self.seed {
            c.seed = s;
        }
        if let Some(b) = self.batch {
            c.batch = b;
        }
        if let Some(n) = self.max_new_tokens {
            c.max_new_tokens = n;
        }
        if let Some(n) = self.caption_tokens {
            c.caption_tokens = n;
        }
        if self.template.is_some() {
            c.template = self.template;
        }
        if self.caption_prompt.is_some() {
            c.caption_prompt = self.caption_prompt.clone();
        }
        if let Some(d) = self.dtype {
            c.dtype = d;
        }
        self.image.override_in(&mut c.image);
        Ok(c)
    }
}

pub fn run(args: EvalArgs) -> Result<()> {
    let cfg = args.eval_config()?;
    let device = args.device.device.device()?;
    let t = std::time::Instant::now();
    let r = evaluate(&cfg, &args.out, &device, !args.quiet)?;
    let o = &r.outcome;
    print!("{}", o.scores.table());
    println!(
        "{} questions ({} answered now, {} from an earlier run) in {:.1}s; predictions: {}; scores: {}",
        r.items,
        o.answered_now,
        r.items - o.answered_now,
        t.elapsed().as_secs_f64(),
        o.predictions.display(),
        args.out.join("scores.json").display()
    );
    Ok(())
}

#[derive(Args, Debug)]
pub struct ScoreArgs {
    #[arg(long, value_enum)]
    pub bench: BenchName,
    /// Predictions in the benchmark's result format: vqav2 → [{"question_id","answer"}] JSON;
    /// pope → JSONL with question_id, text; mme → folder of <subtask>.txt files (image,
    /// question, ground truth, prediction); coco/flickr → [{"image_id","caption"}] JSON
    #[arg(long)]
    pub pred: PathBuf,
    /// Ground truth: vqav2 → annotations JSON; pope → the question file with labels;
    /// coco/flickr → COCO-style annotations JSON; mme → not needed
    #[arg(long)]
    pub gt: Option<PathBuf>,
    /// vqav2: the official questions JSON
    #[arg(long)]
    pub questions: Option<PathBuf>,
    /// Write the scores as JSON here
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Score the questions the predictions answer even when some are missing (the coverage
    /// is printed); without it a partial set is refused
    #[arg(long)]
    pub partial: bool,
}

pub fn score_run(args: ScoreArgs) -> Result<()> {
    let (items, preds, coverage) = read_results(
        args.bench,
        &args.pred,
        args.gt.as_deref(),
        args.questions.as_deref(),
        args.partial,
    )?;
    if items.is_empty() {
        bail!("{}: no predictions", args.pred.display());
    }
    let scores: Scores = score(&items, &preds);
    print!("{}", scores.table());
    println!("{coverage}");
    if let Some(out) = &args.out {
        write_json(out, &scores)?;
        println!("scores: {}", out.display());
    }
    Ok(())
}
