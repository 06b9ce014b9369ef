//! CPU matmuls for the 256-value "K" formats of the Q4_K_M files (Q4_K, Q6_K), computed
//! straight from the file's blocks: the matrix is never copied or repacked, so on the
//! CPU it can stay in the mapped file (near-instant load, one copy of the weights in
//! memory, shared with the page cache).
//!
//! Activations are quantized per 256 values as ggml's Q8_K (one f32 scale, sums of each
//! 16), as candle and llama.cpp do for these formats. Three AVX-512 VNNI kernels
//! ([`avx512`]):
//! - decode (one activation row): four weight rows at a time, `vpmaddubsw` (unsigned
//!   weights × signed activations) then `vpdpwssd` with each sub-block's scale, the
//!   four rows' integer lanes reduced together, so a whole 256-value block of four rows
//!   reaches one float register in one conversion; each block asks for the same block
//!   of four rows a group or two ahead ([`Prefetch`]: the mapped file's 4 KiB pages stop
//!   the hardware prefetcher: without the hint the 1.5B decoded at 11 instead of 17
//!   tok/s on an Intel Xeon, 13 instead of 36 on an AMD EPYC of the Zen 5 family; on
//!   Zen 4, asking into L2 instead of L1 took it from 18 to 28 tok/s; 2 MiB pages were
//!   no option: the file's mapping is not eligible for them, and a copy into anonymous
//!   huge pages took 4 s to load for no gain in decode);
//! - short inputs (2 to 7 rows): one weight row against up to four activation rows, the
//!   same arithmetic;
//! - prompts (8 rows or more): activations interleaved into tiles of 16 rows
//!   ([`ActTile`]), so one `vpdpbusd` multiplies four broadcast weights with four values
//!   of 16 rows; weight blocks are unpacked once per group of 16 weight rows.
//!
//! All of them, and the scalar reference, give each output the same bits (batch
//! invariance: a sequence's logits must not depend on how many others share the
//! forward pass): each block's sums are formed as exact integers, however the kernel
//! likes, and only then meet floats, in the one order of [`add_block`].
//!
//! Without AVX-512 (AMD Zen 3 and older, most desktop CPUs before 2023), AVX2 kernels
//! ([`avx2`]) do the decode and short-input arithmetic in 256-bit registers
//! (`vpmaddubsw` then `vpmaddwd`, exact without VNNI for these ranges); prompts go four
//! rows at a time through the short-input kernel. [`best`] says which kernel this CPU
//! runs (without AVX2 the caller keeps candle's kernels). A scalar kernel is the
//! reference the tests hold them to.

use super::bytes::TensorBytes;
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Result, Tensor};
use half::f16;
use std::marker::PhantomData;

pub const QK_K: usize = 256;
/// Activation rows one pass over a weight block multiplies.
const ROWS: usize = 4;
/// The same with AVX-512, which unpacks a weight block once for two sets of [`ROWS`]
/// (its 32 registers hold the unpacked block and two rows' accumulators): 8 sequences
/// decoding together pay for one unpacking, not two.
const WIDE_ROWS: usize = 2 * ROWS;
/// Weight rows per work item.
const GROUP: usize = 16;

/// 256 activations quantized as ggml's Q8_K, with the 32-value sub-blocks in the order
/// the weight format's kernel reads them ([`KFormat::ORDER`]).
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct ActBlock {
    qs: [i8; QK_K],
    d: f32,
    /// Sums of each 16 values, in natural order.
    bsums: [i16; 16],
    /// Sums of each 32 values, in natural order.
    sums32: [i16; 8],
}

/// A 256-value weight format.
pub trait KFormat: Send + Sync + 'static {
    const DTYPE: GgmlDType;
    const BLOCK_BYTES: usize;
    /// Position p of a quantized activation block holds the natural sub-block ORDER[p].
    const ORDER: [usize; 8];
    /// Whether the format has mins (dmin·Σ min·x to take off each block).
    const MINS: bool;
    /// One weight block's (`w`: its bytes) d and dmin (0 without mins).
    fn scales(w: &[u8]) -> (f32, f32);
    /// One weight block times one activation block as exact integers: Σ scale·q·x and
    /// (with mins) Σ min·(sum of the 32 x it covers).
    fn dot_ints(w: &[u8], a: &ActBlock) -> (i32, i32);
}

/// `acc` plus one block's share of an output: every kernel here forms each output with
/// exactly these float operations in this order, block after block from 0.0, so an
/// output's bits never depend on which kernel ran or how many activation rows the call
/// had (batch invariance): acc + (d·a.d)·Σ scale·q·x, then less (dmin·a.d)·Σ min·x,
/// each one fused multiply-add of the integer sums converted to f32. The integers are
/// exact however a kernel forms them.
#[inline(always)]
fn add_block<F: KFormat>(acc: f32, (d, dmin): (f32, f32), ad: f32, (dot, mins): (i32, i32)) -> f32 {
    let acc = (d * ad).mul_add(dot as f32, acc);
    if F::MINS {
        (-(dmin * ad)).mul_add(mins as f32, acc)
    } else {
        acc
    }
}

