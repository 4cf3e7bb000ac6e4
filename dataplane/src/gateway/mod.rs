//! The gateway: OpenAI's chat-completions protocol in front of the cache. A request's scope
//! and prompt come from its body (`semantis_cache::chat::classify`); a hit is answered in the
//! protocol's shape (whole or streamed); a miss goes to the tenant's upstream, streamed through
//! as it arrives, and its answer is stored once complete. Identical misses in flight share one
//! upstream call ([`flights`]).
//!
//! The HTTP handlers (`http::gateway`) read headers and bodies and call [`Gateway::chat`];
//! this module holds the flow, [`upstream`] the calls out.

pub mod flights;
pub mod limits;
pub mod upstream;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use parking_lot::Mutex;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use semantis_cache::chat::{self, Bypass, ChatKey, SseData, SseDecoder, StreamAssembler};
use semantis_cache::scope::{exact_key, normalize_prompt};
use semantis_cache::tenants::Tenant;
use semantis_cache::{Cache, HitPath, LookupQuery, StoreCommand};
use semantis_contract::DataplaneConfig;

use self::flights::{Flights, Joined, Leader};
use self::limits::{Admission, Limits, Plan, RateState};
use self::upstream::{ClientCredentials, Upstream, UpstreamConfigError, UpstreamError};
use crate::http::ApiError;
use crate::http::codes::Code;
use crate::metrics::GatewayMetrics;

/// Distinct model names kept as metric labels; later ones count as `other`.
pub const MODEL_LABELS: usize = 64;

pub const CACHE_HEADER: &str = "x-semantis-cache";
pub const PATH_HEADER: &str = "x-semantis-cache-path";
pub const SIMILARITY_HEADER: &str = "x-semantis-similarity";
pub const ENTRY_HEADER: &str = "x-semantis-entry-id";
pub const BYPASS_REASON_HEADER: &str = "x-semantis-bypass-reason";

/// What a request asks of the cache, from its `X-Semantis-*` headers.
#[derive(Debug, Default, Clone)]
pub struct Controls {
    /// `X-Semantis-Cache-Bypass: true`: forward untouched, neither look up nor store.
    pub bypass: bool,
    /// `X-Semantis-No-Lookup: true`: call the upstream even if cached (and store its answer).
    pub no_lookup: bool,
    /// `X-Semantis-No-Store: true`: do not store this answer.
    pub no_store: bool,
    /// `X-Semantis-Cache-Only: true`: answer from the cache or fail with 504 `cache_miss`.
    pub cache_only: bool,
    /// `X-Semantis-TTL: <seconds>`: this entry's time to live.
    pub ttl_secs: Option<u64>,
    /// `X-Semantis-Min-Similarity: <0..1>`: raise the tenant's floor for this lookup.
    pub min_similarity: Option<f32>,
    /// `X-Semantis-Namespace: <name>`: a partition inside the tenant.
    pub namespace: Option<String>,
    /// `X-Semantis-User: <id>`: the end user limits hold apart (else the body's `user`).
    pub user: Option<String>,
}

impl Controls {
    pub fn from_headers(h: &HeaderMap) -> Result<Self, ApiError> {
        let text = |name: &str| -> Result<Option<&str>, ApiError> {
            h.get(name)
                .map(|v| {
                    v.to_str().map(str::trim).map_err(|_| {
                        ApiError::new(Code::InvalidRequest, format!("`{name}` must be ASCII"))
                    })
                })
                .transpose()
        };
        let flag = |name: &str| -> Result<bool, ApiError> {
            match text(name)? {
                None => Ok(false),
                Some(v) if v.eq_ignore_ascii_case("true") || v == "1" => Ok(true),
                Some(v) if v.eq_ignore_ascii_case("false") || v == "0" => Ok(false),
                Some(v) => Err(ApiError::new(
                    Code::InvalidRequest,
                    format!("`{name}` must be true or false, got `{v}`"),
                )),
            }
        };
        let ttl_secs = match text("x-semantis-ttl")? {
            None => None,
            Some(v) => Some(v.parse::<u64>().ok().filter(|t| *t >= 1).ok_or_else(|| {
                ApiError::new(
                    Code::InvalidTtl,
                    format!("`x-semantis-ttl` must be a whole number of seconds ≥ 1, got `{v}`"),
                )
            })?),
        };
        let min_similarity = match text("x-semantis-min-similarity")? {
            None => None,
            Some(v) => Some(
                v.parse::<f32>()
                    .ok()
                    .filter(|s| (-1.0..=1.0).contains(s))
                    .ok_or_else(|| {
                        ApiError::new(
                            Code::SimilarityOutOfRange,
                            format!("`x-semantis-min-similarity` must be within -1..1, got `{v}`"),
                        )
                    })?,
            ),
        };
        let namespace = text("x-semantis-namespace")?
            .filter(|n| !n.is_empty())
            .map(str::to_owned);
        let user = text("x-semantis-user")?
            .filter(|n| !n.is_empty())
            .map(str::to_owned);
        Ok(Self {
            bypass: flag("x-semantis-cache-bypass")?,
            no_lookup: flag("x-semantis-no-lookup")?,
            no_store: flag("x-semantis-no-store")?,
            cache_only: flag("x-semantis-cache-only")?,
            ttl_secs,
            min_similarity,
            namespace,
            user,
        })
    }
}

