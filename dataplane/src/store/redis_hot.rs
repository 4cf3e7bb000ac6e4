//! Cluster mode's exact-match hot layer: cached answers in Redis, shared by every replica,
//! each key expiring exactly at its entry's TTL. A Redis error is a miss here (the lookup goes
//! on to the entry store), never a failed request.

use std::sync::Arc;

use async_trait::async_trait;
use redis::aio::ConnectionManager;

use super::HotLayer;
use crate::metrics::Metrics;
use semantis_cache::entry::Entry;
use semantis_cache::vector::now_ms;

pub struct RedisHotLayer {
    conn: ConnectionManager,
    metrics: Arc<Metrics>,
}

impl RedisHotLayer {
    pub fn new(conn: ConnectionManager, metrics: Arc<Metrics>) -> Self {
        Self { conn, metrics }
    }

    fn failed(&self, operation: &str, e: &redis::RedisError) {
        tracing::debug!(operation, error = %e, "Redis hot layer unavailable");
        self.metrics
            .cache
            .store_errors
            .with_label_values(&["*", operation])
            .inc();
    }
}

/// `{tenant}` keeps a tenant's keys in one Redis Cluster slot, so SCAN-based clears stay local.
fn key(tenant: &str, exact_key: &str) -> String {
    format!("semantis:{{{tenant}}}:x:{exact_key}")
}

#[async_trait]
impl HotLayer for RedisHotLayer {
    async fn get(&self, tenant: &str, exact_key: &str) -> Option<Arc<Entry>> {
        let got: Result<Option<Vec<u8>>, _> = redis::cmd("GET")
            .arg(key(tenant, exact_key))
            .query_async(&mut self.conn.clone())
            .await;
        match got {
            Ok(Some(bytes)) => {
                let entry: Entry = serde_json::from_slice(&bytes).ok()?;
                entry.is_live(now_ms()).then(|| Arc::new(entry))
            }
            Ok(None) => None,
            Err(e) => {
                self.failed("hot_get", &e);
                None
            }
        }
    }

    async fn put(&self, tenant: &str, entry: Arc<Entry>) {
        let ttl_ms = entry.expires_at_ms.saturating_sub(now_ms());
        if ttl_ms <= 0 {
            return;
        }
        // The vector is not needed to answer an exact hit; leave it out.
        let Ok(bytes) = serde_json::to_vec(&entry.without_vector()) else {
            return;
        };
        let set: Result<(), _> = redis::cmd("SET")
            .arg(key(tenant, &entry.exact_key))
            .arg(bytes)
            .arg("PX")
            .arg(ttl_ms)
            .query_async(&mut self.conn.clone())
            .await;
        if let Err(e) = set {
            self.failed("hot_put", &e);
        }
    }

    async fn remove(&self, tenant: &str, exact_key: &str) {
        let del: Result<i64, _> = redis::cmd("DEL")
            .arg(key(tenant, exact_key))
            .query_async(&mut self.conn.clone())
            .await;
        if let Err(e) = del {
            self.failed("hot_remove", &e);
        }
    }

    async fn clear_tenant(&self, tenant: &str) {
        let pattern = format!("semantis:{{{tenant}}}:x:*");
        let mut cursor: u64 = 0;
        loop {
            let page: Result<(u64, Vec<String>), _> = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut self.conn.clone())
                .await;
            let (next, keys) = match page {
                Ok(p) => p,
                Err(e) => {
                    self.failed("hot_clear", &e);
                    return;
                }
            };
            if !keys.is_empty() {
                let del: Result<i64, _> = redis::cmd("DEL")
                    .arg(&keys)
                    .query_async(&mut self.conn.clone())
                    .await;
                if let Err(e) = del {
                    self.failed("hot_clear", &e);
                    return;
                }
            }
            if next == 0 {
                return;
            }
            cursor = next;
        }
    }
}
