//! The AVX2 kernels of [`super`], for CPUs without AVX-512 (AMD Zen 3 and earlier, most
//! desktop CPUs before 2023): the arithmetic of the AVX-512 row kernels in 256-bit
//! registers, without VNNI (`vpmaddubsw` then `vpmaddwd` with each sub-block's scale, both
//! exact for these formats' ranges).
//!
//! Each 64 values of a weight block are unpacked once into two registers and multiplied
//! with up to four activation rows there, so the short-input kernel costs one unpacking
//! per block for four rows. Decode takes four weight rows per pass: their blocks' integer
//! sums are reduced together and meet the floats in one register, as in the AVX-512
//! kernel, and each block asks for the same block of the next four rows ahead (the mapped
//! file's 4 KiB pages stop the hardware prefetcher). Every output gets the bits of the
//! scalar reference ([`super::add_block`]'s order).

use super::{ActBlock, KFormat, Q4K, Q6K, QK_K, ROWS};
use candle_core::quantized::GgmlDType;
use core::arch::x86_64::*;

/// What differs between Q4_K and Q6_K here.
pub(super) trait Simd: KFormat {
    /// Σ scale·q·x of the weight block at `blk` with each of R activation blocks, as 8
    /// lanes each to be summed.
    unsafe fn dots<const R: usize>(blk: *const u8, a: [&ActBlock; R]) -> [__m256i; R];
    /// Q4_K's 8 mins as bytes (0 for Q6_K).
    unsafe fn mins(blk: *const u8) -> u64;
    /// The block's d (low 16 bits) and dmin (high; 0 for Q6_K) as f16 bits.
    unsafe fn d_bits(blk: *const u8) -> u32;
}

/// Where sub-block `sub` lies in an activation block quantized for `F`.
const fn position(order: [usize; 8], sub: usize) -> usize {
    let mut p = 0;
    while p < 8 {
        if order[p] == sub {
            return p;
        }
        p += 1;
    }
    sub
}

#[inline(always)]
unsafe fn load(p: *const u8) -> __m256i {
    unsafe { _mm256_loadu_si256(p as *const __m256i) }
}

/// Q4_K's 12 bytes of six-bit scales and mins as 8 bytes each (ggml's get_scale_min_k4).
#[inline(always)]
unsafe fn q4k_scale_bytes(blk: *const u8) -> (u64, u64) {
    const K1: u32 = 0x3f3f3f3f;
    const K2: u32 = 0x0f0f0f0f;
    const K3: u32 = 0x03030303;
    let u = unsafe { blk.add(4) } as *const u32;
    let (u0, u1, u2) = unsafe {
        (
            u.read_unaligned(),
            u.add(1).read_unaligned(),
            u.add(2).read_unaligned(),
        )
    };
    let sc = (u0 & K1) as u64 | (((u2 & K2) | (((u0 >> 6) & K3) << 4)) as u64) << 32;
    let mn = (u1 & K1) as u64 | ((((u2 >> 4) & K2) | (((u1 >> 6) & K3) << 4)) as u64) << 32;
    (sc, mn)
}

/// `vpshufb` indices that put 16-bit word `w` (of each 128-bit lane) in every word.
#[inline(always)]
unsafe fn word(w: i16) -> __m256i {
    _mm256_set1_epi16(((2 * w + 1) << 8) | (2 * w))
}

