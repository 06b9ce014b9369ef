//! Weights as the forward pass uses them: where tensors come from ([`WeightSource`]: a
//! GGUF file, generated weights), the quantized matrices on their device ([`Linear`]),
//! and the projections that read one input, stacked at load into as few matrices as
//! their formats allow ([`Projection`]).

use crate::kernels::kquants::{self as cpu_kquants, KMatrix, Q4KMatrix, Q6KMatrix};
use crate::kernels::matmul::{Q5_0Matrix, Q8_0Matrix};
use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QMatMul, QTensor};
use candle_core::quantized::{QStorage, QuantizedType};
use candle_core::{Device, Module, Result, Tensor, D};

pub use crate::kernels::bytes::{as_bytes_mut, zeroed_plain, TensorBytes};

/// A tensor's bytes read into memory (advised for huge pages).
pub fn read_owned<S: WeightSource + ?Sized>(src: &S, name: &str) -> Result<TensorBytes> {
    let Some((dtype, dims)) = src.describe(name) else {
        candle_core::bail!("tensor '{name}' not found")
    };
    // SAFETY: bytes are plain data.
    let mut bytes: Vec<u8> = unsafe { zeroed_plain(byte_size(dtype, &dims)) };
    src.read_raw(name, &mut bytes)?;
    Ok(TensorBytes::Owned(bytes))
}

/// Where a model's tensors come from: a GGUF file, or generated weights of a real shape.
pub trait WeightSource {
    /// Format and shape (rows first, as candle reads GGUF) of a tensor, if present.
    fn describe(&self, name: &str) -> Option<(GgmlDType, Vec<usize>)>;

    /// A tensor's bytes as stored, into `dst` (exactly its size).
    fn read_raw(&self, name: &str, dst: &mut [u8]) -> Result<()>;

    fn has_tensor(&self, name: &str) -> bool {
        self.describe(name).is_some()
    }

    /// A tensor's bytes as stored, in parts of whole rows: mapped from the file where
    /// the source maps it (no copy), else read into memory.
    fn parts(&self, name: &str) -> Result<Vec<TensorBytes>> {
        Ok(vec![read_owned(self, name)?])
    }

    /// Reads one tensor onto `device`, in the format it is stored in. On the CPU the
    /// bytes go straight into the block vector candle computes from (one copy, where
    /// candle's own reader makes two).
    fn tensor(&self, name: &str, device: &Device) -> Result<QTensor> {
        let Some((dtype, dims)) = self.describe(name) else {
            candle_core::bail!("tensor '{name}' not found")
        };
        let elems: usize = dims.iter().product();
        if !elems.is_multiple_of(dtype.block_size()) {
            candle_core::bail!(
                "tensor '{name}' of {elems} elements is not a whole number of {dtype:?} blocks"
            );
        }
        if !device.is_cpu() {
            let mut bytes = vec![0u8; byte_size(dtype, &dims)];
            self.read_raw(name, &mut bytes)?;
            return qtensor_from_ggml(dtype, &bytes, dims, device);
        }
        use candle_core::quantized::k_quants::*;
        let n = elems / dtype.block_size();
        let storage: Box<dyn QuantizedType> = match dtype {
            GgmlDType::F32 => read_blocks::<f32, Self>(self, name, n)?,
            GgmlDType::F16 => read_blocks::<half::f16, Self>(self, name, n)?,
            GgmlDType::Q4_0 => read_blocks::<BlockQ4_0, Self>(self, name, n)?,
            GgmlDType::Q4_1 => read_blocks::<BlockQ4_1, Self>(self, name, n)?,
            GgmlDType::Q5_0 => read_blocks::<BlockQ5_0, Self>(self, name, n)?,
            GgmlDType::Q5_1 => read_blocks::<BlockQ5_1, Self>(self, name, n)?,
            GgmlDType::Q8_0 => read_blocks::<BlockQ8_0, Self>(self, name, n)?,
            GgmlDType::Q2K => read_blocks::<BlockQ2K, Self>(self, name, n)?,
            GgmlDType::Q3K => read_blocks::<BlockQ3K, Self>(self, name, n)?,
            GgmlDType::Q4K => read_blocks::<BlockQ4K, Self>(self, name, n)?,
            GgmlDType::Q5K => read_blocks::<BlockQ5K, Self>(self, name, n)?,
            GgmlDType::Q6K => read_blocks::<BlockQ6K, Self>(self, name, n)?,
            other => candle_core::bail!("unsupported tensor format {other:?}"),
        };
        QTensor::new(QStorage::Cpu(storage), dims)
    }
}

