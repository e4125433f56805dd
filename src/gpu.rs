//! The wgpu device context: adapter choice, the adapter's own limits and
//! features, buffer helpers, pipeline creation and readback.
//!
//! Everything that talks to wgpu directly lives here so ops only describe
//! their kernels (WGSL + params) and their bindings.

use std::str::FromStr;
use std::sync::Arc;

use crate::error::{Error, Hint, Result, Setting};

/// WGSL helpers prepended to every kernel (bf16 widening, 2D grid indexing).
pub const COMMON_WGSL: &str = include_str!("../shaders/common.wgsl");

/// What the chosen adapter can do, as far as our kernels care.
#[derive(Clone, Debug)]
pub struct Caps {
    pub shader_f16: bool,
    pub subgroup: bool,
    pub subgroup_min_size: u32,
    pub subgroup_max_size: u32,
    /// Largest buffer we may bind as one storage binding.
    pub max_binding: u64,
    pub max_buffer: u64,
    pub max_workgroups_per_dim: u32,
    pub max_workgroup_storage: u32,
    pub max_invocations: u32,
    /// The adapter is a CPU device (lavapipe, SwiftShader, WARP): a fact
    /// about the adapter, not a kernel choice (see `kernels`).
    pub is_cpu: bool,
    /// The kernel shapes the ops use on this device.
    pub kernels: KernelProfile,
    /// Shader decisions overriding the profile's, one by one.
    pub decisions: Decisions,
}

/// The family of kernel shapes the ops use, chosen once per device. Both
/// profiles compute the same function on any adapter and are held to the
/// same tolerances; they differ only in speed. `auto` ([`KernelChoice`])
/// picks by adapter type; `WGLLM_KERNELS` or [`GpuOptions::kernels`] forces
/// either on any adapter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelProfile {
    /// For CPU-type adapters, which run a workgroup as SIMD lanes on CPU
    /// cores and pay for every barrier: row-per-invocation GEMV,
    /// register-blocked prefill, narrow argmax and attention workgroups.
    CpuDevice,
    /// For GPUs: workgroup-per-row GEMV (subgroup reduction when the device
    /// has SUBGROUP, else a workgroup-memory tree), the workgroup-memory
    /// tiled prefill matmul, wider argmax and attention workgroups.
    Gpu,
}

impl KernelProfile {
    /// The name `WGLLM_KERNELS` uses for it.
    pub fn name(self) -> &'static str {
        match self {
            KernelProfile::CpuDevice => "cpu",
            KernelProfile::Gpu => "gpu",
        }
    }
}

/// A requested kernel profile: by adapter type, or forced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KernelChoice {
    /// CPU-device kernels on CPU-type adapters, GPU kernels on the rest.
    #[default]
    Auto,
    Force(KernelProfile),
}

impl KernelChoice {
    pub const ALLOWED: &'static str = "auto, gpu or cpu";

    pub fn resolve(self, adapter_is_cpu: bool) -> KernelProfile {
        match self {
            KernelChoice::Force(p) => p,
            KernelChoice::Auto if adapter_is_cpu => KernelProfile::CpuDevice,
            KernelChoice::Auto => KernelProfile::Gpu,
        }
    }
}

impl FromStr for KernelChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(KernelChoice::Auto),
            "gpu" => Ok(KernelChoice::Force(KernelProfile::Gpu)),
            "cpu" => Ok(KernelChoice::Force(KernelProfile::CpuDevice)),
            _ => Err(format!(
                "'{s}' is not a kernel profile; expected {}",
                Self::ALLOWED
            )),
        }
    }
}

/// The wgpu backends to enumerate adapters on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendChoice(pub wgpu::Backends);

impl Default for BackendChoice {
    fn default() -> Self {
        BackendChoice(wgpu::Backends::all())
    }
}

impl BackendChoice {
    pub const ALLOWED: &'static str =
        "all (or auto), vulkan, metal, dx12, gl, or several separated by commas";
}

impl FromStr for BackendChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let mut b = wgpu::Backends::empty();
        for part in s.split(',').map(str::trim) {
            b |= match part.to_ascii_lowercase().as_str() {
                "all" | "auto" => wgpu::Backends::all(),
                "vulkan" | "vk" => wgpu::Backends::VULKAN,
                "metal" | "mtl" => wgpu::Backends::METAL,
                "dx12" | "d3d12" => wgpu::Backends::DX12,
                "gl" | "gles" | "opengl" => wgpu::Backends::GL,
                _ => {
                    return Err(format!(
                        "'{part}' is not a backend; expected {}",
                        Self::ALLOWED
                    ))
                }
            };
        }
        Ok(BackendChoice(b))
    }
}

/// How kernels bind their small parameter blocks (`Params`, the per-step
/// `Step`): WGSL `var<uniform>` or `var<storage, read>`. Both give every
/// kernel the same values and the same results.
///
/// Storage is the workaround for a Mesa lavapipe behaviour (Mesa 22.3 here):
/// lavapipe "inlines" the values of uniform buffers that feed loop bounds
/// and branches into the shader, and recompiles the shader through LLVM each
/// time such a pipeline is bound (newer Mesa caches one variant per distinct
/// value, still one per decode position), never freeing the old one. That
/// was the ~5 MB of host memory per forward pass that never came back
/// (BENCHMARKS.md; `examples/vk_leak_probe.rs` reproduces it with raw wgpu).
/// Lavapipe never inlines storage buffers. Uniforms stay the choice on
/// every other adapter, where they are the fast path and where WebGPU's
/// default limit of 8 storage buffers per stage leaves no room for two more.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ParamsBinding {
    Uniform,
    Storage,
}

impl ParamsBinding {
    /// The name `WGLLM_PARAMS` uses for it.
    pub fn name(self) -> &'static str {
        match self {
            ParamsBinding::Uniform => "uniform",
            ParamsBinding::Storage => "storage",
        }
    }

    /// The address space kernels declare their parameter blocks in.
    fn wgsl(self) -> &'static str {
        match self {
            ParamsBinding::Uniform => "var<uniform>",
            ParamsBinding::Storage => "var<storage, read>",
        }
    }
}

/// A requested [`ParamsBinding`]: by adapter, or forced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ParamsChoice {
    /// Storage on Mesa's lavapipe (a Vulkan adapter whose driver is
    /// llvmpipe), uniform elsewhere.
    #[default]
    Auto,
    Force(ParamsBinding),
}

impl ParamsChoice {
    pub const ALLOWED: &'static str = "auto, uniform or storage";

    pub fn resolve(self, info: &wgpu::AdapterInfo) -> (ParamsBinding, &'static str) {
        match self {
            ParamsChoice::Force(b) => (b, "forced"),
            ParamsChoice::Auto if is_lavapipe(info) => (
                ParamsBinding::Storage,
                "auto: lavapipe recompiles shaders on uniform values",
            ),
            ParamsChoice::Auto => (ParamsBinding::Uniform, "auto"),
        }
    }
}

impl FromStr for ParamsChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(ParamsChoice::Auto),
            "uniform" => Ok(ParamsChoice::Force(ParamsBinding::Uniform)),
            "storage" => Ok(ParamsChoice::Force(ParamsBinding::Storage)),
            _ => Err(format!(
                "'{s}' is not a parameter binding; expected {}",
                Self::ALLOWED
            )),
        }
    }
}

// ------------------------------------------------------- shader decisions

/// Shape of the GEMV (decode) kernel (`ops::matmul` re-exports it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LinearVariant {
    /// Each invocation computes whole output rows (4 of them, sharing the x
    /// loads), a workgroup of [`Decisions::gemv_rows_wg`] (default 8 in the
    /// CPU-device profile, 64 otherwise: `LinearVariant::workgroup`).
    /// Best on CPU-type adapters (lavapipe): lanes of a SIMD workgroup walk
    /// different rows and no barrier is needed.
    RowPerThread,
    /// One workgroup per output row, reduced with `subgroupAdd` and one
    /// workgroup-memory step. The usual GPU shape (coalesced row reads).
    WorkgroupSubgroup,
    /// One workgroup per output row, workgroup-memory tree reduction. For
    /// GPUs without subgroup operations.
    WorkgroupShared,
}

/// Kernel of the prefill (many-token) linear path (`ops::matmul`
/// re-exports it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PrefillKernel {
    /// Matmul tiled in workgroup memory (`ops::matmul::TileConfig`),
    /// register-tiled. The GPU shape.
    Tiled,
    /// Invocations over rows, each computing a `ops::matmul::RowBlock` of
    /// rows x tokens in registers (matmul_rowblk.wgsl for k % 8 == 0, else
    /// gemv_rows.wgsl with 4 rows x 4 tokens): no workgroup memory, no
    /// barriers. On lavapipe this is far faster than the tiled kernel.
    RowBlocks,
}

/// Where dense bf16 Linear weights (and a tied embedding) live on the
/// device (issue #9): the same bytes in the same order either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightLayout {
    /// Storage buffers (`array<vec4<u32>>`), split by rows at the max
    /// storage binding. Every tensor, every profile.
    Buffer,
    /// `rgba32uint` textures of [`TEXTURE_WIDTH`] texels (texel g = bf16
    /// elements 8g..8g+7 of the row-major chunk), split by rows at the max
    /// binding and at `max_texture_dimension_2d` texel rows. Only for bf16
    /// weights with k % 8 == 0 read by the CPU-profile kernels: llvmpipe
    /// turns each non-uniform storage load into a per-lane loop, a texel
    /// fetch into one gather (BENCHMARKS.md, "Weights through a texture").
    Texture,
}

