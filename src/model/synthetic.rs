//! Generated weights with the exact tensor shapes and quantization formats of real models,
//! filled with random values. They let `duet bench --dummy-weights` measure a model that
//! cannot be downloaded where the benchmark runs (the 7B Q8_0 here, anything on the GPU
//! machine, which reaches no registry): the arithmetic and the bytes read per token are
//! those of the real file, only the values are noise.

use super::gguf::ModelInfo;
use super::weights::WeightSource;
use candle_core::quantized::GgmlDType;
use candle_core::Result;
use half::f16;
use rand::{RngCore, SeedableRng};
use std::path::PathBuf;

/// A model shape duet can generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (Q4_K with Q6_K for some attn_v / ffn_down
    /// and the output projection).
    Coder1_5bQ4KM,
    /// Qwen2.5-Coder-7B-Instruct, Q8_0.
    Coder7bQ8_0,
}

impl Shape {
    pub const ALL: [Shape; 2] = [Shape::Coder1_5bQ4KM, Shape::Coder7bQ8_0];

    pub fn name(self) -> &'static str {
        match self {
            Shape::Coder1_5bQ4KM => "1.5b-q4_k_m",
            Shape::Coder7bQ8_0 => "7b-q8_0",
        }
    }

    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        let key = s.trim().to_ascii_lowercase();
        let key = key
            .trim_start_matches("qwen2.5-coder-")
            .trim_start_matches("qwen2.5-coder:");
        Self::ALL
            .into_iter()
            .find(|shape| shape.name() == key)
            .ok_or_else(|| {
                format!(
                    "unknown weight shape '{s}' (known: {})",
                    Self::ALL.map(Shape::name).join(", ")
                )
            })
    }

    /// The model name the benchmark reports.
    pub fn model_name(self) -> String {
        format!("dummy:{}", self.name())
    }

    fn dims(self) -> Dims {
        match self {
            Shape::Coder1_5bQ4KM => Dims {
                blocks: 28,
                hidden: 1536,
                ffn: 8960,
                heads: 12,
                kv_heads: 2,
                vocab: 151936,
            },
            Shape::Coder7bQ8_0 => Dims {
                blocks: 28,
                hidden: 3584,
                ffn: 18944,
                heads: 28,
                kv_heads: 4,
                vocab: 152064,
            },
        }
    }

    /// What the model's GGUF metadata would say.
    pub fn info(self) -> ModelInfo {
        let d = self.dims();
        let (size_label, quantization) = match self {
            Shape::Coder1_5bQ4KM => ("1.5B", "Q4_K_M"),
            Shape::Coder7bQ8_0 => ("7B", "Q8_0"),
        };
        let tensors = self.tensors();
        ModelInfo {
            path: PathBuf::from(format!("<generated {}>", self.name())),
            file_size: tensors.iter().map(|t| t.bytes() as u64).sum(),
            architecture: "qwen2".into(),
            name: Some(format!("generated {}", self.name())),
            basename: None,
            fill_in_middle: false,
            parameter_count: tensors.iter().map(|t| t.elems() as u64).sum(),
            size_label: Some(size_label.into()),
            quantization: quantization.into(),
            context_length: 32768,
            embedding_length: d.hidden,
            block_count: d.blocks,
            head_count: d.heads,
            head_count_kv: d.kv_heads,
            feed_forward_length: d.ffn,
            vocab_size: d.vocab,
            rope_freq_base: 1_000_000.0,
            rms_norm_eps: 1e-6,
            chat_template: None,
            eos_token_id: None,
            bos_token_id: None,
        }
    }

    /// Every tensor of the model: name, shape (rows = outputs, as candle reads GGUF) and
    /// format, following llama.cpp's choices for the file type.
    pub fn tensors(self) -> Vec<TensorSpec> {
        let d = self.dims();
        let kv = d.hidden / d.heads * d.kv_heads;
        let (base, more_bits, output) = match self {
            Shape::Coder1_5bQ4KM => (GgmlDType::Q4K, GgmlDType::Q6K, GgmlDType::Q6K),
            Shape::Coder7bQ8_0 => (GgmlDType::Q8_0, GgmlDType::Q8_0, GgmlDType::Q8_0),
        };
        let t = |name: String, dims: &[usize], dtype| TensorSpec {
            name,
            dims: dims.to_vec(),
            dtype,
        };
        let mut out = vec![
            t("token_embd.weight".into(), &[d.vocab, d.hidden], base),
            t("output_norm.weight".into(), &[d.hidden], GgmlDType::F32),
            t("output.weight".into(), &[d.vocab, d.hidden], output),
        ];
        for i in 0..d.blocks {
            // llama.cpp's Q4_K_M spends more bits on attn_v and ffn_down of these layers.
            let n = d.blocks;
            let more = i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2;
            let wide = if more { more_bits } else { base };
            let b = |s: &str| format!("blk.{i}.{s}");
            out.extend([
                t(b("attn_norm.weight"), &[d.hidden], GgmlDType::F32),
                t(b("attn_q.weight"), &[d.hidden, d.hidden], base),
                t(b("attn_q.bias"), &[d.hidden], GgmlDType::F32),
                t(b("attn_k.weight"), &[kv, d.hidden], base),
                t(b("attn_k.bias"), &[kv], GgmlDType::F32),
                t(b("attn_v.weight"), &[kv, d.hidden], wide),
                t(b("attn_v.bias"), &[kv], GgmlDType::F32),
                t(b("attn_output.weight"), &[d.hidden, d.hidden], base),
                t(b("ffn_norm.weight"), &[d.hidden], GgmlDType::F32),
                t(b("ffn_gate.weight"), &[d.ffn, d.hidden], base),
                t(b("ffn_up.weight"), &[d.ffn, d.hidden], base),
                t(b("ffn_down.weight"), &[d.hidden, d.ffn], wide),
            ]);
        }
        out
    }
}

