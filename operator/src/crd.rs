//! The `SemanticCache` custom resource. Doc comments here become `kubectl explain` text and the
//! CEL rules become API-server validation, so both are part of the user interface.
//!
//! GitOps rules: optional fields are `Option` without schema defaults (no server-side defaults,
//! none inside list items); the operator resolves defaults in `validate`, never by writing spec.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A multi-tenant semantic cache: Redis, Postgres credentials, the dataplane, monitoring,
/// backups and index migrations, from one manifest.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "semantis.dev",
    version = "v1alpha1",
    kind = "SemanticCache",
    plural = "semanticcaches",
    shortname = "scache",
    namespaced,
    status = "SemanticCacheStatus",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Dimension","type":"integer","jsonPath":".status.activeIndex.dimension"}"#,
    printcolumn = r#"{"name":"Tenants","type":"integer","jsonPath":".status.tenants"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(
    validation = Rule::new("!has(self.dataplane) || !has(self.dataplane.replicas) || self.dataplane.replicas <= 1 || has(self.postgres)").message("spec.dataplane.replicas above 1 needs spec.postgres: the embedded SQLite metadata store serves one replica").field_path(".dataplane.replicas"),
    validation = Rule::new("!has(self.dataplane) || !has(self.dataplane.replicas) || self.dataplane.replicas <= 1 || (has(self.dataplane.storage) && has(self.dataplane.storage.accessMode) && self.dataplane.storage.accessMode == 'ReadWriteMany')").message("spec.dataplane.replicas above 1 needs spec.dataplane.storage.accessMode ReadWriteMany: every replica reads the same LanceDB volume").field_path(".dataplane.storage.accessMode"),
    validation = Rule::new("self.tenants.all(t, self.tenants.exists_one(u, u.name == t.name))").message("spec.tenants: tenant names must be unique").field_path(".tenants"),
    validation = Rule::new("!has(self.verifiers) || self.verifiers.all(v, self.verifiers.exists_one(u, u.name == v.name))").message("spec.verifiers: verifier names must be unique").field_path(".verifiers"),
    validation = Rule::new("self.tenants.all(t, !has(t.verifier) || t.verifier in ['none', 'local'] || (has(self.verifiers) && self.verifiers.exists(v, v.name == t.verifier)))").message("spec.tenants[].verifier must be none, local or the name of one of spec.verifiers").field_path(".tenants"),
    validation = Rule::new("!has(self.cache) || !has(self.cache.verifier) || self.cache.verifier in ['none', 'local'] || (has(self.verifiers) && self.verifiers.exists(v, v.name == self.cache.verifier))").message("spec.cache.verifier must be none, local or the name of one of spec.verifiers").field_path(".cache.verifier"),
    validation = Rule::new("!has(self.upstreams) || self.upstreams.all(v, self.upstreams.exists_one(u, u.name == v.name))").message("spec.upstreams: upstream names must be unique").field_path(".upstreams"),
    validation = Rule::new("self.tenants.all(t, !has(t.gateway) || (has(self.upstreams) && self.upstreams.exists(u, u.name == t.gateway.upstream)))").message("spec.tenants[].gateway.upstream must be the name of one of spec.upstreams").field_path(".tenants")
)]
#[serde(rename_all = "camelCase")]
pub struct SemanticCacheSpec {
    /// The embedder that turns prompts into vectors. Changing anything that changes the vectors
    /// (provider, model, revision, dimension, pooling, normalisation) starts an index migration.
    pub embedding: EmbeddingSpec,
    /// Cache behaviour shared by every tenant unless a tenant overrides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheSpec>,
    /// The tenants: hard partitions, each with its own API keys and tables.
    #[schemars(length(max = 64))]
    pub tenants: Vec<TenantSpec>,
    /// Verifiers besides the built-in `local` one (a cross-encoder shipped in the dataplane
    /// image): rerankers that check a semantic candidate before it is served. Tenants pick one
    /// with `verifier`; `spec.cache.verifier` sets the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    pub verifiers: Option<Vec<VerifierSpec>>,
    /// OpenAI-compatible LLM endpoints (OpenAI, Azure OpenAI, vLLM, Ollama, LiteLLM) that the
    /// dataplane's gateway (`/v1/chat/completions`) forwards misses to. Tenants pick one with
    /// `gateway.upstream`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    pub upstreams: Option<Vec<UpstreamSpec>>,
    /// The Redis the operator runs for this cache (hot layer, write-ahead log, notifications).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisSpec>,
    /// Postgres for tenants, index versions, usage and the audit trail. Absent: SQLite on the
    /// dataplane's volume (one replica only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<PostgresSpec>,
    /// The dataplane Deployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataplane: Option<DataplaneSpec>,
    /// Scheduled backups to S3. Absent: no backups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupSpec>,
    /// Where a new cache's data comes from. Absent: it starts empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap: Option<BootstrapSpec>,
    /// Prometheus monitoring.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monitoring: Option<MonitoringSpec>,
    /// Stop reconciling this cache: children stay as they are until this is false again.
    /// The annotation `semantis.dev/paused: "true"` does the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<bool>,
}

