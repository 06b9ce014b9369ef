//! Sentence embeddings: a BERT encoder from a sentence-transformers folder
//! (`config.json`, `tokenizer.json`, `model.safetensors`), loaded in-process with
//! candle-transformers' BERT, mean-pooled over the real tokens and L2-normalised, as
//! sentence-transformers computes all-MiniLM-L6-v2 (Ollama's `all-minilm`).

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokenizers::Tokenizer;

/// Word pieces an input may have, [CLS] and [SEP] included (sentence-transformers'
/// `max_seq_length` for this model; longer inputs are cut there or refused).
pub const DEFAULT_MAX_TOKENS: usize = 256;
/// Inputs encoded in one forward pass.
const BATCH: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error("cannot load the embedding model in {dir}: {message}")]
    Load { dir: String, message: String },
    #[error("input {index} has {tokens} tokens, more than the model's {max} (set truncate to true to cut it)")]
    TooLong {
        index: usize,
        tokens: usize,
        max: usize,
    },
    #[error("cannot tokenize input {index}: {message}")]
    Tokenize { index: usize, message: String },
    #[error("embedding failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// A loaded embedding model.
pub struct Embedder {
    model: BertModel,
    tokenizer: Tokenizer,
    device: Device,
    /// Length of the vectors.
    pub dims: usize,
    pub max_tokens: usize,
    /// Parameters of the model (every tensor's elements).
    pub parameter_count: u64,
    /// Bytes of its weights file.
    pub size: u64,
    pub dir: PathBuf,
    pub load_duration: Duration,
    cls: u32,
    sep: u32,
    /// The model's input word-piece embeddings (vocabulary × dims), the same storage
    /// the encoder reads (not a copy): what [`Embedder::static_mean`] averages.
    word_embeddings: Tensor,
}

/// What one request's inputs became.
pub struct Embedded {
    /// One unit vector per input, in order.
    pub vectors: Vec<Vec<f32>>,
    /// Tokens encoded over all inputs (after truncation), as Ollama counts
    /// `prompt_eval_count`.
    pub tokens: usize,
}

