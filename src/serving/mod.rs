//! Serving a model: one worker thread per device that loads, runs and unloads its
//! models (`worker.rs`), the generation of one sequence with Ollama's counts
//! (`generate.rs`), and Ollama's options and sampler (`sampling.rs`).

pub mod blocks;
pub mod generate;
pub mod mapping;
pub mod sampling;
pub mod scheduler;
pub mod sequence;
pub mod watch;
pub mod worker;

pub use generate::Generation;
pub use sampling::Options;
pub use sequence::{DoneReason, Logprob, Piece, Summary, TokenLogprob, MAX_TOP_LOGPROBS};
