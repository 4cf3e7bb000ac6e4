//! Reconcile metrics, exposed on `/metrics`: runs, failures by error kind, duration, and
//! whether this process leads.

use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    runs: IntCounter,
    failures: IntCounterVec,
    duration: Histogram,
    pub leader: IntGauge,
}

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
        Ok(Self {
            registry,
            runs,
            failures,
            duration,
            leader,
        })
    }

    pub fn observe_reconcile(&self, took: Duration, failure: Option<&'static str>) {
        self.runs.inc();
        self.duration.observe(took.as_secs_f64());
        if let Some(kind) = failure {
            self.failures.with_label_values(&[kind]).inc();
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
