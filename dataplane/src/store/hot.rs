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
    /// At most `max_bytes` of entries (by [`Entry::footprint`]): a count alone would let a
    /// tenant of 1 MiB answers fill the pod's memory.
    pub fn new(max_bytes: u64) -> Self {
        let cache = Cache::builder()
            .weigher(|_: &Key, e: &Arc<Entry>| {
                u32::try_from(e.footprint(e.vector.len())).unwrap_or(u32::MAX)
            })
            .max_capacity(max_bytes)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(i: usize, bytes: usize) -> Arc<Entry> {
        Arc::new(Entry {
            id: format!("id-{i}"),
            scope: "s".into(),
            namespace: "ns".into(),
            exact_key: format!("exact-{i}"),
            prompt: format!("prompt {i}"),
            vector: Arc::from(&[][..]),
            response: Arc::from(vec![b'x'; bytes]),
            model: String::new(),
            created_at_ms: 0,
            expires_at_ms: i64::MAX,
            prompt_tokens: 0,
            completion_tokens: 0,
            cost_usd: 0.0,
            metadata: String::new(),
        })
    }

    /// The capacity is bytes: 100 answers of 100 KB in a 1 MB layer leave at most 1 MB (and
    /// so at most 10 answers) held.
    #[tokio::test]
    async fn the_hot_layer_holds_at_most_its_bytes() {
        let hot = InProcessHotLayer::new(1_000_000);
        for i in 0..100 {
            hot.put("t", answer(i, 100_000)).await;
        }
        hot.cache.run_pending_tasks();
        assert!(
            hot.cache.weighted_size() <= 1_000_000,
            "{}",
            hot.cache.weighted_size()
        );
        assert!(hot.cache.entry_count() <= 10, "{}", hot.cache.entry_count());
    }
}
