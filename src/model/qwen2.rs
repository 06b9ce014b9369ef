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
use candle_core::{DType, Device, Result, Storage, Tensor};
use candle_transformers::utils::build_causal_mask;

/// RMSNorm with its weight on the model's device and, on the CPU, as host values for the
/// host forward pass ([`norm_rows`]).
struct RmsNorm {
    weight: Tensor,
    host: Option<Vec<f32>>,
    eps: f32,
}

impl RmsNorm {
    fn from_qtensor(w: QTensor, eps: f64) -> Result<Self> {
        let weight = w.dequantize(&w.device())?;
        let host = if weight.device().is_cpu() {
            Some(weight.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
        } else {
            None
        };
        Ok(Self {
            weight,
            host,
            eps: eps as f32,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(x, &self.weight, self.eps)
    }

    /// Each row of `xs` normed into `out` (both row-major, rows of the weight's width).
    fn forward_host(&self, xs: &[f32], out: &mut [f32]) -> Result<()> {
        let Some(w) = &self.host else {
            candle_core::bail!("the host forward pass on a model loaded elsewhere");
        };
        if w.is_empty() || xs.len() != out.len() || !xs.len().is_multiple_of(w.len()) {
            candle_core::bail!("rms_norm of {} values in rows of {}", xs.len(), w.len());
        }
        for (x, o) in xs.chunks_exact(w.len()).zip(out.chunks_exact_mut(w.len())) {
            norm_rows(x, w, self.eps, o);
        }
        Ok(())
    }
}

/// One row's RMSNorm with candle's float operations in candle's order (a sequential sum
/// of squares, then x / rms · weight), so the host path gives candle's bits.
fn norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let sum2 = x.iter().map(|&v| v * v).sum::<f32>();
    let m = (sum2 / x.len() as f32 + eps).sqrt();
    for ((o, &x), &w) in out.iter_mut().zip(x).zip(w) {
        *o = x / m * w;
    }
}

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
fn outputs<T, const N: usize>(v: Vec<T>) -> Result<[T; N]> {
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

/// Positions per block of a [`PagedKv`] (a multiple of 4, as the CPU kernel needs).
pub const KV_BLOCK: usize = 32;

/// Where a [`PagedKv`] keeps its blocks.
enum KvStore {
    /// On the CPU, f16 (as llama.cpp's default cache holds them: greedy output then
    /// follows the reference engine's through near-ties, and decode attention reads half
    /// the bytes), read and written in place by [`cpu::attention`]. Per layer (keys,
    /// values), laid out as [`cpu::attention::Paged`] says.
    Cpu(Vec<(Vec<half::f16>, Vec<half::f16>)>),
    /// Elsewhere, (blocks, kv_heads, block, head_dim) f32 tensors per layer (candle's
    /// matmuls there take f32), values rounded through f16 as on the CPU.
    Device(Vec<(Tensor, Tensor)>),
}

/// Keys and values of many sequences, in fixed-size blocks of positions: a sequence's
/// positions live in the blocks its block table names, in order. Which block belongs to
/// whom is the caller's business (`crate::serving::blocks`); the forward pass reads and
/// writes the blocks it is given.
pub struct PagedKv {
    store: KvStore,
    n_blocks: usize,
    shape: cpu::attention::Paged,
}

/// A zeroed f16 buffer (calloc'd: pages are only backed once written).
fn zeroed_f16(n: usize) -> Vec<half::f16> {
    let mut bits = std::mem::ManuallyDrop::new(vec![0u16; n]);
    // SAFETY: f16 is a transparent wrapper of u16: same size, alignment and validity;
    // the allocation is handed over whole.
    unsafe {
        Vec::from_raw_parts(
            bits.as_mut_ptr() as *mut half::f16,
            bits.len(),
            bits.capacity(),
        )
    }
}

impl PagedKv {
    pub fn n_blocks(&self) -> usize {
        self.n_blocks
    }

    pub fn block_size(&self) -> usize {
        self.shape.block_size
    }

    /// Grows to `n_blocks` blocks, keeping what the existing ones hold.
    pub fn grow(&mut self, n_blocks: usize, device: &Device) -> Result<()> {
        if n_blocks <= self.n_blocks {
            return Ok(());
        }
        let per_block = self.shape.block_len();
        match &mut self.store {
            KvStore::Cpu(layers) => {
                for buf in layers.iter_mut().flat_map(|(k, v)| [k, v]) {
                    let mut grown = zeroed_f16(n_blocks * per_block);
                    grown[..buf.len()].copy_from_slice(buf);
                    *buf = grown;
                }
            }
            KvStore::Device(layers) => {
                let s = self.shape;
                for buf in layers.iter_mut().flat_map(|(k, v)| [k, v]) {
                    let grown = Tensor::zeros(
                        (n_blocks, s.kv_heads, s.block_size, s.head_dim),
                        DType::F32,
                        device,
                    )?;
                    grown.slice_set(buf, 0, 0)?;
                    *buf = grown;
                }
            }
        }
        self.n_blocks = n_blocks;
        Ok(())
    }

    /// Makes a host cache resident now (one write per page): a server claims its whole KV
    /// budget at start, as llama.cpp does, so its memory stays flat however the blocks
    /// are later used, and a budget too large for the machine shows at start, not hours
    /// into serving. (A device cache is allocated whole already.)
    pub fn make_resident(&mut self) {
        if let KvStore::Cpu(layers) = &mut self.store {
            const PAGE: usize = 4096 / std::mem::size_of::<half::f16>();
            for buf in layers.iter_mut().flat_map(|(k, v)| [k, v]) {
                for x in buf.iter_mut().step_by(PAGE) {
                    // SAFETY: a valid, aligned place in the buffer; volatile so the
                    // write of the value it already holds is not elided.
                    unsafe { std::ptr::write_volatile(x, half::f16::ZERO) };
                }
            }
        }
    }
}

/// One sequence's part of a batched forward pass.
#[derive(Clone, Copy, Debug)]
pub struct SeqChunk<'a> {
    /// The tokens to run, at positions `start..start + tokens.len()`.
    pub tokens: &'a [u32],
    pub start: usize,
    /// The sequence's block table, covering at least `start + tokens.len()` positions;
    /// positions before `start` must already be in those blocks.
    pub blocks: &'a [u32],
    /// How many of the chunk's last rows need logits (0 for a prefill chunk that does
    /// not end the prompt, 1 for a decode step, more to verify drafted tokens).
    pub logits: usize,
}

/// A single sequence's cache in blocks of its own (for callers without a scheduler:
/// parity tests, benchmarks, device checks).
pub struct KvCache {
    kv: PagedKv,
    blocks: Vec<u32>,
    len: usize,
}

impl KvCache {
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
}

pub struct Qwen2 {
    /// The token embedding table as stored in the file; rows are dequantized on lookup.
    embeddings: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: Linear,
    cos: Tensor,
    sin: Tensor,
    /// The same tables on the host, (positions × head_dim / 2) each, for the CPU path.
    rope_host: Option<(Vec<f32>, Vec<f32>)>,
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

/// Rotates one head (`x`, head_dim values) to position `pos` as candle's `rope` does
/// (the two halves of the head are the pairs' first and second parts).
fn rope_in_place(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = x.len() / 2;
    let (a, b) = x.split_at_mut(half);
    for i in 0..half {
        let (x1, x2) = (a[i], b[i]);
        a[i] = x1 * cos[i] - x2 * sin[i];
        b[i] = x1 * sin[i] + x2 * cos[i];
    }
}

/// A (1, rows, width) tensor's values, row-major.
fn host_rows(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()
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
        let rope_host = if device.is_cpu() {
            Some((host_rows(&cos)?, host_rows(&sin)?))
        } else {
            None
        };
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
            rope_host,
            n_head: info.head_count,
            n_kv_head: info.head_count_kv,
            head_dim,
            hidden: info.embedding_length,
            neg_inf: Tensor::new(f32::NEG_INFINITY, device)?,
            device: device.clone(),
        })
    }

