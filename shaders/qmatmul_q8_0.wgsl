// Q8_0: f16 d (word 0, low half; 2 pad bytes), i8 qs[32] (words 1..8).
// y = q * d.
const QBW: u32 = 9u;
const QGPB: u32 = 1u;
fn dequant32(bw: u32, g: u32, out: ptr<function, array<f32, 32>>) {
    let d = scale16(bw, false);
    for (var j = 0u; j < 8u; j++) {
        let wd = w[bw + 1u + j];
        (*out)[4u * j] = f32(sbyte_of(wd, 0u)) * d;
        (*out)[4u * j + 1u] = f32(sbyte_of(wd, 1u)) * d;
        (*out)[4u * j + 2u] = f32(sbyte_of(wd, 2u)) * d;
        (*out)[4u * j + 3u] = f32(sbyte_of(wd, 3u)) * d;
    }
}
