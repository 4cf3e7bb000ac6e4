//! OpenAI's chat-completions protocol as the cache sees it, with no I/O: what in a request
//! body is the scope and what is the prompt ([`classify`]), which requests must never be
//! cached ([`Bypass`]), how a streamed answer is put back together ([`StreamAssembler`], fed
//! by [`SseDecoder`]), and how a stored completion is answered again, whole or as chunks
//! ([`replay_completion`], [`replay_chunks`]).

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use crate::error::CacheError;
use crate::scope::Scope;

/// Request fields that never change the answer: they are left out of the scope.
const NEUTRAL_FIELDS: &[&str] = &[
    "messages",
    "stream",
    "stream_options",
    "user",
    "metadata",
    "store",
    "service_tier",
    "safety_identifier",
    "prompt_cache_key",
];

/// Fields the scope has a place of its own for.
const SCOPE_FIELDS: &[&str] = &[
    "model",
    "temperature",
    "top_p",
    "max_tokens",
    "stop",
    "tools",
    "response_format",
];

/// Why a request is forwarded untouched and never cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bypass {
    /// `n` > 1: the caller wants several different answers.
    SeveralChoices,
    /// `temperature` above the tenant's `max_cacheable_temperature`.
    Temperature,
    /// The last message is not the user's (a tool result, an assistant prefill): there is no
    /// prompt to key on.
    NotAUserTurn,
    /// The last user message holds images, audio or files, which the prompt text cannot stand for.
    NonTextContent,
    /// The last user message has no text.
    EmptyPrompt,
    /// `logprobs` / `top_logprobs`: per-token data a replay cannot give.
    Logprobs,
    /// Audio output (`modalities` with `audio`, or `audio`).
    Audio,
    /// `web_search_options`: the answer depends on today's web.
    WebSearch,
    /// The client asked (`X-Semantis-Cache-Bypass: true`).
    Client,
}

impl Bypass {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SeveralChoices => "n_greater_than_1",
            Self::Temperature => "temperature_above_ceiling",
            Self::NotAUserTurn => "last_message_not_user",
            Self::NonTextContent => "non_text_content",
            Self::EmptyPrompt => "empty_prompt",
            Self::Logprobs => "logprobs",
            Self::Audio => "audio",
            Self::WebSearch => "web_search",
            Self::Client => "client_request",
        }
    }
}

/// The cache key of a cacheable chat request.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatKey {
    pub scope: Scope,
    /// The text of the last user message (text parts joined by a line break).
    pub prompt: String,
}

/// A chat-completions request, classified.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatCall {
    pub model: String,
    pub stream: bool,
    /// `stream_options.include_usage`: a final chunk carries the usage.
    pub include_usage: bool,
    /// The end user: the body's `user` (or `safety_identifier`).
    pub user: Option<String>,
    pub key: Result<ChatKey, Bypass>,
}

