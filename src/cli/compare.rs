//! `lntune compare`: the paper's comparison rerun on the user's model and data. Each arm (a
//! method, a learning rate of the sweep, an ablation setting) is one `lntune train` and one
//! `lntune eval` child process, so that peak memory is measured per arm and an interrupted
//! comparison resumes where it stopped: an arm whose `summary.json` and `eval/scores.json`
//! exist is not run again, a half-trained arm resumes from its last checkpoint, and a
//! half-done evaluation skips the questions it answered.
//!
//! Layout of `--out`: `data/` (the train/validation split of a sweep), `runs/<table>/<arm>/`
//! (train outputs + `eval/`), `analysis/` (similarity, gradient variance), `report.md`,
//! `report.json`, `wall_time.json` (each invocation's wall time), `loss_curves.png`,
//! `score_vs_trainable.png`, `score_vs_memory.png`,
//! `ablation_connector.png`, `ablation_data_type.png`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

use super::ImageProcessorArgs;
use super::analyze::{GradvarRun, SimilarityReport, file_safe, gradvar};
use super::eval::BenchName;
use super::train::default_lr;
use crate::data::llava::{DataSource, load_mixture};
use crate::data::template::TemplateName;
use crate::eval::bench::{Scores, write_atomically};
use crate::methods::Method;
use crate::plot::{Chart, Series, trailing_mean};
use crate::train::run::{RunSummary, progress_bar};

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ablation {
    /// LayerNorm + connector, LayerNorm only, connector only
    Connector,
    /// LN tuning on equal-size subsets of conversation, detail, reasoning and mixed data
    DataType,
}

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
    #[arg(long, value_enum)]
    pub template: Option<TemplateName>,
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
    #[arg(long, default_value_t = 16)]
    pub eval_batch: usize,
    /// The user text that asks for a caption (as `lntune eval --caption-prompt`)
    #[arg(long)]
    pub caption_prompt: Option<String>,
    /// Ablations to run as well (repeatable)
    #[arg(long, value_enum)]
    pub ablation: Vec<Ablation>,
    /// data-type ablation: KIND=FILE pairs, e.g. conversation=c.json,detail=d.json,reasoning=r.json
    #[arg(long)]
    pub data_types: Option<String>,
    /// data-type ablation: samples per arm (the mixed arm draws them evenly from all kinds)
    #[arg(long, default_value_t = 400)]
    pub data_type_samples: usize,
    /// Skip the layer-similarity and gradient-variance analyses
    #[arg(long)]
    pub no_analysis: bool,
    #[arg(long, default_value_t = 32)]
    pub similarity_samples: usize,
    #[command(flatten)]
    pub image: ImageProcessorArgs,
    #[arg(long)]
    pub out: PathBuf,
    /// No progress bar
    #[arg(long)]
    pub quiet: bool,
}

/// One training + evaluation of the comparison.
#[derive(Debug, Clone)]
struct Arm {
    table: &'static str,
    name: String,
    method: Method,
    method_flags: Vec<String>,
    lr: f64,
    data: String,
    val: Option<String>,
    /// evaluate this arm (sweep candidates that lose are not evaluated)
    evaluate: bool,
}

/// An arm's results, as report.json holds them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArmResult {
    pub name: String,
    pub method: String,
    pub lr: f64,
    pub summary: RunSummary,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scores: Option<Scores>,
    /// (step, loss) of every step
    pub loss_curve: Vec<(usize, f64)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompareReport {
    pub command: String,
    pub machine: String,
    /// wall time summed over the invocations that made the comparison (an interrupted one
    /// counted up to its last finished child process)
    pub wall_s: f64,
    /// how many invocations (1 unless the comparison was resumed)
    #[serde(default)]
    pub invocations: usize,
    /// sum of every arm's training wall time (all invocations)
    pub train_wall_s: f64,
    pub methods: Vec<ArmResult>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub lr_sweep: Vec<ArmResult>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub connector: Vec<ArmResult>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub data_type: Vec<ArmResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub similarity: Option<SimilarityReport>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub gradvar: Vec<GradvarSummary>,
}

