//! Admission: who is calling and whether their tenant has room, decided from the request head
//! before a byte of the body is read. An unauthenticated client never gets its body parsed,
//! and a tenant past `max_concurrent_requests` is answered 429 at once, so one tenant's
//! flood cannot hold what another tenant's lookups need (embedder calls, connections, CPU).
//!
//! A request holds its tenant's permit until its answer's body is sent: a streamed completion
//! counts for as long as it streams.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use semantis_cache::tenants::Tenant;

use super::codes::Code;
use super::{ApiError, AppState};
use crate::gateway::upstream::ClientCredentials;

/// The caller a request was admitted for; handlers take it as an `Extension`.
#[derive(Clone)]
pub struct Caller {
    pub tenant: Arc<Tenant>,
    /// The client's own upstream credentials (gateway routes of a tenant that forwards them).
    pub client: Option<ClientCredentials>,
}

/// Each tenant's in-flight requests on this replica.
#[derive(Default)]
pub struct Admission {
    slots: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl Admission {
    fn try_admit(&self, tenant: &Tenant) -> Option<OwnedSemaphorePermit> {
        let slots = self
            .slots
            .lock()
            .entry(tenant.name.clone())
            .or_insert_with(|| Arc::new(Semaphore::new(tenant.max_concurrent_requests as usize)))
            .clone();
        slots.try_acquire_owned().ok()
    }
}

/// The API's routes: the Semantis key in `Authorization: Bearer`.
pub async fn admit_api(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    match super::authenticate(&state, req.headers()) {
        Ok(tenant) => admit(&state, tenant, None, req, next).await,
        Err(e) => refuse(&req, e),
    }
}

/// The gateway's routes: OpenAI's ways of sending a key (see `http::gateway`).
pub async fn admit_gateway(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    match super::gateway::caller(&state, req.headers()) {
        Ok((tenant, client)) => admit(&state, tenant, client, req, next).await,
        Err(e) => refuse(&req, e),
    }
}

async fn admit(
    state: &AppState,
    tenant: Arc<Tenant>,
    client: Option<ClientCredentials>,
    mut req: Request,
    next: Next,
) -> Response {
    let Some(permit) = state.admission.try_admit(&tenant) else {
        state
            .metrics
            .concurrency_refused
            .with_label_values(&[&tenant.name])
            .inc();
        let e = ApiError::new(
            Code::TooManyConcurrentRequests,
            format!(
                "tenant `{}` already has {} requests in flight on this replica (max_concurrent_requests); retry after the Retry-After seconds",
                tenant.name, tenant.max_concurrent_requests
            ),
        );
        let mut response = refuse(&req, e);
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return response;
    };
    let in_flight = state
        .metrics
        .requests_in_flight
        .with_label_values(&[&tenant.name]);
    in_flight.inc();
    let held = Slot {
        _permit: permit,
        in_flight,
    };
    req.extensions_mut().insert(Caller { tenant, client });
    next.run(req)
        .await
        .map(|body| Body::new(Held { body, _slot: held }))
}

/// A refusal decided from the head alone. The body was never read, so the connection cannot
/// carry another request: it closes with this answer (clients open a fresh one).
fn refuse(req: &Request, e: ApiError) -> Response {
    let mut response = e.into_response();
    let has_body = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .is_some_and(|v| v.as_bytes() != b"0")
        || req.headers().contains_key(header::TRANSFER_ENCODING);
    if has_body {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// A tenant's place: given back when dropped.
struct Slot {
    _permit: OwnedSemaphorePermit,
    in_flight: prometheus::IntGauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.in_flight.dec();
    }
}

/// An answer's body with its tenant's slot: released when the last byte is sent or the client
/// goes away.
struct Held {
    body: Body,
    _slot: Slot,
}

impl http_body::Body for Held {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A request body that records whether it was read to its end.
struct Watched {
    body: Body,
    ended: Arc<std::sync::atomic::AtomicBool>,
}

impl http_body::Body for Watched {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) {
            self.ended.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// An answer to a request whose body was not read to its end (a route or method that takes
/// no body, a refusal on the head) says `Connection: close`. hyper closes such a connection
/// after the answer; without the header a pooling client sends its next request on it as it
/// closes and gets "connection closed before message completed".
pub async fn close_when_body_unread(req: Request, next: Next) -> Response {
    let has_body = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .is_some_and(|v| v.as_bytes() != b"0")
        || req.headers().contains_key(header::TRANSFER_ENCODING);
    if !has_body {
        return next.run(req).await;
    }
    let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (parts, body) = req.into_parts();
    let req = Request::from_parts(
        parts,
        Body::new(Watched {
            body,
            ended: ended.clone(),
        }),
    );
    let mut response = next.run(req).await;
    if !ended.load(std::sync::atomic::Ordering::Relaxed) {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}
