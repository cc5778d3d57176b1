//! Tokenizer and chat template, from an HF directory (`tokenizer.json`,
//! `tokenizer_config.json`) or rebuilt from GGUF `tokenizer.*` metadata with the
//! `tokenizers` crate, and chat rendering with the model's own Jinja template (minijinja).

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use super::gguf::GgufModel;

/// GGUF `tokenizer.ggml.token_type` values (llama.cpp `llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// The Llama-3 (`llama-bpe`) pre-tokenizer split pattern.
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The Qwen2 pre-tokenizer split pattern (single digits).
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// One chat message for template rendering.
#[derive(Debug, Clone, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A token's byte range in the encoded text.
pub type Span = (usize, usize);

/// Everything text-side a model needs: tokenizer, special tokens, chat template.
pub struct ChatTokenizer {
    pub tokenizer: Tokenizer,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    /// prepend `bos_id` on `encode(.., true)` (GGUF `tokenizer.ggml.add_bos_token`; HF
    /// tokenizer.json files carry their own post-processor instead)
    pub manual_bos: bool,
}

impl ChatTokenizer {
    /// The tokenizer and chat template of a GGUF file's `tokenizer.*` metadata; None when
    /// the file carries no tokenizer.
    pub fn from_gguf(g: &GgufModel) -> Result<Option<Self>> {
        if g.meta("tokenizer.ggml.model").is_none() {
            return Ok(None);
        }
        Self::rebuild_from_gguf(g).map(Some)
    }

