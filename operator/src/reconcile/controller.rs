//! Controller wiring: one kube-runtime `Controller` over all namespaces or one per watched
//! namespace, children watched by label, and the event recorder.

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Service};
use kube::runtime::controller::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Api, Client, Resource};
use std::sync::Arc;

use super::{Context, FIELD_MANAGER, error_policy, reconcile};
use crate::build::MANAGED_BY;
use crate::crd::SemanticCache;

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
