//! From LLaVA samples to batches: validation with counted skips, templating and
//! tokenization, dynamic padding, and a loader thread that decodes and preprocesses the next
//! batch's images while the current step runs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, sync_channel};
use std::thread::JoinHandle;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use super::image::Preprocess;
use super::llava::{DataSource, IMAGE_PLACEHOLDER, Sample, load_mixture};
use super::template::{
    Template, TemplateName, Tokenized, Truncation, move_image_first, tokenize, truncate,
};
use crate::io::tokenizer::ChatTokenizer;
use crate::model::batch::Batch;
use crate::model::mllm::Mllm;
use crate::util::files::inside;
use crate::util::rng::Rng;

/// One example ready for batching.
#[derive(Debug, Clone)]
pub struct Example {
    pub id: String,
    pub tokens: Tokenized,
    pub images: Vec<PathBuf>,
}

/// Why samples were left out, with counts and the first few ids (never silent).
#[derive(Debug, Default, Clone, Serialize)]
pub struct DataReport {
    pub samples: usize,
    pub kept: usize,
    pub truncated: usize,
    pub skipped: BTreeMap<String, usize>,
    pub examples_of_skips: Vec<String>,
}

impl DataReport {
    fn skip(&mut self, reason: &str, id: &str, detail: &str) {
        *self.skipped.entry(reason.to_string()).or_default() += 1;
        if self.examples_of_skips.len() < 5 {
            self.examples_of_skips.push(format!("{id}: {detail}"));
        }
    }

    pub fn summary(&self) -> String {
        let mut s = format!("{} samples: {} kept", self.samples, self.kept);
        if self.truncated > 0 {
            s += &format!(", {} truncated to --max-length", self.truncated);
        }
        for (k, v) in &self.skipped {
            s += &format!(", {v} skipped ({k})");
        }
        s
    }
}

/// What turns samples into examples: the template, the tokenizer, the image token and how many
/// positions each image takes, the length limit and where the images are.
pub struct ExampleBuilder<'a> {
    pub template: &'a Template,
    pub tokenizer: &'a ChatTokenizer,
    pub image_token_id: u32,
    pub tokens_per_image: usize,
    pub max_length: usize,
    pub image_root: Option<&'a Path>,
    /// accept absolute image paths and paths with `..` (else they must stay inside the
    /// image folder, or the working directory without one)
    pub allow_any_image_path: bool,
    pub add_special: bool,
}

