//! wgllm: run Hugging Face LLM checkpoints on any GPU through wgpu and WGSL,
//! and verify every layer against a CPU reference and PyTorch.

#[cfg(not(target_arch = "wasm32"))]
pub mod bench;
pub mod chat;
#[cfg(not(target_arch = "wasm32"))]
pub mod cli;
pub mod compare;
pub mod config;
pub mod error;
#[cfg(not(target_arch = "wasm32"))]
pub mod fetch;
pub mod fuzzing;
pub mod generate;
pub mod gguf;
pub mod gpu;
pub mod loader;
pub mod model;
pub mod ops;
pub mod program;
pub mod qtensor;
pub mod reference;
pub mod sampling;
#[cfg(not(target_arch = "wasm32"))]
pub mod serve;
pub mod taps;
pub mod tensor;
pub mod tokenizer;
#[cfg(not(target_arch = "wasm32"))]
pub mod tune;
pub mod verify;

#[cfg(test)]
pub(crate) mod testutil;

pub use error::{Error, Result};
pub use gpu::{Gpu, GpuOptions};
