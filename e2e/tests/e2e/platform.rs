//! Tests 5–9: validation, deletion with Postgres cleanup, the ServiceMonitor, namespaces and
//! leader election, and the real dataplane on the rendered ConfigMap.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use semantis_operator::crd::SemanticCache;
use serde_json::json;

use super::harness::{
    DEADLINE, Operator, World, binary, condition, condition_now, delete_namespace, install_crd,
    manifest, wait_for, wait_gone,
};

/// The loopback Postgres: `SEMANTIS_TEST_POSTGRES_URL`, else the one `scripts/services.sh`
/// starts (idempotent).
fn postgres_url() -> String {
    if let Ok(url) = std::env::var("SEMANTIS_TEST_POSTGRES_URL") {
        return url;
    }
    let script = super::harness::repo_root().join("scripts/services.sh");
    let out = Command::new("bash")
        .arg(script)
        .arg("start")
        .output()
        .expect("services.sh runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("SEMANTIS_TEST_POSTGRES_URL="))
        .expect("services.sh prints SEMANTIS_TEST_POSTGRES_URL")
        .to_owned()
}

/// Host and port of the loopback Postgres.
fn postgres_host_port() -> (String, u16) {
    let url = postgres_url();
    let rest = url.split('@').nth(1).expect("user@host in the URL");
    let hostport = rest.split('/').next().expect("host:port");
    let (host, port) = hostport.split_once(':').expect("host:port");
    (host.to_owned(), port.parse().expect("numeric port"))
}

async fn pg_exists(role: &str, database: &str) -> anyhow::Result<(bool, bool)> {
    use sqlx::Row;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&postgres_url())
        .await?;
    let r: i64 = sqlx::query("SELECT count(*) FROM pg_roles WHERE rolname = $1")
        .bind(role)
        .fetch_one(&pool)
        .await?
        .try_get(0)?;
    let d: i64 = sqlx::query("SELECT count(*) FROM pg_database WHERE datname = $1")
        .bind(database)
        .fetch_one(&pool)
        .await?
        .try_get(0)?;
    pool.close().await;
    Ok((r > 0, d > 0))
}

fn postgres_section(database: &str, policy: &str) -> String {
    let (host, port) = postgres_host_port();
    format!(
        "  postgres:\n    host: \"{host}\"\n    port: {port}\n    database: {database}\n    adminSecret: {{name: pg-admin}}\n    deletionPolicy: {policy}\n"
    )
}

#[tokio::test]
async fn invalid_manifests_are_rejected_with_the_field_named() -> anyhow::Result<()> {
    let w = World::new("invalid").await?;
    let cases = [
        (
            "  embedding:\n    provider: local\n    dimension: 384\n",
            "  embedding:\n    provider: local\n    dimension: 768\n",
            "spec.embedding.dimension",
        ),
        (
            "",
            "  dataplane: {replicas: 3}\n",
            "spec.dataplane.replicas",
        ),
        (
            "    - name: team-a\n",
            "    - name: Team_A\n",
            "spec.tenants[0].name",
        ),
        (
            "",
            "  cache: {minSimilarity: 1.5}\n",
            "spec.cache.minSimilarity",
        ),
        (
            "",
            "    - name: team-a\n      apiKeySecret: {name: k, key: api-key}\n",
            "tenant names must be unique",
        ),
        (
            "",
            "  embedding:\n    provider: ollama\n    dimension: 768\n",
            "spec.embedding.endpoint",
        ),
        ("", "  redis: {maxMemory: lots}\n", "spec.redis.maxMemory"),
        ("", "  postgres: {host: db}\n", "adminSecret"),
    ];
    for (i, (from, to, field)) in cases.iter().enumerate() {
        let base = manifest(&format!("bad-{i}"), "");
        let yaml = if from.is_empty() {
            if to.starts_with("    - ") {
                base.replace("  tenants:\n", &format!("  tenants:\n{to}"))
            } else if to.starts_with("  embedding:") {
                base.replace(
                    "  embedding:\n    provider: local\n    dimension: 384\n",
                    to,
                )
            } else {
                format!("{base}{to}")
            }
        } else {
            base.replace(from, to)
        };
        let mut cache: SemanticCache = serde_yaml::from_str(&yaml).with_context(|| yaml.clone())?;
        cache.metadata.namespace = Some(w.ns.clone());
        match w.caches().create(&PostParams::default(), &cache).await {
            Err(kube::Error::Api(e)) => {
                assert_eq!(e.code, 422, "{field}: {e:?}");
                assert!(
                    e.message.contains(field),
                    "the message should name {field}: {}",
                    e.message
                );
            }
            Ok(_) => bail!("accepted an invalid manifest ({field}):\n{yaml}"),
            Err(e) => bail!("unexpected error for {field}: {e}"),
        }
    }
    assert!(
        w.caches().list(&Default::default()).await?.items.is_empty(),
        "nothing was stored"
    );
    delete_namespace(&w.client, &w.ns).await;
    Ok(())
}

