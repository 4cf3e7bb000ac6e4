//! `serve`: wire the stores, the embedder and the cache domain from the configuration, run the
//! HTTP server and the background maintainers, and shut down gracefully (drain in-flight
//! requests, then flush every write-ahead tail into LanceDB).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use redis::IntoConnectionInfo;
use semantis_cache::index_version::IndexVersionState;
use semantis_cache::tenants::TenantRegistry;
use semantis_cache::vector::now_ms;
use semantis_cache::{Cache, CacheParts, Partition};
use semantis_contract::{DataplaneConfig, EmbedderConfig, EmbeddingProvider};
use semantis_dataplane::embed::layers::{Batched, Cached};
use semantis_dataplane::embed::local::LocalEmbedder;
use semantis_dataplane::embed::remote::RemoteEmbedder;
use semantis_dataplane::embed::{EmbedError, Embedder, fingerprint};
use semantis_dataplane::http::{AppState, metrics_router, router};
use semantis_dataplane::metrics::Metrics;
use semantis_dataplane::store::dual::DualEntryStore;
use semantis_dataplane::store::hot::InProcessHotLayer;
use semantis_dataplane::store::lance::fence::fence_path;
use semantis_dataplane::store::lance::{LanceEntryStore, LogConfig, table_name};
use semantis_dataplane::store::metadata::{MetadataStore, QueuedUsage};
use semantis_dataplane::store::redis_hot::RedisHotLayer;
use semantis_dataplane::store::redis_log::connect;
use semantis_dataplane::store::versions::prepare_target;
use semantis_dataplane::store::{EntryStore, HotLayer, Probe, RedisProbe, UsageSink};
use tokio::task::JoinHandle;

/// Hot-layer capacity in embedded mode, in bytes across all tenants (about 100,000 entries
/// of 2 KB; Redis holds it in cluster mode).
const HOT_LAYER_BYTES: u64 = 256 * 1024 * 1024;

pub struct Built {
    pub cache: Arc<Cache>,
    /// The metadata store the cache's pending and usage ports are backed by (index versions,
    /// retirement and the usage writer use it directly).
    pub metadata: MetadataStore,
    pub probes: Vec<Arc<dyn Probe>>,
    pub usage_writer: JoinHandle<()>,
    /// Cluster mode's Redis, for the gateway's rate-limit windows.
    pub redis: Option<redis::aio::ConnectionManager>,
}

/// The embedder `e` describes, with batching and (when configured) its cache in front.
pub async fn load_embedder(
    e: &EmbedderConfig,
    metrics: &Arc<Metrics>,
    redis: Option<redis::aio::ConnectionManager>,
) -> anyhow::Result<Option<Arc<dyn Embedder>>> {
    let (provider, workers): (Arc<dyn Embedder>, usize) = match e.provider {
        EmbeddingProvider::None => return Ok(None),
        EmbeddingProvider::Local => {
            let dir = semantis_dataplane::config::embedder_model_dir(e)
                .context("failed to locate the local model: set embedder.model_dir")?;
            let started = std::time::Instant::now();
            let model = LocalEmbedder::load(&dir, e).with_context(|| {
                format!(
                    "failed to load the local embedding model from {} (run scripts/fetch-model.sh)",
                    dir.display()
                )
            })?;
            tracing::info!(dir = %dir.display(), ms = started.elapsed().as_millis() as u64, "loaded the local embedding model");
            // CPU-bound: one batch at a time uses the cores best.
            (Arc::new(model), 1)
        }
        EmbeddingProvider::Openai | EmbeddingProvider::Ollama | EmbeddingProvider::Tei => {
            let remote = RemoteEmbedder::new(e, metrics.clone())
                .context("failed to configure the embedding provider")?;
            // Check what the provider really returns (dimension included) at startup. A wrong
            // answer stops startup; no answer does not: a replica restarting during a provider
            // outage serves exact hits and defers stores like one that was already running.
            match remote.embed(&["semantis dimension probe".to_owned()]).await {
                Ok(_) => {}
                // Misconfiguration (wrong dimension, key, model or URL) never heals by waiting.
                Err(
                    err @ (EmbedError::Dimension { .. }
                    | EmbedError::Rejected { .. }
                    | EmbedError::Http {
                        status: 400..=428 | 430..=499,
                        ..
                    }),
                ) => {
                    return Err(err).with_context(|| {
                        format!(
                            "failed to check the `{}` embedding provider at startup",
                            e.provider.as_str()
                        )
                    });
                }
                Err(err) => tracing::warn!(
                    provider = e.provider.as_str(),
                    error = %err,
                    "the embedding provider does not answer at startup; serving degraded until it does"
                ),
            }
            (Arc::new(remote), 4)
        }
    };
    let batched: Arc<dyn Embedder> = Arc::new(Batched::new(
        provider,
        e.max_batch,
        workers,
        metrics.clone(),
    ));
    if e.cache_entries == 0 {
        return Ok(Some(batched));
    }
    Ok(Some(Arc::new(Cached::new(
        batched,
        e.cache_entries,
        Duration::from_secs(e.cache_ttl_secs),
        redis.map(|conn| (conn, fingerprint(e))),
        metrics.clone(),
    ))))
}

