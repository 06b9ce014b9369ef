//! Attention on the CPU over a paged cache: each query row (a sequence's position)
//! against every key and value its sequence has cached up to and including itself, read
//! straight from the blocks its block table names. One work item of the thread pool is
//! one row's query heads that share a key/value head.
//!
//! candle's path for this (two batched matmuls and a softmax) spent more time on its
//! own overhead than on the arithmetic at one query row: packing for gemm, a rayon
//! dispatch per matmul, and a read of /proc/cpuinfo per matmul to size it. Here each
//! item reads its keys and values once, straight from the cache.

use half::f16;

/// The cache's layout: blocks of `kv_heads` × `block_size` positions × `head_dim`
/// values (block-major, then head, then position).
#[derive(Clone, Copy, Debug)]
pub struct Paged {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
}

impl Paged {
    /// Values in one block (all its heads).
    pub fn block_len(&self) -> usize {
        self.kv_heads * self.block_size * self.head_dim
    }

    /// Offset of position `pos` of kv head `g` in a sequence with block table `blocks`.
    pub fn offset(&self, blocks: &[u32], g: usize, pos: usize) -> usize {
        let b = blocks[pos / self.block_size] as usize;
        ((b * self.kv_heads + g) * self.block_size + pos % self.block_size) * self.head_dim
    }
}

/// One query row: it attends over the first `len` positions of the sequence whose
/// blocks are `blocks` (its own position is `len - 1`).
#[derive(Clone, Copy, Debug)]
pub struct Row<'a> {
    pub len: usize,
    pub blocks: &'a [u32],
}

/// `out` (rows × heads × head_dim) = softmax(q·Kᵀ / √head_dim)·V for each row and query
/// head of `q` (rows × heads × head_dim); query head h reads key/value head
/// h / (heads / kv_heads), as grouped-query attention does.
pub fn paged(q: &[f32], rows: &[Row], k: &[f16], v: &[f16], shape: Paged, out: &mut [f32]) {
    let Paged {
        heads,
        kv_heads,
        head_dim: hd,
        block_size: bs,
    } = shape;
    assert!(
        kv_heads > 0 && heads.is_multiple_of(kv_heads) && bs.is_multiple_of(4),
        "bad attention shape {shape:?}"
    );
    assert_eq!(q.len(), rows.len() * heads * hd);
    assert_eq!(out.len(), rows.len() * heads * hd);
    assert_eq!(k.len(), v.len());
    let n_blocks = k.len() / shape.block_len().max(1);
    for r in rows {
        assert!(
            r.len > 0 && r.len.div_ceil(bs) <= r.blocks.len(),
            "{} positions in {} blocks",
            r.len,
            r.blocks.len()
        );
        assert!(r.blocks[..r.len.div_ceil(bs)]
            .iter()
            .all(|&b| (b as usize) < n_blocks));
    }
    let group = heads / kv_heads;
    let out_at = out.as_mut_ptr() as usize;
    // One item per (row, key/value head): its keys and values are read once for all
    // the query heads that share them.
    candle_core::utils::barrier_pool().execute_chunked(rows.len() * kv_heads, |range| {
        let mut scores = Vec::new();
        for item in range {
            let (r, g) = (item / kv_heads, item % kv_heads);
            let row = rows[r];
            let nb = row.len.div_ceil(bs);
            let starts = (0..nb).map(|b| shape.offset(row.blocks, g, b * bs));
            let keys: Vec<&[f16]> = starts.clone().map(|at| &k[at..at + bs * hd]).collect();
            let values: Vec<&[f16]> = starts.map(|at| &v[at..at + bs * hd]).collect();
            let at = (r * heads + g * group) * hd;
            let qg = &q[at..at + group * hd];
            scores.resize(group * row.len, 0.0);
            // SAFETY: each (row, group)'s output values are written by exactly one item.
            let og =
                unsafe { std::slice::from_raw_parts_mut((out_at as *mut f32).add(at), group * hd) };
            attend_group(qg, &keys, &values, hd, row.len, &mut scores, og);
        }
    });
}

