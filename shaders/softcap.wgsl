// Soft-cap in place over f32 `[n_tokens, width]`: x = tanh(x / cap) * cap
// (Gemma's final_logit_softcapping). tanh(t) = sign(t) (1 - e) / (1 + e) with
// e = exp(-2|t|) in (0, 1]: no overflow for any t.

struct Params {
    width: u32,
    cap: f32,
    _p0: u32,
    _p1: u32,
}

override WG: u32 = 256u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> step: Step;
@group(0) @binding(2) var<storage, read_write> x: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = wg_linear(wid, nwg) * WG + lid;
    if (i >= step.n_tokens * p.width) {
        return;
    }
    let t = x[i] / p.cap;
    let e = exp_f32(-2.0 * abs(t));
    x[i] = sign(t) * ((1.0 - e) / (1.0 + e)) * p.cap;
}