/// Embedding providers.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum EmbeddingProvider {
    /// all-MiniLM-L6-v2 run inside the dataplane from the weights in its image (384 dimensions).
    Local,
    /// An OpenAI-compatible `/v1/embeddings` endpoint.
    Openai,
    /// Ollama's `/api/embed`.
    Ollama,
    /// Hugging Face Text Embeddings Inference `/embed`.
    Tei,
    /// No embedder: clients always send vectors.
    None,
}

/// Token pooling of the embedding model.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// Mean of the token embeddings.
    Mean,
    /// The CLS token's embedding.
    Cls,
}

/// The embedder.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(
    validation = Rule::new("self.provider != 'local' || self.dimension == 384").message("spec.embedding.dimension must be 384 for the local provider (all-MiniLM-L6-v2)").field_path(".dimension"),
    validation = Rule::new("!(self.provider in ['ollama', 'tei']) || has(self.endpoint)").message("spec.embedding.endpoint is required for the ollama and tei providers").field_path(".endpoint")
)]
#[serde(rename_all = "camelCase")]
pub struct EmbeddingSpec {
    /// Which service embeds: local, openai, ollama, tei or none.
    pub provider: EmbeddingProvider,
    /// Model name as the provider knows it. Default for local: sentence-transformers/all-MiniLM-L6-v2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Model revision; part of the fingerprint, so bumping it rebuilds the index. Default: main.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Vector dimension the model produces.
    #[schemars(range(min = 1, max = 8192))]
    pub dimension: u32,
    /// Token pooling. Default: mean.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pooling: Option<Pooling>,
    /// L2-normalise vectors. Default: true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub normalize: Option<bool>,
    /// Base URL of the provider (required for ollama and tei; openai defaults to api.openai.com).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.startsWith('http://') || self.startsWith('https://')").message("spec.embedding.endpoint must be an http:// or https:// URL"))]
    pub endpoint: Option<String>,
    /// Secret holding the provider's API key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret: Option<SecretKeyRef>,
    /// openai only: send `dimensions` with each request, for models that shorten their
    /// vectors (text-embedding-3-*), so `dimension` alone picks the length. Default: false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send_dimensions: Option<bool>,
}

/// A key inside a Secret in the cache's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Secret name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key inside the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// How the gateway sends an upstream's API key.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamAuth {
    /// `Authorization: Bearer <key>` (OpenAI, vLLM, Ollama, LiteLLM).
    Bearer,
    /// `api-key: <key>` (Azure OpenAI).
    ApiKey,
}

/// An OpenAI-compatible LLM endpoint.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamSpec {
    /// The name tenants use in `gateway.upstream`.
    #[schemars(
        regex(pattern = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"),
        length(min = 1, max = 63)
    )]
    pub name: String,
    /// The base URL an OpenAI SDK would take, e.g. `https://api.openai.com/v1`, or an Azure
    /// deployment's `https://<resource>.openai.azure.com/openai/deployments/<deployment>`.
    #[x_kube(validation = Rule::new("self.startsWith('http://') || self.startsWith('https://')").message("spec.upstreams[].baseUrl must be an http:// or https:// URL"))]
    pub base_url: String,
    /// bearer (default) or api-key (Azure OpenAI).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<UpstreamAuth>,
    /// Secret holding the upstream's API key (not needed for tenants that pass their clients'
    /// own keys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret: Option<SecretKeyRef>,
    /// Query parameters added to every call (Azure's `api-version`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<BTreeMap<String, String>>,
    /// Deadline for the upstream's answer to begin (the whole answer when not streaming), in
    /// seconds. Default: 60.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600))]
    pub timeout_seconds: Option<u64>,
    /// What each model costs, for spend, savings and dollar budgets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub prices: Option<Vec<ModelPriceSpec>>,
}

