//! Refusing non-finite weights at load.
//!
//! A NaN or an infinity in one weight poisons every activation after the
//! first layer that reads it, and the symptom (every tap failing, or
//! garbage text) never names the cause. So every tensor is scanned where
//! its bytes are already touched on their way to the device or to the CPU
//! reference, and the first bad element is named.
//!
//! The scan tests the exponent bits only: a bf16 value is NaN or ±Inf
//! exactly when `(bits & 0x7f80) == 0x7f80` (f16: `0x7c00`, f32:
//! `0x7f80_0000`). It reads the bytes as little-endian u64 words holding
//! 4 (bf16, f16) or 2 (f32) lanes and folds a whole block of words into one
//! comparison (SWAR, no carries between lanes; see [`lanes_ok`]), so it runs
//! at memory speed and auto-vectorizes; only a block that holds a bad lane
//! is looked at element by element.

use ::safetensors::Dtype;

use super::shard::TensorMeta;
use crate::error::{Error, Hint, Result, Setting};

/// Lane layout of one float format: width in bits and exponent mask.
#[derive(Clone, Copy)]
struct Format {
    bits: u32,
    exp: u64,
    name: &'static str,
}

const BF16: Format = Format {
    bits: 16,
    exp: 0x7f80,
    name: "bf16",
};
const F16: Format = Format {
    bits: 16,
    exp: 0x7c00,
    name: "f16",
};
const F32: Format = Format {
    bits: 32,
    exp: 0x7f80_0000,
    name: "f32",
};

fn format_of(dtype: Dtype) -> Option<Format> {
    match dtype {
        Dtype::BF16 => Some(BF16),
        Dtype::F16 => Some(F16),
        Dtype::F32 => Some(F32),
        _ => None,
    }
}

/// `x` replicated into every lane of a u64.
const fn splat(x: u64, bits: u32) -> u64 {
    let mut v = 0u64;
    let mut s = 0;
    while s < 64 {
        v |= x << s;
        s += bits;
    }
    v
}

/// Bytes per block folded into one test: small enough to stay in L1 when a
/// block has to be rescanned element by element, large enough that the
/// per-block branch costs nothing.
const BLOCK: usize = 4096;

/// `TOP` (every lane's top bit) when no lane of `word` has an all-ones
/// exponent, something else otherwise. With `y = (word & EXP) ^ EXP`, a lane
/// of `y` is zero exactly when its exponent is all ones; every lane of `y`
/// is below the lane's top bit (the sign bit is masked off), so adding
/// `top - 1` per lane sets the top bit of exactly the non-zero lanes and
/// never carries into the next lane.
#[inline(always)]
fn lanes_ok(word: u64, exp: u64, add: u64, top: u64) -> u64 {
    (((word & exp) ^ exp).wrapping_add(add)) & top
}

fn lane(bytes: &[u8], i: usize, f: Format) -> u64 {
    match f.bits {
        16 => u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]) as u64,
        _ => u32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().expect("4 bytes")) as u64,
    }
}

fn is_bad(bits: u64, f: Format) -> bool {
    bits & f.exp == f.exp
}

fn scan(bytes: &[u8], f: Format) -> Option<usize> {
    let lb = (f.bits / 8) as usize;
    let exp = splat(f.exp, f.bits);
    let top = splat(1 << (f.bits - 1), f.bits);
    let add = splat((1 << (f.bits - 1)) - 1, f.bits);
    for (b, block) in bytes.chunks(BLOCK).enumerate() {
        let words = block.chunks_exact(8);
        let tail = words.remainder();
        let acc = words.fold(top, |acc, w| {
            let w = u64::from_le_bytes(w.try_into().expect("8 bytes"));
            acc & lanes_ok(w, exp, add, top)
        });
        let tail_bad = tail.chunks_exact(lb).any(|c| is_bad(lane(c, 0, f), f));
        if acc != top || tail_bad {
            // The word test is exact, so this finds the lane it saw.
            let n = block.len() / lb;
            if let Some(i) = (0..n).find(|&i| is_bad(lane(block, i, f), f)) {
                return Some(b * (BLOCK / lb) + i);
            }
        }
    }
    None
}

