// GEMV, one workgroup per output row, tree reduction in workgroup memory
// (adapters without subgroup operations). WG is a power of two.
// Prepended: `const WG: u32`, matmul_common.wgsl and one matmul_xw*.wgsl.
// The fused kernels (gemv_fused_wg.wgsl) reduce with the same wg_sum.

var<workgroup> red: array<f32, WG>;

// Where an invocation sits in its workgroup.
struct Lanes {
    @builtin(local_invocation_index) lid: u32,
}

// The workgroup's sum of v, returned to every invocation. Call it in uniform
// control flow; between two calls the caller puts a workgroupBarrier (red is
// reused).
fn wg_sum(v: f32, l: Lanes) -> f32 {
    red[l.lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (l.lid < s) {
            red[l.lid] += red[l.lid + s];
        }
        workgroupBarrier();
    }
    return red[0];
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>,
        l: Lanes) {
    let g = wg_linear(wid, nwg);
    let t = g / p.rows;
    let r = g % p.rows;
    // Uniform across the workgroup.
    if (t >= step.n_tokens) {
        return;
    }
    let total = wg_sum(row_part(t, r, l.lid, WG), l);
    if (l.lid == 0u) {
        store(t, r, total);
    }
}
