//! Cluster mode: replicas sharing Redis (log and hot layer), Postgres and one LanceDB
//! directory, as pods sharing a ReadWriteMany volume would.

use std::time::Duration;

use reqwest::Method;
use serde_json::json;

use crate::harness::{
    KEY_A, Server, Setup, answer, axis, fresh_database, metric_sum, private_redis, scattered,
    services, shared_postgres,
};

async fn cluster_setup(redis_name: &str) -> anyhow::Result<Setup> {
    let redis = private_redis(redis_name)?;
    Ok(Setup {
        redis_url: Some(redis),
        postgres_url: Some(fresh_database(&shared_postgres()?).await?),
        ..Setup::default()
    })
}

#[tokio::test]
async fn a_store_on_one_replica_is_served_by_another_within_a_second() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let setup = cluster_setup("two-replicas").await?;
    let r1 = Server::start_replica(dir.path(), "r1", &setup).await?;
    let r2 = Server::start_replica(dir.path(), "r2", &setup).await?;

    let id = r1
        .store(KEY_A, json!({"prompt": "shared question", "vector": axis(8, 2, 0.0), "response": answer("shared")}))
        .await?;
    // Exact path: the Redis hot layer answers at once.
    let v = r2
        .lookup(KEY_A, json!({"prompt": "shared question"}))
        .await?;
    assert_eq!(
        (v["path"].as_str(), v["entry_id"].as_str()),
        (Some("exact"), Some(id.as_str())),
        "{v}"
    );
    // Semantic path: r2's tail follows the log.
    r2.eventually(
        "the semantic path on the other replica",
        Duration::from_secs(1),
        || async {
            let v = r2
                .lookup(KEY_A, json!({"vector": axis(8, 2, 0.02)}))
                .await?;
            Ok(v["entry_id"].as_str() == Some(id.as_str()))
        },
    )
    .await?;

    // A delete through r2 reaches r1.
    let (status, _, _) = r2
        .call(
            Method::DELETE,
            &format!("/v1/entries/{id}"),
            Some(KEY_A),
            None,
        )
        .await?;
    assert_eq!(status, 204);
    r1.eventually(
        "the delete on the other replica",
        Duration::from_secs(1),
        || async {
            let exact = r1
                .lookup(KEY_A, json!({"prompt": "shared question"}))
                .await?;
            let semantic = r1.lookup(KEY_A, json!({"vector": axis(8, 2, 0.0)})).await?;
            Ok(exact["hit"] == false && semantic["hit"] == false)
        },
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn acknowledged_stores_survive_kill_9_in_cluster_mode() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut setup = cluster_setup("kill9").await?;
    setup.flush_max_rows = 100_000; // nothing reaches LanceDB before the kill
    let r1 = Server::start_replica(dir.path(), "r1", &setup).await?;
    let mut ids = Vec::new();
    for i in 0..30 {
        ids.push(
            r1.store(KEY_A, json!({"prompt": format!("k{i}"), "vector": axis(8, i % 8, i as f32 / 50.0), "response": answer(&i.to_string())}))
                .await?,
        );
    }
    let r1 = r1.restart().await?;
    for (i, id) in ids.iter().enumerate() {
        // Vector only: the answer must come from the rebuilt tail, not the hot layer.
        let v = r1
            .lookup(KEY_A, json!({"vector": axis(8, i % 8, i as f32 / 50.0)}))
            .await?;
        assert_eq!(v["entry_id"].as_str(), Some(id.as_str()), "entry {i}: {v}");
    }
    Ok(())
}

