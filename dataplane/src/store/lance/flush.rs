//! Flushing the tail into the table: only the lease holder (always, in embedded mode) writes,
//! under the write fence ([`super::fence`]), and a flush is recorded in the log so every
//! replica drops what it wrote.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::LanceEntryStore;
use super::fence::{FenceGuard, Turn};
use super::log_state::FlushBatch;
use super::store::Log;
use crate::store::BackendError;
use crate::store::redis_log::{Pos, format_stream_id};
use crate::store::wal::WalRecord;

/// How long a flush lease lasts without renewal: a dead leader is replaced within this.
const LEASE: Duration = Duration::from_secs(5);

impl LanceEntryStore {
    /// Apply the log up to the newest applied position to the table: pending deletes first
    /// (they only concern older entries), then the tail's entries, merged on id so a flush
    /// repeated after a crash never duplicates a row. Only the lease holder calls this.
    pub(super) async fn flush_now(&self) -> Result<(), BackendError> {
        let _guard = self.flush_lock.lock().await;
        let Some(_turn) = self.write_turn().await? else {
            return Ok(());
        };
        let gate = self.append_gate.write().await;
        let upto = match &self.log {
            Log::File(wal) => {
                if self.state.lock().is_empty() {
                    return Ok(());
                }
                u128::from(wal.seal().await?)
            }
            Log::Redis(_) => *self.cursor.borrow(),
        };
        let batch = self.state.lock().flush_batch(upto);
        drop(gate);
        if batch.is_empty() {
            return Ok(());
        }
        let FlushBatch { entries, deletes } = batch;
        let started = Instant::now();
        for op in &deletes {
            self.table.delete(&op.predicate()).await?;
        }
        if !entries.is_empty() {
            // Until this flush is recorded, a retry may find these rows already written.
            let merge = self.merge_next.swap(true, Ordering::AcqRel)
                || self.always_merge.load(Ordering::Relaxed);
            if merge {
                self.table.merge(&entries).await?;
            } else {
                self.table.append(&entries).await?;
            }
        }
        self.record_flushed(upto).await?;
        self.merge_next.store(false, Ordering::Release);
        self.flushes_since_compaction
            .fetch_add(1, Ordering::Relaxed);
        self.metrics
            .store_flush_duration
            .with_label_values(&[&self.tenant])
            .observe(started.elapsed().as_secs_f64());
        self.metrics
            .store_flushed_entries
            .with_label_values(&[&self.tenant])
            .inc_by(entries.len() as u64);
        Ok(())
    }

    /// Everything up to `upto` is in the table: drop it here and tell the log. LanceDB
    /// writes its files without fsync, so they are made durable first: once the log forgets
    /// a record, the table's copy is the only one.
    pub(super) async fn record_flushed(&self, upto: Pos) -> Result<(), BackendError> {
        sync_filesystem(&self.cfg.data_dir).await?;
        match &self.log {
            Log::File(wal) => {
                self.state.lock().apply_flushed(upto);
                wal.discard(u64::try_from(upto).unwrap_or(u64::MAX)).await?;
            }
            Log::Redis(log) => {
                // Tell every replica; then the records before it are no longer needed.
                self.append(WalRecord::Flushed {
                    upto: format_stream_id(upto),
                })
                .await?;
                log.trim_before(upto + 1).await?;
            }
        }
        Ok(())
    }

    /// This replica's turn to write the table, held until the guard drops: always in
    /// embedded mode; in cluster mode while the write fence accepts its lease's epoch.
    /// `None`: not now (another writer is mid-write, or a newer leader fenced this one out).
    pub(super) async fn write_turn(&self) -> Result<Option<FenceGuard>, BackendError> {
        let Some(fence) = self.fence.clone() else {
            return Ok(Some(FenceGuard::unfenced()));
        };
        let epoch = self.epoch.load(Ordering::Acquire);
        let path = fence.path().display().to_string();
        let turn = tokio::task::spawn_blocking(move || fence.enter(epoch))
            .await
            .map_err(|e| BackendError::Io {
                action: "take the write fence",
                path,
                source: std::io::Error::other(e.to_string()),
            })??;
        let outcome = match turn {
            Turn::Held(guard) => return Ok(Some(guard)),
            Turn::Busy => {
                tracing::debug!(table = %self.table.name(), "another writer holds the table's write fence; flushing later");
                "busy"
            }
            Turn::Fenced { current } => {
                tracing::warn!(
                    table = %self.table.name(),
                    epoch,
                    current,
                    "a newer leader wrote the table after this replica's lease ended; this replica no longer writes it"
                );
                self.leading.store(false, Ordering::Release);
                if let Log::Redis(log) = &self.log {
                    // Holding the lease yet fenced means the epoch counter went back (Redis
                    // lost its data): give the lease up so the next take is above the fence.
                    log.raise_epoch(current).await?;
                    log.release().await?;
                }
                "fenced"
            }
        };
        self.metrics
            .store_write_fence
            .with_label_values(&[&self.tenant, outcome])
            .inc();
        Ok(None)
    }

    pub(super) fn flush_due(&self) -> bool {
        let st = self.state.lock();
        st.tail_len() >= self.cfg.flush_max_rows
            || st.has_pending_deletes()
            || st
                .oldest()
                .is_some_and(|t| t.elapsed() >= Duration::from_millis(self.cfg.flush_interval_ms))
    }

    /// True when this replica may mutate the table: always in embedded mode; in cluster
    /// mode while it holds the flush lease.
    pub(super) async fn leads(&self) -> Result<bool, BackendError> {
        let leads = match &self.log {
            Log::File(_) => true,
            Log::Redis(log) => match log.lead(LEASE).await? {
                Some(epoch) => {
                    self.epoch.store(epoch, Ordering::Release);
                    true
                }
                None => false,
            },
        };
        // A replica taking over may find the previous leader's last flush half-recorded.
        if leads && !self.leading.swap(true, Ordering::AcqRel) {
            self.merge_next.store(true, Ordering::Release);
        }
        if !leads {
            self.leading.store(false, Ordering::Release);
        }
        Ok(leads)
    }
}

/// `syncfs(2)` on the filesystem holding `dir`: every file LanceDB wrote there (data
/// fragments, deletion files, manifests) and their directory entries reach the disk. One
/// call covers them all, however many files a flush or compaction wrote.
pub(super) async fn sync_filesystem(dir: &str) -> Result<(), BackendError> {
    let path = dir.to_owned();
    tokio::task::spawn_blocking(move || {
        std::fs::File::open(&path)
            .and_then(|f| rustix::fs::syncfs(&f).map_err(std::io::Error::from))
            .map_err(|source| BackendError::Io {
                action: "sync the files of",
                path,
                source,
            })
    })
    .await
    .map_err(|e| BackendError::Io {
        action: "sync the files of",
        path: dir.to_owned(),
        source: std::io::Error::other(e.to_string()),
    })?
}