struct Dims {
    blocks: usize,
    hidden: usize,
    ffn: usize,
    heads: usize,
    kv_heads: usize,
    vocab: usize,
}

#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    pub dims: Vec<usize>,
    pub dtype: GgmlDType,
}

impl TensorSpec {
    pub fn elems(&self) -> usize {
        self.dims.iter().product()
    }

    pub fn bytes(&self) -> usize {
        self.elems() / self.dtype.block_size() * self.dtype.type_size()
    }
}

/// Produces the tensors of a [`Shape`] on demand, each from its own seed, so loading
/// never holds more than one tensor's bytes on the host beside what the device keeps.
pub struct SyntheticWeights {
    tensors: Vec<TensorSpec>,
    seed: u64,
}

impl SyntheticWeights {
    pub fn new(shape: Shape, seed: u64) -> Self {
        Self {
            tensors: shape.tensors(),
            seed,
        }
    }

    /// A source of one tensor, for checks of a single operation.
    pub fn single(tensor: TensorSpec, seed: u64) -> Self {
        Self::of(vec![tensor], seed)
    }

    /// A source of the given tensors.
    pub fn of(tensors: Vec<TensorSpec>, seed: u64) -> Self {
        Self { tensors, seed }
    }

    /// Each tensor's values come from its own seed, whichever way it is read.
    fn rng(&self, index: usize) -> rand::rngs::SmallRng {
        rand::rngs::SmallRng::seed_from_u64(self.seed ^ (index as u64) << 20)
    }

    fn spec(&self, name: &str) -> Option<(usize, &TensorSpec)> {
        self.tensors
            .iter()
            .enumerate()
            .find(|(_, t)| t.name == name)
    }
}

impl WeightSource for SyntheticWeights {
    fn describe(&self, name: &str) -> Option<(GgmlDType, Vec<usize>)> {
        self.spec(name).map(|(_, t)| (t.dtype, t.dims.clone()))
    }

    fn read_raw(&self, name: &str, dst: &mut [u8]) -> Result<()> {
        let Some((index, spec)) = self.spec(name) else {
            candle_core::bail!("generated weights have no tensor '{name}'")
        };
        if dst.len() != spec.bytes() {
            candle_core::bail!(
                "tensor '{name}' has {} bytes, not {}",
                spec.bytes(),
                dst.len()
            );
        }
        random_blocks(spec, &mut self.rng(index), dst);
        Ok(())
    }
}

