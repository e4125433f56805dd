//! ggml tensor types and their dequantization to f32.
//!
//! Block layouts are ggml's (`ggml-common.h`), all little-endian:
//!
//! | type | elements | bytes | layout |
//! |---|---|---|---|
//! | Q4_0 | 32 | 18 | `f16 d; u8 qs[16]` |
//! | Q4_1 | 32 | 20 | `f16 d; f16 m; u8 qs[16]` |
//! | Q5_0 | 32 | 22 | `f16 d; u8 qh[4]; u8 qs[16]` |
//! | Q5_1 | 32 | 24 | `f16 d; f16 m; u8 qh[4]; u8 qs[16]` |
//! | Q8_0 | 32 | 34 | `f16 d; i8 qs[32]` |
//! | Q2_K | 256 | 84 | `u8 scales[16]; u8 qs[64]; f16 d; f16 dmin` |
//! | Q3_K | 256 | 110 | `u8 hmask[32]; u8 qs[64]; u8 scales[12]; f16 d` |
//! | Q4_K | 256 | 144 | `f16 d; f16 dmin; u8 scales[12]; u8 qs[128]` |
//! | Q5_K | 256 | 176 | `f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]` |
//! | Q6_K | 256 | 210 | `u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d` |
//!
//! The arithmetic follows ggml's reference `dequantize_row_*`
//! (`ggml-quants.c`) and the `gguf` Python package's `quants.py` operation
//! for operation, so the results are bit-identical to the Python package:
//! every product or difference is one f32 rounding, in the same order
//! (`(d * sc) * q - (dmin * m)` for Q2_K/Q4_K/Q5_K, `d * q + m` for
//! Q4_1/Q5_1, `(d * sc) * q` for Q3_K/Q6_K). Rust never contracts `a * b + c` into a fused
//! multiply-add, and neither does numpy. (A C build of ggml compiled with FMA
//! contraction may differ from both by 1 ulp on the types with an offset.)

use half::{bf16, f16};

/// The super-block size of the K-quants.
pub const QK_K: usize = 256;

/// A ggml tensor type, by its GGUF id. All types ggml defines are known (so
/// a file using them can be inspected); [`GgmlType::can_dequantize`] tells
/// which ones this module converts.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
    NVFP4,
    Q1_0,
}

/// (type, GGUF id, name, elements per block, bytes per block), from ggml's
/// type traits (`GGML_QUANT_SIZES` in the `gguf` package).
const TYPES: &[(GgmlType, u32, &str, usize, usize)] = {
    use GgmlType::*;
    &[
        (F32, 0, "F32", 1, 4),
        (F16, 1, "F16", 1, 2),
        (Q4_0, 2, "Q4_0", 32, 18),
        (Q4_1, 3, "Q4_1", 32, 20),
        (Q5_0, 6, "Q5_0", 32, 22),
        (Q5_1, 7, "Q5_1", 32, 24),
        (Q8_0, 8, "Q8_0", 32, 34),
        (Q8_1, 9, "Q8_1", 32, 40),
        (Q2_K, 10, "Q2_K", 256, 84),
        (Q3_K, 11, "Q3_K", 256, 110),
        (Q4_K, 12, "Q4_K", 256, 144),
        (Q5_K, 13, "Q5_K", 256, 176),
        (Q6_K, 14, "Q6_K", 256, 210),
        (Q8_K, 15, "Q8_K", 256, 292),
        (IQ2_XXS, 16, "IQ2_XXS", 256, 66),
        (IQ2_XS, 17, "IQ2_XS", 256, 74),
        (IQ3_XXS, 18, "IQ3_XXS", 256, 98),
        (IQ1_S, 19, "IQ1_S", 256, 50),
        (IQ4_NL, 20, "IQ4_NL", 32, 18),
        (IQ3_S, 21, "IQ3_S", 256, 110),
        (IQ2_S, 22, "IQ2_S", 256, 82),
        (IQ4_XS, 23, "IQ4_XS", 256, 136),
        (I8, 24, "I8", 1, 1),
        (I16, 25, "I16", 1, 2),
        (I32, 26, "I32", 1, 4),
        (I64, 27, "I64", 1, 8),
        (F64, 28, "F64", 1, 8),
        (IQ1_M, 29, "IQ1_M", 256, 56),
        (BF16, 30, "BF16", 1, 2),
        (TQ1_0, 34, "TQ1_0", 256, 54),
        (TQ2_0, 35, "TQ2_0", 256, 66),
        (MXFP4, 39, "MXFP4", 32, 17),
        (NVFP4, 40, "NVFP4", 64, 36),
        (Q1_0, 41, "Q1_0", 128, 18),
    ]
};

