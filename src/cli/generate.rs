//! `lntune generate` (one answer, streamed) and `lntune chat` (image + multi-turn text, a
//! line at a time from stdin).

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;

use super::args::{DeviceArgs, ImageArgs};
use crate::data::llava::Turn;
use crate::data::template::TemplateName;
use crate::eval::chat::{ChatConfig, ChatSession, system_turn, user_turn};
use crate::util::device::WeightDtype;

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
    /// System message, placed where the template puts one (replaces the template's default
    /// system prompt, e.g. vicuna_v1's)
    #[arg(long, value_name = "TEXT")]
    pub system: Option<String>,
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: WeightDtype,
    #[command(flatten)]
    pub image: ImageArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
}

impl DecodeArgs {
    fn session(&self) -> Result<ChatSession> {
        let s = self.load_session()?;
        if self.system.is_some() && s.template.name == TemplateName::Plain {
            anyhow::bail!("--system: the plain template has no system message");
        }
        Ok(s)
    }

    fn load_session(&self) -> Result<ChatSession> {
        let cfg = ChatConfig {
            model: self.model.clone(),
            adapter: self.adapter.clone(),
            template: self.template,
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
            stop: self.stop.clone(),
            dtype: self.dtype,
            image: self.image.processing(),
        };
        ChatSession::load(&cfg, &self.device.device.device()?)
    }
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
    /// Complete the prompt as plain text, with no template (stops at EOS, --stop or
    /// --max-new-tokens; an --image goes in front of the text)
    #[arg(long, conflicts_with_all = ["template", "system"])]
    pub raw: bool,
}

#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub decode: DecodeArgs,
    /// Image of the conversation (or `/image PATH` in the chat)
    #[arg(long)]
    pub image: Option<PathBuf>,
}

pub fn run_generate(args: GenerateArgs) -> Result<()> {
    let s = args.decode.session()?;
    let image = args
        .image
        .as_deref()
        .map(|p| s.image_features(p))
        .transpose()?;
    let mut out = std::io::stdout();
    if args.raw {
        s.complete_raw(&args.prompt, image.as_ref(), &mut out)?;
    } else {
        let mut turns: Vec<Turn> = args.decode.system.iter().map(|t| system_turn(t)).collect();
        turns.push(user_turn(&args.prompt, image.is_some()));
        s.reply(&turns, image.as_ref(), &mut out)?;
    }
    writeln!(out)?;
    Ok(())
}

pub fn run_chat(args: ChatArgs) -> Result<()> {
    let s = args.decode.session()?;
    let mut image = args
        .image
        .as_deref()
        .map(|p| s.image_features(p))
        .transpose()?;
    // the conversation so far, after the system message if one was given
    let system: Vec<Turn> = args.decode.system.iter().map(|t| system_turn(t)).collect();
    let mut turns = system.clone();
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
            turns.clone_from(&system);
            continue;
        }
        if let Some(p) = line.strip_prefix("/image") {
            match s.image_features(Path::new(p.trim())) {
                Ok(f) => {
                    image = Some(f);
                    turns.clone_from(&system);
                }
                Err(e) => eprintln!("error: {e:#}"),
            }
            continue;
        }
        // the image goes with the first user turn, as in LLaVA's data
        turns.push(user_turn(
            line,
            image.is_some() && turns.len() == system.len(),
        ));
        match s.fit_to_context(&mut turns) {
            Ok(0) => {}
            Ok(n) => eprintln!("({n} older round(s) dropped to fit the model's context)"),
            Err(e) => {
                eprintln!("error: {e:#}");
                turns.pop();
                continue;
            }
        }
        let reply = s.reply(&turns, image.as_ref(), &mut out)?;
        writeln!(out)?;
        turns.push(Turn {
            from: "gpt".into(),
            value: reply.trim().to_string(),
        });
    }
    Ok(())
}
