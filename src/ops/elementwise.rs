//! Element-wise kernels: the gated MLP activations (SwiGLU `silu(gate) * up`,
//! GeGLU-tanh `gelu_tanh(gate) * up`), the residual add, and the in-place
//! tanh soft-cap `tanh(x / c) * c` (Gemma's final logits).

use crate::error::Result;
use crate::gpu::{Gpu, Kernel};

pub const SRC: &str = include_str!("../../shaders/elementwise.wgsl");
pub const SOFTCAP_SRC: &str = include_str!("../../shaders/softcap.wgsl");
const WG: u32 = 256;

#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Params {
    pub width: u32,
    /// The soft-cap `c` (softcap kernel only).
    pub cap: f32,
    /// The residual add only: float offsets of a's and y's low halves (the
    /// residual stream as (hi, lo), common.wgsl's `stream_add`); 0 = none.
    pub lo: [u32; 2],
}

impl Params {
    pub fn new(width: usize) -> Self {
        Self::softcap(width, 0.0)
    }
    pub fn softcap(width: usize, cap: f32) -> Self {
        Params {
            width: width as u32,
            cap,
            lo: [0; 2],
        }
    }
    /// The residual add over the stream as (hi, lo): a's low halves at
    /// float offset `a_lo` (0 = none), y's written at `y_lo` (0 = none).
    pub fn add_split(width: usize, a_lo: u32, y_lo: u32) -> Self {
        Params {
            lo: [a_lo, y_lo],
            ..Self::new(width)
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binary {
    /// `y = silu(a) * b` (a = gate_proj output, b = up_proj output).
    SwiGlu,
    /// `y = gelu_tanh(a) * b` (transformers' `gelu_pytorch_tanh`).
    GeluTanhGlu,
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
            Binary::GeluTanhGlu => "gelu_tanh_glu",
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
        dispatch_elems(gpu, pass, &self.kernel, bind, n_tokens, width);
    }
}

/// One invocation per element of `[n_tokens, width]`.
fn dispatch_elems(
    gpu: &Gpu,
    pass: &mut wgpu::ComputePass<'_>,
    kernel: &Kernel,
    bind: &wgpu::BindGroup,
    n_tokens: u32,
    width: usize,
) {
    let n = (n_tokens as usize * width).div_ceil(WG as usize) as u32;
    gpu.dispatch_in(pass, kernel, bind, n);
}

/// CPU reference for SwiGLU: `silu(g) * u` with `silu(g) = g / (1 + e^-g)`.
pub fn swiglu_reference(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.iter()
        .zip(up)
        .map(|(&g, &u)| (g as f64 / (1.0 + (-(g as f64)).exp()) * u as f64) as f32)
        .collect()
}

/// CPU reference for GeGLU with torch's tanh-approximated GELU:
/// `0.5 * g * (1 + tanh(sqrt(2/pi) * (g + 0.044715 g^3))) * u`, in f64.
pub fn gelu_tanh_glu_reference(gate: &[f32], up: &[f32]) -> Vec<f32> {
    let k = (2.0 / std::f64::consts::PI).sqrt();
    gate.iter()
        .zip(up)
        .map(|(&g, &u)| {
            let g = g as f64;
            (0.5 * g * (1.0 + (k * (g + 0.044715 * g * g * g)).tanh()) * u as f64) as f32
        })
        .collect()
}

/// CPU reference for the soft-cap, in place: `x = tanh(x / cap) * cap`
/// (f32 division first, as `logits / cap` is an f32 op).
pub fn softcap_reference(x: &mut [f32], cap: f32) {
    for v in x {
        *v = (((*v / cap) as f64).tanh() as f32) * cap;
    }
}

/// The in-place soft-cap kernel over `[n_tokens, width]` f32.
pub struct Softcap {
    pub kernel: Kernel,
}

impl Softcap {
    pub fn new(gpu: &Gpu) -> Result<Self> {
        let kernel = gpu.kernel("softcap", SOFTCAP_SRC, "main", &[("WG", WG as f64)])?;
        Ok(Softcap { kernel })
    }
    /// Bindings: params ([`Params::softcap`]), step, x (read and written).
    pub fn bind(
        &self,
        gpu: &Gpu,
        params: &wgpu::Buffer,
        step: &wgpu::Buffer,
        x: &wgpu::Buffer,
    ) -> wgpu::BindGroup {
        gpu.bind(&self.kernel, &[params, step, x])
    }
    pub fn encode(
        &self,
        gpu: &Gpu,
        pass: &mut wgpu::ComputePass<'_>,
        bind: &wgpu::BindGroup,
        n_tokens: u32,
        width: usize,
    ) {
        dispatch_elems(gpu, pass, &self.kernel, bind, n_tokens, width);
    }
}

/// CPU reference for the residual add.
pub fn add_reference(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

/// CPU reference for the residual add on the stream as (hi, lo)
/// (common.wgsl's `stream_add`), the kernel's operations in f32 exactly
/// (Rust neither reassociates nor fuses them): returns (hi, lo) of
/// `(a + a_lo) + b`, `a_lo` all zero when None.
pub fn add_split_reference(a: &[f32], a_lo: Option<&[f32]>, b: &[f32]) -> (Vec<f32>, Vec<f32>) {
    // Knuth's TwoSum: s + e == x + y exactly.
    fn two_sum(x: f32, y: f32) -> (f32, f32) {
        let s = x + y;
        let z = s - x;
        (s, (x - (s - z)) + (y - z))
    }
    let mut hi = Vec::with_capacity(a.len());
    let mut lo = Vec::with_capacity(a.len());
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        let (s, e) = two_sum(x, y);
        let (h, l) = two_sum(s, a_lo.map_or(0.0, |v| v[i]) + e);
        hi.push(h);
        lo.push(l);
    }
    (hi, lo)
}

/// Source of the fused residual add + RMSNorm.
pub const ADD_RMSNORM_SRC: &str = include_str!("../../shaders/add_rmsnorm.wgsl");

/// The residual add fused with the RMSNorm of its result: writes the sum
/// (the residual stream) and the normed row, bit-identical to `Binary::Add`
/// then `rmsnorm::RmsNorm` (same operations, same order, same reduction).
/// Its params are `rmsnorm::Params`.
pub struct AddRmsNorm {
    pub kernel: Kernel,
}

impl AddRmsNorm {
    /// For weights of `wdtype`, applied as `w` or `(1 + w)`; `eps_outside`
    /// is RmsNorm's deliberate test-only bug.
    pub fn new(
        gpu: &Gpu,
        wdtype: crate::tensor::WDType,
        unit_offset: bool,
        eps_outside: bool,
    ) -> Result<Self> {
        let b = |v: bool| if v { 1.0 } else { 0.0 };
        let kernel = gpu.kernel(
            "add_rmsnorm",
            ADD_RMSNORM_SRC,
            "main",
            &[
                ("W_BF16", wdtype.is_bf16_const()),
                ("UNIT_OFFSET", b(unit_offset)),
                ("FAULT_EPS_OUTSIDE", b(eps_outside)),
            ],
        )?;
        Ok(AddRmsNorm { kernel })
    }

    /// Bindings: params (`rmsnorm::Params`), step, a, b `[n, width]`, the
    /// norm weight, sum and y `[n, width]`.
    #[allow(clippy::too_many_arguments)]
    pub fn bind(
        &self,
        gpu: &Gpu,
        params: &wgpu::Buffer,
        step: &wgpu::Buffer,
        a: &wgpu::Buffer,
        b: &wgpu::Buffer,
        w: &wgpu::Buffer,
        sum: &wgpu::Buffer,
        y: &wgpu::Buffer,
    ) -> wgpu::BindGroup {
        gpu.bind(&self.kernel, &[params, step, a, b, w, sum, y])
    }

    /// One workgroup per token row.
    pub fn encode(
        &self,
        gpu: &Gpu,
        pass: &mut wgpu::ComputePass<'_>,
        bind: &wgpu::BindGroup,
        n_rows: u32,
    ) {
        gpu.dispatch_in(pass, &self.kernel, bind, n_rows);
    }
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
    fn gelu_tanh_glu_matches_reference() {
        for (i, &(n, w)) in [(1, 1), (3, 65), (2, 4864)].iter().enumerate() {
            let (got, a, b) = run(Binary::GeluTanhGlu, n, w, 20 + i as u64);
            // The kernel evaluates 0.5 (1 + tanh(u)) as 1 / (1 + exp(-2u)):
            // the same function, with exp's few-ulp error and a division;
            // the same bound as SwiGLU's covers it, while the exact GELU
            // (erf) or SiLU differ by far more at |gate| ~ 1..12.
            assert_close(
                &got,
                &gelu_tanh_glu_reference(&a, &b),
                1e-5,
                1e-6,
                &format!("gelu_tanh_glu {n}x{w}"),
            );
        }
    }

    #[test]
    fn softcap_matches_reference() {
        let gpu = gpu();
        let (n, width, cap) = (3usize, 257usize, 30.0f32);
        // logits up to +-200: both the linear and the saturated range
        let x = rand_vec(n * width, 200.0, 31);
        let k = Softcap::new(gpu).unwrap();
        let params = gpu.uniform("p", &Params::softcap(width, cap)).unwrap();
        let step = gpu.uniform("step", &Step::new(n as u32, 0)).unwrap();
        let xb = gpu.storage_init("x", bytemuck::cast_slice(&x)).unwrap();
        let bg = k.bind(gpu, &params, &step, &xb);
        let mut enc = gpu.encoder();
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            k.encode(gpu, &mut pass, &bg, n as u32, width);
        }
        gpu.submit_wait(enc).unwrap();
        let got = gpu.read_f32(&xb, n * width).unwrap();
        let mut want = x.clone();
        softcap_reference(&mut want, cap);
        // tanh from exp(-2|t|) loses relative precision near 0 (1 - e with
        // e close to 1), an absolute error of a few 1e-8 in tanh, times cap:
        // 1e-5 absolute over values up to 30; no cap at all, or a cap
        // applied twice, is off by more than 1.
        assert_close(&got, &want, 1e-5, 1e-5, "softcap");
    }

    /// The residual add on the stream as (hi, lo): the kernel's (hi, lo)
    /// equal add_split_reference's bit for bit (the same operations, each
    /// correctly rounded), hi is hi + lo rounded to nearest (the tap), and
    /// hi + lo is within ~2^-46 |hi| of the exact (a + a_lo) + b, where the
    /// plain f32 add is up to 2^-24 off (checked to be so on most
    /// elements, else the data proves nothing).
    #[test]
    fn split_add_carries_the_rounding_error() {
        let gpu = gpu();
        let (n, width) = (3usize, 577usize);
        let len = n * width;
        let a = rand_vec(len, 12.0, 50);
        let b = rand_vec(len, 3.0, 51);
        // Low halves of up to half an ulp of a.
        let a_lo: Vec<f32> = rand_vec(len, 1.0, 52)
            .iter()
            .zip(&a)
            .map(|(r, x)| r * x.abs() * f32::EPSILON * 0.5)
            .collect();
        let k = Elementwise::new(gpu, Binary::Add).unwrap();
        let lo_off = len as u32;
        let params = gpu
            .uniform("p", &Params::add_split(width, lo_off, lo_off))
            .unwrap();
        let step = gpu.uniform("step", &Step::new(n as u32, 0)).unwrap();
        let ab: Vec<f32> = a.iter().chain(&a_lo).copied().collect();
        let ab = gpu.storage_init("a", bytemuck::cast_slice(&ab)).unwrap();
        let bb = gpu.storage_init("b", bytemuck::cast_slice(&b)).unwrap();
        let yb = gpu.storage("y", (2 * len * 4) as u64);
        let bg = k.bind(gpu, &params, &step, &ab, &bb, &yb);
        let mut enc = gpu.encoder();
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            k.encode(gpu, &mut pass, &bg, n as u32, width);
        }
        gpu.submit_wait(enc).unwrap();
        let got = gpu.read_f32(&yb, 2 * len).unwrap();
        let (hi, lo) = (&got[..len], &got[len..]);
        let (want_hi, want_lo) = add_split_reference(&a, Some(&a_lo), &b);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(hi), bits(&want_hi), "hi halves");
        assert_eq!(bits(lo), bits(&want_lo), "lo halves");
        let mut plain_off = 0;
        for i in 0..len {
            // Exact in f64 to ~2^-53: three f32 of nearby magnitudes.
            let exact = (a[i] as f64 + a_lo[i] as f64) + b[i] as f64;
            let pair = hi[i] as f64 + lo[i] as f64;
            assert_eq!(
                (pair as f32).to_bits(),
                hi[i].to_bits(),
                "hi is not hi + lo rounded"
            );
            // One f32 rounding of lo + e (~2^-24 |hi|), times 2^-24, with
            // room for the f64 sums: 2^-46.
            let bound = 2f64.powi(-46) * (hi[i].abs() as f64).max(f64::from(f32::MIN_POSITIVE));
            assert!(
                (pair - exact).abs() <= bound,
                "element {i}: hi + lo = {pair:e}, exact {exact:e}"
            );
            plain_off += usize::from((a[i] + b[i]) as f64 != exact);
        }
        assert!(
            plain_off > len / 2,
            "only {plain_off} of {len} plain adds rounded"
        );
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
