// Flash-decoding combine: merge the partials (acc, m, l) that attention.wgsl
// or attention_rows.wgsl (PARTIAL) wrote per (token, head) into
//   out = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s,  M = max_s m_s.
// A row has n_splits(lo, n) * PH partials (PH per split: the row kernel's
// lanes; 1 for attention.wgsl), counted from the row's own range exactly as
// the partial pass counted them, so only those are read: the combine's cost
// follows the KV length, not the largest split count. Empty partials hold
// m = NEG, l = 0, acc = 0 and weigh exp(NEG - M) = 0; the first partial
// always holds the first visible position, so M is finite.
// One workgroup per (token, head); invocation c owns vec4 column c.
// Params, its uniforms (bindings 0 and 1), row_range and n_splits:
// attention_common.wgsl, prepended.

override WG: u32 = 64u;
override D4: u32 = 16u;
override SPLITS: u32 = 1u;
// Partials per split (see above).
override PH: u32 = 1u;

@group(0) @binding(2) var<storage, read> part: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> out: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let hrow = wg_linear(wid, nwg);
    if (hrow >= step.n_tokens * p.n_heads) {
        return;
    }
    let r = row_range(hrow / p.n_heads);
    let np = n_splits(r.x, r.y) * PH;
    let base = hrow * SPLITS * PH * (D4 + 1u);
    var mx = part[base + D4].x;
    for (var s = 1u; s < np; s++) {
        mx = max(mx, part[base + s * (D4 + 1u) + D4].x);
    }
    for (var c = lid; c < D4; c += WG) {
        var a = vec4<f32>(0.0);
        var l = 0.0;
        for (var s = 0u; s < np; s++) {
            let b = base + s * (D4 + 1u);
            let ml = part[b + D4];
            let w = exp_f32(ml.x - mx);
            a += w * part[b + c];
            l += w * ml.y;
        }
        out[hrow * D4 + c] = a / l;
    }
}