/// A model's price in US dollars per million tokens.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelPriceSpec {
    /// The model name as requests give it, e.g. `gpt-4o-mini`.
    #[schemars(length(min = 1, max = 200))]
    pub model: String,
    #[schemars(range(min = 0.0))]
    pub input_per_million: f64,
    #[schemars(range(min = 0.0))]
    pub output_per_million: f64,
}

/// Whose key the gateway sends upstream.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamKey {
    /// The upstream's `apiKeySecret`; clients authenticate with their Semantis key.
    Config,
    /// The client's own `Authorization`; clients name their tenant with `X-Semantis-Key`.
    Client,
}

/// A tenant's use of the gateway.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantGatewaySpec {
    /// The upstream chat misses go to: one of spec.upstreams.
    pub upstream: String,
    /// config (default) or client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_key: Option<UpstreamKey>,
    /// Requests with a higher temperature are forwarded and never cached. Default: 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 2.0))]
    pub max_cacheable_temperature: Option<f64>,
    /// Rate limits and budgets; over one a request is answered 429 with Retry-After.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitsSpec>,
}

/// Rate limits and budgets, in fixed windows (the minute, the UTC day).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LimitsSpec {
    /// The tenant's requests together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<LimitSpec>,
    /// Each end user apart (the request's `user`, or the `X-Semantis-User` header).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<LimitSpec>,
    /// Whether cache hits count against requestsPerMinute. Default: false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count_hits: Option<bool>,
}

/// One set of limits; unset: no limit.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LimitSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub requests_per_minute: Option<u64>,
    /// Upstream tokens (prompt and completion) per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub tokens_per_minute: Option<u64>,
    /// Upstream spend per UTC day in US dollars, from the upstream's prices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub usd_per_day: Option<f64>,
}

/// Eviction policies.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum EvictionPolicy {
    /// Least recently used.
    Lru,
    /// Least frequently hit.
    Lfu,
}

/// Verifier providers.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum VerifierProvider {
    /// The cross-encoder in the dataplane image, run in-process.
    Local,
    /// Hugging Face Text Embeddings Inference `POST /rerank`.
    Tei,
    /// The `/v1/rerank` protocol (Cohere, Jina, Voyage, vLLM, Infinity).
    Rerank,
}

/// A verifier: reads (query, cached prompt) and scores 0..1 whether the cached answer answers
/// the query.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(
    validation = Rule::new("self.provider == 'local' || has(self.endpoint)").message("spec.verifiers[].endpoint is required for the tei and rerank providers").field_path(".endpoint")
)]
#[serde(rename_all = "camelCase")]
pub struct VerifierSpec {
    /// The name tenants use; `none` is reserved.
    #[schemars(
        regex(pattern = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"),
        length(min = 1, max = 63)
    )]
    #[x_kube(validation = Rule::new("self != 'none'").message("spec.verifiers[].name `none` is reserved: it turns verification off"))]
    pub name: String,
    /// local, tei or rerank.
    pub provider: VerifierProvider,
    /// Base URL (tei, rerank).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.startsWith('http://') || self.startsWith('https://')").message("spec.verifiers[].endpoint must be an http:// or https:// URL"))]
    pub endpoint: Option<String>,
    /// Model name sent with each request (rerank).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Secret holding the API key (tei, rerank).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret: Option<SecretKeyRef>,
    /// Score (0..1) a candidate needs. Default: the local verifier's calibrated value; 0.5
    /// for remote ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub min_score: Option<f64>,
    /// Cosine similarity a candidate needs to reach this verifier (below what embeddings
    /// alone would need). Default: the local verifier's calibrated value; 0.8 for remote ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = -1.0, max = 1.0))]
    pub min_similarity: Option<f64>,
}

