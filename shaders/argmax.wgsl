// Row-wise argmax: logits [n_tokens, vocab] f32 -> u32 [n_tokens], the first
// index of the maximum (torch.argmax), NaN never wins (a row of only NaN gives
// 0). One workgroup per row: a strided scan per invocation, then a tree
// reduction in workgroup memory. Prepended: `const WG: u32` (a power of two).

struct Params {
    vocab: u32,
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

const NONE: u32 = 0xffffffffu;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> step: Step;
@group(0) @binding(2) var<storage, read> logits: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<u32>;

var<workgroup> best_v: array<f32, WG>;
var<workgroup> best_i: array<u32, WG>;

// Does candidate (vb, ib) beat (va, ia)? NONE marks "no candidate yet".
fn beats(vb: f32, ib: u32, va: f32, ia: u32) -> bool {
    return ib != NONE && (ia == NONE || vb > va || (vb == va && ib < ia));
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let row = wg_linear(wid, nwg);
    // Uniform across the workgroup.
    if (row >= step.n_tokens) {
        return;
    }
    let base = row * p.vocab;
    var bv = 0.0;
    var bi = NONE;
    // Indices rise along the scan, so strict > keeps the first maximum.
    // NaN fails both comparisons (v == v is false for NaN).
    for (var i = lid; i < p.vocab; i += WG) {
        let v = logits[base + i];
        if ((bi == NONE && v == v) || v > bv) {
            bv = v;
            bi = i;
        }
    }
    best_v[lid] = bv;
    best_i[lid] = bi;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            let vb = best_v[lid + s];
            let ib = best_i[lid + s];
            if (beats(vb, ib, best_v[lid], best_i[lid])) {
                best_v[lid] = vb;
                best_i[lid] = ib;
            }
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        out[row] = select(best_i[0], 0u, best_i[0] == NONE);
    }
}
