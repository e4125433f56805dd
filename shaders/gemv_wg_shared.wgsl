// GEMV, one workgroup per output row, tree reduction in workgroup memory
// (adapters without subgroup operations). WG is a power of two.
// Prepended: `const WG: u32`, matmul_common.wgsl and one matmul_xw*.wgsl.

var<workgroup> red: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let g = wg_linear(wid, nwg);
    let t = g / p.rows;
    let r = g % p.rows;
    // Uniform across the workgroup.
    if (t >= step.n_tokens) {
        return;
    }
    red[lid] = row_part(t, r, lid, WG);
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red[lid] += red[lid + s];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        store(t, r, red[0]);
    }
}
