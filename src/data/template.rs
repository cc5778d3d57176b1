//! Conversation templates and LLaVA's label masking.
//!
//! A template renders a conversation into one string, keeping `<image>` markers, plus the byte
//! spans that are trained: the assistant turns exactly as the LLaVA code base leaves them
//! unmasked (`llava/train/train.py` `preprocess_plain`, `preprocess_v1`,
//! `preprocess_llama_2`):
//! - `plain` (stage 1): `<image>` + caption + `\n`; trained: caption + `\n`.
//! - `vicuna_v1`: `SYSTEM USER: q ASSISTANT: a</s>USER: …`; trained: ` a</s>` of each round
//!   (everything up to and including `ASSISTANT:` is masked).
//! - `llama_2`: `[INST] <<SYS>>\nSYSTEM\n<</SYS>>\n\nq [/INST] a </s><s>[INST] …`; trained:
//!   ` a </s>` after each `[/INST]`.
//! - `chatml`: `<|im_start|>role\ncontent<|im_end|>\n` without a default system prompt;
//!   trained: the assistant content and its `<|im_end|>`.
//! - `model`: the model's own Jinja chat template; trained: each assistant message's text up
//!   to and including the end-of-turn token, found by rendering growing prefixes.
//!
//! Tokenization splits the string at `<image>` (as LLaVA's `tokenizer_image_token` does),
//! inserts the model's image tokens there, tokenizes each piece, and labels a token iff its
//! byte offset starts inside a trained span.

use std::ops::Range;

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use serde::{Deserialize, Serialize};

use super::llava::{IMAGE_PLACEHOLDER, Turn};
use crate::io::tokenizer::{ChatMessage, ChatTokenizer, render_chat_template};
use crate::ops::loss::IGNORE_INDEX;

/// LLaVA-1.5's short-answer instruction, after short questions.
pub const SHORT_ANSWER: &str = "Answer the question using a single word or phrase.";

pub const VICUNA_SYSTEM: &str = "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions.";
pub const LLAMA2_SYSTEM: &str = "You are a helpful language and vision assistant. You are able to understand the visual content that the user provides, and assist the user with a variety of tasks using natural language.";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TemplateName {
    Plain,
    #[value(name = "vicuna_v1")]
    VicunaV1,
    #[value(name = "llama_2")]
    Llama2,
    Chatml,
    /// the model's own chat template (tokenizer_config.json or GGUF metadata)
    Model,
}

impl TemplateName {
    /// The template a model is talked to with by default: its own chat template if its
    /// tokenizer has one, else vicuna_v1 (LLaVA-1.5's).
    pub fn default_for(tokenizer: Option<&ChatTokenizer>) -> Self {
        if tokenizer.is_some_and(|t| t.chat_template.is_some()) {
            TemplateName::Model
        } else {
            TemplateName::VicunaV1
        }
    }
}

/// A conversation rendered for training: text with `<image>` markers and trained byte spans.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub text: String,
    pub targets: Vec<Range<usize>>,
}

/// A turn's role after normalising LLaVA's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

pub fn role_of(from: &str) -> Result<Role> {
    match from {
        "human" | "user" => Ok(Role::User),
        "gpt" | "assistant" => Ok(Role::Assistant),
        "system" => Ok(Role::System),
        other => bail!("unknown speaker `{other}` (human, gpt, system)"),
    }
}

/// Checks the LLaVA conversation shape: optional system, then user/assistant alternating,
/// starting with the user. Returns (system, [(user, assistant or None)]).
/// A conversation's rounds: (human text, assistant text if present).
pub type Rounds<'a> = Vec<(&'a str, Option<&'a str>)>;

