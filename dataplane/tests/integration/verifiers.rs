//! The verifier stage: remote rerankers (TEI's `/rerank`, the `/v1/rerank` protocol) against a
//! local HTTP server that speaks both, healthy and faulty; the local cross-encoder with the
//! real model; and feedback through the API, across a restart and across replicas.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use parking_lot::Mutex;
use reqwest::Method;
use semantis_cache::ports::{Verifier, VerifyError};
use semantis_contract::{VerifierConfig, VerifierProvider};
use semantis_dataplane::metrics::Metrics;
use semantis_dataplane::verify::remote::RemoteVerifier;
use serde_json::{Value, json};

use crate::embedders::{DIM, embed_text, key_file, start_fake};
use crate::harness::{
    KEY_A, KEY_B, Server, Setup, answer, axis, fresh_database, metric_sum, private_redis,
    serve_fake, shared_postgres,
};

const RERANK_KEY: &str = "rk-test-secret";

/// What the fake reranker does with the next requests.
#[derive(Clone, Debug, PartialEq)]
enum Fault {
    None,
    /// 500 to everything.
    Down,
    /// Sleep this long before answering.
    Slow(Duration),
    /// A body that is not the protocol's.
    Garbage,
    /// A score for a text that was not sent.
    BadIndex,
}

/// One request the fake saw: which protocol, the body, the Authorization header.
type Request = (String, Value, Option<String>);

#[derive(Clone)]
struct Reranker {
    fault: Arc<Mutex<Fault>>,
    requests: Arc<Mutex<Vec<Request>>>,
}

/// The words that carry meaning: what the fake reranker compares.
fn content_words(text: &str) -> BTreeSet<String> {
    const STOP: [&str; 12] = [
        "how", "do", "i", "can", "a", "the", "my", "please", "what", "is", "to", "you",
    ];
    text.to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty() && !STOP.contains(w))
        .map(str::to_owned)
        .collect()
}

/// A cross-encoder's verdict, by rule: the same content words score 0.95, others 0.05.
fn rerank_score(query: &str, text: &str) -> f32 {
    if content_words(query) == content_words(text) {
        0.95
    } else {
        0.05
    }
}

async fn rerank(fake: Reranker, path: &'static str, headers: HeaderMap, body: Value) -> Response {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    fake.requests
        .lock()
        .push((path.to_owned(), body.clone(), auth.clone()));
    if auth.as_deref() != Some(&format!("Bearer {RERANK_KEY}")) {
        return (StatusCode::UNAUTHORIZED, "bad key").into_response();
    }
    let fault = fake.fault.lock().clone();
    match fault {
        Fault::None | Fault::BadIndex => {}
        Fault::Down => return (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response(),
        Fault::Slow(d) => tokio::time::sleep(d).await,
        Fault::Garbage => return Json(json!({"unexpected": true})).into_response(),
    }
    let query = body["query"].as_str().unwrap_or_default().to_owned();
    let field = if path == "tei" { "texts" } else { "documents" };
    let texts: Vec<String> = serde_json::from_value(body[field].clone()).unwrap_or_default();
    // Sorted by score, best first, as real rerankers answer: clients must use `index`.
    let mut scored: Vec<(usize, f32)> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| (i, rerank_score(&query, t)))
        .collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(b.0.cmp(&a.0)));
    if fault == Fault::BadIndex {
        scored[0].0 = texts.len() + 3;
    }
    if path == "tei" {
        Json(json!(
            scored
                .iter()
                .map(|(i, s)| json!({"index": i, "score": s}))
                .collect::<Vec<_>>()
        ))
        .into_response()
    } else {
        Json(json!({
            "id": "rerank-1",
            "results": scored
                .iter()
                .map(|(i, s)| json!({"index": i, "relevance_score": s}))
                .collect::<Vec<_>>(),
        }))
        .into_response()
    }
}

async fn start_reranker() -> anyhow::Result<(String, Reranker)> {
    let fake = Reranker {
        fault: Arc::new(Mutex::new(Fault::None)),
        requests: Arc::new(Mutex::new(Vec::new())),
    };
    let url = serve_fake(
        fake.clone(),
        &[("/rerank", "tei"), ("/v1/rerank", "rerank")],
        rerank,
    )
    .await?;
    Ok((url, fake))
}

fn rerank_key_file(dir: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    let path = dir.join("rerank-key");
    std::fs::write(&path, format!("{RERANK_KEY}\n"))?;
    Ok(path)
}