    /// Rebuilds the tokenizer from GGUF metadata. Supported: `tokenizer.ggml.model = gpt2`
    /// (byte-level BPE) with pre-tokenizers `smollm`, `gpt2`/`default`, `llama-bpe`, `qwen2`.
    fn rebuild_from_gguf(g: &GgufModel) -> Result<Self> {
        let file = g.path.display().to_string();
        let model = g
            .meta_string("tokenizer.ggml.model")?
            .with_context(|| format!("{file}: missing metadata `tokenizer.ggml.model`"))?;
        if model != "gpt2" {
            bail!(
                "{file}: metadata `tokenizer.ggml.model` is `{model}`; only byte-level BPE (`gpt2`) tokenizers can be rebuilt from GGUF so far; point --model at an HF directory with tokenizer.json instead"
            );
        }
        let tokens = g
            .meta_string_array("tokenizer.ggml.tokens")?
            .with_context(|| format!("{file}: missing metadata `tokenizer.ggml.tokens`"))?;
        let merges = g
            .meta_string_array("tokenizer.ggml.merges")?
            .with_context(|| format!("{file}: missing metadata `tokenizer.ggml.merges`"))?;
        let types = g
            .meta_int_array("tokenizer.ggml.token_type")?
            .unwrap_or_default();
        let pre = g
            .meta_string("tokenizer.ggml.pre")?
            .unwrap_or_else(|| "default".into());
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let merges = merges
            .iter()
            .enumerate()
            .map(|(i, m)| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .with_context(|| {
                        format!(
                            "{file}: metadata `tokenizer.ggml.merges`[{i}] = {m:?} is not `a b`"
                        )
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(pre == "llama-bpe")
            .build()
            .map_err(|e| anyhow::anyhow!("{file}: cannot build BPE tokenizer: {e}"))?;
        let mut tok = Tokenizer::new(bpe);
        let byte_level = ByteLevel::new(false, true, true);
        let split = |pattern: &str| -> Result<PreTokenizerWrapper> {
            let s = Split::new(
                SplitPattern::Regex(pattern.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| anyhow::anyhow!("pre-tokenizer regex: {e}"))?;
            Ok(s.into())
        };
        let pre_tok: PreTokenizerWrapper = match pre.as_str() {
            "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
            "gpt2" | "default" => byte_level.into(),
            "llama-bpe" | "llama3" => Sequence::new(vec![
                split(LLAMA3_PATTERN)?,
                ByteLevel::new(false, true, false).into(),
            ])
            .into(),
            "qwen2" => Sequence::new(vec![
                split(QWEN2_PATTERN)?,
                ByteLevel::new(false, true, false).into(),
            ])
            .into(),
            other => bail!(
                "{file}: metadata `tokenizer.ggml.pre` is `{other}`, which is not supported (smollm, gpt2, default, llama-bpe, qwen2)"
            ),
        };
        tok.with_pre_tokenizer(Some(pre_tok));
        tok.with_decoder(Some(ByteLevelDecoder::default()));
        let mut special = Vec::new();
        let mut user = Vec::new();
        for (i, t) in tokens.iter().enumerate() {
            match types.get(i).copied() {
                Some(TOKEN_TYPE_CONTROL) => special.push(AddedToken::from(t.clone(), true)),
                Some(TOKEN_TYPE_USER_DEFINED) => user.push(AddedToken::from(t.clone(), false)),
                _ => {}
            }
        }
        tok.add_special_tokens(special)
            .map_err(|e| anyhow::anyhow!("{file}: special tokens: {e}"))?;
        tok.add_tokens(user)
            .map_err(|e| anyhow::anyhow!("{file}: user-defined tokens: {e}"))?;
        let bos_id = g.meta_u32("tokenizer.ggml.bos_token_id")?;
        let eos_id = g.meta_u32("tokenizer.ggml.eos_token_id")?;
        let name = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize).cloned());
        Ok(Self {
            tokenizer: tok,
            chat_template: g.meta_string("tokenizer.chat_template")?,
            bos_token: name(bos_id),
            eos_token: name(eos_id),
            bos_id,
            eos_id,
            manual_bos: g.meta_bool("tokenizer.ggml.add_bos_token").unwrap_or(false),
        })
    }

    /// Reads `tokenizer.json` (and `tokenizer_config.json`, `chat_template.jinja` when
    /// present) from an HF directory; `None` when the directory has no tokenizer.json.
    pub fn from_hf_dir(dir: &Path) -> Result<Option<Self>> {
        let tj = dir.join("tokenizer.json");
        if !tj.exists() {
            return Ok(None);
        }
        crate::util::files::regular_file(&tj)?;
        let tokenizer = Tokenizer::from_file(&tj)
            .map_err(|e| anyhow::anyhow!("{}: cannot load tokenizer: {e}", tj.display()))?;
        let mut tools = Self {
            tokenizer,
            chat_template: None,
            bos_token: None,
            eos_token: None,
            bos_id: None,
            eos_id: None,
            manual_bos: false,
        };
        let tc = dir.join("tokenizer_config.json");
        if tc.exists() {
            let v: serde_json::Value = crate::util::files::read_json(&tc)?;
            let tok_str = |key: &str| -> Option<String> {
                match v.get(key)? {
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Object(o) => {
                        o.get("content").and_then(|c| c.as_str()).map(String::from)
                    }
                    _ => None,
                }
            };
            tools.bos_token = tok_str("bos_token");
            tools.eos_token = tok_str("eos_token");
            tools.chat_template = match v.get("chat_template") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(serde_json::Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|t| t.get("template").and_then(|s| s.as_str()))
                    .map(String::from),
                _ => None,
            };
        }
        let jinja = dir.join("chat_template.jinja");
        if tools.chat_template.is_none() && jinja.exists() {
            tools.chat_template = Some(crate::util::files::read_text(&jinja)?);
        }
        tools.bos_id = tools
            .bos_token
            .as_ref()
            .and_then(|t| tools.tokenizer.token_to_id(t));
        tools.eos_id = tools
            .eos_token
            .as_ref()
            .and_then(|t| tools.tokenizer.token_to_id(t));
        Ok(Some(tools))
    }

    /// Text -> ids. `add_special` adds BOS the way the model's tokenizer does.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, add_special)
            .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_special
            && self.manual_bos
            && let Some(b) = self.bos_id
        {
            ids.push(b);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Text -> ids and the byte span of each token in `text` (a prepended BOS gets (0, 0)).
    pub fn encode_with_offsets(
        &self,
        text: &str,
        add_special: bool,
    ) -> Result<(Vec<u32>, Vec<Span>)> {
        let enc = self
            .tokenizer
            .encode(text, add_special)
            .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        let mut offsets = Vec::with_capacity(enc.len() + 1);
        if add_special
            && self.manual_bos
            && let Some(b) = self.bos_id
        {
            ids.push(b);
            offsets.push((0, 0));
        }
        ids.extend_from_slice(enc.get_ids());
        offsets.extend_from_slice(enc.get_offsets());
        Ok((ids, offsets))
    }

    /// Ids -> text, special tokens kept.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))
    }

    /// Renders `messages` with the model's chat template.
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .context("this model has no chat template")?;
        render_chat_template(
            template,
            messages,
            add_generation_prompt,
            self.bos_token.as_deref().unwrap_or(""),
            self.eos_token.as_deref().unwrap_or(""),
        )
    }
}

/// Renders an HF chat template (Jinja) with Python-compatible string methods.
pub fn render_chat_template(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_template("chat", template)
        .map_err(|e| anyhow::anyhow!("chat template: {e}"))?;
    let tmpl = env.get_template("chat").expect("just added");
    tmpl.render(minijinja::context! {
        messages => messages
            .iter()
            .map(|m| minijinja::context! { role => m.role.clone(), content => m.content.clone() })
            .collect::<Vec<_>>(),
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token,
        eos_token => eos_token,
    })
    .map_err(|e| anyhow::anyhow!("chat template: {e}"))
}
