// Q4_K: f16 d, f16 dmin (word 0), u8 scales[12] (words 1..3), u8 qs[128]
// (words 4..35). Group g: scale/min g, element l from byte qs[32 (g / 2) +
// l], low nibble for even g, high for odd; y = (d * sc) * q - (dmin * m).
// Needs qmatmul_kscale.wgsl.
const QBW: u32 = 36u;
const QGPB: u32 = 8u;
fn dequant4(bw: u32, g: u32, j: u32) -> vec4<f32> {
    let sm = scale_min_k4(bw + 1u, g);
    let d1 = scale16(bw, false) * f32(sm.x);
    let m1 = scale16(bw, true) * f32(sm.y);
    let q = nibbles4(w[bw + 4u + 8u * (g / 2u) + j], (g & 1u) == 1u);
    return d1 * vec4<f32>(q) - vec4<f32>(m1);
}
