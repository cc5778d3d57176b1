//! Layer similarity: for each sample, every decoder layer's output is mean-pooled over the
//! sample's real tokens; the cosine similarity of each pair of layers is averaged over
//! samples. The paper reads a lower similarity as more expressive power.

use anyhow::{Result, bail};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::model::mllm::{Batch, Mllm};

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
    for s in pooled {
        for i in 0..l {
            for j in 0..l {
                m[i][j] += cosine(&s[i], &s[j]);
            }
        }
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
        // opposite directions give -1; scale does not matter
        let r3 = layer_similarity(&[vec![vec![1.0, 2.0], vec![-3.0, -6.0]]]).unwrap();
        assert!((r3.all_pairs + 1.0).abs() < 1e-12);
        assert!(layer_similarity(&[vec![vec![1.0]]]).is_err());
    }
}
