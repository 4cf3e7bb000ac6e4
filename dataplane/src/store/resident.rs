//! The resident index: every live entry of one (tenant, index version) held in memory, so a
//! semantic lookup never goes through LanceDB's query engine (15–20 ms at 10k rows, 120 ms at
//! 200k, however small the answer).
//!
//! Entries are grouped by scope, because every search is confined to one. A small scope is
//! searched exhaustively; one that grows past `ann_min_scope_entries` gets an HNSW graph
//! (usearch) whose candidates are re-ranked on the exact cosine, so the similarity a lookup
//! reports is the same whichever way the candidate was found.
//!
//! A store never waits for the graph: new members of a graph-searched scope are *pending*,
//! searched exhaustively next to the graph until the indexer thread (`spawn_indexer`) adds
//! them. The graph add (1–2 ms at 100k entries) runs outside the index's lock, which usearch
//! allows beside searches and removals; only growing a graph needs the write lock.
//!
//! It is fed by the same log records as the write-ahead tail (so every replica sees every
//! store and delete) and loaded from the table once, in the background, at startup. Until the
//! load finishes `ready()` is false and the store searches LanceDB as before; deletes applied
//! meanwhile are remembered so the load does not bring their rows back.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::{Condvar, Mutex, RwLock};
use usearch::{Index, IndexOptions, MetricKind, ScalarKind};

use semantis_cache::entry::{Candidate, Entry, EntryFilter};
use semantis_cache::vector::{cosine_similarity, normalized};

/// How a scope's HNSW graph is built and searched. The defaults are usearch's usual starting
/// values, a little wider for search; `bench --scenario ann-recall` measures what they give
/// and takes each as a flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GraphParams {
    /// Links per node (M).
    pub connectivity: usize,
    /// Beam width while adding.
    pub expansion_add: usize,
    /// Beam width while searching.
    pub expansion_search: usize,
    /// How the graph keeps its own copy of each vector. Candidates are re-ranked on the
    /// entry's f32 vector whatever this is, so it changes which are found, not their scores.
    pub scalar: GraphScalar,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GraphScalar {
    F32,
    F16,
    I8,
}

impl Default for GraphParams {
    fn default() -> Self {
        Self {
            connectivity: 16,
            expansion_add: 128,
            expansion_search: 96,
            // Against f32 at 100k uniform random entries: the same agreement with exhaustive
            // search (96.9% vs 97.0%), p99 1.6 vs 3.1 ms, 2× the insert rate, 1.1 KB less
            // per entry (BENCHMARKS.md).
            scalar: GraphScalar::I8,
        }
    }
}

/// usearch needs a search context per concurrent caller; with none free a search fails. More
/// than any runtime here runs at once (tokio workers plus the startup load).
const CONCURRENT_CALLERS: usize = 32;
/// Pending entries the indexer adds per round; the write lock is taken twice per round.
const INDEX_BATCH: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum ResidentError {
    #[error("failed to {action} the HNSW graph of a scope: {reason}")]
    Ann {
        action: &'static str,
        reason: String,
    },
}

fn ann_error<E: std::fmt::Display>(action: &'static str) -> impl FnOnce(E) -> ResidentError {
    move |e| ResidentError::Ann {
        action,
        reason: e.to_string(),
    }
}

/// How a large scope is searched: through its graph (serving), or by comparing every entry
/// (the reference `bench --scenario ann-recall` measures the graph against).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SearchMode {
    /// Through the graph. When nothing it finds reaches `confirm_below` (the lookup's
    /// threshold), it searches again with a beam [`CONFIRM_WIDENING`] times as wide before
    /// the miss stands: a graph search that misses a close entry usually misses it because
    /// its beam was too narrow, and a miss costs an LLM call.
    Graph {
        confirm_below: Option<f32>,
    },
    Exhaustive,
}

/// How much wider the beam of a search that confirms a miss is.
pub const CONFIRM_WIDENING: usize = 4;

