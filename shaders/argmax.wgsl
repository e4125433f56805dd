// Row-wise argmax: logits [n_tokens, vocab] f32 -> u32 [n_tokens], the first
// index of the maximum (torch.argmax), NaN never wins (a row of only NaN gives
// 0). One workgroup per row: a strided scan per invocation, then a tree
// reduction in workgroup memory. Prepended: `const WG: u32` (a power of two).
//
// Beside the id, the same scan writes the row's finiteness (4 u32 per row in
// `stats`): the number of NaN logits, of infinite ones, the first non-finite
// index (NONE when every logit is finite) and that logit's bits. It is read
// back with the id, so generation can stop at the first non-finite step
// without reading the logits. Non-finite is decided on the bits (exponent all
// ones), never by float comparisons a compiler could fold.

struct Params {
    vocab: u32,
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

const NONE: u32 = 0xffffffffu;
const EXP: u32 = 0x7f800000u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> step: Step;
@group(0) @binding(2) var<storage, read> logits: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<u32>;
@group(0) @binding(4) var<storage, read_write> stats: array<u32>;

var<workgroup> best_v: array<f32, WG>;
var<workgroup> best_i: array<u32, WG>;
var<workgroup> n_nan: array<u32, WG>;
var<workgroup> n_inf: array<u32, WG>;
var<workgroup> first_bad: array<u32, WG>;

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
    var nn = 0u;
    var ni = 0u;
    var fb = NONE;
    // Indices rise along the scan, so strict > keeps the first maximum (and
    // the first non-finite index seen is this invocation's smallest).
    // NaN fails both comparisons (v == v is false for NaN).
    for (var i = lid; i < p.vocab; i += WG) {
        let v = logits[base + i];
        let bits = bitcast<u32>(v);
        if ((bits & EXP) == EXP) {
            if ((bits & 0x007fffffu) != 0u) {
                nn += 1u;
            } else {
                ni += 1u;
            }
            fb = min(fb, i);
        }
        if ((bi == NONE && v == v) || v > bv) {
            bv = v;
            bi = i;
        }
    }
    best_v[lid] = bv;
    best_i[lid] = bi;
    n_nan[lid] = nn;
    n_inf[lid] = ni;
    first_bad[lid] = fb;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            let vb = best_v[lid + s];
            let ib = best_i[lid + s];
            if (beats(vb, ib, best_v[lid], best_i[lid])) {
                best_v[lid] = vb;
                best_i[lid] = ib;
            }
            n_nan[lid] += n_nan[lid + s];
            n_inf[lid] += n_inf[lid + s];
            first_bad[lid] = min(first_bad[lid], first_bad[lid + s]);
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        out[row] = select(best_i[0], 0u, best_i[0] == NONE);
        let f = first_bad[0];
        stats[4u * row] = n_nan[0];
        stats[4u * row + 1u] = n_inf[0];
        stats[4u * row + 2u] = f;
        stats[4u * row + 3u] = select(0u, bitcast<u32>(logits[base + min(f, p.vocab - 1u)]), f != NONE);
    }
}