fn verifier(
    provider: VerifierProvider,
    endpoint: &str,
    key: &std::path::Path,
) -> anyhow::Result<RemoteVerifier> {
    let cfg = VerifierConfig {
        provider,
        endpoint: Some(endpoint.to_owned()),
        model: Some("fake-rerank".into()),
        api_key_file: Some(key.display().to_string()),
        breaker_failures: 3,
        breaker_cooldown_ms: 60_000,
        ..VerifierConfig::default()
    };
    Ok(RemoteVerifier::new("rr", &cfg, Arc::new(Metrics::new()?))?)
}

#[tokio::test]
async fn tei_and_rerank_protocols_score_candidates_in_the_order_sent() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let key = rerank_key_file(dir.path())?;
    let (url, fake) = start_reranker().await?;
    let candidates: Vec<String> = [
        "How do I reset my router?",
        "How can I reset my password?",
        "What is the capital of France?",
    ]
    .map(String::from)
    .to_vec();
    for (provider, endpoint) in [
        (VerifierProvider::Tei, url.clone()),
        (VerifierProvider::Rerank, url.clone()),
        // A base URL that already ends in /v1.
        (VerifierProvider::Rerank, format!("{url}/v1/")),
    ] {
        let v = verifier(provider, &endpoint, &key)?;
        let scores = v.score("How do I reset my password?", &candidates).await?;
        assert_eq!(scores, vec![0.05, 0.95, 0.05], "{provider:?} at {endpoint}");
    }
    let requests = fake.requests.lock();
    assert_eq!(requests.len(), 3);
    let (path, body, auth) = &requests[0];
    assert_eq!(path, "tei");
    assert_eq!(body["texts"].as_array().map(Vec::len), Some(3));
    assert_eq!(body["raw_scores"], false);
    assert_eq!(
        auth.as_deref(),
        Some(format!("Bearer {RERANK_KEY}").as_str())
    );
    let (path, body, _) = &requests[1];
    assert_eq!(path, "rerank");
    assert_eq!(body["model"], "fake-rerank");
    assert_eq!(body["documents"].as_array().map(Vec::len), Some(3));
    assert_eq!(body["top_n"], 3);
    Ok(())
}

#[tokio::test]
async fn a_failing_reranker_gives_clear_errors_and_opens_the_breaker() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let key = rerank_key_file(dir.path())?;
    let (url, fake) = start_reranker().await?;
    let v = verifier(VerifierProvider::Rerank, &url, &key)?;
    let one = vec!["How can I reset my password?".to_owned()];
    *fake.fault.lock() = Fault::Garbage;
    let err = v.score("q", &one).await.expect_err("garbage");
    assert!(matches!(err, VerifyError::Protocol { .. }), "{err}");
    *fake.fault.lock() = Fault::BadIndex;
    let err = v.score("q", &one).await.expect_err("bad index");
    assert!(matches!(err, VerifyError::Protocol { .. }), "{err}");
    *fake.fault.lock() = Fault::Down;
    let err = v.score("q", &one).await.expect_err("down");
    assert!(
        matches!(err, VerifyError::Http { status: 500, .. }),
        "{err}"
    );
    // Three failures in a row: the breaker refuses without calling.
    let calls = fake.requests.lock().len();
    let err = v.score("q", &one).await.expect_err("open");
    assert!(matches!(err, VerifyError::CircuitOpen(_)), "{err}");
    assert_eq!(fake.requests.lock().len(), calls, "no call while open");
    // A wrong key is an HTTP error too, never a silent score.
    *fake.fault.lock() = Fault::None;
    let wrong = dir.path().join("wrong-key");
    std::fs::write(&wrong, "nope")?;
    let err = verifier(VerifierProvider::Tei, &url, &wrong)?
        .score("q", &one)
        .await
        .expect_err("wrong key");
    assert!(
        matches!(err, VerifyError::Http { status: 401, .. }),
        "{err}"
    );
    Ok(())
}

