// Quantized linear layer, one invocation per R output rows (r0, r0 + WG,
// ..., r0 + (R - 1) WG) and block of TB tokens, no workgroup memory and no
// barriers (the CPU-device profile's shape, as gemv_rows.wgsl). The rows
// are walked block by block; the type's qblock loads every word of each
// row's block exactly once and decodes its scales once, and hands each 4
// dequantized weights of the R rows to use4, which loads the matching 4
// values of x once per token and multiplies them into all R x TB
// accumulators. On a CPU-type adapter every lane is a different row and
// each storage load is a per-lane gather, the dominant cost; sharing one x
// load among R rows and reading each weight word once is what makes these
// kernels fast there.
// Prepended: `const WG, TB, R: u32`, matmul_common.wgsl,
// qmatmul_common.wgsl and one qmatmul_<type>.wgsl with its block part.

// x [n_tokens, k] as vec4s (k is a multiple of 32)
@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;

// Per row and token: the running sum (4 interleaved partial sums). Per
// token: the vec4 index in x of the current weight block's first element.
var<private> acc: array<array<vec4<f32>, TB>, R>;
var<private> xo: array<u32, TB>;

fn use4(e4: u32, v: array<vec4<f32>, R>) {
    for (var i = 0u; i < TB; i++) {
        let xv = x[xo[i] + e4];
        for (var a = 0u; a < R; a++) {
            acc[a][i] += v[a] * xv;
        }
    }
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let g = wg_linear(wid, nwg);
    let per_blk = (p.rows + R * WG - 1u) / (R * WG);
    let t0 = (g / per_blk) * TB;
    let r0 = (g % per_blk) * R * WG + lid;
    if (t0 >= step.n_tokens || r0 >= p.rows) {
        return;
    }
    let bpr = p.k / (32u * QGPB);
    // rows past the end recompute the last row and are not stored
    var rb: array<u32, R>;
    for (var a = 0u; a < R; a++) {
        rb[a] = min(r0 + a * WG, p.rows - 1u) * bpr * QBW;
    }
    for (var i = 0u; i < TB; i++) {
        // tokens past the end recompute the last one and are not stored
        xo[i] = min(t0 + i, step.n_tokens - 1u) * (p.k / 4u);
    }
    for (var b = 0u; b < bpr; b++) {
        qblock(rb);
        for (var a = 0u; a < R; a++) {
            rb[a] += QBW;
        }
        for (var i = 0u; i < TB; i++) {
            xo[i] += 8u * QGPB;
        }
    }
    for (var a = 0u; a < R; a++) {
        let r = r0 + a * WG;
        for (var i = 0u; i < TB; i++) {
            if (t0 + i < step.n_tokens && r < p.rows) {
                let v = acc[a][i];
                store(t0 + i, r, (v.x + v.y) + (v.z + v.w));
            }
        }
    }
}
