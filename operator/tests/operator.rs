//! Operator tests beyond the pure stages: reconcile paths against a scripted API (the ones an
//! end-to-end run rarely reaches) and Postgres provisioning against a real Postgres.
//! One integration binary for the crate.

mod operator {
    mod argocd;
    mod postgres;
    mod scripted;
}
