//! Fused decode GEMVs: one dispatch for several linear layers over the same
//! x, with what follows them done in the epilogue (`shaders/gemv_fused_*`).
//!
//! - [`qkv_rope`]: the q, k and v projections (+ bias), RoPE of q and k and
//!   the KV-cache append: what `q_proj`, `k_proj`, `v_proj` and
//!   `ops::rope::RopeKv` do for one token, in one dispatch.
//! - [`gate_up`]: the gate and up projections (+ bias) and the GLU (SwiGLU
//!   or Gemma's tanh GeGLU): `gate_proj`, `up_proj` and the elementwise GLU.
//!
//! Each weight keeps its own buffer in nn.Linear's `[out, in]` layout; the
//! kernel binds all of them. Every row is summed by the GEMV's own inner
//! loop (`matmul_xw*.wgsl`, compiled once per weight with its identifiers
//! renamed, [`xw_copy`]) and, in the workgroup shapes, reduced by the
//! GEMV's own `wg_sum`; the epilogues do the unfused kernels' f32 operations
//! in their order. So the fused path is bit-identical to the ops it
//! replaces: that is its reference, tested in tests/decode.rs
//! (`fused_and_op_by_op_paths_agree_bit_for_bit`) rather than against a
//! plain-Rust model here.
//!
//! One token only (decode): prefill and slot passes record the unfused ops.
//! Dense weights in one buffer or one texture each (all three alike,
//! [`WeightLayout`]; textures through the texture form of the inner loop,
//! `matmul::xw_vec_texture_source`); anything else (quantized weights,
//! weights split into chunks, an adapter with too few storage bindings per
//! stage) is reported as not fusable (`Ok(None)`) and the caller keeps the
//! unfused ops.

use crate::error::{Error, Result};
use crate::gpu::{Gpu, Kernel};
use crate::ops::kv_copy::KvCache;
use crate::ops::matmul::{
    xw_vec_texture_source, LinearVariant, SRC_COMMON, SRC_GEMV_WG_SHARED, SRC_GEMV_WG_SUBGROUP,
    SRC_XW, SRC_XW_VEC,
};
use crate::ops::rope::RopeTables;
use crate::tensor::{DeviceTensor, WDType, WeightLayout};

/// Bindings, epilogues and params shared by the fused kernels.
pub const SRC_FUSED_COMMON: &str = include_str!("../../shaders/gemv_fused_common.wgsl");
/// Entry points in the row-per-invocation shape (CPU device profile).
pub const SRC_FUSED_ROWS: &str = include_str!("../../shaders/gemv_fused_rows.wgsl");
/// Entry points in the workgroup-per-row shape (GPU profile).
pub const SRC_FUSED_WG: &str = include_str!("../../shaders/gemv_fused_wg.wgsl");

/// Storage bindings the q/k/v kernel needs in one stage (x, 3 weights, 3
/// biases, q out, K and V cache, cos and sin).
pub const QKV_STORAGE_BINDINGS: u32 = 12;
/// ... and the gate/up kernel (x, 2 weights, 3 bias slots, out).
pub const GATE_UP_STORAGE_BINDINGS: u32 = 7;

/// Mirrors `FusedParams` in gemv_fused_common.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct FusedParams {
    pub rows_a: u32,
    pub rows_b: u32,
    pub rows_c: u32,
    pub groups_a: u32,
    pub groups_b: u32,
    pub head_dim: u32,
    pub max_ctx: u32,
    pub max_positions: u32,
    pub bias_mode: u32,
    pub _p: [u32; 3],
}

/// Mirrors matmul_common.wgsl's `Params` (only `k` is read by the fused
/// kernels' inner loops).
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct LinParams {
    k: u32,
    n: u32,
    row_start: u32,
    rows: u32,
    bias_mode: u32,
    _p: [u32; 3],
}

/// One fused dispatch, bound at load.
pub struct Fused {
    kernel: Kernel,
    bg: wgpu::BindGroup,
    groups: u32,
    /// Uniforms the bind group reads (kept alive here).
    _params: [wgpu::Buffer; 2],
    /// Bound in place of absent biases.
    _dummy: wgpu::Buffer,
}