impl GgmlType {
    fn row(self) -> &'static (GgmlType, u32, &'static str, usize, usize) {
        TYPES
            .iter()
            .find(|t| t.0 == self)
            .expect("every GgmlType variant has a row in TYPES")
    }
    /// The type with GGUF id `id`, if ggml defines one.
    pub fn from_id(id: u32) -> Option<Self> {
        TYPES.iter().find(|t| t.1 == id).map(|t| t.0)
    }
    /// The GGUF id.
    pub fn id(self) -> u32 {
        self.row().1
    }
    /// ggml's name (`Q4_K`, `F32`, ...).
    pub fn name(self) -> &'static str {
        self.row().2
    }
    /// Elements per block (1 for plain types).
    pub fn block_size(self) -> usize {
        self.row().3
    }
    /// Bytes per block.
    pub fn type_size(self) -> usize {
        self.row().4
    }
    /// Whether [`dequantize`] handles this type.
    pub fn can_dequantize(self) -> bool {
        use GgmlType::*;
        matches!(
            self,
            F32 | F16 | BF16 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q2_K | Q3_K | Q4_K | Q5_K | Q6_K
        )
    }
    /// Bytes taken by `n_elements` elements, or `None` when `n_elements` is
    /// not a whole number of blocks or the size overflows.
    pub fn bytes_for(self, n_elements: u64) -> Option<u64> {
        let bs = self.block_size() as u64;
        if n_elements % bs != 0 {
            return None;
        }
        (n_elements / bs).checked_mul(self.type_size() as u64)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// Dequantize `src` (whole blocks of type `ty`) into `dst`, whose length is
/// the element count. Errors (as a message, for the caller to place) when
/// the type is not supported or the lengths disagree; never panics.
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), String> {
    if !ty.can_dequantize() {
        return Err(format!(
            "ggml type {ty} cannot be dequantized (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)"
        ));
    }
    let bs = ty.block_size();
    let ts = ty.type_size();
    if dst.len() % bs != 0 {
        return Err(format!(
            "{} elements is not a whole number of {ty} blocks of {bs}",
            dst.len()
        ));
    }
    let n_blocks = dst.len() / bs;
    if n_blocks.checked_mul(ts) != Some(src.len()) {
        return Err(format!(
            "{} elements of {ty} take {} bytes, got {}",
            dst.len(),
            n_blocks.saturating_mul(ts),
            src.len()
        ));
    }
    let blocks = src.chunks_exact(ts).zip(dst.chunks_exact_mut(bs));
    match ty {
        GgmlType::F32 => {
            for (b, y) in blocks {
                y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlType::F16 => {
            for (b, y) in blocks {
                y[0] = f16_at(b, 0);
            }
        }
        GgmlType::BF16 => {
            for (b, y) in blocks {
                y[0] = bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        GgmlType::Q4_0 => blocks.for_each(|(b, y)| q4_0(b, y)),
        GgmlType::Q4_1 => blocks.for_each(|(b, y)| q4_1(b, y)),
        GgmlType::Q5_0 => blocks.for_each(|(b, y)| q5_0(b, y)),
        GgmlType::Q5_1 => blocks.for_each(|(b, y)| q5_1(b, y)),
        GgmlType::Q8_0 => blocks.for_each(|(b, y)| q8_0(b, y)),
        GgmlType::Q2_K => blocks.for_each(|(b, y)| q2_k(b, y)),
        GgmlType::Q3_K => blocks.for_each(|(b, y)| q3_k(b, y)),
        GgmlType::Q4_K => blocks.for_each(|(b, y)| q4_k(b, y)),
        GgmlType::Q5_K => blocks.for_each(|(b, y)| q5_k(b, y)),
        GgmlType::Q6_K => blocks.for_each(|(b, y)| q6_k(b, y)),
        _ => unreachable!("can_dequantize() checked above"),
    }
    Ok(())
}

/// Q4_0: `y = d * (q - 8)`; element j in the low nibble of `qs[j]`, element
/// j + 16 in its high nibble.
fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        let x0 = (qs[j] & 0x0F) as i32 - 8;
        let x1 = (qs[j] >> 4) as i32 - 8;
        y[j] = x0 as f32 * d;
        y[j + 16] = x1 as f32 * d;
    }
}

/// Q4_1: `y = d * q + m`, q unsigned 0..15, nibbles as Q4_0.
fn q4_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    for j in 0..16 {
        let x0 = (qs[j] & 0x0F) as f32;
        let x1 = (qs[j] >> 4) as f32;
        y[j] = x0 * d + m;
        y[j + 16] = x1 * d + m;
    }
}

/// Q5_0: `y = d * (q - 16)`; the fifth bit of element j is bit j of the
/// little-endian u32 `qh`.
fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let h0 = (((qh >> j) & 1) << 4) as u8;
        let h1 = (((qh >> (j + 16)) & 1) << 4) as u8;
        let x0 = ((qs[j] & 0x0F) | h0) as i32 - 16;
        let x1 = ((qs[j] >> 4) | h1) as i32 - 16;
        y[j] = x0 as f32 * d;
        y[j + 16] = x1 as f32 * d;
    }
}

