// Batched decode GEMV, one workgroup per (output row, block of TB tokens),
// reduced with subgroupAdd: gemv_wg_subgroup.wgsl for TB tokens at once. Each
// weight element is read once for the block (rows_part); each token's partial
// sums and their reduction are exactly gemv_wg_subgroup.wgsl's, so every token
// gets the bits a one-token GEMV gives it, whatever the batch.
// Prepended: `const WG, TB: u32`, matmul_common.wgsl and one matmul_xw*.wgsl.

var<workgroup> red: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32,
        @builtin(subgroup_invocation_id) sid: u32,
        @builtin(subgroup_size) ssz: u32) {
    let g = wg_linear(wid, nwg);
    let t0 = (g / p.rows) * TB;
    let r = g % p.rows;
    // Uniform across the workgroup.
    if (t0 >= step.n_tokens) {
        return;
    }
    var parts = rows_part(t0, r, lid, WG);
    for (var i = 0u; i < TB; i++) {
        let s = subgroupAdd(parts[i]);
        red[lid] = select(0.0, s, sid == 0u);
        workgroupBarrier();
        var a = 0.0;
        for (var j = sid; j < WG; j += ssz) {
            a += red[j];
        }
        let total = subgroupAdd(a);
        if (lid == 0u && t0 + i < step.n_tokens) {
            store(t0 + i, r, total);
        }
        workgroupBarrier();
    }
}
