//! duet: serve local Qwen2.5-Coder models in-process with candle, each pinned to its own
//! device, behind the Ollama API.

pub mod api;
pub mod bench;
pub mod client;
pub mod config;
pub mod device_check;
pub mod fetch;
pub mod hub;
pub mod keep_alive;
pub mod kernels;
pub mod layout;
pub mod metrics;
pub mod model;
pub mod repl;
pub mod router;
pub mod serve;
pub mod serving;
