//! Linear layers: `y = x · Wᵀ (+ b)` with W in nn.Linear layout `[out, in]`.
//!
//! Two paths, chosen per call from the token count (`gemv_max_tokens`):
//! - **GEMV** (decode, few tokens): each output is one dot product over a
//!   weight row. Its kernel shape is chosen per adapter ([`LinearVariant`]).
//! - **Prefill** (many tokens), kernel chosen per adapter
//!   ([`PrefillKernel`]): on GPUs a matmul tiled in workgroup memory, each
//!   invocation accumulating a register block of outputs; on CPU-type
//!   adapters, where workgroup memory and barriers are slow, a register-only
//!   kernel computing a block of rows x tokens per invocation ([`RowBlock`]).
//!
//! - **Batched decode** ([`LinearPath::Batch`]): one row of x per sequence;
//!   the GEMV's kernel shape for [`BATCH_TOKENS`] tokens at once, each weight
//!   element read once for them, each token summed exactly as the one-token
//!   GEMV sums it (so a sequence's output is the same alone or batched).
//!
//! Each kernel has a fast form for `k % 8 == 0` (`vec4<u32>` loads = 8 bf16;
//! the tiled matmul reads whole bf16 words when k is even) and a generic form
//! for any k. A weight split by rows into several buffers gets one dispatch
//! per chunk, each writing its own output columns. The kernels are assembled
//! from the WGSL pieces in `shaders/matmul*.wgsl` and `shaders/gemv*.wgsl`.

use std::sync::OnceLock;

use crate::error::{Error, Result};
#[cfg(not(target_arch = "wasm32"))]
use crate::gpu::Step;
use crate::gpu::{Caps, Gpu, Kernel, KernelProfile, WeightLayout, TEXTURE_WIDTH};
/// The GEMV and prefill kernel choices are shader decisions
/// ([`crate::gpu::Decisions`]), so their types live in `gpu`.
pub use crate::gpu::{LinearVariant, PrefillKernel};
use crate::tensor::{DeviceTensor, WDType};

/// The row-block prefill kernel's source for `rq` row quads x `tb` tokens:
/// `matmul_rowblk.wgsl` with its per-(token, quad) statements written out
/// (public for `examples/texture_probe.rs`).
pub fn rowblk_source(rq: u32, tb: u32) -> String {
    rowblk_source_with(rq, tb, false)
}

/// [`rowblk_source`], with `dot2`: every product split exactly and summed
/// by Dot2 (Ogita-Rump-Oishi), the bias inside the single rounding.
pub fn rowblk_source_with(rq: u32, tb: u32, dot2: bool) -> String {
    use std::fmt::Write;
    let (mut init, mut zero, mut body, mut fold, mut out) = (
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
    );
    for q in 0..rq {
        let _ = writeln!(
            init,
            "    let rb{q} = r0 + {}u * WG;\n    let rq{q} = vec4<u32>(rb{q}, rb{q} + WG, rb{q} + 2u * WG, rb{q} + 3u * WG);\n    let wb{q} = min(rq{q}, last) * ng;",
            4 * q
        );
        let _ = writeln!(
            body,
            "            let w{q}a = w8(wb{q}.x + gg);\n            let w{q}b = w8(wb{q}.y + gg);\n            let w{q}c = w8(wb{q}.z + gg);\n            let w{q}d = w8(wb{q}.w + gg);"
        );
    }
    for i in 0..tb {
        let _ = writeln!(init, "    let xb{i} = min(t0 + {i}u, lt) * ng;");
        let _ = writeln!(body, "            let xv{i} = x8(xb{i} + gg);");
        if dot2 {
            let _ = writeln!(
                body,
                "            let xs{i}0 = bf16_split4(xv{i}[0]);\n            let xs{i}1 = bf16_split4(xv{i}[1]);"
            );
            for q in 0..rq {
                for r in ['a', 'b', 'c', 'd'] {
                    let _ = writeln!(
                        init,
                        "    var d{i}_{q}{r} = TwoSum4(vec4<f32>(0.0), vec4<f32>(0.0));"
                    );
                    let _ = writeln!(
                        body,
                        "            d{i}_{q}{r} = d2step(d2step(d{i}_{q}{r}, w{q}{r}[0], xv{i}[0], xs{i}0, zero), w{q}{r}[1], xv{i}[1], xs{i}1, zero);"
                    );
                }
            }
            let _ = writeln!(out, "    if (t0 + {i}u < step.n_tokens) {{");
            for q in 0..rq {
                for (j, c) in ['x', 'y', 'z', 'w'].iter().enumerate() {
                    let r = ['a', 'b', 'c', 'd'][j];
                    let _ = writeln!(
                        out,
                        "        if (rq{q}.{c} < p.rows) {{ let f = d2fold(d{i}_{q}{r}, zero); store_dot2(t0 + {i}u, rq{q}.{c}, f.s, f.e); }}"
                    );
                }
            }
            let _ = writeln!(out, "    }}");
            continue;
        }
        for q in 0..rq {
            let _ = writeln!(
                init,
                "    var a{i}_{q} = vec4<f32>(0.0);\n    var c{i}_{q} = vec4<f32>(0.0);"
            );
            let _ = writeln!(zero, "        var s{i}_{q} = vec4<f32>(0.0);");
            let d = |r: char| format!("dot(w{q}{r}[0], xv{i}[0]) + dot(w{q}{r}[1], xv{i}[1])");
            let _ = writeln!(
                body,
                "            s{i}_{q} += vec4<f32>({}, {}, {}, {});",
                d('a'),
                d('b'),
                d('c'),
                d('d')
            );
            let _ = writeln!(
                fold,
                "        let ts{i}_{q} = two_sum4(a{i}_{q}, s{i}_{q}, zero);\n        c{i}_{q} += ts{i}_{q}.e;\n        a{i}_{q} = ts{i}_{q}.s;"
            );
        }
        let _ = writeln!(out, "    if (t0 + {i}u < step.n_tokens) {{");
        for q in 0..rq {
            let _ = writeln!(out, "        let v{i}_{q} = a{i}_{q} + c{i}_{q};");
            for (j, c) in ['x', 'y', 'z', 'w'].iter().enumerate() {
                let _ = writeln!(
                    out,
                    "        if (rq{q}.{c} < p.rows) {{ store(t0 + {i}u, rq{q}.{c}, v{i}_{q}[{j}]); }}"
                );
            }
        }
        let _ = writeln!(out, "    }}");
    }
    let src = if dot2 {
        format!("{ROWBLK_DOT2}{SRC_MATMUL_ROWBLK}")
    } else {
        SRC_MATMUL_ROWBLK.to_string()
    };
    src.replace("//@INIT\n", &init)
        .replace("//@ZERO\n", &zero)
        .replace("//@BODY\n", &body)
        .replace("//@FOLD\n", &fold)
        .replace("//@OUT\n", &out)
}

/// The Dot2 steps of [`rowblk_source_with`]: `acc` is a (sum, error) pair
/// per vec4 lane; a step adds the 4 exact products w·x (bf16_split4 for
/// bf16 weights, two_prod for f32) with TwoSum, and the fold sums the lanes
/// the same way.
const ROWBLK_DOT2: &str = "
fn d2step(acc: TwoSum4, w: vec4<f32>, x: vec4<f32>, xs: TwoSum4, zero: u32) -> TwoSum4 {
    var pr = TwoSum4(w * xs.s, w * xs.e);
    if (!W_BF16) {
        for (var j = 0u; j < 4u; j++) {
            let t = two_prod(w[j], x[j], zero);
            pr.s[j] = t.s;
            pr.e[j] = t.e;
        }
    }
    let t = two_sum4(acc.s, pr.s, zero);
    return TwoSum4(t.s, acc.e + (t.e + pr.e));
}
fn d2fold(a: TwoSum4, zero: u32) -> TwoSum {
    let f1 = two_sum(a.s.x, a.s.y, zero);
    let f2 = two_sum(f1.s, a.s.z, zero);
    let f3 = two_sum(f2.s, a.s.w, zero);
    return TwoSum(f3.s, (f1.e + f2.e + f3.e) + ((a.e.x + a.e.y) + (a.e.z + a.e.w)));
}
";

/// The weight declaration of [`SRC_XW_VEC`] (a storage buffer).
pub const XW_VEC_BUFFER_DECL: &str =
    "@group(0) @binding(3) var<storage, read> w: array<vec4<u32>>;";

/// [`SRC_XW_VEC`] reading its weights from an `rgba32uint` texture named
/// `w` ([`WeightLayout::Texture`]): one texel = the 16 bytes `w[gw]` reads
/// from the buffer, at `(gw % TEXTURE_WIDTH, gw / TEXTURE_WIDTH)`. Only
/// where `w8` gets its bytes changes, so every kernel built on it sums the
/// same values in the same order as with buffers (bit-identical outputs).
/// The texture is named `w` so that `ops::fused::xw_copy` renames it with
/// the rest.
pub fn xw_vec_texture_source() -> String {
    let shift = TEXTURE_WIDTH.trailing_zeros();
    let tex = format!(
        "@group(0) @binding(3) var w: texture_2d<u32>;\n\
         fn wtex(gw: u32) -> vec4<u32> {{\n\
         \x20   return textureLoad(w, vec2<u32>(gw & {m}u, gw >> {shift}u), 0);\n}}",
        m = TEXTURE_WIDTH - 1
    );
    debug_assert!(TEXTURE_WIDTH.is_power_of_two());
    SRC_XW_VEC
        .replace(XW_VEC_BUFFER_DECL, &tex)
        .replace("w[gw]", "wtex(gw)")
        .replace("w[2u * gw]", "wtex(2u * gw)")
        .replace("w[2u * gw + 1u]", "wtex(2u * gw + 1u)")
}