/// Texels per row of a weight texture ([`WeightLayout::Texture`]); a power
/// of two so the kernels split a texel index with a mask and a shift.
pub const TEXTURE_WIDTH: u32 = 4096;

impl WeightLayout {
    /// The `weights` shader decision when set, else the profile's: textures
    /// in the CPU-device profile, buffers in the GPU profile (on a GPU a
    /// storage load is one coalesced instruction and a decode GEMV is bound
    /// by DRAM bandwidth; a texture reads no fewer bytes). A `prefill=tiled`
    /// decision without a `weights` one gets buffers, the only weights the
    /// tiled matmul reads.
    pub fn for_adapter(caps: &Caps) -> Self {
        match caps.decisions.weights {
            Some(l) => l,
            None if caps.decisions.prefill == Some(PrefillKernel::Tiled) => WeightLayout::Buffer,
            None if caps.kernels == KernelProfile::CpuDevice => WeightLayout::Texture,
            None => WeightLayout::Buffer,
        }
    }

    /// The layout a dense tensor gets: [`WeightLayout::Texture`] only when
    /// the device's layout is texture and the tensor is a 2D bf16 matrix
    /// with k % 8 == 0 (whole texels per row); buffers otherwise.
    pub fn for_tensor(caps: &Caps, bf16: bool, shape: &[usize]) -> Self {
        match (Self::for_adapter(caps), shape) {
            (WeightLayout::Texture, [_, k]) if bf16 && k % 8 == 0 && *k > 0 => {
                WeightLayout::Texture
            }
            _ => WeightLayout::Buffer,
        }
    }
}

/// The name [`Decisions`] uses for a weight layout.
pub fn weights_name(v: WeightLayout) -> &'static str {
    match v {
        WeightLayout::Buffer => "buffer",
        WeightLayout::Texture => "texture",
    }
}

/// Which decode-attention kernel (`ops::attention::Shape::rows`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AttentionKernel {
    /// attention_rows.wgsl: everything in registers, no barriers.
    Rows,
    /// attention.wgsl: positions scored across a workgroup, shared memory.
    Workgroup,
}

/// One shader decision: a typed key of [`Decisions`] (ggml-webgpu calls
/// these "shader decisions"). Each is overridable on its own; unset, the
/// kernel profile decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DecisionKey {
    /// GEMV kernel: `rows`, `wg_subgroup` or `wg_shared`.
    Gemv,
    /// Workgroup size of the row-per-thread GEMV: 8, 16, 32, 64, 128 or 256.
    GemvRowsWg,
    /// Prefill matmul kernel: `rows` or `tiled`.
    Prefill,
    /// Tile of the tiled prefill matmul, outputs per workgroup side: 16, 32
    /// or 64.
    PrefillTile,
    /// Decode attention kernel: `rows` or `workgroup`.
    Attention,
    /// Most KV splits of a decode attention step: 1 to 64.
    AttnSplits,
    /// Fewest units (positions for the row kernel, blocks for the workgroup
    /// kernel) per KV split: 1 to 4096.
    AttnMinSplit,
    /// Argmax workgroup size: a power of two in 32..=1024.
    ArgmaxWg,
    /// Dense bf16 weight layout: `buffer` or `texture` ([`WeightLayout`]).
    Weights,
}

impl DecisionKey {
    pub const ALL: [DecisionKey; 9] = [
        DecisionKey::Gemv,
        DecisionKey::GemvRowsWg,
        DecisionKey::Prefill,
        DecisionKey::PrefillTile,
        DecisionKey::Attention,
        DecisionKey::AttnSplits,
        DecisionKey::AttnMinSplit,
        DecisionKey::ArgmaxWg,
        DecisionKey::Weights,
    ];

    /// Its name in `WGLLM_DECISIONS` and the tune cache.
    pub fn name(self) -> &'static str {
        match self {
            DecisionKey::Gemv => "gemv",
            DecisionKey::GemvRowsWg => "gemv_rows_wg",
            DecisionKey::Prefill => "prefill",
            DecisionKey::PrefillTile => "prefill_tile",
            DecisionKey::Attention => "attention",
            DecisionKey::AttnSplits => "attn_splits",
            DecisionKey::AttnMinSplit => "attn_min_split",
            DecisionKey::ArgmaxWg => "argmax_wg",
            DecisionKey::Weights => "weights",
        }
    }

    /// The values it takes, for messages.
    pub fn allowed(self) -> &'static str {
        match self {
            DecisionKey::Gemv => "rows, wg_subgroup or wg_shared",
            DecisionKey::GemvRowsWg => "8, 16, 32, 64, 128 or 256",
            DecisionKey::Prefill => "rows or tiled",
            DecisionKey::PrefillTile => "16, 32 or 64",
            DecisionKey::Attention => "rows or workgroup",
            DecisionKey::AttnSplits => "an integer in 1..=64",
            DecisionKey::AttnMinSplit => "an integer in 1..=4096",
            DecisionKey::ArgmaxWg => "a power of two in 32..=1024",
            DecisionKey::Weights => "buffer or texture",
        }
    }
}

impl FromStr for DecisionKey {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        DecisionKey::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = DecisionKey::ALL.iter().map(|k| k.name()).collect();
                format!(
                    "'{s}' is not a shader decision; expected one of {}",
                    names.join(", ")
                )
            })
    }
}

/// The shader decisions set explicitly (options, `WGLLM_DECISIONS`, the
/// tune cache or a tuning run); `None` leaves a decision to the kernel
/// profile, whose default each op computes (`LinearVariant::for_adapter`,
/// `PrefillKernel::for_adapter`, `TileConfig::for_adapter`,
/// `attention::Shape::for_gpu`, `Argmax::new`). Every value is correct on
/// every adapter that can run it; they differ only in speed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Decisions {
    pub gemv: Option<LinearVariant>,
    pub gemv_rows_wg: Option<u32>,
    pub prefill: Option<PrefillKernel>,
    pub prefill_tile: Option<u32>,
    pub attention: Option<AttentionKernel>,
    pub attn_splits: Option<u32>,
    pub attn_min_split: Option<u32>,
    pub argmax_wg: Option<u32>,
    pub weights: Option<WeightLayout>,
}

impl Decisions {
    /// The value of `key` as [`Decisions::set`] reads it, `None` when unset.
    pub fn get(&self, key: DecisionKey) -> Option<String> {
        let num = |v: Option<u32>| v.map(|v| v.to_string());
        match key {
            DecisionKey::Gemv => self.gemv.map(|v| gemv_name(v).to_string()),
            DecisionKey::GemvRowsWg => num(self.gemv_rows_wg),
            DecisionKey::Prefill => self.prefill.map(|v| prefill_name(v).to_string()),
            DecisionKey::PrefillTile => num(self.prefill_tile),
            DecisionKey::Attention => self.attention.map(|v| attention_name(v).to_string()),
            DecisionKey::AttnSplits => num(self.attn_splits),
            DecisionKey::AttnMinSplit => num(self.attn_min_split),
            DecisionKey::ArgmaxWg => num(self.argmax_wg),
            DecisionKey::Weights => self.weights.map(|v| weights_name(v).to_string()),
        }
    }

    /// Set `key` from its text form; an error names the key and the values
    /// it takes.
    pub fn set(&mut self, key: DecisionKey, value: &str) -> std::result::Result<(), String> {
        let v = value.trim().to_ascii_lowercase();
        let bad = || {
            format!(
                "'{value}' is not a value of {}; expected {}",
                key.name(),
                key.allowed()
            )
        };
        let int =
            |ok: &dyn Fn(u32) -> bool| v.parse::<u32>().ok().filter(|&n| ok(n)).ok_or_else(bad);
        match key {
            DecisionKey::Gemv => {
                self.gemv = Some(match v.as_str() {
                    "rows" => LinearVariant::RowPerThread,
                    "wg_subgroup" => LinearVariant::WorkgroupSubgroup,
                    "wg_shared" => LinearVariant::WorkgroupShared,
                    _ => return Err(bad()),
                })
            }
            DecisionKey::GemvRowsWg => {
                self.gemv_rows_wg = Some(int(&|n| matches!(n, 8 | 16 | 32 | 64 | 128 | 256))?)
            }
            DecisionKey::Prefill => {
                self.prefill = Some(match v.as_str() {
                    "rows" => PrefillKernel::RowBlocks,
                    "tiled" => PrefillKernel::Tiled,
                    _ => return Err(bad()),
                })
            }
            DecisionKey::PrefillTile => {
                self.prefill_tile = Some(int(&|n| matches!(n, 16 | 32 | 64))?)
            }
            DecisionKey::Attention => {
                self.attention = Some(match v.as_str() {
                    "rows" => AttentionKernel::Rows,
                    "workgroup" => AttentionKernel::Workgroup,
                    _ => return Err(bad()),
                })
            }
            DecisionKey::AttnSplits => self.attn_splits = Some(int(&|n| (1..=64).contains(&n))?),
            DecisionKey::AttnMinSplit => {
                self.attn_min_split = Some(int(&|n| (1..=4096).contains(&n))?)
            }
            DecisionKey::ArgmaxWg => {
                self.argmax_wg = Some(int(&|n| n.is_power_of_two() && (32..=1024).contains(&n))?)
            }
            DecisionKey::Weights => {
                self.weights = Some(match v.as_str() {
                    "buffer" => WeightLayout::Buffer,
                    "texture" => WeightLayout::Texture,
                    _ => return Err(bad()),
                })
            }
        }
        Ok(())
    }

