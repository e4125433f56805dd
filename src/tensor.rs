//! Weights on the device: dtype tags, host-side packing and row-split buffers.
//!
//! A weight matrix keeps PyTorch's `nn.Linear` layout `[out_features,
//! in_features]`, row-major, exactly as in the file. The only device-side
//! transform is splitting by whole rows into several buffers when the tensor
//! is larger than the adapter's max storage binding; the split is the same for
//! every tensor and never depends on what the tensor is.

use crate::error::{Error, Result};
use crate::gpu::Gpu;

/// How a weight is stored on the device. Both are read through `array<u32>`
/// bindings; kernels pick the decoding with the `W_BF16` override constant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WDType {
    /// bf16 bit patterns packed two per u32, widened in the shader.
    Bf16,
    /// f32 bit patterns.
    F32,
}

impl WDType {
    pub fn bytes_per_elem(self) -> usize {
        match self {
            WDType::Bf16 => 2,
            WDType::F32 => 4,
        }
    }
    /// Value for the `W_BF16` pipeline override constant.
    pub fn is_bf16_const(self) -> f64 {
        match self {
            WDType::Bf16 => 1.0,
            WDType::F32 => 0.0,
        }
    }
}

/// Round f32 values to bf16 (round to nearest even) and return the bytes.
pub fn f32_to_bf16_bytes(v: &[f32]) -> Vec<u8> {
    let h: Vec<half::bf16> = v.iter().map(|&x| half::bf16::from_f32(x)).collect();
    bytemuck::cast_slice(&h).to_vec()
}

/// Widen bf16 bytes (little-endian) to f32.
pub fn bf16_bytes_to_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(2)
        .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
        .collect()
}

/// Widen f16 bytes (little-endian) to f32.
pub fn f16_bytes_to_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(2)
        .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
        .collect()
}

/// Round every value through bf16 (what a bf16 checkpoint holds).
pub fn round_bf16(v: &[f32]) -> Vec<f32> {
    v.iter()
        .map(|&x| half::bf16::from_f32(x).to_f32())
        .collect()
}

/// One buffer of a row-split tensor: rows `[row_start, row_start + rows)`.
pub struct Chunk {
    pub buffer: wgpu::Buffer,
    pub row_start: usize,
    pub rows: usize,
}

/// A 1D or 2D weight on the device, split by whole rows into chunks that each
/// fit one storage binding. 1D tensors are one row.
pub struct DeviceTensor {
    pub name: String,
    pub dtype: WDType,
    /// Logical shape, as in the checkpoint (`[out, in]` for linear weights).
    pub shape: Vec<usize>,
    pub chunks: Vec<Chunk>,
}

