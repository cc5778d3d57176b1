//! `lntune analyze similarity` (layer similarity of a base model and adapters) and
//! `lntune analyze gradvar` (gradient variance recorded by `train --log-grad-stats`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};

use super::{DTypeArg, ImageProcessorArgs, load_model};
use crate::analyze::gradvar::GradStatLine;
use crate::analyze::similarity::{LayerSimilarity, layer_similarity, pooled_layer_outputs};
use crate::data::llava::DataSource;
use crate::data::template::TemplateName;
use crate::eval::bench::write_atomically;
use crate::plot::{Chart, Heatmap, Series};
use crate::train::run::{FeatureCache, RunConfig, prepare_examples};

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
    pub dtype: DTypeArg,
    #[command(flatten)]
    pub image: ImageProcessorArgs,
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

/// NAME=PATH or PATH (named after the path's last components).
pub fn named(spec: &str) -> (String, PathBuf) {
    match spec.split_once('=') {
        Some((n, p)) if !n.contains('/') => (n.to_string(), PathBuf::from(p)),
        _ => {
            let p = PathBuf::from(spec);
            let name = p
                .components()
                .rev()
                .map(|c| c.as_os_str().to_string_lossy().to_string())
                .find(|c| c != "adapter" && !c.is_empty())
                .unwrap_or_else(|| spec.to_string());
            (name, p)
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SimilarityReport {
    pub models: Vec<(String, LayerSimilarity)>,
}

impl SimilarityReport {
    pub fn markdown(&self) -> String {
        let mut s = String::from(
            "| model | mean cosine, all layer pairs | mean cosine, adjacent layers | samples |\n|---|---|---|---|\n",
        );
        for (n, r) in &self.models {
            s.push_str(&format!(
                "| {n} | {:.4} | {:.4} | {} |\n",
                r.all_pairs, r.adjacent, r.samples
            ));
        }
        s
    }
}

/// Layer similarity of the base model and each adapter on the same samples.
pub fn similarity(a: &SimilarityArgs) -> Result<SimilarityReport> {
    let mut models: Vec<(String, Option<PathBuf>)> = Vec::new();
    if a.base {
        models.push(("base".into(), None));
    }
    for spec in &a.adapter {
        let (n, p) = named(spec);
        models.push((n, Some(p)));
    }
    if models.is_empty() {
        bail!("nothing to analyse: give --adapter or keep --base true");
    }
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("{}: cannot create", a.out.display()))?;
    let mut report = SimilarityReport { models: vec![] };
    let mut cache = FeatureCache::new(true);
    for (name, adapter) in models {
        let model = load_model(&a.model, adapter.as_deref(), a.dtype.dtype())?;
        let pre = a.image.preprocess(&model)?;
        let template = a
            .template
            .unwrap_or_else(|| super::default_template(&model));
        let cfg = RunConfig {
            data: DataSource::parse_list(&a.data)?,
            images: a.images.clone(),
            template,
            max_length: a.max_length,
            preprocess: pre.clone(),
            ..RunConfig::minimal(&a.model)
        };
        let (mut examples, _) = prepare_examples(&cfg, &model)?;
        // a fixed set: the first samples in file order (prepare_examples shuffles by seed 0,
        // the same for every model)
        examples.truncate(a.samples.max(1));
        let dev = candle_core::Device::Cpu;
        let mut pooled = Vec::new();
        for chunk in examples.chunks(a.batch.max(1)) {
            let refs: Vec<&crate::data::dataset::Example> = chunk.iter().collect();
            let hb = crate::data::dataset::HostBatch::collate(
                &refs,
                model.text.as_ref().and_then(|t| t.eos_id).unwrap_or(0),
                &pre,
            )?;
            let mut b = hb.to_batch(&dev)?;
            b.vision_features = cache.features(&model, &hb, &dev)?;
            b.pixel_values = None;
            pooled.extend(pooled_layer_outputs(&model, &b)?);
        }
        let r = layer_similarity(&pooled)?;
        Heatmap {
            title: format!("layer similarity: {name}"),
            axis_label: "decoder layer".into(),
            values: r.matrix.clone(),
            lo: r
                .matrix
                .iter()
                .flatten()
                .copied()
                .fold(f64::MAX, f64::min)
                .min(0.0),
            hi: 1.0,
        }
        .save_png(&a.out.join(format!("similarity_{}.png", file_safe(&name))))?;
        eprintln!(
            "{name}: all pairs {:.4}, adjacent {:.4}",
            r.all_pairs, r.adjacent
        );
        report.models.push((name, r));
    }
    write_atomically(
        &a.out.join("similarity.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    write_atomically(&a.out.join("similarity.md"), report.markdown().as_bytes())?;
    Ok(report)
}

pub fn file_safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GradvarRun {
    pub name: String,
    pub subset: String,
    pub dim: usize,
    /// mean of the across-steps window variances
    pub mean_window_var: Option<f64>,
    /// mean of the per-step across-micro-batch variances
    pub mean_microbatch_var: Option<f64>,
    pub mean_norm: f64,
    pub lines: Vec<GradStatLine>,
}

/// Reads a run's grad_stats.jsonl.
pub fn read_grad_stats(dir: &Path) -> Result<Vec<GradStatLine>> {
    let f = dir.join("grad_stats.jsonl");
    let text = std::fs::read_to_string(&f)
        .with_context(|| format!("{}: cannot read (train with --log-grad-stats)", f.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| anyhow::anyhow!("{}: line {}: {e}", f.display(), i + 1))
        })
        .collect()
}

fn mean_of(v: impl Iterator<Item = f64>) -> Option<f64> {
    let v: Vec<f64> = v.collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

pub fn gradvar(runs: &[(String, PathBuf)], out: &Path) -> Result<Vec<GradvarRun>> {
    if runs.is_empty() {
        bail!("give at least one --run");
    }
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let mut rows = Vec::new();
    for (name, dir) in runs {
        let lines = read_grad_stats(dir)?;
        let first = lines
            .first()
            .with_context(|| format!("{}: grad_stats.jsonl is empty", dir.display()))?;
        rows.push(GradvarRun {
            name: name.clone(),
            subset: first.subset.clone(),
            dim: first.dim,
            mean_window_var: mean_of(lines.iter().filter_map(|l| l.window_var)),
            mean_microbatch_var: mean_of(lines.iter().filter_map(|l| l.microbatch_var)),
            mean_norm: mean_of(lines.iter().map(|l| l.norm)).unwrap_or(f64::NAN),
            lines,
        });
    }
    let chart = |title: &str, y: &str, pick: &dyn Fn(&GradStatLine) -> Option<f64>| Chart {
        title: title.into(),
        x_label: "step".into(),
        y_label: y.into(),
        series: rows
            .iter()
            .map(|r| Series {
                label: r.name.clone(),
                points: r
                    .lines
                    .iter()
                    .filter_map(|l| pick(l).map(|v| (l.step as f64, v)))
                    .collect(),
                scatter: false,
            })
            .collect(),
        log_x: false,
    };
    chart("gradient variance across steps", "mean var", &|l| {
        l.window_var
    })
    .save_png(&out.join("gradvar_steps.png"))?;
    chart("gradient variance across micro-batches", "mean var", &|l| {
        l.microbatch_var
    })
    .save_png(&out.join("gradvar_microbatch.png"))?;
    write_atomically(
        &out.join("gradvar.json"),
        serde_json::to_string_pretty(&rows)?.as_bytes(),
    )?;
    write_atomically(&out.join("gradvar.md"), gradvar_markdown(&rows).as_bytes())?;
    Ok(rows)
}

pub fn gradvar_markdown(rows: &[GradvarRun]) -> String {
    let f = |x: Option<f64>| x.map(|v| format!("{v:.3e}")).unwrap_or_else(|| "-".into());
    let mut s = String::from(
        "| run | gradient of | coordinates | variance across steps (mean per coordinate) | variance across micro-batches | mean gradient norm |\n|---|---|---|---|---|---|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.3e} |\n",
            r.name,
            r.subset,
            r.dim,
            f(r.mean_window_var),
            f(r.mean_microbatch_var),
            r.mean_norm
        ));
    }
    s
}

pub fn run(args: AnalyzeArgs) -> Result<()> {
    match args.what {
        Analysis::Similarity(a) => {
            let r = similarity(&a)?;
            print!("{}", r.markdown());
            println!("heatmaps and similarity.json in {}", a.out.display());
        }
        Analysis::Gradvar(a) => {
            let runs: Vec<(String, PathBuf)> = a.run.iter().map(|s| named(s)).collect();
            let rows = gradvar(&runs, &a.out)?;
            print!("{}", gradvar_markdown(&rows));
            println!("plots and gradvar.json in {}", a.out.display());
        }
    }
    Ok(())
}
