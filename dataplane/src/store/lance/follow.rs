//! Cluster mode: every replica applies every record of the shared Redis Stream, in order.

use std::sync::{Arc, Weak};
use std::time::Duration;

use super::LanceEntryStore;
use super::store::Log;
use crate::store::BackendError;
use crate::store::redis_log::{RedisLog, format_stream_id};

impl LanceEntryStore {
    /// Cluster mode: apply every record other replicas append, in stream order.
    pub(super) async fn spawn_follower(
        store: Weak<Self>,
        log: Arc<RedisLog>,
        mut seq: Option<u64>,
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
                        if batch.follows_a_gap(seq) {
                            me.resynchronise(&store).await;
                        }
                        if batch.last.is_some() {
                            seq = batch.last_seq;
                        }
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

    /// Records between this replica's position and the next one it read were trimmed unread
    /// (it fell behind the flush leader, paused or partitioned): whatever they put or deleted
    /// is in the table now, so drop everything held from the log and reload from the table.
    async fn resynchronise(&self, store: &Weak<Self>) {
        let after = *self.cursor.borrow();
        self.metrics
            .log_gaps
            .with_label_values(&[&self.tenant])
            .inc();
        tracing::warn!(
            table = %self.table.name(),
            after = %format_stream_id(after),
            "the log was trimmed past records this replica had not read; reloading from the table"
        );
        // Deletes in the gap went to the table: until the refresh shows them, no read
        // should rely on anything held here.
        let reload = self
            .resident
            .as_ref()
            .filter(|r| !r.disabled())
            .map(|r| (r.clone(), r.restart_loading()));
        // The tail may hold entries deleted in the gap: gone at once (a miss until the refresh
        // shows the flushed ones). Pending deletes stay until the refresh: the table handle
        // may still be older than the flushes that applied them.
        self.state.lock().forget_tail(after);
        if let Err(e) = self.table.refresh().await {
            tracing::warn!(table = %self.table.name(), error = %e, "failed to refresh the table after a log gap; the next flush record refreshes it");
        }
        self.state.lock().apply_flushed(after);
        if let Some((resident, generation)) = reload {
            Self::spawn_resident_load(store.clone(), resident, generation);
        }
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
