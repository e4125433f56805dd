//! Rotary position embedding as Hugging Face applies it (rotate_half).
//!
//! Within each head of size `d`, element `i` pairs with `i + d/2` (HF's
//! `rotate_half`, not the interleaved `(2i, 2i+1)` pairing of the original
//! paper / Meta's reference code):
//!
//! ```text
//! y[i]       = x[i]       * cos[p, i] - x[i + d/2] * sin[p, i]
//! y[i + d/2] = x[i + d/2] * cos[p, i] + x[i]       * sin[p, i]     (i < d/2)
//! ```
//!
//! The cos/sin values are computed on the host, once, into tables
//! `[max_positions, d/2]` that reproduce transformers' f32 steps:
//!
//! 1. `x = arange(0, d, 2).float() / d` (f32 division),
//! 2. `base ** x` in f32 (`theta` cast to f32; torch's powf is within 1 ulp,
//!    we take the correctly rounded value of the f64 power),
//! 3. `inv_freq = 1.0 / that` (torch: `reciprocal`, f32),
//! 4. scaling (`linear`: `inv_freq / factor`; `llama3`: the f32 steps of
//!    `_compute_llama3_parameters`, see [`inv_freq`]),
//! 5. `freqs = position.float() * inv_freq` (one f32 product),
//! 6. `cos(freqs)`, `sin(freqs)` in f32, times `attention_scaling` (1.0 for
//!    default / linear / llama3). We evaluate cos/sin of the f32 angle in f64
//!    and round, which is what an accurate f32 cos/sin gives; torch's
//!    vectorized cos/sin is within 1 ulp of that.
//!
//! The GPU kernel only reads the tables, so no transcendental runs on the GPU
//! and large angles (positions in the tens of thousands) lose nothing.

use crate::error::{Error, Result};
use crate::gpu::{Gpu, Kernel, Step};

pub const SRC: &str = include_str!("../../shaders/rope.wgsl");
const WG: u32 = 64;

use crate::config::RopeScaling;

fn check_head_dim(head_dim: usize) -> Result<()> {
    if head_dim == 0 || head_dim % 2 != 0 {
        return Err(Error::invalid(format!(
            "rope: head_dim must be even and positive (rotate_half pairs i with i + head_dim/2), got {head_dim}"
        )));
    }
    Ok(())
}

/// The `d/2` inverse frequencies exactly as transformers computes them in f32
/// (`compute_default_rope_parameters`, `_compute_linear_scaling_rope_parameters`,
/// `_compute_llama3_parameters`), step for step.
pub fn inv_freq(head_dim: usize, theta: f64, scaling: &RopeScaling) -> Result<Vec<f32>> {
    check_head_dim(head_dim)?;
    if !(theta.is_finite() && theta > 0.0) {
        return Err(Error::invalid(format!(
            "rope: rope_theta must be a positive number, got {theta}"
        )));
    }
    scaling.validate()?;
    // `base ** tensor` with a Python float base: type promotion makes the
    // base an f32 scalar, the power is computed in f32.
    let base = theta as f32 as f64;
    let default: Vec<f32> = (0..head_dim)
        .step_by(2)
        .map(|i| {
            // arange(0, d, 2).float() / d: f32 division of exact integers.
            let x = i as f32 / head_dim as f32;
            // f32 pow, correctly rounded (torch's Sleef powf: within 1 ulp).
            let pw = base.powf(x as f64) as f32;
            // `1.0 / t` is `t.reciprocal() * 1.0` in torch: one f32 division.
            1.0f32 / pw
        })
        .collect();
    Ok(match *scaling {
        RopeScaling::None => default,
        // `inv_freq /= factor`: f32 division by the f32-cast factor.
        RopeScaling::Linear { factor } => default.iter().map(|&f| f / factor).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let old = original_max_position_embeddings as f64;
            // Python floats (f64), compared against f32 tensors as f32.
            let low_freq_wavelen = (old / low_freq_factor as f64) as f32;
            let high_freq_wavelen = (old / high_freq_factor as f64) as f32;
            let two_pi = (2.0 * std::f64::consts::PI) as f32;
            let old32 = old as f32;
            let denom = (high_freq_factor as f64 - low_freq_factor as f64) as f32;
            default
                .iter()
                .map(|&inv| {
                    // wavelen = 2 * math.pi / inv_freq  ==  reciprocal(inv) * f32(2π)
                    let wavelen = (1.0f32 / inv) * two_pi;
                    let inv_llama = if wavelen > low_freq_wavelen {
                        inv / factor
                    } else {
                        inv
                    };
                    // (old / wavelen - low) / (high - low), all f32
                    let smooth = ((1.0f32 / wavelen) * old32 - low_freq_factor) / denom;
                    // (1 - smooth) * inv_llama / factor + smooth * inv_llama
                    let smoothed = (1.0f32 - smooth) * inv_llama / factor + smooth * inv_llama;
                    // HF: ~(wavelen < high) * ~(wavelen > low); wavelen is never NaN.
                    let medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
                    if medium {
                        smoothed
                    } else {
                        inv_llama
                    }
                })
                .collect()
        }
    })
}