impl ExampleBuilder<'_> {
    /// Validates, templates and tokenizes every sample; bad samples are counted and skipped.
    pub fn examples(&self, samples: &[Sample]) -> (Vec<Example>, DataReport) {
        let mut report = DataReport {
            samples: samples.len(),
            ..Default::default()
        };
        let mut out = Vec::new();
        for s in samples {
            let id = s.id_string();
            match self.example(s) {
                Ok((ex, trunc)) => {
                    if trunc == Truncation::Truncated {
                        report.truncated += 1;
                    }
                    out.push(ex);
                }
                Err((reason, detail)) => report.skip(reason, &id, &detail),
            }
        }
        report.kept = out.len();
        (out, report)
    }

    fn example(
        &self,
        s: &Sample,
    ) -> std::result::Result<(Example, Truncation), (&'static str, String)> {
        let image_names = s.images();
        let placeholders: usize = s
            .conversations
            .iter()
            .map(|t| t.value.matches(IMAGE_PLACEHOLDER).count())
            .sum();
        if s.conversations.is_empty() {
            return Err(("empty conversation", "no turns".into()));
        }
        if placeholders != image_names.len() {
            return Err((
                "image count mismatch",
                format!(
                    "{placeholders} {IMAGE_PLACEHOLDER} placeholders for {} images",
                    image_names.len()
                ),
            ));
        }
        let mut images = Vec::new();
        for name in &image_names {
            let root = self.image_root.unwrap_or(Path::new(""));
            let p = if self.allow_any_image_path {
                root.join(name)
            } else {
                match inside(root, name) {
                    Some(p) => p,
                    None => {
                        return Err((
                            "image path outside --images",
                            format!("`{name}` must be relative, without `..`"),
                        ));
                    }
                }
            };
            if !p.is_file() {
                return Err(("missing image", format!("{} not found", p.display())));
            }
            images.push(p);
        }
        // every round renders to at least one token: rounds past `max_length` can never be
        // kept, so they are dropped before the (otherwise length-proportional) work
        let system = s.conversations.first().is_some_and(|t| t.from == "system");
        let keep = usize::from(system) + 2 * self.max_length;
        let conversations = &s.conversations[..s.conversations.len().min(keep)];
        let dropped = conversations.len() < s.conversations.len();
        if dropped
            && conversations
                .iter()
                .map(|t| t.value.matches(IMAGE_PLACEHOLDER).count())
                .sum::<usize>()
                != image_names.len()
        {
            return Err((
                "too long",
                format!("an image comes after --max-length {}", self.max_length),
            ));
        }
        let turns = if self.template.name == TemplateName::Plain || image_names.len() != 1 {
            conversations.to_vec()
        } else {
            move_image_first(conversations)
        };
        let rendered = self
            .template
            .render(&turns)
            .map_err(|e| ("malformed conversation", e.to_string()))?;
        let mut tokens = tokenize(
            &rendered,
            self.tokenizer,
            self.image_token_id,
            self.tokens_per_image,
            self.add_special,
        )
        .map_err(|e| ("tokenizer error", e.to_string()))?;
        if tokens.labels.iter().all(|&l| l < 0) {
            return Err(("no trained token", "nothing to learn from".into()));
        }
        let mut trunc = truncate(&mut tokens, self.max_length, self.image_token_id)
            .map_err(|e| ("too long", e.to_string()))?;
        if dropped {
            trunc = Truncation::Truncated;
        }
        Ok((
            Example {
                id: s.id_string(),
                tokens,
                images,
            },
            trunc,
        ))
    }
}

/// Where a run's examples come from and how they are cut.
pub struct ExampleSpec<'a> {
    pub data: &'a [DataSource],
    /// the folder image paths in the data are relative to
    pub images: Option<&'a Path>,
    pub template: TemplateName,
    pub preprocess: &'a Preprocess,
    pub max_length: usize,
    /// the seed of the mixture's subsets and order
    pub seed: u64,
    /// accept image paths outside the image folder
    pub allow_any_image_path: bool,
}

/// The examples of `spec` for `model` (its tokenizer, image token and image size in tokens)
/// and what was skipped; no usable example at all is an error.
pub fn load_examples(model: &Mllm, spec: &ExampleSpec) -> Result<(Vec<Example>, DataReport)> {
    let samples = load_mixture(spec.data, spec.seed)?;
    let (ex, report) = with_builder(model, spec, |b| b.examples(&samples))?;
    if ex.is_empty() {
        bail!("no usable training example: {}", report.summary());
    }
    Ok((ex, report))
}

/// The trained (labelled) tokens of each sample as `load_examples` would build it under
/// `spec` (its template, length limit and image folder; `spec.data` is not read), `None` for
/// a sample it would skip.
pub fn trained_tokens(
    model: &Mllm,
    spec: &ExampleSpec,
    samples: &[Sample],
) -> Result<Vec<Option<usize>>> {
    with_builder(model, spec, |b| {
        samples
            .iter()
            .map(|s| {
                b.example(s)
                    .ok()
                    .map(|(ex, _)| ex.tokens.labels.iter().filter(|&&l| l >= 0).count())
            })
            .collect()
    })
}

/// Runs `f` with the example builder of `model` under `spec`.
fn with_builder<T>(
    model: &Mllm,
    spec: &ExampleSpec,
    f: impl FnOnce(&ExampleBuilder) -> T,
) -> Result<T> {
    let tokenizer = model
        .tokenizer
        .as_ref()
        .context("the model has no tokenizer (tokenizer.json or GGUF metadata)")?;
    let template = Template::new(spec.template, Some(tokenizer))?;
    let (image_token_id, tokens_per_image) = match &model.vision {
        Some(v) => {
            let (h, w) = spec.preprocess.crop.unwrap_or((224, 224));
            (v.image_token_id, v.tokens_per_image(h, w))
        }
        None => (u32::MAX, 0),
    };
    let builder = ExampleBuilder {
        template: &template,
        tokenizer,
        image_token_id,
        tokens_per_image,
        max_length: spec.max_length,
        image_root: spec.images,
        allow_any_image_path: spec.allow_any_image_path,
        add_special: true,
    };
    Ok(f(&builder))
}