/// Params, bias and output (shared by every linear kernel).
pub const SRC_COMMON: &str = include_str!("../../shaders/matmul_common.wgsl");
/// x / W bindings and row dot products for any k.
pub const SRC_XW: &str = include_str!("../../shaders/matmul_xw.wgsl");
/// x / W bindings and row dot products for k % 8 == 0 (vec4 loads).
pub const SRC_XW_VEC: &str = include_str!("../../shaders/matmul_xw_vec.wgsl");
/// Entry point: invocations over output rows (4 rows x TB tokens each).
pub const SRC_GEMV_ROWS: &str = include_str!("../../shaders/gemv_rows.wgsl");
/// GEMV entry point: one workgroup per row, subgroupAdd reduction.
pub const SRC_GEMV_WG_SUBGROUP: &str = include_str!("../../shaders/gemv_wg_subgroup.wgsl");
/// GEMV entry point: one workgroup per row, workgroup-memory tree reduction.
pub const SRC_GEMV_WG_SHARED: &str = include_str!("../../shaders/gemv_wg_shared.wgsl");
/// Tiled matmul entry point.
pub const SRC_MATMUL: &str = include_str!("../../shaders/matmul.wgsl");
/// The tiled matmul's slab loads over the generic bindings (any k).
pub const SRC_MATMUL_TILE_ANY: &str = include_str!("../../shaders/matmul_tile_any.wgsl");
/// The tiled matmul's vec4 bindings and slab loads (k % 8 == 0).
pub const SRC_MATMUL_TILE_VEC: &str = include_str!("../../shaders/matmul_tile_vec.wgsl");
/// Row-block prefill entry point (k % 8 == 0): R = 4·RQ rows x TB tokens per
/// invocation.
pub const SRC_MATMUL_ROWBLK: &str = include_str!("../../shaders/matmul_rowblk.wgsl");

/// Entry points of the batched decode GEMV for the workgroup variants.
pub const SRC_GEMV_WG_SUBGROUP_BATCH: &str =
    include_str!("../../shaders/gemv_wg_subgroup_batch.wgsl");
pub const SRC_GEMV_WG_SHARED_BATCH: &str = include_str!("../../shaders/gemv_wg_shared_batch.wgsl");
/// Tokens one weight pass of the batched decode GEMV serves.
pub const BATCH_TOKENS: u32 = 4;
/// Output rows per invocation of gemv_rows.wgsl.
const ROWS_PER_INVOCATION: u32 = 4;
/// Workgroup size of gemv_rows.wgsl for prefill, and for decode outside the
/// CPU-device profile (a real GPU forced onto `gemv=rows`: two warps).
const ROWS_WG: u32 = 64;
/// Workgroup size of the decode GEMVs of gemv_rows.wgsl and
/// gemv_fused_rows.wgsl in the CPU-device profile. A CPU-type adapter runs
/// each workgroup on one thread as SIMD lanes (lavapipe: 8 lanes of 256
/// bits), so a workgroup is the unit of load balance across cores: with 64
/// lanes x 4 rows, o_proj and down_proj of SmolLM2 (576 rows) were 3
/// workgroups for 2 cores, one core idle half the time; with 8 they are 18.
/// One SIMD vector per workgroup costs nothing on such a device (no
/// barriers, no shared memory). BENCHMARKS.md, "The row GEMV's workgroup".
const ROWS_WG_CPU: u32 = 8;
/// Tokens per invocation of gemv_rows.wgsl when used for prefill (k % 8 != 0).
const ROWS_PREFILL_TOKENS: u32 = 4;

/// Register block of the row-block prefill kernel (`matmul_rowblk.wgsl`,
/// k % 8 == 0): each invocation computes `4·rq` weight rows x `tb` tokens,
/// workgroups of `wg` invocations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RowBlock {
    pub rq: u32,
    pub tb: u32,
    pub wg: u32,
}

impl RowBlock {
    /// The default block: 8 rows x 8 tokens, workgroups of 16. Measured on
    /// lavapipe (SmolLM2's seven projections, 128 tokens, one run, best of
    /// 5; BENCHMARKS.md "Prefill matmul"): 2x faster per layer than
    /// gemv_rows.wgsl's 4 x 4 in workgroups of 64; 16 x 8 and 8 x 16 tied
    /// with it within the noise at twice the code, 4 x 4 and 32 x 4 were
    /// 1.2 to 1.3x slower, and blocks of 64 or more vec4 sums (16 x 16, 32 x 8)
    /// took minutes to compile.
    pub const DEFAULT: RowBlock = RowBlock {
        rq: 2,
        tb: 8,
        wg: 16,
    };
    /// Rows one workgroup covers.
    fn span(&self) -> u32 {
        4 * self.rq * self.wg
    }
}

/// Mirrors `Params` in matmul_common.wgsl. One per weight chunk.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Params {
    /// Inner dimension (in_features).
    pub k: u32,
    /// Output width (out_features, all chunks together).
    pub n: u32,
    /// First weight row (= output column) of this chunk.
    pub row_start: u32,
    /// Rows in this chunk.
    pub rows: u32,
    /// 0 = no bias, 1 = f32 bias, 2 = bf16 bias.
    pub bias_mode: u32,
    pub _p: [u32; 3],
}

impl LinearVariant {
    /// The variant for the device: the `gemv` shader decision when set,
    /// else the kernel profile's: row-per-thread in the CPU-device profile,
    /// workgroup-per-row (subgroup reduction when the device has SUBGROUP,
    /// else shared memory) in the GPU profile.
    pub fn for_adapter(caps: &Caps) -> Self {
        if let Some(v) = caps.decisions.gemv {
            v
        } else if caps.kernels == KernelProfile::CpuDevice {
            LinearVariant::RowPerThread
        } else if caps.subgroup {
            LinearVariant::WorkgroupSubgroup
        } else {
            LinearVariant::WorkgroupShared
        }
    }
}

impl LinearVariant {
    /// Workgroup size of this variant's GEMV (the fused decode GEMVs of
    /// `ops::fused` use the same).
    pub fn workgroup(self, caps: &Caps) -> u32 {
        match self {
            LinearVariant::RowPerThread => {
                caps.decisions
                    .gemv_rows_wg
                    .unwrap_or(if caps.kernels == KernelProfile::CpuDevice {
                        ROWS_WG_CPU
                    } else {
                        ROWS_WG
                    })
            }
            // A power of two covering whole subgroups of the largest size.
            _ => 64u32.max(caps.subgroup_max_size.next_power_of_two()),
        }
    }
}

impl PrefillKernel {
    /// The `prefill` shader decision when set, else row blocks in the
    /// CPU-device profile and tiled in the GPU profile.
    pub fn for_adapter(caps: &Caps) -> Self {
        if let Some(k) = caps.decisions.prefill {
            k
        } else if caps.kernels == KernelProfile::CpuDevice {
            PrefillKernel::RowBlocks
        } else {
            PrefillKernel::Tiled
        }
    }
}

/// Which path [`Linear::encode_path`] records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinearPath {
    /// GEMV for `n_tokens <= gemv_max_tokens`, prefill above.
    Auto,
    /// The batched decode GEMV: every token's output in the GEMV's order
    /// (bit-identical to [`LinearPath::Gemv`]), one weight pass per
    /// [`BATCH_TOKENS`] tokens.
    Batch,
    Gemv,
    Prefill,
}

/// Tile geometry of the tiled matmul (outputs per workgroup BM tokens x BN
/// rows, k slab BK, per-invocation block TM x TN).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TileConfig {
    pub bm: u32,
    pub bn: u32,
    pub bk: u32,
    pub tm: u32,
    pub tn: u32,
}

impl TileConfig {
    pub fn threads(&self) -> u32 {
        (self.bm / self.tm) * (self.bn / self.tn)
    }
    /// Workgroup memory used (x and W slabs, f32).
    pub fn shared_bytes(&self) -> u32 {
        4 * self.bk * (self.bm + self.bn)
    }
    fn fits(&self, caps: &Caps) -> bool {
        self.threads() <= caps.max_invocations && self.shared_bytes() <= caps.max_workgroup_storage
    }

    /// The tile of the `prefill_tile` shader decision when set (an error
    /// when it does not fit the adapter), else the largest of a few
    /// standard tiles that fits the adapter's limits.
    pub fn for_adapter(caps: &Caps) -> Result<Self> {
        if let Some(side) = caps.decisions.prefill_tile {
            let t = Self::candidates()
                .into_iter()
                .find(|c| c.bm == side)
                .ok_or_else(|| Error::invalid(format!("matmul: no {side}x{side} tile")))?;
            if !t.fits(caps) {
                return Err(Error::invalid(format!(
                    "matmul: the {side}x{side} tile (prefill_tile) needs {} invocations and {} \
                     bytes of workgroup memory; the adapter allows {} and {}",
                    t.threads(),
                    t.shared_bytes(),
                    caps.max_invocations,
                    caps.max_workgroup_storage
                )));
            }
            return Ok(t);
        }
        Self::candidates()
            .into_iter()
            .find(|c| c.fits(caps))
            .ok_or_else(|| {
                Error::invalid(format!(
                    "matmul: adapter allows {} invocations and {} bytes of workgroup memory per \
                     workgroup; the smallest tile needs 16 and 1024",
                    caps.max_invocations, caps.max_workgroup_storage
                ))
            })
    }

    /// The standard tiles, largest first (the `prefill_tile` values).
    pub fn candidates() -> [TileConfig; 3] {
        [
            // 256 invocations, 4x4 each, 8 KiB of workgroup memory
            TileConfig {
                bm: 64,
                bn: 64,
                bk: 16,
                tm: 4,
                tn: 4,
            },
            // 64 invocations, 4x4 each, 4 KiB
            TileConfig {
                bm: 32,
                bn: 32,
                bk: 16,
                tm: 4,
                tn: 4,
            },
            // 16 invocations, 4x4 each, 1 KiB
            TileConfig {
                bm: 16,
                bn: 16,
                bk: 8,
                tm: 4,
                tn: 4,
            },
        ]
    }

