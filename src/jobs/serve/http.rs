//! The HTTP side of `lntune serve` (axum on tokio): routes, the API key, the body limit,
//! the queue's back-pressure (429), streaming as server-sent events in OpenAI's chunk
//! format. Every error is OpenAI's error JSON; nothing a client sends stops the server.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream;
use serde_json::{Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use super::api::{ApiError, Limits, finish_reason, parse_request};
use super::engine::{Event, Job};
use crate::eval::generate::Finish;

/// What every handler shares.
pub struct AppState {
    pub queue: SyncSender<Job>,
    /// the base's id, then the adapters' names
    pub models: Vec<String>,
    pub api_key: Option<String>,
    pub limits: Limits,
    pub timeout: Duration,
    pub next_id: AtomicU64,
}

pub fn router(state: Arc<AppState>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .fallback(|| async {
            error(&ApiError::new(
                404,
                "invalid_request_error",
                "no such route",
            ))
        })
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

fn error(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(e.body())).into_response()
}

async fn page() -> Html<&'static str> {
    Html(include_str!("page.html"))
}

fn authorized(st: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &st.api_key else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given == Some(key.as_str()) {
        Ok(())
    } else {
        Err(ApiError::new(
            401,
            "invalid_request_error",
            "a valid API key is required (Authorization: Bearer KEY)",
        )
        .with_code("invalid_api_key"))
    }
}

async fn models(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorized(&st, &headers) {
        return error(&e);
    }
    let data: Vec<Value> = st
        .models
        .iter()
        .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": "lntune"}))
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn chat_completions(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match chat(st, headers, body).await {
        Ok(r) => r,
        Err(e) => error(&e),
    }
}

async fn chat(
    st: Arc<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    authorized(&st, &headers)?;
    let body = body.map_err(|e| {
        ApiError::new(
            e.status().as_u16(),
            "invalid_request_error",
            format!("cannot read the body: {}", e.body_text()),
        )
    })?;
    let request = parse_request(&body, &st.limits)?;
    let adapter = match st.models.iter().position(|m| *m == request.model) {
        Some(0) => None,
        Some(_) => Some(request.model.clone()),
        None => {
            return Err(ApiError::new(
                404,
                "invalid_request_error",
                format!(
                    "model `{}` does not exist; this server has {}",
                    request.model,
                    st.models.join(", ")
                ),
            )
            .with_code("model_not_found"));
        }
    };
    let (tx, mut rx) = unbounded_channel();
    let stream = request.stream;
    let include_usage = request.include_usage;
    let model = request.model.clone();
    let id = format!("chatcmpl-{}", st.next_id.fetch_add(1, Ordering::Relaxed));
    let job = Job {
        id: id.clone(),
        received: Instant::now(),
        adapter,
        request,
        events: tx,
        deadline: Instant::now() + st.timeout,
    };
    match st.queue.try_send(job) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => {
            return Err(ApiError::new(
                429,
                "rate_limit_error",
                "the server's queue is full; retry later",
            ));
        }
        Err(TrySendError::Disconnected(_)) => {
            return Err(ApiError::new(
                503,
                "server_error",
                "the generation worker has stopped",
            ));
        }
    }
    let created = now_s();
    // the first event says whether the request runs at all (so that its errors keep
    // their status even when streaming)
    let prompt_tokens = match next_event(&mut rx, st.timeout).await? {
        Event::Started { prompt_tokens } => prompt_tokens,
        Event::Failed(e) => return Err(e),
        other => return Err(unexpected(other)),
    };
    let head = Head {
        id,
        created,
        model,
        prompt_tokens,
    };
    if stream {
        Ok(stream_response(head, rx, include_usage))
    } else {
        loop {
            match next_event(&mut rx, st.timeout).await? {
                Event::Token(_) => {}
                Event::Done {
                    finish,
                    completion_tokens,
                    text,
                } => {
                    if finish == Finish::Cancelled {
                        return Err(ApiError::new(
                            504,
                            "timeout",
                            "the request ran past its timeout",
                        ));
                    }
                    return Ok(Json(json!({
                        "id": head.id,
                        "object": "chat.completion",
                        "created": head.created,
                        "model": head.model,
                        "choices": [{
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "finish_reason": finish_reason(finish),
                        }],
                        "usage": usage(head.prompt_tokens, completion_tokens),
                    }))
                    .into_response());
                }
                Event::Failed(e) => return Err(e),
                other => return Err(unexpected(other)),
            }
        }
    }
}

struct Head {
    id: String,
    created: u64,
    model: String,
    prompt_tokens: usize,
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

fn unexpected(e: Event) -> ApiError {
    ApiError::new(500, "server_error", format!("unexpected event {e:?}"))
}

/// The next event, or a timeout error (the worker enforces the deadline; this is the guard
/// should the worker be stuck in one long step).
async fn next_event(
    rx: &mut UnboundedReceiver<Event>,
    timeout: Duration,
) -> Result<Event, ApiError> {
    match tokio::time::timeout(timeout + Duration::from_secs(5), rx.recv()).await {
        Ok(Some(e)) => Ok(e),
        Ok(None) => Err(ApiError::new(
            500,
            "server_error",
            "the request was dropped",
        )),
        Err(_) => Err(ApiError::new(
            504,
            "timeout",
            "the request ran past its timeout",
        )),
    }
}

/// Server-sent events in OpenAI's chunk format: a first chunk with the role, one per piece
/// of text, a last one with the finish reason (and, if asked, one with the usage), then
/// `[DONE]`. Dropping the stream (the client went away) closes the request's channel, which
/// cancels its generation.
fn stream_response(head: Head, rx: UnboundedReceiver<Event>, include_usage: bool) -> Response {
    let chunk = move |head: &Head, delta: Value, finish: Option<&str>| {
        SseEvent::default().data(
            json!({
                "id": head.id,
                "object": "chat.completion.chunk",
                "created": head.created,
                "model": head.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            })
            .to_string(),
        )
    };
    let first = chunk(&head, json!({"role": "assistant", "content": ""}), None);
    struct S {
        head: Head,
        rx: UnboundedReceiver<Event>,
        pending: std::collections::VecDeque<SseEvent>,
        ended: bool,
    }
    let state = S {
        head,
        rx,
        pending: [first].into(),
        ended: false,
    };
    let events = stream::unfold(state, move |mut s| async move {
        loop {
            if let Some(e) = s.pending.pop_front() {
                return Some((Ok::<_, Infallible>(e), s));
            }
            if s.ended {
                return None;
            }
            match s.rx.recv().await {
                Some(Event::Token(t)) => {
                    s.pending
                        .push_back(chunk(&s.head, json!({"content": t}), None))
                }
                Some(Event::Done {
                    finish,
                    completion_tokens,
                    ..
                }) => {
                    s.pending
                        .push_back(chunk(&s.head, json!({}), Some(finish_reason(finish))));
                    if include_usage {
                        let u = json!({
                            "id": s.head.id,
                            "object": "chat.completion.chunk",
                            "created": s.head.created,
                            "model": s.head.model,
                            "choices": [],
                            "usage": usage(s.head.prompt_tokens, completion_tokens),
                        });
                        s.pending.push_back(SseEvent::default().data(u.to_string()));
                    }
                    s.pending.push_back(SseEvent::default().data("[DONE]"));
                    s.ended = true;
                }
                Some(Event::Failed(e)) => {
                    s.pending
                        .push_back(SseEvent::default().data(e.body().to_string()));
                    s.ended = true;
                }
                Some(Event::Started { .. }) | None => s.ended = true,
            }
        }
    });
    Sse::new(events).into_response()
}
