//! Prometheus metrics, named `semantis_<subsystem>_<name>_<unit>[_total]`.
//!
//! Labels stay bounded: tenant (bounded by the configuration), result, path, reason. Never an
//! entry id, a prompt or an error message.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder, exponential_buckets,
};

pub struct Metrics {
    pub registry: Registry,
    pub lookups: IntCounterVec,
    pub lookup_duration: HistogramVec,
    pub best_similarity: HistogramVec,
    pub near_misses: IntCounterVec,
    pub tokens_saved: IntCounterVec,
    pub usd_saved_micros: IntCounterVec,
    pub stores: IntCounterVec,
    pub stores_deferred: IntCounterVec,
    pub pending_embedded: IntCounterVec,
    pub entries: IntGaugeVec,
    pub resident_entries: IntGaugeVec,
    pub resident_pending: IntGaugeVec,
    pub evictions: IntCounterVec,
    pub embed_duration: HistogramVec,
    pub embed_errors: IntCounterVec,
    pub embedder_fallbacks: IntCounterVec,
    pub embedder_circuit_open: IntGaugeVec,
    pub embed_cache: IntCounterVec,
    pub embed_batch_size: HistogramVec,
    pub store_errors: IntCounterVec,
    pub store_flush_duration: HistogramVec,
    pub store_flushed_entries: IntCounterVec,
    pub store_compaction_duration: HistogramVec,
    pub store_index_build_duration: HistogramVec,
    pub usage_events_dropped: IntCounter,
}

fn counter(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> prometheus::Result<HistogramVec> {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)?;
    r.register(Box::new(h.clone()))?;
    Ok(h)
}

impl Metrics {
    pub fn new() -> prometheus::Result<Self> {
        let r = Registry::new();
        // 50 µs .. ~3 s
        let latency = exponential_buckets(0.00005, 2.0, 17)?;
        let slow = exponential_buckets(0.001, 2.0, 16)?;
        let similarity: Vec<f64> = (0..=20).map(|i| 0.5 + f64::from(i) * 0.025).collect();
        let entries = IntGaugeVec::new(
            Opts::new("semantis_cache_entries", "Live entries per tenant."),
            &["tenant"],
        )?;
        r.register(Box::new(entries.clone()))?;
        let resident_entries = IntGaugeVec::new(
            Opts::new(
                "semantis_index_resident_entries",
                "Entries held in the resident index (absent until its startup load finishes).",
            ),
            &["tenant"],
        )?;
        r.register(Box::new(resident_entries.clone()))?;
        let resident_pending = IntGaugeVec::new(
            Opts::new(
                "semantis_index_resident_pending_entries",
                "Resident entries waiting for the indexer thread to add them to their scope's graph (searched exhaustively meanwhile).",
            ),
            &["tenant"],
        )?;
        r.register(Box::new(resident_pending.clone()))?;
        let circuit = IntGaugeVec::new(
            Opts::new(
                "semantis_embedder_circuit_open",
                "1 while the provider's circuit breaker refuses calls.",
            ),
            &["provider"],
        )?;
        r.register(Box::new(circuit.clone()))?;
        let dropped = IntCounter::new(
            "semantis_usage_events_dropped_total",
            "Usage and audit events dropped because the metadata store was unavailable.",
        )?;
        r.register(Box::new(dropped.clone()))?;
        Ok(Self {
            lookups: counter(
                &r,
                "semantis_cache_lookups_total",
                "Lookups by result (hit, miss) and path (exact, semantic, none).",
                &["tenant", "result", "path"],
            )?,
            lookup_duration: histogram(
                &r,
                "semantis_cache_lookup_duration_seconds",
                "Lookup latency by the path that answered.",
                &["tenant", "path"],
                latency.clone(),
            )?,
            best_similarity: histogram(
                &r,
                "semantis_cache_best_similarity",
                "Cosine similarity of the best semantic candidate, hit or not (for tuning thresholds).",
                &["tenant"],
                similarity,
            )?,
            near_misses: counter(
                &r,
                "semantis_cache_near_misses_total",
                "Semantic misses whose best candidate was within the near-miss margin of the threshold.",
                &["tenant"],
            )?,
            tokens_saved: counter(
                &r,
                "semantis_cache_tokens_saved_total",
                "Prompt plus completion tokens not spent thanks to hits.",
                &["tenant"],
            )?,
            usd_saved_micros: counter(
                &r,
                "semantis_cache_usd_saved_micros_total",
                "US dollars not spent thanks to hits, in millionths.",
                &["tenant"],
            )?,
            stores: counter(
                &r,
                "semantis_cache_stores_total",
                "Entries stored.",
                &["tenant"],
            )?,
            stores_deferred: counter(
                &r,
                "semantis_cache_stores_deferred_total",
                "Stores accepted while the embedder was down, to be embedded later.",
                &["tenant"],
            )?,
            pending_embedded: counter(
                &r,
                "semantis_cache_pending_embedded_total",
                "Deferred stores embedded and moved into the entry store.",
                &["tenant"],
            )?,
            entries,
            resident_entries,
            resident_pending,
            evictions: counter(
                &r,
                "semantis_cache_evictions_total",
                "Entries removed by capacity eviction or expiry.",
                &["tenant", "reason"],
            )?,
            embed_duration: histogram(
                &r,
                "semantis_embedder_duration_seconds",
                "Time to embed one request's text.",
                &["provider"],
                slow.clone(),
            )?,
            embed_errors: counter(
                &r,
                "semantis_embedder_errors_total",
                "Failed embedding calls.",
                &["provider"],
            )?,
            embedder_circuit_open: circuit,
            embed_cache: counter(
                &r,
                "semantis_embedder_cache_requests_total",
                "Embedding cache lookups by result (hit: in process, hit_shared: Redis, miss).",
                &["result"],
            )?,
            embed_batch_size: histogram(
                &r,
                "semantis_embedder_batch_size",
                "Texts per provider call after batching concurrent requests.",
                &["provider"],
                vec![
                    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0,
                ],
            )?,
            embedder_fallbacks: counter(
                &r,
                "semantis_cache_embedder_fallbacks_total",
                "Lookups answered by the exact path alone because the embedder failed.",
                &["tenant"],
            )?,
            store_errors: counter(
                &r,
                "semantis_store_errors_total",
                "Store operations that failed, by operation.",
                &["tenant", "operation"],
            )?,
            store_flush_duration: histogram(
                &r,
                "semantis_store_flush_duration_seconds",
                "Time to flush the write-ahead tail into LanceDB.",
                &["tenant"],
                slow.clone(),
            )?,
            store_flushed_entries: counter(
                &r,
                "semantis_store_flushed_entries_total",
                "Entries flushed from the write-ahead tail into LanceDB.",
                &["tenant"],
            )?,
            store_compaction_duration: histogram(
                &r,
                "semantis_store_compaction_duration_seconds",
                "Time to compact and prune a LanceDB table.",
                &["tenant"],
                slow.clone(),
            )?,
            store_index_build_duration: histogram(
                &r,
                "semantis_store_index_build_duration_seconds",
                "Time to build a table's ANN index.",
                &["tenant"],
                slow,
            )?,
            usage_events_dropped: dropped,
            registry: r,
        })
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "failed to encode metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}
