// Compute probe: f32 multiply-add throughput (see src/bench.rs). Each
// invocation runs ITERS rounds over 8 independent vec4 accumulators
// (a = a * m + c: 2 flops per lane, contracted into an fma or not), enough
// independent chains to hide the latency of each. The sum goes to `out`, so
// nothing can be dropped. Not a model op: no Step binding.

override WG: u32 = 64u;
override ITERS: u32 = 512u;

struct FmaParams {
    m: f32,
    c: f32,
    _p0: u32,
    _p1: u32,
}

@group(0) @binding(0) var<uniform> p: FmaParams;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let g = wg_linear(wid, nwg) * WG + lid;
    let f = f32(lid) * 1e-3;
    let m = vec4<f32>(p.m);
    let c = vec4<f32>(p.c);
    var a0 = vec4<f32>(f, f + 1.0, f + 2.0, f + 3.0);
    var a1 = a0 + 0.5;
    var a2 = a0 + 1.5;
    var a3 = a0 + 2.5;
    var a4 = a0 - 0.5;
    var a5 = a0 - 1.5;
    var a6 = a0 - 2.5;
    var a7 = a0 - 3.5;
    for (var i = 0u; i < ITERS; i = i + 1u) {
        a0 = a0 * m + c;
        a1 = a1 * m + c;
        a2 = a2 * m + c;
        a3 = a3 * m + c;
        a4 = a4 * m + c;
        a5 = a5 * m + c;
        a6 = a6 * m + c;
        a7 = a7 * m + c;
    }
    let s = (a0 + a1) + (a2 + a3) + (a4 + a5) + (a6 + a7);
    out[g] = s.x + s.y + s.z + s.w;
}
