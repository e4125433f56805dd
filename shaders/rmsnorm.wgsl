// RMSNorm as in HF (LlamaRMSNorm / Qwen2RMSNorm), all in f32:
//   y = w * (x * inverseSqrt(mean(x^2) + eps))
// or, with UNIT_OFFSET (Gemma3RMSNorm), y = (1 + w) * (x * inverseSqrt(...)).
// One workgroup per row of `width`; a token holds `rows_per_token` rows (a
// per-head norm). A strided sum of squares then a tree reduction in
// workgroup memory, both compensated, the scale refined by a Newton step and
// applied with one rounding (common.wgsl's sumsq_add / sumsq_merge /
// rms_inv / norm_scale; issue #14). A norm of the residual stream reads it as
// (hi, lo) (common.wgsl's stream_add): the low halves at float offset
// `x_lo` of x (0: x has none), and normalises hi + lo.

struct Params {
    width: u32,
    eps: f32,
    rows_per_token: u32,
    // Float offset in x of its low halves (the residual stream); 0 = none.
    x_lo: u32,
    // add_rmsnorm.wgsl only (the sum's low halves).
    y_lo: u32,
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

override WG: u32 = 64u;
// Weight storage: bf16 packed two per u32 (true) or f32 bits (false).
override W_BF16: bool = true;
// The weight is an offset from one (Gemma).
override UNIT_OFFSET: bool = false;
// A deliberate bug for verify's self-tests (model::Faults); never set in use.
// Kept as a pipeline constant: see ARCHITECTURE.md "Fault injection".
override FAULT_EPS_OUTSIDE: bool = false;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> step: Step;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read> w: array<u32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

var<workgroup> partial: array<SumSq, WG>;

fn load_w(i: u32) -> f32 {
    if (W_BF16) {
        return bf16_at(w[i >> 1u], i);
    }
    return bitcast<f32>(w[i]);
}

// The low half of element j of x (0 without one; x[j] itself is read then,
// in bounds, and discarded).
fn lo_at(j: u32, has_lo: bool) -> f32 {
    return select(0.0, x[p.x_lo + j], has_lo);
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let row = wg_linear(wid, nwg);
    // Uniform control flow: the whole workgroup takes the same branch.
    if (row >= step.n_tokens * p.rows_per_token) {
        return;
    }
    let base = row * p.width;
    let zero = step.zero;
    var acc = SumSq(0.0, 0.0);
    let has_lo = p.x_lo != 0u;
    for (var i = lid; i < p.width; i += WG) {
        acc = sumsq_add(acc, x[base + i], lo_at(base + i, has_lo), zero);
    }
    partial[lid] = acc;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            partial[lid] = sumsq_merge(partial[lid], partial[lid + s], zero);
        }
        workgroupBarrier();
    }
    let ss = partial[0];
    var inv = rms_inv(ss, p.width, p.eps, zero);
    if (FAULT_EPS_OUTSIDE) {
        inv = 1.0 / (sqrt((ss.hi + ss.lo) / f32(p.width)) + p.eps);
    }
    for (var i = lid; i < p.width; i += WG) {
        var wi = load_w(i);
        if (UNIT_OFFSET) {
            wi = 1.0 + wi;
        }
        y[base + i] = norm_scale(wi, x[base + i], lo_at(base + i, has_lo), inv, zero);
    }
}
