//! The ports the domain needs, each implemented by an adapter in `semantis-dataplane`:
//! [`EntryStore`] (entries and vectors of one tenant's index version), [`HotLayer`]
//! (exact-match answers), [`Embedder`] (text to vectors), [`PendingStore`] (stores accepted
//! while the embedder was down), [`UsageSink`] and [`UsageReport`] (accounting and audit, off
//! the hit path).

use std::sync::Arc;

use async_trait::async_trait;

use crate::entry::{Candidate, Entry, EntryFilter, Held, Removed};
use crate::error::StoreError;

/// Entries and vectors of one (tenant, index version).
#[async_trait]
pub trait EntryStore: Send + Sync {
    /// Store durably: when this returns Ok the entry survives a crash.
    async fn insert(&self, entry: Arc<Entry>) -> Result<(), StoreError>;
    async fn find_exact(
        &self,
        exact_key: &str,
        now_ms: i64,
    ) -> Result<Option<Arc<Entry>>, StoreError>;
    /// The `limit` live entries of `scope` nearest to `vector`, best first. The scope filter
    /// is applied before the nearest-neighbour search. `hit_threshold` is the similarity the
    /// caller counts as a hit: an approximate search that finds nothing that close searches
    /// harder before it answers, and a candidate below it may come without its response
    /// (a large one kept on disk is read only for a candidate that can be served).
    async fn search(
        &self,
        scope: &str,
        vector: &[f32],
        limit: usize,
        hit_threshold: f32,
        now_ms: i64,
    ) -> Result<Vec<Candidate>, StoreError>;
    async fn delete_ids(&self, ids: &[String]) -> Result<Vec<Removed>, StoreError>;
    async fn delete_where(&self, filter: &EntryFilter) -> Result<Vec<Removed>, StoreError>;
    /// Ids of entries whose TTL has passed, at most `limit`.
    async fn expired_ids(&self, now_ms: i64, limit: usize) -> Result<Vec<String>, StoreError>;
    /// Id, creation time and footprint of every stored entry, to seed eviction tracking at
    /// startup.
    async fn all_ids(&self) -> Result<Vec<Held>, StoreError>;
    async fn count_live(&self, now_ms: i64) -> Result<u64, StoreError>;
    /// Whether searches go through an ANN index (as this replica knows it).
    fn has_vector_index(&self) -> bool {
        false
    }
    /// Whether lookups are answered from the resident index (loaded, enabled).
    fn resident_index(&self) -> bool {
        false
    }
    /// Move the write-ahead tail into the table now.
    async fn flush(&self) -> Result<(), StoreError>;
    /// Flush when due, then compact, prune and index when the counts say so.
    async fn maintain(&self) -> Result<(), StoreError>;
    /// Flush what this replica may flush and give up any lease (graceful shutdown).
    async fn shutdown(&self) -> Result<(), StoreError>;
}

/// The exact-match hot layer, keyed by (tenant, exact key). Best effort: failures are misses.
#[async_trait]
pub trait HotLayer: Send + Sync {
    async fn get(&self, tenant: &str, exact_key: &str) -> Option<Arc<Entry>>;
    async fn put(&self, tenant: &str, entry: Arc<Entry>);
    /// Remove the copy under `exact_key`. A put after it must not bring back a copy another
    /// replica read before the removal (the shared layer keeps a tombstone for that).
    async fn remove(&self, tenant: &str, exact_key: &str);
    /// Remove whatever copy holds entry `id` (a DELETE that found no entry in the store).
    async fn remove_id(&self, tenant: &str, id: &str);
    async fn clear_tenant(&self, tenant: &str);
}

