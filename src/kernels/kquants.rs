//! CPU matmuls for the 256-value "K" formats of the Q4_K_M files (Q4_K, Q6_K), computed
//! straight from the file's blocks: the matrix is never copied or repacked, so on the
//! CPU it can stay in the mapped file (near-instant load, one copy of the weights in
//! memory, shared with the page cache).
//!
//! Activations are quantized per 256 values as ggml's Q8_K (one f32 scale, sums of each
//! 16), as candle and llama.cpp do for these formats. Three AVX-512 VNNI kernels:
//! - decode (one activation row): four weight rows at a time, `vpmaddubsw` (unsigned
//!   weights × signed activations) then `vpdpwssd` with each sub-block's scale, the
//!   four rows' integer lanes reduced together, so a whole 256-value block of four rows
//!   reaches one float register in one conversion; each block asks for the same block
//!   of the next four rows ahead (the mapped file's 4 KiB pages stop the hardware
//!   prefetcher: without the hint the 1.5B decoded at 11 instead of 17 tok/s on an
//!   Intel Xeon, 13 instead of 36 on an AMD EPYC of the Zen 5 family; there, more
//!   groups ahead or prefetching into L2 measured the same, and 2 MiB pages were no
//!   option: the file's mapping is not eligible for them, and a copy into anonymous
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
//! [`supported`] says whether this CPU has what they need (elsewhere the caller keeps
//! candle's kernels). A scalar kernel is the reference the tests hold them to.

use super::bytes::TensorBytes;
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Result, Tensor};
use half::f16;
use std::marker::PhantomData;

pub const QK_K: usize = 256;
/// Activation rows one pass over a weight block multiplies.
const ROWS: usize = 4;
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