/// Bytes a tensor of `dims` takes in `dtype`.
pub fn byte_size(dtype: GgmlDType, dims: &[usize]) -> usize {
    dims.iter().product::<usize>() / dtype.block_size() * dtype.type_size()
}

/// `count` values of a plain-data block type: the tensor `name`'s bytes.
fn read_blocks<T, S: WeightSource + ?Sized>(
    src: &S,
    name: &str,
    count: usize,
) -> Result<Box<dyn QuantizedType>>
where
    Vec<T>: QuantizedType + 'static,
{
    // SAFETY: the GGML block types are plain data (integers, f16 and byte arrays).
    let mut blocks: Vec<T> = unsafe { zeroed_plain(count) };
    src.read_raw(name, unsafe { as_bytes_mut(&mut blocks) })?;
    Ok(Box::new(blocks))
}

/// Matrices of one format and width read as one, rows after rows, under the name of
/// the first.
struct Stacked<'a, S> {
    src: &'a S,
    parts: &'a [String],
    dtype: GgmlDType,
    rows: usize,
    k: usize,
}

impl<S: WeightSource> WeightSource for Stacked<'_, S> {
    fn describe(&self, name: &str) -> Option<(GgmlDType, Vec<usize>)> {
        (name == self.parts[0]).then(|| (self.dtype, vec![self.rows, self.k]))
    }

    fn read_raw(&self, name: &str, dst: &mut [u8]) -> Result<()> {
        if name != self.parts[0] {
            candle_core::bail!("tensor '{name}' not found");
        }
        let mut at = 0;
        for part in self.parts {
            let Some((dtype, dims)) = self.src.describe(part) else {
                candle_core::bail!("tensor '{part}' not found")
            };
            let size = byte_size(dtype, &dims);
            let Some(slot) = dst.get_mut(at..at + size) else {
                candle_core::bail!("stacked tensors larger than their buffer");
            };
            self.src.read_raw(part, slot)?;
            at += size;
        }
        if at != dst.len() {
            candle_core::bail!("stacked tensors have {at} bytes, not {}", dst.len());
        }
        Ok(())
    }

    fn parts(&self, name: &str) -> Result<Vec<TensorBytes>> {
        if name != self.parts[0] {
            candle_core::bail!("tensor '{name}' not found");
        }
        let mut all = Vec::new();
        for part in self.parts {
            all.extend(self.src.parts(part)?);
        }
        Ok(all)
    }
}

/// A quantized weight ready for matmuls on its device: candle's QMatMul, except on the
/// CPU for Q5_0 (the 0.5B's main format, for which candle has only a scalar loop), Q8_0
/// of widths candle's tiled kernels skip ([`crate::kernels::matmul`]), and Q4_K / Q6_K where
/// the CPU has AVX-512 VNNI ([`crate::kernels::kquants`]: computed from the mapped file,
/// where candle keeps repacked copies beside the blocks).
pub enum Linear {
    Candle(QMatMul),
    Q5_0(Q5_0Matrix),
    Q8_0(Q8_0Matrix),
    Q4K(Q4KMatrix),
    Q6K(Q6KMatrix),
}

