//! Remote embedding providers over HTTP: OpenAI-compatible `/v1/embeddings`, Ollama
//! `/api/embed` and Hugging Face TEI `/embed`. Every call has a deadline, retries transient
//! failures with exponential backoff (honouring `Retry-After`), and goes through a circuit
//! breaker so a dead provider costs nothing per lookup. API keys live in a `SecretString`
//! and never reach a log line, a metric or an error message.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use backon::{ExponentialBuilder, Retryable};
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use semantis_contract::{EmbedderConfig, EmbeddingProvider};
use serde_json::{Value, json};

use super::{EmbedError, Embedder};
use crate::metrics::Metrics;
use crate::upstream::{Breaker, api_key};
use semantis_cache::vector::normalized;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    OpenAi,
    Ollama,
    Tei,
}

impl Protocol {
    fn name(self) -> &'static str {
        match self {
            Self::OpenAi => "openai",
            Self::Ollama => "ollama",
            Self::Tei => "tei",
        }
    }

    fn path(self) -> &'static str {
        match self {
            Self::OpenAi => "/v1/embeddings",
            Self::Ollama => "/api/embed",
            Self::Tei => "/embed",
        }
    }
}

/// One failed attempt, and whether another may help.
#[derive(Debug)]
struct Attempt {
    error: EmbedError,
    retry: bool,
    retry_after: Option<Duration>,
}

pub struct RemoteEmbedder {
    protocol: Protocol,
    http: reqwest::Client,
    url: String,
    model: String,
    dimension: usize,
    normalize: bool,
    send_dimensions: bool,
    api_key: Option<SecretString>,
    max_batch: usize,
    max_attempts: u32,
    breaker: Breaker,
    metrics: Arc<Metrics>,
    /// TEI and Ollama truncate long inputs silently: the bytes they are assumed to read.
    window_bytes: Option<usize>,
}

/// Bytes per token assumed where no tokenizer is at hand (English averages about 4): a low
/// estimate makes more of a long prompt count as unseen, which costs hits, not right answers.
const BYTES_PER_TOKEN: usize = 3;

fn read_api_key(cfg: &EmbedderConfig) -> Result<Option<SecretString>, EmbedError> {
    api_key(cfg.api_key_file.as_deref(), cfg.api_key_env.as_deref())
        .map_err(|(path, reason)| EmbedError::Load { path, reason })
}

impl RemoteEmbedder {
    pub fn new(cfg: &EmbedderConfig, metrics: Arc<Metrics>) -> Result<Self, EmbedError> {
        let protocol = match cfg.provider {
            EmbeddingProvider::Openai => Protocol::OpenAi,
            EmbeddingProvider::Ollama => Protocol::Ollama,
            EmbeddingProvider::Tei => Protocol::Tei,
            EmbeddingProvider::Local | EmbeddingProvider::None => {
                return Err(EmbedError::Unsupported(cfg.provider.as_str()));
            }
        };
        let endpoint = cfg.endpoint.as_deref().ok_or_else(|| EmbedError::Load {
            path: "embedder.endpoint".into(),
            reason: format!("the `{}` provider needs an endpoint URL", protocol.name()),
        })?;
        let base = endpoint.trim_end_matches('/');
        // An OpenAI base URL often already ends in /v1.
        let url = match (protocol, base.ends_with("/v1")) {
            (Protocol::OpenAi, true) => format!("{base}/embeddings"),
            _ => format!("{base}{}", protocol.path()),
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(cfg.timeout_ms))
            .connect_timeout(Duration::from_millis(cfg.timeout_ms.min(1000)))
            .build()
            .map_err(|e| EmbedError::Load {
                path: url.clone(),
                reason: format!("failed to build the HTTP client: {e}"),
            })?;
        Ok(Self {
            protocol,
            http,
            url,
            model: cfg.model.clone(),
            dimension: cfg.dimension,
            normalize: cfg.normalize,
            send_dimensions: cfg.send_dimensions,
            api_key: read_api_key(cfg)?,
            max_batch: cfg.max_batch.max(1),
            max_attempts: cfg.max_attempts.max(1),
            window_bytes: match protocol {
                Protocol::Tei | Protocol::Ollama => {
                    Some(cfg.max_tokens.saturating_mul(BYTES_PER_TOKEN))
                }
                Protocol::OpenAi => None,
            },
            breaker: Breaker::new(
                cfg.breaker_failures,
                Duration::from_millis(cfg.breaker_cooldown_ms),
            ),
            metrics,
        })
    }

    pub fn breaker_open(&self) -> bool {
        self.breaker.is_open()
    }

    fn body(&self, texts: &[String]) -> Value {
        match self.protocol {
            Protocol::OpenAi => {
                let mut body =
                    json!({"model": self.model, "input": texts, "encoding_format": "float"});
                if self.send_dimensions {
                    body["dimensions"] = json!(self.dimension);
                }
                body
            }
            Protocol::Ollama => json!({"model": self.model, "input": texts}),
            Protocol::Tei => {
                json!({"inputs": texts, "normalize": self.normalize, "truncate": true})
            }
        }
    }