#[tokio::test]
async fn one_leader_flushes_and_every_replica_reads_the_table() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut setup = cluster_setup("leader").await?;
    setup.flush_max_rows = 10;
    let r1 = Server::start_replica(dir.path(), "r1", &setup).await?;
    let r2 = Server::start_replica(dir.path(), "r2", &setup).await?;
    let vector = |i: usize| -> Vec<f32> {
        let mut v = axis(8, i % 8, 0.0);
        v[(i / 8) % 8] += 0.3 + (i as f32) / 200.0;
        v
    };
    for i in 0..60 {
        let through = if i % 2 == 0 { &r1 } else { &r2 };
        through
            .store(KEY_A, json!({"prompt": format!("f{i}"), "vector": vector(i), "response": answer(&i.to_string())}))
            .await?;
    }
    r1.eventually(
        "a flush of every entry",
        Duration::from_secs(20),
        || async {
            let flushed = metric_sum(
                &r1.metrics().await?,
                "semantis_store_flushed_entries_total",
                &[],
            ) + metric_sum(
                &r2.metrics().await?,
                "semantis_store_flushed_entries_total",
                &[],
            );
            Ok(flushed >= 60.0)
        },
    )
    .await?;
    // Exactly one replica flushed (no row was written twice).
    let f1 = metric_sum(
        &r1.metrics().await?,
        "semantis_store_flushed_entries_total",
        &[],
    );
    let f2 = metric_sum(
        &r2.metrics().await?,
        "semantis_store_flushed_entries_total",
        &[],
    );
    assert!(
        f1 == 0.0 || f2 == 0.0,
        "both replicas flushed: {f1} and {f2}"
    );
    // The log was trimmed behind the flush.
    let len = std::process::Command::new("redis-cli")
        .args([
            "-u",
            setup.redis_url.as_deref().unwrap_or_default(),
            "--scan",
            "--pattern",
            "semantis:*:log",
        ])
        .output()?;
    let keys = String::from_utf8_lossy(&len.stdout).to_string();
    for key in keys.lines().filter(|k| !k.is_empty()) {
        let out = std::process::Command::new("redis-cli")
            .args([
                "-u",
                setup.redis_url.as_deref().unwrap_or_default(),
                "XLEN",
                key,
            ])
            .output()?;
        let n: u64 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(u64::MAX);
        assert!(
            n < 60,
            "the log {key} still holds {n} records after the flush"
        );
    }
    for server in [&r1, &r2] {
        for i in (0..60).step_by(7) {
            let v = server.lookup(KEY_A, json!({"vector": vector(i)})).await?;
            assert_eq!(v["response"], answer(&i.to_string()), "entry {i}: {v}");
        }
        let (_, v, _) = server
            .call(Method::GET, "/v1/stats", Some(KEY_A), None)
            .await?;
        assert_eq!(v["entries"], 60, "{v}");
    }
    Ok(())
}

async fn vector_index(s: &Server) -> anyhow::Result<bool> {
    let (_, v, _) = s.call(Method::GET, "/v1/stats", Some(KEY_A), None).await?;
    Ok(v["vector_index"].as_bool().unwrap_or(false))
}

#[tokio::test]
async fn every_replica_learns_of_the_ann_index_at_the_next_flush() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut setup = cluster_setup("ann").await?;
    setup.dimension = 16;
    setup.flush_max_rows = 50;
    // Without the resident index, so lookups go through LanceDB and its IVF-PQ index.
    setup.storage_extra = "index_min_rows = 400\nresident_index = false".into();
    let r1 = Server::start_replica(dir.path(), "r1", &setup).await?;
    let r2 = Server::start_replica(dir.path(), "r2", &setup).await?;
    let vector = |i: u64| scattered(16, i);
    assert!(!vector_index(&r1).await? && !vector_index(&r2).await?);
    for i in 0..450u64 {
        let through = if i % 2 == 0 { &r1 } else { &r2 };
        through
            .store(KEY_A, json!({"prompt": format!("ann {i}"), "vector": vector(i), "response": answer(&i.to_string())}))
            .await?;
    }
    r1.eventually("the ANN index build", Duration::from_secs(120), || async {
        Ok(vector_index(&r1).await? || vector_index(&r2).await?)
    })
    .await?;
    // The replica that did not build it learns at the next flush (one more batch of stores).
    for i in 450..500u64 {
        r1.store(KEY_A, json!({"prompt": format!("ann {i}"), "vector": vector(i), "response": answer(&i.to_string())}))
            .await?;
    }
    r1.eventually(
        "both replicas search the index",
        Duration::from_secs(30),
        || async { Ok(vector_index(&r1).await? && vector_index(&r2).await?) },
    )
    .await?;
    for server in [&r1, &r2] {
        for i in (0..500u64).step_by(50) {
            let v = server.lookup(KEY_A, json!({"vector": vector(i)})).await?;
            assert_eq!(v["response"], answer(&i.to_string()), "entry {i}: {v}");
        }
    }
    Ok(())
}

