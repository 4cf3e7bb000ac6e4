//! LanceDB as the store of record: one table per (tenant, index version).
//!
//! LanceDB is slow at single-row appends and degrades with many small fragments, so a store
//! lands in a durable write-ahead log plus an in-memory tail first. Searches brute-force the
//! tail and ask LanceDB, then merge. The tail is flushed to the table in batches; compaction,
//! version pruning and ANN index builds run in the background, driven by row and flush counts.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

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
use parking_lot::RwLock;
use semantis_contract::StorageConfig;

use super::wal::{Wal, WalEntry, WalRecord};
use super::{EntryStore, StoreError};
use crate::cache::entry::{Candidate, Entry, EntryFilter, Removed, cosine_similarity};
use crate::metrics::Metrics;

const VECTOR_INDEX: &str = "vector_idx";

/// Entries stored but not yet flushed to the table, each with its log segment.
#[derive(Default)]
struct Tail {
    entries: Vec<(u64, Arc<Entry>)>,
    oldest: Option<Instant>,
}

pub struct LanceEntryStore {
    tenant: String,
    name: String,
    table: lancedb::Table,
    schema: SchemaRef,
    wal: Wal,
    tail: RwLock<Tail>,
    /// Serialises flushes with deletes, so a delete can never race an entry into the table.
    flush_lock: tokio::sync::Mutex<()>,
    cfg: StorageConfig,
    flushes_since_compaction: AtomicUsize,
    has_vector_index: AtomicBool,
    has_scalar_indexes: AtomicBool,
    last_table_maintenance: parking_lot::Mutex<Option<Instant>>,
    metrics: Arc<Metrics>,
}

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

fn filter_matches(filter: &EntryFilter, e: &Entry) -> bool {
    match filter {
        EntryFilter::All => true,
        EntryFilter::Scope(s) => &e.scope == s,
        EntryFilter::Namespace(n) => &e.namespace == n,
    }
}

