//! The one table from errors to HTTP statuses, and the error body every failure uses:
//! `{"error": {"code": "...", "message": "..."}}`. Codes are stable; messages are for people.

use std::any::Any;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::cache::CacheError;

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `dimension_mismatch`.
    pub code: String,
    pub message: String,
}

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "no such route")
    }
}

fn status_of(e: &CacheError) -> StatusCode {
    match e {
        CacheError::MissingKey | CacheError::InvalidKey => StatusCode::UNAUTHORIZED,
        CacheError::TenantForbidden(_) => StatusCode::FORBIDDEN,
        CacheError::UnknownTenant(_) | CacheError::EntryNotFound(_) => StatusCode::NOT_FOUND,
        CacheError::TenantRequired | CacheError::NoQuery | CacheError::InvalidRequest(_) => {
            StatusCode::BAD_REQUEST
        }
        CacheError::EmptyPrompt
        | CacheError::DimensionMismatch { .. }
        | CacheError::NonFiniteVector(_)
        | CacheError::ZeroVector
        | CacheError::SimilarityOutOfRange(_)
        | CacheError::InvalidTtl => StatusCode::UNPROCESSABLE_ENTITY,
        CacheError::EmbedderUnavailable(_) | CacheError::StoreUnavailable(_) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
    }
}

impl From<CacheError> for ApiError {
    fn from(e: CacheError) -> Self {
        let status = status_of(&e);
        if status.is_server_error() {
            tracing::warn!(error = %e, code = e.code(), "request failed");
        }
        Self::new(status, e.code(), e.to_string())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        match r {
            JsonRejection::MissingJsonContentType(_) => Self::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send `Content-Type: application/json`",
            ),
            JsonRejection::JsonSyntaxError(e) => {
                Self::new(StatusCode::BAD_REQUEST, "malformed_json", e.body_text())
            }
            JsonRejection::JsonDataError(e) => {
                Self::new(StatusCode::BAD_REQUEST, "invalid_request", e.body_text())
            }
            JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                payload_too_large()
            }
            other => Self::new(other.status(), "invalid_request", other.body_text()),
        }
    }
}

fn payload_too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        "the request body is larger than the server accepts",
    )
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
            },
        };
        (self.status, Json(body)).into_response()
    }
}

/// Middleware layers (body limit, timeout, method routing) answer with plain-text bodies;
/// give those the API's error format too.
pub async fn rewrite_plain_errors(res: Response) -> Response {
    let mut res = rewrite_plain_error_body(res);
    if res.status() == StatusCode::PAYLOAD_TOO_LARGE {
        // The rest of the body was never read, so the connection cannot carry another request;
        // say so, or a pooling client reuses it and its next request dies on the reset.
        res.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
    }
    res
}

fn rewrite_plain_error_body(res: Response) -> Response {
    let status = res.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return res;
    }
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return res;
    }
    match status {
        StatusCode::PAYLOAD_TOO_LARGE => payload_too_large().into_response(),
        StatusCode::METHOD_NOT_ALLOWED => ApiError::new(
            status,
            "method_not_allowed",
            "this route does not take that method",
        )
        .into_response(),
        StatusCode::GATEWAY_TIMEOUT | StatusCode::REQUEST_TIMEOUT => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            "the request did not finish within the server's deadline",
        )
        .into_response(),
        _ => res,
    }
}

pub fn panic_response(_: Box<dyn Any + Send + 'static>) -> Response<Body> {
    tracing::error!("a request handler panicked");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "internal error",
    )
    .into_response()
}
