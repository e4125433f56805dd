// Q6_K: u8 ql[128] (words 0..31), u8 qh[64] (words 32..47), i8 scales[16]
// (words 48..51), f16 d (word 52, low half; 2 pad bytes). Group g: half
// n = g / 4, i = g % 4; element l takes its low 4 bits from ql[64 n + l +
// 32 (i & 1)] (low nibble for i < 2) and its high 2 bits from bits 2i.. of
// qh[32 n + l]; q = 6 bits - 32, y = (d * scales[8 n + l / 16 + 2 i]) * q.
// gscales: (d * scale of elements 0..15, d * scale of elements 16..31).
const QBW: u32 = 53u;
const QGPB: u32 = 8u;
fn gscales(bw: u32, g: u32) -> vec4<f32> {
    let sc = 192u + 8u * (g / 4u) + 2u * (g % 4u); // even: both in one word
    let wd = w[bw + (sc >> 2u)];
    let d = scale16(bw + 52u, false);
    return vec4<f32>(d * f32(sbyte_of(wd, sc & 3u)), d * f32(sbyte_of(wd, (sc & 3u) + 1u)), 0.0, 0.0);
}
fn dequant4s(bw: u32, g: u32, j: u32, s: vec4<f32>) -> vec4<f32> {
    let n = g / 4u;
    let i = g % 4u;
    let lo = nibbles4(w[bw + 16u * n + 8u * (i & 1u) + j], i >= 2u);
    let h = (bytes4(w[bw + 32u + 8u * n + j]) >> vec4<u32>(2u * i)) & vec4<u32>(3u);
    let q = vec4<i32>(lo | (h << vec4<u32>(4u))) - vec4<i32>(32);
    return select(s.x, s.y, j >= 4u) * vec4<f32>(q);
}

// Whole block for the row kernel (qmatmul_rows.wgsl), R rows at once
// (rb: their blocks' first words): every word of each row's block loaded
// once, and use4(e4, v) called with elements 4 e4 .. 4 e4 + 3 of the block
// for each row, so the entry loads each 4 values of x once for all R rows.
fn qblock(rb: array<u32, R>) {
    var d: array<f32, R>;
    var sw: array<array<u32, 4>, R>;
    for (var a = 0u; a < R; a++) {
        d[a] = scale16(rb[a] + 52u, false);
        for (var c = 0u; c < 4u; c++) {
            sw[a][c] = w[rb[a] + 48u + c];
        }
    }
    for (var n = 0u; n < 2u; n++) {
        for (var j = 0u; j < 8u; j++) {
            var l0: array<u32, R>;
            var l1: array<u32, R>;
            var h: array<vec4<u32>, R>;
            for (var a = 0u; a < R; a++) {
                l0[a] = w[rb[a] + 16u * n + j];
                l1[a] = w[rb[a] + 16u * n + 8u + j];
                h[a] = bytes4(w[rb[a] + 32u + 8u * n + j]);
            }
            for (var i = 0u; i < 4u; i++) {
                let sc = 8u * n + 2u * i + j / 4u;
                var v: array<vec4<f32>, R>;
                for (var a = 0u; a < R; a++) {
                    let lo = nibbles4(select(l0[a], l1[a], (i & 1u) == 1u), i >= 2u);
                    let hi = (h[a] >> vec4<u32>(2u * i)) & vec4<u32>(3u);
                    let q = vec4<i32>(lo | (hi << vec4<u32>(4u))) - vec4<i32>(32);
                    let s = d[a] * f32(sbyte_of(sw[a][sc / 4u], sc % 4u));
                    v[a] = s * vec4<f32>(q);
                }
                use4(8u * (4u * n + i) + j, v);
            }
        }
    }
}
