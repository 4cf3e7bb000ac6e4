//! Tests 1–3: a sample reaches Ready, re-applying changes nothing, spec changes reach children.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Secret, Service};
use kube::ResourceExt;
use kube::api::{ListParams, Patch, PatchParams};
use semantis_contract::DataplaneConfig;
use serde_json::json;

use super::harness::{
    Operator, World, condition, condition_now, delete_namespace, manifest, ready_now, wait_for,
};

fn config_of(cm: &ConfigMap) -> DataplaneConfig {
    let text = cm
        .data
        .as_ref()
        .and_then(|d| d.get("dataplane.toml"))
        .expect("dataplane.toml in the ConfigMap");
    toml::from_str(text).expect("the rendered config is the contract")
}

/// Every child's resourceVersion, by kind and name.
async fn child_versions(w: &World, cache: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let lp = ListParams::default().labels(&format!("semantis.dev/cache={cache}"));
    let mut out = BTreeMap::new();
    macro_rules! collect {
        ($($k:ty),*) => {$(
            for o in w.api::<$k>().list(&lp).await?.items {
                out.insert(format!("{}/{}", stringify!($k), o.name_any()), o.resource_version().unwrap_or_default());
            }
        )*};
    }
    collect!(
        ConfigMap,
        Secret,
        Service,
        StatefulSet,
        Deployment,
        PersistentVolumeClaim
    );
    Ok(out)
}

#[tokio::test]
async fn a_sample_yields_every_child_and_becomes_ready_only_for_reconciled_generations()
-> anyhow::Result<()> {
    let w = World::new("sample").await?;
    w.secret("team-a-api-key", &[("api-key", "key-a")]).await?;
    let op = Operator::start(false, &w.ns).await?;
    let sample = std::fs::read_to_string(
        super::harness::repo_root()
            .join("config/samples/semantis_v1alpha1_semanticcache_minimal.yaml"),
    )?;
    w.apply_cache(&sample).await?;
    let cache = w.wait_ready("demo").await?;
    let status = cache.status.clone().expect("status");
    assert_eq!(status.observed_generation, cache.metadata.generation);
    assert_eq!(status.active_index.as_ref().map(|i| i.dimension), Some(384));
    assert_eq!(status.tenants, Some(1));
    for t in [
        "RedisReady",
        "PostgresReady",
        "DataplaneReady",
        "IndexReady",
    ] {
        assert!(
            condition_now(&cache, t, "True"),
            "{t}: {:?}",
            condition(&cache, t)
        );
    }
    assert!(condition_now(&cache, "Degraded", "False"));
    // The same truth on the operator's /metrics, which the alerts and the dashboard read.
    let metrics = reqwest::get(&op.metrics_url).await?.text().await?;
    let ready_series = format!(
        "semantis_operator_cache_condition{{cache=\"demo\",namespace=\"{}\",type=\"Ready\"}} 1",
        w.ns
    );
    assert!(
        metrics.contains(&ready_series),
        "{ready_series} not in:\n{metrics}"
    );

    // The children, with the spec the platform team expects.
    let sts = w.api::<StatefulSet>().get("demo-redis").await?;
    assert_eq!(sts.spec.as_ref().and_then(|s| s.replicas), Some(1));
    let owner = &sts.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.controller),
        ("SemanticCache", Some(true))
    );
    let headless = w.api::<Service>().get("demo-redis").await?;
    assert_eq!(
        headless.spec.and_then(|s| s.cluster_ip).as_deref(),
        Some("None")
    );
    let password = w.api::<Secret>().get("demo-redis").await?;
    assert!(
        password
            .data
            .is_some_and(|d| d.get("password").is_some_and(|p| p.0.len() == 32))
    );
    let cfg = config_of(&w.api::<ConfigMap>().get("demo-dataplane").await?);
    assert_eq!(cfg.tenants.len(), 1);
    assert_eq!(
        cfg.tenants[0].api_key_files,
        ["/etc/semantis/tenants/team-a/api-key"]
    );
    assert_eq!(cfg.embedder.dimension, 384);
    assert!(cfg.redis.is_some() && cfg.postgres.is_none());
    let deploy = w.api::<Deployment>().get("demo-dataplane").await?;
    let template = deploy.spec.expect("spec").template;
    assert!(
        template
            .metadata
            .and_then(|m| m.annotations)
            .is_some_and(|a| a.contains_key("semantis.dev/config-hash"))
    );
    let pod = template.spec.expect("pod spec");
    assert_eq!(
        pod.containers[0].args.as_deref().map(|a| a[0].as_str()),
        Some("serve")
    );
    let sc = pod.containers[0]
        .security_context
        .clone()
        .expect("security context");
    assert_eq!(
        (sc.run_as_non_root, sc.allow_privilege_escalation),
        (Some(true), Some(false))
    );
    let pvc = w.api::<PersistentVolumeClaim>().get("demo-data").await?;
    assert_eq!(pvc.status.and_then(|s| s.phase).as_deref(), Some("Bound"));
    assert_eq!(
        w.api::<Service>()
            .get("demo-dataplane")
            .await?
            .spec
            .and_then(|s| s.ports)
            .map(|p| p[0].port),
        Some(8080)
    );

    // With the operator stopped nothing can reconcile: a new generation must not look Ready
    // to a waiter that honours observedGeneration, even though the old Ready=True remains.
    op.stop()?;
    let patched = w
        .caches()
        .patch(
            "demo",
            &PatchParams::apply("e2e-gitops"),
            &Patch::Merge(json!({"spec": {"cache": {"defaultTtlSeconds": 600}}})),
        )
        .await?;
    assert!(condition(&patched, "Ready").is_some_and(|c| c.status == "True"));
    assert!(
        !ready_now(&patched),
        "Ready must not pass for an unreconciled generation"
    );
    let _op = Operator::start(false, &w.ns).await?;
    let cache = w.wait_ready("demo").await?;
    assert_eq!(cache.metadata.generation, patched.metadata.generation);
    let cfg = config_of(&w.api::<ConfigMap>().get("demo-dataplane").await?);
    assert_eq!(cfg.cache.default_ttl_secs, 600);
    delete_namespace(&w.client, &w.ns).await;
    Ok(())
}

