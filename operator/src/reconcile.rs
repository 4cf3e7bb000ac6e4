//! The reconcile loop: validate → observe → build → apply (server-side, prune) → status.
//! Only this module (and `postgres`) talks to the outside world.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Secret, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams,
    PropagationPolicy,
};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use rand::distr::{Alphanumeric, SampleString};
use semantis_contract::EmbedderConfig;
use serde_json::json;

use crate::build::{
    self, CACHE_LABEL, CONFIG_HASH_ANNOTATION, Child, MANAGED_BY, Observed, PostgresLogin,
    child_names, reindex_job_name, service_monitor_resource,
};
use crate::crd::{DeletionPolicy, IndexStatus, SemanticCache, SemanticCacheStatus};
use crate::metrics::Metrics;
use crate::postgres::{self, Admin};
use crate::status::{self, BackupState, IndexState, Observation, PostgresState, Rollout};
use crate::validate::{self, OperatorDefaults, PostgresSource, ValidatedCache};

pub const FIELD_MANAGER: &str = "semantis-operator";
pub const FINALIZER: &str = "semantis.dev/cleanup";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to {action}: {source}")]
    Kube {
        action: String,
        #[source]
        source: kube::Error,
    },
    #[error("failed to manage Postgres: {0}")]
    Postgres(#[from] postgres::PostgresError),
    #[error("failed to read Secret {name}: {message}")]
    Secret { name: String, message: String },
    #[error("failed to run the finalizer: {0}")]
    Finalizer(String),
    #[error("failed to apply children: {0}")]
    Apply(String),
}

impl Error {
    /// Bounded label for the failures metric.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Kube { .. } => "kube",
            Self::Postgres(_) => "postgres",
            Self::Secret { .. } => "secret",
            Self::Finalizer(_) => "finalizer",
            Self::Apply(_) => "apply",
        }
    }
}

fn kube_err(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let action = action.into();
    move |source| Error::Kube { action, source }
}

pub struct Context {
    pub client: Client,
    pub defaults: OperatorDefaults,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
}

