//! The gateway (`/v1/chat/completions`, `/v1/models`, `/v1/embeddings`): the real binary in
//! front of a fake OpenAI-compatible upstream (`semantis_dataplane::fake_openai`), driven by
//! the official OpenAI Python SDK, `curl` and concurrent clients.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use reqwest::Method;
use semantis_dataplane::fake_openai::FakeOpenAi;
use serde_json::{Value, json};

use crate::harness::{
    KEY_A, KEY_B, Server, Setup, fresh_database, metric_sum, private_redis, services,
    shared_postgres,
};

const UPSTREAM_KEY: &str = "sk-upstream-secret";

fn repo_path(rel: &str) -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
        .join(rel)
}

/// team-a uses the fake with the configured key; team-b passes its clients' own keys.
async fn start(root: &std::path::Path, fake: &FakeOpenAi) -> anyhow::Result<Server> {
    let key_file = root.join("upstream-key");
    std::fs::write(&key_file, format!("{UPSTREAM_KEY}\n"))?;
    let setup = Setup {
        local_model: true,
        min_similarity: None,
        extra: format!(
            r#"max_cacheable_temperature = 1.0
coalesce_wait_ms = 60000

[upstreams.fake]
base_url = "{url}"
api_key_file = "{key}"
timeout_ms = 1500
breaker_failures = 1000

[upstreams.fake.prices."gpt-4o-mini"]
input_per_million = 1.0
output_per_million = 2.0
"#,
            url = fake.url,
            key = key_file.display()
        ),
        tenant_a_extra: "upstream = \"fake\"\n[tenants.limits.user]\nrequests_per_minute = 3\n"
            .into(),
        tenant_b_extra: "upstream = \"fake\"\nupstream_key = \"client\"\n".into(),
        ..Setup::default()
    };
    Server::start(root, &setup).await
}

fn chat(prompt: &str, stream: bool) -> Value {
    json!({
        "model": "gpt-4o-mini",
        "stream": stream,
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": prompt}],
    })
}