/// A gradient-variance row without the per-step lines.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GradvarSummary {
    pub name: String,
    pub subset: String,
    pub dim: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_window_var: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_microbatch_var: Option<f64>,
    pub mean_norm: f64,
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

fn lr_label(lr: f64) -> String {
    format!("lr-{lr:.0e}")
}

/// The machine, for the report: CPU model and core count.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| format!(", {:.0} GiB RAM", kb / 1048576.0))
        .unwrap_or_default();
    format!("{cpu}, {cores} cores{mem}")
}

/// Wall time of every invocation of a comparison, kept in `--out/wall_time.json` and
/// rewritten after every child process, so that the report of a resumed comparison counts
/// the invocations before it (an interrupted one up to its last finished child).
#[derive(Debug, Default, Serialize, Deserialize)]
struct WallLedger {
    invocations: Vec<f64>,
}

struct LedgerFile {
    path: PathBuf,
    ledger: std::cell::RefCell<WallLedger>,
    start: Instant,
}

impl LedgerFile {
    /// Reads the ledger (a missing or unreadable one starts empty) and opens a new entry.
    fn open(out: &Path) -> Self {
        let path = out.join("wall_time.json");
        let mut ledger: WallLedger = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default();
        ledger.invocations.push(0.0);
        LedgerFile {
            path,
            ledger: std::cell::RefCell::new(ledger),
            start: Instant::now(),
        }
    }

    /// Records this invocation's time so far; returns (total over invocations, count).
    fn tick(&self) -> Result<(f64, usize)> {
        let mut l = self.ledger.borrow_mut();
        if let Some(last) = l.invocations.last_mut() {
            *last = self.start.elapsed().as_secs_f64();
        }
        write_atomically(&self.path, serde_json::to_string_pretty(&*l)?.as_bytes())?;
        Ok((l.invocations.iter().sum(), l.invocations.len()))
    }
}

struct Runner<'a> {
    args: &'a CompareArgs,
    exe: PathBuf,
    ledger: &'a LedgerFile,
}