#[tokio::test]
async fn deleting_removes_children_and_drops_postgres_only_with_policy_delete() -> anyhow::Result<()>
{
    let w = World::new("delete").await?;
    w.secret("team-a-key", &[("api-key", "key-a")]).await?;
    w.secret(
        "pg-admin",
        &[("username", "postgres"), ("password", "admin")],
    )
    .await?;
    let _op = Operator::start(false, &w.ns).await?;
    let tag = std::process::id();
    let (drop_db, keep_db) = (format!("e2e_drop_{tag}"), format!("e2e_keep_{tag}"));
    w.apply_cache(&manifest("dropme", &postgres_section(&drop_db, "Delete")))
        .await?;
    w.apply_cache(&manifest("keepme", &postgres_section(&keep_db, "Retain")))
        .await?;
    for name in ["dropme", "keepme"] {
        let c = w.wait_ready(name).await?;
        assert!(
            condition_now(&c, "PostgresReady", "True"),
            "{:?}",
            condition(&c, "PostgresReady")
        );
    }
    assert_eq!(pg_exists(&drop_db, &drop_db).await?, (true, true));
    assert_eq!(pg_exists(&keep_db, &keep_db).await?, (true, true));
    let creds = w.api::<Secret>().get("dropme-postgres").await?;
    assert!(
        creds
            .data
            .is_some_and(|d| d.contains_key("password") && d.contains_key("username"))
    );

    for name in ["dropme", "keepme"] {
        w.caches().delete(name, &DeleteParams::foreground()).await?;
    }
    for name in ["dropme", "keepme"] {
        wait_gone(&w.caches(), name).await?;
        wait_gone(&w.api::<Deployment>(), &format!("{name}-dataplane")).await?;
        wait_gone(&w.api::<StatefulSet>(), &format!("{name}-redis")).await?;
        wait_gone(&w.api::<ConfigMap>(), &format!("{name}-dataplane")).await?;
    }
    assert_eq!(
        pg_exists(&drop_db, &drop_db).await?,
        (false, false),
        "policy Delete drops"
    );
    assert_eq!(
        pg_exists(&keep_db, &keep_db).await?,
        (true, true),
        "policy Retain keeps"
    );
    // Leave the shared Postgres as we found it.
    drop_by_hand(&keep_db).await?;
    delete_namespace(&w.client, &w.ns).await;
    Ok(())
}

/// The note of the first event `reason` about SemanticCache `name`: watched until it appears.
async fn wait_event(w: &World, name: &str, reason: &str) -> anyhow::Result<String> {
    use futures::StreamExt as _;
    use kube::runtime::{WatchStreamExt as _, watcher};
    let events: Api<k8s_openapi::api::events::v1::Event> = w.api();
    let mut stream = watcher(events, watcher::Config::default())
        .applied_objects()
        .boxed();
    let found = async {
        while let Some(e) = stream.next().await {
            let Ok(e) = e else { continue };
            if e.reason.as_deref() == Some(reason)
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
            {
                return Some(e.note.unwrap_or_default());
            }
        }
        None
    };
    match tokio::time::timeout(DEADLINE, found).await {
        Ok(Some(note)) => Ok(note),
        Ok(None) => bail!("the event watch ended before a {reason} event about {name}"),
        Err(_) => bail!("no {reason} event about {name} within {DEADLINE:?}"),
    }
}

