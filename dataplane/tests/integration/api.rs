//! The HTTP API as a client uses it: store, exact and semantic lookups, tenants, scopes,
//! thresholds, delete, invalidate, stats, and every bad input.

use std::time::Duration;

use reqwest::Method;
use serde_json::json;

use crate::harness::{ADMIN, KEY_A, KEY_B, Server, Setup, answer, axis, metric_sum};

#[tokio::test]
async fn store_then_exact_and_semantic_hits_and_a_miss() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &Setup::default()).await?;
    let scope = json!({"model": "gpt-4o-mini", "temperature": 0.2});
    let id = s
        .store(
            KEY_A,
            json!({"prompt": "What is the capital of France?", "vector": axis(8, 0, 0.0),
                   "response": answer("Paris"), "scope": scope, "prompt_tokens": 12,
                   "completion_tokens": 3, "cost_usd": 0.002}),
        )
        .await?;

    // Same prompt modulo white space: the exact path.
    let v = s
        .lookup(
            KEY_A,
            json!({"prompt": "  What is the capital\nof France? ", "scope": scope}),
        )
        .await?;
    assert_eq!(v["hit"], true);
    assert_eq!(v["path"], "exact");
    assert_eq!(v["entry_id"], id.as_str());
    assert_eq!(v["response"], answer("Paris"));
    assert_eq!(v["similarity"], 1.0);

    // A near vector: the semantic path, with its cosine similarity.
    let v = s
        .lookup(KEY_A, json!({"vector": axis(8, 0, 0.1), "scope": scope}))
        .await?;
    assert_eq!(v["hit"], true, "{v}");
    assert_eq!(v["path"], "semantic");
    let sim = v["similarity"].as_f64().unwrap_or(0.0);
    assert!((sim - 0.995).abs() < 0.001, "{sim}");

    // An orthogonal vector misses, and reports how close the best candidate was.
    let v = s
        .lookup(KEY_A, json!({"vector": axis(8, 3, 0.0), "scope": scope}))
        .await?;
    assert_eq!(v["hit"], false);
    assert!(v["entry_id"].is_null() && v["response"].is_null());
    assert!(v["best_similarity"].as_f64().unwrap_or(1.0) < 0.1);
    Ok(())
}

#[tokio::test]
async fn scope_partitions_both_paths() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &Setup::default()).await?;
    let stored = json!({"model": "m1", "system": "Answer briefly."});
    s.store(
        KEY_A,
        json!({"prompt": "hello", "vector": axis(8, 1, 0.0),
                          "response": answer("hi"), "scope": stored}),
    )
    .await?;
    for other in [
        json!({"model": "m2", "system": "Answer briefly."}),
        json!({"model": "m1", "system": "Answer at length."}),
        json!({"model": "m1", "system": "Answer briefly.", "temperature": 1.0}),
        json!({"model": "m1", "system": "Answer briefly.", "messages": [{"role": "user", "content": "earlier"}]}),
    ] {
        let v = s
            .lookup(
                KEY_A,
                json!({"prompt": "hello", "vector": axis(8, 1, 0.0), "scope": other}),
            )
            .await?;
        assert_eq!(v["hit"], false, "scope {other} must not see the entry: {v}");
    }
    let v = s
        .lookup(
            KEY_A,
            json!({"prompt": "hello", "scope": {"system": "Answer briefly.", "model": "m1"}}),
        )
        .await?;
    assert_eq!(v["hit"], true);
    Ok(())
}

