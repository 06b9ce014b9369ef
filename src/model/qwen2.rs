//! The Qwen2 forward pass over quantized GGUF weights.
//!
//! Started from candle-transformers' `quantized_qwen2`, changed where it costs time or
//! memory:
//! - the KV cache lives outside the weights ([`KvCache`]), so one loaded model can serve
//!   several sequences; it is allocated once per sequence and written in place (no
//!   `Tensor::cat` per token), and grouped-query attention reads it without `repeat_kv`
//!   copies;
//! - the token embedding stays quantized: only the rows of the tokens fed are dequantized
//!   (stock candle dequantizes the whole table to f32 at load, 0.9 GB for the 1.5B);
//! - on the CPU, Q5_0 matrices (the 0.5B's) and Q8_0 ones of widths candle's tiled
//!   kernels skip run through our own SIMD kernels ([`crate::kernels::matmul`]), and Q4_K /
//!   Q6_K ones (the 1.5B's) through kernels that read the mapped GGUF file in place
//!   ([`crate::kernels::kquants`]), as does the embedding lookup.

use super::gguf::ModelInfo;
pub use super::weights::{linear, Linear, WeightSource};
use super::weights::{Embedding, Projection};
use crate::kernels as cpu;
use candle_core::quantized::QTensor;
use candle_core::{DType, Device, IndexOp, Module, Result, Storage, Tensor};
use candle_transformers::quantized_nn::RmsNorm;
use candle_transformers::utils::build_causal_mask;

struct Mlp {
    /// gate and up, stacked where their formats match.
    gate_up: Projection,
    down: Linear,
}

impl Mlp {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let [gate, up] = outputs(self.gate_up.forward(xs)?)?;
        self.down.forward(&silu_mul(&gate, &up)?)
    }
}

/// SiLU(gate)·up: on the CPU in one pass over both ([`cpu::ops::silu_mul`]), elsewhere
/// as candle's two operations.
fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if !gate.device().is_cpu() || gate.dtype() != DType::F32 || gate.shape() != up.shape() {
        return candle_nn::ops::silu(gate)? * up;
    }
    let mut out = vec![0f32; gate.elem_count()];
    let fused = {
        let (g, g_layout) = gate.storage_and_layout();
        let (u, u_layout) = up.storage_and_layout();
        let (Storage::Cpu(g), Storage::Cpu(u)) = (&*g, &*u) else {
            candle_core::bail!("silu_mul: a CPU tensor not in CPU storage");
        };
        match (g_layout.contiguous_offsets(), u_layout.contiguous_offsets()) {
            (Some((g0, g1)), Some((u0, u1))) => {
                let (g, u) = (&g.as_slice::<f32>()?[g0..g1], &u.as_slice::<f32>()?[u0..u1]);
                cpu::ops::silu_mul(g, u, &mut out);
                true
            }
            _ => false,
        }
    };
    if !fused {
        return candle_nn::ops::silu(gate)? * up;
    }
    Tensor::from_vec(out, gate.shape(), &Device::Cpu)
}

struct Layer {
    /// q, k and v with their biases, stacked where their formats match.
    qkv: Projection,
    wo: Linear,
    attn_norm: RmsNorm,
    mlp: Mlp,
    ffn_norm: RmsNorm,
}

/// A projection's outputs as an array of the expected length.
fn outputs<const N: usize>(v: Vec<Tensor>) -> Result<[Tensor; N]> {
    let got = v.len();
    v.try_into()
        .map_err(|_| candle_core::Error::Msg(format!("projection gave {got} outputs, not {N}")))
}

impl Layer {
    fn load(src: &impl WeightSource, i: usize, eps: f64, device: &Device) -> Result<Self> {
        let name = |n: &str| format!("blk.{i}.{n}");
        let names = |ns: &[&str]| ns.iter().map(|n| name(n)).collect::<Vec<_>>();
        let f = |n: &str| -> Result<QTensor> { src.tensor(&name(n), device) };
        Ok(Layer {
            qkv: Projection::load(
                src,
                &names(&["attn_q.weight", "attn_k.weight", "attn_v.weight"]),
                Some(&names(&["attn_q.bias", "attn_k.bias", "attn_v.bias"])),
                device,
            )?,
            wo: linear(src, &name("attn_output.weight"), device)?,
            attn_norm: RmsNorm::from_qtensor(f("attn_norm.weight")?, eps)?,
            mlp: Mlp {
                gate_up: Projection::load(
                    src,
                    &names(&["ffn_gate.weight", "ffn_up.weight"]),
                    None,
                    device,
                )?,
                down: linear(src, &name("ffn_down.weight"), device)?,
            },
            ffn_norm: RmsNorm::from_qtensor(f("ffn_norm.weight")?, eps)?,
        })
    }

