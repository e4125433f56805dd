// Linear layer by invocations over output rows, no workgroup memory and no
// barriers (the shape for CPU-type adapters, where a workgroup is SIMD lanes
// and barriers are expensive). Each invocation computes 4 rows r0, r0 + WG,
// r0 + 2 WG, r0 + 3 WG for TB consecutive tokens, all in registers: TB = 1
// for decode, larger for prefill.
// Prepended: `const WG, TB: u32`, matmul_common.wgsl and one matmul_xw*.wgsl.
// Workgroup g covers token block g / per_blk and a block of 4 WG rows.

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let g = wg_linear(wid, nwg);
    let per_blk = (p.rows + 4u * WG - 1u) / (4u * WG);
    let t0 = (g / per_blk) * TB;
    let r0 = (g % per_blk) * 4u * WG + lid;
    if (t0 >= step.n_tokens || r0 >= p.rows) {
        return;
    }
    let r = vec4<u32>(r0, r0 + WG, r0 + 2u * WG, r0 + 3u * WG);
    // rows past the end recompute the last row and are not stored
    let v = rows_dot4(t0, min(r, vec4<u32>(p.rows - 1u)));
    for (var i = 0u; i < TB; i++) {
        let t = t0 + i;
        for (var j = 0u; j < 4u; j++) {
            if (t < step.n_tokens && r[j] < p.rows) {
                store(t, r[j], v[i][j]);
            }
        }
    }
}