/// The query heads `q` (group × hd) of one key/value head over its `len` positions,
/// held in blocks of equal length (the last one partly used).
fn attend_group(
    q: &[f32],
    keys: &[&[f16]],
    values: &[&[f16]],
    hd: usize,
    len: usize,
    scores: &mut [f32],
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512 F; the slices have the lengths the kernel reads.
        match hd {
            64 => return unsafe { avx512::group::<4>(q, keys, values, len, scores, out) },
            128 => return unsafe { avx512::group::<8>(q, keys, values, len, scores, out) },
            _ => {}
        }
    }
    #[cfg(target_arch = "x86_64")]
    if super::ops::avx2() && is_x86_feature_detected!("f16c") {
        // SAFETY: the CPU has AVX2, FMA and F16C; the slices have the lengths the
        // kernel reads.
        match hd {
            64 => return unsafe { avx2::group::<8>(q, keys, values, len, scores, out) },
            128 => return unsafe { avx2::group::<16>(q, keys, values, len, scores, out) },
            _ => {}
        }
    }
    let bs = keys[0].len() / hd;
    fn at<'a>(blocks: &[&'a [f16]], bs: usize, hd: usize, t: usize) -> &'a [f16] {
        &blocks[t / bs][(t % bs) * hd..(t % bs + 1) * hd]
    }
    let scale = 1.0 / (hd as f32).sqrt();
    for ((qh, s), o) in q
        .chunks_exact(hd)
        .zip(scores.chunks_exact_mut(len))
        .zip(out.chunks_exact_mut(hd))
    {
        for (t, s) in s.iter_mut().enumerate() {
            *s = dot(qh, at(keys, bs, hd, t)) * scale;
        }
        let sum = softmax_unnormalized(s);
        o.fill(0.0);
        for (t, &p) in s.iter().enumerate() {
            for (o, &x) in o.iter_mut().zip(at(values, bs, hd, t)) {
                *o += p * x.to_f32();
            }
        }
        for o in o.iter_mut() {
            *o /= sum;
        }
    }
}