/// Cache behaviour.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CacheSpec {
    /// Cosine similarity (-1..1) a semantic candidate needs. A floor: requests may raise it,
    /// never lower it. Default: 0.9 for tenants without a verifier, the verifier's own
    /// (lower) floor for tenants with one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = -1.0, max = 1.0))]
    pub min_similarity: Option<f64>,
    /// The verifier semantic hits must pass: `local` (default), `none`, or a name from
    /// spec.verifiers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verifier: Option<String>,
    /// How long a lookup may wait for its verifier, in milliseconds; past it the lookup is a
    /// miss. Default: 300.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 60000))]
    pub verifier_budget_ms: Option<u64>,
    /// Entry lifetime in seconds unless a store says otherwise; a hit never extends it.
    /// Default: 86400.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub default_ttl_seconds: Option<u64>,
    /// Eviction once a tenant holds its maximum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eviction: Option<EvictionSpec>,
}

/// Eviction.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EvictionSpec {
    /// Entries per tenant before eviction starts. Default: 1000000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_entries_per_tenant: Option<u64>,
    /// Bytes of entries per tenant before eviction starts: prompts, responses, metadata,
    /// vectors and 512 bytes of bookkeeping each. Default: 1073741824 (1 GiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_bytes_per_tenant: Option<u64>,
    /// lru or lfu. Default: lru.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<EvictionPolicy>,
}

/// One tenant.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantSpec {
    /// Tenant name: a DNS label (lowercase letters, digits, '-'), unique in this cache.
    #[schemars(
        regex(pattern = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"),
        length(min = 1, max = 63)
    )]
    pub name: String,
    /// Secret holding this tenant's API key; the dataplane hashes it at startup.
    pub api_key_secret: SecretKeyRef,
    /// Per-tenant minimum cosine similarity; it can only be stricter than a request's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = -1.0, max = 1.0))]
    pub min_similarity: Option<f64>,
    /// Per-tenant default TTL in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub default_ttl_seconds: Option<u64>,
    /// This tenant's verifier: `local`, `none`, or a name from spec.verifiers. Default:
    /// spec.cache.verifier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verifier: Option<String>,
    /// Score (0..1) a candidate needs from the verifier. Default: the verifier's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub verifier_min_score: Option<f64>,
    /// How long a lookup may wait for the verifier, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 60000))]
    pub verifier_budget_ms: Option<u64>,
    /// Raise the verifier's threshold from feedback until at most this share of the verified
    /// hits reported on were wrong (for example 0.02), instead of stating a score.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0001, max = 0.5))]
    pub target_error_rate: Option<f64>,
    /// Quotas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quotas: Option<TenantQuotas>,
    /// The OpenAI-compatible gateway: where this tenant's chat misses go, and its limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<TenantGatewaySpec>,
}

/// Tenant quotas.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantQuotas {
    /// Entries this tenant may hold before eviction (overrides the cache-wide maximum).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_entries: Option<u64>,
    /// Bytes of entries this tenant may hold before eviction (overrides the cache-wide
    /// maximum).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_bytes: Option<u64>,
    /// Requests of this tenant each dataplane replica handles at once (lookups, stores and
    /// gateway calls together; a streamed completion counts until it ends). Past it the
    /// tenant's requests are answered 429 `too_many_concurrent_requests`. Default: 256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_concurrent_requests: Option<u32>,
}

/// Redis run by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedisSpec {
    /// Redis pods: the first is the primary, the rest replicate it. Default: 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 9))]
    pub replicas: Option<i32>,
    /// Redis image. Default: the operator's `--redis-image` (redis:7.4-alpine unless set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Volume size for the append-only file, e.g. 8Gi. Default: 8Gi.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_size: Option<String>,
    /// StorageClass for the volume. Default: the cluster default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// Container resources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Redis maxmemory, e.g. 2gb. Keys without a TTL (the write-ahead log) are never evicted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]+(b|kb|mb|gb)?$')").message("spec.redis.maxMemory must be a Redis size such as 512mb or 2gb"))]
    pub max_memory: Option<String>,
    /// Append-only persistence. An acknowledged store must survive a crash, so turning this
    /// off is only for throwaway caches. Default: true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistence: Option<bool>,
}

/// What happens to the Postgres role and database when the cache is deleted.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum DeletionPolicy {
    /// Keep them.
    Retain,
    /// Drop the database and role the operator created.
    Delete,
}

