//! What happens to entries over time and across process deaths: TTL, eviction, kill -9,
//! graceful shutdown, flushes into LanceDB and the ANN index, and the local model.

use std::time::Duration;

use reqwest::Method;
use serde_json::json;

use crate::harness::{KEY_A, KEY_B, Server, Setup, answer, axis, metric_sum, scattered};

#[tokio::test]
async fn entries_expire_at_their_ttl_and_hits_do_not_extend_it() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &Setup::default()).await?;
    let started = std::time::Instant::now();
    s.store(KEY_A, json!({"prompt": "short-lived", "vector": axis(8, 0, 0.0), "response": answer("x"), "ttl_seconds": 2}))
        .await?;
    s.store(
        KEY_A,
        json!({"prompt": "long-lived", "vector": axis(8, 4, 0.0), "response": answer("y")}),
    )
    .await?;
    let v = s.lookup(KEY_A, json!({"prompt": "short-lived"})).await?;
    assert_eq!(v["hit"], true);
    // Keep hitting it; expiry must still come at the stored TTL, on both paths.
    s.eventually("expiry", Duration::from_secs(10), || async {
        let exact = s.lookup(KEY_A, json!({"prompt": "short-lived"})).await?;
        let semantic = s.lookup(KEY_A, json!({"vector": axis(8, 0, 0.0)})).await?;
        Ok(exact["hit"] == false && semantic["hit"] == false)
    })
    .await?;
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1900),
        "expired early: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(5),
        "hits extended the TTL: {elapsed:?}"
    );
    let v = s.lookup(KEY_A, json!({"prompt": "long-lived"})).await?;
    assert_eq!(v["hit"], true);
    // The expired entry is purged from the store, and counted.
    s.eventually(
        "purge of expired entries",
        Duration::from_secs(10),
        || async {
            let m = s.metrics().await?;
            Ok(metric_sum(
                &m,
                "semantis_cache_evictions_total",
                &[("tenant", "team-a"), ("reason", "ttl")],
            ) >= 1.0)
        },
    )
    .await?;
    let (_, v, _) = s.call(Method::GET, "/v1/stats", Some(KEY_A), None).await?;
    assert_eq!(v["entries"], 1);
    Ok(())
}

async fn eviction_order(policy: &str) -> anyhow::Result<Vec<bool>> {
    let dir = tempfile::tempdir()?;
    let setup = Setup {
        tenant_a_extra: format!("max_entries = 3\neviction = \"{policy}\""),
        ..Setup::default()
    };
    let s = Server::start(dir.path(), &setup).await?;
    for (i, p) in ["a", "b", "c"].iter().enumerate() {
        s.store(
            KEY_A,
            json!({"prompt": p, "vector": axis(8, i, 0.0), "response": answer(p)}),
        )
        .await?;
    }
    // a: used twice, c: once, b: never.
    for p in ["a", "c", "a"] {
        assert_eq!(s.lookup(KEY_A, json!({"prompt": p})).await?["hit"], true);
    }
    // LRU: b is least recently used. LFU: b has the fewest hits.
    let (status, v, _) = s
        .call(
            Method::POST,
            "/v1/entries",
            Some(KEY_A),
            Some(&json!({"prompt": "d", "vector": axis(8, 3, 0.0), "response": answer("d")})),
        )
        .await?;
    assert_eq!((status, v["evicted"].as_u64()), (201, Some(1)), "{v}");
    // Now c is the least recent (LRU) and has one hit against a's two (LFU) - same victim.
    s.lookup(KEY_A, json!({"prompt": "d"})).await?;
    s.lookup(KEY_A, json!({"prompt": "d"})).await?;
    s.lookup(KEY_A, json!({"prompt": "d"})).await?;
    s.store(
        KEY_A,
        json!({"prompt": "e", "vector": axis(8, 4, 0.0), "response": answer("e")}),
    )
    .await?;
    let mut present = Vec::new();
    for p in ["a", "b", "c", "d", "e"] {
        present.push(s.lookup(KEY_A, json!({"prompt": p})).await?["hit"] == true);
    }
    // Tenant B's capacity is its own.
    for i in 0..5 {
        s.store(
            KEY_B,
            json!({"prompt": format!("b{i}"), "vector": axis(8, i, 0.0), "response": answer("b")}),
        )
        .await?;
    }
    let (_, v, _) = s.call(Method::GET, "/v1/stats", Some(KEY_B), None).await?;
    assert_eq!(v["entries"], 5);
    let m = s.metrics().await?;
    assert_eq!(
        metric_sum(
            &m,
            "semantis_cache_evictions_total",
            &[("tenant", "team-a"), ("reason", "capacity")]
        ),
        2.0
    );
    Ok(present)
}

