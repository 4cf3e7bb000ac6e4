//! Remote verifiers: a cross-encoder someone already runs behind Hugging Face Text Embeddings
//! Inference (`POST /rerank`) or the `/v1/rerank` protocol that Cohere, Jina, Voyage, vLLM and
//! Infinity speak. One call per lookup carries every candidate. No retries: the tenant's
//! budget is a few hundred milliseconds, and a miss is the safe answer; a circuit breaker
//! stops calling a verifier that keeps failing.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use semantis_contract::{VerifierConfig, VerifierProvider};
use serde::Deserialize;
use serde_json::json;

use crate::metrics::Metrics;
use crate::upstream::{Breaker, api_key};
use semantis_cache::ports::{Verifier, VerifyError};

pub struct RemoteVerifier {
    /// The configuration's name for it (the metric label).
    name: String,
    provider: VerifierProvider,
    http: reqwest::Client,
    url: String,
    model: Option<String>,
    api_key: Option<SecretString>,
    breaker: Breaker,
    metrics: Arc<Metrics>,
}

/// One scored text in TEI's answer.
#[derive(Deserialize)]
struct TeiScore {
    index: usize,
    score: f32,
}

/// The `/v1/rerank` answer: `results` (Cohere, Jina, vLLM, Infinity) or `data` (Voyage).
#[derive(Deserialize)]
struct RerankAnswer {
    #[serde(alias = "data")]
    results: Vec<RerankScore>,
}

#[derive(Deserialize)]
struct RerankScore {
    index: usize,
    relevance_score: f32,
}

impl RemoteVerifier {
    pub fn new(
        name: &str,
        cfg: &VerifierConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self, VerifyError> {
        let provider = cfg.provider;
        let load = |reason: String| VerifyError::Load {
            path: format!("verifiers.{name}"),
            reason,
        };
        let endpoint = cfg.endpoint.as_deref().ok_or_else(|| {
            load(format!(
                "the `{}` verifier needs an endpoint URL",
                provider.as_str()
            ))
        })?;
        let base = endpoint.trim_end_matches('/');
        let url = match provider {
            VerifierProvider::Tei => format!("{base}/rerank"),
            // A base URL often already ends in /v1.
            VerifierProvider::Rerank if base.ends_with("/v1") => format!("{base}/rerank"),
            VerifierProvider::Rerank => format!("{base}/v1/rerank"),
            VerifierProvider::Local => {
                return Err(load("the local verifier is not remote".into()));
            }
        };
        let http = reqwest::Client::builder()
            // The tenant's budget bounds what a lookup waits; this bounds what a call holds.
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(1))
            .build()
            .map_err(|e| load(format!("failed to build the HTTP client: {e}")))?;
        let api_key = api_key(cfg.api_key_file.as_deref(), cfg.api_key_env.as_deref())
            .map_err(|(path, reason)| VerifyError::Load { path, reason })?;
        Ok(Self {
            name: name.to_owned(),
            provider,
            http,
            url,
            model: cfg.model.clone(),
            api_key,
            breaker: Breaker::new(
                cfg.breaker_failures,
                Duration::from_millis(cfg.breaker_cooldown_ms),
            ),
            metrics,
        })
    }

    async fn call(&self, query: &str, candidates: &[String]) -> Result<Vec<f32>, VerifyError> {
        let provider = self.provider.as_str();
        let body = match self.provider {
            VerifierProvider::Tei => json!({
                "query": query, "texts": candidates, "raw_scores": false, "truncate": true,
            }),
            _ => {
                let mut body = json!({
                    "query": query, "documents": candidates, "top_n": candidates.len(),
                    "return_documents": false,
                });
                if let Some(model) = &self.model {
                    body["model"] = json!(model);
                }
                body
            }
        };
        let mut request = self.http.post(&self.url).json(&body);
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key.expose_secret());
        }
        let response = request.send().await.map_err(|e| VerifyError::Unavailable {
            provider,
            reason: format!("failed to call {}: {}", self.url, e.without_url()),
        })?;
        let status = response.status();
        if !status.is_success() {
            let mut text = response.text().await.unwrap_or_default();
            text.truncate(200);
            return Err(VerifyError::Http {
                provider,
                status: status.as_u16(),
                body: text,
            });
        }
        let bytes = response
            .bytes()
            .await
            .map_err(|e| VerifyError::Unavailable {
                provider,
                reason: format!("failed to read the answer: {}", e.without_url()),
            })?;
        let protocol = |reason: String| VerifyError::Protocol { provider, reason };
        let indexed: Vec<(usize, f32)> = match self.provider {
            VerifierProvider::Tei => serde_json::from_slice::<Vec<TeiScore>>(&bytes)
                .map_err(|e| protocol(format!("failed to parse the answer: {e}")))?
                .into_iter()
                .map(|s| (s.index, s.score))
                .collect(),
            _ => serde_json::from_slice::<RerankAnswer>(&bytes)
                .map_err(|e| protocol(format!("failed to parse the answer: {e}")))?
                .results
                .into_iter()
                .map(|s| (s.index, s.relevance_score))
                .collect(),
        };
        // Answers come sorted by score; put them back in the candidates' order, each once.
        let mut scores: Vec<Option<f32>> = vec![None; candidates.len()];
        for (index, score) in indexed {
            let slot = scores.get_mut(index).ok_or_else(|| {
                protocol(format!("a score for text {index} of {}", candidates.len()))
            })?;
            if !score.is_finite() {
                return Err(protocol(format!("a score of {score}")));
            }
            *slot = Some(score.clamp(0.0, 1.0));
        }
        scores
            .into_iter()
            .enumerate()
            .map(|(i, s)| s.ok_or_else(|| protocol(format!("no score for text {i}"))))
            .collect()
    }
}

#[async_trait]
impl Verifier for RemoteVerifier {
    async fn score(&self, query: &str, candidates: &[String]) -> Result<Vec<f32>, VerifyError> {
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        if !self.breaker.allows() {
            return Err(VerifyError::CircuitOpen(self.provider.as_str()));
        }
        let result = self.call(query, candidates).await;
        match &result {
            Ok(_) => self.breaker.success(),
            Err(_) => self.breaker.failure(),
        }
        self.metrics
            .verifier_circuit_open
            .with_label_values(&[&self.name])
            .set(i64::from(self.breaker.is_open()));
        result
    }

    fn provider(&self) -> &'static str {
        self.provider.as_str()
    }
}