impl Simd for Q4K {
    #[inline(always)]
    unsafe fn dots<const R: usize>(blk: *const u8, a: [&ActBlock; R]) -> [__m256i; R] {
        unsafe {
            let (sc, _) = q4k_scale_bytes(blk);
            let sc = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc as i64)));
            let low = _mm256_set1_epi8(0x0f);
            let mut acc = [_mm256_setzero_si256(); R];
            // Chunk j of 32 bytes: sub-block 2j in the low nibbles, 2j + 1 in the high.
            for j in 0..4 {
                let bits = load(blk.add(16 + 32 * j));
                let lo = _mm256_and_si256(bits, low);
                let hi = _mm256_and_si256(_mm256_srli_epi16(bits, 4), low);
                let s_lo = _mm256_shuffle_epi8(sc, word(2 * j as i16));
                let s_hi = _mm256_shuffle_epi8(sc, word(2 * j as i16 + 1));
                let (p_lo, p_hi) = (
                    32 * position(Self::ORDER, 2 * j),
                    32 * position(Self::ORDER, 2 * j + 1),
                );
                for r in 0..R {
                    let q = a[r].qs.as_ptr() as *const u8;
                    let d_lo = _mm256_maddubs_epi16(lo, load(q.add(p_lo)));
                    let d_hi = _mm256_maddubs_epi16(hi, load(q.add(p_hi)));
                    let s = _mm256_add_epi32(
                        _mm256_madd_epi16(d_lo, s_lo),
                        _mm256_madd_epi16(d_hi, s_hi),
                    );
                    acc[r] = _mm256_add_epi32(acc[r], s);
                }
            }
            acc
        }
    }

    #[inline(always)]
    unsafe fn mins(blk: *const u8) -> u64 {
        unsafe { q4k_scale_bytes(blk).1 }
    }

    #[inline(always)]
    unsafe fn d_bits(blk: *const u8) -> u32 {
        unsafe { std::ptr::read_unaligned(blk as *const u32) }
    }
}

impl Simd for Q6K {
    #[inline(always)]
    unsafe fn dots<const R: usize>(blk: *const u8, a: [&ActBlock; R]) -> [__m256i; R] {
        unsafe {
            // 16 signed scales as words: lanes [0..8 | 8..16].
            let sc = _mm256_cvtepi8_epi16(_mm_loadu_si128(blk.add(192) as *const __m128i));
            let halves = [
                _mm256_permute2x128_si256::<0x00>(sc, sc),
                _mm256_permute2x128_si256::<0x11>(sc, sc),
            ];
            // The weights carry +32: start at -32·Σ scale·(sum of the 16 x it scales).
            let sc32 = _mm256_slli_epi16(sc, 5);
            let mut acc: [__m256i; R] = std::array::from_fn(|r| {
                let bsums = load(a[r].bsums.as_ptr() as *const u8);
                _mm256_madd_epi16(sc32, _mm256_sub_epi16(_mm256_setzero_si256(), bsums))
            });
            let low = _mm256_set1_epi8(0x0f);
            let m = |v: i8| _mm256_set1_epi8(v);
            for half in 0..2 {
                let l0 = load(blk.add(64 * half));
                let l1 = load(blk.add(64 * half + 32));
                let h = load(blk.add(128 + 32 * half));
                let q = [
                    _mm256_or_si256(
                        _mm256_and_si256(l0, low),
                        _mm256_slli_epi16(_mm256_and_si256(h, m(0x03)), 4),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(l1, low),
                        _mm256_slli_epi16(_mm256_and_si256(h, m(0x0c)), 2),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16(l0, 4), low),
                        _mm256_and_si256(h, m(0x30)),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16(l1, 4), low),
                        _mm256_srli_epi16(_mm256_and_si256(h, m(0xc0u8 as i8)), 2),
                    ),
                ];
                for (t, q) in q.iter().enumerate() {
                    // Columns 32k..32k + 32: scale 2k in the low lane, 2k + 1 in the high.
                    let k = 4 * half + t;
                    let idx = load(Q6K_SCALE_IDX[k % 4].as_ptr() as *const u8);
                    let s = _mm256_shuffle_epi8(halves[k / 4], idx);
                    for r in 0..R {
                        let x = load((a[r].qs.as_ptr() as *const u8).add(32 * k));
                        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(*q, x), s);
                        acc[r] = _mm256_add_epi32(acc[r], p);
                    }
                }
            }
            acc
        }
    }

    #[inline(always)]
    unsafe fn mins(_: *const u8) -> u64 {
        0
    }

    #[inline(always)]
    unsafe fn d_bits(blk: *const u8) -> u32 {
        unsafe { std::ptr::read_unaligned(blk.add(208) as *const u16) as u32 }
    }
}