    fn matrices(&self) -> impl Iterator<Item = &Linear> {
        self.qkv
            .matrices()
            .chain([&self.wo])
            .chain(self.mlp.gate_up.matrices())
            .chain([&self.mlp.down])
    }
}

/// Per-sequence attention state: keys and values of every position seen so far, in
/// buffers allocated once per sequence (for the expected length, doubling if it is
/// exceeded) and written in place, one (1, kv_heads, capacity, head_dim) pair per layer.
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
    capacity: usize,
}

impl KvCache {
    /// A cache for about `capacity` positions (it grows past that if needed).
    pub fn new(n_layers: usize, capacity: usize) -> Self {
        Self {
            layers: vec![None; n_layers],
            len: 0,
            capacity: capacity.max(1),
        }
    }

    /// Number of positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets every position; the buffers stay allocated for reuse.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Keeps the first `len` positions (a shared prefix), forgetting the rest.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Makes room for `needed` positions, allocating or doubling every layer's buffers.
    fn reserve(
        &mut self,
        needed: usize,
        kv_heads: usize,
        head_dim: usize,
        device: &Device,
    ) -> Result<()> {
        let allocated = self.layers.iter().all(|l| l.is_some());
        if allocated && needed <= self.capacity {
            return Ok(());
        }
        let mut capacity = self.capacity;
        while capacity < needed {
            capacity *= 2;
        }
        for slot in &mut self.layers {
            let dtype = cache_dtype(device);
            let k = Tensor::zeros((1, kv_heads, capacity, head_dim), dtype, device)?;
            let v = Tensor::zeros((1, kv_heads, capacity, head_dim), dtype, device)?;
            if let Some((old_k, old_v)) = slot.take() {
                if self.len > 0 {
                    k.slice_set(&old_k.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                    v.slice_set(&old_v.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                }
            }
            *slot = Some((k, v));
        }
        self.capacity = capacity;
        Ok(())
    }
}

/// Writes this step's keys and values (1, kv_heads, seq, head_dim) into the cache at
/// `pos`, then attends the queries (1, heads, seq, head_dim, already rotated) over every
/// cached position; returns (1, heads, seq, head_dim). Grouped-query attention without
/// copying keys per query head: the query heads that share a key head are stacked as
/// extra rows against that key head's cache. `mask` is the causal mask (seq, pos + seq)
/// of a multi-token step.
pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (k_cache, v_cache): &(Tensor, Tensor),
    pos: usize,
    mask: Option<&Tensor>,
    neg_inf: &Tensor,
) -> Result<Tensor> {
    let (b, n_head, seq_len, hd) = q.dims4()?;
    let n_kv = k.dim(1)?;
    let n_rep = n_head / n_kv;
    // Keys and values are kept at f16 precision, as llama.cpp's default cache holds
    // them: greedy output then follows the reference engine's through near-ties.
    let stored = |t: &Tensor| -> Result<Tensor> {
        let t = t.to_dtype(DType::F16)?;
        if k_cache.dtype() == DType::F16 {
            Ok(t)
        } else {
            t.to_dtype(k_cache.dtype())
        }
    };
    k_cache.slice_set(&stored(k)?, 2, pos)?;
    v_cache.slice_set(&stored(v)?, 2, pos)?;
    let len = pos + seq_len;
    if seq_len == 1 && b == 1 && q.device().is_cpu() && k_cache.dtype() == DType::F16 {
        return decode_on_cpu(q, (k_cache, v_cache), len);
    }
    let k = k_cache.narrow(2, 0, len)?.to_dtype(DType::F32)?;
    let v = v_cache.narrow(2, 0, len)?.to_dtype(DType::F32)?;

    let q = q.reshape((b, n_kv, n_rep * seq_len, hd))?;
    let att = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
    let att = match mask {
        Some(mask) => {
            let grouped = att.reshape((b, n_kv, n_rep, seq_len, len))?;
            mask.broadcast_as(grouped.shape())?
                .where_cond(&neg_inf.broadcast_as(grouped.shape())?, &grouped)?
                .reshape((b, n_kv, n_rep * seq_len, len))?
        }
        None => att,
    };
    let att = candle_nn::ops::softmax_last_dim(&att)?;
    att.matmul(&v)?.reshape((b, n_head, seq_len, hd))
}

/// How a device's cache holds keys and values: f16 on the CPU, where decode attention
/// reads them from memory and half the bytes is half the time; f32 elsewhere (candle's
/// matmuls there take f32).
fn cache_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F16
    } else {
        DType::F32
    }
}