#[tokio::test]
async fn tenants_never_see_each_other() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &Setup::default()).await?;
    let id = s
        .store(KEY_A, json!({"prompt": "secret plan", "vector": axis(8, 2, 0.0), "response": answer("A's answer")}))
        .await?;
    let v = s
        .lookup(
            KEY_B,
            json!({"prompt": "secret plan", "vector": axis(8, 2, 0.0)}),
        )
        .await?;
    assert_eq!(v["hit"], false, "tenant B saw tenant A's entry: {v}");
    // B cannot delete A's entry either.
    let (status, body, _) = s
        .call(
            Method::DELETE,
            &format!("/v1/entries/{id}"),
            Some(KEY_B),
            None,
        )
        .await?;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("entry_not_found"))
    );
    // A key may not name another tenant.
    let res = s
        .http
        .post(format!("{}/v1/lookup", s.url))
        .bearer_auth(KEY_B)
        .header("x-semantis-tenant", "team-a")
        .json(&json!({"prompt": "secret plan"}))
        .send()
        .await?;
    assert_eq!(res.status().as_u16(), 403);
    // The admin key acts for the tenant it names.
    let res = s
        .http
        .post(format!("{}/v1/lookup", s.url))
        .bearer_auth(ADMIN)
        .header("x-semantis-tenant", "team-a")
        .json(&json!({"prompt": "secret plan"}))
        .send()
        .await?;
    let v: serde_json::Value = res.json().await?;
    assert_eq!(v["hit"], true, "{v}");
    // ... and must name one that exists.
    let res = s
        .http
        .post(format!("{}/v1/lookup", s.url))
        .bearer_auth(ADMIN)
        .header("x-semantis-tenant", "ghost")
        .json(&json!({"prompt": "secret plan"}))
        .send()
        .await?;
    assert_eq!(res.status().as_u16(), 404);
    let v: serde_json::Value = res.json().await?;
    assert_eq!(v["error"]["code"], "unknown_tenant");
    Ok(())
}

#[tokio::test]
async fn min_similarity_can_raise_the_floor_but_never_lower_it() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &Setup::default()).await?;
    s.store(
        KEY_A,
        json!({"prompt": "p", "vector": axis(8, 4, 0.0), "response": answer("r")}),
    )
    .await?;
    // similarity of axis(4, 0.3) to axis(4, 0) is 1/sqrt(1.09) ≈ 0.958: above the 0.9 floor.
    let near = axis(8, 4, 0.3);
    let v = s.lookup(KEY_A, json!({"vector": near})).await?;
    assert_eq!(v["hit"], true);
    let v = s
        .lookup(KEY_A, json!({"vector": near, "min_similarity": 0.99}))
        .await?;
    assert_eq!(
        (
            v["hit"].as_bool(),
            v["threshold"].as_f64().map(|t| (t * 100.0).round())
        ),
        (Some(false), Some(99.0))
    );
    // 0.6 ≈ similarity 0.857: below the floor, and asking for 0.5 does not lower it.
    let far = axis(8, 4, 0.6);
    let v = s
        .lookup(KEY_A, json!({"vector": far, "min_similarity": 0.5}))
        .await?;
    assert_eq!(v["hit"], false, "{v}");
    assert!((v["threshold"].as_f64().unwrap_or(0.0) - 0.9).abs() < 1e-6);
    // The near miss is counted for threshold tuning.
    let m = s.metrics().await?;
    assert!(
        metric_sum(
            &m,
            "semantis_cache_near_misses_total",
            &[("tenant", "team-a")]
        ) >= 1.0,
        "{m}"
    );
    Ok(())
}

