// Q4_0: f16 d (word 0, low half; 2 pad bytes), u8 qs[16] (words 1..4).
// Element j in the low nibble of qs[j], j + 16 in its high nibble;
// y = (q - 8) * d.
const QBW: u32 = 5u;
const QGPB: u32 = 1u;
fn dequant32(bw: u32, g: u32, out: ptr<function, array<f32, 32>>) {
    let d = scale16(bw, false);
    for (var j = 0u; j < 16u; j++) {
        let b = byte_of(w[bw + 1u + j / 4u], j % 4u);
        (*out)[j] = f32(i32(nibble(b, false)) - 8) * d;
        (*out)[j + 16u] = f32(i32(nibble(b, true)) - 8) * d;
    }
}
