//! The versioned JSON HTTP API. Handlers only extract, call the cache domain and map the
//! result; [`ApiError`] is the one place that turns domain errors into HTTP statuses.

pub mod admission;
pub mod codes;
mod error;
pub mod gateway;
pub mod listen;
mod wire;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Extension, FromRequest, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::{RequestBodyTimeoutLayer, TimeoutLayer};
use utoipa::{OpenApi, ToSchema};

use self::admission::Caller;
pub use self::error::{ApiError, ErrorBody};
use semantis_cache::entry::EntryFilter;
use semantis_cache::scope::Scope;
use semantis_cache::tenants::Tenant;
use semantis_cache::{
    Cache, CacheError, FeedbackCommand, FeedbackScope, LookupOutcome, LookupQuery, StoreCommand,
};

pub use self::wire::{
    DayUsageBody, FeedbackCountsBody, HitPathBody, ModelUsageBody, ScopeBody, StatsBody,
};
use crate::metrics::Metrics;
use crate::store::Probe;

pub const CACHE_HEADER: &str = "x-semantis-cache";
pub const TENANT_HEADER: &str = "x-semantis-tenant";

pub struct AppState {
    pub cache: Arc<Cache>,
    /// The process's registry, rendered at `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Dependencies `/readyz` reports on (metadata database, Redis).
    pub probes: Vec<Arc<dyn Probe>>,
    /// False while starting and once shutdown begins, so load balancers stop routing here.
    pub accepting: AtomicBool,
    /// The OpenAI-compatible gateway (`/v1/chat/completions`, `/v1/models`, `/v1/embeddings`).
    pub gateway: Arc<crate::gateway::Gateway>,
    /// Each tenant's requests in flight (`max_concurrent_requests`).
    pub admission: admission::Admission,
}

/// JSON body extractor whose rejections use the API's error format.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        Json::<T>::from_request(req, state)
            .await
            .map(|Json(v)| Self(v))
            .map_err(ApiError::from)
    }
}

fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Arc<Tenant>, ApiError> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|k| !k.is_empty());
    let tenant = headers.get(TENANT_HEADER).and_then(|v| v.to_str().ok());
    Ok(state.cache.authenticate(bearer, tenant)?)
}

pub(crate) fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= 128)
        .map_or_else(|| uuid::Uuid::now_v7().to_string(), str::to_owned)
}