#[tokio::test]
async fn delete_invalidate_and_stats() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &Setup::default()).await?;
    let a = s
        .store(KEY_A, json!({"prompt": "one", "vector": axis(8, 0, 0.0), "response": answer("1"),
                             "scope": {"namespace": "docs"}, "prompt_tokens": 10, "completion_tokens": 90, "cost_usd": 0.01}))
        .await?;
    s.store(KEY_A, json!({"prompt": "two", "vector": axis(8, 1, 0.0), "response": answer("2"), "scope": {"namespace": "docs"}}))
        .await?;
    s.store(KEY_A, json!({"prompt": "three", "vector": axis(8, 2, 0.0), "response": answer("3"), "scope": {"namespace": "chat"}}))
        .await?;
    s.store(KEY_A, json!({"prompt": "four", "vector": axis(8, 3, 0.0), "response": answer("4"), "scope": {"model": "x"}}))
        .await?;

    let v = s
        .lookup(
            KEY_A,
            json!({"prompt": "one", "scope": {"namespace": "docs"}}),
        )
        .await?;
    assert_eq!(v["hit"], true);
    let (status, _, _) = s
        .call(
            Method::DELETE,
            &format!("/v1/entries/{a}"),
            Some(KEY_A),
            None,
        )
        .await?;
    assert_eq!(status, 204);
    let v = s
        .lookup(
            KEY_A,
            json!({"prompt": "one", "scope": {"namespace": "docs"}}),
        )
        .await?;
    assert_eq!(v["hit"], false, "a deleted entry must not be served: {v}");
    let (status, body, _) = s
        .call(
            Method::DELETE,
            &format!("/v1/entries/{a}"),
            Some(KEY_A),
            None,
        )
        .await?;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("entry_not_found"))
    );
    let (status, _, _) = s
        .call(Method::DELETE, "/v1/entries/not-a-uuid", Some(KEY_A), None)
        .await?;
    assert_eq!(status, 404);

    let (status, v, _) = s
        .call(
            Method::POST,
            "/v1/invalidate",
            Some(KEY_A),
            Some(&json!({"namespace": "docs"})),
        )
        .await?;
    assert_eq!((status, v["deleted"].as_u64()), (200, Some(1)));
    let (_, v, _) = s
        .call(
            Method::POST,
            "/v1/invalidate",
            Some(KEY_A),
            Some(&json!({"scope": {"model": "x"}})),
        )
        .await?;
    assert_eq!(v["deleted"], 1);
    let v = s
        .lookup(
            KEY_A,
            json!({"prompt": "three", "scope": {"namespace": "chat"}}),
        )
        .await?;
    assert_eq!(v["hit"], true, "other namespaces stay: {v}");
    let (status, v, _) = s
        .call(
            Method::POST,
            "/v1/invalidate",
            Some(KEY_A),
            Some(&json!({"namespace": "docs", "all": true})),
        )
        .await?;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("invalid_request"))
    );
    let (_, v, _) = s
        .call(
            Method::POST,
            "/v1/invalidate",
            Some(KEY_A),
            Some(&json!({"all": true})),
        )
        .await?;
    assert_eq!(v["deleted"], 1);
    let v = s
        .lookup(
            KEY_A,
            json!({"prompt": "three", "scope": {"namespace": "chat"}}),
        )
        .await?;
    assert_eq!(v["hit"], false);

    // Usage accounting is written off the hit path; wait for it to land.
    s.eventually("usage accounting", Duration::from_secs(10), || async {
        let (_, v, _) = s.call(Method::GET, "/v1/stats", Some(KEY_A), None).await?;
        Ok(v["lookups"].as_u64() == Some(4))
    })
    .await?;
    let (_, v, _) = s.call(Method::GET, "/v1/stats", Some(KEY_A), None).await?;
    assert_eq!(v["tenant"], "team-a");
    assert_eq!(v["entries"], 0);
    assert_eq!(v["hits"], 2);
    assert_eq!(v["tokens_saved"], 100);
    assert!(
        (v["usd_saved"].as_f64().unwrap_or(0.0) - 0.01).abs() < 1e-9,
        "{v}"
    );
    let (_, v, _) = s.call(Method::GET, "/v1/stats", Some(KEY_B), None).await?;
    assert_eq!(v["lookups"], 0, "tenant B's stats are its own");
    Ok(())
}

