//! [`LanceEntryStore`]: the `EntryStore` port over one [`Table`] and its log. Opening replays
//! the log; a write is appended to the log and applied here (tail, resident index) before it
//! is acknowledged; reads merge the tail, the resident index or the table.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::Mutex;
use semantis_cache::StoreError;
use semantis_cache::entry::{Candidate, Entry, EntryFilter, Held, Removed};
use semantis_cache::vector::cosine_similarity;
use semantis_contract::StorageConfig;
use tokio::sync::watch;

use super::fence::{Fence, fence_path};
use super::log_state::{LogState, PendingDelete};
use super::sql;
use super::table::Table;
use crate::metrics::Metrics;
use crate::store::redis_log::{Pos, RedisLog, parse_stream_id};
use crate::store::resident::{ResidentIndex, SearchMode};
use crate::store::wal::{Wal, WalRecord};
use crate::store::{BackendError, EntryStore};

/// How a table's log is reached.
pub enum LogConfig<'a> {
    File {
        root: &'a Path,
    },
    Redis {
        client: &'a redis::Client,
        conn: &'a redis::aio::ConnectionManager,
        replica: &'a str,
    },
}

/// Where the write-ahead records go: a local file log (embedded mode) or a Redis Stream
/// shared by every replica (cluster mode).
pub(super) enum Log {
    File(Wal),
    Redis(Arc<RedisLog>),
}

pub struct LanceEntryStore {
    pub(super) tenant: String,
    pub(super) table: Table,
    /// The length of the table's vectors.
    pub(super) dimension: usize,
    pub(super) log: Log,
    pub(super) state: Mutex<LogState>,
    /// Cluster mode: the last stream record this replica applied.
    pub(super) cursor: watch::Sender<Pos>,
    /// One flush or maintenance pass at a time.
    pub(super) flush_lock: tokio::sync::Mutex<()>,
    /// Appends hold it shared from the log write until the record is applied here; a flush
    /// holds it exclusively while it fixes its position and takes its snapshot. Without it a
    /// flush could cut between an acknowledged write and its tail entry and lose the entry.
    pub(super) append_gate: tokio::sync::RwLock<()>,
    pub(super) cfg: StorageConfig,
    pub(super) flushes_since_compaction: AtomicUsize,
    /// The next flush must merge on id instead of appending: its rows may already be in the
    /// table (first flush after startup or after taking the lease, or after a flush that
    /// failed once LanceDB may have committed). Appending is far cheaper on large tables.
    pub(super) merge_next: AtomicBool,
    /// Merge on every flush: set on a migration target, whose rows `reindex` also writes.
    pub(super) always_merge: AtomicBool,
    /// Whether the last lease check found this replica leading.
    pub(super) leading: AtomicBool,
    /// Cluster mode: the table's write fence, and the epoch of this replica's lease.
    pub(super) fence: Option<Fence>,
    pub(super) epoch: AtomicU64,
    pub(super) has_vector_index: AtomicBool,
    pub(super) has_scalar_indexes: AtomicBool,
    pub(super) last_table_maintenance: Mutex<Option<Instant>>,
    /// Every live entry in memory, searched instead of LanceDB once loaded
    /// (`storage.resident_index`).
    pub(super) resident: Option<Arc<ResidentIndex>>,
    pub(super) metrics: Arc<Metrics>,
}