pub struct Gateway {
    upstreams: HashMap<String, Arc<Upstream>>,
    limits: Limits,
    flights: Flights,
    coalesce_wait: Duration,
    metrics: GatewayMetrics,
    models: Mutex<HashSet<String>>,
    /// `/v1/embeddings` answers by (tenant, upstream, model, dimensions, input): per tenant,
    /// so whether a text was embedded before says nothing about another tenant's inputs.
    embeddings: moka::sync::Cache<String, Arc<RawValue>>,
}

/// Where a request's answer came from, for the response headers and the metrics.
enum Answer {
    Hit {
        path: &'static str,
        similarity: Option<f32>,
        entry_id: Option<String>,
    },
    Coalesced,
}

impl Gateway {
    /// `redis`: the windows of rate limits and budgets, shared by replicas (cluster mode);
    /// without it they are the process's own.
    pub fn new(
        cfg: &DataplaneConfig,
        metrics: GatewayMetrics,
        redis: Option<redis::aio::ConnectionManager>,
    ) -> Result<Self, UpstreamConfigError> {
        let mut upstreams = HashMap::new();
        for (name, u) in &cfg.upstreams {
            upstreams.insert(name.clone(), Arc::new(Upstream::new(name, u)?));
        }
        Ok(Self {
            upstreams,
            limits: Limits::new(
                redis,
                metrics.ratelimit_fail_open.clone(),
                metrics.rate_limited.clone(),
            ),
            flights: Flights::default(),
            coalesce_wait: Duration::from_millis(cfg.cache.coalesce_wait_ms),
            metrics,
            models: Mutex::new(HashSet::new()),
            embeddings: moka::sync::Cache::builder()
                .max_capacity(cfg.embedder.cache_entries)
                .time_to_live(Duration::from_secs(cfg.embedder.cache_ttl_secs.max(1)))
                .build(),
        })
    }

    /// The tenant's upstream, or 400 `upstream_not_configured`.
    pub fn upstream_of(&self, tenant: &Tenant) -> Result<Arc<Upstream>, ApiError> {
        tenant
            .upstream
            .as_ref()
            .and_then(|u| self.upstreams.get(u))
            .cloned()
            .ok_or_else(|| {
                ApiError::new(
                    Code::UpstreamNotConfigured,
                    format!(
                        "tenant `{}` has no upstream: set `tenants[].upstream` to use the gateway",
                        tenant.name
                    ),
                )
            })
    }

    fn model_label(&self, model: &str) -> String {
        let mut seen = self.models.lock();
        if seen.contains(model) {
            return model.to_owned();
        }
        if seen.len() < MODEL_LABELS && model.len() <= 100 {
            seen.insert(model.to_owned());
            return model.to_owned();
        }
        "other".to_owned()
    }

