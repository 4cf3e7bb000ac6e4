//! Access tracking for per-tenant eviction.
//!
//! Like Redis's `allkeys-lru`/`allkeys-lfu`, eviction is sampled: it looks at up to
//! [`SAMPLE`] random entries and evicts the worst, so a store costs O(1) however large the
//! tenant. With fewer entries than the sample, the choice is exact.

use std::collections::HashMap;

use rand::Rng;
use semantis_contract::EvictionPolicy;

pub const SAMPLE: usize = 32;

/// Recency is a logical clock (one tick per store or hit), so two uses within the same
/// millisecond still have an order.
#[derive(Debug, Clone, Copy)]
struct Access {
    last: u64,
    hits: u64,
    bytes: u64,
}

#[derive(Debug, Default)]
pub struct AccessTracker {
    clock: u64,
    ids: Vec<String>,
    slots: HashMap<String, usize>,
    stats: Vec<Access>,
    /// The sum of the tracked entries' footprints.
    bytes: u64,
}

impl AccessTracker {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The sum of the tracked entries' footprints.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Record a new entry of `bytes`. At startup, insert in creation order.
    pub fn insert(&mut self, id: &str, bytes: u64) {
        self.clock += 1;
        if let Some(&slot) = self.slots.get(id) {
            let s = &mut self.stats[slot];
            s.last = self.clock;
            self.bytes = self.bytes.saturating_sub(s.bytes).saturating_add(bytes);
            s.bytes = bytes;
            return;
        }
        self.slots.insert(id.to_owned(), self.ids.len());
        self.ids.push(id.to_owned());
        self.stats.push(Access {
            last: self.clock,
            hits: 0,
            bytes,
        });
        self.bytes = self.bytes.saturating_add(bytes);
    }

    /// Record a hit.
    pub fn touch(&mut self, id: &str) {
        self.clock += 1;
        if let Some(&slot) = self.slots.get(id) {
            let s = &mut self.stats[slot];
            s.last = self.clock;
            s.hits += 1;
        }
    }

    pub fn remove(&mut self, id: &str) {
        let Some(slot) = self.slots.remove(id) else {
            return;
        };
        self.ids.swap_remove(slot);
        let gone = self.stats.swap_remove(slot);
        self.bytes = self.bytes.saturating_sub(gone.bytes);
        if let Some(moved) = self.ids.get(slot) {
            self.slots.insert(moved.clone(), slot);
        }
    }

    pub fn clear(&mut self) {
        self.ids.clear();
        self.slots.clear();
        self.stats.clear();
        self.bytes = 0;
    }

    /// Pick the entry to evict under `policy`, or None when empty.
    pub fn victim(&self, policy: EvictionPolicy, protect: &str) -> Option<String> {
        let n = self.ids.len();
        let worse = |a: &Access, b: &Access| match policy {
            EvictionPolicy::Lru => a.last < b.last,
            EvictionPolicy::Lfu => (a.hits, a.last) < (b.hits, b.last),
        };
        let mut best: Option<usize> = None;
        let mut consider = |slot: usize| {
            if self.ids[slot] == protect {
                return;
            }
            if best.is_none_or(|b| worse(&self.stats[slot], &self.stats[b])) {
                best = Some(slot);
            }
        };
        if n <= SAMPLE {
            (0..n).for_each(&mut consider);
        } else {
            let mut rng = rand::rng();
            for _ in 0..SAMPLE {
                consider(rng.random_range(0..n));
            }
        }
        best.map(|slot| self.ids[slot].clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_evicts_the_least_recently_used() {
        let mut t = AccessTracker::default();
        t.insert("a", 1);
        t.insert("b", 1);
        t.insert("c", 1);
        t.touch("a");
        assert_eq!(t.victim(EvictionPolicy::Lru, "").as_deref(), Some("b"));
    }

    #[test]
    fn lfu_evicts_the_least_hit_and_breaks_ties_by_age() {
        let mut t = AccessTracker::default();
        t.insert("a", 1);
        t.insert("b", 1);
        t.insert("c", 1);
        t.touch("a");
        t.touch("a");
        t.touch("b");
        assert_eq!(t.victim(EvictionPolicy::Lfu, "").as_deref(), Some("c"));
        t.touch("c");
        t.touch("c");
        assert_eq!(t.victim(EvictionPolicy::Lfu, "").as_deref(), Some("b"));
    }

    #[test]
    fn remove_keeps_slots_consistent() {
        let mut t = AccessTracker::default();
        for id in ["a", "b", "c", "d"] {
            t.insert(id, 1);
        }
        t.remove("a");
        t.remove("c");
        assert_eq!(t.len(), 2);
        assert_eq!(t.victim(EvictionPolicy::Lru, "").as_deref(), Some("b"));
        assert_eq!(t.victim(EvictionPolicy::Lru, "b").as_deref(), Some("d"));
    }

    #[test]
    fn bytes_follow_inserts_updates_and_removals() {
        let mut t = AccessTracker::default();
        t.insert("a", 100);
        t.insert("b", 50);
        assert_eq!(t.bytes(), 150);
        t.insert("a", 10); // the same id again: replaced, not added
        assert_eq!(t.bytes(), 60);
        t.remove("b");
        t.remove("b");
        assert_eq!(t.bytes(), 10);
        t.clear();
        assert_eq!(t.bytes(), 0);
    }
}
