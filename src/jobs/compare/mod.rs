//! `lntune compare`: the paper's comparison rerun on the user's model and data. Each arm (a
//! method, a learning rate of the sweep, an ablation setting) is one training and one
//! evaluation (child processes, see `runner`), then the layer-similarity and
//! gradient-variance analyses, then the report.
//!
//! Layout of the output folder: `data/` (the train/validation split of a sweep),
//! `runs/<table>/<arm>/` (run.json, train outputs, eval_config.json, `eval/`), `analysis/`
//! (similarity, gradient variance), `report.md`, `report.json`, `wall_time.json` (each
//! invocation's wall time), and the plots. Files: `config` (what a comparison is given),
//! `arms` (the plan), `runner` (running arms), `report` (tables and plots); the pipeline is
//! here.

mod arms;
mod claims;
mod config;
mod report;
mod runner;
mod token_budget;

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use candle_core::DType;

use crate::analyze::gradvar::gradvar;
use crate::analyze::similarity::{
    LayerSimilarity, SimilarityConfig, SimilarityReport, one_model_similarity,
    write_similarity_report,
};
use crate::data::llava::{DataSource, load_mixture};
use crate::methods::Method;
use crate::util::checks;
use crate::util::files::{FolderLock, read_text, write_atomically};
use crate::util::process::machine_description;
use crate::util::progress::progress_bar;
pub use arms::parse_data_types;
use arms::{Arm, MethodArms, ablation_arms, lr_of, method_arms, reuses_ln_arm, seed_arm};
pub use config::{Ablation, CompareConfig};
use report::{ArmResult, CompareReport, PairedRow, write_report};
use runner::{LedgerFile, Runner};

