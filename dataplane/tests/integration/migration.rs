//! Zero-downtime index migration in cluster mode: replicas roll to a config with a
//! `target_embedder` (dual writes), `reindex` fills the target, replicas roll to the new
//! embedder, all under concurrent lookups and stores.

use std::collections::HashSet;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::{Value, json};

use semantis_dataplane::store::lance::Table;

use crate::embedders::{Fault, key_file, start_fake};
use crate::harness::{
    KEY_A, Server, Setup, answer, free_port, fresh_database, metric_sum, private_redis,
    shared_postgres,
};

/// The words of `prompt` reversed: another exact key, the same bag-of-words vector, so only
/// the semantic path can answer it.
fn reordered(prompt: &str) -> String {
    prompt.split(' ').rev().collect::<Vec<_>>().join(" ")
}

fn prompt(i: usize) -> String {
    format!("migration topic {i} alpha{i} beta{} gamma{}", i * 7, i * 13)
}

#[derive(Default)]
struct Load {
    /// Replicas the "Service" routes to; the test swaps them as a rolling update would.
    /// With a generation, bumped at every swap.
    targets: Mutex<(u64, Vec<String>)>,
    /// The generation of the targets the driver's last finished request was sent to. The
    /// driver sends one request at a time, so once this reaches a swap's generation nothing is
    /// in flight to the replaced replicas and they may stop (what endpoint removal before
    /// SIGTERM gives a real rollout).
    settled: AtomicU64,
    failures: Mutex<Vec<String>>,
    /// (prompt, response tag) of every acknowledged store.
    stored: Mutex<Vec<(String, String)>>,
    lookups: Mutex<(u64, u64)>,
    /// The answers of lookups that missed, to say why.
    misses: Mutex<Vec<Value>>,
}

async fn drive(load: Arc<Load>, stop: Arc<AtomicBool>, seeded: usize) {
    let http = reqwest::Client::new();
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let (generation, targets) = load.targets.lock().clone();
        let url = &targets[i % targets.len()];
        if i.is_multiple_of(3) {
            let p = prompt(10_000 + i);
            let tag = format!("live-{i}");
            let res = http
                .post(format!("{url}/v1/entries"))
                .bearer_auth(KEY_A)
                .json(&json!({"prompt": p, "response": answer(&tag)}))
                .send()
                .await;
            match res {
                Ok(r) if r.status().as_u16() == 201 => load.stored.lock().push((p, tag)),
                Ok(r) => {
                    let what = format!(
                        "store {}: {}",
                        r.status(),
                        r.text().await.unwrap_or_default()
                    );
                    load.failures.lock().push(what);
                }
                Err(e) => load.failures.lock().push(format!("store: {e}")),
            }
        } else {
            let p = reordered(&prompt(i % seeded));
            let res = http
                .post(format!("{url}/v1/lookup"))
                .bearer_auth(KEY_A)
                .json(&json!({"prompt": p}))
                .send()
                .await;
            match res {
                Ok(r) if r.status().is_success() => {
                    let v: Value = r.json().await.unwrap_or_default();
                    let hit = v["hit"].as_bool() == Some(true);
                    if !hit {
                        load.misses.lock().push(v);
                    }
                    let mut l = load.lookups.lock();
                    l.0 += 1;
                    l.1 += u64::from(hit);
                }
                Ok(r) => {
                    let what = format!(
                        "lookup {}: {}",
                        r.status(),
                        r.text().await.unwrap_or_default()
                    );
                    load.failures.lock().push(what);
                }
                Err(e) => load.failures.lock().push(format!("lookup: {e}")),
            }
        }
        load.settled.store(generation, Ordering::SeqCst);
    }
}

impl Load {
    /// Route the load to `urls` and wait until no request to the previous targets is in flight.
    async fn route_to(&self, via: &Server, urls: Vec<String>) -> anyhow::Result<()> {
        let generation = {
            let mut t = self.targets.lock();
            *t = (t.0 + 1, urls);
            t.0
        };
        via.eventually(
            "the load driver to leave the old targets",
            Duration::from_secs(10),
            || {
                let settled = self.settled.load(Ordering::SeqCst);
                async move { Ok(settled >= generation) }
            },
        )
        .await
    }
}