/// Why an embedding call failed. Providers put their context into the strings; no transport
/// type crosses this port.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EmbedError {
    #[error("failed to load the embedding model from {path}: {reason}")]
    Load { path: String, reason: String },
    #[error("failed to embed: {0}")]
    Inference(String),
    #[error(
        "failed to embed: the model returned {got} dimensions, the configuration says {expected}"
    )]
    Dimension { expected: usize, got: usize },
    #[error("failed to embed within {0} ms")]
    Timeout(u64),
    #[error("the `{0}` embedding provider cannot be built this way")]
    Unsupported(&'static str),
    #[error("failed to embed with `{provider}`: HTTP {status}: {body}")]
    Http {
        provider: &'static str,
        status: u16,
        body: String,
    },
    #[error("failed to embed with `{provider}`: {reason}")]
    Protocol {
        provider: &'static str,
        reason: String,
    },
    /// The provider refused this input (HTTP 400, 413 or 422: too long, empty, unsupported):
    /// a verdict on the text, not on the provider's health. Retrying it cannot help, and it
    /// must not fail other texts or count toward the circuit breaker.
    #[error("failed to embed: `{provider}` refused the text (HTTP {status}): {body}")]
    Rejected {
        provider: &'static str,
        status: u16,
        body: String,
    },
    #[error("failed to embed with `{provider}`: {reason}")]
    Unavailable {
        provider: &'static str,
        reason: String,
    },
    #[error("failed to embed: the `{0}` circuit breaker is open after repeated failures")]
    CircuitOpen(&'static str),
    #[error("failed to embed: the batching task has stopped")]
    Stopped,
}

#[async_trait]
pub trait Embedder: Send + Sync {
    /// One vector per input text, each of [`Embedder::dimension`] values.
    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError>;
    /// [`Embedder::embed`] on behalf of one tenant. A layer that remembers vectors keeps each
    /// tenant's apart, so how fast a text embeds never tells a tenant what another asked.
    async fn embed_for(
        &self,
        _tenant: &str,
        texts: &[String],
    ) -> Result<Vec<Vec<f32>>, EmbedError> {
        self.embed(texts).await
    }
    fn dimension(&self) -> usize;
    fn provider(&self) -> &'static str;
    /// False while calls are refused without trying (an open circuit breaker).
    fn healthy(&self) -> bool {
        true
    }
    /// Where the embedder stops reading `text` (a byte offset on a char boundary), `None`
    /// when it reads all of it. The vector says nothing about the text past this point.
    fn window(&self, _text: &str) -> Option<usize> {
        None
    }
}

/// Stores accepted while the embedder was down, kept durably until a background pass embeds
/// them. Claims let several replicas share the work without taking the same entry twice.
#[async_trait]
pub trait PendingStore: Send + Sync {
    /// Keep a store accepted without a vector until it can be embedded.
    async fn defer(&self, tenant: &str, entry: &Entry) -> Result<(), StoreError>;
    /// Claim up to `limit` of the tenant's pending entries until `until_ms` (another replica
    /// takes them over after that if this one dies before finishing).
    async fn claim(
        &self,
        tenant: &str,
        limit: usize,
        now_ms: i64,
        until_ms: i64,
    ) -> Result<Vec<Entry>, StoreError>;
    /// Give claimed entries back (the embedder failed): any replica may retry them now.
    async fn release(&self, tenant: &str, ids: &[String]) -> Result<(), StoreError>;
    /// Drop pending entries (embedded and stored, or deleted); returns the ones that existed.
    async fn remove(&self, tenant: &str, ids: &[String]) -> Result<Vec<Entry>, StoreError>;
    /// Drop the tenant's pending entries that `filter` matches; returns them.
    async fn remove_where(
        &self,
        tenant: &str,
        filter: &EntryFilter,
    ) -> Result<Vec<Entry>, StoreError>;
}

/// One lookup's outcome for usage accounting and the audit trail.
#[derive(Debug, Clone)]
pub struct UsageEvent {
    pub tenant: String,
    pub model: String,
    pub at_ms: i64,
    pub hit: bool,
    pub path: Option<&'static str>,
    pub entry_id: Option<String>,
    pub similarity: Option<f32>,
    pub request_id: String,
    pub tokens_saved: u64,
    pub usd_saved: f64,
    /// Set for a gateway call to the upstream (then the event is not a lookup).
    pub upstream: Option<UpstreamUsage>,
}

/// What one upstream call used.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct UpstreamUsage {
    pub tokens: u64,
    pub usd: f64,
}

/// Where usage events go. Never blocks the caller: nothing on the hit path waits for the
/// metadata database.
pub trait UsageSink: Send + Sync {
    fn record(&self, event: UsageEvent);
}

/// Usage totals for one tenant and model.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct ModelUsage {
    pub model: String,
    pub lookups: u64,
    pub hits: u64,
    pub tokens_saved: u64,
    pub usd_saved: f64,
    /// Gateway calls that went to the upstream.
    pub upstream_calls: u64,
    pub tokens_used: u64,
    pub usd_spent: f64,
}

