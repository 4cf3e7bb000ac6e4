//! Step 5, status: what the applied objects say (rollouts, backups), read purely from the
//! apply responses, and the one write of the cache's status (server-side apply, only when it
//! changed). The conditions themselves are computed in `crate::status`.

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::CronJob;
use kube::Resource;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use semantis_contract::EmbedderConfig;
use serde_json::json;

use super::FIELD_MANAGER;
use crate::crd::{BackupStatus, EmbeddingSpec, IndexStatus, SemanticCache, SemanticCacheStatus};
use crate::status::{BackupState, Rollout};
use crate::validate::ValidatedCache;

#[derive(Debug, thiserror::Error)]
#[error("failed to write the status of SemanticCache {name}: {source}")]
pub struct StatusError {
    pub name: String,
    #[source]
    pub source: kube::Error,
}

pub async fn write(
    api: &Api<SemanticCache>,
    name: &str,
    status: &SemanticCacheStatus,
) -> Result<(), StatusError> {
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
    .map_err(|source| StatusError {
        name: name.to_owned(),
        source,
    })?;
    Ok(())
}

pub fn index_status(spec: &EmbeddingSpec, e: &EmbedderConfig) -> IndexStatus {
    IndexStatus {
        fingerprint: e.fingerprint(),
        dimension: e.dimension as u32,
        embedding: spec.clone(),
    }
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

pub fn rollout_of_statefulset(obj: Option<&DynamicObject>) -> Rollout {
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

pub fn rollout_of_deployment(obj: Option<&DynamicObject>) -> Rollout {
    typed::<Deployment>(obj).map_or_else(Rollout::default, deployment_rollout)
}

pub fn deployment_rollout(d: Deployment) -> Rollout {
    let status = d.status.unwrap_or_default();
    Rollout {
        wanted: d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1),
        ready: status.available_replicas.unwrap_or(0),
        updated: status.updated_replicas.unwrap_or(0),
        observed: observed(status.observed_generation, d.metadata.generation),
    }
}

pub fn backup_state(c: &ValidatedCache, obj: Option<&DynamicObject>) -> BackupState {
    if c.backup.is_none() {
        return BackupState::NotConfigured;
    }
    let status = typed::<CronJob>(obj)
        .and_then(|cj| cj.status)
        .unwrap_or_default();
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

pub fn last_backup(obj: Option<&DynamicObject>) -> Option<BackupStatus> {
    let status = typed::<CronJob>(obj)?.status?;
    if status.last_schedule_time.is_none() && status.last_successful_time.is_none() {
        return None;
    }
    Some(BackupStatus {
        last_success_time: status.last_successful_time.map(|t| t.0.to_string()),
        last_schedule_time: status.last_schedule_time.map(|t| t.0.to_string()),
    })
}
