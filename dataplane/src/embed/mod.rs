//! Turning text into vectors. Providers implement [`Embedder`]; the cache domain only sees the
//! trait. The embedder fingerprint names the index version: any change of provider, model,
//! revision, dimension, pooling or normalisation means a new index.

pub mod layers;
pub mod local;
pub mod remote;

use async_trait::async_trait;
use semantis_contract::EmbedderConfig;

#[derive(Debug, thiserror::Error)]
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
    fn dimension(&self) -> usize;
    fn provider(&self) -> &'static str;
    /// False while calls are refused without trying (an open circuit breaker).
    fn healthy(&self) -> bool {
        true
    }
}

/// hash(provider, model, revision, dimension, pooling, normalisation), 32 hex characters.
pub fn fingerprint(cfg: &EmbedderConfig) -> String {
    cfg.fingerprint()
}

#[cfg(test)]
mod tests {
    use super::*;
    use semantis_contract::{EmbeddingProvider, Pooling};

    #[test]
    fn every_identity_field_changes_the_fingerprint() {
        let base = EmbedderConfig::default();
        let fp = fingerprint(&base);
        let variants = [
            EmbedderConfig {
                provider: EmbeddingProvider::Openai,
                ..base.clone()
            },
            EmbedderConfig {
                model: "other".into(),
                ..base.clone()
            },
            EmbedderConfig {
                revision: "v2".into(),
                ..base.clone()
            },
            EmbedderConfig {
                dimension: 768,
                ..base.clone()
            },
            EmbedderConfig {
                pooling: Pooling::Cls,
                ..base.clone()
            },
            EmbedderConfig {
                normalize: false,
                ..base.clone()
            },
        ];
        for v in variants {
            assert_ne!(fingerprint(&v), fp);
        }
        // Operational settings do not change the index.
        let tuned = EmbedderConfig {
            timeout_ms: 1,
            endpoint: Some("http://x".into()),
            ..base.clone()
        };
        assert_eq!(fingerprint(&tuned), fp);
    }
}
