//! LanceDB as the store of record: one table per (tenant, index version).
//!
//! LanceDB is slow at single-row appends and degrades with many small fragments, so a store
//! lands in a durable write-ahead log plus an in-memory tail first. Searches brute-force the
//! tail and ask LanceDB, then merge. The tail is flushed to the table in batches; compaction,
//! version pruning and ANN index builds run in the background, driven by row and flush counts.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use arrow_array::RecordBatchIterator;
use arrow_array::{
    Array, ArrayRef, BinaryArray, FixedSizeListArray, Float32Array, Float64Array, Int64Array,
    RecordBatch, StringArray, UInt64Array, types::Float32Type,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use async_trait::async_trait;
use futures::TryStreamExt;
use lancedb::DistanceType;
use lancedb::index::Index;
use lancedb::index::scalar::BTreeIndexBuilder;
use lancedb::index::vector::IvfPqIndexBuilder;
use lancedb::query::{ExecutableQuery, QueryBase, Select};
use lancedb::table::{OptimizeAction, OptimizeOptions};
use parking_lot::Mutex;
use semantis_contract::StorageConfig;
use tokio::sync::watch;

use super::redis_log::{Pos, RedisLog, format_stream_id, parse_stream_id};
use super::resident::{ResidentIndex, SearchMode};
use super::wal::{Wal, WalEntry, WalRecord};
use super::{BackendError, EntryStore};
use crate::metrics::Metrics;
use semantis_cache::StoreError;
use semantis_cache::entry::{Candidate, Entry, EntryFilter, Removed};
use semantis_cache::vector::cosine_similarity;

const VECTOR_INDEX: &str = "vector_idx";

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
pub enum Log {
    File(Wal),
    Redis(Arc<RedisLog>),
}

/// A delete that is in the log but not yet applied to the LanceDB table. Until the flush that
/// applies it, reads hide matching table rows (the tail already dropped its own).
#[derive(Debug, Clone)]
enum Pending {
    Ids(Vec<String>),
    Where(EntryFilter),
}

/// This replica's view of the log: entries not yet in the table, and deletes not yet
/// applied to it. Every replica applies the same records in the same order, so any of them
/// can take over flushing.
#[derive(Default)]
struct State {
    tail: Vec<(Pos, Arc<Entry>)>,
    tail_ids: HashSet<String>,
    pending: Vec<(Pos, Pending)>,
    oldest: Option<Instant>,
    /// Cluster mode: records this replica appended and already applied (the follower skips
    /// them when they come back from the stream).
    applied_own: HashSet<Pos>,
}

impl State {
    fn apply_put(&mut self, pos: Pos, entry: Arc<Entry>) {
        if self.tail_ids.insert(entry.id.clone()) {
            self.tail.push((pos, entry));
            self.oldest.get_or_insert_with(Instant::now);
        }
    }

    fn apply_delete(&mut self, pos: Pos, op: Pending) {
        let ids = &mut self.tail_ids;
        self.tail.retain(|(_, e)| {
            let gone = match &op {
                Pending::Ids(list) => list.contains(&e.id),
                Pending::Where(f) => f.matches(e),
            };
            if gone {
                ids.remove(&e.id);
            }
            !gone
        });
        self.pending.push((pos, op));
    }

    /// Everything up to `upto` is in the table now.
    fn apply_flushed(&mut self, upto: Pos) {
        let ids = &mut self.tail_ids;
        self.tail.retain(|(pos, e)| {
            let keep = *pos > upto;
            if !keep {
                ids.remove(&e.id);
            }
            keep
        });
        self.pending.retain(|(pos, _)| *pos > upto);
        self.oldest = (!self.tail.is_empty()).then(Instant::now);
    }

    /// SQL that is true for table rows a pending delete has removed.
    fn hidden_sql(&self) -> Option<String> {
        let parts: Vec<String> = self
            .pending
            .iter()
            .map(|(_, op)| match op {
                Pending::Ids(ids) => format!(
                    "id IN ({})",
                    ids.iter().map(|i| quote(i)).collect::<Vec<_>>().join(",")
                ),
                Pending::Where(f) => format!("({})", filter_sql(f)),
            })
            .collect();
        (!parts.is_empty()).then(|| parts.join(" OR "))
    }
}

pub struct LanceEntryStore {
    tenant: String,
    name: String,
    table: lancedb::Table,
    schema: SchemaRef,
    log: Log,
    state: Mutex<State>,
    /// Cluster mode: the last stream record this replica applied.
    cursor: watch::Sender<Pos>,
    /// One flush or maintenance pass at a time.
    flush_lock: tokio::sync::Mutex<()>,
    /// Appends hold it shared from the log write until the record is applied here; a flush
    /// holds it exclusively while it fixes its position and takes its snapshot. Without it a
    /// flush could cut between an acknowledged write and its tail entry and lose the entry.
    append_gate: tokio::sync::RwLock<()>,
    cfg: StorageConfig,
    flushes_since_compaction: AtomicUsize,
    /// The next flush must merge on id instead of appending: its rows may already be in the
    /// table (first flush after startup or after taking the lease, or after a flush that
    /// failed once LanceDB may have committed). Appending is far cheaper on large tables.
    merge_next: AtomicBool,
    /// Merge on every flush: set on a migration target, whose rows `reindex` also writes.
    always_merge: AtomicBool,
    /// Whether the last lease check found this replica leading.
    leading: AtomicBool,
    has_vector_index: AtomicBool,
    has_scalar_indexes: AtomicBool,
    last_table_maintenance: Mutex<Option<Instant>>,
    /// Every live entry in memory, searched instead of LanceDB once loaded
    /// (`storage.resident_index`).
    resident: Option<Arc<ResidentIndex>>,
    metrics: Arc<Metrics>,
}

/// How long a flush lease lasts without renewal: a dead leader is replaced within this.
const LEASE: Duration = Duration::from_secs(5);

pub fn entry_schema(dimension: usize) -> SchemaRef {
    let dim = i32::try_from(dimension).unwrap_or(i32::MAX);
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("scope", DataType::Utf8, false),
        Field::new("namespace", DataType::Utf8, false),
        Field::new("exact_key", DataType::Utf8, false),
        Field::new("prompt", DataType::Utf8, false),
        Field::new(
            "vector",
            DataType::FixedSizeList(Arc::new(Field::new("item", DataType::Float32, true)), dim),
            false,
        ),
        Field::new("response", DataType::Binary, false),
        Field::new("model", DataType::Utf8, false),
        Field::new("created_at", DataType::Int64, false),
        Field::new("expires_at", DataType::Int64, false),
        Field::new("prompt_tokens", DataType::UInt64, false),
        Field::new("completion_tokens", DataType::UInt64, false),
        Field::new("cost_usd", DataType::Float64, false),
        Field::new("metadata", DataType::Utf8, false),
    ]))
}