/// `vpshufb` indices for Q6_K's scales: for the k-th register of a 128-column half,
/// word 2k (of the scales' 128-bit lane) in the low lane, word 2k + 1 in the high.
static Q6K_SCALE_IDX: [[i8; 32]; 4] = [q6k_idx(0), q6k_idx(1), q6k_idx(2), q6k_idx(3)];

const fn q6k_idx(k: i8) -> [i8; 32] {
    let mut v = [0i8; 32];
    let mut i = 0;
    while i < 32 {
        let w = 2 * k + (i / 16) as i8;
        v[i] = 2 * w + (i % 2) as i8;
        i += 1;
    }
    v
}

/// Lane i: the sum of `v[i]`'s 8 lanes (exact).
#[inline(always)]
unsafe fn sum4(v: [__m256i; 4]) -> __m128i {
    let t = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256::<1>(t))
}

/// Lane i: Σ mins_i·sums32_i over the 8 sub-blocks (`mins[i]`: 8 bytes).
#[inline(always)]
unsafe fn mins4(mins: [u64; 4], sums32: [&[i16; 8]; 4]) -> __m128i {
    unsafe {
        let p: [__m128i; 4] = std::array::from_fn(|i| {
            let m = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(mins[i] as i64));
            _mm_madd_epi16(m, _mm_loadu_si128(sums32[i].as_ptr() as *const __m128i))
        });
        _mm_hadd_epi32(_mm_hadd_epi32(p[0], p[1]), _mm_hadd_epi32(p[2], p[3]))
    }
}

/// `acc` plus one block of four outputs, as [`super::add_block`]: lane i gets
/// (d_i·ad_i)·dots_i, then less (dmin_i·ad_i)·mins_i, each a fused multiply-add.
#[inline(always)]
unsafe fn add_block4<T: Simd>(
    acc: __m128,
    bits: [u32; 4],
    ad: __m128,
    dots: __m128i,
    mins: __m128i,
) -> __m128 {
    let v = _mm_setr_epi32(
        bits[0] as i32,
        bits[1] as i32,
        bits[2] as i32,
        bits[3] as i32,
    );
    // [d0 d1 d2 d3 dmin0 dmin1 dmin2 dmin3] as f16, then f32.
    let order = _mm_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
    let dd = _mm256_cvtph_ps(_mm_shuffle_epi8(v, order));
    let d = _mm_mul_ps(_mm256_castps256_ps128(dd), ad);
    let acc = _mm_fmadd_ps(_mm_cvtepi32_ps(dots), d, acc);
    if !T::MINS {
        return acc;
    }
    let dmin = _mm_mul_ps(_mm256_extractf128_ps::<1>(dd), ad);
    _mm_fnmadd_ps(_mm_cvtepi32_ps(mins), dmin, acc)
}

/// Asks for the cache lines of `len` bytes at `p` (see the AVX-512 kernel's `prefetch`).
#[inline(always)]
unsafe fn prefetch_to<const HINT: i32>(p: *const u8, len: usize) {
    for at in (0..len).step_by(64) {
        _mm_prefetch::<HINT>(p.wrapping_add(at) as *const i8);
    }
}

/// One weight row times up to 4 activation rows.
#[target_feature(enable = "avx2,fma,f16c")]
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

