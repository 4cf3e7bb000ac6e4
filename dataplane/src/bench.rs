//! `bench`: a load generator against a running dataplane.
//!
//! Closed loop (default): each connection sends its next request when the last one answers.
//! Open loop (`--rate`): requests are scheduled at a fixed rate and each latency is measured
//! from its scheduled start, so a stall is charged to every request it delayed (no
//! coordinated omission, as in wrk2).

mod ann;
mod gateway;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use semantis_cache::vector::normalized;
use serde_json::{Value, json};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GraphScalarArg {
    F32,
    F16,
    I8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Lookups of stored prompts, answered by the exact path.
    ExactHit,
    /// Lookups by a vector close to a stored one (no prompt): the semantic path.
    SemanticVector,
    /// Lookups by a paraphrased prompt: the embedder, then the semantic path.
    SemanticText,
    /// Lookups by random vectors that match nothing.
    Miss,
    /// Stores of new entries with supplied vectors.
    Store,
    /// No server: the local model in process, one text per call, then batches of 32.
    EmbedLocal,
    /// No server: the resident index in process, loaded with `--seed` vectors; the hit
    /// decision through the HNSW graph against exhaustive search, and search latency.
    AnnRecall,
    /// The OpenAI-compatible gateway against `--upstream-url`, side by side with a direct
    /// lookup (hits) and a direct upstream call (misses).
    Gateway,
}

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Base URL of the dataplane.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// The tenant's API key (every scenario but `embed-local`).
    #[arg(long, env = "SEMANTIS_BENCH_API_KEY", default_value = "")]
    api_key: String,
    #[arg(long, value_enum, default_value = "exact-hit")]
    scenario: Scenario,
    /// Concurrent connections.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Measured run length, e.g. `10s`.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Unmeasured warm-up before the run.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Open loop: requests per second in total. Closed loop when absent.
    #[arg(long)]
    rate: Option<f64>,
    /// Store this many entries before measuring (scope namespace `bench`).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Vector dimension of the index.
    #[arg(long, default_value_t = 384)]
    dimension: usize,
    /// Concurrent connections while seeding.
    #[arg(long, default_value_t = 8)]
    seed_connections: usize,
    /// Bytes of each seeded entry's answer text (0: a few bytes; a realistic chat answer is
    /// 1–2 kB).
    #[arg(long, default_value_t = 0)]
    response_bytes: usize,
    /// The `--seed` entries were stored by an earlier run: look them up without storing.
    #[arg(long)]
    seeded: bool,
    /// Print the result as one JSON object.
    #[arg(long)]
    json: bool,
    /// `ann-recall`: questions asked.
    #[arg(long, default_value_t = 1000)]
    queries: usize,
    /// `ann-recall`: the similarity threshold of the hit decision.
    #[arg(long, default_value_t = 0.9)]
    min_similarity: f32,
    /// `ann-recall`: the scope size from which the graph is used.
    #[arg(long, default_value_t = 1024)]
    ann_min_scope_entries: usize,
    /// `ann-recall`: how the graph stores its vectors (default i8, as served).
    #[arg(long, value_enum)]
    graph_scalar: Option<GraphScalarArg>,
    /// `ann-recall`: graph links per node (default as served).
    #[arg(long)]
    graph_connectivity: Option<usize>,
    /// `ann-recall`: beam width while adding (default as served).
    #[arg(long)]
    graph_expansion_add: Option<usize>,
    /// `ann-recall`: beam width while searching (default as served).
    #[arg(long)]
    graph_expansion_search: Option<usize>,
    /// `ann-recall`: take the graph's first answer as final, as lookups did before a miss
    /// was confirmed with a wider search.
    #[arg(long)]
    no_miss_confirmation: bool,
    /// `gateway`: the upstream's base URL (the one the tenant names), called directly for
    /// the miss baseline.
    #[arg(long)]
    upstream_url: Option<String>,
    /// `embed-local`: the model directory (default: where scripts/fetch-model.sh puts it).
    #[arg(long)]
    model_dir: Option<std::path::PathBuf>,
}

