//! A cached answer and what it was an answer to.

use std::sync::Arc;

/// One cached LLM answer. Immutable once stored: a hit never changes it (TTL is not extended).
///
/// This is also the one serialised form of an entry: a write-ahead log record, a Redis hot
/// copy and a store deferred while the embedder is down are all this struct as JSON (the
/// latter two without the vector). The Arrow codec is the only other shape, in
/// `store::lance::codec`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Entry {
    pub id: String,
    /// Hex fingerprint of the normalised scope.
    pub scope: String,
    pub namespace: String,
    /// Hash of (scope, normalised prompt): the exact path's key.
    pub exact_key: String,
    pub prompt: String,
    /// Empty while the embedder has not produced it yet (a deferred store), and in the hot
    /// layer's copy, which only answers exact hits.
    #[serde(
        default = "no_vector",
        skip_serializing_if = "<[f32]>::is_empty",
        with = "vector_serde"
    )]
    pub vector: Arc<[f32]>,
    /// The cached response, opaque bytes (usually an OpenAI-shaped JSON document).
    #[serde(with = "response_serde")]
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

/// What an entry costs its tenant's byte budget beyond its prompt, response, metadata and
/// vector: its id, keys, scope and numbers, and the bookkeeping around them.
pub const ENTRY_OVERHEAD: u64 = 512;

/// The byte-budget cost of an entry with these sizes (see [`Entry::footprint`]).
pub fn footprint(prompt: usize, response: usize, metadata: usize, dimension: usize) -> u64 {
    [prompt, response, metadata, dimension.saturating_mul(4)]
        .into_iter()
        .map(|n| n as u64)
        .fold(ENTRY_OVERHEAD, u64::saturating_add)
}

/// An entry as eviction tracks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub id: String,
    pub created_at_ms: i64,
    /// [`Entry::footprint`].
    pub bytes: u64,
}

impl Entry {
    pub fn is_live(&self, now_ms: i64) -> bool {
        self.expires_at_ms > now_ms
    }

    /// What this entry costs its tenant's byte budget once it has a `dimension`-sized
    /// vector: about what it takes in memory where it is held whole (the resident index,
    /// the log's tail, the hot layer) and on disk.
    pub fn footprint(&self, dimension: usize) -> u64 {
        footprint(
            self.prompt.len(),
            self.response.len(),
            self.metadata.len(),
            dimension,
        )
    }

    /// This entry without its vector: what a deferred store and the hot layer keep.
    pub fn without_vector(&self) -> Self {
        Self {
            vector: no_vector(),
            ..self.clone()
        }
    }

    /// This entry with `vector` (a deferred store once the embedder is back).
    pub fn with_vector(self, vector: Vec<f32>) -> Self {
        Self {
            vector: Arc::from(vector),
            ..self
        }
    }
}

fn no_vector() -> Arc<[f32]> {
    Arc::from(Vec::new())
}

/// The vector as a JSON array of numbers.
mod vector_serde {
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Arc<[f32]>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<[f32]>, D::Error> {
        Vec::<f32>::deserialize(d).map(Arc::from)
    }
}

/// The response as a JSON array of bytes, the write-ahead log's format since its first
/// version (every replica of a rolling upgrade reads it). Reading also accepts a string:
/// deferred stores were kept with the response as text before the record was unified.
mod response_serde {
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Stored {
        Bytes(Vec<u8>),
        Text(String),
    }

    pub fn serialize<S: Serializer>(v: &Arc<[u8]>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<[u8]>, D::Error> {
        Ok(match Stored::deserialize(d)? {
            Stored::Bytes(b) => Arc::from(b),
            Stored::Text(t) => Arc::from(t.into_bytes()),
        })
    }
}

/// A semantic-search result: an entry and its cosine similarity to the query vector.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub entry: Arc<Entry>,
    pub similarity: f32,
}

/// Which entries an invalidation removes, always inside one tenant. Serialised in the
/// write-ahead log's delete records as `{"kind": "scope", "value": "…"}`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
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

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        Entry {
            id: "a".into(),
            scope: "s".into(),
            namespace: String::new(),
            exact_key: "k".into(),
            prompt: "p".into(),
            vector: Arc::from(vec![0.25f32, -1.5]),
            response: Arc::from(b"{}".to_vec()),
            model: String::new(),
            created_at_ms: 1,
            expires_at_ms: 2,
            prompt_tokens: 3,
            completion_tokens: 4,
            cost_usd: 0.5,
            metadata: "{}".into(),
        }
    }

    #[test]
    fn round_trips_through_json_with_and_without_its_vector() {
        let e = entry();
        let json = serde_json::to_string(&e).expect("encode");
        assert!(json.contains(r#""vector":[0.25,-1.5]"#), "{json}");
        assert!(json.contains(r#""response":[123,125]"#), "{json}");
        assert_eq!(serde_json::from_str::<Entry>(&json).expect("decode"), e);
        let bare = serde_json::to_string(&e.without_vector()).expect("encode");
        assert!(!bare.contains("vector"), "{bare}");
        let back: Entry = serde_json::from_str(&bare).expect("decode");
        assert!(back.vector.is_empty());
        assert_eq!(back.with_vector(vec![0.25, -1.5]), e);
    }

    #[test]
    fn reads_the_deferred_store_rows_written_with_a_text_response() {
        let old = r#"{"id":"a","scope":"s","namespace":"","exact_key":"k","prompt":"p",
            "response":"{}","model":"","created_at_ms":1,"expires_at_ms":2,
            "prompt_tokens":3,"completion_tokens":4,"cost_usd":0.5,"metadata":"{}"}"#;
        let e: Entry = serde_json::from_str(old).expect("decode");
        assert_eq!(e, entry().without_vector());
    }
}
