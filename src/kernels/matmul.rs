//! CPU matmuls for the 32-value block formats where candle is slow on x86:
//! - Q5_0 (most matrices of the 0.5B file), which candle runs through a scalar loop;
//! - Q8_0 with a width that is not a multiple of 256 (the 0.5B's 896-wide output
//!   projection and attn_v), which candle's tiled kernels skip.
//!
//! Activations are quantized to 8 bits per 32-value block as llama.cpp does. On a CPU
//! with AVX-512 VNNI the weights are interleaved at load into tiles of 16 rows
//! ([`Tile`]), in as many bytes as the file's blocks (decode is bound by memory
//! bandwidth): one `vpdpbusd` then multiplies 4 columns of 16 rows by 4 activations, and
//! each tile is unpacked once for every activation row of the call. With AVX2 alone the
//! same tiles serve Q5_0, half a tile (8 rows) per register and `vpmaddubsw` for the
//! products (on an AMD Zen 3 a 512-token prompt of the 0.5B took 0.61x the time of the
//! row kernel, decode 0.92x); Q8_0, whose unsigned weights would overflow its 16-bit
//! sums, and CPUs without AVX2 keep the blocks in rows as read, with AVX2 or scalar
//! kernels. The work is split over candle's own CPU thread pool.

use super::bytes::{as_bytes_mut, zeroed_plain};
use candle_core::{Device, Result, Tensor};
use half::f16;

const QK: usize = 32;
/// Weight rows per tile.
const TILE: usize = 16;

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
    /// The format's 16-row tile.
    type Tile: Tile;
    /// What the tiles add to each weight to make it unsigned (for VNNI's u8×i8 dot).
    const OFFSET: i32;
    /// Whether the AVX2 tile kernel runs this format: its `vpmaddubsw` sums pairs of
    /// products in 16 bits, which weights of up to 31 (Q5_0 + 16) fit four times over,
    /// and weights of up to 255 (Q8_0 + 128) not once.
    const AVX2_TILES: bool;
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
    /// Interleaves the blocks of one 32-column slice of 16 rows (`None`: a row past the
    /// matrix's end, all zero) into a tile.
    fn pack_tile(rows: &[Option<&Self>; TILE]) -> Self::Tile;
}

// SAFETY: repr(C) {u16, [u8; 4], [u8; 16]}: 22 bytes, GGUF's Q5_0 block.
unsafe impl WeightBlock for BlockQ5 {
    type Tile = TileQ5;
    const OFFSET: i32 = 16;
    const AVX2_TILES: bool = true;
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
    fn pack_tile(rows: &[Option<&Self>; TILE]) -> TileQ5 {
        let mut t = TileQ5 {
            d: [0; TILE],
            qh: [0; 8],
            qs: [[0; 64]; 4],
        };
        for (r, b) in rows.iter().enumerate() {
            let Some(b) = b else { continue };
            t.d[r] = b.d;
            // The block's byte j holds weights j (low nibble) and j + 16 (high): exactly
            // register j / 4's and j / 4 + 4's nibbles, so the bytes move as they are.
            for g in 0..4 {
                t.qs[g][r * 4..r * 4 + 4].copy_from_slice(&b.qs[4 * g..4 * g + 4]);
            }
            // Weight + 16 is the 5-bit value itself: its fifth bit is the block's.
            let qh = u32::from_le_bytes(b.qh);
            for (g, mask) in t.qh.iter_mut().enumerate() {
                *mask |= u64::from(qh >> (4 * g) & 0xf) << (r * 4);
            }
        }
        t
    }
}

