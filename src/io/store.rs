//! Named weight storage: memory-mapped safetensors files (one file or shards) or tensors
//! that were decoded into memory (GGUF, ONNX imports, tests).
//!
//! A `Store` maps checkpoint keys to where their bytes live. `Weights` is a prefixed view on
//! a store (like candle's `VarBuilder`), so the model structs spell out the checkpoint key
//! paths. Every `get` checks the shape and names the file and the key when something is
//! wrong. A tensor is decoded and converted to its target dtype exactly once, when the model
//! struct that owns it is built; nothing is copied per step.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::{Dtype as StDtype, SafeTensors};

use crate::util::files::read_json;

/// Where one tensor's data lives.
enum Entry {
    /// Inside a memory-mapped safetensors file: byte range `start..end` of `files[file]`.
    Mapped {
        file: usize,
        dtype: StDtype,
        shape: Vec<usize>,
        start: usize,
        end: usize,
    },
    /// Already decoded (GGUF dequantization, ONNX import, in-memory tests).
    Owned { file: usize, tensor: Tensor },
}

struct SourceFile {
    path: PathBuf,
    mmap: Option<Mmap>,
}

/// All tensors of one model part (an LLM, a vision tower, a projector, or a whole llava-hf
/// checkpoint), keyed by checkpoint name.
pub struct Store {
    files: Vec<SourceFile>,
    entries: HashMap<String, Entry>,
    device: Device,
}

impl Store {
    /// An empty store on `device`.
    pub fn new(device: &Device) -> Self {
        Self {
            files: Vec::new(),
            entries: HashMap::new(),
            device: device.clone(),
        }
    }

    /// Memory-maps a safetensors file and registers all its tensors. The header is
    /// validated against the file size, so a truncated file is an error here.
    pub fn add_safetensors(&mut self, path: &Path) -> Result<()> {
        crate::util::files::regular_file(path)?;
        let file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        // SAFETY: the mapping is read-only; a file changed underneath us while a model is
        // loaded would give wrong numbers but no memory unsafety beyond what memmap2 documents.
        let mmap = unsafe { Mmap::map(&file) }
            .with_context(|| format!("{}: cannot memory-map", path.display()))?;
        let (header_len, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| {
            anyhow::anyhow!(
                "{}: not a valid safetensors file ({e}); truncated or corrupt?",
                path.display()
            )
        })?;
        let data_start = 8 + header_len;
        let file_idx = self.files.len();
        for (name, info) in metadata.tensors() {
            if self.entries.contains_key(&name) {
                bail!(
                    "{}: tensor `{name}` is also present in {}",
                    path.display(),
                    self.file_of(&name).display()
                );
            }
            self.entries.insert(
                name,
                Entry::Mapped {
                    file: file_idx,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: data_start + info.data_offsets.0,
                    end: data_start + info.data_offsets.1,
                },
            );
        }
        self.files.push(SourceFile {
            path: path.to_path_buf(),
            mmap: Some(mmap),
        });
        Ok(())
    }

    /// Opens `model.safetensors`, or the shards listed in `model.safetensors.index.json`, in
    /// `dir`.
    pub fn open_dir(dir: &Path, device: &Device) -> Result<Self> {
        let mut store = Self::new(device);
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if single.exists() {
            store.add_safetensors(&single)?;
        } else if index.exists() {
            for shard in shard_files(&index)? {
                store.add_safetensors(&dir.join(&shard))?;
            }
        } else {
            bail!(
                "{}: no model.safetensors or model.safetensors.index.json",
                dir.display()
            );
        }
        Ok(store)
    }

    /// Registers already decoded tensors that came from `origin` (used for error messages).
    pub fn add_owned(&mut self, origin: &Path, tensors: Vec<(String, Tensor)>) -> Result<()> {
        let file = self.files.len();
        self.files.push(SourceFile {
            path: origin.to_path_buf(),
            mmap: None,
        });
        for (name, tensor) in tensors {
            if self.entries.contains_key(&name) {
                bail!("{}: duplicate tensor `{name}`", origin.display());
            }
            self.entries.insert(name, Entry::Owned { file, tensor });
        }
        Ok(())
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// All keys, sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.entries.keys().cloned().collect();
        keys.sort();
        keys
    }