async fn publish(
    ctx: &Context,
    cache: &SemanticCache,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = KubeEvent {
        type_,
        reason: reason.to_owned(),
        note: Some(note),
        action: reason.to_owned(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &cache.object_ref(&())).await {
        tracing::warn!(error = %e, "failed to publish an event");
    }
}

pub async fn reconcile(cache: Arc<SemanticCache>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let ns = cache.namespace().unwrap_or_default();
    let api: Api<SemanticCache> = Api::namespaced(ctx.client.clone(), &ns);
    let inner = ctx.clone();
    let result = finalizer(&api, FINALIZER, cache, move |event| async move {
        match event {
            Finalizer::Apply(c) => apply(c, inner).await,
            Finalizer::Cleanup(c) => cleanup(c, inner).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(inner)
        | kube::runtime::finalizer::Error::CleanupFailed(inner) => inner,
        other => Error::Finalizer(other.to_string()),
    });
    ctx.metrics
        .observe_reconcile(started.elapsed(), result.as_ref().err().map(Error::kind));
    result
}

pub fn error_policy(_cache: Arc<SemanticCache>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(%error, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

async fn apply(cache: Arc<SemanticCache>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = cache.namespace().unwrap_or_default();
    let name = cache.name_any();
    let generation = cache.metadata.generation.unwrap_or(0);
    let api: Api<SemanticCache> = Api::namespaced(ctx.client.clone(), &ns);
    if validate::is_paused(&cache) {
        tracing::info!(%ns, %name, "paused; leaving children as they are");
        return Ok(Action::await_change());
    }
    // The active index lives in status, so it must never be read stale: the reflector's copy
    // can predate this operator's own last status write (a Job event racing a status patch),
    // and acting on it would restart a migration that already finished. A GET is quorum-read.
    let fresh = api
        .get_status(&name)
        .await
        .map_err(kube_err(format!("read SemanticCache {name}")))?;
    if fresh.metadata.generation != cache.metadata.generation {
        // A newer spec is on its way through the watch; reconcile that one.
        return Ok(Action::requeue(Duration::from_millis(200)));
    }
    let previous = fresh.status.clone().unwrap_or_default();

    let valid = match validate::validate(&cache, &ctx.defaults) {
        Ok(v) => v,
        Err(invalid) => {
            let message = invalid.to_string();
            let conditions = status::stamp(
                status::invalid_spec_conditions(generation, &message),
                &previous.conditions,
                Timestamp::now(),
            );
            let next = SemanticCacheStatus {
                observed_generation: Some(generation),
                conditions,
                ..previous.clone()
            };
            if next != previous {
                publish(&ctx, &cache, EventType::Warning, "InvalidSpec", message).await;
                write_status(&api, &name, &next).await?;
            }
            // Only a spec change can fix this: wait for one.
            return Ok(Action::await_change());
        }
    };

    let observed = observe(&ctx, &valid, &previous).await?;
    let children = build::build(&valid, &observed.inputs);
    let mut apply_error = None;
    let mut applied: BTreeMap<(String, String), DynamicObject> = BTreeMap::new();
    for child in &children {
        match apply_child(&ctx.client, &ns, child).await {
            Ok(obj) => {
                applied.insert((child.kind().to_owned(), child.name().to_owned()), obj);
            }
            Err(e) => {
                tracing::warn!(error = %e, kind = child.kind(), child = child.name(), "apply failed");
                apply_error = Some(format!("{} {}: {e}", child.kind(), child.name()));
            }
        }
    }
    if apply_error.is_none() {
        prune(&ctx, &valid, &children, observed.inputs.service_monitor_crd).await?;
    }

    let names = child_names(&name);
    let redis = rollout_of_statefulset(applied.get(&("StatefulSet".into(), names.redis.clone())));
    let dataplane =
        rollout_of_deployment(applied.get(&("Deployment".into(), names.dataplane.clone())));
    let backup = backup_state(
        &valid,
        applied.get(&("CronJob".into(), names.backup.clone())),
    );
    let observation = Observation {
        generation,
        redis,
        dataplane,
        postgres: observed.postgres.clone(),
        index: observed.index.clone(),
        backup,
        service_monitor_crd: valid
            .service_monitor
            .then_some(observed.inputs.service_monitor_crd),
        apply_error: apply_error.clone(),
        missing_secrets: observed.missing_secrets.clone(),
    };
    let conditions = status::stamp(
        status::conditions(&observation),
        &previous.conditions,
        Timestamp::now(),
    );
    let next = SemanticCacheStatus {
        observed_generation: Some(generation),
        conditions,
        active_index: Some(index_status(&observed.active_spec, &observed.inputs.active)),
        target_index: observed
            .inputs
            .target
            .as_ref()
            .map(|t| index_status(&valid.embedding, t)),
        tenants: Some(valid.tenants.len() as u32),
        last_backup: last_backup(applied.get(&("CronJob".into(), names.backup.clone()))),
    };
    if next != previous {
        announce(&ctx, &cache, &previous, &next).await;
        write_status(&api, &name, &next).await?;
    }
    ctx.metrics.observe_cache(&ns, &name, Some(&next));
    if let Some(err) = apply_error {
        return Err(Error::Apply(err));
    }
    // Conditions nothing watches: a Postgres outage and a missing ServiceMonitor CRD.
    // User Secrets carry no owner reference, so nothing triggers a reconcile when one appears.
    let crd_missing = valid.service_monitor && !observed.inputs.service_monitor_crd;
    if matches!(observed.postgres, PostgresState::Failed { .. })
        || crd_missing
        || !observed.missing_secrets.is_empty()
    {
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    Ok(Action::requeue(Duration::from_secs(300)))
}

/// Events for the transitions a platform team wants in `kubectl describe`.
async fn announce(
    ctx: &Context,
    cache: &SemanticCache,
    previous: &SemanticCacheStatus,
    next: &SemanticCacheStatus,
) {
    let status_of = |s: &SemanticCacheStatus, t: &str| {
        s.conditions
            .iter()
            .find(|c| c.type_ == t)
            .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
    };
    for t in ["Ready", "Degraded", "IndexReady", "PostgresReady"] {
        let (before, after) = (status_of(previous, t), status_of(next, t));
        if before.as_ref().map(|b| (&b.0, &b.1)) != after.as_ref().map(|a| (&a.0, &a.1))
            && let Some((status, reason, message)) = after
        {
            let bad =
                (t == "Degraded" && status == "True") || (t != "Degraded" && status == "False");
            let kind = if bad {
                EventType::Warning
            } else {
                EventType::Normal
            };
            publish(
                ctx,
                cache,
                kind,
                &reason,
                format!("{t}={status}: {message}"),
            )
            .await;
        }
    }
    if previous.active_index.as_ref().map(|i| &i.fingerprint)
        != next.active_index.as_ref().map(|i| &i.fingerprint)
        && previous.active_index.is_some()
        && let Some(active) = &next.active_index
    {
        publish(
            ctx,
            cache,
            EventType::Normal,
            "IndexSwitched",
            format!(
                "the dataplane now serves index {} ({} dimensions)",
                active.fingerprint, active.dimension
            ),
        )
        .await;
    }
}

fn index_status(spec: &crate::crd::EmbeddingSpec, e: &EmbedderConfig) -> IndexStatus {
    IndexStatus {
        fingerprint: e.fingerprint(),
        dimension: e.dimension as u32,
        embedding: spec.clone(),
    }
}

async fn write_status(
    api: &Api<SemanticCache>,
    name: &str,
    status: &SemanticCacheStatus,
) -> Result<(), Error> {
    // Server-side apply of the whole status: fields this reconcile no longer sets (a finished
    // migration's target) are removed, which a merge patch would leave behind.
    let patch = json!({
        "apiVersion": SemanticCache::api_version(&()),
        "kind": SemanticCache::kind(&()),
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(kube_err(format!(
        "write the status of SemanticCache {name}"
    )))?;
    Ok(())
}

struct ObservedState {
    inputs: Observed,
    missing_secrets: Vec<String>,
    /// The spec form of the active embedder (for status).
    active_spec: crate::crd::EmbeddingSpec,
    postgres: PostgresState,
    index: IndexState,
}

async fn read_secret(client: &Client, ns: &str, name: &str) -> Result<Option<Secret>, Error> {
    Api::<Secret>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(kube_err(format!("read Secret {name}")))
}

fn secret_value(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .and_then(|v| String::from_utf8(v.0.clone()).ok())
        .filter(|v| !v.is_empty())
}

fn generate_password() -> String {
    Alphanumeric.sample_string(&mut rand::rng(), 32)
}

async fn observe(
    ctx: &Context,
    c: &ValidatedCache,
    previous: &SemanticCacheStatus,
) -> Result<ObservedState, Error> {
    let client = &ctx.client;
    let ns = &c.namespace;
    let names = child_names(&c.name);

    let redis_password = match read_secret(client, ns, &names.redis).await? {
        Some(s) => secret_value(&s, "password").unwrap_or_else(generate_password),
        None => generate_password(),
    };

    let (postgres_login, postgres_state) = match &c.postgres {
        None => (None, PostgresState::Embedded),
        Some(pg) => match &pg.source {
            PostgresSource::Existing(secret) => {
                match read_secret(client, ns, &secret.name).await? {
                    Some(s) => match secret_value(&s, "username") {
                        Some(username) => (
                            Some(PostgresLogin {
                                username,
                                managed_password: None,
                            }),
                            PostgresState::Ready,
                        ),
                        None => (
                            None,
                            PostgresState::Failed {
                                reason: "CredentialsInvalid".into(),
                                message: format!("Secret {} has no username key", secret.name),
                            },
                        ),
                    },
                    None => (
                        None,
                        PostgresState::Failed {
                            reason: "CredentialsMissing".into(),
                            message: format!("Secret {} does not exist", secret.name),
                        },
                    ),
                }
            }
            PostgresSource::Admin(admin_secret) => {
                let role = pg.managed_role();
                let password = match read_secret(client, ns, &names.postgres).await? {
                    Some(s) => secret_value(&s, "password").unwrap_or_else(generate_password),
                    None => generate_password(),
                };
                let state = match read_secret(client, ns, &admin_secret.name).await? {
                    None => PostgresState::Failed {
                        reason: "AdminSecretMissing".into(),
                        message: format!("Secret {} does not exist", admin_secret.name),
                    },
                    Some(s) => match (secret_value(&s, "username"), secret_value(&s, "password")) {
                        (Some(user), Some(admin_password)) => {
                            let admin = Admin {
                                host: pg.host.clone(),
                                port: pg.port,
                                username: user,
                                password: admin_password,
                            };
                            match postgres::ensure_spawned(
                                admin,
                                role.clone(),
                                password.clone(),
                                pg.database.clone(),
                            )
                            .await
                            {
                                Ok(()) => PostgresState::Ready,
                                Err(e) => PostgresState::Failed {
                                    reason: "ProvisioningFailed".into(),
                                    message: e.to_string(),
                                },
                            }
                        }
                        _ => PostgresState::Failed {
                            reason: "AdminSecretInvalid".into(),
                            message: format!(
                                "Secret {} needs username and password keys",
                                admin_secret.name
                            ),
                        },
                    },
                };
                (
                    Some(PostgresLogin {
                        username: role,
                        managed_password: Some(password),
                    }),
                    state,
                )
            }
        },
    };

    // Index versions: a new cache starts on the spec's embedder; afterwards the active one
    // only changes when a reindex Job for the spec's embedder succeeds.
    let wanted = c.embedder.clone();
    let (mut active_spec, mut active) = match &previous.active_index {
        Some(a) => (a.embedding.clone(), validate::embedder_config(&a.embedding)),
        None => (c.embedding.clone(), wanted.clone()),
    };
    let mut target = None;
    let mut reindex_job_exists = false;
    let mut index = IndexState::Serving;
    if active.fingerprint() != wanted.fingerprint() {
        let job_name = reindex_job_name(&c.name, &wanted);
        let job = Api::<Job>::namespaced(client.clone(), ns)
            .get_opt(&job_name)
            .await
            .map_err(kube_err(format!("read Job {job_name}")))?;
        reindex_job_exists = job.is_some();
        let finished = job.as_ref().and_then(job_outcome);
        match finished {
            Some(Ok(())) => {
                active = wanted.clone();
                active_spec = c.embedding.clone();
                publish(
                    ctx,
                    &cache_ref(c),
                    EventType::Normal,
                    "ReindexSucceeded",
                    format!(
                        "Job {job_name} rebuilt the index for embedder {}",
                        wanted.fingerprint()
                    ),
                )
                .await;
            }
            Some(Err(message)) => {
                index = IndexState::Failed {
                    target: wanted.fingerprint(),
                    message,
                };
                target = Some(wanted.clone());
            }
            None => {
                index = IndexState::Migrating {
                    target: wanted.fingerprint(),
                };
                target = Some(wanted.clone());
            }
        }
    }

    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let service_monitor_crd = c.service_monitor
        && crds
            .get_opt("servicemonitors.monitoring.coreos.com")
            .await
            .map_err(kube_err("look up the ServiceMonitor CRD"))?
            .is_some();

    // Every Secret the pods mount or read: a missing one would leave them pending with only a
    // pod event to say why; the condition names it instead.
    let mut references: Vec<(String, Option<String>, String)> = c
        .tenants
        .iter()
        .map(|t| {
            (
                t.api_key_secret.name.clone(),
                Some(t.api_key_secret.key.clone()),
                format!("tenant {}", t.name),
            )
        })
        .collect();
    if let Some(k) = &c.embedding.api_key_secret {
        references.push((k.name.clone(), Some(k.key.clone()), "the embedder".into()));
    }
    if let Some(b) = &c.backup {
        references.push((b.credentials_secret.name.clone(), None, "backups".into()));
    }
    let mut missing_secrets = Vec::new();
    for (name, key, user) in references {
        let secret = read_secret(client, ns, &name).await?;
        let present = match (&secret, &key) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(s), Some(k)) => s.data.as_ref().is_some_and(|d| d.contains_key(k)),
        };
        if !present {
            missing_secrets.push(match key {
                Some(k) => format!("Secret {name} (key {k}, {user})"),
                None => format!("Secret {name} ({user})"),
            });
        }
    }

    let mut inputs = Observed {
        redis_password,
        postgres: postgres_login,
        active,
        target,
        start_reindex: false,
        service_monitor_crd,
    };
    if inputs.target.is_some() {
        inputs.start_reindex =
            reindex_job_exists || dual_writes_rolled_out(client, c, &inputs).await?;
    }
    Ok(ObservedState {
        missing_secrets,
        inputs,
        active_spec,
        postgres: postgres_state,
        index,
    })
}

/// A stand-in object reference for events raised while observing.
fn cache_ref(c: &ValidatedCache) -> SemanticCache {
    let mut cache = SemanticCache::new(
        &c.name,
        crate::crd::SemanticCacheSpec {
            embedding: c.embedding.clone(),
            cache: None,
            tenants: Vec::new(),
            redis: None,
            postgres: None,
            dataplane: None,
            backup: None,
            monitoring: None,
            paused: None,
        },
    );
    cache.metadata.namespace = Some(c.namespace.clone());
    cache.metadata.uid = Some(c.uid.clone());
    cache
}

/// Ok when the Job completed, Err(reason) when it failed, None while it runs or is absent.
fn job_outcome(job: &Job) -> Option<Result<(), String>> {
    let conditions = job.status.as_ref()?.conditions.as_ref()?;
    for c in conditions {
        if c.status != "True" {
            continue;
        }
        match c.type_.as_str() {
            "Complete" => return Some(Ok(())),
            "Failed" => {
                return Some(Err(c
                    .reason
                    .clone()
                    .or_else(|| c.message.clone())
                    .unwrap_or_else(|| "Failed".to_owned())));
            }
            _ => {}
        }
    }
    None
}

async fn apply_child(client: &Client, ns: &str, child: &Child) -> Result<DynamicObject, Error> {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &child.resource);
    api.patch(
        child.name(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&child.object),
    )
    .await
    .map_err(kube_err(format!("apply {} {}", child.kind(), child.name())))
}

/// Kinds the operator creates and may delete when the spec no longer wants them. PVCs are
/// never pruned: losing the LanceDB volume is a decision for `kubectl delete`, not a reconcile.
fn prunable(service_monitor: bool) -> Vec<ApiResource> {
    let mut kinds = vec![
        ApiResource::erase::<ConfigMap>(&()),
        ApiResource::erase::<Secret>(&()),
        ApiResource::erase::<Service>(&()),
        ApiResource::erase::<StatefulSet>(&()),
        ApiResource::erase::<Deployment>(&()),
        ApiResource::erase::<CronJob>(&()),
        ApiResource::erase::<Job>(&()),
    ];
    if service_monitor {
        kinds.push(service_monitor_resource());
    }
    kinds
}

async fn prune(
    ctx: &Context,
    c: &ValidatedCache,
    children: &[Child],
    service_monitor_crd: bool,
) -> Result<(), Error> {
    let wanted: BTreeSet<(String, String)> = children
        .iter()
        .map(|ch| (ch.kind().to_owned(), ch.name().to_owned()))
        .collect();
    let selector = format!(
        "{CACHE_LABEL}={},app.kubernetes.io/managed-by={MANAGED_BY}",
        c.name
    );
    for resource in prunable(service_monitor_crd) {
        let api: Api<DynamicObject> =
            Api::namespaced_with(ctx.client.clone(), &c.namespace, &resource);
        let list = api
            .list_metadata(&ListParams::default().labels(&selector))
            .await
            .map_err(kube_err(format!("list {} to prune", resource.kind)))?;
        for obj in list.items {
            let name = obj.name_any();
            // Only what this cache controls: Jobs that the backup CronJob starts carry the same
            // labels but belong to the CronJob.
            let controlled = obj
                .owner_references()
                .iter()
                .any(|o| o.controller == Some(true) && o.uid == c.uid);
            if !controlled || wanted.contains(&(resource.kind.clone(), name.clone())) {
                continue;
            }
            tracing::info!(kind = %resource.kind, %name, "pruning a child the spec no longer wants");
            let params = DeleteParams {
                propagation_policy: Some(PropagationPolicy::Background),
                ..DeleteParams::default()
            };
            match api.delete(&name, &params).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(kube_err(format!("prune {} {name}", resource.kind))(e)),
            }
        }
    }
    Ok(())
}

/// The typed form of an applied child (the apply response carries its current status).
fn typed<K: serde::de::DeserializeOwned>(obj: Option<&DynamicObject>) -> Option<K> {
    obj.and_then(|o| serde_json::to_value(o).ok())
        .and_then(|v| serde_json::from_value(v).ok())
}

/// Whether the workload controller has seen the latest spec.
fn observed(status_generation: Option<i64>, generation: Option<i64>) -> bool {
    status_generation.is_some() && status_generation >= generation
}

fn rollout_of_statefulset(obj: Option<&DynamicObject>) -> Rollout {
    let Some(sts) = typed::<StatefulSet>(obj) else {
        return Rollout::default();
    };
    let status = sts.status.unwrap_or_default();
    Rollout {
        wanted: sts.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1),
        ready: status.ready_replicas.unwrap_or(0),
        updated: status.updated_replicas.unwrap_or(0),
        observed: observed(status.observed_generation, sts.metadata.generation),
    }
}

/// True when the dataplane Deployment runs the config with the migration target on every
/// replica: its pod template carries that config's hash and the rollout is complete.
async fn dual_writes_rolled_out(
    client: &Client,
    c: &ValidatedCache,
    inputs: &Observed,
) -> Result<bool, Error> {
    let name = child_names(&c.name).dataplane;
    let Some(d) = Api::<Deployment>::namespaced(client.clone(), &c.namespace)
        .get_opt(&name)
        .await
        .map_err(kube_err(format!("read Deployment {name}")))?
    else {
        return Ok(false);
    };
    let running = d
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get(CONFIG_HASH_ANNOTATION))
        .cloned();
    Ok(
        running.as_deref() == Some(build::config_hash(c, inputs).as_str())
            && deployment_rollout(d).done(),
    )
}

fn rollout_of_deployment(obj: Option<&DynamicObject>) -> Rollout {
    typed::<Deployment>(obj).map_or_else(Rollout::default, deployment_rollout)
}

fn deployment_rollout(d: Deployment) -> Rollout {
    let status = d.status.unwrap_or_default();
    Rollout {
        wanted: d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1),
        ready: status.available_replicas.unwrap_or(0),
        updated: status.updated_replicas.unwrap_or(0),
        observed: observed(status.observed_generation, d.metadata.generation),
    }
}