/// Q4_K: f16 d and dmin, 8 six-bit scales and mins in 12 bytes, 256 nibbles (byte j of
/// the 32-byte chunk c holds column 64c + j low and 64c + 32 + j high).
pub struct Q4K;
/// Q6_K: 128 bytes of low nibbles, 64 of high bit pairs, 16 signed scales, f16 d.
pub struct Q6K;

fn f16_at(w: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([w[at], w[at + 1]]).to_f32()
}

/// Q4_K's 8 scales and 8 mins from its 12 packed bytes (ggml's get_scale_min_k4).
fn scales_mins(q: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut m = [0u8; 8];
    for j in 0..8 {
        if j < 4 {
            sc[j] = q[j] & 63;
            m[j] = q[j + 4] & 63;
        } else {
            sc[j] = (q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4);
            m[j] = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
        }
    }
    (sc, m)
}

impl KFormat for Q4K {
    const DTYPE: GgmlDType = GgmlDType::Q4K;
    const BLOCK_BYTES: usize = 144;
    // A 64-byte load of the nibbles gives sub-blocks 0 and 2 (low), 1 and 3 (high).
    const ORDER: [usize; 8] = [0, 2, 1, 3, 4, 6, 5, 7];

    const MINS: bool = true;

    fn scales(w: &[u8]) -> (f32, f32) {
        (f16_at(w, 0), f16_at(w, 2))
    }

    fn dot_ints(w: &[u8], a: &ActBlock) -> (i32, i32) {
        let (sc, mn) = scales_mins(&w[4..16]);
        let qs = &w[16..144];
        let (mut sumi, mut mins) = (0i32, 0i32);
        for j in 0..8 {
            let chunk = &qs[32 * (j / 2)..32 * (j / 2) + 32];
            let shift = 4 * (j % 2);
            let pos = Self::ORDER.iter().position(|&s| s == j).unwrap_or(j);
            let act = &a.qs[32 * pos..32 * pos + 32];
            let dot: i32 = chunk
                .iter()
                .zip(act)
                .map(|(&q, &x)| ((q >> shift) & 0xf) as i32 * x as i32)
                .sum();
            sumi += sc[j] as i32 * dot;
            mins += mn[j] as i32 * a.sums32[j] as i32;
        }
        (sumi, mins)
    }
}

impl KFormat for Q6K {
    const DTYPE: GgmlDType = GgmlDType::Q6K;
    const BLOCK_BYTES: usize = 210;
    const ORDER: [usize; 8] = [0, 1, 2, 3, 4, 5, 6, 7];

    const MINS: bool = false;

    fn scales(w: &[u8]) -> (f32, f32) {
        (f16_at(w, 208), 0.0)
    }

    fn dot_ints(w: &[u8], a: &ActBlock) -> (i32, i32) {
        let (ql, qh, sc) = (&w[0..128], &w[128..192], &w[192..208]);
        let mut sumi = 0i32;
        for half in 0..2 {
            for l in 0..32 {
                let (lo, hi, h) = (ql[64 * half + l], ql[64 * half + l + 32], qh[32 * half + l]);
                let q = [
                    (lo & 0xf) | (h & 3) << 4,
                    (hi & 0xf) | ((h >> 2) & 3) << 4,
                    (lo >> 4) | ((h >> 4) & 3) << 4,
                    (hi >> 4) | ((h >> 6) & 3) << 4,
                ];
                for (t, &q) in q.iter().enumerate() {
                    let col = 128 * half + 32 * t + l;
                    let scale = sc[8 * half + 2 * t + l / 16] as i8 as i32;
                    sumi += scale * (q as i32 - 32) * a.qs[col] as i32;
                }
            }
        }
        (sumi, 0)
    }
}

/// Whether this CPU has what the AVX-512 kernels need (AVX-512 F, BW, VL and VNNI, FMA).
fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether this CPU has what the AVX2 kernels need (AVX2, FMA, F16C).
fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The fastest kernel this CPU runs, if any (elsewhere the caller keeps candle's).
/// `DUET_CPU_KERNEL=avx2` (or `scalar`) picks a slower one instead, to compare kernels
/// on one machine; one this CPU cannot run is ignored, with a warning.
pub fn best() -> Option<Kernel> {
    static CHOSEN: std::sync::OnceLock<Option<Kernel>> = std::sync::OnceLock::new();
    *CHOSEN.get_or_init(|| {
        let fastest = [Kernel::Avx512, Kernel::Avx2]
            .into_iter()
            .find(|k| k.available());
        let Ok(asked) = std::env::var("DUET_CPU_KERNEL") else {
            return fastest;
        };
        let kernel = match asked.to_ascii_lowercase().as_str() {
            "avx512" => Kernel::Avx512,
            "avx2" => Kernel::Avx2,
            "scalar" => Kernel::Scalar,
            _ => {
                eprintln!(
                    "warning: DUET_CPU_KERNEL={asked} is not avx512, avx2 or scalar; ignored"
                );
                return fastest;
            }
        };
        if kernel.available() {
            Some(kernel)
        } else {
            eprintln!(
                "warning: this CPU cannot run the {kernel:?} kernels (DUET_CPU_KERNEL); ignored"
            );
            fastest
        }
    })
}

/// How the decode kernels ask for weights ahead of their use: the mapped file's 4 KiB
/// pages, read four rows at a time, stop the hardware prefetcher, so each block asks
/// for the same block `groups_ahead` groups of four rows on, into L1 or into L2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prefetch {
    pub into_l2: bool,
    pub groups_ahead: usize,
}