/// SQL string literal for a LanceDB filter.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn filter_sql(filter: &EntryFilter) -> String {
    match filter {
        EntryFilter::All => "true".to_owned(),
        EntryFilter::Scope(s) => format!("scope = {}", quote(s)),
        EntryFilter::Namespace(n) => format!("namespace = {}", quote(n)),
    }
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
        let schema = entry_schema(dimension);
        let lance = |action, source| BackendError::Lance {
            action,
            table: table_name.to_owned(),
            source: Box::new(source),
        };
        let table = open_or_create_table(db, table_name, dimension).await?;
        let indices = table
            .list_indices()
            .await
            .map_err(|e| lance("list indices of", e))?;
        let has_vector_index = indices.iter().any(|i| i.name == VECTOR_INDEX);
        let has_scalar_indexes = indices.iter().any(|i| i.columns == ["exact_key"]);

        let (log, replay) = match log {
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
                (Log::File(wal), records)
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
                loop {
                    let batch = log
                        .read_after(&mut follower, after, Duration::from_millis(1))
                        .await?;
                    let Some((last, _)) = batch.last() else { break };
                    after = *last;
                    records.extend(batch);
                }
                (Log::Redis(Arc::new(log)), records)
            }
        };
        let (cursor, _) = watch::channel(0);
        let resident = cfg
            .resident_index
            .then(|| Arc::new(ResidentIndex::new(dimension, cfg.ann_min_scope_entries)));
        let store = Arc::new(Self {
            tenant: tenant.to_owned(),
            name: table_name.to_owned(),
            table,
            schema,
            log,
            state: Mutex::new(State::default()),
            cursor,
            flush_lock: tokio::sync::Mutex::new(()),
            append_gate: tokio::sync::RwLock::new(()),
            cfg,
            flushes_since_compaction: AtomicUsize::new(0),
            merge_next: AtomicBool::new(true),
            always_merge: AtomicBool::new(false),
            leading: AtomicBool::new(false),
            has_vector_index: AtomicBool::new(has_vector_index),
            has_scalar_indexes: AtomicBool::new(has_scalar_indexes),
            last_table_maintenance: Mutex::new(None),
            resident,
            metrics,
        });
        let count = replay.len();
        for (pos, record) in replay {
            store.apply(pos, record).await?;
        }
        if count > 0 {
            tracing::info!(table = %store.name, records = count, "replayed the write-ahead log");
        }
        if let Log::Redis(log) = &store.log {
            Self::spawn_follower(Arc::downgrade(&store), log.clone()).await?;
        }
        if let Some(resident) = &store.resident
            && let Err(e) = resident.spawn_indexer()
        {
            tracing::warn!(table = %store.name, error = %e, "failed to start the resident index's indexer thread; semantic lookups keep querying LanceDB");
            resident.disable();
        }
        Ok(store)
    }

    /// Start filling the resident index from the table, in the background. The caller starts
    /// it once startup's own reads are done: on one core the load (which reads every vector
    /// and builds the graphs) would otherwise slow readiness down threefold.
    pub fn start_resident_load(self: &Arc<Self>) {
        if let Some(resident) = &self.resident {
            Self::spawn_resident_load(Arc::downgrade(self), resident.clone());
        }
    }

    /// Fill the resident index from the table in the background. Log records applied
    /// meanwhile go to it directly; until it is ready, searches go to LanceDB.
    fn spawn_resident_load(store: Weak<Self>, resident: Arc<ResidentIndex>) {
        tokio::spawn(async move {
            let started = Instant::now();
            let result = match store.upgrade() {
                Some(me) => me.load_resident(&resident).await,
                None => return,
            };
            let Some(me) = store.upgrade() else { return };
            match result {
                Ok(()) => {
                    resident.finish_loading();
                    me.metrics
                        .resident_entries
                        .with_label_values(&[&me.tenant])
                        .set(i64::try_from(resident.len()).unwrap_or(i64::MAX));
                    tracing::info!(
                        table = %me.name,
                        entries = resident.len(),
                        seconds = started.elapsed().as_secs_f64(),
                        "resident index loaded; semantic lookups no longer query LanceDB"
                    );
                }
                Err(e) => {
                    // Incomplete, so never searched: free it.
                    resident.disable();
                    tracing::warn!(
                        table = %me.name,
                        error = %e,
                        "failed to load the resident index; semantic lookups keep querying LanceDB"
                    );
                }
            }
        });
    }

    async fn load_resident(&self, resident: &Arc<ResidentIndex>) -> Result<(), BackendError> {
        let mut stream = self
            .table
            .query()
            .execute()
            .await
            .map_err(|e| self.lance("read", e))?;
        while let Some(batch) = stream.try_next().await.map_err(|e| self.lance("read", e))? {
            let entries = self.decode(&batch)?;
            let resident = resident.clone();
            // Graph inserts are CPU work: keep them off the request workers.
            tokio::task::spawn_blocking(move || {
                entries
                    .into_iter()
                    .try_for_each(|e| resident.insert_loaded(Arc::new(e)))
            })
            .await
            .map_err(|e| BackendError::Decode {
                table: self.name.clone(),
                reason: format!("failed to load the resident index: {e}"),
            })??;
        }
        // Ready means every graph is built: until then LanceDB answers, not a scan of
        // everything pending.
        let resident = resident.clone();
        tokio::task::spawn_blocking(move || resident.index_all_pending())
            .await
            .map_err(|e| BackendError::Decode {
                table: self.name.clone(),
                reason: format!("failed to load the resident index: {e}"),
            })??;
        Ok(())
    }

    /// The resident index, when it holds everything.
    fn resident_ready(&self) -> Option<&ResidentIndex> {
        self.resident.as_deref().filter(|r| r.ready())
    }

    /// Apply a log record to the resident index. A failure there must not fail a write
    /// that is already durable: the index is dropped and searches go back to LanceDB.
    fn apply_resident(
        &self,
        f: impl FnOnce(&ResidentIndex) -> Result<(), super::resident::ResidentError>,
    ) {
        if let Some(resident) = &self.resident
            && !resident.disabled()
            && let Err(e) = f(resident)
        {
            resident.disable();
            tracing::error!(table = %self.name, error = %e, "failed to update the resident index; semantic lookups query LanceDB from now on");
        }
    }

    /// Cluster mode: apply every record other replicas append, in stream order.
    async fn spawn_follower(store: Weak<Self>, log: Arc<RedisLog>) -> Result<(), BackendError> {
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
                    Ok(records) => {
                        backoff = Duration::from_millis(50);
                        for (pos, record) in records {
                            let own = me.state.lock().applied_own.remove(&pos);
                            if !own && let Err(e) = me.apply(pos, record).await {
                                tracing::warn!(table = %me.name, error = %e, "failed to apply a log record");
                            }
                            me.cursor.send_replace(pos);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(table = %me.name, error = %e, "failed to follow the log; retrying");
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

    async fn apply(&self, pos: Pos, record: WalRecord) -> Result<(), BackendError> {
        match record {
            WalRecord::Put(e) => {
                let entry = Arc::new(Entry::from(*e));
                self.apply_resident(|r| r.insert(entry.clone()));
                self.state.lock().apply_put(pos, entry);
            }
            WalRecord::Delete { ids } => {
                self.apply_resident(|r| r.remove_ids(&ids));
                self.state.lock().apply_delete(pos, Pending::Ids(ids));
            }
            WalRecord::DeleteWhere { filter } => {
                let filter: EntryFilter = filter.into();
                self.apply_resident(|r| r.remove_where(&filter));
                self.state.lock().apply_delete(pos, Pending::Where(filter));
            }
            WalRecord::Flushed { upto } => {
                let upto = parse_stream_id(&upto).unwrap_or(0);
                // See the rows the leader wrote before dropping them from the tail.
                self.table
                    .checkout_latest()
                    .await
                    .map_err(|e| self.lance("refresh", e))?;
                // An index the leader built since: search it (with re-ranking) from now on.
                if !self.has_vector_index.load(Ordering::Relaxed) {
                    let indices = self
                        .table
                        .list_indices()
                        .await
                        .map_err(|e| self.lance("list indices of", e))?;
                    if indices.iter().any(|i| i.name == VECTOR_INDEX) {
                        self.has_vector_index.store(true, Ordering::Relaxed);
                    }
                }
                self.state.lock().apply_flushed(upto);
            }
        }
        Ok(())
    }

    /// Append a record and apply it here at once (the follower skips it later).
    async fn append(&self, record: WalRecord) -> Result<Pos, BackendError> {
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

    /// Cluster mode: wait until this replica has applied everything appended so far, so a
    /// delete or invalidation sees every store acknowledged before it.
    async fn catch_up(&self) -> Result<(), BackendError> {
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
                table: self.name.clone(),
                reason: "failed to catch up with the log within 2 s".into(),
            }),
        }
    }

    fn lance(&self, action: &'static str, source: lancedb::Error) -> BackendError {
        BackendError::Lance {
            action,
            table: self.name.clone(),
            source: Box::new(source),
        }
    }

    /// Flush by merging on id from now on (a migration target that `reindex` fills too).
    pub fn merge_every_flush(&self) {
        self.always_merge.store(true, Ordering::Relaxed);
    }

    pub fn tail_len(&self) -> usize {
        self.state.lock().tail.len()
    }

    /// `base` with rows hidden by pending deletes taken out.
    fn visible(&self, base: String) -> String {
        match self.state.lock().hidden_sql() {
            Some(hidden) => format!("({base}) AND NOT ({hidden})"),
            None => base,
        }
    }

    fn to_batch(&self, entries: &[Arc<Entry>]) -> Result<RecordBatch, BackendError> {
        entries_to_batch(&self.schema, &self.name, entries)
    }

    fn decode(&self, batch: &RecordBatch) -> Result<Vec<Entry>, BackendError> {
        decode_batch(batch).map_err(|reason| BackendError::Decode {
            table: self.name.clone(),
            reason,
        })
    }

    async fn collect(
        &self,
        stream: Result<lancedb::arrow::SendableRecordBatchStream, lancedb::Error>,
    ) -> Result<Vec<RecordBatch>, BackendError> {
        stream
            .map_err(|e| self.lance("query", e))?
            .try_collect()
            .await
            .map_err(|e| self.lance("read", e))
    }

    async fn query_entries(
        &self,
        filter: String,
        limit: usize,
    ) -> Result<Vec<Entry>, BackendError> {
        let q = self
            .table
            .query()
            .only_if(self.visible(filter))
            .limit(limit);
        let batches = self.collect(q.execute().await).await?;
        let mut out = Vec::new();
        for b in &batches {
            out.extend(self.decode(b)?);
        }
        Ok(out)
    }

    async fn query_removed(
        &self,
        filter: String,
        limit: Option<usize>,
    ) -> Result<Vec<Removed>, BackendError> {
        let mut q = self
            .table
            .query()
            .only_if(self.visible(filter))
            .select(Select::columns(&["id", "exact_key"]));
        if let Some(limit) = limit {
            q = q.limit(limit);
        }
        let batches = self.collect(q.execute().await).await?;
        let mut out = Vec::new();
        for b in &batches {
            let err = |reason| BackendError::Decode {
                table: self.name.clone(),
                reason,
            };
            let ids = string_column(b, "id").map_err(err)?;
            let keys = string_column(b, "exact_key").map_err(err)?;
            for i in 0..b.num_rows() {
                out.push(Removed {
                    id: ids.value(i).to_owned(),
                    exact_key: keys.value(i).to_owned(),
                });
            }
        }
        Ok(out)
    }

    /// Apply the log up to the newest applied position to the table: pending deletes first
    /// (they only concern older entries), then the tail's entries, merged on id so a flush
    /// repeated after a crash never duplicates a row. Only the lease holder calls this.
    async fn flush_now(&self) -> Result<(), BackendError> {
        let _guard = self.flush_lock.lock().await;
        let gate = self.append_gate.write().await;
        let upto = match &self.log {
            Log::File(wal) => {
                if self.state.lock().tail.is_empty() && self.state.lock().pending.is_empty() {
                    return Ok(());
                }
                u128::from(wal.seal().await?)
            }
            Log::Redis(_) => *self.cursor.borrow(),
        };
        let (batch, deletes): (Vec<Arc<Entry>>, Vec<Pending>) = {
            let st = self.state.lock();
            (
                st.tail
                    .iter()
                    .filter(|(pos, _)| *pos <= upto)
                    .map(|(_, e)| e.clone())
                    .collect(),
                st.pending
                    .iter()
                    .filter(|(pos, _)| *pos <= upto)
                    .map(|(_, op)| op.clone())
                    .collect(),
            )
        };
        drop(gate);
        if batch.is_empty() && deletes.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        for op in &deletes {
            let predicate = match op {
                Pending::Ids(ids) => format!(
                    "id IN ({})",
                    ids.iter().map(|i| quote(i)).collect::<Vec<_>>().join(",")
                ),
                Pending::Where(f) => filter_sql(f),
            };
            self.table
                .delete(predicate.as_str())
                .await
                .map_err(|e| self.lance("delete from", e))?;
        }
        if !batch.is_empty() {
            let rb = self.to_batch(&batch)?;
            // Until this flush is recorded, a retry may find these rows already written.
            let merge = self.merge_next.swap(true, Ordering::AcqRel)
                || self.always_merge.load(Ordering::Relaxed);
            if merge {
                let reader = RecordBatchIterator::new(vec![Ok(rb)], self.schema.clone());
                let mut merge = self.table.merge_insert(&["id"]);
                merge.when_not_matched_insert_all();
                merge
                    .execute(Box::new(reader))
                    .await
                    .map_err(|e| self.lance("merge into", e))?;
            } else {
                self.table
                    .add(rb)
                    .execute()
                    .await
                    .map_err(|e| self.lance("append to", e))?;
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
            .inc_by(batch.len() as u64);
        Ok(())
    }

    /// Everything up to `upto` is in the table: drop it here and tell the log.
    async fn record_flushed(&self, upto: Pos) -> Result<(), BackendError> {
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

    fn flush_due(&self) -> bool {
        let st = self.state.lock();
        st.tail.len() >= self.cfg.flush_max_rows
            || !st.pending.is_empty()
            || st
                .oldest
                .is_some_and(|t| t.elapsed() >= Duration::from_millis(self.cfg.flush_interval_ms))
    }

    /// True when this replica may mutate the table: always in embedded mode; in cluster
    /// mode while it holds the flush lease.
    async fn leads(&self) -> Result<bool, BackendError> {
        let leads = match &self.log {
            Log::File(_) => true,
            Log::Redis(log) => log.lead(LEASE).await?,
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

    async fn maintain_table(&self) -> Result<(), BackendError> {
        let rows = self
            .table
            .count_rows(None)
            .await
            .map_err(|e| self.lance("count rows of", e))?;
        if rows > 0 && !self.has_scalar_indexes.load(Ordering::Relaxed) {
            create_scalar_indexes(&self.table, &self.name).await?;
            self.has_scalar_indexes.store(true, Ordering::Relaxed);
        }
        if self.flushes_since_compaction.load(Ordering::Relaxed) >= self.cfg.compact_min_fragments {
            let started = Instant::now();
            self.table
                .optimize(OptimizeAction::Compact {
                    options: Default::default(),
                    remap_options: None,
                })
                .await
                .map_err(|e| self.lance("compact", e))?;
            self.table
                .optimize(OptimizeAction::Prune {
                    older_than: lancedb::table::Duration::try_seconds(
                        i64::try_from(self.cfg.prune_older_than_secs).unwrap_or(i64::MAX),
                    ),
                    delete_unverified: None,
                    error_if_tagged_old_versions: None,
                })
                .await
                .map_err(|e| self.lance("prune old versions of", e))?;
            self.flushes_since_compaction.store(0, Ordering::Relaxed);
            self.metrics
                .store_compaction_duration
                .with_label_values(&[&self.tenant])
                .observe(started.elapsed().as_secs_f64());
            // Scalar indexes cover new fragments after an index optimise.
            self.table
                .optimize(OptimizeAction::Index(OptimizeOptions::default()))
                .await
                .map_err(|e| self.lance("update the indexes of", e))?;
        }
        if !self.has_vector_index.load(Ordering::Relaxed) && rows >= self.cfg.index_min_rows {
            let started = Instant::now();
            create_vector_index(&self.table, &self.name, &self.schema, rows).await?;
            self.has_vector_index.store(true, Ordering::Relaxed);
            self.metrics
                .store_index_build_duration
                .with_label_values(&[&self.tenant])
                .observe(started.elapsed().as_secs_f64());
        } else if self.has_vector_index.load(Ordering::Relaxed) {
            let stats = self
                .table
                .index_stats(VECTOR_INDEX)
                .await
                .map_err(|e| self.lance("read index statistics of", e))?;
            if stats.is_some_and(|s| s.num_unindexed_rows >= self.cfg.index_max_unindexed_rows) {
                self.table
                    .optimize(OptimizeAction::Index(OptimizeOptions::default()))
                    .await
                    .map_err(|e| self.lance("update the vector index of", e))?;
            }
        }
        Ok(())
    }
}

/// Append the `(id, created_at)` pairs of `batches` (selected with those two columns) to `out`.
fn push_ids_and_creation_times(
    table: &str,
    batches: &[RecordBatch],
    out: &mut Vec<(String, i64)>,
) -> Result<(), BackendError> {
    for b in batches {
        let err = |reason| BackendError::Decode {
            table: table.to_owned(),
            reason,
        };
        let ids = string_column(b, "id").map_err(err)?;
        let created = column::<Int64Array>(b, "created_at").map_err(err)?;
        for i in 0..b.num_rows() {
            out.push((ids.value(i).to_owned(), created.value(i)));
        }
    }
    Ok(())
}

fn string_column<'a>(b: &'a RecordBatch, name: &str) -> Result<&'a StringArray, String> {
    b.column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<StringArray>())
        .ok_or_else(|| format!("column `{name}` is missing or not a string"))
}

fn column<'a, T: 'static>(b: &'a RecordBatch, name: &str) -> Result<&'a T, String> {
    b.column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| format!("column `{name}` is missing or of the wrong type"))
}

/// Entries → one record batch of `schema`.
fn entries_to_batch(
    schema: &SchemaRef,
    table: &str,
    entries: &[Arc<Entry>],
) -> Result<RecordBatch, BackendError> {
    let strings = |f: fn(&Entry) -> &str| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(entries.iter().map(|e| f(e))))
    };
    let dim = match schema.field(5).data_type() {
        DataType::FixedSizeList(_, d) => *d,
        _ => 0,
    };
    let vectors = FixedSizeListArray::from_iter_primitive::<Float32Type, _, _>(
        entries
            .iter()
            .map(|e| Some(e.vector.iter().copied().map(Some).collect::<Vec<_>>())),
        dim,
    );
    let columns: Vec<ArrayRef> = vec![
        strings(|e| &e.id),
        strings(|e| &e.scope),
        strings(|e| &e.namespace),
        strings(|e| &e.exact_key),
        strings(|e| &e.prompt),
        Arc::new(vectors),
        Arc::new(BinaryArray::from_iter_values(
            entries.iter().map(|e| e.response.as_ref()),
        )),
        strings(|e| &e.model),
        Arc::new(Int64Array::from_iter_values(
            entries.iter().map(|e| e.created_at_ms),
        )),
        Arc::new(Int64Array::from_iter_values(
            entries.iter().map(|e| e.expires_at_ms),
        )),
        Arc::new(UInt64Array::from_iter_values(
            entries.iter().map(|e| e.prompt_tokens),
        )),
        Arc::new(UInt64Array::from_iter_values(
            entries.iter().map(|e| e.completion_tokens),
        )),
        Arc::new(Float64Array::from_iter_values(
            entries.iter().map(|e| e.cost_usd),
        )),
        strings(|e| &e.metadata),
    ];
    RecordBatch::try_new(schema.clone(), columns).map_err(|e| BackendError::Decode {
        table: table.to_owned(),
        reason: format!("failed to build a record batch: {e}"),
    })
}

