//! `lntune compare`: flags to a `CompareConfig` (see `jobs::compare`).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};

use super::args::{DeviceArgs, ImageArgs};
use crate::data::llava::DataSource;
use crate::data::template::TemplateName;
use crate::eval::benchmarks::{BenchFiles, BenchName, parse_part_limit};
use crate::eval::protocol::Protocol;
use crate::eval::run::EvalConfig;
use crate::jobs::compare::{Ablation, CompareConfig, parse_data_types, run_compare};
use crate::methods::Method;
use crate::util::device::WeightDtype;

#[derive(Args, Debug)]
pub struct CompareArgs {
    /// Model: llava-hf directory, directory with compose.json, or .gguf file
    #[arg(long)]
    pub model: PathBuf,
    /// Stage-1 adapter (projector) every arm starts from
    #[arg(long)]
    pub init_adapter: Option<PathBuf>,
    /// Stage-2 LLaVA JSON data, as `train --data`
    #[arg(long)]
    pub data: String,
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// Methods to compare, comma separated
    #[arg(long, default_value = "full,lora,attn-qv,mlp,ln,ln-simple")]
    pub methods: String,
    /// Learning rate per method, e.g. `ln=1e-3,lora=2e-4` [default: 2e-5 full, 2e-4 lora,
    /// 5e-4 the others]
    #[arg(long)]
    pub lr: Option<String>,
    /// Try each method's learning rate times each --sweep-factors on a held-out split and keep
    /// the one with the lowest validation loss
    #[arg(long)]
    pub lr_sweep: bool,
    #[arg(long, default_value = "0.25,1,4")]
    pub sweep_factors: String,
    /// Samples held out from --data as the sweep's validation split
    #[arg(long, default_value_t = 64)]
    pub val_samples: usize,
    /// Optimizer steps per arm (default: one epoch of the data)
    #[arg(long)]
    pub steps: Option<usize>,
    /// Examples per micro-batch
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Micro-batches per step (2 or more gives the across-micro-batch gradient variance)
    #[arg(long, default_value_t = 2)]
    pub grad_accum: usize,
    #[arg(long, default_value_t = 2048)]
    pub max_length: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Train every method at each of these seeds, e.g. `0,1,2` (the first one also seeds the
    /// sweep, the ablations and the data split); the report gives mean and spread across
    /// seeds [default: --seed]
    #[arg(long)]
    pub seeds: Option<String>,
    #[arg(long, value_enum)]
    pub template: Option<TemplateName>,
    /// LoRA rank of the lora arm (alpha = 2 x rank); the paper's LoRA baselines use 32 or 64
    #[arg(long, default_value_t = 64)]
    pub lora_r: usize,
    /// Keep embed_tokens and lm_head frozen in every method (the paper's LN set trains them)
    #[arg(long)]
    pub freeze_embed_head: bool,
    /// Benchmark of the scores, as `lntune eval --bench`
    #[arg(long, value_enum)]
    pub bench: BenchName,
    /// The benchmark's files, as `lntune eval --data`
    #[arg(long)]
    pub eval_data: PathBuf,
    #[arg(long)]
    pub eval_images: Option<PathBuf>,
    #[arg(long)]
    pub eval_annotations: Option<PathBuf>,
    #[arg(long)]
    pub eval_limit: Option<usize>,
    /// A part's own limit instead of --eval-limit, as PART=N (repeatable; as `lntune eval
    /// --limit-of`)
    #[arg(long = "eval-limit-of", value_name = "PART=N")]
    pub eval_limit_of: Vec<String>,
    #[arg(long, default_value_t = 16)]
    pub eval_batch: usize,
    /// The user text that asks for a caption (as `lntune eval --caption-prompt`)
    #[arg(long)]
    pub caption_prompt: Option<String>,
    /// Another benchmark every chosen arm is evaluated on too, as BENCH=DATA (repeatable;
    /// DATA as `lntune eval --data`, images found where `lntune eval` looks by default)
    #[arg(long = "also-eval", value_name = "BENCH=DATA")]
    pub also_eval: Vec<String>,
    /// Ablations to run as well (repeatable)
    #[arg(long, value_enum)]
    pub ablation: Vec<Ablation>,
    /// data-type ablation: KIND=FILE pairs, e.g. conversation=c.json,detail=d.json,reasoning=r.json
    #[arg(long)]
    pub data_types: Option<String>,
    /// data-type ablation: samples per arm (the mixed arm draws them evenly from all kinds)
    #[arg(long, default_value_t = 400)]
    pub data_type_samples: usize,
    /// data-type ablation: equal token budgets instead of sample counts: each arm gets the
    /// samples (seeded order) whose trained tokens reach N (the mixed arm N/kinds from each
    /// kind) and trains --data-type-epochs epochs over them, whatever --steps says
    #[arg(long, value_name = "N")]
    pub data_type_tokens: Option<usize>,
    /// data-type ablation with --data-type-tokens: epochs over each arm's subset
    #[arg(long, default_value_t = 1.0)]
    pub data_type_epochs: f64,
    /// Skip the layer-similarity and gradient-variance analyses
    #[arg(long)]
    pub no_analysis: bool,
    #[arg(long, default_value_t = 32)]
    pub similarity_samples: usize,
    #[command(flatten)]
    pub image: ImageArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    #[arg(long)]
    pub out: PathBuf,
    /// No progress bar
    #[arg(long)]
    pub quiet: bool,
}

fn parse_lrs(spec: Option<&str>) -> Result<Vec<(Method, f64)>> {
    let mut v = Vec::new();
    for part in spec
        .unwrap_or("")
        .split(',')
        .filter(|p| !p.trim().is_empty())
    {
        let (m, x) = part
            .split_once('=')
            .with_context(|| format!("--lr `{part}`: expected METHOD=LR, e.g. ln=1e-3"))?;
        let method = Method::from_str(m.trim(), true)
            .map_err(|_| anyhow::anyhow!("--lr `{part}`: unknown method `{m}`"))?;
        let lr: f64 = x
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("--lr `{part}`: `{x}` is not a number"))?;
        if !(lr > 0.0 && lr.is_finite()) {
            bail!("--lr `{part}`: the learning rate must be positive");
        }
        v.push((method, lr));
    }
    Ok(v)
}

