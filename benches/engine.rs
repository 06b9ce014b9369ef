//! The engine's hot paths on the CPU, with the shapes of Qwen2.5-Coder-1.5B (generated
//! weights in the real formats, so no model file is needed):
//! quantized matmuls as decode (1 row) and prefill (128 rows) run them, one decode
//! attention step over a 256-position cache, and a whole decode step of the model.
//! Run with `cargo bench --bench engine` (threads: CANDLE_NUM_THREADS, default all cores).

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use duet::model::qwen2::{linear, Qwen2};
use duet::model::synthetic::{Shape, SyntheticWeights, TensorSpec};

fn qmatmul(c: &mut Criterion) {
    let cpu = Device::Cpu;
    // (format, outputs, inputs): the 1.5B's ffn_up (Q4_K), ffn_down (Q6_K on some layers),
    // the 0.5B's ffn_up (Q5_0) and the 7B's attn_q (Q8_0), each through the kernel `duet`
    // runs on this CPU (`weights::linear`).
    for (dtype, n, k) in [
        (GgmlDType::Q4K, 8960, 1536),
        (GgmlDType::Q6K, 1536, 8960),
        (GgmlDType::Q5_0, 4864, 896),
        (GgmlDType::Q8_0, 3584, 3584),
    ] {
        let spec = TensorSpec {
            name: "w".into(),
            dims: vec![n, k],
            dtype,
        };
        let w = linear(&SyntheticWeights::single(spec, 1), "w", &cpu).unwrap();
        for m in [1usize, 128] {
            let x = Tensor::randn(0f32, 1f32, (1, m, k), &cpu).unwrap();
            c.bench_function(&format!("qmatmul {dtype:?} {m}x{k} · {k}x{n}"), |b| {
                b.iter(|| black_box(w.forward(&x).unwrap()))
            });
        }
    }
}

fn attention(c: &mut Criterion) {
    use duet::kernels::attention::{paged, Paged, Row};
    use half::f16;
    // The 1.5B's heads over 256 cached positions in scattered blocks of 32: one decode
    // row, and eight sequences' decode rows in one call.
    let shape = Paged {
        heads: 12,
        kv_heads: 2,
        head_dim: 128,
        block_size: 32,
    };
    let n_blocks = 8 * 8;
    let fill = |seed: u32| -> Vec<f16> {
        (0..n_blocks * shape.block_len())
            .map(|i| {
                f16::from_f32(
                    ((i as u32).wrapping_mul(2654435761) ^ seed) as f32 / u32::MAX as f32 - 0.5,
                )
            })
            .collect()
    };
    let (k, v) = (fill(1), fill(2));
    let tables: Vec<Vec<u32>> = (0..8u32)
        .map(|s| (0..8).map(|b| b * 8 + s).collect())
        .collect();
    for n in [1usize, 8] {
        let rows: Vec<Row> = tables[..n]
            .iter()
            .map(|t| Row {
                len: 256,
                blocks: t,
            })
            .collect();
        let q = vec![0.1f32; n * 12 * 128];
        let mut out = vec![0f32; q.len()];
        c.bench_function(
            &format!("paged attention, {n} decode rows (12/2 heads, 256 cached)"),
            |b| b.iter(|| paged(black_box(&q), &rows, &k, &v, shape, &mut out)),
        );
    }
}

fn decode_step(c: &mut Criterion) {
    let cpu = Device::Cpu;
    let shape = Shape::Coder1_5bQ4KM;
    let model = Qwen2::load(&SyntheticWeights::new(shape, 1), &shape.info(), &cpu).unwrap();
    let mut cache = model.new_cache(256).unwrap();
    let prompt: Vec<u32> = (0..128).map(|i| 1000 + 7 * i).collect();
    model.forward(&prompt, &mut cache).unwrap();
    let mut group = c.benchmark_group("model");
    group.sample_size(20);
    group.bench_function("decode step, generated 1.5B Q4_K_M, 128 cached", |b| {
        b.iter(|| {
            cache.truncate(128);
            black_box(model.forward(&[4242], &mut cache).unwrap())
        })
    });
    group.finish();
}

criterion_group!(benches, qmatmul, attention, decode_step);
criterion_main!(benches);