#[tokio::test]
async fn lru_eviction_keeps_the_recently_used() -> anyhow::Result<()> {
    // After d: a, c, d. a was hit before c's hit... order of last use: c(2nd), a(3rd), d → c goes.
    assert_eq!(
        eviction_order("lru").await?,
        vec![true, false, false, true, true]
    );
    Ok(())
}

#[tokio::test]
async fn lfu_eviction_keeps_the_frequently_hit() -> anyhow::Result<()> {
    // Hits: a=2, c=1, d=3 → c goes.
    assert_eq!(
        eviction_order("lfu").await?,
        vec![true, false, false, true, true]
    );
    Ok(())
}

#[tokio::test]
async fn acknowledged_stores_survive_kill_9() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // A large flush threshold and interval keep every entry in the write-ahead tail.
    let setup = Setup {
        flush_max_rows: 100_000,
        ..Setup::default()
    };
    let s = Server::start(dir.path(), &setup).await?;
    let mut ids = Vec::new();
    for i in 0..40 {
        let tilt = i as f32 / 100.0;
        ids.push(
            s.store(KEY_A, json!({"prompt": format!("durable {i}"), "vector": axis(8, i % 8, tilt), "response": answer(&i.to_string())}))
                .await?,
        );
    }
    let s = s.restart().await?; // kill -9, then start on the same data
    for (i, id) in ids.iter().enumerate() {
        let v = s
            .lookup(KEY_A, json!({"prompt": format!("durable {i}")}))
            .await?;
        assert_eq!(
            (v["hit"].as_bool(), v["entry_id"].as_str()),
            (Some(true), Some(id.as_str())),
            "entry {i} lost: {v}"
        );
        assert_eq!(v["response"], answer(&i.to_string()));
    }
    let v = s.lookup(KEY_A, json!({"vector": axis(8, 3, 0.03)})).await?;
    assert_eq!(v["hit"], true, "semantic search sees replayed entries: {v}");
    Ok(())
}

#[tokio::test]
async fn a_stopping_replica_fails_readiness_but_keeps_answering_through_its_shutdown_delay()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let setup = Setup {
        // Far longer than the test: the second signal below has to end it.
        server_extra: "shutdown_delay_ms = 600000".into(),
        ..Setup::default()
    };
    let mut s = Server::start(dir.path(), &setup).await?;
    s.store(
        KEY_A,
        json!({"prompt": "late", "vector": axis(8, 1, 0.0), "response": answer("still here")}),
    )
    .await?;
    s.signal_term()?;
    s.eventually(
        "/readyz failing after SIGTERM",
        Duration::from_secs(10),
        || async {
            let (status, _, _) = s.call(Method::GET, "/readyz", None, None).await?;
            Ok(status == 503)
        },
    )
    .await?;
    let (_, ready, _) = s.call(Method::GET, "/readyz", None, None).await?;
    let server_check = ready["checks"]
        .as_array()
        .and_then(|checks| checks.iter().find(|c| c["name"] == "server"))
        .cloned();
    assert_eq!(
        server_check.map(|c| c["ok"].clone()),
        Some(json!(false)),
        "{ready}"
    );
    // Clients that still route here are answered, hits included, and told to close the
    // connection: their next request opens a new one, which goes to a pod that stays.
    let (status, v, headers) = s
        .call(
            Method::POST,
            "/v1/lookup",
            Some(KEY_A),
            Some(&json!({"prompt": "late"})),
        )
        .await?;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["hit"], true, "{v}");
    assert_eq!(v["response"], answer("still here"));
    assert_eq!(
        headers.get("connection").and_then(|h| h.to_str().ok()),
        Some("close"),
        "{headers:?}"
    );

    s.signal_term()?;
    assert!(
        s.wait_exit()?,
        "the server did not exit cleanly:\n{}",
        s.log()
    );
    assert!(
        s.log().contains("skipping the rest of the shutdown delay"),
        "the second signal did not end the delay:\n{}",
        s.log()
    );
    Ok(())
}

#[tokio::test]
async fn graceful_shutdown_flushes_the_tail_into_lancedb() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let setup = Setup {
        flush_max_rows: 100_000,
        ..Setup::default()
    };
    let mut s = Server::start(dir.path(), &setup).await?;
    for i in 0..10 {
        s.store(
            KEY_A,
            json!({"prompt": format!("g{i}"), "vector": axis(8, i, 0.5), "response": answer("g")}),
        )
        .await?;
    }
    assert!(
        s.stop_gracefully()?,
        "the server did not exit cleanly:\n{}",
        s.log()
    );
    // The write-ahead log holds nothing unflushed: every segment left is empty.
    let wal = s.data_dir.join("wal");
    let mut leftover = 0u64;
    for table in std::fs::read_dir(&wal)? {
        for seg in std::fs::read_dir(table?.path())? {
            leftover += seg?.metadata()?.len();
        }
    }
    assert_eq!(
        leftover, 0,
        "entries left in the write-ahead log after a graceful stop"
    );
    let s = s.restart().await?;
    for i in 0..10 {
        assert_eq!(
            s.lookup(KEY_A, json!({"prompt": format!("g{i}")})).await?["hit"],
            true
        );
    }
    Ok(())
}