impl Runner<'_> {
    fn dir(&self, arm: &Arm) -> PathBuf {
        self.args
            .out
            .join("runs")
            .join(arm.table)
            .join(file_safe(&arm.name))
    }

    fn image_flags(&self) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(p) = self.args.image.image_processor {
            v.push("--image-processor".into());
            v.push(p.to_possible_value().expect("named").get_name().to_string());
        }
        if let Some(s) = self.args.image.image_size {
            v.push("--image-size".into());
            v.push(s.to_string());
        }
        v
    }

    fn child(&self, args: &[String], log: &Path) -> Result<()> {
        let out = Command::new(&self.exe)
            .args(args)
            .output()
            .with_context(|| format!("cannot start {}", self.exe.display()))?;
        self.ledger.tick()?;
        let mut text = String::from_utf8_lossy(&out.stdout).to_string();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        std::fs::write(log, &text).with_context(|| format!("{}: cannot write", log.display()))?;
        if !out.status.success() {
            let last = text
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("(no output)");
            bail!(
                "`lntune {}` failed: {last} (log: {})",
                args.first().map(String::as_str).unwrap_or(""),
                log.display()
            );
        }
        Ok(())
    }

    /// Trains the arm unless its summary exists (resuming from a checkpoint if one does).
    fn train(&self, arm: &Arm, grad_stats: bool) -> Result<bool> {
        let dir = self.dir(arm);
        if dir.join("summary.json").is_file() && dir.join("adapter/adapter.json").is_file() {
            return Ok(false);
        }
        let a = self.args;
        let mut args: Vec<String> = vec![
            "train".into(),
            "--model".into(),
            a.model.display().to_string(),
        ];
        args.extend([
            "--data".into(),
            arm.data.clone(),
            "--method".into(),
            arm.method.name().into(),
        ]);
        args.extend(arm.method_flags.iter().cloned());
        args.extend([
            "--lr".into(),
            arm.lr.to_string(),
            "--batch".into(),
            a.batch.to_string(),
        ]);
        args.extend([
            "--grad-accum".into(),
            a.grad_accum.to_string(),
            "--max-length".into(),
            a.max_length.to_string(),
        ]);
        args.extend([
            "--seed".into(),
            a.seed.to_string(),
            "--out".into(),
            dir.display().to_string(),
            "--quiet".into(),
        ]);
        if let Some(i) = &a.images {
            args.extend(["--images".into(), i.display().to_string()]);
        }
        if let Some(s) = a.steps {
            args.extend([
                "--steps".into(),
                s.to_string(),
                "--save-every".into(),
                (s / 4).max(5).to_string(),
            ]);
        }
        if let Some(t) = a.template {
            args.extend([
                "--template".into(),
                t.to_possible_value().expect("named").get_name().to_string(),
            ]);
        }
        if let Some(init) = &a.init_adapter {
            args.extend(["--init-adapter".into(), init.display().to_string()]);
        }
        if let Some(v) = &arm.val {
            args.extend(["--val-data".into(), v.clone()]);
        }
        if grad_stats {
            // about five windows per run
            let window = a.steps.map(|s| (s / 5).max(2)).unwrap_or(10);
            args.extend([
                "--log-grad-stats".into(),
                "--grad-stats-subset".into(),
                "projector".into(),
            ]);
            args.extend(["--grad-stats-window".into(), window.to_string()]);
        }
        if dir.join("checkpoints").is_dir() {
            args.extend(["--resume".into(), dir.display().to_string()]);
        }
        args.extend(self.image_flags());
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
        self.child(&args, &dir.join("train.log"))?;
        // a finished arm needs no resume point (full finetuning's are gigabytes)
        let _ = std::fs::remove_dir_all(dir.join("checkpoints"));
        Ok(true)
    }

    /// Evaluates the arm's adapter unless its scores exist.
    fn eval(&self, arm: &Arm) -> Result<bool> {
        let dir = self.dir(arm);
        if dir.join("eval/scores.json").is_file() {
            return Ok(false);
        }
        let a = self.args;
        let mut args: Vec<String> = vec![
            "eval".into(),
            "--model".into(),
            a.model.display().to_string(),
        ];
        args.extend([
            "--adapter".into(),
            dir.join("adapter").display().to_string(),
        ]);
        args.extend(["--bench".into(), format!("{:?}", a.bench).to_lowercase()]);
        args.extend([
            "--data".into(),
            a.eval_data.display().to_string(),
            "--out".into(),
            dir.join("eval").display().to_string(),
        ]);
        args.extend([
            "--batch".into(),
            a.eval_batch.to_string(),
            "--seed".into(),
            a.seed.to_string(),
            "--quiet".into(),
        ]);
        if let Some(i) = &a.eval_images {
            args.extend(["--images".into(), i.display().to_string()]);
        }
        if let Some(x) = &a.eval_annotations {
            args.extend(["--annotations".into(), x.display().to_string()]);
        }
        if let Some(n) = a.eval_limit {
            args.extend(["--limit".into(), n.to_string()]);
        }
        if let Some(t) = a.template {
            args.extend([
                "--template".into(),
                t.to_possible_value().expect("named").get_name().to_string(),
            ]);
        }
        if let Some(c) = &a.caption_prompt {
            args.extend(["--caption-prompt".into(), c.clone()]);
        }
        args.extend(self.image_flags());
        self.child(&args, &dir.join("eval.log"))?;
        Ok(true)
    }

    fn result(&self, arm: &Arm) -> Result<ArmResult> {
        let dir = self.dir(arm);
        let summary: RunSummary = crate::model::config::read_json(&dir.join("summary.json"))?;
        let scores: Option<Scores> = if arm.evaluate {
            Some(crate::model::config::read_json(
                &dir.join("eval/scores.json"),
            )?)
        } else {
            None
        };
        let loss_curve = std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| Some((v["step"].as_u64()? as usize, v["loss"].as_f64()?)))
            .collect();
        Ok(ArmResult {
            name: arm.name.clone(),
            method: arm.method.name().into(),
            lr: arm.lr,
            summary,
            scores,
            loss_curve,
        })
    }
}

