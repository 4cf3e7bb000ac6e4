//! Reconcile metrics, exposed on `/metrics`: runs, failures by error kind, duration, and
//! whether this process leads.

use std::time::Duration;

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    runs: IntCounter,
    failures: IntCounterVec,
    duration: Histogram,
    pub leader: IntGauge,
    /// 1 when the condition is True, 0 otherwise, per cache (bounded by the number of caches).
    conditions: IntGaugeVec,
    reindex_failed: IntGaugeVec,
    last_backup: GaugeVec,
}

/// The condition types exported as metrics (alerts and the dashboard read them).
pub const EXPORTED_CONDITIONS: [&str; 8] = [
    "Ready",
    "Progressing",
    "Degraded",
    "RedisReady",
    "PostgresReady",
    "DataplaneReady",
    "IndexReady",
    "BackupSucceeded",
];

#[derive(Debug, thiserror::Error)]
#[error("failed to register operator metrics: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

impl Metrics {
    pub fn new() -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let runs = IntCounter::new("semantis_operator_reconcile_runs_total", "Reconcile runs.")?;
        let failures = IntCounterVec::new(
            Opts::new(
                "semantis_operator_reconcile_failures_total",
                "Failed reconcile runs by error kind.",
            ),
            &["kind"],
        )?;
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "semantis_operator_reconcile_duration_seconds",
                "Reconcile duration.",
            )
            .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
        )?;
        let leader = IntGauge::new(
            "semantis_operator_leader",
            "1 while this process holds the leader lease.",
        )?;
        registry.register(Box::new(runs.clone()))?;
        registry.register(Box::new(failures.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        let conditions = IntGaugeVec::new(
            Opts::new(
                "semantis_operator_cache_condition",
                "1 when the cache's condition is True.",
            ),
            &["namespace", "cache", "type"],
        )?;
        let reindex_failed = IntGaugeVec::new(
            Opts::new(
                "semantis_operator_reindex_failed",
                "1 while the cache's index migration has failed.",
            ),
            &["namespace", "cache"],
        )?;
        let last_backup = GaugeVec::new(
            Opts::new(
                "semantis_operator_last_backup_success_timestamp_seconds",
                "When the cache's last backup succeeded (Unix seconds).",
            ),
            &["namespace", "cache"],
        )?;
        registry.register(Box::new(conditions.clone()))?;
        registry.register(Box::new(reindex_failed.clone()))?;
        registry.register(Box::new(last_backup.clone()))?;
        Ok(Self {
            registry,
            runs,
            failures,
            duration,
            leader,
            conditions,
            reindex_failed,
            last_backup,
        })
    }

    pub fn observe_reconcile(&self, took: Duration, failure: Option<&'static str>) {
        self.runs.inc();
        self.duration.observe(took.as_secs_f64());
        if let Some(kind) = failure {
            self.failures.with_label_values(&[kind]).inc();
        }
    }

    /// Publishes a cache's status; `None` forgets the cache (it was deleted).
    pub fn observe_cache(
        &self,
        namespace: &str,
        cache: &str,
        status: Option<&crate::crd::SemanticCacheStatus>,
    ) {
        let Some(status) = status else {
            for t in EXPORTED_CONDITIONS {
                let _ = self.conditions.remove_label_values(&[namespace, cache, t]);
            }
            let _ = self.reindex_failed.remove_label_values(&[namespace, cache]);
            let _ = self.last_backup.remove_label_values(&[namespace, cache]);
            return;
        };
        for t in EXPORTED_CONDITIONS {
            if let Some(c) = status.conditions.iter().find(|c| c.type_ == t) {
                self.conditions
                    .with_label_values(&[namespace, cache, t])
                    .set(i64::from(c.status == "True"));
            }
        }
        let failed = status
            .conditions
            .iter()
            .any(|c| c.type_ == "IndexReady" && c.reason == "ReindexFailed");
        self.reindex_failed
            .with_label_values(&[namespace, cache])
            .set(i64::from(failed));
        if let Some(t) = status
            .last_backup
            .as_ref()
            .and_then(|b| b.last_success_time.as_ref())
            .and_then(|t| t.parse::<jiff::Timestamp>().ok())
        {
            self.last_backup
                .with_label_values(&[namespace, cache])
                .set(t.as_second() as f64);
        }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "failed to encode metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}
