//! `duet device-check`: runs the candle operations the model uses on a device and
//! compares each result with the CPU's on the same random inputs, then a whole forward
//! pass of generated 1.5B-shaped weights. It is how a GPU build is checked on the GPU
//! machine (scripts/gpu-check.sh); against `cpu:N` it only exercises the command.

use crate::config::DeviceSpec;
use crate::model::create_device;
use crate::model::qwen2::{linear, Qwen2, WeightSource};
use crate::model::synthetic::{Shape, SyntheticWeights, TensorSpec};
use anyhow::Result;
use candle_core::quantized::{GgmlDType, QMatMul};
use candle_core::{DType, Device, Module, Tensor};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    /// max |device - cpu| / max |cpu|
    pub relative_error: f64,
    pub tolerance: f64,
    pub passed: bool,
    pub error: Option<String>,
}

fn compare(name: String, tolerance: f64, got: Result<(Tensor, Tensor)>) -> Check {
    let measured = got.and_then(|(cpu, dev)| {
        let cpu = cpu.to_dtype(DType::F32)?.flatten_all()?;
        let dev = dev
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?;
        let scale = cpu.abs()?.max(0)?.to_scalar::<f32>()? as f64;
        let diff = (cpu - dev)?.abs()?.max(0)?.to_scalar::<f32>()? as f64;
        Ok(diff / scale.max(1e-12))
    });
    match measured {
        Ok(e) => Check {
            name,
            relative_error: e,
            tolerance,
            passed: e.is_finite() && e <= tolerance,
            error: None,
        },
        Err(e) => Check {
            name,
            relative_error: f64::NAN,
            tolerance,
            passed: false,
            error: Some(e.to_string()),
        },
    }
}

/// Runs `f` on the CPU and on `dev` with the same inputs (made by `inputs` on the CPU and
/// copied over).
fn both(
    dev: &Device,
    inputs: &[Tensor],
    f: impl Fn(&[Tensor]) -> candle_core::Result<Tensor>,
) -> Result<(Tensor, Tensor)> {
    let cpu = f(inputs)?;
    let moved = inputs
        .iter()
        .map(|t| t.to_device(dev))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok((cpu, f(&moved)?))
}

fn randn(shape: &[usize]) -> candle_core::Result<Tensor> {
    Tensor::randn(0f32, 1f32, shape, &Device::Cpu)
}

