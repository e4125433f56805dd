// Q6_K: u8 ql[128] (words 0..31), u8 qh[64] (words 32..47), i8 scales[16]
// (words 48..51), f16 d (word 52, low half; 2 pad bytes). Group g: half
// n = g / 4, i = g % 4; element l takes its low 4 bits from ql[64 n + l +
// 32 (i & 1)] (low nibble for i < 2) and its high 2 bits from bits 2i.. of
// qh[32 n + l]; q = 6 bits - 32, y = (d * scales[8 n + l / 16 + 2 i]) * q.
const QBW: u32 = 53u;
const QGPB: u32 = 8u;
fn dequant32(bw: u32, g: u32, out: ptr<function, array<f32, 32>>) {
    let d = scale16(bw + 52u, false);
    let n = g / 4u;
    let i = g % 4u;
    let qlb = 64u * n + 32u * (i & 1u);
    let qhb = 128u + 32u * n;
    let scb = 192u + 8u * n + 2u * i;
    let s0 = d * f32(sbyte_of(w[bw + (scb >> 2u)], scb & 3u));
    let s1 = d * f32(sbyte_of(w[bw + ((scb + 1u) >> 2u)], (scb + 1u) & 3u));
    for (var l = 0u; l < 32u; l++) {
        let lo = nibble(byte_of(w[bw + ((qlb + l) >> 2u)], (qlb + l) & 3u), i >= 2u);
        let h = (byte_of(w[bw + ((qhb + l) >> 2u)], (qhb + l) & 3u) >> (2u * i)) & 3u;
        let q = i32(lo | (h << 4u)) - 32;
        (*out)[l] = select(s0, s1, l >= 16u) * f32(q);
    }
}
