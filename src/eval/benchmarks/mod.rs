//! Benchmarks in their usual file formats, and their scores with the official metrics. One
//! file per benchmark holds its reader (files -> `Item`s: an image, the question as the
//! benchmark words it, the ground truth), its official result format (written by `lntune
//! eval`, read by `lntune score`) and its scoring; `scores` puts them together, so that a
//! model's answers and a predictions file from another tool score the same way.

pub mod captions;
pub mod item;
pub mod mme;
pub mod pope;
pub mod scores;
pub mod shapes;
pub mod subset;
pub mod vqav2;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use serde::{Deserialize, Serialize};

use item::Item;
use subset::subset;
pub use subset::{ItemLimit, PARTS, parse_part_limit};

/// The benchmarks `lntune eval` and `lntune score` know.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchName {
    Mme,
    Pope,
    Vqav2,
    Coco,
    Flickr,
    /// the demo's generated test sets (VQA, POPE, MME-style, captions) in one folder
    Shapes,
}

impl BenchName {
    pub fn name(self) -> &'static str {
        match self {
            BenchName::Mme => "mme",
            BenchName::Pope => "pope",
            BenchName::Vqav2 => "vqav2",
            BenchName::Coco => "coco",
            BenchName::Flickr => "flickr",
            BenchName::Shapes => "shapes",
        }
    }
}

/// Where a benchmark's files are.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchFiles {
    pub bench: BenchName,
    /// vqav2: questions JSON; pope: a coco_pope_*.json file or their folder; mme: the
    /// release folder or a llava_mme.jsonl-style file; coco/flickr: caption JSON; shapes:
    /// the data folder
    pub data: PathBuf,
    /// the image folder (default: next to `data`; `<data>/images` for shapes)
    pub images: Option<PathBuf>,
    /// vqav2: the annotations JSON; mme with a JSONL question file: the release folder
    pub annotations: Option<PathBuf>,
    /// the Karpathy split of coco/flickr
    pub split: String,
}

fn parent_of(p: &Path) -> PathBuf {
    if p.is_dir() {
        p.to_path_buf()
    } else {
        p.parent().map(Path::to_path_buf).unwrap_or_default()
    }
}

/// The items of a benchmark's files: of each part (see `PARTS`) at most as many as `limit`
/// says, a random subset chosen with `seed`.
pub fn load_items(files: &BenchFiles, limit: &ItemLimit, seed: u64) -> Result<Vec<Item>> {
    let data = &files.data;
    if !data.exists() {
        bail!("--data {}: not found", data.display());
    }
    let images = files.images.clone().unwrap_or_else(|| match files.bench {
        BenchName::Shapes => data.join("images"),
        _ => parent_of(data),
    });
    let annotations = files.annotations.as_deref();
    let items = match files.bench {
        BenchName::Vqav2 => {
            let ann = annotations
                .context("--bench vqav2 needs --annotations (the official annotations JSON)")?;
            subset(vqav2::load(data, ann, &images)?, limit.of("vqa"), seed)
        }
        BenchName::Pope => {
            let mut v = Vec::new();
            for f in pope::files(data)? {
                v.extend(subset(pope::load(&f, &images)?, limit.of("pope"), seed));
            }
            v
        }
        BenchName::Mme => {
            let v = if data.is_dir() {
                mme::load_folder(data)?
            } else {
                mme::load_jsonl(data, &images, annotations)?
            };
            subset(v, limit.of("mme"), seed)
        }
        BenchName::Coco | BenchName::Flickr => subset(
            captions::load(data, &images, &files.split)?,
            limit.of("captions"),
            seed,
        ),
        BenchName::Shapes => shapes::load(data, &images, &files.split, limit, seed)?,
    };
    if items.is_empty() {
        bail!("--data {}: no questions", data.display());
    }
    Ok(items)
}

/// A predictions file in a benchmark's official result format, with its ground truth:
/// the items answered, the answers, and how many of the questions they cover (a set that
/// misses questions is refused unless `partial`; an item answered twice always).
pub fn read_results(
    bench: BenchName,
    pred: &Path,
    gt: Option<&Path>,
    questions: Option<&Path>,
    partial: bool,
) -> Result<(Vec<Item>, Vec<String>, String)> {
    let gt = || gt.with_context(|| format!("--bench {} needs --gt", bench.name()));
    match bench {
        BenchName::Vqav2 => {
            let q = questions
                .context("--bench vqav2 needs --questions (the official questions JSON)")?;
            vqav2::read_results(pred, q, gt()?, partial)
        }
        BenchName::Pope => pope::read_results(pred, gt()?, partial),
        BenchName::Mme => mme::read_results(pred, partial),
        BenchName::Coco | BenchName::Flickr => captions::read_results(pred, gt()?),
        BenchName::Shapes => {
            bail!("--bench shapes: score each part with its own format (vqav2, pope, mme, coco)")
        }
    }
}
