//! Opening a GGUF file: parse the header, check that every tensor lies inside the file
//! (so a truncated download is reported up front, not as an I/O error mid-load), and
//! read the metadata `duet show` and the model need.

use super::weights::{byte_size, read_owned, TensorBytes, WeightSource};
use candle_core::quantized::gguf_file::{self, Content, Value};
use candle_core::quantized::GgmlDType;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("model file {path} does not exist")]
    Missing { path: PathBuf },
    #[error("cannot open model file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid GGUF file (corrupt or not GGUF): {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error(
        "{path} is truncated: tensor '{tensor}' ends at byte {needed} but the file has {have} bytes \
         (an interrupted download? fetch it again)"
    )]
    Truncated {
        path: PathBuf,
        tensor: String,
        needed: u64,
        have: u64,
    },
    #[error("{path}: unsupported model: {message}")]
    Unsupported { path: PathBuf, message: String },
}

/// What a GGUF file says about the model in it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelInfo {
    pub path: PathBuf,
    pub file_size: u64,
    pub architecture: String,
    pub name: Option<String>,
    /// `general.basename` ("Qwen2.5-Coder").
    pub basename: Option<String>,
    /// Whether the vocabulary has the fill-in-the-middle tokens (`<|fim_prefix|>`,
    /// `<|fim_suffix|>`, `<|fim_middle|>`): Ollama's "insert" capability.
    pub fill_in_middle: bool,
    /// Elements of every tensor (an untied output projection counts, as in llama.cpp).
    pub parameter_count: u64,
    /// `general.size_label`, the publisher's rounded size ("1.5B").
    pub size_label: Option<String>,
    /// llama.cpp's name for `general.file_type` (e.g. Q4_K_M).
    pub quantization: String,
    pub context_length: usize,
    pub embedding_length: usize,
    pub block_count: usize,
    pub head_count: usize,
    pub head_count_kv: usize,
    pub feed_forward_length: usize,
    pub vocab_size: usize,
    pub rope_freq_base: f32,
    pub rms_norm_eps: f64,
    pub chat_template: Option<String>,
    pub eos_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
}

impl ModelInfo {
    /// Ollama's rendering of a parameter count: "494.03M", "1.54B".
    pub fn parameter_size(&self) -> String {
        let p = self.parameter_count as f64;
        if p >= 1e9 {
            format!("{:.2}B", p / 1e9)
        } else {
            format!("{:.2}M", p / 1e6)
        }
    }
}