impl Embedder {
    /// Loads the folder `dir` onto `device`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, EmbedError> {
        let start = Instant::now();
        let err = |message: String| EmbedError::Load {
            dir: dir.display().to_string(),
            message,
        };
        let config: Config = std::fs::read_to_string(dir.join("config.json"))
            .map_err(|e| err(format!("config.json: {e}")))
            .and_then(|t| serde_json::from_str(&t).map_err(|e| err(format!("config.json: {e}"))))?;
        let mut tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| err(format!("tokenizer.json: {e}")))?;
        // The file pads every input to 128 and truncates: lengths are handled here.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| err(format!("tokenizer.json: {e}")))?;
        let token = |t: &str| {
            tokenizer
                .token_to_id(t)
                .ok_or_else(|| err(format!("tokenizer.json has no {t} token")))
        };
        let (cls, sep) = (token("[CLS]")?, token("[SEP]")?);
        let weights = dir.join("model.safetensors");
        let size = std::fs::metadata(&weights)
            .map_err(|e| err(format!("model.safetensors: {e}")))?
            .len();
        let data = std::fs::read(&weights).map_err(|e| err(format!("model.safetensors: {e}")))?;
        let parameter_count = weights_summary(&weights).1;
        let tensors = candle_core::safetensors::load_buffer(&data, device)
            .map_err(|e| err(format!("model.safetensors: {e}")))?;
        drop(data);
        // Some exports prefix every name with "bert." (candle's loader accepts both).
        let word_embeddings = [
            "embeddings.word_embeddings.weight",
            "bert.embeddings.word_embeddings.weight",
        ]
        .iter()
        .find_map(|k| tensors.get(*k).cloned())
        .ok_or_else(|| err("model.safetensors has no embeddings.word_embeddings.weight".into()))?
        .to_dtype(DType::F32)
        .map_err(|e| err(e.to_string()))?;
        if word_embeddings.dims() != [config.vocab_size, config.hidden_size] {
            return Err(err(format!(
                "word embeddings are {:?}, not {} × {}",
                word_embeddings.dims(),
                config.vocab_size,
                config.hidden_size
            )));
        }
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let model = BertModel::load(vb, &config).map_err(|e| err(e.to_string()))?;
        let max_tokens = DEFAULT_MAX_TOKENS.min(config.max_position_embeddings);
        Ok(Self {
            model,
            tokenizer,
            device: device.clone(),
            dims: config.hidden_size,
            max_tokens,
            parameter_count,
            size,
            dir: dir.to_path_buf(),
            load_duration: start.elapsed(),
            cls,
            sep,
            word_embeddings,
        })
    }

    /// The mean of the model's input embeddings of `ids`, each scaled to unit length
    /// first (no encoder pass: a table look-up, microseconds), unnormalised; zeros for
    /// no ids. A static sentence vector for callers that cannot afford the encoder (the
    /// router).
    pub fn static_mean(&self, ids: &[u32]) -> Result<Vec<f32>, EmbedError> {
        let vocab = self.word_embeddings.dim(0)? as u32;
        if let Some(bad) = ids.iter().find(|&&t| t >= vocab) {
            return Err(EmbedError::Tokenize {
                index: 0,
                message: format!("token id {bad} is outside the vocabulary of {vocab}"),
            });
        }
        if ids.is_empty() {
            return Ok(vec![0.0; self.dims]);
        }
        // On the CPU, a plain loop over the table: candle's ops would wake its thread pool
        // for a few hundred rows, which costs more than the sums under load.
        let (storage, layout) = self.word_embeddings.storage_and_layout();
        if let (candle_core::Storage::Cpu(cpu), Some((start, _))) =
            (&*storage, layout.contiguous_offsets())
        {
            let table = &cpu.as_slice::<f32>()?[start..];
            let d = self.dims;
            let mut mean = vec![0f32; d];
            for &t in ids {
                let row = &table[t as usize * d..(t as usize + 1) * d];
                let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
                for (m, x) in mean.iter_mut().zip(row) {
                    *m += x / norm;
                }
            }
            let n = ids.len() as f32;
            return Ok(mean.into_iter().map(|m| m / n).collect());
        }
        drop(storage);
        let ids = Tensor::from_slice(ids, ids.len(), &self.device)?;
        let rows = self.word_embeddings.index_select(&ids, 0)?;
        let norms = rows.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f32::MAX)?;
        let mean = rows.broadcast_div(&norms)?.mean(0)?;
        Ok(mean.to_vec1()?)
    }

    /// Token ids of `text` without [CLS] and [SEP].
    pub fn word_piece_ids(&self, text: &str) -> Result<Vec<u32>, EmbedError> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| EmbedError::Tokenize {
                index: 0,
                message: e.to_string(),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of each input ([CLS] … [SEP]); too long ones cut to `max_tokens`
    /// (keeping [SEP]) when `truncate`, else an error.
    pub fn tokenize(&self, inputs: &[String], truncate: bool) -> Result<Vec<Vec<u32>>, EmbedError> {
        inputs
            .iter()
            .enumerate()
            .map(|(index, text)| {
                let enc = self.tokenizer.encode(text.as_str(), true).map_err(|e| {
                    EmbedError::Tokenize {
                        index,
                        message: e.to_string(),
                    }
                })?;
                let mut ids = enc.get_ids().to_vec();
                if ids.first() != Some(&self.cls) {
                    ids.insert(0, self.cls);
                }
                if ids.last() != Some(&self.sep) {
                    ids.push(self.sep);
                }
                if ids.len() > self.max_tokens {
                    if !truncate {
                        return Err(EmbedError::TooLong {
                            index,
                            tokens: ids.len(),
                            max: self.max_tokens,
                        });
                    }
                    ids.truncate(self.max_tokens - 1);
                    ids.push(self.sep);
                }
                Ok(ids)
            })
            .collect()
    }

    /// Embeds `inputs` (several per forward pass, padded to the longest of each batch
    /// and masked), each a unit vector.
    pub fn embed(&self, inputs: &[String], truncate: bool) -> Result<Embedded, EmbedError> {
        self.embed_ids(self.tokenize(inputs, truncate)?, true)
    }

    /// Embeds inputs given as token ids ([CLS] and [SEP] added where missing); the mean
    /// of the hidden states, normalised when `normalized` (Ollama's legacy
    /// /api/embeddings gives the mean as it is).
    pub fn embed_ids(
        &self,
        mut ids: Vec<Vec<u32>>,
        normalized: bool,
    ) -> Result<Embedded, EmbedError> {
        let vocab = self.tokenizer.get_vocab_size(true) as u32;
        for (index, seq) in ids.iter_mut().enumerate() {
            if let Some(bad) = seq.iter().find(|&&t| t >= vocab) {
                return Err(EmbedError::Tokenize {
                    index,
                    message: format!("token id {bad} is outside the vocabulary of {vocab}"),
                });
            }
            if seq.first() != Some(&self.cls) {
                seq.insert(0, self.cls);
            }
            if seq.last() != Some(&self.sep) {
                seq.push(self.sep);
            }
            if seq.len() > self.max_tokens {
                return Err(EmbedError::TooLong {
                    index,
                    tokens: seq.len(),
                    max: self.max_tokens,
                });
            }
        }
        self.run(ids, normalized)
    }

    fn run(&self, ids: Vec<Vec<u32>>, normalized: bool) -> Result<Embedded, EmbedError> {
        let tokens = ids.iter().map(Vec::len).sum();
        let mut vectors = Vec::with_capacity(ids.len());
        // Similar lengths together waste less padding.
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| ids[i].len());
        let mut out: Vec<Option<Vec<f32>>> = vec![None; ids.len()];
        for chunk in order.chunks(BATCH) {
            let batch: Vec<&[u32]> = chunk.iter().map(|&i| ids[i].as_slice()).collect();
            for (&i, v) in chunk.iter().zip(self.encode(&batch, normalized)?) {
                out[i] = Some(v);
            }
        }
        vectors.extend(out.into_iter().flatten());
        Ok(Embedded { vectors, tokens })
    }

    /// One forward pass over `batch`: mean of the last hidden states over each input's
    /// tokens, normalised.
    fn encode(&self, batch: &[&[u32]], normalized: bool) -> Result<Vec<Vec<f32>>, EmbedError> {
        let n = batch.len();
        let len = batch.iter().map(|b| b.len()).max().unwrap_or(0).max(1);
        let mut ids = vec![0u32; n * len];
        let mut mask = vec![0u32; n * len];
        for (row, b) in batch.iter().enumerate() {
            ids[row * len..row * len + b.len()].copy_from_slice(b);
            mask[row * len..row * len + b.len()].fill(1);
        }
        let ids = Tensor::from_vec(ids, (n, len), &self.device)?;
        let mask = Tensor::from_vec(mask, (n, len), &self.device)?;
        let types = ids.zeros_like()?;
        let hidden = self.model.forward(&ids, &types, Some(&mask))?; // (n, len, dims)
        let mask = mask.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?;
        let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
        let counts = mask.sum(1)?;
        let mean = summed.broadcast_div(&counts)?;
        let rows: Vec<Vec<f32>> = mean.to_dtype(DType::F32)?.to_vec2()?;
        Ok(if normalized {
            rows.into_iter().map(normalize).collect()
        } else {
            rows
        })
    }
}