    /// The decisions that are set, as `(key, value)`.
    pub fn entries(&self) -> Vec<(DecisionKey, String)> {
        DecisionKey::ALL
            .into_iter()
            .filter_map(|k| self.get(k).map(|v| (k, v)))
            .collect()
    }

    /// `self`, with every decision `other` sets taken from `other`.
    pub fn overlaid(mut self, other: &Decisions) -> Decisions {
        for (k, v) in other.entries() {
            self.set(k, &v).expect("a value get() wrote");
        }
        self
    }
}

/// `key=value` pairs separated by commas (`WGLLM_DECISIONS`), e.g.
/// `gemv=rows,gemv_rows_wg=128,attn_splits=8`; blank means none.
impl FromStr for Decisions {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let mut d = Decisions::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("'{part}' is not key=value"))?;
            d.set(k.parse()?, v)?;
        }
        Ok(d)
    }
}

impl std::fmt::Display for Decisions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self
            .entries()
            .into_iter()
            .map(|(k, v)| format!("{}={v}", k.name()))
            .collect();
        f.write_str(&parts.join(","))
    }
}

/// The name [`Decisions`] uses for a GEMV variant.
pub fn gemv_name(v: LinearVariant) -> &'static str {
    match v {
        LinearVariant::RowPerThread => "rows",
        LinearVariant::WorkgroupSubgroup => "wg_subgroup",
        LinearVariant::WorkgroupShared => "wg_shared",
    }
}

/// The name [`Decisions`] uses for a prefill kernel.
pub fn prefill_name(v: PrefillKernel) -> &'static str {
    match v {
        PrefillKernel::RowBlocks => "rows",
        PrefillKernel::Tiled => "tiled",
    }
}

/// The name [`Decisions`] uses for an attention kernel.
pub fn attention_name(v: AttentionKernel) -> &'static str {
    match v {
        AttentionKernel::Rows => "rows",
        AttentionKernel::Workgroup => "workgroup",
    }
}

/// When the autotuner (`tune`) runs at a model load.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TuneMode {
    /// Profile defaults only; the cache is neither read nor written.
    Off,
    /// Use the tune cache's choices for this adapter and model shape when
    /// present, else the profile's defaults; never time anything.
    #[default]
    Cache,
    /// As `Cache`, and tune (then write the cache) when it has no entry.
    Auto,
}

impl TuneMode {
    pub const ALLOWED: &'static str = "off, cache or auto";
    pub fn name(self) -> &'static str {
        match self {
            TuneMode::Off => "off",
            TuneMode::Cache => "cache",
            TuneMode::Auto => "auto",
        }
    }
}

impl FromStr for TuneMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "off" => Ok(TuneMode::Off),
            "cache" => Ok(TuneMode::Cache),
            "auto" => Ok(TuneMode::Auto),
            _ => Err(format!(
                "'{s}' is not a tune mode; expected {}",
                Self::ALLOWED
            )),
        }
    }
}

/// Mesa's lavapipe: the Vulkan driver on llvmpipe (wgpu reports the device
/// as `llvmpipe (LLVM ...)`; the GL backend's llvmpipe is not lavapipe).
fn is_lavapipe(info: &wgpu::AdapterInfo) -> bool {
    info.backend == wgpu::Backend::Vulkan
        && (info.name.to_ascii_lowercase().contains("llvmpipe")
            || info.driver.to_ascii_lowercase().contains("llvmpipe"))
}

/// `VULKAN|GL` for a set of backends.
pub fn backend_names(b: wgpu::Backends) -> String {
    if b == wgpu::Backends::all() {
        return "all".into();
    }
    b.iter_names().map(|(n, _)| n).collect::<Vec<_>>().join("|")
}

/// The value of an environment variable when it is set and not blank.
fn env_value(var: &str) -> Option<String> {
    std::env::var(var).ok().filter(|v| !v.trim().is_empty())
}

/// Description of one adapter, for `wgllm devices` and error messages.
#[derive(Clone, Debug)]
pub struct AdapterDesc {
    pub index: usize,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    pub features: wgpu::Features,
}

impl AdapterDesc {
    fn rank(&self) -> u32 {
        match self.info.device_type {
            wgpu::DeviceType::DiscreteGpu => 0,
            wgpu::DeviceType::IntegratedGpu => 1,
            wgpu::DeviceType::VirtualGpu => 2,
            wgpu::DeviceType::Other => 3,
            wgpu::DeviceType::Cpu => 4,
        }
    }
}

pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub adapter: AdapterDesc,
    pub caps: Caps,
    /// How `caps.kernels` was chosen (see [`Gpu::kernels_desc`]).
    pub kernels_chosen_by: &'static str,
    /// How kernels bind their parameter blocks, and why.
    pub params: ParamsBinding,
    pub params_chosen_by: &'static str,
    /// What set each decision in `caps.decisions` (options, the variable,
    /// the tune cache, a tuning run); unset decisions are the profile's.
    pub decision_sources: Vec<(DecisionKey, String)>,
    /// Device loss and uncaptured errors, recorded by wgpu's callbacks.
    health: Arc<Health>,
    /// What this `Gpu` has created and recorded (for the per-step
    /// dispatch count and the no-allocation-per-token audit).
    pub counters: Counters,
    /// Bytes queued with `write_buffer` by [`Gpu::storage_streamed`] since
    /// the last wait: wgpu holds a staging copy of each until the device
    /// has taken it.
    upload_pending: std::sync::atomic::AtomicU64,
    /// Every kernel compiled so far, by everything that makes it distinct,
    /// so a second request for the same one reuses it (two ops that differ
    /// only in their runtime parameters share one pipeline).
    kernel_cache: std::sync::Mutex<Vec<(KernelKey, Kernel)>>,
}

/// Label, entry point, full source and override constants (bit-exact).
type KernelKey = (String, String, String, Vec<(String, u64)>);

/// A streamed upload writes its data in pieces of at most this many bytes
/// (see [`Gpu::storage_streamed`]).
pub const UPLOAD_PIECE: usize = 1 << 20;

/// Staging bytes a streamed upload lets wgpu hold before it waits for the
/// device to take them: the bound on the host memory an upload adds.
pub const UPLOAD_IN_FLIGHT: u64 = 4 << 20;

/// Running totals of what went through a [`Gpu`]'s helpers: every buffer,
/// bind group and pipeline wgllm creates is made by one of them, and every
/// dispatch is recorded by [`Gpu::dispatch_in`].
#[derive(Debug, Default)]
pub struct Counters {
    pub dispatches: std::sync::atomic::AtomicU64,
    pub buffers: std::sync::atomic::AtomicU64,
    pub bind_groups: std::sync::atomic::AtomicU64,
    pub pipelines: std::sync::atomic::AtomicU64,
}

/// A snapshot of [`Counters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    pub dispatches: u64,
    pub buffers: u64,
    pub bind_groups: u64,
    pub pipelines: u64,
}

impl Counters {
    fn bump(c: &std::sync::atomic::AtomicU64) {
        c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    pub fn snapshot(&self) -> CounterSnapshot {
        let l = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        CounterSnapshot {
            dispatches: l(&self.dispatches),
            buffers: l(&self.buffers),
            bind_groups: l(&self.bind_groups),
            pipelines: l(&self.pipelines),
        }
    }
}

/// What wgpu's device-lost callback and uncaptured-error handler recorded
/// (wgpu's default handler panics; ours records, and [`Gpu::check_health`]
/// turns the record into an error at the next wait).
#[derive(Default)]
struct Health {
    lost: std::sync::Mutex<Option<String>>,
    uncaptured: std::sync::Mutex<Option<String>>,
}

/// Lock `m`, taking the value even if a panicking thread poisoned it.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Mesa's Vulkan device-select layer (an implicit layer that comes with
/// mesa-vulkan-drivers) connects to a Wayland compositor whenever an
/// application enables VK_KHR_wayland_surface, which wgpu always does. On a
/// machine without XDG_RUNTIME_DIR (headless, CI) libwayland then prints
/// "error: XDG_RUNTIME_DIR is invalid or not set in the environment." for
/// every Vulkan instance. The layer only reorders physical devices (wgllm
/// ranks adapters itself), so there it is switched off with its own
/// variable, NODEVICE_SELECT=1, unless the user set NODEVICE_SELECT or any
/// MESA_VK_DEVICE_SELECT* variable. Runs once, before the first instance.
fn quiet_mesa_device_select() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if !cfg!(all(unix, not(target_vendor = "apple"))) {
            return;
        }
        let runtime_dir_ok =
            std::env::var_os("XDG_RUNTIME_DIR").is_some_and(|d| std::path::Path::new(&d).is_dir());
        let user_chose = std::env::vars_os().any(|(k, _)| {
            let k = k.to_string_lossy();
            k == "NODEVICE_SELECT" || k.starts_with("MESA_VK_DEVICE_SELECT")
        });
        if !runtime_dir_ok && !user_chose {
            std::env::set_var("NODEVICE_SELECT", "1");
        }
    });
}

/// A wgpu instance on `backends`. wgpu's own instance variables
/// (WGPU_VALIDATION, WGPU_DEBUG, ...) still apply; the backends are ours.
fn instance(backends: wgpu::Backends) -> wgpu::Instance {
    quiet_mesa_device_select();
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    desc.backends = backends;
    wgpu::Instance::new(desc)
}

