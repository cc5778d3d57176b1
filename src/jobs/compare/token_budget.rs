//! The data-type ablation at equal token budgets. Kinds of instruction data differ in
//! length (a detailed description holds several times the trained tokens of a yes/no
//! round), so equal sample counts hand the long kind more supervision. Here every kind's
//! arm gets the samples, in a seeded order, whose trained (labelled) tokens reach the same
//! budget, and trains the same number of epochs over them: every arm sees the same number
//! of trained tokens, up to one sample per epoch. The mixed arm takes an equal share of the
//! budget from each kind.

use std::path::Path;

use anyhow::{Result, bail};
use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use super::config::CompareConfig;
use crate::data::dataset::{ExampleSpec, trained_tokens};
use crate::data::llava::{DataSource, Sample, read_file};
use crate::data::template::TemplateName;
use crate::model::mllm::Mllm;
use crate::util::files::write_json;
use crate::util::rng::Rng;

/// What one data-type arm trains on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DataTypeBudget {
    pub name: String,
    pub samples: usize,
    /// trained (labelled) tokens of those samples
    pub tokens: usize,
    pub epochs: f64,
}

/// One arm's data: its files (under `<out>/data/data-type/`) and what they hold.
pub struct TokenSubset {
    pub sources: Vec<DataSource>,
    pub budget: DataTypeBudget,
}

/// The data of every kind's arm and of the mixed arm (last) at `tokens` trained tokens each.
pub fn token_subsets(cfg: &CompareConfig, tokens: usize, epochs: f64) -> Result<Vec<TokenSubset>> {
    for (kind, _) in &cfg.data_types {
        if kind.is_empty()
            || !kind
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            bail!("--data-types: kind `{kind}` must be letters, digits, `-` or `_`");
        }
    }
    let model = Mllm::load(&cfg.model, DType::F32, &Device::Cpu)?;
    let preprocess = cfg.image.preprocess(&model)?;
    let spec = ExampleSpec {
        data: &[],
        images: cfg.images.as_deref(),
        template: cfg.template.unwrap_or(TemplateName::VicunaV1),
        preprocess: &preprocess,
        max_length: cfg.max_length,
        seed: cfg.seed,
        allow_any_image_path: false,
    };
    let dir = cfg.out.join("data/data-type");
    let share = tokens / cfg.data_types.len();
    let mut out = Vec::new();
    let mut mixed = Vec::new();
    let mut mixed_budget = DataTypeBudget {
        name: "mixed".into(),
        samples: 0,
        tokens: 0,
        epochs,
    };
    for (kind, file) in &cfg.data_types {
        let mut samples = read_file(file)?;
        Rng::new(cfg.seed).shuffle(&mut samples);
        let counts = trained_tokens(&model, &spec, &samples)?;
        let whole = prefix_with_tokens(&samples, &counts, tokens, file)?;
        out.push(write_subset(
            &dir.join(format!("{kind}.json")),
            kind,
            whole,
            epochs,
        )?);
        let part = prefix_with_tokens(&samples, &counts, share, file)?;
        let part = write_subset(&dir.join(format!("mixed-{kind}.json")), kind, part, epochs)?;
        mixed_budget.samples += part.budget.samples;
        mixed_budget.tokens += part.budget.tokens;
        mixed.extend(part.sources);
    }
    out.push(TokenSubset {
        sources: mixed,
        budget: mixed_budget,
    });
    Ok(out)
}

/// The first usable samples (`counts[i]` is `None` for a sample training would skip) whose
/// trained tokens reach `tokens`, with their token sum.
fn prefix_with_tokens(
    samples: &[Sample],
    counts: &[Option<usize>],
    tokens: usize,
    file: &Path,
) -> Result<(Vec<Sample>, usize)> {
    let mut kept = Vec::new();
    let mut sum = 0;
    for (s, n) in samples.iter().zip(counts) {
        if sum >= tokens {
            break;
        }
        if let Some(n) = n {
            kept.push(s.clone());
            sum += n;
        }
    }
    if sum < tokens {
        bail!(
            "--data-type-tokens {tokens}: {} holds only {sum} trained tokens in {} usable samples",
            file.display(),
            kept.len()
        );
    }
    Ok((kept, sum))
}

fn write_subset(
    path: &Path,
    kind: &str,
    (samples, tokens): (Vec<Sample>, usize),
    epochs: f64,
) -> Result<TokenSubset> {
    write_json(path, &samples)?;
    Ok(TokenSubset {
        sources: vec![DataSource {
            path: path.to_path_buf(),
            budget: None,
        }],
        budget: DataTypeBudget {
            name: kind.to_string(),
            samples: samples.len(),
            tokens,
            epochs,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(id: &str) -> Sample {
        serde_json::from_value(serde_json::json!({
            "id": id,
            "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
        }))
        .unwrap()
    }

    #[test]
    fn prefix_reaches_the_budget_and_skips_unusable_samples() {
        let s: Vec<Sample> = ["a", "b", "c", "d"].iter().map(|i| sample(i)).collect();
        let counts = [Some(5), None, Some(4), Some(7)];
        let (kept, sum) = prefix_with_tokens(&s, &counts, 9, Path::new("f.json")).unwrap();
        assert_eq!(
            kept.iter().map(|x| x.id_string()).collect::<Vec<_>>(),
            ["a", "c"]
        );
        assert_eq!(sum, 9);
        let (kept, sum) = prefix_with_tokens(&s, &counts, 10, Path::new("f.json")).unwrap();
        assert_eq!(kept.len(), 3);
        assert_eq!(sum, 16);
        let e = prefix_with_tokens(&s, &counts, 17, Path::new("f.json")).unwrap_err();
        assert!(
            e.to_string()
                .contains("f.json holds only 16 trained tokens in 3"),
            "{e}"
        );
    }
}
