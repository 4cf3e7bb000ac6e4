//! The domain's Prometheus metrics: lookups, stores, evictions, savings, embedding calls made
//! on its behalf and store failures it saw. Named `semantis_<subsystem>_<name>_<unit>[_total]`;
//! labels stay bounded (tenant, result, path, reason, operation, provider), never an entry id,
//! a prompt or an error message. The process registers them beside its own.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, exponential_buckets,
};

#[derive(Clone)]
pub struct CacheMetrics {
    pub lookups: IntCounterVec,
    pub lookup_duration: HistogramVec,
    pub best_similarity: HistogramVec,
    pub near_misses: IntCounterVec,
    pub rejected_candidates: IntCounterVec,
    pub tokens_saved: IntCounterVec,
    pub usd_saved_micros: IntCounterVec,
    pub stores: IntCounterVec,
    pub stores_deferred: IntCounterVec,
    pub pending_embedded: IntCounterVec,
    pub pending_abandoned: IntCounterVec,
    pub entries: IntGaugeVec,
    pub bytes: IntGaugeVec,
    pub evictions: IntCounterVec,
    pub embed_duration: HistogramVec,
    pub embed_errors: IntCounterVec,
    pub embedder_fallbacks: IntCounterVec,
    pub store_errors: IntCounterVec,
    pub verify_duration: HistogramVec,
    pub verify_failures: IntCounterVec,
    pub feedback: IntCounterVec,
    pub verifier_min_score: prometheus::GaugeVec,
}

pub fn counter(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

pub fn histogram(
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

impl CacheMetrics {
    /// Create the domain's metrics and register them in `r`.
    pub fn register(r: &Registry) -> prometheus::Result<Self> {
        // 50 µs .. ~3 s
        let latency = exponential_buckets(0.00005, 2.0, 17)?;
        let slow = exponential_buckets(0.001, 2.0, 16)?;
        let similarity: Vec<f64> = (0..=20).map(|i| 0.5 + f64::from(i) * 0.025).collect();
        let entries = IntGaugeVec::new(
            Opts::new("semantis_cache_entries", "Live entries per tenant."),
            &["tenant"],
        )?;
        r.register(Box::new(entries.clone()))?;
        let bytes = IntGaugeVec::new(
            Opts::new(
                "semantis_cache_bytes",
                "What each tenant's entries cost its byte budget (max_bytes): prompts, responses, metadata, vectors and a fixed 512 per entry.",
            ),
            &["tenant"],
        )?;
        r.register(Box::new(bytes.clone()))?;
        let verifier_min_score = prometheus::GaugeVec::new(
            Opts::new(
                "semantis_cache_verifier_min_score",
                "The verifier score a semantic candidate needs now, per tenant (feedback toward a target error rate may raise it).",
            ),
            &["tenant"],
        )?;
        r.register(Box::new(verifier_min_score.clone()))?;
        Ok(Self {
            lookups: counter(
                r,
                "semantis_cache_lookups_total",
                "Lookups by result (hit, miss) and path (exact, semantic, none).",
                &["tenant", "result", "path"],
            )?,
            lookup_duration: histogram(
                r,
                "semantis_cache_lookup_duration_seconds",
                "Lookup latency by the path that answered.",
                &["tenant", "path"],
                latency.clone(),
            )?,
            best_similarity: histogram(
                r,
                "semantis_cache_best_similarity",
                "Cosine similarity of the best semantic candidate, hit or not (for tuning thresholds).",
                &["tenant"],
                similarity,
            )?,
            near_misses: counter(
                r,
                "semantis_cache_near_misses_total",
                "Semantic misses whose best candidate was within the near-miss margin of the threshold.",
                &["tenant"],
            )?,
            rejected_candidates: counter(
                r,
                "semantis_cache_rejected_candidates_total",
                "Semantic candidates above the threshold that were not served, by the check they failed.",
                &["tenant", "reason"],
            )?,
            tokens_saved: counter(
                r,
                "semantis_cache_tokens_saved_total",
                "Prompt plus completion tokens not spent thanks to hits.",
                &["tenant"],
            )?,
            usd_saved_micros: counter(
                r,
                "semantis_cache_usd_saved_micros_total",
                "US dollars not spent thanks to hits, in millionths.",
                &["tenant"],
            )?,
            stores: counter(
                r,
                "semantis_cache_stores_total",
                "Entries stored.",
                &["tenant"],
            )?,
            stores_deferred: counter(
                r,
                "semantis_cache_stores_deferred_total",
                "Stores accepted while the embedder was down, to be embedded later.",
                &["tenant"],
            )?,
            pending_embedded: counter(
                r,
                "semantis_cache_pending_embedded_total",
                "Deferred stores embedded and moved into the entry store.",
                &["tenant"],
            )?,
            pending_abandoned: counter(
                r,
                "semantis_cache_pending_abandoned_total",
                "Deferred stores dropped because the embedding provider refuses their prompt (they could never answer a lookup).",
                &["tenant"],
            )?,
            entries,
            bytes,
            evictions: counter(
                r,
                "semantis_cache_evictions_total",
                "Entries removed by eviction (reason=capacity: max_entries; bytes: max_bytes) or expiry.",
                &["tenant", "reason"],
            )?,
            embed_duration: histogram(
                r,
                "semantis_embedder_duration_seconds",
                "Time to embed one request's text.",
                &["provider"],
                slow.clone(),
            )?,
            embed_errors: counter(
                r,
                "semantis_embedder_errors_total",
                "Failed embedding calls.",
                &["provider"],
            )?,
            embedder_fallbacks: counter(
                r,
                "semantis_cache_embedder_fallbacks_total",
                "Lookups answered by the exact path alone because the embedder failed.",
                &["tenant"],
            )?,
            store_errors: counter(
                r,
                "semantis_store_errors_total",
                "Store operations that failed, by operation.",
                &["tenant", "operation"],
            )?,
            verify_duration: histogram(
                r,
                "semantis_verifier_duration_seconds",
                "Time one lookup waited for its verifier.",
                &["provider"],
                slow,
            )?,
            verify_failures: counter(
                r,
                "semantis_cache_verifier_failures_total",
                "Lookups made a miss because the verifier failed (unavailable) or ran over the tenant's budget (over_budget).",
                &["tenant", "reason"],
            )?,
            feedback: counter(
                r,
                "semantis_cache_feedback_total",
                "Verdicts on served hits, by verdict (right, wrong).",
                &["tenant", "verdict"],
            )?,
            verifier_min_score,
        })
    }
}
