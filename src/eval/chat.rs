//! A conversation with a model about an image, as `lntune generate` (one answer) and
//! `lntune chat` (turn by turn) hold it: the model with its adapter, its template, the
//! image preprocessing and the decoding settings; each reply is streamed as it is decoded.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};

use super::generate::{GenConfig, Prompt, generate};
use crate::data::image::{ImageProcessing, Preprocess};
use crate::data::llava::{IMAGE_PLACEHOLDER, Turn};
use crate::data::template::{Rendered, Template, TemplateName, tokenize};
use crate::methods::adapter::load_model;
use crate::model::mllm::Mllm;
use crate::util::checks;
use crate::util::device::WeightDtype;

/// The model and decoding settings of a conversation.
#[derive(Debug, Clone)]
pub struct ChatConfig {
    pub model: PathBuf,
    pub adapter: Option<PathBuf>,
    /// the model's chat template if it has one, else vicuna_v1, when not given
    pub template: Option<TemplateName>,
    pub max_new_tokens: usize,
    /// 0 = greedy
    pub temperature: f64,
    /// sample among the k most likely tokens (0 = all)
    pub top_k: usize,
    /// sample within this probability mass (1 = all)
    pub top_p: f64,
    pub seed: u64,
    /// stop once the text contains one of these (the template's own stops are always on)
    pub stop: Vec<String>,
    pub dtype: WeightDtype,
    pub image: ImageProcessing,
}

/// A loaded model with its template, preprocessing and generation settings.
pub struct ChatSession {
    pub model: Mllm,
    pub template: Template,
    pub preprocess: Option<Preprocess>,
    pub generation: GenConfig,
    /// the stop strings the user gave (a raw completion stops at these only)
    pub user_stops: Vec<String>,
}

impl ChatSession {
    pub fn load(a: &ChatConfig, device: &Device) -> Result<Self> {
        let temperature_ok = a.temperature.is_finite() && a.temperature >= 0.0;
        let top_p_ok = a.top_p > 0.0 && a.top_p <= 1.0;
        if !(temperature_ok && top_p_ok) {
            bail!("--temperature must be >= 0 and --top-p in (0, 1]");
        }
        checks::positive("--max-new-tokens", a.max_new_tokens)?;
        checks::positive_if_set("--image-size", a.image.size)?;
        let model = load_model(&a.model, a.adapter.as_deref(), a.dtype.dtype(), device)?;
        let tools = model
            .tokenizer
            .as_ref()
            .context("the model has no tokenizer")?;
        let template = Template::new(
            a.template
                .unwrap_or_else(|| TemplateName::default_for(Some(tools))),
            Some(tools),
        )?;
        let preprocess = match model.vision {
            Some(_) => Some(a.image.preprocess(&model)?),
            None => None,
        };
        let mut generation = GenConfig::greedy(a.max_new_tokens);
        generation.temperature = a.temperature;
        generation.top_k = a.top_k;
        generation.top_p = a.top_p;
        generation.seed = a.seed;
        generation.eos_ids = tools.eos_id.into_iter().collect();
        generation.stop_strings = template.stop_strings();
        generation.stop_strings.extend(a.stop.iter().cloned());
        Ok(Self {
            model,
            template,
            preprocess,
            generation,
            user_stops: a.stop.clone(),
        })
    }

    /// Tower features (P, Dv) of an image file.
    pub fn image_features(&self, path: &Path) -> Result<Tensor> {
        let pre = self
            .preprocess
            .as_ref()
            .context("this model has no vision tower; it cannot take --image")?;
        self.tower_features(pre.load(path)?)
    }

    /// Tower features (P, Dv) of an encoded PNG/JPEG in memory (its header checked against
    /// the pixel limit before decoding).
    pub fn image_features_of_bytes(&self, bytes: &[u8]) -> Result<Tensor> {
        let pre = self
            .preprocess
            .as_ref()
            .context("this model has no vision tower; it cannot take images")?;
        let img = crate::data::image::decode_rgb(bytes, pre.alpha)?;
        self.tower_features(pre.pixel_values(&img)?)
    }

    fn tower_features(&self, (px, h, w): (Vec<f32>, usize, usize)) -> Result<Tensor> {
        let v = self.model.vision.as_ref().context("no vision tower")?;
        let t = Tensor::from_vec(px, (1, 3, h, w), self.model.llm.embed_tokens.device())?;
        Ok(v.tower.features(&t, &v.select)?.get(0)?)
    }

    /// The prompt's token ids for `turns` (image tokens expanded).
    pub fn prompt_ids(&self, turns: &[Turn]) -> Result<Vec<u32>> {
        self.text_ids(&self.template.render_prompt(turns)?)
    }

