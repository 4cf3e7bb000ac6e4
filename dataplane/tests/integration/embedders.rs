//! Remote embedding providers against local HTTP servers that speak the OpenAI, Ollama and
//! TEI protocols, healthy and faulty: slow answers, 500s, 429 with Retry-After, truncated
//! bodies, wrong dimensions, oversized batches.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use axum::Json;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use parking_lot::Mutex;
use reqwest::Method;
use semantis_contract::{EmbedderConfig, EmbeddingProvider};
use semantis_dataplane::embed::remote::RemoteEmbedder;
use semantis_dataplane::embed::{EmbedError, Embedder};
use semantis_dataplane::metrics::Metrics;
use serde_json::{Value, json};

use crate::harness::{
    KEY_A, KEY_B, Server, Setup, answer, fresh_database, private_redis, serve_fake, shared_postgres,
};

pub const DIM: usize = 16;
const API_KEY: &str = "sk-test-very-secret-0123456789";

/// What the fake does with the next requests.
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    None,
    /// Answer 500 this many more times.
    ServerErrors(u32),
    /// Answer 429 with `Retry-After: 1` once.
    RateLimitOnce,
    /// Sleep this long before answering.
    Slow(Duration),
    /// Claim a longer body than is sent.
    Truncated,
    /// Vectors of the wrong length.
    WrongDimension,
    /// TEI: 413 for batches larger than this.
    MaxBatch(usize),
    /// Refuse everything.
    Down,
    /// After `delay`, answer 400 (as OpenAI does for an over-long input) to any batch holding
    /// a text that contains `marker`.
    Refuse {
        marker: &'static str,
        delay: Duration,
    },
}

#[derive(Default)]
struct Seen {
    requests: Vec<(Instant, Value, Option<String>)>,
}

#[derive(Clone)]
pub struct Fake {
    pub fault: Arc<Mutex<Fault>>,
    seen: Arc<Mutex<Seen>>,
}

/// Bag of hashed lowercase words: texts with the same words get the same vector.
pub fn embed_text(text: &str, dim: usize) -> Vec<f32> {
    let mut v = vec![0f32; dim];
    for w in text
        .to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        let h = w.bytes().fold(1469598103934665603u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(1099511628211)
        });
        v[(h % dim as u64) as usize] += 1.0;
    }
    v
}

async fn handle(fake: Fake, protocol: &'static str, headers: HeaderMap, body: Value) -> Response {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    fake.seen
        .lock()
        .requests
        .push((Instant::now(), body.clone(), auth.clone()));
    if protocol == "openai" && auth.as_deref() != Some(&format!("Bearer {API_KEY}")) {
        return (StatusCode::UNAUTHORIZED, "bad key").into_response();
    }
    let texts: Vec<String> = match protocol {
        "tei" => serde_json::from_value(body["inputs"].clone()).unwrap_or_default(),
        _ => serde_json::from_value(body["input"].clone()).unwrap_or_default(),
    };
    let fault = fake.fault.lock().clone();
    // `fake-embed-d384` answers 384 dimensions: a second model, for index migrations.
    let mut dim = body["model"]
        .as_str()
        .and_then(|m| m.strip_prefix("fake-embed-d"))
        .and_then(|d| d.parse().ok())
        .unwrap_or(DIM);
    match fault {
        Fault::None => {}
        Fault::ServerErrors(n) => {
            *fake.fault.lock() = if n > 1 {
                Fault::ServerErrors(n - 1)
            } else {
                Fault::None
            };
            return (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response();
        }
        Fault::RateLimitOnce => {
            *fake.fault.lock() = Fault::None;
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", "1")],
                "slow down",
            )
                .into_response();
        }
        Fault::Slow(d) => tokio::time::sleep(d).await,
        Fault::Truncated => {
            return Response::builder()
                .header("content-type", "application/json")
                .body(axum::body::Body::from(
                    "{\"data\": [{\"embedding\": [0.1, 0.2",
                ))
                .unwrap_or_default();
        }
        Fault::WrongDimension => dim /= 2,
        Fault::MaxBatch(max) if texts.len() > max => {
            return (StatusCode::PAYLOAD_TOO_LARGE, "batch too large").into_response();
        }
        Fault::MaxBatch(_) => {}
        Fault::Down => return (StatusCode::SERVICE_UNAVAILABLE, "down").into_response(),
        Fault::Refuse { marker, delay } => {
            tokio::time::sleep(delay).await;
            if texts.iter().any(|t| t.contains(marker)) {
                let error = json!({"error": {
                    "message": "This model's maximum context length is 8192 tokens",
                    "type": "invalid_request_error", "code": "context_length_exceeded"}});
                return (StatusCode::BAD_REQUEST, Json(error)).into_response();
            }
        }
    }
    let vectors: Vec<Vec<f32>> = texts.iter().map(|t| embed_text(t, dim)).collect();
    match protocol {
        "openai" => {
            // Out of order on purpose: clients must use `index`.
            let data: Vec<Value> = vectors
                .iter()
                .enumerate()
                .rev()
                .map(|(i, v)| json!({"object": "embedding", "index": i, "embedding": v}))
                .collect();
            Json(json!({"object": "list", "data": data, "model": body["model"]})).into_response()
        }
        "ollama" => Json(json!({"model": body["model"], "embeddings": vectors})).into_response(),
        _ => Json(json!(vectors)).into_response(),
    }
}

