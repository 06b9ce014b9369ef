//! The Qwen2 forward pass over quantized GGUF weights.
//!
//! Started from candle-transformers' `quantized_qwen2` with one structural change: the KV
//! cache lives outside the weights ([`KvCache`]), so one loaded model can serve several
//! sequences and a new request never silently inherits or resets another's state.

use super::gguf::{GgufFile, ModelInfo};
use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::Embedding;
use candle_transformers::quantized_nn::RmsNorm;
use candle_transformers::utils::{build_causal_mask, repeat_kv};

struct Mlp {
    gate: QMatMul,
    up: QMatMul,
    down: QMatMul,
}

impl Mlp {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let gate = candle_nn::ops::silu(&self.gate.forward(xs)?)?;
        let up = self.up.forward(xs)?;
        self.down.forward(&(gate * up)?)
    }
}

struct Layer {
    wq: QMatMul,
    wk: QMatMul,
    wv: QMatMul,
    bq: Tensor,
    bk: Tensor,
    bv: Tensor,
    wo: QMatMul,
    attn_norm: RmsNorm,
    mlp: Mlp,
    ffn_norm: RmsNorm,
}

/// Per-sequence attention state: keys and values of every position seen so far.
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: vec![None; n_layers],
            len: 0,
        }
    }

    /// Number of positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
        self.len = 0;
    }
}

pub struct Qwen2 {
    embeddings: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: QMatMul,
    cos: Tensor,
    sin: Tensor,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    hidden: usize,
    neg_inf: Tensor,
    device: Device,
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
    pub fn load(gguf: &mut GgufFile, info: &ModelInfo, device: &Device) -> Result<Self> {
        let eps = info.rms_norm_eps;
        let head_dim = info.embedding_length / info.head_count;
        let embeddings = gguf
            .tensor("token_embd.weight", device)?
            .dequantize(device)?;
        let norm = RmsNorm::from_qtensor(gguf.tensor("output_norm.weight", device)?, eps)?;
        // Qwen2.5 0.5B ties its output projection to the embeddings.
        let output = if gguf.has_tensor("output.weight") {
            QMatMul::from_qtensor(gguf.tensor("output.weight", device)?)?
        } else {
            QMatMul::from_qtensor(gguf.tensor("token_embd.weight", device)?)?
        };
        let mut layers = Vec::with_capacity(info.block_count);
        for i in 0..info.block_count {
            let mut q = |name: &str| -> Result<QMatMul> {
                QMatMul::from_qtensor(gguf.tensor(&format!("blk.{i}.{name}"), device)?)
            };
            let (wq, wk, wv, wo) = (
                q("attn_q.weight")?,
                q("attn_k.weight")?,
                q("attn_v.weight")?,
                q("attn_output.weight")?,
            );
            let mlp = Mlp {
                gate: q("ffn_gate.weight")?,
                up: q("ffn_up.weight")?,
                down: q("ffn_down.weight")?,
            };
            let mut f = |name: &str| -> Result<Tensor> {
                gguf.tensor(&format!("blk.{i}.{name}"), device)?
                    .dequantize(device)
            };
            let (bq, bk, bv) = (f("attn_q.bias")?, f("attn_k.bias")?, f("attn_v.bias")?);
            let attn_norm = RmsNorm::from_qtensor(
                gguf.tensor(&format!("blk.{i}.attn_norm.weight"), device)?,
                eps,
            )?;
            let ffn_norm = RmsNorm::from_qtensor(
                gguf.tensor(&format!("blk.{i}.ffn_norm.weight"), device)?,
                eps,
            )?;
            layers.push(Layer {
                wq,
                wk,
                wv,
                bq,
                bk,
                bv,
                wo,
                attn_norm,
                mlp,
                ffn_norm,
            });
        }
        let (cos, sin) = rope_tables(info, head_dim, device)?;
        Ok(Self {
            embeddings: Embedding::new(embeddings, info.embedding_length),
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

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Largest position the rotary tables cover (the model's trained context).
    pub fn max_positions(&self) -> usize {
        self.cos.dim(0).unwrap_or(0)
    }

    fn rope(&self, x: &Tensor, pos: usize) -> Result<Tensor> {
        let seq_len = x.dim(2)?;
        let cos = self.cos.narrow(0, pos, seq_len)?;
        let sin = self.sin.narrow(0, pos, seq_len)?;
        candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)
    }

    fn attention(
        &self,
        layer: &Layer,
        slot: &mut Option<(Tensor, Tensor)>,
        x: &Tensor,
        mask: Option<&Tensor>,
        pos: usize,
    ) -> Result<Tensor> {
        let (b, seq_len, _) = x.dims3()?;
        let heads = |t: Tensor, n: usize| -> Result<Tensor> {
            t.reshape((b, seq_len, n, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = heads(layer.wq.forward(x)?.broadcast_add(&layer.bq)?, self.n_head)?;
        let k = heads(
            layer.wk.forward(x)?.broadcast_add(&layer.bk)?,
            self.n_kv_head,
        )?;
        let v = heads(
            layer.wv.forward(x)?.broadcast_add(&layer.bv)?,
            self.n_kv_head,
        )?;
        let q = self.rope(&q, pos)?;
        let k = self.rope(&k, pos)?;
        let (k, v) = match slot.take() {
            Some((kc, vc)) => (Tensor::cat(&[&kc, &k], 2)?, Tensor::cat(&[&vc, &v], 2)?),
            None => (k, v),
        };
        *slot = Some((k.clone(), v.clone()));

        let n_rep = self.n_head / self.n_kv_head;
        let k = repeat_kv(k, n_rep)?;
        let v = repeat_kv(v, n_rep)?;
        let att = (q.matmul(&k.t()?)? / (self.head_dim as f64).sqrt())?;
        let att = match mask {
            Some(mask) => mask
                .broadcast_as(att.shape())?
                .where_cond(&self.neg_inf.broadcast_as(att.shape())?, &att)?,
            None => att,
        };
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let y = att.matmul(&v.contiguous()?)?;
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
        let input = Tensor::new(tokens, &self.device)?.unsqueeze(0)?;
        let mask = if seq_len == 1 {
            None
        } else {
            Some(build_causal_mask(seq_len, pos, &self.device)?)
        };
        let mut h = self.embeddings.forward(&input)?;
        for (layer, slot) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let residual = h.clone();
            let x = layer.attn_norm.forward(&h)?;
            let x = (self.attention(layer, slot, &x, mask.as_ref(), pos)? + residual)?;
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
