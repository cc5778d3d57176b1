//! `lntune eval`: answer a benchmark with a model (plus adapter) and score it; `lntune
//! score`: score a predictions file in a benchmark's official format, without a model.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};

use super::{DTypeArg, ImageProcessorArgs, load_model};
use crate::data::shapes::read_level;
use crate::data::template::{Template, TemplateName};
use crate::eval::bench::{
    Item, Scores, load_captions, load_mme_folder, load_mme_jsonl, load_pope, load_vqav2,
    pope_files, read_caption_results, read_mme_results, read_pope_answers, read_vqav2_results,
    score, subset, write_atomically,
};
use crate::eval::harness::{Asker, SHORT_ANSWER};
use crate::eval::run::{
    Askers, CAPTION_PROMPT, EvalSetup, Protocol, demonstrations, protocol_generation, run_eval,
};

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum BenchName {
    Mme,
    Pope,
    Vqav2,
    Coco,
    Flickr,
    /// the demo's generated test sets (VQA, POPE, MME-style, captions) in one folder
    Shapes,
}

impl BenchName {
    fn name(self) -> &'static str {
        match self {
            BenchName::Mme => "mme",
            BenchName::Pope => "pope",
            BenchName::Vqav2 => "vqav2",
            BenchName::Coco => "coco",
            BenchName::Flickr => "flickr",
            BenchName::Shapes => "shapes",
        }
    }
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Model: llava-hf directory, directory with compose.json, or .gguf file
    #[arg(long)]
    pub model: PathBuf,
    /// Adapter directory from `lntune train` (applied without merging)
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    #[arg(long, value_enum)]
    pub bench: BenchName,
    /// The benchmark's files: vqav2 → questions JSON; pope → a coco_pope_*.json file or
    /// their folder; mme → the release folder or a llava_mme.jsonl-style file; coco/flickr →
    /// Karpathy-split or COCO-style caption JSON; shapes → the data folder
    #[arg(long)]
    pub data: PathBuf,
    /// Image folder [default: next to --data; <data>/images for shapes]
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// vqav2: the annotations JSON; mme with a JSONL question file: the release folder with
    /// the ground truth
    #[arg(long)]
    pub annotations: Option<PathBuf>,
    /// Karpathy split for coco/flickr
    #[arg(long, default_value = "test")]
    pub split: String,
    #[arg(long, value_enum, default_value = "llava")]
    pub protocol: Protocol,
    /// At most N questions (images for captions), a random subset chosen with --seed (per
    /// part for shapes; MME keeps both questions of an image)
    #[arg(long)]
    pub limit: Option<usize>,
    /// Seed of the subset and of sampling
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output folder: predictions.jsonl (resumable), scores.json, results/ in the official
    /// formats, eval.json
    #[arg(long)]
    pub out: PathBuf,
    /// Questions per generation batch
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// New tokens at most for short answers
    #[arg(long, default_value_t = 16)]
    pub max_new_tokens: usize,
    /// New tokens at most for captions
    #[arg(long, default_value_t = 64)]
    pub caption_tokens: usize,
    /// Conversation template [default: the model's chat template if it has one, else vicuna_v1]
    #[arg(long, value_enum)]
    pub template: Option<TemplateName>,
    /// The user text that asks for a caption [default: LLaVA's "Provide a one-sentence
    /// caption for the provided image."; shapes: "Give a short caption for the image."]
    #[arg(long)]
    pub caption_prompt: Option<String>,
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DTypeArg,
    #[command(flatten)]
    pub image: ImageProcessorArgs,
    /// No progress bar
    #[arg(long)]
    pub quiet: bool,
}

fn parent_of(p: &Path) -> PathBuf {
    if p.is_dir() {
        p.to_path_buf()
    } else {
        p.parent().map(Path::to_path_buf).unwrap_or_default()
    }
}

/// The items of a benchmark's files.
pub fn load_items(
    bench: BenchName,
    data: &Path,
    images: Option<&Path>,
    annotations: Option<&Path>,
    split: &str,
    limit: Option<usize>,
    seed: u64,
) -> Result<Vec<Item>> {
    if !data.exists() {
        bail!("--data {}: not found", data.display());
    }
    let images = images
        .map(Path::to_path_buf)
        .unwrap_or_else(|| match bench {
            BenchName::Shapes => data.join("images"),
            _ => parent_of(data),
        });
    let items = match bench {
        BenchName::Vqav2 => {
            let ann = annotations
                .context("--bench vqav2 needs --annotations (the official annotations JSON)")?;
            subset(load_vqav2(data, ann, &images)?, limit, seed)
        }
        BenchName::Pope => {
            let mut v = Vec::new();
            for f in pope_files(data)? {
                v.extend(subset(load_pope(&f, &images)?, limit, seed));
            }
            v
        }
        BenchName::Mme => {
            let v = if data.is_dir() {
                load_mme_folder(data)?
            } else {
                load_mme_jsonl(data, &images, annotations)?
            };
            subset(v, limit, seed)
        }
        BenchName::Coco | BenchName::Flickr => {
            subset(load_captions(data, &images, split)?, limit, seed)
        }
        BenchName::Shapes => {
            let mut v = subset(
                load_vqav2(
                    &data.join("vqa_test_questions.json"),
                    &data.join("vqa_test_annotations.json"),
                    &images,
                )?,
                limit,
                seed,
            );
            for s in ["random", "popular", "adversarial"] {
                v.extend(subset(
                    load_pope(&data.join(format!("pope_test_{s}.jsonl")), &images)?,
                    limit,
                    seed,
                ));
            }
            v.extend(subset(
                load_mme_jsonl(&data.join("mme_test.jsonl"), &images, None)?,
                limit,
                seed,
            ));
            v.extend(subset(
                load_captions(&data.join("captions_test.json"), &images, split)?,
                limit,
                seed,
            ));
            v
        }
    };
    if items.is_empty() {
        bail!("--data {}: no questions", data.display());
    }
    Ok(items)
}

