//! Turning text into vectors. Providers implement the domain's [`Embedder`] port; the cache
//! domain only sees the trait. The embedder fingerprint names the index version: any change of provider, model,
//! revision, dimension, pooling or normalisation means a new index.

pub mod layers;
pub mod local;
pub mod remote;

pub use semantis_cache::ports::{EmbedError, Embedder};
use semantis_contract::EmbedderConfig;

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