pub struct ResidentIndex {
    dimension: usize,
    graph: GraphParams,
    ann_min_scope_entries: usize,
    /// Responses larger than this stay out of memory: the entry is held without it, and a
    /// lookup that finds it reads the response from where the entry is stored.
    response_max_bytes: usize,
    inner: RwLock<Inner>,
    ready: AtomicBool,
    disabled: AtomicBool,
    /// Which load from the table is current: a reload starts a new one, and rows or the
    /// finish of an older load are ignored (they come from an older snapshot).
    generation: AtomicU64,
    /// Set when an insert leaves work for the indexer thread.
    work: Mutex<bool>,
    work_signal: Condvar,
    /// One indexing round at a time: two would add the same pending key twice.
    indexing: Mutex<()>,
}

#[derive(Default)]
struct Inner {
    /// usearch keys are integers: each entry gets the next one.
    next_key: u64,
    entries: HashMap<u64, std::sync::Arc<Entry>>,
    keys: HashMap<String, u64>,
    /// exact key → the newest entry stored under it (an older twin is still found, at
    /// similarity 1, by the semantic path).
    exact: HashMap<String, u64>,
    /// Entries held without their response (larger than `response_max_bytes`).
    elsewhere: HashSet<u64>,
    scopes: HashMap<String, ScopeSet>,
    /// While the startup load runs: deletes it must not undo.
    loading: Option<Tombstones>,
}

#[derive(Default)]
struct Tombstones {
    ids: HashSet<String>,
    filters: Vec<EntryFilter>,
}

#[derive(Default)]
struct ScopeSet {
    members: Vec<u64>,
    /// key → position in `members`, for O(1) removal.
    slot: HashMap<u64, usize>,
    ann: Option<Arc<Index>>,
    /// Members not yet in `ann` (searched exhaustively beside it).
    pending: HashSet<u64>,
}

impl ScopeSet {
    fn push(&mut self, key: u64) {
        self.slot.insert(key, self.members.len());
        self.members.push(key);
    }

    fn remove(&mut self, key: u64) -> Result<(), ResidentError> {
        if let Some(at) = self.slot.remove(&key) {
            self.members.swap_remove(at);
            if let Some(&moved) = self.members.get(at) {
                self.slot.insert(moved, at);
            }
        }
        self.pending.remove(&key);
        if let Some(ann) = &self.ann {
            ann.remove(key).map_err(ann_error("remove from"))?;
        }
        Ok(())
    }
}

/// One pending entry the indexer is adding, outside the lock.
struct GraphAdd {
    graph: Arc<Index>,
    scope: String,
    key: u64,
    entry: Arc<Entry>,
}

fn new_graph(
    dimension: usize,
    capacity: usize,
    params: GraphParams,
) -> Result<Index, ResidentError> {
    let options = IndexOptions {
        dimensions: dimension,
        metric: MetricKind::Cos,
        quantization: match params.scalar {
            GraphScalar::F32 => ScalarKind::F32,
            GraphScalar::F16 => ScalarKind::F16,
            GraphScalar::I8 => ScalarKind::I8,
        },
        connectivity: params.connectivity,
        expansion_add: params.expansion_add,
        expansion_search: params.expansion_search,
        multi: false,
    };
    let graph = Index::new(&options).map_err(ann_error("create"))?;
    graph
        .reserve_capacity_and_threads(capacity.max(1024), CONCURRENT_CALLERS)
        .map_err(ann_error("reserve room in"))?;
    Ok(graph)
}

impl ResidentIndex {
    /// An empty index that is still loading (`finish_loading` makes it ready).
    pub fn new(dimension: usize, ann_min_scope_entries: usize) -> Self {
        Self::with_graph(dimension, ann_min_scope_entries, GraphParams::default())
    }

    pub fn with_graph(dimension: usize, ann_min_scope_entries: usize, graph: GraphParams) -> Self {
        Self {
            dimension,
            graph,
            ann_min_scope_entries: ann_min_scope_entries.max(1),
            response_max_bytes: usize::MAX,
            inner: RwLock::new(Inner {
                loading: Some(Tombstones::default()),
                ..Inner::default()
            }),
            ready: AtomicBool::new(false),
            disabled: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            work: Mutex::new(false),
            work_signal: Condvar::new(),
            indexing: Mutex::new(()),
        }
    }

    /// Hold responses larger than `max` bytes out of memory (the default keeps every one).
    #[must_use]
    pub fn with_response_limit(mut self, max: usize) -> Self {
        self.response_max_bytes = max;
        self
    }

