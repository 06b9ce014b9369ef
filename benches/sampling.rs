//! The per-token cost outside the model: sampling from Qwen's 151,936 logits with
//! Ollama's default chain, and greedy argmax. Run with `cargo bench --bench sampling`.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use duet::serving::sampling::{argmax, Options, Sampler};
use rand::{Rng, SeedableRng};

const VOCAB: usize = 151_936;

fn logits() -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    (0..VOCAB).map(|_| rng.random_range(-10.0..10.0)).collect()
}

fn bench(c: &mut Criterion) {
    let base = logits();
    let history: Vec<u32> = (0..64).map(|i| i * 97).collect();
    let mut sampler = Sampler::new(&Options {
        seed: 1,
        ..Options::default()
    });
    c.bench_function("sample ollama defaults (152k vocab)", |b| {
        b.iter(|| {
            let mut l = base.clone();
            black_box(sampler.sample(&mut l, &history))
        })
    });
    c.bench_function("greedy argmax (152k vocab)", |b| {
        b.iter(|| black_box(argmax(black_box(&base))))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