/// Whether this CPU runs the kernels here (AVX-512 F, BW, VL and VNNI, and FMA).
pub fn supported() -> bool {
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
    if supported() {
        // SAFETY: supported() checked the CPU; `x` holds QK_K values.
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
/// From this many activation rows on, the AVX-512 kernel works on tiles.
const TILES_FROM: usize = 8;

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
    /// AVX-512 with VNNI ([`supported`]).
    Avx512,
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
        if kernel == Kernel::Avx512 && !supported() {
            candle_core::bail!("this CPU lacks the AVX-512 VNNI kernels");
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
        let m = xs.len() / self.k;
        let xq = quantize_rows::<F>(&xs);
        let mut out = vec![0f32; m * self.n];
        self.multiply(&xq, m, &mut out);
        Tensor::from_vec(out, out_dims, &Device::Cpu)
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
                // SAFETY: new() checked supported(); each row pointer starts kb blocks
                // inside the part; the item writes only the columns of its own rows.
                unsafe {
                    avx512::tiles::<F>(&rows, kb, &tiles, m, out_ptr as *mut f32, n, item.row)
                };
            }
        });
    }

    /// Decode and short inputs: each weight row against up to four activation rows.
    fn multiply_rows(&self, xq: &[ActBlock], m: usize, out: &mut [f32]) {
        let (n, kb) = (self.n, self.k / QK_K);
        let row_bytes = kb * F::BLOCK_BYTES;
        let out_ptr = out.as_mut_ptr() as usize;
        let kernel = self.kernel;
        candle_core::utils::barrier_pool().execute_chunked(self.items.len(), |items| {
            for item in &self.items[items] {
                let part = &self.parts[item.part];
                let mut first = 0;
                #[cfg(target_arch = "x86_64")]
                if m == 1 && kernel == Kernel::Avx512 {
                    let groups = item.rows / 4;
                    let rows = &part[item.local * row_bytes..(item.local + 4 * groups) * row_bytes];
                    // SAFETY: new() checked supported(); `rows` holds the 4·groups rows
                    // read; one activation row, so the item's outputs are row 0 of `out`
                    // at its own columns.
                    unsafe {
                        let out = (out_ptr as *mut f32).add(item.row);
                        avx512::decode::<F>(rows.as_ptr(), row_bytes, groups, xq, out)
                    };
                    first = 4 * groups;
                }
                for r0 in (0..m).step_by(ROWS) {
                    let rows = (m - r0).min(ROWS);
                    let x = &xq[r0 * kb..(r0 + rows) * kb];
                    for j in first..item.rows {
                        let at = (item.local + j) * row_bytes;
                        let w = &part[at..at + row_bytes];
                        let mut acc = [0f32; ROWS];
                        match kernel {
                            #[cfg(target_arch = "x86_64")]
                            // SAFETY: new() checked supported(); `w` holds kb blocks.
                            Kernel::Avx512 => unsafe {
                                avx512::rows::<F>(w.as_ptr(), kb, x, rows, &mut acc)
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
mod avx512 {
    use super::{ActBlock, ActTile, KFormat, GROUP, Q4K, Q6K, QK_K, ROWS, TILE_ROWS};
    use candle_core::quantized::GgmlDType;
    use core::arch::x86_64::*;

    /// [`super::quantize_block_scalar`] with AVX-512: the same values, bit for bit
    /// (rounding half away from zero, as `f32::round`). It runs on one thread before
    /// every matmul; the scalar loop took 0.34 µs a block (12 µs before each of the
    /// 1.5B's down projections).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn quantize_block<F: KFormat>(x: &[f32]) -> ActBlock {
        let mut out = ActBlock {
            qs: [0; QK_K],
            d: 0.0,
            bsums: [0; 16],
            sums32: [0; 8],
        };
        assert!(x.len() >= QK_K);
        let p = x.as_ptr();
        let load = |c: usize| unsafe { _mm512_loadu_ps(p.add(16 * c)) };
        let mut vmax = _mm512_setzero_ps();
        let mut nan = 0;
        for c in 0..16 {
            let v = load(c);
            nan |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
            vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
        }
        let amax = _mm512_reduce_max_ps(vmax);
        if amax == 0.0 || !amax.is_finite() || nan != 0 {
            // All zero, or not finite (the reference then turns NaN into 0).
            return super::quantize_block_scalar::<F>(x);
        }
        // The first value of the largest magnitude, with its sign.
        let at = (0..16)
            .find_map(|c| {
                let hit =
                    _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(_mm512_abs_ps(load(c)), _mm512_set1_ps(amax));
                (hit != 0).then(|| 16 * c + hit.trailing_zeros() as usize)
            })
            .unwrap_or(0);
        let iscale = -127f32 / x[at];
        let vs = _mm512_set1_ps(iscale);
        let sign = _mm512_set1_ps(-0.0);
        let one = _mm512_set1_ps(1.0);
        let mut q = [0i8; QK_K];
        for c in 0..16 {
            let t = _mm512_mul_ps(load(c), vs);
            let r = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(t);
            let half = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(
                _mm512_abs_ps(_mm512_sub_ps(t, r)),
                _mm512_set1_ps(0.5),
            );
            let away = _mm512_or_ps(_mm512_and_ps(t, sign), one);
            let r = _mm512_mask_add_ps(r, half, r, away);
            let r = _mm512_min_ps(
                _mm512_max_ps(r, _mm512_set1_ps(-128.0)),
                _mm512_set1_ps(127.0),
            );
            let i = _mm512_cvtps_epi32(r);
            unsafe {
                _mm_storeu_si128(
                    q.as_mut_ptr().add(16 * c) as *mut __m128i,
                    _mm512_cvtepi32_epi8(i),
                )
            };
            out.bsums[c] = _mm512_reduce_add_epi32(i) as i16;
        }
        out.finish::<F>(&q, iscale);
        out
    }

    /// One weight block unpacked for the tile kernel: its 256 weights as unsigned bytes
    /// (in the format's order), the scales as 32-bit integers, Q4_K's mins in pairs of
    /// 16 bits (as [`super::pair_i16`]).
    #[repr(C, align(64))]
    #[derive(Clone, Copy)]
    pub(super) struct Prepared {
        q: [u8; 256],
        scale: [i32; 16],
        min: [i32; 4],
        d: f32,
        dmin: f32,
    }

    impl Prepared {
        /// Keeps the four registers of unpacked weights.
        #[inline(always)]
        unsafe fn store(&mut self, q: [__m512i; 4]) {
            for (i, v) in q.iter().enumerate() {
                unsafe { _mm512_storeu_si512(self.q.as_mut_ptr().add(64 * i) as *mut _, *v) };
            }
        }
    }

    const EMPTY: Prepared = Prepared {
        q: [0; 256],
        scale: [0; 16],
        min: [0; 4],
        d: 0.0,
        dmin: 0.0,
    };

    /// What differs between Q4_K and Q6_K in the kernels here; the kernels themselves
    /// are generic.
    pub(super) trait Simd: KFormat {
        /// Whether the unpacked weights carry +32 (Q6_K), taken back with the sums of
        /// the activations each scale covers.
        const OFFSET: bool;
        /// Groups of 4 columns under one scale: 8 (Q4_K) or 4 (Q6_K).
        const SCALE_GROUPS: usize;
        /// Whether the tile kernel takes four weight rows at a time (else two): Q6_K's
        /// 16 short sub-blocks gain from it (criterion: 12.6 -> 10.8 ms), Q4_K's 8 long
        /// ones lose (8.9 -> 10.3 ms: its registers spill).
        const FOUR_ROWS: bool;
        /// vpermw indices that place each sub-block's scale beside its `vpmaddubsw`
        /// products in the row kernels.
        const SCALE_IDX: &'static [[u16; 32]; 4];
        /// Unpacks the block at `blk` for the tile kernel.
        unsafe fn prepare(blk: *const u8, p: &mut Prepared);
        /// Unpacks the block at `blk` for the row kernels.
        unsafe fn unpack(blk: *const u8, idx: &[__m512i; 4]) -> RowBlock;
        /// The block's d (low 16 bits) and dmin (high; 0 for Q6_K) as f16 bits.
        unsafe fn d_bits(blk: *const u8) -> u32;
        /// Σ scale·q·x of an unpacked block and one activation block (`act`: its
        /// registers), as 16 lanes to be summed.
        unsafe fn dot(w: &RowBlock, a: &ActBlock, act: &[__m512i; 4]) -> __m512i;
    }

    impl Simd for Q4K {
        const OFFSET: bool = false;
        const SCALE_GROUPS: usize = 8;
        const FOUR_ROWS: bool = false;
        const SCALE_IDX: &'static [[u16; 32]; 4] = &Q4K_SCALE_IDX;

        #[inline(always)]
        unsafe fn prepare(blk: *const u8, p: &mut Prepared) {
            unsafe {
                p.store(q4k_nibbles(blk));
                let bytes = std::slice::from_raw_parts(blk.add(4), 12);
                let (sc, mn) = super::scales_mins(bytes);
                for (pos, &sub) in Self::ORDER.iter().enumerate() {
                    p.scale[pos] = sc[sub] as i32;
                }
                for (j, m) in mn.chunks_exact(2).enumerate() {
                    p.min[j] = super::pair_i16(m[0] as i16, m[1] as i16);
                }
                p.d = f16_at(blk);
                p.dmin = f16_at(blk.add(2));
            }
        }

        #[inline(always)]
        unsafe fn unpack(blk: *const u8, idx: &[__m512i; 4]) -> RowBlock {
            unsafe {
                let (s, mn) = q4k_scales(blk, idx);
                let q = q4k_nibbles(blk);
                let sc16 = _mm256_setzero_si256();
                RowBlock { q, s, mn, sc16 }
            }
        }

        #[inline(always)]
        unsafe fn d_bits(blk: *const u8) -> u32 {
            unsafe { std::ptr::read_unaligned(blk as *const u32) }
        }

        #[inline(always)]
        unsafe fn dot(w: &RowBlock, _: &ActBlock, act: &[__m512i; 4]) -> __m512i {
            unsafe { scaled_dot(&w.q, &w.s, act) }
        }
    }

    impl Simd for Q6K {
        const OFFSET: bool = true;
        const SCALE_GROUPS: usize = 4;
        const FOUR_ROWS: bool = true;
        const SCALE_IDX: &'static [[u16; 32]; 4] = &Q6K_SCALE_IDX;

        #[inline(always)]
        unsafe fn prepare(blk: *const u8, p: &mut Prepared) {
            unsafe {
                p.store(q6k_values(blk));
                for k in 0..16 {
                    p.scale[k] = *(blk.add(192 + k) as *const i8) as i32;
                }
                p.d = f16_at(blk.add(208));
            }
        }

        #[inline(always)]
        unsafe fn unpack(blk: *const u8, idx: &[__m512i; 4]) -> RowBlock {
            unsafe {
                let (sc16, s) = q6k_scales(blk, idx);
                let q = q6k_values(blk);
                RowBlock { q, s, mn: 0, sc16 }
            }
        }

        #[inline(always)]
        unsafe fn d_bits(blk: *const u8) -> u32 {
            unsafe { std::ptr::read_unaligned(blk.add(208) as *const u16) as u32 }
        }

        #[inline(always)]
        unsafe fn dot(w: &RowBlock, a: &ActBlock, act: &[__m512i; 4]) -> __m512i {
            unsafe { q6k_dot(&w.q, w.sc16, &w.s, a, act) }
        }
    }

    /// `acc[j][t]` (one lane per activation row of tile t) plus weight row j's block
    /// times tile t's block, as [`super::add_block`]. `lanes[g]` selects 32-bit lane g
    /// of a register.
    #[inline(always)]
    unsafe fn tile_block<T: Simd, const J: usize, const N: usize>(
        p: [&Prepared; J],
        a: [&ActTile; N],
        acc: [[__m512; N]; J],
        lanes: &[__m512i; 8],
    ) -> [[__m512; N]; J] {
        unsafe {
            let per = T::SCALE_GROUPS;
            // Σ scale·q·x per lane, exact: each sub-block's dot times its scale.
            let mut sumi = [[_mm512_setzero_si512(); N]; J];
            // 32 bytes of weights (8 groups of 4) per register; one or two scales each.
            for r in 0..8 {
                let w: [__m512i; J] = std::array::from_fn(|j| {
                    _mm512_castsi256_si512(load256(p[j].q.as_ptr().add(32 * r)))
                });
                for part in 0..8 / per {
                    let s = r * (8 / per) + part;
                    // With Q6_K's +32 the sum starts at -32·Σx: Σ q·x.
                    let start: [__m512i; N] = std::array::from_fn(|t| {
                        if T::OFFSET {
                            load512(a[t].neg32_bsums[s].as_ptr() as *const u8)
                        } else {
                            _mm512_setzero_si512()
                        }
                    });
                    let mut dot = [start; J];
                    for g in 0..per {
                        let lane = part * per + g;
                        let x: [__m512i; N] = std::array::from_fn(|t| {
                            load512(a[t].qs[8 * r + lane].as_ptr() as *const u8)
                        });
                        for j in 0..J {
                            let wb = _mm512_permutexvar_epi32(lanes[lane], w[j]);
                            for t in 0..N {
                                dot[j][t] = _mm512_dpbusd_epi32(dot[j][t], wb, x[t]);
                            }
                        }
                    }
                    for j in 0..J {
                        let scale = _mm512_set1_epi32(p[j].scale[s]);
                        for t in 0..N {
                            let scaled = _mm512_mullo_epi32(dot[j][t], scale);
                            sumi[j][t] = _mm512_add_epi32(sumi[j][t], scaled);
                        }
                    }
                }
            }
            std::array::from_fn(|j| {
                std::array::from_fn(|t| {
                    let ad = _mm512_loadu_ps(a[t].d.as_ptr());
                    let dd = _mm512_mul_ps(ad, _mm512_set1_ps(p[j].d));
                    let acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi[j][t]), dd, acc[j][t]);
                    if !T::MINS {
                        return acc;
                    }
                    // Σ min·x, exact: two mins and two sums of 32 per `vpdpwssd`.
                    let mut mins = _mm512_setzero_si512();
                    for (pair, sums) in a[t].sums32.iter().enumerate() {
                        let sums = load512(sums.as_ptr() as *const u8);
                        mins = _mm512_dpwssd_epi32(mins, sums, _mm512_set1_epi32(p[j].min[pair]));
                    }
                    let dm = _mm512_mul_ps(ad, _mm512_set1_ps(p[j].dmin));
                    _mm512_fnmadd_ps(_mm512_cvtepi32_ps(mins), dm, acc)
                })
            })
        }
    }

    /// Blocks unpacked at a time per weight row (they stay in L1 for every tile).
    const CHUNK: usize = 2;

    /// Weight rows j.. (J of them) times tiles t.. (N of them) over `blocks` blocks from
    /// b0, into their accumulators (tile t's for row j at `t * GROUP + j`).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn step<T: Simd, const J: usize, const N: usize>(
        acc: &mut [__m512],
        prepared: &[[Prepared; CHUNK]; GROUP],
        tiles: &[ActTile],
        j: usize,
        t: usize,
        kb: usize,
        b0: usize,
        blocks: usize,
        lanes: &[__m512i; 8],
    ) {
        unsafe {
            let mut a: [[__m512; N]; J] =
                std::array::from_fn(|jj| std::array::from_fn(|tt| acc[(t + tt) * GROUP + j + jj]));
            for c in 0..blocks {
                let p = std::array::from_fn(|jj| &prepared[j + jj][c]);
                let x = std::array::from_fn(|tt| &tiles[(t + tt) * kb + b0 + c]);
                a = tile_block::<T, J, N>(p, x, a, lanes);
            }
            for jj in 0..J {
                for tt in 0..N {
                    acc[(t + tt) * GROUP + j + jj] = a[jj][tt];
                }
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma")]
    pub(super) unsafe fn tile_item<T: Simd>(
        w: &[*const u8],
        kb: usize,
        tiles: &[ActTile],
        m: usize,
        out: *mut f32,
        n: usize,
        col0: usize,
    ) {
        unsafe {
            let n_tiles = m.div_ceil(TILE_ROWS);
            let lanes: [__m512i; 8] = std::array::from_fn(|g| _mm512_set1_epi32(g as i32));
            let mut prepared = [[EMPTY; CHUNK]; GROUP];
            let mut acc = vec![_mm512_setzero_ps(); n_tiles * GROUP];
            for b0 in (0..kb).step_by(CHUNK) {
                let blocks = CHUNK.min(kb - b0);
                for (j, row) in w.iter().enumerate() {
                    for c in 0..blocks {
                        T::prepare(row.add((b0 + c) * T::BLOCK_BYTES), &mut prepared[j][c]);
                    }
                }
                // Two or four weight rows by two tiles at a time: each weight broadcast
                // feeds two vpdpbusd, each activation load two or four.
                let mut t = 0;
                while t < n_tiles {
                    let pair = t + 2 <= n_tiles;
                    let mut j = 0;
                    while j < w.len() {
                        let left = w.len() - j;
                        let take = if T::FOUR_ROWS && left >= 4 {
                            4
                        } else {
                            left.min(2)
                        };
                        let (a, p) = (&mut acc, &prepared);
                        match (take, pair) {
                            (4, true) => step::<T, 4, 2>(a, p, tiles, j, t, kb, b0, blocks, &lanes),
                            (4, false) => {
                                step::<T, 4, 1>(a, p, tiles, j, t, kb, b0, blocks, &lanes)
                            }
                            (2, true) => step::<T, 2, 2>(a, p, tiles, j, t, kb, b0, blocks, &lanes),
                            (2, false) => {
                                step::<T, 2, 1>(a, p, tiles, j, t, kb, b0, blocks, &lanes)
                            }
                            (_, true) => step::<T, 1, 2>(a, p, tiles, j, t, kb, b0, blocks, &lanes),
                            (_, false) => {
                                step::<T, 1, 1>(a, p, tiles, j, t, kb, b0, blocks, &lanes)
                            }
                        }
                        j += take;
                    }
                    t += if pair { 2 } else { 1 };
                }
            }
            for t in 0..n_tiles {
                for j in 0..w.len() {
                    let mut lanes = [0f32; TILE_ROWS];
                    _mm512_storeu_ps(lanes.as_mut_ptr(), acc[t * GROUP + j]);
                    for (r, v) in lanes.iter().enumerate() {
                        let row = t * TILE_ROWS + r;
                        if row < m {
                            *out.add(row * n + col0 + j) = *v;
                        }
                    }
                }
            }
        }
    }

    /// A Q4_K block's nibbles as four registers of bytes: sub-blocks 0|2, 1|3, 4|6, 5|7.
    #[inline(always)]
    unsafe fn q4k_nibbles(blk: *const u8) -> [__m512i; 4] {
        unsafe {
            let low = _mm512_set1_epi8(0x0f);
            let v0 = load512(blk.add(16));
            let v1 = load512(blk.add(80));
            [
                _mm512_and_si512(v0, low),
                _mm512_and_si512(_mm512_srli_epi16(v0, 4), low),
                _mm512_and_si512(v1, low),
                _mm512_and_si512(_mm512_srli_epi16(v1, 4), low),
            ]
        }
    }

    /// A Q6_K block's weights plus 32 (0..=63) as four registers of bytes, in column
    /// order.
    #[inline(always)]
    unsafe fn q6k_values(blk: *const u8) -> [__m512i; 4] {
        unsafe {
            let low = _mm512_set1_epi8(0x0f);
            let bits45 = _mm512_set1_epi8(0x30);
            let mut q = [_mm512_setzero_si512(); 4];
            for half in 0..2 {
                let l = load512(blk.add(64 * half));
                let h = _mm256_loadu_si256(blk.add(128 + 32 * half) as *const __m256i);
                let h2 = _mm512_inserti64x4(_mm512_castsi256_si512(h), _mm256_srli_epi16(h, 2), 1);
                q[2 * half] = _mm512_or_si512(
                    _mm512_and_si512(l, low),
                    _mm512_and_si512(_mm512_slli_epi16(h2, 4), bits45),
                );
                q[2 * half + 1] = _mm512_or_si512(
                    _mm512_and_si512(_mm512_srli_epi16(l, 4), low),
                    _mm512_and_si512(h2, bits45),
                );
            }
            q
        }
    }

    /// vpermw indices: 16 words of `a` then 16 of `b`.
    const fn pair(a: u16, b: u16) -> [u16; 32] {
        let mut v = [a; 32];
        let mut i = 16;
        while i < 32 {
            v[i] = b;
            i += 1;
        }
        v
    }
    /// vpermw indices: word w takes `base + w / 8`.
    const fn quads(base: u16) -> [u16; 32] {
        let mut v = [0; 32];
        let mut i = 0;
        while i < 32 {
            v[i] = base + i as u16 / 8;
            i += 1;
        }
        v
    }
    static Q4K_SCALE_IDX: [[u16; 32]; 4] = [pair(0, 2), pair(1, 3), pair(4, 6), pair(5, 7)];
    static Q6K_SCALE_IDX: [[u16; 32]; 4] = [quads(0), quads(4), quads(8), quads(12)];

    #[inline(always)]
    unsafe fn load512(p: *const u8) -> __m512i {
        unsafe { _mm512_loadu_si512(p as *const _) }
    }

    #[inline(always)]
    unsafe fn load256(p: *const u8) -> __m256i {
        unsafe { _mm256_loadu_si256(p as *const __m256i) }
    }

    #[inline(always)]
    unsafe fn f16_at(p: *const u8) -> f32 {
        let bits = unsafe { std::ptr::read_unaligned(p as *const u16) };
        half::f16::from_bits(bits).to_f32()
    }

    /// A Q4_K block's scales for the row kernels: each sub-block's scale as 16-bit words
    /// beside its `vpmaddubsw` products (registers as [`q4k_nibbles`]), the 8 mins as
    /// bytes.
    #[inline(always)]
    unsafe fn q4k_scales(blk: *const u8, idx: &[__m512i; 4]) -> ([__m512i; 4], u64) {
        unsafe {
            const K1: u32 = 0x3f3f3f3f;
            const K2: u32 = 0x0f0f0f0f;
            const K3: u32 = 0x03030303;
            let u = blk.add(4) as *const u32;
            let (u0, u1, u2) = (
                u.read_unaligned(),
                u.add(1).read_unaligned(),
                u.add(2).read_unaligned(),
            );
            let sc = (u0 & K1) as u64 | (((u2 & K2) | (((u0 >> 6) & K3) << 4)) as u64) << 32;
            let mn = (u1 & K1) as u64 | ((((u2 >> 4) & K2) | (((u1 >> 6) & K3) << 4)) as u64) << 32;
            let sc = _mm512_castsi128_si512(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc as i64)));
            let s = std::array::from_fn(|i| _mm512_permutexvar_epi16(idx[i], sc));
            (s, mn)
        }
    }

    /// A Q6_K block's scales for the row kernels: 16 words, and each sub-block's scale
    /// beside its `vpmaddubsw` products (registers as [`q6k_values`]).
    #[inline(always)]
    unsafe fn q6k_scales(blk: *const u8, idx: &[__m512i; 4]) -> (__m256i, [__m512i; 4]) {
        unsafe {
            let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(blk.add(192) as *const __m128i));
            let sc = _mm512_castsi256_si512(sc16);
            let s = std::array::from_fn(|i| _mm512_permutexvar_epi16(idx[i], sc));
            (sc16, s)
        }
    }

    /// Σ scale·(q + 32)·x less 32·Σ scale·(sum of the 16 x it scales): Σ scale·q·x.
    #[inline(always)]
    unsafe fn q6k_dot(
        q: &[__m512i; 4],
        sc16: __m256i,
        s: &[__m512i; 4],
        a: &ActBlock,
        act: &[__m512i; 4],
    ) -> __m512i {
        unsafe {
            // 32·scale and -sum both fit 16 bits: one vpmaddwd gives -32·Σ scale·sum,
            // where the sum starts.
            let bsums = _mm256_loadu_si256(a.bsums.as_ptr() as *const __m256i);
            let neg = _mm256_sub_epi16(_mm256_setzero_si256(), bsums);
            let offset = _mm256_madd_epi16(_mm256_slli_epi16(sc16, 5), neg);
            scaled_dot_from(_mm512_zextsi256_si512(offset), q, s, act)
        }
    }

    /// Σ scale·q·x over one block, as 16 lanes to be summed.
    #[inline(always)]
    unsafe fn scaled_dot(q: &[__m512i; 4], s: &[__m512i; 4], x: &[__m512i; 4]) -> __m512i {
        let p0 = _mm512_madd_epi16(_mm512_maddubs_epi16(q[0], x[0]), s[0]);
        let p1 = _mm512_madd_epi16(_mm512_maddubs_epi16(q[1], x[1]), s[1]);
        let p0 = _mm512_dpwssd_epi32(p0, _mm512_maddubs_epi16(q[2], x[2]), s[2]);
        let p1 = _mm512_dpwssd_epi32(p1, _mm512_maddubs_epi16(q[3], x[3]), s[3]);
        _mm512_add_epi32(p0, p1)
    }

    /// `init` plus [`scaled_dot`].
    #[inline(always)]
    unsafe fn scaled_dot_from(
        init: __m512i,
        q: &[__m512i; 4],
        s: &[__m512i; 4],
        x: &[__m512i; 4],
    ) -> __m512i {
        let p0 = _mm512_dpwssd_epi32(init, _mm512_maddubs_epi16(q[0], x[0]), s[0]);
        let p1 = _mm512_madd_epi16(_mm512_maddubs_epi16(q[1], x[1]), s[1]);
        let p0 = _mm512_dpwssd_epi32(p0, _mm512_maddubs_epi16(q[2], x[2]), s[2]);
        let p1 = _mm512_dpwssd_epi32(p1, _mm512_maddubs_epi16(q[3], x[3]), s[3]);
        _mm512_add_epi32(p0, p1)
    }

    #[inline(always)]
    unsafe fn act_regs(a: &ActBlock) -> [__m512i; 4] {
        let p = a.qs.as_ptr() as *const u8;
        unsafe { std::array::from_fn(|i| load512(p.add(64 * i))) }
    }

    /// Asks for the cache lines of `len` bytes at `p`, a block to be read soon, so that
    /// DRAM's latency hides behind the arithmetic (the hardware prefetcher stops at
    /// each 4 KiB page of the mapped file; with it decode of the 1.5B went from 11 to
    /// 17 tok/s). Only a hint: an address past the matrix is never dereferenced.
    #[inline(always)]
    unsafe fn prefetch(p: *const u8, len: usize) {
        for at in (0..len).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(at) as *const i8);
        }
    }

    fn scale_idx(table: &[[u16; 32]; 4]) -> [__m512i; 4] {
        // SAFETY: 64 bytes each; AVX-512 F is required of every caller's CPU.
        std::array::from_fn(|i| unsafe { load512(table[i].as_ptr() as *const u8) })
    }

    /// A weight block unpacked for the row kernels: its weights as bytes (registers as
    /// the format's unpacker gives them), each sub-block's scale as 16-bit words beside
    /// its `vpmaddubsw` products, Q4_K's 8 mins as bytes (zero for Q6_K: the kernels
    /// widen them, four rows' at once in decode) and Q6_K's scales as 16 words (zero for
    /// Q4_K).
    pub(super) struct RowBlock {
        q: [__m512i; 4],
        s: [__m512i; 4],
        mn: u64,
        sc16: __m256i,
    }

    /// Adds one block to four outputs' accumulators (`acc`, one lane each) as
    /// [`super::add_block`] does: `dots[i]` holds output i's Σ scale·q·x in 16 lanes,
    /// 128-bit lane i of `mins` its Σ min·x in 4 (Q4_K), `dd` lanes i and 4 + i its
    /// d·a.d and dmin·a.d. The integer sums are exact in any order; the floats see the
    /// operations of the tile kernel and the scalar one.
    #[inline(always)]
    unsafe fn add_block4<T: Simd>(
        dots: [__m512i; 4],
        mins: __m512i,
        dd: __m256,
        acc: __m128,
    ) -> __m128 {
        let pairs = |a: __m512i, b: __m512i| {
            _mm512_add_epi32(
                _mm512_shuffle_i32x4::<0b01_00_01_00>(a, b),
                _mm512_shuffle_i32x4::<0b11_10_11_10>(a, b),
            )
        };
        let (t01, t23) = (pairs(dots[0], dots[1]), pairs(dots[2], dots[3]));
        // 128-bit lane i: output i's four partial sums.
        let u = _mm512_add_epi32(
            _mm512_shuffle_i32x4::<0b10_00_10_00>(t01, t23),
            _mm512_shuffle_i32x4::<0b11_01_11_01>(t01, t23),
        );
        let idx = _mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 0, 0, 0, 0, 0, 0, 0, 0);
        let d = _mm256_castps256_ps128(dd);
        if T::MINS {
            // Lane i: [u0 + u2, u1 + u3, m0 + m2, m1 + m3], then [Σu, Σu, Σm, Σm].
            let x = _mm512_add_epi32(
                _mm512_unpacklo_epi64(u, mins),
                _mm512_unpackhi_epi64(u, mins),
            );
            let x = _mm512_add_epi32(x, _mm512_shuffle_epi32::<0b10_11_00_01>(x));
            let v = _mm512_castsi512_si256(_mm512_permutexvar_epi32(idx, x));
            let v = _mm256_cvtepi32_ps(v);
            let acc = _mm_fmadd_ps(_mm256_castps256_ps128(v), d, acc);
            let dmin = _mm256_extractf128_ps::<1>(dd);
            _mm_fnmadd_ps(_mm256_extractf128_ps::<1>(v), dmin, acc)
        } else {
            let x = _mm512_add_epi32(u, _mm512_shuffle_epi32::<0b01_00_11_10>(u));
            let x = _mm512_add_epi32(x, _mm512_shuffle_epi32::<0b10_11_00_01>(x));
            let v = _mm512_castsi512_si128(_mm512_permutexvar_epi32(idx, x));
            _mm_fmadd_ps(_mm_cvtepi32_ps(v), d, acc)
        }
    }

    /// Four weight blocks' d·a.d (lanes 0..4) and, with mins, dmin·a.d (lanes 4..8),
    /// from their f16 bits as [`Simd::d_bits`] gives them.
    #[inline(always)]
    unsafe fn scales4<T: Simd>(bits: [u32; 4], ad: f32) -> __m256 {
        if !T::MINS {
            // Only d: the four halves packed in a general register, one move across.
            let d = bits
                .iter()
                .rev()
                .fold(0u64, |v, &b| v << 16 | (b & 0xffff) as u64);
            let d = _mm_cvtph_ps(_mm_cvtsi64_si128(d as i64));
            return _mm256_castps128_ps256(_mm_mul_ps(d, _mm_set1_ps(ad)));
        }
        let v = _mm_setr_epi32(
            bits[0] as i32,
            bits[1] as i32,
            bits[2] as i32,
            bits[3] as i32,
        );
        let order = _mm_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
        _mm256_mul_ps(
            _mm256_cvtph_ps(_mm_shuffle_epi8(v, order)),
            _mm256_set1_ps(ad),
        )
    }

    /// 128-bit lane i: `v[i]`.
    #[inline(always)]
    unsafe fn lanes4(v: [__m128i; 4]) -> __m512i {
        let z = _mm512_castsi128_si512(v[0]);
        let z = _mm512_inserti32x4::<1>(z, v[1]);
        let z = _mm512_inserti32x4::<2>(z, v[2]);
        _mm512_inserti32x4::<3>(z, v[3])
    }

    #[inline(always)]
    unsafe fn sums32(a: &ActBlock) -> __m128i {
        unsafe { _mm_loadu_si128(a.sums32.as_ptr() as *const __m128i) }
    }

    /// One weight row times up to 4 activation rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
    unsafe fn rows_of<T: Simd>(
        w: *const u8,
        kb: usize,
        x: &[ActBlock],
        rows: usize,
        out: &mut [f32; ROWS],
    ) {
        unsafe {
            let acc = match rows {
                1 => rows_n::<T, 1>(w, kb, x),
                2 => rows_n::<T, 2>(w, kb, x),
                3 => rows_n::<T, 3>(w, kb, x),
                _ => rows_n::<T, 4>(w, kb, x),
            };
            let mut sums = [0f32; ROWS];
            _mm_storeu_ps(sums.as_mut_ptr(), acc);
            out[..rows].copy_from_slice(&sums[..rows]);
        }
    }

    /// [`rows_of`] for R rows: lane r of the result is row r's output.
    #[inline(always)]
    unsafe fn rows_n<T: Simd, const R: usize>(w: *const u8, kb: usize, x: &[ActBlock]) -> __m128 {
        unsafe {
            let idx = scale_idx(T::SCALE_IDX);
            let mut acc = _mm_setzero_ps();
            for b in 0..kb {
                let blk = w.add(b * T::BLOCK_BYTES);
                let u = T::unpack(blk, &idx);
                let a: [&ActBlock; ROWS] =
                    std::array::from_fn(|r| x.get_unchecked(r.min(R - 1) * kb + b));
                let dots = std::array::from_fn(|r| {
                    if r < R {
                        T::dot(&u, a[r], &act_regs(a[r]))
                    } else {
                        _mm512_setzero_si512()
                    }
                });
                let mins = if T::MINS {
                    let mn = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(u.mn as i64));
                    _mm512_madd_epi16(_mm512_broadcast_i32x4(mn), lanes4(a.map(|a| sums32(a))))
                } else {
                    _mm512_setzero_si512()
                };
                // [d, dmin] of the block times each row's a.d (rows past R: any).
                let wd = _mm_cvtph_ps(_mm_cvtsi32_si128(T::d_bits(blk) as i32));
                let wd =
                    _mm256_set_m128(_mm_permute_ps::<0b01_01_01_01>(wd), _mm_permute_ps::<0>(wd));
                let ad = _mm_setr_ps(a[0].d, a[1].d, a[2].d, a[3].d);
                let dd = _mm256_mul_ps(wd, _mm256_set_m128(ad, ad));
                acc = add_block4::<T>(dots, mins, dd, acc);
            }
            acc
        }
    }

    /// `4 * groups` consecutive weight rows (`w`, `row_bytes` apart) times one
    /// activation row, into `out[..4 * groups]`, four rows at a time: the activations
    /// are loaded once for the four, the four rows' blocks are summed together (one
    /// reduction of the four rows' integer lanes per block, and their floats in one
    /// register), and each block asks for the same block of the next four rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
    unsafe fn decode_of<T: Simd>(
        w: *const u8,
        row_bytes: usize,
        groups: usize,
        x: &[ActBlock],
        out: *mut f32,
    ) {
        unsafe {
            let kb = row_bytes / T::BLOCK_BYTES;
            let next = 4 * row_bytes;
            let idx = scale_idx(T::SCALE_IDX);
            for g in 0..groups {
                let w: [*const u8; 4] = std::array::from_fn(|i| w.add((4 * g + i) * row_bytes));
                let mut acc = _mm_setzero_ps();
                for (b, a) in x.iter().enumerate().take(kb) {
                    let act = act_regs(a);
                    let mut dots = [_mm512_setzero_si512(); 4];
                    let mut mn = [0u64; 4];
                    let mut bits = [0u32; 4];
                    for i in 0..4 {
                        let blk = w[i].add(b * T::BLOCK_BYTES);
                        prefetch(blk.wrapping_add(next), T::BLOCK_BYTES);
                        let u = T::unpack(blk, &idx);
                        dots[i] = T::dot(&u, a, &act);
                        mn[i] = u.mn;
                        bits[i] = T::d_bits(blk);
                    }
                    let mins = if T::MINS {
                        let mn = _mm256_setr_epi64x(
                            mn[0] as i64,
                            mn[1] as i64,
                            mn[2] as i64,
                            mn[3] as i64,
                        );
                        let mn = _mm512_cvtepu8_epi16(mn);
                        _mm512_madd_epi16(mn, _mm512_broadcast_i32x4(sums32(a)))
                    } else {
                        _mm512_setzero_si512()
                    };
                    acc = add_block4::<T>(dots, mins, scales4::<T>(bits, a.d), acc);
                }
                _mm_storeu_ps(out.add(4 * g), acc);
            }
        }
    }

    /// `F`'s kernels, chosen by its format.
    macro_rules! by_format {
        ($f:ty, $kernel:ident, $($arg:expr),*) => {
            match <$f>::DTYPE {
                GgmlDType::Q4K => $kernel::<Q4K>($($arg),*),
                GgmlDType::Q6K => $kernel::<Q6K>($($arg),*),
                other => unreachable!("no AVX-512 kernel for {other:?}"),
            }
        };
    }

    /// One weight row (`w`: `kb` blocks) times `rows` activation rows (`x`: `kb` blocks
    /// each, row after row), into `out[..rows]`.
    ///
    /// # Safety
    /// The CPU must have what [`super::supported`] checks; `w` must point at `kb` blocks.
    pub(super) unsafe fn rows<F: KFormat>(
        w: *const u8,
        kb: usize,
        x: &[ActBlock],
        rows: usize,
        out: &mut [f32; ROWS],
    ) {
        unsafe { by_format!(F, rows_of, w, kb, x, rows, out) }
    }

    /// `4 * groups` consecutive weight rows at `w` times one activation row.
    ///
    /// # Safety
    /// As [`rows`]; `w` must hold the rows, `out` their 4·groups outputs.
    pub(super) unsafe fn decode<F: KFormat>(
        w: *const u8,
        row_bytes: usize,
        groups: usize,
        x: &[ActBlock],
        out: *mut f32,
    ) {
        unsafe { by_format!(F, decode_of, w, row_bytes, groups, x, out) }
    }

    /// Up to [`GROUP`] weight rows (`w`: `kb` blocks each) times every activation tile
    /// (`tiles`: `kb` per 16 activation rows, `m` rows in all): writes
    /// `out[r * n + col0 + j]` for each activation row r and weight row j.
    ///
    /// # Safety
    /// As [`rows`]; `out` must hold the m rows of n columns.
    pub(super) unsafe fn tiles<F: KFormat>(
        w: &[*const u8],
        kb: usize,
        tiles: &[ActTile],
        m: usize,
        out: *mut f32,
        n: usize,
        col0: usize,
    ) {
        unsafe { by_format!(F, tile_item, w, kb, tiles, m, out, n, col0) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::synthetic::{SyntheticWeights, TensorSpec};
    use crate::model::weights::WeightSource;
    use candle_core::quantized::QMatMul;
    use candle_core::Module;

    fn kernels() -> Vec<Kernel> {
        let mut k = vec![Kernel::Scalar];
        if supported() {
            k.push(Kernel::Avx512);
        }
        k
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
    const BATCHES: [usize; 11] = [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 33];

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
    /// ffn_down (19 blocks a row), with the AVX-512 kernels.
    #[test]
    fn q4k_outputs_do_not_depend_on_the_batch_at_the_models_shapes() {
        if supported() {
            check_batch_invariance::<Q4K>(8960, 1536, &[], &[Kernel::Avx512]);
            check_batch_invariance::<Q4K>(896, 4864, &[], &[Kernel::Avx512]);
        }
    }

    #[test]
    fn q6k_outputs_do_not_depend_on_the_batch_at_the_models_shapes() {
        if supported() {
            check_batch_invariance::<Q6K>(1536, 8960, &[], &[Kernel::Avx512]);
            check_batch_invariance::<Q6K>(896, 4864, &[], &[Kernel::Avx512]);
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
