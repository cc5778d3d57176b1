//! The plan of a comparison: its arms. Every method (and, with a learning-rate sweep, every
//! rate of its grid) is an arm of the `methods` table; the connector and data-type
//! ablations add theirs. An arm is one training run and, if chosen, one evaluation.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use super::config::{Ablation, CompareConfig};
use super::token_budget::TokenSubset;
use crate::data::llava::DataSource;
use crate::methods::{Method, MethodConfig};

/// One training + evaluation of the comparison.
#[derive(Debug, Clone)]
pub struct Arm {
    /// `methods`, `connector` or `data-type`: the folder under `runs/` and the table
    pub table: &'static str,
    pub name: String,
    pub method: MethodConfig,
    pub lr: f64,
    /// the training run's seed
    pub seed: u64,
    pub data: Vec<DataSource>,
    pub val: Vec<DataSource>,
    /// evaluate this arm (sweep candidates that lose are not evaluated)
    pub evaluate: bool,
    /// epochs over `data` instead of the comparison's `--steps` (token-budget data-type arms)
    pub epochs: Option<f64>,
}

/// The arms of one method: one rate, or the sweep's grid around it.
pub type MethodArms = Vec<Arm>;

/// The label of a swept rate (`lr-1e-3`): one digit, so 1.25e-4 is `lr-1e-4` (the rate
/// itself is in the arm's `run.json` and the report's lr column, see [`lr_text`]).
pub fn lr_label(lr: f64) -> String {
    format!("lr-{lr:.0e}")
}

/// A learning rate as the report prints it: up to four significant digits, no trailing
/// zeros (`1.25e-4`, `8e-5`).
pub fn lr_text(lr: f64) -> String {
    let s = format!("{lr:.3e}");
    match s.split_once('e') {
        Some((mantissa, exp)) if mantissa.contains('.') => {
            let m = mantissa.trim_end_matches('0').trim_end_matches('.');
            format!("{m}e{exp}")
        }
        _ => s,
    }
}

/// The learning rate of `m`: the one given for it, else its default.
pub fn lr_of(cfg: &CompareConfig, m: Method) -> f64 {
    cfg.lrs
        .iter()
        .find(|(x, _)| *x == m)
        .map(|x| x.1)
        .unwrap_or(m.default_lr())
}

/// The method `m` with the comparison's freezing: `freeze_embed_head` keeps embeddings and
/// head frozen in every method (full finetuning included: its rule defers to these flags,
/// and a tied head is the embedding).
pub fn method_of(cfg: &CompareConfig, m: Method) -> MethodConfig {
    let mut mc = arm_method(m, cfg.freeze_embed_head);
    // the paper's LoRA baselines: rank 32 or 64, alpha twice the rank
    mc.lora.r = cfg.lora_r;
    mc.lora.alpha = 2.0 * cfg.lora_r as f64;
    mc
}

fn arm_method(m: Method, freeze_embed_head: bool) -> MethodConfig {
    let mut mc = MethodConfig::new(m);
    if freeze_embed_head {
        mc.train_embed = false;
        mc.train_head = false;
    }
    mc
}

/// The rates `m` trains at: its rate, or the sweep's grid around it.
fn rates_of(cfg: &CompareConfig, m: Method) -> Vec<f64> {
    let base = lr_of(cfg, m);
    if cfg.lr_sweep {
        cfg.sweep_factors.iter().map(|f| base * f).collect()
    } else {
        vec![base]
    }
}

/// Refuses sweep factors that give two of a method's rates one folder label (labels keep
/// one digit: 5e-4 and 5.25e-4 are both `lr-5e-4`).
pub fn check_rate_labels(cfg: &CompareConfig) -> Result<()> {
    for &m in &cfg.methods {
        let rates = rates_of(cfg, m);
        for (i, &a) in rates.iter().enumerate() {
            if let Some(&b) = rates[..i].iter().find(|&&b| lr_label(b) == lr_label(a)) {
                bail!(
                    "--sweep-factors: {} and {} give {} the same rate label `{}`; use factors further apart",
                    lr_text(b),
                    lr_text(a),
                    m.name(),
                    lr_label(a)
                );
            }
        }
    }
    Ok(())
}

/// Per method, its arms (one, or one per swept rate) on the training data (`train`, with
/// `val` held out for the sweep).
pub fn method_arms(
    cfg: &CompareConfig,
    train: &[DataSource],
    val: &[DataSource],
) -> Vec<MethodArms> {
    cfg.methods
        .iter()
        .map(|&m| {
            rates_of(cfg, m)
                .iter()
                .map(|&lr| Arm {
                    table: "methods",
                    name: if cfg.lr_sweep {
                        format!("{}/{}", m.name(), lr_label(lr))
                    } else {
                        m.name().to_string()
                    },
                    method: method_of(cfg, m),
                    lr,
                    seed: cfg.seed,
                    data: train.to_vec(),
                    val: val.to_vec(),
                    evaluate: !cfg.lr_sweep,
                    epochs: None,
                })
                .collect()
        })
        .collect()
}

/// The chosen arm of a method again at another seed (`<method>/seed-<s>`).
pub fn seed_arm(chosen: &Arm, seed: u64) -> Arm {
    Arm {
        name: format!("{}/seed-{seed}", chosen.method.method.name()),
        seed,
        evaluate: true,
        ..chosen.clone()
    }
}