    fn kv_shape(&self, block_size: usize) -> cpu::attention::Paged {
        cpu::attention::Paged {
            heads: self.n_head,
            kv_heads: self.n_kv_head,
            head_dim: self.head_dim,
            block_size,
        }
    }

    /// Bytes one block of [`KV_BLOCK`] positions takes in a [`PagedKv`] (all layers).
    pub fn kv_bytes_per_block(&self) -> u64 {
        let per_value = if self.device.is_cpu() { 2 } else { 4 };
        (2 * self.layers.len() * self.kv_shape(KV_BLOCK).block_len() * per_value) as u64
    }

    /// A paged cache of `n_blocks` blocks of [`KV_BLOCK`] positions on the model's device.
    pub fn new_paged_kv(&self, n_blocks: usize) -> Result<PagedKv> {
        self.paged_kv(n_blocks, self.device.is_cpu())
    }

    fn paged_kv(&self, n_blocks: usize, host: bool) -> Result<PagedKv> {
        let shape = self.kv_shape(KV_BLOCK);
        let store = if host {
            let n = n_blocks * shape.block_len();
            KvStore::Cpu(
                (0..self.layers.len())
                    .map(|_| (zeroed_f16(n), zeroed_f16(n)))
                    .collect(),
            )
        } else {
            let dims = (n_blocks, shape.kv_heads, shape.block_size, shape.head_dim);
            KvStore::Device(
                (0..self.layers.len())
                    .map(|_| {
                        Ok((
                            Tensor::zeros(dims, DType::F32, &self.device)?,
                            Tensor::zeros(dims, DType::F32, &self.device)?,
                        ))
                    })
                    .collect::<Result<_>>()?,
            )
        };
        Ok(PagedKv {
            store,
            n_blocks,
            shape,
        })
    }