/// One query position (1, heads, 1, head_dim) against the first `len` positions of an
/// f16 cache on the CPU, by [`cpu::attention::decode`].
fn decode_on_cpu(q: &Tensor, (k_cache, v_cache): (&Tensor, &Tensor), len: usize) -> Result<Tensor> {
    let (_, heads, _, head_dim) = q.dims4()?;
    let (_, kv_heads, capacity, _) = k_cache.dims4()?;
    let shape = cpu::attention::Heads {
        heads,
        kv_heads,
        head_dim,
        capacity,
    };
    let q = q.flatten_all()?.to_vec1::<f32>()?;
    let mut out = vec![0f32; heads * head_dim];
    {
        let (k, k_layout) = k_cache.storage_and_layout();
        let (v, v_layout) = v_cache.storage_and_layout();
        let (Storage::Cpu(k), Storage::Cpu(v)) = (&*k, &*v) else {
            candle_core::bail!("decode attention on the CPU with a cache elsewhere");
        };
        if !k_layout.is_contiguous() || !v_layout.is_contiguous() {
            candle_core::bail!("the kv cache is not contiguous");
        }
        let k = &k.as_slice::<half::f16>()?[k_layout.start_offset()..];
        let v = &v.as_slice::<half::f16>()?[v_layout.start_offset()..];
        cpu::attention::decode(&q, k, v, shape, len, &mut out);
    }
    Tensor::from_vec(out, (1, heads, 1, head_dim), &Device::Cpu)
}

pub struct Qwen2 {
    /// The token embedding table as stored in the file; rows are dequantized on lookup.
    embeddings: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: Linear,
    cos: Tensor,
    sin: Tensor,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    hidden: usize,
    neg_inf: Tensor,
    device: Device,
    /// Bytes of matrix weights one token's forward pass reads (every layer's matrices
    /// and the output projection; the embedding contributes one row).
    weight_bytes_per_token: u64,
}

