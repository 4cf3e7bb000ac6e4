//! This replica's view of a table's log: the entries not yet in the table (the tail) and the
//! deletes not yet applied to it. Every replica applies the same records in the same order,
//! so any of them can take over flushing. Pure state, no I/O: the serving store holds it
//! under a lock and feeds it log records.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use semantis_cache::entry::{Entry, EntryFilter};

use super::sql;
use crate::store::redis_log::Pos;

/// A delete that is in the log but not yet applied to the LanceDB table. Until the flush that
/// applies it, reads hide matching table rows (the tail already dropped its own).
#[derive(Debug, Clone, PartialEq)]
pub enum PendingDelete {
    Ids(Vec<String>),
    Where(EntryFilter),
}

impl PendingDelete {
    /// True for the table rows this delete removes.
    pub fn predicate(&self) -> String {
        match self {
            Self::Ids(ids) => sql::ids_in(ids),
            Self::Where(f) => format!("({})", sql::filter(f)),
        }
    }

    fn covers(&self, e: &Entry) -> bool {
        match self {
            Self::Ids(list) => list.contains(&e.id),
            Self::Where(f) => f.matches(e),
        }
    }
}

/// What a flush up to some position writes: the tail's entries and the deletes before it.
#[derive(Debug, Default)]
pub struct FlushBatch {
    pub entries: Vec<Arc<Entry>>,
    pub deletes: Vec<PendingDelete>,
}

impl FlushBatch {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.deletes.is_empty()
    }
}

#[derive(Default)]
pub struct LogState {
    tail: Vec<(Pos, Arc<Entry>)>,
    tail_ids: HashSet<String>,
    pending: Vec<(Pos, PendingDelete)>,
    oldest: Option<Instant>,
    /// Cluster mode: records this replica appended and already applied (the follower skips
    /// them when they come back from the stream).
    pub applied_own: HashSet<Pos>,
}

impl LogState {
    /// A stored entry. The first put of an id wins until a delete or flush removes it.
    pub fn apply_put(&mut self, pos: Pos, entry: Arc<Entry>) {
        if self.tail_ids.insert(entry.id.clone()) {
            self.tail.push((pos, entry));
            self.oldest.get_or_insert_with(Instant::now);
        }
    }

    /// A delete: drops matching tail entries now, hides matching table rows until flushed.
    pub fn apply_delete(&mut self, pos: Pos, op: PendingDelete) {
        let ids = &mut self.tail_ids;
        self.tail.retain(|(_, e)| {
            let gone = op.covers(e);
            if gone {
                ids.remove(&e.id);
            }
            !gone
        });
        self.pending.push((pos, op));
    }

    /// Everything up to `upto` is in the table now.
    pub fn apply_flushed(&mut self, upto: Pos) {
        let ids = &mut self.tail_ids;
        self.tail.retain(|(pos, e)| {
            let keep = *pos > upto;
            if !keep {
                ids.remove(&e.id);
            }
            keep
        });
        self.pending.retain(|(pos, _)| *pos > upto);
        self.oldest = (!self.tail.is_empty()).then(Instant::now);
    }

    /// Drop the tail's entries up to `upto` but keep the pending deletes (a replica that
    /// missed records: the table holds those entries, or their deletes).
    pub fn forget_tail(&mut self, upto: Pos) {
        let ids = &mut self.tail_ids;
        self.tail.retain(|(pos, e)| {
            let keep = *pos > upto;
            if !keep {
                ids.remove(&e.id);
            }
            keep
        });
        self.oldest = (!self.tail.is_empty()).then(Instant::now);
    }

    /// What a flush up to `upto` must write.
    pub fn flush_batch(&self, upto: Pos) -> FlushBatch {
        FlushBatch {
            entries: self
                .tail
                .iter()
                .filter(|(pos, _)| *pos <= upto)
                .map(|(_, e)| e.clone())
                .collect(),
            deletes: self
                .pending
                .iter()
                .filter(|(pos, _)| *pos <= upto)
                .map(|(_, op)| op.clone())
                .collect(),
        }
    }

    /// SQL that is true for table rows a pending delete has removed.
    pub fn hidden_sql(&self) -> Option<String> {
        let parts: Vec<String> = self.pending.iter().map(|(_, op)| op.predicate()).collect();
        (!parts.is_empty()).then(|| parts.join(" OR "))
    }

    /// `base` with the rows hidden by pending deletes taken out.
    pub fn visible(&self, base: String) -> String {
        match self.hidden_sql() {
            Some(hidden) => format!("({base}) AND NOT ({hidden})"),
            None => base,
        }
    }

