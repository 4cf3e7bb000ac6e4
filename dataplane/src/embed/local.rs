//! The `local` provider: a BERT-style sentence encoder (all-MiniLM-L6-v2 by default) run
//! in-process with candle from `model.safetensors`, `tokenizer.json` and `config.json`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use semantis_contract::{EmbedderConfig, Pooling};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use super::{EmbedError, Embedder};

struct Model {
    bert: BertModel,
    tokenizer: Tokenizer,
    pooling: Pooling,
    normalize: bool,
}

pub struct LocalEmbedder {
    model: Arc<Model>,
    dimension: usize,
    timeout: Duration,
    max_tokens: usize,
}

impl LocalEmbedder {
    /// Load the weights and tokenizer; fails if the model's hidden size is not `dimension`.
    pub fn load(dir: &Path, cfg: &EmbedderConfig) -> Result<Self, EmbedError> {
        let load_err = |reason: String| EmbedError::Load {
            path: dir.display().to_string(),
            reason,
        };
        let config_text = std::fs::read_to_string(dir.join("config.json"))
            .map_err(|e| load_err(format!("failed to read config.json: {e}")))?;
        let config: Config = serde_json::from_str(&config_text)
            .map_err(|e| load_err(format!("failed to parse config.json: {e}")))?;
        let weights = std::fs::read(dir.join("model.safetensors"))
            .map_err(|e| load_err(format!("failed to read model.safetensors: {e}")))?;
        let vb = VarBuilder::from_buffered_safetensors(weights, DType::F32, &Device::Cpu)
            .map_err(|e| load_err(format!("failed to read the weights: {e}")))?;
        let bert = BertModel::load(vb, &config)
            .map_err(|e| load_err(format!("failed to build the model: {e}")))?;
        let mut tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| load_err(format!("failed to read tokenizer.json: {e}")))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            ..Default::default()
        }));
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: cfg.max_tokens,
                ..Default::default()
            }))
            .map_err(|e| load_err(format!("failed to configure truncation: {e}")))?;
        let model = Model {
            bert,
            tokenizer,
            pooling: cfg.pooling,
            normalize: cfg.normalize,
        };
        let probe = model.run(&["dimension probe".to_owned()])?;
        let got = probe.first().map_or(0, Vec::len);
        if got != cfg.dimension {
            return Err(EmbedError::Dimension {
                expected: cfg.dimension,
                got,
            });
        }
        Ok(Self {
            model: Arc::new(model),
            dimension: got,
            timeout: Duration::from_millis(cfg.timeout_ms),
            max_tokens: cfg.max_tokens,
        })
    }
}

impl Model {
    fn run(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let inference = |e: candle_core::Error| EmbedError::Inference(e.to_string());
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| EmbedError::Inference(format!("failed to tokenize: {e}")))?;
        let device = Device::Cpu;
        let ids: Vec<Tensor> = encodings
            .iter()
            .map(|e| Tensor::new(e.get_ids(), &device))
            .collect::<Result<_, _>>()
            .map_err(inference)?;
        let masks: Vec<Tensor> = encodings
            .iter()
            .map(|e| Tensor::new(e.get_attention_mask(), &device))
            .collect::<Result<_, _>>()
            .map_err(inference)?;
        let ids = Tensor::stack(&ids, 0).map_err(inference)?;
        let mask = Tensor::stack(&masks, 0).map_err(inference)?;
        let token_types = ids.zeros_like().map_err(inference)?;
        let hidden = self
            .bert
            .forward(&ids, &token_types, Some(&mask))
            .map_err(inference)?;
        let pooled = match self.pooling {
            Pooling::Mean => {
                let mask = mask
                    .to_dtype(DType::F32)
                    .and_then(|m| m.unsqueeze(2))
                    .map_err(inference)?;
                let summed = hidden
                    .broadcast_mul(&mask)
                    .and_then(|h| h.sum(1))
                    .map_err(inference)?;
                let counts = mask.sum(1).map_err(inference)?;
                summed.broadcast_div(&counts).map_err(inference)?
            }
            Pooling::Cls => hidden
                .narrow(1, 0, 1)
                .and_then(|h| h.squeeze(1))
                .map_err(inference)?,
        };
        let pooled = if self.normalize {
            let norm = pooled
                .sqr()
                .and_then(|s| s.sum_keepdim(1))
                .and_then(|s| s.sqrt())
                .map_err(inference)?;
            pooled.broadcast_div(&norm).map_err(inference)?
        } else {
            pooled
        };
        pooled.to_vec2::<f32>().map_err(inference)
    }
}

#[async_trait]
impl Embedder for LocalEmbedder {
    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let model = self.model.clone();
        let texts = texts.to_vec();
        let work = tokio::task::spawn_blocking(move || model.run(&texts));
        match tokio::time::timeout(self.timeout, work).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => Err(EmbedError::Inference(format!(
                "the model task failed: {join}"
            ))),
            Err(_) => Err(EmbedError::Timeout(
                u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX),
            )),
        }
    }

    fn dimension(&self) -> usize {
        self.dimension
    }

    fn provider(&self) -> &'static str {
        "local"
    }

    /// From the tokenizer: the end of the last token the model sees. A token covers at least
    /// one byte, so a text of fewer bytes than the window (special tokens aside) is read whole
    /// without tokenizing it.
    fn window(&self, text: &str) -> Option<usize> {
        if text.len() + 2 <= self.max_tokens {
            return None;
        }
        let encoding = self.model.tokenizer.encode(text, true).ok()?;
        if encoding.get_overflowing().is_empty() {
            return None;
        }
        let end = encoding
            .get_offsets()
            .iter()
            .map(|&(_, end)| end)
            .max()
            .unwrap_or(0);
        (end < text.len()).then(|| (end..=text.len()).find(|&i| text.is_char_boundary(i)))?
    }
}