pub async fn start_fake() -> anyhow::Result<(String, Fake)> {
    let fake = Fake {
        fault: Arc::new(Mutex::new(Fault::None)),
        seen: Arc::new(Mutex::new(Seen::default())),
    };
    let url = serve_fake(
        fake.clone(),
        &[
            ("/v1/embeddings", "openai"),
            ("/api/embed", "ollama"),
            ("/embed", "tei"),
        ],
        handle,
    )
    .await?;
    Ok((url, fake))
}

fn config(provider: EmbeddingProvider, url: &str, key_file: &std::path::Path) -> EmbedderConfig {
    EmbedderConfig {
        provider,
        model: "fake-embed".into(),
        dimension: DIM,
        endpoint: Some(url.to_owned()),
        api_key_file: Some(key_file.display().to_string()),
        timeout_ms: 500,
        max_attempts: 3,
        breaker_failures: 3,
        breaker_cooldown_ms: 60_000,
        ..EmbedderConfig::default()
    }
}

pub fn key_file(dir: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    let path = dir.join("api-key");
    std::fs::write(&path, format!("{API_KEY}\n"))?;
    Ok(path)
}

fn embedder(cfg: &EmbedderConfig) -> anyhow::Result<RemoteEmbedder> {
    Ok(RemoteEmbedder::new(cfg, Arc::new(Metrics::new()?))?)
}

#[tokio::test]
async fn each_protocol_embeds_in_input_order() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (url, fake) = start_fake().await?;
    let texts: Vec<String> = ["alpha beta", "gamma", "delta epsilon zeta"]
        .map(String::from)
        .to_vec();
    for provider in [
        EmbeddingProvider::Openai,
        EmbeddingProvider::Ollama,
        EmbeddingProvider::Tei,
    ] {
        let e = embedder(&config(provider, &url, &key_file(dir.path())?))?;
        let got = e.embed(&texts).await?;
        assert_eq!(got.len(), 3);
        for (t, v) in texts.iter().zip(&got) {
            let want = embed_text(t, DIM);
            let norm = want.iter().map(|x| x * x).sum::<f32>().sqrt();
            for (a, b) in v.iter().zip(&want) {
                assert!((a - b / norm).abs() < 1e-6, "{provider:?} {t}");
            }
        }
    }
    let seen = fake.seen.lock();
    assert_eq!(seen.requests[0].1["model"], "fake-embed");
    assert_eq!(
        seen.requests[0].2.as_deref(),
        Some(format!("Bearer {API_KEY}").as_str())
    );
    Ok(())
}

#[tokio::test]
async fn openai_batches_at_most_max_batch_and_sends_dimensions_when_asked() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (url, fake) = start_fake().await?;
    let mut cfg = config(EmbeddingProvider::Openai, &url, &key_file(dir.path())?);
    cfg.max_batch = 4;
    cfg.send_dimensions = true;
    let texts: Vec<String> = (0..10).map(|i| format!("text {i}")).collect();
    assert_eq!(embedder(&cfg)?.embed(&texts).await?.len(), 10);
    let seen = fake.seen.lock();
    let sizes: Vec<usize> = seen
        .requests
        .iter()
        .map(|r| r.1["input"].as_array().map_or(0, Vec::len))
        .collect();
    assert_eq!(sizes, vec![4, 4, 2]);
    assert_eq!(seen.requests[0].1["dimensions"], DIM);
    Ok(())
}

