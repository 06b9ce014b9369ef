//! CPU matmuls for the 32-value block formats where candle is slow on x86:
//! - Q5_0 (most matrices of the 0.5B file), which candle runs through a scalar loop;
//! - Q8_0 with a width that is not a multiple of 256 (the 0.5B's 896-wide output
//!   projection and attn_v), which candle's tiled kernels skip.
//!
//! The weights stay in their blocks as read from the file (decode is bound by memory
//! bandwidth, so no format that reads more bytes); activations are quantized to 8 bits
//! per 32-value block as llama.cpp does; each weight block is unpacked once per tile of 4
//! activation rows, and single-row products (decode) keep two blocks in flight. The
//! work is split over candle's own CPU thread pool.

use super::gguf::{as_bytes_mut, zeroed_plain};
use super::qwen2::WeightSource;
use candle_core::{Device, Result, Tensor};
use half::f16;

const QK: usize = 32;

/// One Q5_0 block as stored in GGUF: scale, the 32 fifth bits, 32 nibbles.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockQ5 {
    d: u16,
    qh: [u8; 4],
    qs: [u8; 16],
}
const _: () = assert!(std::mem::size_of::<BlockQ5>() == 22);

/// One Q8_0 block as stored in GGUF: scale, 32 signed bytes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockQ8_0 {
    d: u16,
    qs: [i8; 32],
}
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);

/// A 32-weight block format.
/// # Safety
/// Implementors are `repr(C)` plain data laid out exactly as the format's GGUF block.
pub unsafe trait WeightBlock: Copy + Send + Sync + 'static {
    /// The scale, as f16 bits.
    fn d(&self) -> u16;
    /// The 32 weights as integers.
    fn ints(&self) -> [i32; QK];
    /// The 32 weights as signed bytes in one register.
    ///
    /// # Safety
    /// The CPU must have AVX2.
    #[cfg(target_arch = "x86_64")]
    unsafe fn unpack(&self) -> core::arch::x86_64::__m256i;
    /// What [`Self::unpack_unsigned`] adds to each weight to make it unsigned.
    const OFFSET: i32;
    /// The 32 weights plus [`Self::OFFSET`] as unsigned bytes, for VNNI's u8×i8 dot.
    ///
    /// # Safety
    /// The CPU must have AVX2.
    #[cfg(target_arch = "x86_64")]
    unsafe fn unpack_unsigned(&self) -> core::arch::x86_64::__m256i;
}

