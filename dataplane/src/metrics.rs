//! Prometheus metrics, named `semantis_<subsystem>_<name>_<unit>[_total]`.
//!
//! Labels stay bounded: tenant (bounded by the configuration), result, path, reason. Never an
//! entry id, a prompt or an error message.

use prometheus::{
    Encoder, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder, exponential_buckets,
};
pub use semantis_cache::metrics::CacheMetrics;
use semantis_cache::metrics::{counter, histogram};

pub struct Metrics {
    pub registry: Registry,
    /// The cache domain's own metrics, registered in the same registry.
    pub cache: CacheMetrics,
    pub resident_entries: IntGaugeVec,
    pub resident_pending: IntGaugeVec,
    pub resident_elsewhere: IntGaugeVec,
    pub store_unindexed_rows: IntGaugeVec,
    pub embedder_circuit_open: IntGaugeVec,
    pub verifier_circuit_open: IntGaugeVec,
    pub embed_cache: IntCounterVec,
    pub verify_cache: IntCounterVec,
    pub embed_batch_size: HistogramVec,
    pub store_flush_duration: HistogramVec,
    pub store_flushed_entries: IntCounterVec,
    pub store_write_fence: IntCounterVec,
    pub log_records_skipped: IntCounterVec,
    pub log_gaps: IntCounterVec,
    pub concurrency_refused: IntCounterVec,
    pub open_connections: IntGauge,
    /// Threads the in-process models' kernels use (`embed::model_threads`).
    pub model_threads: IntGauge,
    pub connections_refused_per_ip: IntCounter,
    pub requests_in_flight: IntGaugeVec,
    pub store_compaction_duration: HistogramVec,
    pub store_index_build_duration: HistogramVec,
    pub usage_events_dropped: IntCounter,
    pub gateway: GatewayMetrics,
}

/// The gateway's series. `model` is the request's model name, kept as a label only for the
/// first [`crate::gateway::MODEL_LABELS`] names a process sees (then `other`), so a client
/// cannot grow the series without bound.
#[derive(Clone)]
pub struct GatewayMetrics {
    pub requests: IntCounterVec,
    pub upstream_duration: HistogramVec,
    pub upstream_errors: IntCounterVec,
    pub tokens: IntCounterVec,
    pub usd_spent_micros: IntCounterVec,
    pub coalesced: IntCounterVec,
    pub coalesce_waiting: IntGaugeVec,
    pub rate_limited: IntCounterVec,
    pub ratelimit_fail_open: IntCounterVec,
}