impl DeviceTensor {
    pub fn rows(&self) -> usize {
        if self.shape.len() >= 2 {
            self.shape[0]
        } else {
            1
        }
    }
    pub fn cols(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Upload raw device-format bytes (bf16 or f32, row-major) of a tensor
    /// with `shape`, split into chunks of at most `gpu.caps.max_binding` bytes.
    pub fn upload(
        gpu: &Gpu,
        name: &str,
        dtype: WDType,
        shape: &[usize],
        bytes: &[u8],
    ) -> Result<Self> {
        Self::upload_streamed(
            gpu,
            name,
            dtype,
            shape,
            bytes,
            &mut |_, _| Ok(()),
            &mut |_| {},
        )
    }

    /// [`DeviceTensor::upload`], streamed in bounded pieces
    /// ([`Gpu::storage_streamed`]): `check(offset, piece)` sees every piece
    /// (offset in `bytes`) before it is written, `done(piece)` after.
    pub fn upload_streamed(
        gpu: &Gpu,
        name: &str,
        dtype: WDType,
        shape: &[usize],
        bytes: &[u8],
        check: &mut dyn FnMut(usize, &[u8]) -> Result<()>,
        done: &mut dyn FnMut(&[u8]),
    ) -> Result<Self> {
        let (rows, cols) = match shape {
            [n] => (1, *n),
            [r, c] => (*r, *c),
            _ => {
                return Err(Error::invalid(format!(
                    "tensor `{name}`: device tensors are 1D or 2D, got shape {shape:?}"
                )))
            }
        };
        let es = dtype.bytes_per_elem();
        let want = rows * cols * es;
        if bytes.len() != want {
            return Err(Error::invalid(format!(
                "tensor `{name}`: {} bytes for shape {shape:?} {dtype:?}, expected {want}",
                bytes.len()
            )));
        }
        let plan = split_rows(rows, cols, es, gpu.caps.max_binding)
            .map_err(|m| Error::invalid(format!("tensor `{name}` shape {shape:?}: {m}")))?;
        let row_bytes = cols * es;
        let chunks = plan
            .into_iter()
            .map(|(row_start, n)| {
                let start = row_start * row_bytes;
                let data = &bytes[start..(row_start + n) * row_bytes];
                let mut check_at = |off: usize, piece: &[u8]| check(start + off, piece);
                Ok(Chunk {
                    buffer: gpu.storage_streamed(name, data, &mut check_at, done)?,
                    row_start,
                    rows: n,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(DeviceTensor {
            name: name.to_string(),
            dtype,
            shape: shape.to_vec(),
            chunks,
        })
    }

    /// Upload f32 values, stored as `dtype` (rounded to bf16 when asked).
    pub fn from_f32(
        gpu: &Gpu,
        name: &str,
        dtype: WDType,
        shape: &[usize],
        v: &[f32],
    ) -> Result<Self> {
        let bytes = match dtype {
            WDType::Bf16 => f32_to_bf16_bytes(v),
            WDType::F32 => bytemuck::cast_slice(v).to_vec(),
        };
        Self::upload(gpu, name, dtype, shape, &bytes)
    }

    /// Read the whole tensor back as f32 (for round-trip tests and debugging).
    pub fn read_f32(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        let es = self.dtype.bytes_per_elem();
        let row_bytes = self.cols() * es;
        let mut out = Vec::with_capacity(self.numel());
        for c in &self.chunks {
            let b = gpu.read_bytes(&c.buffer, 0, (c.rows * row_bytes) as u64)?;
            match self.dtype {
                WDType::Bf16 => out.extend(bf16_bytes_to_f32(&b)),
                WDType::F32 => out.extend_from_slice(bytemuck::cast_slice::<u8, f32>(&b)),
            }
        }
        Ok(out)
    }
}

/// Plan a split of a `[rows, cols]` tensor with `elem_bytes` per element into
/// row ranges of at most `max_bytes` each. Each chunk starts at a whole row and
/// holds an even number of elements when elements are 2 bytes, so a chunk's
/// first element is always the low half of its first u32 word.
pub fn split_rows(
    rows: usize,
    cols: usize,
    elem_bytes: usize,
    max_bytes: u64,
) -> std::result::Result<Vec<(usize, usize)>, String> {
    let row_bytes = (cols * elem_bytes) as u64;
    if rows == 0 || cols == 0 {
        return Ok(vec![(0, rows)]);
    }
    let mut per = (max_bytes / row_bytes) as usize;
    // bf16 rows with an odd element count: pair rows so chunk bytes stay 4-aligned.
    // (A single-row tensor has one chunk starting at 0 and needs no pairing.)
    let need_pairs = elem_bytes == 2 && cols % 2 == 1 && rows > 1;
    if need_pairs {
        per -= per % 2;
    }
    if per == 0 {
        return Err(format!(
            "one row ({row_bytes} bytes{}) exceeds the device's max storage binding of {max_bytes} bytes",
            if need_pairs { ", two rows needed for alignment" } else { "" }
        ));
    }
    let mut out = Vec::new();
    let mut r = 0;
    while r < rows {
        let n = per.min(rows - r);
        out.push((r, n));
        r += n;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_covers_every_row_once() {
        for &(rows, cols, es, max) in &[
            (10usize, 4usize, 2usize, 16u64),
            (7, 3, 2, 24),
            (151936, 896, 2, 128 << 20),
            (5, 5, 4, 1 << 20),
        ] {
            let plan = split_rows(rows, cols, es, max).unwrap();
            let mut next = 0;
            for &(s, n) in &plan {
                assert_eq!(s, next);
                assert!(n > 0);
                assert!((n * cols * es) as u64 <= max);
                // each chunk starts on a u32 word boundary of the original tensor
                assert_eq!((s * cols * es) % 4, 0);
                next += n;
            }
            assert_eq!(next, rows);
        }
        // the real case from the issue: Qwen2.5-0.5B's embedding needs 3 chunks
        assert_eq!(split_rows(151936, 896, 2, 128 << 20).unwrap().len(), 3);
        assert!(split_rows(2, 100, 4, 16).is_err());
        // a 1D bf16 tensor of odd length that just fits needs no pairing
        assert_eq!(split_rows(1, 7, 2, 14).unwrap(), vec![(0, 1)]);
    }
}
