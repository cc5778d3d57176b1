//! `lntune demo`: the main job. Builds a small real multimodal model from pretrained parts
//! (DINOv2 ViT-S/14, frozen + a 2-layer GELU projector + SmolLM2-135M-Instruct), trains it in
//! LLaVA's two stages on the generated `shapes` data (`Level::Basic` by default: the task of
//! the PyTorch reference run; stage 1: projector on captions; stage 2: a method, LayerNorm
//! tuning by default, on instruction data), and measures held-out scores after each stage
//! with the official metrics, plus a wrong-image control.
//!
//! Everything lands in the output folder: data/, model/ (compose.json + projector), stage1/
//! and stage2/ (run configs, adapters, metrics, loss curves, the evaluation answers),
//! report.md, report.json. Files: `model` (the composition), `report` (report.json and
//! report.md); the pipeline and its evaluations are here.

mod model;
mod report;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device};

use crate::data::features::FeatureCache;
use crate::data::image::{ImageProcessing, ImageProcessor, Preprocess};
use crate::data::llava::{DataSource, read_file, split_rounds};
use crate::data::shapes::{Level, ShapesConfig, generate as generate_shapes};
use crate::data::template::{Template, TemplateName};
use crate::eval::answer::Answerer;
use crate::eval::benchmarks::shapes::{ShapesEval, ShapesScores, eval_shapes};
use crate::eval::generate::GenConfig;
use crate::io::assets::{cache_dir, ensure_demo_assets};
use crate::methods::adapter::load_model;
use crate::methods::{Method, MethodConfig};
use crate::model::mllm::Mllm;
use crate::train::run::{RunConfig, RunOutput, RunResult, train_run};
use crate::util::checks;
use crate::util::files::{FolderLock, write_atomically, write_json};
use report::{DemoReport, mean_last, report_markdown};

/// The demo's settings (`lntune demo` flags).
#[derive(Debug, Clone)]
pub struct DemoConfig {
    pub out: PathBuf,
    /// cache for the pretrained parts (default: $LNTUNE_CACHE or ~/.cache/lntune)
    pub cache: Option<PathBuf>,
    /// wheels (or extracted .gguf/.onnx) copied by hand, for machines without network
    pub assets: Option<PathBuf>,
    /// stage-2 method
    pub method: Method,
    /// a short smoke run of the whole pipeline
    pub quick: bool,
    pub seed: u64,
    pub level: Level,
    pub train_images: Option<usize>,
    pub test_images: Option<usize>,
    pub stage1_steps: Option<usize>,
    pub stage2_steps: Option<usize>,
    /// stage-2 learning rate (default: 5e-4 for the norm methods, else the method's)
    pub lr: Option<f64>,
    /// test images for POPE, MME and captions (VQA uses all)
    pub eval_images: Option<usize>,
    /// image side in pixels (a multiple of 14)
    pub image_size: usize,
    /// image tokens per side (the patch grid is average-pooled to pool x pool)
    pub pool: usize,
    pub progress: bool,
}

/// Questions decoded together (decode steps cost about the same for 16 or 48 rows).
const EVAL_BATCH: usize = 48;
/// Examples per micro-batch in both stages.
const BATCH: usize = 8;
/// Stage 1's learning rate (the projector alone, on captions).
const STAGE1_LR: f64 = 1e-3;

/// The sizes of one demo run, from the level, `--quick` and the flags.
struct Sizes {
    n_train: usize,
    n_test: usize,
    stage1_steps: usize,
    stage2_steps: usize,
    eval_small: usize,
}

impl Sizes {
    fn of(cfg: &DemoConfig) -> Self {
        let basic = cfg.level == Level::Basic;
        let pick = |quick: usize, basic_v: usize, full_v: usize| match (cfg.quick, basic) {
            (true, _) => quick,
            (false, true) => basic_v,
            (false, false) => full_v,
        };
        let n_test = cfg.test_images.unwrap_or(pick(16, 240, 100));
        Self {
            n_train: cfg.train_images.unwrap_or(pick(48, 1200, 800)),
            n_test,
            stage1_steps: cfg.stage1_steps.unwrap_or(pick(15, 100, 100)),
            stage2_steps: cfg.stage2_steps.unwrap_or(pick(20, 300, 180)),
            eval_small: cfg
                .eval_images
                .unwrap_or(if cfg.quick { 8 } else { 24 })
                .min(n_test),
        }
    }
}