/// Classify a chat-completions body. Malformed bodies (what the upstream would refuse too)
/// are errors; anything well-formed that must not be cached is a [`Bypass`].
pub fn classify(
    body: &Value,
    namespace: Option<&str>,
    max_cacheable_temperature: f64,
) -> Result<ChatCall, CacheError> {
    let invalid = |m: &str| CacheError::InvalidRequest(m.to_owned());
    let obj = body
        .as_object()
        .ok_or_else(|| invalid("the body must be a JSON object"))?;
    let model = obj
        .get("model")
        .and_then(Value::as_str)
        .filter(|m| !m.trim().is_empty())
        .ok_or_else(|| invalid("`model` must be a non-empty string"))?
        .to_owned();
    let messages = obj
        .get("messages")
        .and_then(Value::as_array)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| invalid("`messages` must be a non-empty array"))?;
    if messages.iter().any(|m| {
        m.get("role")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
    }) {
        return Err(invalid("every message needs a `role`"));
    }
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(invalid("`stream` must be a boolean")),
    };
    let include_usage = obj
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let user = ["user", "safety_identifier"]
        .iter()
        .find_map(|f| obj.get(*f).and_then(Value::as_str))
        .map(str::to_owned);
    let temperature = number(obj, "temperature")?;
    let top_p = number(obj, "top_p")?;
    let max_tokens = match obj.get("max_tokens") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .ok_or_else(|| invalid("`max_tokens` must be a non-negative integer"))?,
        ),
    };
    let call = |key| ChatCall {
        model: model.clone(),
        stream,
        include_usage,
        user: user.clone(),
        key,
    };
    if let Some(b) = bypass(obj, temperature, max_cacheable_temperature) {
        return Ok(call(Err(b)));
    }
    let (last, earlier) = messages
        .split_last()
        .ok_or_else(|| invalid("`messages` must be a non-empty array"))?;
    if last.get("role").and_then(Value::as_str) != Some("user") {
        return Ok(call(Err(Bypass::NotAUserTurn)));
    }
    let prompt = match user_text(last.get("content")) {
        Ok(p) => p,
        Err(b) => return Ok(call(Err(b))),
    };
    if prompt.trim().is_empty() {
        return Ok(call(Err(Bypass::EmptyPrompt)));
    }
    let stop = match obj.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|s| s.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| invalid("`stop` must be a string or an array of strings"))?,
        Some(_) => return Err(invalid("`stop` must be a string or an array of strings")),
    };
    let tools = match obj.get("tools") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(t)) => t.clone(),
        Some(_) => return Err(invalid("`tools` must be an array")),
    };
    let params: BTreeMap<String, Value> = obj
        .iter()
        .filter(|(k, v)| {
            !NEUTRAL_FIELDS.contains(&k.as_str())
                && !SCOPE_FIELDS.contains(&k.as_str())
                && !v.is_null()
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let scope = Scope {
        model: Some(model.clone()),
        namespace: namespace.map(str::to_owned),
        temperature,
        top_p,
        max_tokens,
        stop,
        tools,
        response_format: obj.get("response_format").filter(|v| !v.is_null()).cloned(),
        // System and developer messages are earlier turns like any other: kept whole, in order.
        system: None,
        messages: earlier.to_vec(),
        params,
    };
    Ok(call(Ok(ChatKey { scope, prompt })))
}

fn number(obj: &Map<String, Value>, field: &str) -> Result<Option<f64>, CacheError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|f| f.is_finite())
            .map(Some)
            .ok_or_else(|| CacheError::InvalidRequest(format!("`{field}` must be a number"))),
    }
}

fn bypass(obj: &Map<String, Value>, temperature: Option<f64>, ceiling: f64) -> Option<Bypass> {
    if obj.get("n").and_then(Value::as_u64).is_some_and(|n| n > 1) {
        return Some(Bypass::SeveralChoices);
    }
    if temperature.is_some_and(|t| t > ceiling) {
        return Some(Bypass::Temperature);
    }
    if obj.get("logprobs").and_then(Value::as_bool) == Some(true)
        || obj.get("top_logprobs").is_some_and(|v| !v.is_null())
    {
        return Some(Bypass::Logprobs);
    }
    let audio_out = obj
        .get("modalities")
        .and_then(Value::as_array)
        .is_some_and(|m| m.iter().any(|x| x.as_str() == Some("audio")));
    if audio_out || obj.get("audio").is_some_and(|v| !v.is_null()) {
        return Some(Bypass::Audio);
    }
    if obj.get("web_search_options").is_some_and(|v| !v.is_null()) {
        return Some(Bypass::WebSearch);
    }
    None
}

