//! LLaVA-format JSON datasets: `[{"id", "image", "conversations": [{"from", "value"}]}]`,
//! mixed from several files with per-file sample budgets (`conversation_58k.json:20000`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::util::files::{parse_json, parse_jsonl, read_text};
use crate::util::rng::Rng;

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

/// `FILE[:N]`: a data file and an optional sample budget. In a run config either that
/// string or `{"path": FILE, "budget": N}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DataSource {
    pub path: PathBuf,
    pub budget: Option<usize>,
}

impl<'de> Deserialize<'de> for DataSource {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error;
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Object {
            path: PathBuf,
            #[serde(default)]
            budget: Option<usize>,
        }
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::String(s) => Self::parse(&s).map_err(D::Error::custom),
            v => {
                let o: Object = serde_json::from_value(v).map_err(|e| {
                    D::Error::custom(format!(
                        "a data source is \"FILE[:N]\" or {{\"path\", \"budget\"}}: {e}"
                    ))
                })?;
                Ok(Self {
                    path: o.path,
                    budget: o.budget,
                })
            }
        }
    }
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
    let text = read_text(path)?;
    if text.trim_start().starts_with('[') {
        parse_json(&text, path)
    } else {
        parse_jsonl(&text, path)
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

/// Samples cut into pieces of at most `per_piece` (question, answer) rounds, each piece
/// with the image placeholder at the start of its first question and the id `<id>-<k>`.
pub fn split_rounds(samples: &[Sample], per_piece: usize) -> Vec<Sample> {
    let mut out = Vec::new();
    for s in samples {
        for (k, turns) in s.conversations.chunks(2 * per_piece.max(1)).enumerate() {
            let mut turns = turns.to_vec();
            if let Some(first) = turns.first_mut() {
                let text = first.value.replace(IMAGE_PLACEHOLDER, "");
                first.value = format!("{IMAGE_PLACEHOLDER}\n{}", text.trim());
            }
            // the id as JSON text (`null` for none), then the piece
            let id = match &s.id {
                serde_json::Value::String(x) => x.clone(),
                other => other.to_string(),
            };
            out.push(Sample {
                id: serde_json::json!(format!("{id}-{k}")),
                image: s.image.clone(),
                conversations: turns,
            });
        }
    }
    out
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
