//! A stand-in for a third-party LLM API (feature `tools`): a small HTTP server that speaks
//! OpenAI's protocol — `POST /v1/chat/completions` whole and streamed (server-sent events,
//! `stream_options.include_usage`), `GET /v1/models`, `POST /v1/embeddings` — so the gateway's
//! tests, `bench` and the README's walk-through need no account and no network.
//!
//! Its answers are deterministic and say which call made them (`answer #n to: <prompt>`), so a
//! client can tell a cached answer from a new one. Markers in the last user message ask for
//! faults: `[500]` answers 500, `[hang]` never answers, `[cut]` breaks a stream after two
//! chunks, `[hold]` waits until [`FakeOpenAi::release`] is called.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::sync::watch;

/// One chat request as the fake saw it: its `Authorization` and `api-key` headers, its body.
pub type Seen = (Option<String>, Option<String>, Value);

#[derive(Default)]
struct Inner {
    /// Chat completions answered or started, all prompts.
    calls: AtomicU64,
    embedding_calls: AtomicU64,
    /// Requests waiting on `[hold]`.
    held: AtomicU64,
    /// Each chat request's `Authorization` and `api-key` headers, and its body.
    seen: Mutex<Vec<Seen>>,
    /// Each chat request's query string.
    queries: Mutex<Vec<Option<String>>>,
    /// Added to every answer before it is sent (a model's thinking time, for `bench`).
    delay: Mutex<Duration>,
}

/// A running fake; clones share its counters.
#[derive(Clone)]
pub struct FakeOpenAi {
    inner: Arc<Inner>,
    release: Arc<watch::Sender<bool>>,
    pub url: String,
}

impl FakeOpenAi {
    /// Serve on `listen` (`127.0.0.1:0` for any free port); the base URL ends in `/v1`.
    pub async fn start(listen: &str) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let url = format!("http://{}/v1", listener.local_addr()?);
        let (tx, _) = watch::channel(false);
        let fake = Self {
            inner: Arc::new(Inner::default()),
            release: Arc::new(tx),
            url,
        };
        let app = axum::Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/models", get(models))
            .route("/v1/embeddings", post(embeddings))
            .with_state(fake.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::warn!(error = %e, "the fake OpenAI server stopped");
            }
        });
        Ok(fake)
    }

    /// Chat completions requested so far.
    pub fn calls(&self) -> u64 {
        self.inner.calls.load(Ordering::SeqCst)
    }

    pub fn embedding_calls(&self) -> u64 {
        self.inner.embedding_calls.load(Ordering::SeqCst)
    }

    /// Requests waiting on `[hold]` now.
    pub fn held(&self) -> u64 {
        self.inner.held.load(Ordering::SeqCst)
    }

    /// Let every `[hold]` request (now and later) answer.
    pub fn release(&self) {
        self.release.send_replace(true);
    }

    /// `(Authorization, api-key, body)` of every chat request, in arrival order.
    pub fn seen(&self) -> Vec<Seen> {
        self.inner.seen.lock().clone()
    }

    /// The query string of every chat request, in arrival order.
    pub fn queries(&self) -> Vec<Option<String>> {
        self.inner.queries.lock().clone()
    }

    pub fn set_delay(&self, d: Duration) {
        *self.inner.delay.lock() = d;
    }
}