pub fn rounds(turns: &[Turn]) -> Result<(Option<&str>, Rounds<'_>)> {
    if turns.is_empty() {
        bail!("empty conversation");
    }
    let mut it = turns.iter().peekable();
    let mut system = None;
    if let Some(t) = it.peek()
        && role_of(&t.from)? == Role::System
    {
        system = Some(t.value.as_str());
        it.next();
    }
    let mut out = Vec::new();
    while let Some(u) = it.next() {
        if role_of(&u.from)? != Role::User {
            bail!("expected a human turn, found `{}`", u.from);
        }
        let a = match it.next() {
            Some(a) if role_of(&a.from)? == Role::Assistant => Some(a.value.as_str()),
            Some(a) => bail!("expected a gpt turn, found `{}`", a.from),
            None => None,
        };
        out.push((u.value.as_str(), a));
    }
    if out.is_empty() {
        bail!("conversation has no human turn");
    }
    Ok((system, out))
}

/// LLaVA's `preprocess_multimodal`: the image placeholder moves to the front of the first
/// human turn, followed by a newline.
pub fn move_image_first(turns: &[Turn]) -> Vec<Turn> {
    let mut out = turns.to_vec();
    if let Some(t) = out.iter_mut().find(|t| t.value.contains(IMAGE_PLACEHOLDER))
        && t.value.matches(IMAGE_PLACEHOLDER).count() == 1
    {
        let rest = t.value.replace(IMAGE_PLACEHOLDER, "");
        t.value = format!("{IMAGE_PLACEHOLDER}\n{}", rest.trim());
    }
    out
}

/// Appends `s` to `text`, returning its byte span.
fn push(text: &mut String, s: &str) -> Range<usize> {
    let start = text.len();
    text.push_str(s);
    start..text.len()
}

pub struct Template {
    pub name: TemplateName,
    /// the model's Jinja template, for `model`
    pub jinja: Option<String>,
    pub bos: String,
    pub eos: String,
}

impl Template {
    pub fn new(name: TemplateName, tools: Option<&ChatTokenizer>) -> Result<Self> {
        let jinja = match name {
            TemplateName::Model => Some(
                tools
                    .and_then(|t| t.chat_template.clone())
                    .context("--template model: this model has no chat template")?,
            ),
            _ => None,
        };
        Ok(Self {
            name,
            jinja,
            bos: tools
                .and_then(|t| t.bos_token.clone())
                .unwrap_or_else(|| "<s>".into()),
            eos: tools
                .and_then(|t| t.eos_token.clone())
                .unwrap_or_else(|| "</s>".into()),
        })
    }