#[tokio::test]
async fn flushed_entries_and_the_ann_index_keep_serving() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // Without the resident index, so lookups go through LanceDB and its IVF-PQ index.
    let setup = Setup {
        dimension: 16,
        flush_max_rows: 50,
        storage_extra: "resident_index = false".into(),
        ..Setup::default()
    };
    // Build the ANN index once 400 rows are in the table.
    let s = Server::start(dir.path(), &setup)
        .await?
        .restart_with(
            "compact_min_fragments = 4",
            "compact_min_fragments = 4\nindex_min_rows = 400",
        )
        .await?;
    let vector = |i: u64| scattered(16, i);
    for i in 0..500u64 {
        s.store(KEY_A, json!({"prompt": format!("ann {i}"), "vector": vector(i), "response": answer(&i.to_string())}))
            .await?;
    }
    s.eventually("the ANN index build", Duration::from_secs(120), || async {
        let m = s.metrics().await?;
        Ok(metric_sum(
            &m,
            "semantis_store_index_build_duration_seconds_count",
            &[("tenant", "team-a")],
        ) >= 1.0)
    })
    .await?;
    let m = s.metrics().await?;
    assert!(
        metric_sum(
            &m,
            "semantis_store_flushed_entries_total",
            &[("tenant", "team-a")]
        ) >= 400.0
    );
    // Re-ranked with full vectors: every stored vector finds its own entry at similarity ~1.
    for i in (0..500u64).step_by(25) {
        let v = s.lookup(KEY_A, json!({"vector": vector(i)})).await?;
        assert_eq!(v["hit"], true, "entry {i}: {v}");
        assert!(v["similarity"].as_f64().unwrap_or(0.0) > 0.999, "{v}");
        assert_eq!(v["response"], answer(&i.to_string()), "entry {i}: {v}");
    }
    Ok(())
}

/// A hit on an answer kept on disk reads its entry by id through the table's B-tree index on
/// `id`, and scans the rows the index does not cover. Maintenance keeps that index up to date
/// between compactions (it used to wait for one), and `semantis_store_unindexed_rows` says
/// how much of the table a read by id would scan.
#[tokio::test]
async fn the_id_index_keeps_up_between_compactions() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let setup = Setup {
        dimension: 16,
        flush_max_rows: 50,
        // Every answer on disk: each hit is a read by id.
        storage_extra: "resident_response_max_bytes = 0\nid_index_max_unindexed_rows = 100".into(),
        ..Setup::default()
    };
    // No compaction during the test: only the new rule may refresh the index.
    let s = Server::start(dir.path(), &setup)
        .await?
        .restart_with(
            "compact_min_fragments = 4",
            "compact_min_fragments = 100000",
        )
        .await?;
    let vector = |i: u64| scattered(16, i);
    let n = 600u64;
    for i in 0..n {
        s.store(KEY_A, json!({"prompt": format!("by id {i}"), "vector": vector(i), "response": answer(&format!("answer {i}"))}))
            .await?;
    }
    let unindexed = |m: &str| {
        metric_sum(
            m,
            "semantis_store_unindexed_rows",
            &[("tenant", "team-a"), ("index", "id")],
        )
    };
    s.eventually(
        "every entry flushed and the id index within 100 rows of the table",
        Duration::from_secs(60),
        || async {
            let m = s.metrics().await?;
            let flushed = metric_sum(
                &m,
                "semantis_store_flushed_entries_total",
                &[("tenant", "team-a")],
            );
            Ok(flushed >= n as f64
                && m.contains("semantis_store_unindexed_rows{")
                && unindexed(&m) < 100.0)
        },
    )
    .await?;
    let m = s.metrics().await?;
    assert_eq!(
        metric_sum(
            &m,
            "semantis_store_compaction_duration_seconds_count",
            &[("tenant", "team-a")]
        ),
        0.0,
        "no compaction refreshed it"
    );
    for i in (0..n).step_by(20) {
        let v = s.lookup(KEY_A, json!({"vector": vector(i)})).await?;
        assert_eq!(
            v["response"],
            answer(&format!("answer {i}")),
            "entry {i}: {v}"
        );
    }
    Ok(())
}

