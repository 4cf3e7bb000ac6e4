//! Layers around any [`Embedder`]: [`Batched`] merges concurrent requests into one provider
//! call, [`Cached`] remembers vectors by text (per embedder, so per fingerprint).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use moka::future::Cache;
use tokio::sync::{mpsc, oneshot};

use super::{EmbedError, Embedder};
use crate::metrics::Metrics;
use semantis_cache::vector::short_hash;

type Job = (String, oneshot::Sender<Result<Vec<f32>, EmbedError>>);

/// Requests that arrive while a call is in flight ride together in the next call: no added
/// latency at low load, fewer and larger calls at high load.
pub struct Batched {
    inner: Arc<dyn Embedder>,
    tx: mpsc::Sender<Job>,
}

impl Batched {
    /// `workers` calls may be in flight at once (1 for an in-process model).
    pub fn new(
        inner: Arc<dyn Embedder>,
        max_batch: usize,
        workers: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (tx, rx) = mpsc::channel::<Job>(max_batch.max(1) * 4);
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        for _ in 0..workers.max(1) {
            let (inner, rx, metrics) = (inner.clone(), rx.clone(), metrics.clone());
            tokio::spawn(async move {
                loop {
                    let mut jobs: Vec<Job> = Vec::new();
                    {
                        let mut rx = rx.lock().await;
                        if rx.recv_many(&mut jobs, max_batch.max(1)).await == 0 {
                            return;
                        }
                    }
                    metrics
                        .embed_batch_size
                        .with_label_values(&[inner.provider()])
                        .observe(jobs.len() as f64);
                    let texts: Vec<String> = jobs.iter().map(|(t, _)| t.clone()).collect();
                    let results = embed_each(inner.as_ref(), &texts).await;
                    for ((_, reply), result) in jobs.into_iter().zip(results) {
                        let _ = reply.send(result);
                    }
                }
            });
        }
        Self { inner, tx }
    }
}

/// One result per text. A batch refused because of some of its texts (another tenant's
/// over-long prompt, say) is split in halves until each refused text stands alone: it fails by
/// itself and the texts that rode with it are embedded.
async fn embed_each(inner: &dyn Embedder, texts: &[String]) -> Vec<Result<Vec<f32>, EmbedError>> {
    match inner.embed(texts).await {
        Ok(vectors) => vectors.into_iter().map(Ok).collect(),
        Err(EmbedError::Rejected { .. }) if texts.len() > 1 => {
            let (a, b) = texts.split_at(texts.len() / 2);
            let mut out = Box::pin(embed_each(inner, a)).await;
            out.extend(Box::pin(embed_each(inner, b)).await);
            out
        }
        Err(e @ EmbedError::Rejected { .. }) => vec![Err(e); texts.len()],
        Err(e) => {
            let e = EmbedError::Unavailable {
                provider: inner.provider(),
                reason: e.to_string(),
            };
            vec![Err(e); texts.len()]
        }
    }
}

#[async_trait]
impl Embedder for Batched {
    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let mut waiting = Vec::with_capacity(texts.len());
        for t in texts {
            let (reply, rx) = oneshot::channel();
            self.tx
                .send((t.clone(), reply))
                .await
                .map_err(|_| EmbedError::Stopped)?;
            waiting.push(rx);
        }
        let mut out = Vec::with_capacity(waiting.len());
        for rx in waiting {
            out.push(rx.await.map_err(|_| EmbedError::Stopped)??);
        }
        Ok(out)
    }

    fn dimension(&self) -> usize {
        self.inner.dimension()
    }

    fn provider(&self) -> &'static str {
        self.inner.provider()
    }

    fn healthy(&self) -> bool {
        self.inner.healthy()
    }

    fn window(&self, text: &str) -> Option<usize> {
        self.inner.window(text)
    }
}

/// The embedding cache: an in-process tier, and in cluster mode a Redis tier shared by the
/// replicas, keyed by embedder fingerprint and a hash of (tenant, text). The same text is
/// embedded once per TTL and tenant: sharing across tenants would let one time another's
/// questions. Redis failures only cost the shared tier, never the call.
pub struct Cached {
    inner: Arc<dyn Embedder>,
    cache: Cache<String, Arc<[f32]>>,
    redis: Option<(redis::aio::ConnectionManager, String)>,
    ttl: Duration,
    metrics: Arc<Metrics>,
}

