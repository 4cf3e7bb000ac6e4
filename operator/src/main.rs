//! `semantis-operator`: `run` reconciles SemanticCaches; `crd` writes (or checks) `crds/`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use axum::Router;
use axum::routing::get;
use clap::{Parser, Subcommand};
use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use semantis_operator::metrics::Metrics;
use semantis_operator::reconcile::{self, Context};
use semantis_operator::validate::OperatorDefaults;
use semantis_operator::{CRD_FILE, crd_yaml};

#[derive(Parser)]
#[command(name = "semantis-operator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Reconcile SemanticCache resources.
    Run(RunArgs),
    /// Write the CRD YAML into a directory (default `crds/`), or check that it is current.
    Crd {
        #[arg(long, default_value = "crds")]
        out: PathBuf,
        /// Fail instead of writing when the file differs from the Rust types.
        #[arg(long)]
        check: bool,
        /// Print to stdout instead of writing.
        #[arg(long, conflicts_with_all = ["check"])]
        stdout: bool,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Namespaces to watch: repeat the flag or separate with commas (default: all namespaces).
    #[arg(
        long = "namespace",
        env = "SEMANTIS_WATCH_NAMESPACES",
        value_delimiter = ','
    )]
    namespaces: Vec<String>,
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, env = "SEMANTIS_METRICS_LISTEN", default_value = "0.0.0.0:8081")]
    metrics_listen: SocketAddr,
    /// Take the leader Lease before reconciling, so replicas stand by.
    #[arg(long, env = "SEMANTIS_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Namespace of the leader Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Name of the leader Lease.
    #[arg(long, default_value = "semantis-operator")]
    lease_name: String,
    /// Lease duration in seconds: how long a crashed leader blocks a standby.
    #[arg(long, default_value_t = 15)]
    lease_duration_secs: u64,
    /// Dataplane image used when a SemanticCache does not name one.
    #[arg(
        long,
        env = "SEMANTIS_DATAPLANE_IMAGE",
        default_value = concat!("ghcr.io/semantis/semantis-dataplane:", env!("CARGO_PKG_VERSION"))
    )]
    dataplane_image: String,
    /// Redis image used when a SemanticCache does not name one.
    #[arg(long, env = "SEMANTIS_REDIS_IMAGE", default_value = semantis_operator::validate::DEFAULT_REDIS_IMAGE)]
    redis_image: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Fails only when a provider is already installed, which is what we want anyway.
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Crd { out, check, stdout } => crd(out, check, stdout),
        Command::Run(args) => run(args).await,
    }
}

fn crd(out: PathBuf, check: bool, stdout: bool) -> anyhow::Result<()> {
    let yaml = crd_yaml().context("failed to render the CRD")?;
    if stdout {
        print!("{yaml}");
        return Ok(());
    }
    let path = out.join(CRD_FILE);
    if check {
        let current = std::fs::read_to_string(&path)
            .with_context(|| format!("failed to read {}", path.display()))?;
        if current != yaml {
            bail!(
                "{} is out of date with the Rust types; run `semantis-operator crd` and commit it",
                path.display()
            );
        }
        println!("{} is current", path.display());
        return Ok(());
    }
    std::fs::create_dir_all(&out).with_context(|| format!("failed to create {}", out.display()))?;
    std::fs::write(&path, yaml).with_context(|| format!("failed to write {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "failed to listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "failed to listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .context("failed to build a Kubernetes client from the kubeconfig or service account")?;
    let metrics = Arc::new(Metrics::new()?);
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));

    let listener = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| format!("failed to listen on {}", args.metrics_listen))?;
    let app = {
        let metrics = metrics.clone();
        let ready = ready.clone();
        Router::new()
            .route("/metrics", get(move || async move { metrics.render() }))
            .route("/healthz", get(|| async { "ok" }))
            .route(
                "/readyz",
                get(move || async move {
                    // Ready once the controller runs (leader) or stands by (follower).
                    if ready.load(std::sync::atomic::Ordering::Relaxed) {
                        (axum::http::StatusCode::OK, "ready")
                    } else {
                        (axum::http::StatusCode::SERVICE_UNAVAILABLE, "starting")
                    }
                }),
            )
    };
    tracing::info!(listen = %args.metrics_listen, "serving metrics and probes");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });

    let ctx = Arc::new(Context {
        client: client.clone(),
        defaults: OperatorDefaults {
            dataplane_image: args.dataplane_image.clone(),
            redis_image: args.redis_image.clone(),
        },
        metrics: metrics.clone(),
        recorder: reconcile::recorder(client.clone()),
    });

    if !args.leader_election {
        ready.store(true, std::sync::atomic::Ordering::Relaxed);
        metrics.leader.set(1);
        reconcile::run(ctx, args.namespaces, shutdown_signal()).await;
        return Ok(());
    }

    let identity = std::env::var("POD_NAME").unwrap_or_else(|_| {
        format!(
            "{}-{}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "semantis-operator".into()),
            std::process::id()
        )
    });
    let manager = LeaseManagerBuilder::new(client.clone(), &args.lease_name)
        .with_namespace(&args.lease_namespace)
        .with_identity(&identity)
        .with_duration(args.lease_duration_secs)
        .with_grace(args.lease_duration_secs.div_ceil(3).max(2))
        .with_field_manager(reconcile::FIELD_MANAGER)
        .build()
        .await
        .context("failed to set up leader election")?;
    let (mut leading, lease_task) = manager.watch().await;
    ready.store(true, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(%identity, lease = %args.lease_name, "waiting for the leader lease");

    let mut stop = Box::pin(shutdown_signal());
    loop {
        if *leading.borrow_and_update() {
            break;
        }
        tokio::select! {
            changed = leading.changed() => {
                changed.context("failed to follow the leader lease")?;
            }
            _ = &mut stop => {
                tracing::info!("stopping while standing by");
                return Ok(());
            }
        }
    }
    tracing::info!(%identity, "acquired the leader lease; reconciling");
    metrics.leader.set(1);

    // Stop reconciling on a signal or when the lease is lost; a process that lost the lease
    // exits, so it can never act as a second leader.
    let (lost_tx, lost_rx) = tokio::sync::oneshot::channel::<()>();
    let mut watch_lease = leading.clone();
    let lease_follower = tokio::spawn(async move {
        while watch_lease.changed().await.is_ok() {
            if !*watch_lease.borrow() {
                break;
            }
        }
        let _ = lost_tx.send(());
    });
    let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let lost_flag = lost.clone();
    let until = async move {
        tokio::select! {
            _ = stop => {},
            _ = lost_rx => { lost_flag.store(true, std::sync::atomic::Ordering::Relaxed); }
        }
    };
    reconcile::run(ctx, args.namespaces, until).await;
    metrics.leader.set(0);
    // Dropping every receiver makes the lease task release the lease for a standby.
    lease_follower.abort();
    let _ = lease_follower.await;
    drop(leading);
    match lease_task.await {
        Ok(Ok(_)) => tracing::info!("released the leader lease"),
        Ok(Err(e)) => tracing::warn!(error = %e, "failed to release the leader lease"),
        Err(e) => tracing::warn!(error = %e, "the lease task ended abnormally"),
    }
    if lost.load(std::sync::atomic::Ordering::Relaxed) {
        bail!("lost the leader lease");
    }
    Ok(())
}