/// Host cos/sin tables, each `[max_positions, head_dim/2]` row-major:
/// `angle = (pos as f32) * inv_freq[i]` (one f32 product, as HF), then cos and
/// sin of that f32 angle evaluated in f64 and rounded to f32, times
/// `attention_scaling`.
pub fn rope_tables(
    head_dim: usize,
    theta: f64,
    scaling: &RopeScaling,
    max_positions: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let inv = inv_freq(head_dim, theta, scaling)?;
    let att = scaling.attention_scaling();
    let half = head_dim / 2;
    let mut cos = Vec::with_capacity(max_positions * half);
    let mut sin = Vec::with_capacity(max_positions * half);
    for pos in 0..max_positions {
        let p = pos as f32;
        for &f in &inv {
            let angle = (p * f) as f64;
            cos.push(angle.cos() as f32 * att);
            sin.push(angle.sin() as f32 * att);
        }
    }
    Ok((cos, sin))
}

/// The cos/sin tables on the device, uploaded once at model load and shared
/// by the q and k RoPE of every layer.
pub struct RopeTables {
    pub cos: wgpu::Buffer,
    pub sin: wgpu::Buffer,
    pub head_dim: usize,
    pub max_positions: usize,
}

impl RopeTables {
    /// Compute ([`rope_tables`]) and upload. `max_positions` is the longest
    /// context the model will run (not necessarily `max_position_embeddings`).
    pub fn upload(
        gpu: &Gpu,
        head_dim: usize,
        theta: f64,
        scaling: &RopeScaling,
        max_positions: usize,
    ) -> Result<Self> {
        if max_positions == 0 {
            return Err(Error::invalid("rope: max_positions must be positive"));
        }
        let bytes = (max_positions * (head_dim / 2) * 4) as u64;
        if bytes > gpu.caps.max_binding {
            return Err(Error::invalid(format!(
                "rope: cos/sin table for {max_positions} positions x {} frequencies is {bytes} bytes, \
                 above the device's max storage binding of {} bytes; use a shorter context",
                head_dim / 2,
                gpu.caps.max_binding
            )));
        }
        let (cos, sin) = rope_tables(head_dim, theta, scaling, max_positions)?;
        Ok(RopeTables {
            cos: gpu.storage_init("rope cos", bytemuck::cast_slice(&cos))?,
            sin: gpu.storage_init("rope sin", bytemuck::cast_slice(&sin))?,
            head_dim,
            max_positions,
        })
    }
}

/// Uniform of one RoPE application (q or k of one layer).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Params {
    pub n_heads: u32,
    pub head_dim: u32,
    /// Rows of the cos/sin tables; positions at or past it are not written.
    pub max_positions: u32,
    pub _p: u32,
}

impl Params {
    /// RoPE over `x [n_tokens, n_heads * head_dim]` with tables of
    /// `max_positions` rows.
    pub fn new(n_heads: usize, head_dim: usize, max_positions: usize) -> Result<Self> {
        check_head_dim(head_dim)?;
        if n_heads == 0 {
            return Err(Error::invalid("rope: n_heads must be positive"));
        }
        Ok(Params {
            n_heads: n_heads as u32,
            head_dim: head_dim as u32,
            max_positions: max_positions as u32,
            _p: 0,
        })
    }

    /// Host-side check of a step against the tables (the kernel skips
    /// positions past them, leaving the output unwritten).
    pub fn check_step(&self, step: &Step) -> Result<()> {
        let end = step.pos_offset as u64 + step.n_tokens as u64;
        if end > self.max_positions as u64 {
            return Err(Error::invalid(format!(
                "rope: positions {}..{end} exceed the {} positions of the cos/sin tables",
                step.pos_offset, self.max_positions
            )));
        }
        Ok(())
    }
}

/// The compiled RoPE kernel (one for q and k, any head count / head_dim).
pub struct Rope {
    pub kernel: Kernel,
}

impl Rope {
    pub fn new(gpu: &Gpu) -> Result<Self> {
        Self::with_faults(gpu, false)
    }

    /// With `interleaved`, a deliberately wrong kernel that rotates pairs
    /// (2j, 2j+1) instead of (i, i + d/2): for verify's self-tests only.
    #[doc(hidden)]
    pub fn with_faults(gpu: &Gpu, interleaved: bool) -> Result<Self> {
        Self::with_rows(gpu, interleaved, None)
    }

