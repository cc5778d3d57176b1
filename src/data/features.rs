//! The frozen vision tower's features per image file, computed once and reused by every
//! step and every question that shows the image; with a disk store attached, also by every
//! process that runs the same tower, feature selection and preprocessing (the arms of a
//! comparison: each trains and evaluates in its own process on the same images).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};

use super::dataset::HostBatch;
use super::image::Preprocess;
use crate::model::mllm::Mllm;
use crate::util::progress::progress_bar;

/// The frozen vision tower's features per image file, computed once.
#[derive(Default)]
pub struct FeatureCache {
    map: HashMap<PathBuf, Tensor>,
    pub enabled: bool,
    /// `<root>/<key>/`: one safetensors file per image content (see `attach_disk`)
    disk: Option<PathBuf>,
}

impl FeatureCache {
    pub fn new(enabled: bool) -> Self {
        Self {
            map: HashMap::new(),
            enabled,
            disk: None,
        }
    }

    /// Keeps features on disk under `root` too: in a folder named by a digest of what they
    /// depend on (the base model's fingerprint, which hidden states are selected, the image
    /// preprocessing, the weights' dtype), one file per image named by the sha256 of the
    /// image file's bytes. Files are written atomically, so concurrent writers are harmless.
    pub fn attach_disk(
        &mut self,
        root: &Path,
        model: &Mllm,
        pre: &Preprocess,
        base_fingerprint: &str,
    ) -> Result<()> {
        use sha2::Digest;
        let v = model
            .vision
            .as_ref()
            .context("a feature store needs a model with a vision tower")?;
        let what = format!(
            "{base_fingerprint}|{:?}|{}|{:?}",
            v.select,
            serde_json::to_string(pre)?,
            model.llm.embed_tokens.dtype()
        );
        let digest = sha2::Sha256::digest(what.as_bytes());
        let key: String = digest.iter().take(12).map(|b| format!("{b:02x}")).collect();
        let dir = root.join(key);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
        self.disk = Some(dir);
        Ok(())
    }

    /// The store's file for an image (None without a store).
    fn disk_file(&self, image: &Path) -> Result<Option<PathBuf>> {
        let Some(dir) = &self.disk else {
            return Ok(None);
        };
        let sha = crate::util::files::sha256_file(image)?;
        Ok(Some(dir.join(format!("{sha}.safetensors"))))
    }

    /// Images whose features are held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Drops every held feature.
    pub fn clear(&mut self) {
        self.map.clear();
    }

    /// Tower features (P, Dv) of image files, computed in chunks for those not cached yet.
    pub fn for_paths(
        &mut self,
        model: &Mllm,
        paths: &[PathBuf],
        pre: &Preprocess,
        dev: &Device,
        progress: bool,
    ) -> Result<Vec<Tensor>> {
        let v = model
            .vision
            .as_ref()
            .context("images given but the model has no vision tower")?;
        let mut missing: Vec<&PathBuf> = paths
            .iter()
            .filter(|p| !self.map.contains_key(*p))
            .collect();
        missing.sort();
        missing.dedup();
        // what the disk store holds already
        let mut files = HashMap::new();
        if self.disk.is_some() {
            let mut still = Vec::new();
            for p in missing {
                let f = self.disk_file(p)?.expect("a store");
                match f.is_file() {
                    true => {
                        let t = candle_core::safetensors::load(&f, dev)
                            .with_context(|| format!("{}: unreadable feature file", f.display()))?
                            .remove("features")
                            .with_context(|| format!("{}: no `features` tensor", f.display()))?;
                        self.map.insert(p.clone(), t);
                    }
                    false => {
                        files.insert(p.clone(), f);
                        still.push(p);
                    }
                }
            }
            missing = still;
        }
        let bar = progress_bar(
            missing.len() as u64,
            0,
            progress && missing.len() > 16,
            "image features",
        );
        for chunk in missing.chunks(16) {
            let mut px = Vec::new();
            let mut hw = (0, 0);
            for p in chunk {
                let (v, h, w) = pre.load(p)?;
                hw = (h, w);
                px.extend(v);
            }
            let t = Tensor::from_vec(px, (chunk.len(), 3, hw.0, hw.1), dev)?;
            let f = v.tower.features(&t, &v.select)?;
            for (k, p) in chunk.iter().enumerate() {
                let t = f.get(k)?;
                if let Some(file) = files.get(*p) {
                    let tmp = file.with_extension(format!("tmp-{}", std::process::id()));
                    candle_core::safetensors::save(
                        &HashMap::from([("features".to_string(), t.clone())]),
                        &tmp,
                    )?;
                    std::fs::rename(&tmp, file)
                        .with_context(|| format!("{}: cannot rename into place", file.display()))?;
                }
                self.map.insert((*p).clone(), t);
            }
            bar.inc(chunk.len() as u64);
        }
        bar.finish_and_clear();
        Ok(paths.iter().map(|p| self.map[p].clone()).collect())
    }

    /// Tower features (N, P, Dv) of a host batch's images, or None without images.
    pub fn features(
        &mut self,
        model: &Mllm,
        hb: &HostBatch,
        dev: &Device,
    ) -> Result<Option<Tensor>> {
        if hb.images.is_empty() {
            return Ok(None);
        }
        let v = model
            .vision
            .as_ref()
            .context("the data has images but the model has no vision tower")?;
        let (h, w) = hb.hw;
        let per = 3 * h * w;
        let missing: Vec<usize> = (0..hb.images.len())
            .filter(|&i| !self.enabled || !self.map.contains_key(&hb.images[i]))
            .collect();
        let mut fresh = HashMap::new();
        if !missing.is_empty() {
            let mut px = Vec::with_capacity(missing.len() * per);
            for &i in &missing {
                px.extend_from_slice(&hb.pixels[i * per..(i + 1) * per]);
            }
            let px = Tensor::from_vec(px, (missing.len(), 3, h, w), dev)?;
            let f = v.tower.features(&px, &v.select)?;
            for (k, &i) in missing.iter().enumerate() {
                fresh.insert(i, f.get(k)?);
            }
        }
        let mut rows = Vec::with_capacity(hb.images.len());
        for (i, p) in hb.images.iter().enumerate() {
            let t = match fresh.remove(&i) {
                Some(t) => {
                    if self.enabled {
                        self.map.insert(p.clone(), t.clone());
                    }
                    t
                }
                None => self.map[p].clone(),
            };
            rows.push(t);
        }
        Ok(Some(Tensor::stack(&rows, 0)?))
    }
}
