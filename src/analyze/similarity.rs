//! Layer similarity: for each sample, every decoder layer's output is mean-pooled over the
//! sample's real tokens; the cosine similarity of each pair of layers is averaged over
//! samples. The paper reads a lower similarity as more expressive power. `similarity`
//! compares a base model and adapters on the same samples.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::data::dataset::{Example, ExampleSpec, HostBatch, load_examples, pad_id};
use crate::data::features::FeatureCache;
use crate::data::image::ImageProcessing;
use crate::data::llava::DataSource;
use crate::data::template::TemplateName;
use crate::methods::adapter::load_model;
use crate::model::batch::Batch;
use crate::model::mllm::Mllm;
use crate::util::file_safe;
use crate::util::files::{write_atomically, write_json};
use crate::util::plot::Heatmap;

/// Similarities between the layers of one model on one set of samples.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LayerSimilarity {
    /// (L, L) mean cosine similarity between layer outputs (1 on the diagonal)
    pub matrix: Vec<Vec<f64>>,
    /// mean over all pairs i < j
    pub all_pairs: f64,
    /// mean over adjacent pairs (i, i + 1)
    pub adjacent: f64,
    pub samples: usize,
    /// each sample's mean over all pairs i < j (their mean is `all_pairs`): the same samples
    /// for every model of a comparison, so two models' differences pair up per sample
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub per_sample_all_pairs: Vec<f64>,
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 || bb == 0.0 {
        return 0.0;
    }
    ab / (aa.sqrt() * bb.sqrt())
}

/// `pooled[s][l]` is sample s's mean-pooled output of layer l.
pub fn layer_similarity(pooled: &[Vec<Vec<f64>>]) -> Result<LayerSimilarity> {
    let Some(first) = pooled.first() else {
        bail!("no samples")
    };
    let l = first.len();
    if l < 2 {
        bail!("need at least two layers, got {l}");
    }
    if pooled.iter().any(|s| s.len() != l) {
        bail!("every sample needs {l} layers");
    }
    let mut m = vec![vec![0.0; l]; l];
    let mut per_sample = Vec::with_capacity(pooled.len());
    let pairs = (l * (l - 1) / 2) as f64;
    for s in pooled {
        let mut above = 0.0;
        for i in 0..l {
            for j in 0..l {
                let c = cosine(&s[i], &s[j]);
                m[i][j] += c;
                if j > i {
                    above += c;
                }
            }
        }
        per_sample.push(above / pairs);
    }
    let n = pooled.len() as f64;
    m.iter_mut().flatten().for_each(|x| *x /= n);
    let all: Vec<f64> = m
        .iter()
        .enumerate()
        .flat_map(|(i, row)| row[i + 1..].iter().copied())
        .collect();
    let adjacent: Vec<f64> = (0..l - 1).map(|i| m[i][i + 1]).collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    Ok(LayerSimilarity {
        all_pairs: mean(&all),
        adjacent: mean(&adjacent),
        matrix: m,
        samples: pooled.len(),
        per_sample_all_pairs: per_sample,
    })
}

