//! LanceDB as the store of record: one table per (tenant, index version).
//!
//! LanceDB is slow at single-row appends and degrades with many small fragments, so a store
//! lands in a durable log plus an in-memory tail first. Searches brute-force the tail and ask
//! LanceDB, then merge. The tail is flushed to the table in batches; compaction, version
//! pruning and ANN index builds run in the background, driven by row and flush counts.
//!
//! - [`table`]: [`Table`], the one handle to an entry table (serving, `reindex`, `backup`).
//! - [`codec`]: the Arrow shape of an entry; [`sql`]: the predicates.
//! - [`log_state`]: the tail and pending deletes, a pure state machine fed log records.
//! - [`store`]: [`LanceEntryStore`], the `EntryStore` port: opening, replay, append, reads.
//! - [`follow`]: cluster mode, applying other replicas' records; [`flush`]: the lease and
//!   the flush; [`fence`]: the file lock that keeps a stalled former leader from writing
//!   after its successor; [`maintain`]: compaction and index builds; [`resident_load`]: the
//!   resident index's life cycle.

pub mod codec;
pub mod fence;
mod flush;
mod follow;
pub mod log_state;
mod maintain;
mod resident_load;
pub mod sql;
mod store;
pub mod table;

pub use store::{LanceEntryStore, LogConfig};
pub use table::{Table, table_dir, table_name};
