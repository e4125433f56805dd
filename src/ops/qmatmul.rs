//! Linear layers and embedding gathers over quantized (ggml block) weights
//! at their own types: `y = x · Wᵀ (+ b)` with W a [`QTensor`] in nn.Linear
//! layout `[out, in]`, dequantized in the shader with exactly the f32
//! operations of `gguf::dequant` and accumulated in f32.
//!
//! Kernel shapes follow the device's kernel profile as `ops::matmul` does
//! ([`QKernel::for_adapter`]): in the CPU-device profile one invocation per
//! 4 output rows on decode, 1 on prefill (no workgroup memory, no
//! barriers; each block word loaded once, each x vec4 once for the 4
//! rows); in the GPU profile one
//! workgroup per output row with a workgroup-memory reduction. Both shapes
//! serve decode (one token per pass over the weights) and prefill (a block
//! of [`PREFILL_TOKENS`] tokens per pass, each 4 weights dequantized once
//! for all of them). A weight split by rows gets one dispatch per chunk.
//! Each output is summed in the same order on both paths, so the prefill
//! path also serves a batched slot decode (B rows, one weight pass per
//! [`PREFILL_TOKENS`] of them) with every row's bits those of the one-token
//! decode kernel (tests: `batch_path_is_bit_identical_to_the_one_row_kernel`).
//! Not yet here: a subgroup reduction and a workgroup-memory tiled prefill
//! matmul for the GPU profile.
//!
//! Kernels are assembled from `shaders/qmatmul_common.wgsl`, one
//! `shaders/qmatmul_<type>.wgsl` (the type's group part `gscales` /
//! `dequant4s`, and for the row kernel its block part `qblock`) and an entry point
//! (`qmatmul_rows.wgsl`, `qmatmul_wg.wgsl`, `qembedding.wgsl`).

use crate::error::{Error, Result};
use crate::gguf::GgmlType;
#[cfg(not(target_arch = "wasm32"))]
use crate::gpu::Step;
use crate::gpu::{Caps, Gpu, Kernel, KernelProfile};
use crate::ops::matmul::{Params, SRC_COMMON};
use crate::qtensor::QTensor;
use crate::tensor::{DeviceTensor, WDType};

pub const SRC_QCOMMON: &str = include_str!("../../shaders/qmatmul_common.wgsl");
pub const SRC_ROWS: &str = include_str!("../../shaders/qmatmul_rows.wgsl");
pub const SRC_WG: &str = include_str!("../../shaders/qmatmul_wg.wgsl");
pub const SRC_EMBED: &str = include_str!("../../shaders/qembedding.wgsl");

/// Workgroup size of the row-per-invocation kernel on the prefill path.
const ROWS_WG: u32 = 64;
/// The same on the decode path, where a workgroup covers
/// [`ROWS_DECODE`] x this many rows: a CPU-type adapter runs each
/// workgroup whole on one thread, so a layer of few rows (SmolLM2's 192-row
/// k/v and 576-row q/o/down projections: 1 and 3 workgroups of 64 x 4 rows)
/// left the device's threads idle; 32 gives twice the workgroups and was 1.1
/// to 2.3x faster on those shapes, the same on large ones (BENCHMARKS.md).
const ROWS_WG_DECODE: u32 = 32;
/// Output rows per invocation of the row kernel (`qmatmul_rows.wgsl`'s R)
/// on the decode path: each x load is shared by this many rows.
const ROWS_DECODE: u32 = 4;
/// The same on the prefill path, where each dequantized weight already
/// serves [`PREFILL_TOKENS`] tokens (R x TB accumulators must stay in
/// registers).
const ROWS_PREFILL: u32 = 1;
/// Tokens per pass over the weights on the prefill path.
pub const PREFILL_TOKENS: u32 = 4;
/// Up to this many tokens the decode kernel (one token per pass) runs;
/// above, the prefill kernel. As `ops::matmul`'s GEMV/prefill split.
pub const GEMV_MAX_TOKENS: u32 = 2;

/// The line in each `qmatmul_<type>.wgsl` that starts its block part
/// (`qblock`, which calls the entry point's `use4`; only the row kernel
/// defines `use4`, so only it takes that part).
const BLOCK_PART: &str = "// Whole block for the row kernel";