impl Linear {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Candle(m) => m.forward(x),
            Linear::Q5_0(m) => m.forward(x),
            Linear::Q8_0(m) => m.forward(x),
            Linear::Q4K(m) => m.forward(x),
            Linear::Q6K(m) => m.forward(x),
        }
    }

    /// Rows of activations on the host (`xs`, row-major, a whole number of rows of the
    /// matrix's width) times the matrix: the outputs, row-major. CPU matrices only.
    pub fn forward_host(&self, xs: &[f32]) -> Result<Vec<f32>> {
        match self {
            Linear::Q5_0(m) => m.forward_rows_of(xs),
            Linear::Q8_0(m) => m.forward_rows_of(xs),
            Linear::Q4K(m) => m.forward_rows_of(xs),
            Linear::Q6K(m) => m.forward_rows_of(xs),
            Linear::Candle(m) => {
                let k = match m {
                    QMatMul::QTensor(t) => t.shape().dims().last().copied(),
                    QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.dims().last().copied(),
                }
                .unwrap_or(0);
                if k == 0 || !xs.len().is_multiple_of(k) {
                    candle_core::bail!("matmul: {} inputs are not rows of {k}", xs.len());
                }
                let x = Tensor::from_slice(xs, (xs.len() / k, k), &Device::Cpu)?;
                m.forward(&x)?
                    .to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1()
            }
        }
    }

    /// Bytes of weights one matmul reads.
    pub fn storage_bytes(&self) -> u64 {
        match self {
            Linear::Candle(QMatMul::QTensor(t)) => t.storage_size_in_bytes() as u64,
            Linear::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => {
                (t.elem_count() * t.dtype().size_in_bytes()) as u64
            }
            Linear::Q5_0(m) => m.storage_bytes() as u64,
            Linear::Q8_0(m) => m.storage_bytes() as u64,
            Linear::Q4K(m) => m.storage_bytes() as u64,
            Linear::Q6K(m) => m.storage_bytes() as u64,
        }
    }
}

