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
    let tiles = tiles(rows, if tile_kernel(hd) { TILE_ROWS } else { 1 });
    // One item per (tile of rows, key/value head): its keys and values are read once
    // for all the query heads that share them, and for all the rows of the tile.
    candle_core::utils::barrier_pool().execute_chunked(tiles.len() * kv_heads, |range| {
        let (mut scores, mut scratch) = (Vec::new(), Vec::new());
        for item in range {
            let (tile, g) = (tiles[item / kv_heads].clone(), item % kv_heads);
            let last = rows[tile.end - 1];
            let nb = last.len.div_ceil(bs);
            let starts = (0..nb).map(|b| shape.offset(last.blocks, g, b * bs));
            let keys: Vec<&[f16]> = starts.clone().map(|at| &k[at..at + bs * hd]).collect();
            let values: Vec<&[f16]> = starts.map(|at| &v[at..at + bs * hd]).collect();
            let at = |r: usize| (r * heads + g * group) * hd;
            // SAFETY: each (row, group)'s output values are written by exactly one item.
            let out_of = |r: usize| unsafe {
                std::slice::from_raw_parts_mut((out_at as *mut f32).add(at(r)), group * hd)
            };
            if tile.len() == 1 {
                let r = tile.start;
                let len = rows[r].len;
                scores.resize(group * len, 0.0);
                attend_group(
                    &q[at(r)..][..group * hd],
                    &keys,
                    &values,
                    hd,
                    len,
                    &mut scores,
                    out_of(r),
                );
                continue;
            }
            let tile_rows: Vec<TileRow> = tile
                .map(|r| TileRow {
                    q: &q[at(r)..][..group * hd],
                    len: rows[r].len,
                    out: out_of(r),
                })
                .collect();
            attend_tile(tile_rows, &keys, &values, hd, &mut scores, &mut scratch);
        }
    });
}

/// Rows a tile of one sequence's consecutive positions holds at most.
const TILE_ROWS: usize = 8;

/// Whether [`attend_tile`] has a kernel for this head width on this CPU.
fn tile_kernel(hd: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        return matches!(hd, 64 | 128);
    }
    let _ = hd;
    false
}

/// `rows` cut into tiles of up to `most` rows that [`attend_tile`] can take together:
/// consecutive positions of one sequence (a prompt chunk's rows). Other rows (decodes)
/// are tiles of one.
fn tiles(rows: &[Row], most: usize) -> Vec<std::ops::Range<usize>> {
    let mut tiles: Vec<std::ops::Range<usize>> = Vec::new();
    for (r, row) in rows.iter().enumerate() {
        if let Some(t) = tiles.last_mut() {
            let prev = rows[r - 1];
            let same = std::ptr::eq(prev.blocks, row.blocks) && prev.len + 1 == row.len;
            if same && t.len() < most {
                t.end = r + 1;
                continue;
            }
        }
        tiles.push(r..r + 1);
    }
    tiles
}

/// One row of a tile: its query heads that share a key/value head, the positions it
/// attends over, and where its output goes.
struct TileRow<'a> {
    q: &'a [f32],
    len: usize,
    out: &'a mut [f32],
}