pub fn run(args: EvalArgs) -> Result<()> {
    if args.batch == 0 {
        bail!("--batch must be positive");
    }
    let items = load_items(
        args.bench,
        &args.data,
        args.images.as_deref(),
        args.annotations.as_deref(),
        &args.split,
        args.limit,
        args.seed,
    )?;
    let model = load_model(&args.model, args.adapter.as_deref(), args.dtype.dtype())?;
    let tools = model.text.as_ref().context("the model has no tokenizer")?;
    let template_name = args
        .template
        .unwrap_or_else(|| super::default_template(&model));
    let template = Template::new(template_name, Some(tools))?;
    let preprocess = args.image.preprocess(&model)?;
    let eos: Vec<u32> = tools.eos_id.into_iter().collect();
    let gen_cfg = |n: usize| {
        let mut g = protocol_generation(args.protocol, n, args.seed);
        g.eos_ids = eos.clone();
        g.stop_strings = template.stop_strings();
        g
    };
    let asker = |n: usize| Asker {
        model: &model,
        template: &template,
        preprocess: &preprocess,
        generation: gen_cfg(n),
        batch: args.batch,
        progress: false,
    };
    let caption_prompt = args
        .caption_prompt
        .clone()
        .unwrap_or_else(|| match args.bench {
            BenchName::Shapes => "Give a short caption for the image.".into(),
            _ => CAPTION_PROMPT.into(),
        });
    let plain = template_name == TemplateName::Plain;
    let askers = Askers {
        short: asker(args.max_new_tokens),
        caption: asker(args.caption_tokens),
        caption_prompt,
        // MME's and POPE's questions are yes/no questions already; LLaVA-1.5 appends its
        // short-answer instruction to all of them (shapes: what its data was written with)
        short_suffix: if plain {
            String::new()
        } else if args.bench == BenchName::Shapes {
            read_level(&args.data)?.question_suffix()
        } else {
            format!("\n{SHORT_ANSWER}")
        },
        vqa_demos: if plain {
            vec![]
        } else {
            demonstrations(args.protocol, false)
        },
        caption_demos: if plain {
            vec![]
        } else {
            demonstrations(args.protocol, true)
        },
        seed: args.seed,
    };
    let setup = EvalSetup {
        bench: args.bench.name().into(),
        model: args.model.display().to_string(),
        adapter: args.adapter.as_ref().map(|a| a.display().to_string()),
        protocol: args.protocol,
        template: format!("{template_name:?}"),
        seed: args.seed,
        limit: args.limit,
        max_new_tokens: args.max_new_tokens,
    };
    let t = std::time::Instant::now();
    let r = run_eval(&items, &askers, &setup, &args.out, !args.quiet)?;
    print!("{}", r.scores.table());
    println!(
        "{} questions ({} answered now, {} from an earlier run) in {:.1}s; predictions: {}; scores: {}",
        items.len(),
        r.answered_now,
        items.len() - r.answered_now,
        t.elapsed().as_secs_f64(),
        r.predictions.display(),
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
}

pub fn score_run(args: ScoreArgs) -> Result<()> {
    let gt = || {
        args.gt
            .as_deref()
            .with_context(|| format!("--bench {} needs --gt", args.bench.name()))
    };
    let (items, preds) = match args.bench {
        BenchName::Vqav2 => {
            let q = args
                .questions
                .as_deref()
                .context("--bench vqav2 needs --questions (the official questions JSON)")?;
            read_vqav2_results(&args.pred, q, gt()?)?
        }
        BenchName::Pope => read_pope_answers(&args.pred, gt()?)?,
        BenchName::Mme => read_mme_results(&args.pred)?,
        BenchName::Coco | BenchName::Flickr => read_caption_results(&args.pred, gt()?)?,
        BenchName::Shapes => {
            bail!("--bench shapes: score each part with its own format (vqav2, pope, mme, coco)")
        }
    };
    if items.is_empty() {
        bail!("{}: no predictions", args.pred.display());
    }
    let scores: Scores = score(&items, &preds);
    print!("{}", scores.table());
    if let Some(out) = &args.out {
        write_atomically(out, serde_json::to_string_pretty(&scores)?.as_bytes())?;
        println!("scores: {}", out.display());
    }
    Ok(())
}