impl Cached {
    /// `redis`: a connection and the embedder fingerprint that prefixes the keys.
    pub fn new(
        inner: Arc<dyn Embedder>,
        entries: u64,
        ttl: Duration,
        redis: Option<(redis::aio::ConnectionManager, String)>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let cache = Cache::builder()
            .max_capacity(entries)
            .time_to_live(ttl)
            .build();
        Self {
            inner,
            cache,
            redis,
            ttl,
            metrics,
        }
    }

    fn redis_key(fingerprint: &str, text_hash: &str) -> String {
        format!("semantis:emb:{fingerprint}:{text_hash}")
    }

    async fn redis_get(&self, text_hash: &str) -> Option<Vec<f32>> {
        let (conn, fp) = self.redis.as_ref()?;
        let bytes: Option<Vec<u8>> = redis::cmd("GET")
            .arg(Self::redis_key(fp, text_hash))
            .query_async(&mut conn.clone())
            .await
            .ok()?;
        let bytes = bytes?;
        (bytes.len() == self.inner.dimension() * 4).then(|| {
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        })
    }

    async fn redis_put(&self, text_hash: &str, v: &[f32]) {
        let Some((conn, fp)) = &self.redis else {
            return;
        };
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        let _: Result<(), _> = redis::cmd("SET")
            .arg(Self::redis_key(fp, text_hash))
            .arg(bytes)
            .arg("PX")
            .arg(u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX))
            .query_async(&mut conn.clone())
            .await;
    }
}

impl Cached {
    /// The cache key of `text` embedded for `tenant` (`""`: on no tenant's behalf, e.g. a
    /// reindex). The tenant is length-prefixed, so no (tenant, text) pair collides with another.
    fn key(tenant: &str, text: &str) -> String {
        short_hash(format!("{}:{tenant}:{text}", tenant.len()).as_bytes())
    }

    async fn embed_as(&self, tenant: &str, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let keys: Vec<String> = texts.iter().map(|t| Self::key(tenant, t)).collect();
        let mut out: Vec<Option<Vec<f32>>> = Vec::with_capacity(texts.len());
        let mut missing = Vec::new();
        let (mut local_hits, mut shared_hits) = (0u64, 0u64);
        for (i, k) in keys.iter().enumerate() {
            if let Some(v) = self.cache.get(k).await {
                out.push(Some(v.to_vec()));
                local_hits += 1;
            } else if let Some(v) = self.redis_get(k).await {
                self.cache.insert(k.clone(), Arc::from(v.as_slice())).await;
                out.push(Some(v));
                shared_hits += 1;
            } else {
                out.push(None);
                missing.push(i);
            }
        }
        let m = &self.metrics.embed_cache;
        m.with_label_values(&["hit"]).inc_by(local_hits);
        m.with_label_values(&["hit_shared"]).inc_by(shared_hits);
        m.with_label_values(&["miss"]).inc_by(missing.len() as u64);
        if !missing.is_empty() {
            let todo: Vec<String> = missing.iter().map(|&i| texts[i].clone()).collect();
            let fresh = self.inner.embed(&todo).await?;
            for (&i, v) in missing.iter().zip(fresh) {
                self.cache
                    .insert(keys[i].clone(), Arc::from(v.as_slice()))
                    .await;
                self.redis_put(&keys[i], &v).await;
                out[i] = Some(v);
            }
        }
        Ok(out.into_iter().map(Option::unwrap_or_default).collect())
    }
}

#[async_trait]
impl Embedder for Cached {
    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        self.embed_as("", texts).await
    }

    /// Each tenant has its own entries (in process and in Redis): a text another tenant
    /// embedded a moment ago is embedded again, so its speed says nothing about them.
    async fn embed_for(&self, tenant: &str, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        self.embed_as(tenant, texts).await
    }

    fn dimension(&self) -> usize {
        self.inner.dimension()
    }

    fn provider(&self) -> &'static str {
        self.inner.provider()
    }

    fn healthy(&self) -> bool {
        self.inner.healthy()
    }

    fn window(&self, text: &str) -> Option<usize> {
        self.inner.window(text)
    }
}