/// Every check, in order. Quantized matmuls get a looser bound: the CPU and CUDA kernels
/// quantize the activations to 8 bits in different block formats.
pub fn run(spec: DeviceSpec) -> Result<Vec<Check>> {
    let dev = create_device(spec)?;
    let mut checks = Vec::new();
    // Quantized matmuls in the formats of the real files, as decode (1 row) and prefill.
    for (dtype, n, k) in [
        (GgmlDType::Q4K, 8960, 1536),
        (GgmlDType::Q6K, 256, 1536),
        (GgmlDType::Q8_0, 3584, 3584),
        (GgmlDType::Q5_0, 896, 896),
    ] {
        let spec = TensorSpec {
            name: "check".into(),
            dims: vec![n, k],
            dtype,
        };
        for m in [1usize, 7, 128] {
            let got = (|| -> Result<(Tensor, Tensor)> {
                let x = randn(&[1, m, k])?;
                let w = SyntheticWeights::single(spec.clone(), m as u64);
                let on_cpu = QMatMul::from_qtensor(w.tensor("check", &Device::Cpu)?)?;
                // The device side goes through the model's own loading path (on the CPU,
                // our tile or row kernels for Q5_0 and narrow Q8_0; the reference keeps
                // candle's kernels).
                let on_dev = linear(&w, "check", &dev)?;
                Ok((on_cpu.forward(&x)?, on_dev.forward(&x.to_device(&dev)?)?))
            })();
            checks.push(compare(
                format!("qmatmul {dtype:?} {m}x{k} · {k}x{n}"),
                3e-2,
                got,
            ));
        }
    }
    let exact = 1e-4;
    let t = |s: &[usize]| randn(s).map_err(anyhow::Error::from);
    checks.push(compare(
        "rms_norm 7x1536".into(),
        exact,
        (|| {
            both(&dev, &[t(&[7, 1536])?, t(&[1536])?], |x| {
                candle_nn::ops::rms_norm(&x[0], &x[1], 1e-6)
            })
        })(),
    ));
    checks.push(compare(
        "rope 1x12x7x128".into(),
        exact,
        (|| {
            both(
                &dev,
                &[t(&[1, 12, 7, 128])?, t(&[7, 64])?, t(&[7, 64])?],
                |x| candle_nn::rotary_emb::rope(&x[0], &x[1], &x[2]),
            )
        })(),
    ));
    checks.push(compare(
        "softmax_last_dim 2x6x300".into(),
        exact,
        (|| {
            both(&dev, &[t(&[1, 2, 6, 300])?], |x| {
                candle_nn::ops::softmax_last_dim(&x[0])
            })
        })(),
    ));
    checks.push(compare(
        "silu * up 7x8960".into(),
        exact,
        (|| {
            both(&dev, &[t(&[7, 8960])?, t(&[7, 8960])?], |x| {
                candle_nn::ops::silu(&x[0])? * &x[1]
            })
        })(),
    ));
    // Attention against a cache view: keys of 300 positions in a 512-position buffer.
    checks.push(compare(
        "attention q·kᵀ·v over a cache view".into(),
        exact,
        (|| {
            both(
                &dev,
                &[
                    t(&[1, 2, 6, 128])?,
                    t(&[1, 2, 512, 128])?,
                    t(&[1, 2, 512, 128])?,
                ],
                |x| {
                    let k = x[1].narrow(2, 0, 300)?;
                    let v = x[2].narrow(2, 0, 300)?;
                    let att = candle_nn::ops::softmax_last_dim(&(x[0].matmul(&k.t()?)? / 11.3)?)?;
                    att.matmul(&v)
                },
            )
        })(),
    ));
    checks.push(compare(
        "cache slice_set".into(),
        exact,
        (|| {
            both(&dev, &[t(&[1, 2, 16, 128])?, t(&[1, 2, 3, 128])?], |x| {
                let cache = x[0].copy()?;
                cache.slice_set(&x[1], 2, 5)?;
                Ok(cache)
            })
        })(),
    ));
    checks.push(compare(
        "causal mask where_cond".into(),
        exact,
        (|| {
            both(&dev, &[t(&[1, 2, 6, 7, 9])?], |x| {
                let mask = candle_transformers::utils::build_causal_mask(7, 2, x[0].device())?;
                let inf =
                    Tensor::new(f32::NEG_INFINITY, x[0].device())?.broadcast_as(x[0].shape())?;
                let masked = mask.broadcast_as(x[0].shape())?.where_cond(&inf, &x[0])?;
                candle_nn::ops::softmax_last_dim(&masked)
            })
        })(),
    ));
    checks.push(compare(
        "f16 round trip".into(),
        exact,
        (|| {
            both(&dev, &[t(&[4096])?], |x| {
                x[0].to_dtype(DType::F16)?.to_dtype(DType::F32)
            })
        })(),
    ));
    // The whole model: generated 1.5B Q4_K_M weights, a 16-token prefill then 4 decode
    // steps through the cache, logits compared at every step.
    let shape = Shape::Coder1_5bQ4KM;
    let info = shape.info();
    let model = |d: &Device| Qwen2::load(&SyntheticWeights::new(shape, 1), &info, d);
    let forward = (|| -> Result<Vec<(Tensor, Tensor)>> {
        let (cpu, gpu) = (model(&Device::Cpu)?, model(&dev)?);
        let (mut c1, mut c2) = (cpu.new_cache(32)?, gpu.new_cache(32)?);
        let prompt: Vec<u32> = (0..16).map(|i| 1000 + 37 * i).collect();
        let mut out = vec![(
            cpu.forward(&prompt, &mut c1)?,
            gpu.forward(&prompt, &mut c2)?,
        )];
        for step in 0..4u32 {
            let tok = [5000 + step];
            out.push((cpu.forward(&tok, &mut c1)?, gpu.forward(&tok, &mut c2)?));
        }
        Ok(out)
    })();
    match forward {
        Ok(steps) => {
            for (i, pair) in steps.into_iter().enumerate() {
                let what = if i == 0 {
                    "prefill 16".to_string()
                } else {
                    format!("decode step {i}")
                };
                checks.push(compare(
                    format!("generated 1.5B forward, {what}"),
                    5e-2,
                    Ok(pair),
                ));
            }
        }
        Err(e) => checks.push(compare("generated 1.5B forward".into(), 5e-2, Err(e))),
    }
    Ok(checks)
}

pub fn markdown(device: DeviceSpec, checks: &[Check]) -> String {
    let mut out = format!("duet device-check on {device} (each result against the CPU's)\n\n");
    out.push_str("| check | relative error | tolerance | result |\n|---|---|---|---|\n");
    for c in checks {
        let result = match &c.error {
            Some(e) => format!("FAILED: {e}"),
            None if c.passed => "ok".into(),
            None => "FAILED".into(),
        };
        out.push_str(&format!(
            "| {} | {:.2e} | {:.0e} | {} |\n",
            c.name, c.relative_error, c.tolerance, result
        ));
    }
    let failed = checks.iter().filter(|c| !c.passed).count();
    out.push_str(&format!("\n{} checks, {failed} failed\n", checks.len()));
    out
}
