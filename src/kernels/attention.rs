//! Decode attention on the CPU: the newest position's queries against every key and
//! value a sequence has cached, one query head per work item of the thread pool.
//!
//! candle's path for this (two batched matmuls and a softmax) spent more time on its
//! own overhead than on the arithmetic at one query row: packing for gemm, a rayon
//! dispatch per matmul, and a read of /proc/cpuinfo per matmul to size it. Here each
//! head reads its keys and values once, straight from the cache.

use half::f16;

/// The cache's layout: `kv_heads` blocks of `capacity` positions of `head_dim` floats.
#[derive(Clone, Copy, Debug)]
pub struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub capacity: usize,
}

/// `out` (heads × head_dim) = softmax(q·Kᵀ / √head_dim)·V for each query head of `q`
/// (heads × head_dim) over the first `len` cached positions of `k` and `v`; query head h
/// reads key/value head h / (heads / kv_heads), as grouped-query attention does.
pub fn decode(q: &[f32], k: &[f16], v: &[f16], shape: Heads, len: usize, out: &mut [f32]) {
    let Heads {
        heads,
        kv_heads,
        head_dim: hd,
        capacity,
    } = shape;
    assert!(
        kv_heads > 0 && heads.is_multiple_of(kv_heads),
        "bad head counts {shape:?}"
    );
    assert!(
        len <= capacity && len > 0,
        "{len} positions in a cache of {capacity}"
    );
    assert_eq!(q.len(), heads * hd);
    assert_eq!(out.len(), heads * hd);
    assert!(k.len() >= kv_heads * capacity * hd && v.len() >= kv_heads * capacity * hd);
    let group = heads / kv_heads;
    let out_at = out.as_mut_ptr() as usize;
    // One item per key/value head: its keys and values are read from memory once for
    // all the query heads that share them (reading them once per query head made this
    // bound by the L3 cache).
    candle_core::utils::barrier_pool().execute_chunked(kv_heads, |range| {
        let mut scores = vec![0f32; group * len];
        for g in range {
            let keys = &k[g * capacity * hd..][..len * hd];
            let values = &v[g * capacity * hd..][..len * hd];
            let qg = &q[g * group * hd..(g + 1) * group * hd];
            // SAFETY: each group's output rows are written by exactly one item.
            let og = unsafe {
                std::slice::from_raw_parts_mut((out_at as *mut f32).add(g * group * hd), group * hd)
            };
            attend_group(qg, keys, values, hd, len, &mut scores, og);
        }
    });
}