/// The text of a user message: a string, or the text parts of a multi-part content.
fn user_text(content: Option<&Value>) -> Result<String, Bypass> {
    match content {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut texts = Vec::new();
            for part in parts {
                match part.get("type").and_then(Value::as_str) {
                    Some("text") => texts.push(
                        part.get("text")
                            .and_then(Value::as_str)
                            .ok_or(Bypass::EmptyPrompt)?,
                    ),
                    _ => return Err(Bypass::NonTextContent),
                }
            }
            Ok(texts.join("\n"))
        }
        _ => Err(Bypass::EmptyPrompt),
    }
}

/// Whether a completion may be stored: every choice ended on its own (`stop`, `length`,
/// `tool_calls`, `function_call`); a content filter's answer is not one to repeat.
pub fn storable(completion: &Value) -> bool {
    completion
        .get("choices")
        .and_then(Value::as_array)
        .filter(|c| !c.is_empty())
        .is_some_and(|choices| {
            choices.iter().all(|c| {
                matches!(
                    c.get("finish_reason").and_then(Value::as_str),
                    Some("stop" | "length" | "tool_calls" | "function_call")
                )
            })
        })
}

/// `(prompt_tokens, completion_tokens)` from a completion's `usage`.
pub fn usage_of(completion: &Value) -> (u64, u64) {
    let usage = completion.get("usage");
    let field = |f: &str| {
        usage
            .and_then(|u| u.get(f))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    (field("prompt_tokens"), field("completion_tokens"))
}

/// A stored answer as a chat completion: a stored completion as it is, a string (an entry
/// stored through `/v1/entries`) as the assistant's message. `None` for anything else, which
/// the gateway does not serve.
pub fn as_completion(stored: &Value, model: &str) -> Option<Value> {
    match stored {
        Value::Object(o) if o.get("choices").is_some_and(Value::is_array) => Some(stored.clone()),
        Value::String(text) => Some(json!({
            "object": "chat.completion",
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
                "logprobs": null,
            }],
        })),
        _ => None,
    }
}

/// A stored completion answered again: the same content under a fresh `id` and `created`.
pub fn replay_completion(stored: &Value, id: &str, created: i64) -> Value {
    let mut out = stored.clone();
    if let Value::Object(o) = &mut out {
        o.insert("id".into(), json!(id));
        o.insert("created".into(), json!(created));
        o.insert("object".into(), json!("chat.completion"));
    }
    out
}

/// Longest content piece a replayed chunk carries.
const REPLAY_PIECE_CHARS: usize = 64;

/// A stored completion as the chunks a streaming call would have sent, in order: the role,
/// the content in pieces, tool calls, the finish reason, and (with `include_usage`) a last
/// chunk with no choices and the usage. The caller frames each as `data: …` and ends with
/// `data: [DONE]`.
pub fn replay_chunks(stored: &Value, id: &str, created: i64, include_usage: bool) -> Vec<Value> {
    let model = stored.get("model").cloned().unwrap_or(Value::Null);
    let fingerprint = stored
        .get("system_fingerprint")
        .cloned()
        .unwrap_or(Value::Null);
    let chunk = |choices: Value| {
        json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": fingerprint,
            "choices": choices,
        })
    };
    let mut out = Vec::new();
    let empty = Vec::new();
    let choices = stored
        .get("choices")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    for (i, choice) in choices.iter().enumerate() {
        let index = choice.get("index").cloned().unwrap_or(json!(i));
        let message = choice.get("message").cloned().unwrap_or(json!({}));
        let role = message.get("role").cloned().unwrap_or(json!("assistant"));
        let delta = |d: Value| json!([{ "index": index, "delta": d, "finish_reason": null, "logprobs": null }]);
        out.push(chunk(delta(json!({"role": role, "content": ""}))));
        if let Some(text) = message.get("content").and_then(Value::as_str) {
            for piece in pieces(text, REPLAY_PIECE_CHARS) {
                out.push(chunk(delta(json!({ "content": piece }))));
            }
        }
        if let Some(refusal) = message.get("refusal").and_then(Value::as_str) {
            out.push(chunk(delta(json!({ "refusal": refusal }))));
        }
        if let Some(calls) = message.get("tool_calls").and_then(Value::as_array) {
            let indexed: Vec<Value> = calls
                .iter()
                .enumerate()
                .map(|(n, c)| {
                    let mut c = c.clone();
                    if let Value::Object(o) = &mut c {
                        o.insert("index".into(), json!(n));
                    }
                    c
                })
                .collect();
            out.push(chunk(delta(json!({ "tool_calls": indexed }))));
        }
        let finish = choice
            .get("finish_reason")
            .cloned()
            .unwrap_or(json!("stop"));
        out.push(chunk(json!([{
            "index": index, "delta": {}, "finish_reason": finish, "logprobs": null
        }])));
    }
    if include_usage {
        let mut last = chunk(json!([]));
        if let Value::Object(o) = &mut last {
            o.insert(
                "usage".into(),
                stored.get("usage").cloned().unwrap_or(Value::Null),
            );
        }
        out.push(last);
    }
    out
}