fn cronjob(obj: Option<&DynamicObject>) -> Option<CronJob> {
    typed(obj)
}

fn backup_state(c: &ValidatedCache, obj: Option<&DynamicObject>) -> BackupState {
    if c.backup.is_none() {
        return BackupState::NotConfigured;
    }
    let status = cronjob(obj).and_then(|cj| cj.status).unwrap_or_default();
    match (status.last_schedule_time, status.last_successful_time) {
        (None, _) => BackupState::NoRunYet,
        (Some(_), None) if status.active.as_ref().is_some_and(|a| !a.is_empty()) => {
            BackupState::NoRunYet
        }
        (Some(_), None) => BackupState::Failed,
        (Some(scheduled), Some(succeeded)) => {
            let running = status.active.as_ref().is_some_and(|a| !a.is_empty());
            if succeeded.0 >= scheduled.0 || running {
                BackupState::Succeeded
            } else {
                BackupState::Failed
            }
        }
    }
}

fn last_backup(obj: Option<&DynamicObject>) -> Option<crate::crd::BackupStatus> {
    let status = cronjob(obj)?.status?;
    if status.last_schedule_time.is_none() && status.last_successful_time.is_none() {
        return None;
    }
    Some(crate::crd::BackupStatus {
        last_success_time: status.last_successful_time.map(|t| t.0.to_string()),
        last_schedule_time: status.last_schedule_time.map(|t| t.0.to_string()),
    })
}

