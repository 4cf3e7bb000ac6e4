//! The in-process exact-match hot layer (embedded mode; Redis replaces it in cluster mode).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use moka::sync::Cache;

use super::HotLayer;
use semantis_cache::entry::Entry;
use semantis_cache::vector::now_ms;

type Key = (Arc<str>, String);

/// Expire each cached answer exactly when its entry's TTL ends: a hit never extends it.
struct EntryExpiry;

impl moka::Expiry<Key, Arc<Entry>> for EntryExpiry {
    fn expire_after_create(&self, _: &Key, entry: &Arc<Entry>, _: Instant) -> Option<Duration> {
        let left = entry.expires_at_ms.saturating_sub(now_ms()).max(0);
        Some(Duration::from_millis(u64::try_from(left).unwrap_or(0)))
    }
}

pub struct InProcessHotLayer {
    cache: Cache<Key, Arc<Entry>>,
}

impl InProcessHotLayer {
    pub fn new(max_entries: u64) -> Self {
        let cache = Cache::builder()
            .max_capacity(max_entries)
            .expire_after(EntryExpiry)
            .support_invalidation_closures()
            .build();
        Self { cache }
    }
}

#[async_trait]
impl HotLayer for InProcessHotLayer {
    async fn get(&self, tenant: &str, exact_key: &str) -> Option<Arc<Entry>> {
        let entry = self.cache.get(&(Arc::from(tenant), exact_key.to_owned()))?;
        entry.is_live(now_ms()).then_some(entry)
    }

    async fn put(&self, tenant: &str, entry: Arc<Entry>) {
        self.cache
            .insert((Arc::from(tenant), entry.exact_key.clone()), entry);
    }

    async fn remove(&self, tenant: &str, exact_key: &str) {
        self.cache
            .invalidate(&(Arc::from(tenant), exact_key.to_owned()));
    }

    async fn remove_id(&self, tenant: &str, id: &str) {
        let tenant: Arc<str> = Arc::from(tenant);
        let id = id.to_owned();
        if let Err(e) = self
            .cache
            .invalidate_entries_if(move |k, e| k.0 == tenant && e.id == id)
        {
            tracing::error!(error = %e, "failed to remove an entry from the hot layer");
        }
    }

    async fn clear_tenant(&self, tenant: &str) {
        let tenant: Arc<str> = Arc::from(tenant);
        // Only fails when closures were not enabled at build time, which they are.
        if let Err(e) = self.cache.invalidate_entries_if(move |k, _| k.0 == tenant) {
            tracing::error!(error = %e, "failed to clear a tenant's hot layer");
        }
    }
}