/// e^(s - max s) for each score, in place; returns their sum.
fn softmax_unnormalized(s: &mut [f32]) -> f32 {
    let max = s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    for x in s.iter_mut() {
        *x -= max;
    }
    super::ops::exp_in_place(s);
    s.iter().sum()
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::super::ops::avx512::hsum4x16;
    use core::arch::x86_64::*;
    use half::f16;

    /// Positions ahead whose keys are asked for while four are scored.
    const AHEAD: usize = 16;

    /// Asks for the cache lines of `xs[at..at + n]` (what lies inside `xs`).
    #[inline(always)]
    pub(super) fn prefetch(xs: &[f16], at: usize, n: usize) {
        let end = xs.len().min(at + n);
        for i in (at..end).step_by(32) {
            // SAFETY: i < xs.len(); a prefetch reads nothing.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(xs.as_ptr().add(i) as *const i8) };
        }
    }

    /// [`super::attend_group`] for head_dim = 16·C (blocks of a multiple of 4 positions).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn group<const C: usize>(
        q: &[f32],
        keys: &[&[f16]],
        values: &[&[f16]],
        len: usize,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        let hd = 16 * C;
        let heads = q.len() / hd;
        let bs = keys[0].len() / hd;
        assert!(bs.is_multiple_of(4) && keys.len() * bs >= len && values.len() * bs >= len);
        assert!(keys.iter().chain(values).all(|b| b.len() == bs * hd));
        assert!(scores.len() >= heads * len && out.len() >= heads * hd);
        let scale = _mm512_set1_ps(1.0 / (hd as f32).sqrt());
        let load = |p: &[f32], at: usize| unsafe { _mm512_loadu_ps(p.as_ptr().add(at)) };
        let load16 = |p: &[f16], at: usize| unsafe {
            _mm512_cvtph_ps(_mm256_loadu_si256(p.as_ptr().add(at) as *const __m256i))
        };
        // Scores, four keys at a time (their sums reduced together, never across a
        // block); the four keys stay in L1 for every query head.
        let mut t = 0;
        while t < len {
            let n = (len - t).min(4);
            let (blk, off) = (keys[t / bs], (t % bs) * hd);
            // The cache is read from memory (a token's weights stream through the
            // caches in between) and its 4 KiB pages stop the hardware prefetcher.
            let ahead = t + AHEAD;
            if ahead < len {
                prefetch(keys[ahead / bs], (ahead % bs) * hd, 4 * hd);
            }
            for h in 0..heads {
                let mut acc = [_mm512_setzero_ps(); 4];
                for c in 0..C {
                    let qc = load(q, h * hd + 16 * c);
                    for (j, a) in acc.iter_mut().enumerate().take(n) {
                        *a = _mm512_fmadd_ps(qc, load16(blk, off + j * hd + 16 * c), *a);
                    }
                }
                let mut four = [0f32; 4];
                unsafe { _mm_storeu_ps(four.as_mut_ptr(), hsum4x16(acc)) };
                scores[h * len + t..h * len + t + n].copy_from_slice(&four[..n]);
            }
            t += n;
        }
        let mut sums = vec![0f32; heads];
        for h in 0..heads {
            let s = &mut scores[h * len..(h + 1) * len];
            for x in s.iter_mut() {
                *x *= _mm512_cvtss_f32(scale);
            }
            sums[h] = super::softmax_unnormalized(s);
        }
        // Values: a block at a time (in L1), each head's output in registers.
        out.fill(0.0);
        for (b, blk) in values.iter().enumerate() {
            let t0 = b * bs;
            if t0 >= len {
                break;
            }
            let t1 = len.min(t0 + bs);
            if let Some(next) = values.get(b + 1).filter(|_| t1 < len) {
                prefetch(next, 0, bs * hd);
            }
            for h in 0..heads {
                let mut o: [__m512; C] = std::array::from_fn(|c| load(out, h * hd + 16 * c));
                for t in t0..t1 {
                    let p = _mm512_set1_ps(scores[h * len + t]);
                    for (c, o) in o.iter_mut().enumerate() {
                        *o = _mm512_fmadd_ps(p, load16(blk, (t - t0) * hd + 16 * c), *o);
                    }
                }
                for (c, o) in o.iter().enumerate() {
                    unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(h * hd + 16 * c), *o) };
                }
            }
        }
        for h in 0..heads {
            let inv = 1.0 / sums[h];
            for o in &mut out[h * hd..(h + 1) * hd] {
                *o *= inv;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::ops::avx2::hsum4x8;
    use super::avx512::prefetch;
    use core::arch::x86_64::*;
    use half::f16;

    /// Positions ahead whose keys are asked for while four are scored.
    const AHEAD: usize = 16;
    /// Output registers per pass over a value block (of 16 ymm).
    const OUT_REGS: usize = 8;

    /// [`super::attend_group`] for head_dim = 8·C, as the AVX-512 kernel: scores four
    /// keys at a time, then values a block at a time, each head's output (up to
    /// [`OUT_REGS`] registers of it per pass) in registers.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn group<const C: usize>(
        q: &[f32],
        keys: &[&[f16]],
        values: &[&[f16]],
        len: usize,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        let hd = 8 * C;
        let heads = q.len() / hd;
        let bs = keys[0].len() / hd;
        assert!(bs.is_multiple_of(4) && keys.len() * bs >= len && values.len() * bs >= len);
        assert!(keys.iter().chain(values).all(|b| b.len() == bs * hd));
        assert!(scores.len() >= heads * len && out.len() >= heads * hd);
        let scale = 1.0 / (hd as f32).sqrt();
        let load = |p: &[f32], at: usize| unsafe { _mm256_loadu_ps(p.as_ptr().add(at)) };
        let load16 = |p: &[f16], at: usize| unsafe {
            _mm256_cvtph_ps(_mm_loadu_si128(p.as_ptr().add(at) as *const __m128i))
        };
        let mut t = 0;
        while t < len {
            let n = (len - t).min(4);
            let (blk, off) = (keys[t / bs], (t % bs) * hd);
            let ahead = t + AHEAD;
            if ahead < len {
                prefetch(keys[ahead / bs], (ahead % bs) * hd, 4 * hd);
            }
            for h in 0..heads {
                let mut acc = [_mm256_setzero_ps(); 4];
                for c in 0..C {
                    let qc = load(q, h * hd + 8 * c);
                    for (j, a) in acc.iter_mut().enumerate().take(n) {
                        *a = _mm256_fmadd_ps(qc, load16(blk, off + j * hd + 8 * c), *a);
                    }
                }
                let mut four = [0f32; 4];
                unsafe { _mm_storeu_ps(four.as_mut_ptr(), hsum4x8(acc)) };
                scores[h * len + t..h * len + t + n].copy_from_slice(&four[..n]);
            }
            t += n;
        }
        let mut sums = vec![0f32; heads];
        for h in 0..heads {
            let s = &mut scores[h * len..(h + 1) * len];
            for x in s.iter_mut() {
                *x *= scale;
            }
            sums[h] = super::softmax_unnormalized(s);
        }
        out.fill(0.0);
        for (b, blk) in values.iter().enumerate() {
            let t0 = b * bs;
            if t0 >= len {
                break;
            }
            let t1 = len.min(t0 + bs);
            if let Some(next) = values.get(b + 1).filter(|_| t1 < len) {
                prefetch(next, 0, bs * hd);
            }
            for h in 0..heads {
                for c0 in (0..C).step_by(OUT_REGS) {
                    let at = h * hd + 8 * c0;
                    let mut o: [__m256; OUT_REGS] = std::array::from_fn(|c| {
                        if c0 + c < C {
                            load(out, at + 8 * c)
                        } else {
                            _mm256_setzero_ps()
                        }
                    });
                    for t in t0..t1 {
                        let p = _mm256_set1_ps(scores[h * len + t]);
                        for (c, o) in o.iter_mut().enumerate().take(C - c0) {
                            let v = load16(blk, (t - t0) * hd + 8 * (c0 + c));
                            *o = _mm256_fmadd_ps(p, v, *o);
                        }
                    }
                    for (c, o) in o.iter().enumerate().take(C - c0) {
                        unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(at + 8 * c), *o) };
                    }
                }
            }
        }
        for h in 0..heads {
            let inv = 1.0 / sums[h];
            for o in &mut out[h * hd..(h + 1) * hd] {
                *o *= inv;
            }
        }
    }
}