/// [`rows_of`] for R rows: lane r of the result is row r's output (lanes past R: any).
#[inline(always)]
unsafe fn rows_n<T: Simd, const R: usize>(w: *const u8, kb: usize, x: &[ActBlock]) -> __m128 {
    unsafe {
        let mut acc = _mm_setzero_ps();
        for b in 0..kb {
            let blk = w.add(b * T::BLOCK_BYTES);
            let a: [&ActBlock; ROWS] =
                std::array::from_fn(|r| x.get_unchecked(r.min(R - 1) * kb + b));
            let d: [__m256i; R] = T::dots::<R>(blk, std::array::from_fn(|r| a[r]));
            let dots = sum4(std::array::from_fn(|r| {
                if r < R {
                    d[r]
                } else {
                    _mm256_setzero_si256()
                }
            }));
            let mins = if T::MINS {
                let mn = T::mins(blk);
                mins4([mn; 4], a.map(|a| &a.sums32))
            } else {
                _mm_setzero_si128()
            };
            let bits = [T::d_bits(blk); 4];
            let ad = _mm_setr_ps(a[0].d, a[1].d, a[2].d, a[3].d);
            acc = add_block4::<T>(acc, bits, ad, dots, mins);
        }
        acc
    }
}

/// `4 * groups` consecutive weight rows (`w`, `row_bytes` apart) times one activation
/// row, into `out[..4 * groups]`, four rows at a time.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode_of<T: Simd, const HINT: i32>(
    w: *const u8,
    row_bytes: usize,
    groups: usize,
    x: &[ActBlock],
    out: *mut f32,
    next: usize,
) {
    unsafe {
        let kb = row_bytes / T::BLOCK_BYTES;
        for g in 0..groups {
            let w: [*const u8; 4] = std::array::from_fn(|i| w.add((4 * g + i) * row_bytes));
            let mut acc = _mm_setzero_ps();
            for (b, a) in x.iter().enumerate().take(kb) {
                let mut dots = [_mm256_setzero_si256(); 4];
                let mut mn = [0u64; 4];
                let mut bits = [0u32; 4];
                for i in 0..4 {
                    let blk = w[i].add(b * T::BLOCK_BYTES);
                    prefetch_to::<HINT>(blk.wrapping_add(next), T::BLOCK_BYTES);
                    dots[i] = T::dots::<1>(blk, [a])[0];
                    mn[i] = T::mins(blk);
                    bits[i] = T::d_bits(blk);
                }
                let mins = if T::MINS {
                    mins4(mn, [&a.sums32; 4])
                } else {
                    _mm_setzero_si128()
                };
                acc = add_block4::<T>(acc, bits, _mm_set1_ps(a.d), sum4(dots), mins);
            }
            _mm_storeu_ps(out.add(4 * g), acc);
        }
    }
}

/// `F`'s kernels, chosen by its format.
macro_rules! by_format {
    ($f:ty, $kernel:ident::<$hint:ident>, $($arg:expr),*) => {
        match <$f>::DTYPE {
            GgmlDType::Q4K => $kernel::<Q4K, $hint>($($arg),*),
            GgmlDType::Q6K => $kernel::<Q6K, $hint>($($arg),*),
            other => unreachable!("no AVX2 kernel for {other:?}"),
        }
    };
    ($f:ty, $kernel:ident, $($arg:expr),*) => {
        match <$f>::DTYPE {
            GgmlDType::Q4K => $kernel::<Q4K>($($arg),*),
            GgmlDType::Q6K => $kernel::<Q6K>($($arg),*),
            other => unreachable!("no AVX2 kernel for {other:?}"),
        }
    };
}

/// One weight row (`w`: `kb` blocks) times `rows` activation rows (`x`: `kb` blocks
/// each, row after row), into `out[..rows]`.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `w` must point at `kb` blocks.
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
pub(super) unsafe fn decode<F: KFormat, const HINT: i32>(
    w: *const u8,
    row_bytes: usize,
    groups: usize,
    x: &[ActBlock],
    out: *mut f32,
    next: usize,
) {
    unsafe { by_format!(F, decode_of::<HINT>, w, row_bytes, groups, x, out, next) }
}

const _: () = assert!(QK_K == 256);