/// Postgres in cluster mode, else SQLite in the data directory; migrated on open.
pub async fn open_metadata(
    cfg: &DataplaneConfig,
    data_dir: &std::path::Path,
) -> anyhow::Result<MetadataStore> {
    let metadata = match &cfg.postgres {
        Some(pg) => {
            let password = match &pg.password_file {
                Some(path) => Some(
                    std::fs::read_to_string(path)
                        .with_context(|| {
                            format!("failed to read the Postgres password file {path}")
                        })?
                        .trim()
                        .to_owned(),
                ),
                None => None,
            };
            MetadataStore::open_postgres(&pg.url, password.as_deref())
                .await
                .context("failed to open the Postgres metadata store")?
        }
        None => MetadataStore::open_sqlite(&data_dir.join("metadata.sqlite"))
            .await
            .context("failed to open the SQLite metadata store")?,
    };
    Ok(metadata)
}

pub async fn build(cfg: &DataplaneConfig, metrics: Arc<Metrics>) -> anyhow::Result<Built> {
    let verifiers =
        semantis_dataplane::verify::load(cfg, &metrics).context("failed to load the verifiers")?;
    let registry = TenantRegistry::with_verifiers(cfg, &verifiers.defaults)
        .context("failed to load the tenants")?;
    for t in registry.all() {
        match &t.verification {
            Some(v) => {
                tracing::info!(tenant = %t.name, verifier = %v.verifier, min_score = v.min_score, min_similarity = t.min_similarity, "semantic hits are verified")
            }
            None => {
                tracing::info!(tenant = %t.name, min_similarity = t.min_similarity, "semantic hits are decided by cosine similarity alone")
            }
        }
    }
    let data_dir = PathBuf::from(&cfg.storage.data_dir);
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("failed to create the data directory {}", data_dir.display()))?;
    let index_version = fingerprint(&cfg.embedder);
    let dimension = cfg.embedder.dimension;
    // A migration target other than the active embedder: dual writes (see store::dual).
    let target = cfg
        .target_embedder
        .as_ref()
        .filter(|t| t.fingerprint() != index_version);

    let metadata = open_metadata(cfg, &data_dir).await?;
    let db = lancedb::connect(&data_dir.join("lance").to_string_lossy())
        .execute()
        .await
        .with_context(|| format!("failed to open LanceDB in {}", data_dir.display()))?;
    let wal_root = data_dir.join("wal");
    // Cluster mode: Redis carries the write-ahead log and the exact-match layer.
    let redis = connect_redis(cfg).await?;
    let embedder = load_embedder(
        &cfg.embedder,
        &metrics,
        redis.as_ref().map(|(_, c)| c.clone()),
    )
    .await?;
    let target = match target {
        Some(t) => {
            let e = load_embedder(t, &metrics, redis.as_ref().map(|(_, c)| c.clone()))
                .await
                .context("failed to load the migration target's embedder")?
                .context("failed to start: the migration target needs an embedding provider")?;
            Some((t, t.fingerprint(), e))
        }
        None => None,
    };
    // The pod name in Kubernetes; unique per process elsewhere.
    let replica = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .map_or_else(
            || uuid::Uuid::now_v7().to_string(),
            |h| format!("{h}-{}", std::process::id()),
        );

    let mut partitions = Vec::new();
    let mut resident_loads = Vec::new();
    for tenant in registry.all() {
        // One table per (tenant, index version).
        let table = table_name(&tenant.name, &index_version);
        let log = || match &redis {
            Some((client, conn)) => LogConfig::Redis {
                client,
                conn,
                replica: &replica,
            },
            None => LogConfig::File { root: &wal_root },
        };
        let now = now_ms();
        check_index_version(&metadata, &tenant.name, &index_version, dimension, now).await?;
        metadata.register_tenant(&tenant.name, now).await?;
        let active = LanceEntryStore::open(
            &db,
            log(),
            &tenant.name,
            &table,
            dimension,
            cfg.storage.clone(),
            metrics.clone(),
        )
        .await
        .with_context(|| format!("failed to open the entry store of tenant `{}`", tenant.name))?;
        let seen = active
            .all_ids()
            .await
            .with_context(|| format!("failed to scan the entries of tenant `{}`", tenant.name))?;
        resident_loads.push(active.clone());
        let mut store: Arc<dyn EntryStore> = active;
        if let Some((t, target_fp, target_embedder)) = &target {
            let target_table = table_name(&tenant.name, target_fp);
            prepare_target(&db, &metadata, &tenant.name, target_fp, t.dimension, now)
                .await
                .with_context(|| {
                    format!(
                        "failed to prepare the migration target of tenant `{}`",
                        tenant.name
                    )
                })?;
            let target_store = LanceEntryStore::open(
                &db,
                log(),
                &tenant.name,
                &target_table,
                t.dimension,
                // Never searched until it becomes the active version (after a restart).
                semantis_contract::StorageConfig {
                    resident_index: false,
                    ..cfg.storage.clone()
                },
                metrics.clone(),
            )
            .await
            .with_context(|| {
                format!(
                    "failed to open the migration target of tenant `{}`",
                    tenant.name
                )
            })?;
            tracing::info!(tenant = %tenant.name, target_table, "writing to the migration target too");
            store = Arc::new(DualEntryStore::new(
                store,
                target_store,
                target_embedder.clone(),
            ));
        }
        tracing::info!(tenant = %tenant.name, table, entries = seen.len(), "opened tenant");
        partitions.push(Arc::new(Partition::new(tenant.clone(), store, &seen)));
    }

    let mut probes: Vec<Arc<dyn Probe>> = vec![Arc::new(metadata.clone())];
    if let Some((_, conn)) = &redis {
        probes.push(Arc::new(RedisProbe(conn.clone())));
    }
    let hot: Arc<dyn HotLayer> = match &redis {
        Some((_, conn)) => Arc::new(RedisHotLayer::new(conn.clone(), metrics.clone())),
        None => Arc::new(InProcessHotLayer::new(HOT_LAYER_BYTES)),
    };
    let (usage, usage_writer) = QueuedUsage::start(metadata.clone(), metrics.clone());
    let usage: Arc<dyn UsageSink> = Arc::new(usage);
    let cache = Arc::new(Cache::new(CacheParts {
        registry,
        partitions,
        dimension,
        index_version,
        embedder,
        hot,
        usage,
        usage_report: Arc::new(metadata.clone()),
        pending: Arc::new(metadata.clone()),
        verifiers: verifiers.verifiers,
        feedback: Arc::new(metadata.clone()),
        metrics: metrics.cache.clone(),
    }));
    cache
        .sync_feedback()
        .await
        .context("failed to read the feedback on earlier hits")?;
    // Only now: the loads read every table in full and would compete with the reads above.
    for store in &resident_loads {
        store.start_resident_load();
    }
    Ok(Built {
        cache,
        metadata,
        probes,
        usage_writer,
        redis: redis.as_ref().map(|(_, c)| c.clone()),
    })
}

