//! Tenants and API keys. Keys are configured as SHA-256 hashes (or read from Secret files and
//! hashed at startup); a request's key is hashed and looked up, so plaintext keys are never
//! kept or compared.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use semantis_contract::{
    CacheDefaults, DataplaneConfig, EvictionPolicy, LOCAL_VERIFIER, LimitsConfig, NO_VERIFIER,
    UpstreamKey,
};
use sha2::{Digest, Sha256};

use crate::error::CacheError;

/// A tenant's effective settings: its own overrides on top of the defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct Tenant {
    pub name: String,
    pub min_similarity: f32,
    pub default_ttl_secs: u64,
    pub max_entries: u64,
    /// Bytes of entries ([`crate::entry::Entry::footprint`]) before eviction.
    pub max_bytes: u64,
    pub eviction: EvictionPolicy,
    pub near_miss_margin: f32,
    /// The verifier that must accept a semantic candidate before it is served; `None`: the
    /// cosine threshold alone decides.
    pub verification: Option<Verification>,
    /// Gateway: the upstream chat misses go to (a name in the configuration's `upstreams`).
    pub upstream: Option<String>,
    /// Gateway: whose key goes upstream.
    pub upstream_key: UpstreamKey,
    /// Gateway: chat requests with a higher temperature are never cached.
    pub max_cacheable_temperature: f64,
    /// Gateway: rate limits and budgets.
    pub limits: LimitsConfig,
    /// Requests handled at once on a replica; the HTTP layer refuses the rest (429).
    pub max_concurrent_requests: u32,
}

/// A tenant's verifier settings, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Verification {
    /// The verifier's name (a key of the configuration's `verifiers`).
    pub verifier: String,
    /// Score (0..1) a candidate needs; feedback may raise it (`target_error_rate`).
    pub min_score: f32,
    /// How long a lookup waits for the verifier before it is a miss.
    pub budget_ms: u64,
    pub target_error_rate: Option<f32>,
}

/// What a built verifier brings to tenants that use it without saying otherwise.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VerifierDefaults {
    pub min_score: f32,
    pub min_similarity: f32,
}

/// Tenants without a verifier need this cosine similarity unless configured otherwise.
pub const UNVERIFIED_MIN_SIMILARITY: f32 = 0.9;

/// Which verifiers a configuration names explicitly (`cache.verifier`, `tenants[].verifier`),
/// and whether some tenant takes the default (`local` when it can be built).
pub fn verifiers_named(cfg: &DataplaneConfig) -> (Vec<String>, bool) {
    let mut named: Vec<String> = Vec::new();
    let mut auto = false;
    for t in &cfg.tenants {
        match t.verifier.as_ref().or(cfg.cache.verifier.as_ref()) {
            Some(n) if n == NO_VERIFIER => {}
            Some(n) => {
                if !named.contains(n) {
                    named.push(n.clone());
                }
            }
            None => auto = true,
        }
    }
    (named, auto)
}
#[derive(Debug, thiserror::Error)]
pub enum TenantConfigError {
    #[error(
        "invalid tenant name `{0}`: use lowercase letters, digits and `-`, at most 63 characters"
    )]
    InvalidName(String),
    #[error("tenant `{0}` is configured twice")]
    Duplicate(String),
    #[error("invalid API key hash for tenant `{tenant}`: expected 64 hex characters")]
    InvalidHash { tenant: String },
    #[error("an API key is configured for both `{0}` and `{1}`")]
    SharedKey(String, String),
    #[error("failed to read the API key file {path}: {source}")]
    KeyFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid min_similarity {value} for `{tenant}`: it must be within -1..1")]
    Similarity { tenant: String, value: f32 },
    #[error("invalid max_entries 0 for `{0}`: it must be at least 1")]
    MaxEntries(String),
    #[error("invalid max_bytes 0 for `{0}`: it must be at least 1")]
    MaxBytes(String),
    #[error(
        "tenant `{tenant}` names the verifier `{verifier}`, which is not configured or could not be built"
    )]
    UnknownVerifier { tenant: String, verifier: String },
    #[error("tenant `{tenant}` names the upstream `{upstream}`, which is not configured")]
    UnknownUpstream { tenant: String, upstream: String },
    #[error("invalid {field} {value} for `{tenant}`: it must be within {range}")]
    Verifier {
        tenant: String,
        field: &'static str,
        value: f64,
        range: &'static str,
    },
}

pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.trim().as_bytes()))
}