/// `semantis-dataplane reindex --config CONFIG`, off the runtime (the fake embedder lives on it).
async fn reindex(config: &std::path::Path) -> anyhow::Result<std::process::Output> {
    let config = config.to_owned();
    Ok(tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_semantis-dataplane"))
            .args(["reindex", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info,lance=warn,lancedb=warn")
            .output()
    })
    .await??)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_change_under_load_loses_nothing_and_fails_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (url, _fake) = start_fake().await?;
    let key = key_file(dir.path())?;
    // Wide fake models: distinct prompts never share a bag-of-words vector.
    let target_section = |model: &str, dim: usize| {
        format!(
            "provider = \"openai\"\nmodel = \"{model}\"\ndimension = {dim}\nendpoint = \"{url}\"\n\
             api_key_file = \"{}\"\ntimeout_ms = 2000\n",
            key.display()
        )
    };
    let cluster = Setup {
        redis_url: Some(private_redis("migration")?),
        postgres_url: Some(fresh_database(&shared_postgres()?).await?),
        min_similarity: Some(0.95),
        embedder: Some(target_section("fake-embed-d256", 256)),
        ..Setup::default()
    };
    let dual = Setup {
        extra: format!(
            "\n[target_embedder]\n{}",
            target_section("fake-embed-d384", 384)
        ),
        ..cluster.clone()
    };
    let migrated = Setup {
        embedder: Some(target_section("fake-embed-d384", 384)),
        // Short, so the test sees the retired version's table go; longer than the old
        // replicas take to drain.
        storage_extra: "retired_grace_secs = 3".into(),
        ..cluster.clone()
    };

    // Version 1 with some history.
    let old = Server::start_replica(dir.path(), "old", &cluster).await?;
    let seeded = 40;
    for i in 0..seeded {
        old.store(
            KEY_A,
            json!({"prompt": prompt(i), "response": answer(&format!("seed-{i}"))}),
        )
        .await?;
    }
    let load = Arc::new(Load::default());
    load.targets.lock().1.push(old.url.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let driver = tokio::spawn(drive(load.clone(), stop.clone(), seeded));

    // Roll to dual writes.
    let mut old = old;
    let dual_replica = Server::start_replica(dir.path(), "dual", &dual).await?;
    load.route_to(&dual_replica, vec![dual_replica.url.clone()])
        .await?;
    assert!(old.stop_gracefully()?, "{}", old.log());

    // The new embedder alone is refused until the target is ready.
    let refused = Server::start_replica(dir.path(), "early", &migrated).await;
    let err = format!(
        "{:#}",
        refused
            .err()
            .expect("a replica on an unbuilt version must not start")
    );
    assert!(err.contains("semantis-dataplane reindex"), "{err}");

    // Reindex while the load runs.
    let out = reindex(&dual_replica.config_path).await?;
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "reindex failed:\n{log}");
    assert!(log.contains("the target index version is ready"), "{log}");
    // Idempotent: a second run finds the target ready and does nothing.
    let again = reindex(&dual_replica.config_path).await?;
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already ready"));

    // Roll to the new embedder.
    let mut dual_replica = dual_replica;
    let new = Server::start_replica(dir.path(), "new", &migrated).await?;
    load.route_to(&new, vec![new.url.clone()]).await?;
    assert!(dual_replica.stop_gracefully()?, "{}", dual_replica.log());
    // Let the load run on the new version for a moment of its own.
    let before = load.lookups.lock().0;
    new.eventually(
        "lookups on the new version",
        Duration::from_secs(10),
        || async { Ok(load.lookups.lock().0 >= before + 50) },
    )
    .await?;
    stop.store(true, Ordering::Relaxed);
    driver.await?;

    let failures = load.failures.lock().clone();
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    let (lookups, hits) = *load.lookups.lock();
    assert_eq!(
        hits,
        lookups,
        "every lookup of a seeded prompt hits, through both switches; the misses: {:?}",
        load.misses.lock()
    );
    let v = new
        .lookup(KEY_A, json!({"prompt": "nothing like anything stored"}))
        .await?;
    assert_eq!(v["hit"], false);

    // Everything acknowledged — seeded, stored during the dual writes, stored after — is in
    // the new version with a vector of the new model (the reordered prompt only matches by
    // vector).
    let stored = load.stored.lock().clone();
    assert!(stored.len() > 20, "the load stored only {}", stored.len());
    let all: Vec<(String, String)> = (0..seeded)
        .map(|i| (prompt(i), format!("seed-{i}")))
        .chain(stored)
        .collect();
    for (p, tag) in &all {
        let v = new.lookup(KEY_A, json!({"prompt": reordered(p)})).await?;
        assert_eq!(
            (
                v["hit"].as_bool(),
                v["path"].as_str(),
                v["response"]["choices"][0]["message"]["content"].as_str()
            ),
            (Some(true), Some("semantic"), Some(tag.as_str())),
            "{p}: {v}"
        );
    }
    let (_, stats, _) = new
        .call(reqwest::Method::GET, "/v1/stats", Some(KEY_A), None)
        .await?;
    assert_eq!(stats["entries"].as_u64(), Some(all.len() as u64), "{stats}");

    // The grace period over, the retired version's table (and its write fence) is deleted;
    // the new one stays.
    let tables = || -> anyhow::Result<Vec<String>> {
        Ok(std::fs::read_dir(new.data_dir.join("lance"))?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("team-a--") && n.ends_with(".lance"))
            .collect())
    };
    new.eventually(
        "the retired table is dropped",
        Duration::from_secs(15),
        || async {
            let fences = std::fs::read_dir(new.data_dir.join("lance"))?
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with("team-a--") && n.ends_with(".fence"))
                .count();
            Ok(tables()?.len() == 1 && fences <= 1)
        },
    )
    .await?;
    let v = new
        .lookup(KEY_A, json!({"prompt": reordered(&prompt(3))}))
        .await?;
    assert_eq!(v["hit"], true, "{v}");
    Ok(())
}

