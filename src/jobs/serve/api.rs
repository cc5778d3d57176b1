//! OpenAI's chat-completions wire format as `lntune serve` reads and writes it: the request
//! (every field lntune uses is checked and named in the error; fields it does not use are
//! ignored, as OpenAI-compatible servers do), the response, the stream's chunks and the
//! error body.

use base64::Engine as _;
use serde_json::{Value, json};

use crate::data::llava::{IMAGE_PLACEHOLDER, Turn};
use crate::data::template::rounds;

/// An error as OpenAI's API returns it: an HTTP status and
/// `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400 about request field `param`.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.to_string()),
            code: None,
        }
    }

    pub fn new(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

/// What the server allows one request.
#[derive(Debug, Clone)]
pub struct Limits {
    /// images in one request
    pub max_images: usize,
    /// `max_tokens` when the request gives none (at most what the context leaves)
    pub default_max_tokens: usize,
}

/// A chat-completions request, checked.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    pub model: String,
    /// the conversation in LLaVA's turn format, an image placeholder per image
    pub turns: Vec<Turn>,
    /// the encoded images, in placeholder order
    pub images: Vec<Vec<u8>>,
    /// `None`: the server's default, within what the context leaves
    pub max_tokens: Option<usize>,
    pub temperature: f64,
    pub top_p: f64,
    pub stop: Vec<String>,
    pub seed: Option<u64>,
    pub stream: bool,
    pub include_usage: bool,
}

fn number(v: &Value, param: &str) -> Result<Option<f64>, ApiError> {
    match v.get(param) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(_) => Err(ApiError::invalid(
            param,
            format!("`{param}` must be a number"),
        )),
    }
}

fn count(v: &Value, param: &str) -> Result<Option<usize>, ApiError> {
    match number(v, param)? {
        None => Ok(None),
        Some(x) if x >= 1.0 && x.fract() == 0.0 && x <= 1e9 => Ok(Some(x as usize)),
        Some(x) => Err(ApiError::invalid(
            param,
            format!("`{param}` must be a positive integer, got {x}"),
        )),
    }
}

/// Parses and checks a request body.
pub fn parse_request(body: &[u8], limits: &Limits) -> Result<ChatRequest, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            400,
            "invalid_request_error",
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    if !v.is_object() {
        return Err(ApiError::new(
            400,
            "invalid_request_error",
            "the body must be a JSON object",
        ));
    }
    let model = match v.get("model") {
        Some(Value::String(s)) => s.clone(),
        _ => return Err(ApiError::invalid("model", "`model` (a string) is required")),
    };
    if let Some(n) = count(&v, "n")?
        && n != 1
    {
        return Err(ApiError::invalid("n", "only `n` = 1 is supported"));
    }
    let max_tokens = match count(&v, "max_completion_tokens")? {
        Some(n) => Some(n),
        None => count(&v, "max_tokens")?,
    };
    let temperature = number(&v, "temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            "temperature",
            format!("`temperature` must be in [0, 2], got {temperature}"),
        ));
    }
    let top_p = number(&v, "top_p")?.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            "top_p",
            format!("`top_p` must be in (0, 1], got {top_p}"),
        ));
    }
    let seed = match v.get("seed") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) if n.as_i64().is_some() => Some(n.as_i64().unwrap() as u64),
        Some(_) => return Err(ApiError::invalid("seed", "`seed` must be an integer")),
    };
    let stop = match v.get("stop") {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.len() <= 4 => a
            .iter()
            .map(|s| s.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ApiError::invalid("stop", "`stop` must be a string or strings"))?,
        Some(_) => {
            return Err(ApiError::invalid(
                "stop",
                "`stop` must be a string or up to 4 strings",
            ));
        }
    };
    if stop.iter().any(|s| s.is_empty()) {
        return Err(ApiError::invalid("stop", "a stop string must not be empty"));
    }
    let stream = match v.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::invalid("stream", "`stream` must be a boolean")),
    };
    let include_usage = v
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let (turns, images) = parse_messages(v.get("messages"), limits)?;
    Ok(ChatRequest {
        model,
        turns,
        images,
        max_tokens,
        temperature,
        top_p,
        stop,
        seed,
        stream,
        include_usage,
    })
}