/// `text` cut into pieces of at most `max` characters, on character boundaries.
fn pieces(text: &str, max: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    if chars.is_empty() {
        return Vec::new();
    }
    chars
        .chunks(max.max(1))
        .map(|c| c.iter().collect())
        .collect()
}

/// Whether an event's data is the usage-only chunk `stream_options.include_usage` adds
/// (no choices, a usage).
pub fn is_usage_chunk(data: &str) -> bool {
    serde_json::from_str::<Value>(data).is_ok_and(|v| {
        v.get("choices")
            .and_then(Value::as_array)
            .is_some_and(Vec::is_empty)
            && v.get("usage").is_some_and(|u| !u.is_null())
    })
}

/// One server-sent event's data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SseData {
    /// `data: [DONE]`, OpenAI's end of stream.
    Done,
    Data(String),
}

/// Decodes a server-sent-event byte stream incrementally (any split of the bytes gives the same
/// events): lines end in LF, CRLF or CR; `data:` lines accumulate; an empty line dispatches;
/// comments and other fields are ignored.
#[derive(Debug, Default)]
pub struct SseDecoder {
    line: Vec<u8>,
    data: Option<String>,
    /// The last byte was a CR: an LF right after it ends nothing.
    after_cr: bool,
}

impl SseDecoder {
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<SseData>) {
        for &b in bytes {
            match b {
                b'\n' if self.after_cr => self.after_cr = false,
                b'\n' | b'\r' => {
                    self.after_cr = b == b'\r';
                    self.end_line(out);
                }
                _ => {
                    self.after_cr = false;
                    self.line.push(b);
                }
            }
        }
    }

    fn end_line(&mut self, out: &mut Vec<SseData>) {
        let line = std::mem::take(&mut self.line);
        if line.is_empty() {
            if let Some(data) = self.data.take() {
                out.push(if data == "[DONE]" {
                    SseData::Done
                } else {
                    SseData::Data(data)
                });
            }
            return;
        }
        let text = String::from_utf8_lossy(&line);
        let (field, value) = match text.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (text.as_ref(), ""),
        };
        if field == "data" {
            match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.data = Some(value.to_owned()),
            }
        }
    }
}

#[derive(Debug, Default)]
struct ToolCallParts {
    id: Option<Value>,
    kind: Option<Value>,
    name: String,
    arguments: String,
}

#[derive(Debug, Default)]
struct ChoiceParts {
    role: Option<Value>,
    content: Option<String>,
    refusal: Option<String>,
    tool_calls: BTreeMap<u64, ToolCallParts>,
    finish_reason: Option<Value>,
}

/// Puts a streamed completion back together from its chunks, as the non-streaming call would
/// have answered it.
#[derive(Debug, Default)]
pub struct StreamAssembler {
    id: Option<Value>,
    created: Option<Value>,
    model: Option<Value>,
    system_fingerprint: Option<Value>,
    choices: BTreeMap<u64, ChoiceParts>,
    usage: Option<Value>,
    done: bool,
    /// A chunk that was not JSON, or an `error` event: the stream is not an answer.
    broken: bool,
}