#[tokio::test]
async fn a_redis_outage_fails_stores_clearly_and_lookups_keep_answering() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let setup = cluster_setup("outage").await?;
    let s = Server::start(dir.path(), &setup).await?;
    s.store(
        KEY_A,
        json!({"prompt": "before", "vector": axis(8, 3, 0.0), "response": answer("b")}),
    )
    .await?;
    services(&["stop-redis", "outage"])?;
    let outcome = async {
        for _ in 0..10 {
            // The exact layer is gone; the tail still answers both paths.
            let v = s.lookup(KEY_A, json!({"prompt": "before"})).await?;
            assert_eq!(v["response"], answer("b"), "{v}");
            let v = s.lookup(KEY_A, json!({"vector": axis(8, 3, 0.01)})).await?;
            assert_eq!(v["hit"], true);
        }
        let (status, v, _) = s
            .call(Method::POST, "/v1/entries", Some(KEY_A), Some(&json!({"prompt": "during", "vector": axis(8, 4, 0.0), "response": answer("d")})))
            .await?;
        assert_eq!((status, v["error"]["code"].as_str()), (503, Some("store_unavailable")), "{v}");
        let (status, v, _) = s.call(Method::GET, "/readyz", None, None).await?;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["degraded"], json!(["redis"]));
        anyhow::Ok(())
    }
    .await;
    services(&["redis", "outage"])?;
    outcome?;
    // Back: stores work again, and the refused store left nothing behind.
    s.eventually("stores after Redis returns", Duration::from_secs(20), || async {
        let (status, _, _) = s
            .call(Method::POST, "/v1/entries", Some(KEY_A), Some(&json!({"prompt": "after", "vector": axis(8, 5, 0.0), "response": answer("a")})))
            .await?;
        Ok(status == 201)
    })
    .await?;
    let v = s.lookup(KEY_A, json!({"prompt": "during"})).await?;
    assert_eq!(v["hit"], false);
    Ok(())
}

/// Rounds of: a store on r1, r1 answering a stream of exact lookups for it, a DELETE through
/// r2 meanwhile. r1 applies the delete a moment after r2 cleared the shared hot layer; a lookup
/// on r1 in that moment reads the entry from its own tail and writes it back. The tombstone the
/// removal left must refuse that write, or the deleted entry is served until its TTL.
#[tokio::test]
async fn a_lagging_replica_never_writes_a_deleted_entry_back_into_the_shared_hot_layer()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let setup = cluster_setup("tombstones").await?;
    let r1 = Server::start_replica(dir.path(), "r1", &setup).await?;
    let r2 = Server::start_replica(dir.path(), "r2", &setup).await?;
    let rounds: u64 = 120;
    let mut violations = 0;
    let mut lookups_during_delete: u64 = 0;
    for round in 0..rounds {
        let prompt = format!("lagging question {round}");
        let vector = scattered(8, round);
        let id = r1
            .store(
                KEY_A,
                json!({"prompt": prompt, "vector": vector, "response": answer("x")}),
            )
            .await?;
        let done = std::sync::atomic::AtomicBool::new(false);
        let hammer = async {
            let mut n: u64 = 0;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                r1.lookup(KEY_A, json!({"prompt": prompt})).await?;
                n += 1;
            }
            anyhow::Ok(n)
        };
        let delete = async {
            let (status, v, _) = r2
                .call(
                    Method::DELETE,
                    &format!("/v1/entries/{id}"),
                    Some(KEY_A),
                    None,
                )
                .await?;
            anyhow::ensure!(status == 204, "delete answered {status}: {v}");
            // Wait until r1 applied the delete: its semantic path misses.
            r1.eventually("r1 applying the delete", Duration::from_secs(2), || async {
                let v = r1.lookup(KEY_A, json!({"vector": vector})).await?;
                Ok(v["entry_id"].as_str() != Some(id.as_str()))
            })
            .await?;
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            anyhow::Ok(())
        };
        let (n, ()) = tokio::try_join!(hammer, delete)?;
        lookups_during_delete += n;
        for replica in [&r1, &r2] {
            let v = replica.lookup(KEY_A, json!({"prompt": prompt})).await?;
            if v["hit"] == true {
                violations += 1;
            }
        }
    }
    assert!(
        lookups_during_delete > rounds,
        "the lookups did race the deletes"
    );
    assert_eq!(
        violations, 0,
        "{violations} lookups after {rounds} deletes were served the deleted entry"
    );
    Ok(())
}