/// Every adapter wgpu can see on the backends `opts` selects (see
/// [`GpuOptions::backends`]), in wgpu's order; indices count from 0 within
/// that selection.
#[cfg(not(target_arch = "wasm32"))]
pub fn list_adapters(opts: &GpuOptions) -> Result<Vec<(wgpu::Adapter, AdapterDesc)>> {
    let (backends, _) = opts.resolve_backends()?;
    Ok(list_adapters_on(backends))
}

#[cfg(not(target_arch = "wasm32"))]
fn list_adapters_on(backends: wgpu::Backends) -> Vec<(wgpu::Adapter, AdapterDesc)> {
    block_on(adapters_on(backends))
}

/// Every adapter on `backends` (in a browser: the one its WebGPU offers).
async fn adapters_on(backends: wgpu::Backends) -> Vec<(wgpu::Adapter, AdapterDesc)> {
    let inst = instance(backends);
    let adapters = inst.enumerate_adapters(backends).await;
    adapters
        .into_iter()
        .enumerate()
        .map(|(index, a)| {
            let desc = AdapterDesc {
                index,
                info: a.get_info(),
                limits: a.limits(),
                features: a.features(),
            };
            (a, desc)
        })
        .collect()
}

/// Choose an adapter: by `selector` (index, or a case-insensitive substring of
/// the name) when given, else the best kind (discrete > integrated > virtual >
/// other > CPU), preferring Vulkan/Metal/DX12 over GL on ties.
fn choose(
    mut all: Vec<(wgpu::Adapter, AdapterDesc)>,
    selector: Option<&str>,
    backends: (wgpu::Backends, &str),
) -> Result<(wgpu::Adapter, AdapterDesc)> {
    if all.is_empty() {
        if backends.0 == wgpu::Backends::all() {
            return Err(Error::NoAdapter(
                "wgpu enumerated no Vulkan, Metal, DX12 or GL adapters".into(),
            ));
        }
        #[cfg(not(target_arch = "wasm32"))]
        let elsewhere = all_names(
            &list_adapters_on(wgpu::Backends::all())
                .into_iter()
                .map(|(_, d)| d)
                .collect::<Vec<_>>(),
        );
        #[cfg(target_arch = "wasm32")]
        let elsewhere = String::from(
            "none: the browser offers no WebGPU adapter (navigator.gpu is missing or \
             requestAdapter() returned null; Chromium without a GPU needs \
             --enable-unsafe-webgpu --use-webgpu-adapter=swiftshader)",
        );
        let gl_hint = if backends.0.contains(wgpu::Backends::GL) {
            "; wgpu's GL backend needs EGL and a GL driver (Debian/Ubuntu: `apt-get install \
             libegl1 libegl-mesa0 libgl1-mesa-dri` for Mesa's llvmpipe)"
        } else {
            ""
        };
        return Err(Error::NoAdapter(format!(
            "no adapter on backend {} (chosen by {}); on all backends: {}{gl_hint}",
            backend_names(backends.0),
            backends.1,
            if elsewhere.is_empty() {
                "none".to_string()
            } else {
                elsewhere
            }
        )));
    }
    let names = || {
        all_names(
            &all.iter()
                .map(|(_, d)| d.clone())
                .collect::<Vec<AdapterDesc>>(),
        )
    };
    if let Some(sel) = selector.map(str::trim).filter(|s| !s.is_empty()) {
        if let Ok(i) = sel.parse::<usize>() {
            if i < all.len() {
                return Ok(all.swap_remove(i));
            }
            return Err(Error::AdapterSelect(format!(
                "adapter index {i} out of range; available: {}",
                names()
            )));
        }
        let lower = sel.to_lowercase();
        if let Some(pos) = all
            .iter()
            .position(|(_, d)| d.info.name.to_lowercase().contains(&lower))
        {
            return Ok(all.swap_remove(pos));
        }
        return Err(Error::AdapterSelect(format!(
            "no adapter name contains '{sel}'; available: {}",
            names()
        )));
    }
    let gl_penalty = |d: &AdapterDesc| u32::from(d.info.backend == wgpu::Backend::Gl);
    let best = all
        .iter()
        .enumerate()
        .min_by_key(|(_, (_, d))| (d.rank(), gl_penalty(d), d.index))
        .map(|(i, _)| i)
        .expect("non-empty");
    Ok(all.swap_remove(best))
}

fn all_names(all: &[AdapterDesc]) -> String {
    all.iter()
        .map(|d| format!("[{}] {} ({:?})", d.index, d.info.name, d.info.backend))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Options for creating a [`Gpu`]. Each `None` falls back to its
/// environment variable, then to the automatic choice.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// Adapter index or name substring; falls back to `WGLLM_ADAPTER`.
    pub adapter: Option<String>,
    /// Backends to enumerate; falls back to `WGLLM_BACKEND`, then to wgpu's
    /// own `WGPU_BACKEND`, then all backends (GL ranked last on ties).
    pub backends: Option<BackendChoice>,
    /// Kernel profile; falls back to `WGLLM_KERNELS`, then auto.
    pub kernels: Option<KernelChoice>,
    /// Cap the storage-binding size used for splitting tensors (tests use a
    /// tiny value so the split paths run on small data). Never raises the
    /// adapter's own limit.
    pub max_binding_override: Option<u64>,
    /// Parameter-block binding ([`ParamsBinding`]); falls back to
    /// `WGLLM_PARAMS`, then auto.
    pub params: Option<ParamsChoice>,
    /// Shader decisions to force ([`Decisions`]); falls back to
    /// `WGLLM_DECISIONS`, then none (the profile, or the tune cache).
    pub decisions: Option<Decisions>,
    /// When `tune` runs at a model load; falls back to `WGLLM_TUNE`, then
    /// [`TuneMode::Cache`]. Read by `tune::prepare`, not by [`Gpu::new`].
    pub tune: Option<TuneMode>,
}

impl GpuOptions {
    /// The backends to enumerate and what chose them (for messages).
    pub fn resolve_backends(&self) -> Result<(wgpu::Backends, &'static str)> {
        if let Some((b, by)) =
            resolve_choice(self.backends, "GpuOptions::backends", "WGLLM_BACKEND")?
        {
            return Ok((b.0, by));
        }
        if env_value("WGPU_BACKEND").is_some() {
            // wgpu's own variable and parsing (unknown names are ignored).
            return Ok((wgpu::Backends::all().with_env(), "WGPU_BACKEND"));
        }
        Ok((wgpu::Backends::all(), "default"))
    }

    /// The requested kernel profile and what chose it.
    pub fn resolve_kernels(&self) -> Result<(KernelChoice, &'static str)> {
        Ok(
            resolve_choice(self.kernels, "GpuOptions::kernels", "WGLLM_KERNELS")?
                .unwrap_or((KernelChoice::Auto, "default")),
        )
    }

    /// The requested parameter binding and what chose it.
    pub fn resolve_params(&self) -> Result<(ParamsChoice, &'static str)> {
        Ok(
            resolve_choice(self.params, "GpuOptions::params", "WGLLM_PARAMS")?
                .unwrap_or((ParamsChoice::Auto, "default")),
        )
    }

    /// The shader decisions forced by options or `WGLLM_DECISIONS`, and
    /// what set them (none: `default`).
    pub fn resolve_decisions(&self) -> Result<(Decisions, &'static str)> {
        Ok(
            resolve_choice(self.decisions, "GpuOptions::decisions", "WGLLM_DECISIONS")?
                .unwrap_or((Decisions::default(), "default")),
        )
    }

    /// When the autotuner runs at a model load, and what chose it.
    pub fn resolve_tune(&self) -> Result<(TuneMode, &'static str)> {
        Ok(resolve_choice(self.tune, "GpuOptions::tune", "WGLLM_TUNE")?
            .unwrap_or((TuneMode::default(), "default")))
    }
}

/// The one resolver behind every `GpuOptions::resolve_*`: the option when
/// set, else the environment variable `var` when set and not blank (a value
/// that does not parse is an error naming the variable), else `None`.
fn resolve_choice<T: FromStr<Err = String>>(
    option: Option<T>,
    field: &'static str,
    var: &'static str,
) -> Result<Option<(T, &'static str)>> {
    if let Some(v) = option {
        return Ok(Some((v, field)));
    }
    match env_value(var) {
        Some(v) => v
            .parse()
            .map(|t| Some((t, var)))
            .map_err(|e| Error::invalid(format!("{var}={v:?}: {e}"))),
        None => Ok(None),
    }
}

impl Gpu {
    /// Create a device on the best (or selected) adapter with the adapter's
    /// own limits and the optional features our kernels can use.
    /// ([`Gpu::new_async`], waited for here.)
    #[cfg(not(target_arch = "wasm32"))]
    pub fn new(opts: &GpuOptions) -> Result<Self> {
        block_on(Self::new_async(opts))
    }