/// Fills `data` with random quantized blocks whose scales are set so that a weight row has roughly unit
/// norm: values stay finite through every layer, as with real weights.
fn random_blocks(spec: &TensorSpec, rng: &mut impl RngCore, data: &mut [u8]) {
    let cols = *spec.dims.last().unwrap_or(&1) as f32;
    if spec.dtype == GgmlDType::F32 {
        // Norm weights 1, biases 0: what a freshly initialised model holds.
        let one = if spec.name.ends_with(".bias") {
            0f32
        } else {
            1f32
        };
        for v in data.chunks_exact_mut(4) {
            v.copy_from_slice(&one.to_le_bytes());
        }
        return;
    }
    rng.fill_bytes(data);
    let block = spec.dtype.type_size();
    let put = |b: &mut [u8], at: usize, v: f32| {
        b[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes())
    };
    // Uniform quants have a standard deviation of about 0.29 of their range.
    let unit = 1.0 / (0.29 * cols.sqrt());
    for b in data.chunks_exact_mut(block) {
        match spec.dtype {
            // d (f16), then 32 signed bytes.
            GgmlDType::Q8_0 => put(b, 0, unit / 256.0),
            // d, dmin (f16), 12 bytes of 6-bit scales and mins, 128 bytes of nibbles.
            GgmlDType::Q4K => {
                put(b, 0, unit / (16.0 * 63.0));
                put(b, 2, unit / (16.0 * 63.0) / 2.0);
            }
            // 128 + 64 bytes of 6-bit quants, 16 signed scales, then d (f16).
            GgmlDType::Q6K => put(b, 208, unit / (64.0 * 128.0)),
            // d (f16), 4 bytes of high bits, 16 bytes of nibbles.
            GgmlDType::Q5_0 => put(b, 0, unit / 32.0),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn shapes_parse_by_name_and_reject_others() {
        assert_eq!(Shape::parse("1.5b-q4_k_m"), Ok(Shape::Coder1_5bQ4KM));
        assert_eq!(
            Shape::parse("qwen2.5-coder-7b-q8_0"),
            Ok(Shape::Coder7bQ8_0)
        );
        let err = Shape::parse("13b").unwrap_err();
        assert!(err.contains("1.5b-q4_k_m, 7b-q8_0"), "{err}");
    }

    #[test]
    fn the_1_5b_shape_matches_the_real_file_layout() {
        // From the real qwen2.5-coder-1.5b-instruct-q4_k_m.gguf: 339 tensors, 14 of the
        // 28 attn_v and ffn_down tensors in Q6_K, the rest of the matrices Q4_K.
        let t = Shape::Coder1_5bQ4KM.tensors();
        assert_eq!(t.len(), 339);
        let q6 = t
            .iter()
            .filter(|t| t.name.ends_with("attn_v.weight") && t.dtype == GgmlDType::Q6K)
            .count();
        assert_eq!(q6, 14);
        let info = Shape::Coder1_5bQ4KM.info();
        // As `duet show` reports for the real file (output projection counted).
        assert_eq!(info.parameter_size(), "1.78B");
        // Its tensor data: the file's 1,117,320,768 bytes less 5,950,528 of metadata.
        assert_eq!(info.file_size, 1_111_370_240);
    }

    #[test]
    fn the_7b_shape_has_the_published_dimensions() {
        let info = Shape::Coder7bQ8_0.info();
        assert_eq!(
            (info.embedding_length, info.feed_forward_length),
            (3584, 18944)
        );
        assert_eq!((info.head_count, info.head_count_kv), (28, 4));
        // Q8_0 is 34 bytes per 32 weights: about 8.1 GB for 7.6B parameters.
        assert!(
            (8.0e9..8.2e9).contains(&(info.file_size as f64)),
            "{}",
            info.file_size
        );
    }

    #[test]
    fn generated_tensors_have_finite_values_of_a_sane_size() {
        let w = SyntheticWeights::new(Shape::Coder1_5bQ4KM, 7);
        for name in [
            "blk.0.attn_q.weight",
            "blk.0.attn_v.weight",
            "output_norm.weight",
        ] {
            let t = w.tensor(name, &Device::Cpu).unwrap();
            let v: Vec<f32> = t
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert!(v.iter().all(|x| x.is_finite()), "{name}");
            let rms = (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
            assert!(rms > 1e-4 && rms < 2.0, "{name}: rms {rms}");
        }
    }
}
