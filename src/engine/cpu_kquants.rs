//! CPU matmuls for the 256-value "K" formats of the Q4_K_M files (Q4_K, Q6_K), computed
//! straight from the file's blocks: the matrix is never copied or repacked, so on the
//! CPU it can stay in the mapped file (near-instant load, one copy of the weights in
//! memory, shared with the page cache).
//!
//! Activations are quantized per 256 values as ggml's Q8_K (one f32 scale, sums of each
//! 16), as candle and llama.cpp do for these formats. The kernel reads a block of one
//! weight row once and multiplies it with up to [`ROWS`] activation rows: `vpmaddubsw`
//! (unsigned weights × signed activations), then `vpdpwssd` with each sub-block's scale,
//! so a whole 256-value block reaches the float accumulator in one conversion. It needs
//! AVX-512 (F, BW, VL) with VNNI; [`supported`] says whether this CPU has it (elsewhere
//! the caller keeps candle's kernels). A scalar kernel is the reference the tests hold
//! the fast one to.

use super::weights::TensorBytes;
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
    /// One weight block (`w`: its bytes) times one activation block.
    fn dot_block(w: &[u8], a: &ActBlock) -> f32;
    /// One weight row (`w`: `kb` blocks) times `rows` activation rows (`x`: `kb` blocks
    /// each, row after row), into `out[..rows]`.
    ///
    /// # Safety
    /// The CPU must have what [`supported`] checks; `w` must point at `kb` blocks.
    #[cfg(target_arch = "x86_64")]
    unsafe fn dot_rows_avx512(
        w: *const u8,
        kb: usize,
        x: &[ActBlock],
        rows: usize,
        out: &mut [f32; ROWS],
    );
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

    fn dot_block(w: &[u8], a: &ActBlock) -> f32 {
        let (d, dmin) = (f16_at(w, 0), f16_at(w, 2));
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
        d * a.d * sumi as f32 - dmin * a.d * mins as f32
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn dot_rows_avx512(
        w: *const u8,
        kb: usize,
        x: &[ActBlock],
        rows: usize,
        out: &mut [f32; ROWS],
    ) {
        unsafe { avx512::q4k_rows(w, kb, x, rows, out) }
    }
}

impl KFormat for Q6K {
    const DTYPE: GgmlDType = GgmlDType::Q6K;
    const BLOCK_BYTES: usize = 210;
    const ORDER: [usize; 8] = [0, 1, 2, 3, 4, 5, 6, 7];