impl LanceEntryStore {
    /// Open (or create) the table and replay its write-ahead log into the tail.
    pub async fn open(
        db: &lancedb::Connection,
        wal_root: &Path,
        tenant: &str,
        table_name: &str,
        dimension: usize,
        cfg: StorageConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StoreError> {
        let schema = entry_schema(dimension);
        let lance = |action, source| StoreError::Lance {
            action,
            table: table_name.to_owned(),
            source: Box::new(source),
        };
        let table = match db.open_table(table_name).execute().await {
            Ok(t) => t,
            Err(lancedb::Error::TableNotFound { .. }) => {
                match db
                    .create_empty_table(table_name, schema.clone())
                    .execute()
                    .await
                {
                    Ok(t) => t,
                    // Another replica created it first.
                    Err(lancedb::Error::TableAlreadyExists { .. }) => db
                        .open_table(table_name)
                        .execute()
                        .await
                        .map_err(|e| lance("open", e))?,
                    Err(e) => return Err(lance("create", e)),
                }
            }
            Err(e) => return Err(lance("open", e)),
        };
        let found = table
            .schema()
            .await
            .map_err(|e| lance("read the schema of", e))?;
        if found
            .field_with_name("vector")
            .map(|f| f.data_type().clone())
            .ok()
            != Some(schema.field(5).data_type().clone())
        {
            return Err(StoreError::Decode {
                table: table_name.to_owned(),
                reason: format!(
                    "the table's vector column does not hold {dimension}-dimensional vectors"
                ),
            });
        }
        let indices = table
            .list_indices()
            .await
            .map_err(|e| lance("list indices of", e))?;
        let has_vector_index = indices.iter().any(|i| i.name == VECTOR_INDEX);
        let has_scalar_indexes = indices.iter().any(|i| i.columns == ["exact_key"]);

        let (wal, replayed) = Wal::open(&wal_root.join(table_name))?;
        if replayed.torn > 0 {
            tracing::warn!(
                table = table_name,
                lines = replayed.torn,
                "skipped torn records at the end of the write-ahead log (unacknowledged writes)"
            );
        }
        let store = Self {
            tenant: tenant.to_owned(),
            name: table_name.to_owned(),
            table,
            schema,
            wal,
            tail: RwLock::new(Tail::default()),
            flush_lock: tokio::sync::Mutex::new(()),
            cfg,
            flushes_since_compaction: AtomicUsize::new(0),
            has_vector_index: AtomicBool::new(has_vector_index),
            has_scalar_indexes: AtomicBool::new(has_scalar_indexes),
            last_table_maintenance: parking_lot::Mutex::new(None),
            metrics,
        };
        store.replay(replayed.records).await?;
        Ok(store)
    }

    /// Re-apply the log: puts go back into the tail (segment 0 sorts before every live
    /// segment, so the next flush takes them); deletes are re-issued, which is idempotent.
    async fn replay(&self, records: Vec<WalRecord>) -> Result<(), StoreError> {
        let mut count = 0usize;
        for record in records {
            match record {
                WalRecord::Put(e) => {
                    let mut tail = self.tail.write();
                    tail.entries.push((0, Arc::new(Entry::from(*e))));
                    tail.oldest.get_or_insert_with(Instant::now);
                    count += 1;
                }
                WalRecord::Delete { ids } => {
                    self.tail
                        .write()
                        .entries
                        .retain(|(_, e)| !ids.contains(&e.id));
                    self.delete_in_table(&ids).await?;
                }
                WalRecord::DeleteWhere { filter } => {
                    let filter = EntryFilter::from(filter);
                    self.tail
                        .write()
                        .entries
                        .retain(|(_, e)| !filter_matches(&filter, e));
                    self.table
                        .delete(filter_sql(&filter).as_str())
                        .await
                        .map_err(|e| self.lance("delete from", e))?;
                }
            }
        }
        if count > 0 {
            tracing::info!(table = %self.name, entries = count, "replayed the write-ahead log");
        }
        Ok(())
    }

    fn lance(&self, action: &'static str, source: lancedb::Error) -> StoreError {
        StoreError::Lance {
            action,
            table: self.name.clone(),
            source: Box::new(source),
        }
    }

    pub fn tail_len(&self) -> usize {
        self.tail.read().entries.len()
    }

    async fn delete_in_table(&self, ids: &[String]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let list = ids.iter().map(|i| quote(i)).collect::<Vec<_>>().join(",");
        self.table
            .delete(format!("id IN ({list})").as_str())
            .await
            .map_err(|e| self.lance("delete from", e))?;
        Ok(())
    }

    fn to_batch(&self, entries: &[Arc<Entry>]) -> Result<RecordBatch, StoreError> {
        let strings = |f: fn(&Entry) -> &str| -> ArrayRef {
            Arc::new(StringArray::from_iter_values(entries.iter().map(|e| f(e))))
        };
        let dim = match self.schema.field(5).data_type() {
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
        RecordBatch::try_new(self.schema.clone(), columns).map_err(|e| StoreError::Decode {
            table: self.name.clone(),
            reason: format!("failed to build a record batch: {e}"),
        })
    }

    fn decode(&self, batch: &RecordBatch) -> Result<Vec<(Entry, Option<f32>)>, StoreError> {
        decode_batch(batch).map_err(|reason| StoreError::Decode {
            table: self.name.clone(),
            reason,
        })
    }

    async fn query_entries(&self, filter: String, limit: usize) -> Result<Vec<Entry>, StoreError> {
        let batches: Vec<RecordBatch> = self
            .table
            .query()
            .only_if(filter)
            .limit(limit)
            .execute()
            .await
            .map_err(|e| self.lance("query", e))?
            .try_collect()
            .await
            .map_err(|e| self.lance("read", e))?;
        let mut out = Vec::new();
        for b in &batches {
            out.extend(self.decode(b)?.into_iter().map(|(e, _)| e));
        }
        Ok(out)
    }

    async fn query_ids(
        &self,
        filter: String,
        limit: Option<usize>,
    ) -> Result<Vec<Removed>, StoreError> {
        let mut q = self
            .table
            .query()
            .only_if(filter)
            .select(Select::columns(&["id", "exact_key"]));
        if let Some(limit) = limit {
            q = q.limit(limit);
        }
        let batches: Vec<RecordBatch> = q
            .execute()
            .await
            .map_err(|e| self.lance("query", e))?
            .try_collect()
            .await
            .map_err(|e| self.lance("read", e))?;
        let mut out = Vec::new();
        for b in &batches {
            let ids = string_column(b, "id").map_err(|reason| StoreError::Decode {
                table: self.name.clone(),
                reason,
            })?;
            let keys = string_column(b, "exact_key").map_err(|reason| StoreError::Decode {
                table: self.name.clone(),
                reason,
            })?;
            for i in 0..b.num_rows() {
                out.push(Removed {
                    id: ids.value(i).to_owned(),
                    exact_key: keys.value(i).to_owned(),
                });
            }
        }
        Ok(out)
    }

    async fn flush_now(&self) -> Result<(), StoreError> {
        let _guard = self.flush_lock.lock().await;
        if self.tail.read().entries.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let sealed = self.wal.seal().await?;
        let batch: Vec<Arc<Entry>> = self
            .tail
            .read()
            .entries
            .iter()
            .filter(|(seg, _)| *seg <= sealed)
            .map(|(_, e)| e.clone())
            .collect();
        if !batch.is_empty() {
            let rb = self.to_batch(&batch)?;
            self.table
                .add(rb)
                .execute()
                .await
                .map_err(|e| self.lance("append to", e))?;
        }
        {
            let mut tail = self.tail.write();
            tail.entries.retain(|(seg, _)| *seg > sealed);
            tail.oldest = (!tail.entries.is_empty()).then(Instant::now);
        }
        self.wal.discard(sealed).await?;
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

    fn flush_due(&self) -> bool {
        let tail = self.tail.read();
        tail.entries.len() >= self.cfg.flush_max_rows
            || tail
                .oldest
                .is_some_and(|t| t.elapsed() >= Duration::from_millis(self.cfg.flush_interval_ms))
    }

    async fn maintain_table(&self) -> Result<(), StoreError> {
        let rows = self
            .table
            .count_rows(None)
            .await
            .map_err(|e| self.lance("count rows of", e))?;
        if rows > 0 && !self.has_scalar_indexes.load(Ordering::Relaxed) {
            for column in ["exact_key", "id", "scope"] {
                self.table
                    .create_index(&[column], Index::BTree(BTreeIndexBuilder::default()))
                    .replace(true)
                    .execute()
                    .await
                    .map_err(|e| self.lance("build a scalar index on", e))?;
            }
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
            // About sqrt(rows) partitions, as LanceDB recommends; PQ with 8-dim sub-vectors.
            let partitions = ((rows as f64).sqrt() as u32).clamp(1, 4096);
            let dim = match self.schema.field(5).data_type() {
                DataType::FixedSizeList(_, d) => u32::try_from(*d).unwrap_or(8),
                _ => 8,
            };
            self.table
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
                .map_err(|e| self.lance("build the vector index of", e))?;
            self.has_vector_index.store(true, Ordering::Relaxed);
            self.metrics
                .store_index_build_duration
                .with_label_values(&[&self.tenant])
                .observe(started.elapsed().as_secs_f64());
            tracing::info!(table = %self.name, rows, partitions, "built the vector index");
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

/// Rows → entries, with `_distance` when the batch came from a vector search.
fn decode_batch(b: &RecordBatch) -> Result<Vec<(Entry, Option<f32>)>, String> {
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
    let distance = b
        .column_by_name("_distance")
        .and_then(|c| c.as_any().downcast_ref::<Float32Array>());
    let mut out = Vec::with_capacity(b.num_rows());
    for i in 0..b.num_rows() {
        let v = vector.value(i);
        let v = v
            .as_any()
            .downcast_ref::<Float32Array>()
            .ok_or("vector items are not f32")?;
        out.push((
            Entry {
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
            },
            distance.map(|d| d.value(i)),
        ));
    }
    Ok(out)
}

#[async_trait]
impl EntryStore for LanceEntryStore {
    async fn insert(&self, entry: Arc<Entry>) -> Result<(), StoreError> {
        let segment = self
            .wal
            .append(&WalRecord::Put(Box::new(WalEntry::from(entry.as_ref()))))
            .await?;
        let mut tail = self.tail.write();
        tail.entries.push((segment, entry));
        tail.oldest.get_or_insert_with(Instant::now);
        Ok(())
    }

    async fn find_exact(
        &self,
        exact_key: &str,
        now_ms: i64,
    ) -> Result<Option<Arc<Entry>>, StoreError> {
        let in_tail = self
            .tail
            .read()
            .entries
            .iter()
            .rev()
            .find(|(_, e)| e.exact_key == exact_key && e.is_live(now_ms))
            .map(|(_, e)| e.clone());
        if in_tail.is_some() {
            return Ok(in_tail);
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
        now_ms: i64,
    ) -> Result<Vec<Candidate>, StoreError> {
        let mut candidates: Vec<Candidate> = self
            .tail
            .read()
            .entries
            .iter()
            .filter(|(_, e)| e.scope == scope && e.is_live(now_ms))
            .map(|(_, e)| Candidate {
                similarity: cosine_similarity(vector, &e.vector),
                entry: e.clone(),
            })
            .collect();
        let mut query = self
            .table
            .vector_search(vector.to_vec())
            .map_err(|e| self.lance("search", e))?
            .column("vector")
            .distance_type(DistanceType::Cosine)
            .only_if(format!(
                "scope = {} AND expires_at > {now_ms}",
                quote(scope)
            ))
            .limit(limit);
        if self.has_vector_index.load(Ordering::Relaxed) {
            // Re-rank the ANN candidates with the full vectors before any threshold check.
            query = query
                .refine_factor(10)
                .nprobes(32)
                .map_err(|e| self.lance("search", e))?;
        }
        let batches: Vec<RecordBatch> = query
            .execute()
            .await
            .map_err(|e| self.lance("search", e))?
            .try_collect()
            .await
            .map_err(|e| self.lance("read search results of", e))?;
        let tail_ids: HashSet<String> = candidates.iter().map(|c| c.entry.id.clone()).collect();
        for b in &batches {
            for (entry, _) in self.decode(b)? {
                if tail_ids.contains(&entry.id) {
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
        let _guard = self.flush_lock.lock().await;
        self.wal
            .append(&WalRecord::Delete { ids: ids.to_vec() })
            .await?;
        let wanted: HashSet<&String> = ids.iter().collect();
        let mut removed = Vec::new();
        self.tail.write().entries.retain(|(_, e)| {
            let hit = wanted.contains(&e.id);
            if hit {
                removed.push(Removed {
                    id: e.id.clone(),
                    exact_key: e.exact_key.clone(),
                });
            }
            !hit
        });
        let list = ids.iter().map(|i| quote(i)).collect::<Vec<_>>().join(",");
        removed.extend(self.query_ids(format!("id IN ({list})"), None).await?);
        self.delete_in_table(ids).await?;
        Ok(removed)
    }

    async fn delete_where(&self, filter: &EntryFilter) -> Result<Vec<Removed>, StoreError> {
        let _guard = self.flush_lock.lock().await;
        self.wal
            .append(&WalRecord::DeleteWhere {
                filter: filter.into(),
            })
            .await?;
        let mut removed = Vec::new();
        self.tail.write().entries.retain(|(_, e)| {
            let hit = filter_matches(filter, e);
            if hit {
                removed.push(Removed {
                    id: e.id.clone(),
                    exact_key: e.exact_key.clone(),
                });
            }
            !hit
        });
        removed.extend(self.query_ids(filter_sql(filter), None).await?);
        self.table
            .delete(filter_sql(filter).as_str())
            .await
            .map_err(|e| self.lance("delete from", e))?;
        Ok(removed)
    }

    async fn expired_ids(&self, now_ms: i64, limit: usize) -> Result<Vec<String>, StoreError> {
        let mut ids: Vec<String> = self
            .tail
            .read()
            .entries
            .iter()
            .filter(|(_, e)| !e.is_live(now_ms))
            .take(limit)
            .map(|(_, e)| e.id.clone())
            .collect();
        let left = limit.saturating_sub(ids.len());
        if left > 0 {
            ids.extend(
                self.query_ids(format!("expires_at <= {now_ms}"), Some(left))
                    .await?
                    .into_iter()
                    .map(|r| r.id),
            );
        }
        Ok(ids)
    }

    async fn all_ids(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let batches: Vec<RecordBatch> = self
            .table
            .query()
            .select(Select::columns(&["id", "created_at"]))
            .execute()
            .await
            .map_err(|e| self.lance("scan", e))?
            .try_collect()
            .await
            .map_err(|e| self.lance("read", e))?;
        let mut out: Vec<(String, i64)> = self
            .tail
            .read()
            .entries
            .iter()
            .map(|(_, e)| (e.id.clone(), e.created_at_ms))
            .collect();
        for b in &batches {
            let err = |reason| StoreError::Decode {
                table: self.name.clone(),
                reason,
            };
            let ids = string_column(b, "id").map_err(err)?;
            let created = column::<Int64Array>(b, "created_at").map_err(err)?;
            for i in 0..b.num_rows() {
                out.push((ids.value(i).to_owned(), created.value(i)));
            }
        }
        Ok(out)
    }

    async fn count_live(&self, now_ms: i64) -> Result<u64, StoreError> {
        let in_tail = self
            .tail
            .read()
            .entries
            .iter()
            .filter(|(_, e)| e.is_live(now_ms))
            .count();
        let in_table = self
            .table
            .count_rows(Some(format!("expires_at > {now_ms}")))
            .await
            .map_err(|e| self.lance("count rows of", e))?;
        Ok((in_tail + in_table) as u64)
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.flush_now().await
    }

    async fn maintain(&self) -> Result<(), StoreError> {
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
        self.maintain_table().await
    }
}