impl LanceEntryStore {
    /// Open (or create) the table and rebuild the tail from the log.
    #[allow(clippy::too_many_arguments)]
    pub async fn open(
        db: &lancedb::Connection,
        log: LogConfig<'_>,
        tenant: &str,
        table_name: &str,
        dimension: usize,
        cfg: StorageConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, BackendError> {
        let table = Table::open(db, table_name, dimension).await?;
        let indexes = table.indexes().await?;
        let fence = matches!(log, LogConfig::Redis { .. })
            .then(|| Fence::new(fence_path(Path::new(db.uri()), table_name)));

        let (log, replay, replayed_upto, replayed_seq) = match log {
            LogConfig::File { root } => {
                let (wal, replayed) = Wal::open(&root.join(table_name))?;
                if replayed.torn > 0 {
                    tracing::warn!(
                        table = table_name,
                        lines = replayed.torn,
                        "skipped torn records at the end of the write-ahead log (unacknowledged writes)"
                    );
                }
                // Position 0 sorts before every live segment: the next flush takes them all.
                let records = replayed.records.into_iter().map(|r| (0, r)).collect();
                (Log::File(wal), records, 0, None)
            }
            LogConfig::Redis {
                client,
                conn,
                replica,
            } => {
                let log = RedisLog::new(client.clone(), conn.clone(), table_name, replica);
                let mut follower = log.follower_connection().await?;
                let mut records = Vec::new();
                let mut after = 0;
                let mut seq = None;
                loop {
                    let batch = log
                        .read_after(&mut follower, after, Duration::from_millis(1))
                        .await?;
                    let Some(last) = batch.last else { break };
                    if batch.follows_a_gap(seq) {
                        // Trimmed while replaying: what was cut is in the table; start over.
                        records.clear();
                    }
                    after = last;
                    seq = batch.last_seq;
                    records.extend(batch.records);
                    metrics
                        .log_records_skipped
                        .with_label_values(&[tenant])
                        .inc_by(batch.undecodable as u64);
                }
                (Log::Redis(Arc::new(log)), records, after, seq)
            }
        };
        // The follower goes on from the last record replayed here.
        let (cursor, _) = watch::channel(replayed_upto);
        let resident = cfg.resident_index.then(|| {
            Arc::new(
                ResidentIndex::new(dimension, cfg.ann_min_scope_entries)
                    .with_response_limit(cfg.resident_response_max_bytes),
            )
        });
        let store = Arc::new(Self {
            tenant: tenant.to_owned(),
            table,
            dimension,
            log,
            state: Mutex::new(LogState::default()),
            cursor,
            flush_lock: tokio::sync::Mutex::new(()),
            append_gate: tokio::sync::RwLock::new(()),
            cfg,
            flushes_since_compaction: AtomicUsize::new(0),
            merge_next: AtomicBool::new(true),
            always_merge: AtomicBool::new(false),
            leading: AtomicBool::new(false),
            fence,
            epoch: AtomicU64::new(0),
            has_vector_index: AtomicBool::new(indexes.vector),
            has_scalar_indexes: AtomicBool::new(indexes.scalar),
            last_table_maintenance: Mutex::new(None),
            resident,
            metrics,
        });
        let count = replay.len();
        for (pos, record) in replay {
            store.apply(pos, record).await?;
        }
        if count > 0 {
            tracing::info!(table = %store.table.name(), records = count, "replayed the write-ahead log");
        }
        if let Log::Redis(log) = &store.log {
            Self::spawn_follower(Arc::downgrade(&store), log.clone(), replayed_seq).await?;
        }
        if let Some(resident) = &store.resident
            && let Err(e) = resident.spawn_indexer()
        {
            tracing::warn!(table = %store.table.name(), error = %e, "failed to start the resident index's indexer thread; semantic lookups keep querying LanceDB");
            resident.disable();
        }
        Ok(store)
    }

    pub(super) async fn apply(&self, pos: Pos, record: WalRecord) -> Result<(), BackendError> {
        match record {
            WalRecord::Put(e) => {
                let entry: Arc<Entry> = Arc::from(e);
                self.apply_resident(|r| r.insert(entry.clone()));
                self.state.lock().apply_put(pos, entry);
            }
            WalRecord::Delete { ids } => {
                self.apply_resident(|r| r.remove_ids(&ids));
                self.state.lock().apply_delete(pos, PendingDelete::Ids(ids));
            }
            WalRecord::DeleteWhere { filter } => {
                self.apply_resident(|r| r.remove_where(&filter));
                self.state
                    .lock()
                    .apply_delete(pos, PendingDelete::Where(filter));
            }
            WalRecord::Flushed { upto } => {
                let upto = parse_stream_id(&upto).unwrap_or(0);
                // See the rows the leader wrote before dropping them from the tail.
                self.table.refresh().await?;
                // An index the leader built since: search it (with re-ranking) from now on.
                if !self.has_vector_index.load(Ordering::Relaxed)
                    && self.table.indexes().await?.vector
                {
                    self.has_vector_index.store(true, Ordering::Relaxed);
                }
                self.state.lock().apply_flushed(upto);
            }
        }
        Ok(())
    }

    /// Append a record and apply it here at once (the follower skips it later).
    pub(super) async fn append(&self, record: WalRecord) -> Result<Pos, BackendError> {
        let _gate = self.append_gate.read().await;
        match &self.log {
            Log::File(wal) => {
                let pos = u128::from(wal.append(&record).await?);
                self.apply(pos, record).await?;
                Ok(pos)
            }
            Log::Redis(log) => {
                let pos = log.append(&record).await?;
                self.state.lock().applied_own.insert(pos);
                if *self.cursor.borrow() >= pos {
                    // The follower already passed it; it will not skip it, so forget it.
                    self.state.lock().applied_own.remove(&pos);
                }
                self.apply(pos, record).await?;
                Ok(pos)
            }
        }
    }

    /// Flush by merging on id from now on (a migration target that `reindex` fills too).
    pub fn merge_every_flush(&self) {
        self.always_merge.store(true, Ordering::Relaxed);
    }

    pub fn tail_len(&self) -> usize {
        self.state.lock().tail_len()
    }

    /// The whole entries (responses included) of `ids`, which the resident index holds
    /// without their responses: from the write-ahead tail, else the table. The tail is read
    /// first: a flush refreshes the table before it drops the entries from the tail, so an
    /// entry is always in one of the two. One deleted meanwhile is in neither (a miss).
    async fn whole(&self, ids: &[String]) -> Result<HashMap<String, Arc<Entry>>, StoreError> {
        let mut found: HashMap<String, Arc<Entry>> = self
            .state
            .lock()
            .tail()
            .filter(|e| ids.contains(&e.id))
            .map(|e| (e.id.clone(), e.clone()))
            .collect();
        let rest: Vec<String> = ids
            .iter()
            .filter(|id| !found.contains_key(*id))
            .cloned()
            .collect();
        if !rest.is_empty() {
            let rows = self
                .table
                // Ids are unique: the scan stops once every one is found.
                .entries(self.visible(sql::ids_in(&rest)), Some(rest.len()))
                .await?;
            found.extend(rows.into_iter().map(|e| (e.id.clone(), Arc::new(e))));
        }
        Ok(found)
    }

    /// `base` with rows hidden by pending deletes taken out.
    fn visible(&self, base: String) -> String {
        self.state.lock().visible(base)
    }
}

#[async_trait]
impl EntryStore for LanceEntryStore {
    async fn insert(&self, entry: Arc<Entry>) -> Result<(), StoreError> {
        self.append(WalRecord::Put(Box::new(Entry::clone(&entry))))
            .await?;
        Ok(())
    }