/// The score columns of a benchmark's scores: (name, value), the headline first.
pub fn score_columns(s: &Scores) -> Vec<(String, f64)> {
    let mut v = Vec::new();
    if let Some(q) = &s.vqav2 {
        v.push(("VQA acc".to_string(), q.overall));
    }
    if !s.pope.is_empty() {
        let n = s.pope.len() as f64;
        v.push((
            "POPE acc".to_string(),
            100.0 * s.pope.values().map(|m| m.accuracy).sum::<f64>() / n,
        ));
        v.push((
            "POPE F1".to_string(),
            100.0
                * s.pope
                    .values()
                    .map(|m| if m.f1.is_finite() { m.f1 } else { 0.0 })
                    .sum::<f64>()
                / n,
        ));
    }
    if let Some(m) = &s.mme {
        v.push(("MME".to_string(), m.perception + m.cognition));
    }
    if let Some(c) = &s.captions {
        v.push(("CIDEr".to_string(), c.cider));
    }
    v
}

fn methods_table(rows: &[ArmResult], with_lr: bool) -> String {
    let cols: Vec<String> = rows
        .iter()
        .find_map(|r| r.scores.as_ref())
        .map(|s| score_columns(s).into_iter().map(|c| c.0).collect())
        .unwrap_or_default();
    let mut s = String::from("| method |");
    if with_lr {
        s.push_str(" lr |");
    }
    s.push_str(" trainable params | trainable % |");
    for c in &cols {
        s.push_str(&format!(" {c} |"));
    }
    s.push('\n');
    s.push_str(&"|---".repeat(3 + cols.len() + usize::from(with_lr)));
    s.push_str("|\n");
    for r in rows {
        s.push_str(&format!("| {} |", r.name));
        if with_lr {
            s.push_str(&format!(" {:.0e} |", r.lr));
        }
        s.push_str(&format!(
            " {} | {:.3} |",
            r.summary.trainable_params, r.summary.trainable_percent
        ));
        let vals = r.scores.as_ref().map(score_columns).unwrap_or_default();
        for c in &cols {
            match vals.iter().find(|v| &v.0 == c) {
                Some((_, x)) => s.push_str(&format!(" {x:.2} |")),
                None => s.push_str(" - |"),
            }
        }
        s.push('\n');
    }
    s
}

fn efficiency_table(rows: &[ArmResult]) -> String {
    let mut s = String::from(
        "| method | lr | peak memory (MiB) | median step (s) | tokens/s | final train loss | validation loss | train wall (s) |\n|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let m = &r.summary;
        s.push_str(&format!(
            "| {} | {:.0e} | {:.0} | {:.2} | {:.0} | {:.4} | {} | {:.0} |\n",
            r.name,
            r.lr,
            m.peak_rss_mib,
            m.median_step_s,
            m.median_tokens_per_s,
            m.final_loss,
            m.val_loss
                .map(|v| format!("{v:.4}"))
                .unwrap_or_else(|| "-".into()),
            m.wall_s
        ));
    }
    s
}

/// Loss per step is noisy (batches differ in length and kind), so each arm is drawn as a
/// trailing mean over `LOSS_WINDOW` steps; the raw values are in each arm's metrics.jsonl.
const LOSS_WINDOW: usize = 8;

fn loss_chart(title: &str, rows: &[ArmResult]) -> Chart {
    Chart {
        title: format!("{title} (mean of {LOSS_WINDOW} steps)"),
        x_label: "step".into(),
        y_label: "loss".into(),
        series: rows
            .iter()
            .map(|r| Series {
                label: r.name.clone(),
                points: trailing_mean(
                    &r.loss_curve
                        .iter()
                        .map(|&(s, l)| (s as f64, l))
                        .collect::<Vec<_>>(),
                    LOSS_WINDOW,
                ),
                scatter: false,
            })
            .collect(),
        log_x: false,
    }
}