// SAFETY: repr(C) {u16, [u8; 4], [u8; 16]}: 22 bytes, GGUF's Q5_0 block.
unsafe impl WeightBlock for BlockQ5 {
    fn d(&self) -> u16 {
        self.d
    }
    fn ints(&self) -> [i32; QK] {
        let qh = u32::from_le_bytes(self.qh);
        let mut out = [0i32; QK];
        for j in 0..16 {
            out[j] = ((self.qs[j] & 0x0f) | ((((qh >> j) & 1) as u8) << 4)) as i32 - 16;
            out[j + 16] = ((self.qs[j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4)) as i32 - 16;
        }
        out
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn unpack(&self) -> core::arch::x86_64::__m256i {
        avx2::unpack_q5(self)
    }
    const OFFSET: i32 = 16;
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn unpack_unsigned(&self) -> core::arch::x86_64::__m256i {
        avx2::unpack_q5_unsigned(self)
    }
}

// SAFETY: repr(C) {u16, [i8; 32]}: 34 bytes, GGUF's Q8_0 block.
unsafe impl WeightBlock for BlockQ8_0 {
    fn d(&self) -> u16 {
        self.d
    }
    fn ints(&self) -> [i32; QK] {
        self.qs.map(i32::from)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn unpack(&self) -> core::arch::x86_64::__m256i {
        use core::arch::x86_64::*;
        _mm256_loadu_si256(self.qs.as_ptr() as *const __m256i)
    }
    const OFFSET: i32 = 128;
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn unpack_unsigned(&self) -> core::arch::x86_64::__m256i {
        use core::arch::x86_64::*;
        _mm256_xor_si256(self.unpack(), _mm256_set1_epi8(0x80u8 as i8))
    }
}

/// One activation block: 32 signed bytes and their scale.
#[repr(C)]
#[derive(Clone, Copy)]
struct BlockQ8 {
    qs: [i8; QK],
    d: f32,
    /// Sum of `qs`, to take the weights' offset back out of an unsigned dot product.
    sum: i32,
}

/// A matrix of `n` rows (outputs) by `k` columns (inputs) in a 32-weight block format,
/// rows contiguous.
pub struct BlockMatrix<B> {
    blocks: Vec<B>,
    n: usize,
    k: usize,
}

pub type Q5_0Matrix = BlockMatrix<BlockQ5>;
pub type Q8_0Matrix = BlockMatrix<BlockQ8_0>;

impl<B: WeightBlock> BlockMatrix<B> {
    /// Reads the (n, k) tensor `name` straight into its blocks: the block types have
    /// the file's layout, so there is one copy and no transient second one.
    pub fn read(src: &impl WeightSource, name: &str, n: usize, k: usize) -> Result<Self> {
        if !k.is_multiple_of(QK) {
            candle_core::bail!("tensor '{name}': width {k} is not a whole number of blocks");
        }
        // SAFETY: the block types are plain data (an f16 scale and byte arrays).
        let mut blocks: Vec<B> = unsafe { zeroed_plain(n * k / QK) };
        src.read_raw(name, unsafe { as_bytes_mut(&mut blocks) })?;
        Ok(Self { blocks, n, k })
    }

    /// Bytes of weights one pass reads.
    pub fn storage_bytes(&self) -> usize {
        self.blocks.len() * std::mem::size_of::<B>()
    }

    /// `x` (…, k) f32 on the CPU times the matrix transposed: (…, n).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut out_dims = x.dims().to_vec();
        let Some(last) = out_dims.last_mut() else {
            candle_core::bail!("matmul of a scalar");
        };
        if *last != self.k {
            candle_core::bail!(
                "matmul: input width {} but the matrix takes {}",
                last,
                self.k
            );
        }
        *last = self.n;
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let (n, k, kb) = (self.n, self.k, self.k / QK);
        let m = xs.len() / k;
        let xq: Vec<BlockQ8> = xs.chunks_exact(QK).map(quantize_block).collect();
        let mut out = vec![0f32; m * n];
        let out_ptr = out.as_mut_ptr() as usize;
        let kernel = Kernel::detect();
        // Work items: groups of 8 weight rows, all activation rows each.
        const ROWS: usize = 8;
        candle_core::utils::barrier_pool().execute_chunked(n.div_ceil(ROWS), |items| {
            for item in items {
                let end = ((item + 1) * ROWS).min(n);
                if m == 1 {
                    // Decode: four weight rows against the one activation row at a time,
                    // four independent chains sharing each activation block.
                    let mut j = item * ROWS;
                    while j < end {
                        let cols = (end - j).min(4);
                        let w: [&[B]; 4] = std::array::from_fn(|c| {
                            let row = j + c.min(cols - 1);
                            &self.blocks[row * kb..(row + 1) * kb]
                        });
                        let mut acc = [0f32; 4];
                        kernel.dot_cols(w, &xq, &mut acc);
                        for (c, v) in acc.iter().take(cols).enumerate() {
                            // SAFETY: each column of `out` is written by exactly one item.
                            unsafe { *(out_ptr as *mut f32).add(j + c) = *v };
                        }
                        j += cols;
                    }
                    continue;
                }
                for j in item * ROWS..end {
                    let w = &self.blocks[j * kb..(j + 1) * kb];
                    let mut r = 0;
                    while r < m {
                        let rows = (m - r).min(4);
                        let mut acc = [0f32; 4];
                        kernel.dot(w, &xq[r * kb..(r + rows) * kb], kb, rows, &mut acc);
                        for (i, v) in acc.iter().take(rows).enumerate() {
                            // SAFETY: each (row, j) of `out` is written by exactly one item.
                            unsafe { *(out_ptr as *mut f32).add((r + i) * n + j) = *v };
                        }
                        r += rows;
                    }
                }
            }
        });
        Tensor::from_vec(out, out_dims, &Device::Cpu)
    }
}

fn quantize_block(x: &[f32]) -> BlockQ8 {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0i8; QK];
    for (q, v) in qs.iter_mut().zip(x) {
        *q = (v * id).round() as i8;
    }
    // The scale is rounded to f16 as in ggml's Q8_0, so results match its kernels.
    BlockQ8 {
        qs,
        d: f16::from_f32(d).to_f32(),
        sum: qs.iter().map(|&q| q as i32).sum(),
    }
}

#[derive(Clone, Copy)]
enum Kernel {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX2 plus AVX-512 VNNI's u8×i8 dot product on 256-bit registers.
    #[cfg(target_arch = "x86_64")]
    Vnni,
}

impl Kernel {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("avx512vl")
        {
            return Kernel::Vnni;
        }
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            return Kernel::Avx2;
        }
        Kernel::Scalar
    }

    /// Dot products of four weight rows with one activation row.
    fn dot_cols<B: WeightBlock>(self, w: [&[B]; 4], x: &[BlockQ8], acc: &mut [f32; 4]) {
        match self {
            Kernel::Scalar => {
                for (a, w) in acc.iter_mut().zip(w) {
                    *a = dot_scalar(w, x);
                }
            }
            #[cfg(target_arch = "x86_64")]
            // SAFETY: detect() saw AVX2, FMA and F16C.
            Kernel::Avx2 => {
                for (a, w) in acc.iter_mut().zip(w) {
                    *a = unsafe { avx2::dot_row(w, x) };
                }
            }
            #[cfg(target_arch = "x86_64")]
            // SAFETY: detect() saw AVX2, FMA, F16C, AVX512-VNNI and AVX512-VL.
            Kernel::Vnni => unsafe { vnni::dot_cols(w, x, acc) },
        }
    }

    /// Dot products of one weight row `w` (kb blocks) with `rows` activation rows.
    fn dot<B: WeightBlock>(
        self,
        w: &[B],
        x: &[BlockQ8],
        kb: usize,
        rows: usize,
        acc: &mut [f32; 4],
    ) {
        match self {
            Kernel::Scalar => {
                for (r, a) in acc.iter_mut().enumerate().take(rows) {
                    *a = dot_scalar(w, &x[r * kb..(r + 1) * kb]);
                }
            }
            #[cfg(target_arch = "x86_64")]
            // SAFETY: detect() saw AVX2, FMA and F16C.
            Kernel::Avx2 if rows == 1 => acc[0] = unsafe { avx2::dot_row(w, &x[..kb]) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Kernel::Avx2 => unsafe { avx2::dot_rows(w, x, kb, rows, acc) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: detect() saw AVX2, FMA, F16C, AVX512-VNNI and AVX512-VL.
            Kernel::Vnni if rows == 1 => acc[0] = unsafe { vnni::dot_row(w, &x[..kb]) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Kernel::Vnni => unsafe { vnni::dot_rows(w, x, kb, rows, acc) },
        }
    }
}

fn dot_scalar<B: WeightBlock>(w: &[B], x: &[BlockQ8]) -> f32 {
    let mut sum = 0f32;
    for (wb, xb) in w.iter().zip(x) {
        let s: i32 = wb
            .ints()
            .iter()
            .zip(&xb.qs)
            .map(|(a, &b)| a * b as i32)
            .sum();
        sum += f16::from_bits(wb.d()).to_f32() * xb.d * s as f32;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{BlockQ5, BlockQ8, WeightBlock};
    use core::arch::x86_64::*;

    /// A Q5_0 block's 32 low nibbles (0..=15), and 0xff in each byte whose fifth bit is
    /// set (ggml's bytes_from_bits_32).
    #[inline(always)]
    unsafe fn q5_parts(b: &BlockQ5) -> (__m256i, __m256i) {
        let nibbles = _mm_loadu_si128(b.qs.as_ptr() as *const __m128i);
        let lo_hi = _mm256_set_m128i(_mm_srli_epi16(nibbles, 4), nibbles);
        let q = _mm256_and_si256(lo_hi, _mm256_set1_epi8(0x0f));
        let bits = _mm256_set1_epi32(i32::from_le_bytes(b.qh));
        let shuffle = _mm256_set_epi64x(
            0x0303030303030303,
            0x0202020202020202,
            0x0101010101010101,
            0x0000000000000000,
        );
        let bytes = _mm256_shuffle_epi8(bits, shuffle);
        let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
        (q, _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1)))
    }

    /// The 32 weights of a Q5_0 block as signed bytes (-16..=15).
    #[inline(always)]
    pub(super) unsafe fn unpack_q5(b: &BlockQ5) -> __m256i {
        let (q, set) = q5_parts(b);
        // q - 16 where the bit is clear is q | 0xf0 as a signed byte; q where it is set.
        _mm256_or_si256(q, _mm256_andnot_si256(set, _mm256_set1_epi8(0xf0u8 as i8)))
    }

    /// The 32 weights of a Q5_0 block plus 16, as unsigned bytes (0..=31).
    #[inline(always)]
    pub(super) unsafe fn unpack_q5_unsigned(b: &BlockQ5) -> __m256i {
        let (q, set) = q5_parts(b);
        _mm256_or_si256(q, _mm256_and_si256(set, _mm256_set1_epi8(0x10)))
    }

    /// Runs `step` over the blocks in two interleaved accumulator chains, so one block's
    /// unpacking overlaps the other's arithmetic; returns their sum.
    #[inline(always)]
    pub(super) unsafe fn two_chains<B>(
        w: &[B],
        x: &[BlockQ8],
        mut step: impl FnMut(&B, &BlockQ8, __m256) -> __m256,
    ) -> __m256 {
        let mut s0 = _mm256_setzero_ps();
        let mut s1 = _mm256_setzero_ps();
        for i in 0..w.len() / 2 {
            s0 = step(w.get_unchecked(2 * i), x.get_unchecked(2 * i), s0);
            s1 = step(w.get_unchecked(2 * i + 1), x.get_unchecked(2 * i + 1), s1);
        }
        if w.len() % 2 == 1 {
            let last = w.len() - 1;
            s0 = step(w.get_unchecked(last), x.get_unchecked(last), s0);
        }
        _mm256_add_ps(s0, s1)
    }

    #[inline(always)]
    pub(super) unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// One weight row against one activation row (decode): two blocks per step into
    /// two accumulators, so the unpacking of one overlaps the arithmetic of the other.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_row<B: WeightBlock>(w: &[B], x: &[BlockQ8]) -> f32 {
        let ones = _mm256_set1_epi16(1);
        let step = |wb: &B, xb: &BlockQ8, acc: __m256| {
            let qw = wb.unpack();
            let aw = _mm256_sign_epi8(qw, qw);
            let qx = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
            let sx = _mm256_sign_epi8(qx, qw);
            let dot = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), ones);
            let dw = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(wb.d() as i32)));
            _mm256_fmadd_ps(_mm256_set1_ps(dw * xb.d), _mm256_cvtepi32_ps(dot), acc)
        };
        hsum(two_chains(w, x, step))
    }

    // Several arrays are indexed by the row; an iterator would obscure it.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_rows<B: WeightBlock>(
        w: &[B],
        x: &[BlockQ8],
        kb: usize,
        rows: usize,
        acc: &mut [f32; 4],
    ) {
        let ones = _mm256_set1_epi16(1);
        let mut sums = [_mm256_setzero_ps(); 4];
        for (i, wb) in w.iter().enumerate() {
            let qw = wb.unpack();
            let aw = _mm256_sign_epi8(qw, qw);
            let dw = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(wb.d() as i32)));
            for r in 0..rows {
                let xb = x.get_unchecked(r * kb + i);
                let qx = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
                let sx = _mm256_sign_epi8(qx, qw);
                let dot = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), ones);
                let d = _mm256_set1_ps(dw * xb.d);
                sums[r] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(dot), sums[r]);
            }
        }
        for r in 0..rows {
            acc[r] = hsum(sums[r]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::avx2::{hsum, two_chains};
    use super::{BlockQ8, WeightBlock};
    use core::arch::x86_64::*;

    /// Block products as (w + offset)·x with one dpbusd each; the offset's share,
    /// offset·Σx per block, comes back out through the activation block's sum.
    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    pub(super) unsafe fn dot_row<B: WeightBlock>(w: &[B], x: &[BlockQ8]) -> f32 {
        let mut correction = 0f32;
        let offset = B::OFFSET as f32;
        let step = |wb: &B, xb: &BlockQ8, acc: __m256| {
            let qw = wb.unpack_unsigned();
            let qx = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
            let dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), qw, qx);
            let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(wb.d() as i32))) * xb.d;
            correction += d * offset * xb.sum as f32;
            _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(dot), acc)
        };
        hsum(two_chains(w, x, step)) - correction
    }

    /// Four weight rows against one activation row: four independent accumulators, each
    /// activation block loaded once.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    pub(super) unsafe fn dot_cols<B: WeightBlock>(w: [&[B]; 4], x: &[BlockQ8], acc: &mut [f32; 4]) {
        let mut sums = [_mm256_setzero_ps(); 4];
        let mut correction = [0f32; 4];
        let offset = B::OFFSET as f32;
        for (i, xb) in x.iter().enumerate() {
            let qx = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
            let corr = offset * xb.sum as f32;
            for c in 0..4 {
                let wb = w[c].get_unchecked(i);
                let dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), wb.unpack_unsigned(), qx);
                let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(wb.d() as i32))) * xb.d;
                correction[c] += d * corr;
                sums[c] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(dot), sums[c]);
            }
        }
        for c in 0..4 {
            acc[c] = hsum(sums[c]) - correction[c];
        }
    }

    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    pub(super) unsafe fn dot_rows<B: WeightBlock>(
        w: &[B],
        x: &[BlockQ8],
        kb: usize,
        rows: usize,
        acc: &mut [f32; 4],
    ) {
        let mut sums = [_mm256_setzero_ps(); 4];
        let mut correction = [0f32; 4];
        let offset = B::OFFSET as f32;
        for (i, wb) in w.iter().enumerate() {
            let qw = wb.unpack_unsigned();
            let dw = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(wb.d() as i32)));
            for r in 0..rows {
                let xb = x.get_unchecked(r * kb + i);
                let qx = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
                let dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), qw, qx);
                let d = dw * xb.d;
                correction[r] += d * offset * xb.sum as f32;
                sums[r] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(dot), sums[r]);
            }
        }
        for r in 0..rows {
            acc[r] = hsum(sums[r]) - correction[r];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::synthetic::{SyntheticWeights, TensorSpec};
    use candle_core::quantized::{GgmlDType, QMatMul};
    use candle_core::Module;

    /// Every kernel this CPU can run, the scalar one first.
    fn kernels() -> Vec<Kernel> {
        let mut k = vec![Kernel::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                k.push(Kernel::Avx2);
            }
            if matches!(Kernel::detect(), Kernel::Vnni) {
                k.push(Kernel::Vnni);
            }
        }
        k
    }

    fn check<B: WeightBlock>(dtype: GgmlDType) {
        let (n, k) = (77, 896);
        let spec = TensorSpec {
            name: "w".into(),
            dims: vec![n, k],
            dtype,
        };
        let src = SyntheticWeights::single(spec, 9);
        let q = src.tensor("w", &Device::Cpu).unwrap();
        let ours = BlockMatrix::<B>::read(&src, "w", n, k).unwrap();
        let candle = QMatMul::from_qtensor(q).unwrap();
        // The whole matmul against candle's kernel for the format, decode and prefill sizes.
        for m in [1usize, 3, 9] {
            let x = Tensor::randn(0f32, 1f32, (1, m, k), &Device::Cpu).unwrap();
            let a = candle.forward(&x).unwrap();
            let b = ours.forward(&x).unwrap();
            assert_eq!(a.dims(), b.dims());
            let scale = a
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
            let diff = diff.to_scalar::<f32>().unwrap();
            assert!(diff <= 1e-4 * scale, "{dtype:?} m={m}: {diff} vs {scale}");
        }
        // Each kernel against the scalar one, one row and four rows at a time.
        let kb = k / QK;
        let x: Vec<f32> = Tensor::randn(0f32, 1f32, 4 * k, &Device::Cpu)
            .unwrap()
            .to_vec1()
            .unwrap();
        let xq: Vec<BlockQ8> = x.chunks_exact(QK).map(quantize_block).collect();
        let w = &ours.blocks[..kb];
        let mut want = [0f32; 4];
        Kernel::Scalar.dot(w, &xq, kb, 4, &mut want);
        assert!(want.iter().all(|v| *v != 0.0));
        for kernel in kernels() {
            let rows4: [&[B]; 4] = std::array::from_fn(|c| &ours.blocks[c * kb..(c + 1) * kb]);
            let mut cols = [0f32; 4];
            kernel.dot_cols(rows4, &xq[..kb], &mut cols);
            for c in 0..4 {
                let mut one = [0f32; 4];
                Kernel::Scalar.dot(rows4[c], &xq, kb, 1, &mut one);
                let tol = 1e-4 * one[0].abs().max(1.0);
                assert!(
                    (cols[c] - one[0]).abs() <= tol,
                    "{dtype:?} col {c}: {cols:?} vs {one:?}"
                );
            }
            for rows in [1, 4] {
                let mut got = [0f32; 4];
                kernel.dot(w, &xq, kb, rows, &mut got);
                for r in 0..rows {
                    let tol = 1e-4 * want[r].abs().max(1.0);
                    assert!(
                        (got[r] - want[r]).abs() <= tol,
                        "{dtype:?} {rows} rows: {got:?} vs {want:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn q5_0_matches_candle_and_every_kernel_the_scalar_one() {
        check::<BlockQ5>(GgmlDType::Q5_0);
    }

    #[test]
    fn q8_0_matches_candle_and_every_kernel_the_scalar_one() {
        check::<BlockQ8_0>(GgmlDType::Q8_0);
    }
}
