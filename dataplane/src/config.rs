//! Loading the contract's [`DataplaneConfig`]: defaults, then the TOML file, then
//! `SEMANTIS_<SECTION>__<FIELD>` environment variables (e.g. `SEMANTIS_SERVER__LISTEN`).

use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use semantis_contract::{DataplaneConfig, EmbedderConfig, EmbeddingProvider};

const SECTIONS: [&str; 9] = [
    "server",
    "storage",
    "redis",
    "postgres",
    "embedder",
    "cache",
    "tenants",
    "verifiers",
    "upstreams",
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("failed to read the configuration file {0}: it does not exist")]
    Missing(PathBuf),
    #[error("failed to load the configuration: {0}")]
    Invalid(#[from] Box<figment::Error>),
    #[error("invalid configuration: {0}")]
    Semantic(String),
}

pub fn load(path: Option<&Path>) -> Result<DataplaneConfig, ConfigError> {
    let cfg = load_unchecked(path)?;
    validate(&cfg)?;
    Ok(cfg)
}

/// [`load`] without the checks a serving configuration needs (tools like `eval` bring their
/// own tenant).
pub fn load_unchecked(path: Option<&Path>) -> Result<DataplaneConfig, ConfigError> {
    let mut figment = Figment::from(Serialized::defaults(DataplaneConfig::default()));
    if let Some(path) = path {
        if !path.exists() {
            return Err(ConfigError::Missing(path.to_owned()));
        }
        figment = figment.merge(Toml::file(path));
    }
    // Only variables naming a section: other SEMANTIS_* variables (scripts' own) are not config.
    let env = Env::prefixed("SEMANTIS_").split("__").filter(|key| {
        let section = key.as_str().split('.').next().unwrap_or("");
        SECTIONS.iter().any(|s| s.eq_ignore_ascii_case(section))
    });
    let cfg: DataplaneConfig = figment
        .merge(env)
        .extract()
        .map_err(|e| ConfigError::Invalid(Box::new(e)))?;
    Ok(cfg)
}

fn validate(cfg: &DataplaneConfig) -> Result<(), ConfigError> {
    let fail = |m: String| Err(ConfigError::Semantic(m));
    if cfg.embedder.dimension == 0 {
        return fail("embedder.dimension must be at least 1".into());
    }
    if let Some(m) = cfg.cache.min_similarity
        && !(-1.0..=1.0).contains(&m)
    {
        return fail(format!(
            "cache.min_similarity must be within -1..1, got {m}"
        ));
    }
    if cfg.cache.verifier_budget_ms == 0 {
        return fail("cache.verifier_budget_ms must be at least 1".into());
    }
    for (name, v) in &cfg.verifiers {
        if name == semantis_contract::NO_VERIFIER {
            return fail("`none` turns verification off; it cannot name a verifier".into());
        }
        if let Some(m) = v.min_similarity
            && !(-1.0..=1.0).contains(&m)
        {
            return fail(format!(
                "verifiers.{name}.min_similarity must be within -1..1, got {m}"
            ));
        }
        if let Some(m) = v.min_score
            && !(0.0..=1.0).contains(&m)
        {
            return fail(format!(
                "verifiers.{name}.min_score must be within 0..1, got {m}"
            ));
        }
    }
    if cfg.server.max_body_bytes < 1024 {
        return fail("server.max_body_bytes must be at least 1024".into());
    }
    if cfg.storage.flush_max_rows == 0 {
        return fail("storage.flush_max_rows must be at least 1".into());
    }
    if cfg.tenants.is_empty() {
        return fail("no tenants are configured: add a [[tenants]] entry".into());
    }
    Ok(())
}

/// Where the local model's files are: the configured directory, or the one
/// `scripts/fetch-model.sh` fills.
pub fn model_dir(cfg: &DataplaneConfig) -> Option<PathBuf> {
    embedder_model_dir(&cfg.embedder)
}

/// Where a local embedder's weights live (its `model_dir`, else the per-user cache).
pub fn embedder_model_dir(embedder: &EmbedderConfig) -> Option<PathBuf> {
    if embedder.provider != EmbeddingProvider::Local {
        return None;
    }
    if let Some(dir) = &embedder.model_dir {
        return Some(PathBuf::from(dir));
    }
    default_model_dir()
}

/// Where `scripts/fetch-model.sh` puts all-MiniLM-L6-v2 (and the local verifier's file).
pub fn default_model_dir() -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    Some(PathBuf::from(home).join(".cache/semantis/models/all-MiniLM-L6-v2"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail closure signature
    fn file_then_environment_overrides() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[server]\nlisten = \"127.0.0.1:1\"\n[[tenants]]\nname = \"a\"\n",
        )
        .expect("write");
        figment::Jail::expect_with(|jail| {
            jail.set_env("SEMANTIS_STORAGE__FLUSH_MAX_ROWS", "7");
            jail.set_env("SEMANTIS_CACHE_DIR", "/not/config");
            let cfg = load(Some(&path)).expect("loads");
            assert_eq!(cfg.server.listen, "127.0.0.1:1");
            assert_eq!(cfg.storage.flush_max_rows, 7);
            assert_eq!(cfg.tenants[0].name, "a");
            Ok(())
        });
    }

    #[test]
    fn missing_file_and_bad_values_are_clear_errors() {
        let err = load(Some(Path::new("/nonexistent/semantis.toml"))).expect_err("missing");
        assert!(err.to_string().contains("does not exist"), "{err}");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[cache]\nmin_similarity = 3.0\n[[tenants]]\nname = \"a\"\n",
        )
        .expect("write");
        let err = load(Some(&path)).expect_err("out of range");
        assert!(err.to_string().contains("min_similarity"), "{err}");
    }
}
