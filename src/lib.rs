//! wgllm: run Hugging Face LLM checkpoints on any GPU through wgpu and WGSL,
//! and verify every layer against a CPU reference and PyTorch.

pub mod cli;
pub mod compare;
pub mod config;
pub mod error;
pub mod gpu;
pub mod loader;
pub mod ops;
pub mod taps;
pub mod tensor;

#[cfg(test)]
pub(crate) mod testutil;

pub use error::{Error, Result};
pub use gpu::{Gpu, GpuOptions};
