//! Gradient variance of training runs: reads the `grad_stats.jsonl` that `lntune train
//! --log-grad-stats` wrote (see `train::grad_stats`), averages each run's variances, and
//! writes a table, JSON and two plots (across steps, across micro-batches).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::train::grad_stats::GradStatLine;
use crate::util::files::{parse_jsonl, write_atomically, write_json};
use crate::util::plot::{Chart, Series};

/// One run's gradient variance, averaged over its steps.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GradvarRun {
    pub name: String,
    pub subset: String,
    pub dim: usize,
    /// mean of the across-steps window variances
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_window_var: Option<f64>,
    /// mean of the per-step across-micro-batch variances
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_microbatch_var: Option<f64>,
    pub mean_norm: f64,
    /// the per-step lines (left out of summaries such as compare's report)
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lines: Vec<GradStatLine>,
}

/// Reads a run's grad_stats.jsonl.
pub fn read_grad_stats(dir: &Path) -> Result<Vec<GradStatLine>> {
    let f = dir.join("grad_stats.jsonl");
    let text = std::fs::read_to_string(&f)
        .with_context(|| format!("{}: cannot read (train with --log-grad-stats)", f.display()))?;
    parse_jsonl(&text, &f)
}

fn mean_of(v: impl Iterator<Item = f64>) -> Option<f64> {
    let v: Vec<f64> = v.collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// Aggregates the runs `(name, run folder)` and writes gradvar.json, gradvar.md,
/// gradvar_steps.png and gradvar_microbatch.png under `out`.
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
                intervals: vec![],
            })
            .collect(),
        log_x: false,
        x_names: vec![],
    };
    chart("gradient variance across steps", "mean var", &|l| {
        l.window_var
    })
    .save_png(&out.join("gradvar_steps.png"))?;
    chart("gradient variance across micro-batches", "mean var", &|l| {
        l.microbatch_var
    })
    .save_png(&out.join("gradvar_microbatch.png"))?;
    write_json(&out.join("gradvar.json"), &rows)?;
    write_atomically(&out.join("gradvar.md"), gradvar_markdown(&rows).as_bytes())?;
    Ok(rows)
}

/// The table of `rows` in Markdown.
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
