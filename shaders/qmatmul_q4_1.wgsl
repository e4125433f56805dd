// Q4_1: f16 d, f16 m (word 0), u8 qs[16] (words 1..4); nibbles as Q4_0.
// y = q * d + m.
const QBW: u32 = 5u;
const QGPB: u32 = 1u;
fn dequant32(bw: u32, g: u32, out: ptr<function, array<f32, 32>>) {
    let d = scale16(bw, false);
    let m = scale16(bw, true);
    for (var j = 0u; j < 16u; j++) {
        let b = byte_of(w[bw + 1u + j / 4u], j % 4u);
        (*out)[j] = f32(nibble(b, false)) * d + m;
        (*out)[j + 16u] = f32(nibble(b, true)) * d + m;
    }
}
