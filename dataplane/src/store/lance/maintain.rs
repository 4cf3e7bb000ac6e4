//! Background table upkeep, driven by row and flush counts: scalar indexes once rows exist
//! and their refresh once `id_index_max_unindexed_rows` rows are uncovered, compaction and
//! version pruning every `compact_min_fragments` flushes, the ANN index once
//! `index_min_rows` rows exist and its refresh once too many rows are unindexed.

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::LanceEntryStore;
use crate::store::BackendError;

impl LanceEntryStore {
    pub(super) async fn maintain_table(&self) -> Result<(), BackendError> {
        let rows = self.table.count(None).await?;
        if rows > 0 && !self.has_scalar_indexes.load(Ordering::Relaxed) {
            self.table.create_scalar_indexes().await?;
            self.has_scalar_indexes.store(true, Ordering::Relaxed);
        }
        if self.flushes_since_compaction.load(Ordering::Relaxed) >= self.cfg.compact_min_fragments {
            let started = Instant::now();
            self.table.compact().await?;
            // The rewritten fragments on disk before the versions naming the old ones go.
            super::flush::sync_filesystem(&self.cfg.data_dir).await?;
            self.table.prune(self.cfg.prune_older_than_secs).await?;
            self.flushes_since_compaction.store(0, Ordering::Relaxed);
            self.metrics
                .store_compaction_duration
                .with_label_values(&[&self.tenant])
                .observe(started.elapsed().as_secs_f64());
            // Scalar indexes cover new fragments after an index optimise.
            self.table.update_indexes().await?;
        }
        // A hit on an answer kept on disk reads its entry by id, which scans whatever the
        // B-tree index does not cover: keep the B-trees nearly whole between compactions.
        let unindexed_ids = if self.has_scalar_indexes.load(Ordering::Relaxed) {
            self.table.unindexed_ids().await?
        } else {
            None
        };
        let refreshed = unindexed_ids.is_some_and(|n| n >= self.cfg.id_index_max_unindexed_rows);
        if refreshed {
            self.table.update_scalar_indexes().await?;
        }
        self.report_unindexed(
            "id",
            if refreshed {
                self.table.unindexed_ids().await?
            } else {
                unindexed_ids
            },
        );
        if !self.has_vector_index.load(Ordering::Relaxed) && rows >= self.cfg.index_min_rows {
            let started = Instant::now();
            self.table.create_vector_index(rows).await?;
            self.has_vector_index.store(true, Ordering::Relaxed);
            self.metrics
                .store_index_build_duration
                .with_label_values(&[&self.tenant])
                .observe(started.elapsed().as_secs_f64());
        } else if self.has_vector_index.load(Ordering::Relaxed)
            && self
                .table
                .unindexed_rows()
                .await?
                .is_some_and(|n| n >= self.cfg.index_max_unindexed_rows)
        {
            self.table.update_indexes().await?;
        }
        if self.has_vector_index.load(Ordering::Relaxed) {
            self.report_unindexed("vector", self.table.unindexed_rows().await?);
        }
        Ok(())
    }

    fn report_unindexed(&self, index: &str, rows: Option<usize>) {
        if let Some(rows) = rows {
            self.metrics
                .store_unindexed_rows
                .with_label_values(&[&self.tenant, index])
                .set(i64::try_from(rows).unwrap_or(i64::MAX));
        }
    }
}