/// Store "How do I reset my password?" and look up a paraphrase of it: a semantic hit on its
/// answer. Returns the lookup's body.
async fn a_paraphrase_hits(s: &Server) -> anyhow::Result<serde_json::Value> {
    s.store(
        KEY_A,
        json!({"prompt": "How do I reset my password?", "response": answer("Use the reset link.")}),
    )
    .await?;
    let v = s
        .lookup(KEY_A, json!({"prompt": "How can I reset my password?"}))
        .await?;
    assert_eq!(
        (v["hit"].as_bool(), v["path"].as_str()),
        (Some(true), Some("semantic")),
        "{v}"
    );
    assert_eq!(v["response"], answer("Use the reset link."));
    Ok(v)
}

#[tokio::test]
async fn the_local_model_matches_paraphrases_and_rejects_other_questions() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // The default configuration: the local model and, its file being installed, the local
    // verifier with its own calibrated floor and score.
    let setup = Setup::local_model(None);
    let s = Server::start(dir.path(), &setup).await?;
    s.store(
        KEY_A,
        json!({"prompt": "How do I make a cake without eggs?", "response": answer("Use flax seeds.")}),
    )
    .await?;
    let v = a_paraphrase_hits(&s).await?;
    assert_eq!(
        (
            v["verifier"]["name"].as_str(),
            v["verifier"]["outcome"].as_str()
        ),
        (Some("local"), Some("accepted")),
        "{v}"
    );
    // Close vectors (above the unverified default of 0.9), the opposite question: the cake
    // without eggs is not served to the one asking with eggs. The verifier said no to it
    // too; the opposite-words check now stops it first, without a model run.
    let v = s
        .lookup(KEY_A, json!({"prompt": "How do I make a cake with eggs?"}))
        .await?;
    assert_eq!(v["hit"], false, "{v}");
    assert!(v["best_similarity"].as_f64().unwrap_or(0.0) > 0.9, "{v}");
    assert_eq!(s.rejected("opposite").await?, 1.0, "{v}");
    let v = s
        .lookup(
            KEY_A,
            json!({"prompt": "What is the weather in Lisbon tomorrow?"}),
        )
        .await?;
    assert_eq!(v["hit"], false, "{v}");
    assert!(v["best_similarity"].as_f64().unwrap_or(1.0) < 0.5, "{v}");
    // A client-supplied vector must match the model's dimension.
    let (status, v, _) = s
        .call(
            Method::POST,
            "/v1/lookup",
            Some(KEY_A),
            Some(&json!({"vector": axis(8, 0, 0.0)})),
        )
        .await?;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (422, Some("dimension_mismatch"))
    );
    Ok(())
}

#[tokio::test]
async fn stores_racing_flushes_are_never_lost() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // Tiny flushes, so many of them cut through the concurrent stores.
    let setup = Setup {
        flush_max_rows: 10,
        ..Setup::default()
    };
    let s = Server::start(dir.path(), &setup).await?;
    let stored = futures::future::join_all((0..8).map(|worker| {
        let s = &s;
        async move {
            let mut ids = Vec::new();
            for i in 0..15 {
                let n = worker * 100 + i;
                let id = s
                    .store(KEY_A, json!({"prompt": format!("race {n}"), "vector": axis(8, n % 8, (n % 50) as f32 / 100.0), "response": answer(&n.to_string())}))
                    .await?;
                ids.push((n, id));
            }
            anyhow::Ok(ids)
        }
    }))
    .await;
    let ids: Vec<(usize, String)> = stored
        .into_iter()
        .collect::<anyhow::Result<Vec<_>>>()?
        .concat();
    s.eventually(
        "flushes during and after the stores",
        Duration::from_secs(60),
        || async {
            let m = s.metrics().await?;
            Ok(metric_sum(&m, "semantis_store_flush_duration_seconds_count", &[]) >= 2.0)
        },
    )
    .await?;
    let s = s.restart().await?; // kill -9
    for (n, id) in &ids {
        let v = s
            .lookup(KEY_A, json!({"prompt": format!("race {n}")}))
            .await?;
        assert_eq!(
            v["entry_id"].as_str(),
            Some(id.as_str()),
            "acknowledged store {n} was lost: {v}"
        );
    }
    let (_, v, _) = s.call(Method::GET, "/v1/stats", Some(KEY_A), None).await?;
    assert_eq!(v["entries"], 120, "no entry lost or duplicated: {v}");
    Ok(())
}

/// (whether lookups come from the resident index, live entries)
async fn resident_stats(s: &Server) -> anyhow::Result<(bool, Option<u64>)> {
    let (_, v, _) = s.call(Method::GET, "/v1/stats", Some(KEY_A), None).await?;
    Ok((v["resident_index"] == true, v["entries"].as_u64()))
}

