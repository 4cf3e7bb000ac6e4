//! The configuration-file contract between the Semantis operator and the dataplane.
//!
//! The operator renders [`DataplaneConfig`] into the dataplane's ConfigMap; the dataplane reads
//! it with `serve --config FILE`. This crate is serde-only on purpose: the operator links it and
//! must never pull in lancedb, candle or any other heavy dataplane dependency.
//!
//! Every field has a default, so an empty file is a valid embedded-mode configuration.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The whole dataplane configuration file (TOML).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct DataplaneConfig {
    pub server: ServerConfig,
    pub storage: StorageConfig,
    /// Redis for the exact-match hot layer and cross-replica notification. Absent: in-process.
    pub redis: Option<RedisConfig>,
    /// Postgres for tenants, index versions, usage and audit. Absent: SQLite in `data_dir`.
    pub postgres: Option<PostgresConfig>,
    pub embedder: EmbedderConfig,
    /// The embedder an index migration is moving to, set by the operator while a
    /// `reindex` runs. Its fingerprint names the target index version.
    pub target_embedder: Option<EmbedderConfig>,
    /// Defaults that apply to every tenant unless the tenant overrides them.
    pub cache: CacheDefaults,
    pub tenants: Vec<TenantConfig>,
    /// Named verifiers that tenants pick with `cache.verifier` or `tenants[].verifier`. A
    /// `local` verifier with default settings exists even when this map does not name it.
    pub verifiers: BTreeMap<String, VerifierConfig>,
    /// Named OpenAI-compatible LLM endpoints that tenants forward gateway misses to
    /// (`tenants[].upstream`).
    pub upstreams: BTreeMap<String, UpstreamConfig>,
}

/// How the gateway sends the upstream's API key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamAuth {
    /// `Authorization: Bearer <key>` (OpenAI, vLLM, Ollama, LiteLLM).
    #[default]
    Bearer,
    /// `api-key: <key>` (Azure OpenAI).
    ApiKey,
}

/// Where the key sent upstream comes from, per tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamKey {
    /// The upstream's own key (`api_key_file` / `api_key_env`); the client's `Authorization`
    /// carries its Semantis key and is never forwarded.
    #[default]
    Config,
    /// The client's own `Authorization` (or `api-key`) header is forwarded; the client names
    /// its tenant with its Semantis key in `X-Semantis-Key`.
    Client,
}

/// One OpenAI-compatible upstream (OpenAI, Azure OpenAI, vLLM, Ollama, LiteLLM).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Base URL the OpenAI SDK would take, e.g. `https://api.openai.com/v1`; the gateway
    /// appends `/chat/completions`, `/models`, `/embeddings`.
    pub base_url: String,
    pub auth: UpstreamAuth,
    /// File holding the API key (a mounted Secret).
    pub api_key_file: Option<String>,
    /// Environment variable holding the API key (when no file is given).
    pub api_key_env: Option<String>,
    /// Query parameters added to every call (Azure's `api-version`).
    pub query: BTreeMap<String, String>,
    /// Deadline for the upstream's response headers (the whole answer when not streaming),
    /// in milliseconds.
    pub timeout_ms: u64,
    /// A stream that sends nothing for this long is cut off (and not stored), in milliseconds.
    pub stream_idle_timeout_ms: u64,
    /// Consecutive failures (5xx, timeouts, refused connections) that open the breaker.
    pub breaker_failures: u32,
    /// How long an open breaker answers 503 before letting a call through, in milliseconds.
    pub breaker_cooldown_ms: u64,
    /// Dollars per million tokens, by model name as the request gives it.
    pub prices: BTreeMap<String, ModelPrice>,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            base_url: String::new(),
            auth: UpstreamAuth::Bearer,
            api_key_file: None,
            api_key_env: None,
            query: BTreeMap::new(),
            timeout_ms: 60_000,
            stream_idle_timeout_ms: 60_000,
            breaker_failures: 5,
            breaker_cooldown_ms: 10_000,
            prices: BTreeMap::new(),
        }
    }
}

/// What a model's tokens cost, in US dollars per million.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct ModelPrice {
    pub input_per_million: f64,
    pub output_per_million: f64,
}

impl ModelPrice {
    pub fn cost(&self, prompt_tokens: u64, completion_tokens: u64) -> f64 {
        (prompt_tokens as f64 * self.input_per_million
            + completion_tokens as f64 * self.output_per_million)
            / 1_000_000.0
    }
}

/// The name of the built-in verifier (the local cross-encoder) and of the setting that turns
/// verification off.
pub const LOCAL_VERIFIER: &str = "local";
pub const NO_VERIFIER: &str = "none";