/// The query heads `q` (group × hd) of one key/value head over its `len` positions.
fn attend_group(
    q: &[f32],
    keys: &[f16],
    values: &[f16],
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
    let scale = 1.0 / (hd as f32).sqrt();
    for ((qh, s), o) in q
        .chunks_exact(hd)
        .zip(scores.chunks_exact_mut(len))
        .zip(out.chunks_exact_mut(hd))
    {
        for (s, key) in s.iter_mut().zip(keys.chunks_exact(hd)) {
            *s = dot(qh, key) * scale;
        }
        let sum = softmax_unnormalized(s);
        o.fill(0.0);
        for (&p, value) in s.iter().zip(values.chunks_exact(hd)) {
            for (o, &x) in o.iter_mut().zip(value) {
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

    /// Positions whose values are accumulated for every query head before the next.
    const SPAN: usize = 32;

    /// Positions ahead whose keys are asked for while four are scored.
    const AHEAD: usize = 16;

    /// Asks for the cache lines of `xs[at..at + n]` (what lies inside `xs`).
    #[inline(always)]
    fn prefetch(xs: &[f16], at: usize, n: usize) {
        let end = xs.len().min(at + n);
        for i in (at..end).step_by(32) {
            // SAFETY: i < xs.len(); a prefetch reads nothing.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(xs.as_ptr().add(i) as *const i8) };
        }
    }

    /// [`super::attend_group`] for head_dim = 16·C.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn group<const C: usize>(
        q: &[f32],
        keys: &[f16],
        values: &[f16],
        len: usize,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        let hd = 16 * C;
        let heads = q.len() / hd;
        assert!(keys.len() >= len * hd && values.len() >= len * hd);
        assert!(scores.len() >= heads * len && out.len() >= heads * hd);
        let scale = _mm512_set1_ps(1.0 / (hd as f32).sqrt());
        let load = |p: &[f32], at: usize| unsafe { _mm512_loadu_ps(p.as_ptr().add(at)) };
        let load16 = |p: &[f16], at: usize| unsafe {
            _mm512_cvtph_ps(_mm256_loadu_si256(p.as_ptr().add(at) as *const __m256i))
        };
        // Scores, four keys at a time (their sums reduced together); the four keys stay
        // in L1 for every query head.
        let mut t = 0;
        while t < len {
            let n = (len - t).min(4);
            // The cache is read from memory (a token's weights stream through the
            // caches in between) and its 4 KiB pages stop the hardware prefetcher.
            prefetch(keys, (t + AHEAD) * hd, 4 * hd);
            for h in 0..heads {
                let mut acc = [_mm512_setzero_ps(); 4];
                for c in 0..C {
                    let qc = load(q, h * hd + 16 * c);
                    for (j, a) in acc.iter_mut().enumerate().take(n) {
                        *a = _mm512_fmadd_ps(qc, load16(keys, (t + j) * hd + 16 * c), *a);
                    }
                }
                let mut four = [0f32; 4];
                unsafe { _mm_storeu_ps(four.as_mut_ptr(), hsum4x16(acc)) };
                for j in 0..n {
                    scores[h * len + t + j] = four[j];
                }
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
        // Values: per span of positions (in L1), each head's output in registers.
        for o in out.iter_mut() {
            *o = 0.0;
        }
        for t0 in (0..len).step_by(SPAN) {
            let t1 = len.min(t0 + SPAN);
            prefetch(values, (t0 + SPAN) * hd, SPAN * hd);
            for h in 0..heads {
                let mut o: [__m512; C] = std::array::from_fn(|c| load(out, h * hd + 16 * c));
                for t in t0..t1 {
                    let p = _mm512_set1_ps(scores[h * len + t]);
                    for (c, o) in o.iter_mut().enumerate() {
                        *o = _mm512_fmadd_ps(p, load16(values, t * hd + 16 * c), *o);
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

    /// The plain formula, one head at a time, in f64.
    fn reference(q: &[f32], k: &[f16], v: &[f16], s: Heads, len: usize) -> Vec<f32> {
        let hd = s.head_dim;
        let mut out = vec![0f32; s.heads * hd];
        for h in 0..s.heads {
            let g = h / (s.heads / s.kv_heads);
            let scores: Vec<f64> = (0..len)
                .map(|t| {
                    (0..hd)
                        .map(|d| q[h * hd + d] as f64 * k[(g * s.capacity + t) * hd + d].to_f64())
                        .sum::<f64>()
                        / (hd as f64).sqrt()
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for d in 0..hd {
                out[h * hd + d] = (0..len)
                    .map(|t| e[t] / sum * v[(g * s.capacity + t) * hd + d].to_f64())
                    .sum::<f64>() as f32;
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
    fn matches_the_formula_for_grouped_heads_and_odd_widths() {
        // The 1.5B's heads, the 0.5B's, a width that is not a multiple of 16, one head.
        for (heads, kv_heads, head_dim) in [(12, 2, 128), (14, 2, 64), (4, 4, 40), (1, 1, 8)] {
            for len in [1usize, 7, 300] {
                let s = Heads {
                    heads,
                    kv_heads,
                    head_dim,
                    capacity: len + 5,
                };
                let q = values(heads * head_dim, 1);
                let half = |v: Vec<f32>| v.into_iter().map(f16::from_f32).collect::<Vec<_>>();
                let k = half(values(kv_heads * s.capacity * head_dim, 2));
                let v = half(values(kv_heads * s.capacity * head_dim, 3));
                let mut out = vec![f32::NAN; heads * head_dim];
                decode(&q, &k, &v, s, len, &mut out);
                let want = reference(&q, &k, &v, s, len);
                for (i, (a, b)) in out.iter().zip(&want).enumerate() {
                    assert!((a - b).abs() <= 1e-4, "{s:?} len {len} [{i}]: {a} vs {b}");
                }
            }
        }
    }
}
