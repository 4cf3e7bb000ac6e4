//! Cluster-mode metadata in a real Postgres (started by scripts/services.sh): usage
//! accounting and the hit audit trail land there, and a Postgres outage never stops lookups.

use std::time::Duration;

use reqwest::Method;
use serde_json::json;
use sqlx::Connection;

use crate::harness::{
    KEY_A, Server, Setup, answer, axis, fresh_database, metric_sum, services, shared_postgres,
};

#[tokio::test]
async fn usage_and_the_hit_audit_trail_land_in_postgres() -> anyhow::Result<()> {
    let db = fresh_database(&shared_postgres()?).await?;
    let dir = tempfile::tempdir()?;
    let setup = Setup {
        postgres_url: Some(db.clone()),
        ..Setup::default()
    };
    let s = Server::start(dir.path(), &setup).await?;
    let id = s
        .store(KEY_A, json!({"prompt": "pg", "vector": axis(8, 0, 0.0), "response": answer("x"),
                             "scope": {"model": "gpt-4o"}, "prompt_tokens": 7, "completion_tokens": 3, "cost_usd": 0.25}))
        .await?;
    s.lookup(KEY_A, json!({"prompt": "pg", "scope": {"model": "gpt-4o"}}))
        .await?;
    s.lookup(
        KEY_A,
        json!({"vector": axis(8, 0, 0.05), "scope": {"model": "gpt-4o"}}),
    )
    .await?;
    s.lookup(
        KEY_A,
        json!({"vector": axis(8, 5, 0.0), "scope": {"model": "gpt-4o"}}),
    )
    .await?;

    let mut conn = sqlx::PgConnection::connect(&db).await?;
    s.eventually("usage rows in Postgres", Duration::from_secs(10), || {
        let db = db.clone();
        async move {
            let mut conn = sqlx::PgConnection::connect(&db).await?;
            let n: Option<i64> = sqlx::query_scalar(
                "SELECT CAST(SUM(lookups) AS BIGINT) FROM usage WHERE tenant = 'team-a'",
            )
            .fetch_one(&mut conn)
            .await?;
            Ok(n == Some(3))
        }
    })
    .await?;
    let (hits, tokens, usd): (i64, i64, f64) = sqlx::query_as(
        "SELECT hits, tokens_saved, usd_saved FROM usage WHERE tenant = 'team-a' AND model = 'gpt-4o'",
    )
    .fetch_one(&mut conn)
    .await?;
    assert_eq!((hits, tokens), (2, 20));
    assert!((usd - 0.5).abs() < 1e-9);
    let audit: Vec<(String, String, f64)> = sqlx::query_as(
        "SELECT entry_id, path, similarity FROM hit_audit WHERE tenant = 'team-a' ORDER BY id",
    )
    .fetch_all(&mut conn)
    .await?;
    assert_eq!(audit.len(), 2);
    assert_eq!(
        (audit[0].0.as_str(), audit[0].1.as_str()),
        (id.as_str(), "exact")
    );
    assert_eq!(audit[1].1, "semantic");
    assert!(audit[1].2 > 0.99 && audit[1].2 < 1.0);
    let versions: Vec<(String, String)> =
        sqlx::query_as("SELECT tenant, state FROM index_versions ORDER BY tenant")
            .fetch_all(&mut conn)
            .await?;
    assert_eq!(
        versions,
        vec![
            ("team-a".into(), "active".into()),
            ("team-b".into(), "active".into())
        ]
    );
    let (_, v, _) = s.call(Method::GET, "/v1/stats", Some(KEY_A), None).await?;
    assert_eq!(
        (v["lookups"].as_u64(), v["hits"].as_u64()),
        (Some(3), Some(2)),
        "{v}"
    );
    Ok(())
}

#[tokio::test]
async fn a_postgres_outage_degrades_accounting_but_lookups_keep_answering() -> anyhow::Result<()> {
    // A private instance: stopping the shared one would break the other tests.
    let server_url = services(&["postgres", "outage"])?;
    let db = fresh_database(&server_url).await?;
    let dir = tempfile::tempdir()?;
    let setup = Setup {
        postgres_url: Some(db),
        ..Setup::default()
    };
    let s = Server::start(dir.path(), &setup).await?;
    s.store(
        KEY_A,
        json!({"prompt": "still here", "vector": axis(8, 1, 0.0), "response": answer("yes")}),
    )
    .await?;

    services(&["stop-postgres", "outage"])?;
    let outcome = async {
        for _ in 0..20 {
            let v = s.lookup(KEY_A, json!({"prompt": "still here"})).await?;
            assert_eq!(v["response"], answer("yes"));
            let v = s.lookup(KEY_A, json!({"vector": axis(8, 1, 0.01)})).await?;
            assert_eq!(v["hit"], true);
        }
        // Stores do not need Postgres either.
        s.store(KEY_A, json!({"prompt": "during the outage", "vector": axis(8, 2, 0.0), "response": answer("ok")}))
            .await?;
        let (status, v, _) = s.call(Method::GET, "/readyz", None, None).await?;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["degraded"], json!(["postgres"]));
        // Stats read Postgres: a clear 503, not a hang or a 500.
        let (status, v, _) = s.call(Method::GET, "/v1/stats", Some(KEY_A), None).await?;
        assert_eq!((status, v["error"]["code"].as_str()), (503, Some("store_unavailable")), "{v}");
        s.eventually("dropped usage events to be counted", Duration::from_secs(20), || async {
            let m = s.metrics().await?;
            Ok(metric_sum(&m, "semantis_usage_events_dropped_total", &[]) >= 1.0)
        })
        .await?;
        anyhow::Ok(())
    }
    .await;
    services(&["start-postgres", "outage"])?;
    outcome?;

    // Once Postgres is back, accounting resumes.
    let v = s
        .lookup(KEY_A, json!({"prompt": "during the outage"}))
        .await?;
    assert_eq!(v["hit"], true);
    s.eventually(
        "accounting after recovery",
        Duration::from_secs(20),
        || async {
            let (status, v, _) = s.call(Method::GET, "/v1/stats", Some(KEY_A), None).await?;
            Ok(status == 200 && v["lookups"].as_u64().unwrap_or(0) >= 1)
        },
    )
    .await?;
    let (_, v, _) = s.call(Method::GET, "/readyz", None, None).await?;
    assert_eq!(v["degraded"], json!([]));
    Ok(())
}
