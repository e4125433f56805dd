//! Element-wise kernels: SwiGLU (`silu(gate) * up`) and the residual add.

use crate::error::Result;
use crate::gpu::{Gpu, Kernel};

pub const SRC: &str = include_str!("../../shaders/elementwise.wgsl");
const WG: u32 = 256;

#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Params {
    pub width: u32,
    pub _p: [u32; 3],
}

impl Params {
    pub fn new(width: usize) -> Self {
        Params {
            width: width as u32,
            _p: [0; 3],
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binary {
    /// `y = silu(a) * b` (a = gate_proj output, b = up_proj output).
    SwiGlu,
    /// `y = a + b`.
    Add,
}

/// A compiled element-wise kernel over `[n_tokens, width]` f32 tensors.
pub struct Elementwise {
    pub kernel: Kernel,
    pub op: Binary,
}

impl Elementwise {
    pub fn new(gpu: &Gpu, op: Binary) -> Result<Self> {
        let entry = match op {
            Binary::SwiGlu => "swiglu",
            Binary::Add => "add",
        };
        let kernel = gpu.kernel(entry, SRC, entry, &[("WG", WG as f64)])?;
        Ok(Elementwise { kernel, op })
    }

    /// Bindings: params, step, a, b, y (all `[n_tokens, width]` f32).
    pub fn bind(
        &self,
        gpu: &Gpu,
        params: &wgpu::Buffer,
        step: &wgpu::Buffer,
        a: &wgpu::Buffer,
        b: &wgpu::Buffer,
        y: &wgpu::Buffer,
    ) -> wgpu::BindGroup {
        gpu.bind(&self.kernel, &[params, step, a, b, y])
    }

    pub fn encode(
        &self,
        gpu: &Gpu,
        pass: &mut wgpu::ComputePass<'_>,
        bind: &wgpu::BindGroup,
        n_tokens: u32,
        width: usize,
    ) {
        let n = (n_tokens as usize * width).div_ceil(WG as usize) as u32;
        gpu.dispatch_in(pass, &self.kernel, bind, n);
    }
}

/// CPU reference for SwiGLU: `silu(g) * u` with `silu(g) = g / (1 + e^-g)`.
pub fn swiglu_reference(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.iter()
        .zip(up)
        .map(|(&g, &u)| (g as f64 / (1.0 + (-(g as f64)).exp()) * u as f64) as f32)
        .collect()
}

/// CPU reference for the residual add.
pub fn add_reference(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::Step;
    use crate::testutil::{assert_close, gpu, rand_vec};

    fn run(op: Binary, n: usize, width: usize, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let gpu = gpu();
        let a = rand_vec(n * width, 12.0, seed);
        let b = rand_vec(n * width, 3.0, seed + 1);
        let k = Elementwise::new(gpu, op).unwrap();
        let params = gpu.uniform("p", &Params::new(width)).unwrap();
        let step = gpu.uniform("step", &Step::new(n as u32, 0)).unwrap();
        let ab = gpu.storage_init("a", bytemuck::cast_slice(&a)).unwrap();
        let bb = gpu.storage_init("b", bytemuck::cast_slice(&b)).unwrap();
        // one spare element past the end must stay untouched
        let yb = gpu.storage("y", ((n * width + 1) * 4) as u64);
        let bg = k.bind(gpu, &params, &step, &ab, &bb, &yb);
        let mut enc = gpu.encoder();
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            k.encode(gpu, &mut pass, &bg, n as u32, width);
        }
        gpu.submit_wait(enc).unwrap();
        let got = gpu.read_f32(&yb, n * width + 1).unwrap();
        assert_eq!(got[n * width], 0.0, "wrote past the end");
        (got[..n * width].to_vec(), a, b)
    }

    #[test]
    fn swiglu_matches_reference() {
        for (i, &(n, w)) in [(1, 1), (1, 7), (3, 65), (5, 577), (2, 4864)]
            .iter()
            .enumerate()
        {
            let (got, a, b) = run(Binary::SwiGlu, n, w, i as u64);
            // exp and the division are a few ulp on the GPU (WGSL allows
            // exp to be off by 3 + 2|x| ulp); 1e-5 relative covers that for
            // |gate| <= 12 while a wrong activation (gelu, plain sigmoid,
            // missing up) is off by far more.
            assert_close(
                &got,
                &swiglu_reference(&a, &b),
                1e-5,
                1e-6,
                &format!("swiglu {n}x{w}"),
            );
        }
    }

    #[test]
    fn add_is_exact() {
        for (i, &(n, w)) in [(1, 1), (3, 63), (7, 896)].iter().enumerate() {
            let (got, a, b) = run(Binary::Add, n, w, 10 + i as u64);
            // f32 addition is correctly rounded on both sides: exact match.
            assert_eq!(got, add_reference(&a, &b), "add {n}x{w}");
        }
    }
}
