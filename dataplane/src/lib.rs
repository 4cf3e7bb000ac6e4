//! Semantis dataplane: the semantic cache service, as adapters around the cache domain.
//!
//! Layering (see ARCHITECTURE.md): `http` (axum handlers) → `semantis_cache` (the domain, its
//! own crate, no HTTP or storage dependency) → its ports, implemented here by `store` and
//! `embed`. `metrics` is the process's registry, the domain's metrics included.

pub mod config;
pub mod embed;
pub mod http;
pub mod metrics;
pub mod store;