/// Drop a database and the role of the same name by hand: what a test leaves in the shared
/// Postgres on purpose.
async fn drop_by_hand(database: &str) -> anyhow::Result<()> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&postgres_url())
        .await?;
    sqlx::raw_sql(&format!(
        "DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"
    ))
    .execute(&pool)
    .await?;
    sqlx::raw_sql(&format!("DROP ROLE IF EXISTS \"{database}\""))
        .execute(&pool)
        .await?;
    pool.close().await;
    Ok(())
}

/// Deletion converges. A spec made invalid after the database was created still drops it
/// (before, cleanup gave up on any invalid spec and left the database silently); with the
/// admin Secret gone the deletion finishes (before, it retried forever and held the cache)
/// and an event names the database and role left behind.
#[tokio::test]
async fn deletion_converges_with_an_invalid_spec_and_without_the_admin_secret() -> anyhow::Result<()>
{
    let w = World::new("converge").await?;
    w.secret("team-a-key", &[("api-key", "key-a")]).await?;
    w.secret(
        "pg-admin",
        &[("username", "postgres"), ("password", "admin")],
    )
    .await?;
    let _op = Operator::start(false, &w.ns).await?;
    let tag = std::process::id();
    let (invalid_db, orphan_db) = (format!("e2e_invalid_{tag}"), format!("e2e_orphan_{tag}"));
    w.apply_cache(&manifest(
        "invalid",
        &postgres_section(&invalid_db, "Delete"),
    ))
    .await?;
    w.apply_cache(&manifest("orphan", &postgres_section(&orphan_db, "Delete")))
        .await?;
    for name in ["invalid", "orphan"] {
        w.wait_ready(name).await?;
    }
    assert_eq!(pg_exists(&invalid_db, &invalid_db).await?, (true, true));
    assert_eq!(pg_exists(&orphan_db, &orphan_db).await?, (true, true));

    // A remote provider without a model name: the operator refuses it, the API's rules do not.
    w.caches()
        .patch(
            "invalid",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"embedding": {"provider": "tei", "endpoint": "http://127.0.0.1:9"}}})),
        )
        .await?;
    wait_for(&w.caches(), "invalid", "the spec refused", |c| {
        condition_now(c, "Ready", "False")
    })
    .await?;
    w.caches()
        .delete("invalid", &DeleteParams::foreground())
        .await?;
    wait_gone(&w.caches(), "invalid").await?;
    assert_eq!(
        pg_exists(&invalid_db, &invalid_db).await?,
        (false, false),
        "an invalid spec still drops the database"
    );

    w.api::<Secret>()
        .delete("pg-admin", &DeleteParams::default())
        .await?;
    w.caches()
        .delete("orphan", &DeleteParams::foreground())
        .await?;
    wait_gone(&w.caches(), "orphan").await?;
    let note = wait_event(&w, "orphan", "PostgresLeftBehind").await?;
    assert!(
        note.contains(&orphan_db) && note.contains("pg-admin"),
        "the event names what was left and why: {note}"
    );
    assert_eq!(pg_exists(&orphan_db, &orphan_db).await?, (true, true));
    drop_by_hand(&orphan_db).await?;
    delete_namespace(&w.client, &w.ns).await;
    Ok(())
}

fn service_monitor_crd() -> anyhow::Result<CustomResourceDefinition> {
    // The part of prometheus-operator's CRD the operator relies on: the kind exists.
    Ok(serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": { "name": "servicemonitors.monitoring.coreos.com" },
        "spec": {
            "group": "monitoring.coreos.com",
            "names": { "kind": "ServiceMonitor", "listKind": "ServiceMonitorList", "plural": "servicemonitors", "singular": "servicemonitor" },
            "scope": "Namespaced",
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "schema": { "openAPIV3Schema": { "type": "object", "x-kubernetes-preserve-unknown-fields": true } }
            }]
        }
    }))?)
}