/// Every 7th of the 300 `resident i` entries hits itself unless deleted; the `other`
/// namespace is gone; the exact path answers.
async fn check_resident(s: &Server, ids: &[String], deleted: &[usize]) -> anyhow::Result<()> {
    for i in (0..300usize).step_by(7) {
        let v = s
            .lookup(KEY_A, json!({"vector": scattered(16, i as u64)}))
            .await?;
        if deleted.contains(&i) {
            assert_ne!(
                v["entry_id"],
                json!(ids[i]),
                "deleted entry {i} served: {v}"
            );
        } else {
            assert_eq!(v["hit"], true, "entry {i}: {v}");
            assert_eq!(v["entry_id"], json!(ids[i]), "entry {i}: {v}");
            assert!(v["similarity"].as_f64().unwrap_or(0.0) > 0.999, "{v}");
            assert_eq!(v["response"], answer(&i.to_string()));
        }
    }
    for i in 0..5u64 {
        let v = s
            .lookup(
                KEY_A,
                json!({"vector": scattered(16, i), "scope": {"namespace": "other"}}),
            )
            .await?;
        assert_eq!(v["hit"], false, "invalidated namespace served: {v}");
    }
    let v = s.lookup(KEY_A, json!({"prompt": "resident 43"})).await?;
    assert_eq!(
        (v["hit"].as_bool(), v["path"].as_str()),
        (Some(true), Some("exact")),
        "{v}"
    );
    Ok(())
}

/// Lookups come from the resident index (one scope large enough for its HNSW graph), deletes
/// and invalidations reach it, and after kill -9 it reloads without what was removed.
#[tokio::test]
async fn the_resident_index_serves_lookups_and_reloads_after_kill_9() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let setup = Setup {
        dimension: 16,
        flush_max_rows: 50,
        storage_extra: "ann_min_scope_entries = 64".into(),
        ..Setup::default()
    };
    let s = Server::start(dir.path(), &setup).await?;
    let mut ids = Vec::new();
    for i in 0..300u64 {
        ids.push(
            s.store(KEY_A, json!({"prompt": format!("resident {i}"), "vector": scattered(16, i), "response": answer(&i.to_string())}))
                .await?,
        );
    }
    // The same vectors in another namespace: a scope of its own, searched exhaustively.
    for i in 0..5u64 {
        s.store(KEY_A, json!({"prompt": format!("other {i}"), "vector": scattered(16, i), "response": answer("other"),
                              "scope": {"namespace": "other"}}))
            .await?;
    }
    assert!(resident_stats(&s).await?.0, "an empty table loads at once");
    let deleted: Vec<usize> = (0..300).step_by(7).take(10).collect();
    for &i in &deleted {
        let (status, _, _) = s
            .call(
                Method::DELETE,
                &format!("/v1/entries/{}", ids[i]),
                Some(KEY_A),
                None,
            )
            .await?;
        assert_eq!(status, 204);
    }
    let (status, _, _) = s
        .call(
            Method::POST,
            "/v1/invalidate",
            Some(KEY_A),
            Some(&json!({"namespace": "other"})),
        )
        .await?;
    assert_eq!(status, 200);
    check_resident(&s, &ids, &deleted).await?;

    let s = s.restart().await?; // kill -9: part of it in the table, the rest in the log
    s.eventually(
        "the resident index reload",
        Duration::from_secs(60),
        || async { Ok(resident_stats(&s).await?.0) },
    )
    .await?;
    assert_eq!(resident_stats(&s).await?.1, Some(290));
    check_resident(&s, &ids, &deleted).await?;
    // The load built every graph before it declared itself ready: no backlog to report.
    s.eventually("the resident gauges", Duration::from_secs(10), || async {
        let m = s.metrics().await?;
        Ok(m.contains("semantis_index_resident_pending_entries{")
            && metric_sum(&m, "semantis_index_resident_pending_entries", &[]) == 0.0
            && metric_sum(&m, "semantis_index_resident_entries", &[]) == 290.0)
    })
    .await?;
    Ok(())
}