impl Sizes {
    fn validate(&self) -> Result<()> {
        checks::positive("--train-images", self.n_train)?;
        checks::positive("--test-images", self.n_test)?;
        checks::positive("--stage1-steps", self.stage1_steps)?;
        checks::positive("--stage2-steps", self.stage2_steps)?;
        checks::positive("--eval-images", self.eval_small)
    }
}

/// The stage-2 learning rate: the given one, else 5e-4 for the norm methods (and the
/// projector alone), else the method's default.
fn stage2_lr(cfg: &DemoConfig) -> f64 {
    cfg.lr.unwrap_or(match cfg.method {
        Method::Ln | Method::LnSimple | Method::Projector => 5e-4,
        m => m.default_lr(),
    })
}

/// The stage-2 method: LN tuning keeps the tied 28M-parameter embedding frozen (with 16
/// supervised tokens per sample it only adds optimizer work; `lntune train --method ln`
/// trains it by default).
fn stage2_method(m: Method) -> MethodConfig {
    let mut method = MethodConfig::new(m);
    if m == Method::Ln {
        method.train_embed = false;
        method.train_head = false;
    }
    method
}

/// What both stages' runs share: the demo's model, images and preprocessing, and the seed.
struct Stages<'a> {
    model_dir: &'a Path,
    images: &'a Path,
    image: &'a ImageProcessing,
    seed: u64,
}

impl Stages<'_> {
    /// One stage's run: a method, template, data, rate and steps; batch 8, warmup 10%,
    /// 256 tokens at most.
    fn run_config(
        &self,
        method: MethodConfig,
        template: TemplateName,
        data: Vec<DataSource>,
        lr: f64,
        steps: usize,
        init_adapter: Option<PathBuf>,
    ) -> RunConfig {
        RunConfig {
            model: self.model_dir.to_path_buf(),
            data,
            images: Some(self.images.to_path_buf()),
            method,
            template: Some(template),
            lr: Some(lr),
            warmup_ratio: 0.1,
            steps: Some(steps),
            batch: BATCH,
            max_length: 256,
            seed: self.seed,
            init_adapter,
            image: self.image.clone(),
            ..RunConfig::default()
        }
    }
}

/// Runs the whole demo and prints the report.
pub fn run_demo(cfg: &DemoConfig, device: &Device) -> Result<()> {
    let t_all = Instant::now();
    let mut secs = BTreeMap::new();
    let sizes = Sizes::of(cfg);
    sizes.validate()?;
    if let Some(lr) = cfg.lr {
        checks::finite_positive("--lr", lr)?;
    }
    let (size, pool) = (cfg.image_size, cfg.pool);
    anyhow::ensure!(
        size > 0 && pool > 0 && size.is_multiple_of(14) && (size / 14).is_multiple_of(pool),
        "--image-size {size} with --pool {pool}: the side must be a multiple of 14 px whose patch grid (side/14) is a multiple of --pool"
    );
    let out = &cfg.out;
    let _lock = FolderLock::acquire(out)?;
    let progress = cfg.progress;
    let Built {
        data,
        model_dir,
        image_processing,
        pre,
        mut cache,
    } = build(cfg, &sizes, &mut secs, device)?;
    let images = out.join("data/images");
    let stages = Stages {
        model_dir: &model_dir,
        images: &images,
        image: &image_processing,
        seed: cfg.seed,
    };
    let eval = |caption_template, caption_prompt, wrong_image, predictions| DemoEval {
        data: &data,
        preprocess: &pre,
        progress,
        eval_small: sizes.eval_small,
        caption_template,
        caption_prompt,
        wrong_image,
        predictions,
    };

    // 4. stage 1: the projector on captions (plain template), then its evaluation
    let t = Instant::now();
    let c1 = stages.run_config(
        MethodConfig::new(Method::Projector),
        TemplateName::Plain,
        vec![DataSource {
            path: data.join("captions_train.json"),
            budget: None,
        }],
        STAGE1_LR,
        sizes.stage1_steps,
        None,
    );
    // the demo owns its folder: each rerun replaces its stages
    let r1 = train_run(
        &c1,
        &fresh(&out.join("stage1"), progress),
        &mut cache,
        device,
    )?;
    secs.insert("stage 1".to_string(), t.elapsed().as_secs_f64());
    let t = Instant::now();
    let m1 = load_model(&model_dir, Some(&r1.adapter_dir), DType::F32, device)?;
    // stage 1 learned captions in the `plain` template: image, then the caption
    let predictions1 = out.join("stage1/eval_predictions.jsonl");
    let after1 = demo_eval(
        &m1,
        &mut cache,
        &eval(TemplateName::Plain, "", false, &predictions1),
    )?;
    drop(m1);
    secs.insert("eval after stage 1".to_string(), t.elapsed().as_secs_f64());

    // 5. stage 2: instruction data (conversation, reasoning, and captions as instructions so
    // that captioning is kept) with the chosen method, then its evaluation and the
    // wrong-image control
    let t = Instant::now();
    let lr2 = stage2_lr(cfg);
    let c2 = stages.run_config(
        stage2_method(cfg.method),
        TemplateName::Chatml,
        stage2_data(out, &data, cfg.level, sizes.n_train)?,
        lr2,
        sizes.stage2_steps,
        Some(r1.adapter_dir.clone()),
    );
    let r2 = train_run(
        &c2,
        &fresh(&out.join("stage2"), progress),
        &mut cache,
        device,
    )?;
    secs.insert("stage 2".to_string(), t.elapsed().as_secs_f64());
    let t = Instant::now();
    let m2 = load_model(&model_dir, Some(&r2.adapter_dir), DType::F32, device)?;
    // after stage 2 captions are asked as an instruction, as stage 2 trained them
    let (predictions2, predictions2_wrong) = (
        out.join("stage2/eval_predictions.jsonl"),
        out.join("stage2/eval_predictions_wrong_image.jsonl"),
    );
    let asked = "Describe the image briefly.";
    let after2 = demo_eval(
        &m2,
        &mut cache,
        &eval(TemplateName::Chatml, asked, false, &predictions2),
    )?;
    let control = demo_eval(
        &m2,
        &mut cache,
        &eval(TemplateName::Chatml, asked, true, &predictions2_wrong),
    )?;
    secs.insert("eval after stage 2".to_string(), t.elapsed().as_secs_f64());
    secs.insert("total".to_string(), t_all.elapsed().as_secs_f64());

    let report = DemoReport {
        config: report_config(cfg, &sizes, lr2, &c2),
        after_stage1: after1,
        after_stage2: after2,
        after_stage2_wrong_image: control,
        stage1_final_loss: mean_last(&r1.reports, 10),
        stage2_final_loss: mean_last(&r2.reports, 10),
        seconds: secs,
        data: data_notes(&r1, &r2),
    };
    write_json(&out.join("report.json"), &report)?;
    let md = report_markdown(&report, out);
    write_atomically(&out.join("report.md"), md.as_bytes())?;
    println!("{md}");
    Ok(())
}

