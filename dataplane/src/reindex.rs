//! `reindex`: fill the migration target's table from the active one.
//!
//! For each tenant: every live entry of the active version is re-embedded with the target
//! embedder and merged (by id) into the target table; then, once the serving replicas flushed
//! the active log past the copy, deletes that raced the copy (this run's or an interrupted
//! earlier one's) are swept out, the indexes are built and the version is marked `ready` in the metadata store.
//! Serving replicas with the same `target_embedder` write new entries to both versions
//! meanwhile (store::dual), so a ready target holds everything.
//!
//! Resumable and idempotent: the checkpoint is the target table itself (ids already there are
//! skipped), and a tenant whose target is already `ready` is left alone. Memory stays bounded:
//! entries stream from LanceDB a batch at a time.

use std::collections::HashSet;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use backon::{ExponentialBuilder, Retryable};
use futures::StreamExt;
use prometheus::{IntGaugeVec, Opts};
use semantis_cache::entry::Entry;
use semantis_cache::index_version::IndexVersionState;
use semantis_cache::tenants::TenantRegistry;
use semantis_cache::vector::now_ms;
use semantis_contract::DataplaneConfig;
use semantis_dataplane::embed::Embedder;
use semantis_dataplane::metrics::Metrics;
use semantis_dataplane::store::lance::sql::live;
use semantis_dataplane::store::lance::{Table, table_name};
use semantis_dataplane::store::metadata::MetadataStore;
use semantis_dataplane::store::redis_log::{Pos, RedisLog};
use semantis_dataplane::store::versions::prepare_target;

use crate::serve::{connect_redis, load_embedder, open_metadata};

#[derive(clap::Args)]
pub struct ReindexArgs {
    /// The dataplane's configuration file; it must name a `target_embedder`.
    #[arg(long, short, env = "SEMANTIS_CONFIG")]
    config: Option<PathBuf>,
    /// Prompts per embedding call.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Serve Prometheus metrics (progress per tenant) on this address while running.
    #[arg(long)]
    metrics_listen: Option<String>,
}

struct Progress {
    done: IntGaugeVec,
    total: IntGaugeVec,
    terminal: bool,
    last_report: Instant,
}

impl Progress {
    fn new(metrics: &Metrics) -> anyhow::Result<Self> {
        let done = IntGaugeVec::new(
            Opts::new(
                "semantis_reindex_entries_done",
                "Entries of the tenant present in the target index version.",
            ),
            &["tenant"],
        )?;
        let total = IntGaugeVec::new(
            Opts::new(
                "semantis_reindex_entries_total",
                "Live entries of the tenant's active index version when the copy began.",
            ),
            &["tenant"],
        )?;
        metrics.registry.register(Box::new(done.clone()))?;
        metrics.registry.register(Box::new(total.clone()))?;
        Ok(Self {
            done,
            total,
            terminal: std::io::stderr().is_terminal(),
            last_report: Instant::now(),
        })
    }

    fn report(&mut self, tenant: &str, done: u64, total: u64, started: Instant, last: bool) {
        self.done
            .with_label_values(&[tenant])
            .set(i64::try_from(done).unwrap_or(i64::MAX));
        self.total
            .with_label_values(&[tenant])
            .set(i64::try_from(total).unwrap_or(i64::MAX));
        let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-3);
        if self.terminal {
            // A one-line progress bar, redrawn in place.
            let width = 30;
            let filled = (done * width)
                .checked_div(total)
                .unwrap_or(width)
                .min(width);
            let bar: String = (0..width)
                .map(|i| if i < filled { '#' } else { '.' })
                .collect();
            let mut err = std::io::stderr();
            let _ = write!(
                err,
                "\r{tenant}: [{bar}] {done}/{total} ({rate:.0} entries/s)"
            );
            if last {
                let _ = writeln!(err);
            }
            let _ = err.flush();
        } else if last || self.last_report.elapsed() >= Duration::from_secs(5) {
            self.last_report = Instant::now();
            tracing::info!(
                tenant,
                done,
                total,
                entries_per_sec = rate.round(),
                "reindex progress"
            );
        }
    }
}