/// The id that pads token rows: the model's EOS (0 without a tokenizer).
pub fn pad_id(model: &Mllm) -> u32 {
    model.tokenizer.as_ref().and_then(|t| t.eos_id).unwrap_or(0)
}

/// A batch on the host: token rows padded to the longest, and the images' pixels.
pub struct HostBatch {
    pub ids: Vec<String>,
    pub input_ids: Vec<Vec<u32>>,
    pub attention_mask: Vec<Vec<bool>>,
    pub labels: Vec<Vec<i64>>,
    /// image files in batch order
    pub images: Vec<PathBuf>,
    /// their pixels, (N, 3, H, W) flattened
    pub pixels: Vec<f32>,
    pub hw: (usize, usize),
}

impl HostBatch {
    /// Right-pads `examples` to the longest and decodes their images.
    pub fn collate(examples: &[&Example], pad_id: u32, pre: &Preprocess) -> Result<Self> {
        let t = examples
            .iter()
            .map(|e| e.tokens.input_ids.len())
            .max()
            .unwrap_or(0);
        let mut b = HostBatch {
            ids: Vec::new(),
            input_ids: Vec::new(),
            attention_mask: Vec::new(),
            labels: Vec::new(),
            images: Vec::new(),
            pixels: Vec::new(),
            hw: (0, 0),
        };
        for e in examples {
            let n = e.tokens.input_ids.len();
            let mut ids = e.tokens.input_ids.clone();
            ids.resize(t, pad_id);
            let mut labels = e.tokens.labels.clone();
            labels.resize(t, crate::ops::loss::IGNORE_INDEX);
            let mut mask = vec![true; n];
            mask.resize(t, false);
            b.ids.push(e.id.clone());
            b.input_ids.push(ids);
            b.labels.push(labels);
            b.attention_mask.push(mask);
            for p in &e.images {
                let (px, h, w) = pre.load(p)?;
                if b.hw != (0, 0) && b.hw != (h, w) {
                    bail!(
                        "{}: preprocessed to {h}x{w}, other images in the batch are {}x{}",
                        p.display(),
                        b.hw.0,
                        b.hw.1
                    );
                }
                b.hw = (h, w);
                b.pixels.extend(px);
                b.images.push(p.clone());
            }
        }
        Ok(b)
    }

    /// The device batch with pixel values.
    pub fn to_batch(&self, device: &Device) -> Result<Batch> {
        let n = self.images.len();
        let pixel_values = if n > 0 {
            Some(
                Tensor::from_vec(self.pixels.clone(), (n, 3, self.hw.0, self.hw.1), device)?
                    .to_dtype(DType::F32)?,
            )
        } else {
            None
        };
        Ok(Batch {
            input_ids: self.input_ids.clone(),
            attention_mask: self.attention_mask.clone(),
            labels: Some(self.labels.clone()),
            pixel_values,
            vision_features: None,
        })
    }
}

/// Where a run is in its data: epoch and position in that epoch's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct DataPosition {
    pub epoch: usize,
    pub index: usize,
}