/// Index of the first NaN or ±Inf element of `bytes`, little-endian values
/// of `dtype` (BF16, F16 or F32; any other dtype: `None`).
pub fn first_non_finite(dtype: Dtype, bytes: &[u8]) -> Option<usize> {
    scan(bytes, format_of(dtype)?)
}

/// What a non-finite value is, from its bits.
fn describe(bits: u64, f: Format) -> &'static str {
    let mantissa = (1u64 << (f.bits - 1)) - 1 - f.exp;
    let sign = 1u64 << (f.bits - 1);
    if bits & mantissa != 0 {
        "NaN"
    } else if bits & sign != 0 {
        "-Inf"
    } else {
        "+Inf"
    }
}

/// `[i, j, ...]` of flat index `flat` in a row-major tensor of `shape`.
fn unravel(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for (k, &d) in shape.iter().enumerate().rev() {
        if d > 0 {
            idx[k] = flat % d;
            flat /= d;
        }
    }
    idx
}

/// The error for a tensor whose element `first` is NaN or infinite: names
/// the file, the tensor, the element (flat and per dimension), its value
/// and how many of the tensor's values are non-finite.
fn non_finite_error(m: &TensorMeta, bytes: &[u8], f: Format, first: usize) -> Error {
    let lb = (f.bits / 8) as usize;
    let n = bytes.len() / lb;
    let bits = lane(bytes, first, f);
    // Error path only: count every bad element.
    let count = (first..n).filter(|&i| is_bad(lane(bytes, i, f), f)).count();
    Error::Tensor {
        path: m.file.clone(),
        tensor: m.name.clone(),
        msg: format!(
            "element {} (flat index {first} of shape {:?}) is {} ({} bits {:#0w$x}); \
             {count} of {n} values are NaN or infinite. Weights must be finite: the file is corrupt \
             or was saved from a diverged model",
            format_index(&unravel(first, &m.shape)),
            m.shape,
            describe(bits, f),
            f.name,
            bits,
            w = 2 + f.bits as usize / 4,
        ),
    }
}

fn format_index(idx: &[usize]) -> String {
    let parts: Vec<String> = idx.iter().map(usize::to_string).collect();
    format!("[{}]", parts.join(", "))
}

/// Refuse `m`'s bytes (as stored in its file) when they hold a NaN or an
/// infinity. Dtypes other than BF16/F16/F32 are not checked here (the loader
/// refuses them anyway).
pub fn check_finite(m: &TensorMeta, bytes: &[u8]) -> Result<()> {
    let Some(f) = format_of(m.dtype) else {
        return Ok(());
    };
    match scan(bytes, f) {
        None => Ok(()),
        Some(i) => Err(non_finite_error(m, bytes, f, i)),
    }
}