    /// `POST /v1/chat/completions`.
    pub async fn chat(
        self: &Arc<Self>,
        cache: &Arc<Cache>,
        tenant: Arc<Tenant>,
        client: Option<ClientCredentials>,
        controls: Controls,
        request_id: String,
        body: Value,
    ) -> Result<Response, ApiError> {
        let upstream = self.upstream_of(&tenant)?;
        let call = chat::classify(
            &body,
            controls.namespace.as_deref(),
            tenant.max_cacheable_temperature,
        )?;
        let model = self.model_label(&call.model);
        let user = controls.user.clone().or_else(|| call.user.clone());
        let plan = Limits::plan(&tenant, user.as_deref(), now_ms());
        let ctx = CallCtx {
            gateway: self.clone(),
            cache: cache.clone(),
            tenant,
            upstream,
            client,
            model,
            request_model: call.model.clone(),
            request_id,
            stream: call.stream,
            include_usage: call.include_usage,
            plan,
        };
        // With `count_hits`, every request counts; otherwise only those that go upstream.
        let mut rate = None;
        if ctx.tenant.limits.count_hits {
            match self.admit(&ctx).await {
                Ok(r) => rate = r,
                Err(refused) => return Ok(refused),
            }
        }
        let key = match (controls.bypass, call.key) {
            (true, _) => Err(Bypass::Client),
            (false, k) => k,
        };
        let key = match key {
            Err(reason) => {
                if controls.cache_only {
                    return Err(ApiError::new(
                        Code::CacheMiss,
                        format!(
                            "the request cannot be cached ({}), and `x-semantis-cache-only` is set",
                            reason.as_str()
                        ),
                    ));
                }
                if !ctx.tenant.limits.count_hits {
                    match self.admit(&ctx).await {
                        Ok(r) => rate = r,
                        Err(refused) => return Ok(refused),
                    }
                }
                self.count(&ctx, "bypass");
                let mut r = ctx.forward(body, None).await?;
                set(&mut r, CACHE_HEADER, "BYPASS");
                set(&mut r, BYPASS_REASON_HEADER, reason.as_str());
                rate_headers(&mut r, rate.as_ref());
                return Ok(r);
            }
            Ok(k) => k,
        };
        // Coalesce only requests that may be answered from the cache.
        let leader = if controls.no_lookup {
            None
        } else {
            let flight = format!(
                "{}\u{0}{}",
                ctx.tenant.name,
                exact_key(&key.scope.fingerprint(), &normalize_prompt(&key.prompt))
            );
            match self.flights.join(flight) {
                Joined::Leader(l) => Some(l),
                Joined::Follower(f) => {
                    let waiting = self
                        .metrics
                        .coalesce_waiting
                        .with_label_values(&[&ctx.tenant.name]);
                    waiting.inc();
                    let answer = f.wait(self.coalesce_wait).await;
                    waiting.dec();
                    if let Some(completion) = answer {
                        self.metrics
                            .coalesced
                            .with_label_values(&[&ctx.tenant.name])
                            .inc();
                        self.count(&ctx, "coalesced");
                        let mut r = ctx.replay(&completion, &Answer::Coalesced);
                        rate_headers(&mut r, rate.as_ref());
                        return Ok(r);
                    }
                    None
                }
            }
        };
        if !controls.no_lookup {
            let outcome = ctx
                .cache
                .lookup(
                    &ctx.tenant,
                    LookupQuery {
                        prompt: Some(key.prompt.clone()),
                        vector: None,
                        scope: key.scope.clone(),
                        min_similarity: controls.min_similarity,
                        request_id: ctx.request_id.clone(),
                    },
                )
                .await?;
            if let Some(hit) = outcome.hit {
                let stored: Value =
                    serde_json::from_slice(&hit.entry.response).unwrap_or_else(|_| {
                        Value::String(String::from_utf8_lossy(&hit.entry.response).into_owned())
                    });
                if let Some(completion) = chat::as_completion(&stored, &call.model) {
                    // The leader (if any) ends here without an answer: its followers look up
                    // for themselves and find the same entry.
                    drop(leader);
                    self.count(&ctx, "hit");
                    let mut r = ctx.replay(
                        &completion,
                        &Answer::Hit {
                            path: match hit.path {
                                HitPath::Exact => "exact",
                                HitPath::Semantic => "semantic",
                            },
                            similarity: Some(hit.similarity),
                            entry_id: Some(hit.entry.id.clone()),
                        },
                    );
                    rate_headers(&mut r, rate.as_ref());
                    return Ok(r);
                }
            }
        }
        if controls.cache_only {
            self.count(&ctx, "miss");
            return Err(ApiError::new(
                Code::CacheMiss,
                "nothing cached answers this request, and `x-semantis-cache-only` is set",
            ));
        }
        if !ctx.tenant.limits.count_hits {
            match self.admit(&ctx).await {
                Ok(r) => rate = r,
                Err(refused) => return Ok(refused),
            }
        }
        self.count(&ctx, "miss");
        let store = Store {
            key,
            ttl_secs: controls.ttl_secs,
            enabled: !controls.no_store,
            leader,
        };
        let mut r = ctx.forward(body, Some(store)).await?;
        set(&mut r, CACHE_HEADER, "MISS");
        rate_headers(&mut r, rate.as_ref());
        Ok(r)
    }