impl CompareArgs {
    pub fn compare_config(&self) -> Result<CompareConfig> {
        let a = self;
        let methods: Vec<Method> = a
            .methods
            .split(',')
            .filter(|m| !m.trim().is_empty())
            .map(|m| {
                Method::from_str(m.trim(), true)
                    .map_err(|_| anyhow::anyhow!("--methods: unknown method `{m}`"))
            })
            .collect::<Result<_>>()?;
        let sweep_factors: Vec<f64> = a
            .sweep_factors
            .split(',')
            .map(|f| {
                f.trim()
                    .parse::<f64>()
                    .map_err(|_| anyhow::anyhow!("--sweep-factors: `{f}` is not a number"))
            })
            .collect::<Result<_>>()?;
        let seeds: Vec<u64> = match &a.seeds {
            None => vec![a.seed],
            Some(spec) => spec
                .split(',')
                .map(|x| {
                    x.trim().parse::<u64>().map_err(|_| {
                        anyhow::anyhow!("--seeds: `{x}` is not a seed (a non-negative integer)")
                    })
                })
                .collect::<Result<_>>()?,
        };
        if seeds.is_empty() {
            bail!("--seeds is empty");
        }
        if (1..seeds.len()).any(|i| seeds[..i].contains(&seeds[i])) {
            bail!(
                "--seeds `{}`: a seed is given twice",
                a.seeds.as_deref().unwrap_or("")
            );
        }
        let mut also_eval: Vec<BenchFiles> = Vec::new();
        for spec in &a.also_eval {
            let (name, data) = spec
                .split_once('=')
                .with_context(|| format!("--also-eval `{spec}`: expected BENCH=DATA"))?;
            let bench = BenchName::from_str(name.trim(), true)
                .map_err(|_| anyhow::anyhow!("--also-eval `{spec}`: unknown benchmark `{name}`"))?;
            if bench == a.bench || also_eval.iter().any(|b| b.bench == bench) {
                bail!(
                    "--also-eval `{spec}`: {} is evaluated already",
                    bench.name()
                );
            }
            also_eval.push(BenchFiles {
                bench,
                data: PathBuf::from(data.trim()),
                images: None,
                annotations: None,
                split: "test".into(),
            });
        }
        let data_types = match &a.data_types {
            Some(spec) => parse_data_types(spec)?,
            None => vec![],
        };
        Ok(CompareConfig {
            model: a.model.clone(),
            init_adapter: a.init_adapter.clone(),
            data: DataSource::parse_list(&a.data)?,
            images: a.images.clone(),
            methods,
            lrs: parse_lrs(a.lr.as_deref())?,
            lr_sweep: a.lr_sweep,
            sweep_factors,
            val_samples: a.val_samples,
            steps: a.steps,
            batch: a.batch,
            grad_accum: a.grad_accum,
            max_length: a.max_length,
            seed: seeds[0],
            seeds,
            template: a.template,
            freeze_embed_head: a.freeze_embed_head,
            lora_r: a.lora_r,
            eval: EvalConfig {
                model: a.model.clone(),
                adapter: None,
                bench: BenchFiles {
                    bench: a.bench,
                    data: a.eval_data.clone(),
                    images: a.eval_images.clone(),
                    annotations: a.eval_annotations.clone(),
                    split: "test".into(),
                },
                protocol: Protocol::Llava,
                limit: a.eval_limit,
                part_limits: a
                    .eval_limit_of
                    .iter()
                    .map(|t| parse_part_limit("--eval-limit-of", t))
                    .collect::<Result<_>>()?,
                seed: a.seed,
                batch: a.eval_batch,
                max_new_tokens: 16,
                caption_tokens: 64,
                template: a.template,
                caption_prompt: a.caption_prompt.clone(),
                // every arm's evaluation and training share one store of image features
                feature_dir: Some(a.out.join("features")),
                dtype: WeightDtype::F32,
                image: a.image.processing(),
            },
            also_eval,
            ablations: a.ablation.clone(),
            data_types,
            data_type_samples: a.data_type_samples,
            data_type_tokens: a.data_type_tokens,
            data_type_epochs: a.data_type_epochs,
            analysis: !a.no_analysis,
            similarity_samples: a.similarity_samples,
            image: a.image.processing(),
            out: a.out.clone(),
            device: a.device.device,
            progress: !a.quiet,
        })
    }
}

pub fn run(args: CompareArgs) -> Result<()> {
    let cfg = args.compare_config()?;
    print!("{}", run_compare(&cfg)?);
    Ok(())
}
