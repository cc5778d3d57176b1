//! Running a comparison's arms: each training and each evaluation is a child process of
//! this executable (`lntune train --config`, `lntune eval --config`), so that peak memory is
//! measured per arm and an interrupted comparison resumes where it stopped: an arm whose
//! `summary.json` and `eval/scores.json` exist is not run again, a half-trained arm resumes
//! from its last checkpoint, and a half-done evaluation skips the questions it answered.
//! A ledger in `wall_time.json` sums the wall time of every invocation.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::arms::Arm;
use super::config::CompareConfig;
use super::report::ArmResult;
use crate::eval::benchmarks::scores::Scores;
use crate::eval::run::EvalConfig;
use crate::train::run::{GradStatsConfig, RunConfig, RunSummary};
use crate::util::file_safe;
use crate::util::files::{read_json, read_text, write_atomically, write_json};

/// Wall time of every invocation of a comparison, kept in `--out/wall_time.json` and
/// rewritten after every child process, so that the report of a resumed comparison counts
/// the invocations before it (an interrupted one up to its last finished child).
#[derive(Debug, Default, Serialize, Deserialize)]
struct WallLedger {
    invocations: Vec<f64>,
}

pub struct LedgerFile {
    path: PathBuf,
    ledger: RefCell<WallLedger>,
    start: Instant,
}

impl LedgerFile {
    /// Reads the ledger (a missing or unreadable one starts empty) and opens a new entry.
    pub fn open(out: &Path) -> Self {
        let path = out.join("wall_time.json");
        let mut ledger: WallLedger = read_json(&path).unwrap_or_default();
        ledger.invocations.push(0.0);
        LedgerFile {
            path,
            ledger: RefCell::new(ledger),
            start: Instant::now(),
        }
    }

    /// Records this invocation's time so far; returns (total over invocations, count).
    pub fn tick(&self) -> Result<(f64, usize)> {
        let mut l = self.ledger.borrow_mut();
        if let Some(last) = l.invocations.last_mut() {
            *last = self.start.elapsed().as_secs_f64();
        }
        write_json(&self.path, &*l)?;
        Ok((l.invocations.iter().sum(), l.invocations.len()))
    }
}

pub struct Runner<'a> {
    pub cfg: &'a CompareConfig,
    pub exe: PathBuf,
    pub ledger: &'a LedgerFile,
}

