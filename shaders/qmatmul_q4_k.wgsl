// Q4_K: f16 d, f16 dmin (word 0), u8 scales[12] (words 1..3), u8 qs[128]
// (words 4..35). Group g: scale/min g, bytes qs[32 (g / 2) ..][l], low
// nibble for even g, high for odd; y = (d * sc) * q - (dmin * m).
// Needs qmatmul_kscale.wgsl.
const QBW: u32 = 36u;
const QGPB: u32 = 8u;
fn dequant32(bw: u32, g: u32, out: ptr<function, array<f32, 32>>) {
    let d = scale16(bw, false);
    let dmin = scale16(bw, true);
    let sm = scale_min_k4(bw + 1u, g);
    let d1 = d * f32(sm.x);
    let m1 = dmin * f32(sm.y);
    let hi = (g & 1u) == 1u;
    let qw = bw + 4u + 8u * (g / 2u);
    for (var l = 0u; l < 32u; l++) {
        let b = byte_of(w[qw + l / 4u], l % 4u);
        (*out)[l] = d1 * f32(nibble(b, hi)) - m1;
    }
}