/// An embedding model as the server sees it: loading on a thread of its own from the
/// start, then ready (or failed); a request that comes while it loads waits for it.
pub struct EmbedSlot {
    pub name: String,
    pub dir: PathBuf,
    /// Bytes of the weights file and parameters in it (from its header).
    pub size: u64,
    pub parameter_count: u64,
    state: tokio::sync::watch::Receiver<SlotState>,
}

/// The size of a safetensors file and the elements of its tensors, from its header.
fn weights_summary(path: &Path) -> (u64, u64) {
    let read = || -> Option<(u64, u64)> {
        use std::io::Read;
        let mut f = std::fs::File::open(path).ok()?;
        let size = f.metadata().ok()?.len();
        let mut n = [0u8; 8];
        f.read_exact(&mut n).ok()?;
        let len = u64::from_le_bytes(n);
        if len > size.min(100 << 20) {
            return None;
        }
        let mut header = vec![0u8; len as usize];
        f.read_exact(&mut header).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&header).ok()?;
        let params = v
            .as_object()?
            .values()
            .filter_map(|t| {
                t.get("shape")?
                    .as_array()
                    .map(|s| s.iter().filter_map(|d| d.as_u64()).product::<u64>())
            })
            .sum();
        Some((size, params))
    };
    read().unwrap_or((0, 0))
}