/// POST a chat request as an SDK would; returns (status, cache header, body text).
async fn post_chat(
    server: &Server,
    headers: &[(&str, &str)],
    body: &Value,
) -> anyhow::Result<(u16, String, String)> {
    let mut req = server
        .http
        .post(format!("{}/v1/chat/completions", server.url))
        .json(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = req.send().await?;
    let status = res.status().as_u16();
    let cache = res
        .headers()
        .get("x-semantis-cache")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    Ok((status, cache, res.text().await?))
}

/// The assistant's text from a completion or an event stream.
fn content_of(body: &str) -> String {
    if let Ok(v) = serde_json::from_str::<Value>(body) {
        return v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or("")
            .to_owned();
    }
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

#[tokio::test]
async fn the_openai_sdk_gets_hits_from_the_gateway() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let fake = FakeOpenAi::start("127.0.0.1:0").await?;
    let server = start(root.path(), &fake).await?;
    let python = Command::new("bash")
        .arg(repo_path("../scripts/sdk-venv.sh"))
        .output()
        .context("failed to run scripts/sdk-venv.sh")?;
    anyhow::ensure!(
        python.status.success(),
        "sdk-venv.sh failed: {}",
        String::from_utf8_lossy(&python.stderr)
    );
    let python = String::from_utf8(python.stdout)?.trim().to_owned();
    let out = tokio::process::Command::new(&python)
        .arg(repo_path("tests/sdk/gateway_openai.py"))
        .arg(format!("{}/v1", server.url))
        .arg(KEY_A)
        .output()
        .await
        .context("failed to run the SDK script")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the OpenAI SDK checks failed:\n{stdout}\n{stderr}\n--- server log ---\n{}",
        server.log()
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
    // Every call reached the upstream with the upstream's key, never the client's.
    let seen = fake.seen();
    assert!(!seen.is_empty());
    for (auth, _, _) in &seen {
        assert_eq!(auth.as_deref(), Some(&*format!("Bearer {UPSTREAM_KEY}")));
    }
    // Spend and savings are reported side by side, in total and for today.
    let today = semantis_cache::vector::day_of(semantis_cache::vector::now_ms());
    let stats = std::sync::Arc::new(parking_lot::Mutex::new(Value::Null));
    server
        .eventually(
            "spend and savings in /v1/stats",
            Duration::from_secs(10),
            || {
                let stats = stats.clone();
                let server = &server;
                async move {
                    let (_, v, _) = server
                        .call(Method::GET, "/v1/stats", Some(KEY_A), None)
                        .await?;
                    let ready = v["usd_spent"].as_f64().unwrap_or(0.0) > 0.0
                        && v["usd_saved"].as_f64().unwrap_or(0.0) > 0.0;
                    *stats.lock() = v;
                    Ok(ready)
                }
            },
        )
        .await?;
    let v = stats.lock().clone();
    assert!(v["upstream_calls"].as_u64().unwrap_or(0) >= 10, "{v}");
    assert!(v["tokens_used"].as_u64().unwrap_or(0) > 0, "{v}");
    let day = v["by_day"]
        .as_array()
        .and_then(|d| d.last())
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(day["day"].as_str(), Some(today.as_str()), "{v}");
    assert!(
        day["usd_spent"].as_f64().unwrap_or(0.0) > 0.0
            && day["usd_saved"].as_f64().unwrap_or(0.0) > 0.0,
        "{v}"
    );
    let m = server.metrics().await?;
    assert!(
        metric_sum(
            &m,
            "semantis_gateway_usd_spent_micros_total",
            &[("tenant", "team-a")]
        ) > 0.0,
        "spend is counted:\n{m}"
    );
    assert!(
        metric_sum(&m, "semantis_gateway_requests_total", &[("outcome", "hit")])
            + metric_sum(
                &m,
                "semantis_gateway_requests_total",
                &[("outcome", "coalesced")]
            )
            >= 8.0,
        "hits are counted"
    );
    Ok(())
}

#[tokio::test]
async fn twenty_identical_misses_make_one_upstream_call() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let fake = FakeOpenAi::start("127.0.0.1:0").await?;
    let server = std::sync::Arc::new(start(root.path(), &fake).await?);
    let auth = format!("Bearer {KEY_A}");
    // The upstream holds its answer until released, so all 20 arrive while the first is out.
    let prompt = "[hold] Summarise the plot of Hamlet in one line";
    let mut tasks = Vec::new();
    for i in 0..20 {
        let (server, auth) = (server.clone(), auth.clone());
        tasks.push(tokio::spawn(async move {
            post_chat(
                &server,
                &[("authorization", &auth)],
                &chat(prompt, i % 2 == 0),
            )
            .await
        }));
    }
    server
        .eventually(
            "19 requests waiting on the first",
            Duration::from_secs(30),
            || async {
                let m = server.metrics().await?;
                Ok(fake.held() == 1
                    && metric_sum(
                        &m,
                        "semantis_gateway_coalesce_waiting",
                        &[("tenant", "team-a")],
                    ) == 19.0)
            },
        )
        .await?;
    fake.release();
    let mut contents = Vec::new();
    let mut outcomes = Vec::new();
    for t in tasks {
        let (status, cache, body) = t.await??;
        assert_eq!(status, 200, "{body}");
        outcomes.push(cache);
        contents.push(content_of(&body));
    }
    assert_eq!(fake.calls(), 1, "one upstream call for 20 identical misses");
    assert!(
        contents.iter().all(|c| c == &contents[0] && !c.is_empty()),
        "{contents:?}"
    );
    assert_eq!(
        outcomes.iter().filter(|c| *c == "MISS").count(),
        1,
        "{outcomes:?}"
    );
    assert_eq!(
        outcomes.iter().filter(|c| *c == "HIT").count(),
        19,
        "{outcomes:?}"
    );
    let m = server.metrics().await?;
    assert_eq!(
        metric_sum(
            &m,
            "semantis_gateway_coalesced_total",
            &[("tenant", "team-a")]
        ),
        19.0
    );

    // A leader that fails releases its followers, which make their own calls.
    let before = fake.calls();
    let failing = "[hold][500] this upstream call fails";
    let mut tasks = Vec::new();
    for _ in 0..5 {
        let (server, auth) = (server.clone(), auth.clone());
        tasks.push(tokio::spawn(async move {
            post_chat(&server, &[("authorization", &auth)], &chat(failing, false)).await
        }));
    }
    for t in tasks {
        let (status, _, body) = t.await??;
        assert_eq!(status, 502, "{body}");
        let v: Value = serde_json::from_str(&body)?;
        assert_eq!(v["error"]["code"], "upstream_error");
        assert_eq!(v["error"]["type"], "api_error");
    }
    assert_eq!(
        fake.calls() - before,
        5,
        "each follower tried on its own after the leader failed"
    );
    Ok(())
}