impl Prefetch {
    /// What measured best on the CPU family. AMD: into L2, two groups ahead (Zen 4: the
    /// 1.5B decoded at 28–31 tok/s against 18–20 into L1 one group ahead, L1's few miss
    /// buffers capping the lines in flight; Zen 5: the same either way). Elsewhere (the
    /// Intel Xeon) into L1, one group ahead, as measured there.
    pub fn for_cpu(cpu: &super::CpuId) -> Self {
        if cpu.vendor == "AuthenticAMD" {
            Prefetch {
                into_l2: true,
                groups_ahead: 2,
            }
        } else {
            Prefetch {
                into_l2: false,
                groups_ahead: 1,
            }
        }
    }

    /// `l1:N` or `l2:N` (N groups ahead, 1 to 16), as `DUET_PREFETCH` takes it.
    pub fn parse(s: &str) -> Option<Self> {
        let (level, ahead) = s.split_once(':')?;
        let into_l2 = match level {
            "l1" => false,
            "l2" => true,
            _ => return None,
        };
        let groups_ahead = ahead.parse().ok().filter(|n| (1..=16).contains(n))?;
        Some(Prefetch {
            into_l2,
            groups_ahead,
        })
    }

    /// This CPU's, or `DUET_PREFETCH`'s (to compare on one machine), read once.
    pub fn chosen() -> Self {
        static CHOSEN: std::sync::OnceLock<Prefetch> = std::sync::OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let cpu = Self::for_cpu(&super::CpuId::read());
            match std::env::var("DUET_PREFETCH") {
                Err(_) => cpu,
                Ok(v) => Self::parse(&v).unwrap_or_else(|| {
                    eprintln!("warning: DUET_PREFETCH={v} is not l1:N or l2:N; ignored");
                    cpu
                }),
            }
        })
    }
}

/// Quantizes rows of f32 activations (a whole number of 256-value blocks) as Q8_K
/// (candle's and ggml's rounding), sub-blocks in the order `F` reads them.
fn quantize_rows<F: KFormat>(xs: &[f32]) -> Vec<ActBlock> {
    let n = xs.len() / QK_K;
    if n < 64 {
        return xs.chunks_exact(QK_K).map(quantize_block::<F>).collect();
    }
    // A prompt: the threads share the blocks (one thread alone took 5% of a prefill).
    // SAFETY: plain data, all zeroes valid; every block is written below.
    let mut out: Vec<ActBlock> = unsafe { super::bytes::zeroed_plain(n) };
    let at = out.as_mut_ptr() as usize;
    candle_core::utils::barrier_pool().execute_chunked(n, |blocks| {
        for i in blocks {
            let block = quantize_block::<F>(&xs[i * QK_K..(i + 1) * QK_K]);
            // SAFETY: each block index is written by exactly one item.
            unsafe { *(at as *mut ActBlock).add(i) = block };
        }
    });
    out
}

fn quantize_block<F: KFormat>(x: &[f32]) -> ActBlock {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU has AVX-512 F, BW and VL; `x` holds QK_K values.
        return unsafe { avx512::quantize_block::<F>(x) };
    }
    quantize_block_scalar::<F>(x)
}

/// The reference for [`quantize_block`] (any CPU).
fn quantize_block_scalar<F: KFormat>(x: &[f32]) -> ActBlock {
    let mut out = ActBlock {
        qs: [0; QK_K],
        d: 0.0,
        bsums: [0; 16],
        sums32: [0; 8],
    };
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    if amax == 0.0 {
        return out;
    }
    let iscale = -127f32 / max;
    let mut q = [0i8; QK_K];
    for (q, &v) in q.iter_mut().zip(x) {
        *q = (iscale * v).round().clamp(-128.0, 127.0) as i8;
    }
    for (j, s) in out.bsums.iter_mut().enumerate() {
        *s = q[16 * j..16 * j + 16].iter().map(|&v| v as i16).sum();
    }
    out.finish::<F>(&q, iscale);
    out
}