impl Fused {
    /// Record the dispatch (one token; the step uniform must say so).
    pub fn encode(&self, gpu: &Gpu, pass: &mut wgpu::ComputePass<'_>) {
        gpu.dispatch_in(pass, &self.kernel, &self.bg, self.groups);
    }

    /// Workgroups of the dispatch.
    pub fn groups(&self) -> u32 {
        self.groups
    }
}

/// `src` (one of the matmul_xw*.wgsl files) for another weight: the x
/// binding dropped (the first copy declares it), the weight binding `w`
/// moved to `binding` and renamed `w{suffix}`, and every function it
/// declares renamed `name{suffix}`. Swizzles (`.w`) are left alone.
pub fn xw_copy(src: &str, suffix: &str, binding: u32) -> Result<String> {
    let bad = |what: &str| {
        Error::invalid(format!(
            "fused GEMV: the linear inner-loop source no longer has {what} (matmul_xw*.wgsl \
             changed shape; update ops::fused::xw_copy)"
        ))
    };
    let mut names = vec!["w".to_string()];
    for line in src.lines() {
        if let Some(rest) = line.trim_start().strip_prefix("fn ") {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            names.push(name);
        }
    }
    let x_decl = "var<storage, read> x:";
    // the weight as a storage buffer, or as a texture (WeightLayout::Texture)
    let w_decls = [
        "@group(0) @binding(3) var<storage, read> w:",
        "@group(0) @binding(3) var w: texture_2d<u32>;",
    ];
    let is_w_decl = |l: &str| w_decls.iter().any(|d| l.trim_start().starts_with(d));
    if !src.lines().any(|l| l.contains(x_decl)) {
        return Err(bad("the x binding"));
    }
    if !src.lines().any(is_w_decl) {
        return Err(bad("the weight binding `w` at binding 3"));
    }
    let mut out = String::with_capacity(src.len() + 256);
    for line in src.lines() {
        if line.contains(x_decl) {
            continue;
        }
        let line = if is_w_decl(line) {
            line.replacen("@binding(3)", &format!("@binding({binding})"), 1)
        } else {
            line.to_string()
        };
        out.push_str(&rename(&line, &names, suffix));
        out.push('\n');
    }
    Ok(out)
}

/// `line` with every identifier in `names` (not after a `.`) suffixed.
fn rename(line: &str, names: &[String], suffix: &str) -> String {
    let b = line.as_bytes();
    let mut out = String::with_capacity(line.len() + 16);
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_alphanumeric() || c == b'_' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            let word = &line[start..i];
            out.push_str(word);
            let ident = !c.is_ascii_digit();
            let after_dot = start > 0 && b[start - 1] == b'.';
            if ident && !after_dot && names.iter().any(|n| n == word) {
                out.push_str(suffix);
            }
        } else {
            out.push(c as char);
            i += 1;
        }
    }
    out
}

/// Which fused kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Entry {
    QkvRope,
    GateUp,
}

/// Compile the fused kernel `entry` for `wdtype` weights with inner
/// dimension layout `vec` (matmul_xw_vec.wgsl) or generic, in the shape of
/// the adapter's GEMV variant.
/// `texture`: the weights are textures ([`WeightLayout::Texture`], `vec`
/// only).
fn compile(
    gpu: &Gpu,
    wdtype: WDType,
    vec: bool,
    texture: bool,
    entry: Entry,
    gelu_tanh: bool,
) -> Result<Kernel> {
    let variant = LinearVariant::for_adapter(&gpu.caps);
    let wg = variant.workgroup(&gpu.caps);
    let tex_src;
    let xw = if texture {
        tex_src = xw_vec_texture_source();
        tex_src.as_str()
    } else if vec {
        SRC_XW_VEC
    } else {
        SRC_XW
    };
    let tail = match variant {
        LinearVariant::RowPerThread => SRC_FUSED_ROWS.to_string(),
        LinearVariant::WorkgroupSubgroup => format!("{SRC_GEMV_WG_SUBGROUP}\n{SRC_FUSED_WG}"),
        LinearVariant::WorkgroupShared => format!("{SRC_GEMV_WG_SHARED}\n{SRC_FUSED_WG}"),
    };
    let src = format!(
        "const WG: u32 = {wg}u;\nconst TB: u32 = 1u;\n{SRC_COMMON}\n{xw}\n{}\n{}\n{SRC_FUSED_COMMON}\n{tail}",
        xw_copy(xw, "_b", 7)?,
        xw_copy(xw, "_c", 8)?,
    );
    let name = match entry {
        Entry::QkvRope => "qkv_rope",
        Entry::GateUp => "gate_up",
    };
    let label = format!(
        "fused.{name}.{variant:?}.{}.{wdtype:?}",
        match (texture, vec) {
            (true, _) => "tex",
            (false, true) => "vec",
            (false, false) => "any",
        }
    );
    gpu.kernel(
        &label,
        &src,
        name,
        &[
            ("W_BF16", wdtype.is_bf16_const()),
            ("GLU_GELU_TANH", if gelu_tanh { 1.0 } else { 0.0 }),
        ],
    )
}