/// `embed-local`: one embedding at a time for the run's duration, then batches of 32.
async fn embed_local(args: &BenchArgs) -> anyhow::Result<()> {
    use semantis_dataplane::embed::Embedder;
    use semantis_dataplane::embed::local::LocalEmbedder;
    // The serving deadline (2 s) would turn a slow moment into a failed benchmark: this
    // measures how long the model takes, however long that is.
    let cfg = semantis_contract::EmbedderConfig {
        timeout_ms: 600_000,
        ..semantis_contract::EmbedderConfig::default()
    };
    let dir = match &args.model_dir {
        Some(d) => d.clone(),
        None => {
            semantis_dataplane::config::model_dir(&semantis_contract::DataplaneConfig::default())
                .context("failed to locate the model: pass --model-dir")?
        }
    };
    let model = LocalEmbedder::load(&dir, &cfg).context("failed to load the local model")?;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let texts: Vec<String> = (0..1000u64).map(seeded_prompt).collect();
    let warm_until = Instant::now() + args.warmup;
    let mut i = 0usize;
    while Instant::now() < warm_until {
        model
            .embed(&texts[i % texts.len()..=i % texts.len()])
            .await?;
        i += 1;
    }
    let end = Instant::now() + args.duration;
    while Instant::now() < end {
        let t = Instant::now();
        model
            .embed(&texts[i % texts.len()..=i % texts.len()])
            .await?;
        hist.saturating_record(
            u64::try_from(t.elapsed().as_micros())
                .unwrap_or(u64::MAX)
                .max(1),
        );
        i += 1;
    }
    let started = Instant::now();
    let mut batched = 0usize;
    while started.elapsed() < args.duration {
        let from = (batched / 32 * 32) % (texts.len() - 32);
        model.embed(&texts[from..from + 32]).await?;
        batched += 32;
    }
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    let report = json!({
        "scenario": "EmbedLocal", "single_requests": hist.len(),
        "p50_ms": ms(0.5), "p95_ms": ms(0.95), "p99_ms": ms(0.99),
        "single_per_s": hist.len() as f64 / args.duration.as_secs_f64(),
        "batch32_texts_per_s": batched as f64 / started.elapsed().as_secs_f64(),
    });
    if args.json {
        println!("{report}");
    } else {
        println!(
            "EmbedLocal       one text: p50 {:.2} ms  p95 {:.2} ms  p99 {:.2} ms  ({:.0}/s)   batches of 32: {:.0} texts/s",
            ms(0.5),
            ms(0.95),
            ms(0.99),
            report["single_per_s"].as_f64().unwrap_or(0.0),
            report["batch32_texts_per_s"].as_f64().unwrap_or(0.0)
        );
    }
    Ok(())
}

/// A latency histogram (microseconds) summarised in milliseconds, as every timed scenario
/// reports it.
struct Latency {
    p50: f64,
    p95: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Self {
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        Self {
            p50: ms(0.5),
            p95: ms(0.95),
            p99: ms(0.99),
            p999: ms(0.999),
            max: h.max() as f64 / 1000.0,
        }
    }

    /// Adds `p50_ms`, `p95_ms`, `p99_ms`, `p999_ms` and `max_ms` to a JSON report.
    fn add_to(&self, report: &mut Value) {
        if let Some(fields) = report.as_object_mut() {
            for (name, value) in [
                ("p50_ms", self.p50),
                ("p95_ms", self.p95),
                ("p99_ms", self.p99),
                ("p999_ms", self.p999),
                ("max_ms", self.max),
            ] {
                fields.insert(name.to_owned(), json!(value));
            }
        }
    }

    fn line(&self) -> String {
        format!(
            "p50 {:>7.3} ms  p95 {:>7.3} ms  p99 {:>7.3} ms  p99.9 {:>7.3} ms",
            self.p50, self.p95, self.p99, self.p999
        )
    }
}

/// The i-th seeded entry's vector, reproducible from `i` alone.
fn seeded_vector(i: u64, dim: usize) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(i);
    normalized((0..dim).map(|_| rng.random_range(-1.0f32..1.0)).collect())
}

const WORDS: [&str; 16] = [
    "rust",
    "kubernetes",
    "cache",
    "latency",
    "vector",
    "index",
    "tenant",
    "backup",
    "cluster",
    "embedding",
    "prompt",
    "model",
    "token",
    "replica",
    "volume",
    "shard",
];