impl ActBlock {
    /// Fills in the sums of 32 from the sums of 16, the values in `F`'s order, the scale.
    fn finish<F: KFormat>(&mut self, q: &[i8; QK_K], iscale: f32) {
        for (j, s) in self.sums32.iter_mut().enumerate() {
            *s = self.bsums[2 * j] + self.bsums[2 * j + 1];
        }
        for (p, &sub) in F::ORDER.iter().enumerate() {
            self.qs[32 * p..32 * p + 32].copy_from_slice(&q[32 * sub..32 * sub + 32]);
        }
        self.d = 1.0 / iscale;
    }
}

/// Activation rows in one [`ActTile`].
const TILE_ROWS: usize = 16;
/// From this many activation rows on, the AVX-512 kernel works on tiles. A tile pays for
/// 16 rows however few it holds: on Zen 4, 8 decoding sequences of the 1.5B made 37–39
/// tok/s in one 16-row tile and 53 in two passes of four rows, the 0.5B 191 and 207; at 12
/// sequences the two ways were even (53 and 55 tok/s).
const TILES_FROM: usize = 12;

/// One 256-value block of 16 activation rows, interleaved so that one `vpdpbusd`
/// multiplies 4 weights (broadcast) with 4 values of each of the 16 rows.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct ActTile {
    /// Group g: columns 4g..4g+4 (in the format's order) of row r at bytes 4r..4r+4.
    qs: [[i8; 64]; 64],
    /// Each row's scale.
    d: [f32; TILE_ROWS],
    /// Sums of each 32 values (natural order), per row, for Q4_K's mins: pair p holds
    /// sums 2p (low 16 bits) and 2p + 1 (high), for one `vpdpwssd` with two mins.
    sums32: [[i32; TILE_ROWS]; 4],
    /// -32 times the sums of each 16 values, per row, for Q6_K's offset.
    neg32_bsums: [[i32; TILE_ROWS]; 16],
}

/// The quantized rows `xq` (m rows of kb blocks) as tiles of 16 rows (the last padded
/// with zero rows): tile t's block b at `t * kb + b`.
fn act_tiles(xq: &[ActBlock], m: usize, kb: usize) -> Vec<ActTile> {
    let count = m.div_ceil(TILE_ROWS) * kb;
    // SAFETY: plain data, all zeroes valid (a zero row has scale 0).
    let mut tiles: Vec<ActTile> = unsafe { super::bytes::zeroed_plain(count) };
    let at = tiles.as_mut_ptr() as usize;
    candle_core::utils::barrier_pool().execute_chunked(count, |items| {
        for item in items {
            let (t, b) = (item / kb, item % kb);
            // SAFETY: each tile is written by exactly one item.
            let tile = unsafe { &mut *(at as *mut ActTile).add(item) };
            for r in 0..TILE_ROWS.min(m - t * TILE_ROWS) {
                let a = &xq[(t * TILE_ROWS + r) * kb + b];
                for (g, group) in tile.qs.iter_mut().enumerate() {
                    group[4 * r..4 * r + 4].copy_from_slice(&a.qs[4 * g..4 * g + 4]);
                }
                tile.d[r] = a.d;
                for (p, s) in a.sums32.chunks_exact(2).enumerate() {
                    tile.sums32[p][r] = pair_i16(s[0], s[1]);
                }
                for (k, s) in a.bsums.iter().enumerate() {
                    tile.neg32_bsums[k][r] = -32 * *s as i32;
                }
            }
        }
    });
    tiles
}

/// Two 16-bit values as one 32-bit lane, `lo` in the low half (a `vpdpwssd` operand).
fn pair_i16(lo: i16, hi: i16) -> i32 {
    (lo as u16 as u32 | (hi as u16 as u32) << 16) as i32
}

/// Which kernel a matrix runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// The reference: plain Rust, any CPU.
    Scalar,
    /// AVX-512 with VNNI: decode, short inputs, and tiles for prompts.
    Avx512,
    /// AVX2 with FMA and F16C: decode and short inputs (prompts go four rows at a time).
    Avx2,
}

impl Kernel {
    /// Whether this CPU runs the kernel.
    pub fn available(self) -> bool {
        match self {
            Kernel::Scalar => true,
            Kernel::Avx512 => has_avx512(),
            Kernel::Avx2 => has_avx2(),
        }
    }
}

/// Rows `rows` of a matrix that lie in one part, as one work item.
#[derive(Clone, Copy)]
struct Item {
    part: usize,
    /// First row within the part.
    local: usize,
    /// First row within the matrix.
    row: usize,
    rows: usize,
}

/// An (n, k) matrix in a K format, in one or more parts of whole rows (matrices stacked
/// at load stay where they are in the file), each as stored: mapped or read.
pub struct KMatrix<F: KFormat> {
    parts: Vec<TensorBytes>,
    items: Vec<Item>,
    n: usize,
    k: usize,
    kernel: Kernel,
    _format: PhantomData<F>,
}

pub type Q4KMatrix = KMatrix<Q4K>;
pub type Q6KMatrix = KMatrix<Q6K>;