fn last_user_text(body: &Value) -> String {
    let Some(messages) = body.get("messages").and_then(Value::as_array) else {
        return String::new();
    };
    let Some(last) = messages.iter().rev().find(|m| m["role"] == "user") else {
        return String::new();
    };
    match &last["content"] {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

fn words(s: &str) -> u64 {
    s.split_whitespace().count() as u64
}

async fn chat(
    State(fake): State<FakeOpenAi>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    fake.inner.queries.lock().push(query);
    let header_text = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    fake.inner.seen.lock().push((
        header_text(header::AUTHORIZATION.as_str()),
        header_text("api-key"),
        body.clone(),
    ));
    let n = fake.inner.calls.fetch_add(1, Ordering::SeqCst) + 1;
    let prompt = last_user_text(&body);
    if prompt.contains("[hold]") {
        fake.inner.held.fetch_add(1, Ordering::SeqCst);
        let mut rx = fake.release.subscribe();
        let _ = rx.wait_for(|released| *released).await;
        fake.inner.held.fetch_sub(1, Ordering::SeqCst);
    }
    if prompt.contains("[500]") {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": {"message": "the model is overloaded", "type": "server_error", "param": null, "code": null}})),
        )
            .into_response();
    }
    if prompt.contains("[hang]") {
        std::future::pending::<()>().await;
    }
    let delay = *fake.inner.delay.lock();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let model = body["model"].as_str().unwrap_or("fake").to_owned();
    let id = format!("chatcmpl-fake{n}");
    let created = 1_700_000_000 + i64::try_from(n).unwrap_or(0);
    let wants_tool = body
        .get("tools")
        .and_then(Value::as_array)
        .is_some_and(|t| !t.is_empty());
    let content = format!("answer #{n} to: {prompt}");
    let usage = json!({
        "prompt_tokens": words(&prompt),
        "completion_tokens": words(&content),
        "total_tokens": words(&prompt) + words(&content),
    });
    let tool_call = |name: &str| {
        json!({"id": format!("call_{n}"), "type": "function",
               "function": {"name": name, "arguments": "{\"q\":1}"}})
    };
    let tool_name = body
        .pointer("/tools/0/function/name")
        .and_then(Value::as_str)
        .unwrap_or("tool")
        .to_owned();
    if body["stream"].as_bool() != Some(true) {
        let message = if wants_tool {
            json!({"role": "assistant", "content": null, "tool_calls": [tool_call(&tool_name)]})
        } else {
            json!({"role": "assistant", "content": content})
        };
        return Json(json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "system_fingerprint": "fp_fake",
            "choices": [{"index": 0, "message": message, "logprobs": null,
                         "finish_reason": if wants_tool { "tool_calls" } else { "stop" }}],
            "usage": usage,
        }))
        .into_response();
    }
    let chunk = |delta: Value, finish: Value| {
        json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
               "system_fingerprint": "fp_fake",
               "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]})
    };
    let mut events: Vec<Value> = vec![chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    )];
    if wants_tool {
        let mut call = tool_call(&tool_name);
        call["index"] = json!(0);
        events.push(chunk(json!({"tool_calls": [call]}), Value::Null));
    } else {
        let chars: Vec<char> = content.chars().collect();
        for piece in chars.chunks(5) {
            events.push(chunk(
                json!({"content": piece.iter().collect::<String>()}),
                Value::Null,
            ));
        }
    }
    events.push(chunk(
        json!({}),
        json!(if wants_tool { "tool_calls" } else { "stop" }),
    ));
    if body
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        == Some(true)
    {
        events.push(
            json!({"id": id, "object": "chat.completion.chunk", "created": created,
                           "model": model, "choices": [], "usage": usage}),
        );
    }
    let cut = prompt.contains("[cut]");
    let mut frames: Vec<Result<Bytes, std::io::Error>> = events
        .iter()
        .map(|e| Ok(Bytes::from(format!("data: {e}\n\n"))))
        .collect();
    if cut {
        frames.truncate(2);
        frames.push(Err(std::io::Error::other("the fake cut the stream")));
    } else {
        frames.push(Ok(Bytes::from_static(b"data: [DONE]\n\n")));
    }
    // Each frame after a yield, so the server writes what it has before the next: a cut
    // stream reaches the client as a broken body after its first chunks, not as no answer.
    let stream = futures::stream::iter(frames).then(|f| async move {
        tokio::task::yield_now().await;
        f
    });
    let mut r = Response::new(Body::from_stream(stream));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream"),
    );
    r
}

async fn models() -> Json<Value> {
    Json(json!({"object": "list", "data": [
        {"id": "fake-small", "object": "model", "created": 1_700_000_000, "owned_by": "semantis"},
        {"id": "fake-large", "object": "model", "created": 1_700_000_000, "owned_by": "semantis"},
    ]}))
}

async fn embeddings(State(fake): State<FakeOpenAi>, Json(body): Json<Value>) -> Response {
    fake.inner.embedding_calls.fetch_add(1, Ordering::SeqCst);
    let inputs: Vec<String> = match &body["input"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a
            .iter()
            .map(|v| v.as_str().unwrap_or("").to_owned())
            .collect(),
        _ => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": {"message": "`input` is required", "type": "invalid_request_error"}})),
            )
                .into_response();
        }
    };
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let v: Vec<f32> = (0..8u32)
                .map(|d| {
                    let h = t.bytes().fold(u64::from(d) + 1, |h, b| {
                        h.wrapping_mul(1_099_511_628_211) ^ u64::from(b)
                    });
                    (h % 1000) as f32 / 1000.0 - 0.5
                })
                .collect();
            json!({"object": "embedding", "index": i, "embedding": v})
        })
        .collect();
    Json(
        json!({"object": "list", "data": data, "model": body["model"],
                "usage": {"prompt_tokens": inputs.len(), "total_tokens": inputs.len()}}),
    )
    .into_response()
}