/// The i-th seeded prompt: distinct words so text lookups have something to find.
/// Answer `i`: words of prose up to `bytes` (at least the answer's number).
fn seeded_answer(i: u64, bytes: usize) -> String {
    const WORDS: [&str; 8] = [
        "the", "cache", "returns", "a", "stored", "answer", "when", "asked",
    ];
    let mut out = format!("answer {i}");
    let mut w = i as usize;
    while out.len() < bytes {
        out.push(' ');
        out.push_str(WORDS[w % WORDS.len()]);
        w = w.wrapping_mul(31).wrapping_add(7);
    }
    out
}

fn seeded_prompt(i: u64) -> String {
    let mut rng = StdRng::seed_from_u64(i ^ 0x5eed);
    let words: Vec<&str> = (0..6)
        .map(|_| WORDS[rng.random_range(0..WORDS.len())])
        .collect();
    format!("how do I tune {} for item {i}?", words.join(" "))
}

fn scope(scenario: Scenario) -> Value {
    // Text seeds carry model embeddings, the others random vectors: keep them apart.
    let namespace = if scenario == Scenario::SemanticText {
        "bench-text"
    } else {
        "bench"
    };
    json!({"namespace": namespace, "model": "bench-model"})
}

struct Client {
    http: reqwest::Client,
    url: String,
    auth: String,
}

impl Client {
    fn new(args: &BenchArgs) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(1)
            .tcp_nodelay(true)
            .timeout(Duration::from_secs(30))
            .build()
            .context("failed to build the HTTP client")?;
        Ok(Self {
            http,
            url: args.url.trim_end_matches('/').to_owned(),
            auth: format!("Bearer {}", args.api_key),
        })
    }

    async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let res = self
            .http
            .post(format!("{}{path}", self.url))
            .header("authorization", &self.auth)
            .json(body)
            .send()
            .await
            .with_context(|| format!("failed to call {path}"))?;
        let status = res.status();
        let value: Value = res.json().await.context("failed to read the answer")?;
        if !status.is_success() {
            bail!("{path} answered {status}: {value}");
        }
        Ok(value)
    }
}

fn request(
    scenario: Scenario,
    n: u64,
    seed: u64,
    dim: usize,
    rng: &mut StdRng,
) -> (&'static str, Value) {
    let pick = if seed == 0 {
        0
    } else {
        rng.random_range(0..seed)
    };
    match scenario {
        Scenario::ExactHit => (
            "/v1/lookup",
            json!({"prompt": seeded_prompt(pick), "scope": scope(scenario)}),
        ),
        Scenario::SemanticVector => {
            let noisy: Vec<f32> = seeded_vector(pick, dim)
                .into_iter()
                .map(|x| x + rng.random_range(-0.01f32..0.01))
                .collect();
            (
                "/v1/lookup",
                json!({"vector": normalized(noisy), "scope": scope(scenario)}),
            )
        }
        Scenario::SemanticText => (
            "/v1/lookup",
            json!({"prompt": format!("please tell me: {}", seeded_prompt(pick)), "scope": scope(scenario)}),
        ),
        Scenario::Miss => {
            let v: Vec<f32> = (0..dim).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            (
                "/v1/lookup",
                json!({"vector": normalized(v), "scope": scope(scenario)}),
            )
        }
        Scenario::Store | Scenario::EmbedLocal | Scenario::AnnRecall | Scenario::Gateway => {
            let v: Vec<f32> = (0..dim).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            (
                "/v1/entries",
                json!({"prompt": format!("bench store {n} {}", rng.random::<u64>()), "vector": normalized(v),
                       "response": {"choices": [{"message": {"content": "ok"}}]}, "scope": scope(scenario)}),
            )
        }
    }
}

async fn seed(args: &BenchArgs) -> anyhow::Result<()> {
    if args.seed == 0 || args.seeded {
        return Ok(());
    }
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let with_vectors = args.scenario != Scenario::SemanticText;
    let mut tasks = Vec::new();
    for _ in 0..args.seed_connections.max(1) {
        let client = Client::new(args)?;
        let next = next.clone();
        let (total, dim, scenario) = (args.seed, args.dimension, args.scenario);
        let response_bytes = args.response_bytes;
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return Ok::<(), anyhow::Error>(());
                }
                let mut body = json!({
                    "prompt": seeded_prompt(i),
                    "response": {"choices": [{"message": {"content": seeded_answer(i, response_bytes)}}]},
                    "scope": scope(scenario),
                    "prompt_tokens": 20, "completion_tokens": 100, "cost_usd": 0.0003,
                });
                if with_vectors {
                    body["vector"] = json!(seeded_vector(i, dim));
                }
                client.post("/v1/entries", &body).await?;
                if i > 0 && i.is_multiple_of(100_000) {
                    eprintln!("seeded {i} entries");
                }
            }
        }));
    }
    for t in tasks {
        t.await.context("failed to join a seeding task")??;
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "seeded {} entries in {secs:.1} s ({:.0} entries/s)",
        args.seed,
        args.seed as f64 / secs
    );
    Ok(())
}

