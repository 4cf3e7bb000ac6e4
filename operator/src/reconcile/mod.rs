//! The reconcile pipeline, after the Stackable operators: validate (pure, `crate::validate`) →
//! observe (read-only, [`observe`]) → decide the index (pure, [`index`]) → build (pure,
//! `crate::build`) → apply (Postgres provisioning, server-side apply, prune, [`apply`]) →
//! status (conditions in `crate::status`, the write in [`status`]). Events are [`events`],
//! deletion [`cleanup`], controller wiring [`controller`]. Each step has its own error type;
//! [`Error`] joins them with their sources.

mod apply;
mod cleanup;
mod controller;
mod events;
pub mod index;
mod observe;
mod status;

use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::{EventType, Recorder};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Client, ResourceExt};

pub use self::apply::ApplyError;
pub use self::cleanup::CleanupError;
pub use self::controller::{recorder, run};
pub use self::observe::ObserveError;
pub use self::status::StatusError;
use crate::build::{self, BuildError, Observed, child_names, reindex_job_name};
use crate::crd::{SemanticCache, SemanticCacheStatus};
use crate::metrics::Metrics;
use crate::status::{Observation, PostgresState};
use crate::validate::{self, OperatorDefaults};

pub const FIELD_MANAGER: &str = "semantis-operator";
pub const FINALIZER: &str = "semantis.dev/cleanup";

/// A reconcile's failure: which step, with that step's error as the source. All of them are
/// transient (an invalid spec is not an error: it is a status condition and a wait).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Observe(#[from] ObserveError),
    #[error("failed to build the children: {0}")]
    Build(#[from] BuildError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error(transparent)]
    Status(#[from] StatusError),
    #[error(transparent)]
    Cleanup(#[from] CleanupError),
    #[error("failed to run the finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
}

impl Error {
    /// Bounded label for the failures metric.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Observe(_) | Self::Status(_) => "kube",
            Self::Build(_) => "build",
            Self::Apply(_) => "apply",
            Self::Cleanup(CleanupError::Postgres(_)) => "postgres",
            Self::Cleanup(CleanupError::Read(_)) => "kube",
            Self::Finalizer(_) => "finalizer",
        }
    }
}

pub struct Context {
    pub client: Client,
    pub defaults: OperatorDefaults,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
}