pub async fn run(args: ReindexArgs) -> anyhow::Result<()> {
    let cfg = semantis_dataplane::config::load(args.config.as_deref())?;
    let Some(target) = cfg.target_embedder.clone() else {
        bail!(
            "failed to reindex: the configuration names no `target_embedder` (the embedder to migrate to)"
        );
    };
    let active_fp = cfg.embedder.fingerprint();
    let target_fp = target.fingerprint();
    if active_fp == target_fp {
        tracing::info!(fingerprint = %active_fp, "the target embedder is the active one; nothing to do");
        return Ok(());
    }
    let metrics = Arc::new(Metrics::new().context("failed to register metrics")?);
    let mut progress = Progress::new(&metrics).context("failed to register reindex metrics")?;
    if let Some(addr) = &args.metrics_listen {
        serve_metrics(addr, metrics.clone()).await?;
    }
    let registry = TenantRegistry::from_config(&cfg).context("failed to load the tenants")?;
    let data_dir = PathBuf::from(&cfg.storage.data_dir);
    let metadata = open_metadata(&cfg, &data_dir).await?;
    let db = lancedb::connect(&data_dir.join("lance").to_string_lossy())
        .execute()
        .await
        .with_context(|| format!("failed to open LanceDB in {}", data_dir.display()))?;
    let redis = connect_redis(&cfg).await?;
    let embedder = load_embedder(&target, &metrics, None)
        .await
        .context("failed to load the target embedder")?
        .context("failed to reindex: the target embedder has no provider")?;
    tracing::info!(from = %active_fp, to = %target_fp, model = %target.model, "reindexing");
    for tenant in registry.all() {
        let job = TenantJob {
            cfg: &cfg,
            tenant: &tenant.name,
            db: &db,
            metadata: &metadata,
            embedder: embedder.as_ref(),
            active_fp: &active_fp,
            target_fp: &target_fp,
            batch: args.batch.max(1),
            redis: redis.as_ref(),
        };
        job.run(&mut progress)
            .await
            .with_context(|| format!("failed to reindex tenant `{}`", tenant.name))?;
    }
    Ok(())
}

async fn serve_metrics(addr: &str, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("failed to listen on {addr}"))?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let m = metrics.clone();
            async move { m.render() }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "the metrics listener stopped");
        }
    });
    Ok(())
}

/// How long the sweep waits for the serving replicas to flush the active log.
const FLUSH_WAIT: Duration = Duration::from_secs(300);

fn conflict_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(2))
        .with_max_times(8)
}

struct TenantJob<'a> {
    cfg: &'a DataplaneConfig,
    tenant: &'a str,
    db: &'a lancedb::Connection,
    metadata: &'a MetadataStore,
    embedder: &'a dyn Embedder,
    active_fp: &'a str,
    target_fp: &'a str,
    batch: usize,
    redis: Option<&'a RedisLogAccess>,
}

/// Cluster mode: how `reindex` reads the serving replicas' shared log.
type RedisLogAccess = (redis::Client, redis::aio::ConnectionManager);

/// Where the active version's log ended when the copy did.
enum LogMark {
    /// Cluster mode: the stream's last record then.
    Stream { log: Box<RedisLog>, upto: Pos },
    /// Embedded mode: the log segments then holding records (a flush deletes them).
    Segments(Vec<PathBuf>),
    /// The log was empty.
    Empty,
}

impl LogMark {
    async fn take(
        redis: Option<&RedisLogAccess>,
        data_dir: &str,
        table: &str,
    ) -> anyhow::Result<Self> {
        if let Some((client, conn)) = redis {
            let log = Box::new(RedisLog::new(
                client.clone(),
                conn.clone(),
                table,
                "reindex",
            ));
            return Ok(match log.last_pos().await? {
                Some(upto) => Self::Stream { log, upto },
                None => Self::Empty,
            });
        }
        let dir = PathBuf::from(data_dir).join("wal").join(table);
        let segments: Vec<PathBuf> = match std::fs::read_dir(&dir) {
            Ok(entries) => entries
                .filter_map(Result::ok)
                .filter(|e| e.metadata().is_ok_and(|m| m.is_file() && m.len() > 0))
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "wal"))
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                return Err(e).with_context(|| format!("failed to list {}", dir.display()));
            }
        };
        Ok(if segments.is_empty() {
            Self::Empty
        } else {
            Self::Segments(segments)
        })
    }

    /// Whether everything the log held at the mark is in the active table now.
    async fn reached(&self) -> anyhow::Result<bool> {
        Ok(match self {
            Self::Stream { log, upto } => log.flushed_through(*upto).await?,
            Self::Segments(segments) => segments.iter().all(|p| !p.exists()),
            Self::Empty => true,
        })
    }
}