pub fn valid_tenant_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

#[derive(Debug, Default)]
pub struct TenantRegistry {
    tenants: HashMap<String, Arc<Tenant>>,
    /// SHA-256(key) → tenant name.
    keys: HashMap<String, String>,
    admin_keys: HashSet<String>,
}

impl TenantRegistry {
    /// Tenants with no verifier (tools that never look up: `reindex`, `backup`).
    pub fn from_config(cfg: &DataplaneConfig) -> Result<Self, TenantConfigError> {
        Self::with_verifiers(cfg, &BTreeMap::new())
    }

    /// Tenants whose verifier is one of `available` (the verifiers the process built).
    pub fn with_verifiers(
        cfg: &DataplaneConfig,
        available: &BTreeMap<String, VerifierDefaults>,
    ) -> Result<Self, TenantConfigError> {
        let mut reg = Self::default();
        for hash in &cfg.server.admin_key_sha256 {
            if !is_sha256_hex(hash) {
                return Err(TenantConfigError::InvalidHash {
                    tenant: "admin".into(),
                });
            }
            reg.admin_keys.insert(hash.to_ascii_lowercase());
        }
        for t in &cfg.tenants {
            if !valid_tenant_name(&t.name) {
                return Err(TenantConfigError::InvalidName(t.name.clone()));
            }
            if reg.tenants.contains_key(&t.name) {
                return Err(TenantConfigError::Duplicate(t.name.clone()));
            }
            let mut hashes: Vec<String> = Vec::new();
            for h in &t.api_key_sha256 {
                if !is_sha256_hex(h) {
                    return Err(TenantConfigError::InvalidHash {
                        tenant: t.name.clone(),
                    });
                }
                hashes.push(h.to_ascii_lowercase());
            }
            for path in &t.api_key_files {
                let key =
                    std::fs::read_to_string(path).map_err(|source| TenantConfigError::KeyFile {
                        path: path.clone(),
                        source,
                    })?;
                hashes.push(hash_key(&key));
            }
            for h in hashes {
                if let Some(other) = reg.keys.insert(h, t.name.clone())
                    && other != t.name
                {
                    return Err(TenantConfigError::SharedKey(other, t.name.clone()));
                }
            }
            if let Some(u) = &t.upstream
                && !cfg.upstreams.contains_key(u)
            {
                return Err(TenantConfigError::UnknownUpstream {
                    tenant: t.name.clone(),
                    upstream: u.clone(),
                });
            }
            let tenant = resolve(&cfg.cache, t, available)?;
            reg.tenants.insert(t.name.clone(), Arc::new(tenant));
        }
        Ok(reg)
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<Tenant>> {
        self.tenants.values()
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Tenant>> {
        self.tenants.get(name)
    }

    /// Who is calling, from the bearer key and the optional `X-Semantis-Tenant` header.
    pub fn authenticate(
        &self,
        bearer: Option<&str>,
        tenant_header: Option<&str>,
    ) -> Result<Arc<Tenant>, CacheError> {
        let key = bearer.ok_or(CacheError::MissingKey)?;
        let hash = hash_key(key);
        if self.admin_keys.contains(&hash) {
            let name = tenant_header.ok_or(CacheError::TenantRequired)?;
            return self
                .tenants
                .get(name)
                .cloned()
                .ok_or_else(|| CacheError::UnknownTenant(name.to_owned()));
        }
        let own = self.keys.get(&hash).ok_or(CacheError::InvalidKey)?;
        if let Some(asked) = tenant_header
            && asked != own
        {
            return Err(CacheError::TenantForbidden(asked.to_owned()));
        }
        self.tenants
            .get(own)
            .cloned()
            .ok_or_else(|| CacheError::UnknownTenant(own.clone()))
    }
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn resolve(
    defaults: &CacheDefaults,
    t: &semantis_contract::TenantConfig,
    available: &BTreeMap<String, VerifierDefaults>,
) -> Result<Tenant, TenantConfigError> {
    let verifier = match t.verifier.as_ref().or(defaults.verifier.as_ref()) {
        Some(n) if n == NO_VERIFIER => None,
        Some(n) => Some((
            n.clone(),
            *available
                .get(n)
                .ok_or_else(|| TenantConfigError::UnknownVerifier {
                    tenant: t.name.clone(),
                    verifier: n.clone(),
                })?,
        )),
        None => available
            .get(LOCAL_VERIFIER)
            .map(|d| (LOCAL_VERIFIER.to_owned(), *d)),
    };
    let out_of = |field, value: f64, range| TenantConfigError::Verifier {
        tenant: t.name.clone(),
        field,
        value,
        range,
    };
    let (verification, default_similarity) = match verifier {
        None => (None, UNVERIFIED_MIN_SIMILARITY),
        Some((name, d)) => {
            let min_score = t.verifier_min_score.unwrap_or(d.min_score);
            if !(0.0..=1.0).contains(&min_score) {
                return Err(out_of("verifier_min_score", min_score.into(), "0..1"));
            }
            let budget_ms = t.verifier_budget_ms.unwrap_or(defaults.verifier_budget_ms);
            if budget_ms == 0 {
                return Err(out_of("verifier_budget_ms", 0.0, "1.."));
            }
            if let Some(r) = t.target_error_rate
                && !(r > 0.0 && r < 1.0)
            {
                return Err(out_of("target_error_rate", r.into(), "0..1 (exclusive)"));
            }
            let v = Verification {
                verifier: name,
                min_score,
                budget_ms,
                target_error_rate: t.target_error_rate,
            };
            (Some(v), d.min_similarity)
        }
    };
    let min_similarity = t
        .min_similarity
        .or(defaults.min_similarity)
        .unwrap_or(default_similarity);
    if !(-1.0..=1.0).contains(&min_similarity) || min_similarity.is_nan() {
        return Err(TenantConfigError::Similarity {
            tenant: t.name.clone(),
            value: min_similarity,
        });
    }
    let max_entries = t.max_entries.unwrap_or(defaults.max_entries);
    if max_entries == 0 {
        return Err(TenantConfigError::MaxEntries(t.name.clone()));
    }
    let max_bytes = t.max_bytes.unwrap_or(defaults.max_bytes);
    if max_bytes == 0 {
        return Err(TenantConfigError::MaxBytes(t.name.clone()));
    }
    let max_cacheable_temperature = t
        .max_cacheable_temperature
        .unwrap_or(defaults.max_cacheable_temperature);
    if !(0.0..=2.0).contains(&max_cacheable_temperature) {
        return Err(out_of(
            "max_cacheable_temperature",
            max_cacheable_temperature,
            "0..2",
        ));
    }
    for (who, l) in [("tenant", &t.limits.tenant), ("user", &t.limits.user)] {
        if let Some(usd) = l.usd_per_day
            && !(usd.is_finite() && usd >= 0.0)
        {
            return Err(out_of(
                if who == "tenant" {
                    "limits.tenant.usd_per_day"
                } else {
                    "limits.user.usd_per_day"
                },
                usd,
                "0..",
            ));
        }
    }
    let max_concurrent_requests = t
        .max_concurrent_requests
        .unwrap_or(defaults.max_concurrent_requests);
    if max_concurrent_requests == 0 {
        return Err(out_of("max_concurrent_requests", 0.0, "1.."));
    }
    Ok(Tenant {
        name: t.name.clone(),
        min_similarity,
        default_ttl_secs: t.default_ttl_secs.unwrap_or(defaults.default_ttl_secs),
        max_entries,
        max_bytes,
        eviction: t.eviction.unwrap_or(defaults.eviction),
        near_miss_margin: defaults.near_miss_margin,
        verification,
        upstream: t.upstream.clone(),
        upstream_key: t.upstream_key,
        max_cacheable_temperature,
        limits: t.limits.clone(),
        max_concurrent_requests,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use semantis_contract::TenantConfig;

    fn config() -> DataplaneConfig {
        let mut cfg = DataplaneConfig::default();
        cfg.server.admin_key_sha256 = vec![hash_key("admin-key")];
        cfg.tenants = vec![
            TenantConfig {
                name: "team-a".into(),
                api_key_sha256: vec![hash_key("key-a")],
                min_similarity: Some(0.95),
                ..Default::default()
            },
            TenantConfig {
                name: "team-b".into(),
                api_key_sha256: vec![hash_key("key-b")],
                ..Default::default()
            },
        ];
        cfg
    }

    #[test]
    fn keys_map_to_exactly_one_tenant() {
        let reg = TenantRegistry::from_config(&config()).expect("valid config");
        assert_eq!(
            reg.authenticate(Some("key-a"), None).expect("a").name,
            "team-a"
        );
        assert_eq!(
            reg.authenticate(Some("key-b"), None).expect("b").name,
            "team-b"
        );
        assert!(matches!(
            reg.authenticate(Some("nope"), None),
            Err(CacheError::InvalidKey)
        ));
        assert!(matches!(
            reg.authenticate(None, None),
            Err(CacheError::MissingKey)
        ));
        assert!(matches!(
            reg.authenticate(Some("key-a"), Some("team-b")),
            Err(CacheError::TenantForbidden(_))
        ));
    }

    #[test]
    fn admin_keys_act_for_a_named_tenant() {
        let reg = TenantRegistry::from_config(&config()).expect("valid config");
        assert_eq!(
            reg.authenticate(Some("admin-key"), Some("team-b"))
                .expect("b")
                .name,
            "team-b"
        );
        assert!(matches!(
            reg.authenticate(Some("admin-key"), None),
            Err(CacheError::TenantRequired)
        ));
        assert!(matches!(
            reg.authenticate(Some("admin-key"), Some("ghost")),
            Err(CacheError::UnknownTenant(_))
        ));
    }

    #[test]
    fn tenant_settings_override_defaults() {
        let reg = TenantRegistry::from_config(&config()).expect("valid config");
        assert_eq!(reg.get("team-a").expect("a").min_similarity, 0.95);
        assert_eq!(
            reg.get("team-b").expect("b").min_similarity,
            UNVERIFIED_MIN_SIMILARITY
        );
    }

    #[test]
    fn tenants_take_the_local_verifier_when_it_was_built_and_its_floor_with_it() {
        let local = VerifierDefaults {
            min_score: 0.6,
            min_similarity: 0.75,
        };
        let available = BTreeMap::from([(LOCAL_VERIFIER.to_owned(), local)]);
        let mut cfg = config();
        cfg.tenants[1].verifier_min_score = Some(0.8);
        cfg.tenants.push(TenantConfig {
            name: "team-c".into(),
            verifier: Some(NO_VERIFIER.into()),
            ..Default::default()
        });
        let reg = TenantRegistry::with_verifiers(&cfg, &available).expect("valid config");
        let a = reg.get("team-a").expect("a");
        assert_eq!(a.min_similarity, 0.95, "an explicit floor stays");
        assert_eq!(a.verification.as_ref().map(|v| v.min_score), Some(0.6));
        let b = reg.get("team-b").expect("b");
        assert_eq!(b.min_similarity, 0.75, "the verifier's floor");
        assert_eq!(b.verification.as_ref().map(|v| v.min_score), Some(0.8));
        let c = reg.get("team-c").expect("c");
        assert_eq!((c.min_similarity, c.verification.is_none()), (0.9, true));
        // Without the local verifier nobody verifies, and the unverified floor applies.
        let reg = TenantRegistry::from_config(&cfg).expect("valid config");
        assert!(reg.all().all(|t| t.verification.is_none()));
        assert_eq!(reg.get("team-b").expect("b").min_similarity, 0.9);
        // A verifier named but not built is refused.
        cfg.tenants[1].verifier = Some("tei".into());
        assert!(matches!(
            TenantRegistry::with_verifiers(&cfg, &available),
            Err(TenantConfigError::UnknownVerifier { .. })
        ));
        cfg.tenants[1].verifier = None;
        cfg.tenants[1].target_error_rate = Some(1.5);
        assert!(matches!(
            TenantRegistry::with_verifiers(&cfg, &available),
            Err(TenantConfigError::Verifier { .. })
        ));
    }

    #[test]
    fn bad_tenant_configs_are_refused() {
        let mut cfg = config();
        cfg.tenants[0].name = "Team_A".into();
        assert!(matches!(
            TenantRegistry::from_config(&cfg),
            Err(TenantConfigError::InvalidName(_))
        ));
        let mut cfg = config();
        cfg.tenants[1].api_key_sha256 = vec![hash_key("key-a")];
        assert!(matches!(
            TenantRegistry::from_config(&cfg),
            Err(TenantConfigError::SharedKey(..))
        ));
        let mut cfg = config();
        cfg.tenants[1].name = "team-a".into();
        assert!(matches!(
            TenantRegistry::from_config(&cfg),
            Err(TenantConfigError::Duplicate(_))
        ));
        let mut cfg = config();
        cfg.tenants[0].api_key_sha256 = vec!["xyz".into()];
        assert!(matches!(
            TenantRegistry::from_config(&cfg),
            Err(TenantConfigError::InvalidHash { .. })
        ));
    }
}