/// Refuse to serve a version the tenant's data does not live in: the configured embedder's
/// version must be the active one, a `ready` migration target (which then becomes active and
/// retires the old one), or the first version the tenant has.
async fn check_index_version(
    metadata: &MetadataStore,
    tenant: &str,
    index_version: &str,
    dimension: usize,
    now: i64,
) -> anyhow::Result<()> {
    match metadata.active_version(tenant).await? {
        Some((active, _)) if active == index_version => {}
        None => {}
        Some((active, dim)) => {
            let state = metadata.version_state(tenant, index_version).await?;
            if state != Some(IndexVersionState::Ready) {
                bail!(
                    "failed to start: tenant `{tenant}` is served by index version {active} ({dim} dimensions), \
                     but the configured embedder has fingerprint {index_version} ({dimension} dimensions, {}); \
                     set it as `target_embedder` and run `semantis-dataplane reindex` first, or restore the embedder settings",
                    state.map_or_else(|| "never built".to_owned(), |s| format!("state `{s}`"))
                );
            }
            tracing::info!(tenant, from = %active, to = index_version, "switching to the reindexed version");
        }
    }
    metadata
        .activate_version(tenant, index_version, dimension, now)
        .await?;
    Ok(())
}

/// Cluster mode: a client and a connection for `[redis]`; `None` without it.
pub async fn connect_redis(
    cfg: &DataplaneConfig,
) -> anyhow::Result<Option<(redis::Client, redis::aio::ConnectionManager)>> {
    let Some(r) = &cfg.redis else {
        return Ok(None);
    };
    let client = redis_client(r)?;
    let conn = connect(&client)
        .await
        .context("failed to connect to Redis")?;
    Ok(Some((client, conn)))
}

