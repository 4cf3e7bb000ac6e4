//! The cache domain: lookups, stores, deletes, invalidation and stats for one tenant at a
//! time. It knows nothing of HTTP; handlers call it and map [`CacheError`] to a status.
//!
//! Lookup order: exact path (hot layer, then the entry store) on (scope, normalised prompt);
//! then the semantic path, filtered by scope before the nearest-neighbour search, with the
//! tenant's similarity floor. A store failure or an embedder failure degrades to a miss,
//! never to an error storm and never to a wrong hit.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;

use crate::access::AccessTracker;
use crate::entry::{Candidate, Entry, EntryFilter, Held, Removed};
use crate::error::{CacheError, StoreError};
use crate::feedback::{Judgements, ServedHit};
use crate::metrics::CacheMetrics;
use crate::ports::{
    DayUsage, EmbedError, Embedder, EntryStore, Feedback, FeedbackStore, HotLayer, ModelUsage,
    PendingStore, UpstreamUsage, UsageEvent, UsageReport, UsageSink, Verifier,
};
use crate::scope::{Scope, exact_key, normalize_prompt};
use crate::tenants::{Tenant, TenantRegistry, Verification};
use crate::vector::now_ms;
use crate::verify;

/// Which path answered a hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HitPath {
    Exact,
    Semantic,
}

impl HitPath {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Exact => "exact",
            Self::Semantic => "semantic",
        }
    }
}

pub struct LookupQuery {
    pub prompt: Option<String>,
    pub vector: Option<Vec<f32>>,
    pub scope: Scope,
    pub min_similarity: Option<f32>,
    pub request_id: String,
}

pub struct Hit {
    pub path: HitPath,
    pub similarity: f32,
    pub entry: Arc<Entry>,
    /// The verifier's score, when one accepted the hit.
    pub score: Option<f32>,
}

pub struct LookupOutcome {
    pub hit: Option<Hit>,
    /// Best semantic candidate's similarity, hit or not.
    pub best_similarity: Option<f32>,
    /// The similarity a semantic candidate needed.
    pub threshold: f32,
    /// Set when a component failed and the answer comes from what was still reachable.
    pub degraded: Option<&'static str>,
    /// What the tenant's verifier said, when it has one and a candidate reached it.
    pub verification: Option<VerificationReport>,
    /// The semantic candidates at or above the threshold, best first, with what became of
    /// each (for `eval` and for explaining a miss).
    pub considered: Vec<Considered>,
}

/// One semantic candidate at or above the threshold.
pub struct Considered {
    pub entry: Arc<Entry>,
    pub similarity: f32,
    /// The check it failed before the verifier (`beyond_window`, `numbers`, `negation`,
    /// `opposite`, `direction`, `feedback`).
    pub rejection: Option<&'static str>,
    /// The verifier's score, when it read this candidate.
    pub score: Option<f32>,
}

/// What became of the verifier stage of one lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyOutcome {
    /// A candidate reached the score it needed: a hit.
    Accepted,
    /// No candidate did: a miss.
    Rejected,
    /// The verifier failed: a miss.
    Unavailable,
    /// The verifier did not answer within the tenant's budget: a miss.
    OverBudget,
    /// A lookup by vector alone has no text to verify: a miss.
    NoPrompt,
}

impl VerifyOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Rejected => "rejected",
            Self::Unavailable => "unavailable",
            Self::OverBudget => "over_budget",
            Self::NoPrompt => "no_prompt",
        }
    }
}

#[derive(Debug, Clone)]
pub struct VerificationReport {
    pub verifier: String,
    /// The score a candidate needed (the tenant's, raised by feedback toward its target).
    pub min_score: f32,
    /// The best score the verifier gave, when it answered.
    pub best_score: Option<f32>,
    pub outcome: VerifyOutcome,
    /// Time spent waiting for the verifier.
    pub elapsed: Duration,
}

/// `POST /v1/feedback`: whether a served hit was right. Names the hit by the lookup's
/// request id, or by entry id (then `prompt` says which query it was wrong for).
pub struct FeedbackCommand {
    pub request_id: Option<String>,
    pub entry_id: Option<String>,
    pub correct: bool,
    pub prompt: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FeedbackScope {
    /// Wrong for this query and its close paraphrases.
    Query,
    /// Reported without its query: the entry is not served again for any query.
    Entry,
}

#[derive(Debug)]
pub struct FeedbackRecorded {
    pub entry_id: String,
    pub applies_to: FeedbackScope,
    /// The verifier threshold the tenant uses now.
    pub verifier_min_score: Option<f32>,
}

/// Verdicts users gave on served hits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct FeedbackCounts {
    pub right: u64,
    pub wrong: u64,
}

pub struct StoreCommand {
    pub prompt: String,
    pub vector: Option<Vec<f32>>,
    pub response: Vec<u8>,
    pub scope: Scope,
    pub ttl_secs: Option<u64>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_usd: f64,
    pub metadata: Option<serde_json::Value>,
}

