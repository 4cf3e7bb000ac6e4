//! Tenants and API keys. Keys are configured as SHA-256 hashes (or read from Secret files and
//! hashed at startup); a request's key is hashed and looked up, so plaintext keys are never
//! kept or compared.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use semantis_contract::{CacheDefaults, DataplaneConfig, EvictionPolicy};
use sha2::{Digest, Sha256};

use crate::error::CacheError;

/// A tenant's effective settings: its own overrides on top of the defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct Tenant {
    pub name: String,
    pub min_similarity: f32,
    pub default_ttl_secs: u64,
    pub max_entries: u64,
    pub eviction: EvictionPolicy,
    pub near_miss_margin: f32,
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
    pub fn from_config(cfg: &DataplaneConfig) -> Result<Self, TenantConfigError> {
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
            let tenant = resolve(&cfg.cache, t)?;
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
) -> Result<Tenant, TenantConfigError> {
    let min_similarity = t.min_similarity.unwrap_or(defaults.min_similarity);
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
    Ok(Tenant {
        name: t.name.clone(),
        min_similarity,
        default_ttl_secs: t.default_ttl_secs.unwrap_or(defaults.default_ttl_secs),
        max_entries,
        eviction: t.eviction.unwrap_or(defaults.eviction),
        near_miss_margin: defaults.near_miss_margin,
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
            CacheDefaults::default().min_similarity
        );
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
