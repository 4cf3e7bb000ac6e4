//! The end-to-end suite lives in `tests/e2e.rs`; this crate has no library code.
