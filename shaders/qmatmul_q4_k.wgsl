// Q4_K: f16 d, f16 dmin (word 0), u8 scales[12] (words 1..3), u8 qs[128]
// (words 4..35). Group g: scale/min g, element l from byte qs[32 (g / 2) +
// l], low nibble for even g, high for odd; y = (d * sc) * q - (dmin * m).
// Scales through qmatmul_common.wgsl's K-quant helpers.
const QBW: u32 = 36u;
const QGPB: u32 = 8u;
fn gscales(bw: u32, g: u32) -> vec4<f32> {
    return kgscales(bw, g);
}
fn dequant4s(bw: u32, g: u32, j: u32, s: vec4<f32>) -> vec4<f32> {
    let q = nibbles4(w[bw + 4u + 8u * (g / 2u) + j], (g & 1u) == 1u);
    return s.x * vec4<f32>(q) - vec4<f32>(s.y);
}

// Whole block for the row kernel (qmatmul_rows.wgsl), R rows at once
// (rb: their blocks' first words): every word of each row's block loaded
// once, and use4(e4, v) called with elements 4 e4 .. 4 e4 + 3 of the block
// for each row, so the entry loads each 4 values of x once for all R rows.
fn qblock(rb: array<u32, R>) {
    var hd: array<KHead, R>;
    for (var a = 0u; a < R; a++) {
        hd[a] = khead(rb[a]);
    }
    for (var p = 0u; p < 4u; p++) {
        var sc: array<vec4<f32>, R>;
        for (var a = 0u; a < R; a++) {
            sc[a] = kpair(hd[a], p);
        }
        for (var j = 0u; j < 8u; j++) {
            var lo: array<vec4<f32>, R>;
            var hi: array<vec4<f32>, R>;
            for (var a = 0u; a < R; a++) {
                let wd = w[rb[a] + 4u + 8u * p + j];
                lo[a] = sc[a].x * vec4<f32>(nibbles4(wd, false)) - vec4<f32>(sc[a].y);
                hi[a] = sc[a].z * vec4<f32>(nibbles4(wd, true)) - vec4<f32>(sc[a].w);
            }
            use4(16u * p + j, lo);
            use4(16u * p + 8u + j, hi);
        }
    }
}