/// A lookup: "was a prompt like this answered before?"
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LookupRequest {
    /// The prompt text. Needed for the exact path and, without `vector`, for the semantic one.
    pub prompt: Option<String>,
    /// A precomputed embedding of the prompt, of the index's dimension.
    pub vector: Option<Vec<f32>>,
    #[serde(default)]
    pub scope: ScopeBody,
    /// Raise (never lower) the tenant's cosine-similarity floor for this lookup.
    pub min_similarity: Option<f32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LookupResponse {
    pub hit: bool,
    /// Which path answered: `exact` or `semantic`; absent on a miss.
    pub path: Option<HitPathBody>,
    /// Cosine similarity of the returned entry (1 on the exact path).
    pub similarity: Option<f32>,
    /// Similarity of the best semantic candidate, hit or not.
    pub best_similarity: Option<f32>,
    /// The similarity a semantic candidate needed.
    pub threshold: f32,
    pub entry_id: Option<String>,
    /// The cached response, as it was stored.
    #[schema(value_type = Option<Object>)]
    pub response: Option<Value>,
    /// The prompt the cached response answered.
    pub cached_prompt: Option<String>,
    /// Set when a component failed and the answer came from what was reachable
    /// (`embedder_unavailable`, `prompt_not_embeddable`, `store_unavailable`, `verifier_unavailable`,
    /// `verifier_over_budget`).
    pub degraded: Option<String>,
    /// This lookup's id (the `X-Request-Id` header if sent, else generated): name it in
    /// `POST /v1/feedback` to report whether the hit was right.
    pub request_id: String,
    /// What the tenant's verifier said, when it was asked (or would have been).
    pub verifier: Option<VerifierBody>,
}

/// The verifier stage of one lookup.
#[derive(Debug, Serialize, ToSchema)]
pub struct VerifierBody {
    pub name: String,
    /// `accepted`, `rejected`, `unavailable`, `over_budget`, or `no_prompt` (a lookup by vector
    /// alone has nothing to verify: a miss).
    pub outcome: String,
    /// The best score a candidate got (0..1).
    pub score: Option<f32>,
    /// The score a candidate needed.
    pub min_score: f32,
    /// Time the lookup waited for the verifier, in milliseconds.
    pub elapsed_ms: f64,
}

/// Whether a served hit was right. Name the hit by the lookup's `request_id`, or by
/// `entry_id` (then `prompt` says which query it was wrong for; without one the entry is not
/// served again for any query).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FeedbackRequest {
    pub request_id: Option<String>,
    pub entry_id: Option<String>,
    /// Was the served answer right for the query?
    pub correct: bool,
    pub prompt: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FeedbackResponse {
    pub entry_id: String,
    /// `query`: the verdict is about this query and its close paraphrases; `entry`: about
    /// the entry for any query (the query was not known).
    pub applies_to: String,
    /// The verifier score the tenant's candidates need now.
    pub verifier_min_score: Option<f32>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StoreRequest {
    pub prompt: String,
    pub vector: Option<Vec<f32>>,
    /// The LLM's response, any JSON value (usually the OpenAI-shaped completion).
    #[schema(value_type = Object)]
    pub response: Value,
    #[serde(default)]
    pub scope: ScopeBody,
    /// Time to live; the tenant's default when absent. A hit never extends it.
    pub ttl_seconds: Option<u64>,
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    /// What the LLM call cost, in US dollars.
    #[serde(default)]
    pub cost_usd: f64,
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Value>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct StoreResponse {
    pub id: String,
    /// Milliseconds since the Unix epoch.
    pub expires_at_ms: i64,
    /// Entries evicted to make room.
    pub evicted: usize,
    /// True when the embedder was down: the entry answers exact lookups at once and semantic
    /// ones after a background pass embeds it.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub embedding_pending: bool,
}

/// Exactly one of `scope`, `namespace` or `all: true`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InvalidateRequest {
    pub scope: Option<ScopeBody>,
    pub namespace: Option<String>,
    #[serde(default)]
    pub all: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InvalidateResponse {
    pub deleted: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ReadyResponse {
    /// True while every critical component is up: the replica can answer lookups.
    pub ready: bool,
    /// Names of non-critical components that are down; lookups still answer without them.
    pub degraded: Vec<String>,
    /// Each component and whether it is reachable.
    pub checks: Vec<Check>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    /// A critical component being down makes the replica unready (503).
    pub critical: bool,
    pub detail: Option<String>,
}

fn cache_header(hit: bool) -> [(&'static str, HeaderValue); 1] {
    [(
        CACHE_HEADER,
        HeaderValue::from_static(if hit { "HIT" } else { "MISS" }),
    )]
}

/// Look up a cached answer by prompt text or vector.
#[utoipa::path(post, path = "/v1/lookup", request_body = LookupRequest,
    responses((status = 200, body = LookupResponse), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
async fn lookup(
    State(state): State<Arc<AppState>>,
    Extension(Caller { tenant, .. }): Extension<Caller>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<LookupRequest>,
) -> Result<Response, ApiError> {
    let request_id = request_id(&headers);
    let outcome = state
        .cache
        .lookup(
            &tenant,
            LookupQuery {
                prompt: req.prompt,
                vector: req.vector,
                scope: req.scope.into(),
                min_similarity: req.min_similarity,
                request_id: request_id.clone(),
            },
        )
        .await?;
    let hit = outcome.hit.is_some();
    let body = lookup_body(outcome, request_id.clone());
    let mut response = (cache_header(hit), Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-request-id", v);
    }
    Ok(response)
}

fn lookup_body(outcome: LookupOutcome, request_id: String) -> LookupResponse {
    let verifier = outcome.verification.map(|v| VerifierBody {
        name: v.verifier,
        outcome: v.outcome.as_str().to_owned(),
        score: v.best_score,
        min_score: v.min_score,
        elapsed_ms: v.elapsed.as_secs_f64() * 1000.0,
    });
    match outcome.hit {
        Some(h) => LookupResponse {
            hit: true,
            path: Some(h.path.into()),
            similarity: Some(h.similarity),
            best_similarity: outcome.best_similarity.or(Some(h.similarity)),
            threshold: outcome.threshold,
            entry_id: Some(h.entry.id.clone()),
            response: Some(
                serde_json::from_slice(&h.entry.response).unwrap_or_else(|_| {
                    Value::String(String::from_utf8_lossy(&h.entry.response).into_owned())
                }),
            ),
            cached_prompt: Some(h.entry.prompt.clone()),
            degraded: outcome.degraded.map(str::to_owned),
            request_id,
            verifier,
        },
        None => LookupResponse {
            hit: false,
            path: None,
            similarity: None,
            best_similarity: outcome.best_similarity,
            threshold: outcome.threshold,
            entry_id: None,
            response: None,
            cached_prompt: None,
            degraded: outcome.degraded.map(str::to_owned),
            request_id,
            verifier,
        },
    }
}

/// Report whether a served hit was right.
#[utoipa::path(post, path = "/v1/feedback", request_body = FeedbackRequest,
    responses((status = 200, body = FeedbackResponse), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
async fn feedback(
    State(state): State<Arc<AppState>>,
    Extension(Caller { tenant, .. }): Extension<Caller>,
    ApiJson(req): ApiJson<FeedbackRequest>,
) -> Result<Json<FeedbackResponse>, ApiError> {
    let recorded = state
        .cache
        .feedback(
            &tenant,
            FeedbackCommand {
                request_id: req.request_id,
                entry_id: req.entry_id,
                correct: req.correct,
                prompt: req.prompt,
            },
        )
        .await?;
    Ok(Json(FeedbackResponse {
        entry_id: recorded.entry_id,
        applies_to: match recorded.applies_to {
            FeedbackScope::Query => "query",
            FeedbackScope::Entry => "entry",
        }
        .to_owned(),
        verifier_min_score: recorded.verifier_min_score,
    }))
}

/// Store an LLM answer.
#[utoipa::path(post, path = "/v1/entries", request_body = StoreRequest,
    responses((status = 201, body = StoreResponse), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
async fn store(
    State(state): State<Arc<AppState>>,
    Extension(Caller { tenant, .. }): Extension<Caller>,
    ApiJson(req): ApiJson<StoreRequest>,
) -> Result<Response, ApiError> {
    let response = serde_json::to_vec(&req.response)
        .map_err(|e| CacheError::InvalidRequest(format!("failed to encode the response: {e}")))?;
    let stored = state
        .cache
        .store(
            &tenant,
            StoreCommand {
                prompt: req.prompt,
                vector: req.vector,
                response,
                scope: req.scope.into(),
                ttl_secs: req.ttl_seconds,
                prompt_tokens: req.prompt_tokens,
                completion_tokens: req.completion_tokens,
                cost_usd: req.cost_usd,
                metadata: req.metadata,
            },
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(StoreResponse {
            id: stored.id,
            expires_at_ms: stored.expires_at_ms,
            evicted: stored.evicted,
            embedding_pending: stored.embedding_pending,
        }),
    )
        .into_response())
}

/// Delete one entry.
#[utoipa::path(delete, path = "/v1/entries/{id}",
    params(("id" = String, Path, description = "Entry id")),
    responses((status = 204), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
async fn delete_entry(
    State(state): State<Arc<AppState>>,
    Extension(Caller { tenant, .. }): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.cache.delete(&tenant, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Invalidate a tenant's entries by scope, by namespace, or all of them.
#[utoipa::path(post, path = "/v1/invalidate", request_body = InvalidateRequest,
    responses((status = 200, body = InvalidateResponse), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
async fn invalidate(
    State(state): State<Arc<AppState>>,
    Extension(Caller { tenant, .. }): Extension<Caller>,
    ApiJson(req): ApiJson<InvalidateRequest>,
) -> Result<Json<InvalidateResponse>, ApiError> {
    let filter = match (req.scope, req.namespace, req.all) {
        (Some(scope), None, false) => EntryFilter::Scope(Scope::from(scope).fingerprint().0),
        (None, Some(ns), false) => EntryFilter::Namespace(ns),
        (None, None, true) => EntryFilter::All,
        _ => {
            return Err(CacheError::InvalidRequest(
                "give exactly one of `scope`, `namespace` or `all: true`".into(),
            )
            .into());
        }
    };
    let deleted = state.cache.invalidate(&tenant, filter).await?;
    Ok(Json(InvalidateResponse { deleted }))
}

/// The calling tenant's entries, usage and savings.
#[utoipa::path(get, path = "/v1/stats",
    responses((status = 200, body = StatsBody), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
async fn stats(
    State(state): State<Arc<AppState>>,
    Extension(Caller { tenant, .. }): Extension<Caller>,
) -> Result<Json<StatsBody>, ApiError> {
    Ok(Json(state.cache.stats(&tenant).await?.into()))
}

async fn healthz() -> &'static str {
    "ok"
}

/// Ready (200) while the replica can answer lookups. Components off the hit path (the
/// metadata database) are reported as `degraded` without failing readiness: taking every
/// replica out of the Service because Postgres is down would turn an accounting outage into
/// a cache outage.
#[utoipa::path(get, path = "/readyz", responses((status = 200, body = ReadyResponse), (status = 503, body = ReadyResponse)))]
async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    readiness(&state, false).await
}

/// The metrics port's `/readyz`: the same answer with each check's detail (dependency errors,
/// the index version), which the API port keeps to itself.
async fn readyz_detailed(State(state): State<Arc<AppState>>) -> Response {
    readiness(&state, true).await
}

async fn readiness(state: &AppState, detailed: bool) -> Response {
    let mut checks = vec![Check {
        name: "server".into(),
        ok: state.accepting.load(Ordering::Relaxed),
        critical: true,
        detail: None,
    }];
    let probed = futures::future::join_all(state.probes.iter().map(|p| async move {
        let outcome = tokio::time::timeout(Duration::from_secs(2), p.check()).await;
        Check {
            name: p.name().into(),
            ok: matches!(outcome, Ok(Ok(()))),
            critical: false,
            detail: match outcome {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e),
                Err(_) => Some("failed to answer within 2 s".into()),
            },
        }
    }))
    .await;
    checks.extend(probed);
    checks.push(Check {
        name: "index".into(),
        ok: true,
        critical: true,
        detail: Some(format!(
            "version {} ({} dimensions)",
            state.cache.index_version(),
            state.cache.dimension()
        )),
    });
    let embedder_ok = state.cache.embedder_healthy();
    checks.push(Check {
        name: "embedder".into(),
        ok: embedder_ok,
        critical: false,
        detail: Some(if !state.cache.has_embedder() {
            "none configured: clients supply vectors".into()
        } else if embedder_ok {
            "available".into()
        } else {
            "circuit open: lookups fall back to the exact path".into()
        }),
    });
    let ready = checks.iter().filter(|c| c.critical).all(|c| c.ok);
    let degraded = checks
        .iter()
        .filter(|c| !c.ok && !c.critical)
        .map(|c| c.name.clone())
        .collect();
    if !detailed {
        for c in &mut checks {
            c.detail = None;
        }
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(ReadyResponse {
            ready,
            degraded,
            checks,
        }),
    )
        .into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        state.metrics.render(),
    )
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Semantis dataplane", description = "Semantic cache for LLM applications."),
    paths(lookup, store, delete_entry, invalidate, feedback, stats, readyz),
    components(schemas(ErrorBody, ScopeBody, StatsBody, ModelUsageBody, DayUsageBody, FeedbackCountsBody, VerifierBody)),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        if let Some(components) = openapi.components.as_mut() {
            components.add_security_scheme(
                "bearer",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
        }
    }
}

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

async fn not_found() -> ApiError {
    ApiError::not_found()
}

/// The metrics port: Prometheus's scrape, and readiness with its details.
pub fn metrics_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/readyz", get(readyz_detailed))
        .route("/healthz", get(healthz))
        .fallback(not_found)
        .with_state(state)
}

/// Once shutdown has begun (`accepting` is false) every answer says `Connection: close`, so
/// each client's kept-alive connection ends with its next answer and its next request opens a
/// new one, which the Service routes to a pod that is not going away. Without it, an idle
/// connection closed at the end of the drain races a request sent on it.
async fn close_while_draining(
    State(state): State<Arc<AppState>>,
    mut response: axum::response::Response,
) -> axum::response::Response {
    if !state.accepting.load(Ordering::Relaxed) {
        response.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    response
}

pub fn router(state: Arc<AppState>, max_body_bytes: usize, timeout: Duration) -> Router {
    let api = Router::new()
        .route("/v1/lookup", post(lookup))
        .route("/v1/entries", post(store))
        .route("/v1/entries/{id}", delete(delete_entry))
        .route("/v1/invalidate", post(invalidate))
        .route("/v1/feedback", post(feedback))
        .route("/v1/stats", get(stats))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            admission::admit_api,
        ))
        .layer(DefaultBodyLimit::disable())
        .layer(RequestBodyLimitLayer::new(max_body_bytes))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::GATEWAY_TIMEOUT,
            timeout,
        ));
    // The gateway's routes wait on the upstream, under each upstream's own deadlines (a
    // completion may take minutes), not the API's request timeout.
    let gateway = Router::new()
        .route("/v1/chat/completions", post(gateway::chat_completions))
        .route("/v1/models", get(gateway::models))
        .route("/v1/embeddings", post(gateway::embeddings))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            admission::admit_gateway,
        ))
        .layer(DefaultBodyLimit::disable())
        .layer(RequestBodyLimitLayer::new(max_body_bytes))
        .layer(RequestBodyTimeoutLayer::new(timeout));
    Router::new()
        .merge(api)
        .merge(gateway)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(openapi))
        .fallback(not_found)
        .layer(axum::middleware::map_response_with_state(
            state.clone(),
            close_while_draining,
        ))
        .layer(axum::middleware::map_response(error::rewrite_plain_errors))
        .layer(CatchPanicLayer::custom(error::panic_response))
        .layer(axum::middleware::from_fn(admission::close_when_body_unread))
        .with_state(state)
}