/// What steps 1 to 3 leave: the data, the model directory, the image preprocessing, and
/// every image's tower features.
struct Built {
    data: PathBuf,
    model_dir: PathBuf,
    image_processing: ImageProcessing,
    pre: Preprocess,
    cache: FeatureCache,
}

/// Steps 1 to 3: the pretrained parts, the shapes data, the composed model (its projector
/// standardized with the train images' feature statistics).
fn build(
    cfg: &DemoConfig,
    sizes: &Sizes,
    secs: &mut BTreeMap<String, f64>,
    device: &Device,
) -> Result<Built> {
    let (size, pool, out, progress) = (cfg.image_size, cfg.pool, &cfg.out, cfg.progress);
    // 1. pretrained parts
    let t = Instant::now();
    let assets = ensure_demo_assets(&cache_dir(cfg.cache.as_deref()), cfg.assets.as_deref())?;
    secs.insert("fetch".to_string(), t.elapsed().as_secs_f64());

    // 2. data
    let t = Instant::now();
    let data = out.join("data");
    let shapes = ShapesConfig {
        seed: cfg.seed,
        train: sizes.n_train,
        test: sizes.n_test,
        size,
        level: cfg.level,
    };
    generate_shapes(&shapes, &data)?;
    secs.insert("data".to_string(), t.elapsed().as_secs_f64());
    eprintln!(
        "shapes data ({:?} level): {} train / {} test images at {size} px in {}",
        cfg.level,
        sizes.n_train,
        sizes.n_test,
        data.display()
    );

    // 3. the composed model; projector input statistics from the train images' features
    let t = Instant::now();
    let model_dir = out.join("model");
    let image_processing = ImageProcessing {
        processor: Some(ImageProcessor::Dinov2),
        size: Some(size),
    };
    let mut pre = Preprocess::dinov2();
    pre.shortest_edge = Some(size);
    pre.crop = Some((size, size));
    let mut cache = FeatureCache::new(true);
    let img = |split: &str, i: usize| data.join("images").join(format!("{split}_{i:05}.png"));
    let mut paths: Vec<PathBuf> = (0..sizes.n_train).map(|i| img("train", i)).collect();
    paths.extend((0..sizes.n_test).map(|i| img("test", i)));
    model::build_model(
        &model_dir,
        &assets.dinov2_dir,
        &assets.smollm2_gguf,
        &paths,
        sizes.n_train,
        size,
        pool,
        cfg.seed,
        &pre,
        &mut cache,
        device,
        progress,
    )?;
    secs.insert("image features".to_string(), t.elapsed().as_secs_f64());
    let grid = size / 14;
    eprintln!(
        "model: DINOv2 ViT-S/14 (blocks 4 and 8, {grid}x{grid} patches pooled to {pool}x{pool}) -> projector -> SmolLM2-135M-Instruct; features in {:.0}s",
        t.elapsed().as_secs_f64()
    );
    Ok(Built {
        data,
        model_dir,
        image_processing,
        pre,
        cache,
    })
}