    /// Hold a request to its limits: `Err` is the 429 to answer.
    async fn admit(&self, ctx: &CallCtx) -> Result<Option<RateState>, Response> {
        match self
            .limits
            .admit(&ctx.tenant.name, &ctx.plan, now_ms())
            .await
        {
            Admission::Allowed(state) => Ok(state),
            Admission::Refused { state, kind, who } => {
                self.count(ctx, "rate_limited");
                let what = match kind {
                    limits::Kind::Requests => "requests per minute",
                    limits::Kind::Tokens => "tokens per minute",
                    limits::Kind::Usd => "dollars per day",
                };
                let whose = if who == "user" {
                    "this user"
                } else {
                    "this tenant"
                };
                let mut r = ApiError::new(
                    Code::RateLimited,
                    format!(
                        "{whose} is over its {what} (limit {}); retry in {} s",
                        state.limit, state.reset_secs
                    ),
                )
                .into_response();
                set(&mut r, "retry-after", &state.reset_secs.to_string());
                rate_headers(&mut r, Some(&state));
                Err(r)
            }
        }
    }

    fn count(&self, ctx: &CallCtx, outcome: &str) {
        self.metrics
            .requests
            .with_label_values(&[&ctx.tenant.name, &ctx.model, outcome])
            .inc();
    }

