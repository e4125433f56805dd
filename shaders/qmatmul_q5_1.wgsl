// Q5_1: f16 d, f16 m (word 0), u32 qh (word 1), u8 qs[16] (words 2..5).
// Bits as Q5_0; y = q * d + m.
const QBW: u32 = 6u;
const QGPB: u32 = 1u;
fn dequant4(bw: u32, g: u32, j: u32) -> vec4<f32> {
    let q = nibbles4(w[bw + 2u + j % 4u], j >= 4u) | (bits4(w[bw + 1u], 4u * j) << vec4<u32>(4u));
    return vec4<f32>(q) * scale16(bw, false) + vec4<f32>(scale16(bw, true));
}