impl StreamAssembler {
    pub fn push(&mut self, event: &SseData) {
        let data = match event {
            SseData::Done => {
                self.done = true;
                return;
            }
            SseData::Data(d) => d,
        };
        let Ok(chunk) = serde_json::from_str::<Value>(data) else {
            self.broken = true;
            return;
        };
        if chunk.get("error").is_some() {
            self.broken = true;
            return;
        }
        for (field, slot) in [
            ("id", &mut self.id),
            ("created", &mut self.created),
            ("model", &mut self.model),
            ("system_fingerprint", &mut self.system_fingerprint),
        ] {
            if slot.is_none()
                && let Some(v) = chunk.get(field).filter(|v| !v.is_null())
            {
                *slot = Some(v.clone());
            }
        }
        if let Some(u) = chunk.get("usage").filter(|u| !u.is_null()) {
            self.usage = Some(u.clone());
        }
        let Some(choices) = chunk.get("choices").and_then(Value::as_array) else {
            return;
        };
        for c in choices {
            let index = c.get("index").and_then(Value::as_u64).unwrap_or(0);
            let parts = self.choices.entry(index).or_default();
            if let Some(f) = c.get("finish_reason").filter(|f| !f.is_null()) {
                parts.finish_reason = Some(f.clone());
            }
            let Some(delta) = c.get("delta") else {
                continue;
            };
            if let Some(r) = delta.get("role").filter(|r| !r.is_null()) {
                parts.role = Some(r.clone());
            }
            if let Some(t) = delta.get("content").and_then(Value::as_str) {
                parts.content.get_or_insert_with(String::new).push_str(t);
            }
            if let Some(t) = delta.get("refusal").and_then(Value::as_str) {
                parts.refusal.get_or_insert_with(String::new).push_str(t);
            }
            for call in delta
                .get("tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let n = call.get("index").and_then(Value::as_u64).unwrap_or(0);
                let tc = parts.tool_calls.entry(n).or_default();
                if let Some(id) = call.get("id").filter(|v| !v.is_null()) {
                    tc.id = Some(id.clone());
                }
                if let Some(k) = call.get("type").filter(|v| !v.is_null()) {
                    tc.kind = Some(k.clone());
                }
                if let Some(f) = call.get("function") {
                    if let Some(name) = f.get("name").and_then(Value::as_str) {
                        tc.name.push_str(name);
                    }
                    if let Some(a) = f.get("arguments").and_then(Value::as_str) {
                        tc.arguments.push_str(a);
                    }
                }
            }
        }
    }

