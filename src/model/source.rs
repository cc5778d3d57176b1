//! What kind of model a path holds, decided once from the files themselves, for loading
//! (`Mllm::load`) and for planning from configs alone (`ModelSpec::from_path`).

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use serde::Deserialize;

use crate::util::files::read_json;

/// A model on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// a llama.cpp GGUF file (text-only LLM)
    Gguf(PathBuf),
    /// a directory with `compose.json` (vision tower + projector + LLM parts)
    Composed(PathBuf),
    /// a llava-hf directory (`config.json` with `model_type: llava`)
    Llava(PathBuf),
    /// an HF LLaMA / Mistral / Qwen2 directory (text-only LLM)
    TextHf(PathBuf),
}

impl ModelSource {
    /// Looks at `path`: a `.gguf` file, a directory with `compose.json`, or a directory whose
    /// `config.json` names a supported `model_type`.
    pub fn detect(path: &Path) -> Result<Self> {
        if path.is_file() {
            if path.extension().is_some_and(|e| e == "gguf") {
                return Ok(Self::Gguf(path.to_path_buf()));
            }
            bail!("{}: not a model directory or .gguf file", path.display());
        }
        if path.exists() && !path.is_dir() {
            bail!(
                "{}: not a regular file (nor a model directory)",
                path.display()
            );
        }
        if !path.is_dir() {
            bail!("{}: no such model directory or file", path.display());
        }
        if path.join("compose.json").exists() {
            return Ok(Self::Composed(path.to_path_buf()));
        }
        let cfg_path = path.join("config.json");
        if !cfg_path.exists() {
            bail!("{}: no config.json or compose.json", path.display());
        }
        #[derive(Deserialize)]
        struct Probe {
            model_type: Option<String>,
        }
        let probe: Probe = read_json(&cfg_path)?;
        match probe.model_type.as_deref() {
            Some("llava") => Ok(Self::Llava(path.to_path_buf())),
            Some("llama" | "mistral" | "qwen2") => Ok(Self::TextHf(path.to_path_buf())),
            Some(other) => bail!(
                "{}: unknown architecture `{other}` in field `model_type`; supported: llava, llama, mistral, qwen2",
                cfg_path.display()
            ),
            None => bail!("{}: missing field `model_type`", cfg_path.display()),
        }
    }
}