#[derive(Debug)]
pub struct Stored {
    pub id: String,
    pub expires_at_ms: i64,
    pub evicted: usize,
    /// The embedder was down: the entry answers exact lookups now and semantic ones once a
    /// background pass has embedded it.
    pub embedding_pending: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct TenantStats {
    pub tenant: String,
    /// Live (unexpired) entries.
    pub entries: u64,
    pub max_entries: u64,
    /// What the tenant's entries cost its byte budget ([`crate::entry::Entry::footprint`]),
    /// and the budget.
    pub bytes: u64,
    pub max_bytes: u64,
    pub eviction: String,
    pub min_similarity: f32,
    pub index_version: String,
    /// Whether the tenant's LanceDB table has its ANN (IVF-PQ) index (searched while the
    /// resident index is not).
    pub vector_index: bool,
    /// Whether lookups are answered from the in-memory resident index (false while it loads
    /// after a restart, or when `storage.resident_index` is off).
    pub resident_index: bool,
    pub lookups: u64,
    pub hits: u64,
    pub hit_ratio: f64,
    pub tokens_saved: u64,
    pub usd_saved: f64,
    /// The same figures per model.
    pub by_model: Vec<ModelUsage>,
    /// Gateway calls that went upstream, the tokens they used and what they cost.
    pub upstream_calls: u64,
    pub tokens_used: u64,
    pub usd_spent: f64,
    /// The last 30 UTC days, oldest first (days without use are left out).
    pub by_day: Vec<DayUsage>,
    /// The verifier semantic hits must pass, if any.
    pub verifier: Option<String>,
    /// The score it asks for now (feedback may have raised it).
    pub verifier_min_score: Option<f32>,
    pub feedback: FeedbackCounts,
}

/// One tenant's slice of the cache: its entry store and eviction bookkeeping.
pub struct Partition {
    pub tenant: Arc<Tenant>,
    pub store: Arc<dyn EntryStore>,
    access: Mutex<AccessTracker>,
    /// Bumped by every removal, after the store removed and before the hot layer is cleared.
    /// A hot-layer write that read the store before a removal sees it changed afterwards and
    /// takes its copy back out, so a delete racing a lookup's write-back stays done.
    removals: AtomicU64,
    /// Feedback on this tenant's hits, and its recent hits.
    judgements: Mutex<Judgements>,
}

/// The most tokens one side of a cached call may report: far above any model's window, far
/// below where sums of them overflow.
pub const MAX_TOKENS: u64 = 1_000_000_000;

impl Partition {
    pub fn new(tenant: Arc<Tenant>, store: Arc<dyn EntryStore>, seen: &[Held]) -> Self {
        let mut access = AccessTracker::default();
        let mut by_age: Vec<&Held> = seen.iter().collect();
        by_age.sort_by_key(|h| h.created_at_ms);
        for h in by_age {
            access.insert(&h.id, h.bytes);
        }
        Self {
            tenant,
            store,
            access: Mutex::new(access),
            removals: AtomicU64::new(0),
            judgements: Mutex::new(Judgements::default()),
        }
    }

    fn removals(&self) -> u64 {
        self.removals.load(Ordering::SeqCst)
    }
}

pub struct Cache {
    registry: TenantRegistry,
    partitions: HashMap<String, Arc<Partition>>,
    dimension: usize,
    index_version: String,
    embedder: Option<Arc<dyn Embedder>>,
    hot: Arc<dyn HotLayer>,
    usage: Arc<dyn UsageSink>,
    usage_report: Arc<dyn UsageReport>,
    pending: Arc<dyn PendingStore>,
    verifiers: HashMap<String, Arc<dyn Verifier>>,
    feedback: Arc<dyn FeedbackStore>,
    /// The highest feedback seq applied; one reader at a time.
    feedback_seen: tokio::sync::Mutex<i64>,
    metrics: CacheMetrics,
}

/// How long a replica owns the pending entries it claimed before another may take them.
const PENDING_CLAIM_MS: i64 = 30_000;

fn removed_of(p: &Entry) -> Removed {
    Removed {
        id: p.id.clone(),
        exact_key: p.exact_key.clone(),
    }
}

/// How many semantic candidates to fetch: the best that passes every check is served.
const CANDIDATES: usize = 4;

pub struct CacheParts {
    pub registry: TenantRegistry,
    pub partitions: Vec<Arc<Partition>>,
    pub dimension: usize,
    pub index_version: String,
    pub embedder: Option<Arc<dyn Embedder>>,
    pub hot: Arc<dyn HotLayer>,
    pub usage: Arc<dyn UsageSink>,
    /// Where `stats` reads the usage totals back from.
    pub usage_report: Arc<dyn UsageReport>,
    pub pending: Arc<dyn PendingStore>,
    /// The verifiers tenants name, by name.
    pub verifiers: HashMap<String, Arc<dyn Verifier>>,
    pub feedback: Arc<dyn FeedbackStore>,
    pub metrics: CacheMetrics,
}

impl Cache {
    pub fn new(parts: CacheParts) -> Self {
        for p in &parts.partitions {
            parts
                .metrics
                .entries
                .with_label_values(&[&p.tenant.name])
                .set(i64::try_from(p.access.lock().len()).unwrap_or(i64::MAX));
        }
        Self {
            registry: parts.registry,
            partitions: parts
                .partitions
                .into_iter()
                .map(|p| (p.tenant.name.clone(), p))
                .collect(),
            dimension: parts.dimension,
            index_version: parts.index_version,
            embedder: parts.embedder,
            hot: parts.hot,
            usage: parts.usage,
            usage_report: parts.usage_report,
            pending: parts.pending,
            verifiers: parts.verifiers,
            feedback: parts.feedback,
            feedback_seen: tokio::sync::Mutex::new(0),
            metrics: parts.metrics,
        }
    }

    pub fn authenticate(
        &self,
        bearer: Option<&str>,
        tenant_header: Option<&str>,
    ) -> Result<Arc<Tenant>, CacheError> {
        self.registry.authenticate(bearer, tenant_header)
    }

    /// A configured tenant by name (for tools acting inside the process, like `eval`).
    pub fn tenant(&self, name: &str) -> Option<Arc<Tenant>> {
        self.registry.get(name).cloned()
    }

    pub fn dimension(&self) -> usize {
        self.dimension
    }

    pub fn index_version(&self) -> &str {
        &self.index_version
    }

    pub fn has_embedder(&self) -> bool {
        self.embedder.is_some()
    }

    /// False while the embedder refuses calls (its circuit breaker is open).
    pub fn embedder_healthy(&self) -> bool {
        self.embedder.as_ref().is_none_or(|e| e.healthy())
    }

    pub fn partitions(&self) -> impl Iterator<Item = &Arc<Partition>> {
        self.partitions.values()
    }

    fn partition(&self, tenant: &Tenant) -> Result<&Arc<Partition>, CacheError> {
        self.partitions
            .get(&tenant.name)
            .ok_or_else(|| CacheError::UnknownTenant(tenant.name.clone()))
    }

    fn check_vector(&self, v: &[f32]) -> Result<(), CacheError> {
        if v.len() != self.dimension {
            return Err(CacheError::DimensionMismatch {
                expected: self.dimension,
                got: v.len(),
            });
        }
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(CacheError::NonFiniteVector(i));
        }
        if v.iter().all(|x| *x == 0.0) {
            return Err(CacheError::ZeroVector);
        }
        Ok(())
    }