    async fn find_exact(
        &self,
        exact_key: &str,
        now_ms: i64,
    ) -> Result<Option<Arc<Entry>>, StoreError> {
        let in_tail = self
            .state
            .lock()
            .tail()
            .rev()
            .find(|e| e.exact_key == exact_key && e.is_live(now_ms))
            .cloned();
        if in_tail.is_some() {
            return Ok(in_tail);
        }
        if let Some(resident) = self.resident_ready() {
            return match resident.find_exact_held(exact_key, now_ms) {
                Some((entry, true)) => Ok(self
                    .whole(std::slice::from_ref(&entry.id))
                    .await?
                    .remove(&entry.id)),
                found => Ok(found.map(|(entry, _)| entry)),
            };
        }
        let filter = format!(
            "exact_key = {} AND {}",
            sql::quote(exact_key),
            sql::live(now_ms)
        );
        let found = self.table.entries(self.visible(filter), Some(1)).await?;
        Ok(found.into_iter().next().map(Arc::new))
    }

    async fn search(
        &self,
        scope: &str,
        vector: &[f32],
        limit: usize,
        hit_threshold: f32,
        now_ms: i64,
    ) -> Result<Vec<Candidate>, StoreError> {
        if let Some(resident) = self.resident_ready() {
            let mode = SearchMode::Graph {
                confirm_below: Some(hit_threshold),
            };
            let (mut found, elsewhere) = resident
                .search_held(scope, vector, limit, now_ms, mode)
                .map_err(BackendError::from)?;
            // Only a candidate that can hit needs its answer: the ones below the threshold
            // are never served, so a miss never reads the table.
            let needed: Vec<String> = found
                .iter()
                .filter(|c| c.similarity >= hit_threshold && elsewhere.contains(&c.entry.id))
                .map(|c| c.entry.id.clone())
                .collect();
            if !needed.is_empty() {
                let mut whole = self.whole(&needed).await?;
                found.retain_mut(|c| {
                    if !needed.contains(&c.entry.id) {
                        return true;
                    }
                    match whole.remove(&c.entry.id) {
                        Some(entry) => {
                            c.entry = entry;
                            true
                        }
                        None => false,
                    }
                });
            }
            return Ok(found);
        }
        let mut candidates: Vec<Candidate> = self
            .state
            .lock()
            .tail()
            .filter(|e| e.scope == scope && e.is_live(now_ms))
            .map(|e| Candidate {
                similarity: cosine_similarity(vector, &e.vector),
                entry: e.clone(),
            })
            .collect();
        let filter = self.visible(format!(
            "scope = {} AND {}",
            sql::quote(scope),
            sql::live(now_ms)
        ));
        // With an ANN index the table re-ranks its candidates on the full vectors before any
        // threshold check.
        let ann = self.has_vector_index.load(Ordering::Relaxed);
        let found = self.table.nearest(vector, filter, limit, ann).await?;
        let in_tail: HashSet<String> = candidates.iter().map(|c| c.entry.id.clone()).collect();
        for entry in found {
            if in_tail.contains(&entry.id) {
                continue;
            }
            // Recompute from the stored vector so both sources rank on the same measure.
            let similarity = cosine_similarity(vector, &entry.vector);
            candidates.push(Candidate {
                similarity,
                entry: Arc::new(entry),
            });
        }
        candidates.sort_by(|a, b| b.similarity.total_cmp(&a.similarity));
        candidates.truncate(limit);
        Ok(candidates)
    }