#[tokio::test]
async fn reapplying_and_restarting_the_operator_change_no_child() -> anyhow::Result<()> {
    let w = World::new("drift").await?;
    w.secret("team-a-key", &[("api-key", "key-a")]).await?;
    w.secret(
        "s3",
        &[
            ("AWS_ACCESS_KEY_ID", "id"),
            ("AWS_SECRET_ACCESS_KEY", "secret"),
        ],
    )
    .await?;
    let op = Operator::start(false, &w.ns).await?;
    let yaml = manifest(
        "steady",
        "  backup:\n    schedule: \"0 3 * * *\"\n    s3: {bucket: backups, endpoint: \"http://127.0.0.1:9000\"}\n    credentialsSecret: {name: s3}\n",
    );
    w.apply_cache(&yaml).await?;
    let ready = w.wait_ready("steady").await?;
    let before = child_versions(&w, "steady").await?;
    assert!(before.len() >= 7, "children: {before:?}");

    // The GitOps tool re-applies the same manifest: no new generation, no child touched.
    let again = w.apply_cache(&yaml).await?;
    assert_eq!(again.metadata.generation, ready.metadata.generation);
    let runs = op
        .wait_metric("semantis_operator_reconcile_runs_total", |_| true)
        .await?;
    // A restarted operator reconciles everything once on start.
    op.stop()?;
    let op = Operator::start(false, &w.ns).await?;
    op.wait_metric("semantis_operator_reconcile_runs_total", |v| v >= 1.0)
        .await?;
    assert!(runs >= 1.0);
    let after = child_versions(&w, "steady").await?;
    assert_eq!(
        before, after,
        "a reconcile of an unchanged spec must not write children"
    );
    let cache = w.caches().get("steady").await?;
    assert_eq!(
        cache.resource_version(),
        again.resource_version(),
        "status unchanged too"
    );
    delete_namespace(&w.client, &w.ns).await;
    Ok(())
}