    /// [`Gpu::new`] as a future: the one implementation, awaited by the
    /// browser build (whose adapter and device requests are promises) and
    /// blocked on natively.
    pub async fn new_async(opts: &GpuOptions) -> Result<Self> {
        let (kernel_choice, kernels_by) = opts.resolve_kernels()?;
        let (params_choice, params_by) = opts.resolve_params()?;
        let (decisions, decisions_by) = opts.resolve_decisions()?;
        let backends = if cfg!(target_arch = "wasm32") {
            (wgpu::Backends::BROWSER_WEBGPU, "the browser")
        } else {
            opts.resolve_backends()?
        };
        let selector = opts
            .adapter
            .clone()
            .or_else(|| std::env::var("WGLLM_ADAPTER").ok());
        let (adapter, desc) = choose(adapters_on(backends.0).await, selector.as_deref(), backends)?;
        let wanted =
            wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP | wgpu::Features::TIMESTAMP_QUERY;
        let features = desc.features & wanted;
        let limits = desc.limits.clone();
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("wgllm"),
                required_features: features,
                required_limits: limits.clone(),
                experimental_features: wgpu::ExperimentalFeatures::disabled(),
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            })
            .await
            .map_err(|e| Error::Device {
                adapter: desc.info.name.clone(),
                msg: e.to_string(),
            })?;
        let health = Arc::new(Health::default());
        let h = health.clone();
        device.set_device_lost_callback(move |reason, msg| {
            *lock(&h.lost) = Some(format!("{reason:?}: {msg}"));
        });
        let h = health.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            lock(&h.uncaptured).get_or_insert_with(|| e.to_string());
        }));
        // Pipeline creation is checked with an error scope (see `kernel`);
        // bind groups and dispatches are validated by the ops before they are
        // made, so a wgpu validation error past that point is a wgllm bug.
        let mut max_binding = limits.max_storage_buffer_binding_size;
        if let Some(cap) = opts.max_binding_override {
            max_binding = max_binding.min(cap.max(4));
        }
        let is_cpu = desc.info.device_type == wgpu::DeviceType::Cpu;
        let caps = Caps {
            shader_f16: features.contains(wgpu::Features::SHADER_F16),
            subgroup: features.contains(wgpu::Features::SUBGROUP),
            subgroup_min_size: desc.info.subgroup_min_size,
            subgroup_max_size: desc.info.subgroup_max_size,
            max_binding,
            max_buffer: limits.max_buffer_size,
            max_workgroups_per_dim: limits.max_compute_workgroups_per_dimension,
            max_workgroup_storage: limits.max_compute_workgroup_storage_size,
            max_invocations: limits.max_compute_invocations_per_workgroup,
            is_cpu,
            kernels: kernel_choice.resolve(is_cpu),
            decisions,
        };
        let desc = AdapterDesc {
            features,
            limits,
            ..desc
        };
        let kernels_chosen_by = match kernel_choice {
            KernelChoice::Auto if is_cpu => "auto: CPU-type adapter",
            KernelChoice::Auto => "auto: GPU adapter",
            KernelChoice::Force(_) if kernels_by == "WGLLM_KERNELS" => "forced by WGLLM_KERNELS",
            KernelChoice::Force(_) => "forced",
        };
        let (params, mut params_chosen_by) = params_choice.resolve(&desc.info);
        if params_by == "WGLLM_PARAMS" {
            params_chosen_by = "forced by WGLLM_PARAMS";
        }
        Ok(Gpu {
            device,
            queue,
            adapter: desc,
            caps,
            kernels_chosen_by,
            params,
            params_chosen_by,
            decision_sources: decisions
                .entries()
                .into_iter()
                .map(|(k, _)| (k, decisions_by.to_string()))
                .collect(),
            health,
            counters: Counters::default(),
            upload_pending: Default::default(),
            kernel_cache: Default::default(),
        })
    }

    /// Every buffer wgllm creates goes through here (counted).
    pub fn create_buffer(&self, desc: &wgpu::BufferDescriptor) -> wgpu::Buffer {
        Counters::bump(&self.counters.buffers);
        self.device.create_buffer(desc)
    }

    /// An error when the device was lost (driver reset, `destroy`) or wgpu
    /// reported an error no scope captured since the last check (e.g. an
    /// allocation made through [`Gpu::storage`] that failed). [`Gpu::wait`]
    /// calls it, so every readback and submit surfaces these as errors.
    pub fn check_health(&self) -> Result<()> {
        if let Some(m) = lock(&self.health.lost).clone() {
            return Err(Error::Gpu {
                what: format!("device '{}' lost", self.adapter.info.name),
                msg: format!("{m}; results after this point are not trustworthy, restart the run"),
            });
        }
        if let Some(m) = lock(&self.health.uncaptured).take() {
            return Err(Error::Gpu {
                what: "an earlier device operation".into(),
                msg: m,
            });
        }
        Ok(())
    }

    /// Run `f` (which creates one buffer) inside out-of-memory and
    /// validation error scopes; a captured error names the buffer and size.
    fn scoped_buffer(
        &self,
        label: &str,
        size: u64,
        f: impl FnOnce() -> wgpu::Buffer,
    ) -> Result<wgpu::Buffer> {
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let val = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let buf = f();
        let v = self.settle(
            val.pop(),
            format!("allocating buffer '{label}' of {size} bytes"),
        );
        let o = self.settle(
            oom.pop(),
            format!("allocating buffer '{label}' of {size} bytes"),
        );
        if let Some(e) = o.or(v) {
            let kind = match e {
                wgpu::Error::OutOfMemory { .. } => "out of device memory",
                _ => "refused by the device",
            };
            return Err(Error::Gpu {
                what: format!("allocating buffer '{label}' of {size} bytes"),
                msg: format!(
                    "{kind}: {e}; the device offers max_buffer_size {} bytes",
                    self.caps.max_buffer
                ),
            }
            .hint(
                Hint::new()
                    .text("try a smaller ")
                    .name(Setting::MaxContext)
                    .text(" or ")
                    .set(Setting::DType, "bf16"),
            ));
        }
        Ok(buf)
    }

    /// [`Gpu::storage`] with allocation errors (out of memory, over the
    /// device's limits) returned instead of recorded for the next wait.
    pub fn try_storage(&self, label: &str, size: u64) -> Result<wgpu::Buffer> {
        self.scoped_buffer(label, size, || self.storage(label, size))
    }

    pub fn name(&self) -> &str {
        &self.adapter.info.name
    }

    /// Take `d`'s decisions (those it sets) over the current ones, recording
    /// `source` for each: the tune cache or a tuning run, before the model's
    /// ops are built. A decision forced by options or `WGLLM_DECISIONS`
    /// stays forced. (Ops read `caps.decisions` when they are built;
    /// already built ones keep their kernels.)
    pub fn set_decisions(&mut self, d: &Decisions, source: &str) {
        for (k, v) in d.entries() {
            if self.decision_forced(k) {
                continue;
            }
            self.caps.decisions.set(k, &v).expect("a value get() wrote");
            self.decision_sources.retain(|(key, _)| *key != k);
            self.decision_sources.push((k, source.to_string()));
        }
    }

    /// Decision `k` was forced by options or `WGLLM_DECISIONS` (no cache,
    /// tuning run or fallback changes it).
    pub fn decision_forced(&self, k: DecisionKey) -> bool {
        self.decision_sources.iter().any(|(key, by)| {
            *key == k && (by == "WGLLM_DECISIONS" || by == "GpuOptions::decisions")
        })
    }

    /// What set decision `k` ("profile" when nothing did).
    pub fn decision_source(&self, k: DecisionKey) -> &str {
        self.decision_sources
            .iter()
            .find(|(key, _)| *key == k)
            .map_or("profile", |(_, by)| by.as_str())
    }

    /// The kernel profile in use and why, e.g. `cpu (auto: CPU-type
    /// adapter)`, for reports.
    pub fn kernels_desc(&self) -> String {
        format!("{} ({})", self.caps.kernels.name(), self.kernels_chosen_by)
    }

    // ---------------------------------------------------------------- buffers

    /// A storage buffer holding `data` (padded to a multiple of 4 bytes),
    /// written as [`Gpu::storage_streamed`] does.
    pub fn storage_init(&self, label: &str, data: &[u8]) -> Result<wgpu::Buffer> {
        self.storage_streamed(label, data, &mut |_, _| Ok(()), &mut |_| {})
    }

    /// A storage buffer holding `data` (padded to a multiple of 4 bytes),
    /// written in pieces of at most [`UPLOAD_PIECE`] bytes through
    /// `queue.write_buffer`, waiting for the device whenever more than
    /// [`UPLOAD_IN_FLIGHT`] bytes of staging are queued: the host memory an
    /// upload adds stays bounded however large the data (no whole-tensor
    /// staging copies, which wgpu would keep until the next submission).
    /// `check(offset, piece)` runs on each piece before it is written (the
    /// loader's non-finite scan, on bytes that are about to be read
    /// anyway); an error stops the upload. `done(piece)` runs once wgpu has
    /// copied the piece (the loader drops those pages of its memory map).
    pub fn storage_streamed(
        &self,
        label: &str,
        data: &[u8],
        check: &mut dyn FnMut(usize, &[u8]) -> Result<()>,
        done: &mut dyn FnMut(&[u8]),
    ) -> Result<wgpu::Buffer> {
        use std::sync::atomic::Ordering::Relaxed;
        let size = pad4(data.len() as u64).max(4);
        let buf = self.scoped_buffer(label, size, || self.storage(label, size))?;
        let mut tail = [0u8; 4];
        let mut offset = 0usize;
        for piece in data.chunks(UPLOAD_PIECE) {
            check(offset, piece)?;
            // write_buffer takes multiples of 4 bytes: only the last piece
            // can be shorter, and its last partial word goes on its own.
            let whole = piece.len() / 4 * 4;
            if whole > 0 {
                self.queue
                    .write_buffer(&buf, offset as u64, &piece[..whole]);
            }
            if whole < piece.len() {
                tail[..piece.len() - whole].copy_from_slice(&piece[whole..]);
                self.queue
                    .write_buffer(&buf, (offset + whole) as u64, &tail);
            }
            done(piece);
            offset += piece.len();
            let queued = self
                .upload_pending
                .fetch_add(pad4(piece.len() as u64), Relaxed)
                + pad4(piece.len() as u64);
            if queued >= UPLOAD_IN_FLIGHT {
                self.finish_uploads()?;
            }
        }
        if data.is_empty() {
            self.queue.write_buffer(&buf, 0, &tail);
        }
        Ok(buf)
    }

    /// An `rgba32uint` texture of [`TEXTURE_WIDTH`] texels per row holding
    /// `data` (a multiple of 16 bytes: texel g = bytes 16g..16g+16), the
    /// last texel row padded with zeros. Written as
    /// [`Gpu::storage_streamed`] writes a buffer: pieces of whole texel rows
    /// (at most [`UPLOAD_PIECE`] bytes), `check` before and `done` after
    /// each, waiting for the device past [`UPLOAD_IN_FLIGHT`] bytes queued.
    pub fn texture_streamed(
        &self,
        label: &str,
        data: &[u8],
        check: &mut dyn FnMut(usize, &[u8]) -> Result<()>,
        done: &mut dyn FnMut(&[u8]),
    ) -> Result<(wgpu::Texture, wgpu::TextureView)> {
        use std::sync::atomic::Ordering::Relaxed;
        let row_bytes = TEXTURE_WIDTH as usize * 16;
        if data.len() % 16 != 0 || data.is_empty() {
            return Err(Error::invalid(format!(
                "texture '{label}': {} bytes is not a whole number of 16-byte texels",
                data.len()
            )));
        }
        let height = data.len().div_ceil(row_bytes) as u32;
        let lim = self.device.limits().max_texture_dimension_2d;
        if height > lim || TEXTURE_WIDTH > lim {
            return Err(Error::invalid(format!(
                "texture '{label}': {TEXTURE_WIDTH} x {height} texels exceeds the device's                  max_texture_dimension_2d of {lim}"
            )));
        }
        let size = wgpu::Extent3d {
            width: TEXTURE_WIDTH,
            height,
            depth_or_array_layers: 1,
        };
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let val = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let tex = self.device.create_texture(&wgpu::TextureDescriptor {
            label: Some(label),
            size,
            mip_level_count: 1,
            sample_count: 1,
            dimension: wgpu::TextureDimension::D2,
            format: wgpu::TextureFormat::Rgba32Uint,
            usage: wgpu::TextureUsages::TEXTURE_BINDING
                | wgpu::TextureUsages::COPY_DST
                | wgpu::TextureUsages::COPY_SRC,
            view_formats: &[],
        });
        let what = format!("allocating texture '{label}' of {TEXTURE_WIDTH} x {height} texels");
        let v = self.settle(val.pop(), what.clone());
        let o = self.settle(oom.pop(), what.clone());
        if let Some(e) = o.or(v) {
            return Err(Error::Gpu {
                what,
                msg: e.to_string(),
            });
        }
        let rows_per_piece = (UPLOAD_PIECE / row_bytes).max(1);
        let mut tail = Vec::new();
        for (i, piece) in data.chunks(rows_per_piece * row_bytes).enumerate() {
            let offset = i * rows_per_piece * row_bytes;
            check(offset, piece)?;
            let rows = piece.len().div_ceil(row_bytes) as u32;
            // write_texture takes whole texel rows: the last partial row is
            // padded with zeros in a copy of that row only.
            let src: &[u8] = if piece.len() % row_bytes == 0 {
                piece
            } else {
                tail.clear();
                tail.extend_from_slice(piece);
                tail.resize(rows as usize * row_bytes, 0);
                &tail
            };
            self.queue.write_texture(
                wgpu::TexelCopyTextureInfo {
                    texture: &tex,
                    mip_level: 0,
                    origin: wgpu::Origin3d {
                        x: 0,
                        y: (i * rows_per_piece) as u32,
                        z: 0,
                    },
                    aspect: wgpu::TextureAspect::All,
                },
                src,
                wgpu::TexelCopyBufferLayout {
                    offset: 0,
                    bytes_per_row: Some(row_bytes as u32),
                    rows_per_image: Some(rows),
                },
                wgpu::Extent3d {
                    width: TEXTURE_WIDTH,
                    height: rows,
                    depth_or_array_layers: 1,
                },
            );
            done(piece);
            let queued =
                self.upload_pending.fetch_add(src.len() as u64, Relaxed) + src.len() as u64;
            if queued >= UPLOAD_IN_FLIGHT {
                self.finish_uploads()?;
            }
        }
        let view = tex.create_view(&Default::default());
        Ok((tex, view))
    }

    /// Copy the first `len` bytes of a weight texture
    /// ([`Gpu::texture_streamed`]) back to the host. Blocks.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn read_texture(&self, tex: &wgpu::Texture, len: u64) -> Result<Vec<u8>> {
        let row_bytes = u64::from(TEXTURE_WIDTH) * 16;
        let size = tex.size();
        let total = row_bytes * u64::from(size.height);
        let staging = self.staging("readback.texture", total);
        let mut enc = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        enc.copy_texture_to_buffer(
            wgpu::TexelCopyTextureInfo {
                texture: tex,
                mip_level: 0,
                origin: wgpu::Origin3d::ZERO,
                aspect: wgpu::TextureAspect::All,
            },
            wgpu::TexelCopyBufferInfo {
                buffer: &staging,
                layout: wgpu::TexelCopyBufferLayout {
                    offset: 0,
                    bytes_per_row: Some(row_bytes as u32),
                    rows_per_image: Some(size.height),
                },
            },
            size,
        );
        self.queue.submit([enc.finish()]);
        let mut b = self.map_staging(&staging, total)?;
        b.truncate(len.min(total) as usize);
        Ok(b)
    }

    /// Hand every queued upload to the device and wait for it, releasing
    /// wgpu's staging copies.
    pub fn finish_uploads(&self) -> Result<()> {
        self.queue.submit([]);
        self.wait()?;
        self.upload_pending
            .store(0, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// A zero-filled storage buffer of `size` bytes (rounded up to 4).
    pub fn storage(&self, label: &str, size: u64) -> wgpu::Buffer {
        self.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: pad4(size).max(4),
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_DST
                | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        })
    }

    /// A parameter buffer holding `data`; writable later with
    /// `queue.write_buffer`. Bindable as a uniform or a read-only storage
    /// buffer (see [`ParamsBinding`]).
    pub fn uniform<T: bytemuck::Pod>(&self, label: &str, data: &T) -> Result<wgpu::Buffer> {
        let bytes = bytemuck::bytes_of(data);
        let buf = self.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: pad16(bytes.len() as u64),
            usage: wgpu::BufferUsages::UNIFORM
                | wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: true,
        });
        fill_mapped(&buf, label, bytes)?;
        Ok(buf)
    }

    /// A staging buffer for readback of `size` bytes.
    pub fn staging(&self, label: &str, size: u64) -> wgpu::Buffer {
        self.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: pad4(size).max(4),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// Copy `len` bytes at `offset` of `src` back to the host. Blocks.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn read_bytes(&self, src: &wgpu::Buffer, offset: u64, len: u64) -> Result<Vec<u8>> {
        block_on(self.read_bytes_async(src, offset, len))
    }

    /// [`Gpu::read_bytes`] as a future.
    pub async fn read_bytes_async(
        &self,
        src: &wgpu::Buffer,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>> {
        let staging = self.staging("readback", len);
        let mut enc = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        enc.copy_buffer_to_buffer(src, offset, &staging, 0, pad4(len));
        self.queue.submit([enc.finish()]);
        self.map_staging_async(&staging, len).await
    }

    /// Map a staging buffer that a submitted copy filled, and return its
    /// bytes. Blocks ([`Gpu::map_staging_async`], waited for here).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn map_staging(&self, staging: &wgpu::Buffer, len: u64) -> Result<Vec<u8>> {
        block_on(self.map_staging_async(staging, len))
    }

    /// [`Gpu::map_staging`] as a future. Natively the device poll inside
    /// [`Gpu::wait`] runs the map callback, so the future is ready when it
    /// is first polled; in a browser the callback runs from the event loop
    /// and the future resolves then.
    pub async fn map_staging_async(&self, staging: &wgpu::Buffer, len: u64) -> Result<Vec<u8>> {
        let slice = staging.slice(..);
        let (tx, rx) = oneshot();
        slice.map_async(wgpu::MapMode::Read, move |r| tx.send(r));
        self.wait()?;
        let mapped = rx.await;
        self.check_health()?;
        match mapped {
            Some(Ok(())) => {}
            Some(Err(e)) => {
                return Err(Error::Gpu {
                    what: "readback map".into(),
                    msg: e.to_string(),
                })
            }
            None => {
                return Err(Error::Gpu {
                    what: "readback map".into(),
                    msg: "map callback never ran".into(),
                })
            }
        }
        let out = {
            let view = slice.get_mapped_range().map_err(|e| Error::Gpu {
                what: "readback view".into(),
                msg: e.to_string(),
            })?;
            view[..len as usize].to_vec()
        };
        staging.unmap();
        Ok(out)
    }

    /// Read `n` f32 values from the start of `src`.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn read_f32(&self, src: &wgpu::Buffer, n: usize) -> Result<Vec<f32>> {
        let bytes = self.read_bytes(src, 0, (n * 4) as u64)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    /// Read `n` u32 values from the start of `src`.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn read_u32(&self, src: &wgpu::Buffer, n: usize) -> Result<Vec<u32>> {
        let bytes = self.read_bytes(src, 0, (n * 4) as u64)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    /// Block until the queue is idle (in a browser, where nothing may
    /// block, the device polls itself and this only checks health).
    pub fn wait(&self) -> Result<()> {
        self.poll_wait(None)
    }

    /// Block until submission `sub` is done (and the callbacks it made
    /// ready have run), not the work submitted after it; as [`Self::wait`]
    /// in a browser.
    pub fn wait_for(&self, sub: &wgpu::SubmissionIndex) -> Result<()> {
        self.poll_wait(Some(sub.clone()))
    }

    fn poll_wait(&self, submission_index: Option<wgpu::SubmissionIndex>) -> Result<()> {
        self.device
            .poll(wgpu::PollType::Wait {
                submission_index,
                timeout: None,
            })
            .map_err(|e| Error::Gpu {
                what: "device poll".into(),
                msg: e.to_string(),
            })?;
        self.check_health()
    }

    // -------------------------------------------------------------- pipelines

    /// Compile `source` (with the common helpers prepended) into a compute
    /// pipeline with an auto-derived layout. `constants` fill WGSL `override`s.
    pub fn kernel(
        &self,
        label: &str,
        source: &str,
        entry: &str,
        constants: &[(&str, f64)],
    ) -> Result<Kernel> {
        let mut full = format!("{COMMON_WGSL}\n{source}");
        if self.params != ParamsBinding::Uniform {
            full = full.replace(ParamsBinding::Uniform.wgsl(), self.params.wgsl());
        }
        let key: KernelKey = (
            label.to_string(),
            entry.to_string(),
            full,
            constants
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_bits()))
                .collect(),
        );
        if let Some((_, k)) = lock(&self.kernel_cache).iter().find(|(k, _)| *k == key) {
            return Ok(k.clone());
        }
        let full = key.2.clone();
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = self
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(label),
                source: wgpu::ShaderSource::Wgsl(full.into()),
            });
        Counters::bump(&self.counters.pipelines);
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(label),
                layout: None,
                module: &module,
                entry_point: Some(entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants,
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            });
        if let Some(err) = self.settle(scope.pop(), format!("compiling kernel '{label}'")) {
            return Err(Error::Gpu {
                what: format!("compiling kernel '{label}' entry '{entry}'"),
                msg: err.to_string(),
            });
        }
        let layout = pipeline.get_bind_group_layout(0);
        let kernel = Kernel {
            label: label.to_string(),
            pipeline: Arc::new(pipeline),
            layout,
        };
        lock(&self.kernel_cache).push((key, kernel.clone()));
        Ok(kernel)
    }

    /// The error an error scope caught. Natively the scope's future is
    /// waited for here. A browser cannot block: the scope is popped at once
    /// (so it still covers only `what`), and an error it reports later is
    /// recorded like an uncaptured one, for the next [`Gpu::check_health`]
    /// (every readback runs it) to return, named by `what`.
    fn settle(
        &self,
        scope: impl std::future::Future<Output = Option<wgpu::Error>> + 'static,
        what: String,
    ) -> Option<wgpu::Error> {
        #[cfg(not(target_arch = "wasm32"))]
        {
            let _ = what;
            block_on(scope)
        }
        #[cfg(target_arch = "wasm32")]
        {
            let health = self.health.clone();
            wasm_bindgen_futures::spawn_local(async move {
                if let Some(e) = scope.await {
                    lock(&health.uncaptured).get_or_insert_with(|| format!("{what}: {e}"));
                }
            });
            None
        }
    }

    /// Bind `buffers` to bindings 0..n of `kernel`'s group 0 (whole buffers).
    pub fn bind(&self, kernel: &Kernel, buffers: &[&wgpu::Buffer]) -> wgpu::BindGroup {
        let entries: Vec<wgpu::BindGroupEntry> = buffers
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: b.as_entire_binding(),
            })
            .collect();
        Counters::bump(&self.counters.bind_groups);
        self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(&kernel.label),
            layout: &kernel.layout,
            entries: &entries,
        })
    }

    /// Bind `entries` (binding number, whole buffer) of `kernel`'s group 0:
    /// for kernels whose bindings are not numbered 0..n.
    pub fn bind_entries(
        &self,
        kernel: &Kernel,
        entries: &[(u32, &wgpu::Buffer)],
    ) -> wgpu::BindGroup {
        let entries: Vec<wgpu::BindGroupEntry> = entries
            .iter()
            .map(|(i, b)| wgpu::BindGroupEntry {
                binding: *i,
                resource: b.as_entire_binding(),
            })
            .collect();
        Counters::bump(&self.counters.bind_groups);
        self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(&kernel.label),
            layout: &kernel.layout,
            entries: &entries,
        })
    }

    /// Bind `entries` (binding number, any resource: buffers and weight
    /// texture views) of `kernel`'s group 0.
    pub fn bind_resources(
        &self,
        kernel: &Kernel,
        entries: &[(u32, wgpu::BindingResource<'_>)],
    ) -> wgpu::BindGroup {
        let entries: Vec<wgpu::BindGroupEntry> = entries
            .iter()
            .map(|(i, r)| wgpu::BindGroupEntry {
                binding: *i,
                resource: r.clone(),
            })
            .collect();
        Counters::bump(&self.counters.bind_groups);
        self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(&kernel.label),
            layout: &kernel.layout,
            entries: &entries,
        })
    }

    /// Workgroup grid for `n` workgroups: 1D while it fits in one dimension,
    /// else 2D (`x` = max per dimension). Kernels recover the linear index with
    /// `wg_linear()` from common.wgsl and must guard against overshoot.
    pub fn grid(&self, n: u32) -> (u32, u32, u32) {
        grid_for(n, self.caps.max_workgroups_per_dim)
    }

    /// Encode one dispatch of `n` workgroups into an existing pass.
    pub fn dispatch_in(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        kernel: &Kernel,
        bind: &wgpu::BindGroup,
        n: u32,
    ) {
        if n == 0 {
            return;
        }
        let (x, y, z) = self.grid(n);
        pass.set_pipeline(&kernel.pipeline);
        pass.set_bind_group(0, bind, &[]);
        pass.dispatch_workgroups(x, y, z);
        Counters::bump(&self.counters.dispatches);
    }

    pub fn encoder(&self) -> wgpu::CommandEncoder {
        self.device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None })
    }

    /// Submit and wait; report validation errors raised while encoding.
    pub fn submit_wait(&self, enc: wgpu::CommandEncoder) -> Result<()> {
        self.queue.submit([enc.finish()]);
        self.wait()
    }
}