/// Usage totals for one tenant and UTC day (`YYYY-MM-DD`), every model together.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct DayUsage {
    pub day: String,
    pub lookups: u64,
    pub hits: u64,
    pub tokens_saved: u64,
    pub usd_saved: f64,
    pub upstream_calls: u64,
    pub tokens_used: u64,
    pub usd_spent: f64,
}

impl DayUsage {
    /// The same totals under a model's name: usage summed by model comes out of the same
    /// summing as by day, with the model in `day`'s place.
    pub fn for_model(self) -> ModelUsage {
        ModelUsage {
            model: self.day,
            lookups: self.lookups,
            hits: self.hits,
            tokens_saved: self.tokens_saved,
            usd_saved: self.usd_saved,
            upstream_calls: self.upstream_calls,
            tokens_used: self.tokens_used,
            usd_spent: self.usd_spent,
        }
    }
}

/// The accounting totals `stats` reports (written by the usage sink, read back here).
#[async_trait]
pub trait UsageReport: Send + Sync {
    async fn usage(&self, tenant: &str) -> Result<Vec<ModelUsage>, StoreError>;
    /// The tenant's totals per day from `since` (`YYYY-MM-DD`, inclusive), oldest first.
    async fn usage_by_day(&self, tenant: &str, since: &str) -> Result<Vec<DayUsage>, StoreError>;
}

/// Why a verifier gave no scores. Providers put their context into the strings.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("failed to load the verifier from {path}: {reason}")]
    Load { path: String, reason: String },
    #[error("failed to verify: {0}")]
    Inference(String),
    #[error("failed to verify with `{provider}`: HTTP {status}: {body}")]
    Http {
        provider: &'static str,
        status: u16,
        body: String,
    },
    #[error("failed to verify with `{provider}`: {reason}")]
    Protocol {
        provider: &'static str,
        reason: String,
    },
    #[error("failed to verify with `{provider}`: {reason}")]
    Unavailable {
        provider: &'static str,
        reason: String,
    },
    #[error("failed to verify: the `{0}` circuit breaker is open after repeated failures")]
    CircuitOpen(&'static str),
}

/// The second stage of a semantic lookup: reads the query beside each candidate's prompt and
/// scores whether the candidate's cached answer answers the query.
#[async_trait]
pub trait Verifier: Send + Sync {
    /// One score in 0..1 per candidate, in the candidates' order.
    async fn score(&self, query: &str, candidates: &[String]) -> Result<Vec<f32>, VerifyError>;
    /// The same, on `tenant`'s behalf: a layer that remembers scores keeps each tenant's
    /// apart, so how fast a pair is scored says nothing about another tenant's questions.
    async fn score_for(
        &self,
        tenant: &str,
        query: &str,
        candidates: &[String],
    ) -> Result<Vec<f32>, VerifyError> {
        let _ = tenant;
        self.score(query, candidates).await
    }
    fn provider(&self) -> &'static str;
}

/// One verdict on a served hit (`POST /v1/feedback`).
#[derive(Debug, Clone, PartialEq)]
pub struct Feedback {
    /// Assigned by the store, increasing: replicas read what they have not seen by it.
    pub seq: i64,
    pub tenant: String,
    pub entry_id: String,
    pub request_id: Option<String>,
    /// Whether the served answer was right for the query.
    pub correct: bool,
    /// The query the entry was served for, normalised; `None` when not known (the verdict
    /// then concerns the entry for any query).
    pub prompt: Option<String>,
    /// The query's vector, from the index version named next to it.
    pub vector: Option<Vec<f32>>,
    pub index_version: String,
    /// The verifier's score of the served hit, when one was verified.
    pub score: Option<f32>,
    pub at_ms: i64,
}

/// Where feedback is kept durably and shared between replicas.
#[async_trait]
pub trait FeedbackStore: Send + Sync {
    /// Keep `feedback` (its `seq` is ignored); returns the seq it was given.
    async fn record(&self, feedback: &Feedback) -> Result<i64, StoreError>;
    /// Feedback with a seq above `after`, oldest first, at most `limit`.
    async fn since(&self, after: i64, limit: usize) -> Result<Vec<Feedback>, StoreError>;
    /// The entry a request was served (the audit trail), when it was a hit.
    async fn served(&self, tenant: &str, request_id: &str) -> Result<Option<String>, StoreError>;
}