/// Postgres.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(
    validation = Rule::new("has(self.adminSecret) != has(self.credentialsSecret)").message("spec.postgres needs exactly one of adminSecret (the operator creates the role and database) or credentialsSecret (use an existing role)").field_path(".adminSecret")
)]
#[serde(rename_all = "camelCase")]
pub struct PostgresSpec {
    /// Host name or address of the Postgres server.
    #[schemars(length(min = 1, max = 253))]
    pub host: String,
    /// Port. Default: 5432.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u16>,
    /// Database name. Default: semantis_<namespace>_<name>.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z_][a-z0-9_]{0,62}$"))]
    pub database: Option<String>,
    /// Secret (keys `username`, `password`) of a role allowed to create roles and databases;
    /// the operator creates this cache's role and database and writes `<name>-postgres`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_secret: Option<LocalSecretRef>,
    /// Secret (keys `username`, `password`) of an existing role that owns `database`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<LocalSecretRef>,
    /// On delete: Retain (default) or Delete the role and database the operator created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_policy: Option<DeletionPolicy>,
}

/// A Secret in the cache's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocalSecretRef {
    /// Secret name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Volume access modes the dataplane supports.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum AccessMode {
    /// One node mounts the volume (one replica).
    ReadWriteOnce,
    /// Every replica mounts the volume.
    ReadWriteMany,
}

/// The dataplane's volume.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Size, e.g. 20Gi. Default: 10Gi.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<String>,
    /// StorageClass. Default: the cluster default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// ReadWriteOnce (default) or ReadWriteMany (required above one replica).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_mode: Option<AccessMode>,
    /// How long the table of an index version the cache migrated away from is kept, in
    /// seconds: replicas still on it serve it meanwhile. Default: 3600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub retired_grace_seconds: Option<u64>,
}

/// The dataplane.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataplaneSpec {
    /// Replicas. Default: 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 64))]
    pub replicas: Option<i32>,
    /// Image. Default: the operator's own version of ghcr.io/semantis/semantis-dataplane.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The LanceDB volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<StorageSpec>,
    /// Container resources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

/// Scheduled backups.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupSpec {
    /// Cron schedule, e.g. "0 3 * * *".
    #[schemars(length(min = 9, max = 100))]
    pub schedule: String,
    /// Target bucket and prefix.
    pub s3: S3Spec,
    /// Secret with `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`.
    pub credentials_secret: LocalSecretRef,
    /// Backups to keep. Default: 7.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub retention: Option<u32>,
}

/// How a new cache gets its first data (after CloudNativePG's `bootstrap.recovery`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BootstrapSpec {
    /// Restore a backup (another cache's `spec.backup` location) into the empty volume before
    /// the dataplane first starts; later starts find the data and restore nothing.
    pub backup: BootstrapBackup,
}

/// A backup to restore from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BootstrapBackup {
    /// Bucket and prefix the backups were written under (`prefix` is required: the default
    /// would name this cache, not the one backed up).
    pub s3: S3Spec,
    /// Secret with `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`.
    pub credentials_secret: LocalSecretRef,
    /// The backup's folder name. Default: the newest complete backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub backup_id: Option<String>,
}

/// An S3 location.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3Spec {
    /// Bucket name.
    #[schemars(length(min = 3, max = 63))]
    pub bucket: String,
    /// Key prefix inside the bucket. Default: <namespace>/<name>.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Endpoint URL for S3-compatible servers (path-style addressing). Default: AWS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Region. Default: us-east-1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
}

/// Monitoring.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MonitoringSpec {
    /// Create a ServiceMonitor for the dataplane (needs the monitoring.coreos.com CRDs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_monitor: Option<bool>,
    /// Extra labels on the ServiceMonitor, e.g. the release label your Prometheus selects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
}

/// Observed state, written only by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SemanticCacheStatus {
    /// The generation the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Progressing, Degraded, RedisReady, PostgresReady, DataplaneReady, IndexReady,
    /// BackupSucceeded.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The index version the dataplane serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_index: Option<IndexStatus>,
    /// The index version a migration is building, while one runs or after it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_index: Option<IndexStatus>,
    /// Number of tenants served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenants: Option<u32>,
    /// The most recent backup run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_backup: Option<BackupStatus>,
}

/// An index version.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IndexStatus {
    /// Embedder fingerprint: names the index version.
    pub fingerprint: String,
    /// Vector dimension.
    pub dimension: u32,
    /// The embedder that produced it (so the operator can keep rendering it while the spec
    /// already names the next one).
    pub embedding: EmbeddingSpec,
}

/// A backup run.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupStatus {
    /// When the last successful backup finished (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success_time: Option<String>,
    /// When the last backup was scheduled (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<String>,
}