#[derive(Clone)]
enum SlotState {
    Loading,
    Ready(std::sync::Arc<Embedder>),
    Failed(String),
}

impl EmbedSlot {
    /// Starts loading the model of `dir` on the CPU.
    pub fn start(name: &str, dir: PathBuf) -> std::sync::Arc<Self> {
        let (tx, rx) = tokio::sync::watch::channel(SlotState::Loading);
        let load_dir = dir.clone();
        let label = name.to_string();
        std::thread::Builder::new()
            .name(format!("load {name}"))
            .spawn(move || {
                let state = match Embedder::load(&load_dir, &Device::Cpu) {
                    Ok(e) => {
                        tracing::info!(model = %label, secs = e.load_duration.as_secs_f64(), "embedding model loaded");
                        SlotState::Ready(std::sync::Arc::new(e))
                    }
                    Err(e) => {
                        tracing::error!(model = %label, "embedding model failed to load: {e}");
                        SlotState::Failed(e.to_string())
                    }
                };
                let _ = tx.send(state);
            })
            .expect("spawn an embedding loader");
        let (size, parameter_count) = weights_summary(&dir.join("model.safetensors"));
        std::sync::Arc::new(Self {
            name: name.to_string(),
            dir,
            size,
            parameter_count,
            state: rx,
        })
    }

    /// The model, once loaded.
    pub fn get(&self) -> Option<std::sync::Arc<Embedder>> {
        match &*self.state.borrow() {
            SlotState::Ready(e) => Some(e.clone()),
            _ => None,
        }
    }

    pub fn failure(&self) -> Option<String> {
        match &*self.state.borrow() {
            SlotState::Failed(e) => Some(e.clone()),
            _ => None,
        }
    }

    /// Waits (up to `timeout`) for the model to finish loading.
    pub async fn wait(&self, timeout: Duration) -> Result<std::sync::Arc<Embedder>, String> {
        let mut rx = self.state.clone();
        let done =
            tokio::time::timeout(timeout, rx.wait_for(|s| !matches!(s, SlotState::Loading))).await;
        match done {
            Err(_) => Err(format!("embedding model '{}' is still loading", self.name)),
            Ok(Err(_)) => Err(format!("embedding model '{}' stopped loading", self.name)),
            Ok(Ok(s)) => match &*s {
                SlotState::Ready(e) => Ok(e.clone()),
                SlotState::Failed(e) => Err(e.clone()),
                SlotState::Loading => unreachable!("waited until not loading"),
            },
        }
    }
}

/// `v` scaled to unit length (a zero vector stays zero).
pub fn normalize(mut v: Vec<f32>) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        for x in &mut v {
            *x /= norm;
        }
    }
    v
}