/// A record no replica can decode (written by a newer version, or corrupted) lands in the
/// shared log. Followers skip it with a log line and a metric and go on applying what comes
/// after; before, the follower stopped at it for good.
#[tokio::test]
async fn an_undecodable_log_record_is_skipped_and_the_follower_goes_on() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let setup = cluster_setup("bad-record").await?;
    let r1 = Server::start_replica(dir.path(), "r1", &setup).await?;
    let r2 = Server::start_replica(dir.path(), "r2", &setup).await?;
    r1.store(
        KEY_A,
        json!({"prompt": "before", "vector": axis(8, 1, 0.0), "response": answer("b")}),
    )
    .await?;
    let url = setup.redis_url.clone().unwrap_or_default();
    let mut conn = redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?;
    let logs: Vec<String> = redis::cmd("KEYS")
        .arg("semantis:*:log")
        .query_async(&mut conn)
        .await?;
    anyhow::ensure!(!logs.is_empty(), "no log stream in Redis");
    for log in &logs {
        let _: String = redis::cmd("XADD")
            .arg(log)
            .arg("*")
            .arg("r")
            .arg("{not a record")
            .query_async(&mut conn)
            .await?;
    }
    let id = r1
        .store(
            KEY_A,
            json!({"prompt": "after", "vector": axis(8, 6, 0.0), "response": answer("a")}),
        )
        .await?;
    r2.eventually(
        "the record after the bad one on the other replica",
        Duration::from_secs(2),
        || async {
            let v = r2.lookup(KEY_A, json!({"vector": axis(8, 6, 0.0)})).await?;
            Ok(v["entry_id"].as_str() == Some(id.as_str()))
        },
    )
    .await?;
    let skipped = metric_sum(
        &r2.metrics().await?,
        "semantis_log_records_skipped_total",
        &[],
    );
    assert!(skipped >= 1.0, "skipped {skipped}");
    // A delete through r2 (which first catches up past the bad record) still works.
    let (status, v, _) = r2
        .call(
            Method::DELETE,
            &format!("/v1/entries/{id}"),
            Some(KEY_A),
            None,
        )
        .await?;
    assert_eq!(status, 204, "{v}");
    Ok(())
}

/// A stream entry as XRANGE returns it: id, then field-value pairs.
type StreamEntry = (String, Vec<(String, Vec<u8>)>);