impl<F: KFormat> KMatrix<F> {
    /// A matrix of `k` columns from `parts` (each a whole number of rows), run by
    /// `kernel`.
    pub fn new(parts: Vec<TensorBytes>, k: usize, kernel: Kernel) -> Result<Self> {
        if k == 0 || !k.is_multiple_of(QK_K) {
            candle_core::bail!(
                "{:?} matrix width {k} is not a whole number of blocks",
                F::DTYPE
            );
        }
        if !kernel.available() {
            candle_core::bail!("this CPU lacks what the {kernel:?} kernels need");
        }
        let row_bytes = k / QK_K * F::BLOCK_BYTES;
        let mut items = Vec::new();
        let mut n = 0;
        for (part, bytes) in parts.iter().enumerate() {
            if !bytes.len().is_multiple_of(row_bytes) {
                candle_core::bail!(
                    "{:?} matrix part of {} bytes is not a whole number of {row_bytes}-byte rows",
                    F::DTYPE,
                    bytes.len()
                );
            }
            let rows = bytes.len() / row_bytes;
            for local in (0..rows).step_by(GROUP) {
                items.push(Item {
                    part,
                    local,
                    row: n + local,
                    rows: GROUP.min(rows - local),
                });
            }
            n += rows;
        }
        Ok(Self {
            parts,
            items,
            n,
            k,
            kernel,
            _format: PhantomData,
        })
    }

    /// Rows (outputs) of the matrix.
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Bytes of weights one pass reads.
    pub fn storage_bytes(&self) -> usize {
        self.parts.iter().map(|p| p.len()).sum()
    }

