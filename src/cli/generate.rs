//! `lntune generate` (one answer, streamed) and `lntune chat` (image + multi-turn text).

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use clap::Args;

use super::{DTypeArg, ImageProcessorArgs, load_model};
use crate::data::image::Preprocess;
use crate::data::llava::{IMAGE_PLACEHOLDER, Turn};
use crate::data::template::{Rendered, Template, TemplateName, tokenize};
use crate::eval::generate::{GenConfig, Prompt, generate};
use crate::model::mllm::Mllm;

/// Model and decoding flags shared by `generate` and `chat`.
#[derive(Args, Debug)]
pub struct DecodeArgs {
    /// Model: llava-hf directory, directory with compose.json, HF LLM directory or .gguf file
    #[arg(long)]
    pub model: PathBuf,
    /// Adapter directory from `lntune train` (applied without merging)
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Conversation template [default: the model's chat template if it has one, else vicuna_v1]
    #[arg(long, value_enum)]
    pub template: Option<TemplateName>,
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// 0 = greedy
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Sample among the k most likely tokens (0 = all)
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Sample within this probability mass (1 = all)
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop once the text contains this string (repeatable; the template's own stops are
    /// always on)
    #[arg(long)]
    pub stop: Vec<String>,
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DTypeArg,
    #[command(flatten)]
    pub image: ImageProcessorArgs,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub decode: DecodeArgs,
    /// Image shown with the prompt
    #[arg(long)]
    pub image: Option<PathBuf>,
    #[arg(long)]
    pub prompt: String,
}

#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub decode: DecodeArgs,
    /// Image of the conversation (or `/image PATH` in the chat)
    #[arg(long)]
    pub image: Option<PathBuf>,
}

/// A loaded model with its template, preprocessing and generation settings.
pub struct Session {
    pub model: Mllm,
    pub template: Template,
    pub preprocess: Option<Preprocess>,
    pub generation: GenConfig,
}

impl Session {
    pub fn load(a: &DecodeArgs) -> Result<Self> {
        if a.temperature < 0.0 || !(0.0..=1.0).contains(&a.top_p) || a.top_p == 0.0 {
            bail!("--temperature must be >= 0 and --top-p in (0, 1]");
        }
        let model = load_model(&a.model, a.adapter.as_deref(), a.dtype.dtype())?;
        let tools = model.text.as_ref().context("the model has no tokenizer")?;
        let template = Template::new(
            a.template
                .unwrap_or_else(|| super::default_template(&model)),
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
        })
    }

    /// Tower features (P, Dv) of an image file.
    pub fn image_features(&self, path: &Path) -> Result<Tensor> {
        let pre = self
            .preprocess
            .as_ref()
            .context("this model has no vision tower; it cannot take --image")?;
        let v = self.model.vision.as_ref().context("no vision tower")?;
        let (px, h, w) = pre.load(path)?;
        let t = Tensor::from_vec(px, (1, 3, h, w), &Device::Cpu)?;
        Ok(v.tower.features(&t, &v.select)?.get(0)?)
    }

    /// Answers the conversation's last human turn, streaming the text to `sink`.
    pub fn reply(
        &self,
        turns: &[Turn],
        image: Option<&Tensor>,
        sink: &mut dyn Write,
    ) -> Result<String> {
        let tools = self
            .model
            .text
            .as_ref()
            .context("the model has no tokenizer")?;
        let prompt = self.template.render_prompt(turns)?;
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
        let ids = tokenize(&r, tools, image_token, per_image, true)?.input_ids;
        let prompt = Prompt {
            ids,
            images: image.into_iter().cloned().collect(),
            seed: None,
        };
        let mut err = None;
        let out = generate(
            &self.model,
            tools,
            &[prompt],
            &self.generation,
            |_, piece| {
                if err.is_none() {
                    err = sink
                        .write_all(piece.as_bytes())
                        .and_then(|_| sink.flush())
                        .err();
                }
            },
        )?;
        if let Some(e) = err {
            return Err(e.into());
        }
        Ok(out.into_iter().next().map(|g| g.text).unwrap_or_default())
    }
}

fn user_turn(text: &str, with_image: bool) -> Turn {
    Turn {
        from: "human".into(),
        value: if with_image {
            format!("{IMAGE_PLACEHOLDER}\n{text}")
        } else {
            text.to_string()
        },
    }
}

pub fn run_generate(args: GenerateArgs) -> Result<()> {
    let s = Session::load(&args.decode)?;
    let image = args
        .image
        .as_deref()
        .map(|p| s.image_features(p))
        .transpose()?;
    let turns = vec![user_turn(&args.prompt, image.is_some())];
    let mut out = std::io::stdout();
    s.reply(&turns, image.as_ref(), &mut out)?;
    writeln!(out)?;
    Ok(())
}

pub fn run_chat(args: ChatArgs) -> Result<()> {
    let s = Session::load(&args.decode)?;
    let mut image = args
        .image
        .as_deref()
        .map(|p| s.image_features(p))
        .transpose()?;
    let mut turns: Vec<Turn> = Vec::new();
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    eprintln!(
        "chat: type a message; /image PATH shows an image (starts a new conversation), /reset, /quit"
    );
    loop {
        write!(out, "> ")?;
        out.flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line == "/quit" || line == "/exit" {
            break;
        }
        if line == "/reset" {
            turns.clear();
            continue;
        }
        if let Some(p) = line.strip_prefix("/image") {
            match s.image_features(Path::new(p.trim())) {
                Ok(f) => {
                    image = Some(f);
                    turns.clear();
                }
                Err(e) => eprintln!("error: {e:#}"),
            }
            continue;
        }
        // the image goes with the first user turn, as in LLaVA's data
        turns.push(user_turn(line, image.is_some() && turns.is_empty()));
        let reply = s.reply(&turns, image.as_ref(), &mut out)?;
        writeln!(out)?;
        turns.push(Turn {
            from: "gpt".into(),
            value: reply.trim().to_string(),
        });
    }
    Ok(())
}