/// The LanceDB table of one (tenant, index version).
pub fn table_name(tenant: &str, fingerprint: &str) -> String {
    format!("{tenant}--{}", &fingerprint[..fingerprint.len().min(16)])
}

fn lance_error(table: &str, action: &'static str) -> impl FnOnce(lancedb::Error) -> BackendError {
    let table = table.to_owned();
    move |source| BackendError::Lance {
        action,
        table,
        source: Box::new(source),
    }
}

/// Open `name`, creating it empty when missing, and check it holds `dimension`-sized vectors.
pub async fn open_or_create_table(
    db: &lancedb::Connection,
    name: &str,
    dimension: usize,
) -> Result<lancedb::Table, BackendError> {
    let schema = entry_schema(dimension);
    let table = match db.open_table(name).execute().await {
        Ok(t) => t,
        Err(lancedb::Error::TableNotFound { .. }) => {
            match db.create_empty_table(name, schema.clone()).execute().await {
                Ok(t) => t,
                // Another replica (or `reindex`) created it first.
                Err(lancedb::Error::TableAlreadyExists { .. }) => db
                    .open_table(name)
                    .execute()
                    .await
                    .map_err(lance_error(name, "open"))?,
                Err(e) => return Err(lance_error(name, "create")(e)),
            }
        }
        Err(e) => return Err(lance_error(name, "open")(e)),
    };
    let found = table
        .schema()
        .await
        .map_err(lance_error(name, "read the schema of"))?;
    if found
        .field_with_name("vector")
        .map(|f| f.data_type().clone())
        .ok()
        != Some(schema.field(5).data_type().clone())
    {
        return Err(BackendError::Decode {
            table: name.to_owned(),
            reason: format!(
                "the table's vector column does not hold {dimension}-dimensional vectors"
            ),
        });
    }
    Ok(table)
}

