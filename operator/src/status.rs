//! Stage 4 of reconcile: conditions computed from what apply observed, purely.
//!
//! Every condition carries the generation it describes; `Ready` is only True when the current
//! generation was reconciled and everything it asked for is up.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// What the apply stage saw of each component.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    pub generation: i64,
    pub redis: Rollout,
    pub dataplane: Rollout,
    pub postgres: PostgresState,
    pub index: IndexState,
    pub backup: BackupState,
    /// Some(installed) when a ServiceMonitor is wanted.
    pub service_monitor_crd: Option<bool>,
    /// A child failed to apply: transient, retried with back-off.
    pub apply_error: Option<String>,
    /// Referenced Secrets (or keys) that do not exist: the pods cannot start without them.
    pub missing_secrets: Vec<String>,
}

/// A StatefulSet's or Deployment's progress.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Rollout {
    pub wanted: i32,
    pub ready: i32,
    pub updated: i32,
    /// The workload controller has seen the latest spec.
    pub observed: bool,
}

impl Rollout {
    pub fn done(&self) -> bool {
        self.observed && self.ready >= self.wanted && self.updated >= self.wanted
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum PostgresState {
    /// No Postgres: SQLite on the dataplane volume.
    Embedded,
    Ready,
    Failed {
        reason: String,
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum IndexState {
    Serving,
    Migrating { target: String },
    Failed { target: String, message: String },
}

#[derive(Debug, Clone, PartialEq)]
pub enum BackupState {
    NotConfigured,
    NoRunYet,
    Succeeded,
    Failed,
}

fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: impl Into<String>,
    generation: i64,
) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: if ok { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message: message.into(),
        observed_generation: Some(generation),
        last_transition_time: Time(Timestamp::UNIX_EPOCH),
    }
}

fn unknown(type_: &str, reason: &str, message: &str, generation: i64) -> Condition {
    Condition {
        status: "Unknown".to_owned(),
        ..condition(type_, false, reason, message, generation)
    }
}

fn rollout_condition(type_: &str, what: &str, r: &Rollout, g: i64) -> Condition {
    if r.done() {
        condition(
            type_,
            true,
            "Available",
            format!("{what}: {}/{} ready", r.ready, r.wanted),
            g,
        )
    } else {
        condition(
            type_,
            false,
            "RollingOut",
            format!(
                "{what}: {}/{} ready, {}/{} updated",
                r.ready, r.wanted, r.updated, r.wanted
            ),
            g,
        )
    }
}

/// The full condition set for one reconciled generation, in a stable order.
pub fn conditions(o: &Observation) -> Vec<Condition> {
    let g = o.generation;
    let redis = rollout_condition("RedisReady", "Redis", &o.redis, g);
    let dataplane = if o.missing_secrets.is_empty() {
        rollout_condition("DataplaneReady", "dataplane", &o.dataplane, g)
    } else {
        condition(
            "DataplaneReady",
            false,
            "SecretMissing",
            format!("missing {}", o.missing_secrets.join(", ")),
            g,
        )
    };
    let postgres = match &o.postgres {
        PostgresState::Embedded => condition(
            "PostgresReady",
            true,
            "Embedded",
            "no spec.postgres: metadata lives in SQLite on the dataplane volume",
            g,
        ),
        PostgresState::Ready => condition(
            "PostgresReady",
            true,
            "CredentialsReady",
            "role, database and credentials Secret are in place",
            g,
        ),
        PostgresState::Failed { reason, message } => {
            condition("PostgresReady", false, reason, message.clone(), g)
        }
    };
    let index = match &o.index {
        IndexState::Serving => condition(
            "IndexReady",
            true,
            "Serving",
            "the active index matches spec.embedding",
            g,
        ),
        IndexState::Migrating { target } => condition(
            "IndexReady",
            false,
            "Reindexing",
            format!("rebuilding the index for embedder {target}; the active index keeps serving"),
            g,
        ),
        IndexState::Failed { target, message } => condition(
            "IndexReady",
            false,
            "ReindexFailed",
            format!(
                "the reindex for embedder {target} failed ({message}); the active index keeps serving"
            ),
            g,
        ),
    };
    let backup = match o.backup {
        BackupState::NotConfigured => {
            unknown("BackupSucceeded", "NotConfigured", "no spec.backup", g)
        }
        BackupState::NoRunYet => {
            unknown("BackupSucceeded", "NoBackupYet", "no backup has run yet", g)
        }
        BackupState::Succeeded => condition(
            "BackupSucceeded",
            true,
            "Succeeded",
            "the last backup succeeded",
            g,
        ),
        BackupState::Failed => condition(
            "BackupSucceeded",
            false,
            "Failed",
            "the last scheduled backup failed",
            g,
        ),
    };

    let components_up = [&redis, &dataplane, &postgres]
        .iter()
        .all(|c| c.status == "True");
    let ready = if let Some(err) = &o.apply_error {
        condition("Ready", false, "ApplyFailed", err.clone(), g)
    } else if components_up {
        condition(
            "Ready",
            true,
            "Available",
            "the cache serves the current spec",
            g,
        )
    } else {
        let waiting: Vec<&str> = [&redis, &dataplane, &postgres]
            .iter()
            .filter(|c| c.status != "True")
            .map(|c| c.type_.as_str())
            .collect();
        condition(
            "Ready",
            false,
            "Waiting",
            format!("waiting for {}", waiting.join(", ")),
            g,
        )
    };
    let migrating = matches!(o.index, IndexState::Migrating { .. });
    let progressing = if !components_up || migrating {
        condition(
            "Progressing",
            true,
            if migrating {
                "Reindexing"
            } else {
                "RollingOut"
            },
            "children are converging on the current spec",
            g,
        )
    } else {
        condition("Progressing", false, "Settled", "nothing in flight", g)
    };
    let degraded_reason = match (&o.index, &o.postgres, &o.apply_error) {
        (IndexState::Failed { .. }, _, _) => Some(("ReindexFailed", index.message.clone())),
        (_, PostgresState::Failed { reason, message }, _) => {
            Some((reason.as_str(), message.clone()))
        }
        (_, _, Some(err)) => Some(("ApplyFailed", err.clone())),
        _ => None,
    };
    let degraded = match degraded_reason {
        Some((reason, message)) => condition("Degraded", true, reason, message, g),
        None => condition("Degraded", false, "Healthy", "no failures", g),
    };
    let mut out = vec![
        ready,
        progressing,
        degraded,
        redis,
        postgres,
        dataplane,
        index,
        backup,
    ];
    if let Some(installed) = o.service_monitor_crd {
        out.push(if installed {
            condition("MonitoringReady", true, "ServiceMonitorApplied", "the ServiceMonitor is in place", g)
        } else {
            condition(
                "MonitoringReady",
                false,
                "ServiceMonitorCRDMissing",
                "spec.monitoring.serviceMonitor is on but the monitoring.coreos.com ServiceMonitor CRD is not installed",
                g,
            )
        });
    }
    out
}

/// Conditions for a spec that cannot be reconciled until the user changes it.
pub fn invalid_spec_conditions(generation: i64, message: &str) -> Vec<Condition> {
    vec![
        condition("Ready", false, "InvalidSpec", message, generation),
        condition(
            "Progressing",
            false,
            "InvalidSpec",
            "waiting for a spec change",
            generation,
        ),
        condition("Degraded", true, "InvalidSpec", message, generation),
    ]
}

/// Keeps `lastTransitionTime` where the status did not change, so an unchanged reconcile
/// writes an identical status (no resourceVersion bump, no event storm).
pub fn stamp(mut next: Vec<Condition>, previous: &[Condition], now: Timestamp) -> Vec<Condition> {
    for c in &mut next {
        c.last_transition_time = previous
            .iter()
            .find(|p| p.type_ == c.type_ && p.status == c.status)
            .map(|p| p.last_transition_time.clone())
            .unwrap_or(Time(now));
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settled() -> Observation {
        let up = Rollout {
            wanted: 1,
            ready: 1,
            updated: 1,
            observed: true,
        };
        Observation {
            generation: 3,
            redis: up.clone(),
            dataplane: up,
            postgres: PostgresState::Embedded,
            index: IndexState::Serving,
            backup: BackupState::NotConfigured,
            service_monitor_crd: None,
            apply_error: None,
            missing_secrets: Vec::new(),
        }
    }

    fn get<'a>(cs: &'a [Condition], t: &str) -> &'a Condition {
        cs.iter().find(|c| c.type_ == t).expect("condition present")
    }

    #[test]
    fn ready_when_every_component_is_up_at_this_generation() {
        let cs = conditions(&settled());
        assert_eq!(get(&cs, "Ready").status, "True");
        assert_eq!(get(&cs, "Progressing").status, "False");
        assert!(cs.iter().all(|c| c.observed_generation == Some(3)));
    }

    #[test]
    fn a_rollout_the_controller_has_not_observed_is_not_ready() {
        let mut o = settled();
        o.dataplane.observed = false;
        let cs = conditions(&o);
        assert_eq!(get(&cs, "Ready").status, "False");
        assert_eq!(get(&cs, "DataplaneReady").status, "False");
        assert_eq!(get(&cs, "Progressing").status, "True");
    }

    #[test]
    fn a_failed_reindex_degrades_but_keeps_serving() {
        let mut o = settled();
        o.index = IndexState::Failed {
            target: "abc".into(),
            message: "BackoffLimitExceeded".into(),
        };
        let cs = conditions(&o);
        assert_eq!(get(&cs, "Ready").status, "True");
        assert_eq!(get(&cs, "Degraded").status, "True");
        assert_eq!(get(&cs, "Degraded").reason, "ReindexFailed");
        assert_eq!(get(&cs, "IndexReady").reason, "ReindexFailed");
    }

    #[test]
    fn a_missing_secret_is_named_in_the_dataplane_condition() {
        let mut o = settled();
        o.missing_secrets = vec!["Secret team-a-key (key api-key, tenant team-a)".into()];
        let cs = conditions(&o);
        let dp = get(&cs, "DataplaneReady");
        assert_eq!(
            (dp.status.as_str(), dp.reason.as_str()),
            ("False", "SecretMissing")
        );
        assert!(dp.message.contains("team-a-key"));
        assert_eq!(get(&cs, "Ready").status, "False");
    }

    #[test]
    fn transition_times_survive_unchanged_statuses() {
        let t0 = Timestamp::from_second(1_000).expect("valid");
        let t1 = Timestamp::from_second(2_000).expect("valid");
        let first = stamp(conditions(&settled()), &[], t0);
        let again = stamp(conditions(&settled()), &first, t1);
        assert_eq!(first, again);
        let mut o = settled();
        o.redis.ready = 0;
        let changed = stamp(conditions(&o), &first, t1);
        assert_eq!(get(&changed, "RedisReady").last_transition_time, Time(t1));
        assert_eq!(
            get(&changed, "DataplaneReady").last_transition_time,
            Time(t0)
        );
    }
}