#[tokio::test]
async fn gateway_keys_tenants_and_bad_input() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let fake = FakeOpenAi::start("127.0.0.1:0").await?;
    let server = start(root.path(), &fake).await?;
    let a = format!("Bearer {KEY_A}");

    // team-b forwards its clients' own keys and is named by X-Semantis-Key.
    let body = chat("Which planet is largest?", false);
    let (status, cache, text) = post_chat(
        &server,
        &[
            ("authorization", "Bearer sk-client-own"),
            ("x-semantis-key", KEY_B),
        ],
        &body,
    )
    .await?;
    assert_eq!((status, cache.as_str()), (200, "MISS"), "{text}");
    let (auth, _, _) = fake
        .seen()
        .last()
        .cloned()
        .context("the fake saw the call")?;
    assert_eq!(auth.as_deref(), Some("Bearer sk-client-own"));
    let (status, _, text) = post_chat(
        &server,
        &[("authorization", &format!("Bearer {KEY_B}"))],
        &body,
    )
    .await?;
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("X-Semantis-Key"), "{text}");

    // Tenants never see each other's answers: team-a misses what team-b stored.
    let (_, cache, _) = post_chat(&server, &[("authorization", &a)], &body).await?;
    assert_eq!(cache, "MISS");
    let (_, cache, _) = post_chat(&server, &[("authorization", &a)], &body).await?;
    assert_eq!(cache, "HIT");

    // A streamed hit through curl, as a shell user would see it.
    let out = Command::new("curl")
        .args(["-sN", "-D", "-", "-H", &format!("authorization: {a}")])
        .args(["-H", "content-type: application/json"])
        .args(["-d", &chat("Which planet is largest?", true).to_string()])
        .arg(format!("{}/v1/chat/completions", server.url))
        .output()?;
    let text = String::from_utf8(out.stdout)?;
    assert!(text.contains("x-semantis-cache: HIT"), "{text}");
    assert!(text.contains("content-type: text/event-stream"), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert_eq!(
        content_of(text.split("\r\n\r\n").nth(1).unwrap_or("")),
        content_of(&post_chat(&server, &[("authorization", &a)], &body).await?.2)
    );

    // Bad input: clear 4xx errors in OpenAI's shape, nothing forwarded.
    let calls = fake.calls();
    for (body, code) in [
        (
            json!({"messages": [{"role": "user", "content": "x"}]}),
            "invalid_request",
        ),
        (json!({"model": "m", "messages": []}), "invalid_request"),
        (
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}),
            "invalid_request",
        ),
    ] {
        let (status, _, text) = post_chat(&server, &[("authorization", &a)], &body).await?;
        let v: Value = serde_json::from_str(&text)?;
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (400, Some(code)),
            "{text}"
        );
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }
    let (status, _, text) = post_chat(
        &server,
        &[("authorization", &a), ("x-semantis-min-similarity", "7")],
        &chat("x", false),
    )
    .await?;
    assert_eq!(status, 422, "{text}");
    let (status, _, text) = post_chat(
        &server,
        &[("authorization", &a), ("x-semantis-no-store", "maybe")],
        &chat("x", false),
    )
    .await?;
    assert_eq!(status, 400, "{text}");
    let res = server
        .http
        .post(format!("{}/v1/chat/completions", server.url))
        .header("authorization", &a)
        .header("content-type", "application/json")
        .body("{\"model\": \"m\", \"messages\": [")
        .send()
        .await?;
    assert_eq!(res.status().as_u16(), 400);
    let (status, v, _) = server
        .call(
            Method::POST,
            "/v1/chat/completions",
            Some("nobody"),
            Some(&chat("x", false)),
        )
        .await?;
    assert_eq!(
        (status, v["error"]["type"].as_str()),
        (401, Some("authentication_error"))
    );
    assert_eq!(
        fake.calls(),
        calls,
        "nothing malformed reached the upstream"
    );
    Ok(())
}

