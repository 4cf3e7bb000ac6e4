//! A memory of scores in front of any verifier: the score of a (query, candidate) pair is a
//! pure function of the two texts and the model, so a question asked again (the common case
//! of a cache) is not read again. Kept per tenant, like the embedding cache: a pair another
//! tenant had scored a moment ago is scored again, so the speed of an answer tells nothing
//! about other tenants' questions. Only answers are remembered; a failure is asked again.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use moka::future::Cache;

use semantis_cache::ports::{Verifier, VerifyError};
use semantis_cache::vector::short_hash;

use crate::metrics::Metrics;

pub struct CachedVerifier {
    name: String,
    inner: Arc<dyn Verifier>,
    scores: Cache<String, f32>,
    metrics: Arc<Metrics>,
}

/// How long a remembered score lives: the model does not change under a running process, so
/// this only lets a pair nobody asks about again leave before the capacity evicts it.
const TTL: Duration = Duration::from_secs(86_400);

impl CachedVerifier {
    pub fn new(name: &str, inner: Arc<dyn Verifier>, entries: u64, metrics: Arc<Metrics>) -> Self {
        Self {
            name: name.to_owned(),
            inner,
            scores: Cache::builder()
                .max_capacity(entries)
                .time_to_live(TTL)
                .build(),
            metrics,
        }
    }

    /// The key of (tenant, query, candidate); each part is length-prefixed, so no two
    /// triples share one.
    fn key(tenant: &str, query: &str, candidate: &str) -> String {
        short_hash(
            format!(
                "{}:{tenant}{}:{query}{candidate}",
                tenant.len(),
                query.len()
            )
            .as_bytes(),
        )
    }

    async fn score_as(
        &self,
        tenant: &str,
        query: &str,
        candidates: &[String],
    ) -> Result<Vec<f32>, VerifyError> {
        let keys: Vec<String> = candidates
            .iter()
            .map(|c| Self::key(tenant, query, c))
            .collect();
        let mut out = Vec::with_capacity(candidates.len());
        let mut missing = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            let known = self.scores.get(k).await;
            if known.is_none() {
                missing.push(i);
            }
            out.push(known);
        }
        let counter = &self.metrics.verify_cache;
        counter
            .with_label_values(&[&self.name, "hit"])
            .inc_by((candidates.len() - missing.len()) as u64);
        counter
            .with_label_values(&[&self.name, "miss"])
            .inc_by(missing.len() as u64);
        if !missing.is_empty() {
            let todo: Vec<String> = missing.iter().map(|&i| candidates[i].clone()).collect();
            let fresh = self.inner.score(query, &todo).await?;
            if fresh.len() != todo.len() {
                return Err(VerifyError::Protocol {
                    provider: self.inner.provider(),
                    reason: format!("{} scores for {} candidates", fresh.len(), todo.len()),
                });
            }
            for (&i, score) in missing.iter().zip(fresh) {
                if score.is_finite() {
                    self.scores.insert(keys[i].clone(), score).await;
                }
                out[i] = Some(score);
            }
        }
        Ok(out.into_iter().map(|s| s.unwrap_or(f32::NAN)).collect())
    }
}

#[async_trait]
impl Verifier for CachedVerifier {
    async fn score(&self, query: &str, candidates: &[String]) -> Result<Vec<f32>, VerifyError> {
        self.score_as("", query, candidates).await
    }

    async fn score_for(
        &self,
        tenant: &str,
        query: &str,
        candidates: &[String],
    ) -> Result<Vec<f32>, VerifyError> {
        self.score_as(tenant, query, candidates).await
    }

    fn provider(&self) -> &'static str {
        self.inner.provider()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;

    /// Scores a text by its length and remembers what it was asked.
    struct Counting {
        asked: Mutex<Vec<Vec<String>>>,
    }

    #[async_trait]
    impl Verifier for Counting {
        async fn score(
            &self,
            _query: &str,
            candidates: &[String],
        ) -> Result<Vec<f32>, VerifyError> {
            self.asked.lock().push(candidates.to_vec());
            Ok(candidates.iter().map(|c| c.len() as f32 / 10.0).collect())
        }

        fn provider(&self) -> &'static str {
            "counting"
        }
    }

    fn texts(t: &[&str]) -> Vec<String> {
        t.iter().map(|s| (*s).to_owned()).collect()
    }

    #[tokio::test]
    async fn only_unscored_candidates_reach_the_verifier_and_scores_keep_their_order()
    -> anyhow::Result<()> {
        let inner = Arc::new(Counting {
            asked: Mutex::new(Vec::new()),
        });
        let cached = CachedVerifier::new("c", inner.clone(), 100, Arc::new(Metrics::new()?));
        let first = cached.score_for("t", "q", &texts(&["a", "bb"])).await?;
        assert_eq!(first, vec![0.1, 0.2]);
        let second = cached
            .score_for("t", "q", &texts(&["ccc", "a", "bb", "dddd"]))
            .await?;
        assert_eq!(second, vec![0.3, 0.1, 0.2, 0.4]);
        // Another query, another tenant: scored again.
        cached.score_for("t", "q2", &texts(&["a"])).await?;
        cached.score_for("u", "q", &texts(&["a"])).await?;
        assert_eq!(
            *inner.asked.lock(),
            vec![
                texts(&["a", "bb"]),
                texts(&["ccc", "dddd"]),
                texts(&["a"]),
                texts(&["a"])
            ]
        );
        Ok(())
    }

    #[test]
    fn keys_of_different_triples_differ() {
        let k = CachedVerifier::key;
        assert_ne!(k("t", "ab", "c"), k("t", "a", "bc"));
        assert_ne!(k("t1", "a", "b"), k("t", "1a", "b"));
        assert_ne!(k("", "a", "b"), k("a", "", "b"));
    }
}