    /// `GET /v1/models`, `POST /v1/embeddings`: forwarded as they are.
    pub async fn pass_through(
        &self,
        tenant: &Tenant,
        client: Option<ClientCredentials>,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Response, ApiError> {
        let upstream = self.upstream_of(tenant)?;
        let resp = upstream
            .send(method, path, body.as_ref(), client.as_ref())
            .await
            .map_err(upstream_error)?;
        let status = resp.status();
        upstream.settle(status);
        let headers = upstream::forwarded_headers(resp.headers());
        let content_type = resp.headers().get(reqwest::header::CONTENT_TYPE).cloned();
        let bytes = tokio::time::timeout(upstream.timeout, resp.bytes())
            .await
            .map_err(|_| timeout_error(&upstream))?
            .map_err(|e| {
                ApiError::new(
                    Code::UpstreamError,
                    format!("failed to read upstream `{}`'s answer: {e}", upstream.name),
                )
            })?;
        if status.is_server_error() {
            return Err(server_error(&upstream, status, &bytes));
        }
        Ok(as_answered(status, bytes, headers, content_type))
    }
}

impl Gateway {
    /// `POST /v1/embeddings` through a per-tenant embedding cache: answered locally when every
    /// input's vector is cached, else forwarded whole and its vectors cached. Inputs other than
    /// text (token arrays) and encodings other than `float` are forwarded untouched.
    pub async fn embeddings(
        &self,
        tenant: &Tenant,
        client: Option<ClientCredentials>,
        body: Value,
    ) -> Result<Response, ApiError> {
        let upstream = self.upstream_of(tenant)?;
        let inputs: Option<Vec<String>> = match body.get("input") {
            Some(Value::String(s)) => Some(vec![s.clone()]),
            Some(Value::Array(items)) if !items.is_empty() => items
                .iter()
                .map(|i| i.as_str().map(str::to_owned))
                .collect(),
            _ => None,
        };
        // The OpenAI SDKs ask for base64; the encoding is part of the key and the cached value
        // is whatever the upstream sent for it.
        let encoding = match body.get("encoding_format") {
            None | Some(Value::Null) => Some("float"),
            Some(Value::String(f)) if f == "float" || f == "base64" => Some(f.as_str()),
            Some(_) => None,
        };
        let model = body.get("model").and_then(Value::as_str).unwrap_or("");
        let (Some(inputs), Some(encoding), false) = (inputs, encoding, model.is_empty()) else {
            return self
                .pass_through(
                    tenant,
                    client,
                    reqwest::Method::POST,
                    "/embeddings",
                    Some(body),
                )
                .await;
        };
        let dims = body
            .get("dimensions")
            .map(Value::to_string)
            .unwrap_or_default();
        let key = |text: &str| {
            use sha2::Digest;
            let mut h = sha2::Sha256::new();
            for part in [&tenant.name, &upstream.name, model, &dims, encoding, text] {
                h.update(part.as_bytes());
                h.update([0u8]);
            }
            hex::encode(h.finalize())
        };
        let keys: Vec<String> = inputs.iter().map(|t| key(t)).collect();
        let cached: Vec<Option<Arc<RawValue>>> =
            keys.iter().map(|k| self.embeddings.get(k)).collect();
        if cached.iter().all(Option::is_some) {
            #[derive(serde::Serialize)]
            struct Item<'a> {
                object: &'static str,
                index: usize,
                embedding: &'a RawValue,
            }
            let data: Vec<Item> = cached
                .iter()
                .flatten()
                .enumerate()
                .map(|(index, v)| Item {
                    object: "embedding",
                    index,
                    embedding: v,
                })
                .collect();
            #[derive(serde::Serialize)]
            struct List<'a> {
                object: &'static str,
                data: Vec<Item<'a>>,
                model: &'a str,
                usage: Value,
            }
            // Serialised straight from the raw vectors (a `json!` would parse them again).
            let mut r = axum::Json(List {
                object: "list",
                data,
                model,
                usage: json!({"prompt_tokens": 0, "total_tokens": 0}),
            })
            .into_response();
            set(&mut r, CACHE_HEADER, "HIT");
            return Ok(r);
        }
        let r = self
            .pass_through(
                tenant,
                client,
                reqwest::Method::POST,
                "/embeddings",
                Some(body),
            )
            .await?;
        if !r.status().is_success() {
            return Ok(r);
        }
        let (mut parts, b) = r.into_parts();
        let bytes = axum::body::to_bytes(b, usize::MAX).await.map_err(|e| {
            ApiError::new(
                Code::UpstreamError,
                format!("failed to read the upstream's embeddings: {e}"),
            )
        })?;
        // Kept as the upstream's own text: re-encoding parsed floats could change their last digit.
        #[derive(serde::Deserialize)]
        struct Item {
            index: usize,
            embedding: Box<RawValue>,
        }
        #[derive(serde::Deserialize)]
        struct List {
            data: Vec<Item>,
        }
        if let Ok(list) = serde_json::from_slice::<List>(&bytes) {
            for item in list.data {
                if let Some(k) = keys.get(item.index) {
                    self.embeddings.insert(k.clone(), Arc::from(item.embedding));
                }
            }
        }
        parts.headers.insert(
            HeaderName::from_static(CACHE_HEADER),
            HeaderValue::from_static("MISS"),
        );
        Ok(Response::from_parts(parts, Body::from(bytes)))
    }
}

/// What to do with a miss's answer.
struct Store {
    key: ChatKey,
    ttl_secs: Option<u64>,
    /// False with `X-Semantis-No-Store`: followers still get the answer.
    enabled: bool,
    leader: Option<Leader>,
}

struct CallCtx {
    gateway: Arc<Gateway>,
    cache: Arc<Cache>,
    tenant: Arc<Tenant>,
    upstream: Arc<Upstream>,
    client: Option<ClientCredentials>,
    /// The model as a metric label (bounded).
    model: String,
    /// The model the request named (prices are looked up by it).
    request_model: String,
    request_id: String,
    stream: bool,
    include_usage: bool,
    /// The limit windows this request is held to.
    plan: Plan,
}

fn set(r: &mut Response, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        r.headers_mut().insert(HeaderName::from_static(name), v);
    }
}

fn upstream_error(e: UpstreamError) -> ApiError {
    let code = match &e {
        UpstreamError::CircuitOpen(_) | UpstreamError::Unreachable { .. } => {
            Code::UpstreamUnavailable
        }
        UpstreamError::Timeout { .. } => Code::UpstreamTimeout,
        UpstreamError::Request { .. } => Code::InvalidRequest,
    };
    tracing::warn!(error = %e, "upstream call failed");
    ApiError::new(code, e.to_string())
}

