//! The model: a GGUF file becomes a [`Model`] (weights on one device, the tokenizer and
//! chat template from the file's metadata, the grammar engine over its vocabulary), and
//! the embedding model. Serving it (generation, sampling, workers) is `crate::serving`;
//! the CPU kernels its matrices run on are `crate::kernels`.

pub mod embed;
pub mod gguf;
pub mod grammar;
pub mod qwen2;
pub mod synthetic;
pub mod template;
pub mod tokenizer;
pub mod weights;

pub use gguf::{GgufError, GgufFile, ModelInfo};
pub use template::{ChatTemplate, Message};
pub use tokenizer::TextCodec;

use crate::config::DeviceSpec;
use candle_core::Device;
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Tokenizer(#[from] tokenizer::TokenizerError),
    #[error(transparent)]
    Template(#[from] template::TemplateError),
    /// An option out of range (the sampler's message).
    #[error("{0}")]
    Option(String),
    #[error("device {device} is not available: {message}")]
    Device { device: DeviceSpec, message: String },
    #[error("cannot load the weights of {path}: {message}")]
    Load { path: String, message: String },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("{0}")]
    Grammar(String),
    #[error("inference failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Creates the candle device for a device spec. CPU devices share candle's CPU backend;
/// a CUDA device fails clearly when CUDA is not compiled in or the GPU does not exist.
pub fn create_device(spec: DeviceSpec) -> Result<Device, EngineError> {
    match spec {
        DeviceSpec::Cpu(_) => Ok(Device::Cpu),
        DeviceSpec::Cuda(n) => {
            if !cfg!(feature = "cuda") {
                return Err(EngineError::Device {
                    device: spec,
                    message: "this duet binary was built without CUDA (build with --features cuda)"
                        .into(),
                });
            }
            let device = Device::new_cuda(n).map_err(|e| EngineError::Device {
                device: spec,
                message: e.to_string(),
            })?;
            check_cuda_device(&device).map_err(|message| EngineError::Device {
                device: spec,
                message,
            })?;
            Ok(device)
        }
    }
}

/// Compute capability the CUDA kernels of this binary were compiled for
/// (`CUDA_COMPUTE_CAP` at build time, e.g. 90).
pub fn built_compute_cap() -> Option<u32> {
    option_env!("CUDA_COMPUTE_CAP").and_then(|s| s.trim().parse().ok())
}

/// Oldest compute capability candle's quantized CUDA kernels run on (they use dp4a).
pub const MIN_COMPUTE_CAP: u32 = 61;

/// Why a GPU of compute capability `major.minor` cannot run this binary's kernels, if it
/// cannot: older than candle's quantized kernels support, or of another architecture than
/// the one compiled in (its kernels are machine code for exactly that architecture).
pub fn compute_cap_problem(
    name: &str,
    (major, minor): (u32, u32),
    built: Option<u32>,
) -> Option<String> {
    let have = major * 10 + minor;
    if have < MIN_COMPUTE_CAP {
        return Some(format!(
            "{name} has compute capability {major}.{minor}; duet's quantized CUDA kernels need \
             {}.{} or newer (run its models on a CPU device instead)",
            MIN_COMPUTE_CAP / 10,
            MIN_COMPUTE_CAP % 10
        ));
    }
    let built = built?;
    if major != built / 10 || minor < built % 10 {
        return Some(format!(
            "{name} has compute capability {major}.{minor} but this binary's CUDA kernels are \
             compiled for {}.{}: rebuild with CUDA_COMPUTE_CAP={have} scripts/build-cuda",
            built / 10,
            built % 10
        ));
    }
    None
}

#[cfg(feature = "cuda")]
fn check_cuda_device(device: &Device) -> Result<(), String> {
    let Device::Cuda(cuda) = device else {
        return Ok(());
    };
    let stream = cuda.cuda_stream();
    let ctx = stream.context();
    let (major, minor) = ctx
        .compute_capability()
        .map_err(|e| format!("cannot read its compute capability: {e}"))?;
    let name = ctx.name().unwrap_or_else(|_| "the GPU".into());
    if let Some(problem) =
        compute_cap_problem(&name, (major as u32, minor as u32), built_compute_cap())
    {
        return Err(problem);
    }
    keep_freed_memory(ctx.cu_device())
}

/// Lets the device's memory pool keep what is freed. candle allocates every result from
/// it (cuMemAllocAsync) and frees it on the stream; with the pool's default release
/// threshold of 0 the driver hands all of it back at every synchronisation, once per
/// generated token, and takes it again for the next token's hundreds of allocations.
#[cfg(feature = "cuda")]
fn keep_freed_memory(
    device: candle_core::cuda_backend::cudarc::driver::sys::CUdevice,
) -> Result<(), String> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let check = |what: &str, r: sys::CUresult| match r {
        sys::CUresult::CUDA_SUCCESS => Ok(()),
        e => Err(format!("cannot set up its memory pool ({what}: {e:?})")),
    };
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: the context is current on this thread (candle bound it when creating the
    // device); both calls only write the out-parameters given.
    unsafe {
        check(
            "default pool",
            sys::cuDeviceGetDefaultMemPool(&mut pool, device),
        )?;
        check(
            "release threshold",
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut threshold as *mut u64 as *mut std::ffi::c_void,
            ),
        )
    }
}