pub fn run(args: CompareArgs) -> Result<()> {
    let a = &args;
    if a.batch == 0 || a.grad_accum == 0 {
        bail!("--batch and --grad-accum must be positive");
    }
    let methods: Vec<Method> = a
        .methods
        .split(',')
        .filter(|m| !m.trim().is_empty())
        .map(|m| {
            Method::from_str(m.trim(), true)
                .map_err(|_| anyhow::anyhow!("--methods: unknown method `{m}`"))
        })
        .collect::<Result<_>>()?;
    if methods.is_empty() {
        bail!("--methods is empty");
    }
    let lrs = parse_lrs(a.lr.as_deref())?;
    let lr_of = |m: Method| {
        lrs.iter()
            .find(|(x, _)| *x == m)
            .map(|x| x.1)
            .unwrap_or(default_lr(m))
    };
    let factors: Vec<f64> = a
        .sweep_factors
        .split(',')
        .map(|f| {
            f.trim()
                .parse::<f64>()
                .map_err(|_| anyhow::anyhow!("--sweep-factors: `{f}` is not a number"))
        })
        .collect::<Result<_>>()?;
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("{}: cannot create", a.out.display()))?;
    let freeze = |m: Method| -> Vec<String> {
        if a.freeze_embed_head && !matches!(m, Method::LnSimple | Method::Projector | Method::Full)
        {
            vec!["--freeze-embed".into(), "--freeze-head".into()]
        } else {
            vec![]
        }
    };

    // the sweep's split: validation = the first --val-samples of the shuffled mixture
    let (train_data, val_data) = if a.lr_sweep {
        let samples = load_mixture(&DataSource::parse_list(&a.data)?, a.seed)?;
        if samples.len() <= a.val_samples {
            bail!(
                "--data has {} samples; the sweep holds out --val-samples {}",
                samples.len(),
                a.val_samples
            );
        }
        let (val, train) = samples.split_at(a.val_samples);
        let d = a.out.join("data");
        write_atomically(
            &d.join("train.json"),
            serde_json::to_string(train)?.as_bytes(),
        )?;
        write_atomically(&d.join("val.json"), serde_json::to_string(val)?.as_bytes())?;
        (
            d.join("train.json").display().to_string(),
            Some(d.join("val.json").display().to_string()),
        )
    } else {
        (a.data.clone(), None)
    };

    let mut sweep_arms: Vec<Vec<Arm>> = Vec::new();
    for &m in &methods {
        let base = lr_of(m);
        let lrs: Vec<f64> = if a.lr_sweep {
            factors.iter().map(|f| base * f).collect()
        } else {
            vec![base]
        };
        sweep_arms.push(
            lrs.iter()
                .map(|&lr| Arm {
                    table: "methods",
                    name: if a.lr_sweep {
                        format!("{}/{}", m.name(), lr_label(lr))
                    } else {
                        m.name().to_string()
                    },
                    method: m,
                    method_flags: freeze(m),
                    lr,
                    data: train_data.clone(),
                    val: val_data.clone(),
                    evaluate: !a.lr_sweep,
                })
                .collect(),
        );
    }
    let mut ablation_arms: Vec<Arm> = Vec::new();
    // the connector ablation's "ln + connector" arm is the `ln` method arm when that one
    // trains the same tensors at the same rate on the same data: its result is reused
    let no_embed = vec!["--freeze-embed".to_string(), "--freeze-head".to_string()];
    let reuse_ln = a.ablation.contains(&Ablation::Connector)
        && !a.lr_sweep
        && methods.contains(&Method::Ln)
        && freeze(Method::Ln) == no_embed;
    if a.ablation.contains(&Ablation::Connector) {
        let ln_lr = lr_of(Method::Ln);
        for (name, method, mut flags, lr) in [
            ("ln + connector", Method::Ln, no_embed.clone(), ln_lr),
            ("ln only", Method::Ln, no_embed.clone(), ln_lr),
            (
                "connector only",
                Method::Projector,
                vec![],
                lr_of(Method::Projector).min(ln_lr * 4.0),
            ),
        ] {
            if name == "ln + connector" && reuse_ln {
                continue;
            }
            if name == "ln only" {
                flags.push("--freeze-projector".into());
            }
            ablation_arms.push(Arm {
                table: "connector",
                name: name.into(),
                method,
                method_flags: flags,
                lr,
                data: a.data.clone(),
                val: None,
                evaluate: true,
            });
        }
    }
    if a.ablation.contains(&Ablation::DataType) {
        let spec = a
            .data_types
            .as_deref()
            .context("--ablation data-type needs --data-types KIND=FILE,...")?;
        let kinds: Vec<(String, String)> = spec
            .split(',')
            .map(|p| {
                p.split_once('=')
                    .map(|(k, f)| (k.trim().to_string(), f.trim().to_string()))
                    .with_context(|| format!("--data-types `{p}`: expected KIND=FILE"))
            })
            .collect::<Result<_>>()?;
        if kinds.is_empty() {
            bail!("--data-types is empty");
        }
        let n = a.data_type_samples;
        for (k, f) in &kinds {
            ablation_arms.push(Arm {
                table: "data-type",
                name: k.clone(),
                method: Method::Ln,
                method_flags: freeze(Method::Ln),
                lr: lr_of(Method::Ln),
                data: format!("{f}:{n}"),
                val: None,
                evaluate: true,
            });
        }
        let per = n / kinds.len();
        ablation_arms.push(Arm {
            table: "data-type",
            name: "mixed".into(),
            method: Method::Ln,
            method_flags: freeze(Method::Ln),
            lr: lr_of(Method::Ln),
            data: kinds
                .iter()
                .map(|(_, f)| format!("{f}:{per}"))
                .collect::<Vec<_>>()
                .join(","),
            val: None,
            evaluate: true,
        });
    }

    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("{}: cannot create", a.out.display()))?;
    let ledger = LedgerFile::open(&a.out);
    let runner = Runner {
        args: a,
        exe: std::env::current_exe().context("cannot find the lntune executable")?,
        ledger: &ledger,
    };
    let n_stages: usize = sweep_arms.iter().map(|v| v.len() + 1).sum::<usize>()
        + 2 * ablation_arms.len()
        + if a.no_analysis { 0 } else { 1 };
    let bar = progress_bar(n_stages as u64, 0, !a.quiet, "compare");
    let step = |what: String, ran: bool| {
        bar.set_message(what.clone());
        bar.inc(1);
        if bar.is_hidden() {
            eprintln!(
                "{} {what}",
                if ran { "done" } else { "skip (already done)" }
            );
        }
    };

    // the methods (and their sweeps)
    let mut methods_rows = Vec::new();
    let mut sweep_rows = Vec::new();
    for arms in &mut sweep_arms {
        for arm in arms.iter() {
            let ran = runner.train(arm, arm.method != Method::LnSimple)?;
            step(format!("train {}", arm.name), ran);
        }
        // the sweep keeps the lowest validation loss
        let chosen = if a.lr_sweep {
            let mut best: Option<(f64, usize)> = None;
            for (i, arm) in arms.iter().enumerate() {
                let r = runner.result(arm)?;
                sweep_rows.push(r.clone());
                let v = r.summary.val_loss.unwrap_or(f64::INFINITY);
                if best.is_none_or(|(b, _)| v < b) {
                    best = Some((v, i));
                }
            }
            best.map(|b| b.1).unwrap_or(0)
        } else {
            0
        };
        let arm = &mut arms[chosen];
        arm.evaluate = true;
        let ran = runner.eval(arm)?;
        step(format!("eval {}", arm.name), ran);
        let mut r = runner.result(arm)?;
        r.name = arm.method.name().to_string();
        methods_rows.push(r);
    }
    let mut connector = Vec::new();
    let mut data_type = Vec::new();
    if reuse_ln {
        let mut r = methods_rows
            .iter()
            .find(|r| r.method == Method::Ln.name())
            .cloned()
            .context("the ln method arm has no result")?;
        r.name = "ln + connector".into();
        connector.push(r);
    }
    for arm in &ablation_arms {
        let ran = runner.train(arm, false)?;
        step(format!("train {}/{}", arm.table, arm.name), ran);
        let ran = runner.eval(arm)?;
        step(format!("eval {}/{}", arm.table, arm.name), ran);
        let r = runner.result(arm)?;
        if arm.table == "connector" {
            connector.push(r)
        } else {
            data_type.push(r)
        }
    }

    // analyses: layer similarity of the stage-1 model and every method; gradient variance of
    // the projector gradient (trained by every method but ln-simple)
    let (mut similarity, mut grad_rows) = (None, Vec::new());
    if !a.no_analysis {
        let dir = a.out.join("analysis");
        let sim_json = dir.join("similarity/similarity.json");
        let ran = if sim_json.is_file() {
            false
        } else {
            let mut args: Vec<String> = vec![
                "analyze".into(),
                "similarity".into(),
                "--model".into(),
                a.model.display().to_string(),
            ];
            match &a.init_adapter {
                Some(init) => args.extend([
                    "--base".into(),
                    "false".into(),
                    "--adapter".into(),
                    format!("stage-1={}", init.display()),
                ]),
                None => args.extend(["--base".into(), "true".into()]),
            }
            for (arms, row) in sweep_arms.iter().zip(&methods_rows) {
                let arm = arms.iter().find(|x| x.evaluate).expect("one chosen arm");
                args.extend([
                    "--adapter".into(),
                    format!("{}={}", row.name, runner.dir(arm).join("adapter").display()),
                ]);
            }
            args.extend([
                "--data".into(),
                val_data.clone().unwrap_or_else(|| a.data.clone()),
                "--samples".into(),
                a.similarity_samples.to_string(),
            ]);
            args.extend([
                "--max-length".into(),
                a.max_length.to_string(),
                "--out".into(),
                dir.join("similarity").display().to_string(),
            ]);
            if let Some(i) = &a.images {
                args.extend(["--images".into(), i.display().to_string()]);
            }
            if let Some(t) = a.template {
                args.extend([
                    "--template".into(),
                    t.to_possible_value().expect("named").get_name().to_string(),
                ]);
            }
            args.extend(runner.image_flags());
            std::fs::create_dir_all(&dir)?;
            runner.child(&args, &dir.join("similarity.log"))?;
            true
        };
        step("analysis".into(), ran);
        similarity = Some(crate::model::config::read_json::<SimilarityReport>(
            &sim_json,
        )?);
        let runs: Vec<(String, PathBuf)> = sweep_arms
            .iter()
            .zip(&methods_rows)
            .filter(|(arms, _)| arms[0].method != Method::LnSimple)
            .map(|(arms, row)| {
                (
                    row.name.clone(),
                    runner.dir(arms.iter().find(|x| x.evaluate).expect("chosen")),
                )
            })
            .collect();
        if !runs.is_empty() {
            let rows: Vec<GradvarRun> = gradvar(&runs, &dir.join("gradvar"))?;
            grad_rows = rows
                .into_iter()
                .map(|r| GradvarSummary {
                    name: r.name,
                    subset: r.subset,
                    dim: r.dim,
                    mean_window_var: r.mean_window_var,
                    mean_microbatch_var: r.mean_microbatch_var,
                    mean_norm: r.mean_norm,
                })
                .collect();
        }
    }
    bar.finish_and_clear();

    let (wall_s, invocations) = ledger.tick()?;
    let report = CompareReport {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine: machine(),
        wall_s,
        invocations,
        train_wall_s: methods_rows
            .iter()
            .chain(&sweep_rows)
            .chain(&connector)
            .chain(&data_type)
            .map(|r| r.summary.wall_s)
            .sum(),
        methods: methods_rows,
        lr_sweep: sweep_rows,
        connector,
        data_type,
        similarity,
        gradvar: grad_rows,
    };
    write_report(&report, &a.out)?;
    print!("{}", std::fs::read_to_string(a.out.join("report.md"))?);
    Ok(())
}