async fn cleanup(cache: Arc<SemanticCache>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics.observe_cache(
        &cache.namespace().unwrap_or_default(),
        &cache.name_any(),
        None,
    );
    // Children go with their owner reference (garbage collection). What the API server cannot
    // clean up is the Postgres role and database created in admin mode.
    let Ok(valid) = validate::validate(&cache, &ctx.defaults) else {
        return Ok(Action::await_change());
    };
    if let Some(pg) = &valid.postgres
        && let PostgresSource::Admin(admin_secret) = &pg.source
        && pg.deletion_policy == DeletionPolicy::Delete
    {
        let secret = read_secret(&ctx.client, &valid.namespace, &admin_secret.name)
            .await?
            .ok_or_else(|| Error::Secret {
                name: admin_secret.name.clone(),
                message: "the admin Secret is gone; cannot drop the database".into(),
            })?;
        let (Some(user), Some(password)) = (
            secret_value(&secret, "username"),
            secret_value(&secret, "password"),
        ) else {
            return Err(Error::Secret {
                name: admin_secret.name.clone(),
                message: "needs username and password keys".into(),
            });
        };
        let admin = Admin {
            host: pg.host.clone(),
            port: pg.port,
            username: user,
            password,
        };
        postgres::drop_spawned(admin, pg.managed_role(), pg.database.clone()).await?;
        publish(
            &ctx,
            &cache,
            EventType::Normal,
            "PostgresDropped",
            format!(
                "dropped database {} and role {}",
                pg.database,
                pg.managed_role()
            ),
        )
        .await;
    }
    Ok(Action::await_change())
}