#[tokio::test]
async fn the_service_monitor_appears_once_its_crd_is_installed() -> anyhow::Result<()> {
    let w = World::new("monitor").await?;
    let crds: Api<CustomResourceDefinition> = Api::all(w.client.clone());
    if crds
        .get_opt("servicemonitors.monitoring.coreos.com")
        .await?
        .is_some()
    {
        crds.delete(
            "servicemonitors.monitoring.coreos.com",
            &DeleteParams::default(),
        )
        .await?;
        wait_gone(&crds, "servicemonitors.monitoring.coreos.com").await?;
    }
    w.secret("team-a-key", &[("api-key", "key-a")]).await?;
    let _op = Operator::start(false, &w.ns).await?;
    w.apply_cache(&manifest(
        "mon",
        "  monitoring:\n    serviceMonitor: true\n    labels: {release: prom}\n",
    ))
    .await?;
    let c = w
        .wait_cache(
            "mon",
            "Ready with MonitoringReady=False (CRD missing)",
            |c| condition_now(c, "MonitoringReady", "False") && condition_now(c, "Ready", "True"),
        )
        .await?;
    assert_eq!(
        condition(&c, "MonitoringReady").map(|x| x.reason.as_str()),
        Some("ServiceMonitorCRDMissing")
    );
    assert!(
        condition_now(&c, "Ready", "True"),
        "monitoring does not block serving"
    );

    install_crd(&w.client, service_monitor_crd()?).await?;
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("monitoring.coreos.com", "v1", "ServiceMonitor"),
        "servicemonitors",
    );
    let monitors: Api<DynamicObject> = Api::namespaced_with(w.client.clone(), &w.ns, &resource);
    let sm = wait_for(&monitors, "mon-dataplane", "the ServiceMonitor", |_| true).await?;
    assert_eq!(
        sm.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("release"))
            .map(String::as_str),
        Some("prom")
    );
    assert_eq!(sm.data["spec"]["endpoints"][0]["port"], "metrics");
    w.wait_cache("mon", "MonitoringReady=True", |c| {
        condition_now(c, "MonitoringReady", "True")
    })
    .await?;
    delete_namespace(&w.client, &w.ns).await;
    Ok(())
}

#[tokio::test]
async fn caches_in_two_namespaces_stay_separate_and_a_standby_takes_over() -> anyhow::Result<()> {
    let w = World::new("leader").await?;
    let other = World::namespace(&w.client, "leader-b").await?;
    let other_secrets: Api<Secret> = Api::namespaced(w.client.clone(), &other);
    w.secret("team-a-key", &[("api-key", "key-a")]).await?;
    other_secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"metadata": {"name": "team-a-key"}, "stringData": {"api-key": "key-b"}}),
            )?,
        )
        .await?;

    let first = Operator::start(true, &w.ns).await?;
    first
        .wait_metric("semantis_operator_leader", |v| v == 1.0)
        .await?;
    let standby = Operator::start(true, &w.ns).await?;
    assert_eq!(
        standby.metric("semantis_operator_leader").await,
        Some(0.0),
        "the second process stands by"
    );

    w.apply_cache(&manifest("same", "")).await?;
    let other_caches: Api<SemanticCache> = Api::namespaced(w.client.clone(), &other);
    let mut c: SemanticCache =
        serde_yaml::from_str(&manifest("same", "  cache: {minSimilarity: 0.97}\n"))?;
    c.metadata.namespace = Some(other.clone());
    other_caches
        .patch("same", &PatchParams::apply("e2e-gitops"), &Patch::Apply(&c))
        .await?;
    w.wait_ready("same").await?;
    wait_for(
        &other_caches,
        "same",
        "Ready in the second namespace",
        super::harness::ready_now,
    )
    .await?;
    let cm_a = w.api::<ConfigMap>().get("same-dataplane").await?;
    let cm_b = Api::<ConfigMap>::namespaced(w.client.clone(), &other)
        .get("same-dataplane")
        .await?;
    let floor = |cm: &ConfigMap| -> Option<f32> {
        let cfg: semantis_contract::DataplaneConfig =
            toml::from_str(&cm.data.as_ref().expect("data")["dataplane.toml"]).expect("contract");
        cfg.cache.min_similarity
    };
    assert_eq!(
        (floor(&cm_a), floor(&cm_b)),
        (None, Some(0.97)),
        "each namespace has its own config"
    );
    assert_ne!(
        w.api::<Secret>().get("same-redis").await?.data,
        Api::<Secret>::namespaced(w.client.clone(), &other)
            .get("same-redis")
            .await?
            .data,
        "each cache has its own Redis password"
    );

    // The leader stops; the standby takes the lease and reconciles the next change.
    first.stop()?;
    standby
        .wait_metric("semantis_operator_leader", |v| v == 1.0)
        .await?;
    c.spec.cache = Some(serde_json::from_value(json!({"minSimilarity": 0.99}))?);
    other_caches
        .patch("same", &PatchParams::apply("e2e-gitops"), &Patch::Apply(&c))
        .await?;
    wait_for(
        &other_caches,
        "same",
        "Ready after the takeover",
        super::harness::ready_now,
    )
    .await?;
    let cm_b = Api::<ConfigMap>::namespaced(w.client.clone(), &other)
        .get("same-dataplane")
        .await?;
    assert_eq!(floor(&cm_b), Some(0.99));
    delete_namespace(&w.client, &other).await;
    delete_namespace(&w.client, &w.ns).await;
    Ok(())
}

