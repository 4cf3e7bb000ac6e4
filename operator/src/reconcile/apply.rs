//! Step 4, apply: the writes. Postgres provisioning through the admin login, server-side apply
//! of every built child with field manager `semantis-operator`, then pruning of what the cache
//! controls and no longer wants.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams,
    PropagationPolicy,
};
use kube::{Client, ResourceExt};

use super::FIELD_MANAGER;
use super::observe::{PostgresPlan, unprovisioned_state};
use crate::build::{CACHE_LABEL, Child, MANAGED_BY, service_monitor_resource};
use crate::postgres;
use crate::status::PostgresState;
use crate::validate::ValidatedCache;

/// One child the API server refused.
#[derive(Debug, thiserror::Error)]
#[error("failed to apply {kind} {name}: {source}")]
pub struct ChildError {
    pub kind: String,
    pub name: String,
    #[source]
    pub source: kube::Error,
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Some children failed to apply (the others were applied).
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Children(Vec<ChildError>),
    #[error("failed to {action}: {source}")]
    Prune {
        action: String,
        #[source]
        source: kube::Error,
    },
}

/// Provision the role and database in admin mode (idempotent); a failure is a state for the
/// PostgresReady condition, not an error: the rest of the cache is still applied.
pub async fn provision_postgres(plan: &PostgresPlan) -> PostgresState {
    if let Some(state) = unprovisioned_state(plan) {
        return state;
    }
    let PostgresPlan::Admin {
        admin,
        login,
        database,
        owner,
    } = plan
    else {
        return PostgresState::Embedded;
    };
    let password = login.managed_password.clone().unwrap_or_default();
    match postgres::ensure_spawned(
        admin.clone(),
        login.username.clone(),
        password,
        database.clone(),
        owner.clone(),
    )
    .await
    {
        Ok(()) => PostgresState::Ready,
        Err(e @ postgres::PostgresError::NotOurs { .. }) => PostgresState::Failed {
            reason: "RoleNotOurs".into(),
            message: e.to_string(),
        },
        Err(e) => PostgresState::Failed {
            reason: "ProvisioningFailed".into(),
            message: e.to_string(),
        },
    }
}

/// The objects as applied, by (kind, name), and the children that failed.
pub type Applied = BTreeMap<(String, String), DynamicObject>;

/// Apply every child; one failure does not stop the others.
pub async fn apply_children(
    client: &Client,
    ns: &str,
    children: &[Child],
) -> (Applied, Option<ApplyError>) {
    let mut applied = Applied::new();
    let mut failed = Vec::new();
    for child in children {
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &child.resource);
        match api
            .patch(
                child.name(),
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&child.object),
            )
            .await
        {
            Ok(obj) => {
                applied.insert((child.kind().to_owned(), child.name().to_owned()), obj);
            }
            Err(source) => {
                tracing::warn!(error = %source, kind = child.kind(), child = child.name(), "apply failed");
                failed.push(ChildError {
                    kind: child.kind().to_owned(),
                    name: child.name().to_owned(),
                    source,
                });
            }
        }
    }
    let error = (!failed.is_empty()).then_some(ApplyError::Children(failed));
    (applied, error)
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

/// Delete children of a prunable kind that carry the cache's labels, are controlled by this
/// cache's uid and are no longer wanted.
pub async fn prune(
    client: &Client,
    c: &ValidatedCache,
    children: &[Child],
    service_monitor_crd: bool,
) -> Result<(), ApplyError> {
    let wanted: BTreeSet<(String, String)> = children
        .iter()
        .map(|ch| (ch.kind().to_owned(), ch.name().to_owned()))
        .collect();
    let selector = format!(
        "{CACHE_LABEL}={},app.kubernetes.io/managed-by={MANAGED_BY}",
        c.name
    );
    for resource in prunable(service_monitor_crd) {
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &c.namespace, &resource);
        let list = api
            .list_metadata(&ListParams::default().labels(&selector))
            .await
            .map_err(|source| ApplyError::Prune {
                action: format!("list {} to prune", resource.kind),
                source,
            })?;
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
                Err(source) => {
                    return Err(ApplyError::Prune {
                        action: format!("prune {} {name}", resource.kind),
                        source,
                    });
                }
            }
        }
    }
    Ok(())
}