/// Every decoder layer's output (B, T, C), mean-pooled over the attention mask's real
/// tokens: `[sample][layer][channel]`.
pub fn pooled_layer_outputs(model: &Mllm, batch: &Batch) -> Result<Vec<Vec<Vec<f64>>>> {
    let x = model.input_embeds(batch)?;
    let (b, t, _) = x.dims3()?;
    let positions: Vec<u32> = batch
        .attention_mask
        .iter()
        .flat_map(|row| {
            let mut p = 0u32;
            row.iter()
                .map(move |&ok| {
                    let v = p;
                    if ok {
                        p += 1;
                    }
                    v
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let inp = model.llm.prepare(&batch.attention_mask, &positions, t)?;
    let outs = model.llm.layer_outputs(&x, &inp)?;
    let mask: Vec<f32> = batch
        .attention_mask
        .iter()
        .flatten()
        .map(|&m| if m { 1.0 } else { 0.0 })
        .collect();
    let mask = Tensor::from_vec(mask, (b, t, 1), x.device())?;
    let counts = mask.sum(1)?; // (B, 1)
    let mut per_layer = Vec::with_capacity(outs.len());
    for h in outs {
        let pooled = h
            .to_dtype(DType::F32)?
            .broadcast_mul(&mask)?
            .sum(1)?
            .broadcast_div(&counts)?; // (B, C)
        per_layer.push(pooled.to_dtype(DType::F64)?.to_vec2::<f64>()?);
    }
    Ok((0..b)
        .map(|s| per_layer.iter().map(|l| l[s].clone()).collect())
        .collect())
}

/// What `lntune analyze similarity` compares, and on which samples.
pub struct SimilarityConfig {
    pub model: PathBuf,
    /// (name, adapter), None for the base model alone
    pub models: Vec<(String, Option<PathBuf>)>,
    /// LLaVA JSON samples; the first `samples` are used
    pub data: Vec<DataSource>,
    pub images: Option<PathBuf>,
    pub samples: usize,
    /// the model's own template when None
    pub template: Option<TemplateName>,
    pub max_length: usize,
    pub batch: usize,
    pub dtype: DType,
    pub image: ImageProcessing,
    /// similarity.json, similarity.md and one heatmap PNG per model
    pub out: PathBuf,
}

/// The similarities of several models on the same samples.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SimilarityReport {
    pub models: Vec<(String, LayerSimilarity)>,
}

impl SimilarityReport {
    pub fn markdown(&self) -> String {
        let mut s = String::from(
            "| model | mean cosine, all layer pairs | mean cosine, adjacent layers | samples |\n|---|---|---|---|\n",
        );
        for (n, r) in &self.models {
            s.push_str(&format!(
                "| {n} | {:.4} | {:.4} | {} |\n",
                r.all_pairs, r.adjacent, r.samples
            ));
        }
        s
    }
}

/// Layer similarity of each model of `cfg` on the same samples; writes the report and one
/// heatmap per model under `cfg.out`.
pub fn similarity(cfg: &SimilarityConfig, device: &Device) -> Result<SimilarityReport> {
    if cfg.models.is_empty() {
        bail!("nothing to analyse: give --adapter or keep --base true");
    }
    let mut report = SimilarityReport { models: vec![] };
    let mut cache = FeatureCache::new(true);
    for (name, adapter) in &cfg.models {
        let r = one_model_similarity(cfg, adapter.as_deref(), &mut cache, device)?;
        eprintln!(
            "{name}: all pairs {:.4}, adjacent {:.4}",
            r.all_pairs, r.adjacent
        );
        report.models.push((name.clone(), r));
    }
    write_similarity_report(&report, &cfg.out)?;
    Ok(report)
}

/// The layer similarity of the base model with `adapter` (None: the base alone) on the
/// first `cfg.samples` examples of `cfg.data` (`cfg.models` and `cfg.out` are not used).
pub fn one_model_similarity(
    cfg: &SimilarityConfig,
    adapter: Option<&Path>,
    cache: &mut FeatureCache,
    device: &Device,
) -> Result<LayerSimilarity> {
    let model = load_model(&cfg.model, adapter, cfg.dtype, device)?;
    model_similarity(cfg, &model, cache, device)
}

/// similarity.json, similarity.md and one heatmap per model under `out`.
pub fn write_similarity_report(report: &SimilarityReport, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    for (name, r) in &report.models {
        Heatmap {
            title: format!("layer similarity: {name}"),
            axis_label: "decoder layer".into(),
            values: r.matrix.clone(),
            lo: r
                .matrix
                .iter()
                .flatten()
                .copied()
                .fold(f64::MAX, f64::min)
                .min(0.0),
            hi: 1.0,
        }
        .save_png(&out.join(format!("similarity_{}.png", file_safe(name))))?;
    }
    write_json(&out.join("similarity.json"), report)?;
    write_atomically(&out.join("similarity.md"), report.markdown().as_bytes())?;
    Ok(())
}

/// One model's similarity on the first `cfg.samples` examples of the data.
fn model_similarity(
    cfg: &SimilarityConfig,
    model: &Mllm,
    cache: &mut FeatureCache,
    device: &Device,
) -> Result<LayerSimilarity> {
    let pre = cfg.image.preprocess(model)?;
    let template = cfg
        .template
        .unwrap_or_else(|| TemplateName::default_for(model.tokenizer.as_ref()));
    let spec = ExampleSpec {
        data: &cfg.data,
        images: cfg.images.as_deref(),
        template,
        preprocess: &pre,
        max_length: cfg.max_length,
        seed: 0,
        allow_any_image_path: false,
    };
    let (mut examples, _) = load_examples(model, &spec)?;
    // a fixed set: the first samples in the order of seed 0, the same for every model
    examples.truncate(cfg.samples.max(1));
    let mut pooled = Vec::new();
    for chunk in examples.chunks(cfg.batch.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let hb = HostBatch::collate(&refs, pad_id(model), &pre)?;
        let mut b = hb.to_batch(device)?;
        b.vision_features = cache.features(model, &hb, device)?;
        b.pixel_values = None;
        pooled.extend(pooled_layer_outputs(model, &b)?);
    }
    layer_similarity(&pooled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_similarities() {
        // layer 0 = e1, layer 1 = e1 + e2 (cos 1/√2 with e1), layer 2 = e2 (cos 0 with e1)
        let s = vec![vec![vec![1.0, 0.0], vec![1.0, 1.0], vec![0.0, 3.0]]];
        let r = layer_similarity(&s).unwrap();
        let h = 1.0 / 2f64.sqrt();
        assert!((r.matrix[0][1] - h).abs() < 1e-12 && (r.matrix[1][2] - h).abs() < 1e-12);
        assert!(r.matrix[0][2].abs() < 1e-12 && (r.matrix[2][2] - 1.0).abs() < 1e-12);
        assert!((r.adjacent - h).abs() < 1e-12);
        assert!((r.all_pairs - 2.0 * h / 3.0).abs() < 1e-12);
        // averaging over samples: a second sample where every layer points the same way
        let s2 = vec![
            s[0].clone(),
            vec![vec![2.0, 0.0], vec![5.0, 0.0], vec![1.0, 0.0]],
        ];
        let r2 = layer_similarity(&s2).unwrap();
        assert!((r2.all_pairs - (2.0 * h / 3.0 + 1.0) / 2.0).abs() < 1e-12);
        assert!((r2.matrix[0][2] - 0.5).abs() < 1e-12);
        // each sample's own mean over pairs, in sample order
        let ps = &r2.per_sample_all_pairs;
        assert_eq!(ps.len(), 2);
        assert!((ps[0] - 2.0 * h / 3.0).abs() < 1e-12 && (ps[1] - 1.0).abs() < 1e-12);
        // opposite directions give -1; scale does not matter
        let r3 = layer_similarity(&[vec![vec![1.0, 2.0], vec![-3.0, -6.0]]]).unwrap();
        assert!((r3.all_pairs + 1.0).abs() < 1e-12);
        assert!(layer_similarity(&[vec![vec![1.0]]]).is_err());
    }
}
