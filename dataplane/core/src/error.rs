//! What the domain reports: [`CacheError`] for a cache operation, [`StoreError`] for a port
//! that failed. Neither carries a backend's error type: a store adapter boxes its own error
//! as the source, so the domain (and the HTTP layer above it) sees a kind and a message.

use std::error::Error as StdError;
use std::fmt;

/// Every failure a cache operation reports. The HTTP layer maps each variant to a stable code
/// and status in its one table (`semantis-dataplane`'s `http::codes`).
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("missing API key: send `Authorization: Bearer <key>`")]
    MissingKey,
    #[error("invalid API key")]
    InvalidKey,
    #[error("an admin key must name the tenant in the `X-Semantis-Tenant` header")]
    TenantRequired,
    #[error("unknown tenant `{0}`")]
    UnknownTenant(String),
    #[error("this API key may not act for tenant `{0}`")]
    TenantForbidden(String),
    #[error("a lookup needs a `prompt` or a `vector`")]
    NoQuery,
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("the vector has {got} dimensions; this index stores {expected}")]
    DimensionMismatch { expected: usize, got: usize },
    #[error("the vector holds a NaN or infinite value at position {0}")]
    NonFiniteVector(usize),
    #[error("the vector is all zeros; cosine similarity is undefined for it")]
    ZeroVector,
    #[error("min_similarity must be a number within -1..1, got {0}")]
    SimilarityOutOfRange(f32),
    #[error("ttl_seconds must be at least 1")]
    InvalidTtl,
    #[error("`{field}` must be at most {max}, got {got}")]
    ValueOutOfRange {
        field: &'static str,
        max: u64,
        got: u64,
    },
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("entry `{0}` not found")]
    EntryNotFound(String),
    #[error(
        "no hit was served for request `{0}` (feedback can name a request this tenant was served a hit for, or an entry by `entry_id`)"
    )]
    RequestNotFound(String),
    #[error("feedback needs a `request_id` (from the lookup) or an `entry_id`")]
    FeedbackTargetRequired,
    #[error("the embedder is unavailable and no vector was supplied: {0}")]
    EmbedderUnavailable(String),
    #[error(
        "the embedding provider refuses this prompt ({0}); store it with a `vector`, or shorten it"
    )]
    PromptNotEmbeddable(String),
    #[error("the store is unavailable: {0}")]
    StoreUnavailable(#[from] StoreError),
}

/// What kind of failure a port reported; the domain decides on the kind alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreErrorKind {
    /// The backend could not be reached or refused the operation (I/O, network, closed log).
    Unavailable,
    /// Stored data could not be decoded.
    Corrupt,
}

/// A port's failure: its kind, and the adapter's own error (with its context) as the source.
pub struct StoreError {
    kind: StoreErrorKind,
    source: Box<dyn StdError + Send + Sync>,
}

impl StoreError {
    pub fn new(kind: StoreErrorKind, source: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        Self {
            kind,
            source: source.into(),
        }
    }

    pub fn unavailable(source: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        Self::new(StoreErrorKind::Unavailable, source)
    }

    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }
}

// Transparent: the adapter's message already says "failed to … <context>: <cause>".
impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.source, f)
    }
}

impl fmt::Debug for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreError")
            .field("kind", &self.kind)
            .field("source", &self.source)
            .finish()
    }
}

impl StdError for StoreError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source.source()
    }
}