#[tokio::test]
async fn tei_splits_batches_the_server_refuses_as_too_large() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (url, fake) = start_fake().await?;
    *fake.fault.lock() = Fault::MaxBatch(2);
    let texts: Vec<String> = (0..7).map(|i| format!("item {i}")).collect();
    let got = embedder(&config(
        EmbeddingProvider::Tei,
        &url,
        &key_file(dir.path())?,
    ))?
    .embed(&texts)
    .await?;
    assert_eq!(got.len(), 7);
    let norm = |t: &str| {
        let v = embed_text(t, DIM);
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.into_iter().map(|x| x / n).collect::<Vec<_>>()
    };
    assert_eq!(got[6], norm("item 6"), "order survives the split");
    Ok(())
}

#[tokio::test]
async fn transient_failures_are_retried_and_retry_after_is_honoured() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (url, fake) = start_fake().await?;
    let cfg = config(EmbeddingProvider::Ollama, &url, &key_file(dir.path())?);
    *fake.fault.lock() = Fault::ServerErrors(2);
    embedder(&cfg)?.embed(&["x".into()]).await?;
    assert_eq!(fake.seen.lock().requests.len(), 3, "two 500s, then success");

    fake.seen.lock().requests.clear();
    *fake.fault.lock() = Fault::RateLimitOnce;
    embedder(&cfg)?.embed(&["x".into()]).await?;
    let seen = fake.seen.lock();
    assert_eq!(seen.requests.len(), 2);
    let gap = seen.requests[1].0 - seen.requests[0].0;
    assert!(
        gap >= Duration::from_millis(950),
        "retried after {gap:?}, not after Retry-After: 1"
    );
    Ok(())
}

#[tokio::test]
async fn slow_truncated_and_wrong_answers_are_clear_errors() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (url, fake) = start_fake().await?;
    let mut cfg = config(EmbeddingProvider::Openai, &url, &key_file(dir.path())?);
    cfg.max_attempts = 1;

    *fake.fault.lock() = Fault::Slow(Duration::from_secs(3));
    let started = Instant::now();
    let err = embedder(&cfg)?
        .embed(&["x".into()])
        .await
        .expect_err("slow");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the 500 ms deadline was not kept"
    );
    assert!(matches!(err, EmbedError::Unavailable { .. }), "{err}");

    *fake.fault.lock() = Fault::Truncated;
    let err = embedder(&cfg)?
        .embed(&["x".into()])
        .await
        .expect_err("truncated");
    assert!(matches!(err, EmbedError::Protocol { .. }), "{err}");

    *fake.fault.lock() = Fault::WrongDimension;
    let err = embedder(&cfg)?
        .embed(&["x".into()])
        .await
        .expect_err("dimension");
    assert!(
        matches!(
            err,
            EmbedError::Dimension {
                expected: 16,
                got: 8
            }
        ),
        "{err}"
    );
    assert!(!err.to_string().contains(API_KEY));
    Ok(())
}

#[tokio::test]
async fn the_circuit_breaker_stops_calling_a_dead_provider() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (url, fake) = start_fake().await?;
    let mut cfg = config(EmbeddingProvider::Tei, &url, &key_file(dir.path())?);
    cfg.max_attempts = 1;
    let e = embedder(&cfg)?;
    *fake.fault.lock() = Fault::Down;
    for _ in 0..3 {
        assert!(e.embed(&["x".into()]).await.is_err());
    }
    let calls = fake.seen.lock().requests.len();
    let err = e.embed(&["x".into()]).await.expect_err("open");
    assert!(matches!(err, EmbedError::CircuitOpen("tei")), "{err}");
    assert_eq!(
        fake.seen.lock().requests.len(),
        calls,
        "an open breaker must not call out"
    );
    assert!(!e.healthy());
    Ok(())
}