/// A dataplane embedding with the fake OpenAI server (bag of words) and verifying team-a's
/// semantic hits with the fake reranker; team-b goes unverified.
async fn verified_server(
    root: &std::path::Path,
    budget_ms: u64,
) -> anyhow::Result<(Server, Reranker)> {
    let (embed_url, _) = start_fake().await?;
    let (rerank_url, reranker) = start_reranker().await?;
    let setup = Setup {
        embedder: Some(format!(
            "provider = \"openai\"\nmodel = \"fake-embed\"\ndimension = {DIM}\nendpoint = \"{embed_url}\"\napi_key_file = \"{}\"\n",
            key_file(root)?.display()
        )),
        min_similarity: Some(0.5),
        extra: format!(
            "verifier = \"none\"\n\n[verifiers.rr]\nprovider = \"rerank\"\nendpoint = \"{rerank_url}\"\nmodel = \"fake-rerank\"\napi_key_file = \"{}\"\nbreaker_failures = 1000\n",
            rerank_key_file(root)?.display()
        ),
        tenant_a_extra: format!("verifier = \"rr\"\nverifier_budget_ms = {budget_ms}\n"),
        ..Setup::default()
    };
    Ok((Server::start(root, &setup).await?, reranker))
}

#[tokio::test]
async fn a_remote_verifier_decides_semantic_hits_and_its_outage_is_a_miss() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (s, reranker) = verified_server(dir.path(), 300).await?;
    let stored = "How do I reset my password?";
    for key in [KEY_A, KEY_B] {
        s.store(
            key,
            json!({"prompt": stored, "response": answer("Use the reset link.")}),
        )
        .await?;
    }
    let paraphrase = json!({"prompt": "How can I reset my password?"});
    let v = s.lookup(KEY_A, paraphrase.clone()).await?;
    assert_eq!(v["path"], "semantic", "{v}");
    assert_eq!(v["verifier"]["name"], "rr");
    assert_eq!(v["verifier"]["outcome"], "accepted");
    assert!((v["verifier"]["score"].as_f64().unwrap_or(0.0) - 0.95).abs() < 1e-6);
    // Near in vector space (5 of 6 words), another question: the verifier refuses it.
    let other = json!({"prompt": "How do I reset my router?"});
    let v = s.lookup(KEY_A, other.clone()).await?;
    assert!(v["best_similarity"].as_f64().unwrap_or(0.0) > 0.8, "{v}");
    assert_eq!(
        (v["hit"].as_bool(), v["verifier"]["outcome"].as_str()),
        (Some(false), Some("rejected")),
        "{v}"
    );
    // Without a verifier, cosine alone serves the wrong answer: what the verifier is for.
    let v = s.lookup(KEY_B, other).await?;
    assert_eq!(
        (v["hit"].as_bool(), v["verifier"].is_null()),
        (Some(true), true),
        "{v}"
    );

    *reranker.fault.lock() = Fault::Down;
    // A question scored before keeps its verdict (the scores are remembered); a new one
    // needs the verifier.
    let v = s.lookup(KEY_A, paraphrase.clone()).await?;
    assert_eq!(v["path"], "semantic", "a remembered verdict: {v}");
    let paraphrase = json!({"prompt": "How can I reset my password, please?"});
    let v = s.lookup(KEY_A, paraphrase.clone()).await?;
    assert_eq!(
        (
            v["hit"].as_bool(),
            v["degraded"].as_str(),
            v["verifier"]["outcome"].as_str()
        ),
        (
            Some(false),
            Some("verifier_unavailable"),
            Some("unavailable")
        ),
        "a verifier that is down is a miss, never an unverified hit: {v}"
    );
    *reranker.fault.lock() = Fault::Slow(Duration::from_secs(3));
    let started = Instant::now();
    let v = s
        .lookup(
            KEY_A,
            json!({"prompt": "Please: how can I reset my password?"}),
        )
        .await?;
    assert!(
        started.elapsed() < Duration::from_millis(2000),
        "the budget was not kept"
    );
    assert_eq!(
        (v["hit"].as_bool(), v["degraded"].as_str()),
        (Some(false), Some("verifier_over_budget")),
        "{v}"
    );
    // Exact hits never wait for the verifier.
    let v = s.lookup(KEY_A, json!({"prompt": stored})).await?;
    assert_eq!(v["path"], "exact", "{v}");
    let m = s.metrics().await?;
    for reason in ["unavailable", "over_budget"] {
        assert!(
            metric_sum(
                &m,
                "semantis_cache_verifier_failures_total",
                &[("tenant", "team-a"), ("reason", reason)]
            ) >= 1.0,
            "{reason}"
        );
    }
    assert!(s.rejected("verifier").await? >= 1.0);
    *reranker.fault.lock() = Fault::None;
    let v = s.lookup(KEY_A, paraphrase).await?;
    assert_eq!(v["path"], "semantic", "back to verified hits: {v}");
    // A lookup by vector alone has nothing to verify: a miss for a verified tenant.
    let (status, v, _) = s
        .call(
            Method::POST,
            "/v1/lookup",
            Some(KEY_A),
            Some(&json!({"vector": embed_text(stored, DIM)})),
        )
        .await?;
    assert_eq!(status, 200);
    assert_eq!(
        (v["hit"].as_bool(), v["verifier"]["outcome"].as_str()),
        (Some(false), Some("no_prompt")),
        "{v}"
    );
    Ok(())
}

