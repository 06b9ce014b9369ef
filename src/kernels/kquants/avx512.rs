//! The AVX-512 VNNI kernels of [`super`] (decode, short inputs, prompt tiles).

use super::{ActBlock, ActTile, KFormat, GROUP, Q4K, Q6K, QK_K, ROWS, TILE_ROWS, WIDE_ROWS};
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
                        (4, false) => step::<T, 4, 1>(a, p, tiles, j, t, kb, b0, blocks, &lanes),
                        (2, true) => step::<T, 2, 2>(a, p, tiles, j, t, kb, b0, blocks, &lanes),
                        (2, false) => step::<T, 2, 1>(a, p, tiles, j, t, kb, b0, blocks, &lanes),
                        (_, true) => step::<T, 1, 2>(a, p, tiles, j, t, kb, b0, blocks, &lanes),
                        (_, false) => step::<T, 1, 1>(a, p, tiles, j, t, kb, b0, blocks, &lanes),
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
unsafe fn prefetch_to<const HINT: i32>(p: *const u8, len: usize) {
    for at in (0..len).step_by(64) {
        _mm_prefetch::<HINT>(p.wrapping_add(at) as *const i8);
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

/// One weight row times up to 8 activation rows.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
unsafe fn rows_of<T: Simd>(
    w: *const u8,
    kb: usize,
    x: &[ActBlock],
    rows: usize,
    out: &mut [f32; WIDE_ROWS],
) {
    unsafe {
        let acc = match rows {
            1 => rows_n::<T, 1>(w, kb, x),
            2 => rows_n::<T, 2>(w, kb, x),
            3 => rows_n::<T, 3>(w, kb, x),
            4 => rows_n::<T, 4>(w, kb, x),
            5 => rows_n::<T, 5>(w, kb, x),
            6 => rows_n::<T, 6>(w, kb, x),
            7 => rows_n::<T, 7>(w, kb, x),
            _ => rows_n::<T, 8>(w, kb, x),
        };
        let mut sums = [0f32; WIDE_ROWS];
        _mm_storeu_ps(sums.as_mut_ptr(), acc[0]);
        _mm_storeu_ps(sums.as_mut_ptr().add(ROWS), acc[1]);
        out[..rows].copy_from_slice(&sums[..rows]);
    }
}

/// [`rows_of`] for R rows (at most 8): lane r of `acc[r / 4]` is row r's output. Each
/// weight block is unpacked once for all R rows; each set of four is reduced as alone.
#[inline(always)]
unsafe fn rows_n<T: Simd, const R: usize>(w: *const u8, kb: usize, x: &[ActBlock]) -> [__m128; 2] {
    unsafe {
        let idx = scale_idx(T::SCALE_IDX);
        let mut acc = [_mm_setzero_ps(); 2];
        for b in 0..kb {
            let blk = w.add(b * T::BLOCK_BYTES);
            let u = T::unpack(blk, &idx);
            // [d, dmin] of the block.
            let wd = _mm_cvtph_ps(_mm_cvtsi32_si128(T::d_bits(blk) as i32));
            let wd = _mm256_set_m128(_mm_permute_ps::<0b01_01_01_01>(wd), _mm_permute_ps::<0>(wd));
            for (h, acc) in acc.iter_mut().enumerate().take(R.div_ceil(ROWS)) {
                let first = h * ROWS;
                let a: [&ActBlock; ROWS] =
                    std::array::from_fn(|r| x.get_unchecked((first + r).min(R - 1) * kb + b));
                let dots = std::array::from_fn(|r| {
                    if first + r < R {
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
                // Times each row's a.d (rows past R: any).
                let ad = _mm_setr_ps(a[0].d, a[1].d, a[2].d, a[3].d);
                let dd = _mm256_mul_ps(wd, _mm256_set_m128(ad, ad));
                *acc = add_block4::<T>(dots, mins, dd, *acc);
            }
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
                    prefetch_to::<HINT>(blk.wrapping_add(next), T::BLOCK_BYTES);
                    let u = T::unpack(blk, &idx);
                    dots[i] = T::dot(&u, a, &act);
                    mn[i] = u.mn;
                    bits[i] = T::d_bits(blk);
                }
                let mins = if T::MINS {
                    let mn =
                        _mm256_setr_epi64x(mn[0] as i64, mn[1] as i64, mn[2] as i64, mn[3] as i64);
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
    ($f:ty, $kernel:ident::<$hint:ident>, $($arg:expr),*) => {
        match <$f>::DTYPE {
            GgmlDType::Q4K => $kernel::<Q4K, $hint>($($arg),*),
            GgmlDType::Q6K => $kernel::<Q6K, $hint>($($arg),*),
            other => unreachable!("no AVX-512 kernel for {other:?}"),
        }
    };
    ($f:ty, $kernel:ident, $($arg:expr),*) => {
        match <$f>::DTYPE {
            GgmlDType::Q4K => $kernel::<Q4K>($($arg),*),
            GgmlDType::Q6K => $kernel::<Q6K>($($arg),*),
            other => unreachable!("no AVX-512 kernel for {other:?}"),
        }
    };
}

/// One weight row (`w`: `kb` blocks) times `rows` activation rows (at most 8; `x`: `kb`
/// blocks each, row after row), into `out[..rows]`.
///
/// # Safety
/// The CPU must have what [`super::supported`] checks; `w` must point at `kb` blocks.
pub(super) unsafe fn rows<F: KFormat>(
    w: *const u8,
    kb: usize,
    x: &[ActBlock],
    rows: usize,
    out: &mut [f32; WIDE_ROWS],
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
