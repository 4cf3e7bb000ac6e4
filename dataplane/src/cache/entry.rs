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

/// Cosine similarity. Vectors are stored L2-normalised when the embedder normalises, but
/// client-supplied vectors may not be, so divide by the norms.
// Indexing by lane keeps the six streams visibly in step; it compiles to vector code.
#[allow(clippy::needless_range_loop)]
pub fn cosine_similarity(a: &[f32], b: &[f32]) -> f32 {
    // Sixteen independent partial sums per total, so the compiler can vectorise: one chained
    // sum must be added in order, one element at a time.
    const LANES: usize = 16;
    let len = a.len().min(b.len());
    let (a, b) = (&a[..len], &b[..len]);
    let (mut dot, mut na, mut nb) = ([0f32; LANES], [0f32; LANES], [0f32; LANES]);
    for (x, y) in a.chunks_exact(LANES).zip(b.chunks_exact(LANES)) {
        for i in 0..LANES {
            dot[i] += x[i] * y[i];
            na[i] += x[i] * x[i];
            nb[i] += y[i] * y[i];
        }
    }
    let (mut dot, mut na, mut nb): (f32, f32, f32) =
        (dot.iter().sum(), na.iter().sum(), nb.iter().sum());
    let tail = len - len % LANES;
    for (x, y) in a[tail..].iter().zip(&b[tail..]) {
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 || nb == 0.0 {
        return 0.0;
    }
    dot / (na.sqrt() * nb.sqrt())
}

/// `v` scaled to unit length (a zero vector stays zero).
pub fn normalized(mut v: Vec<f32>) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
    v
}

pub fn now_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_similarity_ignores_length() {
        assert!((cosine_similarity(&[1.0, 0.0], &[3.0, 0.0]) - 1.0).abs() < 1e-6);
        assert!(cosine_similarity(&[1.0, 0.0], &[0.0, 2.0]).abs() < 1e-6);
        assert!((cosine_similarity(&[1.0, 0.0], &[-1.0, 0.0]) + 1.0).abs() < 1e-6);
        assert_eq!(cosine_similarity(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
    }

    #[test]
    fn cosine_similarity_matches_the_textbook_sum_at_every_length() {
        for len in [1usize, 5, 16, 17, 384, 385] {
            let a: Vec<f32> = (0..len)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) / 3.0)
                .collect();
            let b: Vec<f32> = (0..len)
                .map(|i| ((i * 5 % 11) as f32 - 5.0) / 2.0)
                .collect();
            let dot: f64 = a
                .iter()
                .zip(&b)
                .map(|(x, y)| f64::from(*x) * f64::from(*y))
                .sum();
            let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum();
            let nb: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
            let expected = dot / (na.sqrt() * nb.sqrt());
            let got = f64::from(cosine_similarity(&a, &b));
            assert!(
                (got - expected).abs() < 1e-5,
                "length {len}: {got} vs {expected}"
            );
        }
    }
}