fn remote_setup(provider: &str, url: &str, key: &std::path::Path, extra: &str) -> Setup {
    Setup {
        embedder: Some(format!(
            "provider = \"{provider}\"\nmodel = \"fake-embed\"\ndimension = {DIM}\nendpoint = \"{url}\"\n\
             api_key_file = \"{}\"\ntimeout_ms = 300\nmax_attempts = 1\nbreaker_failures = 2\n\
             breaker_cooldown_ms = 60000\n{extra}",
            key.display()
        )),
        ..Setup::default()
    }
}

#[tokio::test]
async fn the_dataplane_serves_semantic_hits_through_each_provider() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (url, _fake) = start_fake().await?;
    let key = key_file(dir.path())?;
    for provider in ["openai", "ollama", "tei"] {
        let root = dir.path().join(provider);
        std::fs::create_dir_all(&root)?;
        let s = Server::start(&root, &remote_setup(provider, &url, &key, "")).await?;
        s.store(
            KEY_A,
            json!({"prompt": "How do I reset my password?", "response": answer(provider)}),
        )
        .await?;
        // Same words, other case and punctuation: not an exact match, the same vector.
        let v = s
            .lookup(KEY_A, json!({"prompt": "how do i RESET my password"}))
            .await?;
        assert_eq!(
            (v["path"].as_str(), v["response"].clone()),
            (Some("semantic"), answer(provider)),
            "{provider}: {v}"
        );
        assert!(
            !s.log().contains(API_KEY),
            "{provider}: the API key reached the log"
        );
        let m = s.metrics().await?;
        assert!(!m.contains(API_KEY));
    }
    Ok(())
}

#[tokio::test]
async fn with_the_provider_down_lookups_fall_back_to_the_exact_path() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (url, fake) = start_fake().await?;
    let key = key_file(dir.path())?;
    let s = Server::start(dir.path(), &remote_setup("openai", &url, &key, "")).await?;
    s.store(
        KEY_A,
        json!({"prompt": "cached question", "response": answer("cached")}),
    )
    .await?;
    *fake.fault.lock() = Fault::Down;
    for _ in 0..5 {
        let started = Instant::now();
        let v = s
            .lookup(KEY_A, json!({"prompt": "a question never embedded"}))
            .await?;
        assert_eq!(
            (v["hit"].as_bool(), v["degraded"].as_str()),
            (Some(false), Some("embedder_unavailable")),
            "{v}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the fallback waited too long"
        );
        let v = s
            .lookup(KEY_A, json!({"prompt": "cached question"}))
            .await?;
        assert_eq!(v["path"], "exact", "the exact path keeps answering: {v}");
    }
    let (status, v, _) = s.call(Method::GET, "/readyz", None, None).await?;
    assert_eq!(
        (status, v["degraded"].clone()),
        (200, json!(["embedder"])),
        "{v}"
    );
    let m = s.metrics().await?;
    assert!(crate::harness::metric_sum(&m, "semantis_cache_embedder_fallbacks_total", &[]) >= 5.0);
    assert_eq!(
        crate::harness::metric_sum(
            &m,
            "semantis_embedder_circuit_open",
            &[("provider", "openai")]
        ),
        1.0
    );
    // A store still succeeds; its embedding waits for the provider.
    let (status, v, _) = s
        .call(
            Method::POST,
            "/v1/entries",
            Some(KEY_A),
            Some(&json!({"prompt": "new", "response": {}})),
        )
        .await?;
    assert_eq!(
        (status, v["embedding_pending"].as_bool()),
        (201, Some(true)),
        "{v}"
    );
    assert!(!v.to_string().contains(API_KEY));
    Ok(())
}

#[tokio::test]
async fn stores_while_the_provider_is_down_are_embedded_when_it_returns() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (url, fake) = start_fake().await?;
    let key = key_file(dir.path())?;
    let mut embedded = remote_setup("openai", &url, &key, "");
    // The breaker must let a call through soon after the provider is back.
    embedded.embedder = embedded
        .embedder
        .map(|e| e.replace("breaker_cooldown_ms = 60000", "breaker_cooldown_ms = 300"));
    // Cluster mode keeps the pending stores in Postgres and the exact answers in Redis.
    let cluster = Setup {
        postgres_url: Some(fresh_database(&shared_postgres()?).await?),
        redis_url: Some(private_redis("deferred-stores")?),
        ..embedded.clone()
    };
    for (mode, setup) in [("embedded", embedded), ("cluster", cluster)] {
        let root = dir.path().join(mode);
        std::fs::create_dir_all(&root)?;
        deferred_stores_survive_a_crash(&root, &setup, &fake)
            .await
            .map_err(|e| e.context(format!("in {mode} mode")))?;
    }
    Ok(())
}

