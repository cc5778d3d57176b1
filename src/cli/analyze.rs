//! `lntune analyze similarity` and `lntune analyze gradvar`: flags to the analyses' inputs
//! (see `analyze::similarity` and `analyze::gradvar`).

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};

use super::args::{DeviceArgs, ImageArgs};
use crate::analyze::gradvar::{gradvar, gradvar_markdown};
use crate::analyze::similarity::{SimilarityConfig, similarity};
use crate::data::llava::DataSource;
use crate::data::template::TemplateName;
use crate::util::device::WeightDtype;
use crate::util::files::FolderLock;
use crate::util::named_path;

#[derive(Args, Debug)]
pub struct AnalyzeArgs {
    #[command(subcommand)]
    pub what: Analysis,
}

#[derive(Subcommand, Debug)]
pub enum Analysis {
    /// Mean cosine similarity between decoder layers' hidden states on a fixed set of samples
    Similarity(SimilarityArgs),
    /// Gradient variance across steps and across micro-batches, from training logs
    Gradvar(GradvarArgs),
}

#[derive(Args, Debug)]
pub struct SimilarityArgs {
    /// Model: llava-hf directory, directory with compose.json, or .gguf file
    #[arg(long)]
    pub model: PathBuf,
    /// Adapters to compare with the base, each as NAME=DIR or DIR (repeatable)
    #[arg(long)]
    pub adapter: Vec<String>,
    /// Also analyse the base model alone
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub base: bool,
    /// LLaVA JSON samples (same syntax as train --data); the first --samples are used
    #[arg(long)]
    pub data: String,
    #[arg(long)]
    pub images: Option<PathBuf>,
    #[arg(long, default_value_t = 32)]
    pub samples: usize,
    #[arg(long, value_enum)]
    pub template: Option<TemplateName>,
    #[arg(long, default_value_t = 2048)]
    pub max_length: usize,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: WeightDtype,
    #[command(flatten)]
    pub image: ImageArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Output folder: similarity.json, similarity.md, one heatmap PNG per model
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct GradvarArgs {
    /// Training run folders with grad_stats.jsonl, each as NAME=DIR or DIR (repeatable)
    #[arg(long)]
    pub run: Vec<String>,
    /// Output folder: gradvar.json, gradvar.md, gradvar_steps.png, gradvar_microbatch.png
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: AnalyzeArgs) -> Result<()> {
    match args.what {
        Analysis::Similarity(a) => {
            let mut models: Vec<(String, Option<PathBuf>)> = Vec::new();
            if a.base {
                models.push(("base".into(), None));
            }
            for spec in &a.adapter {
                let (n, p) = named_path(spec);
                models.push((n, Some(p)));
            }
            let cfg = SimilarityConfig {
                model: a.model.clone(),
                models,
                data: DataSource::parse_list(&a.data)?,
                images: a.images.clone(),
                samples: a.samples,
                template: a.template,
                max_length: a.max_length,
                batch: a.batch,
                dtype: a.dtype.dtype(),
                image: a.image.processing(),
                out: a.out.clone(),
            };
            let _lock = FolderLock::acquire(&a.out)?;
            let r = similarity(&cfg, &a.device.device.device()?)?;
            print!("{}", r.markdown());
            println!("heatmaps and similarity.json in {}", a.out.display());
        }
        Analysis::Gradvar(a) => {
            let runs: Vec<(String, PathBuf)> = a.run.iter().map(|s| named_path(s)).collect();
            let _lock = FolderLock::acquire(&a.out)?;
            let rows = gradvar(&runs, &a.out)?;
            print!("{}", gradvar_markdown(&rows));
            println!("plots and gradvar.json in {}", a.out.display());
        }
    }
    Ok(())
}
