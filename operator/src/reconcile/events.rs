//! Events for the transitions a platform team wants in `kubectl describe`. Publishing is
//! best effort: a failed event is logged, never a reconcile error.

use kube::Resource;
use kube::runtime::events::{Event as KubeEvent, EventType};

use super::Context;
use crate::crd::{SemanticCache, SemanticCacheStatus};

pub async fn publish(
    ctx: &Context,
    cache: &SemanticCache,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = KubeEvent {
        type_,
        reason: reason.to_owned(),
        note: Some(note),
        action: reason.to_owned(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &cache.object_ref(&())).await {
        tracing::warn!(error = %e, "failed to publish an event");
    }
}

/// An event per condition whose status or reason changed, and one when the active index
/// switched.
pub async fn announce(
    ctx: &Context,
    cache: &SemanticCache,
    previous: &SemanticCacheStatus,
    next: &SemanticCacheStatus,
) {
    let status_of = |s: &SemanticCacheStatus, t: &str| {
        s.conditions
            .iter()
            .find(|c| c.type_ == t)
            .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
    };
    for t in ["Ready", "Degraded", "IndexReady", "PostgresReady"] {
        let (before, after) = (status_of(previous, t), status_of(next, t));
        if before.as_ref().map(|b| (&b.0, &b.1)) != after.as_ref().map(|a| (&a.0, &a.1))
            && let Some((status, reason, message)) = after
        {
            let bad =
                (t == "Degraded" && status == "True") || (t != "Degraded" && status == "False");
            let kind = if bad {
                EventType::Warning
            } else {
                EventType::Normal
            };
            publish(
                ctx,
                cache,
                kind,
                &reason,
                format!("{t}={status}: {message}"),
            )
            .await;
        }
    }
    if previous.active_index.as_ref().map(|i| &i.fingerprint)
        != next.active_index.as_ref().map(|i| &i.fingerprint)
        && previous.active_index.is_some()
        && let Some(active) = &next.active_index
    {
        publish(
            ctx,
            cache,
            EventType::Normal,
            "IndexSwitched",
            format!(
                "the dataplane now serves index {} ({} dimensions)",
                active.fingerprint, active.dimension
            ),
        )
        .await;
    }
}