/// The weights of one fused kernel, checked: dense, one buffer each, the
/// same dtype and inner dimension; biases all present or all absent, one
/// dtype. None when they cannot be fused.
fn check<'a>(
    ws: &[&'a DeviceTensor],
    biases: &[Option<&'a DeviceTensor>],
) -> Option<(WDType, usize, u32)> {
    let (dt, k, layout) = (ws[0].dtype, ws[0].cols(), ws[0].layout());
    let fits = ws.iter().all(|w| {
        w.shape.len() == 2
            && w.dtype == dt
            && w.cols() == k
            && w.chunks.len() == 1
            && w.layout() == layout
    });
    if !fits || k == 0 {
        return None;
    }
    let bias_mode = match biases {
        b if b.iter().all(Option::is_none) => 0,
        b if b.iter().all(Option::is_some) => {
            let bs: Vec<&DeviceTensor> = b.iter().flatten().copied().collect();
            let bdt = bs[0].dtype;
            let ok = bs.iter().zip(ws).all(|(b, w)| {
                b.dtype == bdt && b.chunks.len() == 1 && b.shape.len() == 1 && b.numel() == w.rows()
            });
            if !ok {
                return None;
            }
            match bdt {
                WDType::F32 => 1,
                WDType::Bf16 => 2,
            }
        }
        _ => return None,
    };
    Some((dt, k, bias_mode))
}

/// Whether x (f32 `[k]`) can be read by the vec4 inner loop (as Linear
/// decides it).
fn vec_layout(k: usize, x: &wgpu::Buffer) -> bool {
    k % 8 == 0 && x.size() % 16 == 0
}

/// (vec4 inner loop, texture weights), or None when texture weights meet an
/// x the vec4 loop cannot read (the unfused ops then report it).
fn layouts(ws: &[&DeviceTensor], k: usize, x: &wgpu::Buffer) -> Option<(bool, bool)> {
    let vec = vec_layout(k, x);
    let tex = ws[0].layout() == WeightLayout::Texture;
    (vec || !tex).then_some((vec, tex))
}

/// Storage bindings a fused kernel needs, less the weights when they are
/// textures (sampled, not storage, bindings).
fn storage_need(ws: &[&DeviceTensor], need: u32) -> u32 {
    if ws[0].layout() == WeightLayout::Texture {
        need - ws.len() as u32
    } else {
        need
    }
}

fn storage_ok(gpu: &Gpu, need: u32) -> bool {
    gpu.device.limits().max_storage_buffers_per_shader_stage >= need
}

/// The fused q/k/v + bias + RoPE + KV append for one decode token: `x` the
/// normed hidden state, `q_out` the QRope buffer, `cache` the layer's K and V
/// cache (slot 0), `tables` the layer's RoPE table. None when not fusable.
#[allow(clippy::too_many_arguments)]
pub fn qkv_rope(
    gpu: &Gpu,
    step: &wgpu::Buffer,
    x: &wgpu::Buffer,
    w: [&DeviceTensor; 3],
    bias: [Option<&DeviceTensor>; 3],
    head_dim: usize,
    tables: &RopeTables,
    q_out: &wgpu::Buffer,
    cache: &KvCache,
) -> Result<Option<Fused>> {
    let Some((dt, k, bias_mode)) = check(&w, &bias) else {
        return Ok(None);
    };
    let rows = w.map(|w| w.rows() as u32);
    let hd = head_dim as u32;
    if !storage_ok(gpu, storage_need(&w, QKV_STORAGE_BINDINGS))
        || hd == 0
        || hd % 2 == 1
        || rows.iter().any(|r| r % hd != 0)
        || rows[1] != rows[2]
        || rows[1] != cache.params.n_kv_heads * cache.params.head_dim
        || cache.params.head_dim != hd
        || tables.head_dim != head_dim
    {
        return Ok(None);
    }
    let Some((vec, tex)) = layouts(&w, k, x) else {
        return Ok(None);
    };
    let kernel = compile(gpu, dt, vec, tex, Entry::QkvRope, false)?;
    let variant = LinearVariant::for_adapter(&gpu.caps);
    let wg = variant.workgroup(&gpu.caps);
    let pairs = rows.map(|r| r / 2);
    // rows shape: 2 WG pairs per workgroup per section; workgroup shapes:
    // one workgroup per pair.
    let (groups_a, groups_b, groups) = match variant {
        LinearVariant::RowPerThread => {
            let g = pairs.map(|p| p.div_ceil(2 * wg));
            (g[0], g[1], g[0] + g[1] + g[2])
        }
        _ => (0, 0, pairs.iter().sum()),
    };
    let fp = FusedParams {
        rows_a: rows[0],
        rows_b: rows[1],
        rows_c: rows[2],
        groups_a,
        groups_b,
        head_dim: hd,
        max_ctx: cache.params.max_ctx,
        max_positions: tables.max_positions as u32,
        bias_mode,
        _p: [0; 3],
    };
    let outputs = [q_out, &cache.k, &cache.v, &tables.cos, &tables.sin];
    let io = Io {
        step,
        x,
        w: &w,
        bias: &bias,
        outputs: &outputs,
    };
    bind(gpu, kernel, "fused.qkv_rope.params", k, fp, io, groups).map(Some)
}

/// The fused gate/up + bias + GLU for one decode token into `y`
/// (`gelu_tanh`: Gemma's GeGLU, else SwiGLU). None when not fusable.
#[allow(clippy::too_many_arguments)]
pub fn gate_up(
    gpu: &Gpu,
    step: &wgpu::Buffer,
    x: &wgpu::Buffer,
    w: [&DeviceTensor; 2],
    bias: [Option<&DeviceTensor>; 2],
    gelu_tanh: bool,
    y: &wgpu::Buffer,
) -> Result<Option<Fused>> {
    let Some((dt, k, bias_mode)) = check(&w, &bias) else {
        return Ok(None);
    };
    let rows = w[0].rows() as u32;
    if !storage_ok(gpu, storage_need(&w, GATE_UP_STORAGE_BINDINGS)) || w[1].rows() as u32 != rows {
        return Ok(None);
    }
    let Some((vec, tex)) = layouts(&w, k, x) else {
        return Ok(None);
    };
    let kernel = compile(gpu, dt, vec, tex, Entry::GateUp, gelu_tanh)?;
    let variant = LinearVariant::for_adapter(&gpu.caps);
    let groups = match variant {
        LinearVariant::RowPerThread => rows.div_ceil(4 * variant.workgroup(&gpu.caps)),
        _ => rows,
    };
    let fp = FusedParams {
        rows_a: rows,
        rows_b: rows,
        rows_c: 0,
        groups_a: groups,
        groups_b: 0,
        head_dim: 0,
        max_ctx: 0,
        max_positions: 0,
        bias_mode,
        _p: [0; 3],
    };
    let io = Io {
        step,
        x,
        w: &w,
        bias: &bias,
        outputs: &[y],
    };
    bind(gpu, kernel, "fused.gate_up.params", k, fp, io, groups).map(Some)
}

/// The buffers a fused kernel reads and writes, by binding: the step (1),
/// x (2), the weights at 3, 7 and 8, their biases at 9, 10 and 11, then
/// `outputs` from 12 on.
struct Io<'a> {
    step: &'a wgpu::Buffer,
    x: &'a wgpu::Buffer,
    w: &'a [&'a DeviceTensor],
    bias: &'a [Option<&'a DeviceTensor>],
    outputs: &'a [&'a wgpu::Buffer],
}