/// The ln method arm is the connector ablation's "ln + connector" arm when it trains the
/// same tensors at the same rate on the same data: its result is then reused.
pub fn reuses_ln_arm(cfg: &CompareConfig) -> bool {
    let ln = method_of(cfg, Method::Ln);
    cfg.ablations.contains(&Ablation::Connector)
        && !cfg.lr_sweep
        && cfg.methods.contains(&Method::Ln)
        && !ln.train_embed
        && !ln.train_head
}

/// The arms of the ablations: connector (LN + connector, LN only, connector only) and data
/// type (LN tuning on equal budgets of each kind, and of all kinds mixed: `token_subsets`
/// when the budgets are in tokens, else `--data-type-samples` samples each). Every LN arm
/// trains at `ln_lr`: the sweep's choice for the ln method when there is one.
pub fn ablation_arms(
    cfg: &CompareConfig,
    token_subsets: Option<&[TokenSubset]>,
    ln_lr: f64,
) -> Result<Vec<Arm>> {
    let mut arms = Vec::new();
    if cfg.ablations.contains(&Ablation::Connector) {
        let mut no_embed = MethodConfig::new(Method::Ln);
        no_embed.train_embed = false;
        no_embed.train_head = false;
        let mut ln_only = no_embed.clone();
        ln_only.train_projector = false;
        let connector = (
            "connector only",
            MethodConfig::new(Method::Projector),
            lr_of(cfg, Method::Projector).min(ln_lr * 4.0),
        );
        for (name, method, lr) in [
            ("ln + connector", no_embed, ln_lr),
            ("ln only", ln_only, ln_lr),
            connector,
        ] {
            if name == "ln + connector" && reuses_ln_arm(cfg) {
                continue;
            }
            arms.push(Arm {
                table: "connector",
                name: name.into(),
                method,
                lr,
                seed: cfg.seed,
                data: cfg.data.clone(),
                val: vec![],
                evaluate: true,
                epochs: None,
            });
        }
    }
    if cfg.ablations.contains(&Ablation::DataType) {
        if cfg.data_types.is_empty() {
            bail!("--ablation data-type needs --data-types KIND=FILE,...");
        }
        let arm = |name: String, data: Vec<DataSource>, epochs: Option<f64>| Arm {
            table: "data-type",
            name,
            method: method_of(cfg, Method::Ln),
            lr: ln_lr,
            seed: cfg.seed,
            data,
            val: vec![],
            evaluate: true,
            epochs,
        };
        match token_subsets {
            // equal token budgets: the subsets were drawn and written beforehand
            Some(subsets) => {
                for s in subsets {
                    arms.push(arm(
                        s.budget.name.clone(),
                        s.sources.clone(),
                        Some(s.budget.epochs),
                    ));
                }
            }
            // equal sample budgets
            None => {
                let n = cfg.data_type_samples;
                for (k, f) in &cfg.data_types {
                    arms.push(arm(
                        k.clone(),
                        vec![DataSource {
                            path: f.clone(),
                            budget: Some(n),
                        }],
                        None,
                    ));
                }
                let per = n / cfg.data_types.len();
                arms.push(arm(
                    "mixed".into(),
                    cfg.data_types
                        .iter()
                        .map(|(_, f)| DataSource {
                            path: f.clone(),
                            budget: Some(per),
                        })
                        .collect(),
                    None,
                ));
            }
        }
    }
    Ok(arms)
}

/// `KIND=FILE,...` pairs of `--data-types`.
pub fn parse_data_types(spec: &str) -> Result<Vec<(String, PathBuf)>> {
    let kinds: Vec<(String, PathBuf)> = spec
        .split(',')
        .map(|p| {
            p.split_once('=')
                .map(|(k, f)| (k.trim().to_string(), PathBuf::from(f.trim())))
                .with_context(|| format!("--data-types `{p}`: expected KIND=FILE"))
        })
        .collect::<Result<_>>()?;
    if kinds.is_empty() {
        bail!("--data-types is empty");
    }
    Ok(kinds)
}

#[cfg(test)]
mod tests {
    use clap::ValueEnum;

    use super::*;

    #[test]
    fn rates_print_exactly_and_label_to_one_digit() {
        assert_eq!(lr_text(5e-4 * 0.25), "1.25e-4");
        assert_eq!(lr_text(2e-4 * 4.0), "8e-4");
        assert_eq!(lr_text(1e-3), "1e-3");
        assert_eq!(lr_label(5e-4 * 0.25), "lr-1e-4");
        assert_eq!(lr_label(2e-5 * 0.25), "lr-5e-6");
    }

    #[test]
    fn frozen_embed_head_holds_in_every_arm_tied_or_not() {
        for &m in Method::value_variants() {
            if m == Method::Custom {
                continue; // trains what --include names, nothing by rule
            }
            // the test model's k/v projections are 4 wide
            let arm = |freeze| {
                let mut mc = arm_method(m, freeze);
                mc.lora.r = 2;
                mc
            };
            for tie in [false, true] {
                let names = crate::methods::tests::trained(&arm(true), tie);
                assert!(
                    !names
                        .iter()
                        .any(|n| n.contains("embed_tokens") || n.contains("lm_head")),
                    "{} (tied {tie}) trains {names:?}",
                    m.name()
                );
                // and without the flag the paper's sets keep them wherever it trains them
                let free = crate::methods::tests::trained(&arm(false), tie);
                let paper = !matches!(m, Method::LnSimple | Method::Projector);
                assert_eq!(
                    free.iter().any(|n| n.contains("embed_tokens")),
                    paper,
                    "{}",
                    m.name()
                );
            }
        }
    }
}