    /// A cache for one sequence expected to reach `capacity` positions (it grows).
    pub fn new_cache(&self, capacity: usize) -> Result<KvCache> {
        self.cache(capacity, self.device.is_cpu())
    }

    /// As [`new_cache`](Self::new_cache), held in tensors and attended with candle's
    /// operations even on the CPU: the path GPUs take, for tests to check on any machine.
    #[doc(hidden)]
    pub fn new_cache_on_tensors(&self, capacity: usize) -> Result<KvCache> {
        self.cache(capacity, false)
    }

    fn cache(&self, capacity: usize, host: bool) -> Result<KvCache> {
        let n = capacity
            .clamp(1, self.max_positions().max(1))
            .div_ceil(KV_BLOCK);
        Ok(KvCache {
            kv: self.paged_kv(n, host)?,
            blocks: (0..n as u32).collect(),
            len: 0,
        })
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

    /// Self-attention of the batch's rows `x` (1, rows, hidden): each chunk's queries
    /// over its sequence's cached positions and its own, writing its keys and values
    /// into its blocks first.
    fn attention(
        &self,
        layer: &Layer,
        kv: KvLayer<'_>,
        x: &Tensor,
        batch: &[SeqChunk],
    ) -> Result<Tensor> {
        let [q, k, v] = outputs(layer.qkv.forward(x)?)?;
        let y = self.attention_device(&q, &k, &v, kv, batch)?;
        layer.wo.forward(&y)
    }

    /// [`attention`](Self::attention) on the CPU: rotary embedding, the f16 store into
    /// the blocks and attention over them, straight on the host buffers.
    fn attention_cpu(
        &self,
        [mut q, mut k, v]: [Vec<f32>; 3],
        (k_cache, v_cache): (&mut [half::f16], &mut [half::f16]),
        shape: cpu::attention::Paged,
        batch: &[SeqChunk],
    ) -> Result<Vec<f32>> {
        let Some((cos, sin)) = &self.rope_host else {
            candle_core::bail!("the CPU attention path on a model loaded elsewhere");
        };
        let hd = self.head_dim;
        let half = hd / 2;
        let (qw, kw) = (self.n_head * hd, self.n_kv_head * hd);
        let mut rows = Vec::with_capacity(q.len() / qw);
        let mut r = 0;
        for chunk in batch {
            for (i, _) in chunk.tokens.iter().enumerate() {
                let pos = chunk.start + i;
                let (c, s) = (&cos[pos * half..][..half], &sin[pos * half..][..half]);
                for head in q[r * qw..(r + 1) * qw].chunks_exact_mut(hd) {
                    rope_in_place(head, c, s);
                }
                for (g, head) in k[r * kw..(r + 1) * kw].chunks_exact_mut(hd).enumerate() {
                    rope_in_place(head, c, s);
                    let at = shape.offset(chunk.blocks, g, pos);
                    for (dst, &x) in k_cache[at..at + hd].iter_mut().zip(head.iter()) {
                        *dst = half::f16::from_f32(x);
                    }
                    let vs = &v[r * kw + g * hd..][..hd];
                    for (dst, &x) in v_cache[at..at + hd].iter_mut().zip(vs) {
                        *dst = half::f16::from_f32(x);
                    }
                }
                rows.push(cpu::attention::Row {
                    len: pos + 1,
                    blocks: chunk.blocks,
                });
                r += 1;
            }
        }
        let mut out = vec![0f32; q.len()];
        cpu::attention::paged(&q, &rows, k_cache, v_cache, shape, &mut out);
        Ok(out)
    }

    /// [`attention`](Self::attention) with candle's operations, one chunk at a time: the
    /// chunk's keys and values are written into its blocks, its blocks gathered into one
    /// run of positions, then softmax(q·Kᵀ/√d)·V under the causal mask.
    fn attention_device(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        KvLayer {
            k: k_cache,
            v: v_cache,
            shape,
        }: KvLayer<'_>,
        batch: &[SeqChunk],
    ) -> Result<Tensor> {
        let (hd, n_kv, bs) = (self.head_dim, self.n_kv_head, shape.block_size);
        let n_rep = self.n_head / n_kv;
        let mut outs = Vec::with_capacity(batch.len());
        let mut r0 = 0;
        for chunk in batch {
            let (n, pos) = (chunk.tokens.len(), chunk.start);
            let heads = |t: &Tensor, h: usize| -> Result<Tensor> {
                t.narrow(1, r0, n)?
                    .reshape((1, n, h, hd))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let q = self.rope(&heads(q, self.n_head)?, pos)?;
            let k = self.rope(&heads(k, n_kv)?, pos)?;
            let v = heads(v, n_kv)?;
            // Rounded through f16, as the CPU cache holds them.
            let stored =
                |t: &Tensor| -> Result<Tensor> { t.to_dtype(DType::F16)?.to_dtype(DType::F32) };
            let (k, v) = (stored(&k)?, stored(&v)?);
            let mut i = 0;
            while i < n {
                let p = pos + i;
                let (block, off) = (chunk.blocks[p / bs] as usize, p % bs);
                let run = (bs - off).min(n - i);
                for (cache, t) in [(k_cache, &k), (v_cache, &v)] {
                    cache.narrow(0, block, 1)?.slice_set(
                        &t.narrow(2, i, run)?.contiguous()?,
                        2,
                        off,
                    )?;
                }
                i += run;
            }
            let len = pos + n;
            let nb = len.div_ceil(bs);
            let ids = Tensor::new(&chunk.blocks[..nb], &self.device)?;
            let gather = |cache: &Tensor| -> Result<Tensor> {
                cache
                    .index_select(&ids, 0)?
                    .transpose(0, 1)?
                    .contiguous()?
                    .reshape((1, n_kv, nb * bs, hd))?
                    .narrow(2, 0, len)
            };
            let (k, v) = (gather(k_cache)?, gather(v_cache)?);
            let q = q.reshape((1, n_kv, n_rep * n, hd))?;
            let att = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
            let att = if n > 1 {
                let mask = build_causal_mask(n, pos, &self.device)?;
                let grouped = att.reshape((1, n_kv, n_rep, n, len))?;
                mask.broadcast_as(grouped.shape())?
                    .where_cond(&self.neg_inf.broadcast_as(grouped.shape())?, &grouped)?
                    .reshape((1, n_kv, n_rep * n, len))?
            } else {
                att
            };
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            let y = att
                .matmul(&v.contiguous()?)?
                .reshape((1, self.n_head, n, hd))?;
            outs.push(y.transpose(1, 2)?.reshape((1, n, self.hidden))?);
            r0 += n;
        }
        Tensor::cat(&outs, 1)
    }

    /// Runs a batch of sequences' chunks in one pass (the matrices see every row at
    /// once) and returns the logits of the rows each chunk asked for, in order, as
    /// (rows, vocab) f32.
    pub fn forward_batch(&self, batch: &[SeqChunk], kv: &mut PagedKv) -> Result<Tensor> {
        if batch.is_empty() || batch.iter().any(|c| c.tokens.is_empty()) {
            candle_core::bail!("forward called with no tokens");
        }
        let bs = kv.block_size();
        for c in batch {
            let end = c.start + c.tokens.len();
            if end > self.max_positions() {
                candle_core::bail!(
                    "sequence of {end} positions exceeds the model's context of {}",
                    self.max_positions()
                );
            }
            if end.div_ceil(bs) > c.blocks.len()
                || c.blocks.iter().any(|&b| b as usize >= kv.n_blocks)
            {
                candle_core::bail!("a block table does not cover its {end} positions");
            }
            if c.logits > c.tokens.len() {
                candle_core::bail!("logits asked for rows the chunk does not have");
            }
        }
        let flat: Vec<u32> = batch.iter().flat_map(|c| c.tokens).copied().collect();
        let mut wanted = Vec::new();
        let mut r = 0u32;
        for c in batch {
            let n = c.tokens.len() as u32;
            wanted.extend(r + n - c.logits as u32..r + n);
            r += n;
        }
        let shape = kv.shape;
        let layers_kv = match &mut kv.store {
            KvStore::Cpu(layers) => return self.forward_host(batch, layers, shape, &flat, &wanted),
            KvStore::Device(layers) => layers,
        };
        let input = Tensor::new(flat.as_slice(), &self.device)?.unsqueeze(0)?;
        let mut h = self.embeddings.forward(&input)?;
        for (layer, (k, v)) in self.layers.iter().zip(layers_kv.iter()) {
            let kv_layer = KvLayer { k, v, shape };
            let residual = h.clone();
            let x = layer.attn_norm.forward(&h)?;
            let x = (self.attention(layer, kv_layer, &x, batch)? + residual)?;
            let residual = x.clone();
            let y = layer.mlp.forward(&layer.ffn_norm.forward(&x)?)?;
            h = (y + residual)?;
        }
        if wanted.is_empty() {
            return Tensor::zeros((0, 0), DType::F32, &self.device);
        }
        let rows = h.squeeze(0)?;
        let rows = if wanted.len() == flat.len() {
            rows
        } else {
            rows.index_select(&Tensor::new(wanted.as_slice(), &self.device)?, 0)?
        };
        let h = self.norm.forward(&rows)?;
        self.output.forward(&h)?.to_dtype(DType::F32)
    }

    /// [`forward_batch`](Self::forward_batch) on the CPU, on host buffers from start to
    /// end: the same float operations as the tensor path (so the same bits), without a
    /// tensor, an allocation per operation or a thread-pool dispatch for the small ones
    /// (norms, biases, residuals), which took a tenth of a decode step of the 1.5B.
    fn forward_host(
        &self,
        batch: &[SeqChunk],
        layers_kv: &mut [(Vec<half::f16>, Vec<half::f16>)],
        shape: cpu::attention::Paged,
        flat: &[u32],
        wanted: &[u32],
    ) -> Result<Tensor> {
        let width = self.hidden;
        let input = Tensor::new(flat, &Device::Cpu)?;
        let mut h = host_rows(&self.embeddings.forward(&input)?)?;
        if h.len() != flat.len() * width {
            candle_core::bail!(
                "embedding gave {} values for {} tokens",
                h.len(),
                flat.len()
            );
        }
        let mut x = vec![0f32; h.len()];
        for (layer, (k_cache, v_cache)) in self.layers.iter().zip(layers_kv.iter_mut()) {
            layer.attn_norm.forward_host(&h, &mut x)?;
            let qkv = outputs(layer.qkv.forward_host(&x)?)?;
            let y = self.attention_cpu(qkv, (k_cache, v_cache), shape, batch)?;
            add_assign(&mut h, &layer.wo.forward_host(&y)?)?;
            layer.ffn_norm.forward_host(&h, &mut x)?;
            let [gate, up] = outputs(layer.mlp.gate_up.forward_host(&x)?)?;
            let mut act = vec![0f32; gate.len()];
            cpu::ops::silu_mul(&gate, &up, &mut act);
            add_assign(&mut h, &layer.mlp.down.forward_host(&act)?)?;
        }
        if wanted.is_empty() {
            return Tensor::zeros((0, 0), DType::F32, &Device::Cpu);
        }
        let rows: Vec<f32> = wanted
            .iter()
            .flat_map(|&r| &h[r as usize * width..(r as usize + 1) * width])
            .copied()
            .collect();
        let mut normed = vec![0f32; rows.len()];
        self.norm.forward_host(&rows, &mut normed)?;
        let logits = self.output.forward_host(&normed)?;
        let vocab = logits.len() / wanted.len();
        Tensor::from_vec(logits, (wanted.len(), vocab), &Device::Cpu)
    }

    /// Runs `tokens` (appended after what `cache` holds) and returns the logits of the
    /// last position, as f32 on the model's device.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let end = cache.len + tokens.len();
        let need = end.div_ceil(KV_BLOCK);
        if need > cache.blocks.len() && end <= self.max_positions() {
            // Double, as a growing buffer does, up to the model's context.
            let n = need
                .max(2 * cache.blocks.len())
                .min(self.max_positions().div_ceil(KV_BLOCK));
            cache.kv.grow(n, &self.device)?;
            cache.blocks = (0..n as u32).collect();
        }
        let chunk = SeqChunk {
            tokens,
            start: cache.len,
            blocks: &cache.blocks,
            logits: 1,
        };
        let logits = self.forward_batch(&[chunk], &mut cache.kv)?;
        cache.len = end;
        logits.squeeze(0)
    }
}

/// One layer's part of a device [`PagedKv`], as the tensor path's attention reads it.
struct KvLayer<'a> {
    k: &'a Tensor,
    v: &'a Tensor,
    shape: cpu::attention::Paged,
}

/// `acc += add`, element by element (a residual connection on the host).
fn add_assign(acc: &mut [f32], add: &[f32]) -> Result<()> {
    if acc.len() != add.len() {
        candle_core::bail!("residual of {} values onto {}", add.len(), acc.len());
    }
    for (a, b) in acc.iter_mut().zip(add) {
        *a += b;
    }
    Ok(())
}
