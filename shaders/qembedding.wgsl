// Embedding gather from one row-chunk of a quantized table (BlockPad
// layout): one invocation per (token, 32-element group); tokens whose id
// falls in [row_start, row_start + rows) dequantize their row's group and
// multiply by the scale. Prepended: qmatmul_common.wgsl and one
// qmatmul_<type>.wgsl.

struct Params {
    hidden: u32,
    row_start: u32,
    rows: u32,
    scale: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> step: Step;
@group(0) @binding(2) var<storage, read> ids: array<u32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = wg_linear(wid, nwg) * 64u + lid;
    let gpr = p.hidden / 32u;
    if (i >= step.n_tokens * gpr) {
        return;
    }
    let t = i / gpr;
    let gi = i % gpr;
    let id = ids[t];
    if (id < p.row_start || id >= p.row_start + p.rows) {
        return;
    }
    let bw = ((id - p.row_start) * (gpr / QGPB) + gi / QGPB) * QBW;
    let yb = t * p.hidden + gi * 32u;
    let sc = gscales(bw, gi % QGPB);
    for (var j = 0u; j < 8u; j++) {
        let v = dequant4s(bw, gi % QGPB, j, sc) * p.scale;
        y[yb + 4u * j] = v.x;
        y[yb + 4u * j + 1u] = v.y;
        y[yb + 4u * j + 2u] = v.z;
        y[yb + 4u * j + 3u] = v.w;
    }
}
