//! The cache domain on in-memory fakes of its ports: lookup paths, stores, TTL, eviction,
//! similarity floors, scope isolation and the degraded paths. No network, no disk.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use async_trait::async_trait;
use parking_lot::Mutex;
use semantis_cache::entry::{Candidate, Entry, EntryFilter, Removed};
use semantis_cache::metrics::CacheMetrics;
use semantis_cache::ports::{
    EmbedError, Embedder, EntryStore, HotLayer, ModelUsage, PendingStore, UsageEvent, UsageReport,
    UsageSink,
};
use semantis_cache::scope::Scope;
use semantis_cache::tenants::{Tenant, TenantRegistry, hash_key};
use semantis_cache::vector::{cosine_similarity, now_ms};
use semantis_cache::{
    Cache, CacheError, CacheParts, HitPath, LookupQuery, Partition, StoreCommand, StoreError,
};
use semantis_contract::{DataplaneConfig, EvictionPolicy, TenantConfig};

const DIM: usize = 4;

/// An entry store in a Vec: exhaustive cosine search inside the scope, live entries only. It
/// can be switched to failing every call, like a backend that went away.
#[derive(Default)]
struct MemStore {
    entries: Mutex<Vec<Arc<Entry>>>,
    down: AtomicBool,
    /// Between doing a read or insert and answering, yield to other tasks until a removal
    /// lands (or a thousand yields pass), as a real store's I/O might: it holds open the
    /// window in which a delete races the caller's hot-layer write.
    slow: AtomicBool,
    removals: AtomicU64,
}

impl MemStore {
    fn check(&self) -> Result<(), StoreError> {
        if self.down.load(Ordering::Relaxed) {
            return Err(StoreError::unavailable("failed to reach the test store"));
        }
        Ok(())
    }

    fn ids(&self) -> Vec<String> {
        self.entries.lock().iter().map(|e| e.id.clone()).collect()
    }

    async fn linger(&self) {
        if !self.slow.load(Ordering::Relaxed) {
            return;
        }
        let seen = self.removals.load(Ordering::SeqCst);
        for _ in 0..1000 {
            if self.removals.load(Ordering::SeqCst) != seen {
                break;
            }
            tokio::task::yield_now().await;
        }
    }

    fn remove_matching(&self, keep: impl Fn(&Entry) -> bool) -> Vec<Removed> {
        self.removals.fetch_add(1, Ordering::SeqCst);
        let mut entries = self.entries.lock();
        let (kept, gone): (Vec<_>, Vec<_>) = entries.drain(..).partition(|e| keep(e));
        *entries = kept;
        gone.iter()
            .map(|e| Removed {
                id: e.id.clone(),
                exact_key: e.exact_key.clone(),
            })
            .collect()
    }
}

#[async_trait]
impl EntryStore for MemStore {
    async fn insert(&self, entry: Arc<Entry>) -> Result<(), StoreError> {
        self.check()?;
        self.entries.lock().push(entry);
        self.linger().await;
        Ok(())
    }

    async fn find_exact(&self, key: &str, now: i64) -> Result<Option<Arc<Entry>>, StoreError> {
        self.check()?;
        let found = self
            .entries
            .lock()
            .iter()
            .find(|e| e.exact_key == key && e.is_live(now))
            .cloned();
        self.linger().await;
        Ok(found)
    }

    async fn search(
        &self,
        scope: &str,
        vector: &[f32],
        limit: usize,
        _hit_threshold: f32,
        now: i64,
    ) -> Result<Vec<Candidate>, StoreError> {
        self.check()?;
        let mut found: Vec<Candidate> = self
            .entries
            .lock()
            .iter()
            .filter(|e| e.scope == scope && e.is_live(now))
            .map(|e| Candidate {
                similarity: cosine_similarity(vector, &e.vector),
                entry: e.clone(),
            })
            .collect();
        found.sort_by(|a, b| b.similarity.total_cmp(&a.similarity));
        found.truncate(limit);
        Ok(found)
    }

    async fn delete_ids(&self, ids: &[String]) -> Result<Vec<Removed>, StoreError> {
        self.check()?;
        Ok(self.remove_matching(|e| !ids.contains(&e.id)))
    }

    async fn delete_where(&self, filter: &EntryFilter) -> Result<Vec<Removed>, StoreError> {
        self.check()?;
        Ok(self.remove_matching(|e| !filter.matches(e)))
    }

