//! GPU kernels. Each op is a Rust wrapper plus a WGSL file in `shaders/`, with
//! its plain-Rust CPU reference and its GPU-vs-CPU tests in the same module.

pub mod argmax;
pub mod attention;
pub mod elementwise;
pub mod embedding;
pub mod fused;
pub mod kv_copy;
pub mod matmul;
pub mod qmatmul;
pub mod rmsnorm;
pub mod rope;
pub mod sample;
pub mod sample_full;