#[tokio::test]
async fn bad_input_gets_a_stable_error_code_and_changes_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &Setup::default()).await?;
    s.store(
        KEY_A,
        json!({"prompt": "keep me", "vector": axis(8, 5, 0.0), "response": answer("kept")}),
    )
    .await?;
    // Just over the 64 KiB limit: the server answers 413 before reading it all (and closes the
    // connection), so keep it small enough to sit in the socket buffers rather than race a reset.
    let huge = "x".repeat(80 * 1024);
    let cases: Vec<(&str, Option<&str>, serde_json::Value, u16, &str)> = vec![
        (
            "/v1/entries",
            Some(KEY_A),
            json!({"prompt": huge, "vector": axis(8, 0, 0.0), "response": {}}),
            413,
            "payload_too_large",
        ),
        (
            "/v1/lookup",
            Some(KEY_A),
            json!({"vector": [1.0, 2.0]}),
            422,
            "dimension_mismatch",
        ),
        (
            "/v1/entries",
            Some(KEY_A),
            json!({"prompt": "p", "vector": [1.0, 2.0, 3.0], "response": {}}),
            422,
            "dimension_mismatch",
        ),
        (
            "/v1/lookup",
            Some(KEY_A),
            json!({"vector": [1e39, 0, 0, 0, 0, 0, 0, 0]}),
            422,
            "non_finite_vector",
        ),
        (
            "/v1/lookup",
            Some(KEY_A),
            json!({"vector": [0, 0, 0, 0, 0, 0, 0, 0]}),
            422,
            "zero_vector",
        ),
        (
            "/v1/lookup",
            Some(KEY_A),
            json!({"prompt": "   "}),
            422,
            "empty_prompt",
        ),
        (
            "/v1/entries",
            Some(KEY_A),
            json!({"prompt": "", "vector": axis(8, 0, 0.0), "response": {}}),
            422,
            "empty_prompt",
        ),
        ("/v1/lookup", Some(KEY_A), json!({}), 400, "missing_query"),
        (
            "/v1/entries",
            Some(KEY_A),
            json!({"prompt": "p", "vector": axis(8, 0, 0.0), "response": {},
                   "prompt_tokens": u64::MAX, "completion_tokens": u64::MAX}),
            422,
            "value_out_of_range",
        ),
        (
            "/v1/entries",
            Some(KEY_A),
            json!({"prompt": "p", "vector": axis(8, 0, 0.0), "response": {},
                   "completion_tokens": 1_000_000_001u64}),
            422,
            "value_out_of_range",
        ),
        (
            "/v1/lookup",
            Some(KEY_A),
            json!({"prompt": "p", "min_similarity": 1.5}),
            422,
            "similarity_out_of_range",
        ),
        (
            "/v1/entries",
            Some(KEY_A),
            json!({"prompt": "p", "vector": axis(8, 0, 0.0), "response": {}, "ttl_seconds": 0}),
            422,
            "invalid_ttl",
        ),
        (
            "/v1/entries",
            Some(KEY_A),
            json!({"prompt": "p", "vector": axis(8, 0, 0.0), "response": {}, "cost_usd": -1.0}),
            400,
            "invalid_request",
        ),
        (
            "/v1/lookup",
            Some(KEY_A),
            json!({"prompt": "p", "surprise": 1}),
            400,
            "invalid_request",
        ),
        (
            "/v1/lookup",
            Some(KEY_A),
            json!({"prompt": 42}),
            400,
            "invalid_request",
        ),
        (
            "/v1/lookup",
            Some("wrong-key"),
            json!({"prompt": "keep me"}),
            401,
            "invalid_api_key",
        ),
        (
            "/v1/lookup",
            None,
            json!({"prompt": "keep me"}),
            401,
            "missing_api_key",
        ),
        (
            "/v1/lookup",
            Some(ADMIN),
            json!({"prompt": "keep me"}),
            400,
            "tenant_required",
        ),
        (
            "/v1/entries",
            Some(KEY_A),
            json!({"prompt": "needs a vector", "response": {}}),
            503,
            "embedder_unavailable",
        ),
    ];
    for (path, key, body, status, code) in cases {
        let (got, v, headers) = s.call(Method::POST, path, key, Some(&body)).await?;
        assert_eq!(
            (got, v["error"]["code"].as_str()),
            (status, Some(code)),
            "{path} {v}"
        );
        if got == 413 {
            // The unread rest of the body poisons the connection; the client must not reuse it.
            assert_eq!(
                headers.get("connection").and_then(|h| h.to_str().ok()),
                Some("close")
            );
        }
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    // Malformed JSON and NaN (not JSON at all), and a missing content type.
    for raw in ["{\"prompt\": ", "{\"vector\": [NaN, 0, 0, 0, 0, 0, 0, 0]}"] {
        let res = s
            .http
            .post(format!("{}/v1/lookup", s.url))
            .bearer_auth(KEY_A)
            .header("content-type", "application/json")
            .body(raw)
            .send()
            .await?;
        assert_eq!(res.status().as_u16(), 400);
        let v: serde_json::Value = res.json().await?;
        assert_eq!(v["error"]["code"], "malformed_json");
    }
    let res = s
        .http
        .post(format!("{}/v1/lookup", s.url))
        .bearer_auth(KEY_A)
        .body("{}")
        .send()
        .await?;
    assert_eq!(res.status().as_u16(), 415);
    let (status, v, _) = s
        .call(Method::GET, "/v1/nothing", Some(KEY_A), None)
        .await?;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    let (status, v, _) = s.call(Method::GET, "/v1/lookup", Some(KEY_A), None).await?;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (405, Some("method_not_allowed"))
    );

    // Nothing was lost or added along the way.
    let v = s.lookup(KEY_A, json!({"prompt": "keep me"})).await?;
    assert_eq!(v["response"], answer("kept"));
    s.eventually("usage accounting", Duration::from_secs(10), || async {
        let (_, v, _) = s.call(Method::GET, "/v1/stats", Some(KEY_A), None).await?;
        Ok(v["lookups"].as_u64() == Some(1))
    })
    .await?;
    let (_, v, _) = s.call(Method::GET, "/v1/stats", Some(KEY_A), None).await?;
    assert_eq!(v["entries"], 1);
    Ok(())
}