/// What checks a semantic candidate before it is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum VerifierProvider {
    /// A cross-encoder run in-process: the local embedder's weights plus the verifier file.
    #[default]
    Local,
    /// Hugging Face Text Embeddings Inference `POST /rerank`.
    Tei,
    /// The `/v1/rerank` protocol (Cohere, Jina, Voyage, vLLM, Infinity).
    Rerank,
}

impl VerifierProvider {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Tei => "tei",
            Self::Rerank => "rerank",
        }
    }
}

/// One verifier: a model that reads (query, cached prompt) and scores, 0..1, whether the
/// cached answer answers the query.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VerifierConfig {
    pub provider: VerifierProvider,
    /// `local`: the verifier file. Default: `semantis-verifier.safetensors` in `model_dir`.
    pub weights: Option<String>,
    /// `local`: the directory of the base model the verifier file adapts (all-MiniLM-L6-v2).
    /// Default: the local embedder's.
    pub model_dir: Option<String>,
    /// `tei`, `rerank`: base URL.
    pub endpoint: Option<String>,
    /// `rerank`: the model name sent with each request.
    pub model: Option<String>,
    /// `tei`, `rerank`: file holding the API key (a mounted Secret).
    pub api_key_file: Option<String>,
    /// `tei`, `rerank`: environment variable holding the API key (when no file is given).
    pub api_key_env: Option<String>,
    /// Score (0..1) a candidate needs to be served. Default: the value the local verifier
    /// file was calibrated with; 0.5 for remote verifiers.
    pub min_score: Option<f32>,
    /// Cosine similarity a candidate needs to reach this verifier (the recall stage, so
    /// below what embeddings alone would need). Default: the local verifier file's; 0.8
    /// for remote verifiers.
    pub min_similarity: Option<f32>,
    /// `local`: longest (query, candidate) pair in tokens; longer pairs are cut, the longer
    /// side first.
    pub max_tokens: usize,
    /// Consecutive failures that open the circuit breaker (remote verifiers).
    pub breaker_failures: u32,
    /// How long an open breaker refuses calls before letting one through, in milliseconds.
    pub breaker_cooldown_ms: u64,
    /// Scores remembered per (tenant, query, candidate): a question asked again is not
    /// scored again. 0 turns the memory off.
    pub cache_entries: u64,
}

