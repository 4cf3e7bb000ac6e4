//! Stage 1 of reconcile: check what CEL cannot and resolve every default, purely.
//!
//! The result, [`ValidatedCache`], is what the builders read; they never look at the raw spec,
//! so a default lives in exactly one place. An [`InvalidSpec`] means "wait for the user to
//! change the manifest", never "retry".

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::ResourceExt;
use semantis_contract::{EmbedderConfig, EvictionPolicy as ContractEviction, StorageConfig};

use crate::crd::{
    AccessMode, DeletionPolicy, EmbeddingProvider, EmbeddingSpec, EvictionPolicy, LocalSecretRef,
    Pooling, SecretKeyRef, SemanticCache, VerifierProvider,
};

pub const DEFAULT_REDIS_IMAGE: &str = "redis:7.4-alpine";
pub const LOCAL_MODEL: &str = "sentence-transformers/all-MiniLM-L6-v2";
pub const PAUSE_ANNOTATION: &str = "semantis.dev/paused";

/// The spec is wrong in a way only the user can fix.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid spec: {field}: {message}")]
pub struct InvalidSpec {
    pub field: String,
    pub message: String,
}

fn invalid(field: &str, message: impl Into<String>) -> InvalidSpec {
    InvalidSpec {
        field: field.to_owned(),
        message: message.into(),
    }
}

