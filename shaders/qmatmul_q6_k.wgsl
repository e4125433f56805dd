// Q6_K: u8 ql[128] (words 0..31), u8 qh[64] (words 32..47), i8 scales[16]
// (words 48..51), f16 d (word 52, low half; 2 pad bytes). Group g: half
// n = g / 4, i = g % 4; element l takes its low 4 bits from ql[64 n + l +
// 32 (i & 1)] (low nibble for i < 2) and its high 2 bits from bits 2i.. of
// qh[32 n + l]; q = 6 bits - 32, y = (d * scales[8 n + l / 16 + 2 i]) * q.
const QBW: u32 = 53u;
const QGPB: u32 = 8u;
fn dequant4(bw: u32, g: u32, j: u32) -> vec4<f32> {
    let n = g / 4u;
    let i = g % 4u;
    let lo = nibbles4(w[bw + 16u * n + 8u * (i & 1u) + j], i >= 2u);
    let h = (bytes4(w[bw + 32u + 8u * n + j]) >> vec4<u32>(2u * i)) & vec4<u32>(3u);
    let q = vec4<i32>(lo | (h << vec4<u32>(4u))) - vec4<i32>(32);
    let sc = 192u + 8u * n + 2u * i + j / 4u;
    let s = scale16(bw + 52u, false) * f32(sbyte_of(w[bw + (sc >> 2u)], sc & 3u));
    return s * vec4<f32>(q);
}
