//! The dataplane's integration tests: one test binary (each extra binary re-links lancedb).
//! Every test starts the real `semantis-dataplane` process on loopback.

#[path = "integration/api.rs"]
mod api;
#[path = "integration/cluster.rs"]
mod cluster;
#[path = "integration/embedders.rs"]
mod embedders;
#[path = "integration/harness.rs"]
mod harness;
#[path = "integration/lifecycle.rs"]
mod lifecycle;
#[path = "integration/postgres.rs"]
mod postgres;
#[path = "integration/tools.rs"]
mod tools;