/// Runs (or resumes) the comparison and writes its report; returns report.md's text.
pub fn run_compare(cfg: &CompareConfig) -> Result<String> {
    if cfg.batch == 0 || cfg.grad_accum == 0 {
        bail!("--batch and --grad-accum must be positive");
    }
    if cfg.methods.is_empty() {
        bail!("--methods is empty");
    }
    checks::positive_if_set("--steps", cfg.steps)?;
    checks::positive("--max-length", cfg.max_length)?;
    checks::positive("--data-type-samples", cfg.data_type_samples)?;
    checks::positive_if_set("--data-type-tokens", cfg.data_type_tokens)?;
    checks::finite_positive("--data-type-epochs", cfg.data_type_epochs)?;
    if cfg.data_type_tokens.is_some() && !cfg.ablations.contains(&Ablation::DataType) {
        bail!("--data-type-tokens needs --ablation data-type");
    }
    checks::positive("--similarity-samples", cfg.similarity_samples)?;
    if cfg.lr_sweep {
        checks::positive("--val-samples", cfg.val_samples)?;
        for &f in &cfg.sweep_factors {
            checks::finite_positive("--sweep-factors", f)?;
        }
        arms::check_rate_labels(cfg)?;
    }
    cfg.eval.validate()?;
    // every method's trainable set on the model's configs, before any arm runs (a LoRA rank
    // above a projection's width, say)
    let spec = crate::model::spec::ModelSpec::from_path(&cfg.model)?;
    for &m in &cfg.methods {
        if m != Method::Custom {
            arms::method_of(cfg, m)
                .apply(&mut spec.param_specs())
                .with_context(|| format!("--methods {}", m.name()))?;
        }
    }
    // every benchmark's files read before any arm runs (their items pair the arms' answers)
    let benches = benchmark_items(cfg)?;
    let _lock = FolderLock::acquire(&cfg.out)?;
    let (train, val) = sweep_split(cfg)?;
    let mut sweep_arms = method_arms(cfg, &train, &val);
    let token_subsets = match cfg.data_type_tokens {
        Some(n) if cfg.ablations.contains(&Ablation::DataType) => {
            Some(token_budget::token_subsets(cfg, n, cfg.data_type_epochs)?)
        }
        _ => None,
    };
    // the ablations' arms are known now, their LN rate once the ln method's sweep has chosen
    let n_ablation_arms = ablation_arms(cfg, token_subsets.as_deref(), 0.0)?.len();
    let ledger = LedgerFile::open(&cfg.out);
    let runner = Runner {
        cfg,
        exe: std::env::current_exe().context("cannot find the lntune executable")?,
        ledger: &ledger,
    };
    let extra_seeds = cfg.seeds.len().saturating_sub(1);
    let n_stages: usize = sweep_arms
        .iter()
        .map(|v| v.len() + 1 + 2 * extra_seeds)
        .sum::<usize>()
        + 2 * n_ablation_arms
        + usize::from(cfg.analysis);
    let bar = progress_bar(n_stages as u64, 0, cfg.progress, "compare");
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

    // the methods (and their sweeps), then each chosen arm at the other seeds
    let mut methods_rows = Vec::new();
    let mut sweep_rows = Vec::new();
    let mut seed_rows = Vec::new();
    let mut seed_arms: Vec<Vec<Arm>> = Vec::new();
    for arms in &mut sweep_arms {
        let (row, swept) = run_method(&runner, arms, &step)?;
        methods_rows.push(row);
        sweep_rows.extend(swept);
        let first = chosen(arms).clone();
        // the layer similarity of the chosen adapter now, while it is at hand: a comparison
        // carried to another machine without its adapters still completes its analysis
        if cfg.analysis {
            let file = runner.dir(&first).join("similarity.json");
            cached_similarity(
                &runner,
                &file,
                Some(runner.dir(&first).join("adapter")),
                &val,
            )?;
        }
        let mut per_seed = vec![first.clone()];
        for &seed in &cfg.seeds[1..] {
            let arm = seed_arm(&first, seed);
            let ran = runner.train(&arm, arm.method.method != Method::LnSimple)?;
            step(format!("train {}", arm.name), ran);
            let ran = runner.eval(&arm)?;
            step(format!("eval {}", arm.name), ran);
            seed_rows.push(runner.result(&arm)?);
            per_seed.push(arm);
        }
        seed_arms.push(per_seed);
    }
    // the ablations, at the rate the sweep chose for ln (the default rate without one)
    let ln_lr = seed_arms
        .iter()
        .find(|a| a[0].method.method == Method::Ln)
        .map_or_else(|| lr_of(cfg, Method::Ln), |a| a[0].lr);
    let ablations = ablation_arms(cfg, token_subsets.as_deref(), ln_lr)?;
    let mut connector = Vec::new();
    let mut data_type = Vec::new();
    if reuses_ln_arm(cfg) {
        let mut r = methods_rows
            .iter()
            .find(|r| r.method == Method::Ln.name())
            .cloned()
            .context("the ln method arm has no result")?;
        r.name = "ln + connector".into();
        connector.push(r);
    }
    for arm in &ablations {
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
    let (mut similarity_report, mut grad_rows) = (None, Vec::new());
    if cfg.analysis {
        let (sim, ran) = analyse_similarity(&runner, &seed_arms, &methods_rows, &val)?;
        step("analysis".into(), ran);
        similarity_report = Some(sim);
        // every seed's run: the spread across seeds is part of the result
        let runs: Vec<(String, PathBuf)> = seed_arms
            .iter()
            .flatten()
            .filter(|arm| arm.method.method != Method::LnSimple)
            .map(|arm| {
                let name = if arm.seed == cfg.seed {
                    arm.method.method.name().to_string()
                } else {
                    arm.name.clone()
                };
                (name, runner.dir(arm))
            })
            .collect();
        if !runs.is_empty() {
            grad_rows = gradvar(&runs, &cfg.out.join("analysis/gradvar"))?;
            for r in &mut grad_rows {
                r.lines.clear(); // the report keeps the summary; gradvar.json has the lines
            }
        }
    }
    bar.finish_and_clear();
    let paired = paired_against_ln(&runner, &benches, &seed_arms)?;
    // the ablation arms by their report names ("ln + connector" may be the ln method's arm)
    let mut named: Vec<(String, Arm)> = ablations
        .iter()
        .map(|a| (a.name.clone(), a.clone()))
        .collect();
    if reuses_ln_arm(cfg)
        && let Some(ln) = seed_arms.iter().find(|a| a[0].method.method == Method::Ln)
    {
        named.push(("ln + connector".into(), ln[0].clone()));
    }
    let ablation_paired = paired_ablations(&runner, &benches, &named)?;

    let (wall_s, invocations) = ledger.tick()?;
    let report = CompareReport {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine: machine_description(),
        wall_s,
        invocations,
        // every training once: with a sweep its rows hold the chosen arms
        train_wall_s: if cfg.lr_sweep {
            &sweep_rows
        } else {
            &methods_rows
        }
        .iter()
        .chain(&seed_rows)
        // a reused ln arm is the methods table's
        .chain(connector.iter().skip(usize::from(reuses_ln_arm(cfg))))
        .chain(&data_type)
        .map(|r| r.summary.wall_s)
        .sum(),
        methods: methods_rows,
        seed_runs: seed_rows,
        lr_sweep: sweep_rows,
        connector,
        data_type,
        data_type_budgets: token_subsets
            .map(|v| v.into_iter().map(|s| s.budget).collect())
            .unwrap_or_default(),
        similarity: similarity_report,
        gradvar: grad_rows,
        paired,
        ablation_paired,
        claims: vec![],
    };
    let report = CompareReport {
        claims: claims::judge(&report),
        ..report
    };
    write_report(&report, &cfg.out)?;
    read_text(&cfg.out.join("report.md"))
}

/// The training data and the sweep's validation data: without a sweep, all of `--data`;
/// with one, the first `val_samples` of the shuffled mixture are held out (written to
/// `data/val.json`, the rest to `data/train.json`).
fn sweep_split(cfg: &CompareConfig) -> Result<(Vec<DataSource>, Vec<DataSource>)> {
    if !cfg.lr_sweep {
        return Ok((cfg.data.clone(), vec![]));
    }
    let samples = load_mixture(&cfg.data, cfg.seed)?;
    if samples.len() <= cfg.val_samples {
        bail!(
            "--data has {} samples; the sweep holds out --val-samples {}",
            samples.len(),
            cfg.val_samples
        );
    }
    let (val, train) = samples.split_at(cfg.val_samples);
    let d = cfg.out.join("data");
    write_atomically(
        &d.join("train.json"),
        serde_json::to_string(train)?.as_bytes(),
    )?;
    write_atomically(&d.join("val.json"), serde_json::to_string(val)?.as_bytes())?;
    let source = |p: PathBuf| {
        vec![DataSource {
            path: p,
            budget: None,
        }]
    };
    Ok((source(d.join("train.json")), source(d.join("val.json"))))
}

/// Every benchmark's items of the comparison: the main one (its kinds unprefixed) and each
/// --also-eval one (`<bench>/<kind>`), with the arm subfolder its predictions are in.
type BenchItems = Vec<(String, String, Vec<crate::eval::benchmarks::item::Item>)>;

fn benchmark_items(cfg: &CompareConfig) -> Result<BenchItems> {
    let limit = cfg.eval.item_limit();
    let mut benches = vec![(
        String::new(),
        "eval".to_string(),
        crate::eval::benchmarks::load_items(&cfg.eval.bench, &limit, cfg.eval.seed)
            .with_context(|| format!("the {} benchmark", cfg.eval.bench.bench.name()))?,
    )];
    for b in &cfg.also_eval {
        benches.push((
            format!("{}/", b.bench.name()),
            format!("eval-{}", b.bench.name()),
            crate::eval::benchmarks::load_items(b, &limit, cfg.eval.seed)
                .with_context(|| format!("the {} benchmark", b.bench.name()))?,
        ));
    }
    Ok(benches)
}

/// An arm's per-question scores by benchmark, from its predictions (`eval::paired`).
fn arm_item_scores(
    runner: &Runner,
    benches: &BenchItems,
    arm: &Arm,
) -> Result<std::collections::BTreeMap<String, Vec<f64>>> {
    use crate::eval::paired::item_scores;
    use crate::eval::predictions::PredictionLine;
    let mut all = std::collections::BTreeMap::new();
    for (prefix, folder, items) in benches {
        let path = runner.dir(arm).join(folder).join("predictions.jsonl");
        let answers = crate::util::files::read_jsonl::<PredictionLine>(&path)?
            .into_iter()
            .map(|p| (p.id, p.answer))
            .collect();
        let by_kind =
            item_scores(items, &answers).with_context(|| format!("{}", path.display()))?;
        all.extend(
            by_kind
                .into_iter()
                .map(|(k, v)| (format!("{prefix}{k}"), v)),
        );
    }
    Ok(all)
}

/// `other` against `reference` on every benchmark both answered.
fn paired_rows(
    reference: (&str, &std::collections::BTreeMap<String, Vec<f64>>),
    other: (&str, &std::collections::BTreeMap<String, Vec<f64>>),
    seed: Option<u64>,
    bootstrap_seed: u64,
) -> Result<Vec<PairedRow>> {
    reference
        .1
        .iter()
        .map(|(bench, rs)| {
            let os = other
                .1
                .get(bench)
                .context("the arms answered different questions")?;
            Ok(PairedRow {
                method: other.0.into(),
                reference_arm: reference.0.into(),
                seed,
                comparison: crate::eval::paired::compare(bench, rs, os, bootstrap_seed),
            })
        })
        .collect()
}

/// Every method against ln on the same evaluation questions (empty without an ln arm): at
/// each seed, the two chosen arms of that seed; with several seeds also the per-question
/// scores averaged over the seeds.
fn paired_against_ln(
    runner: &Runner,
    benches: &BenchItems,
    seed_arms: &[Vec<Arm>],
) -> Result<Vec<PairedRow>> {
    use std::collections::BTreeMap;
    let cfg = runner.cfg;
    let Some(ln) = seed_arms
        .iter()
        .position(|a| a[0].method.method == Method::Ln)
    else {
        return Ok(vec![]);
    };
    // per method, per seed: per-question scores by benchmark
    let all: Vec<Vec<BTreeMap<String, Vec<f64>>>> = seed_arms
        .iter()
        .map(|arms| {
            arms.iter()
                .map(|a| arm_item_scores(runner, benches, a))
                .collect::<Result<_>>()
        })
        .collect::<Result<_>>()?;
    let mean_over_seeds = |per_seed: &[BTreeMap<String, Vec<f64>>]| {
        let mut m: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for s in per_seed {
            for (bench, v) in s {
                let e = m.entry(bench.clone()).or_insert_with(|| vec![0.0; v.len()]);
                for (a, x) in e.iter_mut().zip(v) {
                    *a += x / per_seed.len() as f64;
                }
            }
        }
        m
    };
    let mut rows = Vec::new();
    for (i, arms) in seed_arms.iter().enumerate() {
        if i == ln {
            continue;
        }
        let name = arms[0].method.method.name();
        for (k, arm) in arms.iter().enumerate() {
            rows.extend(paired_rows(
                ("ln", &all[ln][k]),
                (name, &all[i][k]),
                Some(arm.seed),
                cfg.seed,
            )?);
        }
        if arms.len() > 1 {
            rows.extend(paired_rows(
                ("ln", &mean_over_seeds(&all[ln])),
                (name, &mean_over_seeds(&all[i])),
                None,
                cfg.seed,
            )?);
        }
    }
    Ok(rows)
}

/// The ablations' pairs the paper ranks (`claims::ABLATION_PAIRS`: the arm it finds better
/// as the reference), on the same questions; pairs with an arm missing are left out.
fn paired_ablations(
    runner: &Runner,
    benches: &BenchItems,
    arms: &[(String, Arm)],
) -> Result<Vec<PairedRow>> {
    let mut rows = Vec::new();
    for (better, worse) in claims::ABLATION_PAIRS {
        let find = |n: &str| arms.iter().find(|(name, _)| name == n).map(|(_, a)| a);
        if let (Some(b), Some(w)) = (find(better), find(worse)) {
            rows.extend(paired_rows(
                (better, &arm_item_scores(runner, benches, b)?),
                (worse, &arm_item_scores(runner, benches, w)?),
                Some(b.seed),
                runner.cfg.seed,
            )?);
        }
    }
    Ok(rows)
}

/// The arm a method's row stands for: the one evaluated (the sweep's choice).
fn chosen(arms: &[Arm]) -> &Arm {
    arms.iter().find(|x| x.evaluate).expect("one chosen arm")
}

/// Trains a method's arms, keeps the sweep's lowest validation loss, evaluates that arm.
/// Returns the method's row and the sweep's rows.
fn run_method(
    runner: &Runner,
    arms: &mut MethodArms,
    step: &dyn Fn(String, bool),
) -> Result<(ArmResult, Vec<ArmResult>)> {
    for arm in arms.iter() {
        let ran = runner.train(arm, arm.method.method != Method::LnSimple)?;
        step(format!("train {}", arm.name), ran);
    }
    let mut sweep_rows = Vec::new();
    let chosen = if runner.cfg.lr_sweep {
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
    r.name = arm.method.method.name().to_string();
    Ok((r, sweep_rows))
}

/// The similarity settings of the comparison (`models` and `out` unused per model).
fn similarity_config(cfg: &CompareConfig, val: &[DataSource]) -> SimilarityConfig {
    SimilarityConfig {
        model: cfg.model.clone(),
        models: vec![],
        data: if val.is_empty() {
            cfg.data.clone()
        } else {
            val.to_vec()
        },
        images: cfg.images.clone(),
        samples: cfg.similarity_samples,
        template: cfg.template,
        max_length: cfg.max_length,
        batch: 8,
        dtype: DType::F32,
        image: cfg.image.clone(),
        out: cfg.out.join("analysis/similarity"),
    }
}

/// One model's layer similarity, kept in `file`: read when it exists, else computed (the
/// base with `adapter`) and written. Returns it and whether it was computed.
fn cached_similarity(
    runner: &Runner,
    file: &std::path::Path,
    adapter: Option<PathBuf>,
    val: &[DataSource],
) -> Result<(LayerSimilarity, bool)> {
    if file.is_file() {
        return Ok((crate::util::files::read_json(file)?, false));
    }
    let cfg = runner.cfg;
    let sim = similarity_config(cfg, val);
    let mut cache = crate::data::features::FeatureCache::new(true);
    let r = one_model_similarity(&sim, adapter.as_deref(), &mut cache, &cfg.device.device()?)?;
    crate::util::files::write_json(file, &r)?;
    runner.ledger.tick()?;
    Ok((r, true))
}

/// Layer similarity of the stage-1 model (or the base) and every method's chosen adapter,
/// on the validation data (or the training data): each model's result is kept beside its run
/// (`runs/methods/<m>/similarity.json`; the base's under `analysis/similarity/`), so only
/// missing ones are computed; then the report and heatmaps.
fn analyse_similarity(
    runner: &Runner,
    seed_arms: &[Vec<Arm>],
    rows: &[ArmResult],
    val: &[DataSource],
) -> Result<(SimilarityReport, bool)> {
    let cfg = runner.cfg;
    let dir = cfg.out.join("analysis/similarity");
    let (first_name, first_adapter) = match &cfg.init_adapter {
        Some(init) => ("stage-1", Some(init.clone())),
        None => ("base", None),
    };
    let mut ran = false;
    let (r, computed) = cached_similarity(
        runner,
        &dir.join(format!("{first_name}.json")),
        first_adapter,
        val,
    )?;
    ran |= computed;
    let mut report = SimilarityReport {
        models: vec![(first_name.to_string(), r)],
    };
    for (arms, row) in seed_arms.iter().zip(rows) {
        let arm = &arms[0];
        let (r, computed) = cached_similarity(
            runner,
            &runner.dir(arm).join("similarity.json"),
            Some(runner.dir(arm).join("adapter")),
            val,
        )?;
        ran |= computed;
        report.models.push((row.name.clone(), r));
    }
    write_similarity_report(&report, &dir)?;
    Ok((report, ran))
}