/// The records of every log stream as JSON text, oldest first.
async fn log_records(conn: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<Vec<String>> {
    let logs: Vec<String> = redis::cmd("KEYS")
        .arg("semantis:*:log")
        .query_async(conn)
        .await?;
    let mut out = Vec::new();
    for log in logs {
        let entries: Vec<StreamEntry> = redis::cmd("XRANGE")
            .arg(&log)
            .arg("-")
            .arg("+")
            .query_async(conn)
            .await?;
        for (_, fields) in entries {
            for (name, value) in fields {
                if name == "r" {
                    out.push(String::from_utf8_lossy(&value).into_owned());
                }
            }
        }
    }
    Ok(out)
}

/// r2 is frozen (SIGSTOP) while r1 deletes an entry r2 holds, stores two more, flushes and
/// trims the stream past all of it. When r2 goes on, the records it missed are gone from the
/// stream: before, it kept serving the deleted entry from its resident index and never
/// learnt of the new ones. It must notice the gap and reload from the table.
#[tokio::test]
async fn a_follower_paused_past_a_trim_reloads_and_serves_no_deleted_entry() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let setup = cluster_setup("paused-follower").await?;
    let r1 = Server::start_replica(dir.path(), "r1", &setup).await?;
    let r2 = Server::start_replica(dir.path(), "r2", &setup).await?;
    let url = setup.redis_url.clone().unwrap_or_default();
    let conn = redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?;

    let doomed = r1
        .store(KEY_A, json!({"prompt": "paused question", "vector": axis(8, 3, 0.0), "response": answer("old")}))
        .await?;
    r2.eventually("r2 serving the entry", Duration::from_secs(5), || async {
        let v = r2.lookup(KEY_A, json!({"vector": axis(8, 3, 0.0)})).await?;
        Ok(v["entry_id"].as_str() == Some(doomed.as_str()))
    })
    .await?;

    r2.pause()?;
    // The first record after the pause may answer r2's blocked read; the rest it must miss.
    r1.store(
        KEY_A,
        json!({"prompt": "decoy", "vector": axis(8, 0, 0.0), "response": answer("d")}),
    )
    .await?;
    let (status, v, _) = r1
        .call(
            Method::DELETE,
            &format!("/v1/entries/{doomed}"),
            Some(KEY_A),
            None,
        )
        .await?;
    anyhow::ensure!(status == 204, "delete answered {status}: {v}");
    let fresh = r1
        .store(KEY_A, json!({"prompt": "fresh question", "vector": axis(8, 5, 0.0), "response": answer("new")}))
        .await?;
    let trimmed = r1
        .eventually(
            "the leader trimming the delete",
            Duration::from_secs(20),
            || async {
                let records = log_records(&mut conn.clone()).await?;
                Ok(!records.iter().any(|r| r.contains("\"op\":\"delete\"")))
            },
        )
        .await;
    r2.resume()?;
    trimmed?;

    r2.eventually(
        "r2 serving the entry stored while it was paused",
        Duration::from_secs(10),
        || async {
            let v = r2.lookup(KEY_A, json!({"vector": axis(8, 5, 0.0)})).await?;
            Ok(v["entry_id"].as_str() == Some(fresh.as_str()))
        },
    )
    .await?;
    let semantic = r2.lookup(KEY_A, json!({"vector": axis(8, 3, 0.0)})).await?;
    let exact = r2
        .lookup(KEY_A, json!({"prompt": "paused question"}))
        .await?;
    assert_eq!(
        (semantic["hit"].as_bool(), exact["hit"].as_bool()),
        (Some(false), Some(false)),
        "the deleted entry is served after the gap: {semantic} {exact}"
    );
    let gaps = metric_sum(&r2.metrics().await?, "semantis_log_gaps_total", &[]);
    assert!(gaps >= 1.0, "gaps {gaps}");
    Ok(())
}

#[tokio::test]
async fn deletes_and_invalidations_survive_kill_9_in_cluster_mode() -> anyhow::Result<()> {
    let mut setup = cluster_setup("kill9-deletes").await?;
    setup.flush_max_rows = 4;
    crate::lifecycle::deletes_survive_kill_9(setup, Some("r1")).await
}