async fn deferred_stores_survive_a_crash(
    root: &std::path::Path,
    setup: &Setup,
    fake: &Fake,
) -> anyhow::Result<()> {
    *fake.fault.lock() = Fault::None;
    let s = Server::start(root, setup).await?;
    *fake.fault.lock() = Fault::Down;
    let store = |prompt: &'static str, tag: &'static str| {
        let s = &s;
        async move {
            let (status, v, _) = s
                .call(
                    Method::POST,
                    "/v1/entries",
                    Some(KEY_A),
                    Some(&json!({"prompt": prompt, "response": answer(tag)})),
                )
                .await?;
            anyhow::ensure!(
                status == 201 && v["embedding_pending"] == true,
                "{status} {v}"
            );
            Ok::<String, anyhow::Error>(v["id"].as_str().unwrap_or_default().to_owned())
        }
    };
    let rotate = store("how do I rotate my api key", "rotate").await?;
    let audit = store("where are the audit logs kept", "audit").await?;
    let dropped = store("a store deleted before it was embedded", "gone").await?;
    // The exact path answers at once.
    let v = s
        .lookup(KEY_A, json!({"prompt": "how do I rotate my api key"}))
        .await?;
    assert_eq!(v["entry_id"].as_str(), Some(rotate.as_str()), "{v}");
    let (status, _, _) = s
        .call(
            Method::DELETE,
            &format!("/v1/entries/{dropped}"),
            Some(KEY_A),
            None,
        )
        .await?;
    assert_eq!(status, 204);

    // A crash while they wait loses none of them (they are in the metadata store), and a
    // restart during the outage serves (degraded) instead of refusing to start.
    let mut s = s;
    s.kill_hard();
    let s = s.restart().await?;
    let v = s
        .lookup(KEY_A, json!({"prompt": "anything needing the embedder"}))
        .await?;
    assert_eq!(v["degraded"], "embedder_unavailable", "{v}");
    *fake.fault.lock() = Fault::None;
    // The same words in another order: only the semantic path can answer.
    for (prompt, id) in [
        ("key api my rotate I do how", &rotate),
        ("kept logs audit the are where", &audit),
    ] {
        s.eventually(
            "the deferred store answers semantically",
            Duration::from_secs(10),
            || async {
                let v = s.lookup(KEY_A, json!({"prompt": prompt})).await?;
                Ok(v["path"] == "semantic" && v["entry_id"].as_str() == Some(id.as_str()))
            },
        )
        .await?;
    }
    let v = s
        .lookup(
            KEY_A,
            json!({"prompt": "a store deleted before it was embedded"}),
        )
        .await?;
    assert_eq!(
        v["hit"], false,
        "a deleted pending store stays deleted: {v}"
    );
    let m = s.metrics().await?;
    assert_eq!(
        crate::harness::metric_sum(&m, "semantis_cache_pending_embedded_total", &[]),
        2.0
    );
    let (_, stats, _) = s.call(Method::GET, "/v1/stats", Some(KEY_A), None).await?;
    assert_eq!(stats["entries"], 2, "{stats}");
    Ok(())
}

#[tokio::test]
async fn a_provider_with_the_wrong_dimension_stops_startup_naming_both() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (url, fake) = start_fake().await?;
    *fake.fault.lock() = Fault::WrongDimension;
    let key = key_file(dir.path())?;
    let err = Server::start(dir.path(), &remote_setup("ollama", &url, &key, ""))
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("the server started"))?;
    let text = err.to_string();
    assert!(
        text.contains("returned 8 dimensions") && text.contains("says 16"),
        "{text}"
    );
    Ok(())
}

