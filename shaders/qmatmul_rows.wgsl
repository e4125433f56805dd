// Quantized linear layer, one invocation per output row and block of TB
// tokens, no workgroup memory and no barriers (the CPU-device profile's
// shape, as gemv_rows.wgsl). Each 4 values of the row are dequantized
// once into registers and used for all TB tokens.
// Prepended: `const WG, TB: u32`, matmul_common.wgsl, qmatmul_common.wgsl
// and one qmatmul_<type>.wgsl.

// x [n_tokens, k] as vec4s (k is a multiple of 32)
@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let g = wg_linear(wid, nwg);
    let per_blk = (p.rows + WG - 1u) / WG;
    let t0 = (g / per_blk) * TB;
    let r = (g % per_blk) * WG + lid;
    if (t0 >= step.n_tokens || r >= p.rows) {
        return;
    }
    let groups = p.k / 32u;
    let bpr = groups / QGPB;
    var acc: array<vec4<f32>, TB>;
    for (var gi = 0u; gi < groups; gi++) {
        let bw = (r * bpr + gi / QGPB) * QBW;
        let sub = gi % QGPB;
        for (var j = 0u; j < 8u; j++) {
            let v = dequant4(bw, sub, j);
            for (var i = 0u; i < TB; i++) {
                // tokens past the end recompute the last one and are not stored
                let xi = (min(t0 + i, step.n_tokens - 1u) * p.k + gi * 32u) / 4u + j;
                acc[i] += v * x[xi];
            }
        }
    }
    for (var i = 0u; i < TB; i++) {
        if (t0 + i < step.n_tokens) {
            let a = acc[i];
            store(t0 + i, r, (a.x + a.y) + (a.z + a.w));
        }
    }
}