/// `messages` as LLaVA turns and the images they carry.
fn parse_messages(
    messages: Option<&Value>,
    limits: &Limits,
) -> Result<(Vec<Turn>, Vec<Vec<u8>>), ApiError> {
    let Some(Value::Array(messages)) = messages else {
        return Err(ApiError::invalid(
            "messages",
            "`messages` (an array) is required",
        ));
    };
    let mut turns = Vec::new();
    let mut images = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let param = format!("messages[{i}]");
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::invalid(&param, format!("{param}: `role` is required")))?;
        let from = match role {
            "system" | "developer" => "system",
            "user" => "human",
            "assistant" => "gpt",
            other => {
                return Err(ApiError::invalid(
                    &param,
                    format!("{param}: role `{other}` is not supported (system, user, assistant)"),
                ));
            }
        };
        let mut text = String::new();
        let mut n_images = 0;
        match m.get("content") {
            Some(Value::String(s)) => text.push_str(s),
            Some(Value::Array(parts)) => {
                for (k, part) in parts.iter().enumerate() {
                    let pp = format!("{param}.content[{k}]");
                    match part.get("type").and_then(Value::as_str) {
                        Some("text") => {
                            let t = part.get("text").and_then(Value::as_str).ok_or_else(|| {
                                ApiError::invalid(&pp, format!("{pp}: `text` is required"))
                            })?;
                            if !text.is_empty() {
                                text.push('\n');
                            }
                            text.push_str(t);
                        }
                        Some("image_url") => {
                            if from != "human" {
                                return Err(ApiError::invalid(
                                    &pp,
                                    format!("{pp}: only user messages can hold images"),
                                ));
                            }
                            let url = part
                                .get("image_url")
                                .and_then(|u| u.get("url").or(Some(u)))
                                .and_then(Value::as_str)
                                .ok_or_else(|| {
                                    ApiError::invalid(
                                        &pp,
                                        format!("{pp}: `image_url.url` is required"),
                                    )
                                })?;
                            if images.len() == limits.max_images {
                                return Err(ApiError::invalid(
                                    &pp,
                                    format!("at most {} images per request", limits.max_images),
                                ));
                            }
                            images.push(data_url_bytes(url, &pp)?);
                            n_images += 1;
                        }
                        other => {
                            return Err(ApiError::invalid(
                                &pp,
                                format!(
                                    "{pp}: content part type {other:?} is not supported (text, image_url)"
                                ),
                            ));
                        }
                    }
                }
            }
            _ => {
                return Err(ApiError::invalid(
                    &param,
                    format!("{param}: `content` must be a string or an array of parts"),
                ));
            }
        }
        if text.contains(IMAGE_PLACEHOLDER) {
            return Err(ApiError::invalid(
                &param,
                format!(
                    "{param}: the text must not contain {IMAGE_PLACEHOLDER}; send images as image_url parts"
                ),
            ));
        }
        let value = format!(
            "{}{text}",
            format!("{IMAGE_PLACEHOLDER}\n").repeat(n_images)
        );
        turns.push(Turn {
            from: from.into(),
            value,
        });
    }
    // the template's conversation shape: an optional system message, then user and
    // assistant alternating, ending with the user
    let (_, r) = rounds(&turns).map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    if r.is_empty() || r.last().is_some_and(|(_, a)| a.is_some()) {
        return Err(ApiError::invalid(
            "messages",
            "the conversation must end with a user message",
        ));
    }
    Ok((turns, images))
}