    /// Start the thread that adds pending entries to their scope's graph. It stops when the
    /// index is dropped; a failed add disables the index (lookups go back to LanceDB).
    pub fn spawn_indexer(self: &Arc<Self>) -> std::io::Result<()> {
        let index: Weak<Self> = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("resident-indexer".into())
            .spawn(move || {
                loop {
                    let Some(this) = index.upgrade() else { return };
                    if this.disabled() {
                        return;
                    }
                    match this.index_pending(INDEX_BATCH) {
                        Ok(0) => {
                            let mut work = this.work.lock();
                            if !*work {
                                // Bounded, so a dropped index ends the thread.
                                this.work_signal
                                    .wait_for(&mut work, Duration::from_secs(1));
                            }
                            *work = false;
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::error!(error = %e, "failed to index pending entries; the resident index is disabled");
                            this.disable();
                            return;
                        }
                    }
                }
            })
            .map(|_| ())
    }

    /// Add up to `max` pending entries to their graphs; returns how many it took. One thread
    /// adds: usearch's concurrent adds can leave nodes no search reaches (unum-cloud/USearch
    /// #735; a unit test here saw it with two threads on 500 entries).
    pub fn index_pending(&self, max: usize) -> Result<usize, ResidentError> {
        let _one_round = self.indexing.lock();
        let batch: Vec<GraphAdd> = {
            let mut inner = self.inner.write();
            let inner = &mut *inner;
            let mut batch = Vec::new();
            for (scope, set) in &inner.scopes {
                let Some(graph) = &set.ann else { continue };
                if batch.len() >= max {
                    break;
                }
                let taken = set.pending.iter().take(max - batch.len()).copied();
                let before = batch.len();
                batch.extend(taken.filter_map(|key| {
                    Some(GraphAdd {
                        graph: graph.clone(),
                        scope: scope.clone(),
                        key,
                        entry: inner.entries.get(&key)?.clone(),
                    })
                }));
                // Growing is not safe beside searches: only here, under the write lock.
                let needed = graph.size() + (batch.len() - before);
                if needed > graph.capacity() {
                    graph
                        .reserve_capacity_and_threads(
                            needed.max(graph.capacity().saturating_mul(2)),
                            CONCURRENT_CALLERS,
                        )
                        .map_err(ann_error("grow"))?;
                }
            }
            batch
        };
        for add in &batch {
            add.graph
                .add(add.key, &normalized(add.entry.vector.to_vec()))
                .map_err(ann_error("add to"))?;
        }
        let mut inner = self.inner.write();
        for add in &batch {
            let set = inner.scopes.get_mut(&add.scope);
            match set {
                Some(set) if set.slot.contains_key(&add.key) => {
                    set.pending.remove(&add.key);
                }
                // Removed while it was being added: take it out of the graph again.
                _ => {
                    add.graph
                        .remove(add.key)
                        .map_err(ann_error("remove from"))?;
                }
            }
        }
        Ok(batch.len())
    }

    /// Add every pending entry now (the startup load, benchmarks and tests).
    pub fn index_all_pending(&self) -> Result<(), ResidentError> {
        while self.index_pending(INDEX_BATCH)? > 0 {}
        Ok(())
    }

    fn signal_work(&self) {
        *self.work.lock() = true;
        self.work_signal.notify_one();
    }

    /// Whether the startup load finished: searches may rely on this index alone.
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn finish_loading(&self) {
        self.finish_load(self.load_generation());
    }

    /// Finish load `generation`; false (and nothing changes) when a newer load started.
    pub fn finish_load(&self, generation: u64) -> bool {
        let mut inner = self.inner.write();
        if generation != self.load_generation() {
            return false;
        }
        inner.loading = None;
        if !self.disabled() {
            self.ready.store(true, Ordering::Release);
        }
        true
    }