/// Q5_1: `y = d * q + m`, q unsigned 0..31, bits as Q5_0.
fn q5_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        let h0 = (((qh >> j) & 1) << 4) as u8;
        let h1 = (((qh >> (j + 16)) & 1) << 4) as u8;
        let x0 = ((qs[j] & 0x0F) | h0) as f32;
        let x1 = ((qs[j] >> 4) | h1) as f32;
        y[j] = x0 * d + m;
        y[j + 16] = x1 * d + m;
    }
}

/// Q8_0: `y = d * q`, q signed bytes.
fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for j in 0..32 {
        y[j] = (b[2 + j] as i8) as f32 * d;
    }
}

/// Q2_K: 16 sub-blocks of 16; `scales[s]` holds sub-block s's 4-bit scale
/// (low nibble) and 4-bit min (high nibble); `y = (d * sc) * q - (dmin *
/// m)`, q = 2 bits. Each half (128 elements) uses 32 bytes of `qs`: element
/// l + 32i (l < 32) of half n is bits 2i..2i+2 of `qs[32n + l]`.
fn q2_k(b: &[u8], y: &mut [f32]) {
    let scales = &b[0..16];
    let d = f16_at(b, 80);
    let dmin = f16_at(b, 82);
    for half in 0..2 {
        let q = &b[16 + 32 * half..16 + 32 * half + 32];
        for i in 0..4 {
            for l in 0..32 {
                let s = 8 * half + 2 * i + l / 16;
                let dl = d * (scales[s] & 0x0F) as f32;
                let ml = dmin * (scales[s] >> 4) as f32;
                let v = (q[l] >> (2 * i)) & 3;
                y[128 * half + 32 * i + l] = dl * v as f32 - ml;
            }
        }
    }
}

/// The signed 6-bit scale of sub-block `s` (0..16) of a Q3_K block (its
/// 12 scale bytes `sc`): low 4 bits from nibble `s / 8` of `sc[s % 8]`, high
/// 2 bits from bits `2 (s / 4)..` of `sc[8 + s % 4]`, minus 32.
pub fn q3_k_scale(s: usize, sc: &[u8]) -> i32 {
    let lo = (sc[s % 8] >> (4 * (s / 8))) & 0x0F;
    let hi = (sc[8 + s % 4] >> (2 * (s / 4))) & 3;
    (lo | (hi << 4)) as i32 - 32
}

/// Q3_K: 16 sub-blocks of 16 with 6-bit scales; `y = (d * sc) * q`, q = 2
/// low bits from `qs` (as Q2_K) minus 4 where the element's bit of `hmask`
/// is clear: element l + 32i (l < 32) of half n uses bit 4n + i of
/// `hmask[l]`.
fn q3_k(b: &[u8], y: &mut [f32]) {
    let hmask = &b[0..32];
    let scales = &b[96..108];
    let d = f16_at(b, 108);
    for half in 0..2 {
        let q = &b[32 + 32 * half..32 + 32 * half + 32];
        for i in 0..4 {
            let bit = 4 * half + i;
            for l in 0..32 {
                let dl = d * q3_k_scale(8 * half + 2 * i + l / 16, scales) as f32;
                let lo = ((q[l] >> (2 * i)) & 3) as i32;
                let v = lo - if hmask[l] & (1 << bit) != 0 { 0 } else { 4 };
                y[128 * half + 32 * i + l] = dl * v as f32;
            }
        }
    }
}

