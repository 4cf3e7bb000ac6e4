//! Semantis dataplane: the semantic cache service, as adapters around the cache domain.
//!
//! Layering (see ARCHITECTURE.md): `http` (axum handlers) → `semantis_cache` (the domain, its
//! own crate, no HTTP or storage dependency) → its ports, implemented here by `store`,
//! `embed` and `verify`. `metrics` is the process's registry, the domain's metrics included;
//! `upstream` what the clients of remote services share.

pub mod config;
pub mod embed;
#[cfg(feature = "tools")]
pub mod fake_openai;
pub mod gateway;
pub mod http;
pub mod metrics;
pub mod store;
pub mod upstream;
pub mod verify;
