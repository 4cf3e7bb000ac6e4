//! The cache domain on in-memory fakes of its ports: lookup paths, stores, TTL, eviction,
//! similarity floors, scope isolation and the degraded paths. No network, no disk.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use async_trait::async_trait;
use parking_lot::Mutex;
use semantis_cache::entry::{Candidate, Entry, EntryFilter, Held, Removed};
use semantis_cache::metrics::CacheMetrics;
use semantis_cache::ports::{
    DayUsage, EmbedError, Embedder, EntryStore, Feedback, FeedbackStore, HotLayer, ModelUsage,
    PendingStore, UsageEvent, UsageReport, UsageSink, Verifier, VerifyError,
};
use semantis_cache::scope::Scope;
use semantis_cache::tenants::{Tenant, TenantRegistry, VerifierDefaults, hash_key};
use semantis_cache::vector::{cosine_similarity, now_ms};
use semantis_cache::{
    Cache, CacheError, CacheParts, FeedbackCommand, FeedbackScope, HitPath, LookupQuery, Partition,
    StoreCommand, StoreError, VerifyOutcome,
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

    async fn all_ids(&self) -> Result<Vec<Held>, StoreError> {
        Ok(self
            .entries
            .lock()
            .iter()
            .map(|e| Held {
                id: e.id.clone(),
                created_at_ms: e.created_at_ms,
                bytes: e.footprint(e.vector.len()),
            })
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

impl MemUsage {
    /// A tenant's totals by `key` (in `DayUsage::day`), from the day `since` on.
    fn totals(&self, tenant: &str, since: &str, key: fn(&UsageEvent) -> String) -> Vec<DayUsage> {
        let mut by: std::collections::BTreeMap<String, DayUsage> = Default::default();
        for e in self.0.lock().iter().filter(|e| e.tenant == tenant) {
            if semantis_cache::vector::day_of(e.at_ms).as_str() < since {
                continue;
            }
            let k = key(e);
            let u = by.entry(k.clone()).or_default();
            u.day = k;
            if let Some(up) = e.upstream {
                u.upstream_calls += 1;
                u.tokens_used += up.tokens;
                u.usd_spent += up.usd;
                continue;
            }
            u.lookups += 1;
            u.hits += u64::from(e.hit);
            u.tokens_saved += e.tokens_saved;
            u.usd_saved += e.usd_saved;
        }
        by.into_values().collect()
    }
}

#[async_trait]
impl UsageReport for MemUsage {
    async fn usage(&self, tenant: &str) -> Result<Vec<ModelUsage>, StoreError> {
        Ok(self
            .totals(tenant, "", |e| e.model.clone())
            .into_iter()
            .map(DayUsage::for_model)
            .collect())
    }

    async fn usage_by_day(&self, tenant: &str, since: &str) -> Result<Vec<DayUsage>, StoreError> {
        Ok(self.totals(tenant, since, |e| semantis_cache::vector::day_of(e.at_ms)))
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

/// Scores (query, candidate) pairs from a table (unknown pairs score 0), switchable to
/// failing or to answering after a delay, like a reranker that went down or is overloaded.
#[derive(Default)]
struct TableVerifier {
    scores: Mutex<HashMap<(String, String), f32>>,
    down: AtomicBool,
    slow: AtomicBool,
    calls: AtomicU64,
}

impl TableVerifier {
    fn set(&self, query: &str, candidate: &str, score: f32) {
        self.scores
            .lock()
            .insert((query.to_owned(), candidate.to_owned()), score);
    }
}

#[async_trait]
impl Verifier for TableVerifier {
    async fn score(&self, query: &str, candidates: &[String]) -> Result<Vec<f32>, VerifyError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::Relaxed) {
            return Err(VerifyError::Unavailable {
                provider: "table",
                reason: "down for the test".into(),
            });
        }
        if self.slow.load(Ordering::Relaxed) {
            // Paused test time: this advances the clock past the budget at once.
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        }
        let scores = self.scores.lock();
        Ok(candidates
            .iter()
            .map(|c| {
                scores
                    .get(&(query.to_owned(), c.clone()))
                    .copied()
                    .unwrap_or(0.0)
            })
            .collect())
    }

    fn provider(&self) -> &'static str {
        "table"
    }
}

/// Feedback in a Vec, with an audit trail of served requests.
#[derive(Default)]
struct MemFeedback {
    rows: Mutex<Vec<Feedback>>,
    served: Mutex<HashMap<String, String>>,
}

#[async_trait]
impl FeedbackStore for MemFeedback {
    async fn record(&self, feedback: &Feedback) -> Result<i64, StoreError> {
        let mut rows = self.rows.lock();
        let seq = rows.len() as i64 + 1;
        rows.push(Feedback {
            seq,
            ..feedback.clone()
        });
        Ok(seq)
    }

    async fn since(&self, after: i64, limit: usize) -> Result<Vec<Feedback>, StoreError> {
        Ok(self
            .rows
            .lock()
            .iter()
            .filter(|f| f.seq > after)
            .take(limit)
            .cloned()
            .collect())
    }

    async fn served(&self, _tenant: &str, request_id: &str) -> Result<Option<String>, StoreError> {
        Ok(self.served.lock().get(request_id).cloned())
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
    /// Tenant `v`: verified by `verifier` (min score 0.5, budget 100 ms, floor 0.8).
    verified: Arc<Tenant>,
    verifier: Arc<TableVerifier>,
    feedback: Arc<MemFeedback>,
}

fn world_with(max_entries: u64, eviction: EvictionPolicy) -> World {
    world_budget(max_entries, None, eviction)
}

fn world_budget(max_entries: u64, max_bytes: Option<u64>, eviction: EvictionPolicy) -> World {
    let mut cfg = DataplaneConfig {
        tenants: vec![
            TenantConfig {
                name: "a".into(),
                api_key_sha256: vec![hash_key("key-a")],
                min_similarity: Some(0.9),
                max_entries: Some(max_entries),
                max_bytes,
                eviction: Some(eviction),
                ..TenantConfig::default()
            },
            TenantConfig {
                name: "b".into(),
                api_key_sha256: vec![hash_key("key-b")],
                verifier: Some("none".into()),
                ..TenantConfig::default()
            },
            TenantConfig {
                name: "v".into(),
                api_key_sha256: vec![hash_key("key-v")],
                verifier: Some("table".into()),
                verifier_budget_ms: Some(100),
                target_error_rate: Some(0.1),
                ..TenantConfig::default()
            },
        ],
        ..DataplaneConfig::default()
    };
    cfg.tenants[0].verifier = Some("none".into());
    let available = std::collections::BTreeMap::from([(
        "table".to_owned(),
        VerifierDefaults {
            min_score: 0.5,
            min_similarity: 0.8,
        },
    )]);
    let registry = TenantRegistry::with_verifiers(&cfg, &available).expect("valid tenants");
    let tenant = registry.get("a").expect("tenant a").clone();
    let verified = registry.get("v").expect("tenant v").clone();
    let store = Arc::new(MemStore::default());
    let partitions = registry
        .all()
        .map(|t| {
            let s: Arc<dyn EntryStore> = if t.name == "a" {
                store.clone()
            } else {
                Arc::new(MemStore::default())
            };
            // Tenant v shares nothing with a but the embedder: its own store.
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
    let verifier = Arc::new(TableVerifier::default());
    let feedback = Arc::new(MemFeedback::default());
    let verifiers: HashMap<String, Arc<dyn Verifier>> =
        HashMap::from([("table".to_owned(), verifier.clone() as Arc<dyn Verifier>)]);
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
        verifiers,
        feedback: feedback.clone(),
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
        verified,
        verifier,
        feedback,
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

/// A tenant storing large responses is held to its byte budget as to its entry count: the
/// least recently used entries go, never the one just stored, and `/v1/stats` and the gauge
/// say what the tenant holds.
#[tokio::test]
async fn byte_budget_eviction_keeps_a_tenant_of_large_responses_within_its_budget() {
    let big = |prompt: &str, n: usize| {
        let mut cmd = store_cmd(prompt, scope("m"));
        cmd.response = vec![b'x'; n];
        cmd.vector = Some(vec![1.0, 0.0, 0.0, 0.0]);
        cmd
    };
    let cost = |prompt: &str, n: usize| semantis_cache::entry::footprint(prompt.len(), n, 2, DIM);
    // Room for two 10 kB entries, not three.
    let budget = 2 * cost("big 0", 10_000) + 1000;
    let w = world_budget(1000, Some(budget), EvictionPolicy::Lru);
    let mut ids = Vec::new();
    for i in 0..2 {
        let stored = w
            .cache
            .store(&w.tenant, big(&format!("big {i}"), 10_000))
            .await
            .expect("store");
        assert_eq!(stored.evicted, 0);
        ids.push(stored.id);
    }
    let third = w
        .cache
        .store(&w.tenant, big("big 2", 10_000))
        .await
        .expect("store");
    assert_eq!(third.evicted, 1, "over the byte budget, one entry goes");
    let left = w.store.ids();
    assert!(!left.contains(&ids[0]) && left.contains(&ids[1]) && left.contains(&third.id));
    let stats = w.cache.stats(&w.tenant).await.expect("stats");
    assert_eq!(stats.max_bytes, budget);
    assert!(
        stats.bytes <= budget,
        "{} bytes held, budget {budget}",
        stats.bytes
    );
    // An entry larger than the whole budget evicts everything else but stays itself.
    let huge = w
        .cache
        .store(&w.tenant, big("huge", 50_000))
        .await
        .expect("store");
    assert_eq!(huge.evicted, 2);
    assert_eq!(w.store.ids(), vec![huge.id.clone()]);
    let stats = w.cache.stats(&w.tenant).await.expect("stats");
    assert_eq!(stats.bytes, cost("huge", 50_000));
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

fn query_as(prompt: &str, scope: Scope, request_id: &str) -> LookupQuery {
    LookupQuery {
        request_id: request_id.into(),
        ..query(prompt, scope)
    }
}

const RESET: &str = "How do I reset my password?";
const RESET_2: &str = "How can I reset my password?";

#[tokio::test]
async fn a_semantic_candidate_is_served_only_when_the_verifier_accepts_it() {
    let w = world();
    let v = &w.verified;
    assert_eq!(v.min_similarity, 0.8, "the verifier's floor");
    w.cache
        .store(v, store_cmd(RESET, scope("m")))
        .await
        .expect("store");
    // The verifier has not seen this pair: score 0, a miss although the vectors are close.
    let out = w
        .cache
        .lookup(v, query(RESET_2, scope("m")))
        .await
        .expect("lookup");
    assert!(out.hit.is_none(), "unverified candidates are not served");
    let report = out.verification.expect("the verifier was asked");
    assert_eq!(report.outcome, VerifyOutcome::Rejected);
    assert_eq!(report.best_score, Some(0.0));
    assert!(out.best_similarity.is_some_and(|s| s > 0.9));
    w.verifier.set(RESET_2, RESET, 0.93);
    let out = w
        .cache
        .lookup(v, query(RESET_2, scope("m")))
        .await
        .expect("lookup");
    let hit = out.hit.expect("accepted: a hit");
    assert_eq!((hit.path, hit.score), (HitPath::Semantic, Some(0.93)));
    assert_eq!(
        out.verification.map(|r| r.outcome),
        Some(VerifyOutcome::Accepted)
    );
    // The exact path needs no verifier.
    let calls = w.verifier.calls.load(Ordering::SeqCst);
    let out = w
        .cache
        .lookup(v, query(RESET, scope("m")))
        .await
        .expect("lookup");
    assert_eq!(out.hit.map(|h| h.path), Some(HitPath::Exact));
    assert_eq!(w.verifier.calls.load(Ordering::SeqCst), calls);
}

#[tokio::test]
async fn the_first_candidate_the_verifier_accepts_is_served_not_the_nearest() {
    let w = world();
    let v = &w.verified;
    // Both near "Is the capital of France Paris?"; the nearer one is the wrong answer.
    let wrong = "What is the capital of France?";
    let right = "Is Paris the capital of France?";
    w.cache
        .store(v, store_cmd(wrong, scope("m")))
        .await
        .expect("store");
    let mut cmd = store_cmd(right, scope("m"));
    cmd.vector = Some(vec![0.3, 0.8, 0.4, 0.0]);
    w.cache.store(v, cmd).await.expect("store");
    let q = "Is the capital of France Paris?";
    w.verifier.set(q, wrong, 0.1);
    w.verifier.set(q, right, 0.8);
    let out = w
        .cache
        .lookup(v, query(q, scope("m")))
        .await
        .expect("lookup");
    assert_eq!(out.considered.len(), 2);
    assert!(out.considered[0].entry.prompt == wrong, "the nearest first");
    let hit = out.hit.expect("the second candidate passes");
    assert_eq!(hit.entry.prompt, right);
    assert_eq!(
        w.verifier.calls.load(Ordering::SeqCst),
        2,
        "the nearest alone, then the rest"
    );
    // When the nearest passes, the others are never read: one call, one pair.
    w.verifier.set(q, wrong, 0.9);
    let out = w
        .cache
        .lookup(v, query(q, scope("m")))
        .await
        .expect("lookup");
    assert_eq!(out.hit.expect("the nearest passes").entry.prompt, wrong);
    assert_eq!(w.verifier.calls.load(Ordering::SeqCst), 3);
    assert_eq!(out.considered[1].score, None, "the second was not scored");
}

#[tokio::test(start_paused = true)]
async fn a_verifier_that_is_down_or_over_budget_makes_a_miss_never_an_unverified_hit() {
    let w = world();
    let v = &w.verified;
    w.cache
        .store(v, store_cmd(RESET, scope("m")))
        .await
        .expect("store");
    w.verifier.set(RESET_2, RESET, 0.99);
    w.verifier.down.store(true, Ordering::Relaxed);
    let out = w
        .cache
        .lookup(v, query(RESET_2, scope("m")))
        .await
        .expect("lookup");
    assert!(out.hit.is_none());
    assert_eq!(out.degraded, Some("verifier_unavailable"));
    assert_eq!(
        out.verification.map(|r| r.outcome),
        Some(VerifyOutcome::Unavailable)
    );
    w.verifier.down.store(false, Ordering::Relaxed);
    w.verifier.slow.store(true, Ordering::Relaxed);
    let out = w
        .cache
        .lookup(v, query(RESET_2, scope("m")))
        .await
        .expect("lookup");
    assert!(out.hit.is_none());
    assert_eq!(out.degraded, Some("verifier_over_budget"));
    let report = out.verification.expect("report");
    assert_eq!(report.outcome, VerifyOutcome::OverBudget);
    assert!(report.elapsed >= std::time::Duration::from_millis(100));
    assert!(
        report.elapsed < std::time::Duration::from_secs(5),
        "not waited out"
    );
    // Exact lookups still hit while the verifier is away.
    let out = w
        .cache
        .lookup(v, query(RESET, scope("m")))
        .await
        .expect("lookup");
    assert_eq!(out.hit.map(|h| h.path), Some(HitPath::Exact));
    w.verifier.slow.store(false, Ordering::Relaxed);
    let out = w
        .cache
        .lookup(v, query(RESET_2, scope("m")))
        .await
        .expect("lookup");
    assert!(out.hit.is_some(), "back: verified again");
}

#[tokio::test]
async fn a_lookup_by_vector_alone_is_never_served_unverified() {
    let w = world();
    let v = &w.verified;
    w.cache
        .store(v, store_cmd(RESET, scope("m")))
        .await
        .expect("store");
    let out = w
        .cache
        .lookup(
            v,
            LookupQuery {
                prompt: None,
                vector: Some(vec![1.0, 0.0, 0.0, 0.0]),
                ..query(RESET, scope("m"))
            },
        )
        .await
        .expect("lookup");
    assert!(out.hit.is_none());
    assert_eq!(
        out.verification.map(|r| r.outcome),
        Some(VerifyOutcome::NoPrompt)
    );
    // A tenant without a verifier is served by the vector.
    w.cache
        .store(&w.tenant, store_cmd(RESET, scope("m")))
        .await
        .expect("store");
    let out = w
        .cache
        .lookup(
            &w.tenant,
            LookupQuery {
                prompt: None,
                vector: Some(vec![1.0, 0.0, 0.0, 0.0]),
                ..query(RESET, scope("m"))
            },
        )
        .await
        .expect("lookup");
    assert!(out.hit.is_some());
}

#[tokio::test]
async fn a_hit_reported_wrong_is_never_served_again_for_its_query_or_close_paraphrases() {
    let w = world();
    let v = &w.verified;
    w.cache
        .store(v, store_cmd(RESET, scope("m")))
        .await
        .expect("store");
    w.verifier.set(RESET_2, RESET, 0.9);
    w.verifier.set("how can i reset my password", RESET, 0.9);
    let out = w
        .cache
        .lookup(v, query_as(RESET_2, scope("m"), "req-1"))
        .await
        .expect("lookup");
    let served = out.hit.expect("hit").entry.id.clone();
    let recorded = w
        .cache
        .feedback(
            v,
            FeedbackCommand {
                request_id: Some("req-1".into()),
                entry_id: None,
                correct: false,
                prompt: None,
            },
        )
        .await
        .expect("feedback");
    assert_eq!(recorded.entry_id, served);
    assert_eq!(recorded.applies_to, FeedbackScope::Query);
    let out = w
        .cache
        .lookup(v, query(RESET_2, scope("m")))
        .await
        .expect("lookup");
    assert!(out.hit.is_none(), "the same query misses");
    assert_eq!(out.considered[0].rejection, Some("feedback"));
    // A close paraphrase (same vector here) misses too, though the verifier would accept it.
    let out = w
        .cache
        .lookup(v, query("how can i reset my password", scope("m")))
        .await
        .expect("lookup");
    assert!(out.hit.is_none(), "a close paraphrase misses");
    // The entry still answers its own prompt.
    let out = w
        .cache
        .lookup(v, query(RESET, scope("m")))
        .await
        .expect("lookup");
    assert_eq!(out.hit.map(|h| h.path), Some(HitPath::Exact));
    // Reported for the exact prompt by entry id: the exact path stops serving it too.
    w.cache
        .feedback(
            v,
            FeedbackCommand {
                request_id: None,
                entry_id: Some(served.to_uppercase()),
                correct: false,
                prompt: Some(format!("  {RESET} ")),
            },
        )
        .await
        .expect("feedback by entry");
    let out = w
        .cache
        .lookup(v, query(RESET, scope("m")))
        .await
        .expect("lookup");
    assert!(out.hit.is_none(), "an exact hit reported wrong misses");
    let stats = w.cache.stats(v).await.expect("stats");
    assert_eq!((stats.feedback.right, stats.feedback.wrong), (0, 2));
    assert_eq!(w.feedback.rows.lock().len(), 2, "kept durably");
}

#[tokio::test]
async fn feedback_without_a_query_retires_the_entry_and_bad_feedback_is_refused() {
    let w = world();
    let v = &w.verified;
    let id = w
        .cache
        .store(v, store_cmd(RESET, scope("m")))
        .await
        .expect("store")
        .id;
    // Served elsewhere: only the audit trail knows the request.
    w.feedback
        .served
        .lock()
        .insert("other-replica".into(), id.clone());
    let recorded = w
        .cache
        .feedback(
            v,
            FeedbackCommand {
                request_id: Some("other-replica".into()),
                entry_id: None,
                correct: false,
                prompt: None,
            },
        )
        .await
        .expect("feedback");
    assert_eq!(recorded.applies_to, FeedbackScope::Entry);
    let out = w
        .cache
        .lookup(v, query(RESET, scope("m")))
        .await
        .expect("lookup");
    assert!(out.hit.is_none(), "not served for any query");
    let fb = |request_id: Option<&str>, entry_id: Option<&str>| FeedbackCommand {
        request_id: request_id.map(str::to_owned),
        entry_id: entry_id.map(str::to_owned),
        correct: true,
        prompt: None,
    };
    assert!(matches!(
        w.cache.feedback(v, fb(None, None)).await,
        Err(CacheError::FeedbackTargetRequired)
    ));
    assert!(matches!(
        w.cache.feedback(v, fb(Some("never-served"), None)).await,
        Err(CacheError::RequestNotFound(_))
    ));
    assert!(matches!(
        w.cache.feedback(v, fb(None, Some("not-an-id"))).await,
        Err(CacheError::EntryNotFound(_))
    ));
    let other = uuid_like();
    assert!(matches!(
        w.cache
            .feedback(v, fb(Some("other-replica"), Some(&other)))
            .await,
        Err(CacheError::InvalidRequest(_))
    ));
    // Tenant a never sees tenant v's verdicts.
    assert_eq!(
        w.cache
            .stats(&w.tenant)
            .await
            .expect("stats")
            .feedback
            .wrong,
        0
    );
}

fn uuid_like() -> String {
    "0190a5c4-0000-7000-8000-000000000000".into()
}

#[tokio::test]
async fn a_target_error_rate_raises_the_verifier_threshold_from_feedback() {
    let w = world();
    let v = &w.verified;
    w.cache
        .store(v, store_cmd(RESET, scope("m")))
        .await
        .expect("store");
    // Thirty verified hits at scores 0.55..0.99; the low-scored third are reported wrong.
    for i in 0..30 {
        let score = 0.55 + i as f32 * 0.015;
        w.verifier.set(RESET_2, RESET, score);
        let request = format!("r{i}");
        let out = w
            .cache
            .lookup(v, query_as(RESET_2, scope("m"), &request))
            .await
            .expect("lookup");
        assert!(out.hit.is_some());
        // Right ones only: a wrong verdict would also stop the entry for this query.
        let correct = i >= 10;
        if correct {
            w.cache
                .feedback(
                    v,
                    FeedbackCommand {
                        request_id: Some(request),
                        entry_id: None,
                        correct,
                        prompt: None,
                    },
                )
                .await
                .expect("feedback");
        } else {
            // Wrong for another query, with this hit's score.
            let out = w
                .cache
                .lookup(v, query_as(RESET_2, scope("m"), &format!("w{i}")))
                .await
                .expect("lookup");
            assert!(out.hit.is_some());
            w.feedback.rows.lock().push(Feedback {
                seq: 1000 + i,
                tenant: "v".into(),
                entry_id: uuid_like(),
                request_id: None,
                correct: false,
                prompt: None,
                vector: None,
                index_version: "test".into(),
                score: Some(score),
                at_ms: 0,
            });
        }
    }
    w.cache.sync_feedback().await.expect("sync");
    let stats = w.cache.stats(v).await.expect("stats");
    let min_score = stats.verifier_min_score.expect("verified tenant");
    assert!(
        min_score > 0.55 + 9.0 * 0.015,
        "raised above the wrong verdicts' scores: {min_score}"
    );
    // A hit scored below the new threshold is refused now.
    w.verifier.set(RESET_2, RESET, 0.6);
    let out = w
        .cache
        .lookup(v, query(RESET_2, scope("m")))
        .await
        .expect("lookup");
    assert!(out.hit.is_none());
}
