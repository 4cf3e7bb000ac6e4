//! A cached answer and what it was an answer to.

use std::sync::Arc;

/// One cached LLM answer. Immutable once stored: a hit never changes it (TTL is not extended).
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub id: String,
    /// Hex fingerprint of the normalised scope.
    pub scope: String,
    pub namespace: String,
    /// Hash of (scope, normalised prompt): the exact path's key.
    pub exact_key: String,
    pub prompt: String,
    pub vector: Arc<[f32]>,
    /// The cached response, opaque bytes (usually an OpenAI-shaped JSON document).
    pub response: Arc<[u8]>,
    /// The LLM that produced the response, when the scope named one.
    pub model: String,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// What the LLM call cost, in US dollars; a hit saves this much.
    pub cost_usd: f64,
    /// Free-form JSON metadata supplied by the client.
    pub metadata: String,
}

impl Entry {
    pub fn is_live(&self, now_ms: i64) -> bool {
        self.expires_at_ms > now_ms
    }
}

/// An entry accepted while the embedder was down: everything but the vector, which a
/// background pass computes later (serialised into the metadata store meanwhile).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PendingEntry {
    pub id: String,
    pub scope: String,
    pub namespace: String,
    pub exact_key: String,
    pub prompt: String,
    /// The response bytes as text (the API only accepts JSON responses).
    pub response: String,
    pub model: String,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_usd: f64,
    pub metadata: String,
}

impl PendingEntry {
    pub fn of(entry: &Entry) -> Self {
        Self {
            id: entry.id.clone(),
            scope: entry.scope.clone(),
            namespace: entry.namespace.clone(),
            exact_key: entry.exact_key.clone(),
            prompt: entry.prompt.clone(),
            response: String::from_utf8_lossy(&entry.response).into_owned(),
            model: entry.model.clone(),
            created_at_ms: entry.created_at_ms,
            expires_at_ms: entry.expires_at_ms,
            prompt_tokens: entry.prompt_tokens,
            completion_tokens: entry.completion_tokens,
            cost_usd: entry.cost_usd,
            metadata: entry.metadata.clone(),
        }
    }

    pub fn into_entry(self, vector: Vec<f32>) -> Entry {
        Entry {
            id: self.id,
            scope: self.scope,
            namespace: self.namespace,
            exact_key: self.exact_key,
            prompt: self.prompt,
            vector: Arc::from(vector),
            response: Arc::from(self.response.into_bytes()),
            model: self.model,
            created_at_ms: self.created_at_ms,
            expires_at_ms: self.expires_at_ms,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            cost_usd: self.cost_usd,
            metadata: self.metadata,
        }
    }
}

/// A semantic-search result: an entry and its cosine similarity to the query vector.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub entry: Arc<Entry>,
    pub similarity: f32,
}

/// Which entries an invalidation removes, always inside one tenant.
#[derive(Debug, Clone, PartialEq)]
pub enum EntryFilter {
    All,
    Scope(String),
    Namespace(String),
}

impl EntryFilter {
    pub fn matches(&self, e: &Entry) -> bool {
        match self {
            Self::All => true,
            Self::Scope(s) => &e.scope == s,
            Self::Namespace(n) => &e.namespace == n,
        }
    }
}

/// Enough of a deleted entry to purge every layer that may hold it.
#[derive(Debug, Clone, PartialEq)]
pub struct Removed {
    pub id: String,
    pub exact_key: String,
}