    /// `x` (…, k) f32 on the CPU times the matrix transposed: (…, n).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut out_dims = x.dims().to_vec();
        let Some(last) = out_dims.last_mut() else {
            candle_core::bail!("matmul of a scalar");
        };
        if *last != self.k {
            candle_core::bail!("matmul: input width {last} but the matrix takes {}", self.k);
        }
        *last = self.n;
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        Tensor::from_vec(self.forward_rows_of(&xs)?, out_dims, &Device::Cpu)
    }

    /// Rows of `k` activations (`xs`, row-major) times the matrix transposed: the rows'
    /// `n` outputs, row-major (the host forward pass's entry, without tensors).
    pub fn forward_rows_of(&self, xs: &[f32]) -> Result<Vec<f32>> {
        if !xs.len().is_multiple_of(self.k) {
            candle_core::bail!("matmul: {} inputs are not rows of {}", xs.len(), self.k);
        }
        let m = xs.len() / self.k;
        let xq = quantize_rows::<F>(xs);
        let mut out = vec![0f32; m * self.n];
        self.multiply(&xq, m, &mut out);
        Ok(out)
    }

    fn multiply(&self, xq: &[ActBlock], m: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if self.kernel == Kernel::Avx512 && m >= TILES_FROM {
            self.multiply_tiles(xq, m, out);
            return;
        }
        self.multiply_rows(xq, m, out);
    }

    /// Prompts: each group of weight rows against 16 activation rows at a time.
    #[cfg(target_arch = "x86_64")]
    fn multiply_tiles(&self, xq: &[ActBlock], m: usize, out: &mut [f32]) {
        let (n, kb) = (self.n, self.k / QK_K);
        let row_bytes = kb * F::BLOCK_BYTES;
        let tiles = act_tiles(xq, m, kb);
        let out_ptr = out.as_mut_ptr() as usize;
        candle_core::utils::barrier_pool().execute_chunked(self.items.len(), |items| {
            for item in &self.items[items] {
                let part = &self.parts[item.part];
                let rows: Vec<*const u8> = (0..item.rows)
                    .map(|j| part[(item.local + j) * row_bytes..].as_ptr())
                    .collect();
                // SAFETY: the kernel is AVX-512, which new() checked; each row pointer starts kb blocks
                // inside the part; the item writes only the columns of its own rows.
                unsafe {
                    avx512::tiles::<F>(&rows, kb, &tiles, m, out_ptr as *mut f32, n, item.row)
                };
            }
        });
    }

    /// Decode and short inputs: each weight row against up to four activation rows at a
    /// time (eight with AVX-512).
    fn multiply_rows(&self, xq: &[ActBlock], m: usize, out: &mut [f32]) {
        let (n, kb) = (self.n, self.k / QK_K);
        let row_bytes = kb * F::BLOCK_BYTES;
        let out_ptr = out.as_mut_ptr() as usize;
        let kernel = self.kernel;
        // Work items: one chunk of activation rows (in L2) against one group of weight
        // rows, chunk after chunk, so that a thread's consecutive items share their
        // activations (a 512-token prompt's do not fit in L2: each group of 16 weight
        // rows read them all from L3).
        let per_pass = if kernel == Kernel::Avx512 {
            WIDE_ROWS
        } else {
            ROWS
        };
        let chunk = super::act_chunk_rows(kb * std::mem::size_of::<ActBlock>(), m, per_pass);
        let n_items = self.items.len();
        candle_core::utils::barrier_pool().execute_chunked(m.div_ceil(chunk) * n_items, |range| {
            for at in range {
                let (c, item) = (at / n_items, &self.items[at % n_items]);
                let rows_of_chunk = c * chunk..m.min((c + 1) * chunk);
                let part = &self.parts[item.part];
                let mut first = 0;
                #[cfg(target_arch = "x86_64")]
                if m == 1 && kernel != Kernel::Scalar {
                    let groups = item.rows / 4;
                    let rows = &part[item.local * row_bytes..(item.local + 4 * groups) * row_bytes];
                    // SAFETY: new() checked the kernel is available; `rows` holds the
                    // 4·groups rows read; one activation row, so the item's outputs are
                    // row 0 of `out` at its own columns.
                    unsafe {
                        let out = (out_ptr as *mut f32).add(item.row);
                        let w = rows.as_ptr();
                        let pf = Prefetch::chosen();
                        let next = 4 * row_bytes * pf.groups_ahead;
                        use std::arch::x86_64::{_MM_HINT_T0, _MM_HINT_T1};
                        macro_rules! decode {
                            ($hint:ident) => {
                                match kernel {
                                    Kernel::Avx512 => avx512::decode::<F, $hint>(
                                        w, row_bytes, groups, xq, out, next,
                                    ),
                                    _ => avx2::decode::<F, $hint>(
                                        w, row_bytes, groups, xq, out, next,
                                    ),
                                }
                            };
                        }
                        if pf.into_l2 {
                            decode!(_MM_HINT_T1)
                        } else {
                            decode!(_MM_HINT_T0)
                        }
                    };
                    first = 4 * groups;
                }
                for r0 in rows_of_chunk.clone().step_by(per_pass) {
                    let rows = (rows_of_chunk.end - r0).min(per_pass);
                    let x = &xq[r0 * kb..(r0 + rows) * kb];
                    for j in first..item.rows {
                        let at = (item.local + j) * row_bytes;
                        let w = &part[at..at + row_bytes];
                        let mut acc = [0f32; WIDE_ROWS];
                        match kernel {
                            #[cfg(target_arch = "x86_64")]
                            // SAFETY: new() checked the kernel is available; `w` holds kb
                            // blocks.
                            Kernel::Avx512 => unsafe {
                                avx512::rows::<F>(w.as_ptr(), kb, x, rows, &mut acc)
                            },
                            #[cfg(target_arch = "x86_64")]
                            // SAFETY: as above.
                            Kernel::Avx2 => unsafe {
                                let acc = (&mut acc[..ROWS]).try_into().expect("ROWS");
                                avx2::rows::<F>(w.as_ptr(), kb, x, rows, acc)
                            },
                            _ => {
                                for (r, acc) in acc.iter_mut().enumerate().take(rows) {
                                    *acc = w
                                        .chunks_exact(F::BLOCK_BYTES)
                                        .zip(&x[r * kb..(r + 1) * kb])
                                        .fold(0.0, |acc, (wb, xb)| {
                                            add_block::<F>(
                                                acc,
                                                F::scales(wb),
                                                xb.d,
                                                F::dot_ints(wb, xb),
                                            )
                                        });
                                }
                            }
                        }
                        for (r, v) in acc.iter().take(rows).enumerate() {
                            // SAFETY: each (row, column) of `out` is written by exactly
                            // one item: the item owns the columns of its rows.
                            unsafe { *(out_ptr as *mut f32).add((r0 + r) * n + item.row + j) = *v };
                        }
                    }
                }
            }
        });
    }
}

