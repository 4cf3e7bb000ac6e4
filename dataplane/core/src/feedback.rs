//! What users said about served hits, per tenant: entries reported wrong for a query (never
//! served again for it or its close paraphrases), the counts, and the verifier threshold that
//! a target error rate asks for. Also the tenant's recent hits, so feedback can name a request
//! instead of repeating its query. Pure bookkeeping: the cache feeds it, the feedback store
//! keeps it durable.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::ports::Feedback;
use crate::vector::cosine_similarity as cosine;

/// A query at least this close (cosine) to one an entry was reported wrong for is a close
/// paraphrase of it: the entry is not served for it either.
pub const PARAPHRASE_SIMILARITY: f32 = 0.9;

/// Verdicts on verified hits a target error rate needs before it moves the threshold.
pub const MIN_LABELS: usize = 20;

/// How many verdicts with scores the threshold is computed from (the most recent).
const MAX_LABELS: usize = 2000;

/// How many recent hits per tenant feedback can name by request id.
pub const RECENT_HITS: usize = 4096;

/// One served hit, remembered so feedback can name it by its request id.
#[derive(Debug, Clone)]
pub struct ServedHit {
    pub entry_id: String,
    /// The query, normalised.
    pub prompt: Option<String>,
    pub vector: Option<Arc<[f32]>>,
    pub score: Option<f32>,
}

/// A query an entry was reported wrong for.
#[derive(Debug, Clone)]
struct Negative {
    /// `None`: reported without its query, so wrong for every query.
    prompt: Option<String>,
    vector: Option<Vec<f32>>,
    index_version: String,
}

/// One tenant's judgements.
#[derive(Debug, Default)]
pub struct Judgements {
    negatives: HashMap<String, Vec<Negative>>,
    pub right: u64,
    pub wrong: u64,
    /// (verifier score, correct) of verdicts on verified hits, oldest first.
    labels: VecDeque<(f32, bool)>,
    recent: HashMap<String, ServedHit>,
    recent_order: VecDeque<String>,
}

impl Judgements {
    /// Take in one verdict (recorded here or read back from the store).
    pub fn apply(&mut self, f: &Feedback) {
        if f.correct {
            self.right += 1;
        } else {
            self.wrong += 1;
            self.negatives
                .entry(f.entry_id.clone())
                .or_default()
                .push(Negative {
                    prompt: f.prompt.clone(),
                    vector: f.vector.clone(),
                    index_version: f.index_version.clone(),
                });
        }
        if let Some(score) = f.score {
            if self.labels.len() == MAX_LABELS {
                self.labels.pop_front();
            }
            self.labels.push_back((score, f.correct));
        }
    }

    /// Whether entry `id` was reported wrong for this query or one it closely paraphrases.
    /// `prompt` is the normalised query; `vector` its embedding in `index_version`.
    pub fn rejects(
        &self,
        id: &str,
        prompt: Option<&str>,
        vector: Option<&[f32]>,
        index_version: &str,
    ) -> bool {
        let Some(negatives) = self.negatives.get(id) else {
            return false;
        };
        negatives.iter().any(|n| match (&n.prompt, prompt) {
            (None, _) => true,
            (Some(p), Some(q)) if p == q => true,
            _ => match (&n.vector, vector) {
                (Some(a), Some(b)) if n.index_version == index_version && a.len() == b.len() => {
                    cosine(a, b) >= PARAPHRASE_SIMILARITY
                }
                _ => false,
            },
        })
    }

    /// Whether any entry has been reported wrong (the common case is none: lookups skip the
    /// check).
    pub fn has_negatives(&self) -> bool {
        !self.negatives.is_empty()
    }