    /// The token ids of a prompt text (the tokenizer's BOS first, each image placeholder
    /// expanded to the model's image tokens).
    fn text_ids(&self, prompt: &str) -> Result<Vec<u32>> {
        let tools = self
            .model
            .tokenizer
            .as_ref()
            .context("the model has no tokenizer")?;
        let prompt = prompt.to_string();
        let r = Rendered {
            text: prompt,
            targets: vec![],
        };
        let (image_token, per_image) = match (&self.model.vision, &self.preprocess) {
            (Some(v), Some(p)) => {
                let (h, w) = p.crop.unwrap_or((224, 224));
                (v.image_token_id, v.tokens_per_image(h, w))
            }
            _ => (u32::MAX, 0),
        };
        Ok(tokenize(&r, tools, image_token, per_image, true)?.input_ids)
    }

    /// Drops the oldest rounds of a chat history, after the first (which shows the image),
    /// until the prompt leaves room for at least one new token in the model's context
    /// (`max_position_embeddings`); returns how many rounds went. A history that does not
    /// fit even as its first round and its last question is an error.
    pub fn fit_to_context(&self, turns: &mut Vec<Turn>) -> Result<usize> {
        let context = self.model.llm.cfg.max_position_embeddings;
        // [system?, first question, its answer, (question, answer)..., last question]
        let first = usize::from(turns.first().is_some_and(|t| t.from == "system"));
        let mut dropped = 0;
        loop {
            let n = self.prompt_ids(turns)?.len();
            if n < context {
                return Ok(dropped);
            }
            if turns.len() < first + 5 {
                bail!(
                    "the prompt takes {n} tokens, at least the model's context of {context} (max_position_embeddings); shorten it"
                );
            }
            turns.drain(first + 2..first + 4);
            dropped += 1;
        }
    }

    /// Answers the conversation's last human turn, streaming the text to `sink`. The
    /// prompt must fit the model's context (see `fit_to_context` for chats); the answer
    /// stops at the context's end.
    pub fn reply(
        &self,
        turns: &[Turn],
        image: Option<&Tensor>,
        sink: &mut dyn Write,
    ) -> Result<String> {
        let ids = self.prompt_ids(turns)?;
        self.continue_ids(ids, image, &self.generation, sink)
    }

    /// Continues `text` as it is, with no template (the tokenizer's BOS first; an image
    /// goes in front of the text), stopping at EOS, the user's stop strings or the context's
    /// end; streams to `sink`.
    pub fn complete_raw(
        &self,
        text: &str,
        image: Option<&Tensor>,
        sink: &mut dyn Write,
    ) -> Result<String> {
        if text.contains(IMAGE_PLACEHOLDER) {
            bail!("--raw: the prompt must not contain {IMAGE_PLACEHOLDER} (use --image)");
        }
        let prompt = match image {
            Some(_) => format!("{IMAGE_PLACEHOLDER}{text}"),
            None => text.to_string(),
        };
        let ids = self.text_ids(&prompt)?;
        let mut generation = self.generation.clone();
        generation.stop_strings = self.user_stops.clone();
        self.continue_ids(ids, image, &generation, sink)
    }

    fn continue_ids(
        &self,
        ids: Vec<u32>,
        image: Option<&Tensor>,
        generation: &GenConfig,
        sink: &mut dyn Write,
    ) -> Result<String> {
        let tools = self
            .model
            .tokenizer
            .as_ref()
            .context("the model has no tokenizer")?;
        let prompt = Prompt {
            ids,
            images: image.into_iter().cloned().collect(),
            seed: None,
        };
        let mut err = None;
        let out = generate(&self.model, tools, &[prompt], generation, |_, piece| {
            if err.is_none() {
                err = sink
                    .write_all(piece.as_bytes())
                    .and_then(|_| sink.flush())
                    .err();
            }
        })?;
        if let Some(e) = err {
            return Err(e.into());
        }
        Ok(out.into_iter().next().map(|g| g.text).unwrap_or_default())
    }
}

/// A system turn (the template places it as the model's chat format does).
pub fn system_turn(text: &str) -> Turn {
    Turn {
        from: "system".into(),
        value: text.to_string(),
    }
}

/// A user turn, with the image placeholder in front when the turn shows the image.
pub fn user_turn(text: &str, with_image: bool) -> Turn {
    Turn {
        from: "human".into(),
        value: if with_image {
            format!("{IMAGE_PLACEHOLDER}\n{text}")
        } else {
            text.to_string()
        },
    }
}