/// The 6-bit scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K block,
/// ggml's `get_scale_min_k4`: sub-blocks 0..4 keep theirs in the low 6 bits
/// of `scales[j]` / `scales[j + 4]`; sub-blocks 4..8 take their low 4 bits
/// from the nibbles of `scales[j + 4]` and their high 2 bits from the top
/// bits of `scales[j - 4]` / `scales[j]`.
pub fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Q4_K: 8 sub-blocks of 32; `y = (d * sc) * q - (dmin * m)`. Each 32 bytes
/// of `qs` hold two sub-blocks: the low nibbles the first, the high nibbles
/// the second.
fn q4_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for pair in 0..4 {
        let q = &qs[32 * pair..32 * pair + 32];
        let (sc1, m1) = scale_min_k4(2 * pair, scales);
        let (sc2, m2) = scale_min_k4(2 * pair + 1, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        let y = &mut y[64 * pair..64 * pair + 64];
        for l in 0..32 {
            y[l] = d1 * (q[l] & 0x0F) as f32 - m1;
            y[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// Q5_K: as Q4_K, plus a fifth bit per element from `qh`: for sub-block
/// pair p, bit 2p of `qh[l]` for the first and bit 2p + 1 for the second.
fn q5_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for pair in 0..4 {
        let q = &qs[32 * pair..32 * pair + 32];
        let (sc1, m1) = scale_min_k4(2 * pair, scales);
        let (sc2, m2) = scale_min_k4(2 * pair + 1, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        let (u1, u2) = (1u8 << (2 * pair), 2u8 << (2 * pair));
        let y = &mut y[64 * pair..64 * pair + 64];
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            y[l] = d1 * ((q[l] & 0x0F) + h1) as f32 - m1;
            y[l + 32] = d2 * ((q[l] >> 4) + h2) as f32 - m2;
        }
    }
}

/// Q6_K: 16 sub-blocks of 16 with signed 8-bit scales; q = 6 bits - 32,
/// `y = (d * sc) * q`. Each half (128 elements) uses 64 bytes of `ql` and
/// 32 of `qh`: element l + 32i takes its low 4 bits from `ql[l]` (i = 0, 2:
/// low/high nibble) or `ql[l + 32]` (i = 1, 3) and its high 2 bits from bits
/// 2i..2i+2 of `qh[l]`.
fn q6_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 208);
    for half in 0..2 {
        let ql = &b[64 * half..64 * half + 64];
        let qh = &b[128 + 32 * half..128 + 32 * half + 32];
        let sc = &b[192 + 8 * half..192 + 8 * half + 8];
        let y = &mut y[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            let s = |k: usize| d * (sc[k] as i8) as f32;
            y[l] = s(is) * q1 as f32;
            y[l + 32] = s(is + 2) * q2 as f32;
            y[l + 64] = s(is + 4) * q3 as f32;
            y[l + 96] = s(is + 6) * q4 as f32;
        }
    }
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)] // index loops mirror the format's definitions
mod tests {
    //! Hand-built blocks whose values are derived here from the format's
    //! definition (not from the code above): one block per type with known
    //! scales and a few chosen quants. Expected values are exact: every
    //! scale below is a small power of two or an exact f16, so all products
    //! are exact in f32 and comparisons are `==`.
    use super::*;

    fn h(x: f32) -> [u8; 2] {
        let v = f16::from_f32(x);
        assert_eq!(v.to_f32(), x, "test scale must be exact in f16");
        v.to_bits().to_le_bytes()
    }

    fn deq(ty: GgmlType, b: &[u8]) -> Vec<f32> {
        let n = b.len() / ty.type_size() * ty.block_size();
        let mut y = vec![f32::NAN; n];
        dequantize(ty, b, &mut y).unwrap();
        y
    }

    #[test]
    fn type_table_is_consistent() {
        for &(t, id, name, bs, ts) in TYPES {
            assert_eq!(GgmlType::from_id(id), Some(t));
            assert_eq!(
                (t.id(), t.name(), t.block_size(), t.type_size()),
                (id, name, bs, ts)
            );
        }
        assert_eq!(GgmlType::from_id(4), None); // Q4_2, removed from ggml
        assert_eq!(GgmlType::from_id(1000), None);
        assert_eq!(GgmlType::Q4_K.bytes_for(512), Some(288));
        assert_eq!(GgmlType::Q4_K.bytes_for(100), None);
    }