    /// The stored shape of a tensor, without loading it.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.entries.get(name).map(|e| match e {
            Entry::Mapped { shape, .. } => shape.clone(),
            Entry::Owned { tensor, .. } => tensor.dims().to_vec(),
        })
    }

    /// The file a tensor comes from (or the store's first file if it is absent), for messages.
    pub fn file_of(&self, name: &str) -> &Path {
        let idx = match self.entries.get(name) {
            Some(Entry::Mapped { file, .. }) | Some(Entry::Owned { file, .. }) => *file,
            None => 0,
        };
        self.files
            .get(idx)
            .map(|f| f.path.as_path())
            .unwrap_or(Path::new("<empty store>"))
    }

    /// A short description of the files for "missing tensor" messages.
    pub fn describe(&self) -> String {
        match self.files.len() {
            0 => "<empty store>".to_string(),
            1 => self.files[0].path.display().to_string(),
            n => format!("{} (+{} more shards)", self.files[0].path.display(), n - 1),
        }
    }

    /// Loads `name`, checks that its shape is `shape`, and converts it to `dtype` on the
    /// store's device.
    pub fn load(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let Some(entry) = self.entries.get(name) else {
            bail!("{}: missing tensor `{name}`", self.describe());
        };
        let stored = self.shape(name).unwrap_or_default();
        if stored != shape {
            bail!(
                "{}: tensor `{name}` has shape {stored:?}, expected {shape:?}",
                self.file_of(name).display()
            );
        }
        let tensor = match entry {
            Entry::Owned { tensor, .. } => tensor.clone(),
            Entry::Mapped {
                file,
                dtype: st_dtype,
                shape,
                start,
                end,
            } => {
                let src = &self.files[*file];
                let bytes = &src.mmap.as_ref().expect("mapped entry has a mapping")[*start..*end];
                let dt = candle_dtype(*st_dtype)
                    .with_context(|| format!("{}: tensor `{name}`", src.path.display()))?;
                Tensor::from_raw_buffer(bytes, dt, shape, &Device::Cpu).with_context(|| {
                    format!("{}: cannot decode tensor `{name}`", src.path.display())
                })?
            }
        };
        let tensor = if tensor.dtype() == dtype {
            tensor
        } else {
            tensor.to_dtype(dtype)?
        };
        Ok(tensor.to_device(&self.device)?)
    }

    /// A memory-mapped tensor as stored: its safetensors dtype, shape and bytes (for copies
    /// that must stay byte for byte); None for decoded entries.
    pub fn raw(&self, name: &str) -> Option<(StDtype, &[usize], &[u8])> {
        match self.entries.get(name)? {
            Entry::Mapped {
                file,
                dtype,
                shape,
                start,
                end,
            } => {
                let map = self.files[*file].mmap.as_ref()?;
                Some((*dtype, shape.as_slice(), &map[*start..*end]))
            }
            Entry::Owned { .. } => None,
        }
    }

    /// Loads a tensor whose shape is not known in advance (inputs, references).
    pub fn load_any(&self, name: &str) -> Result<Tensor> {
        let shape = self
            .shape(name)
            .with_context(|| format!("{}: missing tensor `{name}`", self.describe()))?;
        let entry = &self.entries[name];
        let dtype = match entry {
            Entry::Owned { tensor, .. } => tensor.dtype(),
            Entry::Mapped { dtype, file, .. } => candle_dtype(*dtype).with_context(|| {
                format!("{}: tensor `{name}`", self.files[*file].path.display())
            })?,
        };
        self.load(name, &shape, dtype)
    }
}

fn candle_dtype(dtype: StDtype) -> Result<DType> {
    Ok(match dtype {
        StDtype::F32 => DType::F32,
        StDtype::F16 => DType::F16,
        StDtype::BF16 => DType::BF16,
        StDtype::F64 => DType::F64,
        StDtype::I64 => DType::I64,
        StDtype::I32 => DType::I32,
        StDtype::U32 => DType::U32,
        StDtype::U8 => DType::U8,
        other => bail!("unsupported safetensors dtype {other:?}"),
    })
}

/// The shard file names of a `model.safetensors.index.json`, in a stable order.
fn shard_files(index: &Path) -> Result<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let parsed: Index = read_json(index).with_context(|| {
        format!(
            "{}: invalid index JSON (field `weight_map`)",
            index.display()
        )
    })?;
    let mut shards: Vec<String> = parsed.weight_map.into_values().collect();
    shards.sort();
    shards.dedup();
    if shards.is_empty() {
        bail!("{}: `weight_map` is empty", index.display());
    }
    Ok(shards)
}

/// A prefixed view of a store: `w.pp("model").pp("layers.0").get("input_layernorm.weight")`
/// reads the key `model.layers.0.input_layernorm.weight`.
#[derive(Clone)]
pub struct Weights {
    store: Arc<Store>,
    prefix: String,
    /// dtype of matmul weights (f32 or bf16); norms, biases and scales are always f32.
    pub matmul_dtype: DType,
}

impl Weights {
    pub fn new(store: Arc<Store>, matmul_dtype: DType) -> Self {
        Self {
            store,
            prefix: String::new(),
            matmul_dtype,
        }
    }

    /// A view one level down.
    pub fn pp(&self, sub: impl AsRef<str>) -> Self {
        let sub = sub.as_ref();
        let prefix = if self.prefix.is_empty() {
            sub.to_string()
        } else if sub.is_empty() {
            self.prefix.clone()
        } else {
            format!("{}.{sub}", self.prefix)
        };
        Self {
            store: self.store.clone(),
            prefix,
            matmul_dtype: self.matmul_dtype,
        }
    }

    /// The first of `candidates` under which the store holds any key, for checkpoints whose
    /// layouts differ by a level (`vision_tower.vision_model.` vs `vision_tower.`).
    pub fn pp_first(&self, candidates: &[&str]) -> Option<Self> {
        candidates.iter().map(|c| self.pp(c)).find(|w| w.has_any())
    }

    pub fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn device(&self) -> &Device {
        self.store.device()
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn contains(&self, name: &str) -> bool {
        self.store.contains(&self.key(name))
    }

    /// Whether any key starts with this view's prefix.
    pub fn has_any(&self) -> bool {
        let p = format!("{}.", self.prefix);
        self.store.entries.keys().any(|k| k.starts_with(&p))
    }

    /// A tensor kept in f32 (norm scales, biases, embeddings' positions, ...).
    pub fn get_f32(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.store.load(&self.key(name), shape, DType::F32)
    }

    /// A matmul weight, stored in `matmul_dtype`.
    pub fn get_mm(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.store.load(&self.key(name), shape, self.matmul_dtype)
    }

    /// The stored shape of a key under this prefix.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.store.shape(&self.key(name))
    }
}