impl Runner<'_> {
    /// The arm's folder: `runs/<table>/<arm>`.
    pub fn dir(&self, arm: &Arm) -> PathBuf {
        self.cfg
            .out
            .join("runs")
            .join(arm.table)
            .join(file_safe(&arm.name))
    }

    /// Runs `lntune <args>`, its output kept in `log`; a failure names the log's last line.
    fn child(&self, args: &[String], log: &Path) -> Result<()> {
        let out = Command::new(&self.exe)
            .args(args)
            .args(["--device", &self.cfg.device.name()])
            .output()
            .with_context(|| format!("cannot start {}", self.exe.display()))?;
        self.ledger.tick()?;
        let mut text = String::from_utf8_lossy(&out.stdout).to_string();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        write_atomically(log, text.as_bytes())?;
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

    /// The arm's training run.
    fn run_config(&self, arm: &Arm, grad_stats: bool) -> RunConfig {
        let c = self.cfg;
        RunConfig {
            model: c.model.clone(),
            data: arm.data.clone(),
            val_data: arm.val.clone(),
            images: c.images.clone(),
            method: arm.method.clone(),
            template: c.template,
            lr: Some(arm.lr),
            // a token-budget arm trains its epochs, whatever `--steps` says
            steps: c.steps.filter(|_| arm.epochs.is_none()),
            epochs: arm.epochs.unwrap_or(1.0),
            save_every: c
                .steps
                .filter(|_| arm.epochs.is_none())
                .map(|s| (s / 4).max(5)),
            batch: c.batch,
            grad_accum: c.grad_accum,
            max_length: c.max_length,
            seed: arm.seed,
            init_adapter: c.init_adapter.clone(),
            image: c.image.clone(),
            feature_dir: Some(c.out.join("features")),
            // about five windows per run
            grad_stats: grad_stats.then(|| GradStatsConfig {
                subset: "projector".into(),
                window: c.steps.map(|s| (s / 5).max(2)).unwrap_or(10),
            }),
            ..RunConfig::default()
        }
    }

    /// Trains the arm unless its summary exists (resuming from a checkpoint if one does).
    pub fn train(&self, arm: &Arm, grad_stats: bool) -> Result<bool> {
        let dir = self.dir(arm);
        if dir.join("summary.json").is_file()
            && (dir.join("adapter/adapter.json").is_file() || self.needs_no_adapter(arm))
        {
            return Ok(false);
        }
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
        let config = dir.join("run.json");
        write_json(&config, &self.run_config(arm, grad_stats))?;
        let mut args: Vec<String> = vec![
            "train".into(),
            "--config".into(),
            config.display().to_string(),
            "--out".into(),
            dir.display().to_string(),
            "--quiet".into(),
        ];
        // a layer similarity kept from an earlier training of this arm is not this one's
        let _ = std::fs::remove_file(dir.join("similarity.json"));
        // the comparison owns the arm's folder: a run with a checkpoint continues, anything
        // else (a run cut before its first checkpoint) starts over
        if dir.join("checkpoints").is_dir() {
            args.extend(["--resume".into(), dir.display().to_string()]);
        } else {
            args.push("--overwrite".into());
        }
        self.child(&args, &dir.join("train.log"))?;
        // a finished arm needs no resume point (full finetuning's are gigabytes)
        let _ = std::fs::remove_dir_all(dir.join("checkpoints"));
        Ok(true)
    }

    /// A finished arm whose adapter is gone (a comparison carried to another machine
    /// without its adapters) is kept when nothing left to do needs the adapter: it is a sweep
    /// candidate (only its validation loss counts), or its scores on every benchmark and,
    /// for a method's arm at the first seed with the analyses on, its layer similarity are
    /// there.
    fn needs_no_adapter(&self, arm: &Arm) -> bool {
        let dir = self.dir(arm);
        let c = self.cfg;
        if !arm.evaluate {
            return true;
        }
        let scored = std::iter::once("eval".to_string())
            .chain(
                c.also_eval
                    .iter()
                    .map(|b| format!("eval-{}", b.bench.name())),
            )
            .all(|e| dir.join(e).join("scores.json").is_file());
        let analysed = !c.analysis
            || arm.table != "methods"
            || arm.seed != c.seed
            || dir.join("similarity.json").is_file();
        scored && analysed
    }

    /// Evaluates the arm's adapter on every benchmark whose scores do not exist yet: the
    /// main one in `eval/`, each `--also-eval` one in `eval-<bench>/`.
    pub fn eval(&self, arm: &Arm) -> Result<bool> {
        let dir = self.dir(arm);
        let c = self.cfg;
        let mut ran = false;
        let benches = std::iter::once((String::from("eval"), c.eval.bench.clone())).chain(
            c.also_eval
                .iter()
                .map(|b| (format!("eval-{}", b.bench.name()), b.clone())),
        );
        for (out, bench) in benches {
            if dir.join(&out).join("scores.json").is_file() {
                continue;
            }
            let eval = EvalConfig {
                adapter: Some(dir.join("adapter")),
                bench,
                ..c.eval.clone()
            };
            let config = dir.join(format!("{out}_config.json"));
            write_json(&config, &eval)?;
            let args: Vec<String> = vec![
                "eval".into(),
                "--config".into(),
                config.display().to_string(),
                "--out".into(),
                dir.join(&out).display().to_string(),
                "--quiet".into(),
            ];
            self.child(&args, &dir.join(format!("{out}.log")))?;
            ran = true;
        }
        Ok(ran)
    }

    /// What the arm's files say: its summary, scores (if evaluated) and loss curve.
    pub fn result(&self, arm: &Arm) -> Result<ArmResult> {
        let dir = self.dir(arm);
        let summary: RunSummary = read_json(&dir.join("summary.json"))?;
        let scores: Option<Scores> = if arm.evaluate {
            Some(read_json(&dir.join("eval/scores.json"))?)
        } else {
            None
        };
        let mut more_scores = std::collections::BTreeMap::new();
        if arm.evaluate {
            for b in &self.cfg.also_eval {
                let f = dir.join(format!("eval-{}/scores.json", b.bench.name()));
                more_scores.insert(b.bench.name().to_string(), read_json::<Scores>(&f)?);
            }
        }
        let loss_curve = read_text(&dir.join("metrics.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| Some((v["step"].as_u64()? as usize, v["loss"].as_f64()?)))
            .collect();
        Ok(ArmResult {
            name: arm.name.clone(),
            method: arm.method.method.name().into(),
            lr: arm.lr,
            summary,
            scores,
            more_scores,
            loss_curve,
        })
    }
}