impl Default for VerifierConfig {
    fn default() -> Self {
        Self {
            provider: VerifierProvider::Local,
            weights: None,
            model_dir: None,
            endpoint: None,
            model: None,
            api_key_file: None,
            api_key_env: None,
            min_score: None,
            min_similarity: None,
            max_tokens: 256,
            breaker_failures: 5,
            breaker_cooldown_ms: 10_000,
            cache_entries: 100_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address the HTTP API listens on.
    pub listen: String,
    /// Address `/metrics` and the detailed `/readyz` are served on, apart from the API: every
    /// tenant's series are there, so only the scraper should reach it (the operator's
    /// ServiceMonitor scrapes this port; its NetworkPolicy is the cluster's to set).
    pub metrics_listen: String,
    /// Requests with a larger body are refused with 413 `payload_too_large`.
    pub max_body_bytes: usize,
    /// Whole-request deadline, in milliseconds (the gateway's routes: reading the body only;
    /// the upstream's own deadlines bound the rest).
    pub request_timeout_ms: u64,
    /// A connection that has not sent a whole request head within this time is closed, in
    /// milliseconds; the same bound closes kept-alive connections idle that long (slowloris).
    pub header_read_timeout_ms: u64,
    /// Open connections at most; past it new ones wait in the listen backlog until one closes.
    pub max_connections: usize,
    /// Open connections one client address may hold; past it a new one is answered 429
    /// `too_many_connections` and closed, so one host cannot take every `max_connections`
    /// slot. 0: no limit (behind a proxy whose few addresses carry every client, raise it or
    /// set 0 and limit at the proxy).
    pub max_connections_per_ip: usize,
    /// On SIGTERM, keep serving this long with `/readyz` failing before closing the listener,
    /// in milliseconds, so load balancers stop routing here first (Kubernetes removes a
    /// terminating pod's endpoints at the same time as it signals it). A second signal ends
    /// the wait. 0 closes at once.
    pub shutdown_delay_ms: u64,
    /// Graceful shutdown: how long in-flight requests may take to drain, in milliseconds.
    pub shutdown_grace_ms: u64,
    /// SHA-256 (hex) of admin API keys. An admin key acts for any tenant named in the
    /// `X-Semantis-Tenant` header.
    pub admin_key_sha256: Vec<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".to_owned(),
            metrics_listen: "127.0.0.1:9464".to_owned(),
            max_body_bytes: 1024 * 1024,
            request_timeout_ms: 10_000,
            header_read_timeout_ms: 30_000,
            max_connections: 10_000,
            max_connections_per_ip: 1_000,
            shutdown_delay_ms: 0,
            shutdown_grace_ms: 10_000,
            admin_key_sha256: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Directory for LanceDB tables, the write-ahead log and (embedded mode) SQLite.
    pub data_dir: String,
    /// Flush the write-ahead tail to LanceDB once it holds this many entries.
    pub flush_max_rows: usize,
    /// ... or once its oldest entry is this old, in milliseconds.
    pub flush_interval_ms: u64,
    /// Compact a table once it has this many fragments.
    pub compact_min_fragments: usize,
    /// Build the ANN index once a table holds this many rows.
    pub index_min_rows: usize,
    /// Re-index once this many rows are not yet covered by the ANN index.
    pub index_max_unindexed_rows: usize,
    /// Bring the indexes up to date once this many rows are not covered by the B-tree index
    /// on `id`: a read by id (a hit on an answer kept on disk, a delete) scans them.
    pub id_index_max_unindexed_rows: usize,
    /// Delete LanceDB table versions older than this, in seconds.
    pub prune_older_than_secs: u64,
    /// How often the background maintainer looks at each table, in milliseconds.
    pub maintenance_interval_ms: u64,
    /// Delete an index version's table this long after a migration retired it, in seconds
    /// (replicas still rolling over keep serving it until then).
    pub retired_grace_secs: u64,
    /// Hold every entry of the active index version in memory and search it there (HNSW per
    /// large scope). About 3.1 KB per 384-d entry; off, lookups go through LanceDB.
    pub resident_index: bool,
    /// The resident index holds responses up to this many bytes; a larger one stays on disk
    /// (in the table, or the write-ahead tail until it is flushed) and a hit reads it from
    /// there, so large answers cost their tenant disk rather than the pod's memory.
    pub resident_response_max_bytes: usize,
    /// A scope with at least this many entries is searched through an HNSW graph; smaller
    /// ones exhaustively.
    pub ann_min_scope_entries: usize,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            data_dir: "./semantis-data".to_owned(),
            flush_max_rows: 2048,
            flush_interval_ms: 1000,
            compact_min_fragments: 32,
            index_min_rows: 50_000,
            index_max_unindexed_rows: 20_000,
            id_index_max_unindexed_rows: 1_000,
            prune_older_than_secs: 600,
            maintenance_interval_ms: 10_000,
            retired_grace_secs: 3600,
            resident_index: true,
            resident_response_max_bytes: 16 * 1024,
            ann_min_scope_entries: 1024,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[:password@]host:port/db`.
    pub url: String,
    /// Read the password from this file (a mounted Secret) instead of the URL.
    pub password_file: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresConfig {
    /// `postgres://user@host:port/db`.
    pub url: String,
    /// Read the password from this file (a mounted Secret) instead of the URL.
    pub password_file: Option<String>,
}

/// Which service turns text into vectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum EmbeddingProvider {
    /// all-MiniLM-L6-v2 (or another BERT-style model) run in-process from local weights.
    #[default]
    Local,
    /// An OpenAI-compatible `/v1/embeddings` endpoint.
    Openai,
    /// Ollama's `/api/embed`.
    Ollama,
    /// Hugging Face Text Embeddings Inference `/embed`.
    Tei,
    /// No embedder: clients always supply vectors; text-only lookups use the exact path.
    None,
}

impl EmbeddingProvider {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Openai => "openai",
            Self::Ollama => "ollama",
            Self::Tei => "tei",
            Self::None => "none",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    #[default]
    Mean,
    Cls,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmbedderConfig {
    pub provider: EmbeddingProvider,
    /// Model name as the provider knows it.
    pub model: String,
    /// Model revision; part of the fingerprint, so a new revision means a new index version.
    pub revision: String,
    /// Vector dimension the index stores.
    pub dimension: usize,
    pub pooling: Pooling,
    /// L2-normalise vectors (cosine similarity then equals the dot product).
    pub normalize: bool,
    /// `local`: directory holding `model.safetensors`, `tokenizer.json` and `config.json`.
    pub model_dir: Option<String>,
    /// Remote providers: base URL.
    pub endpoint: Option<String>,
    /// Remote providers: file holding the API key (a mounted Secret).
    pub api_key_file: Option<String>,
    /// Remote providers: environment variable holding the API key (when no file is given).
    pub api_key_env: Option<String>,
    /// OpenAI: send `dimensions` in the request (models that can shorten their vectors).
    pub send_dimensions: bool,
    /// Remote providers: most texts in one call (OpenAI allows 2048).
    pub max_batch: usize,
    /// Remote providers: attempts per call, the first included.
    pub max_attempts: u32,
    /// Consecutive failures that open the circuit breaker.
    pub breaker_failures: u32,
    /// How long an open breaker refuses calls before letting one through, in milliseconds.
    pub breaker_cooldown_ms: u64,
    /// Embedding cache entries kept in process (0 disables it); one per (tenant, text), so a
    /// tenant never learns from a lookup's speed what another embedded.
    pub cache_entries: u64,
    /// Embedding cache lifetime, in seconds.
    pub cache_ttl_secs: u64,
    /// Longest input, in tokens, the local model sees; longer prompts are truncated, and a
    /// semantic hit then needs the text past the window to match. For `tei` and `ollama`,
    /// which truncate silently, the window assumed at 3 bytes per token.
    pub max_tokens: usize,
    /// Deadline for one embedding call, in milliseconds.
    pub timeout_ms: u64,
}

impl Default for EmbedderConfig {
    fn default() -> Self {
        Self {
            provider: EmbeddingProvider::Local,
            model: "sentence-transformers/all-MiniLM-L6-v2".to_owned(),
            revision: "main".to_owned(),
            dimension: 384,
            pooling: Pooling::Mean,
            normalize: true,
            model_dir: None,
            endpoint: None,
            api_key_file: None,
            api_key_env: None,
            send_dimensions: false,
            max_batch: 256,
            max_attempts: 3,
            breaker_failures: 5,
            breaker_cooldown_ms: 10_000,
            cache_entries: 100_000,
            cache_ttl_secs: 86_400,
            max_tokens: 256,
            timeout_ms: 2000,
        }
    }
}

impl EmbedderConfig {
    /// The embedder fingerprint: a hash of everything that changes the vectors (provider, model,
    /// revision, dimension, pooling, normalisation). It names the index version, so both the
    /// operator and the dataplane compute it here, from one definition.
    pub fn fingerprint(&self) -> String {
        let pooling = match self.pooling {
            Pooling::Mean => "mean",
            Pooling::Cls => "cls",
        };
        let canonical = format!(
            "provider={}\nmodel={}\nrevision={}\ndimension={}\npooling={}\nnormalize={}",
            self.provider.as_str(),
            self.model,
            self.revision,
            self.dimension,
            pooling,
            self.normalize
        );
        hex::encode(&Sha256::digest(canonical.as_bytes())[..16])
    }
}

/// Which entry goes first once a tenant holds `max_entries`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum EvictionPolicy {
    /// Least recently used (stored or hit).
    #[default]
    Lru,
    /// Least frequently hit; ties go to the least recently used.
    Lfu,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheDefaults {
    /// Cosine similarity a semantic candidate needs (-1..1). A floor: requests may raise it,
    /// never lower it. Default: 0.9 for tenants without a verifier; the verifier's own
    /// `min_similarity` for tenants with one (a lower floor, since the verifier decides).
    pub min_similarity: Option<f32>,
    /// The verifier tenants use (a name in `verifiers`, or `none`). Default: `local` when its
    /// weights are present, otherwise none.
    pub verifier: Option<String>,
    /// How long a lookup may wait for its verifier, in milliseconds; past it the lookup is a
    /// miss (never an unverified hit).
    pub verifier_budget_ms: u64,
    /// Entries live this long unless the store says otherwise, in seconds.
    pub default_ttl_secs: u64,
    pub max_entries: u64,
    /// Bytes of entries (prompt, response, metadata, vector and bookkeeping) a tenant may
    /// hold; past it the entries `eviction` picks go, as past `max_entries`. One tenant of
    /// large responses then cannot take the pod's memory. Default: 1 GiB.
    pub max_bytes: u64,
    pub eviction: EvictionPolicy,
    /// Candidates within this distance below the threshold count as near misses in metrics.
    pub near_miss_margin: f32,
    /// Gateway: chat requests with a higher `temperature` are forwarded and never cached
    /// (`BYPASS`): their callers want a different answer each time.
    pub max_cacheable_temperature: f64,
    /// Gateway: how long a request waits for an identical one already in flight before it
    /// calls the upstream itself, in milliseconds.
    pub coalesce_wait_ms: u64,
    /// Requests of one tenant a replica handles at once (API and gateway together); past it
    /// the tenant's next requests are answered 429 `too_many_concurrent_requests` before
    /// their bodies are read, so one tenant's flood cannot take what another's lookups need.
    pub max_concurrent_requests: u32,
}

impl Default for CacheDefaults {
    fn default() -> Self {
        Self {
            min_similarity: None,
            verifier: None,
            verifier_budget_ms: 300,
            default_ttl_secs: 86_400,
            max_entries: 1_000_000,
            max_bytes: 1 << 30,
            eviction: EvictionPolicy::Lru,
            near_miss_margin: 0.05,
            max_cacheable_temperature: 1.0,
            coalesce_wait_ms: 30_000,
            max_concurrent_requests: 256,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct TenantConfig {
    /// Lowercase letters, digits and `-`, at most 63 characters (a DNS label).
    pub name: String,
    /// SHA-256 (hex) of this tenant's API keys; several allow rotation.
    pub api_key_sha256: Vec<String>,
    /// Files holding plaintext API keys (mounted Secrets); hashed at startup.
    pub api_key_files: Vec<String>,
    pub min_similarity: Option<f32>,
    pub default_ttl_secs: Option<u64>,
    pub max_entries: Option<u64>,
    /// This tenant's byte budget; default `cache.max_bytes`.
    pub max_bytes: Option<u64>,
    pub eviction: Option<EvictionPolicy>,
    /// This tenant's verifier (a name in `verifiers`, or `none`); default `cache.verifier`.
    pub verifier: Option<String>,
    /// Score (0..1) a candidate needs from the verifier; default the verifier's `min_score`.
    pub verifier_min_score: Option<f32>,
    /// How long a lookup may wait for the verifier, in milliseconds.
    pub verifier_budget_ms: Option<u64>,
    /// Raise `verifier_min_score` from feedback until at most this share (0..1) of the
    /// verified hits reported on were wrong.
    pub target_error_rate: Option<f32>,
    /// Gateway: the upstream (a name in `upstreams`) this tenant's chat misses go to.
    pub upstream: Option<String>,
    /// Gateway: whose key goes upstream.
    pub upstream_key: UpstreamKey,
    /// Gateway: overrides `cache.max_cacheable_temperature`.
    pub max_cacheable_temperature: Option<f64>,
    /// Gateway: rate limits and budgets.
    pub limits: LimitsConfig,
    /// Overrides `cache.max_concurrent_requests`.
    pub max_concurrent_requests: Option<u32>,
}

/// A tenant's gateway limits: over one, a request is answered 429 with `Retry-After`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// The tenant's requests together.
    pub tenant: Limit,
    /// Each end user apart (the body's `user`, or the `X-Semantis-User` header); requests
    /// without a user are held to `tenant` only.
    pub user: Limit,
    /// Whether cache hits count against `requests_per_minute` (and are refused over it).
    /// Default: no; a hit costs nothing upstream.
    pub count_hits: bool,
}

/// Windows are fixed: the minute and the UTC day. Unset: no limit.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Limit {
    pub requests_per_minute: Option<u64>,
    /// Upstream tokens (prompt + completion) per minute.
    pub tokens_per_minute: Option<u64>,
    /// Upstream spend per UTC day, in US dollars, from the upstream's price table.
    pub usd_per_day: Option<f64>,
}

impl Limit {
    pub fn is_set(&self) -> bool {
        self.requests_per_minute.is_some()
            || self.tokens_per_minute.is_some()
            || self.usd_per_day.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_embedded_default() {
        let cfg: DataplaneConfig = toml::from_str("").expect("empty config parses");
        assert_eq!(cfg, DataplaneConfig::default());
        assert!(cfg.redis.is_none() && cfg.postgres.is_none());
        assert_eq!(cfg.embedder.dimension, 384);
    }

    #[test]
    fn round_trips_through_toml() {
        let cfg = DataplaneConfig {
            tenants: vec![TenantConfig {
                name: "team-a".into(),
                api_key_sha256: vec!["ab".repeat(32)],
                eviction: Some(EvictionPolicy::Lfu),
                ..Default::default()
            }],
            redis: Some(RedisConfig {
                url: "redis://127.0.0.1:6379".into(),
                password_file: None,
            }),
            ..Default::default()
        };
        let text = toml::to_string(&cfg).expect("serialises");
        let back: DataplaneConfig = toml::from_str(&text).expect("parses");
        assert_eq!(back, cfg);
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = toml::from_str::<DataplaneConfig>("[server]\nlisten_addr = \"x\"\n")
            .expect_err("typo must fail");
        assert!(err.to_string().contains("listen_addr"), "{err}");
    }
}