/// A stage's run into `dir`, replacing what an earlier demo left there.
fn fresh(dir: &Path, progress: bool) -> RunOutput<'_> {
    RunOutput {
        dir,
        resume: None,
        overwrite: true,
        progress,
        comm: std::rc::Rc::new(crate::util::dist::Comm::single()),
    }
}

/// Stage 2's data: the conversations cut into one-round samples (for the same tokens,
/// several times more optimizer steps, which is what LayerNorm tuning of a 135M model needs
/// in minutes), reasoning at the full level, and captions asked as instructions (one sample
/// in four of the train images).
fn stage2_data(out: &Path, data: &Path, level: Level, n_train: usize) -> Result<Vec<DataSource>> {
    let rounds = out.join("stage2_rounds.json");
    let pieces = split_rounds(&read_file(&data.join("conversation_train.json"))?, 1);
    write_atomically(&rounds, serde_json::to_string(&pieces)?.as_bytes())?;
    let mut sources = vec![DataSource {
        path: rounds,
        budget: None,
    }];
    if level != Level::Basic {
        // basic scenes have no reasoning questions worth asking
        sources.push(DataSource {
            path: data.join("reasoning_train.json"),
            budget: Some(n_train / 8),
        });
    }
    sources.push(DataSource {
        path: data.join("captions_train.json"),
        budget: Some(n_train / 4),
    });
    Ok(sources)
}

/// The settings report.json records.
fn report_config(
    cfg: &DemoConfig,
    sizes: &Sizes,
    lr2: f64,
    c2: &RunConfig,
) -> BTreeMap<String, serde_json::Value> {
    let mut config = BTreeMap::new();
    for (k, v) in [
        ("train_images", serde_json::json!(sizes.n_train)),
        ("test_images", serde_json::json!(sizes.n_test)),
        ("image_size", serde_json::json!(cfg.image_size)),
        ("level", serde_json::json!(cfg.level)),
        (
            "vision_tokens_per_image",
            serde_json::json!(cfg.pool * cfg.pool),
        ),
        ("stage1_steps", serde_json::json!(sizes.stage1_steps)),
        ("stage2_steps", serde_json::json!(sizes.stage2_steps)),
        ("batch", serde_json::json!(BATCH)),
        ("stage1_lr", serde_json::json!(STAGE1_LR)),
        ("stage2_lr", serde_json::json!(lr2)),
        ("stage2_method", serde_json::json!(cfg.method.name())),
        ("stage2_trainable_params", serde_json::json!(c2.method)),
        ("seed", serde_json::json!(cfg.seed)),
        ("quick", serde_json::json!(cfg.quick)),
    ] {
        config.insert(k.to_string(), v);
    }
    config
}

fn data_notes(r1: &RunResult, r2: &RunResult) -> BTreeMap<String, String> {
    let mut notes = BTreeMap::new();
    notes.insert("stage1".to_string(), r1.data.summary());
    notes.insert("stage2".to_string(), r2.data.summary());
    notes
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

fn greedy_answerer<'a>(
    m: &'a Mllm,
    template: &'a Template,
    d: &DemoEval<'a>,
    eos: &[u32],
    max_new: usize,
) -> Answerer<'a> {
    let mut g = GenConfig::greedy(max_new);
    g.eos_ids = eos.to_vec();
    g.stop_strings = template.stop_strings();
    Answerer {
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
    let tokenizer = m.tokenizer.as_ref().context("no tokenizer")?;
    let eos: Vec<u32> = tokenizer.eos_id.into_iter().collect();
    let chat = Template::new(TemplateName::Chatml, Some(tokenizer))?;
    let caption_template = Template::new(d.caption_template, Some(tokenizer))?;
    let ask = greedy_answerer(m, &chat, d, &eos, 6);
    let cap = greedy_answerer(m, &caption_template, d, &eos, 48);
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
