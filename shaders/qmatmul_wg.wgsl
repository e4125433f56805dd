// Quantized linear layer, one workgroup per output row and block of TB
// tokens (the GPU profile's shape, as gemv_wg_shared.wgsl): lanes take the
// row's 32-element groups in turn, decode each group's scales once and
// dequantize each of its weights once for all TB tokens,
// and the partial sums are reduced in workgroup memory.
// Prepended: `const WG, TB: u32`, matmul_common.wgsl, qmatmul_common.wgsl
// and one qmatmul_<type>.wgsl.

// x [n_tokens, k] as vec4s (k is a multiple of 32)
@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;

var<workgroup> red: array<array<f32, TB>, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let g = wg_linear(wid, nwg);
    let t0 = (g / p.rows) * TB;
    let r = g % p.rows;
    // uniform per workgroup: the whole workgroup leaves together
    if (t0 >= step.n_tokens) {
        return;
    }
    let groups = p.k / 32u;
    let bpr = groups / QGPB;
    var acc: array<vec4<f32>, TB>;
    for (var gi = lid; gi < groups; gi += WG) {
        let bw = (r * bpr + gi / QGPB) * QBW;
        let sub = gi % QGPB;
        let sc = gscales(bw, sub);
        for (var j = 0u; j < 8u; j++) {
            let v = dequant4s(bw, sub, j, sc);
            for (var i = 0u; i < TB; i++) {
                // tokens past the end recompute the last one and are not stored
                let xi = (min(t0 + i, step.n_tokens - 1u) * p.k + gi * 32u) / 4u + j;
                acc[i] += v * x[xi];
            }
        }
    }
    for (var i = 0u; i < TB; i++) {
        let a = acc[i];
        red[lid][i] = (a.x + a.y) + (a.z + a.w);
    }
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            for (var i = 0u; i < TB; i++) {
                red[lid][i] += red[lid + s][i];
            }
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        for (var i = 0u; i < TB; i++) {
            if (t0 + i < step.n_tokens) {
                store(t0 + i, r, red[0][i]);
            }
        }
    }
}