    async fn delete_ids(&self, ids: &[String]) -> Result<Vec<Removed>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        self.catch_up().await?;
        let wanted: HashSet<&String> = ids.iter().collect();
        let mut removed: Vec<Removed> = self
            .state
            .lock()
            .tail()
            .filter(|e| wanted.contains(&e.id))
            .map(|e| Removed {
                id: e.id.clone(),
                exact_key: e.exact_key.clone(),
            })
            .collect();
        let in_table = self
            .table
            .removed(self.visible(sql::ids_in(ids)), None)
            .await?;
        for r in in_table {
            if !removed.iter().any(|x| x.id == r.id) {
                removed.push(r);
            }
        }
        if removed.is_empty() {
            return Ok(removed);
        }
        self.append(WalRecord::Delete {
            ids: removed.iter().map(|r| r.id.clone()).collect(),
        })
        .await?;
        Ok(removed)
    }

    async fn delete_where(&self, filter: &EntryFilter) -> Result<Vec<Removed>, StoreError> {
        self.catch_up().await?;
        let mut removed: Vec<Removed> = self
            .state
            .lock()
            .tail()
            .filter(|e| filter.matches(e))
            .map(|e| Removed {
                id: e.id.clone(),
                exact_key: e.exact_key.clone(),
            })
            .collect();
        removed.extend(
            self.table
                .removed(self.visible(sql::filter(filter)), None)
                .await?,
        );
        if removed.is_empty() {
            return Ok(removed);
        }
        self.append(WalRecord::DeleteWhere {
            filter: filter.clone(),
        })
        .await?;
        Ok(removed)
    }

