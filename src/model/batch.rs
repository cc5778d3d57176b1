//! One training or evaluation batch in the layout of the reference fixtures: token ids with
//! image tokens pre-expanded, right padding, labels, and pixels or cached tower features.

use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};

use crate::io::store::Store;
use crate::ops::loss::IGNORE_INDEX;

/// One training/eval batch in the layout of the reference fixtures.
pub struct Batch {
    /// (B, T) token ids, image tokens pre-expanded
    pub input_ids: Vec<Vec<u32>>,
    /// (B, T) true for real tokens (right padding)
    pub attention_mask: Vec<Vec<bool>>,
    /// (B, T) targets, `IGNORE_INDEX` where unscored; None for inference
    pub labels: Option<Vec<Vec<i64>>>,
    /// (N images, C, H, W) f32, images in batch order
    pub pixel_values: Option<Tensor>,
    /// the vision tower's output for these images, (N, P, Dv), when already computed (the
    /// tower is frozen, so features can be cached); used instead of `pixel_values`
    pub vision_features: Option<Tensor>,
}

impl Batch {
    /// Reads `input_ids`, `attention_mask` (optional: all ones), `labels` (optional) and
    /// `pixel_values` (optional) from a safetensors file.
    pub fn from_safetensors(path: &Path, device: &Device) -> Result<Self> {
        let mut store = Store::new(&Device::Cpu);
        store.add_safetensors(path)?;
        let ints = |name: &str| -> Result<Option<Vec<Vec<i64>>>> {
            if !store.contains(name) {
                return Ok(None);
            }
            let t = store.load_any(name)?;
            let t = t.to_dtype(DType::I64)?;
            let rows = t.to_vec2::<i64>().map_err(|e| {
                anyhow::anyhow!(
                    "{}: tensor `{name}` must be 2-D (B, T): {e}",
                    path.display()
                )
            })?;
            Ok(Some(rows))
        };
        let ids = ints("input_ids")?
            .with_context(|| format!("{}: missing tensor `input_ids`", path.display()))?;
        let input_ids = ids
            .iter()
            .map(|r| {
                r.iter()
                    .map(|&x| {
                        u32::try_from(x).map_err(|_| {
                            anyhow::anyhow!("{}: `input_ids` holds negative id {x}", path.display())
                        })
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        let (b, t) = (
            input_ids.len(),
            input_ids.first().map(|r| r.len()).unwrap_or(0),
        );
        let attention_mask = match ints("attention_mask")? {
            Some(m) => m
                .into_iter()
                .map(|r| r.into_iter().map(|x| x != 0).collect())
                .collect(),
            None => vec![vec![true; t]; b],
        };
        let labels = ints("labels")?;
        let shape_ok = |rows: &Vec<Vec<bool>>| rows.len() == b && rows.iter().all(|r| r.len() == t);
        if !shape_ok(&attention_mask) {
            bail!(
                "{}: `attention_mask` shape differs from `input_ids` [{b}, {t}]",
                path.display()
            );
        }
        if let Some(l) = &labels
            && (l.len() != b || l.iter().any(|r| r.len() != t))
        {
            bail!(
                "{}: `labels` shape differs from `input_ids` [{b}, {t}]",
                path.display()
            );
        }
        let pixel_values = if store.contains("pixel_values") {
            let pv = store.load_any("pixel_values")?.to_dtype(DType::F32)?;
            if pv.rank() != 4 {
                bail!(
                    "{}: `pixel_values` has shape {:?}, expected (N, C, H, W)",
                    path.display(),
                    pv.dims()
                );
            }
            Some(pv.to_device(device)?)
        } else {
            None
        };
        Ok(Self {
            input_ids,
            attention_mask,
            labels,
            pixel_values,
            vision_features: None,
        })
    }

    pub fn dims(&self) -> (usize, usize) {
        (
            self.input_ids.len(),
            self.input_ids.first().map(|r| r.len()).unwrap_or(0),
        )
    }
}

/// Labels (B, T) -> targets for logits rows (B·T): row (b, t) predicts labels[b][t + 1];
/// the last position of each row predicts nothing.
pub fn shifted_targets(labels: &[Vec<i64>], t: usize) -> Result<Vec<i64>> {
    let mut targets = Vec::with_capacity(labels.len() * t);
    for (bi, row) in labels.iter().enumerate() {
        if row.len() != t {
            bail!("labels: row {bi} has {} entries, expected {t}", row.len());
        }
        targets.extend_from_slice(&row[1..]);
        targets.push(IGNORE_INDEX);
    }
    Ok(targets)
}
