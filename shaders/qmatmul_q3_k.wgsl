// Q3_K: u8 hmask[32] (words 0..7), u8 qs[64] (words 8..23), u8 scales[12]
// (words 24..26), f16 d (word 27, low half; 2 pad bytes). 16 sub-blocks of
// 16 with 6-bit scales: sub-block s takes its low 4 bits from the nibble
// s / 8 of scales[s % 8] and its high 2 bits from bits 2 (s / 4).. of
// scales[8 + s % 4]; sc = that - 32. Group g: half n = g / 4, shift
// 2 (g % 4); element l (0..32) has low 2 bits from qs[32 n + l] at shift,
// the high bit is bit g of hmask[l], q = low - (4 if that bit is clear);
// y = (d * sc) * q, sub-block 2 g + l / 16.
// gscales: (d * sc of elements 0..15, d * sc of elements 16..31).
const QBW: u32 = 28u;
const QGPB: u32 = 8u;
fn q3_scale(bw: u32, s: u32) -> i32 {
    let lo = nibble(qbyte(4u * bw + 96u + s % 8u), s >= 8u);
    let hi = (qbyte(4u * bw + 104u + s % 4u) >> (2u * (s / 4u))) & 3u;
    return i32(lo | (hi << 4u)) - 32;
}
fn gscales(bw: u32, g: u32) -> vec4<f32> {
    let d = scale16(bw + 27u, false);
    return vec4<f32>(d * f32(q3_scale(bw, 2u * g)), d * f32(q3_scale(bw, 2u * g + 1u)), 0.0, 0.0);
}
fn dequant4s(bw: u32, g: u32, j: u32, s: vec4<f32>) -> vec4<f32> {
    let lo = (bytes4(w[bw + 8u + 8u * (g / 4u) + j]) >> vec4<u32>(2u * (g % 4u))) & vec4<u32>(3u);
    let h = (bytes4(w[bw + j]) >> vec4<u32>(g)) & vec4<u32>(1u);
    let q = vec4<i32>(lo) - vec4<i32>((vec4<u32>(1u) - h) << vec4<u32>(2u));
    return select(s.x, s.y, j >= 4u) * vec4<f32>(q);
}

// Whole block for the row kernel (qmatmul_rows.wgsl), R rows at once
// (rb: their blocks' first words): every word of each row's block loaded
// once, and use4(e4, v) called with elements 4 e4 .. 4 e4 + 3 of the block
// for each row, so the entry loads each 4 values of x once for all R rows.
fn qblock(rb: array<u32, R>) {
    var d: array<f32, R>;
    var s0: array<u32, R>;
    var s1: array<u32, R>;
    var s2: array<u32, R>;
    for (var a = 0u; a < R; a++) {
        d[a] = scale16(rb[a] + 27u, false);
        s0[a] = w[rb[a] + 24u];
        s1[a] = w[rb[a] + 25u];
        s2[a] = w[rb[a] + 26u];
    }
    for (var j = 0u; j < 8u; j++) {
        var hm: array<vec4<u32>, R>;
        for (var a = 0u; a < R; a++) {
            hm[a] = bytes4(w[rb[a] + j]);
        }
        for (var n = 0u; n < 2u; n++) {
            var qb: array<vec4<u32>, R>;
            for (var a = 0u; a < R; a++) {
                qb[a] = bytes4(w[rb[a] + 8u + 8u * n + j]);
            }
            for (var i = 0u; i < 4u; i++) {
                let g = 4u * n + i;
                let s = 2u * g + j / 4u;
                var v: array<vec4<f32>, R>;
                for (var a = 0u; a < R; a++) {
                    // low 4 bits: nibble s / 8 of scales[s % 8] (word s % 8 / 4)
                    let lo4 = nibble(byte_of(select(s0[a], s1[a], (s % 8u) >= 4u), s % 4u), s >= 8u);
                    let hi2 = (byte_of(s2[a], s % 4u) >> (2u * (s / 4u))) & 3u;
                    let dl = d[a] * f32(i32(lo4 | (hi2 << 4u)) - 32);
                    let lo = (qb[a] >> vec4<u32>(2u * i)) & vec4<u32>(3u);
                    let h = (hm[a] >> vec4<u32>(g)) & vec4<u32>(1u);
                    let q = vec4<i32>(lo) - vec4<i32>((vec4<u32>(1u) - h) << vec4<u32>(2u));
                    v[a] = dl * vec4<f32>(q);
                }
                use4(8u * g + j, v);
            }
        }
    }
}