/// The ids in the migration target's table (the one holding 384-dimensional vectors).
async fn target_ids(data_dir: &std::path::Path) -> anyhow::Result<HashSet<String>> {
    let lance = data_dir.join("lance");
    let db = lancedb::connect(&lance.to_string_lossy()).execute().await?;
    for entry in std::fs::read_dir(&lance)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let Some(table) = name.strip_suffix(".lance") else {
            continue;
        };
        if !table.starts_with("team-a--") {
            continue;
        }
        if let Ok(t) = Table::open(&db, table, 384).await {
            return Ok(t.ids(None).await?.into_iter().map(|(id, _)| id).collect());
        }
    }
    Ok(HashSet::new())
}

/// `reindex` in the background, its progress on a metrics port.
fn spawn_reindex(config: &std::path::Path, port: u16) -> anyhow::Result<std::process::Child> {
    Ok(Command::new(env!("CARGO_BIN_EXE_semantis-dataplane"))
        .args(["reindex", "--batch", "4", "--metrics-listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "info,lance=warn,lancedb=warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?)
}

async fn reindexed(http: &reqwest::Client, port: u16) -> f64 {
    match http
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
    {
        Ok(r) => metric_sum(
            &r.text().await.unwrap_or_default(),
            "semantis_reindex_entries_done",
            &[("tenant", "team-a")],
        ),
        Err(_) => 0.0,
    }
}

/// Deletes made while `reindex` runs, is killed (-9) and runs again must stay deleted after
/// the switch to the new version: entries the killed run had copied (the resumed run skips
/// them; its sweep used to look only at what it copied itself, after a fixed two flush
/// intervals), entries deleted before any run copied them, and entries deleted while the
/// resumed run copies.
async fn deletes_during_a_killed_and_resumed_reindex_stay_deleted(
    cluster: bool,
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (url, fake) = start_fake().await?;
    let key = key_file(dir.path())?;
    let section = |model: &str, dim: usize| {
        format!(
            "provider = \"openai\"\nmodel = \"{model}\"\ndimension = {dim}\nendpoint = \"{url}\"\n\
             api_key_file = \"{}\"\ntimeout_ms = 5000\n",
            key.display()
        )
    };
    let base = Setup {
        redis_url: if cluster {
            Some(private_redis("resumed-reindex")?)
        } else {
            None
        },
        postgres_url: if cluster {
            Some(fresh_database(&shared_postgres()?).await?)
        } else {
            None
        },
        min_similarity: Some(0.95),
        embedder: Some(section("fake-embed-d256", 256)),
        ..Setup::default()
    };
    let dual = Setup {
        extra: format!("\n[target_embedder]\n{}", section("fake-embed-d384", 384)),
        ..base.clone()
    };
    let migrated = Setup {
        embedder: Some(section("fake-embed-d384", 384)),
        ..base.clone()
    };

    let seeded = 96;
    let mut old = Server::start_replica(dir.path(), "old", &base).await?;
    let mut ids = Vec::new();
    for i in 0..seeded {
        ids.push(
            old.store(
                KEY_A,
                json!({"prompt": prompt(i), "response": answer(&format!("seed-{i}"))}),
            )
            .await?,
        );
    }
    assert!(old.stop_gracefully()?, "{}", old.log());
    let mut dual_replica = Server::start_replica(dir.path(), "dual", &dual).await?;
    let delete = |i: usize| {
        let (r, id) = (&dual_replica, ids[i].clone());
        async move {
            r.delete_entry(KEY_A, &id).await?;
            anyhow::Ok(i)
        }
    };
    // Each target embedding call takes 100 ms, so the copy of 4 entries at a time is slow
    // enough to kill and to delete under.
    *fake.fault.lock() = Fault::Slow(Duration::from_millis(100));
    let http = reqwest::Client::new();
    let mut deleted = HashSet::new();

    // The first run, killed once it copied a third.
    let port = free_port()?;
    let mut first = spawn_reindex(&dual_replica.config_path, port)?;
    dual_replica
        .eventually(
            "the first run copying a third",
            Duration::from_secs(60),
            || async { Ok(reindexed(&http, port).await >= (seeded / 3) as f64) },
        )
        .await?;
    first.kill()?;
    first.wait()?;
    let copied = target_ids(&dual_replica.data_dir).await?;
    let (was_copied, not_yet): (Vec<usize>, Vec<usize>) =
        (0..seeded).partition(|i| copied.contains(&ids[*i]));
    assert!(
        was_copied.len() >= 8 && not_yet.len() >= 24,
        "copied {} of {seeded}",
        was_copied.len()
    );
    for &i in was_copied.iter().take(8).chain(not_yet.iter().take(8)) {
        deleted.insert(delete(i).await?);
    }

    // The second run, with deletes while it copies.
    let port = free_port()?;
    let second = spawn_reindex(&dual_replica.config_path, port)?;
    dual_replica
        .eventually(
            "the second run copying",
            Duration::from_secs(60),
            || async { Ok(reindexed(&http, port).await > copied.len() as f64) },
        )
        .await?;
    for &i in not_yet.iter().skip(8).step_by(2).take(8) {
        deleted.insert(delete(i).await?);
    }
    let out = tokio::task::spawn_blocking(move || second.wait_with_output()).await??;
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the resumed reindex failed:\n{log}");
    assert!(log.contains("the target index version is ready"), "{log}");
    *fake.fault.lock() = Fault::None;

    // Switch to the new version.
    let new = Server::start_replica(dir.path(), "new", &migrated).await?;
    assert!(dual_replica.stop_gracefully()?, "{}", dual_replica.log());
    let mut wrong = Vec::new();
    for i in 0..seeded {
        let exact = new.lookup(KEY_A, json!({"prompt": prompt(i)})).await?;
        let semantic = new
            .lookup(KEY_A, json!({"prompt": reordered(&prompt(i))}))
            .await?;
        let want = !deleted.contains(&i);
        if exact["hit"].as_bool() != Some(want) || semantic["hit"].as_bool() != Some(want) {
            wrong.push((i, want, exact["hit"].clone(), semantic["hit"].clone()));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {seeded} entries answered wrongly after the switch ({} deleted); (entry, should hit, exact, semantic): {wrong:?}",
        wrong.len(),
        deleted.len()
    );
    let (_, stats, _) = new
        .call(reqwest::Method::GET, "/v1/stats", Some(KEY_A), None)
        .await?;
    assert_eq!(
        stats["entries"].as_u64(),
        Some((seeded - deleted.len()) as u64),
        "{stats}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_during_a_killed_and_resumed_reindex_stay_deleted_in_cluster_mode()
-> anyhow::Result<()> {
    deletes_during_a_killed_and_resumed_reindex_stay_deleted(true).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_during_a_killed_and_resumed_reindex_stay_deleted_in_embedded_mode()
-> anyhow::Result<()> {
    deletes_during_a_killed_and_resumed_reindex_stay_deleted(false).await
}