fn timeout_error(u: &Upstream) -> ApiError {
    u.breaker.failure();
    ApiError::new(
        Code::UpstreamTimeout,
        format!(
            "failed to call upstream `{}`: no complete answer within {} ms",
            u.name,
            u.timeout.as_millis()
        ),
    )
}

/// A 5xx from upstream as the gateway's own error, quoting the upstream's message.
fn server_error(u: &Upstream, status: reqwest::StatusCode, body: &[u8]) -> ApiError {
    let said = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned());
    ApiError::new(
        Code::UpstreamError,
        format!("upstream `{}` answered {}: {said}", u.name, status.as_u16()),
    )
}

/// The upstream's answer as it gave it: status, body, content type and the headers worth
/// passing on.
fn as_answered(
    status: reqwest::StatusCode,
    bytes: Bytes,
    headers: HeaderMap,
    content_type: Option<reqwest::header::HeaderValue>,
) -> Response {
    let mut r = Response::new(Body::from(bytes));
    *r.status_mut() = StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    r.headers_mut().extend(headers);
    if let Some(ct) = content_type.and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok()) {
        r.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    r
}

fn now_ms() -> i64 {
    semantis_cache::vector::now_ms()
}

/// `X-RateLimit-Limit`, `-Remaining` and `-Reset` (seconds until the window ends).
fn rate_headers(r: &mut Response, state: Option<&RateState>) {
    if let Some(s) = state {
        set(r, "x-ratelimit-limit", &format!("{}", s.limit));
        set(
            r,
            "x-ratelimit-remaining",
            &format!("{}", s.remaining.floor()),
        );
        set(r, "x-ratelimit-reset", &s.reset_secs.to_string());
    }
}

fn now_secs() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    )
    .unwrap_or(0)
}

impl CallCtx {
    fn error_kind(&self, kind: &str) {
        self.gateway
            .metrics
            .upstream_errors
            .with_label_values(&[&self.tenant.name, &self.model, kind])
            .inc();
    }