    fn parse(&self, body: &Value, expected: usize) -> Result<Vec<Vec<f32>>, EmbedError> {
        let bad = |what: &str| EmbedError::Protocol {
            provider: self.protocol.name(),
            reason: what.to_owned(),
        };
        let vectors: Vec<&Value> = match self.protocol {
            Protocol::OpenAi => {
                let mut data: Vec<&Value> = body["data"]
                    .as_array()
                    .ok_or_else(|| bad("the answer has no `data` array"))?
                    .iter()
                    .collect();
                // The API may answer out of order; `index` says which input each is.
                data.sort_by_key(|d| d["index"].as_u64().unwrap_or(u64::MAX));
                data.into_iter().map(|d| &d["embedding"]).collect()
            }
            Protocol::Ollama => body["embeddings"]
                .as_array()
                .ok_or_else(|| bad("the answer has no `embeddings` array"))?
                .iter()
                .collect(),
            Protocol::Tei => body
                .as_array()
                .ok_or_else(|| bad("the answer is not an array of vectors"))?
                .iter()
                .collect(),
        };
        if vectors.len() != expected {
            return Err(bad(&format!(
                "asked for {expected} vectors, got {}",
                vectors.len()
            )));
        }
        vectors
            .into_iter()
            .map(|v| {
                let v: Vec<f32> = v
                    .as_array()
                    .ok_or_else(|| bad("a vector is not an array"))?
                    .iter()
                    .map(|x| {
                        x.as_f64()
                            .map(|f| f as f32)
                            .ok_or_else(|| bad("a vector holds a non-number"))
                    })
                    .collect::<Result<_, _>>()?;
                if v.len() != self.dimension {
                    return Err(EmbedError::Dimension {
                        expected: self.dimension,
                        got: v.len(),
                    });
                }
                if v.iter().any(|x| !x.is_finite()) {
                    return Err(bad("a vector holds a non-finite value"));
                }
                Ok(if self.normalize { normalized(v) } else { v })
            })
            .collect()
    }

    async fn attempt(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, Attempt> {
        let provider = self.protocol.name();
        let mut req = self.http.post(&self.url).json(&self.body(texts));
        if let Some(key) = &self.api_key {
            req = req.bearer_auth(key.expose_secret());
        }
        let res = req.send().await.map_err(|e| Attempt {
            error: if e.is_timeout() {
                EmbedError::Unavailable {
                    provider,
                    reason: "the request timed out".into(),
                }
            } else {
                EmbedError::Unavailable {
                    provider,
                    reason: format!("failed to reach {}: {}", self.url, without_url(&e)),
                }
            },
            retry: true,
            retry_after: None,
        })?;
        let status = res.status();
        let retry_after = res
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        if !status.is_success() {
            // A little of the body helps operators; never all of it.
            let text = res.text().await.unwrap_or_default();
            let snippet: String = text.chars().take(200).collect();
            let status = status.as_u16();
            return Err(Attempt {
                error: if matches!(status, 400 | 413 | 422) {
                    EmbedError::Rejected {
                        provider,
                        status,
                        body: snippet,
                    }
                } else {
                    EmbedError::Http {
                        provider,
                        status,
                        body: snippet,
                    }
                },
                retry: status == StatusCode::TOO_MANY_REQUESTS.as_u16() || status >= 500,
                retry_after,
            });
        }
        let body: Value = res.json().await.map_err(|e| Attempt {
            error: EmbedError::Protocol {
                provider,
                reason: format!("failed to read the answer: {}", without_url(&e)),
            },
            retry: true,
            retry_after: None,
        })?;
        self.parse(&body, texts.len()).map_err(|error| Attempt {
            error,
            retry: false,
            retry_after: None,
        })
    }

    /// One provider call with retries; TEI batches that are too large are split in halves.
    async fn call(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(50))
            .with_max_delay(Duration::from_secs(2))
            .with_max_times(usize::try_from(self.max_attempts.saturating_sub(1)).unwrap_or(2))
            .with_jitter();
        let result = (|| async { self.attempt(texts).await })
            .retry(backoff)
            .when(|a: &Attempt| a.retry)
            .adjust(|a: &Attempt, delay| a.retry_after.or(delay))
            .await;
        match result {
            Ok(v) => Ok(v),
            Err(Attempt {
                error: EmbedError::Rejected { status: 413, .. },
                ..
            }) if self.protocol == Protocol::Tei && texts.len() > 1 => {
                let (a, b) = texts.split_at(texts.len() / 2);
                let mut out = Box::pin(self.call(a)).await?;
                out.extend(Box::pin(self.call(b)).await?);
                Ok(out)
            }
            Err(a) => Err(a.error),
        }
    }
}

/// reqwest errors name the URL; keep the message but not a query string that could hold a key.
fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(url) = e.url() {
        let mut redacted = url.clone();
        redacted.set_query(None);
        s = s.replace(url.as_str(), redacted.as_str());
    }
    s
}

#[async_trait]
impl Embedder for RemoteEmbedder {
    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let provider = self.protocol.name();
        if !self.breaker.allows() {
            return Err(EmbedError::CircuitOpen(provider));
        }
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(self.max_batch) {
            match self.call(chunk).await {
                Ok(v) => {
                    self.breaker.success();
                    out.extend(v);
                }
                // The text's fault, not the provider's: the breaker is for outages.
                Err(e @ EmbedError::Rejected { .. }) => return Err(e),
                Err(e) => {
                    self.breaker.failure();
                    self.metrics
                        .embedder_circuit_open
                        .with_label_values(&[provider])
                        .set(i64::from(self.breaker.is_open()));
                    return Err(e);
                }
            }
        }
        self.metrics
            .embedder_circuit_open
            .with_label_values(&[provider])
            .set(0);
        Ok(out)
    }

    fn dimension(&self) -> usize {
        self.dimension
    }

    fn provider(&self) -> &'static str {
        self.protocol.name()
    }

    fn healthy(&self) -> bool {
        !self.breaker.is_open()
    }

    /// An estimate (no tokenizer here): OpenAI refuses inputs past its window instead of
    /// truncating them, so only TEI and Ollama have one.
    fn window(&self, text: &str) -> Option<usize> {
        let w = self.window_bytes?;
        (text.len() > w).then(|| {
            (0..=w)
                .rev()
                .find(|&i| text.is_char_boundary(i))
                .unwrap_or(0)
        })
    }
}
