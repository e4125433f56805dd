// Q5_K: f16 d, f16 dmin (word 0), u8 scales[12] (words 1..3), u8 qh[32]
// (words 4..11), u8 qs[128] (words 12..43). As Q4_K, plus bit g of qh[l]
// as the fifth bit of element l. Needs qmatmul_kscale.wgsl.
const QBW: u32 = 44u;
const QGPB: u32 = 8u;
fn dequant4(bw: u32, g: u32, j: u32) -> vec4<f32> {
    let sm = scale_min_k4(bw + 1u, g);
    let d1 = scale16(bw, false) * f32(sm.x);
    let m1 = scale16(bw, true) * f32(sm.y);
    let h = (bytes4(w[bw + 4u + j]) >> vec4<u32>(g)) & vec4<u32>(1u);
    let q = nibbles4(w[bw + 12u + 8u * (g / 2u) + j], (g & 1u) == 1u) + (h << vec4<u32>(4u));
    return d1 * vec4<f32>(q) - vec4<f32>(m1);
}