/// The group part of a type's WGSL (`gscales` / `dequant4s` and helpers),
/// or an error naming the type.
pub fn type_source(ty: GgmlType) -> Result<String> {
    let s = type_source_full(ty)?;
    Ok(s.split(BLOCK_PART).next().unwrap_or_default().to_string())
}

/// A type's whole WGSL: the group part and the block part (`qblock`).
pub fn type_source_full(ty: GgmlType) -> Result<String> {
    use GgmlType::*;
    let src = match ty {
        Q4_0 => include_str!("../../shaders/qmatmul_q4_0.wgsl").to_string(),
        Q4_1 => include_str!("../../shaders/qmatmul_q4_1.wgsl").to_string(),
        Q5_0 => include_str!("../../shaders/qmatmul_q5_0.wgsl").to_string(),
        Q5_1 => include_str!("../../shaders/qmatmul_q5_1.wgsl").to_string(),
        Q8_0 => include_str!("../../shaders/qmatmul_q8_0.wgsl").to_string(),
        Q2_K => include_str!("../../shaders/qmatmul_q2_k.wgsl").to_string(),
        Q3_K => include_str!("../../shaders/qmatmul_q3_k.wgsl").to_string(),
        Q4_K => include_str!("../../shaders/qmatmul_q4_k.wgsl").to_string(),
        Q5_K => include_str!("../../shaders/qmatmul_q5_k.wgsl").to_string(),
        Q6_K => include_str!("../../shaders/qmatmul_q6_k.wgsl").to_string(),
        _ => {
            return Err(Error::invalid(
                crate::qtensor::BlockPad::of(ty).unwrap_err(),
            ))
        }
    };
    Ok(src)
}

/// Kernel shape of the quantized linear layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QKernel {
    /// One invocation per output row (CPU-device profile).
    Rows,
    /// One workgroup per output row, workgroup-memory reduction (GPU
    /// profile).
    Workgroup,
}

impl QKernel {
    /// Rows in the CPU-device profile, workgroup-per-row in the GPU profile
    /// (the choice `ops::matmul::LinearVariant::for_adapter` makes).
    pub fn for_adapter(caps: &Caps) -> Self {
        if caps.kernels == KernelProfile::CpuDevice {
            QKernel::Rows
        } else {
            QKernel::Workgroup
        }
    }
}

/// Deliberate dequantization bugs, compiled in through pipeline constants,
/// for the negative-control tests only (both false in production).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct QFaults {
    /// Read each byte's nibbles in the wrong order (4- and 5-bit types, Q6_K).
    pub nibble_swap: bool,
    /// Read a block's f16 scale as the f32 bits of its word.
    pub scale_f32: bool,
}

impl QFaults {
    fn constants(&self) -> Vec<(&'static str, f64)> {
        let mut c = Vec::new();
        if self.nibble_swap {
            c.push(("FAULT_NIBBLE_SWAP", 1.0));
        }
        if self.scale_f32 {
            c.push(("FAULT_SCALE_F32", 1.0));
        }
        c
    }
}

/// Compiled quantized linear kernels for one ggml type.
pub struct QLinear {
    ty: GgmlType,
    has_bias: bool,
    kernel: QKernel,
    gemv: Kernel,
    prefill: Kernel,
    dummy_bias: wgpu::Buffer,
}

/// One weight chunk's uniforms and bind groups.
pub struct QChunkBinding {
    pub params: wgpu::Buffer,
    pub rows: u32,
    pub bind: wgpu::BindGroup,
    pub bind_prefill: wgpu::BindGroup,
}

/// Everything [`QLinear::encode`] needs for one weight; built once at load.
pub struct QLinearBinding {
    pub chunks: Vec<QChunkBinding>,
    pub k: usize,
    pub n: usize,
    pub max_tokens: u32,
    pub name: String,
}

impl QLinear {
    /// Kernels for `ty` weights in the shape of the device's profile.
    pub fn new(gpu: &Gpu, ty: GgmlType, has_bias: bool) -> Result<Self> {
        Self::with_kernel(
            gpu,
            ty,
            has_bias,
            QKernel::for_adapter(&gpu.caps),
            QFaults::default(),
        )
    }