    /// The completion, when the stream ended as a complete answer: `[DONE]` seen, no broken
    /// chunk, and every choice finished.
    pub fn finish(self) -> Option<Value> {
        if !self.done || self.broken || self.choices.is_empty() {
            return None;
        }
        if self.choices.values().any(|c| c.finish_reason.is_none()) {
            return None;
        }
        let choices: Vec<Value> = self
            .choices
            .into_iter()
            .map(|(index, c)| {
                let mut message = Map::new();
                message.insert("role".into(), c.role.unwrap_or(json!("assistant")));
                message.insert(
                    "content".into(),
                    c.content.map_or(Value::Null, Value::String),
                );
                if let Some(r) = c.refusal {
                    message.insert("refusal".into(), Value::String(r));
                }
                if !c.tool_calls.is_empty() {
                    let calls: Vec<Value> = c
                        .tool_calls
                        .into_values()
                        .map(|t| {
                            json!({
                                "id": t.id.unwrap_or(Value::Null),
                                "type": t.kind.unwrap_or(json!("function")),
                                "function": {"name": t.name, "arguments": t.arguments},
                            })
                        })
                        .collect();
                    message.insert("tool_calls".into(), Value::Array(calls));
                }
                json!({
                    "index": index,
                    "message": Value::Object(message),
                    "finish_reason": c.finish_reason,
                    "logprobs": null,
                })
            })
            .collect();
        let mut out = json!({
            "id": self.id.unwrap_or(Value::Null),
            "object": "chat.completion",
            "created": self.created.unwrap_or(Value::Null),
            "model": self.model.unwrap_or(Value::Null),
            "choices": choices,
        });
        if let Value::Object(o) = &mut out {
            if let Some(f) = self.system_fingerprint {
                o.insert("system_fingerprint".into(), f);
            }
            if let Some(u) = self.usage {
                o.insert("usage".into(), u);
            }
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(body: Value) -> Result<ChatKey, Bypass> {
        classify(&body, None, 1.0).expect("well-formed").key
    }

    #[test]
    fn the_prompt_is_the_last_user_message_and_earlier_turns_are_scope() {
        let k = key(json!({
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": [{"type": "text", "text": "What is 2+2?"},
                                              {"type": "text", "text": "Answer in words."}]}
            ],
            "temperature": 0.2, "seed": 7, "stream": true, "user": "u1"
        }))
        .expect("cacheable");
        assert_eq!(k.prompt, "What is 2+2?\nAnswer in words.");
        assert_eq!(k.scope.messages.len(), 3);
        assert_eq!(k.scope.model.as_deref(), Some("gpt-4o-mini"));
        assert_eq!(k.scope.params.get("seed"), Some(&json!(7)));
        assert!(!k.scope.params.contains_key("stream"));
        assert!(!k.scope.params.contains_key("user"));
    }

    #[test]
    fn every_answer_changing_field_changes_the_scope_and_neutral_ones_do_not() {
        let base = json!({"model": "m", "messages": [{"role": "user", "content": "q"}]});
        let fp = |extra: Value| {
            let mut b = base.clone();
            if let (Value::Object(o), Value::Object(e)) = (&mut b, extra) {
                o.extend(e);
            }
            key(b).expect("cacheable").scope.fingerprint()
        };
        let plain = fp(json!({}));
        for changed in [
            json!({"model": "other"}),
            json!({"temperature": 0.5}),
            json!({"top_p": 0.5}),
            json!({"max_tokens": 10}),
            json!({"max_completion_tokens": 10}),
            json!({"stop": ["x"]}),
            json!({"seed": 1}),
            json!({"tools": [{"type": "function", "function": {"name": "f"}}]}),
            json!({"tool_choice": "required"}),
            json!({"response_format": {"type": "json_object"}}),
            json!({"frequency_penalty": 0.5}),
            json!({"some_future_parameter": true}),
        ] {
            assert_ne!(
                fp(changed.clone()),
                plain,
                "{changed} must change the scope"
            );
        }
        for neutral in [
            json!({"stream": true}),
            json!({"user": "u"}),
            json!({"stream_options": {"include_usage": true}}),
            json!({"metadata": {"a": "b"}}),
        ] {
            assert_eq!(
                fp(neutral.clone()),
                plain,
                "{neutral} must not change the scope"
            );
        }
    }

    #[test]
    fn requests_that_must_not_be_cached_bypass() {
        let user = json!([{"role": "user", "content": "q"}]);
        for (body, want) in [
            (
                json!({"model": "m", "messages": user, "n": 2}),
                Bypass::SeveralChoices,
            ),
            (
                json!({"model": "m", "messages": user, "temperature": 1.5}),
                Bypass::Temperature,
            ),
            (
                json!({"model": "m", "messages": user, "logprobs": true}),
                Bypass::Logprobs,
            ),
            (
                json!({"model": "m", "messages": user, "modalities": ["text", "audio"]}),
                Bypass::Audio,
            ),
            (
                json!({"model": "m", "messages": user, "web_search_options": {}}),
                Bypass::WebSearch,
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "q"},
                    {"role": "tool", "content": "42", "tool_call_id": "c"}]}),
                Bypass::NotAUserTurn,
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": "data:"}}]}]}),
                Bypass::NonTextContent,
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "  "}]}),
                Bypass::EmptyPrompt,
            ),
        ] {
            assert_eq!(key(body.clone()), Err(want), "{body}");
        }
        assert!(key(json!({"model": "m", "messages": user, "n": 1, "temperature": 1.0})).is_ok());
    }

    #[test]
    fn malformed_requests_are_errors() {
        for body in [
            json!([]),
            json!({"messages": [{"role": "user", "content": "q"}]}),
            json!({"model": "m", "messages": []}),
            json!({"model": "m", "messages": [{"content": "q"}]}),
            json!({"model": "m", "messages": [{"role": "user", "content": "q"}], "stream": "yes"}),
            json!({"model": "m", "messages": [{"role": "user", "content": "q"}], "temperature": "hot"}),
            json!({"model": "m", "messages": [{"role": "user", "content": "q"}], "stop": [1]}),
        ] {
            assert!(classify(&body, None, 1.0).is_err(), "{body}");
        }
    }

    fn decode_all(bytes: &[u8], split: usize) -> Vec<SseData> {
        let mut d = SseDecoder::default();
        let mut out = Vec::new();
        for part in bytes.chunks(split.max(1)) {
            d.push(part, &mut out);
        }
        out
    }

    #[test]
    fn sse_decoding_does_not_depend_on_how_the_bytes_are_split() {
        let text =
            b": comment\r\ndata: {\"a\":1}\r\n\r\ndata: x\ndata: y\n\nevent: e\ndata: [DONE]\n\n";
        let whole = decode_all(text, text.len());
        assert_eq!(
            whole,
            vec![
                SseData::Data("{\"a\":1}".into()),
                SseData::Data("x\ny".into()),
                SseData::Done
            ]
        );
        for split in 1..8 {
            assert_eq!(decode_all(text, split), whole, "split {split}");
        }
    }

    #[test]
    fn a_replayed_stream_assembles_back_into_the_stored_completion() {
        let stored = json!({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
            "system_fingerprint": "fp",
            "choices": [{"index": 0, "finish_reason": "tool_calls", "logprobs": null,
                "message": {"role": "assistant", "content": "é".repeat(150),
                    "tool_calls": [{"id": "call_1", "type": "function",
                        "function": {"name": "f", "arguments": "{\"x\":1}"}}]}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
        });
        let chunks = replay_chunks(&stored, "chatcmpl-2", 2, true);
        assert!(chunks.len() > 4, "content comes in pieces");
        let mut a = StreamAssembler::default();
        for c in &chunks {
            a.push(&SseData::Data(c.to_string()));
        }
        a.push(&SseData::Done);
        let back = a.finish().expect("complete");
        assert_eq!(back["choices"], stored["choices"]);
        assert_eq!(back["usage"], stored["usage"]);
        assert_eq!(back["id"], json!("chatcmpl-2"));
        assert!(storable(&back));
    }

    #[test]
    fn a_stream_without_its_end_is_not_an_answer() {
        let chunk = json!({"id": "c", "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": null}]});
        let mut a = StreamAssembler::default();
        a.push(&SseData::Data(chunk.to_string()));
        a.push(&SseData::Done);
        assert!(a.finish().is_none(), "no finish_reason");
        let end =
            json!({"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]});
        let mut a = StreamAssembler::default();
        a.push(&SseData::Data(chunk.to_string()));
        a.push(&SseData::Data(end.to_string()));
        assert!(a.finish().is_none(), "no [DONE]");
        let mut a = StreamAssembler::default();
        a.push(&SseData::Data(chunk.to_string()));
        a.push(&SseData::Data("{not json".into()));
        a.push(&SseData::Data(end.to_string()));
        a.push(&SseData::Done);
        assert!(a.finish().is_none(), "a broken chunk");
    }
}
