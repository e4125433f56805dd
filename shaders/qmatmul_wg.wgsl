// Quantized linear layer, one workgroup per output row and block of TB
// tokens (the GPU profile's shape, as gemv_wg_shared.wgsl): lanes take the
// row's 32-element groups in turn, dequantize each once for all TB tokens,
// and the partial sums are reduced in workgroup memory.
// Prepended: `const WG, TB: u32`, matmul_common.wgsl, qmatmul_common.wgsl
// and one qmatmul_<type>.wgsl.

@group(0) @binding(2) var<storage, read> x: array<f32>;

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
    var q: array<f32, 32>;
    for (var gi = lid; gi < groups; gi += WG) {
        dequant32((r * bpr + gi / QGPB) * QBW, gi % QGPB, &q);
        for (var i = 0u; i < TB; i++) {
            let xb = min(t0 + i, step.n_tokens - 1u) * p.k + gi * 32u;
            var a = acc[i];
            for (var e = 0u; e < 32u; e += 4u) {
                a += vec4<f32>(q[e], q[e + 1u], q[e + 2u], q[e + 3u])
                    * vec4<f32>(x[xb + e], x[xb + e + 1u], x[xb + e + 2u], x[xb + e + 3u]);
            }
            acc[i] = a;
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