    /// As [`QLinear::new`] with a forced shape and injected faults (tests).
    pub fn with_kernel(
        gpu: &Gpu,
        ty: GgmlType,
        has_bias: bool,
        kernel: QKernel,
        faults: QFaults,
    ) -> Result<Self> {
        let tsrc = match kernel {
            QKernel::Rows => type_source_full(ty)?,
            QKernel::Workgroup => type_source(ty)?,
        };

        // the larger of the two paths' workgroups, checked against the limit
        let wg = match kernel {
            QKernel::Rows => ROWS_WG.max(ROWS_WG_DECODE),
            QKernel::Workgroup => 64u32.max(gpu.caps.subgroup_max_size.next_power_of_two()),
        };
        if wg > gpu.caps.max_invocations {
            return Err(Error::invalid(format!(
                "qlinear: workgroup of {wg} exceeds the adapter's max of {} invocations",
                gpu.caps.max_invocations
            )));
        }
        let entry = match kernel {
            QKernel::Rows => SRC_ROWS,
            QKernel::Workgroup => SRC_WG,
        };
        let consts = faults.constants();
        let compile = |tb: u32| {
            let r = if tb == 1 { ROWS_DECODE } else { ROWS_PREFILL };
            let wg = match kernel {
                QKernel::Rows if tb == 1 => ROWS_WG_DECODE,
                QKernel::Rows => ROWS_WG,
                QKernel::Workgroup => wg,
            };
            let src = format!(
                "const WG: u32 = {wg}u;\nconst TB: u32 = {tb}u;\nconst R: u32 = {r}u;\n{SRC_COMMON}\n{SRC_QCOMMON}\n{tsrc}\n{entry}"
            );
            gpu.kernel(
                &format!("qlinear.{kernel:?}.{ty}.tb{tb}"),
                &src,
                "main",
                &consts,
            )
        };
        Ok(QLinear {
            ty,
            has_bias,
            kernel,
            gemv: compile(1)?,
            prefill: compile(PREFILL_TOKENS)?,
            dummy_bias: gpu.storage("qlinear.no_bias", 4),
        })
    }

    pub fn ty(&self) -> GgmlType {
        self.ty
    }
    pub fn kernel(&self) -> QKernel {
        self.kernel
    }