    /// The entries not in the table yet, oldest first.
    pub fn tail(&self) -> impl DoubleEndedIterator<Item = &Arc<Entry>> {
        self.tail.iter().map(|(_, e)| e)
    }

    pub fn tail_len(&self) -> usize {
        self.tail.len()
    }

    pub fn has_pending_deletes(&self) -> bool {
        !self.pending.is_empty()
    }

    pub fn is_empty(&self) -> bool {
        self.tail.is_empty() && self.pending.is_empty()
    }

    /// When the oldest tail entry arrived (`None` with an empty tail).
    pub fn oldest(&self) -> Option<Instant> {
        self.oldest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, scope: &str) -> Arc<Entry> {
        Arc::new(Entry {
            id: id.into(),
            scope: scope.into(),
            namespace: String::new(),
            exact_key: format!("k-{id}"),
            prompt: "p".into(),
            vector: Arc::from(vec![1.0f32]),
            response: Arc::from(b"{}".to_vec()),
            model: String::new(),
            created_at_ms: 1,
            expires_at_ms: i64::MAX,
            prompt_tokens: 0,
            completion_tokens: 0,
            cost_usd: 0.0,
            metadata: "{}".into(),
        })
    }

    fn tail_ids(st: &LogState) -> Vec<&str> {
        st.tail().map(|e| e.id.as_str()).collect()
    }

    #[test]
    fn a_put_is_kept_once_until_its_flush() {
        let mut st = LogState::default();
        st.apply_put(1, entry("a", "s"));
        st.apply_put(2, entry("a", "s"));
        st.apply_put(3, entry("b", "s"));
        assert_eq!(tail_ids(&st), ["a", "b"]);
        assert!(st.oldest().is_some());
        let batch = st.flush_batch(2);
        assert_eq!(
            batch.entries.len(),
            1,
            "only what precedes the flush position"
        );
        st.apply_flushed(2);
        assert_eq!(tail_ids(&st), ["b"]);
        st.apply_flushed(3);
        assert!(st.is_empty());
        assert!(st.oldest().is_none());
        // After its flush an id may be put again (a re-store after a delete).
        st.apply_put(4, entry("a", "s"));
        assert_eq!(tail_ids(&st), ["a"]);
    }

    #[test]
    fn a_delete_drops_the_tail_at_once_and_hides_table_rows_until_flushed() {
        let mut st = LogState::default();
        st.apply_put(1, entry("a", "s"));
        st.apply_put(2, entry("b", "t"));
        st.apply_delete(3, PendingDelete::Ids(vec!["a".into(), "x".into()]));
        assert_eq!(tail_ids(&st), ["b"]);
        st.apply_delete(4, PendingDelete::Where(EntryFilter::Scope("t".into())));
        assert!(st.tail().next().is_none());
        assert!(st.has_pending_deletes());
        assert_eq!(
            st.visible("expires_at > 0".into()),
            "(expires_at > 0) AND NOT (id IN ('a','x') OR (scope = 't'))"
        );
        let batch = st.flush_batch(3);
        assert_eq!(
            batch.deletes,
            [PendingDelete::Ids(vec!["a".into(), "x".into()])]
        );
        st.apply_flushed(3);
        assert_eq!(st.hidden_sql().as_deref(), Some("(scope = 't')"));
        st.apply_flushed(4);
        assert_eq!(st.visible("true".into()), "true");
    }

    #[test]
    fn forgetting_the_tail_after_a_gap_keeps_the_pending_deletes() {
        let mut st = LogState::default();
        st.apply_put(1, entry("a", "s"));
        st.apply_delete(2, PendingDelete::Ids(vec!["x".into()]));
        st.apply_put(3, entry("b", "s"));
        st.forget_tail(2);
        assert_eq!(tail_ids(&st), ["b"], "only what came after the cut stays");
        assert!(
            st.has_pending_deletes(),
            "table rows stay hidden until the refresh"
        );
        st.apply_flushed(2);
        assert!(!st.has_pending_deletes());
        assert_eq!(tail_ids(&st), ["b"]);
    }

    #[test]
    fn a_put_after_a_delete_of_the_same_id_survives_it() {
        let mut st = LogState::default();
        st.apply_put(1, entry("a", "s"));
        st.apply_delete(2, PendingDelete::Ids(vec!["a".into()]));
        st.apply_put(3, entry("a", "s"));
        assert_eq!(tail_ids(&st), ["a"]);
        let batch = st.flush_batch(3);
        assert_eq!(batch.deletes.len(), 1);
        assert_eq!(
            batch.entries.len(),
            1,
            "the flush deletes first, then writes the new put"
        );
    }
}