    /// The current load from the table (0 for the startup load).
    pub fn load_generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Forget everything and start over from the table (this replica missed log records):
    /// not searched until the new load finishes; records applied meanwhile are kept, deletes
    /// remembered. Returns the new load's generation.
    pub fn restart_loading(&self) -> u64 {
        let mut inner = self.inner.write();
        self.ready.store(false, Ordering::Release);
        *inner = Inner {
            loading: Some(Tombstones::default()),
            ..Inner::default()
        };
        self.generation.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Give up for good (an update failed, so the index may be incomplete) and free the
    /// memory; the owner searches LanceDB instead.
    pub fn disable(&self) {
        self.disabled.store(true, Ordering::Release);
        self.ready.store(false, Ordering::Release);
        *self.inner.write() = Inner::default();
    }

    pub fn disabled(&self) -> bool {
        self.disabled.load(Ordering::Acquire)
    }

    pub fn len(&self) -> usize {
        self.inner.read().entries.len()
    }

    /// Entries waiting for the indexer.
    /// Entries held without their response.
    pub fn elsewhere_len(&self) -> usize {
        self.inner.read().elsewhere.len()
    }

    pub fn pending_len(&self) -> usize {
        self.inner
            .read()
            .scopes
            .values()
            .map(|s| s.pending.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// An entry from the log. A repeated id (a replayed record) is ignored.
    pub fn insert(&self, entry: std::sync::Arc<Entry>) -> Result<(), ResidentError> {
        let pending = self.inner.write().insert(entry, self)?;
        if pending {
            self.signal_work();
        }
        Ok(())
    }

    /// An entry read by the startup load: skipped when a delete since the load began
    /// removed it.
    pub fn insert_loaded(
        &self,
        generation: u64,
        entry: std::sync::Arc<Entry>,
    ) -> Result<(), ResidentError> {
        let mut inner = self.inner.write();
        if generation != self.load_generation() {
            return Ok(());
        }
        if let Some(t) = &inner.loading
            && (t.ids.contains(&entry.id) || t.filters.iter().any(|f| f.matches(&entry)))
        {
            return Ok(());
        }
        // The load indexes what it inserted itself (`index_all_pending`) before it finishes.
        inner.insert(entry, self).map(|_| ())
    }

    pub fn remove_ids(&self, ids: &[String]) -> Result<(), ResidentError> {
        let mut inner = self.inner.write();
        if let Some(t) = &mut inner.loading {
            t.ids.extend(ids.iter().cloned());
        }
        for id in ids {
            inner.remove(id)?;
        }
        Ok(())
    }

    pub fn remove_where(&self, filter: &EntryFilter) -> Result<(), ResidentError> {
        let mut inner = self.inner.write();
        if let Some(t) = &mut inner.loading {
            t.filters.push(filter.clone());
        }
        let doomed: Vec<String> = match filter {
            EntryFilter::Scope(scope) => inner
                .scopes
                .get(scope)
                .map(|s| s.members.iter().filter_map(|k| inner.entries.get(k)))
                .into_iter()
                .flatten()
                .map(|e| e.id.clone())
                .collect(),
            _ => inner
                .entries
                .values()
                .filter(|e| filter.matches(e))
                .map(|e| e.id.clone())
                .collect(),
        };
        for id in &doomed {
            inner.remove(id)?;
        }
        Ok(())
    }

    /// The newest live entry stored under `exact_key`. Its response is empty when it is
    /// held elsewhere ([`ResidentIndex::find_exact_held`] says so).
    pub fn find_exact(&self, exact_key: &str, now_ms: i64) -> Option<std::sync::Arc<Entry>> {
        self.find_exact_held(exact_key, now_ms).map(|(e, _)| e)
    }

    /// [`ResidentIndex::find_exact`], and whether the entry's response must be read from
    /// where the entry is stored (it is larger than the response limit).
    pub fn find_exact_held(
        &self,
        exact_key: &str,
        now_ms: i64,
    ) -> Option<(std::sync::Arc<Entry>, bool)> {
        let inner = self.inner.read();
        let key = inner.exact.get(exact_key)?;
        inner
            .entries
            .get(key)
            .filter(|e| e.is_live(now_ms))
            .map(|e| (e.clone(), inner.elsewhere.contains(key)))
    }

    /// The `limit` live entries of `scope` nearest to `vector`, best first, with exact
    /// cosine similarities.
    pub fn search(
        &self,
        scope: &str,
        vector: &[f32],
        limit: usize,
        now_ms: i64,
    ) -> Result<Vec<Candidate>, ResidentError> {
        self.search_with(
            scope,
            vector,
            limit,
            now_ms,
            SearchMode::Graph {
                confirm_below: None,
            },
        )
    }

    pub fn search_with(
        &self,
        scope: &str,
        vector: &[f32],
        limit: usize,
        now_ms: i64,
        mode: SearchMode,
    ) -> Result<Vec<Candidate>, ResidentError> {
        self.search_held(scope, vector, limit, now_ms, mode)
            .map(|(found, _)| found)
    }

    /// [`ResidentIndex::search_with`], and the ids of the candidates whose response must be
    /// read from where the entry is stored (theirs is empty here).
    pub fn search_held(
        &self,
        scope: &str,
        vector: &[f32],
        limit: usize,
        now_ms: i64,
        mode: SearchMode,
    ) -> Result<(Vec<Candidate>, Vec<String>), ResidentError> {
        let inner = self.inner.read();
        let Some(set) = inner.scopes.get(scope) else {
            return Ok((Vec::new(), Vec::new()));
        };
        // Score first and build candidates for the best few only (no Arc clone or full sort
        // per member). An exhaustive scan is still bound by reaching each entry's vector
        // through the map: about 0.65 µs per entry.
        let score = |key: &u64| {
            inner
                .entries
                .get(key)
                .filter(|e| e.is_live(now_ms))
                .map(|e| (cosine_similarity(vector, &e.vector), *key))
        };
        let exhaustive = set.ann.is_none() || mode == SearchMode::Exhaustive;
        let mut scored: Vec<(f32, u64)> = match &set.ann {
            _ if exhaustive => set.members.iter().filter_map(&score).collect(),
            None => Vec::new(),
            Some(graph) => {
                // The graph gets unit vectors: usearch's i8 maps each coordinate of a unit vector onto
                // -127..=127, and client vectors need not be unit (cosine ignores length).
                let query = normalized(vector.to_vec());
                // Ask for more than `limit`: expired entries wait for the sweeper in the
                // graph, and the exact re-rank may reorder the approximate top. usearch's beam
                // is the larger of its expansion and the count asked for.
                let from_graph = |mut count: usize| -> Result<Vec<(f32, u64)>, ResidentError> {
                    loop {
                        let matches = graph.search(&query, count).map_err(ann_error("search"))?;
                        // A key the indexer is adding is in the graph and still pending.
                        let live: Vec<(f32, u64)> = matches
                            .keys
                            .iter()
                            .filter(|k| !set.pending.contains(k))
                            .filter_map(&score)
                            .collect();
                        if live.len() >= limit || matches.keys.len() < count {
                            return Ok(live);
                        }
                        count *= 4;
                    }
                };
                let pending: Vec<(f32, u64)> = set.pending.iter().filter_map(&score).collect();
                let mut live = from_graph((limit * 4).max(16))?;
                let best = |found: &[(f32, u64)]| {
                    found.iter().map(|c| c.0).fold(f32::NEG_INFINITY, f32::max)
                };
                if let SearchMode::Graph {
                    confirm_below: Some(threshold),
                } = mode
                    && best(&live).max(best(&pending)) < threshold
                {
                    live = from_graph(self.graph.expansion_search * CONFIRM_WIDENING)?;
                }
                live.extend(pending);
                live
            }
        };
        // Best first; among equals the older entry, as a stable sort of members would.
        let best_first = |a: &(f32, u64), b: &(f32, u64)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        if limit == 0 {
            scored.clear();
        } else if scored.len() > limit {
            scored.select_nth_unstable_by(limit - 1, best_first);
            scored.truncate(limit);
        }
        scored.sort_by(best_first);
        let elsewhere = scored
            .iter()
            .filter(|(_, key)| inner.elsewhere.contains(key))
            .filter_map(|(_, key)| inner.entries.get(key).map(|e| e.id.clone()))
            .collect();
        let found = scored
            .into_iter()
            .filter_map(|(similarity, key)| {
                inner.entries.get(&key).map(|e| Candidate {
                    similarity,
                    entry: e.clone(),
                })
            })
            .collect();
        Ok((found, elsewhere))
    }
}

impl Inner {
    /// Returns whether the entry waits for the indexer.
    fn insert(
        &mut self,
        entry: std::sync::Arc<Entry>,
        index: &ResidentIndex,
    ) -> Result<bool, ResidentError> {
        if self.keys.contains_key(&entry.id) || entry.vector.len() != index.dimension {
            return Ok(false);
        }
        let key = self.next_key;
        self.next_key += 1;
        let set = self.scopes.entry(entry.scope.clone()).or_default();
        if set.ann.is_none() && set.members.len() + 1 >= index.ann_min_scope_entries {
            // The scope outgrew exhaustive search: an empty graph, and every member pending.
            let graph = new_graph(index.dimension, (set.members.len() + 1) * 2, index.graph)?;
            set.pending.extend(set.members.iter().copied());
            set.ann = Some(Arc::new(graph));
        }
        let pending = set.ann.is_some();
        if pending {
            set.pending.insert(key);
        }
        set.push(key);
        self.keys.insert(entry.id.clone(), key);
        self.exact.insert(entry.exact_key.clone(), key);
        let entry = if entry.response.len() > index.response_max_bytes {
            self.elsewhere.insert(key);
            Arc::new(Entry {
                response: Arc::from(&[][..]),
                ..Entry::clone(&entry)
            })
        } else {
            entry
        };
        self.entries.insert(key, entry);
        Ok(pending)
    }

    fn remove(&mut self, id: &str) -> Result<(), ResidentError> {
        let Some(key) = self.keys.remove(id) else {
            return Ok(());
        };
        let Some(entry) = self.entries.remove(&key) else {
            return Ok(());
        };
        self.elsewhere.remove(&key);
        if self.exact.get(&entry.exact_key) == Some(&key) {
            self.exact.remove(&entry.exact_key);
        }
        if let Some(set) = self.scopes.get_mut(&entry.scope) {
            set.remove(key)?;
            if set.members.is_empty() {
                self.scopes.remove(&entry.scope);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn entry(id: &str, scope: &str, vector: Vec<f32>, expires_at_ms: i64) -> Arc<Entry> {
        Arc::new(Entry {
            id: id.into(),
            scope: scope.into(),
            namespace: "ns".into(),
            exact_key: format!("exact-{id}"),
            prompt: id.into(),
            vector: vector.into(),
            response: Arc::from(&b"{}"[..]),
            model: String::new(),
            created_at_ms: 0,
            expires_at_ms,
            prompt_tokens: 0,
            completion_tokens: 0,
            cost_usd: 0.0,
            metadata: String::new(),
        })
    }

    fn random_vector(rng: &mut StdRng, dim: usize) -> Vec<f32> {
        (0..dim).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    #[test]
    fn a_miss_is_confirmed_by_a_wider_search_before_it_stands() -> Result<(), ResidentError> {
        // A deliberately weak graph (few links, a narrow beam) over uniform random vectors,
        // HNSW's hardest case: its first answer misses entries a wider beam finds.
        let mut rng = StdRng::seed_from_u64(11);
        let dim = 64;
        let weak = GraphParams {
            connectivity: 4,
            expansion_add: 8,
            expansion_search: 16,
            scalar: GraphScalar::I8,
        };
        let index = ResidentIndex::with_graph(dim, 64, weak);
        index.finish_loading();
        let vectors: Vec<Vec<f32>> = (0..3000).map(|_| random_vector(&mut rng, dim)).collect();
        for (i, v) in vectors.iter().enumerate() {
            index.insert(entry(&format!("e{i}"), "s", v.clone(), i64::MAX))?;
        }
        index.index_all_pending()?;
        let threshold = 0.9;
        let hit = |found: &[Candidate]| {
            found
                .first()
                .filter(|c| c.similarity >= threshold)
                .map(|c| c.entry.id.clone())
        };
        let (mut first_answer_misses, mut confirmed_misses) = (0, 0);
        for v in &vectors {
            let first = index.search_with(
                "s",
                v,
                4,
                0,
                SearchMode::Graph {
                    confirm_below: None,
                },
            )?;
            let confirmed = index.search_with(
                "s",
                v,
                4,
                0,
                SearchMode::Graph {
                    confirm_below: Some(threshold),
                },
            )?;
            match hit(&first) {
                // A hit is final: confirming only ever searches again after a miss.
                Some(id) => assert_eq!(hit(&confirmed), Some(id)),
                None => first_answer_misses += 1,
            }
            confirmed_misses += usize::from(hit(&confirmed).is_none());
        }
        assert!(
            first_answer_misses > 0,
            "the weak graph found every entry: the test needs a weaker one"
        );
        assert!(
            confirmed_misses < first_answer_misses,
            "confirming misses found nothing more: {confirmed_misses} of {first_answer_misses} misses remain"
        );
        Ok(())
    }

    #[test]
    fn graph_search_agrees_with_exhaustive_search_and_honours_deletes() -> Result<(), ResidentError>
    {
        let mut rng = StdRng::seed_from_u64(7);
        let dim = 32;
        let index = ResidentIndex::new(dim, 64);
        index.finish_loading();
        let vectors: Vec<Vec<f32>> = (0..500).map(|_| random_vector(&mut rng, dim)).collect();
        for (i, v) in vectors.iter().enumerate() {
            index.insert(entry(&format!("e{i}"), "s", v.clone(), i64::MAX))?;
        }
        index.insert(entry("other", "t", vectors[3].clone(), i64::MAX))?;
        assert!(index.inner.read().scopes["s"].ann.is_some());
        assert!(index.inner.read().scopes["t"].ann.is_none());
        // Before the indexer ran, every member is pending and still found.
        assert_eq!(index.inner.read().scopes["s"].pending.len(), 500);
        assert_eq!(index.search("s", &vectors[7], 1, 0)?[0].entry.id, "e7");
        // A member removed while pending never reaches the graph.
        index.remove_ids(&["e9".into()])?;
        index.index_all_pending()?;
        {
            let inner = index.inner.read();
            let set = &inner.scopes["s"];
            assert!(set.pending.is_empty());
            let graph = set.ann.as_ref().map_or(0, |g| g.size());
            assert_eq!(graph, 499);
        }
        assert!(
            index
                .search("s", &vectors[9], 4, 0)?
                .iter()
                .all(|c| c.entry.id != "e9")
        );

        for (i, v) in vectors
            .iter()
            .enumerate()
            .take(100)
            .filter(|(i, _)| *i != 9)
        {
            let best = index.search("s", v, 1, 0)?;
            assert_eq!(best[0].entry.id, format!("e{i}"));
            assert!((best[0].similarity - 1.0).abs() < 1e-5);
        }
        index.remove_ids(&["e3".into()])?;
        let best = index.search("s", &vectors[3], 4, 0)?;
        assert!(best.iter().all(|c| c.entry.id != "e3"));
        assert_eq!(best.len(), 4);
        // The other scope is untouched and still finds its own copy.
        assert_eq!(index.search("t", &vectors[3], 1, 0)?[0].entry.id, "other");

        index.remove_where(&EntryFilter::Scope("s".into()))?;
        assert!(index.search("s", &vectors[5], 1, 0)?.is_empty());
        assert_eq!(index.len(), 1);
        Ok(())
    }

    #[test]
    fn the_indexer_thread_adds_new_members_while_searches_run() -> Result<(), ResidentError> {
        let mut rng = StdRng::seed_from_u64(11);
        let dim = 16;
        let index = Arc::new(ResidentIndex::new(dim, 8));
        index.finish_loading();
        index.spawn_indexer().map_err(|e| ResidentError::Ann {
            action: "start",
            reason: e.to_string(),
        })?;
        let vectors: Vec<Vec<f32>> = (0..300).map(|_| random_vector(&mut rng, dim)).collect();
        for (i, v) in vectors.iter().enumerate() {
            index.insert(entry(&format!("e{i}"), "s", v.clone(), i64::MAX))?;
            // Every stored entry answers at once, pending or not.
            assert_eq!(index.search("s", v, 1, 0)?[0].entry.id, format!("e{i}"));
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !index.inner.read().scopes["s"].pending.is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "the indexer never caught up"
            );
            std::thread::yield_now();
        }
        assert!(!index.disabled());
        for (i, v) in vectors.iter().enumerate() {
            assert_eq!(index.search("s", v, 1, 0)?[0].entry.id, format!("e{i}"));
        }
        Ok(())
    }

    #[test]
    fn graph_adds_beside_removals_keep_exactly_the_live_entries() -> Result<(), ResidentError> {
        let mut rng = StdRng::seed_from_u64(23);
        let dim = 16;
        let index = Arc::new(ResidentIndex::new(dim, 8));
        index.finish_loading();
        let vectors: Vec<Vec<f32>> = (0..2000).map(|_| random_vector(&mut rng, dim)).collect();
        for (i, v) in vectors.iter().enumerate() {
            index.insert(entry(&format!("e{i}"), "s", v.clone(), i64::MAX))?;
        }
        // Every third entry goes while the pending ones are added to the graph: removals land
        // before, during and after each entry's add.
        let remover = {
            let index = index.clone();
            std::thread::spawn(move || -> Result<(), ResidentError> {
                for i in (0..2000).step_by(3) {
                    index.remove_ids(&[format!("e{i}")])?;
                }
                Ok(())
            })
        };
        while index.index_pending(64)? > 0 {}
        remover.join().expect("the remover thread panicked")?;
        assert_eq!(index.pending_len(), 0);
        assert_eq!(index.len(), 2000 - 667);
        for (i, v) in vectors.iter().enumerate() {
            let best = index.search("s", v, 1, 0)?;
            if i % 3 == 0 {
                assert!(
                    best.iter().all(|c| c.entry.id != format!("e{i}")),
                    "e{i} came back"
                );
            } else {
                assert_eq!(best[0].entry.id, format!("e{i}"));
            }
        }
        Ok(())
    }

    #[test]
    fn expired_entries_are_skipped_and_exact_keys_resolve() -> Result<(), ResidentError> {
        let index = ResidentIndex::new(3, 1024);
        index.finish_loading();
        index.insert(entry("old", "s", vec![1.0, 0.0, 0.0], 10))?;
        index.insert(entry("new", "s", vec![0.9, 0.1, 0.0], 1_000))?;
        let found = index.search("s", &[1.0, 0.0, 0.0], 2, 100)?;
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].entry.id, "new");
        assert!(index.find_exact("exact-old", 100).is_none());
        assert_eq!(
            index.find_exact("exact-new", 100).map(|e| e.id.clone()),
            Some("new".to_owned())
        );
        // Wrong dimension never lands.
        index.insert(entry("bad", "s", vec![1.0], 1_000))?;
        assert_eq!(index.len(), 2);
        Ok(())
    }

    #[test]
    fn the_startup_load_does_not_resurrect_what_was_deleted_meanwhile() -> Result<(), ResidentError>
    {
        let index = ResidentIndex::new(2, 1024);
        index.remove_ids(&["gone".into()])?;
        index.remove_where(&EntryFilter::Namespace("ns".into()))?;
        index.insert_loaded(0, entry("gone", "s", vec![1.0, 0.0], i64::MAX))?;
        assert!(index.is_empty());
        // Stored after the invalidation, through the log: kept.
        index.insert(entry("fresh", "s", vec![1.0, 0.0], i64::MAX))?;
        assert!(!index.ready());
        index.finish_loading();
        assert!(index.ready());
        assert_eq!(index.len(), 1);
        // After the load, loaded rows are no longer filtered.
        index.insert_loaded(0, entry("late", "s", vec![0.0, 1.0], i64::MAX))?;
        assert_eq!(index.len(), 2);
        Ok(())
    }

    #[test]
    fn a_reload_forgets_everything_and_ignores_the_older_load() -> Result<(), ResidentError> {
        let index = ResidentIndex::new(2, 1024);
        let first = index.load_generation();
        index.insert_loaded(first, entry("stale", "s", vec![1.0, 0.0], i64::MAX))?;
        index.finish_loading();
        assert!(index.ready());
        let second = index.restart_loading();
        assert!(!index.ready(), "a reloading index is not searched");
        assert!(index.is_empty());
        // The older load goes on reading its snapshot: ignored.
        index.insert_loaded(first, entry("old-row", "s", vec![1.0, 0.0], i64::MAX))?;
        assert!(!index.finish_load(first));
        assert!(!index.ready());
        index.remove_ids(&["deleted-meanwhile".into()])?;
        index.insert_loaded(
            second,
            entry("deleted-meanwhile", "s", vec![0.0, 1.0], i64::MAX),
        )?;
        index.insert_loaded(second, entry("row", "s", vec![0.0, 1.0], i64::MAX))?;
        assert!(index.finish_load(second));
        assert!(index.ready());
        assert_eq!(index.len(), 1);
        Ok(())
    }
}