    async fn expired_ids(&self, now: i64, limit: usize) -> Result<Vec<String>, StoreError> {
        self.check()?;
        Ok(self
            .entries
            .lock()
            .iter()
            .filter(|e| !e.is_live(now))
            .take(limit)
            .map(|e| e.id.clone())
            .collect())
    }

    async fn all_ids(&self) -> Result<Vec<(String, i64)>, StoreError> {
        Ok(self
            .entries
            .lock()
            .iter()
            .map(|e| (e.id.clone(), e.created_at_ms))
            .collect())
    }

    async fn count_live(&self, now: i64) -> Result<u64, StoreError> {
        self.check()?;
        Ok(self
            .entries
            .lock()
            .iter()
            .filter(|e| e.is_live(now))
            .count() as u64)
    }

    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn maintain(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn shutdown(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// A hot layer in a map that, like the real ones, never answers an expired entry.
#[derive(Default)]
struct MemHot(Mutex<HashMap<(String, String), Arc<Entry>>>);

impl MemHot {
    fn len(&self) -> usize {
        self.0.lock().len()
    }
}

#[async_trait]
impl HotLayer for MemHot {
    async fn get(&self, tenant: &str, key: &str) -> Option<Arc<Entry>> {
        let found = self.0.lock().get(&(tenant.into(), key.into())).cloned();
        found.filter(|e| e.is_live(now_ms()))
    }

    async fn put(&self, tenant: &str, entry: Arc<Entry>) {
        self.0
            .lock()
            .insert((tenant.into(), entry.exact_key.clone()), entry);
    }

    async fn remove(&self, tenant: &str, key: &str) {
        self.0.lock().remove(&(tenant.into(), key.into()));
    }

    async fn remove_id(&self, tenant: &str, id: &str) {
        self.0.lock().retain(|(t, _), e| t != tenant || e.id != id);
    }

    async fn clear_tenant(&self, tenant: &str) {
        self.0.lock().retain(|(t, _), _| t != tenant);
    }
}

/// Deferred stores in a Vec; `1` switches removals to failing like a metadata store that
/// went away.
#[derive(Default)]
struct MemPending(Mutex<Vec<(String, Entry)>>, AtomicBool);

#[async_trait]
impl PendingStore for MemPending {
    async fn defer(&self, tenant: &str, entry: &Entry) -> Result<(), StoreError> {
        self.0.lock().push((tenant.into(), entry.clone()));
        Ok(())
    }

    async fn claim(
        &self,
        tenant: &str,
        limit: usize,
        _now: i64,
        _until: i64,
    ) -> Result<Vec<Entry>, StoreError> {
        Ok(self
            .0
            .lock()
            .iter()
            .filter(|(t, _)| t == tenant)
            .take(limit)
            .map(|(_, p)| p.clone())
            .collect())
    }

    async fn release(&self, _tenant: &str, _ids: &[String]) -> Result<(), StoreError> {
        Ok(())
    }

    async fn remove(&self, tenant: &str, ids: &[String]) -> Result<Vec<Entry>, StoreError> {
        let mut all = self.0.lock();
        let (gone, kept): (Vec<_>, Vec<_>) = all
            .drain(..)
            .partition(|(t, p)| t == tenant && ids.contains(&p.id));
        *all = kept;
        Ok(gone.into_iter().map(|(_, p)| p).collect())
    }

    async fn remove_where(
        &self,
        tenant: &str,
        filter: &EntryFilter,
    ) -> Result<Vec<Entry>, StoreError> {
        if self.1.load(Ordering::Relaxed) {
            return Err(StoreError::unavailable(
                "failed to reach the test metadata store",
            ));
        }
        let mut all = self.0.lock();
        let (gone, kept): (Vec<_>, Vec<_>) = all.drain(..).partition(|(t, p)| {
            t == tenant
                && match filter {
                    EntryFilter::All => true,
                    EntryFilter::Scope(s) => &p.scope == s,
                    EntryFilter::Namespace(n) => &p.namespace == n,
                }
        });
        *all = kept;
        Ok(gone.into_iter().map(|(_, p)| p).collect())
    }
}

/// Keeps every usage event, and reports totals from them as the metadata store would.
#[derive(Default)]
struct MemUsage(Mutex<Vec<UsageEvent>>);

impl UsageSink for MemUsage {
    fn record(&self, event: UsageEvent) {
        self.0.lock().push(event);
    }
}

#[async_trait]
impl UsageReport for MemUsage {
    async fn usage(&self, tenant: &str) -> Result<Vec<ModelUsage>, StoreError> {
        let mut by_model: HashMap<String, ModelUsage> = HashMap::new();
        for e in self.0.lock().iter().filter(|e| e.tenant == tenant) {
            let u = by_model.entry(e.model.clone()).or_default();
            u.model.clone_from(&e.model);
            u.lookups += 1;
            u.hits += u64::from(e.hit);
            u.tokens_saved += e.tokens_saved;
            u.usd_saved += e.usd_saved;
        }
        Ok(by_model.into_values().collect())
    }
}

/// Texts to vectors by a fixed table (unknown texts get a vector of their own), switchable to
/// failing like a provider that went down.
/// The table embedder reads this many bytes of a text (the length of this preamble).
const PREAMBLE: &str = "You are a careful assistant for our docs. Answer the question below.";

struct TableEmbedder {
    table: HashMap<&'static str, [f32; DIM]>,
    down: AtomicBool,
}

#[async_trait]
impl Embedder for TableEmbedder {
    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        if self.down.load(Ordering::Relaxed) {
            return Err(EmbedError::Unavailable {
                provider: "table",
                reason: "down for the test".into(),
            });
        }
        Ok(texts
            .iter()
            .map(|t| {
                // Like a real model, it reads only the window.
                let seen = t.get(..self.window(t).unwrap_or(t.len())).unwrap_or(t);
                self.table
                    .get(seen)
                    .map_or_else(|| vec![0.0, 0.0, 0.0, 1.0], |v| v.to_vec())
            })
            .collect())
    }

    fn window(&self, text: &str) -> Option<usize> {
        (text.len() > PREAMBLE.len()).then_some(PREAMBLE.len())
    }

    fn dimension(&self) -> usize {
        DIM
    }

    fn provider(&self) -> &'static str {
        "table"
    }
}

struct World {
    cache: Cache,
    store: Arc<MemStore>,
    hot: Arc<MemHot>,
    pending: Arc<MemPending>,
    usage: Arc<MemUsage>,
    embedder: Arc<TableEmbedder>,
    tenant: Arc<Tenant>,
}

fn world_with(max_entries: u64, eviction: EvictionPolicy) -> World {
    let cfg = DataplaneConfig {
        tenants: vec![
            TenantConfig {
                name: "a".into(),
                api_key_sha256: vec![hash_key("key-a")],
                min_similarity: Some(0.9),
                max_entries: Some(max_entries),
                eviction: Some(eviction),
                ..TenantConfig::default()
            },
            TenantConfig {
                name: "b".into(),
                api_key_sha256: vec![hash_key("key-b")],
                ..TenantConfig::default()
            },
        ],
        ..DataplaneConfig::default()
    };
    let registry = TenantRegistry::from_config(&cfg).expect("valid tenants");
    let tenant = registry.get("a").expect("tenant a").clone();
    let store = Arc::new(MemStore::default());
    let partitions = registry
        .all()
        .map(|t| {
            let s: Arc<dyn EntryStore> = if t.name == "a" {
                store.clone()
            } else {
                Arc::new(MemStore::default())
            };
            Arc::new(Partition::new(t.clone(), s, &[]))
        })
        .collect();
    let embedder = Arc::new(TableEmbedder {
        table: HashMap::from([
            ("How do I reset my password?", [1.0, 0.0, 0.0, 0.0]),
            ("How can I reset my password?", [0.99, 0.1, 0.0, 0.0]),
            ("What is the capital of France?", [0.0, 1.0, 0.0, 0.0]),
            ("Is the capital of France Paris?", [0.1, 0.95, 0.2, 0.0]),
            (PREAMBLE, [0.0, 0.0, 0.6, 0.8]),
            ("What is 17 times 23?", [0.0, 0.0, 1.0, 0.0]),
            ("What is 17 times 24?", [0.0, 0.0, 1.0, 0.0]),
            ("What's 23 times 17?", [0.0, 0.05, 0.99, 0.0]),
        ]),
        down: AtomicBool::new(false),
    });
    let hot = Arc::new(MemHot::default());
    let pending = Arc::new(MemPending::default());
    let usage = Arc::new(MemUsage::default());
    let registry_prom = prometheus::Registry::new();
    let cache = Cache::new(CacheParts {
        registry,
        partitions,
        dimension: DIM,
        index_version: "test".into(),
        embedder: Some(embedder.clone()),
        hot: hot.clone(),
        usage: usage.clone(),
        usage_report: usage.clone(),
        pending: pending.clone(),
        metrics: CacheMetrics::register(&registry_prom).expect("metrics register"),
    });
    World {
        cache,
        store,
        hot,
        pending,
        usage,
        embedder,
        tenant,
    }
}

fn world() -> World {
    world_with(1000, EvictionPolicy::Lru)
}

fn scope(model: &str) -> Scope {
    Scope {
        model: Some(model.into()),
        temperature: Some(0.0),
        ..Scope::default()
    }
}

fn store_cmd(prompt: &str, scope: Scope) -> StoreCommand {
    StoreCommand {
        prompt: prompt.into(),
        vector: None,
        response: format!("{{\"answer\": \"{prompt}\"}}").into_bytes(),
        scope,
        ttl_secs: None,
        prompt_tokens: 10,
        completion_tokens: 5,
        cost_usd: 0.001,
        metadata: None,
    }
}

fn query(prompt: &str, scope: Scope) -> LookupQuery {
    LookupQuery {
        prompt: Some(prompt.into()),
        vector: None,
        scope,
        min_similarity: None,
        request_id: "r".into(),
    }
}

#[tokio::test]
async fn a_stored_prompt_hits_exactly_and_its_paraphrase_semantically() {
    let w = world();
    let stored = w
        .cache
        .store(
            &w.tenant,
            store_cmd("How do I reset my password?", scope("m")),
        )
        .await
        .expect("store");
    // White space is folded on the exact path.
    let exact = w
        .cache
        .lookup(
            &w.tenant,
            query("  How do I   reset my password? ", scope("m")),
        )
        .await
        .expect("lookup");
    let hit = exact.hit.expect("exact hit");
    assert_eq!(hit.path, HitPath::Exact);
    assert_eq!(hit.similarity, 1.0);
    assert_eq!(hit.entry.id, stored.id);

    let para = w
        .cache
        .lookup(&w.tenant, query("How can I reset my password?", scope("m")))
        .await
        .expect("lookup");
    let hit = para.hit.expect("semantic hit");
    assert_eq!(hit.path, HitPath::Semantic);
    assert!(hit.similarity >= 0.9 && hit.similarity < 1.0);
    assert_eq!(hit.entry.id, stored.id);

    let stats = w.cache.stats(&w.tenant).await.expect("stats");
    assert_eq!((stats.entries, stats.lookups, stats.hits), (1, 2, 2));
    assert_eq!(stats.tokens_saved, 30);
}

#[tokio::test]
async fn another_scope_or_tenant_never_sees_the_entry() {
    let w = world();
    w.cache
        .store(
            &w.tenant,
            store_cmd("How do I reset my password?", scope("m")),
        )
        .await
        .expect("store");
    for q in [
        query("How do I reset my password?", scope("other-model")),
        query("How can I reset my password?", scope("other-model")),
        query(
            "How do I reset my password?",
            Scope {
                namespace: Some("app-2".into()),
                ..scope("m")
            },
        ),
    ] {
        let out = w.cache.lookup(&w.tenant, q).await.expect("lookup");
        assert!(out.hit.is_none(), "a different scope must miss");
    }
    let b = w
        .cache
        .authenticate(Some("key-b"), None)
        .expect("key-b is tenant b");
    let out = w
        .cache
        .lookup(&b, query("How do I reset my password?", scope("m")))
        .await
        .expect("lookup");
    assert!(out.hit.is_none(), "another tenant must miss");
    assert!(matches!(
        w.cache.authenticate(Some("key-b"), Some("a")),
        Err(CacheError::TenantForbidden(_))
    ));
}

#[tokio::test]
async fn the_tenant_floor_can_be_raised_never_lowered() {
    let w = world();
    w.cache
        .store(
            &w.tenant,
            store_cmd("What is the capital of France?", scope("m")),
        )
        .await
        .expect("store");
    // cos ≈ 0.93 against the stored vector: above the floor 0.9.
    let mut q = query("Is the capital of France Paris?", scope("m"));
    q.min_similarity = Some(0.5);
    let out = w.cache.lookup(&w.tenant, q).await.expect("lookup");
    assert_eq!(out.threshold, 0.9, "a request cannot lower the floor");
    assert!(out.hit.is_some());

    let mut q = query("Is the capital of France Paris?", scope("m"));
    q.min_similarity = Some(0.99);
    let out = w.cache.lookup(&w.tenant, q).await.expect("lookup");
    assert_eq!(out.threshold, 0.99);
    assert!(
        out.hit.is_none(),
        "a raised floor turns the hit into a miss"
    );
    assert!(out.best_similarity.is_some_and(|s| s > 0.9 && s < 0.99));

    let mut q = query("x", scope("m"));
    q.min_similarity = Some(1.5);
    assert!(matches!(
        w.cache.lookup(&w.tenant, q).await,
        Err(CacheError::SimilarityOutOfRange(_))
    ));
}

#[tokio::test]
async fn bad_input_is_refused_with_its_own_error() {
    let w = world();
    let mut q = query("p", scope("m"));
    q.vector = Some(vec![1.0; DIM + 1]);
    assert!(matches!(
        w.cache.lookup(&w.tenant, q).await,
        Err(CacheError::DimensionMismatch {
            expected: DIM,
            got: 5
        })
    ));
    let mut q = query("p", scope("m"));
    q.vector = Some(vec![1.0, f32::INFINITY, 0.0, 0.0]);
    assert!(matches!(
        w.cache.lookup(&w.tenant, q).await,
        Err(CacheError::NonFiniteVector(1))
    ));
    let mut q = query("p", scope("m"));
    q.vector = Some(vec![0.0; DIM]);
    assert!(matches!(
        w.cache.lookup(&w.tenant, q).await,
        Err(CacheError::ZeroVector)
    ));
    assert!(matches!(
        w.cache.lookup(&w.tenant, query("  ", scope("m"))).await,
        Err(CacheError::EmptyPrompt)
    ));
    let mut cmd = store_cmd("p", scope("m"));
    cmd.ttl_secs = Some(0);
    assert!(matches!(
        w.cache.store(&w.tenant, cmd).await,
        Err(CacheError::InvalidTtl)
    ));
    let mut cmd = store_cmd("p", scope("m"));
    cmd.cost_usd = f64::NAN;
    assert!(matches!(
        w.cache.store(&w.tenant, cmd).await,
        Err(CacheError::InvalidRequest(_))
    ));
    assert!(matches!(
        w.cache.delete(&w.tenant, "not-a-uuid").await,
        Err(CacheError::EntryNotFound(_))
    ));
    assert!(w.store.ids().is_empty(), "nothing was stored");
}

#[tokio::test]
async fn an_expired_entry_is_never_served_and_is_purged_from_every_layer() {
    let w = world();
    let stored = w
        .cache
        .store(
            &w.tenant,
            store_cmd("How do I reset my password?", scope("m")),
        )
        .await
        .expect("store");
    // Age the entry past its TTL in the store and the hot layer alike.
    let aged: Vec<Arc<Entry>> = w
        .store
        .entries
        .lock()
        .iter()
        .map(|e| {
            Arc::new(Entry {
                expires_at_ms: now_ms() - 1,
                ..(**e).clone()
            })
        })
        .collect();
    *w.store.entries.lock() = aged.clone();
    w.hot.put("a", aged[0].clone()).await;

    for q in [
        query("How do I reset my password?", scope("m")),
        query("How can I reset my password?", scope("m")),
    ] {
        let out = w.cache.lookup(&w.tenant, q).await.expect("lookup");
        assert!(out.hit.is_none(), "an expired entry must miss");
    }
    w.cache.purge_expired(100).await;
    assert!(w.store.ids().is_empty());
    assert_eq!(w.hot.len(), 0, "the purge clears the hot layer too");
    assert!(matches!(
        w.cache.delete(&w.tenant, &stored.id).await,
        Err(CacheError::EntryNotFound(_))
    ));
}

#[tokio::test]
async fn capacity_eviction_keeps_the_recently_used_and_the_new_entry() {
    let w = world_with(3, EvictionPolicy::Lru);
    let mut ids = Vec::new();
    for i in 0..3 {
        let mut cmd = store_cmd(&format!("prompt {i}"), scope("m"));
        cmd.vector = Some(vec![1.0, i as f32, 0.0, 0.0]);
        ids.push(w.cache.store(&w.tenant, cmd).await.expect("store").id);
    }
    // Use the oldest, so the second-oldest is the least recently used.
    let out = w
        .cache
        .lookup(&w.tenant, query("prompt 0", scope("m")))
        .await
        .expect("lookup");
    assert!(out.hit.is_some());
    let mut cmd = store_cmd("prompt 3", scope("m"));
    cmd.vector = Some(vec![0.0, 0.0, 1.0, 0.0]);
    let stored = w.cache.store(&w.tenant, cmd).await.expect("store");
    assert_eq!(stored.evicted, 1);
    let left = w.store.ids();
    assert_eq!(left.len(), 3);
    assert!(left.contains(&stored.id), "never the entry just stored");
    assert!(left.contains(&ids[0]), "the recently used one stays");
    assert!(!left.contains(&ids[1]), "the least recently used one goes");
    let out = w
        .cache
        .lookup(&w.tenant, query("prompt 1", scope("m")))
        .await
        .expect("lookup");
    assert!(
        out.hit.is_none(),
        "an evicted entry misses on the hot path too"
    );
}

#[tokio::test]
async fn delete_and_invalidate_clear_every_layer() {
    let w = world();
    let a = w
        .cache
        .store(
            &w.tenant,
            store_cmd("How do I reset my password?", scope("m")),
        )
        .await
        .expect("store");
    let ns = Scope {
        namespace: Some("docs".into()),
        ..scope("m")
    };
    w.cache
        .store(
            &w.tenant,
            store_cmd("What is the capital of France?", ns.clone()),
        )
        .await
        .expect("store");
    w.cache.delete(&w.tenant, &a.id).await.expect("delete");
    let out = w
        .cache
        .lookup(&w.tenant, query("How do I reset my password?", scope("m")))
        .await
        .expect("lookup");
    assert!(out.hit.is_none());
    let n = w
        .cache
        .invalidate(&w.tenant, EntryFilter::Namespace("docs".into()))
        .await
        .expect("invalidate");
    assert_eq!(n, 1);
    let out = w
        .cache
        .lookup(&w.tenant, query("What is the capital of France?", ns))
        .await
        .expect("lookup");
    assert!(out.hit.is_none());
    assert_eq!(w.hot.len(), 0);
    assert!(w.store.ids().is_empty());
}

#[tokio::test]
async fn an_embedder_outage_degrades_to_the_exact_path_and_defers_stores() {
    let w = world();
    w.cache
        .store(
            &w.tenant,
            store_cmd("How do I reset my password?", scope("m")),
        )
        .await
        .expect("store");
    w.embedder.down.store(true, Ordering::Relaxed);

    let exact = w
        .cache
        .lookup(&w.tenant, query("How do I reset my password?", scope("m")))
        .await
        .expect("lookup");
    assert!(exact.hit.is_some(), "the exact path needs no embedder");
    let para = w
        .cache
        .lookup(&w.tenant, query("How can I reset my password?", scope("m")))
        .await
        .expect("a lookup never fails closed");
    assert!(para.hit.is_none());
    assert_eq!(para.degraded, Some("embedder_unavailable"));

    let deferred = w
        .cache
        .store(
            &w.tenant,
            store_cmd("What is the capital of France?", scope("m")),
        )
        .await
        .expect("a store is accepted while the embedder is down");
    assert!(deferred.embedding_pending);
    assert_eq!(w.pending.0.lock().len(), 1);
    let exact = w
        .cache
        .lookup(
            &w.tenant,
            query("What is the capital of France?", scope("m")),
        )
        .await
        .expect("lookup");
    assert!(
        exact.hit.is_some(),
        "a deferred store answers exact lookups"
    );

    // Still down: the pass gives the claim back and moves nothing.
    assert!(matches!(
        w.cache.embed_pending(10).await,
        Err(CacheError::EmbedderUnavailable(_))
    ));
    w.embedder.down.store(false, Ordering::Relaxed);
    assert_eq!(w.cache.embed_pending(10).await.expect("embed pending"), 1);
    assert!(w.pending.0.lock().is_empty());
    let para = w
        .cache
        .lookup(
            &w.tenant,
            query("Is the capital of France Paris?", scope("m")),
        )
        .await
        .expect("lookup");
    assert_eq!(para.hit.map(|h| h.entry.id.clone()), Some(deferred.id));
}

#[tokio::test]
async fn a_store_outage_makes_lookups_miss_and_stores_fail_clearly() {
    let w = world();
    w.store.down.store(true, Ordering::Relaxed);
    let out = w
        .cache
        .lookup(&w.tenant, query("How can I reset my password?", scope("m")))
        .await
        .expect("a lookup never fails closed");
    assert!(out.hit.is_none());
    assert_eq!(out.degraded, Some("store_unavailable"));
    let err = w
        .cache
        .store(
            &w.tenant,
            store_cmd("How do I reset my password?", scope("m")),
        )
        .await
        .expect_err("the store is down");
    assert!(matches!(err, CacheError::StoreUnavailable(_)));
    assert_eq!(
        w.usage.0.lock().len(),
        1,
        "the failed lookup is still accounted"
    );
}

/// Stores `prompt` and drops its hot copy, so the next exact lookup reads the store and writes
/// the entry back into the hot layer.
async fn stored_cold(w: &World, prompt: &str) -> String {
    let stored = w
        .cache
        .store(&w.tenant, store_cmd(prompt, scope("m")))
        .await
        .expect("store");
    w.hot.0.lock().clear();
    stored.id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_racing_lookups_that_warm_the_hot_layer_stays_done() {
    let w = Arc::new(world_with(100_000, EvictionPolicy::Lru));
    w.store.slow.store(true, Ordering::Relaxed);
    let rounds = 300;
    let mut violations = 0;
    for round in 0..rounds {
        let prompt = format!("question number {round}");
        let id = stored_cold(&w, &prompt).await;
        let lookups: Vec<_> = (0..4)
            .map(|_| {
                let (w, prompt) = (w.clone(), prompt.clone());
                tokio::spawn(async move {
                    w.cache
                        .lookup(&w.tenant, query(&prompt, scope("m")))
                        .await
                        .expect("lookup")
                })
            })
            .collect();
        tokio::task::yield_now().await;
        w.cache.delete(&w.tenant, &id).await.expect("delete");
        for l in lookups {
            l.await.expect("lookup task");
        }
        // Every lookup that raced the delete is done: none may have left the entry behind.
        let after = w
            .cache
            .lookup(&w.tenant, query(&prompt, scope("m")))
            .await
            .expect("lookup");
        if after.hit.is_some() {
            violations += 1;
        }
    }
    assert_eq!(
        violations, 0,
        "{violations} of {rounds} deleted entries still served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_racing_stores_leaves_none_of_them_served() {
    let w = Arc::new(world_with(100_000, EvictionPolicy::Lru));
    w.store.slow.store(true, Ordering::Relaxed);
    let rounds = 300;
    let mut violations = 0;
    for round in 0..rounds {
        let prompt = format!("question number {round}");
        let store = {
            let (w, prompt) = (w.clone(), prompt.clone());
            tokio::spawn(async move {
                w.cache
                    .store(&w.tenant, store_cmd(&prompt, scope("m")))
                    .await
                    .expect("store")
            })
        };
        tokio::task::yield_now().await;
        w.cache
            .invalidate(&w.tenant, EntryFilter::All)
            .await
            .expect("invalidate");
        store.await.expect("store task");
        // A store that landed after the invalidation may be served; one it removed may not.
        let in_store = !w.store.ids().is_empty();
        let after = w
            .cache
            .lookup(&w.tenant, query(&prompt, scope("m")))
            .await
            .expect("lookup");
        if after.hit.is_some() && !in_store {
            violations += 1;
        }
        w.cache
            .invalidate(&w.tenant, EntryFilter::All)
            .await
            .expect("clean up");
    }
    assert_eq!(
        violations, 0,
        "{violations} of {rounds} invalidated entries still served"
    );
}

#[tokio::test]
async fn a_delete_that_finds_no_entry_still_clears_a_hot_copy_of_it() {
    let w = world();
    let id = stored_cold(&w, "How do I reset my password?").await;
    let entry = w.store.entries.lock()[0].clone();
    // The store lost it elsewhere (another replica's delete) while a copy stayed hot.
    w.store.entries.lock().clear();
    w.hot.put("a", entry).await;
    let err = w
        .cache
        .delete(&w.tenant, &id)
        .await
        .expect_err("nothing in the store");
    assert!(matches!(err, CacheError::EntryNotFound(_)), "{err}");
    assert_eq!(w.hot.len(), 0);
}

#[tokio::test]
async fn an_invalidation_that_fails_on_the_pending_store_still_clears_what_it_removed() {
    let w = world();
    w.cache
        .store(
            &w.tenant,
            store_cmd("How do I reset my password?", scope("m")),
        )
        .await
        .expect("store");
    assert_eq!(w.hot.len(), 1);
    w.pending.1.store(true, Ordering::Relaxed);
    let err = w
        .cache
        .invalidate(&w.tenant, EntryFilter::Namespace(String::new()))
        .await
        .expect_err("the pending store is down");
    assert!(matches!(err, CacheError::StoreUnavailable(_)), "{err}");
    assert_eq!(
        w.hot.len(),
        0,
        "the store-side removal cleared the hot layer"
    );
    let out = w
        .cache
        .lookup(&w.tenant, query("How do I reset my password?", scope("m")))
        .await
        .expect("lookup");
    assert!(out.hit.is_none());
}

#[tokio::test]
async fn any_spelling_of_an_id_deletes_its_entry() {
    let w = world();
    for (prompt, spell) in [
        ("How do I reset my password?", 0),
        ("What is the capital of France?", 1),
        ("question three", 2),
    ] {
        let id = stored_cold(&w, prompt).await;
        let spelled = match spell {
            0 => id.to_uppercase(),
            1 => format!("{{{id}}}"),
            _ => format!("urn:uuid:{id}"),
        };
        w.cache.delete(&w.tenant, &spelled).await.expect("delete");
        let out = w
            .cache
            .lookup(&w.tenant, query(prompt, scope("m")))
            .await
            .expect("lookup");
        assert!(out.hit.is_none(), "{spelled} deleted nothing");
    }
    assert!(w.store.ids().is_empty());
}

#[tokio::test]
async fn token_counts_beyond_the_bound_are_refused_and_sums_never_overflow() {
    let w = world();
    let mut cmd = store_cmd("How do I reset my password?", scope("m"));
    cmd.prompt_tokens = u64::MAX;
    let err = w
        .cache
        .store(&w.tenant, cmd)
        .await
        .expect_err("u64::MAX tokens");
    assert!(
        matches!(
            err,
            CacheError::ValueOutOfRange {
                field: "prompt_tokens",
                ..
            }
        ),
        "{err}"
    );
    let mut cmd = store_cmd("How do I reset my password?", scope("m"));
    cmd.prompt_tokens = semantis_cache::MAX_TOKENS;
    cmd.completion_tokens = semantis_cache::MAX_TOKENS;
    w.cache.store(&w.tenant, cmd).await.expect("at the bound");
    let out = w
        .cache
        .lookup(&w.tenant, query("How do I reset my password?", scope("m")))
        .await
        .expect("lookup");
    assert!(out.hit.is_some());
}

#[tokio::test]
async fn long_prompts_that_differ_past_the_window_never_hit_each_other() {
    let w = world();
    let a = format!("{PREAMBLE} How do I rotate the signing keys?");
    let b = format!("{PREAMBLE} How do I delete my account?");
    let stored = w
        .cache
        .store(&w.tenant, store_cmd(&a, scope("m")))
        .await
        .expect("store");
    let other = w
        .cache
        .lookup(&w.tenant, query(&b, scope("m")))
        .await
        .expect("lookup");
    assert!(
        other.hit.is_none(),
        "a different question after the preamble hit"
    );
    let spaced = format!("{PREAMBLE}  How do I rotate   the signing keys? ");
    let same = w
        .cache
        .lookup(&w.tenant, query(&spaced, scope("m")))
        .await
        .expect("lookup");
    assert_eq!(same.hit.map(|h| h.entry.id.clone()), Some(stored.id));
    // The preamble alone is not the long prompt either.
    let short = w
        .cache
        .lookup(&w.tenant, query(PREAMBLE, scope("m")))
        .await
        .expect("lookup");
    assert!(
        short.hit.is_none(),
        "the preamble alone hit the long prompt"
    );
}

#[tokio::test]
async fn prompts_with_other_numbers_never_hit_each_other() {
    let w = world();
    let stored = w
        .cache
        .store(&w.tenant, store_cmd("What is 17 times 23?", scope("m")))
        .await
        .expect("store");
    let other = w
        .cache
        .lookup(&w.tenant, query("What is 17 times 24?", scope("m")))
        .await
        .expect("lookup");
    assert!(other.hit.is_none(), "17 × 24 was answered with 17 × 23");
    let para = w
        .cache
        .lookup(&w.tenant, query("What's 23 times 17?", scope("m")))
        .await
        .expect("lookup");
    assert_eq!(para.hit.map(|h| h.entry.id.clone()), Some(stored.id));
}
