//! Test 4: an embedder change runs a reindex Job; success switches the active index, failure
//! degrades and keeps the old one, reverting cancels.

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::ResourceExt;
use kube::api::ListParams;
use semantis_contract::DataplaneConfig;

use super::harness::{Operator, World, condition, condition_now, delete_namespace, wait_gone};

fn with_embedding(embedding: &str) -> String {
    format!(
        "apiVersion: semantis.dev/v1alpha1\nkind: SemanticCache\nmetadata: {{name: idx}}\nspec:\n  embedding: {embedding}\n  tenants:\n    - {{name: team-a, apiKeySecret: {{name: team-a-key, key: api-key}}}}\n"
    )
}

async fn rendered(w: &World) -> anyhow::Result<DataplaneConfig> {
    let cm = w.api::<ConfigMap>().get("idx-dataplane").await?;
    let text = cm
        .data
        .and_then(|d| d.get("dataplane.toml").cloned())
        .unwrap_or_default();
    Ok(toml::from_str(&text)?)
}

async fn reindex_jobs(w: &World) -> anyhow::Result<Vec<Job>> {
    let lp =
        ListParams::default().labels("semantis.dev/cache=idx,app.kubernetes.io/component=reindex");
    Ok(w.api::<Job>().list(&lp).await?.items)
}

#[tokio::test]
async fn an_embedder_change_reindexes_switches_on_success_degrades_on_failure_and_reverts()
-> anyhow::Result<()> {
    let w = World::new("reindex").await?;
    w.secret("team-a-key", &[("api-key", "key-a")]).await?;
    let _op = Operator::start(false, &w.ns).await?;
    w.apply_cache(&with_embedding("{provider: local, dimension: 384}"))
        .await?;
    let start = w.wait_ready("idx").await?;
    let local_fp = start
        .status
        .and_then(|s| s.active_index)
        .expect("active")
        .fingerprint;

    // A new model and dimension: the Job runs (kwok completes it) and the switch happens.
    let tei = "{provider: tei, model: bge-base-en, dimension: 768, endpoint: \"http://tei:80\"}";
    w.apply_cache(&with_embedding(tei)).await?;
    let migrating = w
        .wait_cache("idx", "a target index in status", |c| {
            c.status.as_ref().is_some_and(|s| {
                s.target_index.is_some()
                    || s.active_index.as_ref().is_some_and(|a| a.dimension == 768)
            })
        })
        .await?;
    let switched = w
        .wait_cache("idx", "active index 768 at the current generation", |c| {
            c.status.as_ref().is_some_and(|s| {
                s.active_index.as_ref().is_some_and(|a| a.dimension == 768)
                    && s.target_index.is_none()
            }) && condition_now(c, "IndexReady", "True")
        })
        .await?;
    assert!(migrating.metadata.generation <= switched.metadata.generation);
    let tei_fp = switched
        .status
        .as_ref()
        .and_then(|s| s.active_index.as_ref())
        .expect("active")
        .fingerprint
        .clone();
    assert_ne!(tei_fp, local_fp);
    let cfg = rendered(&w).await?;
    assert_eq!(
        (cfg.embedder.dimension, cfg.embedder.fingerprint()),
        (768, tei_fp.clone())
    );
    assert!(cfg.target_embedder.is_none());
    // The finished Job is no longer wanted.
    for job in reindex_jobs(&w).await? {
        wait_gone(&w.api::<Job>(), &job.name_any()).await?;
    }

    // A model that cannot load: the Job fails, the cache degrades, the old index keeps serving.
    let failing =
        "{provider: tei, model: e2e-failing-model, dimension: 1024, endpoint: \"http://tei:80\"}";
    w.apply_cache(&with_embedding(failing)).await?;
    let degraded = w
        .wait_cache("idx", "Degraded=True (ReindexFailed)", |c| {
            condition_now(c, "Degraded", "True")
                && condition(c, "Degraded").is_some_and(|d| d.reason == "ReindexFailed")
        })
        .await?;
    let status = degraded.status.clone().expect("status");
    assert_eq!(
        status.active_index.as_ref().map(|a| a.fingerprint.clone()),
        Some(tei_fp.clone())
    );
    assert_eq!(
        status.target_index.as_ref().map(|t| t.dimension),
        Some(1024)
    );
    assert!(
        condition_now(&degraded, "Ready", "True"),
        "the old index keeps serving: {:#?}",
        degraded.status
    );
    let cfg = rendered(&w).await?;
    assert_eq!(cfg.embedder.fingerprint(), tei_fp);
    let failed_jobs = reindex_jobs(&w).await?;
    assert_eq!(failed_jobs.len(), 1);

    // Reverting the spec cancels the migration: no target, no Job, not degraded.
    w.apply_cache(&with_embedding(tei)).await?;
    let reverted = w
        .wait_cache("idx", "no target and Degraded=False", |c| {
            c.status.as_ref().is_some_and(|s| s.target_index.is_none())
                && condition_now(c, "Degraded", "False")
                && condition_now(c, "Ready", "True")
        })
        .await?;
    assert_eq!(
        reverted
            .status
            .and_then(|s| s.active_index)
            .map(|a| a.fingerprint),
        Some(tei_fp)
    );
    wait_gone(&w.api::<Job>(), &failed_jobs[0].name_any()).await?;
    assert!(rendered(&w).await?.target_embedder.is_none());
    delete_namespace(&w.client, &w.ns).await;
    Ok(())
}
