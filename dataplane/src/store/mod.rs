//! Store adapters: the cache domain's ports (`semantis_cache::ports`: [`EntryStore`],
//! [`HotLayer`], [`UsageSink`], `PendingStore`, `UsageReport`) implemented with LanceDB and a
//! write-ahead tail, an in-process or Redis hot layer, and SQLite/Postgres metadata through
//! sqlx. Adapters fail with [`BackendError`], which keeps the backend's error as its source;
//! the domain sees it as a `semantis_cache::StoreError` of a kind.

pub mod dual;
pub mod hot;
pub mod lance;
pub mod metadata;
pub mod redis_hot;
pub mod redis_log;
pub mod resident;
pub mod versions;
pub mod wal;

use async_trait::async_trait;
pub use semantis_cache::ports::{EntryStore, HotLayer, UsageEvent, UsageSink};
use semantis_cache::{StoreError, StoreErrorKind};

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("failed to {action} in LanceDB table `{table}`: {source}")]
    Lance {
        action: &'static str,
        table: String,
        #[source]
        source: Box<lancedb::Error>,
    },
    #[error("failed to {action} the write-ahead log at {path}: {source}")]
    Wal {
        action: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to {action} in the metadata store: {source}")]
    Metadata {
        action: &'static str,
        #[source]
        source: Box<sqlx::Error>,
    },
    #[error("failed to {action} Redis key `{key}`: {source}")]
    Redis {
        action: &'static str,
        key: String,
        #[source]
        source: Box<redis::RedisError>,
    },
    #[error("failed to {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to decode stored entries of `{table}`: {reason}")]
    Decode { table: String, reason: String },
    #[error("failed to embed for the migration target index version: {0}")]
    TargetEmbed(String),
    #[error(transparent)]
    Resident(#[from] resident::ResidentError),
    #[error("failed to write: the write-ahead log of `{0}` is closed")]
    Closed(String),
}

impl From<BackendError> for StoreError {
    fn from(e: BackendError) -> Self {
        let kind = match e {
            BackendError::Decode { .. } => StoreErrorKind::Corrupt,
            _ => StoreErrorKind::Unavailable,
        };
        StoreError::new(kind, e)
    }
}

/// A dependency `/readyz` reports on. None of them is on the lookup path's critical list:
/// lookups keep answering without any of them, so they degrade readiness, never fail it.
#[async_trait]
pub trait Probe: Send + Sync {
    fn name(&self) -> &'static str;
    async fn check(&self) -> Result<(), String>;
}

#[async_trait]
impl Probe for metadata::MetadataStore {
    fn name(&self) -> &'static str {
        self.backend()
    }

    async fn check(&self) -> Result<(), String> {
        self.ping().await.map_err(|e| e.to_string())
    }
}

/// Redis, in cluster mode: stores need it (the log), lookups do not.
pub struct RedisProbe(pub redis::aio::ConnectionManager);

#[async_trait]
impl Probe for RedisProbe {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn check(&self) -> Result<(), String> {
        redis::cmd("PING")
            .query_async::<String>(&mut self.0.clone())
            .await
            .map(|_| ())
            .map_err(|e| format!("failed to reach Redis: {e}"))
    }
}