/// The follower's blocking read (500 ms) on an idle log comes back empty, never as a reply
/// deadline error: the follower connection's deadline outlasts the block. With the client's
/// default 500 ms deadline the empty reply raced it, and between pods it lost.
#[tokio::test]
async fn an_idle_follower_read_ends_empty_and_never_times_out() -> anyhow::Result<()> {
    use semantis_dataplane::store::redis_log::{RedisLog, connect};
    let url = private_redis("follower-idle")?;
    let client = redis::Client::open(url.as_str())?;
    let log = RedisLog::new(client.clone(), connect(&client).await?, "idle-table", "r1");
    let mut conn = log.follower_connection().await?;
    let mut failures = Vec::new();
    for round in 0..8 {
        match log
            .read_after(&mut conn, 0, Duration::from_millis(500))
            .await
        {
            Ok(batch) => assert!(batch.last.is_none(), "an idle log read records"),
            Err(e) => failures.push(format!("round {round}: {e}")),
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
    Ok(())
}

/// The replica holding team-a's flush lease. The lease value is `<replica>#<epoch>`, the
/// replica `<HOSTNAME>-<pid>`; the harness sets HOSTNAME to the replica's name.
async fn flush_leader(
    conn: &mut redis::aio::MultiplexedConnection,
) -> anyhow::Result<Option<String>> {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("semantis:{team-a--*}:flush-lease")
        .query_async(conn)
        .await?;
    let Some(key) = keys.first() else {
        return Ok(None);
    };
    let holder: Option<String> = redis::cmd("GET").arg(key).query_async(conn).await?;
    Ok(holder.map(|h| {
        let replica = h.split('#').next().unwrap_or_default();
        replica
            .rsplit_once('-')
            .map_or(replica, |(name, _pid)| name)
            .to_owned()
    }))
}

fn entries_in(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).map_or(0, Iterator::count)
}

/// Committed versions of a Lance table (`_versions/<digits>.manifest`).
fn manifests_in(table: &std::path::Path) -> usize {
    std::fs::read_dir(table.join("_versions")).map_or(0, |d| {
        d.filter_map(Result::ok)
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".manifest"))
                    .is_some_and(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
            })
            .count()
    })
}

/// Freeze `pid` the moment a new file appears in `data` (a flush started writing its rows):
/// true if it did within `within`.
fn freeze_when_writing(
    data: std::path::PathBuf,
    before: usize,
    pid: u32,
    within: Duration,
) -> anyhow::Result<bool> {
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if entries_in(&data) > before {
            let status = std::process::Command::new("kill")
                .args(["-STOP", &pid.to_string()])
                .status()?;
            anyhow::ensure!(status.success(), "failed to freeze {pid}");
            return Ok(true);
        }
        std::thread::yield_now();
    }
    Ok(false)
}