/// Deletes and an invalidation, some of table rows and some of tail entries, then kill -9 at
/// once and a restart on the same data (and the same Redis in cluster mode): none of them is
/// served again, on the exact path or the vector path; everything else is.
pub async fn deletes_survive_kill_9(setup: Setup, replica: Option<&str>) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = match replica {
        Some(name) => Server::start_replica(dir.path(), name, &setup).await?,
        None => Server::start(dir.path(), &setup).await?,
    };
    // (prompt, namespace): the first four reach LanceDB, the last four stay in the tail.
    let plan = [
        ("table kept", "chat"),
        ("table deleted", "chat"),
        ("table invalidated", "docs"),
        ("table kept too", "chat"),
        ("tail kept", "chat"),
        ("tail deleted", "chat"),
        ("tail invalidated", "docs"),
        ("tail kept too", "chat"),
    ];
    let mut ids = Vec::new();
    for (i, (prompt, ns)) in plan.iter().enumerate() {
        ids.push(
            s.store(KEY_A, json!({"prompt": prompt, "vector": axis(8, i, 0.0), "scope": {"namespace": ns}, "response": answer(prompt)}))
                .await?,
        );
        if i == 3 {
            s.eventually(
                "the first four in LanceDB",
                Duration::from_secs(10),
                || async {
                    Ok(metric_sum(
                        &s.metrics().await?,
                        "semantis_store_flushed_entries_total",
                        &[],
                    ) >= 4.0)
                },
            )
            .await?;
        }
    }
    for i in [1, 5] {
        let (status, v, _) = s
            .call(
                Method::DELETE,
                &format!("/v1/entries/{}", ids[i]),
                Some(KEY_A),
                None,
            )
            .await?;
        anyhow::ensure!(status == 204, "delete {i} answered {status}: {v}");
    }
    let (status, v, _) = s
        .call(
            Method::POST,
            "/v1/invalidate",
            Some(KEY_A),
            Some(&json!({"namespace": "docs"})),
        )
        .await?;
    anyhow::ensure!(status == 200, "invalidate answered {status}: {v}");
    let s = s.restart().await?;
    for (i, (prompt, ns)) in plan.iter().enumerate() {
        let gone = prompt.contains("deleted") || prompt.contains("invalidated");
        let exact = s
            .lookup(KEY_A, json!({"prompt": prompt, "scope": {"namespace": ns}}))
            .await?;
        let semantic = s
            .lookup(
                KEY_A,
                json!({"vector": axis(8, i, 0.0), "scope": {"namespace": ns}}),
            )
            .await?;
        let served = |v: &serde_json::Value| v["entry_id"].as_str() == Some(ids[i].as_str());
        assert_eq!(
            (served(&exact), served(&semantic)),
            (!gone, !gone),
            "{prompt} after kill -9: exact {exact}, semantic {semantic}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn deletes_and_invalidations_survive_kill_9() -> anyhow::Result<()> {
    let setup = Setup {
        flush_max_rows: 4,
        ..Setup::default()
    };
    deletes_survive_kill_9(setup, None).await
}

/// A small tmpfs mounted at `dir` for one test, unmounted when dropped.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(dir: &std::path::Path, size: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()?;
        anyhow::ensure!(
            status.success(),
            "failed to mount a {size} tmpfs at {} (the disk-full test runs as root, like `make test`)",
            dir.display()
        );
        Ok(Self(dir.to_owned()))
    }

    /// Fill the disk until writing fails, leaving `room` bytes free; returns the filler.
    fn fill(&self, room: u64) -> anyhow::Result<std::path::PathBuf> {
        use std::io::Write;
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path)?;
        let chunk = vec![0u8; 64 * 1024];
        loop {
            match f.write(&chunk) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        let len = f.metadata()?.len();
        f.set_len(len.saturating_sub(room))?;
        Ok(path)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// The data directory's disk fills up under acknowledged stores. While it is full, stores
/// fail with 503 `store_unavailable` and lookups keep answering; a store cut short leaves
/// a fragment in the write-ahead log. Once space returns, stores succeed again, and after a
/// kill -9 every acknowledged store is served: before, the record written after the
/// fragment shared its line and replay dropped it.
#[tokio::test]
async fn a_full_disk_fails_stores_cleanly_and_loses_no_acknowledged_one() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let disk = SmallDisk::mount(&dir.path().join("data"), "48m")?;
    let setup = Setup {
        flush_max_rows: 100_000,
        ..Setup::default()
    };
    let s = Server::start(dir.path(), &setup).await?;
    let big = "x".repeat(20_000);
    let mut acked = Vec::new();
    let store = |i: usize| {
        let body = json!({"prompt": format!("disk {i}"), "vector": scattered(8, i as u64), "response": answer(&format!("{i} {big}"))});
        let s = &s;
        async move {
            s.call(Method::POST, "/v1/entries", Some(KEY_A), Some(&body))
                .await
        }
    };
    for i in 0..10 {
        let (status, v, _) = store(i).await?;
        anyhow::ensure!(status == 201, "store {i} answered {status}: {v}");
        acked.push((i, v["id"].as_str().unwrap_or_default().to_owned()));
    }
    // Room for part of one record: the next store is cut short.
    let filler = disk.fill(6_000)?;
    let mut refused = 0;
    for i in 10..20 {
        let (status, v, _) = store(i).await?;
        match status {
            201 => acked.push((i, v["id"].as_str().unwrap_or_default().to_owned())),
            503 => {
                assert_eq!(v["error"]["code"], "store_unavailable", "{v}");
                refused += 1;
            }
            other => panic!("a store on a full disk answered {other}: {v}"),
        }
    }
    assert!(
        refused >= 8,
        "only {refused} of 10 stores were refused on a full disk"
    );
    let v = s.lookup(KEY_A, json!({"prompt": "disk 3"})).await?;
    assert_eq!(v["hit"], true, "lookups answer while the disk is full: {v}");

    std::fs::remove_file(filler)?;
    for i in 20..30 {
        let (status, v, _) = store(i).await?;
        anyhow::ensure!(
            status == 201,
            "store {i} after space returned answered {status}: {v}"
        );
        acked.push((i, v["id"].as_str().unwrap_or_default().to_owned()));
    }
    let s = s.restart().await?;
    let mut lost = Vec::new();
    for (i, id) in &acked {
        let v = s
            .lookup(KEY_A, json!({"prompt": format!("disk {i}")}))
            .await?;
        if v["entry_id"].as_str() != Some(id.as_str()) {
            lost.push(*i);
        }
    }
    assert!(
        lost.is_empty(),
        "acknowledged stores lost after kill -9: {lost:?}"
    );
    drop(s);
    drop(disk);
    Ok(())
}