    async fn expired_ids(&self, now_ms: i64, limit: usize) -> Result<Vec<String>, StoreError> {
        let mut ids: Vec<String> = self
            .state
            .lock()
            .tail()
            .filter(|e| !e.is_live(now_ms))
            .take(limit)
            .map(|e| e.id.clone())
            .collect();
        let left = limit.saturating_sub(ids.len());
        if left > 0 {
            ids.extend(
                self.table
                    .removed(self.visible(format!("expires_at <= {now_ms}")), Some(left))
                    .await?
                    .into_iter()
                    .map(|r| r.id),
            );
        }
        Ok(ids)
    }

    async fn all_ids(&self) -> Result<Vec<Held>, StoreError> {
        let in_table = self
            .table
            .held(self.visible("true".to_owned()), self.dimension)
            .await?;
        let mut out: Vec<Held> = self
            .state
            .lock()
            .tail()
            .map(|e| Held {
                id: e.id.clone(),
                created_at_ms: e.created_at_ms,
                bytes: e.footprint(self.dimension),
            })
            .collect();
        out.extend(in_table);
        Ok(out)
    }

    fn has_vector_index(&self) -> bool {
        self.has_vector_index.load(Ordering::Relaxed)
    }

    fn resident_index(&self) -> bool {
        self.resident_ready().is_some()
    }

    async fn count_live(&self, now_ms: i64) -> Result<u64, StoreError> {
        let in_tail: Vec<String> = self
            .state
            .lock()
            .tail()
            .filter(|e| e.is_live(now_ms))
            .map(|e| e.id.clone())
            .collect();
        // A flushed entry is in the table before this replica applies the `flushed` record
        // that drops it from the tail: count it once.
        let base = match in_tail.is_empty() {
            true => sql::live(now_ms),
            false => format!("{} AND NOT ({})", sql::live(now_ms), sql::ids_in(&in_tail)),
        };
        let in_table = self.table.count(Some(self.visible(base))).await?;
        Ok((in_tail.len() + in_table) as u64)
    }

    async fn flush(&self) -> Result<(), StoreError> {
        if self.leads().await? {
            self.flush_now().await?;
        }
        Ok(())
    }

    async fn maintain(&self) -> Result<(), StoreError> {
        if let Some(resident) = self.resident_ready() {
            self.metrics
                .resident_entries
                .with_label_values(&[&self.tenant])
                .set(i64::try_from(resident.len()).unwrap_or(i64::MAX));
            self.metrics
                .resident_pending
                .with_label_values(&[&self.tenant])
                .set(i64::try_from(resident.pending_len()).unwrap_or(i64::MAX));
            self.metrics
                .resident_elsewhere
                .with_label_values(&[&self.tenant])
                .set(i64::try_from(resident.elsewhere_len()).unwrap_or(i64::MAX));
        }
        if !self.leads().await? {
            return Ok(());
        }
        if self.flush_due() {
            self.flush_now().await?;
        }
        let interval = Duration::from_millis(self.cfg.maintenance_interval_ms);
        let due = self
            .last_table_maintenance
            .lock()
            .is_none_or(|t| t.elapsed() >= interval);
        if !due {
            return Ok(());
        }
        *self.last_table_maintenance.lock() = Some(Instant::now());
        let _guard = self.flush_lock.lock().await;
        let Some(_turn) = self.write_turn().await? else {
            return Ok(());
        };
        Ok(self.maintain_table().await?)
    }

    async fn shutdown(&self) -> Result<(), StoreError> {
        self.flush().await?;
        if let Log::Redis(log) = &self.log {
            log.release().await?;
        }
        Ok(())
    }
}