/// Σ a·b in 16 independent lanes (so that it vectorizes), then their sum.
fn dot(a: &[f32], b: &[f16]) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let (ac, bc) = (a.chunks_exact(L), b.chunks_exact(L));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y.to_f32())
        .sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..L {
            acc[i] += x[i] * y[i].to_f32();
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain formula, one row and head at a time, in f64.
    fn reference(q: &[f32], rows: &[Row], k: &[f16], v: &[f16], s: Paged) -> Vec<f32> {
        let hd = s.head_dim;
        let mut out = vec![0f32; rows.len() * s.heads * hd];
        for (r, row) in rows.iter().enumerate() {
            for h in 0..s.heads {
                let g = h / (s.heads / s.kv_heads);
                let qh = &q[(r * s.heads + h) * hd..][..hd];
                let key = |t: usize, d: usize| k[s.offset(row.blocks, g, t) + d].to_f64();
                let val = |t: usize, d: usize| v[s.offset(row.blocks, g, t) + d].to_f64();
                let scores: Vec<f64> = (0..row.len)
                    .map(|t| {
                        (0..hd).map(|d| qh[d] as f64 * key(t, d)).sum::<f64>() / (hd as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for d in 0..hd {
                    out[(r * s.heads + h) * hd + d] =
                        (0..row.len).map(|t| e[t] / sum * val(t, d)).sum::<f64>() as f32;
                }
            }
        }
        out
    }

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect()
    }

    #[test]
    fn matches_the_formula_over_scattered_blocks_for_grouped_heads_and_odd_widths() {
        // The 1.5B's heads, the 0.5B's, a width that is not a multiple of 16, one head.
        for (heads, kv_heads, head_dim) in [(12, 2, 128), (14, 2, 64), (4, 4, 40), (1, 1, 8)] {
            let s = Paged {
                heads,
                kv_heads,
                head_dim,
                block_size: 8,
            };
            let n_blocks = 50;
            let half = |v: Vec<f32>| v.into_iter().map(f16::from_f32).collect::<Vec<_>>();
            let k = half(values(n_blocks * s.block_len(), 2));
            let v = half(values(n_blocks * s.block_len(), 3));
            // Two sequences in blocks out of order; rows of one prefill chunk (causal)
            // and a decode row of the other.
            let a: Vec<u32> = (0..40).rev().collect();
            let b: Vec<u32> = vec![41, 45, 43, 40];
            let rows = [
                Row { len: 1, blocks: &a },
                Row { len: 7, blocks: &a },
                Row {
                    len: 300,
                    blocks: &a,
                },
                Row {
                    len: 29,
                    blocks: &b,
                },
            ];
            let q = values(rows.len() * heads * head_dim, 1);
            let mut out = vec![f32::NAN; q.len()];
            paged(&q, &rows, &k, &v, s, &mut out);
            let want = reference(&q, &rows, &k, &v, s);
            for (i, (a, b)) in out.iter().zip(&want).enumerate() {
                assert!((a - b).abs() <= 1e-4, "{s:?} [{i}]: {a} vs {b}");
            }
        }
    }
}