/// Two cluster-mode replicas sharing a private Redis (`name`) and a fresh database, embedding
/// with the fake Ollama-style provider; and a count of the provider calls whose body holds
/// `text`.
async fn two_replicas_on_the_fake(
    dir: &std::path::Path,
    name: &str,
) -> anyhow::Result<(Server, Server, Fake)> {
    let (url, fake) = start_fake().await?;
    let key = key_file(dir)?;
    let mut setup = remote_setup("ollama", &url, &key, "");
    setup.redis_url = Some(crate::harness::private_redis(name)?);
    setup.postgres_url =
        Some(crate::harness::fresh_database(&crate::harness::shared_postgres()?).await?);
    let r1 = Server::start_replica(dir, "r1", &setup).await?;
    let r2 = Server::start_replica(dir, "r2", &setup).await?;
    Ok((r1, r2, fake))
}

fn asked_about(fake: &Fake, text: &str) -> usize {
    fake.seen
        .lock()
        .requests
        .iter()
        .filter(|r| r.1.to_string().contains(text))
        .count()
}

#[tokio::test]
async fn replicas_share_embeddings_through_the_redis_tier() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (r1, r2, fake) = two_replicas_on_the_fake(dir.path(), "embedding-cache").await?;
    let asked = || asked_about(&fake, "shared embedding text");
    r1.lookup(KEY_A, json!({"prompt": "shared embedding text"}))
        .await?;
    assert_eq!(asked(), 1);
    r2.lookup(KEY_A, json!({"prompt": "shared embedding text"}))
        .await?;
    assert_eq!(asked(), 1, "the second replica embedded the text again");
    let m = r2.metrics().await?;
    assert_eq!(
        crate::harness::metric_sum(
            &m,
            "semantis_embedder_cache_requests_total",
            &[("result", "hit_shared")]
        ),
        1.0
    );
    Ok(())
}

/// The embedding cache is per tenant: a text another tenant embedded a moment ago costs a new
/// provider call (and its time), so a tenant cannot time a lookup to learn what another asked.
/// Within a tenant, and across replicas through Redis, the text is embedded once.
#[tokio::test]
async fn the_embedding_cache_never_serves_one_tenant_another_tenants_vector() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let (r1, r2, fake) = two_replicas_on_the_fake(dir.path(), "embedding-cache-tenants").await?;
    let asked = || asked_about(&fake, "merger of acme and globex");
    let prompt = json!({"prompt": "merger of acme and globex"});
    r1.lookup(KEY_A, prompt.clone()).await?;
    assert_eq!(asked(), 1);
    r1.lookup(KEY_B, prompt.clone()).await?;
    assert_eq!(asked(), 2, "team-b was served team-a's cached vector");
    r2.lookup(KEY_B, prompt.clone()).await?;
    r2.lookup(KEY_A, prompt.clone()).await?;
    r1.lookup(KEY_A, prompt).await?;
    assert_eq!(
        asked(),
        2,
        "a tenant's own text was embedded again (in process or through Redis)"
    );
    Ok(())
}

/// An OpenAI-style provider with deadlines for a loaded machine and a short breaker cooldown.
fn patient_setup(url: &str, key: &std::path::Path) -> Setup {
    Setup {
        embedder: Some(format!(
            "provider = \"openai\"\nmodel = \"fake-embed\"\ndimension = {DIM}\nendpoint = \"{url}\"\n\
             api_key_file = \"{}\"\ntimeout_ms = 2000\nmax_attempts = 1\nbreaker_failures = 2\n\
             breaker_cooldown_ms = 200",
            key.display()
        )),
        // Word-order paraphrases are the fake's same vector; the verifier would judge them.
        extra: "verifier = \"none\"".into(),
        ..Setup::default()
    }
}