#[tokio::test]
async fn spec_changes_reach_the_children_and_removed_tenants_disappear() -> anyhow::Result<()> {
    let w = World::new("change").await?;
    w.secret("team-a-key", &[("api-key", "key-a")]).await?;
    w.secret("team-b-key", &[("api-key", "key-b")]).await?;
    let _op = Operator::start(false, &w.ns).await?;
    w.apply_cache(&manifest("shop", "")).await?;
    w.wait_ready("shop").await?;

    let two_tenants = "apiVersion: semantis.dev/v1alpha1\nkind: SemanticCache\nmetadata: {name: shop}\nspec:\n  embedding: {provider: local, dimension: 384}\n  cache: {defaultTtlSeconds: 3600}\n  redis: {replicas: 2}\n  tenants:\n    - {name: team-a, apiKeySecret: {name: team-a-key, key: api-key}}\n    - {name: team-b, apiKeySecret: {name: team-b-key, key: api-key}, minSimilarity: 0.95}\n";
    w.apply_cache(two_tenants).await?;
    let cache = w.wait_ready("shop").await?;
    assert_eq!(cache.status.and_then(|s| s.tenants), Some(2));
    let sts = wait_for(
        &w.api::<StatefulSet>(),
        "shop-redis",
        "2 ready Redis pods",
        |s| s.status.as_ref().and_then(|st| st.ready_replicas) == Some(2),
    )
    .await?;
    assert_eq!(sts.spec.and_then(|s| s.replicas), Some(2));
    let cfg = config_of(&w.api::<ConfigMap>().get("shop-dataplane").await?);
    assert_eq!(cfg.cache.default_ttl_secs, 3600);
    let names: Vec<_> = cfg.tenants.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["team-a", "team-b"]);
    assert_eq!(cfg.tenants[1].min_similarity, Some(0.95));

    // Removing team-a removes its config and every reference to its Secret.
    let only_b = "apiVersion: semantis.dev/v1alpha1\nkind: SemanticCache\nmetadata: {name: shop}\nspec:\n  embedding: {provider: local, dimension: 384}\n  cache: {defaultTtlSeconds: 3600}\n  redis: {replicas: 2}\n  tenants:\n    - {name: team-b, apiKeySecret: {name: team-b-key, key: api-key}, minSimilarity: 0.95}\n";
    w.apply_cache(only_b).await?;
    let cache = w.wait_ready("shop").await?;
    assert_eq!(cache.status.and_then(|s| s.tenants), Some(1));
    let cfg = config_of(&w.api::<ConfigMap>().get("shop-dataplane").await?);
    assert_eq!(
        cfg.tenants
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>(),
        ["team-b"]
    );
    let deploy = w.api::<Deployment>().get("shop-dataplane").await?;
    let rendered = serde_json::to_string(&deploy.spec)?;
    assert!(
        !rendered.contains("team-a-key"),
        "team-a's Secret is still mounted"
    );
    assert!(rendered.contains("team-b-key"));
    delete_namespace(&w.client, &w.ns).await;
    Ok(())
}

#[tokio::test]
async fn a_missing_tenant_secret_is_named_until_it_appears() -> anyhow::Result<()> {
    let w = World::new("secret").await?;
    let _op = Operator::start(false, &w.ns).await?;
    w.apply_cache(&manifest("waiting", "")).await?;
    let c = w
        .wait_cache("waiting", "DataplaneReady=False (SecretMissing)", |c| {
            condition_now(c, "DataplaneReady", "False")
                && condition(c, "DataplaneReady").is_some_and(|d| d.reason == "SecretMissing")
        })
        .await?;
    let message = &condition(&c, "DataplaneReady").expect("condition").message;
    assert!(
        message.contains("team-a-key") && message.contains("tenant team-a"),
        "{message}"
    );
    assert!(condition_now(&c, "Ready", "False"));
    // Creating the Secret is enough: the operator rechecks without a spec change.
    w.secret("team-a-key", &[("api-key", "key-a")]).await?;
    w.wait_ready("waiting").await?;
    delete_namespace(&w.client, &w.ns).await;
    Ok(())
}
