// Q4_1: f16 d, f16 m (word 0), u8 qs[16] (words 1..4); nibbles as Q4_0.
// y = q * d + m.
const QBW: u32 = 5u;
const QGPB: u32 = 1u;
fn dequant4(bw: u32, g: u32, j: u32) -> vec4<f32> {
    let q = nibbles4(w[bw + 1u + j % 4u], j >= 4u);
    return vec4<f32>(q) * scale16(bw, false) + vec4<f32>(scale16(bw, true));
}
