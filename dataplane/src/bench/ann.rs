//! `bench --scenario ann-recall`: the resident index in process, no server. Loads `--seed`
//! seeded vectors into one scope, then asks `--queries` questions twice, through the HNSW
//! graph (timed, one thread) and exhaustively (the reference), and reports how often the hit
//! decision agrees, search latency, load rate and memory per entry.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use semantis_cache::entry::{Candidate, Entry};
use semantis_dataplane::store::resident::{GraphParams, GraphScalar, ResidentIndex, SearchMode};
use serde_json::json;

use super::{BenchArgs, GraphScalarArg, Latency, normalized, seeded_vector};

/// As many candidates as a lookup asks the store for.
const CANDIDATES: usize = 4;
const SCOPE: &str = "bench";

fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

fn entry(i: u64, dim: usize) -> Arc<Entry> {
    Arc::new(Entry {
        id: format!("bench-{i}"),
        scope: SCOPE.into(),
        namespace: "bench".into(),
        exact_key: format!("exact-{i}"),
        prompt: format!("bench prompt {i}"),
        vector: seeded_vector(i, dim).into(),
        response: Arc::from(&br#"{"choices":[{"message":{"content":"bench"}}]}"#[..]),
        model: "bench".into(),
        created_at_ms: 0,
        expires_at_ms: i64::MAX,
        prompt_tokens: 10,
        completion_tokens: 20,
        cost_usd: 0.0001,
        metadata: String::new(),
    })
}

/// A query: a stored vector with noise that spreads similarities across the threshold
/// (about 1.0 down to 0.8), or one time in five a random vector that matches nothing.
fn query(rng: &mut StdRng, n: u64, dim: usize) -> Vec<f32> {
    if rng.random_bool(0.2) {
        return normalized((0..dim).map(|_| rng.random_range(-1.0f32..1.0)).collect());
    }
    let amplitude = rng.random_range(0.0f32..0.08);
    let base = seeded_vector(rng.random_range(0..n), dim);
    normalized(
        base.iter()
            .map(|x| x + rng.random_range(-amplitude..=amplitude))
            .collect(),
    )
}

fn decision(found: &[Candidate], threshold: f32) -> Option<&str> {
    found
        .first()
        .filter(|c| c.similarity >= threshold)
        .map(|c| c.entry.id.as_str())
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let (n, dim) = (args.seed, args.dimension);
    if n == 0 {
        bail!("the ann-recall scenario needs entries: pass --seed N");
    }
    let before = resident_bytes();
    let served = GraphParams::default();
    let params = GraphParams {
        connectivity: args.graph_connectivity.unwrap_or(served.connectivity),
        expansion_add: args.graph_expansion_add.unwrap_or(served.expansion_add),
        expansion_search: args
            .graph_expansion_search
            .unwrap_or(served.expansion_search),
        scalar: match args.graph_scalar {
            None => served.scalar,
            Some(GraphScalarArg::F32) => GraphScalar::F32,
            Some(GraphScalarArg::F16) => GraphScalar::F16,
            Some(GraphScalarArg::I8) => GraphScalar::I8,
        },
    };
    let index = ResidentIndex::with_graph(dim, args.ann_min_scope_entries, params);
    index.finish_loading();
    let started = Instant::now();
    for i in 0..n {
        index
            .insert(entry(i, dim))
            .context("failed to insert into the resident index")?;
    }
    index
        .index_all_pending()
        .context("failed to build the resident index's graph")?;
    let load_secs = started.elapsed().as_secs_f64();
    let bytes_per_entry = resident_bytes().saturating_sub(before) as f64 / n as f64;

    let mut rng = StdRng::seed_from_u64(0xa22);
    let queries: Vec<Vec<f32>> = (0..args.queries).map(|_| query(&mut rng, n, dim)).collect();
    let new_histogram = || {
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).context("failed to create a histogram")
    };
    // All searches, and those the graph answered with a hit or a miss.
    let (mut hist, mut hit_hist, mut miss_hist) =
        (new_histogram()?, new_histogram()?, new_histogram()?);
    let threshold = args.min_similarity;
    let mode = SearchMode::Graph {
        confirm_below: (!args.no_miss_confirmation).then_some(threshold),
    };
    let mut graph = Vec::with_capacity(queries.len());
    for q in &queries {
        let t = Instant::now();
        let found = index.search_with(SCOPE, q, CANDIDATES, 0, mode)?;
        let micros = u64::try_from(t.elapsed().as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        hist.saturating_record(micros);
        if decision(&found, threshold).is_some() {
            hit_hist.saturating_record(micros);
        } else {
            miss_hist.saturating_record(micros);
        }
        graph.push(found);
    }
    // The reference, on every core (it is not timed).
    let threads = std::thread::available_parallelism().map_or(1, |p| p.get());
    let chunk = queries.len().div_ceil(threads).max(1);
    let exhaustive: Vec<Vec<Candidate>> = std::thread::scope(|s| {
        let handles: Vec<_> = queries
            .chunks(chunk)
            .map(|part| {
                let index = &index;
                s.spawn(move || {
                    part.iter()
                        .map(|q| index.search_with(SCOPE, q, 1, 0, SearchMode::Exhaustive))
                        .collect::<Result<Vec<_>, _>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("failed to join a reference thread"))
            })
            .collect::<anyhow::Result<Vec<_>>>()
    })?
    .into_iter()
    .collect::<Result<Vec<_>, _>>()?
    .into_iter()
    .flatten()
    .collect();

    let mut agree = 0usize;
    let mut same_best = 0usize;
    let mut reference_hits = 0usize;
    for (g, e) in graph.iter().zip(&exhaustive) {
        agree += usize::from(decision(g, threshold) == decision(e, threshold));
        same_best += usize::from(g.first().map(|c| &c.entry.id) == e.first().map(|c| &c.entry.id));
        reference_hits += usize::from(decision(e, threshold).is_some());
    }
    let total = queries.len().max(1) as f64;
    let latency = Latency::of(&hist);
    let (hit_latency, miss_latency) = (Latency::of(&hit_hist), Latency::of(&miss_hist));
    let mut report = json!({
        "scenario": "AnnRecall",
        "entries": n,
        "graph": format!("{params:?}"),
        "miss_confirmation": !args.no_miss_confirmation,
        "hit_p99_ms": hit_latency.p99,
        "miss_p99_ms": miss_latency.p99,
        "load_entries_per_s": n as f64 / load_secs.max(1e-9),
        "bytes_per_entry": bytes_per_entry,
        "queries": queries.len(),
        "threshold": threshold,
        "reference_hit_ratio": reference_hits as f64 / total,
        "decision_agreement": agree as f64 / total,
        "recall_at_1": same_best as f64 / total,
    });
    latency.add_to(&mut report);
    if args.json {
        println!("{report}");
    } else {
        println!(
            "AnnRecall  {params:?}, misses confirmed by a wider search: {}\n  {n} entries loaded at {:.0}/s, {:.0} B/entry resident; {} queries at {threshold}: \
             decision agrees with exhaustive search {:.2}% (recall@1 {:.2}%, {:.1}% hits); \
             search {}\n  searches that hit: {}\n  searches that missed: {}",
            !args.no_miss_confirmation,
            report["load_entries_per_s"].as_f64().unwrap_or(0.0),
            bytes_per_entry,
            queries.len(),
            agree as f64 / total * 100.0,
            same_best as f64 / total * 100.0,
            reference_hits as f64 / total * 100.0,
            latency.line(),
            hit_latency.line(),
            miss_latency.line(),
        );
    }
    Ok(())
}
