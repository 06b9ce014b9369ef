//! The engine's hot paths on the CPU, with the shapes of Qwen2.5-Coder-1.5B (generated
//! weights in the real formats, so no model file is needed):
//! quantized matmuls as decode (1 row) and prefill (128 rows) run them, one decode
//! attention step over a 256-position cache, and a whole decode step of the model.
//! Run with `cargo bench --bench engine` (threads: CANDLE_NUM_THREADS, default all cores).

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use duet::model::qwen2::{attend, linear, Qwen2};
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
    let cpu = Device::Cpu;
    // The 1.5B: 12 query heads, 2 key/value heads of 128; 256 positions cached.
    let q = Tensor::randn(0f32, 1f32, (1, 12, 1, 128), &cpu).unwrap();
    let k = Tensor::randn(0f32, 1f32, (1, 2, 1, 128), &cpu).unwrap();
    let v = Tensor::randn(0f32, 1f32, (1, 2, 1, 128), &cpu).unwrap();
    // The CPU cache holds f16 (what duet allocates there).
    let half = |t: Tensor| t.to_dtype(candle_core::DType::F16).unwrap();
    let cache = (
        half(Tensor::randn(0f32, 1f32, (1, 2, 512, 128), &cpu).unwrap()),
        half(Tensor::randn(0f32, 1f32, (1, 2, 512, 128), &cpu).unwrap()),
    );
    let neg_inf = Tensor::new(f32::NEG_INFINITY, &cpu).unwrap();
    c.bench_function("attention decode step (12/2 heads, 256 cached)", |b| {
        b.iter(|| black_box(attend(&q, &k, &v, &cache, 255, None, &neg_inf).unwrap()))
    });
}

fn decode_step(c: &mut Criterion) {
    let cpu = Device::Cpu;
    let shape = Shape::Coder1_5bQ4KM;
    let model = Qwen2::load(&SyntheticWeights::new(shape, 1), &shape.info(), &cpu).unwrap();
    let mut cache = model.new_cache(256);
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