/// Tried as a user would, the local model and its verifier served "How do I enable
/// two-factor authentication?"'s answer for "…disable…" (cosine 0.88, verifier 0.78), "within
/// 30 days" for "after 30 days", "unsafe" for "safe" and "Fahrenheit to Celsius" for "Celsius
/// to Fahrenheit" (0.91). Opposite words and swapped directions now miss before the verifier
/// is asked; paraphrases still hit. So do the one-word-apart wrong hits read on QQP's pairs
/// (long- / short-finned, iPhone 5 / 5S, can / can't).
#[tokio::test]
async fn opposites_and_swapped_directions_miss_with_the_local_model() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let setup = Setup::local_model(Some(0.85));
    let s = Server::start(dir.path(), &setup).await?;
    for q in [
        "How do I enable two-factor authentication?",
        "Can I return an item after 30 days?",
        "Is it safe to eat raw chicken?",
        "How do I convert Celsius to Fahrenheit?",
        "How do I sort a list in Python?",
        "Who would win a fight, a great white shark or a long-finned pilot whale?",
        "How long does an iPhone 5 battery last?",
        "What can a robot do?",
    ] {
        s.store(KEY_A, json!({"prompt": q, "response": answer(q)}))
            .await?;
    }
    for (q, reason) in [
        ("How do I disable two-factor authentication?", "opposite"),
        ("Can I return an item within 30 days?", "opposite"),
        ("Is it unsafe to eat raw chicken?", "opposite"),
        ("How do I convert Fahrenheit to Celsius?", "direction"),
        (
            "Who would win a fight, a great white shark or a short-finned pilot whale?",
            "opposite",
        ),
        ("How long does an iPhone 5S battery last?", "numbers"),
        ("What can't a robot do?", "negation"),
    ] {
        let v = s.lookup(KEY_A, json!({"prompt": q})).await?;
        assert_eq!(
            v["hit"], false,
            "{q} was served another question's answer: {v}"
        );
        assert!(
            s.rejected(reason).await? >= 1.0,
            "{q}: no `{reason}` rejection counted"
        );
    }
    for q in [
        "how do i sort a list in python",
        "What's the way to sort a list in Python?",
    ] {
        let v = s.lookup(KEY_A, json!({"prompt": q})).await?;
        assert_eq!(
            v["response"],
            answer("How do I sort a list in Python?"),
            "{q}: {v}"
        );
    }
    Ok(())
}

/// Chat prompts carry the same system prompt before each question. The verifier reads a pair
/// from its start up to its token limit, so before it read mostly the shared preamble, turned
/// a paraphrase away (score 0.25) and spent about 180 ms of its budget doing it. It now reads
/// past the sentences the two share: the paraphrase hits, another question still misses.
#[tokio::test]
async fn a_shared_system_prompt_neither_hides_a_paraphrase_nor_lets_another_question_through()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let setup = Setup::local_model(None);
    let s = Server::start(dir.path(), &setup).await?;
    let system = "You are a helpful assistant for Acme Corporation. Answer questions about our \
        products, billing, shipping and returns politely and concisely. Always cite the relevant \
        policy section when you can, never invent order numbers, and escalate to a human agent \
        if the customer is angry or asks for a refund over the allowed amount. Our store ships \
        to the United States, Canada and most of Europe. Business hours are Monday to Friday. \
        Keep answers short and friendly, and use bullet points when listing steps.\nUser: ";
    for q in [
        "How do I reset my password?",
        "How do I cancel my subscription?",
    ] {
        s.store(
            KEY_A,
            json!({"prompt": format!("{system}{q}"), "response": answer(q)}),
        )
        .await?;
    }
    for (q, served) in [
        (
            "How can I reset my password?",
            Some("How do I reset my password?"),
        ),
        (
            "What should I do to reset my password?",
            Some("How do I reset my password?"),
        ),
        (
            "How can I cancel my subscription?",
            Some("How do I cancel my subscription?"),
        ),
        ("What is your refund policy?", None),
        ("How do I change my shipping address?", None),
    ] {
        let v = s
            .lookup(KEY_A, json!({"prompt": format!("{system}{q}")}))
            .await?;
        match served {
            Some(a) => {
                assert_eq!(v["response"], answer(a), "{q}: {v}");
                assert_eq!(v["verifier"]["outcome"], "accepted", "{q}: {v}");
            }
            None => assert_eq!(
                v["hit"], false,
                "{q} was served another question's answer: {v}"
            ),
        }
    }
    // Another question behind the same preamble (cosine 0.91) is one the verifier turns away.
    assert!(s.rejected("verifier").await? >= 1.0);
    Ok(())
}

