// Batched decode GEMV, one workgroup per (output row, block of TB tokens),
// tree reduction in workgroup memory: gemv_wg_shared.wgsl for TB tokens at
// once. Each weight element is read once for the block (rows_part); each
// token's partial sums and their tree are exactly gemv_wg_shared.wgsl's, so
// every token gets the bits a one-token GEMV gives it, whatever the batch.
// Prepended: `const WG, TB: u32`, matmul_common.wgsl and one matmul_xw*.wgsl.

var<workgroup> red: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let g = wg_linear(wid, nwg);
    let t0 = (g / p.rows) * TB;
    let r = g % p.rows;
    // Uniform across the workgroup.
    if (t0 >= step.n_tokens) {
        return;
    }
    var parts = rows_part(t0, r, lid, WG);
    for (var i = 0u; i < TB; i++) {
        red[lid] = parts[i];
        workgroupBarrier();
        for (var s = WG / 2u; s > 0u; s >>= 1u) {
            if (lid < s) {
                red[lid] += red[lid + s];
            }
            workgroupBarrier();
        }
        if (lid == 0u && t0 + i < step.n_tokens) {
            store(t0 + i, r, red[0]);
        }
        workgroupBarrier();
    }
}
