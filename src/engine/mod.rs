//! The inference engine: a GGUF file becomes a [`Model`] (weights on one device, the
//! tokenizer and chat template from the file's metadata) that produces [`Generation`]s.

pub mod generate;
pub mod gguf;
pub mod qwen2;
pub mod sampling;
pub mod template;
pub mod tokenizer;
pub mod worker;

pub use generate::{DoneReason, Generation, Piece, Summary};
pub use gguf::{GgufError, GgufFile, ModelInfo};
pub use sampling::Options;
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
    #[error(transparent)]
    Option(#[from] sampling::OptionError),
    #[error("device {device} is not available: {message}")]
    Device { device: DeviceSpec, message: String },
    #[error("cannot load the weights of {path}: {message}")]
    Load { path: String, message: String },
    #[error("the prompt is empty")]
    EmptyPrompt,
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
            Device::new_cuda(n).map_err(|e| EngineError::Device {
                device: spec,
                message: e.to_string(),
            })
        }
    }
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
}

impl Model {
    /// Opens, checks and loads a GGUF file onto `device`.
    pub fn load(name: &str, path: &Path, device: DeviceSpec) -> Result<Self, EngineError> {
        let start = Instant::now();
        let mut gguf = GgufFile::open(path)?;
        let info = gguf.info()?;
        let codec = TextCodec::load(&gguf)?;
        let template =
            ChatTemplate::new(info.chat_template.as_deref().unwrap_or(template::CHATML))?;
        let dev = create_device(device)?;
        let weights =
            qwen2::Qwen2::load(&mut gguf, &info, &dev).map_err(|e| EngineError::Load {
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
        })
    }

    /// Renders a conversation with the model's chat template, ready for the answer.
    pub fn render_chat(&self, messages: &[Message]) -> Result<String, EngineError> {
        Ok(self.template.render(messages, true)?)
    }

    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        Ok(self.codec.encode(text)?)
    }

    /// Starts generating after `prompt` (token ids). Nothing runs until it is iterated.
    pub fn generate(
        &self,
        prompt: Vec<u32>,
        opts: &Options,
    ) -> Result<Generation<'_>, EngineError> {
        Generation::new(self, prompt, opts)
    }
}
