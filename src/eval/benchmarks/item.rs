//! One benchmark question (`Item`: an image, the question as the benchmark words it, the
//! ground truth) and the JSON field readers every benchmark's loader uses, which name the
//! file, the place in it and the field in every error.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::util::files::{inside, write_atomically};

/// A benchmark's ground truth for one item.
#[derive(Debug, Clone, PartialEq)]
pub enum Truth {
    Vqa {
        question_id: u64,
        answers: Vec<String>,
        answer_type: String,
    },
    Pope {
        split: String,
        question_id: Value,
        label: String,
    },
    Mme {
        subtask: String,
        /// the image's file name (MME's result files are keyed by it)
        image_name: String,
        answer: String,
    },
    Caption {
        image_id: u64,
        refs: Vec<String>,
    },
}

impl Truth {
    /// Captions are asked with the caption prompt; everything else is a short question.
    pub fn is_caption(&self) -> bool {
        matches!(self, Truth::Caption { .. })
    }
}

/// One question of a benchmark.
#[derive(Debug, Clone)]
pub struct Item {
    /// unique within a run: `vqav2/<qid>`, `pope/<split>/<qid>`, `mme/<subtask>/<image>/<k>`,
    /// `caption/<image id>`
    pub id: String,
    pub image: PathBuf,
    /// the question as the benchmark words it (empty for captions)
    pub question: String,
    pub truth: Truth,
}

/// The field `name` of `v` (not null); errors name the file, the place in it and the field.
pub fn field<'a>(v: &'a Value, name: &str, file: &Path, at: &str) -> Result<&'a Value> {
    v.get(name)
        .filter(|x| !x.is_null())
        .with_context(|| format!("{}: {at}: missing field `{name}`", file.display()))
}

/// The string field `name` of `v`.
pub fn str_of<'a>(v: &'a Value, name: &str, file: &Path, at: &str) -> Result<&'a str> {
    field(v, name, file, at)?
        .as_str()
        .with_context(|| format!("{}: {at}: field `{name}` is not a string", file.display()))
}

/// The non-negative integer field `name` of `v` (a number or a numeric string).
pub fn u64_of(v: &Value, name: &str, file: &Path, at: &str) -> Result<u64> {
    let x = field(v, name, file, at)?;
    x.as_u64()
        .or_else(|| x.as_str().and_then(|s| s.parse().ok()))
        .with_context(|| {
            format!(
                "{}: {at}: field `{name}` is not a non-negative integer",
                file.display()
            )
        })
}

/// The array field `name` of the file's top-level object `v`.
pub fn array_of<'a>(v: &'a Value, name: &str, file: &Path) -> Result<&'a Vec<Value>> {
    v.get(name)
        .and_then(|x| x.as_array())
        .with_context(|| format!("{}: missing array `{name}`", file.display()))
}

/// A JSON id (number or string) as text.
pub fn id_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The image `rel` of a benchmark file, which must be a relative path inside `images` and
/// exist; errors name the benchmark file and the place in it.
pub fn image_in(images: &Path, rel: &str, file: &Path, at: &str) -> Result<PathBuf> {
    let path = inside(images, rel).with_context(|| {
        format!(
            "{}: {at}: image path `{rel}` leaves the image folder {} (it must be relative, without `..`)",
            file.display(),
            images.display()
        )
    })?;
    existing(path, file, at)
}

/// `path` if it is a file, else an error naming the benchmark file and the place in it.
pub fn existing(path: PathBuf, file: &Path, at: &str) -> Result<PathBuf> {
    if path.is_file() {
        Ok(path)
    } else {
        bail!(
            "{}: {at}: image {} not found",
            file.display(),
            path.display()
        )
    }
}

/// Checks what a results file answers: every item at most once, and, unless `partial`,
/// every one of the `expected` questions (a partial set scores only what it answers, and
/// the caller prints the coverage this returns).
pub fn check_coverage(
    pred: &Path,
    items: &[Item],
    expected: usize,
    partial: bool,
) -> Result<String> {
    let mut seen = std::collections::HashSet::new();
    for it in items {
        if !seen.insert(it.id.as_str()) {
            bail!("{}: `{}` is answered twice", pred.display(), it.id);
        }
    }
    if seen.len() < expected && !partial {
        bail!(
            "{}: answers {} of {expected} questions; score a partial set with --partial",
            pred.display(),
            seen.len()
        );
    }
    Ok(format!("{} of {expected} questions answered", seen.len()))
}

/// Writes `rows` as one JSON array to `dir/name`, the results-file form of VQAv2 and COCO
/// captions (nothing when there are none); returns the file written.
pub fn write_result_rows(dir: &Path, name: &str, rows: &[Value]) -> Result<Vec<PathBuf>> {
    if rows.is_empty() {
        return Ok(vec![]);
    }
    let path = dir.join(name);
    write_atomically(&path, serde_json::to_string(rows)?.as_bytes())?;
    Ok(vec![path])
}