/// Loads the matrix `name` for matmuls on `device`.
pub fn linear(src: &impl WeightSource, name: &str, device: &Device) -> Result<Linear> {
    if device.is_cpu() {
        if let Some((dtype, dims)) = src.describe(name) {
            if let [n, k] = dims[..] {
                match dtype {
                    GgmlDType::Q5_0 => {
                        return Ok(Linear::Q5_0(Q5_0Matrix::read(name, n, k, |dst| {
                            src.read_raw(name, dst)
                        })?))
                    }
                    // candle's tiled Q8_0 kernels need widths that are multiples of 256.
                    GgmlDType::Q8_0 if k % 256 != 0 => {
                        return Ok(Linear::Q8_0(Q8_0Matrix::read(name, n, k, |dst| {
                            src.read_raw(name, dst)
                        })?))
                    }
                    GgmlDType::Q4K if cpu_kquants::best().is_some() => {
                        return Ok(Linear::Q4K(k_matrix(src, name, n, k)?));
                    }
                    GgmlDType::Q6K if cpu_kquants::best().is_some() => {
                        return Ok(Linear::Q6K(k_matrix(src, name, n, k)?));
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(Linear::Candle(QMatMul::from_qtensor(
        src.tensor(name, device)?,
    )?))
}

fn k_matrix<F: cpu_kquants::KFormat>(
    src: &impl WeightSource,
    name: &str,
    n: usize,
    k: usize,
) -> Result<KMatrix<F>> {
    let kernel = cpu_kquants::best().unwrap_or(cpu_kquants::Kernel::Scalar);
    let m = KMatrix::<F>::new(src.parts(name)?, k, kernel)?;
    if m.rows() != n {
        candle_core::bail!(
            "tensor '{name}' has {} rows of its bytes, not {n}",
            m.rows()
        );
    }
    Ok(m)
}

/// The token embedding table as stored: on the CPU its bytes (mapped where the file is),
/// each looked-up row dequantized with candle's routine for the format; elsewhere
/// candle's quantized tensor on the device.
pub enum Embedding {
    Candle(QTensor),
    Rows {
        bytes: TensorBytes,
        dtype: GgmlDType,
        vocab: usize,
        width: usize,
    },
}

impl Embedding {
    pub fn load(src: &impl WeightSource, name: &str, device: &Device) -> Result<Self> {
        if device.is_cpu() {
            if let Some(rows) = Self::rows(src, name)? {
                return Ok(rows);
            }
        }
        Ok(Embedding::Candle(src.tensor(name, device)?))
    }

    /// The table as its stored bytes, where it is a matrix in one part.
    fn rows(src: &impl WeightSource, name: &str) -> Result<Option<Self>> {
        let Some((dtype, dims)) = src.describe(name) else {
            return Ok(None);
        };
        let [vocab, width] = dims[..] else {
            return Ok(None);
        };
        let mut parts = src.parts(name)?;
        if parts.len() != 1 {
            return Ok(None);
        }
        let table = Embedding::Rows {
            bytes: parts.remove(0),
            dtype,
            vocab,
            width,
        };
        // A format or width candle cannot read is an error at load, not at the first
        // request.
        if vocab > 0 {
            table.forward(&Tensor::new(&[0u32], &Device::Cpu)?)?;
        }
        Ok(Some(table))
    }

    /// The rows of `ids` (any shape of u32 token ids): shape `ids` + (width,).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (bytes, dtype, vocab, width) = match self {
            Embedding::Candle(t) => return t.embedding(ids),
            Embedding::Rows {
                bytes,
                dtype,
                vocab,
                width,
            } => (bytes, *dtype, *vocab, *width),
        };
        let cpu = Device::Cpu;
        let mut dims = ids.dims().to_vec();
        dims.push(width);
        let tokens: Vec<u32> = ids.flatten_all()?.to_vec1()?;
        if tokens.is_empty() {
            return Tensor::zeros(dims, candle_core::DType::F32, &cpu);
        }
        let row_bytes = width / dtype.block_size() * dtype.type_size();
        let rows = tokens
            .iter()
            .map(|&t| {
                let t = t as usize;
                if t >= vocab {
                    candle_core::bail!("token id {t} is outside the vocabulary of {vocab}");
                }
                let row = &bytes[t * row_bytes..(t + 1) * row_bytes];
                qtensor_from_ggml(dtype, row, vec![width], &cpu)?.dequantize(&cpu)
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::stack(&rows, 0)?.reshape(dims)
    }
}

/// Matrices that read the same input (q/k/v, gate/up), with their biases. Those of one
/// format are stacked at load into one matrix, so one matmul computes them: one pass of
/// the CPU's threads over the activations, one kernel launch on a GPU (where decoding a
/// token is bound by the number of launches).
pub struct Projection {
    groups: Vec<Group>,
    outputs: usize,
}

struct Group {
    w: Linear,
    bias: Option<Tensor>,
    /// The bias on the host, for the CPU's forward pass.
    bias_host: Option<Vec<f32>>,
    /// (output index, width) of each matrix stacked here, in row order.
    parts: Vec<(usize, usize)>,
}

impl Projection {
    /// Loads the matrices `names` (with the bias vectors `biases`, when given, one per
    /// matrix) onto `device`.
    pub fn load(
        src: &impl WeightSource,
        names: &[String],
        biases: Option<&[String]>,
        device: &Device,
    ) -> Result<Self> {
        let mut described = Vec::with_capacity(names.len());
        for name in names {
            match src.describe(name) {
                Some((dtype, dims)) if dims.len() == 2 => described.push((dtype, dims)),
                Some((_, dims)) => candle_core::bail!("tensor '{name}' is not a matrix: {dims:?}"),
                None => candle_core::bail!("tensor '{name}' not found"),
            }
        }
        let mut taken = vec![false; names.len()];
        let mut groups = Vec::new();
        for i in 0..names.len() {
            if taken[i] {
                continue;
            }
            let (dtype, k) = (described[i].0, described[i].1[1]);
            let members: Vec<usize> = (i..names.len())
                .filter(|&j| !taken[j] && described[j].0 == dtype && described[j].1[1] == k)
                .collect();
            let parts: Vec<(usize, usize)> = members
                .iter()
                .map(|&j| {
                    taken[j] = true;
                    (j, described[j].1[0])
                })
                .collect();
            let member_names: Vec<String> = members.iter().map(|&j| names[j].clone()).collect();
            let w = if member_names.len() == 1 {
                linear(src, &member_names[0], device)?
            } else {
                let stacked = Stacked {
                    src,
                    parts: &member_names,
                    dtype,
                    rows: parts.iter().map(|(_, w)| w).sum(),
                    k,
                };
                linear(&stacked, &member_names[0], device)?
            };
            let bias = match biases {
                Some(biases) => {
                    let vectors = members
                        .iter()
                        .map(|&j| src.tensor(&biases[j], device)?.dequantize(device))
                        .collect::<Result<Vec<_>>>()?;
                    Some(Tensor::cat(&vectors, 0)?)
                }
                None => None,
            };
            let bias_host = match &bias {
                Some(b) if device.is_cpu() => Some(b.to_dtype(candle_core::DType::F32)?.to_vec1()?),
                _ => None,
            };
            groups.push(Group {
                w,
                bias,
                bias_host,
                parts,
            });
        }
        Ok(Self {
            groups,
            outputs: names.len(),
        })
    }

    /// `x` times each matrix, plus its bias: one output per name, in the order loaded.
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let mut out: Vec<Option<Tensor>> = vec![None; self.outputs];
        for g in &self.groups {
            let mut y = g.w.forward(x)?;
            if let Some(b) = &g.bias {
                y = y.broadcast_add(b)?;
            }
            if let [(index, _)] = g.parts[..] {
                out[index] = Some(y);
                continue;
            }
            let mut at = 0;
            for &(index, width) in &g.parts {
                out[index] = Some(y.narrow(D::Minus1, at, width)?);
                at += width;
            }
        }
        out.into_iter()
            .map(|t| t.ok_or_else(|| candle_core::Error::Msg("projection output missing".into())))
            .collect()
    }

    /// [`forward`](Self::forward) on the host: `xs` holds rows of the input (row-major);
    /// one output per name, each its rows row-major. CPU matrices only.
    pub fn forward_host(&self, xs: &[f32]) -> Result<Vec<Vec<f32>>> {
        let mut out: Vec<Vec<f32>> = vec![Vec::new(); self.outputs];
        for g in &self.groups {
            let mut y = g.w.forward_host(xs)?;
            let width: usize = g.parts.iter().map(|(_, w)| w).sum();
            if width == 0 || !y.len().is_multiple_of(width) {
                candle_core::bail!("projection gave {} values for width {width}", y.len());
            }
            if let Some(b) = &g.bias_host {
                if b.len() != width {
                    candle_core::bail!("bias of {} values for width {width}", b.len());
                }
                for row in y.chunks_exact_mut(width) {
                    for (v, b) in row.iter_mut().zip(b) {
                        *v += b;
                    }
                }
            }
            if let [(index, _)] = g.parts[..] {
                out[index] = y;
                continue;
            }
            let mut at = 0;
            for &(index, w) in &g.parts {
                out[index] = y
                    .chunks_exact(width)
                    .flat_map(|row| &row[at..at + w])
                    .copied()
                    .collect();
                at += w;
            }
        }
        Ok(out)
    }

    /// The matrices as stacked.
    pub fn matrices(&self) -> impl Iterator<Item = &Linear> {
        self.groups.iter().map(|g| &g.w)
    }

    /// How many matrices the projection's outputs come from (after stacking).
    #[cfg(test)]
    pub fn matrix_count(&self) -> usize {
        self.groups.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::synthetic::{SyntheticWeights, TensorSpec};

    fn spec(name: &str, dims: &[usize], dtype: GgmlDType) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            dims: dims.to_vec(),
            dtype,
        }
    }

    /// Stacking matrices of one format gives each matrix's own product (plus its bias)
    /// in the order asked for, whatever the order of the formats.
    #[test]
    fn a_projection_stacks_matching_formats_and_gives_each_output() {
        let k = 512;
        for formats in [
            [GgmlDType::Q4K, GgmlDType::Q4K, GgmlDType::Q6K],
            [GgmlDType::Q5_0, GgmlDType::Q8_0, GgmlDType::Q5_0],
        ] {
            let rows = [256, 32, 48];
            let mut specs = Vec::new();
            for (i, (dtype, n)) in formats.iter().zip(rows).enumerate() {
                specs.push(spec(&format!("w{i}"), &[n, k], *dtype));
                specs.push(spec(&format!("b{i}"), &[n], GgmlDType::F32));
            }
            let src = SyntheticWeights::of(specs, 5);
            let names: Vec<String> = (0..3).map(|i| format!("w{i}")).collect();
            let biases: Vec<String> = (0..3).map(|i| format!("b{i}")).collect();
            let cpu = Device::Cpu;
            let p = Projection::load(&src, &names, Some(&biases), &cpu).unwrap();
            assert_eq!(p.matrix_count(), 2, "{formats:?}");
            for m in [1, 5] {
                let x = Tensor::randn(0f32, 1f32, (1, m, k), &cpu).unwrap();
                let got = p.forward(&x).unwrap();
                assert_eq!(got.len(), 3);
                for (i, got) in got.iter().enumerate() {
                    let alone = linear(&src, &names[i], &cpu).unwrap().forward(&x).unwrap();
                    let bias = src
                        .tensor(&biases[i], &cpu)
                        .unwrap()
                        .dequantize(&cpu)
                        .unwrap();
                    let want = alone.broadcast_add(&bias).unwrap();
                    assert_eq!(want.dims(), got.dims(), "{formats:?} output {i}");
                    let diff = (&want - got).unwrap().abs().unwrap().max_all().unwrap();
                    let scale = want.abs().unwrap().max_all().unwrap();
                    let (diff, scale) = (
                        diff.to_scalar::<f32>().unwrap(),
                        scale.to_scalar::<f32>().unwrap(),
                    );
                    assert!(diff <= 1e-5 * scale, "{formats:?} output {i} m={m}: {diff}");
                }
            }
        }
    }

    /// Looked-up rows from the stored bytes equal candle's dequantized table, whatever
    /// the format; an id past the vocabulary is an error, not a panic.
    #[test]
    fn embedding_rows_match_candle_and_bad_ids_are_errors() {
        let cpu = Device::Cpu;
        for dtype in [
            GgmlDType::Q4K,
            GgmlDType::Q6K,
            GgmlDType::Q8_0,
            GgmlDType::Q5_0,
            GgmlDType::F32,
        ] {
            let src = SyntheticWeights::of(vec![spec("e", &[40, 512], dtype)], 3);
            let ours = Embedding::load(&src, "e", &cpu).unwrap();
            assert!(matches!(ours, Embedding::Rows { .. }), "{dtype:?}");
            let candle = Embedding::Candle(src.tensor("e", &cpu).unwrap());
            let ids = Tensor::new(&[[0u32, 39, 7, 7]], &cpu).unwrap();
            let (want, got) = (candle.forward(&ids).unwrap(), ours.forward(&ids).unwrap());
            assert_eq!(got.dims(), &[1, 4, 512]);
            let diff = (&want - &got).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{dtype:?}");
            let bad = Tensor::new(&[40u32], &cpu).unwrap();
            let err = ours.forward(&bad).unwrap_err().to_string();
            assert!(err.contains("outside the vocabulary of 40"), "{err}");
        }
    }

    #[test]
    fn a_missing_or_odd_tensor_is_an_error() {
        let src = SyntheticWeights::of(vec![spec("v", &[64], GgmlDType::F32)], 1);
        let cpu = Device::Cpu;
        let err = |names: &[&str]| {
            let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
            match Projection::load(&src, &names, None, &cpu) {
                Ok(_) => panic!("{names:?} loaded"),
                Err(e) => e.to_string(),
            }
        };
        assert!(err(&["nope"]).contains("'nope' not found"));
        assert!(err(&["v"]).contains("not a matrix"));
    }
}
