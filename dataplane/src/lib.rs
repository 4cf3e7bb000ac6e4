//! Semantis dataplane: the semantic cache service.
//!
//! Layering (see ARCHITECTURE.md): `http` (axum handlers) → `cache` (the domain, no HTTP) →
//! `store` and `embed` (behind traits). `metrics` is shared by all.

pub mod cache;
pub mod config;
pub mod embed;
pub mod http;
pub mod metrics;
pub mod store;
