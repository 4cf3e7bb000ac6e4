//! The index decision, purely: from the spec's embedder, the active index recorded in status
//! and the reindex Job's outcome, which version serves, which one a migration builds, and
//! whether the migration just finished. Observe reads the Job; nothing here touches the API.

use semantis_contract::EmbedderConfig;

use crate::crd::{EmbeddingSpec, IndexStatus};
use crate::status::IndexState;
use crate::validate::{self, ValidatedCache};

/// The reindex Job for the spec's embedder, as observe found it.
#[derive(Debug, Clone, PartialEq)]
pub enum ReindexJob {
    Absent,
    Running,
    Succeeded,
    Failed(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct IndexDecision {
    /// The index version the dataplane serves, and the spec form it was made from.
    pub active: EmbedderConfig,
    pub active_spec: EmbeddingSpec,
    /// The version a migration is building (also while it has failed).
    pub target: Option<EmbedderConfig>,
    pub state: IndexState,
    /// The reindex Job exists (it may be kept whatever the rollout says).
    pub job_exists: bool,
    /// The Job has just finished: the target became the active version.
    pub switched: bool,
}

/// The active version before this reconcile: status's, or the spec's for a new cache.
pub fn previous_active(
    c: &ValidatedCache,
    previous: Option<&IndexStatus>,
) -> (EmbeddingSpec, EmbedderConfig) {
    match previous {
        Some(a) => (a.embedding.clone(), validate::embedder_config(&a.embedding)),
        None => (c.embedding.clone(), c.embedder.clone()),
    }
}

/// Whether a migration is wanted, so observe knows to read the reindex Job.
pub fn migration_wanted(c: &ValidatedCache, previous: Option<&IndexStatus>) -> bool {
    previous_active(c, previous).1.fingerprint() != c.embedder.fingerprint()
}

/// A new cache starts on the spec's embedder; afterwards the active version only changes
/// when a reindex Job for the spec's embedder succeeds.
pub fn decide_index(
    c: &ValidatedCache,
    previous: Option<&IndexStatus>,
    job: &ReindexJob,
) -> IndexDecision {
    let (active_spec, active) = previous_active(c, previous);
    let wanted = c.embedder.clone();
    let mut decision = IndexDecision {
        active,
        active_spec,
        target: None,
        state: IndexState::Serving,
        job_exists: false,
        switched: false,
    };
    if decision.active.fingerprint() == wanted.fingerprint() {
        return decision;
    }
    decision.job_exists = *job != ReindexJob::Absent;
    match job {
        ReindexJob::Succeeded => {
            decision.active = wanted;
            decision.active_spec = c.embedding.clone();
            decision.switched = true;
        }
        ReindexJob::Failed(message) => {
            decision.state = IndexState::Failed {
                target: wanted.fingerprint(),
                message: message.clone(),
            };
            decision.target = Some(wanted);
        }
        ReindexJob::Absent | ReindexJob::Running => {
            decision.state = IndexState::Migrating {
                target: wanted.fingerprint(),
            };
            decision.target = Some(wanted);
        }
    }
    decision
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::SemanticCache;
    use crate::validate::{OperatorDefaults, validate};

    fn cache(revision: &str) -> ValidatedCache {
        let text = std::fs::read_to_string(format!(
            "{}/../config/samples/semantis_v1alpha1_semanticcache_minimal.yaml",
            crate::manifest_dir()
        ))
        .expect("sample readable");
        let mut cache: SemanticCache = serde_yaml::from_str(&text).expect("sample parses");
        cache.metadata.namespace = Some("team-a".into());
        cache.metadata.uid = Some("uid-1".into());
        cache.spec.embedding.revision = Some(revision.into());
        let defaults = OperatorDefaults {
            dataplane_image: "semantis-dataplane:test".into(),
            redis_image: crate::validate::DEFAULT_REDIS_IMAGE.into(),
        };
        validate(&cache, &defaults).expect("valid")
    }

    fn status_of(c: &ValidatedCache) -> IndexStatus {
        IndexStatus {
            fingerprint: c.embedder.fingerprint(),
            dimension: c.embedder.dimension as u32,
            embedding: c.embedding.clone(),
        }
    }

    #[test]
    fn a_new_cache_serves_the_spec_embedder() {
        let c = cache("a");
        let d = decide_index(&c, None, &ReindexJob::Absent);
        assert_eq!(d.active, c.embedder);
        assert_eq!(
            (d.target, d.state, d.switched),
            (None, IndexState::Serving, false)
        );
        assert!(!migration_wanted(&c, None));
    }

    #[test]
    fn a_changed_embedder_migrates_until_the_job_succeeds() {
        let old = cache("a");
        let new = cache("b");
        let previous = status_of(&old);
        assert!(migration_wanted(&new, Some(&previous)));
        for job in [ReindexJob::Absent, ReindexJob::Running] {
            let d = decide_index(&new, Some(&previous), &job);
            assert_eq!(d.active, old.embedder, "the old index keeps serving");
            assert_eq!(d.target.as_ref(), Some(&new.embedder));
            assert_eq!(
                d.state,
                IndexState::Migrating {
                    target: new.embedder.fingerprint()
                }
            );
            assert_eq!(d.job_exists, job == ReindexJob::Running);
        }
        let done = decide_index(&new, Some(&previous), &ReindexJob::Succeeded);
        assert_eq!(done.active, new.embedder);
        assert_eq!(done.active_spec, new.embedding);
        assert_eq!((done.target, done.switched), (None, true));
    }

    #[test]
    fn a_failed_job_leaves_the_old_index_serving() {
        let old = cache("a");
        let new = cache("b");
        let d = decide_index(
            &new,
            Some(&status_of(&old)),
            &ReindexJob::Failed("BackoffLimitExceeded".into()),
        );
        assert_eq!(d.active, old.embedder);
        assert_eq!(
            d.state,
            IndexState::Failed {
                target: new.embedder.fingerprint(),
                message: "BackoffLimitExceeded".into()
            }
        );
        assert!(d.job_exists && !d.switched);
    }

    #[test]
    fn reverting_the_spec_cancels_the_migration() {
        let old = cache("a");
        let d = decide_index(&old, Some(&status_of(&old)), &ReindexJob::Running);
        assert_eq!((d.target, d.state), (None, IndexState::Serving));
        assert!(
            !d.job_exists,
            "a Job for another embedder is not this cache's to keep"
        );
    }
}