    fn dot_block(w: &[u8], a: &ActBlock) -> f32 {
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
        f16_at(w, 208) * a.d * sumi as f32
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn dot_rows_avx512(
        w: *const u8,
        kb: usize,
        x: &[ActBlock],
        rows: usize,
        out: &mut [f32; ROWS],
    ) {
        unsafe { avx512::q6k_rows(w, kb, x, rows, out) }
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
    xs.chunks_exact(QK_K).map(quantize_block::<F>).collect()
}

fn quantize_block<F: KFormat>(x: &[f32]) -> ActBlock {
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
    for (j, s) in out.sums32.iter_mut().enumerate() {
        *s = out.bsums[2 * j] + out.bsums[2 * j + 1];
    }
    for (p, &sub) in F::ORDER.iter().enumerate() {
        out.qs[32 * p..32 * p + 32].copy_from_slice(&q[32 * sub..32 * sub + 32]);
    }
    out.d = 1.0 / iscale;
    out
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
        let (n, kb) = (self.n, self.k / QK_K);
        let row_bytes = kb * F::BLOCK_BYTES;
        let out_ptr = out.as_mut_ptr() as usize;
        let kernel = self.kernel;
        candle_core::utils::barrier_pool().execute_chunked(self.items.len(), |items| {
            for item in &self.items[items] {
                let part = &self.parts[item.part];
                for r0 in (0..m).step_by(ROWS) {
                    let rows = (m - r0).min(ROWS);
                    let x = &xq[r0 * kb..(r0 + rows) * kb];
                    for j in 0..item.rows {
                        let at = (item.local + j) * row_bytes;
                        let w = &part[at..at + row_bytes];
                        let mut acc = [0f32; ROWS];
                        match kernel {
                            #[cfg(target_arch = "x86_64")]
                            // SAFETY: new() checked supported(); `w` holds kb blocks.
                            Kernel::Avx512 => unsafe {
                                F::dot_rows_avx512(w.as_ptr(), kb, x, rows, &mut acc)
                            },
                            _ => {
                                for (r, acc) in acc.iter_mut().enumerate().take(rows) {
                                    *acc = w
                                        .chunks_exact(F::BLOCK_BYTES)
                                        .zip(&x[r * kb..(r + 1) * kb])
                                        .map(|(wb, xb)| F::dot_block(wb, xb))
                                        .sum();
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
    use super::{ActBlock, ROWS};
    use core::arch::x86_64::*;

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
    unsafe fn f16_at(p: *const u8) -> f32 {
        let bits = unsafe { std::ptr::read_unaligned(p as *const u16) };
        half::f16::from_bits(bits).to_f32()
    }

    #[inline(always)]
    unsafe fn hsum128(v: __m128) -> f32 {
        let s = _mm_add_ps(v, _mm_movehl_ps(v, v));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma")]
    pub(super) unsafe fn q4k_rows(
        w: *const u8,
        kb: usize,
        x: &[ActBlock],
        rows: usize,
        out: &mut [f32; ROWS],
    ) {
        unsafe {
            const K1: u32 = 0x3f3f3f3f;
            const K2: u32 = 0x0f0f0f0f;
            const K3: u32 = 0x03030303;
            let idx: [__m512i; 4] =
                std::array::from_fn(|i| load512(Q4K_SCALE_IDX[i].as_ptr() as *const u8));
            let low = _mm512_set1_epi8(0x0f);
            let mut accf = [_mm512_setzero_ps(); ROWS];
            let mut accm = [_mm_setzero_ps(); ROWS];
            for b in 0..kb {
                let blk = w.add(b * 144);
                let (d, dmin) = (f16_at(blk), f16_at(blk.add(2)));
                let u = blk.add(4) as *const u32;
                let (u0, u1, u2) = (
                    u.read_unaligned(),
                    u.add(1).read_unaligned(),
                    u.add(2).read_unaligned(),
                );
                let sc = (u0 & K1) as u64 | (((u2 & K2) | (((u0 >> 6) & K3) << 4)) as u64) << 32;
                let mn =
                    (u1 & K1) as u64 | ((((u2 >> 4) & K2) | (((u1 >> 6) & K3) << 4)) as u64) << 32;
                let sc = _mm512_castsi128_si512(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc as i64)));
                let mn = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(mn as i64));
                let s: [__m512i; 4] = std::array::from_fn(|i| _mm512_permutexvar_epi16(idx[i], sc));
                let v0 = load512(blk.add(16));
                let v1 = load512(blk.add(80));
                let q = [
                    _mm512_and_si512(v0, low),
                    _mm512_and_si512(_mm512_srli_epi16(v0, 4), low),
                    _mm512_and_si512(v1, low),
                    _mm512_and_si512(_mm512_srli_epi16(v1, 4), low),
                ];
                for r in 0..rows {
                    let a = x.get_unchecked(r * kb + b);
                    let p = a.qs.as_ptr() as *const u8;
                    let mut acc = _mm512_setzero_si512();
                    for i in 0..4 {
                        let prod = _mm512_maddubs_epi16(q[i], load512(p.add(64 * i)));
                        acc = _mm512_dpwssd_epi32(acc, prod, s[i]);
                    }
                    accf[r] =
                        _mm512_fmadd_ps(_mm512_set1_ps(d * a.d), _mm512_cvtepi32_ps(acc), accf[r]);
                    let sums = _mm_loadu_si128(a.sums32.as_ptr() as *const __m128i);
                    let mins = _mm_cvtepi32_ps(_mm_madd_epi16(mn, sums));
                    accm[r] = _mm_fmadd_ps(_mm_set1_ps(dmin * a.d), mins, accm[r]);
                }
            }
            for r in 0..rows {
                out[r] = _mm512_reduce_add_ps(accf[r]) - hsum128(accm[r]);
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma")]
    pub(super) unsafe fn q6k_rows(
        w: *const u8,
        kb: usize,
        x: &[ActBlock],
        rows: usize,
        out: &mut [f32; ROWS],
    ) {
        unsafe {
            let idx: [__m512i; 4] =
                std::array::from_fn(|i| load512(Q6K_SCALE_IDX[i].as_ptr() as *const u8));
            let low = _mm512_set1_epi8(0x0f);
            let bits45 = _mm512_set1_epi8(0x30);
            let mut accf = [_mm512_setzero_ps(); ROWS];
            for b in 0..kb {
                let blk = w.add(b * 210);
                let d = f16_at(blk.add(208));
                let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(blk.add(192) as *const __m128i));
                let sc = _mm512_castsi256_si512(sc16);
                let s: [__m512i; 4] = std::array::from_fn(|i| _mm512_permutexvar_epi16(idx[i], sc));
                let mut q = [_mm512_setzero_si512(); 4];
                for half in 0..2 {
                    let l = load512(blk.add(64 * half));
                    let h = _mm256_loadu_si256(blk.add(128 + 32 * half) as *const __m256i);
                    let h2 =
                        _mm512_inserti64x4(_mm512_castsi256_si512(h), _mm256_srli_epi16(h, 2), 1);
                    q[2 * half] = _mm512_or_si512(
                        _mm512_and_si512(l, low),
                        _mm512_and_si512(_mm512_slli_epi16(h2, 4), bits45),
                    );
                    q[2 * half + 1] = _mm512_or_si512(
                        _mm512_and_si512(_mm512_srli_epi16(l, 4), low),
                        _mm512_and_si512(h2, bits45),
                    );
                }
                for r in 0..rows {
                    let a = x.get_unchecked(r * kb + b);
                    let p = a.qs.as_ptr() as *const u8;
                    // Σ scale·(q + 32)·x, less 32·Σ scale·(sum of the 16 x it scales).
                    let bsums = _mm256_loadu_si256(a.bsums.as_ptr() as *const __m256i);
                    let offset = _mm256_slli_epi32(_mm256_madd_epi16(sc16, bsums), 5);
                    let mut acc = _mm512_inserti64x4(
                        _mm512_setzero_si512(),
                        _mm256_sub_epi32(_mm256_setzero_si256(), offset),
                        0,
                    );
                    for i in 0..4 {
                        let prod = _mm512_maddubs_epi16(q[i], load512(p.add(64 * i)));
                        acc = _mm512_dpwssd_epi32(acc, prod, s[i]);
                    }
                    accf[r] =
                        _mm512_fmadd_ps(_mm512_set1_ps(d * a.d), _mm512_cvtepi32_ps(acc), accf[r]);
                }
            }
            for r in 0..rows {
                out[r] = _mm512_reduce_add_ps(accf[r]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::synthetic::{SyntheticWeights, TensorSpec};
    use crate::engine::weights::WeightSource;
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
        let mut v = vec![0u8; crate::engine::weights::byte_size(dtype, &dims)];
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
            for m in [1usize, 5, 9] {
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

    #[test]
    fn odd_shapes_are_errors() {
        let e = |r: Result<Q4KMatrix>| r.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e(KMatrix::new(vec![], 100, Kernel::Scalar)).contains("whole number of blocks"));
        let part = TensorBytes::Owned(vec![0; 144 + 1]);
        assert!(e(KMatrix::new(vec![part], 256, Kernel::Scalar)).contains("144-byte rows"));
    }
}
