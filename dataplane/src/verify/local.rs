//! The `local` verifier: a cross-encoder run in-process with candle. It is the local
//! embedder's BERT (all-MiniLM-L6-v2, from the same `model.safetensors`) with the verifier
//! file's adaptations merged in at load time — low-rank deltas of the encoder's dense layers,
//! new LayerNorms, token-type embeddings and pooler — plus a one-logit classifier. It reads
//! `[CLS] query [SEP] candidate [SEP]` and answers the probability that the candidate's
//! answer answers the query. `scripts/verifier/train.py` writes the file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Linear, VarBuilder};
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{EncodeInput, PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use semantis_cache::ports::{Verifier, VerifyError};

/// The file format this loader reads (the training script's `format` metadata).
pub const FORMAT: &str = "semantis-verifier-lora";

/// What the verifier file says about itself: the base it adapts and the thresholds it was
/// calibrated with on data kept out of its training.
#[derive(Debug, Clone, PartialEq)]
pub struct Calibration {
    pub min_score: f32,
    pub min_similarity: f32,
    /// Encoder layers the verifier uses (the first N of the base).
    pub layers: usize,
}

struct CrossEncoder {
    bert: BertModel,
    pooler: Linear,
    classifier: Linear,
    tokenizer: Tokenizer,
}

pub struct LocalVerifier {
    model: Arc<CrossEncoder>,
    /// One model run at a time: candle's kernels use every core already. The permit moves
    /// into the run, so a lookup that gives up waiting does not free the cores early.
    gate: Arc<tokio::sync::Semaphore>,
    pub calibration: Calibration,
}

fn load_err(path: &Path) -> impl Fn(String) -> VerifyError + '_ {
    move |reason| VerifyError::Load {
        path: path.display().to_string(),
        reason,
    }
}

/// The verifier file's metadata.
fn read_calibration(path: &Path, bytes: &[u8]) -> Result<Calibration, VerifyError> {
    let err = load_err(path);
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| err(format!("failed to read the safetensors header: {e}")))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let get = |key: &str| {
        meta.get(key)
            .ok_or_else(|| err(format!("the file's metadata has no `{key}`")))
    };
    let format = get("format")?;
    if format != FORMAT {
        return Err(err(format!("format `{format}`, expected `{FORMAT}`")));
    }
    let number = |key: &str| -> Result<f64, VerifyError> {
        get(key)?
            .parse::<f64>()
            .map_err(|e| err(format!("metadata `{key}` is not a number: {e}")))
    };
    Ok(Calibration {
        min_score: number("min_score")? as f32,
        min_similarity: number("min_similarity")? as f32,
        layers: number("layers")? as usize,
    })
}

impl LocalVerifier {
    /// Load the base model from `model_dir` and merge the verifier file at `weights` into it.
    pub fn load(model_dir: &Path, weights: &Path, max_tokens: usize) -> Result<Self, VerifyError> {
        let err = load_err(weights);
        let bytes = std::fs::read(weights).map_err(|e| err(format!("failed to read: {e}")))?;
        let calibration = read_calibration(weights, &bytes)?;
        let base_err = load_err(model_dir);
        let config_text = std::fs::read_to_string(model_dir.join("config.json"))
            .map_err(|e| base_err(format!("failed to read config.json: {e}")))?;
        let mut config: Config = serde_json::from_str(&config_text)
            .map_err(|e| base_err(format!("failed to parse config.json: {e}")))?;
        config.num_hidden_layers = calibration.layers;
        let device = Device::Cpu;
        let mut tensors =
            candle_core::safetensors::load(model_dir.join("model.safetensors"), &device)
                .map_err(|e| base_err(format!("failed to read model.safetensors: {e}")))?;
        let delta = candle_core::safetensors::load_buffer(&bytes, &device)
            .map_err(|e| err(format!("failed to read the tensors: {e}")))?;
        merge(&mut tensors, delta).map_err(&err)?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &device);
        let model_err = |e: candle_core::Error| err(format!("failed to build the model: {e}"));
        let bert = BertModel::load(vb.clone(), &config).map_err(model_err)?;
        let hidden = config.hidden_size;
        let pooler = candle_nn::linear(hidden, hidden, vb.pp("pooler.dense")).map_err(model_err)?;
        let classifier = candle_nn::linear(hidden, 1, vb.pp("classifier")).map_err(model_err)?;
        let mut tokenizer = Tokenizer::from_file(model_dir.join("tokenizer.json"))
            .map_err(|e| base_err(format!("failed to read tokenizer.json: {e}")))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            ..Default::default()
        }));
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                ..Default::default()
            }))
            .map_err(|e| err(format!("failed to configure truncation: {e}")))?;
        Ok(Self {
            model: Arc::new(CrossEncoder {
                bert,
                pooler,
                classifier,
                tokenizer,
            }),
            gate: Arc::new(tokio::sync::Semaphore::new(1)),
            calibration,
        })
    }
}