/// The leader is frozen (SIGSTOP) in the middle of a flush, after it started writing a batch
/// holding entry X and before LanceDB committed it. Its lease runs out, the other replica
/// takes over, and X is deleted. Before the write fence, the new leader applied the delete (a
/// no-op: X was not in the table yet), and when the old leader went on its commit wrote X
/// into the table for good: a replica restarted afterwards, loading from the table, served
/// the deleted entry. Now the new leader waits for the frozen write (the fence's lock),
/// applies the delete after it, and the old leader never writes again. Rounds alternate the
/// leader; a round whose freeze came after the commit is not counted.
#[tokio::test]
async fn a_leader_frozen_mid_flush_never_writes_a_deleted_entry_back() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut setup = cluster_setup("frozen-leader").await?;
    setup.max_body_bytes = 4 << 20;
    setup.flush_max_rows = 1000;
    let mut replicas = vec![
        Server::start_replica(dir.path(), "r1", &setup).await?,
        Server::start_replica(dir.path(), "r2", &setup).await?,
    ];
    let mut conn = redis::Client::open(setup.redis_url.clone().unwrap_or_default())?
        .get_multiplexed_async_connection()
        .await?;
    let lance = dir.path().join("data").join("lance");
    let table = std::fs::read_dir(&lance)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("team-a--") && n.ends_with(".lance"))
        })
        .ok_or_else(|| anyhow::anyhow!("no table of team-a under {}", lance.display()))?;
    let bulk = "b".repeat(1 << 20);
    let big = "d".repeat(3 << 20);

    let (mut caught, mut served_after_delete) = (0, Vec::<String>::new());
    let mut attempts = 0;
    for round in 0..15 {
        if caught == 3 {
            break;
        }
        attempts += 1;
        replicas[0]
            .eventually("a flush leader", Duration::from_secs(15), || async {
                Ok(matches!(
                    flush_leader(&mut conn.clone()).await?.as_deref(),
                    Some("r1" | "r2")
                ))
            })
            .await?;
        let li = usize::from(flush_leader(&mut conn).await?.as_deref() == Some("r2"));
        let (leader, follower) = (&replicas[li], &replicas[1 - li]);
        let pid = leader
            .pid()
            .ok_or_else(|| anyhow::anyhow!("the leader is not running"))?;

        let data = table.join("data");
        let (files, versions) = (entries_in(&data), manifests_in(&table));
        let prompt = format!("frozen question {round}");
        let vector = axis(8, 1, 0.01 * round as f32);
        // The doomed entry first and alone: the tail was empty, so the first flush to start
        // after its acknowledgement holds it. Bulk stores through the other replica then make
        // that flush longer (the frozen leader would hold stores sent to it).
        let doomed = leader
            .store(
                KEY_A,
                json!({"prompt": prompt, "vector": vector, "response": answer(&format!("{round}{big}"))}),
            )
            .await?;
        let freezer = tokio::task::spawn_blocking(move || {
            freeze_when_writing(data, files, pid, Duration::from_secs(10))
        });
        let bulk_stores = (0..4).map(|j| {
            follower.store(
                KEY_A,
                json!({"prompt": format!("bulk {round} {j}"), "vector": axis(8, 4 + j % 4, 0.0), "response": answer(&bulk)}),
            )
        });
        futures::future::try_join_all(bulk_stores).await?;
        let frozen = freezer.await??;
        anyhow::ensure!(frozen, "round {round}: the leader never flushed the batch");
        let mid_flush = manifests_in(&table) == versions;
        let fence_waits = |text: &str| {
            metric_sum(
                text,
                "semantis_store_write_fence_total",
                &[("outcome", "busy")],
            ) + metric_sum(text, "semantis_store_flush_duration_seconds_count", &[])
        };
        let before = fence_waits(&follower.metrics().await?);
        if mid_flush {
            caught += 1;
            follower.delete_entry(KEY_A, &doomed).await?;
            let follower_name = if li == 0 { "r2" } else { "r1" };
            follower
                .eventually(
                    "the other replica taking the lease",
                    Duration::from_secs(20),
                    || async {
                        Ok(
                            flush_leader(&mut conn.clone()).await?.as_deref()
                                == Some(follower_name),
                        )
                    },
                )
                .await?;
            // It flushes the delete (before the fence) or waits for the frozen write.
            follower
                .eventually(
                    "the new leader flushing or waiting",
                    Duration::from_secs(10),
                    || async { Ok(fence_waits(&follower.metrics().await?) > before) },
                )
                .await?;
        }
        replicas[li].resume()?;
        replicas[0]
            .eventually("every record flushed", Duration::from_secs(30), || async {
                Ok(log_records(&mut conn.clone()).await?.is_empty()
                    || log_records(&mut conn.clone())
                        .await?
                        .iter()
                        .all(|r| r.contains("\"op\":\"flushed\"")))
            })
            .await?;
        if !mid_flush {
            continue;
        }
        // The old leader starts again from the table and the log.
        let old = replicas.remove(li);
        replicas.insert(li, old.restart().await?);
        for (ri, r) in replicas.iter().enumerate() {
            for (path, body) in [
                ("exact", json!({"prompt": prompt})),
                ("semantic", json!({"vector": vector})),
            ] {
                let v = r.lookup(KEY_A, body).await?;
                if v["entry_id"] == doomed.as_str() {
                    served_after_delete.push(format!(
                        "round {round}: r{} served the deleted entry on the {path} path{}",
                        ri + 1,
                        if ri == li { " after its restart" } else { "" }
                    ));
                }
            }
        }
    }
    eprintln!("{caught} of {attempts} freezes landed mid-flush");
    anyhow::ensure!(
        caught >= 2,
        "the freeze landed mid-flush in {caught} of {attempts} rounds only"
    );
    assert!(
        served_after_delete.is_empty(),
        "{} deleted entries served after {caught} frozen leaders: {served_after_delete:#?}",
        served_after_delete.len()
    );
    Ok(())
}