    /// Whether the adapter can run this tile.
    pub fn fits_adapter(&self, caps: &Caps) -> bool {
        self.fits(caps)
    }

    fn prefix(&self) -> String {
        format!(
            "const BM: u32 = {}u;\nconst BN: u32 = {}u;\nconst BK: u32 = {}u;\n\
             const TM: u32 = {}u;\nconst TN: u32 = {}u;\n",
            self.bm, self.bn, self.bk, self.tm, self.tn
        )
    }
}

/// How the tiled matmul loads its x and W slabs into workgroup memory, by k
/// (`matmul_tile_*.wgsl`). The slabs hold the same f32 values whichever it
/// is, so every output is the same bits (a test); only the loads differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlabLoads {
    /// k % 8 == 0 and x bindable as vec4: one vec4 of x (4 elements) or of
    /// the weight (8 bf16, 4 f32) per load.
    Vec4,
    /// bf16 with even k: x by element, the weight one u32 (two bf16) per load.
    Pairs,
    /// Element by element (odd k, or f32 with k % 8 != 0).
    Elements,
}

impl SlabLoads {
    /// The widest loads a weight of `k` columns allows (`vec`: k % 8 == 0 and
    /// the x buffer bindable as vec4); `allow_vec4` false keeps the scalar
    /// loads (the bit-identity test's reference).
    fn for_shape(wdtype: WDType, k: usize, vec: bool, tile: TileConfig, allow_vec4: bool) -> Self {
        if vec && allow_vec4 && tile.bk % 8 == 0 {
            SlabLoads::Vec4
        } else if wdtype == WDType::Bf16 && k % 2 == 0 {
            SlabLoads::Pairs
        } else {
            SlabLoads::Elements
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Compiled linear-layer kernels for one weight dtype. Kernels are compiled
/// on first use (a model whose k are all multiples of 8 never builds the
/// generic ones).
pub struct Linear {
    wdtype: WDType,
    has_bias: bool,
    variant: LinearVariant,
    prefill: PrefillKernel,
    tile: TileConfig,
    row_block: RowBlock,
    /// Workgroup size of the GEMV kernel.
    gemv_wg: u32,
    /// Largest token count that takes the GEMV path in `encode`.
    pub gemv_max_tokens: u32,
    /// Kernels by [`Xw`] (index `Xw as usize`).
    gemv: [OnceLock<Kernel>; 3],
    batch: [OnceLock<Kernel>; 3],
    prefill_k: [OnceLock<Kernel>; 3],
    /// The tiled matmul per [`SlabLoads`] (by `SlabLoads::index`).
    tiled: [OnceLock<Kernel>; 3],
    /// Whether the tiled matmul may take [`SlabLoads::Vec4`] (tests turn it
    /// off to compare with the scalar loads).
    vec4_slabs: bool,
    /// Bound in place of the bias when there is none.
    dummy_bias: wgpu::Buffer,
    /// Dot2 summation in the prefill kernels (issue #14 prototype).
    dot2: bool,
}

/// The bindings of one weight chunk.
pub struct ChunkBinding {
    pub params: wgpu::Buffer,
    pub rows: u32,
    pub gemv: wgpu::BindGroup,
    pub prefill: wgpu::BindGroup,
    pub batch: wgpu::BindGroup,
}

/// Everything [`Linear::encode`] needs for one weight; built once at load.
pub struct LinearBinding {
    pub chunks: Vec<ChunkBinding>,
    pub k: usize,
    pub n: usize,
    /// Tokens the x and y buffers can hold.
    pub max_tokens: u32,
    /// Name of the weight (for errors).
    pub name: String,
    // The kernels and geometry the bind groups were made for.
    gemv_kernel: Kernel,
    prefill_kernel: Kernel,
    batch_kernel: Kernel,
    variant: LinearVariant,
    prefill: PrefillKernel,
    gemv_wg: u32,
    tile: TileConfig,
    row_block: RowBlock,
    /// The prefill kernel is `matmul_rowblk.wgsl` (RowBlocks with k % 8 == 0).
    rowblk: bool,
}

/// Which x/W inner-loop source a kernel is built on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Xw {
    /// matmul_xw.wgsl: any k, buffer weights.
    Any = 0,
    /// matmul_xw_vec.wgsl: k % 8 == 0, buffer weights.
    Vec = 1,
    /// [`xw_vec_texture_source`]: k % 8 == 0, texture weights.
    Tex = 2,
}

fn cells() -> [OnceLock<Kernel>; 3] {
    [OnceLock::new(), OnceLock::new(), OnceLock::new()]
}

fn get_or_compile(cell: &OnceLock<Kernel>, f: impl FnOnce() -> Result<Kernel>) -> Result<&Kernel> {
    if let Some(k) = cell.get() {
        return Ok(k);
    }
    let k = f()?;
    Ok(cell.get_or_init(|| k))
}

impl Linear {
    /// Kernels for `wdtype` weights, GEMV and prefill kernels chosen from the
    /// adapter. `has_bias` says whether [`Linear::bind`] will get a bias.
    pub fn new(gpu: &Gpu, wdtype: WDType, has_bias: bool) -> Result<Self> {
        Self::with_variant(gpu, wdtype, has_bias, LinearVariant::for_adapter(&gpu.caps))
    }

    /// As [`Linear::new`] with a forced GEMV variant (tests, benchmarks).
    pub fn with_variant(
        gpu: &Gpu,
        wdtype: WDType,
        has_bias: bool,
        variant: LinearVariant,
    ) -> Result<Self> {
        let caps = &gpu.caps;
        if variant == LinearVariant::WorkgroupSubgroup && !caps.subgroup {
            return Err(Error::invalid(format!(
                "linear: the subgroup GEMV variant needs subgroup operations, which adapter '{}' \
                 does not offer",
                gpu.name()
            )));
        }
        let gemv_wg = variant.workgroup(caps);
        if gemv_wg > caps.max_invocations {
            return Err(Error::invalid(format!(
                "linear: GEMV workgroup of {gemv_wg} exceeds the adapter's max of {} invocations",
                caps.max_invocations
            )));
        }
        let tile = TileConfig::for_adapter(caps)?;
        let dummy_bias = gpu.storage("linear.no_bias", 4);
        // Up to this many tokens, GEMV (one weight pass per token) is used
        // rather than the prefill kernel (one pass for a block of tokens).
        // Measured on lavapipe (k=896, n=4864 bf16): GEMV wins at 1 token,
        // ties at 2 (~5 vs ~6 ms), the 4x4 row-block kernel wins from 3 on
        // (and is ~2x GEMV per token from 4 on). On GPUs the tiled kernel is
        // bandwidth-bound from a few tokens; 2 is a guess there, unmeasured.
        let gemv_max_tokens = 2;
        Ok(Linear {
            wdtype,
            has_bias,
            variant,
            prefill: PrefillKernel::for_adapter(caps),
            tile,
            row_block: RowBlock::DEFAULT,
            gemv_wg,
            gemv_max_tokens,
            gemv: cells(),
            batch: cells(),
            prefill_k: cells(),
            tiled: Default::default(),
            vec4_slabs: true,
            dummy_bias,
            dot2: false,
        })
    }

    /// Dot2 summation in the prefill kernels.
    pub fn with_dot2(mut self, on: bool) -> Self {
        self.dot2 = on;
        self
    }

    /// Use `kernel` for the prefill path (tests, benchmarks).
    pub fn with_prefill(mut self, kernel: PrefillKernel) -> Self {
        if kernel != self.prefill {
            self.prefill = kernel;
            self.prefill_k = cells();
        }
        self
    }

    /// Keep the tiled matmul on its scalar slab loads even where k allows
    /// vec4 ones (tests: the two must give the same bits).
    pub fn without_vec4_slabs(mut self) -> Self {
        self.vec4_slabs = false;
        self
    }

    /// The slab loads the tiled matmul takes for a weight of `k` columns
    /// bound with an x buffer of `x_bytes`.
    pub fn slab_loads(&self, k: usize, x_bytes: u64) -> SlabLoads {
        let vec = k % 8 == 0 && x_bytes % 16 == 0;
        SlabLoads::for_shape(self.wdtype, k, vec, self.tile, self.vec4_slabs)
    }

    /// Use `block` for the row-block prefill kernel (tests, benchmarks).
    pub fn with_row_block(mut self, block: RowBlock) -> Result<Self> {
        if block.rq == 0 || block.tb == 0 || block.wg == 0 {
            return Err(Error::invalid(format!(
                "linear: row block {block:?} has a zero dimension"
            )));
        }
        if block != self.row_block {
            self.row_block = block;
            self.prefill_k = cells();
        }
        Ok(self)
    }

    pub fn row_block(&self) -> RowBlock {
        self.row_block
    }

    pub fn variant(&self) -> LinearVariant {
        self.variant
    }
    pub fn prefill(&self) -> PrefillKernel {
        self.prefill
    }
    pub fn tile(&self) -> TileConfig {
        self.tile
    }
    pub fn wdtype(&self) -> WDType {
        self.wdtype
    }

    /// Assemble and compile one kernel: constants, common part, the x/W
    /// bindings (vec4 or generic) and an entry point.
    fn compile(&self, gpu: &Gpu, label: &str, consts: &str, xw: Xw, entry: &str) -> Result<Kernel> {
        let src = match xw {
            Xw::Tex => xw_vec_texture_source(),
            Xw::Vec => SRC_XW_VEC.to_string(),
            Xw::Any => SRC_XW.to_string(),
        };
        let src = format!("{consts}{SRC_COMMON}\n{src}\n{entry}");
        let label = format!(
            "{label}.{}.{:?}",
            match xw {
                Xw::Tex => "tex",
                Xw::Vec => "vec",
                Xw::Any => "any",
            },
            self.wdtype
        );
        gpu.kernel(
            &label,
            &src,
            "main",
            &[("W_BF16", self.wdtype.is_bf16_const())],
        )
    }

    fn gemv_kernel(&self, gpu: &Gpu, xw: Xw) -> Result<&Kernel> {
        get_or_compile(&self.gemv[xw as usize], || {
            let entry = match self.variant {
                LinearVariant::RowPerThread => SRC_GEMV_ROWS,
                LinearVariant::WorkgroupSubgroup => SRC_GEMV_WG_SUBGROUP,
                LinearVariant::WorkgroupShared => SRC_GEMV_WG_SHARED,
            };
            let consts = format!("const WG: u32 = {}u;\nconst TB: u32 = 1u;\n", self.gemv_wg);
            self.compile(gpu, &format!("gemv.{:?}", self.variant), &consts, xw, entry)
        })
    }

    /// The batched decode GEMV: the GEMV variant's shape over
    /// [`BATCH_TOKENS`] tokens (gemv_rows.wgsl already keeps each token's
    /// sum apart; the workgroup variants have their own entry points).
    fn batch_kernel(&self, gpu: &Gpu, xw: Xw) -> Result<&Kernel> {
        get_or_compile(&self.batch[xw as usize], || {
            let entry = match self.variant {
                LinearVariant::RowPerThread => SRC_GEMV_ROWS,
                LinearVariant::WorkgroupSubgroup => SRC_GEMV_WG_SUBGROUP_BATCH,
                LinearVariant::WorkgroupShared => SRC_GEMV_WG_SHARED_BATCH,
            };
            let consts = format!(
                "const WG: u32 = {}u;\nconst TB: u32 = {BATCH_TOKENS}u;\n",
                self.gemv_wg
            );
            self.compile(
                gpu,
                &format!("gemv_batch.{:?}", self.variant),
                &consts,
                xw,
                entry,
            )
        })
    }

    /// The row-block prefill kernel on the bindings `xw` (the vec4 or
    /// texture ones, k % 8 == 0), or the row kernel on the generic ones.
    fn prefill_kernel(&self, gpu: &Gpu, xw: Xw) -> Result<&Kernel> {
        get_or_compile(&self.prefill_k[xw as usize], || {
            if xw != Xw::Any {
                let RowBlock { rq, tb, wg } = self.row_block;
                let consts = format!(
                    "const WG: u32 = {wg}u;\nconst TB: u32 = {tb}u;\nconst RQ: u32 = {rq}u;\n"
                );
                self.compile(
                    gpu,
                    if self.dot2 {
                        "prefill.rowblk.dot2"
                    } else {
                        "prefill.rowblk"
                    },
                    &consts,
                    xw,
                    &rowblk_source_with(rq, tb, self.dot2),
                )
            } else {
                let consts = format!(
                    "const WG: u32 = {ROWS_WG}u;\nconst TB: u32 = {ROWS_PREFILL_TOKENS}u;\n"
                );
                self.compile(gpu, "prefill.rows", &consts, Xw::Any, SRC_GEMV_ROWS)
            }
        })
    }

    /// The tiled matmul with `loads`: the vec4 bindings and loads of
    /// matmul_tile_vec.wgsl, or the generic bindings with
    /// matmul_tile_any.wgsl's word (`W_PAIRS`) or element loads.
    fn tiled_kernel(&self, gpu: &Gpu, loads: SlabLoads) -> Result<&Kernel> {
        get_or_compile(&self.tiled[loads.index()], || {
            let consts = format!(
                "{}const TB: u32 = 1u;\nconst DOT2: bool = {};\n",
                self.tile.prefix(),
                self.dot2
            );
            let src = match loads {
                SlabLoads::Vec4 => {
                    format!("{consts}{SRC_COMMON}\n{SRC_MATMUL_TILE_VEC}\n{SRC_MATMUL}")
                }
                SlabLoads::Pairs | SlabLoads::Elements => format!(
                    "{consts}const W_PAIRS: bool = {};\n{SRC_COMMON}\n{SRC_XW}\n\
                     {SRC_MATMUL_TILE_ANY}\n{SRC_MATMUL}",
                    loads == SlabLoads::Pairs
                ),
            };
            gpu.kernel(
                &format!("matmul.{loads:?}.{:?}.{}", self.wdtype, self.dot2),
                &src,
                "main",
                &[("W_BF16", self.wdtype.is_bf16_const())],
            )
        })
    }

    /// Bind one weight: `x` f32 `[tokens, k]`, `weight` `[n, k]`, optional
    /// `bias` `[n]` (f32 or bf16, one chunk), `y` f32 `[tokens, n]`. Creates
    /// the per-chunk Params uniforms and bind groups of both paths; call once
    /// at load. The token capacity is what both x and y can hold.
    pub fn bind(
        &self,
        gpu: &Gpu,
        step: &wgpu::Buffer,
        x: &wgpu::Buffer,
        weight: &DeviceTensor,
        bias: Option<&DeviceTensor>,
        y: &wgpu::Buffer,
    ) -> Result<LinearBinding> {
        let name = &weight.name;
        let (n, k) = match weight.shape.as_slice() {
            [n, k] => (*n, *k),
            s => {
                return Err(Error::invalid(format!(
                    "linear weight `{name}`: expected a 2D [out, in] tensor, got shape {s:?}"
                )))
            }
        };
        if n == 0 || k == 0 {
            return Err(Error::invalid(format!(
                "linear weight `{name}`: empty shape [{n}, {k}]"
            )));
        }
        if weight.dtype != self.wdtype {
            return Err(Error::invalid(format!(
                "linear weight `{name}` is {:?} but this Linear was built for {:?}",
                weight.dtype, self.wdtype
            )));
        }
        if bias.is_some() != self.has_bias {
            return Err(Error::invalid(format!(
                "linear weight `{name}`: Linear built {} a bias but bind was given {}",
                if self.has_bias { "with" } else { "without" },
                if bias.is_some() { "one" } else { "none" }
            )));
        }
        let covered: usize = weight.chunks.iter().map(|c| c.rows).sum();
        if covered != n {
            return Err(Error::invalid(format!(
                "linear weight `{name}`: chunks cover {covered} rows of {n}"
            )));
        }
        let bias_mode = match bias {
            None => 0,
            Some(b) => {
                if b.numel() != n || b.shape.len() != 1 {
                    return Err(Error::invalid(format!(
                        "linear bias `{}`: shape {:?}, expected [{n}] to match weight `{name}`",
                        b.name, b.shape
                    )));
                }
                if b.chunks.len() != 1 {
                    return Err(Error::invalid(format!(
                        "linear bias `{}` is split into {} buffers; a bias must be one buffer",
                        b.name,
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
        let x_tokens = x.size() / (4 * k as u64);
        let y_tokens = y.size() / (4 * n as u64);
        let max_tokens = x_tokens.min(y_tokens).min(u64::from(u32::MAX)) as u32;
        if max_tokens == 0 {
            return Err(Error::invalid(format!(
                "linear weight `{name}` [{n}, {k}]: x buffer ({} bytes) or y buffer ({} bytes) \
                 cannot hold one token",
                x.size(),
                y.size()
            )));
        }
        // vec4 bindings: whole 8-element groups per row, and x bindable as
        // array<vec4<f32>>.
        let vec = k % 8 == 0 && x.size() % 16 == 0;
        let texture = weight.layout() == WeightLayout::Texture;
        if texture && !vec {
            return Err(Error::invalid(format!(
                "linear weight `{name}` [{n}, {k}] is a texture, which only the k % 8 == 0 \
                 kernels read, but x ({} bytes) is not bindable as vec4 rows",
                x.size()
            )));
        }
        let xw = match (texture, vec) {
            (true, _) => Xw::Tex,
            (false, true) => Xw::Vec,
            (false, false) => Xw::Any,
        };
        let gemv_k = self.gemv_kernel(gpu, xw)?.clone();
        let batch_k = self.batch_kernel(gpu, xw)?.clone();
        let prefill_k = match self.prefill {
            PrefillKernel::RowBlocks => self.prefill_kernel(gpu, xw)?,
            PrefillKernel::Tiled if texture => {
                return Err(Error::invalid(format!(
                    "linear weight `{name}`: the tiled prefill kernel reads weights from \
                     buffers, not textures (set WGLLM_DECISIONS=weights=buffer, or prefill=rows)"
                )))
            }
            PrefillKernel::Tiled => self.tiled_kernel(gpu, self.slab_loads(k, x.size()))?,
        }
        .clone();
        let bias_buf = match bias {
            None => &self.dummy_bias,
            Some(b) => b.chunks[0].buffer(&b.name)?,
        };
        let chunks = weight
            .chunks
            .iter()
            .map(|c| {
                let params = gpu.uniform(
                    &format!("{name}.params@{}", c.row_start),
                    &Params {
                        k: k as u32,
                        n: n as u32,
                        row_start: c.row_start as u32,
                        rows: c.rows as u32,
                        bias_mode,
                        _p: [0; 3],
                    },
                )?;
                let res = |k: &Kernel| {
                    gpu.bind_resources(
                        k,
                        &[
                            (0, params.as_entire_binding()),
                            (1, step.as_entire_binding()),
                            (2, x.as_entire_binding()),
                            (3, c.resource()),
                            (4, bias_buf.as_entire_binding()),
                            (5, y.as_entire_binding()),
                        ],
                    )
                };
                Ok(ChunkBinding {
                    gemv: res(&gemv_k),
                    prefill: res(&prefill_k),
                    batch: res(&batch_k),
                    rows: c.rows as u32,
                    params,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(LinearBinding {
            chunks,
            k,
            n,
            max_tokens,
            name: name.clone(),
            gemv_kernel: gemv_k,
            prefill_kernel: prefill_k,
            batch_kernel: batch_k,
            variant: self.variant,
            prefill: self.prefill,
            gemv_wg: self.gemv_wg,
            tile: self.tile,
            row_block: self.row_block,
            rowblk: self.prefill == PrefillKernel::RowBlocks && vec,
        })
    }

    /// Record `y = x · Wᵀ (+ b)` for `n_tokens` tokens (which must match the
    /// Step uniform): GEMV up to `gemv_max_tokens` tokens, prefill above.
    pub fn encode(
        &self,
        gpu: &Gpu,
        pass: &mut wgpu::ComputePass<'_>,
        b: &LinearBinding,
        n_tokens: u32,
    ) -> Result<()> {
        self.encode_path(gpu, pass, b, n_tokens, LinearPath::Auto)
    }

    /// [`Linear::encode`] with the path forced.
    pub fn encode_path(
        &self,
        gpu: &Gpu,
        pass: &mut wgpu::ComputePass<'_>,
        b: &LinearBinding,
        n_tokens: u32,
        path: LinearPath,
    ) -> Result<()> {
        if n_tokens > b.max_tokens {
            return Err(Error::invalid(format!(
                "linear weight `{}`: {n_tokens} tokens but the bound x/y buffers hold {}",
                b.name, b.max_tokens
            )));
        }
        let gemv = match path {
            LinearPath::Auto => n_tokens <= self.gemv_max_tokens,
            LinearPath::Gemv => true,
            LinearPath::Prefill => false,
            LinearPath::Batch => {
                for c in &b.chunks {
                    let blocks = n_tokens.div_ceil(BATCH_TOKENS);
                    let groups = match b.variant {
                        LinearVariant::RowPerThread => {
                            c.rows.div_ceil(ROWS_PER_INVOCATION * b.gemv_wg) * blocks
                        }
                        _ => c.rows * blocks,
                    };
                    gpu.dispatch_in(pass, &b.batch_kernel, &c.batch, groups);
                }
                return Ok(());
            }
        };
        for c in &b.chunks {
            if gemv {
                let groups = match b.variant {
                    LinearVariant::RowPerThread => {
                        c.rows.div_ceil(ROWS_PER_INVOCATION * b.gemv_wg) * n_tokens
                    }
                    _ => c.rows * n_tokens,
                };
                gpu.dispatch_in(pass, &b.gemv_kernel, &c.gemv, groups);
            } else {
                let groups = match b.prefill {
                    PrefillKernel::Tiled => {
                        c.rows.div_ceil(b.tile.bn) * n_tokens.div_ceil(b.tile.bm)
                    }
                    PrefillKernel::RowBlocks if b.rowblk => {
                        c.rows.div_ceil(b.row_block.span()) * n_tokens.div_ceil(b.row_block.tb)
                    }
                    PrefillKernel::RowBlocks => {
                        c.rows.div_ceil(ROWS_PER_INVOCATION * ROWS_WG)
                            * n_tokens.div_ceil(ROWS_PREFILL_TOKENS)
                    }
                };
                gpu.dispatch_in(pass, &b.prefill_kernel, &c.prefill, groups);
            }
        }
        Ok(())
    }
}

impl Linear {
    /// One-shot: upload `x` (`[m, k]`), run with `path`, read back `[m, n]`.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn run_once(
        &self,
        gpu: &Gpu,
        x: &[f32],
        m: usize,
        weight: &DeviceTensor,
        bias: Option<&DeviceTensor>,
        path: LinearPath,
    ) -> Result<Vec<f32>> {
        let k = weight.cols();
        let n = weight.rows();
        if m == 0 || x.len() != m * k {
            return Err(Error::invalid(format!(
                "linear `{}`: x has {} values, expected m x k = {m} x {k} with m > 0",
                weight.name,
                x.len()
            )));
        }
        let step = gpu.uniform("linear_once.step", &Step::new(m as u32, 0))?;
        let xb = gpu.storage_init("linear_once.x", bytemuck::cast_slice(x))?;
        let yb = gpu.storage("linear_once.y", (m * n * 4) as u64);
        let binding = self.bind(gpu, &step, &xb, weight, bias, &yb)?;
        let mut enc = gpu.encoder();
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("linear_once"),
                timestamp_writes: None,
            });
            self.encode_path(gpu, &mut pass, &binding, m as u32, path)?;
        }
        gpu.submit_wait(enc)?;
        gpu.read_f32(&yb, m * n)
    }
}

/// One-shot `y = x · Wᵀ (+ b)` for tests and tools: `x` is `[m, k]`, the
/// weight `[n, k]`; returns `[m, n]`. Compiles kernels each call.
#[cfg(not(target_arch = "wasm32"))]
pub fn linear_once(
    gpu: &Gpu,
    x: &[f32],
    m: usize,
    weight: &DeviceTensor,
    bias: Option<&DeviceTensor>,
) -> Result<Vec<f32>> {
    Linear::new(gpu, weight.dtype, bias.is_some())?.run_once(
        gpu,
        x,
        m,
        weight,
        bias,
        LinearPath::Auto,
    )
}

/// CPU reference: `x` is `[m, k]`, `w` is `[n, k]` (PyTorch `[out, in]`),
/// `b` is `[n]`; returns `[m, n]`. Dot products accumulate in f64.
pub fn reference(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    m: usize,
    k: usize,
    n: usize,
) -> Vec<f32> {
    assert_eq!(x.len(), m * k, "x is not [m, k]");
    assert_eq!(w.len(), n * k, "w is not [n, k]");
    let mut y = vec![0f32; m * n];
    for i in 0..m {
        let xr = &x[i * k..(i + 1) * k];
        for j in 0..n {
            let wr = &w[j * k..(j + 1) * k];
            let mut acc = 0f64;
            for t in 0..k {
                acc += xr[t] as f64 * wr[t] as f64;
            }
            if let Some(b) = b {
                acc += b[j] as f64;
            }
            y[i * n + j] = acc as f32;
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::round_bf16;
    use crate::testutil::{gpu, gpu_with_split, rand_vec};

    const KS: [usize; 9] = [1, 3, 7, 8, 63, 64, 65, 577, 896];
    const NS: [usize; 6] = [1, 3, 7, 63, 65, 577];

    /// Worst ratio of |got - want| to the error bound of an f32 dot product,
    /// over all outputs. Bound: any f32 summation order of k products (the
    /// GPU's strided / tree / vec4 `dot` order, with or without fma) differs
    /// from the exact sum by at most k·2^-24·Σ|x_i w_i| (the standard γ_k
    /// bound); the f32 bias add and the reference's own rounding to f32 add
    /// two more units, so (k + 2)·2^-24·(Σ|x_i w_i| + |b|). Inputs are the
    /// exact values the device holds (bf16-rounded weights), so this is the
    /// only difference. A ratio <= 1 passes; it cannot flake, and any real
    /// bug (wrong row, wrong pairing, transposed weight) is O(1) relative.
    #[allow(clippy::too_many_arguments)]
    fn worst_ratio(
        got: &[f32],
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        m: usize,
        k: usize,
        n: usize,
    ) -> (f64, usize) {
        let want = reference(x, w, b, m, k, n);
        assert_eq!(got.len(), want.len());
        let mut worst = (0f64, 0usize);
        for i in 0..m {
            for j in 0..n {
                let mut scale: f64 = (0..k)
                    .map(|t| (x[i * k + t] as f64 * w[j * k + t] as f64).abs())
                    .sum();
                if let Some(b) = b {
                    scale += (b[j] as f64).abs();
                }
                let bound = (k as f64 + 2.0) * 2f64.powi(-24) * scale + 1e-30;
                let err = (got[i * n + j] as f64 - want[i * n + j] as f64).abs();
                let r = if err.is_nan() {
                    f64::INFINITY
                } else {
                    err / bound
                };
                if r > worst.0 || r.is_nan() {
                    worst = (r, i * n + j);
                }
            }
        }
        worst
    }

    /// Run one case on `gpu` and compare with the reference.
    #[allow(clippy::too_many_arguments)]
    fn case(
        gpu: &Gpu,
        lin: &Linear,
        m: usize,
        k: usize,
        n: usize,
        bias: Option<WDType>,
        path: LinearPath,
        seed: u64,
    ) {
        let dtype = lin.wdtype();
        let x = rand_vec(m * k, 1.0, seed);
        let mut w = rand_vec(n * k, 1.0, seed + 1);
        if dtype == WDType::Bf16 {
            w = round_bf16(&w);
        }
        let wt = DeviceTensor::from_f32(gpu, "w", dtype, &[n, k], &w).unwrap();
        let b = bias.map(|bd| {
            let mut b = rand_vec(n, 1.0, seed + 2);
            if bd == WDType::Bf16 {
                b = round_bf16(&b);
            }
            // Built by hand as one buffer: a bias is never split, and
            // DeviceTensor::upload would try to under tiny test split caps.
            let bytes = match bd {
                WDType::Bf16 => crate::tensor::f32_to_bf16_bytes(&b),
                WDType::F32 => bytemuck::cast_slice(&b).to_vec(),
            };
            let bt = DeviceTensor {
                name: "b".into(),
                dtype: bd,
                shape: vec![n],
                chunks: vec![crate::tensor::Chunk {
                    storage: crate::tensor::ChunkStorage::Buffer(
                        gpu.storage_init("b", &bytes).unwrap(),
                    ),
                    row_start: 0,
                    rows: 1,
                }],
            };
            (b, bt)
        });
        let got = lin
            .run_once(gpu, &x, m, &wt, b.as_ref().map(|(_, t)| t), path)
            .unwrap();
        let (r, at) = worst_ratio(&got, &x, &w, b.as_ref().map(|(v, _)| &v[..]), m, k, n);
        let what = format!(
            "{:?} {path:?} {dtype:?} m={m} k={k} n={n} bias={bias:?} chunks={}",
            lin.variant(),
            wt.chunks.len()
        );
        assert!(
            r <= 1.0,
            "{what}: output {at} error is {r:.2}x the f32 accumulation bound"
        );
    }

    fn variants(gpu: &Gpu) -> Vec<LinearVariant> {
        let mut v = vec![LinearVariant::RowPerThread, LinearVariant::WorkgroupShared];
        if gpu.caps.subgroup {
            v.push(LinearVariant::WorkgroupSubgroup);
        }
        v
    }

    /// The kernel profile, not the adapter type, picks the shapes.
    #[test]
    fn kernel_profile_picks_the_variants() {
        use crate::gpu::KernelProfile;
        let mut caps = gpu().caps.clone();
        for is_cpu in [true, false] {
            caps.is_cpu = is_cpu;
            caps.kernels = KernelProfile::CpuDevice;
            caps.subgroup = true;
            assert_eq!(
                LinearVariant::for_adapter(&caps),
                LinearVariant::RowPerThread
            );
            assert_eq!(PrefillKernel::for_adapter(&caps), PrefillKernel::RowBlocks);
            caps.kernels = KernelProfile::Gpu;
            assert_eq!(
                LinearVariant::for_adapter(&caps),
                LinearVariant::WorkgroupSubgroup
            );
            assert_eq!(PrefillKernel::for_adapter(&caps), PrefillKernel::Tiled);
            caps.subgroup = false;
            assert_eq!(
                LinearVariant::for_adapter(&caps),
                LinearVariant::WorkgroupShared
            );
        }
        // and a device made with a forced profile builds those kernels
        let g = crate::gpu::Gpu::new(&crate::gpu::GpuOptions {
            kernels: Some(crate::gpu::KernelChoice::Force(KernelProfile::Gpu)),
            ..Default::default()
        })
        .unwrap();
        let lin = Linear::new(&g, WDType::Bf16, false).unwrap();
        assert_eq!(lin.prefill(), PrefillKernel::Tiled);
        assert_ne!(lin.variant(), LinearVariant::RowPerThread);
    }

    #[test]
    fn gemv_variants_over_shapes() {
        let gpu = gpu();
        for variant in variants(gpu) {
            for dtype in [WDType::Bf16, WDType::F32] {
                let plain = Linear::with_variant(gpu, dtype, false, variant).unwrap();
                let biased = Linear::with_variant(gpu, dtype, true, variant).unwrap();
                for (i, &k) in KS.iter().enumerate() {
                    for (j, &n) in NS.iter().enumerate() {
                        let m = 1 + (i + j) % 3;
                        let seed = (i * 10 + j) as u64;
                        // bias on a third of the cases, alternating f32 / bf16
                        let (lin, bias) = match (i + 2 * j) % 3 {
                            0 => (
                                &biased,
                                Some(if j % 2 == 0 {
                                    WDType::F32
                                } else {
                                    WDType::Bf16
                                }),
                            ),
                            _ => (&plain, None),
                        };
                        case(gpu, lin, m, k, n, bias, LinearPath::Gemv, seed);
                    }
                }
            }
        }
    }

    /// Dot2 in both prefill kernels (issue #14): every output within one
    /// rounding of the exact x·Wᵀ + b, |got - exact| <= u·|exact| +
    /// 2·(k + 8)²·u²·(Σ|x_i w_i| + |b|) (Ogita-Rump-Oishi's bound for Dot2,
    /// with room for the lanes' fold and the bias), u = 2^-24, against the
    /// ~(k + 2)·u·Σ of a plain f32 sum. Half of each row's products cancel
    /// the other half to within ~1e-3, so the plain kernels' error is far
    /// above this bound (checked: a Dot2 that silently fell back fails).
    #[test]
    fn dot2_prefill_is_one_rounding_from_exact() {
        let gpu = gpu();
        let u = 2f64.powi(-24);
        for prefill in [PrefillKernel::RowBlocks, PrefillKernel::Tiled] {
            for dtype in [WDType::Bf16, WDType::F32] {
                for (ci, &(m, k, n, with_bias)) in [
                    (9, 16, 70, true),
                    (5, 64, 33, false),
                    (12, 576, 65, true),
                    (3, 40, 9, false),
                ]
                .iter()
                .enumerate()
                {
                    if prefill == PrefillKernel::RowBlocks && k % 8 != 0 {
                        continue;
                    }
                    let seed = 500 + ci as u64;
                    let mut x = rand_vec(m * k, 1.0, seed);
                    let mut w = rand_vec(n * k, 1.0, seed + 1);
                    // the second half of each row cancels the first
                    for j in 0..n {
                        for t in 0..k / 2 {
                            w[j * k + k / 2 + t] = -w[j * k + t];
                        }
                    }
                    for i in 0..m {
                        for t in 0..k / 2 {
                            x[i * k + k / 2 + t] = x[i * k + t] * (1.0 + 1e-3 * x[i * k + t]);
                        }
                    }
                    if dtype == WDType::Bf16 {
                        w = round_bf16(&w);
                    }
                    let wt = DeviceTensor::from_f32(gpu, "w", dtype, &[n, k], &w).unwrap();
                    let b: Vec<f32> = rand_vec(n, 1e-3, seed + 2);
                    let bt = with_bias
                        .then(|| DeviceTensor::from_f32(gpu, "b", WDType::F32, &[n], &b).unwrap());
                    let lin = Linear::new(gpu, dtype, with_bias)
                        .unwrap()
                        .with_prefill(prefill)
                        .with_dot2(true);
                    let got = lin
                        .run_once(gpu, &x, m, &wt, bt.as_ref(), LinearPath::Prefill)
                        .unwrap();
                    for i in 0..m {
                        for j in 0..n {
                            let (mut exact, mut scale) = (0f64, 0f64);
                            for t in 0..k {
                                let pr = x[i * k + t] as f64 * w[j * k + t] as f64;
                                exact += pr;
                                scale += pr.abs();
                            }
                            if with_bias {
                                exact += b[j] as f64;
                                scale += (b[j] as f64).abs();
                            }
                            let bound = u * exact.abs()
                                + 2.0 * ((k + 8) as f64).powi(2) * u * u * scale
                                + 1e-37;
                            let err = (got[i * n + j] as f64 - exact).abs();
                            assert!(
                                err <= bound,
                                "{prefill:?} {dtype:?} m={m} k={k} n={n} bias={with_bias}: \
                                 output ({i}, {j}) is {err:.3e} from exact {exact:.6e}, bound \
                                 {bound:.3e}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The batched decode GEMV: within the f32 bound, and every token's
    /// output the same bits as the one-token GEMV gives that token alone
    /// (whatever the batch size and the token's place in it), for every
    /// variant, both weight forms (k % 8 == 0 or not) and with a bias.
    #[test]
    fn batched_gemv_rows_are_the_one_token_gemv_bits() {
        let gpu = gpu();
        for variant in variants(gpu) {
            for dtype in [WDType::Bf16, WDType::F32] {
                let lin = Linear::with_variant(gpu, dtype, false, variant).unwrap();
                for (i, &(k, n)) in [(64, 65), (577, 7), (896, 3), (7, 63)].iter().enumerate() {
                    let seed = 100 + i as u64;
                    case(gpu, &lin, 1 + i * 2, k, n, None, LinearPath::Batch, seed);
                    let mut w = rand_vec(n * k, 1.0, seed + 1);
                    if dtype == WDType::Bf16 {
                        w = round_bf16(&w);
                    }
                    let wt = DeviceTensor::from_f32(gpu, "w", dtype, &[n, k], &w).unwrap();
                    for m in [2usize, 3, 4, 5, 8, 9] {
                        let x = rand_vec(m * k, 1.0, seed + m as u64);
                        let got = lin
                            .run_once(gpu, &x, m, &wt, None, LinearPath::Batch)
                            .unwrap();
                        for t in 0..m {
                            let one = lin
                                .run_once(gpu, &x[t * k..][..k], 1, &wt, None, LinearPath::Gemv)
                                .unwrap();
                            let bits =
                                |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                            assert_eq!(
                                bits(&got[t * n..][..n]),
                                bits(&one),
                                "{variant:?} {dtype:?} k={k} n={n}: token {t} of {m}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn prefill_tiled_over_shapes() {
        prefill_over_shapes(PrefillKernel::Tiled);
    }

    #[test]
    fn prefill_row_blocks_over_shapes() {
        prefill_over_shapes(PrefillKernel::RowBlocks);
    }

    fn prefill_over_shapes(kind: PrefillKernel) {
        let gpu = gpu();
        for dtype in [WDType::Bf16, WDType::F32] {
            let plain = Linear::new(gpu, dtype, false).unwrap().with_prefill(kind);
            let biased = Linear::new(gpu, dtype, true).unwrap().with_prefill(kind);
            for (mi, &m) in [1usize, 2, 3, 7, 33, 65].iter().enumerate() {
                for (i, &k) in KS.iter().enumerate() {
                    // two n per (m, k), rotating through all of NS
                    for j in [(mi + i) % NS.len(), (mi + i + 3) % NS.len()] {
                        let n = NS[j];
                        let seed = (mi * 100 + i * 10 + j) as u64;
                        let (lin, bias) = match (mi + i + j) % 3 {
                            0 => (
                                &biased,
                                Some(if i % 2 == 0 {
                                    WDType::Bf16
                                } else {
                                    WDType::F32
                                }),
                            ),
                            _ => (&plain, None),
                        };
                        case(gpu, lin, m, k, n, bias, LinearPath::Prefill, seed);
                    }
                }
            }
        }
    }

    /// The row-block prefill kernel at several register blocks (the
    /// default and others the generator must get right: single quads and
    /// tokens, odd counts, blocks larger than the data) gives every output
    /// the bits the one-token row GEMV gives it (the same summation order,
    /// so the precision table's bound for the row GEMV holds), including
    /// ragged edges: token counts and rows that are not multiples of the
    /// block, k whose group count is not a multiple of 4, and a bias.
    #[test]
    fn row_blocks_are_the_row_gemv_bits() {
        let gpu = gpu();
        let blocks = [
            RowBlock::DEFAULT,
            RowBlock {
                rq: 1,
                tb: 1,
                wg: 8,
            },
            RowBlock {
                rq: 3,
                tb: 5,
                wg: 16,
            },
            RowBlock {
                rq: 2,
                tb: 16,
                wg: 64,
            },
        ];
        let gemv =
            Linear::with_variant(gpu, WDType::Bf16, true, LinearVariant::RowPerThread).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for (bi, block) in blocks.into_iter().enumerate() {
            let lin = Linear::new(gpu, WDType::Bf16, true)
                .unwrap()
                .with_prefill(PrefillKernel::RowBlocks)
                .with_row_block(block)
                .unwrap();
            // (m, k, n): k = 8·groups with groups % 4 in {0, 1, 3}
            for (ci, &(m, k, n)) in [(9usize, 64usize, 65usize), (3, 8, 577), (17, 200, 7)]
                .iter()
                .enumerate()
            {
                let seed = 500 + (bi * 10 + ci) as u64;
                let w = round_bf16(&rand_vec(n * k, 1.0, seed));
                let wt = DeviceTensor::from_f32(gpu, "w", WDType::Bf16, &[n, k], &w).unwrap();
                let b = rand_vec(n, 1.0, seed + 1);
                let bt = DeviceTensor::from_f32(gpu, "b", WDType::F32, &[n], &b).unwrap();
                let x = rand_vec(m * k, 1.0, seed + 2);
                let got = lin
                    .run_once(gpu, &x, m, &wt, Some(&bt), LinearPath::Prefill)
                    .unwrap();
                for t in 0..m {
                    let one = gemv
                        .run_once(gpu, &x[t * k..][..k], 1, &wt, Some(&bt), LinearPath::Gemv)
                        .unwrap();
                    assert_eq!(
                        bits(&got[t * n..][..n]),
                        bits(&one),
                        "{block:?} m={m} k={k} n={n}: token {t}"
                    );
                }
            }
        }
        let bad = Linear::new(gpu, WDType::Bf16, false)
            .unwrap()
            .with_row_block(RowBlock {
                rq: 0,
                tb: 4,
                wg: 64,
            });
        assert!(bad.is_err());
    }

    /// The tiled matmul's vec4 slab loads (k % 8 == 0) stage the values its
    /// scalar loads stage, in the same places, so every output is the same
    /// bits: bf16 against the word loads, f32 against the element loads,
    /// with token and row counts that are not multiples of the tile, k that
    /// ends inside a slab (24, 200 with BK = 16), a bias, and a weight split
    /// into several chunks. (Both are held to the f32 bound against the
    /// reference by the tests over shapes.)
    #[test]
    fn tiled_vec4_slabs_are_the_scalar_bits() {
        let whole = gpu();
        let split = gpu_with_split(8192);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for g in [whole, &split] {
            for dtype in [WDType::Bf16, WDType::F32] {
                let new = |vec4: bool| {
                    let lin = Linear::new(g, dtype, true)
                        .unwrap()
                        .with_prefill(PrefillKernel::Tiled);
                    if vec4 {
                        lin
                    } else {
                        lin.without_vec4_slabs()
                    }
                };
                let (vec, scalar) = (new(true), new(false));
                let old_loads = match dtype {
                    WDType::Bf16 => SlabLoads::Pairs,
                    WDType::F32 => SlabLoads::Elements,
                };
                for (ci, &(m, k, n)) in [
                    (1usize, 8usize, 7usize),
                    (5, 24, 65),
                    (70, 200, 130),
                    (3, 896, 17),
                ]
                .iter()
                .enumerate()
                {
                    let x_bytes = (m * k * 4) as u64;
                    assert_eq!(vec.slab_loads(k, x_bytes), SlabLoads::Vec4);
                    assert_eq!(scalar.slab_loads(k, x_bytes), old_loads);
                    let seed = 700 + ci as u64;
                    let mut w = rand_vec(n * k, 1.0, seed);
                    if dtype == WDType::Bf16 {
                        w = round_bf16(&w);
                    }
                    let wt = DeviceTensor::from_f32(g, "w", dtype, &[n, k], &w).unwrap();
                    let b = rand_vec(n, 1.0, seed + 1);
                    let bt = DeviceTensor::from_f32(g, "b", WDType::F32, &[n], &b).unwrap();
                    let x = rand_vec(m * k, 1.0, seed + 2);
                    let run = |lin: &Linear| {
                        lin.run_once(g, &x, m, &wt, Some(&bt), LinearPath::Prefill)
                            .unwrap()
                    };
                    let (got, want) = (run(&vec), run(&scalar));
                    assert!(
                        want.iter().any(|&v| v != 0.0),
                        "m={m} k={k} n={n}: all zero"
                    );
                    assert_eq!(
                        bits(&got),
                        bits(&want),
                        "{dtype:?} m={m} k={k} n={n} chunks={}",
                        wt.chunks.len()
                    );
                }
            }
        }
        // the split really split the largest weight
        let w = DeviceTensor::from_f32(&split, "w", WDType::F32, &[17, 896], &[0.0; 17 * 896]);
        assert!(w.unwrap().chunks.len() > 1);
    }

    #[test]
    fn split_weights_every_variant_and_path() {
        // bf16 k=7: a row is 14 bytes; 224 bytes holds 16 rows (an even count,
        // so chunks start on whole words) -> n=65 is 16+16+16+16+1 chunks,
        // rows of odd length straddle u32 words. f32/bf16 k=64: 1024 bytes is
        // 4 / 8 rows -> n=65 ends with a 1-row chunk.
        let gpu = gpu_with_split(224);
        let gpu2 = gpu_with_split(1024);
        for (g, k) in [(&gpu, 7usize), (&gpu2, 64), (&gpu2, 65)] {
            for dtype in [WDType::Bf16, WDType::F32] {
                for variant in variants(g) {
                    let lin = Linear::with_variant(g, dtype, true, variant).unwrap();
                    for m in [1, 2] {
                        let seed = (k + m) as u64;
                        case(
                            g,
                            &lin,
                            m,
                            k,
                            65,
                            Some(WDType::Bf16),
                            LinearPath::Gemv,
                            seed,
                        );
                    }
                }
                for kind in [PrefillKernel::Tiled, PrefillKernel::RowBlocks] {
                    let lin = Linear::new(g, dtype, true).unwrap().with_prefill(kind);
                    let bias = Some(WDType::Bf16);
                    case(g, &lin, 5, k, 65, bias, LinearPath::Prefill, k as u64);
                }
            }
        }
        // the split really happened, with an uneven last chunk
        let w = DeviceTensor::from_f32(&gpu, "w", WDType::Bf16, &[65, 7], &[0.0; 65 * 7]).unwrap();
        let rows: Vec<usize> = w.chunks.iter().map(|c| c.rows).collect();
        assert_eq!(rows, [16, 16, 16, 16, 1]);
    }

    #[test]
    fn more_than_65535_rows_use_a_2d_grid() {
        // One workgroup per row and token: 2 x 70000 workgroups exceed the
        // 65535-per-dimension limit, so dispatch_in uses a 2D grid and the
        // kernel recovers the linear index. Small k keeps it quick.
        let gpu = gpu();
        assert!(70_000 * 2 > gpu.caps.max_workgroups_per_dim);
        for variant in variants(gpu) {
            let lin = Linear::with_variant(gpu, WDType::Bf16, false, variant).unwrap();
            case(gpu, &lin, 2, 8, 70_000, None, LinearPath::Gemv, 5);
            case(gpu, &lin, 1, 3, 70_000, None, LinearPath::Gemv, 6);
        }
        // The row-block prefill with a 4-row x 1-token block of 1 invocation:
        // 17,500 row blocks x 5 tokens = 87,500 workgroups.
        let lin = Linear::new(gpu, WDType::Bf16, false)
            .unwrap()
            .with_prefill(PrefillKernel::RowBlocks)
            .with_row_block(RowBlock {
                rq: 1,
                tb: 1,
                wg: 1,
            })
            .unwrap();
        case(gpu, &lin, 5, 8, 70_000, None, LinearPath::Prefill, 7);
    }

    #[test]
    fn auto_path_and_linear_once() {
        let gpu = gpu();
        let (k, n) = (64, 63);
        let w = round_bf16(&rand_vec(n * k, 1.0, 1));
        let wt = DeviceTensor::from_f32(gpu, "w", WDType::Bf16, &[n, k], &w).unwrap();
        let b = rand_vec(n, 1.0, 2);
        let bt = DeviceTensor::from_f32(gpu, "b", WDType::F32, &[n], &b).unwrap();
        for m in [1usize, 2, 3, 5, 33] {
            let x = rand_vec(m * k, 1.0, 3 + m as u64);
            let got = linear_once(gpu, &x, m, &wt, Some(&bt)).unwrap();
            let (r, at) = worst_ratio(&got, &x, &w, Some(&b), m, k, n);
            assert!(
                r <= 1.0,
                "linear_once m={m}: output {at} at {r:.2}x the bound"
            );
        }
    }

    #[test]
    fn tolerance_catches_transposed_and_mispaired_weights() {
        // The classic porting bug: a square weight fed as Wᵀ ([in, out]) runs
        // without any shape error. The bound must reject it by a wide margin
        // on both paths. Likewise swapping the two bf16 halves of each word.
        let gpu = gpu();
        let (m, k) = (3usize, 64usize);
        let x = rand_vec(m * k, 1.0, 11);
        let w = round_bf16(&rand_vec(k * k, 1.0, 12));
        let mut wt = vec![0f32; k * k];
        for i in 0..k {
            for j in 0..k {
                wt[j * k + i] = w[i * k + j];
            }
        }
        let swapped: Vec<f32> = w.chunks(2).flat_map(|p| [p[1], p[0]]).collect();
        let mut runs: Vec<(Linear, LinearPath)> = Vec::new();
        for variant in variants(gpu) {
            let lin = Linear::with_variant(gpu, WDType::Bf16, false, variant).unwrap();
            runs.push((lin, LinearPath::Gemv));
        }
        for kind in [PrefillKernel::Tiled, PrefillKernel::RowBlocks] {
            let lin = Linear::new(gpu, WDType::Bf16, false)
                .unwrap()
                .with_prefill(kind);
            runs.push((lin, LinearPath::Prefill));
        }
        for (lin, path) in &runs {
            let (variant, path) = ((lin.variant(), lin.prefill()), *path);
            {
                let dev_t = DeviceTensor::from_f32(gpu, "wT", WDType::Bf16, &[k, k], &wt).unwrap();
                let got = lin.run_once(gpu, &x, m, &dev_t, None, path).unwrap();
                let (r, _) = worst_ratio(&got, &x, &w, None, m, k, k);
                assert!(
                    r > 1e3,
                    "{variant:?} {path:?}: transposed W only {r:.1}x the bound"
                );
                let dev = DeviceTensor::from_f32(gpu, "w", WDType::Bf16, &[k, k], &w).unwrap();
                let got = lin.run_once(gpu, &x, m, &dev, None, path).unwrap();
                let (r, _) = worst_ratio(&got, &x, &swapped, None, m, k, k);
                assert!(
                    r > 1e3,
                    "{variant:?} {path:?}: swapped bf16 halves only {r:.1}x the bound"
                );
                let (r, _) = worst_ratio(&got, &x, &w, None, m, k, k);
                assert!(
                    r <= 1.0,
                    "{variant:?} {path:?}: correct W at {r:.2}x the bound"
                );
            }
        }
    }

    #[test]
    fn bad_bindings_are_errors() {
        let gpu = gpu();
        let lin = Linear::new(gpu, WDType::Bf16, false).unwrap();
        let step = gpu.uniform("s", &Step::new(1, 0)).unwrap();
        let x = gpu.storage("x", 4 * 64);
        let y = gpu.storage("y", 4 * 32);
        let w = DeviceTensor::from_f32(gpu, "layer.w", WDType::Bf16, &[32, 64], &[0.5; 32 * 64])
            .unwrap();
        let wf = DeviceTensor::from_f32(gpu, "layer.wf", WDType::F32, &[32, 64], &[0.5; 32 * 64])
            .unwrap();
        let w1 = DeviceTensor::from_f32(gpu, "layer.v", WDType::Bf16, &[64], &[0.5; 64]).unwrap();
        let b = DeviceTensor::from_f32(gpu, "layer.b", WDType::F32, &[31], &[0.5; 31]).unwrap();
        let small_x = gpu.storage("x", 4 * 63);
        let msg = |r: Result<LinearBinding>| match r {
            Err(e) => e.to_string(),
            Ok(_) => panic!("accepted a bad binding"),
        };
        assert!(msg(lin.bind(gpu, &step, &x, &wf, None, &y)).contains("layer.wf"));
        assert!(msg(lin.bind(gpu, &step, &x, &w1, None, &y)).contains("layer.v"));
        assert!(msg(lin.bind(gpu, &step, &x, &w, Some(&b), &y)).contains("bias"));
        assert!(msg(lin.bind(gpu, &step, &small_x, &w, None, &y)).contains("layer.w"));
        let lb = Linear::new(gpu, WDType::Bf16, true).unwrap();
        assert!(msg(lb.bind(gpu, &step, &x, &w, Some(&b), &y)).contains("[32]"));
        // n_tokens beyond what x / y hold
        let bound = lin.bind(gpu, &step, &x, &w, None, &y).unwrap();
        assert_eq!(bound.max_tokens, 1);
        let mut enc = gpu.encoder();
        let mut pass = enc.begin_compute_pass(&Default::default());
        let e = lin.encode(gpu, &mut pass, &bound, 2).unwrap_err();
        assert!(e.to_string().contains("layer.w"), "{e}");
    }
}

/// Prefill matmul timing at SmolLM2-135M's layer shapes (not a test of
/// speed: it asserts nothing about time, only prints): one layer's seven
/// projections for a 128-token chunk (the model's prefill chunk), `REPS`
/// times in one pass, best of 5, each kernel shape in the same run,
/// round-robin so that load drifts hit every shape alike.
/// `cargo test --release --lib -- --ignored matmul_timing --nocapture`
/// (`WGLLM_TIMING_SHAPES=rq,tb,wg;rq,tb,wg;...` picks the row blocks; the
/// default compares the old kernel, a 4 x 4 row block and the default).
#[cfg(test)]
mod timing {
    use super::*;
    use crate::gpu::Step;
    use crate::testutil::{gpu, rand_vec};
    use std::time::Instant;

    /// (name, n, k) of one SmolLM2 decoder layer's linear layers.
    const SMOL: [(&str, usize, usize); 7] = [
        ("q", 576, 576),
        ("k", 192, 576),
        ("v", 192, 576),
        ("o", 576, 576),
        ("gate", 1536, 576),
        ("up", 1536, 576),
        ("down", 576, 1536),
    ];
    const M: usize = 128;
    const REPS: usize = 4;

    #[test]
    #[ignore = "prints timings only; run by hand"]
    fn matmul_timing() {
        let g = gpu();
        let blocks: Vec<RowBlock> = match std::env::var("WGLLM_TIMING_SHAPES") {
            Ok(s) if !s.is_empty() => s
                .split(';')
                .map(|b| {
                    let v: Vec<u32> = b.split(',').map(|x| x.trim().parse().unwrap()).collect();
                    RowBlock {
                        rq: v[0],
                        tb: v[1],
                        wg: v[2],
                    }
                })
                .collect(),
            _ => vec![
                RowBlock {
                    rq: 1,
                    tb: 4,
                    wg: 64,
                },
                RowBlock::DEFAULT,
            ],
        };
        let step = g.uniform("step", &Step::new(M as u32, 0)).unwrap();
        let xb = g
            .storage_init("x", bytemuck::cast_slice(&rand_vec(M * 1536, 1.0, 1)))
            .unwrap();
        let yb = g.storage("y", (M * 1536 * 4) as u64);
        let ws: Vec<DeviceTensor> = SMOL
            .iter()
            .map(|&(name, n, k)| {
                let w = crate::tensor::round_bf16(&rand_vec(n * k, 0.05, n as u64 + k as u64));
                DeviceTensor::from_f32(g, name, WDType::Bf16, &[n, k], &w).unwrap()
            })
            .collect();
        // the old kernel (gemv_rows.wgsl, 4 x 4) first, then each row block
        let mut lins: Vec<(String, Linear)> = vec![];
        let old = Linear::new(g, WDType::Bf16, false)
            .unwrap()
            .with_prefill(PrefillKernel::RowBlocks);
        lins.push(("gemv_rows 4 rows x 4 tokens (before)".into(), old));
        for b in &blocks {
            let lin = Linear::new(g, WDType::Bf16, false)
                .unwrap()
                .with_prefill(PrefillKernel::RowBlocks)
                .with_row_block(*b)
                .unwrap();
            lins.push((format!("rowblk {b:?}"), lin));
        }
        let binds: Vec<Vec<LinearBinding>> = lins
            .iter()
            .enumerate()
            .map(|(i, (_, lin))| {
                ws.iter()
                    .map(|w| {
                        let mut b = lin.bind(g, &step, &xb, w, None, &yb).unwrap();
                        if i == 0 {
                            // gemv_rows.wgsl with TB = 4 on the vec4 bindings
                            let consts = format!(
                                "const WG: u32 = {ROWS_WG}u;\nconst TB: u32 = {ROWS_PREFILL_TOKENS}u;\n"
                            );
                            let kern = lin
                                .compile(g, "prefill.rows.before", &consts, Xw::Vec, SRC_GEMV_ROWS)
                                .unwrap();
                            for (c, wc) in b.chunks.iter_mut().zip(&w.chunks) {
                                let bufs = [&c.params, &step, &xb, wc.buffer("w").unwrap(), &lin.dummy_bias, &yb];
                                let bg = g.bind(&kern, &bufs);
                                c.prefill = bg;
                            }
                            b.prefill_kernel = kern;
                            b.rowblk = false;
                        }
                        b
                    })
                    .collect()
            })
            .collect();
        let flops: f64 = SMOL
            .iter()
            .map(|&(_, n, k)| 2.0 * (M * n * k) as f64)
            .sum::<f64>()
            * REPS as f64;
        let mut best = vec![f64::INFINITY; lins.len()];
        for _round in 0..5 {
            for (i, (_, lin)) in lins.iter().enumerate() {
                let run = || {
                    let mut e = g.encoder();
                    {
                        let mut pass = e.begin_compute_pass(&Default::default());
                        for _ in 0..REPS {
                            for b in &binds[i] {
                                lin.encode_path(g, &mut pass, b, M as u32, LinearPath::Prefill)
                                    .unwrap();
                            }
                        }
                    }
                    g.submit_wait(e).unwrap();
                };
                if _round == 0 {
                    run();
                }
                let t = Instant::now();
                run();
                best[i] = best[i].min(t.elapsed().as_secs_f64());
            }
            eprintln!(
                "round {_round}: best ms per layer so far {:?}",
                best.iter()
                    .map(|b| (b * 1e3 / REPS as f64).round())
                    .collect::<Vec<_>>()
            );
        }
        for (i, (name, _)) in lins.iter().enumerate() {
            eprintln!(
                "{name}: {:.1} ms per layer of {M} tokens, {:.2} GFLOP/s",
                best[i] * 1e3 / REPS as f64,
                flops / best[i] / 1e9
            );
        }
    }
}