    /// Bind one weight: `x` f32 `[tokens, k]`, `weight` `[n, k]` of this
    /// type, optional `bias` `[n]` (f32 or bf16, one chunk), `y` f32
    /// `[tokens, n]`.
    pub fn bind(
        &self,
        gpu: &Gpu,
        step: &wgpu::Buffer,
        x: &wgpu::Buffer,
        weight: &QTensor,
        bias: Option<&DeviceTensor>,
        y: &wgpu::Buffer,
    ) -> Result<QLinearBinding> {
        let name = &weight.name;
        let [n, k] = weight.shape;
        if weight.ty != self.ty {
            return Err(Error::invalid(format!(
                "linear weight `{name}` is {} but this QLinear was built for {}",
                weight.ty, self.ty
            )));
        }
        if bias.is_some() != self.has_bias {
            return Err(Error::invalid(format!(
                "linear weight `{name}`: QLinear built {} a bias but bind was given {}",
                if self.has_bias { "with" } else { "without" },
                if bias.is_some() { "one" } else { "none" }
            )));
        }
        let bias_mode = match bias {
            None => 0,
            Some(b) => {
                if b.numel() != n || b.shape.len() != 1 || b.chunks.len() != 1 {
                    return Err(Error::invalid(format!(
                        "linear bias `{}`: shape {:?} in {} buffers, expected [{n}] in one buffer \
                         to match weight `{name}`",
                        b.name,
                        b.shape,
                        b.chunks.len()
                    )));
                }
                match b.dtype {
                    WDType::F32 => 1,
                    WDType::Bf16 => 2,
                }
            }
        };
        if x == y {
            return Err(Error::invalid(format!(
                "linear weight `{name}`: x and y must be different buffers"
            )));
        }
        if x.size() % 16 != 0 {
            return Err(Error::invalid(format!(
                "linear weight `{name}`: the x buffer ({} bytes) must be a multiple of 16 bytes \
                 (read as vec4<f32>)",
                x.size()
            )));
        }
        let max_tokens = (x.size() / (4 * k as u64))
            .min(y.size() / (4 * n as u64))
            .min(u64::from(u32::MAX)) as u32;
        if max_tokens == 0 {
            return Err(Error::invalid(format!(
                "linear weight `{name}` [{n}, {k}]: x or y cannot hold one token"
            )));
        }
        let bias_buf = match bias {
            None => &self.dummy_bias,
            Some(b) => b.chunks[0].buffer(&b.name)?,
        };
        let chunks = weight
            .chunks
            .iter()
            .map(|c| {
                let params = gpu.uniform(
                    &format!("{name}.qparams@{}", c.row_start),
                    &Params {
                        k: k as u32,
                        n: n as u32,
                        row_start: c.row_start as u32,
                        rows: c.rows as u32,
                        bias_mode,
                        _p: [0; 3],
                    },
                )?;
                let bufs = [&params, step, x, c.buffer(name)?, bias_buf, y];
                Ok(QChunkBinding {
                    bind: gpu.bind(&self.gemv, &bufs),
                    bind_prefill: gpu.bind(&self.prefill, &bufs),
                    rows: c.rows as u32,
                    params,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(QLinearBinding {
            chunks,
            k,
            n,
            max_tokens,
            name: name.clone(),
        })
    }

    /// Record `y = x · Wᵀ (+ b)` for `n_tokens` tokens (matching the Step
    /// uniform): the decode kernel up to [`GEMV_MAX_TOKENS`], prefill above.
    pub fn encode(
        &self,
        gpu: &Gpu,
        pass: &mut wgpu::ComputePass<'_>,
        b: &QLinearBinding,
        n_tokens: u32,
    ) -> Result<()> {
        self.encode_path(gpu, pass, b, n_tokens, n_tokens > GEMV_MAX_TOKENS)
    }

    /// [`QLinear::encode`] with the path forced (`prefill` or decode).
    pub fn encode_path(
        &self,
        gpu: &Gpu,
        pass: &mut wgpu::ComputePass<'_>,
        b: &QLinearBinding,
        n_tokens: u32,
        prefill: bool,
    ) -> Result<()> {
        if n_tokens > b.max_tokens {
            return Err(Error::invalid(format!(
                "linear weight `{}`: {n_tokens} tokens but the bound x/y buffers hold {}",
                b.name, b.max_tokens
            )));
        }
        let tb = if prefill { PREFILL_TOKENS } else { 1 };
        let (kern, tblocks) = if prefill {
            (&self.prefill, n_tokens.div_ceil(tb))
        } else {
            (&self.gemv, n_tokens)
        };
        for c in &b.chunks {
            let groups = match self.kernel {
                QKernel::Rows => {
                    let (r, wg) = if prefill {
                        (ROWS_PREFILL, ROWS_WG)
                    } else {
                        (ROWS_DECODE, ROWS_WG_DECODE)
                    };
                    c.rows.div_ceil(r * wg) * tblocks
                }
                QKernel::Workgroup => c.rows * tblocks,
            };
            let bg = if prefill { &c.bind_prefill } else { &c.bind };
            gpu.dispatch_in(pass, kern, bg, groups);
        }
        Ok(())
    }

    /// One-shot: upload `x` (`[m, k]`), run, read back `[m, n]`.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn run_once(
        &self,
        gpu: &Gpu,
        x: &[f32],
        m: usize,
        weight: &QTensor,
        bias: Option<&DeviceTensor>,
        prefill: bool,
    ) -> Result<Vec<f32>> {
        let [n, k] = weight.shape;
        if m == 0 || x.len() != m * k {
            return Err(Error::invalid(format!(
                "linear `{}`: x has {} values, expected {m} x {k}",
                weight.name,
                x.len()
            )));
        }
        let step = gpu.uniform("qlinear_once.step", &Step::new(m as u32, 0))?;
        let xb = gpu.storage_init("qlinear_once.x", bytemuck::cast_slice(x))?;
        let yb = gpu.storage("qlinear_once.y", (m * n * 4) as u64);
        let binding = self.bind(gpu, &step, &xb, weight, bias, &yb)?;
        let mut enc = gpu.encoder();
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            self.encode_path(gpu, &mut pass, &binding, m as u32, prefill)?;
        }
        gpu.submit_wait(enc)?;
        gpu.read_f32(&yb, m * n)
    }
}

/// Mirrors `Params` in qembedding.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct EmbedParams {
    hidden: u32,
    row_start: u32,
    rows: u32,
    scale: f32,
}

/// Embedding gather from a quantized table, times a scale.
pub struct QEmbedding {
    pub kernel: Kernel,
    pub ty: GgmlType,
}

/// Bind groups (one per table chunk) and their params, built at load.
pub struct QEmbeddingBinding {
    pub groups: Vec<wgpu::BindGroup>,
    pub params: Vec<wgpu::Buffer>,
    pub hidden: usize,
}

impl QEmbedding {
    pub fn new(gpu: &Gpu, ty: GgmlType) -> Result<Self> {
        Self::with_faults(gpu, ty, QFaults::default())
    }