#[derive(Default)]
struct Tally {
    ok: u64,
    errors: u64,
    hits: u64,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.scenario == Scenario::EmbedLocal {
        return embed_local(&args).await;
    }
    if args.scenario == Scenario::Gateway {
        return gateway::run(&args).await;
    }
    if args.scenario == Scenario::AnnRecall {
        return tokio::task::spawn_blocking(move || ann::run(&args))
            .await
            .context("failed to join the ann-recall run")?;
    }
    if args.connections == 0 {
        bail!("--connections must be at least 1");
    }
    if matches!(
        args.scenario,
        Scenario::ExactHit | Scenario::SemanticVector | Scenario::SemanticText
    ) && args.seed == 0
    {
        bail!(
            "the {:?} scenario needs entries to hit: pass --seed N",
            args.scenario
        );
    }
    seed(&args).await?;
    let hist = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
            .context("failed to create a histogram")?,
    ));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let start = Instant::now() + Duration::from_millis(50);
    let measure_from = start + args.warmup;
    let end = measure_from + args.duration;
    let ticket = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for worker in 0..args.connections {
        let client = Client::new(&args)?;
        let (hist, tally, ticket) = (hist.clone(), tally.clone(), ticket.clone());
        let (scenario, seed_n, dim, rate) = (args.scenario, args.seed, args.dimension, args.rate);
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(0xbe4c_0000 + worker as u64);
            loop {
                let n = ticket.fetch_add(1, Ordering::Relaxed);
                // Open loop: the n-th request is due at start + n / rate.
                let due = match rate {
                    Some(r) => start + Duration::from_secs_f64(n as f64 / r),
                    None => Instant::now(),
                };
                if due >= end {
                    return;
                }
                if rate.is_some() {
                    tokio::time::sleep_until(due.into()).await;
                }
                let (path, body) = request(scenario, n, seed_n, dim, &mut rng);
                let result = client.post(path, &body).await;
                let done = Instant::now();
                if due < measure_from {
                    continue;
                }
                let micros =
                    u64::try_from(done.duration_since(due).as_micros()).unwrap_or(u64::MAX);
                hist.lock().saturating_record(micros.max(1));
                let mut t = tally.lock();
                match result {
                    Ok(v) => {
                        t.ok += 1;
                        t.hits += u64::from(v.get("hit").and_then(Value::as_bool).unwrap_or(false));
                    }
                    Err(e) => {
                        if t.errors == 0 {
                            eprintln!("first error: {e:#}");
                        }
                        t.errors += 1;
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.context("failed to join a load task")?;
    }
    let h = hist.lock();
    let t = tally.lock();
    let secs = args.duration.as_secs_f64();
    let latency = Latency::of(&h);
    let mut report = json!({
        "scenario": format!("{:?}", args.scenario),
        "mode": if args.rate.is_some() { "open" } else { "closed" },
        "connections": args.connections,
        "requests": t.ok + t.errors,
        "errors": t.errors,
        "hit_ratio": if t.ok == 0 { 0.0 } else { t.hits as f64 / t.ok as f64 },
        "throughput_rps": (t.ok + t.errors) as f64 / secs,
    });
    latency.add_to(&mut report);
    if args.json {
        println!("{report}");
    } else {
        println!(
            "{:<16} {:>6} conn {:>9} req {:>6} err  hit {:>5.1}%  {:>9.0} req/s  {}",
            format!("{:?}", args.scenario),
            args.connections,
            t.ok + t.errors,
            t.errors,
            report["hit_ratio"].as_f64().unwrap_or(0.0) * 100.0,
            report["throughput_rps"].as_f64().unwrap_or(0.0),
            latency.line(),
        );
    }
    if t.ok == 0 {
        bail!("no request succeeded");
    }
    Ok(())
}
