//! `bench --scenario gateway`: what the OpenAI-compatible gateway adds, measured side by side
//! in one run. Each connection cycles through four requests, so all four see the same load:
//!
//! - `lookup hit`: `POST /v1/lookup` of a cached prompt (the baseline for a hit);
//! - `proxied hit`: `POST /v1/chat/completions` of the same prompt, answered from the cache;
//! - `lookup miss`: `POST /v1/lookup` of a new prompt (what an application that calls the
//!   cache itself pays before its LLM call: embedding the prompt, the search);
//! - `upstream direct`: a new prompt straight to the upstream;
//! - `proxied miss`: a new prompt through the gateway to the same upstream (lookup, forward,
//!   store after answering).
//!
//! A proxied miss is compared with `lookup miss` + `upstream direct`: the gateway's own cost.
//!
//! The upstream is `semantis-dataplane fake-openai` (or any OpenAI-compatible server) at
//! `--upstream-url`; the server's tenant must name it as its upstream.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde_json::{Value, json};

use super::{BenchArgs, Latency, seeded_prompt};

const KINDS: [&str; 5] = [
    "lookup hit",
    "proxied hit",
    "lookup miss",
    "upstream direct",
    "proxied miss",
];
const MODEL: &str = "bench-gateway";

fn chat(prompt: &str) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": prompt}]})
}

async fn post(
    http: &reqwest::Client,
    url: &str,
    auth: &str,
    body: &Value,
) -> anyhow::Result<reqwest::header::HeaderMap> {
    let res = http
        .post(url)
        .header("authorization", auth)
        .json(body)
        .send()
        .await
        .with_context(|| format!("failed to call {url}"))?;
    let status = res.status();
    let headers = res.headers().clone();
    let text = res.text().await.context("failed to read the answer")?;
    if !status.is_success() {
        bail!("{url} answered {status}: {text}");
    }
    Ok(headers)
}

pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let upstream = args
        .upstream_url
        .clone()
        .context("the gateway scenario needs --upstream-url (the upstream the tenant names)")?;
    let upstream = upstream.trim_end_matches('/').to_owned();
    let base = args.url.trim_end_matches('/').to_owned();
    let auth = format!("Bearer {}", args.api_key);
    let http = reqwest::Client::builder()
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .build()
        .context("failed to build the HTTP client")?;
    // Prompts 0..seed are cached through the gateway first (misses that store).
    let seed = args.seed.max(1);
    let started = Instant::now();
    for i in 0..seed {
        post(
            &http,
            &format!("{base}/v1/chat/completions"),
            &auth,
            &chat(&seeded_prompt(i)),
        )
        .await?;
    }
    // Stored after each answer: wait until the last one is a hit.
    let last = chat(&seeded_prompt(seed - 1));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let h = post(&http, &format!("{base}/v1/chat/completions"), &auth, &last).await?;
        if h.get("x-semantis-cache-path").and_then(|v| v.to_str().ok()) == Some("exact") {
            break;
        }
        if Instant::now() > deadline {
            bail!("the seeded answers were not stored within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "cached {seed} answers through the gateway in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let hists: Arc<Vec<Mutex<Histogram<u64>>>> = Arc::new(
        (0..KINDS.len())
            .map(|_| Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map(Mutex::new))
            .collect::<Result<_, _>>()
            .context("failed to create a histogram")?,
    );
    let errors = Arc::new(AtomicU64::new(0));
    let fresh = Arc::new(AtomicU64::new(0));
    let begin = Instant::now();
    let measure_from = begin + args.warmup;
    let end = measure_from + args.duration;
    let run_id = uuid::Uuid::now_v7().simple().to_string();
    let mut tasks = Vec::new();
    for worker in 0..args.connections.max(1) {
        let (http, hists, errors, fresh) =
            (http.clone(), hists.clone(), errors.clone(), fresh.clone());
        let (base, upstream, auth, run_id) =
            (base.clone(), upstream.clone(), auth.clone(), run_id.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = worker as u64;
            while Instant::now() < end {
                let kind = (n % KINDS.len() as u64) as usize;
                let cached = seeded_prompt(n / KINDS.len() as u64 % seed);
                let new = format!(
                    "a question nobody asked before, {run_id} {}",
                    fresh.fetch_add(1, Ordering::Relaxed)
                );
                let t = Instant::now();
                let result = match kind {
                    0 => {
                        let body = json!({"prompt": cached, "scope": {"model": MODEL}});
                        post(&http, &format!("{base}/v1/lookup"), &auth, &body).await
                    }
                    1 => {
                        post(
                            &http,
                            &format!("{base}/v1/chat/completions"),
                            &auth,
                            &chat(&cached),
                        )
                        .await
                    }
                    2 => {
                        let body = json!({"prompt": new, "scope": {"model": MODEL}});
                        post(&http, &format!("{base}/v1/lookup"), &auth, &body).await
                    }
                    3 => {
                        post(
                            &http,
                            &format!("{upstream}/chat/completions"),
                            "Bearer x",
                            &chat(&new),
                        )
                        .await
                    }
                    _ => {
                        post(
                            &http,
                            &format!("{base}/v1/chat/completions"),
                            &auth,
                            &chat(&new),
                        )
                        .await
                    }
                };
                let micros = u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
                n += 1;
                if t < measure_from {
                    continue;
                }
                match result {
                    Ok(h) => {
                        let want = match kind {
                            0 | 3 => None,
                            1 => Some("HIT"),
                            _ => Some("MISS"),
                        };
                        let got = h.get("x-semantis-cache").and_then(|v| v.to_str().ok());
                        if want.is_some() && got != want {
                            errors.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        hists[kind].lock().saturating_record(micros.max(1));
                    }
                    Err(e) => {
                        if errors.fetch_add(1, Ordering::Relaxed) == 0 {
                            eprintln!("first error: {e:#}");
                        }
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.context("failed to join a load task")?;
    }
    let lat: Vec<Latency> = hists.iter().map(|h| Latency::of(&h.lock())).collect();
    let counts: Vec<u64> = hists.iter().map(|h| h.lock().len()).collect();
    let report = json!({
        "scenario": "Gateway",
        "connections": args.connections,
        "errors": errors.load(Ordering::Relaxed),
        "kinds": KINDS.iter().zip(&lat).zip(&counts).map(|((k, l), c)| json!({
            "kind": k, "requests": c, "p50_ms": l.p50, "p99_ms": l.p99, "p999_ms": l.p999,
        })).collect::<Vec<_>>(),
        "hit_added_p50_ms": lat[1].p50 - lat[0].p50,
        "hit_added_p99_ms": lat[1].p99 - lat[0].p99,
        "miss_over_upstream_p50_ms": lat[4].p50 - lat[3].p50,
        "miss_over_upstream_p99_ms": lat[4].p99 - lat[3].p99,
        "miss_over_lookup_and_upstream_p50_ms": lat[4].p50 - lat[2].p50 - lat[3].p50,
    });
    if args.json {
        println!("{report}");
    } else {
        for ((k, l), c) in KINDS.iter().zip(&lat).zip(&counts) {
            println!("Gateway {k:<16} {c:>7} req  {}", l.line());
        }
        println!(
            "Gateway hit over a direct lookup: p50 {:+.3} ms p99 {:+.3} ms; miss over the upstream alone: p50 {:+.3} ms p99 {:+.3} ms; over lookup miss + upstream: p50 {:+.3} ms; {} errors",
            lat[1].p50 - lat[0].p50,
            lat[1].p99 - lat[0].p99,
            lat[4].p50 - lat[3].p50,
            lat[4].p99 - lat[3].p99,
            lat[4].p50 - lat[2].p50 - lat[3].p50,
            errors.load(Ordering::Relaxed)
        );
    }
    if counts.contains(&0) {
        bail!("a request kind never succeeded");
    }
    Ok(())
}
