//! The Semantis cache domain, after linkerd2's policy-controller core: the entry model, scopes,
//! tenants and the lookup / store / delete / invalidate logic, with the ports ([`ports`]) its
//! stores, embedder and usage sink implement. It depends on no HTTP framework, database driver
//! or vector store, so the compiler keeps the domain clean; `semantis-dataplane` holds the
//! adapters (LanceDB, Redis, sqlx, candle, axum) around it.
//!
//! Layering inside: [`vector`] (math, hashing, clock) ← [`entry`], [`scope`] ← [`tenants`],
//! [`access`] ← [`ports`] ← [`cache`].

pub mod access;
pub mod cache;
pub mod chat;
pub mod entry;
pub mod error;
pub mod feedback;
pub mod index_version;
pub mod metrics;
pub mod ports;
pub mod scope;
pub mod tenants;
pub mod vector;
pub mod verify;

pub use cache::{
    Cache, CacheParts, Considered, FeedbackCommand, FeedbackCounts, FeedbackRecorded,
    FeedbackScope, Hit, HitPath, LookupOutcome, LookupQuery, MAX_TOKENS, Partition, StoreCommand,
    Stored, TenantStats, VerificationReport, VerifyOutcome,
};
pub use error::{CacheError, StoreError, StoreErrorKind};