    pub fn with_faults(gpu: &Gpu, ty: GgmlType, faults: QFaults) -> Result<Self> {
        let src = format!("{SRC_QCOMMON}\n{}\n{SRC_EMBED}", type_source(ty)?);
        let kernel = gpu.kernel(
            &format!("qembedding.{ty}"),
            &src,
            "main",
            &faults.constants(),
        )?;
        Ok(QEmbedding { kernel, ty })
    }

    /// Bindings for `ids` (u32 `[n_tokens]`) → `y` (f32 `[n_tokens,
    /// hidden]`), rows multiplied by `scale`.
    pub fn bind(
        &self,
        gpu: &Gpu,
        step: &wgpu::Buffer,
        ids: &wgpu::Buffer,
        table: &QTensor,
        scale: f32,
        y: &wgpu::Buffer,
    ) -> Result<QEmbeddingBinding> {
        if table.ty != self.ty {
            return Err(Error::invalid(format!(
                "embedding `{}` is {} but this QEmbedding was built for {}",
                table.name, table.ty, self.ty
            )));
        }
        let hidden = table.cols();
        let mut groups = Vec::new();
        let mut params = Vec::new();
        for c in &table.chunks {
            let p = gpu.uniform(
                "qembedding.params",
                &EmbedParams {
                    hidden: hidden as u32,
                    row_start: c.row_start as u32,
                    rows: c.rows as u32,
                    scale,
                },
            )?;
            groups.push(gpu.bind(&self.kernel, &[&p, step, ids, c.buffer(&table.name)?, y]));
            params.push(p);
        }
        Ok(QEmbeddingBinding {
            groups,
            params,
            hidden,
        })
    }

    /// One dispatch per table chunk.
    pub fn encode(
        &self,
        gpu: &Gpu,
        pass: &mut wgpu::ComputePass<'_>,
        b: &QEmbeddingBinding,
        n_tokens: u32,
    ) {
        let n = (n_tokens as usize * b.hidden / 32).div_ceil(64) as u32;
        for g in &b.groups {
            gpu.dispatch_in(pass, &self.kernel, g, n);
        }
    }

    /// One-shot gather for tests.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn run_once(
        &self,
        gpu: &Gpu,
        table: &QTensor,
        ids: &[u32],
        scale: f32,
    ) -> Result<Vec<f32>> {
        let step = gpu.uniform("qembed_once.step", &Step::new(ids.len() as u32, 0))?;
        let idb = gpu.storage_init("qembed_once.ids", bytemuck::cast_slice(ids))?;
        let yb = gpu.storage("qembed_once.y", (ids.len() * table.cols() * 4) as u64);
        let b = self.bind(gpu, &step, &idb, table, scale, &yb)?;
        let mut enc = gpu.encoder();
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            self.encode(gpu, &mut pass, &b, ids.len() as u32);
        }
        gpu.submit_wait(enc)?;
        gpu.read_f32(&yb, ids.len() * table.cols())
    }
}

#[cfg(test)]
mod tests;
