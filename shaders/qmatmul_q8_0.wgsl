// Q8_0: f16 d (word 0, low half; 2 pad bytes), i8 qs[32] (words 1..8).
// y = q * d.
const QBW: u32 = 9u;
const QGPB: u32 = 1u;
fn gscales(bw: u32, g: u32) -> vec4<f32> {
    return vec4<f32>(scale16(bw, false), 0.0, 0.0, 0.0);
}
fn dequant4s(bw: u32, g: u32, j: u32, s: vec4<f32>) -> vec4<f32> {
    return vec4<f32>(sbytes4(w[bw + 1u + j])) * s.x;
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
    for (var j = 0u; j < 8u; j++) {
        var v: array<vec4<f32>, R>;
        for (var a = 0u; a < R; a++) {
            v[a] = vec4<f32>(sbytes4(w[rb[a] + 1u + j])) * d[a];
        }
        use4(j, v);
    }
}
