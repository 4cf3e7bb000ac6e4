//! The gateway's routes, OpenAI's paths: `POST /v1/chat/completions`, `GET /v1/models`,
//! `POST /v1/embeddings`. Thin: who is calling, what the headers ask, then `gateway::Gateway`.
//!
//! Who is calling: the Semantis key in `Authorization: Bearer` (or Azure's `api-key` header),
//! so an OpenAI SDK only changes its base URL and key. A tenant that passes its clients' own
//! upstream keys (`upstream_key = "client"`) is named by the Semantis key in `X-Semantis-Key`
//! instead, and the client's `Authorization` / `api-key` go upstream as they came.

use std::sync::Arc;

use axum::extract::{Extension, State};
use axum::http::{HeaderMap, header};
use axum::response::Response;
use serde_json::Value;

use semantis_cache::tenants::Tenant;
use semantis_contract::UpstreamKey;

use super::admission::Caller;
use super::codes::Code;
use super::{ApiError, ApiJson, AppState, TENANT_HEADER, request_id};
use crate::gateway::Controls;
use crate::gateway::upstream::ClientCredentials;

pub const KEY_HEADER: &str = "x-semantis-key";

fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

/// The tenant, and the client's credentials when they go upstream.
pub(super) fn caller(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<(Arc<Tenant>, Option<ClientCredentials>), ApiError> {
    let tenant_header = header_text(headers, TENANT_HEADER);
    if let Some(key) = header_text(headers, KEY_HEADER) {
        let tenant = state.cache.authenticate(Some(key), tenant_header)?;
        let creds = (tenant.upstream_key == UpstreamKey::Client).then(|| {
            ClientCredentials(
                [header::AUTHORIZATION.as_str(), "api-key"]
                    .iter()
                    .filter_map(|n| {
                        headers
                            .get(*n)
                            .map(|v| (axum::http::HeaderName::from_static(n), v.clone()))
                    })
                    .collect(),
            )
        });
        return Ok((tenant, creds));
    }
    let bearer = header_text(headers, header::AUTHORIZATION.as_str())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .or_else(|| header_text(headers, "api-key"))
        .filter(|k| !k.is_empty());
    let tenant = state.cache.authenticate(bearer, tenant_header)?;
    if tenant.upstream_key == UpstreamKey::Client {
        return Err(ApiError::new(
            Code::MissingApiKey,
            format!(
                "tenant `{}` forwards its clients' own upstream keys: send your Semantis key in `X-Semantis-Key`",
                tenant.name
            ),
        ));
    }
    Ok((tenant, None))
}

/// OpenAI's chat completions, through the cache.
pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    Extension(Caller { tenant, client }): Extension<Caller>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    let controls = Controls::from_headers(&headers)?;
    state
        .gateway
        .chat(
            &state.cache,
            tenant,
            client,
            controls,
            request_id(&headers),
            body,
        )
        .await
}

/// The upstream's model list, as it answers it.
pub async fn models(
    State(state): State<Arc<AppState>>,
    Extension(Caller { tenant, client }): Extension<Caller>,
) -> Result<Response, ApiError> {
    state
        .gateway
        .pass_through(&tenant, client, reqwest::Method::GET, "/models", None)
        .await
}

/// The upstream's embeddings.
pub async fn embeddings(
    State(state): State<Arc<AppState>>,
    Extension(Caller { tenant, client }): Extension<Caller>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    state.gateway.embeddings(&tenant, client, body).await
}