#[tokio::test]
async fn an_operator_watching_two_namespaces_leaves_a_third_alone() -> anyhow::Result<()> {
    let w = World::new("watch-a").await?;
    let b = World::namespace(&w.client, "watch-b").await?;
    let outside = World::namespace(&w.client, "watch-c").await?;
    for ns in [&w.ns, &b, &outside] {
        let secrets: Api<Secret> = Api::namespaced(w.client.clone(), ns);
        secrets
            .create(
                &PostParams::default(),
                &serde_json::from_value(
                    json!({"metadata": {"name": "team-a-key"}, "stringData": {"api-key": "k"}}),
                )?,
            )
            .await?;
    }
    // The unwatched cache exists first, so a reconcile of it would come before the others.
    let apply = |ns: String| {
        let client = w.client.clone();
        async move {
            let mut c: SemanticCache = serde_yaml::from_str(&manifest("scoped", ""))?;
            c.metadata.namespace = Some(ns.clone());
            Api::<SemanticCache>::namespaced(client, &ns)
                .patch(
                    "scoped",
                    &PatchParams::apply("e2e-gitops"),
                    &Patch::Apply(&c),
                )
                .await?;
            anyhow::Ok(())
        }
    };
    apply(outside.clone()).await?;
    let _op =
        Operator::start_with(false, &w.ns, &["--namespace", &format!("{},{b}", w.ns)]).await?;
    apply(w.ns.clone()).await?;
    apply(b.clone()).await?;
    w.wait_ready("scoped").await?;
    let in_b: Api<SemanticCache> = Api::namespaced(w.client.clone(), &b);
    wait_for(
        &in_b,
        "scoped",
        "Ready in the second watched namespace",
        super::harness::ready_now,
    )
    .await?;
    let untouched = Api::<SemanticCache>::namespaced(w.client.clone(), &outside)
        .get("scoped")
        .await?;
    assert!(
        untouched.status.is_none(),
        "an unwatched namespace got a status"
    );
    assert!(
        untouched.metadata.finalizers.is_none(),
        "an unwatched namespace got a finalizer"
    );
    assert!(
        Api::<ConfigMap>::namespaced(w.client.clone(), &outside)
            .get_opt("scoped-dataplane")
            .await?
            .is_none()
    );
    for ns in [&b, &outside, &w.ns] {
        delete_namespace(&w.client, ns).await;
    }
    Ok(())
}

fn model_dir() -> PathBuf {
    std::env::var("SEMANTIS_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/semantis/models/all-MiniLM-L6-v2")
        })
}