/// The error for element `i` of `m`, finite in its file but infinite once
/// narrowed to bf16 for the device: an f32 or f16 weight beyond bf16's
/// largest value (about 3.39e38).
pub fn narrowed_to_bf16_error(m: &TensorMeta, i: usize) -> Error {
    Error::Tensor {
        path: m.file.clone(),
        tensor: m.name.clone(),
        msg: format!(
            "element {} (flat index {i} of shape {:?}) is finite in the file ({}) but outside \
             the bf16 range, so it would be infinite on the device",
            format_index(&unravel(i, &m.shape)),
            m.shape,
            m.dtype
        ),
    }
    .hint(Hint::new().set(Setting::DType, "f32"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bf16_bytes(v: &[u16]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// Every non-finite bf16 pattern class, at every position of buffers of
    /// many lengths (tails, block boundaries), and at unaligned offsets.
    #[test]
    fn finds_the_first_bad_bf16_everywhere() {
        let bad = [0x7f80u16, 0xff80, 0x7fc0, 0xffc1, 0x7f81, 0xffff];
        for len in [1usize, 3, 4, 5, 7, 8, 9, 2047, 2048, 2049, 4100] {
            for pos in [0, 1, len / 2, len.saturating_sub(2), len - 1]
                .into_iter()
                .filter(|&p| p < len)
            {
                for &b in &bad {
                    let mut v = vec![0x3f80u16; len];
                    v[pos] = b;
                    if pos + 1 < len {
                        v[len - 1] = 0x7f80; // a later bad value is not the first
                    }
                    let bytes = bf16_bytes(&v);
                    assert_eq!(
                        first_non_finite(Dtype::BF16, &bytes),
                        Some(pos),
                        "len {len} pos {pos} {b:#x}"
                    );
                    // Unaligned start in the file.
                    let mut shifted = vec![0u8];
                    shifted.extend_from_slice(&bytes);
                    assert_eq!(first_non_finite(Dtype::BF16, &shifted[1..]), Some(pos));
                }
            }
        }
    }

    /// Large finite values, subnormals, zeros of both signs and the largest
    /// finite values pass; so does an empty tensor.
    #[test]
    fn finite_extremes_pass() {
        let bf: Vec<u16> = (0..=u16::MAX).filter(|b| b & 0x7f80 != 0x7f80).collect();
        assert_eq!(first_non_finite(Dtype::BF16, &bf16_bytes(&bf)), None);
        assert_eq!(
            first_non_finite(Dtype::F16, &bf16_bytes(&[0x7bff, 0xfbff, 0x0001, 0x8000])),
            None
        );
        let f: Vec<u8> = [f32::MAX, f32::MIN, f32::MIN_POSITIVE / 2.0, -0.0, 1.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert_eq!(first_non_finite(Dtype::F32, &f), None);
        assert_eq!(first_non_finite(Dtype::BF16, &[]), None);
    }

    /// The word test agrees with the scalar test on every bf16 and f16 bit
    /// pattern, in every lane.
    #[test]
    fn word_test_matches_scalar_test_on_all_16_bit_patterns() {
        for f in [BF16, F16] {
            for b in 0..=u16::MAX {
                for l in 0..4 {
                    let mut v = [0u16; 4];
                    v[l] = b;
                    let got = first_non_finite(
                        if f.exp == BF16.exp {
                            Dtype::BF16
                        } else {
                            Dtype::F16
                        },
                        &bf16_bytes(&v),
                    );
                    let want = is_bad(b as u64, f).then_some(l);
                    assert_eq!(got, want, "{} {b:#06x} lane {l}", f.name);
                }
            }
        }
    }

    #[test]
    fn f32_and_f16_non_finite_found() {
        for (x, pos) in [
            (f32::NAN, 0),
            (f32::INFINITY, 1),
            (f32::NEG_INFINITY, 2),
            (-f32::NAN, 1026),
        ] {
            let mut v = vec![1.5f32; 2000];
            v[pos] = x;
            let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            assert_eq!(first_non_finite(Dtype::F32, &b), Some(pos), "{x}");
        }
        for (bits, pos) in [(0x7c00u16, 5), (0xfc00, 6), (0x7e00, 4095)] {
            let mut v = vec![0x3c00u16; 4096];
            v[pos] = bits;
            assert_eq!(first_non_finite(Dtype::F16, &bf16_bytes(&v)), Some(pos));
        }
        assert_eq!(first_non_finite(Dtype::I32, &[0xff; 8]), None);
    }

    #[test]
    fn describes_and_unravels() {
        assert_eq!(describe(0x7fc0, BF16), "NaN");
        assert_eq!(describe(0x7f80, BF16), "+Inf");
        assert_eq!(describe(0xff80, BF16), "-Inf");
        assert_eq!(describe(0xfc00, F16), "-Inf");
        assert_eq!(describe(0x7f80_0001, F32), "NaN");
        assert_eq!(unravel(0, &[3, 4]), vec![0, 0]);
        assert_eq!(unravel(7, &[3, 4]), vec![1, 3]);
        assert_eq!(unravel(23, &[2, 3, 4]), vec![1, 2, 3]);
        assert_eq!(unravel(5, &[6]), vec![5]);
    }
}