#[cfg(target_arch = "x86_64")]
// Accumulators, activations and outputs are indexed by the activation row together.
#[allow(clippy::needless_range_loop)]
mod avx2;
#[cfg(target_arch = "x86_64")]
// Accumulators, activations and outputs are indexed by the activation row together.
#[allow(clippy::needless_range_loop)]
mod avx512;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::synthetic::{SyntheticWeights, TensorSpec};
    use crate::model::weights::WeightSource;
    use candle_core::quantized::QMatMul;
    use candle_core::Module;

    /// Every kernel this CPU runs, the scalar reference first.
    fn kernels() -> Vec<Kernel> {
        [Kernel::Scalar, Kernel::Avx512, Kernel::Avx2]
            .into_iter()
            .filter(|k| k.available())
            .collect()
    }

    /// The SIMD kernels this CPU runs.
    fn simd_kernels() -> Vec<Kernel> {
        kernels()
            .into_iter()
            .filter(|&k| k != Kernel::Scalar)
            .collect()
    }

    fn bytes(src: &SyntheticWeights, name: &str) -> TensorBytes {
        let (dtype, dims) = src.describe(name).unwrap();
        let mut v = vec![0u8; crate::model::weights::byte_size(dtype, &dims)];
        src.read_raw(name, &mut v).unwrap();
        TensorBytes::Owned(v)
    }

    /// Each kernel against candle's own kernel for the format, at decode and prefill
    /// sizes (m = 5 and 9: a partial pass of four rows), with the matrix in one part
    /// and split in two parts at a row that is not a multiple of the work group.
    fn check<F: KFormat>() {
        let (n, k) = (77, 768);
        let spec = |name: &str, rows| TensorSpec {
            name: name.into(),
            dims: vec![rows, k],
            dtype: F::DTYPE,
        };
        let whole = SyntheticWeights::of(vec![spec("w", n)], 11);
        let candle = QMatMul::from_qtensor(whole.tensor("w", &Device::Cpu).unwrap()).unwrap();
        let row_bytes = k / QK_K * F::BLOCK_BYTES;
        let all = bytes(&whole, "w");
        let split = 21 * row_bytes;
        for kernel in kernels() {
            let one = KMatrix::<F>::new(vec![bytes(&whole, "w")], k, kernel).unwrap();
            let two = KMatrix::<F>::new(
                vec![
                    TensorBytes::Owned(all[..split].to_vec()),
                    TensorBytes::Owned(all[split..].to_vec()),
                ],
                k,
                kernel,
            )
            .unwrap();
            for m in [1usize, 5, 9, 40] {
                let x = Tensor::randn(0f32, 1f32, (1, m, k), &Device::Cpu).unwrap();
                let want = candle.forward(&x).unwrap();
                for (layout, ours) in [("one part", &one), ("two parts", &two)] {
                    let got = ours.forward(&x).unwrap();
                    assert_eq!(want.dims(), got.dims());
                    let diff = (&want - &got).unwrap().abs().unwrap().max_all().unwrap();
                    let scale = want.abs().unwrap().max_all().unwrap();
                    let (diff, scale) = (
                        diff.to_scalar::<f32>().unwrap(),
                        scale.to_scalar::<f32>().unwrap(),
                    );
                    assert!(scale > 0.0);
                    assert!(
                        diff <= 1e-4 * scale,
                        "{:?} {kernel:?} {layout} m={m}: {diff} vs {scale}",
                        F::DTYPE
                    );
                }
            }
        }
    }

    /// AMD asks into L2 two groups ahead, others into L1 one ahead; `DUET_PREFETCH`'s
    /// form is read strictly.
    #[test]
    fn prefetch_by_cpu_family_and_override() {
        let cpu = |vendor: &str| super::super::CpuId {
            vendor: vendor.into(),
            name: String::new(),
            family: 25,
            model: 17,
            stepping: 1,
        };
        assert_eq!(
            Prefetch::for_cpu(&cpu("AuthenticAMD")),
            Prefetch::parse("l2:2").unwrap()
        );
        assert_eq!(
            Prefetch::for_cpu(&cpu("GenuineIntel")),
            Prefetch::parse("l1:1").unwrap()
        );
        assert_eq!(
            Prefetch::parse("l2:3"),
            Some(Prefetch {
                into_l2: true,
                groups_ahead: 3
            })
        );
        for bad in ["", "l2", "l3:1", "l1:0", "l1:17", "l1:x", "L1:1"] {
            assert_eq!(Prefetch::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn q4k_matches_candle_with_every_kernel() {
        check::<Q4K>();
    }

    #[test]
    fn q6k_matches_candle_with_every_kernel() {
        check::<Q6K>();
    }

    /// Activation rows for the invariance tests (see [`super::super::invariance_rows`]).
    fn activation_rows(rows: usize, k: usize) -> Vec<f32> {
        super::super::invariance_rows(rows, k, 5)
    }

    /// Activation row counts of the invariance tests: decode, short inputs with full and
    /// partial passes of four, tiles of 16 full and partial.
    const BATCHES: [usize; 14] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 16, 17, 33];

    /// Each (weight row, activation row) output has the same bits whatever else shares
    /// the call: rows 0..m of the same activations, for each m of [`BATCHES`], against
    /// each row alone (m = 1), with each of `kernels`; and every kernel gives the first
    /// one's bits. `parts` splits the matrix at those rows.
    fn check_batch_invariance<F: KFormat>(n: usize, k: usize, parts: &[usize], kernels: &[Kernel]) {
        let spec = TensorSpec {
            name: "w".into(),
            dims: vec![n, k],
            dtype: F::DTYPE,
        };
        let src = SyntheticWeights::of(vec![spec], 5);
        let all = bytes(&src, "w");
        let row_bytes = k / QK_K * F::BLOCK_BYTES;
        let mut cuts = vec![0];
        cuts.extend_from_slice(parts);
        cuts.push(n);
        let rows = *BATCHES.last().unwrap();
        let x = activation_rows(rows, k);
        let mut first: Option<Vec<Vec<f32>>> = None;
        for &kernel in kernels {
            let pieces = cuts
                .windows(2)
                .map(|c| TensorBytes::Owned(all[c[0] * row_bytes..c[1] * row_bytes].to_vec()))
                .collect();
            let w = KMatrix::<F>::new(pieces, k, kernel).unwrap();
            let run = |x: &[f32]| -> Vec<f32> {
                let t = Tensor::from_slice(x, (x.len() / k, k), &Device::Cpu).unwrap();
                w.forward(&t)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            let alone: Vec<Vec<f32>> = (0..rows).map(|r| run(&x[r * k..(r + 1) * k])).collect();
            assert!(alone[0].iter().any(|v| *v != 0.0));
            for m in BATCHES {
                let got = run(&x[..m * k]);
                for (r, want) in alone.iter().enumerate().take(m) {
                    for (j, (g, w)) in got[r * n..(r + 1) * n].iter().zip(want).enumerate() {
                        assert_eq!(
                            g.to_bits(),
                            w.to_bits(),
                            "{:?} {n}x{k} {kernel:?} m={m}: row {r} output {j} {g} but alone {w}",
                            F::DTYPE
                        );
                    }
                }
            }
            match &first {
                None => first = Some(alone),
                Some(want) => {
                    for (r, (g, w)) in alone.iter().zip(want).enumerate() {
                        let same = g.iter().zip(w).all(|(g, w)| g.to_bits() == w.to_bits());
                        assert!(
                            same,
                            "{:?} {kernel:?} row {r}: not {:?}'s bits",
                            F::DTYPE,
                            kernels[0]
                        );
                    }
                }
            }
        }
    }

    /// Every kernel on a small matrix in two parts whose rows leave partial groups of
    /// four and of sixteen (decode's tail rows, short work items).
    #[test]
    fn q4k_outputs_do_not_depend_on_the_batch_or_kernel() {
        check_batch_invariance::<Q4K>(77, 768, &[21], &kernels());
    }

    #[test]
    fn q6k_outputs_do_not_depend_on_the_batch_or_kernel() {
        check_batch_invariance::<Q6K>(77, 768, &[21], &kernels());
    }

    /// The 1.5B's ffn_up (Q4_K) and ffn_down (Q6_K on some layers), and the 0.5B's
    /// ffn_down (19 blocks a row), with the SIMD kernels this CPU runs.
    #[test]
    fn q4k_outputs_do_not_depend_on_the_batch_at_the_models_shapes() {
        let simd = simd_kernels();
        if !simd.is_empty() {
            check_batch_invariance::<Q4K>(8960, 1536, &[], &simd);
            check_batch_invariance::<Q4K>(896, 4864, &[], &simd);
        }
    }

    #[test]
    fn q6k_outputs_do_not_depend_on_the_batch_at_the_models_shapes() {
        let simd = simd_kernels();
        if !simd.is_empty() {
            check_batch_invariance::<Q6K>(1536, 8960, &[], &simd);
            check_batch_invariance::<Q6K>(896, 4864, &[], &simd);
        }
    }

    /// The AVX-512 quantizer gives the scalar one's bytes exactly: halves rounded away
    /// from zero, the first of two opposite largest values setting the sign, zero and
    /// non-finite blocks.
    #[test]
    fn quantizing_activations_matches_the_reference_bit_for_bit() {
        let mut blocks: Vec<Vec<f32>> = Vec::new();
        let mut x = 7u64;
        for _ in 0..50 {
            blocks.push(
                (0..QK_K)
                    .map(|_| {
                        x = x
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.0
                    })
                    .collect(),
            );
        }
        // Scale 1 (the largest is -127): every value a half.
        let mut halves: Vec<f32> = (0..QK_K)
            .map(|i| (i as f32 - 128.0) / 2.0 + 0.25 * 2.0)
            .collect();
        halves[3] = -127.0;
        blocks.push(halves);
        let mut opposite = vec![0.5f32; QK_K];
        opposite[5] = -4.0;
        opposite[100] = 4.0;
        blocks.push(opposite.clone());
        opposite[5] = 4.0;
        opposite[100] = -4.0;
        blocks.push(opposite);
        blocks.push(vec![0.0; QK_K]);
        let mut nan = vec![1.0f32; QK_K];
        nan[9] = f32::NAN;
        blocks.push(nan.clone());
        nan[9] = f32::INFINITY;
        blocks.push(nan);
        for (i, b) in blocks.iter().enumerate() {
            let want = quantize_block_scalar::<Q4K>(b);
            let got = quantize_block::<Q4K>(b);
            assert_eq!(want.qs, got.qs, "block {i}");
            assert_eq!(want.bsums, got.bsums, "block {i}");
            assert_eq!(want.sums32, got.sums32, "block {i}");
            assert_eq!(want.d.to_bits(), got.d.to_bits(), "block {i}");
        }
    }

    #[test]
    fn odd_shapes_are_errors() {
        let e = |r: Result<Q4KMatrix>| r.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e(KMatrix::new(vec![], 100, Kernel::Scalar)).contains("whole number of blocks"));
        let part = TensorBytes::Owned(vec![0; 144 + 1]);
        assert!(e(KMatrix::new(vec![part], 256, Kernel::Scalar)).contains("144-byte rows"));
    }
}