    /// Renders a conversation with its answers for training.
    pub fn render(&self, turns: &[Turn]) -> Result<Rendered> {
        let mut text = String::new();
        let mut targets = Vec::new();
        match self.name {
            TemplateName::Plain => {
                let (_, r) = rounds(turns)?;
                let (Some(caption), 1) = (r[0].1, r.len()) else {
                    bail!("plain template needs exactly one human turn and one gpt turn");
                };
                if !r[0].0.contains(IMAGE_PLACEHOLDER) {
                    bail!("plain template: the human turn has no {IMAGE_PLACEHOLDER}");
                }
                text.push_str(IMAGE_PLACEHOLDER);
                targets.push(push(&mut text, &format!("{caption}\n")));
            }
            TemplateName::VicunaV1 => {
                let (system, r) = rounds(turns)?;
                text.push_str(system.unwrap_or(VICUNA_SYSTEM));
                text.push(' ');
                for (q, a) in r {
                    let a = a.context("the conversation ends with a human turn")?;
                    text.push_str(&format!("USER: {q} ASSISTANT:"));
                    targets.push(push(&mut text, &format!(" {a}{}", self.eos)));
                }
            }
            TemplateName::Llama2 => {
                let (system, r) = rounds(turns)?;
                let sys = system.unwrap_or(LLAMA2_SYSTEM);
                for (i, (q, a)) in r.into_iter().enumerate() {
                    let a = a.context("the conversation ends with a human turn")?;
                    let q = if i == 0 && !sys.is_empty() {
                        format!("<<SYS>>\n{sys}\n<</SYS>>\n\n{q}")
                    } else {
                        q.to_string()
                    };
                    if i > 0 {
                        text.push_str(&self.bos);
                    }
                    text.push_str(&format!("[INST] {q} [/INST]"));
                    targets.push(push(&mut text, &format!(" {a} {}", self.eos)));
                }
            }
            TemplateName::Chatml => {
                let (system, r) = rounds(turns)?;
                if let Some(s) = system {
                    text.push_str(&format!("<|im_start|>system\n{s}<|im_end|>\n"));
                }
                for (q, a) in r {
                    let a = a.context("the conversation ends with a human turn")?;
                    text.push_str(&format!(
                        "<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
                    ));
                    targets.push(push(&mut text, &format!("{a}<|im_end|>")));
                    text.push('\n');
                }
            }
            TemplateName::Model => {
                let msgs = messages(turns)?;
                let render = |m: &[ChatMessage], generation: bool| {
                    render_chat_template(
                        self.jinja.as_deref().expect("model template"),
                        m,
                        generation,
                        &self.bos,
                        &self.eos,
                    )
                };
                text = render(&msgs, false)?;
                for (k, m) in msgs.iter().enumerate() {
                    if m.role != "assistant" {
                        continue;
                    }
                    let start = render(&msgs[..k], true)?.len();
                    let end = render(&msgs[..=k], false)?.len();
                    if start > end || !text.starts_with(&render(&msgs[..=k], false)?) {
                        bail!(
                            "the chat template does not render conversations as growing prefixes; use --template chatml/vicuna_v1/llama_2"
                        );
                    }
                    // trained: the answer through the end-of-turn token (not what follows it)
                    let region = &text[start..end];
                    let stop = region
                        .rfind(&self.eos)
                        .map(|i| i + self.eos.len())
                        .unwrap_or(region.len());
                    targets.push(start..start + stop);
                }
            }
        }
        Ok(Rendered { text, targets })
    }

    /// Renders the prompt for generating the next assistant turn (`turns` ends with a human
    /// turn).
    pub fn render_prompt(&self, turns: &[Turn]) -> Result<String> {
        let (system, r) = rounds(turns)?;
        if r.last().is_some_and(|(_, a)| a.is_some()) {
            bail!("the prompt must end with a human turn");
        }
        let mut text = String::new();
        match self.name {
            TemplateName::Plain => text.push_str(IMAGE_PLACEHOLDER),
            TemplateName::VicunaV1 => {
                text.push_str(system.unwrap_or(VICUNA_SYSTEM));
                text.push(' ');
                for (q, a) in r {
                    text.push_str(&format!("USER: {q} ASSISTANT:"));
                    if let Some(a) = a {
                        text.push_str(&format!(" {a}{}", self.eos));
                    }
                }
            }
            TemplateName::Llama2 => {
                let sys = system.unwrap_or(LLAMA2_SYSTEM);
                for (i, (q, a)) in r.into_iter().enumerate() {
                    let q = if i == 0 && !sys.is_empty() {
                        format!("<<SYS>>\n{sys}\n<</SYS>>\n\n{q}")
                    } else {
                        q.to_string()
                    };
                    if i > 0 {
                        text.push_str(&self.bos);
                    }
                    text.push_str(&format!("[INST] {q} [/INST]"));
                    if let Some(a) = a {
                        text.push_str(&format!(" {a} {}", self.eos));
                    }
                }
            }
            TemplateName::Chatml => {
                if let Some(s) = system {
                    text.push_str(&format!("<|im_start|>system\n{s}<|im_end|>\n"));
                }
                for (q, a) in r {
                    text.push_str(&format!(
                        "<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
                    ));
                    if let Some(a) = a {
                        text.push_str(&format!("{a}<|im_end|>\n"));
                    }
                }
            }
            TemplateName::Model => {
                let msgs = messages(turns)?;
                text = render_chat_template(
                    self.jinja.as_deref().expect("model template"),
                    &msgs,
                    true,
                    &self.bos,
                    &self.eos,
                )?;
            }
        }
        Ok(text)
    }