async fn create_scalar_indexes(table: &lancedb::Table, name: &str) -> Result<(), BackendError> {
    for column in ["exact_key", "id", "scope"] {
        table
            .create_index(&[column], Index::BTree(BTreeIndexBuilder::default()))
            .replace(true)
            .execute()
            .await
            .map_err(lance_error(name, "build a scalar index on"))?;
    }
    Ok(())
}

async fn create_vector_index(
    table: &lancedb::Table,
    name: &str,
    schema: &SchemaRef,
    rows: usize,
) -> Result<(), BackendError> {
    // About sqrt(rows) partitions, as LanceDB recommends; PQ with 8-dim sub-vectors.
    let partitions = ((rows as f64).sqrt() as u32).clamp(1, 4096);
    let dim = match schema.field(5).data_type() {
        DataType::FixedSizeList(_, d) => u32::try_from(*d).unwrap_or(8),
        _ => 8,
    };
    table
        .create_index(
            &["vector"],
            Index::IvfPq(
                IvfPqIndexBuilder::default()
                    .distance_type(DistanceType::Cosine)
                    .num_partitions(partitions)
                    .num_sub_vectors((dim / 8).max(1)),
            ),
        )
        .name(VECTOR_INDEX.to_owned())
        .replace(true)
        .execute()
        .await
        .map_err(lance_error(name, "build the vector index of"))?;
    tracing::info!(table = %name, rows, partitions, "built the vector index");
    Ok(())
}