    /// The kernel for a step of `kv_copy::rows_prelude`'s kind (`Some(n)`:
    /// batched rows, each at its own position).
    #[doc(hidden)]
    pub fn with_rows(gpu: &Gpu, interleaved: bool, max_rows: Option<u32>) -> Result<Self> {
        let src = format!("{}{SRC}", crate::ops::kv_copy::rows_prelude(max_rows));
        let kernel = gpu.kernel(
            "rope",
            &src,
            "main",
            &[
                ("WG", WG as f64),
                ("FAULT_INTERLEAVED", if interleaved { 1.0 } else { 0.0 }),
            ],
        )?;
        Ok(Rope { kernel })
    }

    /// Bindings: params (created here from `params`), step, x `[n_tokens,
    /// n_heads * head_dim]`, the tables, y (same shape as x, a separate buffer).
    /// Build once at load; valid for every step.
    pub fn bind(
        &self,
        gpu: &Gpu,
        params: &Params,
        step: &wgpu::Buffer,
        x: &wgpu::Buffer,
        tables: &RopeTables,
        y: &wgpu::Buffer,
    ) -> Result<wgpu::BindGroup> {
        if params.head_dim as usize != tables.head_dim
            || params.max_positions as usize != tables.max_positions
        {
            return Err(Error::invalid(format!(
                "rope: params (head_dim {}, max_positions {}) do not match the tables (head_dim {}, max_positions {})",
                params.head_dim, params.max_positions, tables.head_dim, tables.max_positions
            )));
        }
        let row = params.n_heads as u64 * params.head_dim as u64 * 4;
        if x.size() < row || y.size() < row {
            return Err(Error::invalid(format!(
                "rope: x ({} bytes) and y ({} bytes) must hold at least one row of {row} bytes",
                x.size(),
                y.size()
            )));
        }
        let ub = gpu.uniform("rope params", params)?;
        Ok(gpu.bind(&self.kernel, &[&ub, step, x, &tables.cos, &tables.sin, y]))
    }

    /// One invocation per (token, head, pair); `n_tokens` must equal the
    /// step's (the kernel guards on the step's count).
    pub fn encode(
        &self,
        gpu: &Gpu,
        pass: &mut wgpu::ComputePass<'_>,
        bind: &wgpu::BindGroup,
        params: &Params,
        n_tokens: u32,
    ) {
        let items = n_tokens as u64 * params.n_heads as u64 * (params.head_dim as u64 / 2);
        let n = items.div_ceil(WG as u64) as u32;
        gpu.dispatch_in(pass, &self.kernel, bind, n);
    }
}

/// Source of the fused RoPE(q) + RoPE(k) + KV-append kernel.
pub const SRC_KV: &str = include_str!("../../shaders/rope_kv.wgsl");

/// Params of [`RopeKv`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct KvParams {
    pub n_heads: u32,
    pub n_kv_heads: u32,
    pub head_dim: u32,
    pub max_positions: u32,
    pub max_ctx: u32,
    pub _p: [u32; 3],
}

/// RoPE of q and of k and the KV-cache append in one dispatch: q's rotated
/// rows go to `q_out`, k's rotated rows and v's rows straight to the cache
/// (the same arithmetic as [`Rope`] and `kv_copy`, element for element).
pub struct RopeKv {
    pub kernel: Kernel,
}

impl RopeKv {
    /// With `interleaved`, [`Rope::with_faults`]'s deliberate bug.
    pub fn with_faults(gpu: &Gpu, interleaved: bool) -> Result<Self> {
        Self::with_rows(gpu, interleaved, None)
    }

    /// The kernel for a step of `kv_copy::rows_prelude`'s kind (`Some(n)`:
    /// batched rows, each at its own position in its own KV slot).
    #[doc(hidden)]
    pub fn with_rows(gpu: &Gpu, interleaved: bool, max_rows: Option<u32>) -> Result<Self> {
        let src = format!("{}{SRC_KV}", crate::ops::kv_copy::rows_prelude(max_rows));
        let kernel = gpu.kernel(
            "rope_kv",
            &src,
            "main",
            &[
                ("WG", WG as f64),
                ("FAULT_INTERLEAVED", if interleaved { 1.0 } else { 0.0 }),
            ],
        )?;
        Ok(RopeKv { kernel })
    }