/// Bind `kernel` to `io` and its two parameter blocks (the linear one at 0,
/// for the first weight's `fp.rows_a` rows of `k` inputs; `fp` at 6): every
/// fused kernel's bindings, the same numbers in the shaders. A bias slot
/// with no bias (an absent one, or the third of two weights) gets a 4-byte
/// dummy, which the kernel never reads (`fp.bias_mode`).
fn bind(
    gpu: &Gpu,
    kernel: Kernel,
    label: &str,
    k: usize,
    fp: FusedParams,
    io: Io<'_>,
    groups: u32,
) -> Result<Fused> {
    let dummy = gpu.storage("fused.no_bias", 4);
    let lin = lin_params(gpu, k, fp.rows_a, fp.bias_mode)?;
    let fpb = gpu.uniform(label, &fp)?;
    let bg = {
        let mut e: Vec<(u32, wgpu::BindingResource<'_>)> = vec![
            (0, lin.as_entire_binding()),
            (1, io.step.as_entire_binding()),
            (2, io.x.as_entire_binding()),
            (6, fpb.as_entire_binding()),
        ];
        // buffer or texture, as the kernel was compiled for (check())
        e.extend(
            [3, 7, 8]
                .into_iter()
                .zip(io.w.iter().map(|w| w.chunks[0].resource())),
        );
        for i in 0..3 {
            let b = match io.bias.get(i).copied().flatten() {
                None => &dummy,
                Some(b) => b.chunks[0].buffer(&b.name)?,
            };
            e.push((9 + i as u32, b.as_entire_binding()));
        }
        e.extend((12..).zip(io.outputs.iter().map(|b| b.as_entire_binding())));
        gpu.bind_resources(&kernel, &e)
    };
    Ok(Fused {
        kernel,
        bg,
        groups,
        _params: [lin, fpb],
        _dummy: dummy,
    })
}