    /// Forget the verdicts on entries that no longer exist.
    pub fn forget_entries<'a>(&mut self, ids: impl IntoIterator<Item = &'a str>) {
        for id in ids {
            self.negatives.remove(id);
        }
    }

    /// The verifier threshold a tenant with `base` and a target error rate should use: the
    /// lowest score at or above `base` above which at most `target` of the verdicts were
    /// wrong. It only ever rises above `base`: a verdict exists only for a served hit, so
    /// nothing is known of what a lower threshold would serve.
    pub fn threshold(&self, base: f32, target: Option<f32>) -> f32 {
        let Some(target) = target else { return base };
        if self.labels.len() < MIN_LABELS {
            return base;
        }
        let mut labels: Vec<(f32, bool)> = self.labels.iter().copied().collect();
        labels.sort_by(|a, b| b.0.total_cmp(&a.0));
        // Walk down from the highest score; the lowest cut that keeps the error rate within
        // target wins.
        let (mut n, mut wrong) = (0usize, 0usize);
        let mut best: Option<f32> = None;
        for (score, correct) in labels {
            if score < base {
                break;
            }
            n += 1;
            if !correct {
                wrong += 1;
            }
            if wrong as f32 <= target * n as f32 {
                best = Some(score);
            }
        }
        match best {
            Some(t) => t.max(base),
            // Every cut is too wrong: serve only above everything reported.
            None => 1.0,
        }
    }

    /// Remember a served hit under its request id, dropping the oldest past the bound.
    pub fn remember(&mut self, request_id: &str, hit: ServedHit) {
        if self.recent.insert(request_id.to_owned(), hit).is_none() {
            self.recent_order.push_back(request_id.to_owned());
        }
        while self.recent_order.len() > RECENT_HITS {
            if let Some(old) = self.recent_order.pop_front() {
                self.recent.remove(&old);
            }
        }
    }

    pub fn served(&self, request_id: &str) -> Option<&ServedHit> {
        self.recent.get(request_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(
        entry: &str,
        correct: bool,
        prompt: Option<&str>,
        vector: Option<Vec<f32>>,
    ) -> Feedback {
        Feedback {
            seq: 0,
            tenant: "t".into(),
            entry_id: entry.into(),
            request_id: None,
            correct,
            prompt: prompt.map(str::to_owned),
            vector,
            index_version: "v1".into(),
            score: None,
            at_ms: 0,
        }
    }

    #[test]
    fn a_wrong_verdict_rejects_its_query_and_close_paraphrases_only() {
        let mut j = Judgements::default();
        j.apply(&verdict(
            "e1",
            false,
            Some("how do i sort a list"),
            Some(vec![1.0, 0.0]),
        ));
        assert!(j.rejects("e1", Some("how do i sort a list"), None, "v1"));
        // A paraphrase close in vector space.
        assert!(j.rejects("e1", Some("sorting a list?"), Some(&[0.99, 0.1]), "v1"));
        // Far away: another question the entry may answer.
        assert!(!j.rejects("e1", Some("reverse a list"), Some(&[0.0, 1.0]), "v1"));
        // Vectors of another index version are not compared.
        assert!(!j.rejects("e1", Some("sorting a list?"), Some(&[0.99, 0.1]), "v2"));
        assert!(!j.rejects("e2", Some("how do i sort a list"), None, "v1"));
        // Reported without a query: wrong for every query.
        j.apply(&verdict("e3", false, None, None));
        assert!(j.rejects("e3", Some("anything"), None, "v1"));
        assert_eq!((j.right, j.wrong), (0, 2));
        j.forget_entries(["e1"]);
        assert!(!j.rejects("e1", Some("how do i sort a list"), None, "v1"));
    }

    #[test]
    fn a_target_error_rate_raises_the_threshold_past_the_wrong_verdicts() {
        let mut j = Judgements::default();
        let scored = |score: f32, correct| Feedback {
            score: Some(score),
            ..verdict("e", correct, None, None)
        };
        for i in 0..30 {
            // Wrong answers cluster at low scores.
            let score = 0.5 + i as f32 * 0.015;
            j.apply(&scored(score, i >= 10));
        }
        assert_eq!(j.threshold(0.5, None), 0.5, "no target: the base");
        let t = j.threshold(0.5, Some(0.05));
        assert!(t > 0.5 + 9.0 * 0.015 - 1e-6, "above the wrong ones: {t}");
        assert!(j.threshold(0.9, Some(0.05)) >= 0.9, "never below the base");
        let mut few = Judgements::default();
        few.apply(&scored(0.6, false));
        assert_eq!(
            few.threshold(0.5, Some(0.01)),
            0.5,
            "too few verdicts to move"
        );
    }

    #[test]
    fn recent_hits_are_bounded() {
        let mut j = Judgements::default();
        for i in 0..(RECENT_HITS + 10) {
            j.remember(
                &format!("r{i}"),
                ServedHit {
                    entry_id: format!("e{i}"),
                    prompt: None,
                    vector: None,
                    score: None,
                },
            );
        }
        assert!(j.served("r0").is_none());
        assert_eq!(
            j.served(&format!("r{}", RECENT_HITS + 9))
                .map(|h| h.entry_id.as_str()),
            Some(format!("e{}", RECENT_HITS + 9).as_str())
        );
        assert_eq!(j.recent.len(), RECENT_HITS);
    }
}
