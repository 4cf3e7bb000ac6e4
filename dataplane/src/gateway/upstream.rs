//! One OpenAI-compatible upstream: its base URL, how its key is sent, its deadlines, its
//! circuit breaker and its price table.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use semantis_contract::{ModelPrice, UpstreamAuth, UpstreamConfig};

use crate::upstream::Breaker;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("failed to call upstream `{0}`: its circuit breaker is open after repeated failures")]
    CircuitOpen(String),
    #[error("failed to call upstream `{upstream}`: no answer within {timeout_ms} ms")]
    Timeout { upstream: String, timeout_ms: u64 },
    #[error("failed to call upstream `{upstream}`: {source}")]
    Unreachable {
        upstream: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("failed to build the call to upstream `{upstream}`: {message}")]
    Request { upstream: String, message: String },
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamConfigError {
    #[error("upstream `{0}`: `base_url` must start with http:// or https://")]
    BaseUrl(String),
    #[error("upstream `{name}`: failed to read its API key from {place}: {why}")]
    Key {
        name: String,
        place: String,
        why: String,
    },
    #[error("upstream `{name}`: price of `{model}` must be finite and not negative")]
    Price { name: String, model: String },
    #[error("failed to build the HTTP client for upstream `{name}`: {source}")]
    Client {
        name: String,
        #[source]
        source: reqwest::Error,
    },
}

/// The client's own credentials, forwarded when its tenant passes them (`upstream_key =
/// "client"`): its `Authorization` and `api-key` headers as sent.
#[derive(Debug, Default, Clone)]
pub struct ClientCredentials(pub Vec<(HeaderName, HeaderValue)>);

pub struct Upstream {
    pub name: String,
    base: String,
    auth: UpstreamAuth,
    key: Option<SecretString>,
    query: Vec<(String, String)>,
    pub timeout: Duration,
    pub idle_timeout: Duration,
    pub breaker: Breaker,
    prices: BTreeMap<String, ModelPrice>,
    http: reqwest::Client,
}

/// Response headers worth passing back from the upstream: rate-limit state and request ids.
pub fn forwarded_headers(from: &reqwest::header::HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, value) in from {
        let n = name.as_str();
        let wanted = n == "retry-after"
            || n.starts_with("x-ratelimit-")
            || n == "openai-processing-ms"
            || n == "openai-model"
            || n == "x-request-id";
        if wanted && let Ok(v) = HeaderValue::from_bytes(value.as_bytes()) {
            // The gateway's own x-request-id names the client's request; the upstream's is kept
            // under another name.
            let k = if n == "x-request-id" {
                HeaderName::from_static("x-upstream-request-id")
            } else {
                name.clone()
            };
            out.insert(k, v);
        }
    }
    out
}

impl Upstream {
    pub fn new(name: &str, cfg: &UpstreamConfig) -> Result<Self, UpstreamConfigError> {
        if !(cfg.base_url.starts_with("http://") || cfg.base_url.starts_with("https://")) {
            return Err(UpstreamConfigError::BaseUrl(name.to_owned()));
        }
        for (model, p) in &cfg.prices {
            let ok = |x: f64| x.is_finite() && x >= 0.0;
            if !ok(p.input_per_million) || !ok(p.output_per_million) {
                return Err(UpstreamConfigError::Price {
                    name: name.to_owned(),
                    model: model.clone(),
                });
            }
        }
        let key = crate::upstream::api_key(cfg.api_key_file.as_deref(), cfg.api_key_env.as_deref())
            .map_err(|(place, why)| UpstreamConfigError::Key {
                name: name.to_owned(),
                place,
                why,
            })?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(cfg.timeout_ms.clamp(1, 10_000)))
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|source| UpstreamConfigError::Client {
                name: name.to_owned(),
                source,
            })?;
        Ok(Self {
            name: name.to_owned(),
            base: cfg.base_url.trim_end_matches('/').to_owned(),
            auth: cfg.auth,
            key,
            query: cfg
                .query
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            timeout: Duration::from_millis(cfg.timeout_ms.max(1)),
            idle_timeout: Duration::from_millis(cfg.stream_idle_timeout_ms.max(1)),
            breaker: Breaker::new(
                cfg.breaker_failures,
                Duration::from_millis(cfg.breaker_cooldown_ms),
            ),
            prices: cfg.prices.clone(),
            http,
        })
    }

    /// What `model`'s call cost, from the price table (0 when the model is not priced).
    pub fn cost(&self, model: &str, prompt_tokens: u64, completion_tokens: u64) -> f64 {
        self.prices
            .get(model)
            .map_or(0.0, |p| p.cost(prompt_tokens, completion_tokens))
    }

    /// Send a request to `path` (relative to the base URL) and wait for the response headers,
    /// within the upstream's deadline. Refused at once while the breaker is open. The caller
    /// reports the outcome to the breaker ([`Upstream::settle`]) once it knows it.
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&serde_json::Value>,
        client: Option<&ClientCredentials>,
    ) -> Result<reqwest::Response, UpstreamError> {
        if !self.breaker.allows() {
            return Err(UpstreamError::CircuitOpen(self.name.clone()));
        }
        let mut req = self
            .http
            .request(method, format!("{}{}", self.base, path))
            .query(&self.query);
        match client {
            Some(creds) => {
                for (k, v) in &creds.0 {
                    req = req.header(k.as_str(), v.as_bytes());
                }
            }
            None => {
                if let Some(key) = &self.key {
                    req = match self.auth {
                        UpstreamAuth::Bearer => req.bearer_auth(key.expose_secret()),
                        UpstreamAuth::ApiKey => req.header("api-key", key.expose_secret()),
                    };
                }
            }
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        let sent = tokio::time::timeout(self.timeout, req.send()).await;
        match sent {
            Err(_) => {
                self.breaker.failure();
                Err(UpstreamError::Timeout {
                    upstream: self.name.clone(),
                    timeout_ms: u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX),
                })
            }
            Ok(Err(source)) if source.is_builder() => Err(UpstreamError::Request {
                upstream: self.name.clone(),
                message: source.to_string(),
            }),
            Ok(Err(source)) => {
                self.breaker.failure();
                Err(UpstreamError::Unreachable {
                    upstream: self.name.clone(),
                    source,
                })
            }
            Ok(Ok(resp)) => Ok(resp),
        }
    }

    /// Count an answer's status toward the breaker: a 5xx is the upstream failing, anything
    /// else (a 4xx is the request's fault) is it working.
    pub fn settle(&self, status: reqwest::StatusCode) {
        if status.is_server_error() {
            self.breaker.failure();
        } else {
            self.breaker.success();
        }
    }
}