/// The example order of an epoch: a seeded shuffle, a function of (seed, epoch, lengths)
/// only, so a resumed run sees the same batches. With `group` = (lengths, batch), examples
/// are grouped by length as LLaVA's `group_by_modality_length` does: the shuffled order is cut
/// into mega-batches of 16 batches, each sorted by length and cut into batches, and the
/// batches are shuffled; padding then wastes little.
pub fn epoch_order(
    n: usize,
    seed: u64,
    epoch: usize,
    group: Option<(&[usize], usize)>,
) -> Vec<usize> {
    let mut rng = Rng::new(seed ^ (0xA5A5_0000 + epoch as u64));
    let mut order: Vec<usize> = (0..n).collect();
    rng.shuffle(&mut order);
    let Some((lengths, batch)) = group.filter(|(_, b)| *b > 1) else {
        return order;
    };
    let mut batches: Vec<Vec<usize>> = Vec::new();
    for mega in order.chunks(batch * 16) {
        let mut m = mega.to_vec();
        m.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        batches.extend(m.chunks(batch).map(|c| c.to_vec()));
    }
    rng.shuffle(&mut batches);
    batches.into_iter().flatten().collect()
}

/// Produces optimizer-step batch groups (`accum` micro-batches of `batch` examples) from a
/// background thread, starting at `start`. Each item is (position after it, micro-batches).
/// `shard` = (rank, ranks): every rank walks the same order and keeps its slice of each
/// micro-batch (`batch / ranks` examples), so the ranks together see the batches one
/// process would.
pub struct Loader {
    pub rx: Receiver<Result<(DataPosition, Vec<HostBatch>)>>,
    _handle: JoinHandle<()>,
}

impl Loader {
    #[allow(clippy::too_many_arguments)]
    pub fn spawn(
        examples: std::sync::Arc<Vec<Example>>,
        batch: usize,
        accum: usize,
        seed: u64,
        start: DataPosition,
        pad_id: u32,
        pre: Preprocess,
        group_by_length: bool,
        shard: (usize, usize),
    ) -> Self {
        let (rank, ranks) = shard;
        let per_rank = batch / ranks.max(1);
        let (tx, rx) = sync_channel(2);
        let handle = std::thread::spawn(move || {
            let n = examples.len();
            let lengths: Vec<usize> = examples.iter().map(|e| e.tokens.input_ids.len()).collect();
            let group = group_by_length.then_some((lengths.as_slice(), batch));
            let mut pos = start;
            let mut order = epoch_order(n, seed, pos.epoch, group);
            loop {
                let mut micro = Vec::with_capacity(accum);
                for _ in 0..accum {
                    let mut picked = Vec::with_capacity(batch);
                    while picked.len() < batch {
                        if pos.index >= n {
                            pos = DataPosition {
                                epoch: pos.epoch + 1,
                                index: 0,
                            };
                            order = epoch_order(n, seed, pos.epoch, group);
                        }
                        picked.push(&examples[order[pos.index]]);
                        pos.index += 1;
                    }
                    let mine = &picked[rank * per_rank..(rank + 1) * per_rank];
                    match HostBatch::collate(mine, pad_id, &pre) {
                        Ok(b) => micro.push(b),
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    }
                }
                if tx.send(Ok((pos, micro))).is_err() {
                    return; // the trainer is done
                }
            }
        });
        Self {
            rx,
            _handle: handle,
        }
    }

    pub fn next(&self) -> Result<(DataPosition, Vec<HostBatch>)> {
        match self.rx.recv() {
            Ok(r) => r,
            Err(_) => bail!("data loader stopped"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_orders_are_permutations_and_grouping_cuts_padding() {
        let lengths: Vec<usize> = (0..200).map(|i| 10 + (i * 37) % 90).collect();
        for group in [None, Some((lengths.as_slice(), 8))] {
            let mut o = epoch_order(200, 3, 1, group);
            assert_eq!(o, epoch_order(200, 3, 1, group), "deterministic");
            assert_ne!(o, epoch_order(200, 3, 2, group), "differs by epoch");
            o.sort();
            assert_eq!(o, (0..200).collect::<Vec<_>>());
        }
        let padded = |o: &[usize]| -> usize {
            o.chunks(8)
                .map(|c| c.iter().map(|&i| lengths[i]).max().unwrap() * c.len())
                .sum()
        };
        let plain = padded(&epoch_order(200, 3, 1, None));
        let grouped = padded(&epoch_order(200, 3, 1, Some((&lengths, 8))));
        assert!(
            grouped * 10 < plain * 8,
            "grouped {grouped} vs shuffled {plain}"
        );
    }
}