    /// Answer from a stored completion, whole or as a stream.
    fn replay(&self, completion: &Value, answer: &Answer) -> Response {
        let id = format!("chatcmpl-{}", uuid::Uuid::now_v7().simple());
        let created = now_secs();
        let mut r = if self.stream {
            let mut text = String::new();
            for c in chat::replay_chunks(completion, &id, created, self.include_usage) {
                text.push_str("data: ");
                text.push_str(&c.to_string());
                text.push_str("\n\n");
            }
            text.push_str("data: [DONE]\n\n");
            let mut r = Response::new(Body::from(text));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            );
            r
        } else {
            axum::Json(chat::replay_completion(completion, &id, created)).into_response()
        };
        set(&mut r, CACHE_HEADER, "HIT");
        match answer {
            Answer::Hit {
                path,
                similarity,
                entry_id,
            } => {
                set(&mut r, PATH_HEADER, path);
                if let Some(s) = similarity {
                    set(&mut r, SIMILARITY_HEADER, &format!("{s:.4}"));
                }
                if let Some(id) = entry_id {
                    set(&mut r, ENTRY_HEADER, id);
                }
            }
            Answer::Coalesced => set(&mut r, PATH_HEADER, "coalesced"),
        }
        set(&mut r, "x-request-id", &self.request_id);
        r
    }

    /// Call the upstream and answer with what it says. With `store`, a complete answer is
    /// handed to the flight's followers and stored.
    async fn forward(self, mut body: Value, store: Option<Store>) -> Result<Response, ApiError> {
        // A stream's usage comes only in a last chunk the client must ask for: ask for it
        // always (spend, budgets and the stored answer need it) and, when the client did not,
        // leave that chunk out of what it is sent.
        let strip_usage = self.stream && !self.include_usage;
        if strip_usage && let Value::Object(o) = &mut body {
            let options = o.entry("stream_options").or_insert_with(|| json!({}));
            if let Value::Object(opts) = options {
                opts.insert("include_usage".into(), Value::Bool(true));
            } else {
                *options = json!({"include_usage": true});
            }
        }
        let started = Instant::now();
        let sent = self
            .upstream
            .send(
                reqwest::Method::POST,
                "/chat/completions",
                Some(&body),
                self.client.as_ref(),
            )
            .await;
        let resp = match sent {
            Ok(r) => r,
            Err(e) => {
                self.error_kind(match &e {
                    UpstreamError::CircuitOpen(_) => "circuit_open",
                    UpstreamError::Timeout { .. } => "timeout",
                    _ => "unavailable",
                });
                return Err(upstream_error(e));
            }
        };
        self.gateway
            .metrics
            .upstream_duration
            .with_label_values(&[&self.tenant.name, &self.model])
            .observe(started.elapsed().as_secs_f64());
        let status = resp.status();
        let request_id = self.request_id.clone();
        let forwarded = upstream::forwarded_headers(resp.headers());
        let content_type = resp.headers().get(reqwest::header::CONTENT_TYPE).cloned();
        if !status.is_success() {
            self.upstream.settle(status);
            self.error_kind(if status.is_server_error() {
                "status_5xx"
            } else {
                "status_4xx"
            });
            let bytes = tokio::time::timeout(self.upstream.timeout, resp.bytes())
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            if status.is_server_error() {
                return Err(server_error(&self.upstream, status, &bytes));
            }
            // A 4xx is the request's fault: the client sees the upstream's own answer.
            return Ok(as_answered(status, bytes, forwarded, content_type));
        }
        let mut r = if self.stream {
            self.upstream.breaker.success();
            self.stream_through(resp, store, strip_usage)
        } else {
            let bytes = match tokio::time::timeout(self.upstream.timeout, resp.bytes()).await {
                Ok(Ok(b)) => b,
                Ok(Err(e)) => {
                    self.upstream.breaker.failure();
                    self.error_kind("stream_cut");
                    return Err(ApiError::new(
                        Code::UpstreamError,
                        format!(
                            "failed to read upstream `{}`'s answer: {e}",
                            self.upstream.name
                        ),
                    ));
                }
                Err(_) => {
                    self.error_kind("timeout");
                    return Err(timeout_error(&self.upstream));
                }
            };
            let completion: Value = match serde_json::from_slice(&bytes) {
                Ok(v) => v,
                Err(e) => {
                    self.upstream.breaker.failure();
                    self.error_kind("status_5xx");
                    return Err(ApiError::new(
                        Code::UpstreamError,
                        format!(
                            "upstream `{}` answered something that is not JSON: {e}",
                            self.upstream.name
                        ),
                    ));
                }
            };
            self.upstream.breaker.success();
            self.complete(completion, store);
            let mut r = Response::new(Body::from(bytes));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        };
        r.headers_mut().extend(forwarded);
        set(&mut r, "x-request-id", &request_id);
        Ok(r)
    }

    /// An answer that arrived whole: account for it, hand it to the followers, store it.
    fn complete(&self, completion: Value, store: Option<Store>) {
        let (prompt_tokens, completion_tokens) = chat::usage_of(&completion);
        let model = completion
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or(&self.model)
            .to_owned();
        let cost = self
            .upstream
            .cost(&self.request_model, prompt_tokens, completion_tokens);
        let m = &self.gateway.metrics;
        m.tokens
            .with_label_values(&[&self.tenant.name, &self.model, "prompt"])
            .inc_by(prompt_tokens);
        m.tokens
            .with_label_values(&[&self.tenant.name, &self.model, "completion"])
            .inc_by(completion_tokens);
        // Micro-dollars, rounded: the counter is an integer.
        m.usd_spent_micros
            .with_label_values(&[&self.tenant.name, &self.model])
            .inc_by((cost * 1e6).round().clamp(0.0, u64::MAX as f64) as u64);
        self.cache.record_upstream(
            &self.tenant,
            &self.request_model,
            semantis_cache::ports::UpstreamUsage {
                tokens: prompt_tokens.saturating_add(completion_tokens),
                usd: cost,
            },
        );
        if !self.plan.windows.is_empty() {
            let (gateway, tenant, plan) = (
                self.gateway.clone(),
                self.tenant.name.clone(),
                self.plan.clone(),
            );
            let tokens = prompt_tokens.saturating_add(completion_tokens);
            tokio::spawn(async move {
                gateway
                    .limits
                    .charge(&tenant, &plan, tokens, cost, now_ms())
                    .await;
            });
        }
        let Some(store) = store else {
            return;
        };
        if !chat::storable(&completion) {
            return;
        }
        let completion = Arc::new(completion);
        let landing = store.leader.map(|l| l.answer(completion.clone()));
        if !store.enabled {
            return;
        }
        let response = match serde_json::to_vec(&*completion) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "failed to encode a completion to store");
                return;
            }
        };
        let cache = self.cache.clone();
        let tenant = self.tenant.clone();
        let upstream = self.upstream.name.clone();
        let cmd = StoreCommand {
            prompt: store.key.prompt,
            vector: None,
            response,
            scope: store.key.scope,
            ttl_secs: store.ttl_secs,
            prompt_tokens,
            completion_tokens,
            cost_usd: cost,
            metadata: Some(json!({"source": "gateway", "upstream": upstream, "model": model})),
        };
        // Stored after the client has its answer; the flight stays joinable until then, so an
        // identical request meanwhile is answered from it.
        tokio::spawn(async move {
            let _landing = landing;
            if let Err(e) = cache.store(&tenant, cmd).await {
                tracing::warn!(tenant = %tenant.name, error = %e, "failed to store a gateway answer");
            }
        });
    }

    /// Forward an event stream chunk by chunk as it arrives, assembling the completion beside
    /// it; only a stream that ended normally (`[DONE]`, every choice finished) is stored.
    fn stream_through(
        self,
        resp: reqwest::Response,
        store: Option<Store>,
        strip_usage: bool,
    ) -> Response {
        struct Tee {
            /// Re-frame events and drop the usage-only chunk (the client did not ask for it);
            /// otherwise the upstream's bytes go through as they are.
            strip_usage: bool,
            inner: futures::stream::BoxStream<'static, reqwest::Result<Bytes>>,
            decoder: SseDecoder,
            assembler: StreamAssembler,
            events: Vec<SseData>,
            ctx: CallCtx,
            store: Option<Store>,
            ended: bool,
        }
        let tee = Tee {
            strip_usage,
            inner: resp.bytes_stream().boxed(),
            decoder: SseDecoder::default(),
            assembler: StreamAssembler::default(),
            events: Vec::new(),
            ctx: self,
            store,
            ended: false,
        };
        let body = futures::stream::unfold(tee, |mut t| async move {
            loop {
                if t.ended {
                    return None;
                }
                let idle = t.ctx.upstream.idle_timeout;
                match tokio::time::timeout(idle, t.inner.next()).await {
                    Ok(Some(Ok(bytes))) => {
                        t.decoder.push(&bytes, &mut t.events);
                        let mut framed = String::new();
                        for e in t.events.drain(..) {
                            t.assembler.push(&e);
                            if t.strip_usage {
                                match &e {
                                    SseData::Done => framed.push_str("data: [DONE]\n\n"),
                                    SseData::Data(d) if !chat::is_usage_chunk(d) => {
                                        framed.push_str("data: ");
                                        framed.push_str(d);
                                        framed.push_str("\n\n");
                                    }
                                    SseData::Data(_) => {}
                                }
                            }
                        }
                        let out = if t.strip_usage {
                            Bytes::from(framed)
                        } else {
                            bytes
                        };
                        if out.is_empty() {
                            continue;
                        }
                        return Some((Ok::<Bytes, std::io::Error>(out), t));
                    }
                    Ok(None) => {
                        t.ended = true;
                        let assembler = std::mem::take(&mut t.assembler);
                        match assembler.finish() {
                            Some(completion) => t.ctx.complete(completion, t.store.take()),
                            None => t.ctx.error_kind("stream_cut"),
                        }
                        return None;
                    }
                    Ok(Some(Err(e))) => {
                        t.ended = true;
                        t.ctx.upstream.breaker.failure();
                        t.ctx.error_kind("stream_cut");
                        let e = std::io::Error::other(format!("upstream stream broke: {e}"));
                        return Some((Err(e), t));
                    }
                    Err(_) => {
                        t.ended = true;
                        t.ctx.error_kind("timeout");
                        let e = std::io::Error::other("upstream stream went idle");
                        return Some((Err(e), t));
                    }
                }
            }
        });
        let mut r = Response::new(Body::from_stream(body));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        r.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        r
    }
}