/// A Redis client for `[redis]`, its password read from `password_file` when set.
fn redis_client(r: &semantis_contract::RedisConfig) -> anyhow::Result<redis::Client> {
    let mut info: redis::ConnectionInfo = r
        .url
        .as_str()
        .into_connection_info()
        .context("failed to parse the Redis URL")?;
    if let Some(path) = &r.password_file {
        let password = std::fs::read_to_string(path)
            .with_context(|| format!("failed to read the Redis password file {path}"))?;
        let settings = info.redis_settings().clone().set_password(password.trim());
        info = info.set_redis_settings(settings);
    }
    redis::Client::open(info).context("failed to configure Redis")
}

/// Drop the tables of versions retired longer ago than the grace period. Replicas still on the
/// old version (a rolling update) keep serving it until then.
async fn retire_versions(
    metadata: &MetadataStore,
    data_dir: &std::path::Path,
    grace: Duration,
) -> anyhow::Result<()> {
    let cutoff = now_ms() - i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
    let retired = metadata.retired_before(cutoff).await?;
    if retired.is_empty() {
        return Ok(());
    }
    let db = lancedb::connect(&data_dir.join("lance").to_string_lossy())
        .execute()
        .await
        .context("failed to open LanceDB")?;
    for (tenant, fp) in retired {
        let table = table_name(&tenant, &fp);
        match db.drop_table(&table, &[]).await {
            Ok(()) | Err(lancedb::Error::TableNotFound { .. }) => {}
            Err(e) => return Err(e).with_context(|| format!("failed to drop table {table}")),
        }
        let fence = fence_path(&data_dir.join("lance"), &table);
        if fence.exists() {
            std::fs::remove_file(&fence)
                .with_context(|| format!("failed to remove {}", fence.display()))?;
        }
        let wal = data_dir.join("wal").join(&table);
        if wal.exists() {
            std::fs::remove_dir_all(&wal)
                .with_context(|| format!("failed to remove {}", wal.display()))?;
        }
        // The row exists, so only its state and time change (the dimension is not rewritten).
        metadata
            .set_index_version(&tenant, &fp, 0, IndexVersionState::Deleted, now_ms())
            .await?;
        tracing::info!(tenant, table, "deleted the retired index version");
    }
    Ok(())
}

