// Embedding gather for one row-chunk of the table: tokens whose id falls in
// [row_start, row_start + rows) copy their row, widened to f32. The model
// dispatches once per chunk, so a table split across buffers is handled
// without any chunk knowing about the others.

struct Params {
    hidden: u32,
    row_start: u32,
    rows: u32,
    scale: f32,
}

override WG: u32 = 256u;
override W_BF16: bool = true;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> step: Step;
@group(0) @binding(2) var<storage, read> ids: array<u32>;
@group(0) @binding(3) var<storage, read> table: array<u32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = wg_linear(wid, nwg) * WG + lid;
    if (i >= step.n_tokens * p.hidden) {
        return;
    }
    let t = i / p.hidden;
    let c = i % p.hidden;
    let id = ids[t];
    if (id < p.row_start || id >= p.row_start + p.rows) {
        return;
    }
    let e = (id - p.row_start) * p.hidden + c;
    if (W_BF16) {
        y[i] = bf16_at(table[e >> 1u], e) * p.scale;
    } else {
        y[i] = bitcast<f32>(table[e]) * p.scale;
    }
}
