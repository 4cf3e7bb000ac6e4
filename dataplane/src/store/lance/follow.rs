//! Cluster mode: every replica applies every record of the shared Redis Stream, in order.

use std::sync::{Arc, Weak};
use std::time::Duration;

use super::LanceEntryStore;
use super::store::Log;
use crate::store::BackendError;
use crate::store::redis_log::RedisLog;

impl LanceEntryStore {
    /// Cluster mode: apply every record other replicas append, in stream order.
    pub(super) async fn spawn_follower(
        store: Weak<Self>,
        log: Arc<RedisLog>,
    ) -> Result<(), BackendError> {
        let mut conn = log.follower_connection().await?;
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(50);
            loop {
                let Some(me) = store.upgrade() else { return };
                let after = *me.cursor.borrow();
                drop(me);
                let batch = log
                    .read_after(&mut conn, after, Duration::from_millis(500))
                    .await;
                let Some(me) = store.upgrade() else { return };
                match batch {
                    Ok(batch) => {
                        backoff = Duration::from_millis(50);
                        for (pos, record) in batch.records {
                            let own = me.state.lock().applied_own.remove(&pos);
                            if !own && let Err(e) = me.apply(pos, record).await {
                                tracing::warn!(table = %me.table.name(), error = %e, "failed to apply a log record");
                            }
                            me.cursor.send_replace(pos);
                        }
                        // Past the undecodable ones too: they were logged and counted.
                        if let Some(last) = batch.last {
                            me.cursor.send_if_modified(|c| {
                                let moved = last > *c;
                                *c = (*c).max(last);
                                moved
                            });
                        }
                        me.metrics
                            .log_records_skipped
                            .with_label_values(&[&me.tenant])
                            .inc_by(batch.undecodable as u64);
                    }
                    Err(e) => {
                        tracing::warn!(table = %me.table.name(), error = %e, "failed to follow the log; retrying");
                        drop(me);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                        if let Ok(c) = log.follower_connection().await {
                            conn = c;
                        }
                    }
                }
            }
        });
        Ok(())
    }

    /// Cluster mode: wait until this replica has applied everything appended so far, so a
    /// delete or invalidation sees every store acknowledged before it.
    pub(super) async fn catch_up(&self) -> Result<(), BackendError> {
        let Log::Redis(log) = &self.log else {
            return Ok(());
        };
        let Some(last) = log.last_pos().await? else {
            return Ok(());
        };
        let mut rx = self.cursor.subscribe();
        let wait = rx.wait_for(|c| *c >= last);
        match tokio::time::timeout(Duration::from_secs(2), wait).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(BackendError::Decode {
                table: self.table.name().to_owned(),
                reason: "failed to catch up with the log within 2 s".into(),
            }),
        }
    }
}
