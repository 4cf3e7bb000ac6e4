//! The operator against a real kube-apiserver, etcd, kube-controller-manager, kube-scheduler
//! and kwok. One binary (each extra test binary re-links the world); tests run one at a time.

mod e2e {
    pub mod harness;
    mod install;
    mod lifecycle;
    mod migration;
    mod node;
    mod platform;
}