/// A compiled compute pipeline and its group-0 layout.
#[derive(Clone)]
pub struct Kernel {
    pub label: String,
    pub pipeline: Arc<wgpu::ComputePipeline>,
    pub layout: wgpu::BindGroupLayout,
}

/// Wait for a future on the calling thread (native only; wgpu's futures
/// are ready once the device has been polled).
#[cfg(not(target_arch = "wasm32"))]
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    pollster::block_on(f)
}

/// The sending half of [`oneshot`].
pub struct OneshotTx<T>(Arc<std::sync::Mutex<OneshotState<T>>>);

/// The receiving half of [`oneshot`]: a future of the sent value, `None`
/// when the sender was dropped without sending.
pub struct OneshotRx<T>(Arc<std::sync::Mutex<OneshotState<T>>>);

struct OneshotState<T> {
    value: Option<T>,
    sender_gone: bool,
    waker: Option<std::task::Waker>,
}

/// A single-value channel for wgpu callbacks (`map_async`), whose receiver
/// is a future: polled after a native device wait it is ready at once, in
/// a browser it wakes when the callback runs.
pub fn oneshot<T>() -> (OneshotTx<T>, OneshotRx<T>) {
    let s = Arc::new(std::sync::Mutex::new(OneshotState {
        value: None,
        sender_gone: false,
        waker: None,
    }));
    (OneshotTx(s.clone()), OneshotRx(s))
}