/// The runtime LanceDB's maintenance (flushes, compaction, vector index builds) runs on. An
/// IVF-PQ build computes for minutes with few yields; on the serving runtime, which has one
/// worker on a one-core pod, it stopped every request for as long (82 s at 40k rows).
fn maintenance_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("semantis-maintenance")
        .enable_all()
        .build()
        .context("failed to start the maintenance runtime")
}

fn spawn_maintainers(
    cache: &Arc<Cache>,
    metadata: &MetadataStore,
    cfg: &DataplaneConfig,
    maintenance: &tokio::runtime::Handle,
) -> Vec<JoinHandle<()>> {
    let tick = Duration::from_millis((cfg.storage.flush_interval_ms / 4).clamp(20, 1000));
    let c = cache.clone();
    let maintain = maintenance.spawn(async move {
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            c.maintain().await;
        }
    });
    let c = cache.clone();
    let expire = tokio::spawn(async move {
        let mut interval = tokio::time::interval(Duration::from_secs(1));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            c.purge_expired(10_000).await;
        }
    });
    let c = cache.clone();
    // Verdicts recorded by other replicas apply here within a second.
    let feedback = tokio::spawn(async move {
        let mut interval = tokio::time::interval(Duration::from_secs(1));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            if let Err(e) = c.sync_feedback().await {
                tracing::warn!(error = %e, "failed to read new feedback; will retry");
            }
        }
    });
    let c = cache.clone();
    let pending = tokio::spawn(async move {
        let mut interval = tokio::time::interval(Duration::from_secs(1));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            if !c.embedder_healthy() {
                continue;
            }
            match c.embed_pending(64).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    entries = n,
                    "embedded stores accepted while the embedder was down"
                ),
                Err(e) => tracing::warn!(error = %e, "failed to embed deferred stores; will retry"),
            }
        }
    });
    let metadata = metadata.clone();
    let data_dir = PathBuf::from(&cfg.storage.data_dir);
    let grace = Duration::from_secs(cfg.storage.retired_grace_secs);
    let retire = tokio::spawn(async move {
        let mut interval =
            tokio::time::interval(Duration::from_secs(30).min(grace.max(Duration::from_secs(1))));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            if let Err(e) = retire_versions(&metadata, &data_dir, grace).await {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "failed to delete retired index versions"
                );
            }
        }
    });
    vec![maintain, expire, feedback, pending, retire]
}

/// SIGTERM and Ctrl-C, listened for from startup on, so a second signal during the shutdown
/// delay is seen however soon it follows the first.
struct ShutdownSignals {
    #[cfg(unix)]
    listeners: Vec<tokio::signal::unix::Signal>,
}

impl ShutdownSignals {
    fn listen() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let listeners = [SignalKind::terminate(), SignalKind::interrupt()]
                .into_iter()
                .filter_map(|kind| match signal(kind) {
                    Ok(listener) => Some(listener),
                    Err(e) => {
                        tracing::error!(error = %e, ?kind, "failed to listen for a shutdown signal");
                        None
                    }
                })
                .collect();
            Self { listeners }
        }
        #[cfg(not(unix))]
        Self {}
    }

    async fn next(&mut self) {
        #[cfg(unix)]
        {
            if self.listeners.is_empty() {
                return std::future::pending().await;
            }
            let any = self.listeners.iter_mut().map(|s| Box::pin(s.recv()));
            let _ = futures::future::select_all(any).await;
        }
        #[cfg(not(unix))]
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "failed to listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    }
}