/// The bytes of a `data:<type>;base64,<data>` URL (the server reaches nothing outside).
fn data_url_bytes(url: &str, param: &str) -> Result<Vec<u8>, ApiError> {
    let Some(rest) = url.strip_prefix("data:") else {
        return Err(ApiError::invalid(
            param,
            format!("{param}: only data: URLs are accepted (data:image/png;base64,...)"),
        ));
    };
    let Some((meta, data)) = rest.split_once(',') else {
        return Err(ApiError::invalid(
            param,
            format!("{param}: a data URL needs a comma"),
        ));
    };
    if !meta.ends_with(";base64") {
        return Err(ApiError::invalid(
            param,
            format!("{param}: the data URL must be base64 (`;base64,`)"),
        ));
    }
    base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| ApiError::invalid(param, format!("{param}: bad base64: {e}")))
}

/// OpenAI's name of why a generation ended.
pub fn finish_reason(f: crate::eval::generate::Finish) -> &'static str {
    match f {
        crate::eval::generate::Finish::Stop => "stop",
        crate::eval::generate::Finish::Length | crate::eval::generate::Finish::Cancelled => {
            "length"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_images: 2,
            default_max_tokens: 16,
        }
    }

    fn parse(v: Value) -> Result<ChatRequest, ApiError> {
        parse_request(v.to_string().as_bytes(), &limits())
    }

    #[test]
    fn a_request_with_an_image_becomes_llava_turns() {
        let png = base64::engine::general_purpose::STANDARD.encode([1u8, 2, 3]);
        let r = parse(json!({
            "model": "m",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{png}")}}
                ]},
            ],
            "temperature": 0, "max_tokens": 5, "stop": "###", "seed": 3, "stream": true,
            "stream_options": {"include_usage": true}, "frequency_penalty": 0
        }))
        .unwrap();
        assert_eq!(r.turns[0].from, "system");
        assert_eq!(r.turns[1].value, "<image>\nWhat is this?");
        assert_eq!(r.images, vec![vec![1u8, 2, 3]]);
        assert_eq!(
            (r.max_tokens, r.temperature, r.seed),
            (Some(5), 0.0, Some(3))
        );
        assert_eq!(r.stop, vec!["###".to_string()]);
        assert!(r.stream && r.include_usage);
    }

    #[test]
    fn bad_requests_name_the_field() {
        let user = json!([{"role": "user", "content": "hi"}]);
        let cases = [
            (json!({"messages": user}), "model"),
            (json!({"model": "m"}), "messages"),
            (json!({"model": "m", "messages": user, "n": 2}), "n"),
            (
                json!({"model": "m", "messages": user, "max_tokens": 0}),
                "max_tokens",
            ),
            (
                json!({"model": "m", "messages": user, "max_tokens": 1.5}),
                "max_tokens",
            ),
            (
                json!({"model": "m", "messages": user, "temperature": 3}),
                "temperature",
            ),
            (json!({"model": "m", "messages": user, "top_p": 0}), "top_p"),
            (json!({"model": "m", "messages": user, "seed": "x"}), "seed"),
            (json!({"model": "m", "messages": user, "stop": [1]}), "stop"),
            (json!({"model": "m", "messages": user, "stop": ""}), "stop"),
            (
                json!({"model": "m", "messages": user, "stream": "yes"}),
                "stream",
            ),
            (
                json!({"model": "m", "messages": [{"role": "tool", "content": "x"}]}),
                "messages[0]",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user"}]}),
                "messages[0]",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "<image> x"}]}),
                "messages[0]",
            ),
            (
                json!({"model": "m", "messages": [{"role": "assistant", "content": "x"}]}),
                "messages",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}),
                "messages",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}),
                "messages[0].content[0]",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]}]}),
                "messages[0].content[0]",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "audio"}]}]}),
                "messages[0].content[0]",
            ),
        ];
        for (body, param) in cases {
            let e = parse(body.clone()).unwrap_err();
            assert_eq!(e.status, 400, "{body}");
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
        }
        let e = parse_request(b"{not json", &limits()).unwrap_err();
        assert_eq!(e.status, 400);
        // too many images
        let img = json!({"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}});
        let e = parse(
            json!({"model": "m", "messages": [{"role": "user", "content": [img, img, img]}]}),
        )
        .unwrap_err();
        assert!(e.message.contains("at most 2 images"), "{}", e.message);
    }
}