/// Direct access to one table, outside any write-ahead log: what `reindex` reads from the
/// active version and writes into the target. Writes merge on id, so they are idempotent and
/// safe next to a serving replica that flushes into the same table.
pub struct TableAccess {
    name: String,
    table: lancedb::Table,
    schema: SchemaRef,
}

impl TableAccess {
    pub async fn open(
        db: &lancedb::Connection,
        name: &str,
        dimension: usize,
    ) -> Result<Self, BackendError> {
        Ok(Self {
            name: name.to_owned(),
            table: open_or_create_table(db, name, dimension).await?,
            schema: entry_schema(dimension),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Move to the table's latest version: a serving replica may have committed since, and a
    /// commit on a stale version is refused as a conflict.
    async fn refresh(&self) -> Result<(), BackendError> {
        self.table
            .checkout_latest()
            .await
            .map_err(lance_error(&self.name, "check out the latest version of"))
    }

    pub async fn count_live(&self, now_ms: i64) -> Result<u64, BackendError> {
        let n = self
            .table
            .count_rows(Some(format!("expires_at > {now_ms}")))
            .await
            .map_err(lance_error(&self.name, "count rows of"))?;
        Ok(n as u64)
    }

    /// Ids of every row, with their creation times.
    pub async fn ids(&self) -> Result<Vec<(String, i64)>, BackendError> {
        let batches: Vec<RecordBatch> = self
            .table
            .query()
            .select(Select::columns(&["id", "created_at"]))
            .execute()
            .await
            .map_err(lance_error(&self.name, "query"))?
            .try_collect()
            .await
            .map_err(lance_error(&self.name, "read"))?;
        let mut out = Vec::new();
        push_ids_and_creation_times(&self.name, &batches, &mut out)?;
        Ok(out)
    }

    /// Stream the entries that are live at `now_ms`, a batch at a time (memory stays bounded
    /// by LanceDB's batch size, not the table's).
    pub async fn live_entries(
        &self,
        now_ms: i64,
    ) -> Result<impl futures::Stream<Item = Result<Vec<Entry>, BackendError>> + use<>, BackendError>
    {
        let name = self.name.clone();
        let stream = self
            .table
            .query()
            .only_if(format!("expires_at > {now_ms}"))
            .execute()
            .await
            .map_err(lance_error(&self.name, "query"))?;
        Ok(futures::StreamExt::map(stream, move |batch| {
            let batch = batch.map_err(lance_error(&name, "read"))?;
            decode_batch(&batch).map_err(|reason| BackendError::Decode {
                table: name.clone(),
                reason,
            })
        }))
    }

    /// Insert entries whose id is not in the table yet.
    pub async fn merge(&self, entries: &[Arc<Entry>]) -> Result<(), BackendError> {
        if entries.is_empty() {
            return Ok(());
        }
        self.refresh().await?;
        let rb = entries_to_batch(&self.schema, &self.name, entries)?;
        let reader = RecordBatchIterator::new(vec![Ok(rb)], self.schema.clone());
        let mut merge = self.table.merge_insert(&["id"]);
        merge.when_not_matched_insert_all();
        merge
            .execute(Box::new(reader))
            .await
            .map_err(lance_error(&self.name, "merge into"))?;
        Ok(())
    }

    /// Make every id appear once. A merge racing another merge of the same new id (a serving
    /// replica's flush and `reindex`) can commit both rows; keep one of them.
    pub async fn dedupe(&self) -> Result<usize, BackendError> {
        self.refresh().await?;
        let mut seen = HashSet::new();
        let dupes: Vec<String> = self
            .ids()
            .await?
            .into_iter()
            .filter_map(|(id, _)| (!seen.insert(id.clone())).then_some(id))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        if dupes.is_empty() {
            return Ok(0);
        }
        let mut keep: Vec<Arc<Entry>> = Vec::new();
        for chunk in dupes.chunks(512) {
            let filter = format!(
                "id IN ({})",
                chunk.iter().map(|i| quote(i)).collect::<Vec<_>>().join(",")
            );
            let batches: Vec<RecordBatch> = self
                .table
                .query()
                .only_if(filter)
                .execute()
                .await
                .map_err(lance_error(&self.name, "query"))?
                .try_collect()
                .await
                .map_err(lance_error(&self.name, "read"))?;
            let mut once = HashSet::new();
            for b in &batches {
                let rows = decode_batch(b).map_err(|reason| BackendError::Decode {
                    table: self.name.clone(),
                    reason,
                })?;
                keep.extend(
                    rows.into_iter()
                        .filter(|e| once.insert(e.id.clone()))
                        .map(Arc::new),
                );
            }
        }
        self.delete_ids(&dupes).await?;
        self.merge(&keep).await?;
        Ok(dupes.len())
    }

    pub async fn delete_ids(&self, ids: &[String]) -> Result<(), BackendError> {
        for chunk in ids.chunks(512) {
            let predicate = format!(
                "id IN ({})",
                chunk.iter().map(|i| quote(i)).collect::<Vec<_>>().join(",")
            );
            self.table
                .delete(predicate.as_str())
                .await
                .map_err(lance_error(&self.name, "delete from"))?;
        }
        Ok(())
    }

    /// Scalar indexes always, the ANN index once the table holds `index_min_rows`.
    /// Returns whether the ANN index exists afterwards.
    pub async fn build_indexes(&self, cfg: &StorageConfig) -> Result<bool, BackendError> {
        self.refresh().await?;
        let rows = self
            .table
            .count_rows(None)
            .await
            .map_err(lance_error(&self.name, "count rows of"))?;
        if rows == 0 {
            return Ok(false);
        }
        self.table
            .optimize(OptimizeAction::Compact {
                options: Default::default(),
                remap_options: None,
            })
            .await
            .map_err(lance_error(&self.name, "compact"))?;
        create_scalar_indexes(&self.table, &self.name).await?;
        if rows >= cfg.index_min_rows {
            create_vector_index(&self.table, &self.name, &self.schema, rows).await?;
            return Ok(true);
        }
        Ok(false)
    }
}

/// Rows → entries.
fn decode_batch(b: &RecordBatch) -> Result<Vec<Entry>, String> {
    let id = string_column(b, "id")?;
    let scope = string_column(b, "scope")?;
    let namespace = string_column(b, "namespace")?;
    let exact_key = string_column(b, "exact_key")?;
    let prompt = string_column(b, "prompt")?;
    let vector = column::<FixedSizeListArray>(b, "vector")?;
    let response = column::<BinaryArray>(b, "response")?;
    let model = string_column(b, "model")?;
    let created = column::<Int64Array>(b, "created_at")?;
    let expires = column::<Int64Array>(b, "expires_at")?;
    let ptok = column::<UInt64Array>(b, "prompt_tokens")?;
    let ctok = column::<UInt64Array>(b, "completion_tokens")?;
    let cost = column::<Float64Array>(b, "cost_usd")?;
    let metadata = string_column(b, "metadata")?;
    let mut out = Vec::with_capacity(b.num_rows());
    for i in 0..b.num_rows() {
        let v = vector.value(i);
        let v = v
            .as_any()
            .downcast_ref::<Float32Array>()
            .ok_or("vector items are not f32")?;
        out.push(Entry {
            id: id.value(i).to_owned(),
            scope: scope.value(i).to_owned(),
            namespace: namespace.value(i).to_owned(),
            exact_key: exact_key.value(i).to_owned(),
            prompt: prompt.value(i).to_owned(),
            vector: Arc::from(v.values().as_ref()),
            response: Arc::from(response.value(i)),
            model: model.value(i).to_owned(),
            created_at_ms: created.value(i),
            expires_at_ms: expires.value(i),
            prompt_tokens: ptok.value(i),
            completion_tokens: ctok.value(i),
            cost_usd: cost.value(i),
            metadata: metadata.value(i).to_owned(),
        });
    }
    Ok(out)
}

#[async_trait]
impl EntryStore for LanceEntryStore {
    async fn insert(&self, entry: Arc<Entry>) -> Result<(), StoreError> {
        self.append(WalRecord::Put(Box::new(WalEntry::from(entry.as_ref()))))
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
            .tail
            .iter()
            .rev()
            .find(|(_, e)| e.exact_key == exact_key && e.is_live(now_ms))
            .map(|(_, e)| e.clone());
        if in_tail.is_some() {
            return Ok(in_tail);
        }
        if let Some(resident) = self.resident_ready() {
            return Ok(resident.find_exact(exact_key, now_ms));
        }
        let found = self
            .query_entries(
                format!("exact_key = {} AND expires_at > {now_ms}", quote(exact_key)),
                1,
            )
            .await?;
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
            return Ok(resident
                .search_with(scope, vector, limit, now_ms, mode)
                .map_err(BackendError::from)?);
        }
        let mut candidates: Vec<Candidate> = self
            .state
            .lock()
            .tail
            .iter()
            .filter(|(_, e)| e.scope == scope && e.is_live(now_ms))
            .map(|(_, e)| Candidate {
                similarity: cosine_similarity(vector, &e.vector),
                entry: e.clone(),
            })
            .collect();
        let filter = self.visible(format!(
            "scope = {} AND expires_at > {now_ms}",
            quote(scope)
        ));
        let mut query = self
            .table
            .vector_search(vector.to_vec())
            .map_err(|e| self.lance("search", e))?
            .column("vector")
            .distance_type(DistanceType::Cosine)
            .only_if(filter)
            .limit(limit);
        if self.has_vector_index.load(Ordering::Relaxed) {
            // Re-rank the ANN candidates with the full vectors before any threshold check.
            query = query
                .refine_factor(10)
                .nprobes(32)
                .map_err(|e| self.lance("search", e))?;
        }
        let batches = self.collect(query.execute().await).await?;
        let in_tail: HashSet<String> = candidates.iter().map(|c| c.entry.id.clone()).collect();
        for b in &batches {
            for entry in self.decode(b)? {
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
            .tail
            .iter()
            .filter(|(_, e)| wanted.contains(&e.id))
            .map(|(_, e)| Removed {
                id: e.id.clone(),
                exact_key: e.exact_key.clone(),
            })
            .collect();
        let list = ids.iter().map(|i| quote(i)).collect::<Vec<_>>().join(",");
        for r in self.query_removed(format!("id IN ({list})"), None).await? {
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
            .tail
            .iter()
            .filter(|(_, e)| filter.matches(e))
            .map(|(_, e)| Removed {
                id: e.id.clone(),
                exact_key: e.exact_key.clone(),
            })
            .collect();
        removed.extend(self.query_removed(filter_sql(filter), None).await?);
        if removed.is_empty() {
            return Ok(removed);
        }
        self.append(WalRecord::DeleteWhere {
            filter: filter.into(),
        })
        .await?;
        Ok(removed)
    }

    async fn expired_ids(&self, now_ms: i64, limit: usize) -> Result<Vec<String>, StoreError> {
        let mut ids: Vec<String> = self
            .state
            .lock()
            .tail
            .iter()
            .filter(|(_, e)| !e.is_live(now_ms))
            .take(limit)
            .map(|(_, e)| e.id.clone())
            .collect();
        let left = limit.saturating_sub(ids.len());
        if left > 0 {
            ids.extend(
                self.query_removed(format!("expires_at <= {now_ms}"), Some(left))
                    .await?
                    .into_iter()
                    .map(|r| r.id),
            );
        }
        Ok(ids)
    }

    async fn all_ids(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let q = self
            .table
            .query()
            .only_if(self.visible("true".to_owned()))
            .select(Select::columns(&["id", "created_at"]));
        let batches = self.collect(q.execute().await).await?;
        let mut out: Vec<(String, i64)> = self
            .state
            .lock()
            .tail
            .iter()
            .map(|(_, e)| (e.id.clone(), e.created_at_ms))
            .collect();
        push_ids_and_creation_times(&self.name, &batches, &mut out)?;
        Ok(out)
    }

    fn has_vector_index(&self) -> bool {
        self.has_vector_index.load(Ordering::Relaxed)
    }

    fn resident_index(&self) -> bool {
        self.resident_ready().is_some()
    }

    async fn count_live(&self, now_ms: i64) -> Result<u64, StoreError> {
        let in_tail = self
            .state
            .lock()
            .tail
            .iter()
            .filter(|(_, e)| e.is_live(now_ms))
            .count();
        let in_table = self
            .table
            .count_rows(Some(self.visible(format!("expires_at > {now_ms}"))))
            .await
            .map_err(|e| self.lance("count rows of", e))?;
        Ok((in_tail + in_table) as u64)
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
