// Q2_K: u8 scales[16] (words 0..3), u8 qs[64] (words 4..19), f16 d, f16
// dmin (word 20); 84 bytes, no padding. 16 sub-blocks of 16: scales[s]
// holds sub-block s's 4-bit scale (low nibble) and 4-bit min (high).
// Group g: half n = g / 4, shift 2 (g % 4); element l (0..32) is bits
// shift.. shift + 1 of qs[32 n + l], in sub-block 2 g + l / 16;
// y = (d * sc) * q - (dmin * m).
// gscales: (d * sc, dmin * m) of elements 0..15, then of elements 16..31.
const QBW: u32 = 21u;
const QGPB: u32 = 8u;
fn gscales(bw: u32, g: u32) -> vec4<f32> {
    let wd = w[bw + g / 2u];
    let a = byte_of(wd, 2u * (g & 1u));
    let b = byte_of(wd, 2u * (g & 1u) + 1u);
    let d = scale16(bw + 20u, false);
    let dmin = scale16(bw + 20u, true);
    return vec4<f32>(d * f32(nibble(a, false)), dmin * f32(nibble(a, true)),
                     d * f32(nibble(b, false)), dmin * f32(nibble(b, true)));
}
fn dequant4s(bw: u32, g: u32, j: u32, s: vec4<f32>) -> vec4<f32> {
    let q = (bytes4(w[bw + 4u + 8u * (g / 4u) + j]) >> vec4<u32>(2u * (g % 4u))) & vec4<u32>(3u);
    let hi = j >= 4u;
    return select(s.x, s.z, hi) * vec4<f32>(q) - vec4<f32>(select(s.y, s.w, hi));
}

// Whole block for the row kernel (qmatmul_rows.wgsl), R rows at once
// (rb: their blocks' first words): every word of each row's block loaded
// once, and use4(e4, v) called with elements 4 e4 .. 4 e4 + 3 of the block
// for each row, so the entry loads each 4 values of x once for all R rows.
fn qblock(rb: array<u32, R>) {
    var d: array<f32, R>;
    var dmin: array<f32, R>;
    for (var a = 0u; a < R; a++) {
        d[a] = scale16(rb[a] + 20u, false);
        dmin[a] = scale16(rb[a] + 20u, true);
    }
    for (var n = 0u; n < 2u; n++) {
        // scales[8 n .. 8 n + 8]: words 2 n, 2 n + 1
        var sa: array<u32, R>;
        var sb: array<u32, R>;
        for (var a = 0u; a < R; a++) {
            sa[a] = w[rb[a] + 2u * n];
            sb[a] = w[rb[a] + 2u * n + 1u];
        }
        for (var jh = 0u; jh < 2u; jh++) {
            for (var jl = 0u; jl < 4u; jl++) {
                let j = 4u * jh + jl;
                var qb: array<vec4<u32>, R>;
                for (var a = 0u; a < R; a++) {
                    qb[a] = bytes4(w[rb[a] + 4u + 8u * n + j]);
                }
                for (var i = 0u; i < 4u; i++) {
                    // sub-block s = 8 n + 2 i + jh: byte (2 i + jh) % 4 of word 2 n + i / 2
                    var v: array<vec4<f32>, R>;
                    for (var a = 0u; a < R; a++) {
                        let sbyte = byte_of(select(sa[a], sb[a], i >= 2u), (2u * i + jh) % 4u);
                        let dl = d[a] * f32(nibble(sbyte, false));
                        let ml = dmin[a] * f32(nibble(sbyte, true));
                        let q = (qb[a] >> vec4<u32>(2u * i)) & vec4<u32>(3u);
                        v[a] = dl * vec4<f32>(q) - vec4<f32>(ml);
                    }
                    use4(8u * (4u * n + i) + j, v);
                }
            }
        }
    }
}