    /// Strings that end an assistant turn in generation.
    pub fn stop_strings(&self) -> Vec<String> {
        match self.name {
            TemplateName::Plain => vec!["\n".into()],
            TemplateName::Chatml => vec!["<|im_end|>".into()],
            _ => vec![self.eos.clone()],
        }
    }
}

fn messages(turns: &[Turn]) -> Result<Vec<ChatMessage>> {
    turns
        .iter()
        .map(|t| {
            let role = match role_of(&t.from)? {
                Role::System => "system",
                Role::User => "user",
                Role::Assistant => "assistant",
            };
            Ok(ChatMessage::new(role, &t.value))
        })
        .collect()
}

/// A tokenized training example.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokenized {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
    pub n_images: usize,
}

/// Tokenizes a rendered conversation: image tokens for each `<image>`, labels on the trained
/// spans. `add_special` adds the tokenizer's BOS to the first piece (LLaVA tokenizes each
/// piece with BOS and keeps it on the first only).
pub fn tokenize(
    r: &Rendered,
    tools: &ChatTokenizer,
    image_token_id: u32,
    tokens_per_image: usize,
    add_special: bool,
) -> Result<Tokenized> {
    let mut ids = Vec::new();
    let mut labels = Vec::new();
    let mut base = 0usize;
    let mut n_images = 0;
    // tokens come in text order: one pass over the trained spans (sorted by start) decides
    // every token, so masking is linear in the conversation's length
    let mut targets = r.targets.clone();
    targets.sort_by_key(|t| t.start);
    let mut next = 0usize;
    for (i, piece) in r.text.split(IMAGE_PLACEHOLDER).enumerate() {
        if i > 0 {
            ids.extend(std::iter::repeat_n(image_token_id, tokens_per_image));
            labels.extend(std::iter::repeat_n(IGNORE_INDEX, tokens_per_image));
            n_images += 1;
            base += IMAGE_PLACEHOLDER.len();
        }
        let (pids, offsets) = tools.encode_with_offsets(piece, add_special && i == 0)?;
        for (id, (s, e)) in pids.into_iter().zip(offsets) {
            let at = base + s;
            while next < targets.len() && targets[next].end <= at {
                next += 1;
            }
            let trained = e > s && targets.get(next).is_some_and(|t| t.contains(&at));
            ids.push(id);
            labels.push(if trained { id as i64 } else { IGNORE_INDEX });
        }
        base += piece.len();
    }
    Ok(Tokenized {
        input_ids: ids,
        labels,
        n_images,
    })
}

/// How a too-long example was handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Truncation {
    Fits,
    /// cut to the limit (text only)
    Truncated,
}

