//! Decode attention on the CPU: the newest position's queries against every key and
//! value a sequence has cached, one query head per work item of the thread pool.
//!
//! candle's path for this (two batched matmuls and a softmax) spent more time on its
//! own overhead than on the arithmetic at one query row: packing for gemm, a rayon
//! dispatch per matmul, and a read of /proc/cpuinfo per matmul to size it. Here each
//! head reads its keys and values once, straight from the cache.

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
pub fn decode(q: &[f32], k: &[f32], v: &[f32], shape: Heads, len: usize, out: &mut [f32]) {
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
    let scale = 1.0 / (hd as f32).sqrt();
    let out_at = out.as_mut_ptr() as usize;
    candle_core::utils::barrier_pool().execute_chunked(heads, |range| {
        let mut scores = vec![0f32; len];
        for h in range {
            let g = h / group;
            let keys = &k[g * capacity * hd..][..len * hd];
            let values = &v[g * capacity * hd..][..len * hd];
            let qh = &q[h * hd..(h + 1) * hd];
            let mut max = f32::NEG_INFINITY;
            for (s, key) in scores.iter_mut().zip(keys.chunks_exact(hd)) {
                *s = dot(qh, key) * scale;
                max = max.max(*s);
            }
            let mut sum = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            // SAFETY: each head's output row is written by exactly one item.
            let o = unsafe { std::slice::from_raw_parts_mut((out_at as *mut f32).add(h * hd), hd) };
            o.fill(0.0);
            for (&p, value) in scores.iter().zip(values.chunks_exact(hd)) {
                let p = p / sum;
                for (o, &x) in o.iter_mut().zip(value) {
                    *o += p * x;
                }
            }
        }
    });
}

/// Σ a·b in 16 independent lanes (so that it vectorizes), then their sum.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let (ac, bc) = (a.chunks_exact(L), b.chunks_exact(L));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..L {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain formula, one head at a time, in f64.
    fn reference(q: &[f32], k: &[f32], v: &[f32], s: Heads, len: usize) -> Vec<f32> {
        let hd = s.head_dim;
        let mut out = vec![0f32; s.heads * hd];
        for h in 0..s.heads {
            let g = h / (s.heads / s.kv_heads);
            let scores: Vec<f64> = (0..len)
                .map(|t| {
                    (0..hd)
                        .map(|d| q[h * hd + d] as f64 * k[(g * s.capacity + t) * hd + d] as f64)
                        .sum::<f64>()
                        / (hd as f64).sqrt()
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for d in 0..hd {
                out[h * hd + d] = (0..len)
                    .map(|t| e[t] / sum * v[(g * s.capacity + t) * hd + d] as f64)
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
                let k = values(kv_heads * s.capacity * head_dim, 2);
                let v = values(kv_heads * s.capacity * head_dim, 3);
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