#[tokio::test]
async fn a_tenant_without_an_upstream_is_told_so() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let server = Server::start(root.path(), &Setup::default()).await?;
    let (status, v, _) = server
        .call(
            Method::POST,
            "/v1/chat/completions",
            Some(KEY_A),
            Some(&chat("x", false)),
        )
        .await?;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("upstream_not_configured"))
    );
    let (status, v, _) = server
        .call(Method::GET, "/v1/models", Some(KEY_A), None)
        .await?;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("upstream_not_configured"))
    );
    Ok(())
}

#[tokio::test]
async fn limits_are_shared_by_replicas_and_fail_open_without_redis() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let fake = FakeOpenAi::start("127.0.0.1:0").await?;
    let setup = Setup {
        local_model: true,
        min_similarity: None,
        redis_url: Some(private_redis("gateway-limits")?),
        postgres_url: Some(fresh_database(&shared_postgres()?).await?),
        extra: format!("[upstreams.fake]\nbase_url = \"{}\"\n", fake.url),
        tenant_a_extra: "upstream = \"fake\"\n[tenants.limits.user]\nrequests_per_minute = 5\n"
            .into(),
        ..Setup::default()
    };
    let r1 = Server::start_replica(dir.path(), "r1", &setup).await?;
    let r2 = Server::start_replica(dir.path(), "r2", &setup).await?;
    let auth = format!("Bearer {KEY_A}");
    let minute = || semantis_cache::vector::now_ms() / 60_000;
    // Five requests a minute for this user, whichever replica takes them: the sixth is
    // refused. A burst that crossed a minute is run again under a fresh user.
    let mut refused = None;
    for attempt in 0..3 {
        let started = minute();
        let user = format!("carol-{attempt}");
        // `i` requests went through before this one.
        for i in 0..8 {
            let replica = if i % 2 == 0 { &r1 } else { &r2 };
            let mut body = chat(&format!("Question {i} of attempt {attempt}"), false);
            body["user"] = json!(user);
            let res = replica
                .http
                .post(format!("{}/v1/chat/completions", replica.url))
                .header("authorization", &auth)
                .json(&body)
                .send()
                .await?;
            if res.status().as_u16() == 429 {
                let retry: u64 = res
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .context("a 429 has Retry-After")?;
                let v: Value = res.json().await?;
                refused = Some((i, retry, v));
                break;
            }
            assert_eq!(res.status().as_u16(), 200);
        }
        if minute() == started {
            break;
        }
        refused = None;
    }
    let (allowed, retry, v) = refused.context("the sixth request in a minute was refused")?;
    assert_eq!(allowed, 5, "the replicas share the user's window");
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(v["error"]["code"], "rate_limited");
    assert_eq!(v["error"]["type"], "rate_limit_error");

    // Redis down: limits fail open and say so.
    services(&["stop-redis", "gateway-limits"])?;
    let mut body = chat("A question while Redis is down", false);
    body["user"] = json!("dave");
    let (status, cache, text) = post_chat(&r1, &[("authorization", &auth)], &body).await?;
    assert_eq!((status, cache.as_str()), (200, "MISS"), "{text}");
    let m = r1.metrics().await?;
    assert!(
        metric_sum(
            &m,
            "semantis_gateway_ratelimit_fail_open_total",
            &[("tenant", "team-a")]
        ) >= 1.0,
        "the fail-open is counted"
    );
    services(&["redis", "gateway-limits"])?;
    Ok(())
}