/// Runs the controllers until `shutdown` resolves: one over all namespaces, or one per
/// watched namespace. Children are watched by label so a change to one (or its status)
/// re-reconciles its cache.
pub async fn run(
    ctx: Arc<Context>,
    namespaces: Vec<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let scopes: Vec<Option<String>> = if namespaces.is_empty() {
        vec![None]
    } else {
        namespaces.into_iter().map(Some).collect()
    };
    let controllers = scopes.into_iter().map(|ns| {
        let mut stop = stop_rx.clone();
        let stopped = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        run_one(ctx.clone(), ns, stopped)
    });
    futures::future::join_all(controllers).await;
}

async fn run_one(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let caches: Api<SemanticCache> = match &namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    fn owned<K>(client: &Client, namespace: &Option<String>) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        match namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let children =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}"));
    Controller::new(caches, watcher::Config::default())
        .owns(owned::<StatefulSet>(&client, &namespace), children.clone())
        .owns(owned::<Deployment>(&client, &namespace), children.clone())
        .owns(owned::<Job>(&client, &namespace), children.clone())
        .owns(owned::<CronJob>(&client, &namespace), children.clone())
        .owns(owned::<ConfigMap>(&client, &namespace), children.clone())
        .owns(owned::<Service>(&client, &namespace), children.clone())
        .owns(
            owned::<PersistentVolumeClaim>(&client, &namespace),
            children,
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => tracing::debug!(cache = %obj.name, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile error"),
            }
        })
        .await;
}

pub fn recorder(client: Client) -> Recorder {
    Recorder::new(
        client,
        Reporter {
            controller: FIELD_MANAGER.to_owned(),
            instance: std::env::var("POD_NAME").ok(),
        },
    )
}
