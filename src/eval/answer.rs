//! Answering questions about images with a model: prompts in the model's template (with
//! text-only demonstrations when a protocol asks for them), batched greedy or sampled
//! generation, one image per question, and a memo so a question repeated across test files
//! is generated once.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result};

use super::generate::{GenConfig, Prompt, generate};
use crate::data::features::FeatureCache;
use crate::data::image::Preprocess;
use crate::data::llava::{IMAGE_PLACEHOLDER, Turn};
use crate::data::template::{Rendered, Template, tokenize};
use crate::model::mllm::Mllm;
use crate::util::progress::progress_bar;

/// One question: an image and the user's text (without the image placeholder).
#[derive(Debug, Clone)]
pub struct Question {
    pub image: PathBuf,
    pub text: String,
}

/// What answers questions: the model, the template its prompts are written in, the image
/// preprocessing, the generation settings, and how many questions are decoded together.
pub struct Answerer<'a> {
    pub model: &'a Mllm,
    pub template: &'a Template,
    pub preprocess: &'a Preprocess,
    pub generation: GenConfig,
    pub batch: usize,
    /// show a progress bar
    pub progress: bool,
}

impl Answerer<'_> {
    /// The prompt's token ids for one question (image tokens expanded).
    pub fn prompt_ids(&self, text: &str) -> Result<Vec<u32>> {
        self.prompt_ids_with(&[], text)
    }

    /// The prompt's token ids after text-only demonstration turns (user, assistant).
    pub fn prompt_ids_with(&self, demos: &[(String, String)], text: &str) -> Result<Vec<u32>> {
        let tools = self
            .model
            .tokenizer
            .as_ref()
            .context("the model has no tokenizer")?;
        let v = self
            .model
            .vision
            .as_ref()
            .context("the model has no vision tower")?;
        let (h, w) = self.preprocess.crop.unwrap_or((224, 224));
        let mut turns = Vec::new();
        for (q, a) in demos {
            turns.push(Turn {
                from: "human".into(),
                value: q.clone(),
            });
            turns.push(Turn {
                from: "gpt".into(),
                value: a.clone(),
            });
        }
        turns.push(Turn {
            from: "human".into(),
            value: format!("{IMAGE_PLACEHOLDER}\n{text}"),
        });
        let prompt = self.template.render_prompt(&turns)?;
        let r = Rendered {
            text: prompt,
            targets: vec![],
        };
        Ok(tokenize(&r, tools, v.image_token_id, v.tokens_per_image(h, w), true)?.input_ids)
    }

    /// Answers every question. `image_of(i)` picks the image question i is shown (identity
    /// normally; a different image for the wrong-image control).
    pub fn answer(
        &self,
        questions: &[Question],
        cache: &mut FeatureCache,
        image_of: &dyn Fn(usize) -> usize,
        what: &str,
    ) -> Result<Vec<String>> {
        let tools = self
            .model
            .tokenizer
            .as_ref()
            .context("the model has no tokenizer")?;
        let dev = self.model.llm.embed_tokens.device().clone();
        let paths: Vec<PathBuf> = questions.iter().map(|q| q.image.clone()).collect();
        let feats = cache.for_paths(self.model, &paths, self.preprocess, &dev, self.progress)?;
        let bar = progress_bar(questions.len() as u64, 0, self.progress, what);
        let mut out = Vec::with_capacity(questions.len());
        for (c, chunk) in questions.chunks(self.batch.max(1)).enumerate() {
            let prompts = chunk
                .iter()
                .enumerate()
                .map(|(k, q)| {
                    let i = c * self.batch.max(1) + k;
                    Ok(Prompt {
                        ids: self.prompt_ids(&q.text)?,
                        images: vec![feats[image_of(i)].clone()],
                        seed: None,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let g = generate(self.model, tools, &prompts, &self.generation, |_, _| {})?;
            out.extend(g.into_iter().map(|g| g.text.trim().to_string()));
            bar.inc(chunk.len() as u64);
        }
        bar.finish_and_clear();
        Ok(out)
    }
}

/// Answers with a memo of (image, text) -> answer, so that questions repeated across test
/// files (POPE's positive questions appear in all three splits) are generated once.
pub fn answer_memo(
    ask: &Answerer,
    qs: &[Question],
    cache: &mut FeatureCache,
    memo: &mut HashMap<(PathBuf, String), String>,
    what: &str,
) -> Result<Vec<String>> {
    let mut todo: Vec<Question> = Vec::new();
    for q in qs {
        let key = (q.image.clone(), q.text.clone());
        if !memo.contains_key(&key) && !todo.iter().any(|t| t.image == q.image && t.text == q.text)
        {
            todo.push(q.clone());
        }
    }
    let answers = ask.answer(&todo, cache, &|i| i, what)?;
    for (q, a) in todo.into_iter().zip(answers) {
        memo.insert((q.image, q.text), a);
    }
    Ok(qs
        .iter()
        .map(|q| memo[&(q.image.clone(), q.text.clone())].clone())
        .collect())
}