/// Cuts an example to `max_len` tokens. Errors when the cut would split an image's tokens
/// or leave no trained token (the caller skips and counts such examples).
pub fn truncate(t: &mut Tokenized, max_len: usize, image_token_id: u32) -> Result<Truncation> {
    if t.input_ids.len() <= max_len {
        return Ok(Truncation::Fits);
    }
    let images_before = t.input_ids[..max_len]
        .iter()
        .filter(|&&x| x == image_token_id)
        .count();
    let images_total = t.input_ids.iter().filter(|&&x| x == image_token_id).count();
    if images_before != images_total {
        bail!("longer than --max-length {max_len} and the cut falls inside or before image tokens");
    }
    t.input_ids.truncate(max_len);
    t.labels.truncate(max_len);
    if t.labels.iter().all(|&l| l == IGNORE_INDEX) {
        bail!("no trained token left within --max-length {max_len}");
    }
    Ok(Truncation::Truncated)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turns(v: &[(&str, &str)]) -> Vec<Turn> {
        v.iter()
            .map(|(f, x)| Turn {
                from: f.to_string(),
                value: x.to_string(),
            })
            .collect()
    }

    fn trained(r: &Rendered) -> Vec<&str> {
        r.targets.iter().map(|t| &r.text[t.clone()]).collect()
    }

    fn tpl(name: TemplateName) -> Template {
        Template {
            name,
            jinja: None,
            bos: "<s>".into(),
            eos: "</s>".into(),
        }
    }

    #[test]
    fn plain_trains_the_caption_and_newline() {
        let r = tpl(TemplateName::Plain)
            .render(&turns(&[
                ("human", "<image>\nDescribe."),
                ("gpt", "a red circle"),
            ]))
            .unwrap();
        assert_eq!(r.text, "<image>a red circle\n");
        assert_eq!(trained(&r), vec!["a red circle\n"]);
    }

    #[test]
    fn vicuna_v1_matches_llava_masking() {
        // LLaVA: rounds split on "</s>"; "USER: … ASSISTANT:" masked, " answer</s>" trained
        let t = turns(&[
            ("human", "<image>\nWhat?"),
            ("gpt", "A"),
            ("human", "And?"),
            ("gpt", "B"),
        ]);
        let r = tpl(TemplateName::VicunaV1).render(&t).unwrap();
        assert_eq!(
            r.text,
            format!(
                "{VICUNA_SYSTEM} USER: <image>\nWhat? ASSISTANT: A</s>USER: And? ASSISTANT: B</s>"
            )
        );
        assert_eq!(trained(&r), vec![" A</s>", " B</s>"]);
        let p = tpl(TemplateName::VicunaV1).render_prompt(&t[..3]).unwrap();
        assert!(p.ends_with("USER: And? ASSISTANT:"));
    }

    #[test]
    fn llama_2_matches_llava_masking() {
        let t = turns(&[
            ("human", "Q1"),
            ("gpt", "A1"),
            ("human", "Q2"),
            ("gpt", "A2"),
        ]);
        let r = tpl(TemplateName::Llama2).render(&t).unwrap();
        assert_eq!(
            r.text,
            format!(
                "[INST] <<SYS>>\n{LLAMA2_SYSTEM}\n<</SYS>>\n\nQ1 [/INST] A1 </s><s>[INST] Q2 [/INST] A2 </s>"
            )
        );
        assert_eq!(trained(&r), vec![" A1 </s>", " A2 </s>"]);
    }

    #[test]
    fn chatml_trains_answers_and_end_tokens() {
        let t = turns(&[("system", "S"), ("human", "Q"), ("gpt", "A")]);
        let r = tpl(TemplateName::Chatml).render(&t).unwrap();
        assert_eq!(
            r.text,
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
        );
        assert_eq!(trained(&r), vec!["A<|im_end|>"]);
    }

    #[test]
    fn model_template_spans_from_growing_prefixes() {
        let jinja = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
        let t = Template {
            name: TemplateName::Model,
            jinja: Some(jinja.into()),
            bos: "".into(),
            eos: "<|im_end|>".into(),
        };
        let r = t
            .render(&turns(&[
                ("human", "Q"),
                ("gpt", "A"),
                ("human", "Q2"),
                ("gpt", "B"),
            ]))
            .unwrap();
        assert_eq!(trained(&r), vec!["A<|im_end|>", "B<|im_end|>"]);
    }

    #[test]
    fn malformed_conversations_are_errors() {
        assert!(rounds(&[]).is_err());
        assert!(rounds(&turns(&[("gpt", "A")])).is_err());
        assert!(rounds(&turns(&[("human", "Q"), ("human", "Q")])).is_err());
        assert!(rounds(&turns(&[("robot", "Q")])).is_err());
        assert!(
            tpl(TemplateName::Plain)
                .render(&turns(&[("human", "no image"), ("gpt", "c")]))
                .is_err()
        );
        assert!(
            tpl(TemplateName::VicunaV1)
                .render(&turns(&[("human", "Q")]))
                .is_err()
        );
    }

    #[test]
    fn image_moves_to_the_front() {
        let t = move_image_first(&turns(&[("human", "What is this? <image>"), ("gpt", "x")]));
        assert_eq!(t[0].value, "<image>\nWhat is this?");
    }
}