/// Merge the verifier file into the base tensors: `x.lora_b` and `x.lora_a` add
/// `lora_b · lora_a` to `x.weight`; every other tensor replaces (or adds) its namesake.
fn merge(base: &mut HashMap<String, Tensor>, delta: HashMap<String, Tensor>) -> Result<(), String> {
    let f32_of = |name: &str, t: &Tensor| {
        t.to_dtype(DType::F32)
            .map_err(|e| format!("failed to convert `{name}`: {e}"))
    };
    for (name, tensor) in &delta {
        if name.ends_with(".lora_a") {
            continue;
        }
        if let Some(prefix) = name.strip_suffix(".lora_b") {
            let a_name = format!("{prefix}.lora_a");
            let a = delta
                .get(&a_name)
                .ok_or_else(|| format!("`{name}` has no `{a_name}`"))?;
            let weight_name = format!("{prefix}.weight");
            let weight = base
                .get(&weight_name)
                .ok_or_else(|| format!("the base model has no `{weight_name}`"))?;
            let update = f32_of(name, tensor)?
                .matmul(&f32_of(&a_name, a)?)
                .and_then(|d| weight.add(&d))
                .map_err(|e| format!("failed to merge `{prefix}`: {e}"))?;
            base.insert(weight_name, update);
        } else {
            base.insert(name.clone(), f32_of(name, tensor)?);
        }
    }
    Ok(())
}

impl CrossEncoder {
    fn score(&self, query: &str, candidates: &[String]) -> Result<Vec<f32>, VerifyError> {
        let inference = |e: candle_core::Error| VerifyError::Inference(e.to_string());
        let inputs: Vec<EncodeInput> = candidates
            .iter()
            .map(|c| (query.to_owned(), c.clone()).into())
            .collect();
        let encodings = self
            .tokenizer
            .encode_batch(inputs, true)
            .map_err(|e| VerifyError::Inference(format!("failed to tokenize: {e}")))?;
        let device = Device::Cpu;
        let stack = |f: &dyn Fn(&tokenizers::Encoding) -> &[u32]| -> Result<Tensor, VerifyError> {
            let rows: Vec<Tensor> = encodings
                .iter()
                .map(|e| Tensor::new(f(e), &device))
                .collect::<Result<_, _>>()
                .map_err(inference)?;
            Tensor::stack(&rows, 0).map_err(inference)
        };
        let ids = stack(&|e| e.get_ids())?;
        let types = stack(&|e| e.get_type_ids())?;
        let mask = stack(&|e| e.get_attention_mask())?;
        let hidden = self
            .bert
            .forward(&ids, &types, Some(&mask))
            .map_err(inference)?;
        let cls = hidden
            .narrow(1, 0, 1)
            .and_then(|h| h.squeeze(1))
            .map_err(inference)?;
        let logits = self
            .pooler
            .forward(&cls)
            .and_then(|p| p.tanh())
            .and_then(|p| self.classifier.forward(&p))
            .and_then(|l| l.squeeze(1))
            .map_err(inference)?;
        let probabilities = candle_nn::ops::sigmoid(&logits).map_err(inference)?;
        probabilities.to_vec1::<f32>().map_err(inference)
    }
}

#[async_trait]
impl Verifier for LocalVerifier {
    async fn score(&self, query: &str, candidates: &[String]) -> Result<Vec<f32>, VerifyError> {
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        let model = self.model.clone();
        let (query, candidates) = (query.to_owned(), candidates.to_vec());
        let permit = self
            .gate
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| VerifyError::Inference(format!("the model gate closed: {e}")))?;
        tokio::task::spawn_blocking(move || {
            let _running = permit;
            model.score(&query, &candidates)
        })
        .await
        .map_err(|e| VerifyError::Inference(format!("the model task failed: {e}")))?
    }

    fn provider(&self) -> &'static str {
        "local"
    }
}

/// Where the local verifier's file is looked for when `weights` is not set.
pub fn default_weights(model_dir: &Path) -> PathBuf {
    model_dir.join("semantis-verifier.safetensors")
}
