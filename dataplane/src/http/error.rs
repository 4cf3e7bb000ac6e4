//! The error body every failure uses: `{"error": {"code": "...", "message": "..."}}`. Codes
//! and their statuses come from the one table in [`super::codes`]; messages are for people.

use std::any::Any;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use semantis_cache::CacheError;

use super::codes::{Code, TABLE, code_of};

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `dimension_mismatch`; the OpenAPI document lists
    /// every one (from [`super::codes::TABLE`]).
    #[schema(schema_with = code_schema)]
    pub code: String,
    pub message: String,
    /// OpenAI's error class for the status (`invalid_request_error`, `authentication_error`,
    /// `not_found_error`, `rate_limit_error`, `api_error`), so OpenAI clients read every
    /// error of this API, the gateway's included.
    #[serde(rename = "type")]
    pub kind: String,
}

/// The `code` field's schema: an enum of every name in the table, each with its status and
/// meaning in the description.
fn code_schema() -> utoipa::openapi::Object {
    use utoipa::openapi::schema::{ObjectBuilder, Type};
    let mut description =
        String::from("Stable machine-readable error code (HTTP status: meaning):\n");
    for info in TABLE {
        description.push_str(&format!(
            "- `{}` ({}): {}\n",
            info.name,
            info.status.as_u16(),
            info.meaning
        ));
    }
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(TABLE.iter().map(|i| i.name)))
        .description(Some(description))
        .build()
}

#[derive(Debug)]
pub struct ApiError {
    code: Code,
    message: String,
}

impl ApiError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub fn code(&self) -> Code {
        self.code
    }

    pub fn not_found() -> Self {
        Self::new(Code::NotFound, "no such route")
    }
}

impl From<CacheError> for ApiError {
    fn from(e: CacheError) -> Self {
        let code = code_of(&e);
        if code.status().is_server_error() {
            tracing::warn!(error = %e, code = code.name(), "request failed");
        }
        Self::new(code, e.to_string())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        match r {
            JsonRejection::MissingJsonContentType(_) => Self::new(
                Code::UnsupportedMediaType,
                "send `Content-Type: application/json`",
            ),
            JsonRejection::JsonSyntaxError(e) => Self::new(Code::MalformedJson, e.body_text()),
            JsonRejection::JsonDataError(e) => Self::new(Code::InvalidRequest, e.body_text()),
            JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                payload_too_large()
            }
            other => Self::new(Code::InvalidRequest, other.body_text()),
        }
    }
}

fn payload_too_large() -> ApiError {
    ApiError::new(
        Code::PayloadTooLarge,
        "the request body is larger than the server accepts",
    )
}

impl ApiError {
    fn body(self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code.name().to_owned(),
                message: self.message,
                kind: self.code.openai_type().to_owned(),
            },
        }
    }

    /// The body as JSON text, for answers written outside axum (the accept loop's refusals).
    pub fn body_json(self) -> String {
        serde_json::to_string(&self.body()).unwrap_or_else(|_| String::from("{}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.code.status();
        (status, Json(self.body())).into_response()
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
            Code::MethodNotAllowed,
            "this route does not take that method",
        )
        .into_response(),
        StatusCode::GATEWAY_TIMEOUT | StatusCode::REQUEST_TIMEOUT => ApiError::new(
            Code::Timeout,
            "the request did not finish within the server's deadline",
        )
        .into_response(),
        _ => res,
    }
}

pub fn panic_response(_: Box<dyn Any + Send + 'static>) -> Response<Body> {
    tracing::error!("a request handler panicked");
    ApiError::new(Code::Internal, "internal error").into_response()
}
