// Q5_0: f16 d (word 0, low half; 2 pad bytes), u32 qh (word 1), u8 qs[16]
// (words 2..5). Low 4 bits as Q4_0, the fifth bit of element e is bit e of
// qh; y = (q - 16) * d.
const QBW: u32 = 6u;
const QGPB: u32 = 1u;
fn gscales(bw: u32, g: u32) -> vec4<f32> {
    return vec4<f32>(scale16(bw, false), 0.0, 0.0, 0.0);
}
fn dequant4s(bw: u32, g: u32, j: u32, s: vec4<f32>) -> vec4<f32> {
    let q = nibbles4(w[bw + 2u + j % 4u], j >= 4u) | (bits4(w[bw + 1u], 4u * j) << vec4<u32>(4u));
    return vec4<f32>(vec4<i32>(q) - vec4<i32>(16)) * s.x;
}

// Whole block for the row kernel (qmatmul_rows.wgsl), R rows at once
// (rb: their blocks' first words): every word of each row's block loaded
// once, and use4(e4, v) called with elements 4 e4 .. 4 e4 + 3 of the block
// for each row, so the entry loads each 4 values of x once for all R rows.
fn qblock(rb: array<u32, R>) {
    var d: array<f32, R>;
    var qh: array<u32, R>;
    for (var a = 0u; a < R; a++) {
        d[a] = scale16(rb[a], false);
        qh[a] = w[rb[a] + 1u];
    }
    for (var j = 0u; j < 4u; j++) {
        var lo: array<vec4<f32>, R>;
        var hi: array<vec4<f32>, R>;
        for (var a = 0u; a < R; a++) {
            let wd = w[rb[a] + 2u + j];
            let ql = nibbles4(wd, false) | (bits4(qh[a], 4u * j) << vec4<u32>(4u));
            let qu = nibbles4(wd, true) | (bits4(qh[a], 4u * j + 16u) << vec4<u32>(4u));
            lo[a] = vec4<f32>(vec4<i32>(ql) - vec4<i32>(16)) * d[a];
            hi[a] = vec4<f32>(vec4<i32>(qu) - vec4<i32>(16)) * d[a];
        }
        use4(j, lo);
        use4(j + 4u, hi);
    }
}