/// Operator-wide settings that feed defaults (from flags, not from the resource).
#[derive(Debug, Clone, PartialEq)]
pub struct OperatorDefaults {
    /// The dataplane image matching this operator's version.
    pub dataplane_image: String,
    /// The Redis image for caches that do not name one (`--redis-image`; default
    /// [`DEFAULT_REDIS_IMAGE`]), so a cluster without access to Docker Hub sets it once.
    pub redis_image: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedCache {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub generation: i64,
    pub embedding: EmbeddingSpec,
    /// The contract form of `embedding`, whose fingerprint names the wanted index version.
    pub embedder: EmbedderConfig,
    /// Absent: the dataplane's default (0.9 unverified, the verifier's floor verified).
    pub min_similarity: Option<f32>,
    /// The tenants' default verifier (absent: `local` when its weights are in the image).
    pub verifier: Option<String>,
    pub verifier_budget_ms: Option<u64>,
    /// spec.verifiers, sorted by name.
    pub verifiers: Vec<Verifier>,
    /// spec.upstreams in the contract's form, by name (the key file path filled by build).
    pub upstreams: Vec<Upstream>,
    pub default_ttl_secs: u64,
    pub max_entries: u64,
    pub max_bytes: u64,
    pub eviction: ContractEviction,
    /// Sorted by name so reordering the spec list changes no child.
    pub tenants: Vec<Tenant>,
    pub redis: Redis,
    pub postgres: Option<Postgres>,
    pub dataplane: Dataplane,
    pub backup: Option<Backup>,
    pub bootstrap: Option<Bootstrap>,
    pub service_monitor: bool,
    pub service_monitor_labels: BTreeMap<String, String>,
    pub paused: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Tenant {
    pub name: String,
    pub api_key_secret: SecretKeyRef,
    pub min_similarity: Option<f32>,
    pub default_ttl_secs: Option<u64>,
    pub max_entries: Option<u64>,
    pub max_bytes: Option<u64>,
    pub max_concurrent_requests: Option<u32>,
    pub verifier: Option<String>,
    pub verifier_min_score: Option<f32>,
    pub verifier_budget_ms: Option<u64>,
    pub target_error_rate: Option<f32>,
    /// The gateway: upstream name, whose key, temperature ceiling, limits.
    pub upstream: Option<String>,
    pub upstream_key: semantis_contract::UpstreamKey,
    pub max_cacheable_temperature: Option<f64>,
    pub limits: semantis_contract::LimitsConfig,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    pub name: String,
    pub api_key_secret: Option<SecretKeyRef>,
    /// Without `api_key_file`, which build sets where the Secret is mounted.
    pub config: semantis_contract::UpstreamConfig,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Verifier {
    pub name: String,
    pub provider: semantis_contract::VerifierProvider,
    pub endpoint: Option<String>,
    pub model: Option<String>,
    pub api_key_secret: Option<SecretKeyRef>,
    pub min_score: Option<f32>,
    pub min_similarity: Option<f32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Redis {
    pub replicas: i32,
    pub image: String,
    pub storage_size: Quantity,
    pub storage_class_name: Option<String>,
    pub resources: Option<ResourceRequirements>,
    pub max_memory: Option<String>,
    pub persistence: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum PostgresSource {
    /// The operator creates the role and database with this admin Secret.
    Admin(LocalSecretRef),
    /// An existing role's Secret.
    Existing(LocalSecretRef),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Postgres {
    pub host: String,
    pub port: u16,
    pub database: String,
    pub source: PostgresSource,
    pub deletion_policy: DeletionPolicy,
}

impl Postgres {
    /// The role the operator creates in admin mode: derived from the database name, so it is
    /// stable across reconciles and operator restarts.
    pub fn managed_role(&self) -> String {
        self.database.clone()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Dataplane {
    pub replicas: i32,
    pub image: String,
    pub storage_size: Quantity,
    pub storage_class_name: Option<String>,
    pub access_mode: AccessMode,
    pub resources: Option<ResourceRequirements>,
    /// `storage.retired_grace_secs`.
    pub retired_grace_secs: u64,
}

/// `spec.bootstrap.backup` with defaults resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Bootstrap {
    pub bucket: String,
    pub prefix: String,
    pub endpoint: Option<String>,
    pub region: String,
    pub credentials_secret: LocalSecretRef,
    pub backup_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Backup {
    pub schedule: String,
    pub bucket: String,
    pub prefix: String,
    pub endpoint: Option<String>,
    pub region: String,
    pub credentials_secret: LocalSecretRef,
    pub retention: u32,
}

/// The contract's embedder for a spec's embedding section, with every default resolved.
pub fn embedder_config(e: &EmbeddingSpec) -> EmbedderConfig {
    let base = EmbedderConfig::default();
    let provider = match e.provider {
        EmbeddingProvider::Local => semantis_contract::EmbeddingProvider::Local,
        EmbeddingProvider::Openai => semantis_contract::EmbeddingProvider::Openai,
        EmbeddingProvider::Ollama => semantis_contract::EmbeddingProvider::Ollama,
        EmbeddingProvider::Tei => semantis_contract::EmbeddingProvider::Tei,
        EmbeddingProvider::None => semantis_contract::EmbeddingProvider::None,
    };
    let model = match (&e.model, e.provider) {
        (Some(m), _) => m.clone(),
        (None, EmbeddingProvider::Local) => LOCAL_MODEL.to_owned(),
        (None, _) => String::new(),
    };
    EmbedderConfig {
        provider,
        model,
        revision: e.revision.clone().unwrap_or_else(|| "main".to_owned()),
        dimension: e.dimension as usize,
        pooling: match e.pooling {
            Some(Pooling::Cls) => semantis_contract::Pooling::Cls,
            Some(Pooling::Mean) | None => semantis_contract::Pooling::Mean,
        },
        normalize: e.normalize.unwrap_or(true),
        endpoint: e.endpoint.clone(),
        send_dimensions: e.send_dimensions.unwrap_or(false),
        ..base
    }
}

fn quantity(field: &str, value: Option<&String>, default: &str) -> Result<Quantity, InvalidSpec> {
    let raw = value.map(String::as_str).unwrap_or(default);
    // Kubernetes quantities: digits with an optional decimal part and a binary or decimal suffix.
    let digits_end = raw
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(raw.len());
    let (number, suffix) = raw.split_at(digits_end);
    let suffix_ok = matches!(
        suffix,
        "" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "k" | "M" | "G" | "T" | "P"
    );
    if number.is_empty() || number.parse::<f64>().is_err() || !suffix_ok {
        return Err(invalid(
            field,
            format!("{raw:?} is not a Kubernetes quantity such as 10Gi"),
        ));
    }
    Ok(Quantity(raw.to_owned()))
}

fn check_schedule(schedule: &str) -> Result<(), InvalidSpec> {
    let fields: Vec<&str> = schedule.split_whitespace().collect();
    let macro_ok = matches!(
        schedule.trim(),
        "@yearly" | "@annually" | "@monthly" | "@weekly" | "@daily" | "@midnight" | "@hourly"
    );
    let chars_ok = fields.iter().all(|f| {
        f.chars()
            .all(|c| c.is_ascii_alphanumeric() || "*/,-?".contains(c))
    });
    if macro_ok || (fields.len() == 5 && chars_ok) {
        Ok(())
    } else {
        Err(invalid(
            "spec.backup.schedule",
            format!("{schedule:?} is not a five-field cron schedule such as \"0 3 * * *\""),
        ))
    }
}

fn similarity(field: &str, v: Option<f64>) -> Result<Option<f32>, InvalidSpec> {
    match v {
        Some(x) if !(-1.0..=1.0).contains(&x) || x.is_nan() => Err(invalid(
            field,
            format!("{x} is outside the cosine similarity range -1..1"),
        )),
        Some(x) => Ok(Some(x as f32)),
        None => Ok(None),
    }
}

fn sanitize_identifier(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect()
}

pub fn is_paused(cache: &SemanticCache) -> bool {
    cache.spec.paused.unwrap_or(false)
        || cache
            .annotations()
            .get(PAUSE_ANNOTATION)
            .is_some_and(|v| v == "true")
}

/// The `spec.postgres` part alone: deletion needs it to drop what the operator created even
/// when another part of the spec has become invalid.
pub fn postgres(cache: &SemanticCache) -> Result<Option<Postgres>, InvalidSpec> {
    let name = cache.name_any();
    let namespace = cache
        .namespace()
        .ok_or_else(|| invalid("metadata.namespace", "a SemanticCache is namespaced"))?;
    Ok(match &cache.spec.postgres {
        None => None,
        Some(p) => {
            let source = match (&p.admin_secret, &p.credentials_secret) {
                (Some(a), None) => PostgresSource::Admin(a.clone()),
                (None, Some(c)) => PostgresSource::Existing(c.clone()),
                _ => {
                    return Err(invalid(
                        "spec.postgres.adminSecret",
                        "exactly one of adminSecret or credentialsSecret is required",
                    ));
                }
            };
            let database = p.database.clone().unwrap_or_else(|| {
                let raw = format!(
                    "semantis_{}_{}",
                    sanitize_identifier(&namespace),
                    sanitize_identifier(&name)
                );
                raw.chars().take(63).collect()
            });
            Some(Postgres {
                host: p.host.clone(),
                port: p.port.unwrap_or(5432),
                database,
                source,
                deletion_policy: p.deletion_policy.unwrap_or(DeletionPolicy::Retain),
            })
        }
    })
}

pub fn validate(
    cache: &SemanticCache,
    defaults: &OperatorDefaults,
) -> Result<ValidatedCache, InvalidSpec> {
    let spec = &cache.spec;
    let name = cache.name_any();
    let namespace = cache
        .namespace()
        .ok_or_else(|| invalid("metadata.namespace", "a SemanticCache is namespaced"))?;
    // Children are named <name>-<suffix> with suffixes up to 16 characters (and the reindex
    // Job adds 11 more); 63 is the limit for Service and label values.
    if name.len() > 36 {
        return Err(invalid(
            "metadata.name",
            format!("{name:?} is longer than 36 characters; child names would exceed 63"),
        ));
    }

    let e = &spec.embedding;
    if e.provider == EmbeddingProvider::Local && e.dimension != 384 {
        return Err(invalid(
            "spec.embedding.dimension",
            "must be 384 for the local provider (all-MiniLM-L6-v2)",
        ));
    }
    if matches!(
        e.provider,
        EmbeddingProvider::Ollama | EmbeddingProvider::Tei
    ) && e.endpoint.is_none()
    {
        return Err(invalid(
            "spec.embedding.endpoint",
            "required for the ollama and tei providers",
        ));
    }
    if matches!(
        e.provider,
        EmbeddingProvider::Openai | EmbeddingProvider::Ollama | EmbeddingProvider::Tei
    ) && e.model.is_none()
    {
        return Err(invalid(
            "spec.embedding.model",
            "required for remote providers (the model name the provider knows)",
        ));
    }

    if e.send_dimensions == Some(true) && e.provider != EmbeddingProvider::Openai {
        return Err(invalid(
            "spec.embedding.sendDimensions",
            "only the openai provider takes `dimensions` in its requests",
        ));
    }

    let cache_spec = spec.cache.clone().unwrap_or(crate::crd::CacheSpec {
        min_similarity: None,
        verifier: None,
        verifier_budget_ms: None,
        default_ttl_seconds: None,
        eviction: None,
    });
    let min_similarity = similarity("spec.cache.minSimilarity", cache_spec.min_similarity)?;
    let mut verifiers = Vec::new();
    for (i, v) in spec.verifiers.iter().flatten().enumerate() {
        if v.provider != VerifierProvider::Local && v.endpoint.is_none() {
            return Err(invalid(
                &format!("spec.verifiers[{i}].endpoint"),
                "required for the tei and rerank providers",
            ));
        }
        if verifiers.iter().any(|x: &Verifier| x.name == v.name)
            || v.name == semantis_contract::NO_VERIFIER
        {
            return Err(invalid(
                &format!("spec.verifiers[{i}].name"),
                format!("{:?} is reserved or appears twice", v.name),
            ));
        }
        verifiers.push(Verifier {
            name: v.name.clone(),
            provider: match v.provider {
                VerifierProvider::Local => semantis_contract::VerifierProvider::Local,
                VerifierProvider::Tei => semantis_contract::VerifierProvider::Tei,
                VerifierProvider::Rerank => semantis_contract::VerifierProvider::Rerank,
            },
            endpoint: v.endpoint.clone(),
            model: v.model.clone(),
            api_key_secret: v.api_key_secret.clone(),
            min_score: v.min_score.map(|x| x as f32),
            min_similarity: similarity(
                &format!("spec.verifiers[{i}].minSimilarity"),
                v.min_similarity,
            )?,
        });
    }
    verifiers.sort_by(|a, b| a.name.cmp(&b.name));
    let known = |field: &str, name: &Option<String>| match name {
        Some(n)
            if n != semantis_contract::NO_VERIFIER
                && n != semantis_contract::LOCAL_VERIFIER
                && !verifiers.iter().any(|v| &v.name == n) =>
        {
            Err(invalid(
                field,
                format!("{n:?} is neither none, local nor one of spec.verifiers"),
            ))
        }
        _ => Ok(()),
    };
    known("spec.cache.verifier", &cache_spec.verifier)?;
    let eviction = cache_spec.eviction.as_ref();

    let mut upstreams: Vec<Upstream> = Vec::new();
    for (i, u) in spec.upstreams.iter().flatten().enumerate() {
        if upstreams.iter().any(|x| x.name == u.name) {
            return Err(invalid(
                &format!("spec.upstreams[{i}].name"),
                format!("upstream {:?} appears twice", u.name),
            ));
        }
        if !(u.base_url.starts_with("http://") || u.base_url.starts_with("https://")) {
            return Err(invalid(
                &format!("spec.upstreams[{i}].baseUrl"),
                "must be an http:// or https:// URL",
            ));
        }
        let mut prices = BTreeMap::new();
        for (j, p) in u.prices.iter().flatten().enumerate() {
            let ok = |x: f64| x.is_finite() && x >= 0.0;
            if !ok(p.input_per_million) || !ok(p.output_per_million) {
                return Err(invalid(
                    &format!("spec.upstreams[{i}].prices[{j}]"),
                    "prices must be finite and not negative",
                ));
            }
            prices.insert(
                p.model.clone(),
                semantis_contract::ModelPrice {
                    input_per_million: p.input_per_million,
                    output_per_million: p.output_per_million,
                },
            );
        }
        let defaults = semantis_contract::UpstreamConfig::default();
        upstreams.push(Upstream {
            name: u.name.clone(),
            api_key_secret: u.api_key_secret.clone(),
            config: semantis_contract::UpstreamConfig {
                base_url: u.base_url.clone(),
                auth: match u.auth {
                    Some(crate::crd::UpstreamAuth::ApiKey) => {
                        semantis_contract::UpstreamAuth::ApiKey
                    }
                    _ => semantis_contract::UpstreamAuth::Bearer,
                },
                query: u.query.clone().unwrap_or_default(),
                timeout_ms: u
                    .timeout_seconds
                    .map_or(defaults.timeout_ms, |t| t.saturating_mul(1000)),
                prices,
                ..defaults
            },
        });
    }
    upstreams.sort_by(|a, b| a.name.cmp(&b.name));

    let mut tenants = Vec::with_capacity(spec.tenants.len());
    for (i, t) in spec.tenants.iter().enumerate() {
        if tenants.iter().any(|x: &Tenant| x.name == t.name) {
            return Err(invalid(
                &format!("spec.tenants[{i}].name"),
                format!("tenant {:?} appears twice", t.name),
            ));
        }
        known(&format!("spec.tenants[{i}].verifier"), &t.verifier)?;
        let gateway = t.gateway.as_ref();
        if let Some(g) = gateway
            && !upstreams.iter().any(|u| u.name == g.upstream)
        {
            return Err(invalid(
                &format!("spec.tenants[{i}].gateway.upstream"),
                format!("{:?} is not one of spec.upstreams", g.upstream),
            ));
        }
        if let Some(t) = gateway.and_then(|g| g.max_cacheable_temperature)
            && !(0.0..=2.0).contains(&t)
        {
            return Err(invalid(
                &format!("spec.tenants[{i}].gateway.maxCacheableTemperature"),
                "must be within 0..2",
            ));
        }
        let limit = |l: Option<&crate::crd::LimitSpec>, field: &str| match l {
            None => Ok(semantis_contract::Limit::default()),
            Some(l) => {
                if l.usd_per_day.is_some_and(|u| !(u.is_finite() && u >= 0.0)) {
                    return Err(invalid(field, "usdPerDay must be finite and not negative"));
                }
                Ok(semantis_contract::Limit {
                    requests_per_minute: l.requests_per_minute,
                    tokens_per_minute: l.tokens_per_minute,
                    usd_per_day: l.usd_per_day,
                })
            }
        };
        let limits = gateway.and_then(|g| g.limits.as_ref());
        let limits = semantis_contract::LimitsConfig {
            tenant: limit(
                limits.and_then(|l| l.tenant.as_ref()),
                &format!("spec.tenants[{i}].gateway.limits.tenant"),
            )?,
            user: limit(
                limits.and_then(|l| l.user.as_ref()),
                &format!("spec.tenants[{i}].gateway.limits.user"),
            )?,
            count_hits: limits.and_then(|l| l.count_hits).unwrap_or(false),
        };
        tenants.push(Tenant {
            name: t.name.clone(),
            api_key_secret: t.api_key_secret.clone(),
            min_similarity: similarity(
                &format!("spec.tenants[{i}].minSimilarity"),
                t.min_similarity,
            )?,
            default_ttl_secs: t.default_ttl_seconds,
            max_entries: t.quotas.as_ref().and_then(|q| q.max_entries),
            max_bytes: t.quotas.as_ref().and_then(|q| q.max_bytes),
            max_concurrent_requests: t.quotas.as_ref().and_then(|q| q.max_concurrent_requests),
            verifier: t.verifier.clone(),
            verifier_min_score: t.verifier_min_score.map(|x| x as f32),
            verifier_budget_ms: t.verifier_budget_ms,
            target_error_rate: t.target_error_rate.map(|x| x as f32),
            upstream: gateway.map(|g| g.upstream.clone()),
            upstream_key: match gateway.and_then(|g| g.upstream_key) {
                Some(crate::crd::UpstreamKey::Client) => semantis_contract::UpstreamKey::Client,
                _ => semantis_contract::UpstreamKey::Config,
            },
            max_cacheable_temperature: gateway.and_then(|g| g.max_cacheable_temperature),
            limits,
        });
    }
    tenants.sort_by(|a, b| a.name.cmp(&b.name));

    let r = spec.redis.clone().unwrap_or(crate::crd::RedisSpec {
        replicas: None,
        image: None,
        storage_size: None,
        storage_class_name: None,
        resources: None,
        max_memory: None,
        persistence: None,
    });
    let redis = Redis {
        replicas: r.replicas.unwrap_or(1),
        image: r.image.unwrap_or_else(|| defaults.redis_image.clone()),
        storage_size: quantity("spec.redis.storageSize", r.storage_size.as_ref(), "8Gi")?,
        storage_class_name: r.storage_class_name,
        resources: r.resources,
        max_memory: r.max_memory,
        persistence: r.persistence.unwrap_or(true),
    };

    let d = spec.dataplane.clone().unwrap_or(crate::crd::DataplaneSpec {
        replicas: None,
        image: None,
        storage: None,
        resources: None,
    });
    let storage = d.storage.clone();
    let dataplane = Dataplane {
        replicas: d.replicas.unwrap_or(1),
        image: d.image.unwrap_or_else(|| defaults.dataplane_image.clone()),
        storage_size: quantity(
            "spec.dataplane.storage.size",
            storage.as_ref().and_then(|s| s.size.as_ref()),
            "10Gi",
        )?,
        storage_class_name: storage.as_ref().and_then(|s| s.storage_class_name.clone()),
        access_mode: storage
            .as_ref()
            .and_then(|s| s.access_mode)
            .unwrap_or(AccessMode::ReadWriteOnce),
        resources: d.resources,
        retired_grace_secs: storage
            .as_ref()
            .and_then(|s| s.retired_grace_seconds)
            .unwrap_or(StorageConfig::default().retired_grace_secs),
    };
    if dataplane.replicas > 1 {
        if spec.postgres.is_none() {
            return Err(invalid(
                "spec.dataplane.replicas",
                "above 1 needs spec.postgres: the embedded SQLite metadata store serves one replica",
            ));
        }
        if dataplane.access_mode != AccessMode::ReadWriteMany {
            return Err(invalid(
                "spec.dataplane.storage.accessMode",
                "must be ReadWriteMany above one replica: every replica reads the same volume",
            ));
        }
    }

    let postgres = postgres(cache)?;

    let backup = match &spec.backup {
        None => None,
        Some(b) => {
            check_schedule(&b.schedule)?;
            Some(Backup {
                schedule: b.schedule.clone(),
                bucket: b.s3.bucket.clone(),
                prefix: b
                    .s3
                    .prefix
                    .clone()
                    .unwrap_or_else(|| format!("{namespace}/{name}")),
                endpoint: b.s3.endpoint.clone(),
                region: b
                    .s3
                    .region
                    .clone()
                    .unwrap_or_else(|| "us-east-1".to_owned()),
                credentials_secret: b.credentials_secret.clone(),
                retention: b.retention.unwrap_or(7),
            })
        }
    };

    let bootstrap = match &spec.bootstrap {
        None => None,
        Some(b) => {
            let s3 = &b.backup.s3;
            let prefix = s3.prefix.clone().ok_or_else(|| {
                invalid(
                    "spec.bootstrap.backup.s3.prefix",
                    "required: the prefix the backed-up cache wrote under (its spec.backup.s3.prefix, by default <namespace>/<name>)",
                )
            })?;
            Some(Bootstrap {
                bucket: s3.bucket.clone(),
                prefix,
                endpoint: s3.endpoint.clone(),
                region: s3.region.clone().unwrap_or_else(|| "us-east-1".to_owned()),
                credentials_secret: b.backup.credentials_secret.clone(),
                backup_id: b.backup.backup_id.clone(),
            })
        }
    };

    let monitoring = spec.monitoring.clone();
    Ok(ValidatedCache {
        bootstrap,
        uid: cache.uid().unwrap_or_default(),
        generation: cache.metadata.generation.unwrap_or(0),
        embedding: e.clone(),
        embedder: embedder_config(e),
        min_similarity,
        verifier: cache_spec.verifier.clone(),
        verifier_budget_ms: cache_spec.verifier_budget_ms,
        verifiers,
        upstreams,
        default_ttl_secs: cache_spec.default_ttl_seconds.unwrap_or(86_400),
        max_entries: eviction
            .and_then(|e| e.max_entries_per_tenant)
            .unwrap_or(1_000_000),
        max_bytes: eviction
            .and_then(|e| e.max_bytes_per_tenant)
            .unwrap_or(1 << 30),
        eviction: match eviction.and_then(|e| e.policy) {
            Some(EvictionPolicy::Lfu) => ContractEviction::Lfu,
            Some(EvictionPolicy::Lru) | None => ContractEviction::Lru,
        },
        tenants,
        redis,
        postgres,
        dataplane,
        backup,
        service_monitor: monitoring
            .as_ref()
            .and_then(|m| m.service_monitor)
            .unwrap_or(false),
        service_monitor_labels: monitoring.and_then(|m| m.labels).unwrap_or_default(),
        paused: is_paused(cache),
        name,
        namespace,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(yaml: &str) -> SemanticCache {
        let mut c: SemanticCache = serde_yaml::from_str(yaml).expect("parses");
        c.metadata.namespace = Some("ns".into());
        c
    }

    fn defaults() -> OperatorDefaults {
        OperatorDefaults {
            dataplane_image: "img".into(),
            redis_image: DEFAULT_REDIS_IMAGE.into(),
        }
    }

    const BASE: &str = "apiVersion: semantis.dev/v1alpha1\nkind: SemanticCache\nmetadata: {name: c}\nspec:\n  embedding: {provider: local, dimension: 384}\n  tenants: []\n";

    #[test]
    fn defaults_resolve_in_one_place() {
        let v = validate(&cache(BASE), &defaults()).expect("valid");
        assert_eq!(v.min_similarity, None, "the dataplane resolves the default");
        assert_eq!(v.redis.replicas, 1);
        assert_eq!(v.dataplane.replicas, 1);
        assert_eq!(v.dataplane.image, "img");
        assert_eq!(v.embedder.model, LOCAL_MODEL);
        assert!(v.postgres.is_none() && v.backup.is_none());
    }

    #[test]
    fn send_dimensions_reaches_the_openai_embedder_and_nothing_else() {
        let mut c = cache(BASE);
        c.spec.embedding = serde_json::from_value(serde_json::json!({
            "provider": "openai", "model": "text-embedding-3-small", "dimension": 256,
            "endpoint": "http://embeddings:8080", "sendDimensions": true
        }))
        .expect("embedding spec");
        let v = validate(&c, &defaults()).expect("valid");
        assert!(v.embedder.send_dimensions);
        assert_eq!(v.embedder.dimension, 256);
        c.spec.embedding.send_dimensions = None;
        assert!(
            !validate(&c, &defaults())
                .expect("valid")
                .embedder
                .send_dimensions
        );
        c.spec.embedding = serde_json::from_value(serde_json::json!({
            "provider": "tei", "model": "bge", "dimension": 768,
            "endpoint": "http://tei", "sendDimensions": true
        }))
        .expect("embedding spec");
        let err = validate(&c, &defaults()).expect_err("tei takes no dimensions");
        assert_eq!(err.field, "spec.embedding.sendDimensions");
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                "  embedding: {provider: local, dimension: 384}\n",
                "  embedding: {provider: local, dimension: 768}\n",
                "spec.embedding.dimension",
            ),
            (
                "  tenants: []\n",
                "  tenants: []\n  dataplane: {replicas: 2}\n",
                "spec.dataplane.replicas",
            ),
            (
                "  tenants: []\n",
                "  tenants: []\n  dataplane: {storage: {size: lots}}\n",
                "spec.dataplane.storage.size",
            ),
            (
                "  tenants: []\n",
                "  tenants: []\n  cache: {minSimilarity: 1.5}\n",
                "spec.cache.minSimilarity",
            ),
            (
                "  tenants: []\n",
                "  tenants: [{name: a, apiKeySecret: {name: s, key: k}}, {name: a, apiKeySecret: {name: s, key: k}}]\n",
                "spec.tenants[1].name",
            ),
            (
                "  tenants: []\n",
                "  tenants: []\n  backup: {schedule: 'every day', s3: {bucket: bkt}, credentialsSecret: {name: s}}\n",
                "spec.backup.schedule",
            ),
            (
                "  tenants: []\n",
                "  tenants: [{name: a, apiKeySecret: {name: s, key: k}, gateway: {upstream: nowhere}}]\n",
                "spec.tenants[0].gateway.upstream",
            ),
            (
                "  tenants: []\n",
                "  tenants: []\n  upstreams: [{name: u, baseUrl: 'ftp://x'}]\n",
                "spec.upstreams[0].baseUrl",
            ),
            (
                "  tenants: []\n",
                "  tenants: [{name: a, apiKeySecret: {name: s, key: k}, gateway: {upstream: u, limits: {user: {usdPerDay: -1}}}}]\n  upstreams: [{name: u, baseUrl: 'http://x/v1'}]\n",
                "spec.tenants[0].gateway.limits.user",
            ),
        ];
        for (from, to, field) in cases {
            let err = validate(&cache(&BASE.replace(from, to)), &defaults()).expect_err(field);
            assert_eq!(err.field, field, "{err}");
        }
    }

    #[test]
    fn the_pause_annotation_pauses() {
        let mut c = cache(BASE);
        assert!(!is_paused(&c));
        c.metadata.annotations = Some([(PAUSE_ANNOTATION.to_owned(), "true".to_owned())].into());
        assert!(is_paused(&c));
    }
}