/// The local model reads 256 tokens. Two 2,000-token prompts sharing all but their last
/// question embed to the same vector (similarity ≈ 1.0); before, the second was answered with
/// the first's response. So were "17 times 24" with "17 times 23"'s.
#[tokio::test]
async fn long_prompts_past_the_window_and_other_numbers_miss_with_the_local_model()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let setup = Setup::local_model(Some(0.8));
    let s = Server::start(dir.path(), &setup).await?;
    let preamble: String = (0..150)
        .map(|i| format!("Rule {i}: the service keeps a log of every request it answers. "))
        .collect();
    let long_a = format!("{preamble}Question: how do I rotate the signing keys?");
    let long_b = format!("{preamble}Question: how do I delete a user account?");
    s.store(
        KEY_A,
        json!({"prompt": long_a, "response": answer("rotate")}),
    )
    .await?;
    s.store(
        KEY_A,
        json!({"prompt": "What is 17 times 23?", "response": answer("391")}),
    )
    .await?;

    let v = s.lookup(KEY_A, json!({"prompt": long_b})).await?;
    assert_eq!(
        v["hit"], false,
        "another question after the same preamble hit: {v}"
    );
    assert!(
        v["best_similarity"].as_f64().unwrap_or(0.0) > 0.99,
        "the vectors cannot tell them apart: {v}"
    );
    let v = s
        .lookup(
            KEY_A,
            json!({"prompt": format!("{preamble} Question: how do I rotate the signing keys ?")}),
        )
        .await?;
    assert_eq!(v["hit"], false, "a different text past the window hit: {v}");
    let v = s
        .lookup(
            KEY_A,
            json!({"prompt": format!("{preamble}Question: how do I rotate the signing keys?")}),
        )
        .await?;
    assert_eq!(
        (v["hit"].as_bool(), v["path"].as_str()),
        (Some(true), Some("exact")),
        "{v}"
    );

    let v = s
        .lookup(KEY_A, json!({"prompt": "What is 17 times 24?"}))
        .await?;
    assert_eq!(
        v["hit"], false,
        "17 × 24 was answered with 17 × 23's answer: {v}"
    );
    let v = s
        .lookup(KEY_A, json!({"prompt": "what is 17 times 23"}))
        .await?;
    assert_eq!(
        (v["hit"].as_bool(), v["path"].as_str(), &v["response"]),
        (Some(true), Some("semantic"), &answer("391")),
        "{v}"
    );
    let metrics = s.metrics().await?;
    for reason in ["beyond_window", "numbers"] {
        let n = metric_sum(
            &metrics,
            "semantis_cache_rejected_candidates_total",
            &[("reason", reason)],
        );
        assert!(n >= 1.0, "{reason}: {n}");
    }
    Ok(())
}

/// The names of the threads of process `pid` that start with `prefix`.
fn threads_named(pid: u32, prefix: &str) -> anyhow::Result<Vec<String>> {
    let mut names = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let comm = std::fs::read_to_string(task?.path().join("comm")).unwrap_or_default();
        if comm.starts_with(prefix) {
            names.push(comm.trim().to_owned());
        }
    }
    Ok(names)
}

/// candle sizes its kernel threads by the machine's physical cores, whatever CPUs the process
/// may use: given one CPU, the server ran a second kernel thread that spun, on that same CPU,
/// waiting for the first. The server now sizes them by its CPUs (affinity and cgroup quota).
#[tokio::test]
async fn a_server_given_one_cpu_runs_its_models_on_one_thread() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let setup = Setup::local_model(None);
    let s = Server::start_on_cpus(dir.path(), &setup, "0").await?;
    // The embedder and the verifier both run.
    let v = a_paraphrase_hits(&s).await?;
    assert!(v["verifier"]["score"].as_f64().is_some(), "{v}");
    let metrics = s.metrics().await?;
    assert_eq!(metric_sum(&metrics, "semantis_model_threads", &[]), 1.0);
    let pid = s
        .pid()
        .ok_or_else(|| anyhow::anyhow!("the server is not running"))?;
    let spinning = threads_named(pid, "candle-bp")?;
    assert!(
        spinning.is_empty(),
        "kernel threads beside the one CPU's: {spinning:?}"
    );
    Ok(())
}