/// Writes report.md, report.json and the plots.
pub fn write_report(r: &CompareReport, out: &Path) -> Result<()> {
    let mut md = String::from("# lntune compare\n\n");
    md.push_str(&format!("Command: `{}`\n\nMachine: {}. Wall time {:.0} s over {} invocation(s) (`wall_time.json`); training time of all arms {:.0} s.\n\n", r.command, r.machine, r.wall_s, r.invocations, r.train_wall_s));
    md.push_str("## Quality (the shape of the paper's Table 1)\n\n");
    md.push_str(&methods_table(&r.methods, false));
    md.push_str("\n## Cost (the shape of the paper's Table 2)\n\n");
    md.push_str(&efficiency_table(&r.methods));
    if !r.lr_sweep.is_empty() {
        md.push_str(
            "\n## Learning-rate sweep (validation loss; the lowest per method is kept)\n\n",
        );
        md.push_str(&efficiency_table(&r.lr_sweep));
    }
    if !r.connector.is_empty() {
        md.push_str("\n## Ablation: connector\n\n");
        md.push_str(&methods_table(&r.connector, true));
        md.push('\n');
        md.push_str(&efficiency_table(&r.connector));
    }
    if !r.data_type.is_empty() {
        md.push_str("\n## Ablation: data type (LN tuning, equal sample budgets)\n\n");
        md.push_str(&methods_table(&r.data_type, false));
        md.push('\n');
        md.push_str(&efficiency_table(&r.data_type));
    }
    if let Some(s) = &r.similarity {
        md.push_str("\n## Layer similarity (lower: more expressive, in the paper's reading)\n\n");
        md.push_str(&s.markdown());
        md.push_str("\nHeatmaps: `analysis/similarity/similarity_<model>.png`.\n");
    }
    if !r.gradvar.is_empty() {
        md.push_str("\n## Gradient variance\n\n");
        let rows: Vec<GradvarRun> = r
            .gradvar
            .iter()
            .map(|g| GradvarRun {
                name: g.name.clone(),
                subset: g.subset.clone(),
                dim: g.dim,
                mean_window_var: g.mean_window_var,
                mean_microbatch_var: g.mean_microbatch_var,
                mean_norm: g.mean_norm,
                lines: vec![],
            })
            .collect();
        md.push_str(&super::analyze::gradvar_markdown(&rows));
        md.push_str("\nPlots: `analysis/gradvar/gradvar_steps.png`, `analysis/gradvar/gradvar_microbatch.png`.\n");
    }
    md.push_str("\nPlots: `loss_curves.png`, `score_vs_trainable.png`, `score_vs_memory.png`");
    md.push_str(if r.connector.is_empty() {
        ""
    } else {
        ", `ablation_connector.png`"
    });
    md.push_str(if r.data_type.is_empty() {
        ""
    } else {
        ", `ablation_data_type.png`"
    });
    md.push_str(".\n");
    write_atomically(&out.join("report.md"), md.as_bytes())?;
    write_atomically(
        &out.join("report.json"),
        serde_json::to_string_pretty(r)?.as_bytes(),
    )?;

    loss_chart("training loss per method", &r.methods).save_png(&out.join("loss_curves.png"))?;
    let headline = r
        .methods
        .iter()
        .find_map(|m| m.scores.as_ref())
        .and_then(|s| score_columns(s).first().map(|c| c.0.clone()))
        .unwrap_or_else(|| "score".into());
    let scatter = |x_label: &str, x: &dyn Fn(&ArmResult) -> f64, log_x: bool| Chart {
        title: format!("{headline} vs {x_label}"),
        x_label: x_label.into(),
        y_label: headline.clone(),
        series: r
            .methods
            .iter()
            .map(|m| Series {
                label: m.name.clone(),
                points: vec![(
                    x(m),
                    m.scores
                        .as_ref()
                        .and_then(|s| score_columns(s).first().map(|c| c.1))
                        .unwrap_or(f64::NAN),
                )],
                scatter: true,
            })
            .collect(),
        log_x,
    };
    scatter("trainable %", &|m| m.summary.trainable_percent, true)
        .save_png(&out.join("score_vs_trainable.png"))?;
    scatter("peak memory MiB", &|m| m.summary.peak_rss_mib, false)
        .save_png(&out.join("score_vs_memory.png"))?;
    if !r.connector.is_empty() {
        loss_chart("connector ablation: training loss", &r.connector)
            .save_png(&out.join("ablation_connector.png"))?;
    }
    if !r.data_type.is_empty() {
        loss_chart("data-type ablation: training loss", &r.data_type)
            .save_png(&out.join("ablation_data_type.png"))?;
    }
    Ok(())
}
