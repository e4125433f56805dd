// Residual add fused with the RMSNorm that reads its result, in f32, on the
// residual stream as (hi, lo) (common.wgsl's stream_add):
//   (s, sl) = stream_add(a, al, b)   (written to `sum`: the residual stream,
//                                     its low halves at float offset y_lo)
//   y = w * ((s + sl) * inv)         inv = 1 / sqrt(mean((s + sl)^2) + eps)
//                                    ((1 + w) with UNIT_OFFSET)
// a's low halves are at float offset x_lo of a (0: a has none, the
// embedding's output). The same operations in the same order as
// elementwise.wgsl's `add` then rmsnorm.wgsl (strided sum of squares, the
// same tree reduction), so the result is bit-identical to the two dispatches
// it replaces. One workgroup per token row of `width`.

struct Params {
    width: u32,
    eps: f32,
    rows_per_token: u32,
    // Float offsets of a's and sum's low halves; x_lo 0 = a has none.
    x_lo: u32,
    y_lo: u32,
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

override WG: u32 = 64u;
override W_BF16: bool = true;
override UNIT_OFFSET: bool = false;
// rmsnorm.wgsl's deliberate bug (model::Faults::norm_eps_outside).
override FAULT_EPS_OUTSIDE: bool = false;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> step: Step;
@group(0) @binding(2) var<storage, read> a: array<f32>;
@group(0) @binding(3) var<storage, read> b: array<f32>;
@group(0) @binding(4) var<storage, read> w: array<u32>;
@group(0) @binding(5) var<storage, read_write> sum: array<f32>;
@group(0) @binding(6) var<storage, read_write> y: array<f32>;

var<workgroup> partial: array<SumSq, WG>;

fn load_w(i: u32) -> f32 {
    if (W_BF16) {
        return bf16_at(w[i >> 1u], i);
    }
    return bitcast<f32>(w[i]);
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let row = wg_linear(wid, nwg);
    if (row >= step.n_tokens * p.rows_per_token) {
        return;
    }
    let base = row * p.width;
    let zero = step.zero;
    var acc = SumSq(0.0, 0.0);
    let has_lo = p.x_lo != 0u;
    let has_ylo = p.y_lo != 0u;
    for (var i = lid; i < p.width; i += WG) {
        let j = base + i;
        let al = select(0.0, a[p.x_lo + j], has_lo);
        let v = stream_add(a[j], al, b[j], zero);
        // Without a low half for the sum (y_lo 0), as the plain add and
        // norm: hi only.
        let vl = select(0.0, v.e, has_ylo);
        sum[j] = v.s;
        if (has_ylo) {
            sum[p.y_lo + j] = vl;
        }
        acc = sumsq_add(acc, v.s, vl, zero);
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
        // Each invocation re-reads only the elements it wrote itself.
        let j = base + i;
        y[j] = norm_scale(wi, sum[j], select(0.0, sum[p.y_lo + j], has_ylo), inv, zero);
    }
}