impl<T> OneshotTx<T> {
    pub fn send(self, v: T) {
        lock(&self.0).value = Some(v);
    }
}

impl<T> Drop for OneshotTx<T> {
    fn drop(&mut self) {
        let mut s = lock(&self.0);
        s.sender_gone = true;
        if let Some(w) = s.waker.take() {
            w.wake();
        }
    }
}

impl<T> std::future::Future for OneshotRx<T> {
    type Output = Option<T>;
    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<T>> {
        let mut s = lock(&self.0);
        if let Some(v) = s.value.take() {
            return std::task::Poll::Ready(Some(v));
        }
        if s.sender_gone {
            return std::task::Poll::Ready(None);
        }
        s.waker = Some(cx.waker().clone());
        std::task::Poll::Pending
    }
}

/// Copy `data` into a buffer created with `mapped_at_creation`, then unmap.
fn fill_mapped(buf: &wgpu::Buffer, label: &str, data: &[u8]) -> Result<()> {
    {
        let mut view = buf
            .slice(..)
            .get_mapped_range_mut()
            .map_err(|e| Error::Gpu {
                what: format!("mapping new buffer '{label}'"),
                msg: e.to_string(),
            })?;
        view.slice(..data.len()).copy_from_slice(data);
    }
    buf.unmap();
    Ok(())
}

/// See [`Gpu::grid`].
pub fn grid_for(n: u32, max_per_dim: u32) -> (u32, u32, u32) {
    let max = max_per_dim.max(1);
    if n <= max {
        (n, 1, 1)
    } else {
        let y = n.div_ceil(max);
        (max, y, 1)
    }
}

pub fn pad4(n: u64) -> u64 {
    n.div_ceil(4) * 4
}

pub fn pad16(n: u64) -> u64 {
    n.div_ceil(16).max(1) * 16
}