    #[test]
    fn plain_types() {
        let mut b = Vec::new();
        for x in [1.5f32, -0.0, 3.0e-5] {
            b.extend_from_slice(&x.to_le_bytes());
        }
        assert_eq!(deq(GgmlType::F32, &b), vec![1.5, -0.0, 3.0e-5]);
        // f16 0x3c00 = 1.0, 0xc000 = -2.0, 0x0001 = 2^-24 (smallest subnormal).
        let b = [0x00, 0x3c, 0x00, 0xc0, 0x01, 0x00];
        assert_eq!(deq(GgmlType::F16, &b), vec![1.0, -2.0, 2f32.powi(-24)]);
        // bf16 is the top half of an f32: 0x3fc0 = 1.5, 0xbf80 = -1.0.
        let b = [0xc0, 0x3f, 0x80, 0xbf];
        assert_eq!(deq(GgmlType::BF16, &b), vec![1.5, -1.0]);
    }

    #[test]
    fn q8_0_block() {
        let mut b = h(0.5).to_vec();
        let qs: Vec<i8> = (0..32).map(|i| (i as i8 - 16) * 8).collect(); // -128..=120
        b.extend(qs.iter().map(|&q| q as u8));
        let y = deq(GgmlType::Q8_0, &b);
        for i in 0..32 {
            assert_eq!(y[i], qs[i] as f32 * 0.5);
        }
        assert_eq!(y[0], -64.0); // q = -128: the i8 sign is kept
    }

    #[test]
    fn q4_0_block() {
        // qs[j] = (hi << 4) | lo with lo = j % 16, hi = 15 - j % 16:
        // element j = lo - 8, element j+16 = hi - 8.
        let mut b = h(0.25).to_vec();
        b.extend((0..16u8).map(|j| ((15 - j) << 4) | j));
        let y = deq(GgmlType::Q4_0, &b);
        for j in 0..16 {
            assert_eq!(y[j], (j as f32 - 8.0) * 0.25);
            assert_eq!(y[j + 16], (7.0 - j as f32) * 0.25);
        }
        assert_eq!((y[0], y[16]), (-2.0, 1.75));
    }

    #[test]
    fn q4_1_block() {
        let mut b = h(0.5).to_vec();
        b.extend(h(-3.0));
        b.extend((0..16u8).map(|j| ((15 - j) << 4) | j));
        let y = deq(GgmlType::Q4_1, &b);
        for j in 0..16 {
            assert_eq!(y[j], j as f32 * 0.5 - 3.0);
            assert_eq!(y[j + 16], (15 - j) as f32 * 0.5 - 3.0);
        }
        assert_eq!((y[0], y[16]), (-3.0, 4.5)); // min is added, q is unsigned
    }

    fn q5_block(with_min: bool) -> (Vec<u8>, Vec<i32>) {
        // Quants 0..31 in order: element i has q = (7 * i + 3) % 32.
        let q: Vec<i32> = (0..32).map(|i| (7 * i + 3) % 32).collect();
        let mut qh = 0u32;
        for (i, &v) in q.iter().enumerate() {
            qh |= ((v as u32 >> 4) & 1) << i;
        }
        let mut b = h(0.125).to_vec();
        if with_min {
            b.extend(h(1.0));
        }
        b.extend(qh.to_le_bytes());
        b.extend((0..16).map(|j| ((q[j + 16] as u8 & 15) << 4) | (q[j] as u8 & 15)));
        (b, q)
    }

    #[test]
    fn q5_0_block() {
        let (b, q) = q5_block(false);
        let y = deq(GgmlType::Q5_0, &b);
        for i in 0..32 {
            assert_eq!(y[i], (q[i] - 16) as f32 * 0.125, "element {i}");
        }
    }

    #[test]
    fn q5_1_block() {
        let (b, q) = q5_block(true);
        let y = deq(GgmlType::Q5_1, &b);
        for i in 0..32 {
            assert_eq!(y[i], q[i] as f32 * 0.125 + 1.0, "element {i}");
        }
    }

