//! The verifier stage's adapters: the domain's [`Verifier`] port implemented by the local
//! cross-encoder ([`local`]) and by remote rerankers ([`remote`]), and [`load`], which builds
//! the verifiers a configuration's tenants use.

pub mod cached;
pub mod local;
pub mod remote;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use semantis_cache::ports::{Verifier, VerifyError};
use semantis_cache::tenants::{VerifierDefaults, verifiers_named};
use semantis_contract::{
    DataplaneConfig, EmbeddingProvider, LOCAL_VERIFIER, VerifierConfig, VerifierProvider,
};

use crate::metrics::Metrics;

/// A remote verifier's threshold and floor unless configured: rerankers score calibrated
/// probabilities, so one half is their own decision boundary; the floor keeps far candidates
/// from costing a call.
pub const REMOTE_MIN_SCORE: f32 = 0.5;
pub const REMOTE_MIN_SIMILARITY: f32 = 0.8;

/// The verifiers a process serves with, and what each brings to the tenants that use it.
#[derive(Default)]
pub struct Loaded {
    pub verifiers: HashMap<String, Arc<dyn Verifier>>,
    pub defaults: BTreeMap<String, VerifierDefaults>,
}

#[derive(Debug, thiserror::Error)]
pub enum VerifierSetupError {
    #[error("failed to set up the verifier `{name}`: {source}")]
    Build {
        name: String,
        #[source]
        source: VerifyError,
    },
    #[error("a tenant names the verifier `{0}`, which `[verifiers]` does not configure")]
    Unknown(String),
    #[error("failed to locate the base model of the verifier `{0}`: set its model_dir")]
    NoModelDir(String),
}

/// Build every verifier a tenant names, and `local` when some tenant takes the default, an
/// embedder is configured and the verifier's file is present (absent, those tenants go
/// unverified, and the log says so).
pub fn load(cfg: &DataplaneConfig, metrics: &Arc<Metrics>) -> Result<Loaded, VerifierSetupError> {
    let (named, auto) = verifiers_named(cfg);
    let mut loaded = Loaded::default();
    for name in &named {
        let vc = match cfg.verifiers.get(name) {
            Some(vc) => vc.clone(),
            None if name == LOCAL_VERIFIER => VerifierConfig::default(),
            None => return Err(VerifierSetupError::Unknown(name.clone())),
        };
        build(cfg, name, &vc, metrics, &mut loaded)?;
    }
    // With no embedder, clients send vectors and rarely text: nothing a verifier could read.
    let embeds = cfg.embedder.provider != EmbeddingProvider::None;
    if auto && embeds && !loaded.verifiers.contains_key(LOCAL_VERIFIER) {
        let vc = cfg
            .verifiers
            .get(LOCAL_VERIFIER)
            .cloned()
            .unwrap_or_default();
        let present = vc.provider != VerifierProvider::Local
            || local_paths(cfg, LOCAL_VERIFIER, &vc).is_ok_and(|(_, weights)| weights.exists());
        if present {
            build(cfg, LOCAL_VERIFIER, &vc, metrics, &mut loaded)?;
        } else {
            tracing::info!(
                "no local verifier file (scripts/fetch-model.sh installs it): semantic hits of tenants without a verifier setting are decided by cosine similarity alone"
            );
        }
    }
    Ok(loaded)
}

/// (base model directory, verifier file) of a local verifier.
fn local_paths(
    cfg: &DataplaneConfig,
    name: &str,
    vc: &VerifierConfig,
) -> Result<(PathBuf, PathBuf), VerifierSetupError> {
    let dir = match &vc.model_dir {
        Some(d) => PathBuf::from(d),
        None => cfg
            .embedder
            .model_dir
            .as_ref()
            .map(PathBuf::from)
            .or_else(crate::config::default_model_dir)
            .ok_or_else(|| VerifierSetupError::NoModelDir(name.to_owned()))?,
    };
    let weights = vc
        .weights
        .as_ref()
        .map_or_else(|| local::default_weights(&dir), PathBuf::from);
    Ok((dir, weights))
}

fn build(
    cfg: &DataplaneConfig,
    name: &str,
    vc: &VerifierConfig,
    metrics: &Arc<Metrics>,
    loaded: &mut Loaded,
) -> Result<(), VerifierSetupError> {
    let failed = |source| VerifierSetupError::Build {
        name: name.to_owned(),
        source,
    };
    let (verifier, calibrated): (Arc<dyn Verifier>, Option<VerifierDefaults>) = match vc.provider {
        VerifierProvider::Local => {
            let (dir, weights) = local_paths(cfg, name, vc)?;
            let started = std::time::Instant::now();
            let v = local::LocalVerifier::load(&dir, &weights, vc.max_tokens).map_err(failed)?;
            tracing::info!(verifier = name, weights = %weights.display(), ms = started.elapsed().as_millis() as u64, "loaded the local verifier");
            let c = VerifierDefaults {
                min_score: v.calibration.min_score,
                min_similarity: v.calibration.min_similarity,
            };
            (Arc::new(v), Some(c))
        }
        VerifierProvider::Tei | VerifierProvider::Rerank => (
            Arc::new(remote::RemoteVerifier::new(name, vc, metrics.clone()).map_err(failed)?),
            None,
        ),
    };
    let defaults = VerifierDefaults {
        min_score: vc
            .min_score
            .or(calibrated.map(|c| c.min_score))
            .unwrap_or(REMOTE_MIN_SCORE),
        min_similarity: vc
            .min_similarity
            .or(calibrated.map(|c| c.min_similarity))
            .unwrap_or(REMOTE_MIN_SIMILARITY),
    };
    let verifier: Arc<dyn Verifier> = if vc.cache_entries == 0 {
        verifier
    } else {
        Arc::new(cached::CachedVerifier::new(
            name,
            verifier,
            vc.cache_entries,
            metrics.clone(),
        ))
    };
    loaded.verifiers.insert(name.to_owned(), verifier);
    loaded.defaults.insert(name.to_owned(), defaults);
    Ok(())
}