impl Metrics {
    pub fn new() -> prometheus::Result<Self> {
        let r = Registry::new();
        let cache = CacheMetrics::register(&r)?;
        let slow = exponential_buckets(0.001, 2.0, 16)?;
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
        let resident_elsewhere = IntGaugeVec::new(
            Opts::new(
                "semantis_index_resident_responses_on_disk",
                "Resident entries held without their response (larger than storage.resident_response_max_bytes): a hit reads it from the table or the write-ahead tail.",
            ),
            &["tenant"],
        )?;
        r.register(Box::new(resident_elsewhere.clone()))?;
        let store_unindexed_rows = IntGaugeVec::new(
            Opts::new(
                "semantis_store_unindexed_rows",
                "Table rows an index does not cover yet (index: id, vector), as the last maintenance pass saw them: reads through that index scan them.",
            ),
            &["tenant", "index"],
        )?;
        r.register(Box::new(store_unindexed_rows.clone()))?;
        let circuit = IntGaugeVec::new(
            Opts::new(
                "semantis_embedder_circuit_open",
                "1 while the provider's circuit breaker refuses calls.",
            ),
            &["provider"],
        )?;
        r.register(Box::new(circuit.clone()))?;
        let verifier_circuit = IntGaugeVec::new(
            Opts::new(
                "semantis_verifier_circuit_open",
                "1 while a remote verifier's circuit breaker refuses calls.",
            ),
            &["verifier"],
        )?;
        r.register(Box::new(verifier_circuit.clone()))?;
        let dropped = IntCounter::new(
            "semantis_usage_events_dropped_total",
            "Usage and audit events dropped because the metadata store was unavailable.",
        )?;
        r.register(Box::new(dropped.clone()))?;
        let open_connections = IntGauge::new(
            "semantis_http_open_connections",
            "Connections open on the API port (at most server.max_connections).",
        )?;
        r.register(Box::new(open_connections.clone()))?;
        let model_threads = IntGauge::new(
            "semantis_model_threads",
            "Threads the in-process embedding model and verifier run their kernels on: RAYON_NUM_THREADS, else the CPUs the process may use (affinity and cgroup quota).",
        )?;
        model_threads.set(i64::try_from(crate::embed::model_threads()).unwrap_or(i64::MAX));
        r.register(Box::new(model_threads.clone()))?;
        let connections_refused_per_ip = IntCounter::new(
            "semantis_http_connections_refused_per_ip_total",
            "Connections answered 429 too_many_connections because their client address already held server.max_connections_per_ip.",
        )?;
        r.register(Box::new(connections_refused_per_ip.clone()))?;
        let requests_in_flight = IntGaugeVec::new(
            Opts::new(
                "semantis_http_requests_in_flight",
                "A tenant's requests being handled on this replica (at most its max_concurrent_requests); a streamed answer counts until its last byte.",
            ),
            &["tenant"],
        )?;
        r.register(Box::new(requests_in_flight.clone()))?;
        Ok(Self {
            open_connections,
            model_threads,
            connections_refused_per_ip,
            requests_in_flight,
            cache,
            resident_entries,
            resident_pending,
            resident_elsewhere,
            store_unindexed_rows,
            embedder_circuit_open: circuit,
            verifier_circuit_open: verifier_circuit,
            embed_cache: counter(
                &r,
                "semantis_embedder_cache_requests_total",
                "Embedding cache lookups by result (hit: in process, hit_shared: Redis, miss).",
                &["result"],
            )?,
            verify_cache: counter(
                &r,
                "semantis_verifier_cache_requests_total",
                "Verifier scores looked up in the score memory, by verifier and result (hit, miss).",
                &["verifier", "result"],
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
            store_write_fence: counter(
                &r,
                "semantis_store_write_fence_total",
                "Times this replica, leading, did not write the table: outcome=busy (another writer, perhaps a stalled former leader, is mid-write) or fenced (a newer leader wrote it).",
                &["tenant", "outcome"],
            )?,
            log_records_skipped: counter(
                &r,
                "semantis_log_records_skipped_total",
                "Records of the shared log this replica could not decode and skipped.",
                &["tenant"],
            )?,
            log_gaps: counter(
                &r,
                "semantis_log_gaps_total",
                "Times this replica found the shared log trimmed past its position and reloaded from the table.",
                &["tenant"],
            )?,
            concurrency_refused: counter(
                &r,
                "semantis_http_concurrency_refused_total",
                "Requests refused (429 too_many_concurrent_requests) because their tenant had max_concurrent_requests in flight.",
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
            gateway: GatewayMetrics {
                requests: counter(
                    &r,
                    "semantis_gateway_requests_total",
                    "Gateway chat requests by how they were answered (hit, miss, bypass, coalesced, error).",
                    &["tenant", "model", "outcome"],
                )?,
                upstream_duration: histogram(
                    &r,
                    "semantis_gateway_upstream_duration_seconds",
                    "Time from sending a chat request upstream to its response headers.",
                    &["tenant", "model"],
                    exponential_buckets(0.005, 2.0, 14)?,
                )?,
                upstream_errors: counter(
                    &r,
                    "semantis_gateway_upstream_errors_total",
                    "Upstream calls that failed, by kind (status_5xx, status_4xx, timeout, unavailable, circuit_open, stream_cut).",
                    &["tenant", "model", "kind"],
                )?,
                tokens: counter(
                    &r,
                    "semantis_gateway_upstream_tokens_total",
                    "Tokens upstream calls used, by kind (prompt, completion); tokens saved are semantis_cache_tokens_saved_total.",
                    &["tenant", "model", "kind"],
                )?,
                usd_spent_micros: counter(
                    &r,
                    "semantis_gateway_usd_spent_micros_total",
                    "Millionths of a dollar upstream calls cost, from the price table.",
                    &["tenant", "model"],
                )?,
                coalesced: counter(
                    &r,
                    "semantis_gateway_coalesced_total",
                    "Requests answered from an identical request's upstream call.",
                    &["tenant"],
                )?,
                rate_limited: counter(
                    &r,
                    "semantis_gateway_rate_limited_total",
                    "Requests refused with 429, by whose limit (tenant, user) and which (requests, tokens, usd).",
                    &["tenant", "who", "kind"],
                )?,
                ratelimit_fail_open: counter(
                    &r,
                    "semantis_gateway_ratelimit_fail_open_total",
                    "Limit checks or charges that Redis could not answer: the request went through unchecked.",
                    &["tenant"],
                )?,
                coalesce_waiting: {
                    let g = IntGaugeVec::new(
                        Opts::new(
                            "semantis_gateway_coalesce_waiting",
                            "Requests waiting for an identical request's upstream call now.",
                        ),
                        &["tenant"],
                    )?;
                    r.register(Box::new(g.clone()))?;
                    g
                },
            },
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
