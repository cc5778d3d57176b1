//! An evaluation's answers as they come: `predictions.jsonl`, appended and flushed per batch,
//! so that an interrupted evaluation resumes where it stopped.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// One line of a predictions file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PredictionLine {
    pub id: String,
    pub image: String,
    pub question: String,
    pub answer: String,
}

/// An append-only predictions file (JSONL). Opening it reads the answers so far; a last line
/// cut short by an interruption is dropped (the file is truncated to its last whole line).
pub struct Predictions {
    pub path: PathBuf,
    pub answers: HashMap<String, String>,
    file: std::fs::File,
}

impl Predictions {
    pub fn open(path: &Path) -> Result<Self> {
        let mut answers = HashMap::new();
        let mut keep = 0u64;
        if path.exists() {
            let text = crate::util::files::read_text(path)?;
            let mut offset = 0usize;
            let lines: Vec<&str> = text.split_inclusive('\n').collect();
            for (i, line) in lines.iter().enumerate() {
                let whole = line.ends_with('\n');
                match serde_json::from_str::<PredictionLine>(line.trim_end()) {
                    Ok(p) if whole => {
                        answers.insert(p.id, p.answer);
                        offset += line.len();
                    }
                    _ if i + 1 == lines.len() => break, // an interrupted last write
                    Err(e) => bail!(
                        "{}: line {}: not a prediction ({e}); remove the line or the file",
                        path.display(),
                        i + 1
                    ),
                    Ok(_) => unreachable!("only the last line can lack its newline"),
                }
            }
            keep = offset as u64;
        } else if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("{}: cannot create", parent.display()))?;
        }
        // O_APPEND: every line goes to the end of the file, whatever else wrote to it
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("{}: cannot open for writing", path.display()))?;
        file.set_len(keep)?;
        Ok(Self {
            path: path.to_path_buf(),
            answers,
            file,
        })
    }

    pub fn append(&mut self, line: &PredictionLine) -> Result<()> {
        let mut s = serde_json::to_string(line)?;
        s.push('\n');
        self.file
            .write_all(s.as_bytes())
            .and_then(|_| self.file.flush())
            .with_context(|| format!("{}: cannot append", self.path.display()))?;
        self.answers.insert(line.id.clone(), line.answer.clone());
        Ok(())
    }
}
