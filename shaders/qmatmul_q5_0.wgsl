// Q5_0: f16 d (word 0, low half; 2 pad bytes), u32 qh (word 1), u8 qs[16]
// (words 2..5). Low 4 bits as Q4_0, the fifth bit of element e is bit e of
// qh; y = (q - 16) * d.
const QBW: u32 = 6u;
const QGPB: u32 = 1u;
fn dequant4(bw: u32, g: u32, j: u32) -> vec4<f32> {
    let q = nibbles4(w[bw + 2u + j % 4u], j >= 4u) | (bits4(w[bw + 1u], 4u * j) << vec4<u32>(4u));
    return vec4<f32>(vec4<i32>(q) - vec4<i32>(16)) * scale16(bw, false);
}