struct Proc(std::process::Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

#[tokio::test]
async fn the_dataplane_serves_from_the_configmap_the_operator_rendered() -> anyhow::Result<()> {
    let w = World::new("contract").await?;
    w.secret("team-a-key", &[("api-key", "contract-key")])
        .await?;
    w.secret(
        "pg-admin",
        &[("username", "postgres"), ("password", "admin")],
    )
    .await?;
    let _op = Operator::start(false, &w.ns).await?;
    let db = format!("e2e_contract_{}", std::process::id());
    w.apply_cache(&manifest("live", &postgres_section(&db, "Delete")))
        .await?;
    w.wait_ready("live").await?;

    // Stand in for the pod's volumes: the same files under a temporary root.
    let root = tempfile::tempdir()?;
    let secret = |name: &str, key: &str| {
        let api = w.api::<Secret>();
        let (name, key) = (name.to_owned(), key.to_owned());
        async move {
            let s = api.get(&name).await?;
            let v = s
                .data
                .and_then(|d| d.get(&key).cloned())
                .context("key present")?;
            anyhow::Ok(String::from_utf8(v.0)?)
        }
    };
    let etc = root.path().join("etc/semantis");
    for (dir, file, value) in [
        (
            "tenants/team-a",
            "api-key",
            secret("team-a-key", "api-key").await?,
        ),
        ("redis", "password", secret("live-redis", "password").await?),
        (
            "postgres",
            "password",
            secret("live-postgres", "password").await?,
        ),
    ] {
        std::fs::create_dir_all(etc.join(dir))?;
        std::fs::write(etc.join(dir).join(file), value)?;
    }
    let redis_password = secret("live-redis", "password").await?;
    let redis_port = free_port();
    let _redis = Proc(
        Command::new("redis-server")
            .args([
                "--port",
                &redis_port.to_string(),
                "--bind",
                "127.0.0.1",
                "--requirepass",
                &redis_password,
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .context("failed to start redis-server")?,
    );

    let cm = w.api::<ConfigMap>().get("live-dataplane").await?;
    let rendered = cm
        .data
        .and_then(|d| d.get("dataplane.toml").cloned())
        .context("dataplane.toml")?;
    let local = rendered
        .replace("/etc/semantis", &etc.display().to_string())
        .replace(
            "/var/lib/semantis",
            &root.path().join("data").display().to_string(),
        )
        .replace(
            "/opt/semantis/models/all-MiniLM-L6-v2",
            &model_dir().display().to_string(),
        );
    let config = root.path().join("dataplane.toml");
    std::fs::write(&config, local)?;
    let port = free_port();
    let log = root.path().join("dataplane.log");
    let _dataplane = Proc(
        Command::new(binary("semantis-dataplane"))
            .arg("serve")
            .arg("--config")
            .arg(&config)
            // Only the addresses differ from the pod: loopback instead of cluster DNS.
            .env("SEMANTIS_SERVER__LISTEN", format!("127.0.0.1:{port}"))
            .env(
                "SEMANTIS_REDIS__URL",
                format!("redis://127.0.0.1:{redis_port}"),
            )
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::create(root.path().join("dataplane.err"))?)
            .spawn()
            .context("failed to start the dataplane")?,
    );
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    loop {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await
            && r.status().is_success()
        {
            break;
        }
        if started.elapsed() > DEADLINE {
            bail!(
                "the dataplane did not become ready: {}",
                std::fs::read_to_string(root.path().join("dataplane.err")).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let store = http
        .post(format!("{base}/v1/entries"))
        .bearer_auth("contract-key")
        .json(&json!({"prompt": "How do I rotate my API key?", "response": {"choices": [{"message": {"role": "assistant", "content": "Settings → Keys → Rotate."}}]}}))
        .send()
        .await?;
    assert_eq!(store.status().as_u16(), 201, "{}", store.text().await?);
    let lookup: serde_json::Value = http
        .post(format!("{base}/v1/lookup"))
        .bearer_auth("contract-key")
        .json(&json!({"prompt": "how can I rotate my api key"}))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(lookup["hit"], true, "{lookup}");
    assert_eq!(
        lookup["response"]["choices"][0]["message"]["content"],
        "Settings → Keys → Rotate."
    );
    let wrong = http
        .post(format!("{base}/v1/lookup"))
        .bearer_auth("not-a-key")
        .json(&json!({"prompt": "x"}))
        .send()
        .await?;
    assert_eq!(wrong.status().as_u16(), 401);
    drop(_dataplane);
    w.caches()
        .delete("live", &DeleteParams::foreground())
        .await?;
    wait_gone(&w.caches(), "live").await?;
    delete_namespace(&w.client, &w.ns).await;
    Ok(())
}