/// [`attend_group`] for the rows of a tile (lengths increasing), each block of keys and
/// of values turned into f32 once for them all. Each row gets the very float operations
/// [`attend_group`] would do for it alone (the same sums, in the same order), so its
/// output does not depend on how a prompt was cut into chunks.
fn attend_tile(
    rows: Vec<TileRow>,
    keys: &[&[f16]],
    values: &[&[f16]],
    hd: usize,
    scores: &mut Vec<f32>,
    scratch: &mut Vec<f32>,
) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512 F; the slices have the lengths the kernel reads.
        match hd {
            64 => return unsafe { avx512::tile::<4>(rows, keys, values, scores, scratch) },
            128 => return unsafe { avx512::tile::<8>(rows, keys, values, scores, scratch) },
            _ => {}
        }
    }
    let _ = (rows, keys, values, hd, scores, scratch);
    unreachable!("tiles of several rows are only formed where a kernel takes them")
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
    // The max and the sum in 16 independent lanes (so that they vectorize, not a chain
    // of dependent scalar operations), then across the lanes.
    const L: usize = 16;
    let mut max = [f32::NEG_INFINITY; L];
    let chunks = s.chunks_exact(L);
    let mut tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    for c in chunks {
        for (m, &x) in max.iter_mut().zip(c) {
            *m = if x > *m { x } else { *m };
        }
    }
    for m in max {
        tail = if m > tail { m } else { tail };
    }
    let max = tail;
    for x in s.iter_mut() {
        *x -= max;
    }
    super::ops::exp_in_place(s);
    let mut sum = [0f32; L];
    let chunks = s.chunks_exact(L);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, &x) in sum.iter_mut().zip(c) {
            *a += x;
        }
    }
    sum.iter().sum::<f32>() + tail
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

    /// [`super::attend_tile`] for head_dim = 16·C: [`group`]'s operations for each row,
    /// with each block of keys and of values turned into f32 once for all the rows.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile<const C: usize>(
        mut rows: Vec<super::TileRow>,
        keys: &[&[f16]],
        values: &[&[f16]],
        scores: &mut Vec<f32>,
        scratch: &mut Vec<f32>,
    ) {
        let hd = 16 * C;
        let heads = rows[0].q.len() / hd;
        let bs = keys[0].len() / hd;
        let longest = rows.iter().map(|r| r.len).max().unwrap_or(0);
        assert!(bs.is_multiple_of(4) && keys.len() * bs >= longest && values.len() * bs >= longest);
        assert!(keys.iter().chain(values).all(|b| b.len() == bs * hd));
        assert!(rows
            .iter()
            .all(|r| r.q.len() == heads * hd && r.out.len() == heads * hd && r.len > 0));
        let scale = _mm512_set1_ps(1.0 / (hd as f32).sqrt());
        // Each row's scores at `base[i]`: heads × its length, as `group` lays them out.
        let mut base = Vec::with_capacity(rows.len());
        let mut total = 0;
        for r in &rows {
            base.push(total);
            total += heads * r.len;
        }
        scores.resize(total, 0.0);
        scratch.resize(bs * hd, 0.0);
        let convert = |blk: &[f16], to: &mut [f32], n: usize| {
            for i in (0..n * hd).step_by(16) {
                let x = unsafe {
                    _mm512_cvtph_ps(_mm256_loadu_si256(blk.as_ptr().add(i) as *const __m256i))
                };
                unsafe { _mm512_storeu_ps(to.as_mut_ptr().add(i), x) };
            }
        };
        // Scores, a block of keys at a time, four keys at a time within it.
        for (b, blk) in keys.iter().enumerate() {
            let t0 = b * bs;
            if t0 >= longest {
                break;
            }
            let t1 = longest.min(t0 + bs);
            convert(blk, scratch, t1 - t0);
            let kf = &scratch[..];
            for (r, &at) in rows.iter().zip(&base) {
                let mut t = t0;
                while t < r.len.min(t1) {
                    let n = (r.len - t).min(4);
                    let off = (t - t0) * hd;
                    let mut h = 0;
                    // Two heads at a time (each key loaded once for both), then the last.
                    while h + 2 <= heads {
                        let four = qk::<C, 2>(r.q, h, kf, off);
                        for (i, four) in four.iter().enumerate() {
                            let s = at + (h + i) * r.len + t;
                            scores[s..s + n].copy_from_slice(&four[..n]);
                        }
                        h += 2;
                    }
                    if h < heads {
                        let [four] = qk::<C, 1>(r.q, h, kf, off);
                        let s = at + h * r.len + t;
                        scores[s..s + n].copy_from_slice(&four[..n]);
                    }
                    t += n;
                }
            }
        }
        let mut sums = vec![0f32; rows.len() * heads];
        for (i, (r, &at)) in rows.iter().zip(&base).enumerate() {
            for h in 0..heads {
                let s = &mut scores[at + h * r.len..at + (h + 1) * r.len];
                for x in s.iter_mut() {
                    *x *= _mm512_cvtss_f32(scale);
                }
                sums[i * heads + h] = super::softmax_unnormalized(s);
            }
        }
        // Values: a block at a time, each row's heads' outputs in registers.
        for r in rows.iter_mut() {
            r.out.fill(0.0);
        }
        for (b, blk) in values.iter().enumerate() {
            let t0 = b * bs;
            if t0 >= longest {
                break;
            }
            let t1 = longest.min(t0 + bs);
            convert(blk, scratch, t1 - t0);
            let vf = &scratch[..];
            for (r, &at) in rows.iter_mut().zip(&base) {
                let t1 = r.len.min(t1);
                if t0 >= t1 {
                    continue;
                }
                let mut h = 0;
                while h + 2 <= heads {
                    pv::<C, 2>(r, &scores[at..], h, vf, t0..t1);
                    h += 2;
                }
                if h < heads {
                    pv::<C, 1>(r, &scores[at..], h, vf, t0..t1);
                }
            }
        }
        for (i, r) in rows.iter_mut().enumerate() {
            for h in 0..heads {
                let inv = 1.0 / sums[i * heads + h];
                for o in &mut r.out[h * hd..(h + 1) * hd] {
                    *o *= inv;
                }
            }
        }
    }

    /// The scores of keys `off / hd ..` + 4 (f32 rows of `kf`) for query heads `h..h + H`
    /// of `q`, each exactly as [`group`] forms it (C sums of 16 lanes, then across lanes).
    #[target_feature(enable = "avx512f")]
    unsafe fn qk<const C: usize, const H: usize>(
        q: &[f32],
        h: usize,
        kf: &[f32],
        off: usize,
    ) -> [[f32; 4]; H] {
        let hd = 16 * C;
        assert!(q.len() >= (h + H) * hd && kf.len() >= off + 4 * hd);
        let load = |p: &[f32], at: usize| unsafe { _mm512_loadu_ps(p.as_ptr().add(at)) };
        let mut acc = [[_mm512_setzero_ps(); 4]; H];
        for c in 0..C {
            let k: [__m512; 4] = std::array::from_fn(|j| load(kf, off + j * hd + 16 * c));
            for (i, acc) in acc.iter_mut().enumerate() {
                let qc = load(q, (h + i) * hd + 16 * c);
                for (a, &k) in acc.iter_mut().zip(&k) {
                    *a = _mm512_fmadd_ps(qc, k, *a);
                }
            }
        }
        acc.map(|a| {
            let mut four = [0f32; 4];
            unsafe { _mm_storeu_ps(four.as_mut_ptr(), hsum4x16(a)) };
            four
        })
    }

    /// Adds Σ p·v over positions `ts` (value rows of `vf` from `ts.start`) to the outputs
    /// of heads `h..h + H` of `r`, as [`group`] does it (position by position, from the
    /// output so far). `scores` holds the row's probabilities, heads × its length.
    #[target_feature(enable = "avx512f")]
    unsafe fn pv<const C: usize, const H: usize>(
        r: &mut super::TileRow,
        scores: &[f32],
        h: usize,
        vf: &[f32],
        ts: std::ops::Range<usize>,
    ) {
        let hd = 16 * C;
        let t0 = ts.start;
        assert!(r.out.len() >= (h + H) * hd && vf.len() >= (ts.end - t0) * hd);
        assert!(scores.len() >= (h + H) * r.len && ts.end <= r.len);
        let load = |p: &[f32], at: usize| unsafe { _mm512_loadu_ps(p.as_ptr().add(at)) };
        let mut o: [[__m512; C]; H] =
            std::array::from_fn(|i| std::array::from_fn(|c| load(r.out, (h + i) * hd + 16 * c)));
        for t in ts {
            let p: [__m512; H] =
                std::array::from_fn(|i| _mm512_set1_ps(scores[(h + i) * r.len + t]));
            for c in 0..C {
                let v = load(vf, (t - t0) * hd + 16 * c);
                for (o, &p) in o.iter_mut().zip(&p) {
                    o[c] = _mm512_fmadd_ps(p, v, o[c]);
                }
            }
        }
        for (i, o) in o.iter().enumerate() {
            for (c, o) in o.iter().enumerate() {
                unsafe { _mm512_storeu_ps(r.out.as_mut_ptr().add((h + i) * hd + 16 * c), *o) };
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

    /// A cache of 50 blocks of 8 positions for (heads, kv heads, head width), its keys
    /// and values pseudo-random from `seed`.
    fn cache(
        (heads, kv_heads, head_dim): (usize, usize, usize),
        seed: u64,
    ) -> (Paged, Vec<f16>, Vec<f16>) {
        let s = Paged {
            heads,
            kv_heads,
            head_dim,
            block_size: 8,
        };
        let half = |v: Vec<f32>| v.into_iter().map(f16::from_f32).collect::<Vec<_>>();
        let n = 50 * s.block_len();
        (s, half(values(n, seed)), half(values(n, seed + 1)))
    }

    /// [`paged`]'s output, checked against the formula.
    fn checked(q: &[f32], rows: &[Row], k: &[f16], v: &[f16], s: Paged) -> Vec<f32> {
        let mut out = vec![f32::NAN; q.len()];
        paged(q, rows, k, v, s, &mut out);
        let want = reference(q, rows, k, v, s);
        for (i, (x, y)) in out.iter().zip(&want).enumerate() {
            assert!((x - y).abs() <= 1e-4, "{s:?} [{i}]: {x} vs {y}");
        }
        out
    }

    #[test]
    fn matches_the_formula_over_scattered_blocks_for_grouped_heads_and_odd_widths() {
        // The 1.5B's heads, the 0.5B's, a width that is not a multiple of 16, one head.
        for heads in [(12, 2, 128), (14, 2, 64), (4, 4, 40), (1, 1, 8)] {
            let (s, k, v) = cache(heads, 2);
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
            let q = values(rows.len() * s.heads * s.head_dim, 1);
            checked(&q, &rows, &k, &v, s);
        }
    }

    #[test]
    fn rows_of_a_prompt_chunk_get_what_each_would_get_alone() {
        for heads in [(12, 2, 128), (14, 2, 64), (4, 4, 40)] {
            let (s, k, v) = cache(heads, 5);
            let a: Vec<u32> = (0..40).rev().collect();
            let b: Vec<u32> = vec![41, 45, 43, 40];
            // A decode row, a chunk of 21 positions (three tiles, lengths across block
            // ends), a chunk of 3 of another sequence, a lone row of the first.
            let mut rows = vec![Row {
                len: 29,
                blocks: &b,
            }];
            rows.extend((280..301).map(|len| Row { len, blocks: &a }));
            rows.extend((5..8).map(|len| Row { len, blocks: &b }));
            rows.push(Row { len: 9, blocks: &a });
            assert_eq!(
                tiles(&rows, TILE_ROWS),
                [0..1, 1..9, 9..17, 17..22, 22..25, 25..26]
            );
            let w = s.heads * s.head_dim;
            let q = values(rows.len() * w, 7);
            let out = checked(&q, &rows, &k, &v, s);
            // Bit for bit what each row gets alone (as a decode row).
            for (r, row) in rows.iter().enumerate() {
                let mut alone = vec![f32::NAN; w];
                paged(&q[r * w..][..w], &[*row], &k, &v, s, &mut alone);
                assert_eq!(alone, out[r * w..][..w], "{s:?} row {r}");
            }
        }
    }
}
