// Q5_0: f16 d (word 0, low half; 2 pad bytes), u32 qh (word 1), u8 qs[16]
// (words 2..5). The fifth bit of element j is bit j of qh; y = (q - 16) * d.
const QBW: u32 = 6u;
const QGPB: u32 = 1u;
fn dequant32(bw: u32, g: u32, out: ptr<function, array<f32, 32>>) {
    let d = scale16(bw, false);
    let qh = w[bw + 1u];
    for (var j = 0u; j < 16u; j++) {
        let b = byte_of(w[bw + 2u + j / 4u], j % 4u);
        let x0 = nibble(b, false) | (((qh >> j) & 1u) << 4u);
        let x1 = nibble(b, true) | (((qh >> (j + 16u)) & 1u) << 4u);
        (*out)[j] = f32(i32(x0) - 16) * d;
        (*out)[j + 16u] = f32(i32(x1) - 16) * d;
    }
}
