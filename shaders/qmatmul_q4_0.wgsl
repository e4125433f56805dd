// Q4_0: f16 d (word 0, low half; 2 pad bytes), u8 qs[16] (words 1..4).
// Element e < 16 in the low nibble of qs[e], e + 16 in its high nibble;
// y = (q - 8) * d.
const QBW: u32 = 5u;
const QGPB: u32 = 1u;
fn dequant4(bw: u32, g: u32, j: u32) -> vec4<f32> {
    let q = vec4<i32>(nibbles4(w[bw + 1u + j % 4u], j >= 4u)) - vec4<i32>(8);
    return vec4<f32>(q) * scale16(bw, false);
}
