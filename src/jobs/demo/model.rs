//! The demo's model: `compose.json` joining DINOv2 ViT-S/14 (frozen; hidden states of
//! blocks 4 and 8 concatenated, the patch grid average-pooled), a 2-layer GELU projector
//! whose input is standardized with train-set statistics, and SmolLM2-135M-Instruct (GGUF).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

use crate::data::features::FeatureCache;
use crate::data::image::Preprocess;
use crate::model::compose::{
    COMPOSE_FORMAT, ComposeFile, ComposePart, ComposeProjector, ComposeVision,
};
use crate::model::config::OneOrMany;
use crate::model::mllm::Mllm;
use crate::util::rng::Rng;

/// The special token SmolLM2 never produces in text that stands in for image positions
/// (its embedding row is replaced by the image features).
pub const IMAGE_TOKEN: u32 = 16;

/// DINOv2 hidden states the projector sees, concatenated: outputs of blocks 4 and 8. The
/// last layer's (layer-normed) features keep little color (DINOv2 trains with color
/// jitter): nearest-centroid probes on shapes tokens at 112 px read color 36% / shape 63%
/// from the last layer, 85% / 86% from these two.
pub const FEATURE_LAYERS: [i64; 2] = [4, 8];
pub const VISION_DIM: usize = 384 * FEATURE_LAYERS.len();
/// SmolLM2-135M's width.
const LLM_DIM: usize = 576;

/// Writes `dir/compose.json` for `size` px images pooled to `pool` x `pool` tokens.
pub fn write_compose(
    dir: &Path,
    dinov2: &Path,
    gguf: &Path,
    size: usize,
    pool: usize,
) -> Result<()> {
    let abs = |p: &Path| {
        std::fs::canonicalize(p)
            .unwrap_or_else(|_| p.to_path_buf())
            .display()
            .to_string()
    };
    ComposeFile {
        format: COMPOSE_FORMAT.into(),
        vision: ComposeVision {
            path: abs(dinov2),
            model_type: Some("dinov2".into()),
            feature: Some("hidden_states".into()),
            feature_layer: Some(OneOrMany::Many(FEATURE_LAYERS.to_vec())),
            apply_final_layernorm: Some(false),
            select_strategy: Some("default".into()),
            input_hw: Some([size, size]),
            pool: Some([pool, pool]),
        },
        projector: ComposeProjector {
            path: "projector.safetensors".into(),
            type_: "mlp2x_gelu".into(),
            bias: Some(true),
            in_features: Some(VISION_DIM),
            out_features: Some(LLM_DIM),
            act: None,
            standardize: Some(true),
        },
        llm: ComposePart { path: abs(gguf) },
        image_token_id: IMAGE_TOKEN as i64,
        image_tokens_per_image: Some(pool * pool),
    }
    .write(dir)
}

/// Writes the projector with PyTorch's default `nn.Linear` init (U(±1/√in) for weight and
/// bias) and the input standardization statistics.
pub fn write_projector(dir: &Path, seed: u64, mean: &[f32], std: &[f32]) -> Result<()> {
    let dev = Device::Cpu;
    let mut rng = Rng::new(seed ^ 0x5eed);
    let mut t = HashMap::new();
    for (name, o, i) in [
        ("linear_1", LLM_DIM, VISION_DIM),
        ("linear_2", LLM_DIM, LLM_DIM),
    ] {
        let b = 1.0 / (i as f64).sqrt();
        t.insert(
            format!("{name}.weight"),
            rng.uniform_tensor(&[o, i], -b, b, DType::F32, &dev)?,
        );
        t.insert(
            format!("{name}.bias"),
            rng.uniform_tensor(&[o], -b, b, DType::F32, &dev)?,
        );
    }
    t.insert(
        "input_mean".into(),
        Tensor::from_slice(mean, VISION_DIM, &dev)?,
    );
    t.insert(
        "input_std".into(),
        Tensor::from_slice(std, VISION_DIM, &dev)?,
    );
    {
        let path = dir.join("projector.safetensors");
        candle_core::safetensors::save(&t, &path)
            .with_context(|| format!("{}: cannot write", path.display()))?;
    }
    Ok(())
}

/// Builds the model directory: compose.json and a projector with identity statistics
/// first, then (from every image's tower features, cached for the rest of the demo) the
/// projector with the train images' per-channel mean and standard deviation.
#[allow(clippy::too_many_arguments)]
pub fn build_model(
    model_dir: &Path,
    dinov2: &Path,
    gguf: &Path,
    images: &[PathBuf],
    n_train: usize,
    size: usize,
    pool: usize,
    seed: u64,
    pre: &Preprocess,
    cache: &mut FeatureCache,
    device: &Device,
    progress: bool,
) -> Result<()> {
    std::fs::create_dir_all(model_dir)?;
    write_compose(model_dir, dinov2, gguf, size, pool)?;
    write_projector(model_dir, seed, &[0.0; VISION_DIM], &[1.0; VISION_DIM])?;
    let base = Mllm::load(model_dir, DType::F32, device)?;
    let feats = cache.for_paths(&base, images, pre, device, progress)?;
    let train = Tensor::cat(&feats[..n_train], 0)?; // (n·pool², VISION_DIM)
    let mean = train.mean(0)?;
    let std = (train.broadcast_sub(&mean)?.sqr()?.mean(0)? + 1e-6)?.sqrt()?;
    write_projector(
        model_dir,
        seed,
        &mean.to_vec1::<f32>()?,
        &std.to_vec1::<f32>()?,
    )
}