    async fn embed_one(&self, tenant: &str, text: &str) -> Result<Vec<f32>, EmbedError> {
        let Some(embedder) = &self.embedder else {
            return Err(EmbedError::Inference(
                "no embedder is configured".to_owned(),
            ));
        };
        let started = std::time::Instant::now();
        let result = embedder.embed_for(tenant, &[text.to_owned()]).await;
        self.metrics
            .embed_duration
            .with_label_values(&[embedder.provider()])
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(mut v) if v.len() == 1 => Ok(v.remove(0)),
            Ok(v) => Err(EmbedError::Inference(format!(
                "the embedder returned {} vectors for 1 text",
                v.len()
            ))),
            Err(e) => {
                self.metrics
                    .embed_errors
                    .with_label_values(&[embedder.provider()])
                    .inc();
                Err(e)
            }
        }
    }

    pub async fn lookup(
        &self,
        tenant: &Tenant,
        q: LookupQuery,
    ) -> Result<LookupOutcome, CacheError> {
        let started = std::time::Instant::now();
        let part = self.partition(tenant)?;
        if let Some(min) = q.min_similarity
            && !(-1.0..=1.0).contains(&min)
        {
            return Err(CacheError::SimilarityOutOfRange(min));
        }
        // The tenant's floor: a request may raise it, never lower it.
        let threshold = q
            .min_similarity
            .map_or(tenant.min_similarity, |m| m.max(tenant.min_similarity));
        let normalized = match &q.prompt {
            Some(p) => {
                let n = normalize_prompt(p);
                if n.is_empty() {
                    return Err(CacheError::EmptyPrompt);
                }
                Some(n)
            }
            None => None,
        };
        if let Some(v) = &q.vector {
            self.check_vector(v)?;
        }
        if normalized.is_none() && q.vector.is_none() {
            return Err(CacheError::NoQuery);
        }
        let now = now_ms();
        let fp = q.scope.fingerprint();
        let mut degraded = None;

        if let Some(norm) = &normalized {
            let key = exact_key(&fp, norm);
            let found = match self.hot.get(&tenant.name, &key).await {
                Some(e) => Some(e),
                None => match self.find_exact_and_warm(part, &key, now).await {
                    Ok(Some(e)) => Some(e),
                    Ok(None) => None,
                    Err(e) => {
                        self.store_failed(tenant, "find_exact", &e);
                        degraded = Some("store_unavailable");
                        None
                    }
                },
            };
            let found = found.filter(|e| {
                let reported = {
                    let j = part.judgements.lock();
                    j.has_negatives() && j.rejects(&e.id, Some(norm), None, &self.index_version)
                };
                if reported {
                    self.reject(tenant, "feedback");
                }
                !reported
            });
            if let Some(entry) = found {
                let hit = Hit {
                    path: HitPath::Exact,
                    similarity: 1.0,
                    entry,
                    score: None,
                };
                let outcome = LookupOutcome {
                    hit: Some(hit),
                    best_similarity: None,
                    threshold,
                    degraded,
                    verification: None,
                    considered: Vec::new(),
                };
                return Ok(self.finish(part, &q, outcome, normalized, None, started));
            }
        }

        let vector = match q.vector.clone() {
            Some(v) => Some(v),
            None => match &q.prompt {
                Some(p) if self.embedder.is_some() => match self.embed_one(&tenant.name, p).await {
                    Ok(v) => Some(v),
                    Err(e @ EmbedError::Rejected { .. }) => {
                        tracing::info!(tenant = %tenant.name, reason = %e, "the embedder refused this prompt; answering from the exact path only");
                        degraded = Some("prompt_not_embeddable");
                        None
                    }
                    Err(reason) => {
                        tracing::warn!(tenant = %tenant.name, %reason, "embedder failed; answering from the exact path only");
                        self.metrics
                            .embedder_fallbacks
                            .with_label_values(&[&tenant.name])
                            .inc();
                        degraded = Some("embedder_unavailable");
                        None
                    }
                },
                _ => None,
            },
        };
        let miss = |degraded| LookupOutcome {
            hit: None,
            best_similarity: None,
            threshold,
            degraded,
            verification: None,
            considered: Vec::new(),
        };
        let Some(vector) = vector else {
            return Ok(self.finish(part, &q, miss(degraded), normalized, None, started));
        };
        let candidates = match part
            .store
            .search(&fp.0, &vector, CANDIDATES, threshold, now)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                self.store_failed(tenant, "search", &e);
                let outcome = miss(Some("store_unavailable"));
                return Ok(self.finish(part, &q, outcome, normalized, Some(vector), started));
            }
        };
        let best_similarity = candidates.first().map(|c| c.similarity);
        let considered = self.checked(
            part,
            &q,
            normalized.as_deref(),
            &vector,
            candidates,
            threshold,
        );
        let mut outcome = LookupOutcome {
            hit: None,
            best_similarity,
            threshold,
            degraded,
            verification: None,
            considered,
        };
        match (&tenant.verification, q.prompt.as_deref()) {
            // Nothing passed the checks: no verifier to ask.
            _ if outcome.considered.iter().all(|c| c.rejection.is_some()) => {}
            (None, _) => {
                outcome.hit = outcome
                    .considered
                    .iter()
                    .find(|c| c.rejection.is_none())
                    .map(|c| Hit {
                        path: HitPath::Semantic,
                        similarity: c.similarity,
                        entry: c.entry.clone(),
                        score: None,
                    });
            }
            (Some(v), None) => {
                outcome.verification = Some(VerificationReport {
                    verifier: v.verifier.clone(),
                    min_score: self.min_score(part, v),
                    best_score: None,
                    outcome: VerifyOutcome::NoPrompt,
                    elapsed: Duration::ZERO,
                });
            }
            (Some(v), Some(prompt)) => self.verify_candidates(part, v, prompt, &mut outcome).await,
        }
        Ok(self.finish(part, &q, outcome, normalized, Some(vector), started))
    }

    /// The candidates at or above `threshold`, each with the first check it failed before
    /// the verifier: the text checks of [`verify`], then feedback that reported it wrong for
    /// this query.
    fn checked(
        &self,
        part: &Partition,
        q: &LookupQuery,
        normalized: Option<&str>,
        vector: &[f32],
        candidates: Vec<Candidate>,
        threshold: f32,
    ) -> Vec<Considered> {
        let tenant = &part.tenant;
        let embedded_here = q.vector.is_none();
        let j = part.judgements.lock();
        let reported = j.has_negatives();
        candidates
            .into_iter()
            .take_while(|c| c.similarity >= threshold)
            .map(|c| {
                let mut rejection = self
                    .text_check(q.prompt.as_deref(), embedded_here, &c.entry)
                    .map(verify::Rejection::as_str);
                if rejection.is_none()
                    && reported
                    && j.rejects(&c.entry.id, normalized, Some(vector), &self.index_version)
                {
                    rejection = Some("feedback");
                }
                if let Some(r) = rejection {
                    self.reject(tenant, r);
                }
                Considered {
                    entry: c.entry,
                    similarity: c.similarity,
                    rejection,
                    score: None,
                }
            })
            .collect()
    }

    /// The verifier threshold of `part`'s tenant now: its own, raised by feedback.
    fn min_score(&self, part: &Partition, v: &Verification) -> f32 {
        part.judgements
            .lock()
            .threshold(v.min_score, v.target_error_rate)
    }

    fn reject(&self, tenant: &Tenant, reason: &str) {
        self.metrics
            .rejected_candidates
            .with_label_values(&[&tenant.name, reason])
            .inc();
    }

    /// Ask the tenant's verifier about the candidates that passed the checks, within its
    /// budget; the first (by similarity) that reaches the score is the hit. The best candidate
    /// is scored alone first (a paraphrase is usually the nearest: one pair to read), the rest
    /// in one batch only when it is turned away. A verifier that fails or runs over makes the
    /// lookup a miss, never an unverified hit.
    async fn verify_candidates(
        &self,
        part: &Partition,
        v: &Verification,
        prompt: &str,
        outcome: &mut LookupOutcome,
    ) {
        let tenant = &part.tenant;
        let min_score = self.min_score(part, v);
        let pending: Vec<usize> = outcome
            .considered
            .iter()
            .enumerate()
            .filter(|(_, c)| c.rejection.is_none())
            .map(|(i, _)| i)
            .collect();
        // Tokio's clock, so the budget and the time it reports agree (and tests can pause it).
        let started = tokio::time::Instant::now();
        let deadline = started + Duration::from_millis(v.budget_ms);
        let mut report = VerificationReport {
            verifier: v.verifier.clone(),
            min_score,
            best_score: None,
            outcome: VerifyOutcome::Rejected,
            elapsed: Duration::ZERO,
        };
        let (first, rest) = pending.split_at(pending.len().min(1));
        for batch in [first, rest] {
            if batch.is_empty() || outcome.hit.is_some() {
                continue;
            }
            let prompts: Vec<&str> = batch
                .iter()
                .map(|&i| outcome.considered[i].entry.prompt.as_str())
                .collect();
            // Past the sentences they all share: where a paraphrase and another question differ.
            let at = verify::shared_context(prompt, &prompts);
            let texts: Vec<String> = prompts.iter().map(|p| p[at..].to_owned()).collect();
            let scores = match self
                .score_within(&tenant.name, v, &prompt[at..], &texts, deadline)
                .await
            {
                Ok(scores) => scores,
                Err((what, reason)) => {
                    tracing::warn!(tenant = %tenant.name, verifier = %v.verifier, %reason, "verifier failed; the lookup is a miss");
                    self.metrics
                        .verify_failures
                        .with_label_values(&[&tenant.name, what.as_str()])
                        .inc();
                    report.outcome = what;
                    outcome.degraded = Some(match what {
                        VerifyOutcome::OverBudget => "verifier_over_budget",
                        _ => "verifier_unavailable",
                    });
                    break;
                }
            };
            for (&i, score) in batch.iter().zip(scores) {
                let score = if score.is_finite() { score } else { 0.0 };
                let c = &mut outcome.considered[i];
                c.score = Some(score);
                report.best_score = Some(report.best_score.map_or(score, |b: f32| b.max(score)));
                if outcome.hit.is_some() {
                    continue;
                }
                if score >= min_score {
                    report.outcome = VerifyOutcome::Accepted;
                    outcome.hit = Some(Hit {
                        path: HitPath::Semantic,
                        similarity: c.similarity,
                        entry: c.entry.clone(),
                        score: Some(score),
                    });
                } else {
                    self.reject(tenant, "verifier");
                }
            }
        }
        report.elapsed = started.elapsed();
        outcome.verification = Some(report);
    }

    /// One call to `v`'s verifier, cut off at `deadline`; its duration goes to the metrics.
    async fn score_within(
        &self,
        tenant: &str,
        v: &Verification,
        prompt: &str,
        texts: &[String],
        deadline: tokio::time::Instant,
    ) -> Result<Vec<f32>, (VerifyOutcome, String)> {
        let Some(verifier) = self.verifiers.get(&v.verifier) else {
            return Err((
                VerifyOutcome::Unavailable,
                format!("the verifier `{}` is not loaded", v.verifier),
            ));
        };
        let started = tokio::time::Instant::now();
        let answer =
            tokio::time::timeout_at(deadline, verifier.score_for(tenant, prompt, texts)).await;
        self.metrics
            .verify_duration
            .with_label_values(&[verifier.provider()])
            .observe(started.elapsed().as_secs_f64());
        match answer {
            Ok(Ok(scores)) if scores.len() == texts.len() => Ok(scores),
            Ok(Ok(scores)) => Err((
                VerifyOutcome::Unavailable,
                format!("{} scores for {} candidates", scores.len(), texts.len()),
            )),
            Ok(Err(e)) => Err((VerifyOutcome::Unavailable, e.to_string())),
            Err(_) => Err((
                VerifyOutcome::OverBudget,
                format!("no answer within {} ms", v.budget_ms),
            )),
        }
    }

    /// The text checks ([`verify`]) a candidate fails for `prompt`, if any. A lookup by
    /// vector alone has no text to compare: nothing to check. With a vector the client
    /// embedded itself, this embedder's window says nothing about it.
    fn text_check(
        &self,
        prompt: Option<&str>,
        embedded_here: bool,
        candidate: &Entry,
    ) -> Option<verify::Rejection> {
        let prompt = prompt?;
        let window = |text: &str| {
            self.embedder
                .as_ref()
                .filter(|_| embedded_here)
                .and_then(|e| e.window(text))
        };
        verify::check(
            verify::Read {
                prompt,
                window: window(prompt),
            },
            verify::Read {
                prompt: &candidate.prompt,
                window: window(&candidate.prompt),
            },
        )
    }

    /// The exact path's store read, warming the hot layer with what it found. A removal that
    /// lands between the read and the hot-layer write takes the copy back out (`removals`).
    async fn find_exact_and_warm(
        &self,
        part: &Partition,
        key: &str,
        now: i64,
    ) -> Result<Option<Arc<Entry>>, StoreError> {
        let before = part.removals();
        let found = part.store.find_exact(key, now).await?;
        if let Some(e) = &found {
            self.warm(part, e.clone(), before).await;
        }
        Ok(found)
    }

    /// Put `entry` into the hot layer unless a removal happened since `before` was read (then
    /// the copy is taken back out: it may be of an entry that is gone).
    async fn warm(&self, part: &Partition, entry: Arc<Entry>, before: u64) {
        let key = entry.exact_key.clone();
        self.hot.put(&part.tenant.name, entry).await;
        if part.removals() != before {
            self.hot.remove(&part.tenant.name, &key).await;
        }
    }

    /// Account for a lookup: eviction bookkeeping, metrics, usage and audit, and remember a
    /// hit for feedback that names its request.
    fn finish(
        &self,
        part: &Partition,
        q: &LookupQuery,
        outcome: LookupOutcome,
        normalized: Option<String>,
        vector: Option<Vec<f32>>,
        started: Instant,
    ) -> LookupOutcome {
        let (hit, best_similarity, threshold) =
            (&outcome.hit, outcome.best_similarity, outcome.threshold);
        let tenant: &str = &part.tenant.name;
        let m = &self.metrics;
        if let Some(s) = best_similarity {
            m.best_similarity
                .with_label_values(&[tenant])
                .observe(f64::from(s));
        }
        let path = hit.as_ref().map_or("none", |h| h.path.as_str());
        m.lookups
            .with_label_values(&[tenant, if hit.is_some() { "hit" } else { "miss" }, path])
            .inc();
        m.lookup_duration
            .with_label_values(&[tenant, if hit.is_some() { path } else { "miss" }])
            .observe(started.elapsed().as_secs_f64());
        let model = q.scope.model.clone().unwrap_or_default();
        let mut event = UsageEvent {
            tenant: tenant.to_owned(),
            model,
            at_ms: now_ms(),
            hit: hit.is_some(),
            path: hit.as_ref().map(|h| h.path.as_str()),
            entry_id: None,
            similarity: hit.as_ref().map(|h| h.similarity),
            request_id: q.request_id.clone(),
            tokens_saved: 0,
            usd_saved: 0.0,
            upstream: None,
        };
        match hit {
            Some(h) => {
                part.judgements.lock().remember(
                    &q.request_id,
                    ServedHit {
                        entry_id: h.entry.id.clone(),
                        prompt: normalized,
                        vector: vector
                            .filter(|_| h.path == HitPath::Semantic)
                            .map(Arc::from),
                        score: h.score,
                    },
                );
                part.access.lock().touch(&h.entry.id);
                let tokens = h
                    .entry
                    .prompt_tokens
                    .saturating_add(h.entry.completion_tokens);
                m.tokens_saved.with_label_values(&[tenant]).inc_by(tokens);
                m.usd_saved_micros
                    .with_label_values(&[tenant])
                    .inc_by((h.entry.cost_usd * 1e6).round().max(0.0) as u64);
                event.entry_id = Some(h.entry.id.clone());
                event.tokens_saved = tokens;
                event.usd_saved = h.entry.cost_usd;
            }
            None => {
                if let Some(s) = best_similarity
                    && s >= threshold - part.tenant.near_miss_margin
                {
                    m.near_misses.with_label_values(&[tenant]).inc();
                }
            }
        }
        self.usage.record(event);
        outcome
    }

    fn store_failed(&self, tenant: &Tenant, operation: &str, e: &StoreError) {
        tracing::warn!(tenant = %tenant.name, operation, error = %e, "store operation failed");
        self.metrics
            .store_errors
            .with_label_values(&[&tenant.name, operation])
            .inc();
    }

    pub async fn store(&self, tenant: &Tenant, cmd: StoreCommand) -> Result<Stored, CacheError> {
        let part = self.partition(tenant)?;
        let normalized = normalize_prompt(&cmd.prompt);
        if normalized.is_empty() {
            return Err(CacheError::EmptyPrompt);
        }
        if cmd.ttl_secs == Some(0) {
            return Err(CacheError::InvalidTtl);
        }
        for (field, got) in [
            ("prompt_tokens", cmd.prompt_tokens),
            ("completion_tokens", cmd.completion_tokens),
        ] {
            if got > MAX_TOKENS {
                return Err(CacheError::ValueOutOfRange {
                    field,
                    max: MAX_TOKENS,
                    got,
                });
            }
        }
        if !(cmd.cost_usd.is_finite() && cmd.cost_usd >= 0.0) {
            return Err(CacheError::InvalidRequest(
                "cost_usd must be a finite, non-negative number".into(),
            ));
        }
        let (vector, embed_error) = match cmd.vector {
            Some(v) => {
                self.check_vector(&v)?;
                (v, None)
            }
            None => match self.embed_one(&tenant.name, &cmd.prompt).await {
                Ok(v) => (v, None),
                // Without an embedder at all there is nothing to wait for.
                Err(e) if self.embedder.is_none() => {
                    return Err(CacheError::EmbedderUnavailable(e.to_string()));
                }
                // Waiting cannot help a text the provider refuses: say so now.
                Err(EmbedError::Rejected { status, body, .. }) => {
                    return Err(CacheError::PromptNotEmbeddable(format!(
                        "HTTP {status}: {body}"
                    )));
                }
                Err(e) => (Vec::new(), Some(e.to_string())),
            },
        };
        let fp = cmd.scope.fingerprint();
        let now = now_ms();
        let ttl_ms = cmd
            .ttl_secs
            .unwrap_or(tenant.default_ttl_secs)
            .saturating_mul(1000);
        let expires_at_ms = now.saturating_add(i64::try_from(ttl_ms).unwrap_or(i64::MAX));
        let entry = Arc::new(Entry {
            id: uuid::Uuid::now_v7().to_string(),
            scope: fp.0.clone(),
            namespace: cmd.scope.namespace().to_owned(),
            exact_key: exact_key(&fp, &normalized),
            prompt: cmd.prompt,
            vector: Arc::from(vector),
            response: Arc::from(cmd.response),
            model: cmd.scope.model.clone().unwrap_or_default(),
            created_at_ms: now,
            expires_at_ms,
            prompt_tokens: cmd.prompt_tokens,
            completion_tokens: cmd.completion_tokens,
            cost_usd: cmd.cost_usd,
            metadata: cmd
                .metadata
                .map_or_else(|| "{}".to_owned(), |m| m.to_string()),
        });
        // An invalidation racing this store may remove it before the hot layer gets its copy.
        let before = part.removals();
        let embedding_pending = if let Some(reason) = embed_error {
            // Accept it anyway: kept durably in the metadata store until the embedder is back.
            if let Err(e) = self
                .pending
                .defer(&tenant.name, &entry.without_vector())
                .await
            {
                self.store_failed(tenant, "defer", &e);
                return Err(CacheError::EmbedderUnavailable(reason));
            }
            self.metrics
                .stores_deferred
                .with_label_values(&[&tenant.name])
                .inc();
            true
        } else {
            part.store.insert(entry.clone()).await.inspect_err(|e| {
                self.store_failed(tenant, "insert", e);
            })?;
            false
        };
        self.warm(part, entry.clone(), before).await;
        part.access
            .lock()
            .insert(&entry.id, entry.footprint(self.dimension));
        self.metrics.stores.with_label_values(&[&tenant.name]).inc();
        let evicted = self.evict_over_capacity(part, &entry.id).await?;
        self.set_entries_gauge(part);
        Ok(Stored {
            id: entry.id.clone(),
            expires_at_ms,
            evicted,
            embedding_pending,
        })
    }

    /// Evict until the tenant holds at most `max_entries` and `max_bytes`, never the entry
    /// just stored.
    async fn evict_over_capacity(&self, part: &Partition, keep: &str) -> Result<usize, CacheError> {
        let mut evicted = 0;
        loop {
            let victim = {
                let access = part.access.lock();
                let reason = if access.len() as u64 > part.tenant.max_entries {
                    "capacity"
                } else if access.bytes() > part.tenant.max_bytes {
                    "bytes"
                } else {
                    break;
                };
                access
                    .victim(part.tenant.eviction, keep)
                    .map(|v| (v, reason))
            };
            let Some((victim, reason)) = victim else {
                break;
            };
            let removed = part.store.delete_ids(std::slice::from_ref(&victim)).await?;
            part.access.lock().remove(&victim);
            self.purge(part, &removed).await;
            evicted += 1;
            self.metrics
                .evictions
                .with_label_values(&[&part.tenant.name, reason])
                .inc();
        }
        Ok(evicted)
    }

    /// Clear every layer of what the store removed. Called once the store removal is done.
    async fn purge(&self, part: &Partition, removed: &[Removed]) {
        part.removals.fetch_add(1, Ordering::SeqCst);
        {
            let mut access = part.access.lock();
            for r in removed {
                access.remove(&r.id);
            }
        }
        part.judgements
            .lock()
            .forget_entries(removed.iter().map(|r| r.id.as_str()));
        for r in removed {
            self.hot.remove(&part.tenant.name, &r.exact_key).await;
        }
    }

    fn set_entries_gauge(&self, part: &Partition) {
        let (entries, bytes) = {
            let access = part.access.lock();
            (access.len(), access.bytes())
        };
        self.metrics
            .entries
            .with_label_values(&[&part.tenant.name])
            .set(i64::try_from(entries).unwrap_or(i64::MAX));
        self.metrics
            .bytes
            .with_label_values(&[&part.tenant.name])
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    pub async fn delete(&self, tenant: &Tenant, id: &str) -> Result<(), CacheError> {
        let part = self.partition(tenant)?;
        // Ids are UUIDs; anything else cannot exist (and never reaches a store filter). Any
        // spelling of one (upper case, braces, `urn:uuid:`) names the entry stored under its
        // canonical form.
        let Ok(uuid) = uuid::Uuid::parse_str(id) else {
            return Err(CacheError::EntryNotFound(id.to_owned()));
        };
        let ids = [uuid.hyphenated().to_string()];
        let mut removed = part.store.delete_ids(&ids).await?;
        if removed.is_empty() {
            removed = self.remove_pending(&tenant.name, &ids).await?;
        }
        // Cleared even when nothing was found: a copy the hot layer may still hold of an
        // entry removed elsewhere must not outlive a DELETE that answered 404.
        self.hot.remove_id(&tenant.name, &ids[0]).await;
        if removed.is_empty() {
            part.removals.fetch_add(1, Ordering::SeqCst);
            return Err(CacheError::EntryNotFound(id.to_owned()));
        }
        self.purge(part, &removed).await;
        self.set_entries_gauge(part);
        Ok(())
    }

    /// Remove a tenant's entries matching `filter`; returns how many.
    pub async fn invalidate(
        &self,
        tenant: &Tenant,
        filter: EntryFilter,
    ) -> Result<u64, CacheError> {
        let part = self.partition(tenant)?;
        let removed = part.store.delete_where(&filter).await?;
        // What the store removed leaves every layer before anything else can fail: a pending
        // store that cannot be reached answers 503, never with the hot keys left behind.
        self.purge(part, &removed).await;
        if filter == EntryFilter::All {
            self.hot.clear_tenant(&tenant.name).await;
            part.access.lock().clear();
        }
        self.set_entries_gauge(part);
        let pending: Vec<Removed> = self
            .pending
            .remove_where(&tenant.name, &filter)
            .await?
            .iter()
            .map(removed_of)
            .collect();
        self.purge(part, &pending).await;
        Ok((removed.len() + pending.len()) as u64)
    }

    pub async fn stats(&self, tenant: &Tenant) -> Result<TenantStats, CacheError> {
        let part = self.partition(tenant)?;
        let entries = part.store.count_live(now_ms()).await?;
        let by_model = self.usage_report.usage(&tenant.name).await?;
        let total =
            |f: fn(&ModelUsage) -> u64| by_model.iter().map(f).fold(0u64, u64::saturating_add);
        let lookups = total(|u| u.lookups);
        let hits = total(|u| u.hits);
        let since = crate::vector::day_of(now_ms() - 29 * 86_400_000);
        let by_day = self.usage_report.usage_by_day(&tenant.name, &since).await?;
        Ok(TenantStats {
            tenant: tenant.name.clone(),
            entries,
            max_entries: tenant.max_entries,
            bytes: part.access.lock().bytes(),
            max_bytes: tenant.max_bytes,
            eviction: format!("{:?}", tenant.eviction).to_lowercase(),
            min_similarity: tenant.min_similarity,
            index_version: self.index_version.clone(),
            vector_index: part.store.has_vector_index(),
            resident_index: part.store.resident_index(),
            lookups,
            hits,
            hit_ratio: if lookups == 0 {
                0.0
            } else {
                hits as f64 / lookups as f64
            },
            tokens_saved: total(|u| u.tokens_saved),
            usd_saved: by_model.iter().map(|u| u.usd_saved).sum(),
            upstream_calls: total(|u| u.upstream_calls),
            tokens_used: total(|u| u.tokens_used),
            usd_spent: by_model.iter().map(|u| u.usd_spent).sum(),
            by_model,
            by_day,
            verifier: tenant.verification.as_ref().map(|v| v.verifier.clone()),
            verifier_min_score: tenant
                .verification
                .as_ref()
                .map(|v| self.min_score(part, v)),
            feedback: {
                let j = part.judgements.lock();
                FeedbackCounts {
                    right: j.right,
                    wrong: j.wrong,
                }
            },
        })
    }

    /// Account for a gateway call that went to the upstream (spend beside savings in stats).
    pub fn record_upstream(&self, tenant: &Tenant, model: &str, usage: UpstreamUsage) {
        self.usage.record(UsageEvent {
            tenant: tenant.name.clone(),
            model: model.to_owned(),
            at_ms: now_ms(),
            hit: false,
            path: None,
            entry_id: None,
            similarity: None,
            request_id: String::new(),
            tokens_saved: 0,
            usd_saved: 0.0,
            upstream: Some(usage),
        });
    }

    /// Record whether a served hit was right. A wrong one is never served again for its
    /// query and close paraphrases (or, reported without its query, for any query); with a
    /// target error rate, verdicts on verified hits move the tenant's verifier threshold.
    pub async fn feedback(
        &self,
        tenant: &Tenant,
        cmd: FeedbackCommand,
    ) -> Result<FeedbackRecorded, CacheError> {
        let part = self.partition(tenant)?;
        let canonical = |id: &str| {
            uuid::Uuid::parse_str(id)
                .map(|u| u.hyphenated().to_string())
                .map_err(|_| CacheError::EntryNotFound(id.to_owned()))
        };
        let named = cmd.entry_id.as_deref().map(canonical).transpose()?;
        let served = match &cmd.request_id {
            Some(request) => {
                let here = part.judgements.lock().served(request).cloned();
                let served = match here {
                    Some(hit) => hit,
                    // Served by another replica (or before a restart): the audit trail knows
                    // the entry, not the query.
                    None => ServedHit {
                        entry_id: self
                            .feedback
                            .served(&tenant.name, request)
                            .await?
                            .ok_or_else(|| CacheError::RequestNotFound(request.clone()))?,
                        prompt: None,
                        vector: None,
                        score: None,
                    },
                };
                if let Some(named) = &named
                    && *named != served.entry_id
                {
                    return Err(CacheError::InvalidRequest(format!(
                        "request `{request}` was served entry `{}`, not `{named}`",
                        served.entry_id
                    )));
                }
                served
            }
            None => ServedHit {
                entry_id: named.ok_or(CacheError::FeedbackTargetRequired)?,
                prompt: None,
                vector: None,
                score: None,
            },
        };
        let (prompt, vector) = match cmd.prompt.as_deref().map(normalize_prompt) {
            Some(p) if p.is_empty() => return Err(CacheError::EmptyPrompt),
            Some(p) => {
                // Close paraphrases are found by vector: embed the query when it is new.
                let vector = match &self.embedder {
                    Some(_) => self.embed_one(&tenant.name, &p).await.ok(),
                    None => None,
                };
                (Some(p), vector)
            }
            None => (served.prompt, served.vector.map(|v| v.to_vec())),
        };
        let applies_to = if prompt.is_some() || vector.is_some() {
            FeedbackScope::Query
        } else {
            FeedbackScope::Entry
        };
        let verdict = Feedback {
            seq: 0,
            tenant: tenant.name.clone(),
            entry_id: served.entry_id.clone(),
            request_id: cmd.request_id,
            correct: cmd.correct,
            prompt,
            vector,
            index_version: self.index_version.clone(),
            score: served.score,
            at_ms: now_ms(),
        };
        self.feedback.record(&verdict).await?;
        // Read back through the one path every replica uses, so it is applied exactly once.
        self.sync_feedback().await?;
        Ok(FeedbackRecorded {
            entry_id: served.entry_id,
            applies_to,
            verifier_min_score: tenant
                .verification
                .as_ref()
                .map(|v| self.min_score(part, v)),
        })
    }

    /// Apply the feedback recorded since the last call (by any replica). Called after each
    /// verdict here and periodically, so every replica sees a verdict within its period.
    pub async fn sync_feedback(&self) -> Result<usize, StoreError> {
        let mut seen = self.feedback_seen.lock().await;
        let mut applied = 0;
        loop {
            let batch = self.feedback.since(*seen, 1000).await?;
            let Some(last) = batch.last().map(|f| f.seq) else {
                break;
            };
            for f in &batch {
                if let Some(part) = self.partitions.get(&f.tenant) {
                    part.judgements.lock().apply(f);
                    self.metrics
                        .feedback
                        .with_label_values(&[
                            f.tenant.as_str(),
                            if f.correct { "right" } else { "wrong" },
                        ])
                        .inc();
                }
            }
            applied += batch.len();
            *seen = last;
        }
        for part in self.partitions.values() {
            if let Some(v) = &part.tenant.verification {
                self.metrics
                    .verifier_min_score
                    .with_label_values(&[&part.tenant.name])
                    .set(f64::from(self.min_score(part, v)));
            }
        }
        Ok(applied)
    }

    /// Drop expired entries of every tenant (at most `limit` each per call).
    pub async fn purge_expired(&self, limit: usize) {
        let now = now_ms();
        for part in self.partitions.values() {
            let ids = match part.store.expired_ids(now, limit).await {
                Ok(ids) => ids,
                Err(e) => {
                    self.store_failed(&part.tenant, "expired_ids", &e);
                    continue;
                }
            };
            if ids.is_empty() {
                continue;
            }
            match part.store.delete_ids(&ids).await {
                Ok(removed) => {
                    self.metrics
                        .evictions
                        .with_label_values(&[&part.tenant.name, "ttl"])
                        .inc_by(removed.len() as u64);
                    self.purge(part, &removed).await;
                    self.set_entries_gauge(part);
                }
                Err(e) => self.store_failed(&part.tenant, "delete_expired", &e),
            }
        }
    }

    async fn remove_pending(
        &self,
        tenant: &str,
        ids: &[String],
    ) -> Result<Vec<Removed>, CacheError> {
        Ok(self
            .pending
            .remove(tenant, ids)
            .await?
            .iter()
            .map(removed_of)
            .collect())
    }

    /// Embed stores accepted while the embedder was down and move them into the entry store,
    /// at most `limit` per tenant. Returns how many moved. Each entry stands alone: one the
    /// provider refuses (an over-long prompt, say) is abandoned at once, with a metric and a
    /// log line naming it, and never holds back the rest; one that fails for an outage is
    /// given back so the next pass (here or on another replica) retries it. A tenant's
    /// failure never stops another tenant's pass; the first error is returned once every
    /// tenant had its turn. A replica that dies holding claims loses them after
    /// `PENDING_CLAIM_MS`.
    pub async fn embed_pending(&self, limit: usize) -> Result<usize, CacheError> {
        let Some(embedder) = &self.embedder else {
            return Ok(0);
        };
        let mut moved = 0;
        let mut first_error = None;
        for part in self.partitions.values() {
            match self.embed_pending_of(embedder.as_ref(), part, limit).await {
                Ok(n) => moved += n,
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(moved),
        }
    }

    async fn embed_pending_of(
        &self,
        embedder: &dyn Embedder,
        part: &Partition,
        limit: usize,
    ) -> Result<usize, CacheError> {
        let tenant = &part.tenant.name;
        let now = now_ms();
        let claimed = self
            .pending
            .claim(tenant, limit, now, now + PENDING_CLAIM_MS)
            .await?;
        if claimed.is_empty() {
            return Ok(0);
        }
        let (live, expired): (Vec<Entry>, Vec<Entry>) =
            claimed.into_iter().partition(|p| p.expires_at_ms > now);
        // One call per text: the embedder's batching layer merges them into provider calls
        // and answers each text apart.
        let results = futures::future::join_all(
            live.iter()
                .map(|p| embedder.embed_for(tenant, std::slice::from_ref(&p.prompt))),
        )
        .await;
        let mut done: Vec<String> = expired.iter().map(|p| p.id.clone()).collect();
        let (mut retry, mut outage, mut moved) = (Vec::new(), None, 0);
        for (pending, result) in live.into_iter().zip(results) {
            let id = pending.id.clone();
            match result.map(|mut v| v.pop()) {
                Ok(Some(vector)) => {
                    let entry = Arc::new(pending.with_vector(vector));
                    let bytes = entry.footprint(self.dimension);
                    part.store.insert(entry).await?;
                    // Tracked since the store was accepted; after a restart, from now on.
                    part.access.lock().insert(&id, bytes);
                    moved += 1;
                    self.metrics
                        .pending_embedded
                        .with_label_values(&[tenant])
                        .inc();
                }
                Err(e @ EmbedError::Rejected { .. }) => {
                    tracing::warn!(
                        tenant = %tenant,
                        entry_id = %id,
                        reason = %e,
                        "abandoned a deferred store: the embedding provider refuses its prompt, so it can never answer a lookup"
                    );
                    self.hot.remove(tenant, &pending.exact_key).await;
                    part.access.lock().remove(&id);
                    self.metrics
                        .pending_abandoned
                        .with_label_values(&[tenant])
                        .inc();
                }
                Ok(None) => {
                    outage.get_or_insert_with(|| "the embedder returned no vector".to_owned());
                    retry.push(id);
                    continue;
                }
                Err(e) => {
                    outage.get_or_insert_with(|| e.to_string());
                    retry.push(id);
                    continue;
                }
            }
            done.push(id);
        }
        self.pending.remove(tenant, &done).await?;
        if !retry.is_empty() {
            self.pending.release(tenant, &retry).await?;
        }
        self.set_entries_gauge(part);
        match outage {
            Some(reason) => Err(CacheError::EmbedderUnavailable(format!(
                "{reason} for {} of tenant `{tenant}`'s deferred stores",
                retry.len()
            ))),
            None => Ok(moved),
        }
    }

    /// Flush due tails and run table maintenance for every tenant.
    pub async fn maintain(&self) {
        for part in self.partitions.values() {
            if let Err(e) = part.store.maintain().await {
                self.store_failed(&part.tenant, "maintain", &e);
            }
        }
    }

    /// Flush every tenant's write-ahead tail into its table and release leases (shutdown).
    pub async fn flush_all(&self) -> Result<(), StoreError> {
        for part in self.partitions.values() {
            part.store.shutdown().await?;
        }
        Ok(())
    }
}