// SAFETY: repr(C) {u16, [i8; 32]}: 34 bytes, GGUF's Q8_0 block.
unsafe impl WeightBlock for BlockQ8_0 {
    type Tile = TileQ8_0;
    const OFFSET: i32 = 128;
    const AVX2_TILES: bool = false;
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
    fn pack_tile(rows: &[Option<&Self>; TILE]) -> TileQ8_0 {
        let mut t = TileQ8_0 {
            d: [0; TILE],
            qs: [[0; 64]; 8],
        };
        for (r, b) in rows.iter().enumerate() {
            let Some(b) = b else { continue };
            t.d[r] = b.d;
            for (g, reg) in t.qs.iter_mut().enumerate() {
                for j in 0..4 {
                    // w + 128 as an unsigned byte.
                    reg[r * 4 + j] = b.qs[4 * g + j] as u8 ^ 0x80;
                }
            }
        }
        t
    }
}

/// 32 columns of 16 weight rows in one block format, interleaved for AVX-512: register
/// `g` (0..8) holds, for each row r, the 4 weights of columns 4g..4g+4 (plus the
/// format's offset, as unsigned bytes) in its 32-bit lane r.
/// # Safety
/// Implementors are `repr(C)` plain data for which all zeroes is a valid value.
pub unsafe trait Tile: Copy + Send + Sync + 'static {
    /// The 16 rows' scales, as f16 bits.
    fn scales(&self) -> &[u16; TILE];
    /// The 8 registers described above.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F and BW.
    #[cfg(target_arch = "x86_64")]
    unsafe fn unpack(&self) -> [core::arch::x86_64::__m512i; 8];
    /// The 256-bit halves of those registers: rows 8h..8h + 8 (`h` 0 or 1).
    ///
    /// # Safety
    /// The CPU must have AVX2.
    #[cfg(target_arch = "x86_64")]
    unsafe fn unpack_half(&self, h: usize) -> [core::arch::x86_64::__m256i; 8];
}

/// 16 rows of Q5_0 in the bytes of 16 blocks (352): nibbles of register g in the low
/// half of `qs[g % 4]` (g < 4) or its high half (g >= 4), fifth bits of register g as
/// the 64-bit byte mask `qh[g]`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TileQ5 {
    d: [u16; TILE],
    qh: [u64; 8],
    qs: [[u8; 64]; 4],
}
const _: () = assert!(std::mem::size_of::<TileQ5>() == TILE * 22);

