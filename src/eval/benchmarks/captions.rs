//! Captions (COCO, Flickr30k): Karpathy-split JSON (`dataset_coco.json`,
//! `dataset_flickr30k.json`: `images` with `filename`, `split`, `sentences[].raw`) or
//! COCO-style (`images` + `annotations`); results `[{"image_id", "caption"}]`; CIDEr-D and
//! BLEU-1..4 after PTB tokenization, as pycocoevalcap computes them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::item::{Item, Truth, array_of, image_in, str_of, u64_of, write_result_rows};
use crate::eval::metrics::{bleu, cider_d, ptb_tokenize};
use crate::util::files::{inside, read_json};

/// Caption items: one per image of `split` (Karpathy JSON) or every image (COCO-style JSON).
pub fn load(file: &Path, images: &Path, split: &str) -> Result<Vec<Item>> {
    let v: Value = read_json(file)?;
    let imgs = array_of(&v, "images", file)?;
    let mut items = Vec::new();
    if v.get("annotations").is_some() {
        // COCO-style: images [{id, file_name}], annotations [{image_id, caption}]
        let mut refs: HashMap<u64, Vec<String>> = HashMap::new();
        for (i, a) in array_of(&v, "annotations", file)?.iter().enumerate() {
            let at = format!("annotations[{i}]");
            refs.entry(u64_of(a, "image_id", file, &at)?)
                .or_default()
                .push(str_of(a, "caption", file, &at)?.to_string());
        }
        for (i, im) in imgs.iter().enumerate() {
            let at = format!("images[{i}]");
            let id = u64_of(im, "id", file, &at)?;
            let refs = refs
                .remove(&id)
                .with_context(|| format!("{}: {at}: image {id} has no captions", file.display()))?;
            items.push(Item {
                id: format!("caption/{id}"),
                image: image_in(images, str_of(im, "file_name", file, &at)?, file, &at)?,
                question: String::new(),
                truth: Truth::Caption { image_id: id, refs },
            });
        }
    } else {
        // Karpathy: images [{filepath?, filename, split, sentences: [{raw}], cocoid | imgid}]
        for (i, im) in imgs.iter().enumerate() {
            let at = format!("images[{i}]");
            if str_of(im, "split", file, &at)? != split {
                continue;
            }
            let id = match im.get("cocoid") {
                Some(_) => u64_of(im, "cocoid", file, &at)?,
                None => u64_of(im, "imgid", file, &at)?,
            };
            let name = str_of(im, "filename", file, &at)?;
            // Karpathy's `filepath` (`val2014`) when the images keep COCO's folders
            let in_folder = im
                .get("filepath")
                .and_then(|p| p.as_str())
                .map(|dir| format!("{dir}/{name}"))
                .filter(|rel| inside(images, rel).is_some_and(|p| p.is_file()));
            let image = image_in(images, in_folder.as_deref().unwrap_or(name), file, &at)?;
            let refs = array_of(im, "sentences", file)?
                .iter()
                .map(|s| str_of(s, "raw", file, &at).map(String::from))
                .collect::<Result<Vec<_>>>()?;
            items.push(Item {
                id: format!("caption/{id}"),
                image,
                question: String::new(),
                truth: Truth::Caption { image_id: id, refs },
            });
        }
        if items.is_empty() {
            bail!("{}: no images in split `{split}`", file.display());
        }
    }
    Ok(items)
}

/// images scored are those of the results (as pycocoevalcap's `params['image_id']`).
pub fn read_results(pred: &Path, annotations: &Path) -> Result<(Vec<Item>, Vec<String>, String)> {
    let a: Value = read_json(annotations)?;
    let mut refs: HashMap<u64, Vec<String>> = HashMap::new();
    for (i, x) in array_of(&a, "annotations", annotations)?.iter().enumerate() {
        let at = format!("annotations[{i}]");
        refs.entry(u64_of(x, "image_id", annotations, &at)?)
            .or_default()
            .push(str_of(x, "caption", annotations, &at)?.to_string());
    }
    let res: Value = read_json(pred)?;
    let rows = res
        .as_array()
        .with_context(|| format!("{}: expected a JSON array of results", pred.display()))?;
    let mut items = Vec::new();
    let mut preds = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (i, r) in rows.iter().enumerate() {
        let at = format!("[{i}]");
        let id = u64_of(r, "image_id", pred, &at)?;
        if !seen.insert(id) {
            bail!(
                "{}: {at}: image_id {id} has a second caption",
                pred.display()
            );
        }
        let refs = refs.get(&id).with_context(|| {
            format!(
                "{}: {at}: image_id {id} has no reference captions in {}",
                pred.display(),
                annotations.display()
            )
        })?;
        items.push(Item {
            id: format!("caption/{id}"),
            image: PathBuf::new(),
            question: String::new(),
            truth: Truth::Caption {
                image_id: id,
                refs: refs.clone(),
            },
        });
        preds.push(str_of(r, "caption", pred, &at)?.to_string());
    }
    // pycocoevalcap scores the images of the results (an annotations file holds a whole
    // split): only an image captioned twice is refused, above
    let coverage = format!(
        "{} of {} images with references captioned",
        items.len(),
        refs.len()
    );
    Ok((items, preds, coverage))
}

/// CIDEr-D and BLEU as pycocoevalcap prints them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CaptionScores {
    /// CIDEr-D as pycocoevalcap prints it (papers print it × 100)
    pub cider: f64,
    /// BLEU-1..4 as pycocoevalcap prints them
    pub bleu: [f64; 4],
    pub images: usize,
}

/// The scores of answered caption items (None without any).
pub fn score(answered: &[(&Item, &str)]) -> Option<CaptionScores> {
    let mut refs: Vec<Vec<String>> = Vec::new();
    let mut cands: Vec<String> = Vec::new();
    for (it, p) in answered {
        if let Truth::Caption { refs: r, .. } = &it.truth {
            refs.push(r.iter().map(|x| ptb_tokenize(x)).collect());
            cands.push(ptb_tokenize(p));
        }
    }
    if cands.is_empty() {
        return None;
    }
    let (b, _) = bleu(&refs, &cands);
    Some(CaptionScores {
        cider: cider_d(&refs, &cands).0,
        bleu: b,
        images: cands.len(),
    })
}

/// Writes `captions_results.json` (`[{"image_id", "caption"}]`) under `dir` when there are
/// caption items.
pub fn write_results(dir: &Path, answered: &[(&Item, &str)]) -> Result<Vec<PathBuf>> {
    let rows: Vec<Value> = answered
        .iter()
        .filter_map(|(it, p)| match &it.truth {
            Truth::Caption { image_id, .. } => {
                Some(serde_json::json!({"image_id": image_id, "caption": p}))
            }
            _ => None,
        })
        .collect();
    write_result_rows(dir, "captions_results.json", &rows)
}