#[tokio::test]
async fn a_hit_reported_wrong_through_the_api_stays_unserved_across_a_restart() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let (s, _) = verified_server(dir.path(), 1000).await?;
    s.store(
        KEY_A,
        json!({"prompt": "How do I reset my password?", "response": answer("Use the link.")}),
    )
    .await?;
    let question = json!({"prompt": "How can I reset my password?"});
    let (status, v, headers) = s
        .call(Method::POST, "/v1/lookup", Some(KEY_A), Some(&question))
        .await?;
    assert_eq!((status, v["hit"].as_bool()), (200, Some(true)), "{v}");
    let request_id = v["request_id"].as_str().unwrap_or_default().to_owned();
    assert_eq!(
        headers.get("x-request-id").and_then(|h| h.to_str().ok()),
        Some(request_id.as_str())
    );
    // Bad feedback first: nothing is recorded.
    let bad = [
        (json!({"correct": false}), 400, "feedback_target_required"),
        (
            json!({"request_id": "never-served", "correct": false}),
            404,
            "request_not_found",
        ),
        (
            json!({"entry_id": "not-an-id", "correct": false}),
            404,
            "entry_not_found",
        ),
        (
            json!({"request_id": request_id, "correct": "no"}),
            400,
            "invalid_request",
        ),
    ];
    for (body, want, code) in bad {
        let (status, v, _) = s
            .call(Method::POST, "/v1/feedback", Some(KEY_A), Some(&body))
            .await?;
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (want, Some(code)),
            "{body}: {v}"
        );
    }
    let (status, _, _) = s
        .call(
            Method::POST,
            "/v1/feedback",
            Some("wrong-key"),
            Some(&json!({"request_id": request_id, "correct": false})),
        )
        .await?;
    assert_eq!(status, 401);
    // Another tenant cannot report on team-a's request.
    let (status, _, _) = s
        .call(
            Method::POST,
            "/v1/feedback",
            Some(KEY_B),
            Some(&json!({"request_id": request_id, "correct": false})),
        )
        .await?;
    assert_eq!(status, 404);
    let still = s.lookup(KEY_A, question.clone()).await?;
    assert_eq!(still["hit"], true, "bad feedback changed nothing: {still}");

    let (status, v, _) = s
        .call(
            Method::POST,
            "/v1/feedback",
            Some(KEY_A),
            Some(&json!({"request_id": request_id, "correct": false})),
        )
        .await?;
    assert_eq!(
        (status, v["applies_to"].as_str()),
        (200, Some("query")),
        "{v}"
    );
    let v = s.lookup(KEY_A, question.clone()).await?;
    assert_eq!(
        v["hit"], false,
        "a hit reported wrong is not served again: {v}"
    );
    let (_, stats, _) = s.call(Method::GET, "/v1/stats", Some(KEY_A), None).await?;
    assert_eq!(
        (
            stats["feedback"]["wrong"].as_u64(),
            stats["verifier"].as_str()
        ),
        (Some(1), Some("rr")),
        "{stats}"
    );
    let m = s.metrics().await?;
    assert_eq!(
        metric_sum(
            &m,
            "semantis_cache_feedback_total",
            &[("tenant", "team-a"), ("verdict", "wrong")]
        ),
        1.0
    );

    let s = s.restart().await?;
    let v = s.lookup(KEY_A, question).await?;
    assert_eq!(v["hit"], false, "the verdict survives a restart: {v}");
    let v = s
        .lookup(KEY_A, json!({"prompt": "How do I reset my password?"}))
        .await?;
    assert_eq!(
        v["path"], "exact",
        "the entry still answers its own prompt: {v}"
    );
    Ok(())
}