/// The per-step values every kernel can read (binding 1 of each kernel): the
/// number of tokens in this pass and where they sit in the sequence.
/// Written once per step with `queue.write_buffer`, never reallocated.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Step {
    /// Tokens processed in this pass (rows of the activations).
    pub n_tokens: u32,
    /// Position of the first of them in the sequence.
    pub pos_offset: u32,
    /// Valid KV positions after this pass (= pos_offset + n_tokens).
    pub kv_len: u32,
    /// Always 0: the kernels read it as an opaque zero (`Step.zero` in
    /// common.wgsl, for the compensated sums) that no compiler can fold.
    pub _pad: u32,
}

impl Step {
    pub fn new(n_tokens: u32, pos_offset: u32) -> Self {
        Step {
            n_tokens,
            pos_offset,
            kv_len: pos_offset + n_tokens,
            _pad: 0,
        }
    }
}

/// Seconds since an arbitrary start, for the tokens/s figures (std's
/// `Instant` panics on wasm32-unknown-unknown; the browser's clock there).
pub fn now_s() -> f64 {
    #[cfg(not(target_arch = "wasm32"))]
    {
        static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        START
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_secs_f64()
    }
    #[cfg(target_arch = "wasm32")]
    {
        js_sys::Date::now() / 1000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test device (`testutil::gpu`'s, which sits above this module).
    fn test_gpu() -> &'static Gpu {
        static GPU: std::sync::OnceLock<Gpu> = std::sync::OnceLock::new();
        GPU.get_or_init(|| {
            Gpu::new(&GpuOptions::default()).unwrap_or_else(|e| panic!("test GPU: {e}"))
        })
    }

    #[test]
    fn kernel_choice_parses_and_resolves() {
        let p = |s: &str| s.parse::<KernelChoice>();
        assert_eq!(p("auto"), Ok(KernelChoice::Auto));
        assert_eq!(p(" GPU "), Ok(KernelChoice::Force(KernelProfile::Gpu)));
        assert_eq!(p("cpu"), Ok(KernelChoice::Force(KernelProfile::CpuDevice)));
        let e = p("fast").unwrap_err();
        assert!(
            e.contains("'fast'") && e.contains("auto, gpu or cpu"),
            "{e}"
        );
        assert_eq!(KernelChoice::Auto.resolve(true), KernelProfile::CpuDevice);
        assert_eq!(KernelChoice::Auto.resolve(false), KernelProfile::Gpu);
        let gpu = KernelChoice::Force(KernelProfile::Gpu);
        assert_eq!(gpu.resolve(true), KernelProfile::Gpu);
        let cpu = KernelChoice::Force(KernelProfile::CpuDevice);
        assert_eq!(cpu.resolve(false), KernelProfile::CpuDevice);
    }

    #[test]
    fn backend_choice_parses_lists() {
        let p = |s: &str| s.parse::<BackendChoice>().map(|b| b.0);
        assert_eq!(p("gl"), Ok(wgpu::Backends::GL));
        assert_eq!(p("Vulkan"), Ok(wgpu::Backends::VULKAN));
        assert_eq!(
            p("vulkan, gl"),
            Ok(wgpu::Backends::VULKAN | wgpu::Backends::GL)
        );
        assert_eq!(p("dx12"), Ok(wgpu::Backends::DX12));
        assert_eq!(p("metal"), Ok(wgpu::Backends::METAL));
        assert_eq!(p("all"), Ok(wgpu::Backends::all()));
        assert_eq!(p("auto"), Ok(wgpu::Backends::all()));
        let e = p("vulkan,webgl").unwrap_err();
        assert!(
            e.contains("'webgl'") && e.contains("vulkan, metal, dx12, gl"),
            "{e}"
        );
        assert!(p("").is_err());
        assert_eq!(
            backend_names(wgpu::Backends::VULKAN | wgpu::Backends::GL),
            "VULKAN|GL"
        );
    }

    #[test]
    fn params_choice_parses_and_picks_storage_on_lavapipe_only() {
        let p = |s: &str| s.parse::<ParamsChoice>();
        assert_eq!(p("auto"), Ok(ParamsChoice::Auto));
        assert_eq!(
            p(" Storage"),
            Ok(ParamsChoice::Force(ParamsBinding::Storage))
        );
        assert_eq!(
            p("uniform"),
            Ok(ParamsChoice::Force(ParamsBinding::Uniform))
        );
        let e = p("push").unwrap_err();
        assert!(
            e.contains("'push'") && e.contains("auto, uniform or storage"),
            "{e}"
        );
        let info = |backend, name: &str| wgpu::AdapterInfo {
            name: name.into(),
            vendor: 0x10005,
            device: 0,
            device_type: wgpu::DeviceType::Cpu,
            device_pci_bus_id: String::new(),
            driver: String::new(),
            driver_info: String::new(),
            backend,
            subgroup_min_size: 8,
            subgroup_max_size: 8,
            transient_saves_memory: None,
            limit_bucket: None,
        };
        let lvp = info(wgpu::Backend::Vulkan, "llvmpipe (LLVM 15.0.6, 256 bits)");
        let gl = info(wgpu::Backend::Gl, "llvmpipe (LLVM 15.0.6, 256 bits)");
        let swiftshader = info(wgpu::Backend::Vulkan, "SwiftShader Device (Subzero)");
        let auto = ParamsChoice::Auto;
        assert_eq!(auto.resolve(&lvp).0, ParamsBinding::Storage);
        assert_eq!(auto.resolve(&gl).0, ParamsBinding::Uniform);
        assert_eq!(auto.resolve(&swiftshader).0, ParamsBinding::Uniform);
        let forced = ParamsChoice::Force(ParamsBinding::Uniform);
        assert_eq!(forced.resolve(&lvp), (ParamsBinding::Uniform, "forced"));
        // The rewrite touches exactly the declarations.
        let src = "@group(0) @binding(0) var<uniform> p: Params;";
        assert_eq!(
            src.replace(ParamsBinding::Uniform.wgsl(), ParamsBinding::Storage.wgsl()),
            "@group(0) @binding(0) var<storage, read> p: Params;"
        );
    }

    /// Options win over the environment (whatever WGLLM_KERNELS /
    /// WGLLM_BACKEND are set to for this run).
    #[test]
    fn options_take_precedence_over_the_environment() {
        let o = GpuOptions {
            kernels: Some(KernelChoice::Force(KernelProfile::Gpu)),
            backends: Some(BackendChoice(wgpu::Backends::GL)),
            ..Default::default()
        };
        assert_eq!(
            o.resolve_kernels().unwrap(),
            (
                KernelChoice::Force(KernelProfile::Gpu),
                "GpuOptions::kernels"
            )
        );
        assert_eq!(
            o.resolve_backends().unwrap(),
            (wgpu::Backends::GL, "GpuOptions::backends")
        );
    }

    /// A streamed upload over several pieces, ending in a partial word,
    /// reads back exactly; the callbacks see every piece once, in order,
    /// at its offset; a failing check stops it with that error.
    #[test]
    fn streamed_upload_round_trips_and_stops_on_a_failed_check() {
        let g = test_gpu();
        let n = 2 * UPLOAD_PIECE + UPLOAD_PIECE / 2 + 2;
        let data: Vec<u8> = (0..n).map(|i| (i * 7 + i / 251) as u8).collect();
        let mut seen = Vec::new();
        let mut released = 0;
        let buf = g
            .storage_streamed(
                "t",
                &data,
                &mut |off, piece| {
                    seen.push((off, piece.len()));
                    Ok(())
                },
                &mut |piece| released += piece.len(),
            )
            .unwrap();
        assert_eq!(
            seen,
            [
                (0, UPLOAD_PIECE),
                (UPLOAD_PIECE, UPLOAD_PIECE),
                (2 * UPLOAD_PIECE, UPLOAD_PIECE / 2 + 2)
            ]
        );
        assert_eq!(released, n);
        assert_eq!(g.read_bytes(&buf, 0, n as u64).unwrap(), data);
        let e = g
            .storage_streamed(
                "t",
                &data,
                &mut |off, _| {
                    if off > 0 {
                        Err(Error::invalid("bad piece"))
                    } else {
                        Ok(())
                    }
                },
                &mut |_| {},
            )
            .unwrap_err();
        assert!(e.to_string().contains("bad piece"), "{e}");
        g.finish_uploads().unwrap();
    }

    /// A second request for the same kernel reuses the first pipeline.
    #[test]
    fn identical_kernels_compile_once() {
        let g = test_gpu();
        let src = "@group(0) @binding(0) var<storage, read_write> y: array<u32>;
            @compute @workgroup_size(1) fn main() { y[0] = 7u; }";
        let a = g.kernel("dedupe_probe", src, "main", &[]).unwrap();
        let before = g.counters.snapshot().pipelines;
        let b = g.kernel("dedupe_probe", src, "main", &[]).unwrap();
        assert!(Arc::ptr_eq(&a.pipeline, &b.pipeline));
        assert_eq!(g.counters.snapshot().pipelines, before);
    }

    #[test]
    fn grid_switches_to_2d_past_the_limit() {
        assert_eq!(grid_for(10, 65535), (10, 1, 1));
        assert_eq!(grid_for(65535, 65535), (65535, 1, 1));
        assert_eq!(grid_for(65536, 65535), (65535, 2, 1));
        assert_eq!(grid_for(151936, 65535), (65535, 3, 1));
        // every workgroup index < n is covered exactly once by x + y * X
        let (x, y, _) = grid_for(1000, 64);
        assert!(x * y >= 1000 && x * (y - 1) < 1000);
    }
}
