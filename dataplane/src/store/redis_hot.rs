//! Cluster mode's exact-match hot layer: cached answers in Redis, shared by every replica,
//! each key expiring exactly at its entry's TTL. A Redis error is a miss here (the lookup goes
//! on to the entry store), never a failed request.
//!
//! A removal leaves a tombstone for [`TOMBSTONE_MS`] instead of deleting the key: a replica
//! that has not applied the delete yet may still read the entry from its own tail and try to
//! write it back, and a put never replaces a tombstone. Each copy also records its entry id
//! (`i:<id>` → exact key), so a DELETE that finds no entry can still clear a copy.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::ConnectionManager;

use super::HotLayer;
use crate::metrics::Metrics;
use crate::upstream::Breaker;
use semantis_cache::entry::Entry;
use semantis_cache::vector::now_ms;

pub struct RedisHotLayer {
    conn: ConnectionManager,
    metrics: Arc<Metrics>,
    /// Reads and copies skip Redis for a second after one fails or is late: a hung Redis
    /// would otherwise hold every lookup for the connection's whole reply deadline. Removals
    /// never skip it (a tombstone must land).
    breaker: Breaker,
}

/// How long a lookup waits for the hot layer before it reads the entry store instead.
const READ_DEADLINE: Duration = Duration::from_millis(250);

impl RedisHotLayer {
    pub fn new(conn: ConnectionManager, metrics: Arc<Metrics>) -> Self {
        Self {
            conn,
            metrics,
            breaker: Breaker::new(1, Duration::from_secs(1)),
        }
    }

    /// `call` within [`READ_DEADLINE`], unless the breaker is open; `None` on any failure.
    async fn bounded<T>(
        &self,
        operation: &str,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Option<T> {
        if !self.breaker.allows() {
            return None;
        }
        match tokio::time::timeout(READ_DEADLINE, call).await {
            Ok(Ok(v)) => {
                self.breaker.success();
                Some(v)
            }
            Ok(Err(e)) => {
                self.breaker.failure();
                self.failed(operation, &e);
                None
            }
            Err(_) => {
                self.breaker.failure();
                tracing::debug!(operation, "Redis hot layer did not answer in time");
                self.metrics
                    .cache
                    .store_errors
                    .with_label_values(&["*", operation])
                    .inc();
                None
            }
        }
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

fn id_key(tenant: &str, id: &str) -> String {
    format!("semantis:{{{tenant}}}:i:{id}")
}

/// What a removed key holds (never valid JSON for an entry).
const TOMBSTONE: &[u8] = b"-";
/// How long a tombstone outlives its removal: longer than a healthy follower's lag.
pub const TOMBSTONE_MS: i64 = 60_000;

/// Set the copy and its id key unless the copy's key holds a tombstone.
const PUT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[4] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[2])
return 1
";

#[async_trait]
impl HotLayer for RedisHotLayer {
    async fn get(&self, tenant: &str, exact_key: &str) -> Option<Arc<Entry>> {
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("GET");
        cmd.arg(key(tenant, exact_key));
        let get = cmd.query_async::<Option<Vec<u8>>>(&mut conn);
        match self.bounded("hot_get", get).await? {
            Some(bytes) if bytes == TOMBSTONE => None,
            Some(bytes) => {
                let entry: Entry = serde_json::from_slice(&bytes).ok()?;
                entry.is_live(now_ms()).then(|| Arc::new(entry))
            }
            None => None,
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
        // A copy skipped is only a slower next lookup. One that lands late is still ordered
        // before any later removal on the same connection, and never replaces a tombstone.
        let mut conn = self.conn.clone();
        let script = redis::Script::new(PUT);
        let mut invocation = script.key(key(tenant, &entry.exact_key));
        invocation
            .key(id_key(tenant, &entry.id))
            .arg(bytes)
            .arg(ttl_ms)
            .arg(&entry.exact_key)
            .arg(TOMBSTONE);
        let set = invocation.invoke_async::<i64>(&mut conn);
        let _ = self.bounded("hot_put", set).await;
    }

    async fn remove(&self, tenant: &str, exact_key: &str) {
        let set: Result<(), _> = redis::cmd("SET")
            .arg(key(tenant, exact_key))
            .arg(TOMBSTONE)
            .arg("PX")
            .arg(TOMBSTONE_MS)
            .query_async(&mut self.conn.clone())
            .await;
        if let Err(e) = set {
            self.failed("hot_remove", &e);
        }
    }

    async fn remove_id(&self, tenant: &str, id: &str) {
        let found: Result<Option<String>, _> = redis::cmd("GETDEL")
            .arg(id_key(tenant, id))
            .query_async(&mut self.conn.clone())
            .await;
        match found {
            Ok(Some(exact_key)) => self.remove(tenant, &exact_key).await,
            Ok(None) => {}
            Err(e) => self.failed("hot_remove", &e),
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
                let mut pipe = redis::pipe();
                for k in &keys {
                    pipe.cmd("SET")
                        .arg(k)
                        .arg(TOMBSTONE)
                        .arg("PX")
                        .arg(TOMBSTONE_MS)
                        .ignore();
                }
                let set: Result<(), _> = pipe.query_async(&mut self.conn.clone()).await;
                if let Err(e) = set {
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