fn lin_params(gpu: &Gpu, k: usize, rows: u32, bias_mode: u32) -> Result<wgpu::Buffer> {
    gpu.uniform(
        "fused.linear.params",
        &LinParams {
            k: k as u32,
            n: rows,
            row_start: 0,
            rows,
            bias_mode,
            _p: [0; 3],
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xw_copy_renames_the_weight_and_functions_but_not_swizzles_or_x() {
        for src in [SRC_XW, SRC_XW_VEC] {
            let c = xw_copy(src, "_b", 7).unwrap();
            assert!(!c.contains("var<storage, read> x:"), "x declared once");
            assert!(c.contains("@group(0) @binding(7) var<storage, read> w_b:"));
            assert!(!c.contains("@binding(3)"));
            assert!(c.contains("fn rows_dot4_b(") && c.contains("fn row_part_b("));
            assert!(
                !c.contains(" w[") && !c.contains("(w["),
                "every w access renamed"
            );
            // reads of x stay on the one x binding
            assert!(c.contains("x["));
        }
        // swizzles and numbers stay as written
        let c = xw_copy(SRC_XW_VEC, "_b", 7).unwrap();
        assert!(c.contains("wb.w + g") && c.contains("0xffff0000u"));
        assert_eq!(
            rename("a.w + w[1] + w8(w)", &["w".into(), "w8".into()], "_c"),
            "a.w + w_c[1] + w8_c(w_c)"
        );
    }

    #[test]
    fn xw_copy_renames_the_weight_texture() {
        let c = xw_copy(&xw_vec_texture_source(), "_b", 7).unwrap();
        assert!(
            c.contains("@group(0) @binding(7) var w_b: texture_2d<u32>;"),
            "{c}"
        );
        assert!(c.contains("fn wtex_b(") && c.contains("textureLoad(w_b,"));
        assert!(c.contains("wtex_b(gw)") && !c.contains(" w[") && !c.contains("(w["));
        assert!(!c.contains("@binding(3)"));
    }

    #[test]
    fn xw_copy_rejects_a_source_of_another_shape() {
        let e = xw_copy("fn f() {}", "_b", 7).unwrap_err().to_string();
        assert!(e.contains("x binding"), "{e}");
    }
}