    /// Pack eight 6-bit (scale, min) pairs the way ggml does (inverse of
    /// `get_scale_min_k4`), written from the layout description:
    /// bytes 0..4: scale j (low 6) | high 2 bits of scale j+4 (top 2);
    /// bytes 4..8: min j (low 6) | high 2 bits of min j+4 (top 2);
    /// bytes 8..12: low 4 bits of scale j+4 | low 4 bits of min j+4 << 4.
    fn pack_k_scales(sc: [u8; 8], m: [u8; 8]) -> [u8; 12] {
        let mut out = [0u8; 12];
        for j in 0..4 {
            out[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
            out[j + 4] = m[j] | ((m[j + 4] >> 4) << 6);
            out[j + 8] = (sc[j + 4] & 15) | ((m[j + 4] & 15) << 4);
        }
        out
    }

    // Scales/mins covering 0, 63 and values whose high 2 bits matter.
    const SC: [u8; 8] = [1, 63, 17, 0, 48, 33, 5, 63];
    const MN: [u8; 8] = [0, 2, 63, 40, 63, 16, 3, 47];

    #[test]
    fn k4_scale_unpacking() {
        let p = pack_k_scales(SC, MN);
        for j in 0..8 {
            assert_eq!(scale_min_k4(j, &p), (SC[j], MN[j]), "sub-block {j}");
        }
    }

    #[test]
    fn q4_k_block() {
        // q of element e (sub-block s = e / 32, l = e % 32) = (e * 5 + 1) % 16.
        let q = |e: usize| ((e * 5 + 1) % 16) as u8;
        let mut b = h(0.5).to_vec();
        b.extend(h(0.25));
        b.extend(pack_k_scales(SC, MN));
        for pair in 0..4 {
            for l in 0..32 {
                b.push(q(64 * pair + l) | (q(64 * pair + 32 + l) << 4));
            }
        }
        assert_eq!(b.len(), 144);
        let y = deq(GgmlType::Q4_K, &b);
        for e in 0..256 {
            let s = e / 32;
            let want = 0.5 * SC[s] as f32 * q(e) as f32 - 0.25 * MN[s] as f32;
            assert_eq!(y[e], want, "element {e}");
        }
    }

    #[test]
    fn q5_k_block() {
        let q = |e: usize| ((e * 11 + 7) % 32) as u8; // 5-bit quants
        let mut b = h(0.5).to_vec();
        b.extend(h(0.25));
        b.extend(pack_k_scales(SC, MN));
        // qh[l] bit s = high bit of element 32 s + l.
        for l in 0..32 {
            let mut byte = 0u8;
            for s in 0..8 {
                byte |= (q(32 * s + l) >> 4) << s;
            }
            b.push(byte);
        }
        for pair in 0..4 {
            for l in 0..32 {
                b.push((q(64 * pair + l) & 15) | ((q(64 * pair + 32 + l) & 15) << 4));
            }
        }
        assert_eq!(b.len(), 176);
        let y = deq(GgmlType::Q5_K, &b);
        for e in 0..256 {
            let s = e / 32;
            let want = 0.5 * SC[s] as f32 * q(e) as f32 - 0.25 * MN[s] as f32;
            assert_eq!(y[e], want, "element {e}");
        }
    }

    #[test]
    fn q6_k_block() {
        // 6-bit quants, value (e * 13 + 5) % 64, dequantized as q - 32;
        // 16 signed scales, including negative ones and -128.
        let q = |e: usize| ((e * 13 + 5) % 64) as u8;
        let sc: [i8; 16] = [1, -1, 2, -128, 127, 0, 3, -7, 5, 9, -2, 4, 8, -16, 1, 6];
        let mut ql = [0u8; 128];
        let mut qh = [0u8; 64];
        // Element e: half n = e / 128, r = e % 128, i = r / 32, l = r % 32.
        // Low 4 bits: ql[64n + l + 32 (i & 1)], nibble i / 2.
        // High 2 bits: qh[32n + l], bits 2i..2i+2.
        for e in 0..256 {
            let (n, r) = (e / 128, e % 128);
            let (i, l) = (r / 32, r % 32);
            let v = q(e);
            ql[64 * n + l + 32 * (i & 1)] |= (v & 15) << (4 * (i / 2));
            qh[32 * n + l] |= (v >> 4) << (2 * i);
        }
        let mut b = ql.to_vec();
        b.extend(qh);
        b.extend(sc.iter().map(|&s| s as u8));
        b.extend(h(0.5));
        assert_eq!(b.len(), 210);
        let y = deq(GgmlType::Q6_K, &b);
        for e in 0..256 {
            let want = 0.5 * sc[e / 16] as f32 * (q(e) as f32 - 32.0);
            assert_eq!(y[e], want, "element {e}");
        }
    }

    #[test]
    fn q2_k_block() {
        // 2-bit quants (e * 3 + 1) % 4; sub-block s (16 elements) has scale
        // (s * 7 + 2) % 16 and min (s * 5 + 9) % 16.
        let q = |e: usize| ((e * 3 + 1) % 4) as u8;
        let sc = |s: usize| ((s * 7 + 2) % 16) as u8;
        let mn = |s: usize| ((s * 5 + 9) % 16) as u8;
        let mut b: Vec<u8> = (0..16).map(|s| sc(s) | (mn(s) << 4)).collect();
        // Element e: half n = e / 128, r = e % 128, i = r / 32, l = r % 32:
        // bits 2i..2i+2 of qs[32 n + l].
        let mut qs = [0u8; 64];
        for e in 0..256 {
            let (n, r) = (e / 128, e % 128);
            qs[32 * n + r % 32] |= q(e) << (2 * (r / 32));
        }
        b.extend(qs);
        b.extend(h(0.5));
        b.extend(h(0.25));
        assert_eq!(b.len(), 84);
        let y = deq(GgmlType::Q2_K, &b);
        for e in 0..256 {
            let s = e / 16;
            let want = 0.5 * sc(s) as f32 * q(e) as f32 - 0.25 * mn(s) as f32;
            assert_eq!(y[e], want, "element {e}");
        }
    }

    #[test]
    fn q3_k_block() {
        // 3-bit quants v = (e * 5 + 3) % 8, stored as low 2 bits v & 3 and
        // a high bit that is SET when v >= 4 (dequantized q = v - 4);
        // sub-block scales 6-bit u = (s * 11 + 5) % 64, dequantized u - 32.
        let v = |e: usize| ((e * 5 + 3) % 8) as u8;
        let u = |s: usize| ((s * 11 + 5) % 64) as u8;
        let mut hmask = [0u8; 32];
        let mut qs = [0u8; 64];
        for e in 0..256 {
            let (n, r) = (e / 128, e % 128);
            let (i, l) = (r / 32, r % 32);
            qs[32 * n + l] |= (v(e) & 3) << (2 * i);
            // q = low - 4 when the bit is clear, so v >= 4 <=> bit set
            if v(e) >= 4 {
                hmask[l] |= 1 << (4 * n + i);
            }
        }
        // 12 scale bytes: bytes 0..8 hold low nibbles (s < 8 low, s >= 8
        // high nibble of byte s % 8); bytes 8..12 the high 2 bits, sub-block
        // s at bits 2 (s / 4) of byte 8 + s % 4.
        let mut sc = [0u8; 12];
        for s in 0..16 {
            sc[s % 8] |= (u(s) & 15) << (4 * (s / 8));
            sc[8 + s % 4] |= (u(s) >> 4) << (2 * (s / 4));
        }
        let mut b = hmask.to_vec();
        b.extend(qs);
        b.extend(sc);
        b.extend(h(0.5));
        assert_eq!(b.len(), 110);
        for s in 0..16 {
            assert_eq!(q3_k_scale(s, &sc), u(s) as i32 - 32, "scale {s}");
        }
        let y = deq(GgmlType::Q3_K, &b);
        for e in 0..256 {
            let want = 0.5 * (u(e / 16) as f32 - 32.0) * (v(e) as f32 - 4.0);
            assert_eq!(y[e], want, "element {e}");
        }
    }

    #[test]
    fn rejects_bad_lengths_and_types() {
        let mut y = vec![0f32; 32];
        assert!(dequantize(GgmlType::Q8_0, &[0u8; 33], &mut y).is_err());
        assert!(dequantize(GgmlType::Q4_K, &[0u8; 18], &mut y).is_err());
        let e = dequantize(GgmlType::IQ2_XXS, &[0u8; 66], &mut vec![0f32; 256]).unwrap_err();
        assert!(e.contains("IQ2_XXS"), "{e}");
        let mut y = vec![0f32; 31];
        assert!(dequantize(GgmlType::Q8_0, &[0u8; 34], &mut y).is_err());
    }
}
