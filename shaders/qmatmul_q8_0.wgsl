// Q8_0: f16 d (word 0, low half; 2 pad bytes), i8 qs[32] (words 1..8).
// y = q * d.
const QBW: u32 = 9u;
const QGPB: u32 = 1u;
fn dequant4(bw: u32, g: u32, j: u32) -> vec4<f32> {
    return vec4<f32>(sbytes4(w[bw + 1u + j])) * scale16(bw, false);
}
