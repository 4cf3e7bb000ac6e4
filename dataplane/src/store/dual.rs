//! Dual writes during an index migration: while a target index version exists, every store
//! lands in the active version and, re-embedded with the target embedder, in the target; every
//! delete goes to both. Reads come from the active version only. `reindex` copies what was
//! stored before the dual writes began, so the target is complete when it is marked ready.

use std::sync::Arc;

use async_trait::async_trait;

use super::lance::LanceEntryStore;
use super::{BackendError, EntryStore};
use crate::embed::Embedder;
use semantis_cache::StoreError;
use semantis_cache::entry::{Candidate, Entry, EntryFilter, Held, Removed};

pub struct DualEntryStore {
    active: Arc<dyn EntryStore>,
    target: Arc<LanceEntryStore>,
    target_embedder: Arc<dyn Embedder>,
}

impl DualEntryStore {
    pub fn new(
        active: Arc<dyn EntryStore>,
        target: Arc<LanceEntryStore>,
        target_embedder: Arc<dyn Embedder>,
    ) -> Self {
        // `reindex` merges rows into the same table; flushing by merge keeps one row per id.
        target.merge_every_flush();
        Self {
            active,
            target,
            target_embedder,
        }
    }
}

#[async_trait]
impl EntryStore for DualEntryStore {
    async fn insert(&self, entry: Arc<Entry>) -> Result<(), StoreError> {
        // Embed first: a target embedder failure then fails the store before anything lands,
        // so the two versions never disagree about an acknowledged entry.
        let mut vectors = self
            .target_embedder
            .embed(std::slice::from_ref(&entry.prompt))
            .await
            .map_err(|e| BackendError::TargetEmbed(e.to_string()))?;
        let vector = vectors
            .pop()
            .ok_or_else(|| BackendError::TargetEmbed("the embedder returned no vector".into()))?;
        let target_entry = Arc::new(Entry {
            vector: Arc::from(vector),
            ..(*entry).clone()
        });
        self.active.insert(entry).await?;
        self.target.insert(target_entry).await
    }

    async fn find_exact(
        &self,
        exact_key: &str,
        now_ms: i64,
    ) -> Result<Option<Arc<Entry>>, StoreError> {
        self.active.find_exact(exact_key, now_ms).await
    }

    async fn search(
        &self,
        scope: &str,
        vector: &[f32],
        limit: usize,
        hit_threshold: f32,
        now_ms: i64,
    ) -> Result<Vec<Candidate>, StoreError> {
        self.active
            .search(scope, vector, limit, hit_threshold, now_ms)
            .await
    }

    async fn delete_ids(&self, ids: &[String]) -> Result<Vec<Removed>, StoreError> {
        let removed = self.active.delete_ids(ids).await?;
        self.target.delete_ids(ids).await?;
        Ok(removed)
    }

    async fn delete_where(&self, filter: &EntryFilter) -> Result<Vec<Removed>, StoreError> {
        let removed = self.active.delete_where(filter).await?;
        self.target.delete_where(filter).await?;
        Ok(removed)
    }

    async fn expired_ids(&self, now_ms: i64, limit: usize) -> Result<Vec<String>, StoreError> {
        self.active.expired_ids(now_ms, limit).await
    }

    async fn all_ids(&self) -> Result<Vec<Held>, StoreError> {
        self.active.all_ids().await
    }

    async fn count_live(&self, now_ms: i64) -> Result<u64, StoreError> {
        self.active.count_live(now_ms).await
    }

    fn has_vector_index(&self) -> bool {
        self.active.has_vector_index()
    }

    fn resident_index(&self) -> bool {
        self.active.resident_index()
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.active.flush().await?;
        self.target.flush().await
    }

    async fn maintain(&self) -> Result<(), StoreError> {
        self.active.maintain().await?;
        self.target.maintain().await
    }

    async fn shutdown(&self) -> Result<(), StoreError> {
        self.active.shutdown().await?;
        self.target.shutdown().await
    }
}