#[cfg(not(feature = "cuda"))]
fn check_cuda_device(_: &Device) -> Result<(), String> {
    Ok(())
}

/// A loaded model on its device.
pub struct Model {
    pub name: String,
    pub device: DeviceSpec,
    pub info: ModelInfo,
    pub codec: TextCodec,
    pub template: ChatTemplate,
    pub weights: qwen2::Qwen2,
    pub load_duration: Duration,
    /// The grammar compiler over this model's vocabulary, built on first use.
    grammars: std::sync::OnceLock<Result<grammar::Grammars, String>>,
}

impl Model {
    /// Opens, checks and loads a GGUF file onto a device of its own.
    pub fn load(name: &str, path: &Path, device: DeviceSpec) -> Result<Self, EngineError> {
        let dev = create_device(device)?;
        Self::load_on(name, path, device, &dev)
    }

    /// Opens, checks and loads a GGUF file onto `dev`, the device `spec` names (a worker
    /// creates its device once and loads every model placed on it there).
    pub fn load_on(
        name: &str,
        path: &Path,
        device: DeviceSpec,
        dev: &Device,
    ) -> Result<Self, EngineError> {
        let start = Instant::now();
        let gguf = GgufFile::open(path)?;
        let info = gguf.info()?;
        let template =
            ChatTemplate::new(info.chat_template.as_deref().unwrap_or(template::CHATML))?;
        // The tokenizer (151k merges to index) builds on a helper thread while this one,
        // the device's, reads the weights.
        let (codec, weights) = std::thread::scope(|s| {
            let codec = s.spawn(|| TextCodec::load(&gguf));
            let weights = qwen2::Qwen2::load(&gguf, &info, dev);
            (codec.join(), weights)
        });
        let codec = codec.map_err(|_| EngineError::Load {
            path: path.display().to_string(),
            message: "the tokenizer build panicked".into(),
        })??;
        let weights = weights.map_err(|e| EngineError::Load {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Ok(Self {
            name: name.to_string(),
            device,
            info,
            codec,
            template,
            weights,
            load_duration: start.elapsed(),
            grammars: std::sync::OnceLock::new(),
        })
    }

    /// A model of a real shape with generated weights and a placeholder vocabulary
    /// (`duet bench --dummy-weights`): it computes exactly what the real model computes
    /// per token, but its text is noise.
    pub fn synthetic(
        shape: synthetic::Shape,
        device: DeviceSpec,
        dev: &Device,
    ) -> Result<Self, EngineError> {
        let start = Instant::now();
        let info = shape.info();
        let source = synthetic::SyntheticWeights::new(shape, 0x5eed);
        let weights = qwen2::Qwen2::load(&source, &info, dev).map_err(|e| EngineError::Load {
            path: info.path.display().to_string(),
            message: e.to_string(),
        })?;
        Ok(Self {
            name: shape.model_name(),
            device,
            codec: TextCodec::placeholder(info.vocab_size)?,
            template: ChatTemplate::new(template::CHATML)?,
            info,
            weights,
            load_duration: start.elapsed(),
            grammars: std::sync::OnceLock::new(),
        })
    }

    /// Renders a conversation with the model's chat template, ready for the answer.
    pub fn render_chat(&self, messages: &[Message]) -> Result<String, EngineError> {
        Ok(self.template.render(messages, true)?)
    }

    /// As [`render_chat`](Self::render_chat), with tools the model may call.
    pub fn render_chat_with_tools(
        &self,
        messages: &[Message],
        tools: Option<&[serde_json::Value]>,
    ) -> Result<String, EngineError> {
        Ok(self.template.render_with_tools(messages, tools, true)?)
    }

    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        Ok(self.codec.encode(text)?)
    }

    /// The constraint that keeps one generation's output to `format`.
    pub fn constraint(&self, format: &grammar::Format) -> Result<grammar::Constraint, EngineError> {
        let grammars = self
            .grammars
            .get_or_init(|| grammar::Grammars::new(&self.codec, self.info.vocab_size))
            .as_ref()
            .map_err(|e| EngineError::Grammar(format!("cannot build the grammar engine: {e}")))?;
        grammars.constraint(format).map_err(EngineError::Grammar)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_or_foreign_gpus_are_refused_with_the_fix() {
        // The seed box's Quadro M4000.
        let m4000 = compute_cap_problem("Quadro M4000", (5, 2), Some(90)).unwrap();
        assert!(
            m4000.contains("compute capability 5.2") && m4000.contains("6.1 or newer"),
            "{m4000}"
        );
        // An RTX 4080 SUPER running an H100 build.
        let ada = compute_cap_problem("RTX 4080 SUPER", (8, 9), Some(90)).unwrap();
        assert!(ada.contains("CUDA_COMPUTE_CAP=89"), "{ada}");
        assert_eq!(compute_cap_problem("H100", (9, 0), Some(90)), None);
        assert_eq!(
            compute_cap_problem("RTX 4080 SUPER", (8, 9), Some(89)),
            None
        );
        // sm_86 machine code runs on 8.9; 8.9 code does not run on 8.6.
        assert_eq!(compute_cap_problem("RTX 4090", (8, 9), Some(86)), None);
        assert!(compute_cap_problem("RTX 3090", (8, 6), Some(89)).is_some());
    }
}