#[tokio::test]
async fn service_endpoints_and_metrics() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &Setup::default()).await?;
    let (status, _, _) = s.call(Method::GET, "/healthz", None, None).await?;
    assert_eq!(status, 200);
    let (status, v, _) = s.call(Method::GET, "/readyz", None, None).await?;
    assert_eq!((status, v["ready"].as_bool()), (200, Some(true)), "{v}");
    let (status, v, _) = s.call(Method::GET, "/openapi.json", None, None).await?;
    assert_eq!(status, 200);
    for path in [
        "/v1/lookup",
        "/v1/entries",
        "/v1/entries/{id}",
        "/v1/invalidate",
        "/v1/stats",
    ] {
        assert!(v["paths"][path].is_object(), "openapi lacks {path}");
    }
    assert!(v["components"]["schemas"]["ErrorBody"].is_object());

    s.store(
        KEY_A,
        json!({"prompt": "m", "vector": axis(8, 0, 0.0), "response": answer("x"),
                          "prompt_tokens": 5, "completion_tokens": 5, "cost_usd": 0.5}),
    )
    .await?;
    s.lookup(KEY_A, json!({"prompt": "m"})).await?;
    s.lookup(KEY_A, json!({"vector": axis(8, 6, 0.0)})).await?;
    let m = s.metrics().await?;
    let hit = [("tenant", "team-a"), ("result", "hit"), ("path", "exact")];
    assert_eq!(
        metric_sum(&m, "semantis_cache_lookups_total", &hit),
        1.0,
        "{m}"
    );
    let miss = [("tenant", "team-a"), ("result", "miss")];
    assert_eq!(metric_sum(&m, "semantis_cache_lookups_total", &miss), 1.0);
    assert_eq!(
        metric_sum(
            &m,
            "semantis_cache_tokens_saved_total",
            &[("tenant", "team-a")]
        ),
        10.0
    );
    assert_eq!(
        metric_sum(
            &m,
            "semantis_cache_usd_saved_micros_total",
            &[("tenant", "team-a")]
        ),
        500_000.0
    );
    assert_eq!(
        metric_sum(&m, "semantis_cache_entries", &[("tenant", "team-a")]),
        1.0
    );
    assert!(
        metric_sum(
            &m,
            "semantis_cache_lookup_duration_seconds_count",
            &[("path", "exact")]
        ) >= 1.0
    );
    assert!(
        metric_sum(
            &m,
            "semantis_cache_best_similarity_count",
            &[("tenant", "team-a")]
        ) >= 1.0
    );
    Ok(())
}

#[tokio::test]
async fn an_entry_id_in_any_uuid_spelling_deletes_it() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &Setup::default()).await?;
    for (i, spell) in ["upper", "braced", "urn"].into_iter().enumerate() {
        let prompt = format!("spelled {spell}");
        let id = s
            .store(
                KEY_A,
                json!({"prompt": prompt, "vector": axis(8, i, 0.0), "response": answer(spell)}),
            )
            .await?;
        let spelled = match spell {
            "upper" => id.to_uppercase(),
            "braced" => format!("%7B{id}%7D"),
            _ => format!("urn:uuid:{id}"),
        };
        let (status, v, _) = s
            .call(
                Method::DELETE,
                &format!("/v1/entries/{spelled}"),
                Some(KEY_A),
                None,
            )
            .await?;
        assert_eq!(status, 204, "{spelled}: {v}");
        let exact = s.lookup(KEY_A, json!({"prompt": prompt})).await?;
        let semantic = s.lookup(KEY_A, json!({"vector": axis(8, i, 0.0)})).await?;
        assert_eq!(
            (exact["hit"].clone(), semantic["hit"].clone()),
            (json!(false), json!(false)),
            "{spelled}"
        );
    }
    Ok(())
}