impl TenantJob<'_> {
    async fn run(&self, progress: &mut Progress) -> anyhow::Result<()> {
        let target_dim = self.cfg.target_embedder.as_ref().map_or(0, |t| t.dimension);
        let state = prepare_target(
            self.db,
            self.metadata,
            self.tenant,
            self.target_fp,
            target_dim,
            now_ms(),
        )
        .await
        .context("failed to prepare the migration target")?;
        if state.is_complete() {
            tracing::info!(tenant = self.tenant, "the target version is already ready");
            return Ok(());
        }
        let source_name = table_name(self.tenant, self.active_fp);
        let source = Table::open(self.db, &source_name, self.cfg.embedder.dimension).await?;
        let target = Table::open(
            self.db,
            &table_name(self.tenant, self.target_fp),
            target_dim,
        )
        .await?;
        // The checkpoint: whatever an earlier (interrupted) run or the dual writes put there.
        let present: HashSet<String> = target
            .ids(None)
            .await?
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        let started = Instant::now();
        let scan_started_ms = now_ms();
        let total = source.count_live(scan_started_ms).await?;
        let mut done = present.len() as u64;
        let mut pending: Vec<Entry> = Vec::with_capacity(self.batch);
        let mut stream = Box::pin(source.scan(Some(live(scan_started_ms))).await?);
        progress.report(self.tenant, done, total, started, false);
        while let Some(batch) = stream.next().await {
            for entry in batch? {
                if present.contains(&entry.id) {
                    continue;
                }
                pending.push(entry);
                if pending.len() >= self.batch {
                    done += self.copy(&target, &mut pending).await?;
                    progress.report(self.tenant, done, total, started, false);
                }
            }
        }
        done += self.copy(&target, &mut pending).await?;
        progress.report(self.tenant, done, total, started, true);

        // Deletes served while this run or an earlier, interrupted one copied may have reached
        // the target before the copy of the same entry did (or found nothing there to delete).
        // Once the serving replicas flushed the active log up to where it ends now, an entry
        // created before this scan that the target holds and the active table does not was
        // deleted (or expired): remove it from the target too. Rows created since the scan
        // came from dual writes, which delete in both versions themselves.
        let mark = LogMark::take(self.redis, &self.cfg.storage.data_dir, &source_name).await?;
        self.wait_flushed(&mark).await?;
        target.refresh().await?;
        let in_target = target.ids(None).await?;
        let fresh = Table::open(self.db, &source_name, self.cfg.embedder.dimension).await?;
        let still: HashSet<String> = fresh
            .ids(None)
            .await?
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        let gone: Vec<String> = in_target
            .into_iter()
            .filter(|(id, created)| *created < scan_started_ms && !still.contains(id))
            .map(|(id, _)| id)
            .collect();
        if !gone.is_empty() {
            (|| target.delete_ids(&gone))
                .retry(conflict_backoff())
                .notify(|e, wait| tracing::info!(error = %e, ?wait, "retrying the sweep"))
                .await?;
        }
        // A serving replica's maintainer may index or compact the same table concurrently;
        // LanceDB then refuses one commit as a conflict, which a retry resolves.
        let duplicates = (|| target.dedupe())
            .retry(conflict_backoff())
            .notify(|e, wait| tracing::info!(error = %e, ?wait, "retrying the dedupe"))
            .await?;
        let ann = (|| target.build_indexes(&self.cfg.storage))
            .retry(conflict_backoff())
            .notify(|e, wait| tracing::info!(error = %e, ?wait, "retrying the index build"))
            .await?;
        self.metadata
            .set_index_version(
                self.tenant,
                self.target_fp,
                target_dim,
                IndexVersionState::Ready,
                now_ms(),
            )
            .await?;
        tracing::info!(
            tenant = self.tenant,
            entries = done,
            deleted_during_copy = gone.len(),
            duplicates,
            ann_index = ann,
            secs = started.elapsed().as_secs_f64(),
            "the target index version is ready"
        );
        Ok(())
    }

    /// Wait until the serving replicas flushed the active log up to `mark`, saying so every
    /// ten seconds; give up after [`FLUSH_WAIT`] (no replica serving the version?).
    async fn wait_flushed(&self, mark: &LogMark) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut said = Instant::now();
        while !mark.reached().await? {
            if started.elapsed() >= FLUSH_WAIT {
                bail!(
                    "failed to sweep the deletes made during the copy: the serving replicas did not flush the active version's log within {}s (is a dataplane serving this cache?)",
                    FLUSH_WAIT.as_secs()
                );
            }
            if said.elapsed() >= Duration::from_secs(10) {
                said = Instant::now();
                tracing::info!(
                    tenant = self.tenant,
                    waited_secs = started.elapsed().as_secs(),
                    "waiting for the serving replicas to flush the deletes made during the copy"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// Re-embed `pending` and merge it into the target; returns how many were written.
    async fn copy(&self, target: &Table, pending: &mut Vec<Entry>) -> anyhow::Result<u64> {
        if pending.is_empty() {
            return Ok(0);
        }
        let prompts: Vec<String> = pending.iter().map(|e| e.prompt.clone()).collect();
        let vectors = self
            .embedder
            .embed(&prompts)
            .await
            .context("failed to embed with the target embedder")?;
        if vectors.len() != pending.len() {
            bail!(
                "failed to embed: the target embedder returned {} vectors for {} prompts",
                vectors.len(),
                pending.len()
            );
        }
        let entries: Vec<Arc<Entry>> = pending
            .drain(..)
            .zip(vectors)
            .map(|(e, v)| {
                Arc::new(Entry {
                    vector: Arc::from(v),
                    ..e
                })
            })
            .collect();
        (|| target.merge_latest(&entries))
            .retry(conflict_backoff())
            .notify(|e, wait| tracing::info!(error = %e, ?wait, "retrying a merge"))
            .await?;
        Ok(entries.len() as u64)
    }
}
