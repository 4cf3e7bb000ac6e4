//! The one error-code table, after Meilisearch's: every code the API answers with, its HTTP
//! status and what it means. Handlers reach it through [`code_of`] (domain errors), the
//! middleware through [`Code`] directly, the OpenAPI document lists it as the `code` enum of
//! `ErrorDetail`, and a test holds ARCHITECTURE.md's table to it.

use axum::http::StatusCode;
use semantis_cache::CacheError;

/// A stable, machine-readable error code. Clients match on [`Code::name`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    MissingApiKey,
    InvalidApiKey,
    TenantForbidden,
    UnknownTenant,
    EntryNotFound,
    RequestNotFound,
    NotFound,
    TenantRequired,
    MissingQuery,
    FeedbackTargetRequired,
    InvalidRequest,
    MalformedJson,
    MethodNotAllowed,
    PayloadTooLarge,
    UnsupportedMediaType,
    EmptyPrompt,
    DimensionMismatch,
    NonFiniteVector,
    ZeroVector,
    SimilarityOutOfRange,
    InvalidTtl,
    ValueOutOfRange,
    Internal,
    PromptNotEmbeddable,
    EmbedderUnavailable,
    StoreUnavailable,
    Timeout,
    UpstreamNotConfigured,
    CacheMiss,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
    RateLimited,
    TooManyConcurrentRequests,
    TooManyConnections,
}

/// One row of the table.
pub struct CodeInfo {
    pub code: Code,
    pub name: &'static str,
    pub status: StatusCode,
    pub meaning: &'static str,
}

const fn row(
    code: Code,
    name: &'static str,
    status: StatusCode,
    meaning: &'static str,
) -> CodeInfo {
    CodeInfo {
        code,
        name,
        status,
        meaning,
    }
}

/// Every code, in the order of [`Code`]'s variants (a test checks it).
#[rustfmt::skip]
pub static TABLE: &[CodeInfo] = &[
    row(Code::MissingApiKey, "missing_api_key", StatusCode::UNAUTHORIZED,
        "no `Authorization: Bearer <key>` header"),
    row(Code::InvalidApiKey, "invalid_api_key", StatusCode::UNAUTHORIZED,
        "the key matches no tenant and no admin key"),
    row(Code::TenantForbidden, "tenant_forbidden", StatusCode::FORBIDDEN,
        "a tenant key named another tenant in `X-Semantis-Tenant`"),
    row(Code::UnknownTenant, "unknown_tenant", StatusCode::NOT_FOUND,
        "an admin key named a tenant that is not configured"),
    row(Code::EntryNotFound, "entry_not_found", StatusCode::NOT_FOUND,
        "no live entry of the tenant has that id"),
    row(Code::RequestNotFound, "request_not_found", StatusCode::NOT_FOUND,
        "feedback names a request no hit of the tenant was served for"),
    row(Code::NotFound, "not_found", StatusCode::NOT_FOUND, "no such route"),
    row(Code::TenantRequired, "tenant_required", StatusCode::BAD_REQUEST,
        "an admin key must name the tenant in `X-Semantis-Tenant`"),
    row(Code::MissingQuery, "missing_query", StatusCode::BAD_REQUEST,
        "a lookup has neither `prompt` nor `vector`"),
    row(Code::FeedbackTargetRequired, "feedback_target_required", StatusCode::BAD_REQUEST,
        "feedback names neither a `request_id` nor an `entry_id`"),
    row(Code::InvalidRequest, "invalid_request", StatusCode::BAD_REQUEST,
        "the body does not have the route's shape (unknown field, wrong type, conflicting fields)"),
    row(Code::MalformedJson, "malformed_json", StatusCode::BAD_REQUEST,
        "the body is not JSON (NaN included)"),
    row(Code::MethodNotAllowed, "method_not_allowed", StatusCode::METHOD_NOT_ALLOWED,
        "the route does not take that method"),
    row(Code::PayloadTooLarge, "payload_too_large", StatusCode::PAYLOAD_TOO_LARGE,
        "the body is larger than `server.max_body_bytes`"),
    row(Code::UnsupportedMediaType, "unsupported_media_type", StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "the body is not sent as `application/json`"),
    row(Code::EmptyPrompt, "empty_prompt", StatusCode::UNPROCESSABLE_ENTITY,
        "the prompt is empty or only white space"),
    row(Code::DimensionMismatch, "dimension_mismatch", StatusCode::UNPROCESSABLE_ENTITY,
        "the vector's length is not the index's dimension"),
    row(Code::NonFiniteVector, "non_finite_vector", StatusCode::UNPROCESSABLE_ENTITY,
        "the vector holds an infinite value (or one beyond f32's range)"),
    row(Code::ZeroVector, "zero_vector", StatusCode::UNPROCESSABLE_ENTITY,
        "the vector is all zeros"),
    row(Code::SimilarityOutOfRange, "similarity_out_of_range", StatusCode::UNPROCESSABLE_ENTITY,
        "`min_similarity` is outside -1..1"),
    row(Code::InvalidTtl, "invalid_ttl", StatusCode::UNPROCESSABLE_ENTITY,
        "`ttl_seconds` is 0"),
    row(Code::ValueOutOfRange, "value_out_of_range", StatusCode::UNPROCESSABLE_ENTITY,
        "a number is outside what the field allows (token counts above 1,000,000,000)"),
    row(Code::Internal, "internal", StatusCode::INTERNAL_SERVER_ERROR,
        "a handler panicked (a bug; the process keeps serving)"),
    row(Code::PromptNotEmbeddable, "prompt_not_embeddable", StatusCode::UNPROCESSABLE_ENTITY,
        "the embedding provider refused the prompt (too long, say): a store needs a `vector` then"),
    row(Code::EmbedderUnavailable, "embedder_unavailable", StatusCode::SERVICE_UNAVAILABLE,
        "the embedder is down and the request had no vector (a store is deferred instead when it can be)"),
    row(Code::StoreUnavailable, "store_unavailable", StatusCode::SERVICE_UNAVAILABLE,
        "the write could not be made durable, or the metadata store is down for `/v1/stats`"),
    row(Code::Timeout, "timeout", StatusCode::GATEWAY_TIMEOUT,
        "the request did not finish within `server.request_timeout_ms`"),
    row(Code::UpstreamNotConfigured, "upstream_not_configured", StatusCode::BAD_REQUEST,
        "a gateway route was called for a tenant with no `upstream`"),
    row(Code::CacheMiss, "cache_miss", StatusCode::GATEWAY_TIMEOUT,
        "`X-Semantis-Cache-Only: true` and nothing cached answers the request"),
    row(Code::UpstreamError, "upstream_error", StatusCode::BAD_GATEWAY,
        "the upstream answered 5xx, or something that is not the protocol's answer"),
    row(Code::UpstreamTimeout, "upstream_timeout", StatusCode::GATEWAY_TIMEOUT,
        "the upstream did not answer within its `timeout_ms`"),
    row(Code::UpstreamUnavailable, "upstream_unavailable", StatusCode::SERVICE_UNAVAILABLE,
        "the upstream refused the connection, or its circuit breaker is open"),
    row(Code::RateLimited, "rate_limited", StatusCode::TOO_MANY_REQUESTS,
        "a gateway request is over a tenant's or user's limit; `Retry-After` says when to retry"),
    row(Code::TooManyConcurrentRequests, "too_many_concurrent_requests", StatusCode::TOO_MANY_REQUESTS,
        "the tenant already has `max_concurrent_requests` requests in flight on this replica; refused before the body is read"),
    row(Code::TooManyConnections, "too_many_connections", StatusCode::TOO_MANY_REQUESTS,
        "the client's address already holds `server.max_connections_per_ip` connections to this replica; answered without reading the request, then closed"),
];