pub async fn run(cfg: DataplaneConfig) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new().context("failed to register metrics")?);
    let Built {
        cache,
        metadata,
        probes,
        usage_writer,
        redis,
    } = build(&cfg, metrics.clone()).await?;
    let gateway = Arc::new(
        semantis_dataplane::gateway::Gateway::new(&cfg, metrics.gateway.clone(), redis)
            .context("failed to set up the gateway's upstreams")?,
    );
    let state = Arc::new(AppState {
        cache: cache.clone(),
        metrics,
        probes,
        accepting: AtomicBool::new(true),
        gateway,
        admission: semantis_dataplane::http::admission::Admission::default(),
    });
    let app = router(
        state.clone(),
        cfg.server.max_body_bytes,
        Duration::from_millis(cfg.server.request_timeout_ms),
    );
    let listener = tokio::net::TcpListener::bind(&cfg.server.listen)
        .await
        .with_context(|| format!("failed to listen on {}", cfg.server.listen))?;
    let metrics_listener = tokio::net::TcpListener::bind(&cfg.server.metrics_listen)
        .await
        .with_context(|| {
            format!(
                "failed to listen on {} (server.metrics_listen)",
                cfg.server.metrics_listen
            )
        })?;
    let metrics_app = metrics_router(state.clone());
    // Served until the process ends: the scraper sees the shutdown too.
    let metrics_server = tokio::spawn(async move {
        if let Err(e) = axum::serve(metrics_listener, metrics_app).await {
            tracing::error!(error = %e, "failed to serve metrics");
        }
    });
    let addr = listener
        .local_addr()
        .context("failed to read the bound address")?;
    let maintenance = maintenance_runtime()?;
    let maintainers = spawn_maintainers(&cache, &metadata, &cfg, maintenance.handle());
    tracing::info!(
        %addr,
        index_version = cache.index_version(),
        model_threads = semantis_dataplane::embed::model_threads(),
        "serving"
    );

    let draining = state.clone();
    let delay = Duration::from_millis(cfg.server.shutdown_delay_ms);
    let grace = Duration::from_millis(cfg.server.shutdown_grace_ms);
    let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
    let mut signals = ShutdownSignals::listen();
    let limits = semantis_dataplane::http::listen::ConnectionLimits {
        header_read_timeout: Duration::from_millis(cfg.server.header_read_timeout_ms),
        max_connections: cfg.server.max_connections,
        max_connections_per_ip: cfg.server.max_connections_per_ip,
        open: state.metrics.open_connections.clone(),
        refused_per_ip: state.metrics.connections_refused_per_ip.clone(),
    };
    let server = semantis_dataplane::http::listen::serve(listener, app, limits, async move {
        signals.next().await;
        draining.accepting.store(false, Ordering::Relaxed);
        if !delay.is_zero() {
            tracing::info!(
                delay_ms = delay.as_millis(),
                "shutting down: /readyz fails from now on; still serving while clients stop routing here"
            );
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = signals.next() => tracing::info!("second signal: skipping the rest of the shutdown delay"),
            }
        }
        tracing::info!("shutting down: draining in-flight requests");
        let _ = drained_tx.send(());
    });
    // Serve until the signal, then give in-flight requests up to the grace period. The block
    // drops the server (and its clone of the state) before the final flush.
    {
        let server = server;
        tokio::pin!(server);
        tokio::select! {
            () = &mut server => {}
            () = async {
                let _ = drained_rx.await;
                tokio::time::sleep(grace).await;
            } => tracing::warn!("in-flight requests did not drain within the grace period"),
        }
    }
    for m in maintainers {
        m.abort();
    }
    metrics_server.abort();
    // A flush waits for maintenance in progress, and a vector index build can take minutes:
    // past the grace period the tail stays in the write-ahead log, durable, and is replayed at
    // the next start.
    match tokio::time::timeout(grace, cache.flush_all()).await {
        Ok(flushed) => flushed.context("failed to flush the write-ahead tail on shutdown")?,
        Err(_) => tracing::warn!(
            grace_ms = grace.as_millis(),
            "maintenance kept the final flush waiting past the grace period; the tail stays in the write-ahead log and is replayed at the next start"
        ),
    }
    // Not dropped here: dropping a runtime would block this one's worker.
    maintenance.shutdown_background();
    drop(state);
    drop(cache);
    // Every usage sender is gone now; the writer drains its queue and ends.
    let _ = tokio::time::timeout(Duration::from_secs(5), usage_writer).await;
    tracing::info!("stopped");
    Ok(())
}