/// An opened, checked GGUF file. The reader is positioned anywhere; tensor reads seek.
/// The file is also mapped (read-only), so that CPU kernels can compute from its bytes
/// without a copy.
pub struct GgufFile {
    pub path: PathBuf,
    pub content: Content,
    pub reader: BufReader<File>,
    pub file_size: u64,
    map: Option<Arc<memmap2::Mmap>>,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        if !path.exists() {
            return Err(GgufError::Missing {
                path: path.to_path_buf(),
            });
        }
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let file_size = file.metadata().map_err(io)?.len();
        let mut reader = BufReader::new(file);
        // candle's parser checks lengths against the file size, but a hostile header can
        // still reach arithmetic that panics (e.g. alignment 0): report that as corruption.
        let parsed =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Content::read(&mut reader)));
        let content = match parsed {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                return Err(GgufError::Corrupt {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                })
            }
            Err(_) => {
                return Err(GgufError::Corrupt {
                    path: path.to_path_buf(),
                    message: "header could not be parsed".into(),
                })
            }
        };
        // SAFETY: the mapping is read-only and lives as long as the tensors borrowing it.
        // As with every mmap-ing engine (llama.cpp, Ollama), rewriting the file while it
        // is served is not supported; replacing it (a new inode, as downloads do) is.
        let map = unsafe { memmap2::Mmap::map(reader.get_ref()) }
            .ok()
            .filter(|m| m.len() as u64 == file_size)
            .map(Arc::new);
        let f = GgufFile {
            path: path.to_path_buf(),
            content,
            reader,
            file_size,
            map,
        };
        f.check_tensor_bounds()?;
        Ok(f)
    }

    fn check_tensor_bounds(&self) -> Result<(), GgufError> {
        for (name, info) in &self.content.tensor_infos {
            let dims = info.shape.dims();
            let elems = dims
                .iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| {
                    self.corrupt(format!("tensor '{name}' has absurd shape {dims:?}"))
                })?;
            let block = info.ggml_dtype.block_size();
            if elems % block != 0 {
                return Err(self.corrupt(format!(
                    "tensor '{name}' has {elems} elements, not a multiple of its block size {block}"
                )));
            }
            let bytes = (elems / block) as u64 * info.ggml_dtype.type_size() as u64;
            let end = self
                .content
                .tensor_data_offset
                .checked_add(info.offset)
                .and_then(|s| s.checked_add(bytes))
                .ok_or_else(|| self.corrupt(format!("tensor '{name}' has an absurd offset")))?;
            if end > self.file_size {
                return Err(GgufError::Truncated {
                    path: self.path.clone(),
                    tensor: name.clone(),
                    needed: end,
                    have: self.file_size,
                });
            }
        }
        Ok(())
    }

    fn corrupt(&self, message: String) -> GgufError {
        GgufError::Corrupt {
            path: self.path.clone(),
            message,
        }
    }

    fn unsupported(&self, message: String) -> GgufError {
        GgufError::Unsupported {
            path: self.path.clone(),
            message,
        }
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn get_usize(&self, key: &str) -> Result<usize, GgufError> {
        match self.get(key) {
            Some(v) => value_as_u64(v)
                .map(|n| n as usize)
                .ok_or_else(|| self.unsupported(format!("metadata `{key}` is not an integer"))),
            None => Err(self.unsupported(format!("metadata `{key}` is missing"))),
        }
    }

    fn get_f64(&self, key: &str) -> Option<f64> {
        match self.get(key)? {
            Value::F32(v) => Some(*v as f64),
            Value::F64(v) => Some(*v),
            v => value_as_u64(v).map(|n| n as f64),
        }
    }

    fn get_str(&self, key: &str) -> Option<String> {
        self.get(key)?.to_string().ok().cloned()
    }

    /// Whether the tokenizer's vocabulary holds every one of `tokens`.
    fn has_tokens(&self, tokens: &[&str]) -> bool {
        let Some(Value::Array(vocab)) = self.get("tokenizer.ggml.tokens") else {
            return false;
        };
        tokens.iter().all(|t| {
            vocab
                .iter()
                .any(|v| matches!(v, Value::String(s) if s == t))
        })
    }

    /// Reads and checks the metadata; only the qwen2 architecture is supported.
    pub fn info(&self) -> Result<ModelInfo, GgufError> {
        let arch = self
            .get_str("general.architecture")
            .ok_or_else(|| self.unsupported("metadata `general.architecture` is missing".into()))?;
        if arch != "qwen2" {
            return Err(self.unsupported(format!(
                "architecture '{arch}' (duet runs Qwen2 / Qwen2.5-Coder models)"
            )));
        }
        let k = |s: &str| format!("{arch}.{s}");
        let embedding_length = self.get_usize(&k("embedding_length"))?;
        let head_count = self.get_usize(&k("attention.head_count"))?;
        let head_count_kv = self.get_usize(&k("attention.head_count_kv"))?;
        if head_count == 0
            || head_count_kv == 0
            || embedding_length % head_count != 0
            || head_count % head_count_kv != 0
        {
            return Err(self.unsupported(format!(
                "inconsistent attention shape: {embedding_length} wide, {head_count} heads, {head_count_kv} kv heads"
            )));
        }
        let vocab_size = match self.content.tensor_infos.get("token_embd.weight") {
            Some(t) => t.shape.dims()[0],
            None => return Err(self.unsupported("tensor `token_embd.weight` is missing".into())),
        };
        let parameter_count = self
            .content
            .tensor_infos
            .values()
            .map(|t| t.shape.elem_count() as u64)
            .sum();
        let file_type = self.get("general.file_type").and_then(value_as_u64);
        Ok(ModelInfo {
            path: self.path.clone(),
            file_size: self.file_size,
            name: self.get_str("general.name"),
            basename: self.get_str("general.basename"),
            fill_in_middle: self.has_tokens(&[
                "<|fim_prefix|>",
                "<|fim_suffix|>",
                "<|fim_middle|>",
            ]),
            size_label: self.get_str("general.size_label"),
            parameter_count,
            quantization: file_type
                .map(file_type_name)
                .unwrap_or_else(|| "unknown".into()),
            context_length: self.get_usize(&k("context_length"))?,
            embedding_length,
            block_count: self.get_usize(&k("block_count"))?,
            head_count,
            head_count_kv,
            feed_forward_length: self.get_usize(&k("feed_forward_length"))?,
            vocab_size,
            rope_freq_base: self.get_f64(&k("rope.freq_base")).unwrap_or(10000.0) as f32,
            rms_norm_eps: self
                .get_f64(&k("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-6),
            chat_template: self.get_str("tokenizer.chat_template"),
            eos_token_id: self
                .get("tokenizer.ggml.eos_token_id")
                .and_then(value_as_u64)
                .map(|v| v as u32),
            bos_token_id: self
                .get("tokenizer.ggml.bos_token_id")
                .and_then(value_as_u64)
                .map(|v| v as u32),
            architecture: arch,
        })
    }
}

impl WeightSource for GgufFile {
    fn describe(&self, name: &str) -> Option<(GgmlDType, Vec<usize>)> {
        let info = self.content.tensor_infos.get(name)?;
        Some((info.ggml_dtype, info.shape.dims().to_vec()))
    }

    fn read_raw(&self, name: &str, dst: &mut [u8]) -> candle_core::Result<()> {
        let (start, size) = self.locate(name)?;
        if dst.len() != size {
            candle_core::bail!("tensor '{name}' has {size} bytes, not {}", dst.len());
        }
        std::os::unix::fs::FileExt::read_exact_at(self.reader.get_ref(), dst, start)?;
        Ok(())
    }

    fn parts(&self, name: &str) -> candle_core::Result<Vec<TensorBytes>> {
        let Some(map) = &self.map else {
            return Ok(vec![read_owned(self, name)?]);
        };
        let (start, len) = self.locate(name)?;
        Ok(vec![TensorBytes::Mapped {
            map: map.clone(),
            start: start as usize,
            len,
        }])
    }
}

impl GgufFile {
    /// Where a tensor's bytes start in the file, and how many there are.
    fn locate(&self, name: &str) -> candle_core::Result<(u64, usize)> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("tensor '{name}' not found")))?;
        let size = byte_size(info.ggml_dtype, info.shape.dims());
        Ok((self.content.tensor_data_offset + info.offset, size))
    }
}