/// Every ordering of `text`'s words after the first: new texts with the same bag of words,
/// so the fake gives them all the same vector.
fn paraphrases(text: &str, n: usize) -> Vec<String> {
    let mut w: Vec<&str> = text.split(' ').collect();
    let mut out = Vec::new();
    while out.len() < n {
        // The next lexicographic permutation (wrapping around to the first).
        match (0..w.len() - 1).rev().find(|&i| w[i] < w[i + 1]) {
            Some(i) => {
                let j = (i + 1..w.len())
                    .rev()
                    .find(|&j| w[j] > w[i])
                    .unwrap_or(i + 1);
                w.swap(i, j);
                w[i + 1..].reverse();
            }
            None => w.reverse(),
        }
        let p = w.join(" ");
        if p != text && !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

#[tokio::test]
async fn a_refused_text_fails_alone_and_never_opens_the_breaker() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (url, fake) = start_fake().await?;
    let key = key_file(dir.path())?;
    let s = Server::start(dir.path(), &patient_setup(&url, &key)).await?;
    let question = "how do i reset my password";
    s.store(
        KEY_A,
        json!({"prompt": question, "response": answer("reset")}),
    )
    .await?;
    // team-b's prompts are too long for the provider; slow answers make the texts of both
    // tenants ride in the same provider calls.
    *fake.fault.lock() = Fault::Refuse {
        marker: "poison",
        delay: Duration::from_millis(50),
    };
    let mut quiet = paraphrases(question, 40).into_iter();
    let mut violations = Vec::new();
    for round in 0..10 {
        let mut calls = Vec::new();
        for i in 0..4 {
            let prompt = quiet.next().context("paraphrases")?;
            calls.push((KEY_A, json!({"prompt": prompt})));
            calls.push((KEY_B, json!({"prompt": format!("poison {round} {i}")})));
        }
        let answers = futures::future::join_all(
            calls
                .iter()
                .map(|(key, body)| s.call(Method::POST, "/v1/lookup", Some(key), Some(body))),
        )
        .await;
        for ((key, _), answer) in calls.iter().zip(answers) {
            let (status, v, _) = answer?;
            let right = if *key == KEY_A {
                status == 200 && v["path"] == "semantic" && v["degraded"].is_null()
            } else {
                status == 200 && v["hit"] == false && v["degraded"] == "prompt_not_embeddable"
            };
            if !right {
                violations.push(format!("{key}: {status} {v}"));
            }
        }
    }
    assert!(
        violations.is_empty(),
        "{} of 80 lookups went wrong: {:?}",
        violations.len(),
        violations.first()
    );
    // A store of a refused prompt is refused at once, not deferred forever.
    let (status, v, _) = s
        .call(
            Method::POST,
            "/v1/entries",
            Some(KEY_B),
            Some(&json!({"prompt": "poison pill", "response": {}})),
        )
        .await?;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (422, Some("prompt_not_embeddable")),
        "{v}"
    );
    let (status, v, _) = s.call(Method::GET, "/readyz", None, None).await?;
    assert_eq!((status, v["degraded"].clone()), (200, json!([])), "{v}");
    let m = s.metrics().await?;
    assert_eq!(
        crate::harness::metric_sum(
            &m,
            "semantis_embedder_circuit_open",
            &[("provider", "openai")]
        ),
        0.0
    );
    Ok(())
}

#[tokio::test]
async fn a_deferred_store_the_provider_refuses_is_abandoned_and_the_rest_are_embedded()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (url, fake) = start_fake().await?;
    let key = key_file(dir.path())?;
    let s = Server::start(dir.path(), &patient_setup(&url, &key)).await?;
    *fake.fault.lock() = Fault::Down;
    let question = "how do i reset my password";
    for prompt in ["poison question one", question, "poison question two"] {
        let (status, v, _) = s
            .call(
                Method::POST,
                "/v1/entries",
                Some(KEY_A),
                Some(&json!({"prompt": prompt, "response": answer(prompt)})),
            )
            .await?;
        assert_eq!(
            (status, v["embedding_pending"].as_bool()),
            (201, Some(true)),
            "{v}"
        );
    }
    // The provider is back, but refuses two of the three prompts for good.
    *fake.fault.lock() = Fault::Refuse {
        marker: "poison",
        delay: Duration::ZERO,
    };
    let paraphrase = paraphrases(question, 1).remove(0);
    s.eventually(
        "the embeddable store answers semantic lookups",
        Duration::from_secs(20),
        || async {
            let v = s.lookup(KEY_A, json!({"prompt": paraphrase})).await?;
            Ok(v["path"] == "semantic")
        },
    )
    .await?;
    s.eventually(
        "both refused stores are abandoned",
        Duration::from_secs(20),
        || async {
            let m = s.metrics().await?;
            Ok(crate::harness::metric_sum(
                &m,
                "semantis_cache_pending_abandoned_total",
                &[("tenant", "team-a")],
            ) == 2.0)
        },
    )
    .await?;
    assert!(
        s.log().contains("abandoned a deferred store"),
        "{}",
        s.log()
    );
    Ok(())
}