fn rope_tables(info: &ModelInfo, head_dim: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let theta: Vec<f32> = (0..head_dim)
        .step_by(2)
        .map(|i| 1f32 / info.rope_freq_base.powf(i as f32 / head_dim as f32))
        .collect();
    let theta = Tensor::new(theta.as_slice(), device)?;
    let positions = Tensor::arange(0, info.context_length as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((info.context_length, 1))?;
    let angles = positions.matmul(&theta.reshape((1, theta.elem_count()))?)?;
    Ok((angles.cos()?, angles.sin()?))
}

impl Qwen2 {
    pub fn load(
        src: &(impl WeightSource + Sync),
        info: &ModelInfo,
        device: &Device,
    ) -> Result<Self> {
        let eps = info.rms_norm_eps;
        let head_dim = info.embedding_length / info.head_count;
        let embeddings = Embedding::load(src, "token_embd.weight", device)?;
        let norm = RmsNorm::from_qtensor(src.tensor("output_norm.weight", device)?, eps)?;
        // Qwen2.5 models without an output projection tie it to the embeddings.
        let output = if src.has_tensor("output.weight") {
            linear(src, "output.weight", device)?
        } else {
            linear(src, "token_embd.weight", device)?
        };
        let load = |range: std::ops::Range<usize>| -> Result<Vec<Layer>> {
            range.map(|i| Layer::load(src, i, eps, device)).collect()
        };
        // On the CPU, two threads load the layers (what is not mapped is copied and
        // packed: the 0.5B's Q5_0/Q8_0 tiles); a GPU is driven by this thread alone.
        let n = info.block_count;
        let layers = if device.is_cpu() && n > 1 {
            std::thread::scope(|s| -> Result<Vec<Layer>> {
                let second = s.spawn(|| load(n / 2..n));
                let mut layers = load(0..n / 2)?;
                layers.extend(second.join().map_err(|_| {
                    candle_core::Error::Msg("a layer loading thread panicked".into())
                })??);
                Ok(layers)
            })?
        } else {
            load(0..n)?
        };
        let (cos, sin) = rope_tables(info, head_dim, device)?;
        let weight_bytes_per_token = output.storage_bytes()
            + layers
                .iter()
                .flat_map(|l| l.matrices())
                .map(|m| m.storage_bytes())
                .sum::<u64>();
        Ok(Self {
            weight_bytes_per_token,
            embeddings,
            layers,
            norm,
            output,
            cos,
            sin,
            n_head: info.head_count,
            n_kv_head: info.head_count_kv,
            head_dim,
            hidden: info.embedding_length,
            neg_inf: Tensor::new(f32::NEG_INFINITY, device)?,
            device: device.clone(),
        })
    }

    /// A cache for a sequence expected to reach `capacity` positions.
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        KvCache::new(self.layers.len(), capacity.min(self.max_positions()))
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Bytes of weights read per generated token: the numerator of a bandwidth roofline.
    pub fn weight_bytes_per_token(&self) -> u64 {
        self.weight_bytes_per_token
    }

    /// Largest position the rotary tables cover (the model's trained context).
    pub fn max_positions(&self) -> usize {
        self.cos.dim(0).unwrap_or(0)
    }

    fn rope(&self, x: &Tensor, pos: usize) -> Result<Tensor> {
        let seq_len = x.dim(2)?;
        let cos = self.cos.narrow(0, pos, seq_len)?;
        let sin = self.sin.narrow(0, pos, seq_len)?;
        candle_nn::rotary_emb::rope(x, &cos, &sin)
    }

    /// Self-attention of `x` (positions `pos..`) over the cached positions and itself.
    fn attention(
        &self,
        layer: &Layer,
        kv: &(Tensor, Tensor),
        x: &Tensor,
        mask: Option<&Tensor>,
        pos: usize,
    ) -> Result<Tensor> {
        let (b, seq_len, _) = x.dims3()?;
        let (hd, n_kv) = (self.head_dim, self.n_kv_head);
        let heads = |t: Tensor, n: usize| -> Result<Tensor> {
            t.reshape((b, seq_len, n, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let [q, k, v] = outputs(layer.qkv.forward(x)?)?;
        let q = heads(q, self.n_head)?;
        let k = heads(k, n_kv)?;
        let v = heads(v, n_kv)?;
        let q = self.rope(&q, pos)?;
        let k = self.rope(&k, pos)?;
        let y = attend(&q, &k, &v, kv, pos, mask, &self.neg_inf)?;
        let y = y.transpose(1, 2)?.reshape((b, seq_len, self.hidden))?;
        layer.wo.forward(&y)
    }

    /// Runs `tokens` (appended after what `cache` holds) and returns the logits of the
    /// last position, as f32 on the CPU-visible device.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let pos = cache.len;
        let seq_len = tokens.len();
        if seq_len == 0 {
            candle_core::bail!("forward called with no tokens");
        }
        if pos + seq_len > self.max_positions() {
            candle_core::bail!(
                "sequence of {} positions exceeds the model's context of {}",
                pos + seq_len,
                self.max_positions()
            );
        }
        cache.reserve(pos + seq_len, self.n_kv_head, self.head_dim, &self.device)?;
        let input = Tensor::new(tokens, &self.device)?.unsqueeze(0)?;
        let mask = if seq_len == 1 {
            None
        } else {
            Some(build_causal_mask(seq_len, pos, &self.device)?)
        };
        let mut h = self.embeddings.forward(&input)?;
        for (layer, slot) in self.layers.iter().zip(cache.layers.iter()) {
            let Some(kv) = slot else {
                candle_core::bail!("kv cache not allocated");
            };
            let residual = h.clone();
            let x = layer.attn_norm.forward(&h)?;
            let x = (self.attention(layer, kv, &x, mask.as_ref(), pos)? + residual)?;
            let residual = x.clone();
            let y = layer.mlp.forward(&layer.ffn_norm.forward(&x)?)?;
            h = (y + residual)?;
        }
        cache.len += seq_len;
        let h = self.norm.forward(&h)?;
        let last = h.i((.., seq_len - 1, ..))?;
        self.output.forward(&last)?.squeeze(0)?.to_dtype(DType::F32)
    }
}
