//! The dataplane's integration tests: one test binary (each extra binary re-links lancedb).
//! Every test starts the real `semantis-dataplane` process on loopback.

#[path = "integration/admission.rs"]
mod admission;
#[path = "integration/api.rs"]
mod api;
#[path = "integration/backup.rs"]
mod backup;
#[path = "integration/cluster.rs"]
mod cluster;
#[path = "integration/embedders.rs"]
mod embedders;
#[path = "integration/faults.rs"]
mod faults;
#[path = "integration/fuzz.rs"]
mod fuzz;
#[path = "integration/gateway.rs"]
mod gateway;
#[path = "integration/harness.rs"]
mod harness;
#[path = "integration/lifecycle.rs"]
mod lifecycle;
#[path = "integration/migration.rs"]
mod migration;
#[path = "integration/postgres.rs"]
mod postgres;
#[path = "integration/tools.rs"]
mod tools;
#[path = "integration/verifiers.rs"]
mod verifiers;