/// `/metrics` names every tenant with its entries, hits and savings, and `/readyz`'s details
/// name dependency errors and the index version: the API port, which every tenant reaches,
/// serves neither. The metrics port serves both, for the scraper and the operator.
#[tokio::test]
async fn metrics_and_readiness_details_are_only_on_the_metrics_port() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &Setup::default()).await?;
    s.store(
        KEY_A,
        json!({"prompt": "p", "vector": axis(8, 1, 0.0), "response": answer("a")}),
    )
    .await?;
    let on_api = s.http.get(format!("{}/metrics", s.url)).send().await?;
    assert_eq!(on_api.status(), 404, "the API port serves /metrics");
    let text = s.metrics().await?;
    assert!(
        text.contains("semantis_cache_stores_total{tenant=\"team-a\"}"),
        "{text}"
    );

    let public: serde_json::Value = s
        .http
        .get(format!("{}/readyz", s.url))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(public["ready"], true, "{public}");
    let details = |v: &serde_json::Value| {
        v["checks"]
            .as_array()
            .map(|c| c.iter().filter(|c| !c["detail"].is_null()).count())
            .unwrap_or(0)
    };
    assert_eq!(
        details(&public),
        0,
        "the API port's /readyz carries details: {public}"
    );
    let private: serde_json::Value = s
        .http
        .get(format!("{}/readyz", s.metrics_url))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(private["ready"], true, "{private}");
    assert!(details(&private) > 0, "{private}");
    Ok(())
}

async fn stats(s: &Server, key: &str) -> anyhow::Result<serde_json::Value> {
    let (status, v, _) = s.call(Method::GET, "/v1/stats", Some(key), None).await?;
    anyhow::ensure!(status == 200, "stats answered {status}: {v}");
    Ok(v)
}

/// One tenant storing large responses is held to its byte budget (`max_bytes`), the other
/// tenant untouched; what the budget counts is the same after a restart, when it is read
/// back from the table, as while the entries were stored.
#[tokio::test]
async fn a_tenant_of_large_responses_stays_within_its_byte_budget_across_a_restart()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let budget = 200_000u64;
    let setup = Setup {
        max_body_bytes: 1 << 20,
        tenant_a_extra: format!("max_bytes = {budget}\n"),
        ..Setup::default()
    };
    let s = Server::start(dir.path(), &setup).await?;
    let bulk = "r".repeat(30_000);
    let mut ids = Vec::new();
    for i in 0..12 {
        ids.push(
            s.store(KEY_A, json!({"prompt": format!("large {i}"), "vector": axis(8, i % 8, 0.01 * i as f32), "response": answer(&bulk)}))
                .await?,
        );
    }
    s.store(
        KEY_B,
        json!({"prompt": "small", "vector": axis(8, 0, 0.0), "response": answer("s")}),
    )
    .await?;
    let a = stats(&s, KEY_A).await?;
    let held = a["bytes"].as_u64().unwrap_or(u64::MAX);
    assert_eq!(a["max_bytes"], budget, "{a}");
    assert!(
        held <= budget && held > budget / 2,
        "team-a holds {held} bytes: {a}"
    );
    let entries = a["entries"].as_u64().unwrap_or(0);
    assert!(
        (5..12).contains(&entries),
        "team-a holds {entries} entries: {a}"
    );
    let evicted = metric_sum(
        &s.metrics().await?,
        "semantis_cache_evictions_total",
        &[("tenant", "team-a"), ("reason", "bytes")],
    );
    assert_eq!(evicted, (12 - entries) as f64);
    // The newest entries are the ones kept; the oldest went.
    let newest = s.lookup(KEY_A, json!({"prompt": "large 11"})).await?;
    let oldest = s.lookup(KEY_A, json!({"prompt": "large 0"})).await?;
    assert_eq!(
        (newest["hit"].as_bool(), oldest["hit"].as_bool()),
        (Some(true), Some(false))
    );
    let b = stats(&s, KEY_B).await?;
    assert_eq!(b["entries"], 1, "{b}");

    // After a restart the budget is counted from the table: the same figure.
    let s = s.restart().await?;
    let again = stats(&s, KEY_A).await?;
    assert_eq!(again["bytes"].as_u64(), Some(held), "{again}");
    s.store(
        KEY_A,
        json!({"prompt": "large 12", "vector": axis(8, 5, 0.2), "response": answer(&bulk)}),
    )
    .await?;
    let after = stats(&s, KEY_A).await?;
    assert!(
        after["bytes"].as_u64().unwrap_or(u64::MAX) <= budget,
        "{after}"
    );
    Ok(())
}