#[tokio::test]
async fn a_failing_upstream_opens_its_breaker_and_hits_are_still_served() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let fake = FakeOpenAi::start("127.0.0.1:0").await?;
    let setup = Setup {
        local_model: true,
        min_similarity: None,
        extra: format!(
            "[upstreams.fake]\nbase_url = \"{}\"\nbreaker_failures = 2\nbreaker_cooldown_ms = 600000\n",
            fake.url
        ),
        tenant_a_extra: "upstream = \"fake\"\n".into(),
        ..Setup::default()
    };
    let server = Server::start(root.path(), &setup).await?;
    let auth = format!("Bearer {KEY_A}");
    let h = [("authorization", auth.as_str())];
    let cached = chat("What is the tallest mountain?", false);
    let (status, cache, _) = post_chat(&server, &h, &cached).await?;
    assert_eq!((status, cache.as_str()), (200, "MISS"));
    for _ in 0..2 {
        let (status, _, text) = post_chat(&server, &h, &chat("[500] fail", false)).await?;
        assert_eq!(status, 502, "{text}");
    }
    let calls = fake.calls();
    let (status, _, text) = post_chat(&server, &h, &chat("A new question", false)).await?;
    let v: Value = serde_json::from_str(&text)?;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (503, Some("upstream_unavailable")),
        "{text}"
    );
    assert_eq!(fake.calls(), calls, "an open breaker calls nothing");
    // The cache still answers what it holds.
    server
        .eventually(
            "the first answer is served from the cache",
            Duration::from_secs(10),
            || async { Ok(post_chat(&server, &h, &cached).await?.1 == "HIT") },
        )
        .await?;
    let m = server.metrics().await?;
    assert!(
        metric_sum(
            &m,
            "semantis_gateway_upstream_errors_total",
            &[("kind", "circuit_open")]
        ) >= 1.0
    );
    Ok(())
}

#[tokio::test]
async fn an_azure_style_upstream_gets_its_api_key_header_and_version() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let fake = FakeOpenAi::start("127.0.0.1:0").await?;
    let key_file = root.path().join("azure-key");
    std::fs::write(&key_file, "azure-secret\n")?;
    let setup = Setup {
        local_model: true,
        min_similarity: None,
        extra: format!(
            "[upstreams.azure]\nbase_url = \"{}\"\nauth = \"api-key\"\napi_key_file = \"{}\"\nquery = {{ \"api-version\" = \"2024-10-21\" }}\n",
            fake.url,
            key_file.display()
        ),
        tenant_a_extra: "upstream = \"azure\"\n".into(),
        ..Setup::default()
    };
    let server = Server::start(root.path(), &setup).await?;
    // An Azure client sends its key in `api-key`: here the Semantis key names the tenant.
    let (status, cache, text) =
        post_chat(&server, &[("api-key", KEY_A)], &chat("Hello Azure", false)).await?;
    assert_eq!((status, cache.as_str()), (200, "MISS"), "{text}");
    let (auth, api_key, _) = fake
        .seen()
        .last()
        .cloned()
        .context("the fake saw the call")?;
    assert_eq!((auth, api_key.as_deref()), (None, Some("azure-secret")));
    assert_eq!(
        fake.queries().last().cloned().flatten().as_deref(),
        Some("api-version=2024-10-21")
    );
    Ok(())
}
