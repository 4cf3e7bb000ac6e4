//! Turning text into vectors. Providers implement the domain's [`Embedder`] port; the cache
//! domain only sees the trait. The embedder fingerprint names the index version: any change of provider, model,
//! revision, dimension, pooling or normalisation means a new index.

pub mod layers;
pub mod local;
pub mod remote;

pub use semantis_cache::ports::{EmbedError, Embedder};
use semantis_contract::EmbedderConfig;

/// The environment variable the in-process models' kernels (candle's, and rayon's pool) take
/// their thread count from.
pub const MODEL_THREADS_VAR: &str = "RAYON_NUM_THREADS";

/// How many threads the in-process models' kernels use: `RAYON_NUM_THREADS` when set, else the
/// CPUs this process may run on — its affinity mask and its cgroup's CPU quota, as
/// [`std::thread::available_parallelism`] reads them. Left to itself, candle counts the
/// machine's physical cores from `/proc/cpuinfo` (on every matrix product) and ignores both:
/// a pod limited to one CPU on a large node would run a spinning kernel thread per core of
/// the node, each waiting for the others on the one CPU it has.
pub fn model_threads() -> usize {
    std::env::var(MODEL_THREADS_VAR)
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, std::num::NonZero::get))
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