pub async fn reconcile(cache: Arc<SemanticCache>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let ns = cache.namespace().unwrap_or_default();
    let api: Api<SemanticCache> = Api::namespaced(ctx.client.clone(), &ns);
    let inner = ctx.clone();
    let result = finalizer(&api, FINALIZER, cache, move |event| async move {
        match event {
            Finalizer::Apply(c) => reconcile_spec(c, inner).await,
            Finalizer::Cleanup(c) => Ok(cleanup::cleanup(c, inner).await?),
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(inner)
        | kube::runtime::finalizer::Error::CleanupFailed(inner) => inner,
        other => Error::Finalizer(Box::new(other)),
    });
    ctx.metrics
        .observe_reconcile(started.elapsed(), result.as_ref().err().map(Error::kind));
    result
}

pub fn error_policy(_cache: Arc<SemanticCache>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(%error, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

/// One pass of the pipeline for a cache that is not being deleted.
async fn reconcile_spec(cache: Arc<SemanticCache>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = cache.namespace().unwrap_or_default();
    let name = cache.name_any();
    let generation = cache.metadata.generation.unwrap_or(0);
    let api: Api<SemanticCache> = Api::namespaced(ctx.client.clone(), &ns);
    if validate::is_paused(&cache) {
        tracing::info!(%ns, %name, "paused; leaving children as they are");
        return Ok(Action::await_change());
    }
    // The active index lives in status, so it must never be read stale: acting on the
    // reflector's copy could restart a migration that already finished.
    let fresh = observe::fresh(&api, &name).await?;
    if fresh.metadata.generation != cache.metadata.generation {
        // A newer spec is on its way through the watch; reconcile that one.
        return Ok(Action::requeue(Duration::from_millis(200)));
    }
    let previous = fresh.status.clone().unwrap_or_default();

    // 1. validate
    let valid = match validate::validate(&cache, &ctx.defaults) {
        Ok(v) => v,
        Err(invalid) => {
            let message = invalid.to_string();
            let conditions = crate::status::stamp(
                crate::status::invalid_spec_conditions(generation, &message),
                &previous.conditions,
                Timestamp::now(),
            );
            let next = SemanticCacheStatus {
                observed_generation: Some(generation),
                conditions,
                ..previous.clone()
            };
            if next != previous {
                events::publish(&ctx, &cache, EventType::Warning, "InvalidSpec", message).await;
                status::write(&api, &name, &next).await?;
            }
            // Only a spec change can fix this: wait for one.
            return Ok(Action::await_change());
        }
    };

    // 2. observe, 3. decide the index
    let facts = observe::observe(&ctx.client, &valid, &previous).await?;
    let decision = index::decide_index(&valid, previous.active_index.as_ref(), &facts.reindex_job);
    if decision.switched {
        events::publish(
            &ctx,
            &cache,
            EventType::Normal,
            "ReindexSucceeded",
            format!(
                "Job {} rebuilt the index for embedder {}",
                reindex_job_name(&valid.name, &valid.embedder),
                valid.embedder.fingerprint()
            ),
        )
        .await;
    }
    let mut inputs = Observed {
        redis_password: facts.redis_password.clone(),
        postgres: facts.postgres.login().cloned(),
        active: decision.active.clone(),
        target: decision.target.clone(),
        start_reindex: false,
        service_monitor_crd: facts.service_monitor_crd,
    };
    if inputs.target.is_some() {
        // The Job may start once every replica runs the config with the target (dual writes).
        let serving_hash = build::config_hash(&valid, &inputs)?;
        let rolled_out = facts
            .dataplane
            .as_ref()
            .is_some_and(|d| d.rolled_out && d.config_hash.as_deref() == Some(&serving_hash));
        inputs.start_reindex = decision.job_exists || rolled_out;
    }

    // 4. apply: Postgres, then the built children, then prune
    let postgres_state = apply::provision_postgres(&facts.postgres).await;
    let children = build::build(&valid, &inputs)?;
    let (applied, apply_error) = apply::apply_children(&ctx.client, &ns, &children).await;
    if apply_error.is_none() {
        apply::prune(&ctx.client, &valid, &children, inputs.service_monitor_crd).await?;
    }

    // 5. status
    let names = child_names(&name);
    let get = |kind: &str, child: &str| applied.get(&(kind.to_owned(), child.to_owned()));
    let observation = Observation {
        generation,
        redis: status::rollout_of_statefulset(get("StatefulSet", &names.redis)),
        dataplane: status::rollout_of_deployment(get("Deployment", &names.dataplane)),
        postgres: postgres_state.clone(),
        index: decision.state.clone(),
        backup: status::backup_state(&valid, get("CronJob", &names.backup)),
        service_monitor_crd: valid.service_monitor.then_some(inputs.service_monitor_crd),
        apply_error: apply_error.as_ref().map(ToString::to_string),
        missing_secrets: facts.missing_secrets.clone(),
    };
    let conditions = crate::status::stamp(
        crate::status::conditions(&observation),
        &previous.conditions,
        Timestamp::now(),
    );
    let next = SemanticCacheStatus {
        observed_generation: Some(generation),
        conditions,
        active_index: Some(status::index_status(
            &decision.active_spec,
            &decision.active,
        )),
        target_index: decision
            .target
            .as_ref()
            .map(|t| status::index_status(&valid.embedding, t)),
        tenants: Some(valid.tenants.len() as u32),
        last_backup: status::last_backup(get("CronJob", &names.backup)),
    };
    if next != previous {
        events::announce(&ctx, &cache, &previous, &next).await;
        status::write(&api, &name, &next).await?;
    }
    ctx.metrics.observe_cache(&ns, &name, Some(&next));
    if let Some(err) = apply_error {
        return Err(err.into());
    }
    // Conditions nothing watches: a Postgres outage and a missing ServiceMonitor CRD.
    // User Secrets carry no owner reference, so nothing triggers a reconcile when one appears.
    let crd_missing = valid.service_monitor && !inputs.service_monitor_crd;
    if matches!(postgres_state, PostgresState::Failed { .. })
        || crd_missing
        || !facts.missing_secrets.is_empty()
    {
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    Ok(Action::requeue(Duration::from_secs(300)))
}