/// Answers larger than `storage.resident_response_max_bytes` stay out of the resident index's
/// memory; a hit reads them from the write-ahead tail or the table. Every answer is served
/// whole on both paths while unflushed, once flushed, and after a restart (the hot layer
/// empty, so the exact path goes through the index too); deleted ones miss.
#[tokio::test]
async fn large_answers_stay_on_disk_and_are_served_whole_on_both_paths() -> anyhow::Result<()> {
    use crate::harness::scattered;
    use serde_json::Value;
    let dir = tempfile::tempdir()?;
    let setup = Setup {
        max_body_bytes: 1 << 20,
        storage_extra: "resident_response_max_bytes = 1000\n".into(),
        ..Setup::default()
    };
    let s = Server::start(dir.path(), &setup).await?;
    let body = |i: usize| {
        if i.is_multiple_of(2) {
            format!("{i}:{}", "large ".repeat(4_000))
        } else {
            format!("{i}: small")
        }
    };
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(
            s.store(
                KEY_A,
                json!({"prompt": format!("answer {i}"), "vector": scattered(8, i as u64), "response": answer(&body(i))}),
            )
            .await?,
        );
    }
    /// Entry `i` looked up by its prompt (exact) and by its vector (semantic).
    async fn both_paths(s: &Server, i: usize) -> anyhow::Result<(Value, Value)> {
        let exact = s
            .lookup(KEY_A, json!({"prompt": format!("answer {i}")}))
            .await?;
        let semantic = s
            .lookup(KEY_A, json!({"vector": scattered(8, i as u64)}))
            .await?;
        Ok((exact, semantic))
    }
    async fn served_whole(s: &Server, id: &str, i: usize, want: Value) -> anyhow::Result<()> {
        let (exact, semantic) = both_paths(s, i).await?;
        for v in [&exact, &semantic] {
            anyhow::ensure!(v["entry_id"] == id, "answer {i}: {v}");
            anyhow::ensure!(v["response"] == want, "answer {i} was not served whole");
        }
        Ok(())
    }
    for (i, id) in ids.iter().enumerate() {
        served_whole(&s, id, i, answer(&body(i))).await?;
    }
    // Once flushed, from the table.
    s.eventually("every entry is flushed", Duration::from_secs(60), || {
        let s = &s;
        async move {
            let m = s.metrics().await?;
            Ok(metric_sum(&m, "semantis_store_flushed_entries_total", &[]) >= 20.0)
        }
    })
    .await?;
    for (i, id) in ids.iter().enumerate() {
        served_whole(&s, id, i, answer(&body(i))).await?;
    }
    for i in [0usize, 1, 2] {
        s.delete_entry(KEY_A, &ids[i]).await?;
    }
    let s = s.restart().await?;
    s.eventually(
        "the resident index holds the large answers without them",
        Duration::from_secs(60),
        || {
            let s = &s;
            async move {
                let m = s.metrics().await?;
                Ok(metric_sum(
                    &m,
                    "semantis_index_resident_responses_on_disk",
                    &[("tenant", "team-a")],
                ) == 8.0)
            }
        },
    )
    .await?;
    for (i, id) in ids.iter().enumerate().skip(3) {
        served_whole(&s, id, i, answer(&body(i))).await?;
    }
    for i in [0usize, 1, 2] {
        let (exact, semantic) = both_paths(&s, i).await?;
        assert_eq!(exact["hit"], false, "{exact}");
        assert_ne!(semantic["entry_id"], ids[i].as_str(), "{semantic}");
    }
    Ok(())
}
