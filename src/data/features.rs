//! The frozen vision tower's features per image file, computed once and reused by every
//! step and every question that shows the image.

use std::collections::HashMap;
use std::path::PathBuf;

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
}

impl FeatureCache {
    pub fn new(enabled: bool) -> Self {
        Self {
            map: HashMap::new(),
            enabled,
        }
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
                self.map.insert((*p).clone(), f.get(k)?);
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
