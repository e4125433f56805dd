// Q4_0: f16 d (word 0, low half; 2 pad bytes), u8 qs[16] (words 1..4).
// Element e < 16 in the low nibble of qs[e], e + 16 in its high nibble;
// y = (q - 8) * d.
const QBW: u32 = 5u;
const QGPB: u32 = 1u;
fn gscales(bw: u32, g: u32) -> vec4<f32> {
    return vec4<f32>(scale16(bw, false), 0.0, 0.0, 0.0);
}
fn dequant4s(bw: u32, g: u32, j: u32, s: vec4<f32>) -> vec4<f32> {
    let q = vec4<i32>(nibbles4(w[bw + 1u + j % 4u], j >= 4u)) - vec4<i32>(8);
    return vec4<f32>(q) * s.x;
}

// Whole block for the row kernel (qmatmul_rows.wgsl), R rows at once
// (rb: their blocks' first words): every word of each row's block loaded
// once, and use4(e4, v) called with elements 4 e4 .. 4 e4 + 3 of the block
// for each row, so the entry loads each 4 values of x once for all R rows.
fn qblock(rb: array<u32, R>) {
    var d: array<f32, R>;
    for (var a = 0u; a < R; a++) {
        d[a] = scale16(rb[a], false);
    }
    for (var j = 0u; j < 4u; j++) {
        var lo: array<vec4<f32>, R>;
        var hi: array<vec4<f32>, R>;
        for (var a = 0u; a < R; a++) {
            let wd = w[rb[a] + 1u + j];
            lo[a] = vec4<f32>(vec4<i32>(nibbles4(wd, false)) - vec4<i32>(8)) * d[a];
            hi[a] = vec4<f32>(vec4<i32>(nibbles4(wd, true)) - vec4<i32>(8)) * d[a];
        }
        use4(j, lo);
        use4(j + 4u, hi);
    }
}