impl Code {
    pub fn info(self) -> &'static CodeInfo {
        &TABLE[self as usize]
    }

    pub fn name(self) -> &'static str {
        self.info().name
    }

    pub fn status(self) -> StatusCode {
        self.info().status
    }

    /// OpenAI's error `type` for this code's status, so the OpenAI SDKs raise the matching
    /// exception class.
    pub fn openai_type(self) -> &'static str {
        match self.status().as_u16() {
            400 | 405 | 413 | 415 | 422 => "invalid_request_error",
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            _ => "api_error",
        }
    }
}

/// The code a domain error answers with.
pub fn code_of(e: &CacheError) -> Code {
    match e {
        CacheError::MissingKey => Code::MissingApiKey,
        CacheError::InvalidKey => Code::InvalidApiKey,
        CacheError::TenantRequired => Code::TenantRequired,
        CacheError::UnknownTenant(_) => Code::UnknownTenant,
        CacheError::TenantForbidden(_) => Code::TenantForbidden,
        CacheError::NoQuery => Code::MissingQuery,
        CacheError::EmptyPrompt => Code::EmptyPrompt,
        CacheError::DimensionMismatch { .. } => Code::DimensionMismatch,
        CacheError::NonFiniteVector(_) => Code::NonFiniteVector,
        CacheError::ZeroVector => Code::ZeroVector,
        CacheError::SimilarityOutOfRange(_) => Code::SimilarityOutOfRange,
        CacheError::InvalidTtl => Code::InvalidTtl,
        CacheError::ValueOutOfRange { .. } => Code::ValueOutOfRange,
        CacheError::InvalidRequest(_) => Code::InvalidRequest,
        CacheError::EntryNotFound(_) => Code::EntryNotFound,
        CacheError::RequestNotFound(_) => Code::RequestNotFound,
        CacheError::FeedbackTargetRequired => Code::FeedbackTargetRequired,
        CacheError::EmbedderUnavailable(_) => Code::EmbedderUnavailable,
        CacheError::PromptNotEmbeddable(_) => Code::PromptNotEmbeddable,
        CacheError::StoreUnavailable(_) => Code::StoreUnavailable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_in_variant_order_with_unique_names() {
        for (i, info) in TABLE.iter().enumerate() {
            assert_eq!(info.code as usize, i, "{} is out of order", info.name);
        }
        let mut names: Vec<&str> = TABLE.iter().map(|i| i.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), TABLE.len(), "a code name is used twice");
        assert!(
            TABLE
                .iter()
                .all(|i| i.status.is_client_error() || i.status.is_server_error())
        );
    }

    /// ARCHITECTURE.md's "Error codes" table lists exactly these codes with these statuses.
    #[test]
    fn architecture_md_lists_exactly_these_codes() {
        let doc = include_str!("../../../ARCHITECTURE.md");
        let section = doc
            .split("<!-- error-codes:begin -->")
            .nth(1)
            .and_then(|s| s.split("<!-- error-codes:end -->").next())
            .expect("ARCHITECTURE.md has the error-codes markers");
        let mut documented: Vec<(String, u16)> = section
            .lines()
            .filter_map(|l| {
                let cells: Vec<&str> = l.split('|').map(str::trim).collect();
                let name = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
                let status = cells.get(2)?.parse().ok()?;
                Some((name.to_owned(), status))
            })
            .collect();
        let mut table: Vec<(String, u16)> = TABLE
            .iter()
            .map(|i| (i.name.to_owned(), i.status.as_u16()))
            .collect();
        documented.sort();
        table.sort();
        assert_eq!(documented, table);
    }
}