#[tokio::test]
async fn feedback_on_one_replica_applies_on_another_within_a_second() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let setup = Setup {
        redis_url: Some(private_redis("feedback-replicas")?),
        postgres_url: Some(fresh_database(&shared_postgres()?).await?),
        ..Setup::default()
    };
    let r1 = Server::start_replica(dir.path(), "r1", &setup).await?;
    let r2 = Server::start_replica(dir.path(), "r2", &setup).await?;
    r1.store(KEY_A, json!({"prompt": "shared question", "vector": axis(8, 2, 0.0), "response": answer("shared")}))
        .await?;
    let question = json!({"prompt": "a paraphrase", "vector": axis(8, 2, 0.05)});
    for r in [&r1, &r2] {
        r.eventually(
            "the entry on both replicas",
            Duration::from_secs(2),
            || async { Ok(r.lookup(KEY_A, question.clone()).await?["hit"] == true) },
        )
        .await?;
    }
    let v = r1.lookup(KEY_A, question.clone()).await?;
    let (status, _, _) = r1
        .call(
            Method::POST,
            "/v1/feedback",
            Some(KEY_A),
            Some(&json!({"request_id": v["request_id"], "correct": false})),
        )
        .await?;
    assert_eq!(status, 200);
    r2.eventually(
        "the verdict on the other replica",
        Duration::from_secs(1),
        || async { Ok(r2.lookup(KEY_A, question.clone()).await?["hit"] == false) },
    )
    .await?;
    Ok(())
}

/// The verifier's scores are remembered per (tenant, query, candidate): a question asked again
/// costs no second call, and another tenant's identical question is scored on its own (so
/// the time it takes tells nothing about the first tenant's questions).
#[tokio::test]
async fn a_question_asked_again_is_scored_once_per_tenant() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (embed_url, _) = start_fake().await?;
    let (rerank_url, reranker) = start_reranker().await?;
    let setup = Setup {
        embedder: Some(format!(
            "provider = \"openai\"\nmodel = \"fake-embed\"\ndimension = {DIM}\nendpoint = \"{embed_url}\"\napi_key_file = \"{}\"\n",
            key_file(dir.path())?.display()
        )),
        min_similarity: Some(0.5),
        extra: format!(
            "verifier = \"rr\"\n\n[verifiers.rr]\nprovider = \"rerank\"\nendpoint = \"{rerank_url}\"\nmodel = \"fake-rerank\"\napi_key_file = \"{}\"\n",
            rerank_key_file(dir.path())?.display()
        ),
        ..Setup::default()
    };
    let s = Server::start(dir.path(), &setup).await?;
    for key in [KEY_A, KEY_B] {
        for (prompt, said) in [
            ("How do I reset my password?", "Use the reset link."),
            ("How do I reset my router?", "Hold the button."),
        ] {
            s.store(key, json!({"prompt": prompt, "response": answer(said)}))
                .await?;
        }
    }
    let calls = || reranker.requests.lock().len();
    let asked = [
        ("How can I reset my password?", true),
        ("Please, how do I reset my router?", true),
        ("How can I reset my modem?", false),
    ];
    let mut first = Vec::new();
    for (prompt, hit) in asked {
        let v = s.lookup(KEY_A, json!({"prompt": prompt})).await?;
        assert_eq!(v["hit"].as_bool(), Some(hit), "{prompt}: {v}");
        first.push(v["verifier"]["score"].clone());
    }
    let after_first = calls();
    assert!(after_first >= asked.len(), "{after_first} calls");
    for round in 0..5 {
        for ((prompt, hit), score) in asked.iter().zip(&first) {
            let v = s.lookup(KEY_A, json!({"prompt": prompt})).await?;
            assert_eq!(
                (v["hit"].as_bool(), &v["verifier"]["score"]),
                (Some(*hit), score),
                "round {round}, {prompt}: the same verdict as the first time: {v}"
            );
        }
    }
    assert_eq!(
        calls(),
        after_first,
        "a question asked again is not scored again"
    );
    for (prompt, hit) in asked {
        let v = s.lookup(KEY_B, json!({"prompt": prompt})).await?;
        assert_eq!(v["hit"].as_bool(), Some(hit), "{prompt}: {v}");
    }
    assert_eq!(
        calls(),
        2 * after_first,
        "another tenant's identical questions are scored for it"
    );
    let m = s.metrics().await?;
    let remembered = metric_sum(
        &m,
        "semantis_verifier_cache_requests_total",
        &[("verifier", "rr"), ("result", "hit")],
    );
    assert!(remembered >= 15.0, "{remembered} remembered scores");
    Ok(())
}
