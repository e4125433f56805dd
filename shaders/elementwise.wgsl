// Element-wise kernels over f32 activations `[n_tokens, width]`.
// One invocation per element; the grid is 1D or 2D (see wg_linear).

struct Params {
    width: u32,
    _p0: u32,
    // `add` only: float offsets of a's and y's low halves (the residual
    // stream as (hi, lo), common.wgsl's stream_add); 0 = none.
    a_lo: u32,
    y_lo: u32,
}

override WG: u32 = 256u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> step: Step;
@group(0) @binding(2) var<storage, read> a: array<f32>;
@group(0) @binding(3) var<storage, read> b: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

fn elem(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return wg_linear(wid, nwg) * WG + lid;
}

// SwiGLU: y = silu(gate) * up, silu(g) = g / (1 + exp(-g)) as torch computes it
// (exp_f32 from common.wgsl: the built-in exp is a few ulp off on some devices).
@compute @workgroup_size(WG)
fn swiglu(@builtin(workgroup_id) wid: vec3<u32>,
          @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let i = elem(wid, nwg, lid);
    if (i >= step.n_tokens * p.width) {
        return;
    }
    let g = a[i];
    y[i] = g / (1.0 + exp_f32(-g)) * b[i];
}

// GeGLU with torch's tanh GELU: y = 0.5 g (1 + tanh(c (g + 0.044715 g^3))) * up,
// evaluated as g / (1 + exp(-2 c (g + 0.044715 g^3))) (the same function:
// 0.5 (1 + tanh(u)) = 1 / (1 + exp(-2u))), which neither overflows to NaN
// nor cancels for large |g|.
@compute @workgroup_size(WG)
fn gelu_tanh_glu(@builtin(workgroup_id) wid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let i = elem(wid, nwg, lid);
    if (i >= step.n_tokens * p.width) {
        return;
    }
    let g = a[i];
    let u = 0.7978845608028654 * (g + 0.044715 * g * g * g);
    y[i] = g / (1.0 + exp_f32(-2.0 * u)) * b[i];
}

// Residual add on the stream as (hi, lo): (y, y_lo) = stream_add(a, a_lo, b).
// Without low halves (both offsets 0) this is y = a + b, correctly rounded:
// two_sum(fl(a + b), e) with e the exact error rounds back to fl(a + b).
@compute @workgroup_size(WG)
fn add(@builtin(workgroup_id) wid: vec3<u32>,
       @builtin(num_workgroups) nwg: vec3<u32>,
       @builtin(local_invocation_index) lid: u32) {
    let i = elem(wid, nwg, lid);
    if (i >= step.n_tokens * p.width) {
        return;
    }
    let al = select(0.0, a[p.a_lo + i], p.a_lo != 0u);
    let v = stream_add(a[i], al, b[i], step.zero);
    y[i] = v.s;
    if (p.y_lo != 0u) {
        y[p.y_lo + i] = v.e;
    }
}