// SAFETY: plain data, all zeroes valid.
unsafe impl Tile for TileQ5 {
    fn scales(&self) -> &[u16; TILE] {
        &self.d
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn unpack(&self) -> [core::arch::x86_64::__m512i; 8] {
        avx512::unpack_q5(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn unpack_half(&self, h: usize) -> [core::arch::x86_64::__m256i; 8] {
        avx2::unpack_q5_half(self, h)
    }
}

/// 16 rows of Q8_0 in the bytes of 16 blocks (544), each weight plus 128.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TileQ8_0 {
    d: [u16; TILE],
    qs: [[u8; 64]; 8],
}
const _: () = assert!(std::mem::size_of::<TileQ8_0>() == TILE * 34);

// SAFETY: plain data, all zeroes valid.
unsafe impl Tile for TileQ8_0 {
    fn scales(&self) -> &[u16; TILE] {
        &self.d
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn unpack(&self) -> [core::arch::x86_64::__m512i; 8] {
        use core::arch::x86_64::*;
        std::array::from_fn(|g| _mm512_loadu_si512(self.qs[g].as_ptr() as *const _))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn unpack_half(&self, h: usize) -> [core::arch::x86_64::__m256i; 8] {
        use core::arch::x86_64::*;
        std::array::from_fn(|g| _mm256_loadu_si256(self.qs[g][32 * h..].as_ptr() as *const _))
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

/// A matrix of `n` rows (outputs) by `k` columns (inputs) in a 32-weight block format.
pub struct BlockMatrix<B: WeightBlock> {
    storage: Storage<B>,
    n: usize,
    k: usize,
}

enum Storage<B: WeightBlock> {
    /// Rows of blocks as in the file, for the AVX2 and scalar kernels.
    Rows(Vec<B>),
    /// `n / 16` (rounded up) groups of `k / 32` tiles, for the AVX-512 kernel.
    Tiles(Vec<B::Tile>),
}

pub type Q5_0Matrix = BlockMatrix<BlockQ5>;
pub type Q8_0Matrix = BlockMatrix<BlockQ8_0>;

/// Activation rows one tile pass keeps accumulators for.
const ROW_CHUNK: usize = 32;

impl<B: WeightBlock> BlockMatrix<B> {
    /// Reads the (n, k) tensor `name`: straight into rows of blocks (the block types
    /// have the file's layout), interleaved into tiles where the CPU has AVX-512 VNNI.
    /// `fill` writes the tensor's bytes as stored into the buffer it is given.
    pub fn read(
        name: &str,
        n: usize,
        k: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<()>,
    ) -> Result<Self> {
        if !k.is_multiple_of(QK) {
            candle_core::bail!("tensor '{name}': width {k} is not a whole number of blocks");
        }
        // SAFETY: the block types are plain data (an f16 scale and byte arrays).
        let mut blocks: Vec<B> = unsafe { zeroed_plain(n * k / QK) };
        fill(unsafe { as_bytes_mut(&mut blocks) })?;
        Ok(Self::from_rows(blocks, n, k, tile_kernel::<B>().is_some()))
    }

    fn from_rows(blocks: Vec<B>, n: usize, k: usize, tiled: bool) -> Self {
        let storage = if tiled {
            Storage::Tiles(pack_tiles(&blocks, n, k / QK))
        } else {
            Storage::Rows(blocks)
        };
        Self { storage, n, k }
    }

    /// Bytes of weights one pass reads.
    pub fn storage_bytes(&self) -> usize {
        match &self.storage {
            Storage::Rows(b) => std::mem::size_of_val(b.as_slice()),
            Storage::Tiles(t) => std::mem::size_of_val(t.as_slice()),
        }
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
        let out = self.multiply(&xs, Kernel::detect());
        Tensor::from_vec(out, out_dims, &Device::Cpu)
    }

    /// Rows of `k` activations (`xs`, row-major) times the matrix transposed: the rows'
    /// `n` outputs, row-major (the host forward pass's entry, without tensors).
    pub fn forward_rows_of(&self, xs: &[f32]) -> Result<Vec<f32>> {
        if !xs.len().is_multiple_of(self.k) {
            candle_core::bail!("matmul: {} inputs are not rows of {}", xs.len(), self.k);
        }
        Ok(self.multiply(xs, Kernel::detect()))
    }

    /// Rows of `k` activations times the matrix transposed, rows of blocks through
    /// `kernel`. Every path forms each output with the same float operations whatever
    /// the number of rows (batch invariance): the tile kernel one lane per weight row,
    /// one chain over the blocks; the row kernels one row at a time.
    fn multiply(&self, xs: &[f32], kernel: Kernel) -> Vec<f32> {
        let m = xs.len() / self.k;
        let xq = quantize_rows(xs);
        let mut out = vec![0f32; m * self.n];
        match &self.storage {
            Storage::Tiles(tiles) => self.forward_tiles(tiles, &xq, m, &mut out),
            Storage::Rows(blocks) => self.forward_rows(blocks, &xq, m, &mut out, kernel),
        }
        out
    }

    fn forward_tiles(&self, tiles: &[B::Tile], xq: &[BlockQ8], m: usize, out: &mut [f32]) {
        let (n, kb) = (self.n, self.k / QK);
        let chunks = m.div_ceil(ROW_CHUNK);
        let out_ptr = out.as_mut_ptr() as usize;
        let kernel = tile_kernel::<B>();
        // Work items: one group of 16 weight rows against one chunk of activation rows.
        candle_core::utils::barrier_pool().execute_chunked(n.div_ceil(TILE) * chunks, |items| {
            for item in items {
                let (group, chunk) = (item / chunks, item % chunks);
                let r0 = chunk * ROW_CHUNK;
                let rows = (m - r0).min(ROW_CHUNK);
                #[cfg(target_arch = "x86_64")]
                // SAFETY: tiles exist only where tile_kernel() found one this CPU runs;
                // each (row, column) of `out` is written by exactly one item, and the
                // kernel writes only the columns below n.
                unsafe {
                    let (t, x) = (
                        &tiles[group * kb..(group + 1) * kb],
                        &xq[r0 * kb..(r0 + rows) * kb],
                    );
                    let out = (out_ptr as *mut f32).add(r0 * n);
                    match kernel {
                        Some(TileKernel::Avx512) => {
                            avx512::tile_rows::<B>(t, x, rows, out, n, group * TILE)
                        }
                        _ => avx2::tile_rows::<B>(t, x, rows, out, n, group * TILE),
                    }
                };
                #[cfg(not(target_arch = "x86_64"))]
                let _ = (tiles, xq, rows, out_ptr, r0, group, kb, kernel);
            }
        });
    }

    fn forward_rows(
        &self,
        blocks: &[B],
        xq: &[BlockQ8],
        m: usize,
        out: &mut [f32],
        kernel: Kernel,
    ) {
        let (n, kb) = (self.n, self.k / QK);
        let out_ptr = out.as_mut_ptr() as usize;
        // Work items: one chunk of activation rows (in L2) against a group of 8 weight
        // rows, chunk after chunk (see the K-quant kernels' multiply_rows).
        const ROWS: usize = 8;
        let chunk = super::act_chunk_rows(kb * std::mem::size_of::<BlockQ8>(), m, 4);
        let groups = n.div_ceil(ROWS);
        candle_core::utils::barrier_pool().execute_chunked(m.div_ceil(chunk) * groups, |items| {
            for item in items {
                let (c, group) = (item / groups, item % groups);
                let end = m.min((c + 1) * chunk);
                for j in group * ROWS..((group + 1) * ROWS).min(n) {
                    let w = &blocks[j * kb..(j + 1) * kb];
                    let mut r = c * chunk;
                    while r < end {
                        let rows = (end - r).min(4);
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
    }
}

/// Which tile kernel this CPU runs for format `B`, if any (else rows of blocks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TileKernel {
    /// AVX-512 F, BW and VNNI: `vpdpbusd`, 16 weight rows a register.
    Avx512,
    /// AVX2, FMA and F16C: `vpmaddubsw`, 8 weight rows a register ([`WeightBlock::AVX2_TILES`]).
    Avx2,
}

pub(crate) fn tile_kernel<B: WeightBlock>() -> Option<TileKernel> {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
        {
            return Some(TileKernel::Avx512);
        }
        if B::AVX2_TILES
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            return Some(TileKernel::Avx2);
        }
    }
    None
}

/// Interleaves rows of blocks into tiles of 16 rows; rows past `n` are zero.
fn pack_tiles<B: WeightBlock>(blocks: &[B], n: usize, kb: usize) -> Vec<B::Tile> {
    let groups = n.div_ceil(TILE);
    // SAFETY: tiles are plain data, all zeroes valid.
    let mut tiles: Vec<B::Tile> = unsafe { zeroed_plain(groups * kb) };
    for group in 0..groups {
        for b in 0..kb {
            let rows: [Option<&B>; TILE] = std::array::from_fn(|r| {
                let row = group * TILE + r;
                (row < n).then(|| &blocks[row * kb + b])
            });
            tiles[group * kb + b] = B::pack_tile(&rows);
        }
    }
    tiles
}

/// Quantizes rows of f32 activations (a whole number of blocks) to 8-bit blocks.
fn quantize_rows(xs: &[f32]) -> Vec<BlockQ8> {
    xs.chunks_exact(QK).map(quantize_block).collect()
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

/// The kernels for rows of blocks (CPUs without AVX-512 VNNI).
#[derive(Clone, Copy, Debug)]
enum Kernel {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Kernel {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            return Kernel::Avx2;
        }
        Kernel::Scalar
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
    use super::{BlockQ5, BlockQ8, Tile, TileQ5, WeightBlock, QK, TILE};
    use core::arch::x86_64::*;

    /// Rows 8h..8h + 8 of a Q5_0 tile as 8 registers of weights + 16 (unsigned bytes,
    /// 0..=31): nibbles, plus 16 where the fifth bit is set.
    #[inline(always)]
    pub(super) unsafe fn unpack_q5_half(t: &TileQ5, h: usize) -> [__m256i; 8] {
        let low = _mm256_set1_epi8(0x0f);
        let fifth = _mm256_set1_epi8(0x10);
        // Byte i of the register takes bit i of its 32-bit mask.
        let spread = _mm256_set_epi64x(
            0x0303030303030303,
            0x0202020202020202,
            0x0101010101010101,
            0x0000000000000000,
        );
        let bit = _mm256_set1_epi64x(0x8040201008040201u64 as i64);
        std::array::from_fn(|g| {
            let v = _mm256_loadu_si256(t.qs[g % 4][32 * h..].as_ptr() as *const __m256i);
            let v = if g < 4 { v } else { _mm256_srli_epi16(v, 4) };
            let v = _mm256_and_si256(v, low);
            let mask = _mm256_set1_epi32((t.qh[g] >> (32 * h)) as u32 as i32);
            let set = _mm256_and_si256(_mm256_shuffle_epi8(mask, spread), bit);
            let set = _mm256_cmpeq_epi8(set, bit);
            _mm256_or_si256(v, _mm256_and_si256(set, fifth))
        })
    }

    /// [`super::avx512::tile_rows`] with AVX2, a half tile (8 weight rows) at a time:
    /// one `vpmaddubsw` multiplies 4 weights of 8 rows by 4 broadcast activations; four
    /// of them add up in 16 bits (at most 4·2·31·127 < 2^15 for [`WeightBlock::AVX2_TILES`]
    /// formats), then one `vpmaddwd` widens. Each output sees the AVX-512 kernel's float
    /// operations, so both give the same bits.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn tile_rows<B: WeightBlock>(
        tiles: &[B::Tile],
        x: &[BlockQ8],
        rows: usize,
        out: *mut f32,
        n: usize,
        col0: usize,
    ) {
        let kb = tiles.len();
        let ones = _mm256_set1_epi16(1);
        for h in 0..2 {
            let c0 = col0 + 8 * h;
            if c0 >= n {
                break;
            }
            let mut acc = [_mm256_setzero_ps(); super::ROW_CHUNK];
            let acc = &mut acc[..rows];
            for (b, tile) in tiles.iter().enumerate() {
                let w = tile.unpack_half(h);
                let d = tile.scales()[8 * h..].as_ptr() as *const __m128i;
                let dw = _mm256_cvtph_ps(_mm_loadu_si128(d));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let xb = x.get_unchecked(r * kb + b);
                    let xs = xb.qs.as_ptr() as *const i32;
                    let act = |g: usize| _mm256_set1_epi32(std::ptr::read_unaligned(xs.add(g)));
                    let mut s = _mm256_set1_epi32(-B::OFFSET * xb.sum);
                    for quad in 0..QK / 16 {
                        let g = 4 * quad;
                        let p01 = _mm256_add_epi16(
                            _mm256_maddubs_epi16(w[g], act(g)),
                            _mm256_maddubs_epi16(w[g + 1], act(g + 1)),
                        );
                        let p23 = _mm256_add_epi16(
                            _mm256_maddubs_epi16(w[g + 2], act(g + 2)),
                            _mm256_maddubs_epi16(w[g + 3], act(g + 3)),
                        );
                        let p = _mm256_madd_epi16(_mm256_add_epi16(p01, p23), ones);
                        s = _mm256_add_epi32(s, p);
                    }
                    let s = _mm256_cvtepi32_ps(s);
                    *acc = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_set1_ps(xb.d)), s, *acc);
                }
            }
            let cols = (n - c0).min(TILE / 2);
            for (r, acc) in acc.iter().enumerate() {
                let mut v = [0f32; 8];
                _mm256_storeu_ps(v.as_mut_ptr(), *acc);
                std::ptr::copy_nonoverlapping(v.as_ptr(), out.add(r * n + c0), cols);
            }
        }
    }

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

    /// Runs `step` over the blocks in two interleaved accumulator chains, so one block's
    /// unpacking overlaps the other's arithmetic; returns their sum. Even blocks go to
    /// the first chain, odd ones to the second, as in [`dot_rows`].
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

    /// [`dot_row`] for up to four activation rows at once, each weight block unpacked
    /// once: each row's sum is formed with [`dot_row`]'s float operations (even and
    /// odd blocks in two chains, added, then [`hsum`]), so a row's bits do not depend
    /// on how many rows share the call.
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
        let step = |i: usize, sums: &mut [__m256; 4]| {
            let wb = w.get_unchecked(i);
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
        };
        let mut s0 = [_mm256_setzero_ps(); 4];
        let mut s1 = [_mm256_setzero_ps(); 4];
        for i in 0..w.len() / 2 {
            step(2 * i, &mut s0);
            step(2 * i + 1, &mut s1);
        }
        if w.len() % 2 == 1 {
            step(w.len() - 1, &mut s0);
        }
        for r in 0..rows {
            acc[r] = hsum(_mm256_add_ps(s0[r], s1[r]));
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{BlockQ8, Tile, TileQ5, WeightBlock, QK, TILE};
    use core::arch::x86_64::*;

    /// The 8 registers of a Q5_0 tile: nibbles, plus 16 where the fifth bit is set.
    #[inline(always)]
    pub(super) unsafe fn unpack_q5(t: &TileQ5) -> [__m512i; 8] {
        let low = _mm512_set1_epi8(0x0f);
        let fifth = _mm512_set1_epi8(0x10);
        std::array::from_fn(|g| {
            let v = _mm512_loadu_si512(t.qs[g % 4].as_ptr() as *const _);
            let v = if g < 4 { v } else { _mm512_srli_epi16(v, 4) };
            let v = _mm512_and_si512(v, low);
            _mm512_mask_add_epi8(v, t.qh[g], v, fifth)
        })
    }

    /// One group of 16 weight rows (`tiles`: its kb tiles) against `rows` activation
    /// rows (`x`: kb blocks each): writes out[r * n + col0 + c] for the columns c of the
    /// group below n.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn tile_rows<B: WeightBlock>(
        tiles: &[B::Tile],
        x: &[BlockQ8],
        rows: usize,
        out: *mut f32,
        n: usize,
        col0: usize,
    ) {
        let kb = tiles.len();
        let mut acc = [_mm512_setzero_ps(); super::ROW_CHUNK];
        let acc = &mut acc[..rows];
        for (b, tile) in tiles.iter().enumerate() {
            let w = tile.unpack();
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(tile.scales().as_ptr() as *const _));
            for (r, acc) in acc.iter_mut().enumerate() {
                let xb = x.get_unchecked(r * kb + b);
                let xs = xb.qs.as_ptr() as *const i32;
                let act = |g: usize| _mm512_set1_epi32(std::ptr::read_unaligned(xs.add(g)));
                // The offset's share, offset·Σx, starts the first chain negative; two
                // chains halve the dependency on dpbusd's latency.
                let mut s0 = _mm512_set1_epi32(-B::OFFSET * xb.sum);
                let mut s1 = _mm512_setzero_si512();
                for g in (0..QK / 4).step_by(2) {
                    s0 = _mm512_dpbusd_epi32(s0, w[g], act(g));
                    s1 = _mm512_dpbusd_epi32(s1, w[g + 1], act(g + 1));
                }
                let s = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));
                *acc = _mm512_fmadd_ps(_mm512_mul_ps(dw, _mm512_set1_ps(xb.d)), s, *acc);
            }
        }
        let cols = (n - col0).min(TILE);
        let mask: __mmask16 = if cols == TILE { !0 } else { (1 << cols) - 1 };
        for (r, acc) in acc.iter().enumerate() {
            _mm512_mask_storeu_ps(out.add(r * n + col0), mask, *acc);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::synthetic::{SyntheticWeights, TensorSpec};
    use crate::model::weights::WeightSource;
    use candle_core::quantized::{GgmlDType, QMatMul};
    use candle_core::Module;

    /// Every row kernel this CPU can run, the scalar one first.
    fn row_kernels() -> Vec<Kernel> {
        let mut k = vec![Kernel::Scalar];
        #[cfg(target_arch = "x86_64")]
        if matches!(Kernel::detect(), Kernel::Avx2) {
            k.push(Kernel::Avx2);
        }
        k
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> (f32, f32) {
        let scale = a.abs().unwrap().max_all().unwrap();
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        (
            diff.to_scalar::<f32>().unwrap(),
            scale.to_scalar::<f32>().unwrap(),
        )
    }

    fn check<B: WeightBlock>(dtype: GgmlDType) {
        // 77 rows: the last tile is part padding.
        let (n, k) = (77, 896);
        let spec = TensorSpec {
            name: "w".into(),
            dims: vec![n, k],
            dtype,
        };
        let src = SyntheticWeights::single(spec, 9);
        let candle = QMatMul::from_qtensor(src.tensor("w", &Device::Cpu).unwrap()).unwrap();
        let read = BlockMatrix::<B>::read("w", n, k, |dst| src.read_raw("w", dst)).unwrap();
        let rows = match &read.storage {
            Storage::Rows(blocks) => blocks.clone(),
            Storage::Tiles(_) => {
                let mut blocks: Vec<B> = unsafe { zeroed_plain(n * k / QK) };
                src.read_raw("w", unsafe { as_bytes_mut(&mut blocks) })
                    .unwrap();
                blocks
            }
        };
        let mut layouts = vec![("rows", BlockMatrix::from_rows(rows.clone(), n, k, false))];
        if tile_kernel::<B>().is_some() {
            layouts.push(("tiles", BlockMatrix::from_rows(rows.clone(), n, k, true)));
        }
        // The whole matmul in each layout against candle's kernel for the format, at
        // decode and prefill sizes (40 rows: more than one chunk of the tile kernel).
        for m in [1usize, 3, 9, 40] {
            let x = Tensor::randn(0f32, 1f32, (1, m, k), &Device::Cpu).unwrap();
            let want = candle.forward(&x).unwrap();
            for (name, ours) in &layouts {
                let got = ours.forward(&x).unwrap();
                assert_eq!(want.dims(), got.dims());
                let (diff, scale) = max_diff(&want, &got);
                assert!(
                    diff <= 1e-4 * scale,
                    "{dtype:?} {name} m={m}: {diff} vs {scale}"
                );
            }
        }
        // Each row kernel against the scalar one, one row and four rows at a time.
        let kb = k / QK;
        let x: Vec<f32> = Tensor::randn(0f32, 1f32, 4 * k, &Device::Cpu)
            .unwrap()
            .to_vec1()
            .unwrap();
        let xq = quantize_rows(&x);
        let w = &rows[..kb];
        let mut want = [0f32; 4];
        Kernel::Scalar.dot(w, &xq, kb, 4, &mut want);
        assert!(want.iter().all(|v| *v != 0.0));
        for kernel in row_kernels() {
            for n_rows in [1, 4] {
                let mut got = [0f32; 4];
                kernel.dot(w, &xq, kb, n_rows, &mut got);
                for r in 0..n_rows {
                    let tol = 1e-4 * want[r].abs().max(1.0);
                    assert!(
                        (got[r] - want[r]).abs() <= tol,
                        "{dtype:?} {n_rows} rows: {got:?} vs {want:?}"
                    );
                }
            }
        }
    }

    /// Activation row counts of the invariance tests: decode, partial and full passes of
    /// four rows, more than one chunk of the tile kernel.
    const BATCHES: [usize; 11] = [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 33];

    /// Each (weight row, activation row) output has the same bits whatever else shares
    /// the call: rows 0..m of the same activations, for each m of [`BATCHES`], against
    /// each row alone, in rows (with every row kernel) and tiles.
    fn check_batch_invariance<B: WeightBlock>(dtype: GgmlDType, n: usize, k: usize) {
        let spec = TensorSpec {
            name: "w".into(),
            dims: vec![n, k],
            dtype,
        };
        let src = SyntheticWeights::single(spec, 3);
        // SAFETY: the block types are plain data.
        let mut blocks: Vec<B> = unsafe { zeroed_plain(n * k / QK) };
        src.read_raw("w", unsafe { as_bytes_mut(&mut blocks) })
            .unwrap();
        let mut layouts: Vec<(&str, BlockMatrix<B>, Kernel)> = row_kernels()
            .into_iter()
            .map(|kernel| {
                (
                    "rows",
                    BlockMatrix::from_rows(blocks.clone(), n, k, false),
                    kernel,
                )
            })
            .collect();
        if tile_kernel::<B>().is_some() {
            let tiles = BlockMatrix::from_rows(blocks.clone(), n, k, true);
            layouts.push(("tiles", tiles, Kernel::Scalar));
        }
        let rows = *BATCHES.last().unwrap();
        let x = super::super::invariance_rows(rows, k, 7);
        for (name, w, kernel) in &layouts {
            let alone: Vec<Vec<f32>> = (0..rows)
                .map(|r| w.multiply(&x[r * k..(r + 1) * k], *kernel))
                .collect();
            assert!(alone[0].iter().any(|v| *v != 0.0));
            for m in BATCHES {
                let got = w.multiply(&x[..m * k], *kernel);
                for (r, want) in alone.iter().enumerate().take(m) {
                    for (j, (g, w)) in got[r * n..(r + 1) * n].iter().zip(want).enumerate() {
                        assert_eq!(
                            g.to_bits(),
                            w.to_bits(),
                            "{dtype:?} {n}x{k} {name} {kernel:?} m={m}: row {r} output {j} {g} but alone {w}"
                        );
                    }
                }
            }
        }
    }

    /// The 0.5B's ffn_up and gate (Q5_0), its attn_v and a matrix whose rows leave a
    /// partial tile (Q8_0).
    #[test]
    fn q5_0_outputs_do_not_depend_on_the_batch() {
        check_batch_invariance::<BlockQ5>(GgmlDType::Q5_0, 4864, 896);
        check_batch_invariance::<BlockQ5>(GgmlDType::Q5_0, 77, 4864 + 32);
    }

    #[test]
    fn q8_0_outputs_do_not_depend_on_the_batch() {
        check_batch_invariance::<BlockQ8_0>(GgmlDType::Q8_0, 128, 896);
        check_batch_invariance::<BlockQ8_0>(GgmlDType::Q8_0, 77, 896 + 32);
    }

    #[test]
    fn q5_0_matches_candle_in_rows_and_tiles_and_every_kernel_the_scalar_one() {
        check::<BlockQ5>(GgmlDType::Q5_0);
    }

    #[test]
    fn q8_0_matches_candle_in_rows_and_tiles_and_every_kernel_the_scalar_one() {
        check::<BlockQ8_0>(GgmlDType::Q8_0);
    }
}