    /// Bindings: params (created here), step, q `[n_tokens, n_heads *
    /// head_dim]`, k and v `[n_tokens, n_kv_heads * head_dim]`, the tables,
    /// q_out (like q), the layer's K and V cache. Build once at load.
    #[allow(clippy::too_many_arguments)]
    pub fn bind(
        &self,
        gpu: &Gpu,
        params: &KvParams,
        step: &wgpu::Buffer,
        [q, k, v]: [&wgpu::Buffer; 3],
        tables: &RopeTables,
        q_out: &wgpu::Buffer,
        cache: &crate::ops::kv_copy::KvCache,
    ) -> Result<wgpu::BindGroup> {
        let c = &cache.params;
        if params.head_dim as usize != tables.head_dim
            || params.max_positions as usize != tables.max_positions
            || (params.n_kv_heads, params.head_dim, params.max_ctx)
                != (c.n_kv_heads, c.head_dim, c.max_ctx)
        {
            return Err(Error::invalid(format!(
                "rope_kv: params {params:?} do not match the tables (head_dim {}, max_positions {}) or the cache {c:?}",
                tables.head_dim, tables.max_positions
            )));
        }
        let (qrow, kvrow) = (
            params.n_heads as u64 * params.head_dim as u64 * 4,
            params.n_kv_heads as u64 * params.head_dim as u64 * 4,
        );
        if q.size() < qrow || q_out.size() < qrow || k.size() < kvrow || v.size() < kvrow {
            return Err(Error::invalid(format!(
                "rope_kv: q/q_out must hold a row of {qrow} bytes and k/v one of {kvrow} bytes"
            )));
        }
        let ub = gpu.uniform("rope_kv params", params)?;
        Ok(gpu.bind(
            &self.kernel,
            &[
                &ub,
                step,
                q,
                k,
                v,
                &tables.cos,
                &tables.sin,
                q_out,
                &cache.k,
                &cache.v,
            ],
        ))
    }

    /// One invocation per (token, q or kv head, pair).
    pub fn encode(
        &self,
        gpu: &Gpu,
        pass: &mut wgpu::ComputePass<'_>,
        bind: &wgpu::BindGroup,
        params: &KvParams,
        n_tokens: u32,
    ) {
        let heads = params.n_heads as u64 + params.n_kv_heads as u64;
        let items = n_tokens as u64 * heads * (params.head_dim as u64 / 2);
        let n = items.div_ceil(WG as u64) as u32;
        gpu.dispatch_in(pass, &self.kernel, bind, n);
    }
}