fn value_as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::U8(v) => Some(*v as u64),
        Value::U16(v) => Some(*v as u64),
        Value::U32(v) => Some(*v as u64),
        Value::U64(v) => Some(*v),
        Value::I8(v) => u64::try_from(*v).ok(),
        Value::I16(v) => u64::try_from(*v).ok(),
        Value::I32(v) => u64::try_from(*v).ok(),
        Value::I64(v) => u64::try_from(*v).ok(),
        _ => None,
    }
}

/// llama.cpp's `llama_ftype` names, as Ollama shows them in `details.quantization_level`.
pub fn file_type_name(ft: u64) -> String {
    match ft {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        32 => "BF16",
        _ => return format!("file_type {ft}"),
    }
    .to_string()
}

/// Re-export for callers that build GGUF files (tests, generated weights).
pub use gguf_file::Value as GgufValue;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::synthetic::{SyntheticWeights, TensorSpec};
    use crate::model::weights::linear;
    use candle_core::{Device, Tensor};

    /// A file's tensors are served from the mapping, byte for byte as read, and the
    /// matrices computed from the mapping give what the same bytes read give.
    #[test]
    fn tensors_come_from_the_mapped_file() {
        let cpu = Device::Cpu;
        let specs: Vec<TensorSpec> = [
            ("a", GgmlDType::Q4K),
            ("b", GgmlDType::Q6K),
            ("c", GgmlDType::Q8_0),
        ]
        .into_iter()
        .map(|(name, dtype)| TensorSpec {
            name: name.into(),
            dims: vec![48, 512],
            dtype,
        })
        .collect();
        let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
        let src = SyntheticWeights::of(specs, 7);
        let tensors: Vec<_> = names.iter().map(|n| src.tensor(n, &cpu).unwrap()).collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let mut out = std::fs::File::create(&path).unwrap();
        let named: Vec<(&str, &candle_core::quantized::QTensor)> =
            names.iter().map(|n| n.as_str()).zip(&tensors).collect();
        gguf_file::write(&mut out, &[], &named).unwrap();
        drop(out);

        let file = GgufFile::open(&path).unwrap();
        let x = Tensor::randn(0f32, 1f32, (1, 3, 512), &cpu).unwrap();
        for name in &names {
            let parts = file.parts(name).unwrap();
            assert!(matches!(parts[..], [TensorBytes::Mapped { .. }]), "{name}");
            let (dtype, dims) = file.describe(name).unwrap();
            let mut read = vec![0u8; byte_size(dtype, &dims)];
            file.read_raw(name, &mut read).unwrap();
            assert!(*parts[0] == read[..], "{name}");
            let want = linear(&src, name, &cpu).unwrap().forward(&x).unwrap();
            let got = linear(&file, name, &cpu).unwrap().forward(&x).unwrap();
            let diff = (want - got).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{name}");
        }
    }
}
