//! LLaVA-format JSON datasets: `[{"id", "image", "conversations": [{"from", "value"}]}]`,
//! mixed from several files with per-file sample budgets (`conversation_58k.json:20000`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::rng::Rng;

/// The `<image>` placeholder of LLaVA's data.
pub const IMAGE_PLACEHOLDER: &str = "<image>";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Turn {
    pub from: String,
    pub value: String,
}

/// One image or several (LLaVA-OneVision style lists).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Images {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Sample {
    #[serde(default)]
    pub id: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<Images>,
    pub conversations: Vec<Turn>,
}

impl Sample {
    pub fn images(&self) -> Vec<&str> {
        match &self.image {
            None => vec![],
            Some(Images::One(s)) => vec![s.as_str()],
            Some(Images::Many(v)) => v.iter().map(|s| s.as_str()).collect(),
        }
    }

    pub fn id_string(&self) -> String {
        match &self.id {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Null => String::new(),
            other => other.to_string(),
        }
    }
}

/// `FILE[:N]`: a data file and an optional sample budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataSource {
    pub path: PathBuf,
    pub budget: Option<usize>,
}

impl DataSource {
    /// Parses `path` or `path:N` (the suffix must be a number; other colons stay in the path).
    pub fn parse(s: &str) -> Result<Self> {
        if let Some((p, n)) = s.rsplit_once(':')
            && !n.is_empty()
            && n.chars().all(|c| c.is_ascii_digit())
        {
            let budget = n
                .parse()
                .with_context(|| format!("--data `{s}`: bad sample budget"))?;
            return Ok(Self {
                path: p.into(),
                budget: Some(budget),
            });
        }
        Ok(Self {
            path: s.into(),
            budget: None,
        })
    }

    pub fn parse_list(s: &str) -> Result<Vec<Self>> {
        s.split(',')
            .filter(|x| !x.is_empty())
            .map(Self::parse)
            .collect()
    }
}

/// Reads one LLaVA JSON file (a JSON array, or JSON lines).
pub fn read_file(path: &Path) -> Result<Vec<Sample>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    } else {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l)
                    .map_err(|e| anyhow::anyhow!("{}: line {}: {e}", path.display(), i + 1))
            })
            .collect()
    }
}

/// Reads and mixes sources: a file with a budget contributes a seeded random subset of that
/// size (all of it when smaller); the mixture is shuffled with `seed`.
pub fn load_mixture(sources: &[DataSource], seed: u64) -> Result<Vec<Sample>> {
    if sources.is_empty() {
        bail!("no data files given");
    }
    let mut rng = Rng::new(seed);
    let mut all = Vec::new();
    for src in sources {
        let mut samples = read_file(&src.path)?;
        if let Some(n) = src.budget
            && n < samples.len()
        {
            rng.shuffle(&mut samples);
            samples.truncate(n);
        }
        all.extend(samples);
    }
    rng.shuffle(&mut all);
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_with_budgets() {
        assert_eq!(
            DataSource::parse("conversation_58k.json:20000").unwrap(),
            DataSource {
                path: "conversation_58k.json".into(),
                budget: Some(20000)
            }
        );
        assert_eq!(DataSource::parse("a.json").unwrap().budget, None);
        assert_eq!(
            DataSource::parse("C:x.json").unwrap().path,
            PathBuf::from("C:x.json")
        );
        assert_eq!(DataSource::parse_list("a.json:2,b.json").unwrap().len(), 2);
    }

    #[test]
    fn parses_llava_samples() {
        let s: Vec<Sample> = serde_json::from_str(
            r#"[{"id": "1", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Yo"}]},
                {"id": 7, "conversations": [{"from": "human", "value": "text only"}, {"from": "gpt", "value": "ok"}]}]"#,
        )
        .unwrap();
        assert_eq!(s[0].images(), vec!["a.png"]);
        assert!(s[1].images().is_empty());
        assert_eq!(s[1].id_string(), "7");
    }
}