/// CPU reference: the rotate_half formula on the same tables, token `t` at
/// position `pos_offset + t`. `x` is `[n_tokens, n_heads * head_dim]`.
pub fn reference(
    x: &[f32],
    cos: &[f32],
    sin: &[f32],
    n_heads: usize,
    head_dim: usize,
    pos_offset: usize,
) -> Vec<f32> {
    let half = head_dim / 2;
    let width = n_heads * head_dim;
    let mut y = vec![0f32; x.len()];
    for (t, (xr, yr)) in x.chunks(width).zip(y.chunks_mut(width)).enumerate() {
        let pos = pos_offset + t;
        for h in 0..n_heads {
            let xh = &xr[h * head_dim..(h + 1) * head_dim];
            let yh = &mut yr[h * head_dim..(h + 1) * head_dim];
            for i in 0..half {
                let c = cos[pos * half + i];
                let s = sin[pos * half + i];
                // q * cos + rotate_half(q) * sin, rotate_half(q) = cat(-q2, q1)
                yh[i] = xh[i] * c + (-xh[i + half]) * s;
                yh[i + half] = xh[i + half] * c + xh[i] * s;
            }
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{assert_close, gpu, gpu_with_split, rand_vec};

    // inv_freq bit patterns from transformers 5.23.0 / torch 2.15.0 (CPU),
    // `LlamaRotaryEmbedding(config).inv_freq`, generated with:
    //   c = LlamaConfig(hidden_size=2*d, num_attention_heads=2, head_dim=d,
    //                   rope_parameters=rp, max_position_embeddings=40000)
    //   LlamaRotaryEmbedding(c).inv_freq.numpy().view(np.uint32)
    // d=64, {"rope_type":"default","rope_theta":1e6} (Qwen2.5-0.5B)
    const QWEN_D64_T1E6: [u32; 32] = [
        0x3f800000, 0x3f263de0, 0x3ed7e89b, 0x3e8c3504, 0x3e361887, 0x3dec7fd6, 0x3d99940d,
        0x3d47763f, 0x3d0186e3, 0x3ca8398b, 0x3c5a7bf2, 0x3c0de12d, 0x3bb8449c, 0x3b6f520e,
        0x3b1b690d, 0x3ac9d75c, 0x3a83126f, 0x3a2a3b44, 0x39dd1725, 0x398f9272, 0x393a7753,
        0x38f22ce2, 0x389d43a4, 0x384c3fbe, 0x3804a2b2, 0x37ac431d, 0x375fba4f, 0x371148e3,
        0x36bcb0c1, 0x36751070, 0x361f23e4, 0x35ceaf79,
    ];
    // d=128, llama3: theta 500000, factor 8, low 1, high 4, original 8192 (Llama 3.x)
    const LLAMA3_D128_8192: [u32; 64] = [
        0x3f800000, 0x3f508ac1, 0x3f29e1c6, 0x3f0a6384, 0x3ee177bc, 0x3eb7ab7d, 0x3e959ee3,
        0x3e73c461, 0x3e4693b0, 0x3e21c3a0, 0x3e03c6a0, 0x3dd6b19c, 0x3daee4ad, 0x3d8e7898,
        0x3d681e67, 0x3d3d1684, 0x3d1a08c8, 0x3cfaf53f, 0x3ccc6f49, 0x3ca68939, 0x3c87a9c3,
        0x3c5d06ec, 0x3c340d6d, 0x3c12ac7f, 0x3beef74f, 0x3bc2aa76, 0x3b9e9402, 0x3b812e35,
        0x3b527720, 0x3b0dfd06, 0x3ab3d11d, 0x3a60979e, 0x3a0995d2, 0x39a3f108, 0x393b2dd2,
        0x38c86886, 0x38a3418d, 0x3884fdbf, 0x3858ac81, 0x38308199, 0x380fc8f8, 0x37ea426f,
        0x37bed4f4, 0x379b7475, 0x377d45c3, 0x374e51f5, 0x3728126b, 0x3708ea0f, 0x36df10c4,
        0x36b5b687, 0x369406cb, 0x36712b80, 0x36447610, 0x36200a69, 0x36025f34, 0x35d46808,
        0x35ad07a7, 0x358cf400, 0x3565a54d, 0x353b12c7, 0x351864a7, 0x34f848c2, 0x34ca41b0,
        0x34a4c2ff,
    ];
    // d=32, llama3: theta 500000, factor 8, low 1, high 4, original 32
    // (tests/fixtures/llama3_rope_scaling)
    const LLAMA3_D32_32: [u32; 16] = [
        0x3f800000, 0x3e5bd1c4, 0x3cc693b0, 0x3c2ee4ad, 0x3b9a08c8, 0x3b07a9c3, 0x3a6ef74f,
        0x39d27720, 0x39395d21, 0x38a3418d, 0x380fc8f8, 0x377d45c3, 0x36df10c4, 0x36447610,
        0x35ad07a7, 0x351864a7,
    ];
    // d=24, {"rope_type":"linear","rope_theta":10000,"factor":3} (factor not a
    // power of two, so division vs multiplication by 1/3 would show)
    const LINEAR_D24_F3: [u32; 12] = [
        0x3eaaaaab, 0x3e1e6ed3, 0x3d931379, 0x3d088889, 0x3c7d7e1c, 0x3beb525d, 0x3b5a740d,
        0x3acacb4d, 0x3a3c41e1, 0x39aec33f, 0x39223c3d, 0x38969b1a,
    ];
    // (pos, i, cos bits, sin bits) from `LlamaRotaryEmbedding(c)(x, pos)` for
    // the QWEN_D64_T1E6 config.
    const QWEN_COS_SIN: [(usize, usize, u32, u32); 12] = [
        (1, 0, 0x3f0a5141, 0x3f576aa4),
        (1, 5, 0x3f7e4b84, 0x3debf95d),
        (1, 17, 0x3f7ffffd, 0x3a2a3b43),
        (1, 31, 0x3f800000, 0x35ceaf79),
        (1000, 0, 0x3f0ff813, 0x3f53ae61),
        (1000, 5, 0xbf396e17, 0x3f307f9a),
        (1000, 17, 0x3f4be4aa, 0x3f1acd3a),
        (1000, 31, 0x3f7fffec, 0x3ac9d757),
        (32767, 0, 0x3f7b759c, 0x3e4001b8),
        (32767, 5, 0x3e315cd8, 0x3f7c2178),
        (32767, 17, 0xbf41a9ad, 0x3f276c7c),
        (32767, 31, 0x3f7fac96, 0x3d4e9769),
    ];

    fn llama3(factor: f32, low: f32, high: f32, original: usize) -> RopeScaling {
        RopeScaling::Llama3 {
            factor,
            low_freq_factor: low,
            high_freq_factor: high,
            original_max_position_embeddings: original,
        }
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn inv_freq_matches_transformers_bit_for_bit() {
        // Exact equality: every step is a single f32 operation that we
        // reproduce in the same order (the only non-IEEE step, torch's powf,
        // happens to be correctly rounded for all these entries).
        let cases: [(&str, usize, f64, RopeScaling, &[u32]); 4] = [
            (
                "default d64 theta 1e6",
                64,
                1e6,
                RopeScaling::None,
                &QWEN_D64_T1E6,
            ),
            (
                "llama3 d128 orig 8192",
                128,
                500000.0,
                llama3(8.0, 1.0, 4.0, 8192),
                &LLAMA3_D128_8192,
            ),
            (
                "llama3 d32 orig 32",
                32,
                500000.0,
                llama3(8.0, 1.0, 4.0, 32),
                &LLAMA3_D32_32,
            ),
            (
                "linear d24 factor 3",
                24,
                10000.0,
                RopeScaling::Linear { factor: 3.0 },
                &LINEAR_D24_F3,
            ),
        ];
        for (what, d, theta, scaling, want) in cases {
            let got = inv_freq(d, theta, &scaling).unwrap();
            assert_eq!(bits(&got), want, "{what}");
        }
    }

    #[test]
    fn tables_match_transformers_cos_sin_within_one_ulp() {
        let (cos, sin) = rope_tables(64, 1e6, &RopeScaling::None, 32768).unwrap();
        for &(pos, i, c, s) in &QWEN_COS_SIN {
            // torch's vectorized f32 cos/sin is within 1 ulp of the true value
            // and ours is the nearest f32, so the two differ by at most 1 ulp
            // (same angle: the angle is one f32 product in both).
            for (what, ours, theirs) in
                [("cos", cos[pos * 32 + i], c), ("sin", sin[pos * 32 + i], s)]
            {
                let ulps = (ours.to_bits() as i64 - theirs as i64).abs();
                assert!(
                    ulps <= 1,
                    "{what}[pos {pos}, i {i}]: ours {ours} vs torch {} ({ulps} ulp)",
                    f32::from_bits(theirs)
                );
            }
        }
    }

    /// inv_freq by the textbook formula in f64: theta^(-2i/d).
    fn inv_freq_f64(d: usize, theta: f64) -> Vec<f64> {
        (0..d / 2)
            .map(|i| theta.powf(-((2 * i) as f64) / d as f64))
            .collect()
    }

    #[test]
    fn inv_freq_matches_the_f64_formula() {
        for &(d, theta) in &[
            (24usize, 1e4f64),
            (64, 1e4),
            (64, 1e6),
            (128, 5e5),
            (256, 1e4),
        ] {
            let got = inv_freq(d, theta, &RopeScaling::None).unwrap();
            let want = inv_freq_f64(d, theta);
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                // Three f32 roundings (the exponent i/d, the power, the
                // reciprocal); the exponent's error is amplified by ln(theta)
                // (up to ~14): |rel err| <= (14 + 2) * 2^-24 ~ 1e-6.
                let rel = ((g as f64 - w) / w).abs();
                assert!(
                    rel <= 1e-6,
                    "d {d} theta {theta} i {i}: {g} vs {w} (rel {rel:e})"
                );
            }
            let lin = inv_freq(d, theta, &RopeScaling::Linear { factor: 4.0 }).unwrap();
            for (i, (&l, &g)) in lin.iter().zip(&got).enumerate() {
                // Division by a power of two is exact.
                assert_eq!(l, g / 4.0, "linear d {d} i {i}");
            }
        }
    }

    /// The llama3 frequency categories, checked against the f64 formula.
    fn check_llama3_categories(d: usize, original: usize, want_counts: (usize, usize, usize)) {
        let theta = 500000.0;
        let (factor, low, high) = (8.0f64, 1.0f64, 4.0f64);
        let got = inv_freq(d, theta, &llama3(8.0, 1.0, 4.0, original)).unwrap();
        let base = inv_freq(d, theta, &RopeScaling::None).unwrap();
        let f64_base = inv_freq_f64(d, theta);
        let low_wavelen = original as f64 / low;
        let high_wavelen = original as f64 / high;
        let (mut n_high, mut n_mid, mut n_low) = (0, 0, 0);
        for i in 0..d / 2 {
            let wavelen = 2.0 * std::f64::consts::PI / f64_base[i];
            if wavelen < high_wavelen {
                // high frequency: untouched, bit for bit
                n_high += 1;
                assert_eq!(
                    got[i], base[i],
                    "d {d} i {i}: high frequency must be unchanged"
                );
            } else if wavelen > low_wavelen {
                // low frequency: divided by the factor (a power of two: exact)
                n_low += 1;
                assert_eq!(
                    got[i],
                    base[i] / 8.0,
                    "d {d} i {i}: low frequency must be /factor"
                );
            } else {
                n_mid += 1;
                let smooth = (original as f64 / wavelen - low) / (high - low);
                let want = (1.0 - smooth) * f64_base[i] / factor + smooth * f64_base[i];
                let (lo, hi) = (base[i] / 8.0, base[i]);
                assert!(
                    got[i] > lo && got[i] < hi,
                    "d {d} i {i}: interpolated {} not strictly between {lo} and {hi}",
                    got[i]
                );
                // A handful of f32 roundings on O(1) quantities: 1e-5 relative.
                let rel = ((got[i] as f64 - want) / want).abs();
                assert!(
                    rel < 1e-5,
                    "d {d} i {i}: {} vs f64 {want} (rel {rel:e})",
                    got[i]
                );
            }
        }
        assert_eq!(
            (n_high, n_mid, n_low),
            want_counts,
            "d {d} original {original}"
        );
    }

    #[test]
    fn llama3_scales_some_frequencies_and_interpolates_others() {
        // Counts match those of transformers for the same configs.
        check_llama3_categories(32, 32, (1, 1, 14));
        check_llama3_categories(128, 8192, (29, 6, 29));
    }

    #[test]
    fn tables_match_the_f64_formula_up_to_the_f32_angle() {
        let (d, theta) = (64usize, 1e4);
        let n_pos = 5000;
        let (cos, sin) = rope_tables(d, theta, &RopeScaling::None, n_pos).unwrap();
        let inv = inv_freq_f64(d, theta);
        for pos in [0usize, 1, 2, 17, 1000, 4999] {
            for (i, &f) in inv.iter().enumerate() {
                let angle = pos as f64 * f;
                // HF's f32 angle differs from the exact one by the inv_freq
                // error (<= 1e-6 relative, see above) plus one f32 rounding of
                // the product (2^-24 relative); |d cos| <= |d angle|, plus the
                // final rounding of cos/sin.
                let tol = angle * (1e-6 + 6e-8) + 1e-7;
                let k = pos * d / 2 + i;
                assert!(
                    (cos[k] as f64 - angle.cos()).abs() <= tol,
                    "cos pos {pos} i {i}"
                );
                assert!(
                    (sin[k] as f64 - angle.sin()).abs() <= tol,
                    "sin pos {pos} i {i}"
                );
            }
        }
    }

    #[test]
    fn bad_parameters_are_errors() {
        assert!(inv_freq(63, 1e4, &RopeScaling::None).is_err());
        assert!(inv_freq(0, 1e4, &RopeScaling::None).is_err());
        assert!(inv_freq(64, 0.0, &RopeScaling::None).is_err());
        assert!(inv_freq(64, 1e4, &RopeScaling::Linear { factor: 0.0 }).is_err());
        assert!(inv_freq(64, 1e4, &llama3(8.0, 4.0, 4.0, 8192)).is_err());
        assert!(Params::new(4, 65, 10).is_err());
        let p = Params::new(4, 64, 10).unwrap();
        assert!(p.check_step(&Step::new(3, 7)).is_ok());
        assert!(p.check_step(&Step::new(3, 8)).is_err());
    }

    /// The classic porting bug: pairs (2i, 2i+1) instead of (i, i + d/2).
    fn reference_interleaved(
        x: &[f32],
        cos: &[f32],
        sin: &[f32],
        n_heads: usize,
        head_dim: usize,
        pos_offset: usize,
    ) -> Vec<f32> {
        let half = head_dim / 2;
        let mut y = vec![0f32; x.len()];
        for (t, (xr, yr)) in x
            .chunks(n_heads * head_dim)
            .zip(y.chunks_mut(n_heads * head_dim))
            .enumerate()
        {
            let pos = pos_offset + t;
            for h in 0..n_heads {
                let o = h * head_dim;
                for i in 0..half {
                    let (c, s) = (cos[pos * half + i], sin[pos * half + i]);
                    let (a, b) = (xr[o + 2 * i], xr[o + 2 * i + 1]);
                    yr[o + 2 * i] = a * c - b * s;
                    yr[o + 2 * i + 1] = b * c + a * s;
                }
            }
        }
        y
    }

    fn within(got: &[f32], want: &[f32], rtol: f32, atol: f32) -> bool {
        got.iter()
            .zip(want)
            .all(|(&a, &b)| (a - b).abs() <= atol + rtol * b.abs())
    }

    // Tolerance for inputs in [-2, 2]: each output is x1*c -/+ x2*s with
    // |c|, |s| <= 1, two products and one sum in f32 (maybe fused on the
    // GPU): |err| <= 2 * 2^-24 * (|x1| + |x2|) <= 4.8e-7. 1e-6 absolute sits
    // above that and orders of magnitude below any pairing or position bug.
    const ATOL: f32 = 1e-6;

    /// Run the kernel on `x` (bound once) for each `(n_tokens, pos_offset)`.
    fn run_steps(
        gpu: &Gpu,
        n_heads: usize,
        head_dim: usize,
        max_pos: usize,
        steps: &[(usize, usize)],
        seed: u64,
    ) {
        let scaling = RopeScaling::None;
        let theta = 10000.0;
        let tables = RopeTables::upload(gpu, head_dim, theta, &scaling, max_pos).unwrap();
        let (cos, sin) = rope_tables(head_dim, theta, &scaling, max_pos).unwrap();
        let width = n_heads * head_dim;
        let max_tokens = steps.iter().map(|s| s.0).max().unwrap();
        let op = Rope::new(gpu).unwrap();
        let params = Params::new(n_heads, head_dim, max_pos).unwrap();
        let stepb = gpu.uniform("step", &Step::new(1, 0)).unwrap();
        let xb = gpu.storage("rope io", (max_tokens * width * 4) as u64 + 4);
        let yb = gpu.storage("rope io", (max_tokens * width * 4) as u64 + 4);
        let bg = op.bind(gpu, &params, &stepb, &xb, &tables, &yb).unwrap();
        for (k, &(n, off)) in steps.iter().enumerate() {
            let x = rand_vec(n * width, 2.0, seed + k as u64);
            gpu.queue.write_buffer(&xb, 0, bytemuck::cast_slice(&x));
            let step = Step::new(n as u32, off as u32);
            params.check_step(&step).unwrap();
            gpu.queue.write_buffer(&stepb, 0, bytemuck::bytes_of(&step));
            let mut enc = gpu.encoder();
            {
                let mut pass = enc.begin_compute_pass(&Default::default());
                op.encode(gpu, &mut pass, &bg, &params, n as u32);
            }
            gpu.submit_wait(enc).unwrap();
            let got = gpu.read_f32(&yb, n * width).unwrap();
            let want = reference(&x, &cos, &sin, n_heads, head_dim, off);
            let what = format!("rope heads {n_heads} d {head_dim} n {n} offset {off}");
            assert_close(&got, &want, 0.0, ATOL, &what);
            if head_dim >= 4 && off + n > 1 {
                // The interleaved pairing must fail the same tolerance (for
                // d = 2 both pairings coincide; at position 0 RoPE is identity).
                let bad = reference_interleaved(&x, &cos, &sin, n_heads, head_dim, off);
                assert!(
                    !within(&got, &bad, 0.0, ATOL),
                    "{what}: the interleaved-pairs bug would pass"
                );
            }
        }
    }

    #[test]
    fn gpu_matches_reference_over_shapes() {
        // (n_heads, head_dim, max_positions, [(n_tokens, pos_offset)])
        let g = gpu();
        run_steps(g, 2, 24, 64, &[(3, 0), (1, 3), (5, 40)], 1);
        run_steps(g, 14, 64, 4096, &[(7, 0), (1, 4095), (33, 1000)], 2);
        run_steps(g, 4, 128, 256, &[(1, 0), (2, 100)], 3);
        run_steps(g, 1, 256, 16, &[(2, 7)], 4);
        run_steps(g, 3, 6, 8, &[(4, 0)], 5);
        run_steps(g, 5, 2, 8, &[(3, 2)], 6);
    }

    #[test]
    fn gpu_uses_a_2d_grid_for_many_tokens() {
        // 37 tokens x 3 heads x 20 pairs / 64 = 35 workgroups; capping the
        // grid's per-dimension count at 8 (a host-side dispatch choice, valid
        // on every device) forces a 5 x 8 2D grid with 5 overshooting
        // workgroups, as a real 151936-row dispatch would on any adapter.
        let mut g = gpu_with_split(1 << 30);
        g.caps.max_workgroups_per_dim = 8;
        assert_eq!(g.grid(35), (8, 5, 1));
        run_steps(&g, 3, 40, 64, &[(37, 5)], 7);
    }

    #[test]
    fn interleaved_reference_differs_from_hf() {
        // Sanity check of the bug model itself on a tiny case.
        let (cos, sin) = rope_tables(4, 10000.0, &RopeScaling::None, 2).unwrap();
        let x = [1.0f32, 2.0, 3.0, 4.0];
        let hf = reference(&x, &cos, &sin, 1, 4, 1);
        let bad = reference_interleaved(&x, &cos, &sin, 1, 4, 1);
        // pair (0, 2) at frequency 1: y0 = 1 cos1 - 3 sin1
        let (c, s) = (1f32.cos(), 1f32.sin());
        assert!((hf[0] - (c - 3.0 * s)).abs() < 1e-6);
        assert!((bad[0] - (c - 2.0 * s)).abs() < 1e-6);
    }
}
