//! Quantized (ggml block) weights on the device, at their own types.
//!
//! A quantized tensor keeps ggml's blocks and nn.Linear's `[out, in]` row
//! order: row r of the weight is blocks `r * in / block .. (r + 1) * in /
//! block` of the GGUF data, exactly as in the file. Kernels read the
//! device buffer as `array<u32>`, so every block must start on a 4-byte
//! boundary and its fields should sit on the boundaries the kernels read
//! them at. Q8_0 (34 bytes), Q4_0 (18), Q5_0 (22), Q3_K (110) and Q6_K
//! (210) are not multiples of 4, so the upload applies one named,
//! whole-tensor layout transform, [`BlockPad`]: two zero bytes are inserted
//! into every block at a fixed offset of the type (after the leading f16
//! scale for Q4_0 / Q5_0 / Q8_0, so their quants start on a word; at the end
//! of a Q3_K or Q6_K block, after its trailing f16 scale). Types whose
//! blocks are already word multiples (Q4_1, Q5_1, Q2_K, Q4_K, Q5_K) are
//! copied unchanged. The transform depends
//! only on the type, never on the tensor's shape or name, and
//! [`from_device_layout`] undoes it exactly (round-trip tested).
//!
//! Like bf16 tensors, a quantized tensor larger than the adapter's max
//! storage binding is split by whole rows ([`crate::tensor::split_rows`]
//! over rows of `in / block` padded blocks).

use crate::error::{Error, Result};
use crate::gguf::GgmlType;
use crate::gpu::Gpu;
use crate::tensor::{split_rows, Chunk, ChunkStorage};

/// The ggml types the GPU kernels read natively (`ops::qmatmul`).
pub const GPU_TYPES: &[GgmlType] = &[
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// Whether `ty` has a native GPU kernel.
pub fn gpu_supports(ty: GgmlType) -> bool {
    GPU_TYPES.contains(&ty)
}

/// The device layout of one block type: `pad` zero bytes inserted at byte
/// offset `at` of every block (`pad = 0`: the block is stored unchanged).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockPad {
    pub ty: GgmlType,
    pub at: usize,
    pub pad: usize,
}

impl BlockPad {
    /// The layout of `ty`, or an error naming the type when it has no GPU
    /// kernel.
    pub fn of(ty: GgmlType) -> std::result::Result<Self, String> {
        use GgmlType::*;
        let (at, pad) = match ty {
            Q4_0 | Q5_0 | Q8_0 => (2, 2),
            Q3_K => (110, 2),
            Q6_K => (210, 2),
            Q4_1 | Q5_1 | Q2_K | Q4_K | Q5_K => (0, 0),
            _ => {
                return Err(format!(
                    "ggml type {ty} has no GPU kernel (native types: {})",
                    GPU_TYPES
                        .iter()
                        .map(|t| t.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            }
        };
        Ok(BlockPad { ty, at, pad })
    }
    /// Bytes of one block on the device (a multiple of 4).
    pub fn device_block_bytes(&self) -> usize {
        self.ty.type_size() + self.pad
    }
}

/// Apply [`BlockPad`] to whole blocks of `ty`.
pub fn to_device_layout(ty: GgmlType, src: &[u8]) -> std::result::Result<Vec<u8>, String> {
    let l = BlockPad::of(ty)?;
    let ts = ty.type_size();
    if src.len() % ts != 0 {
        return Err(format!(
            "{} bytes is not a whole number of {ty} blocks of {ts} bytes",
            src.len()
        ));
    }
    if l.pad == 0 {
        return Ok(src.to_vec());
    }
    let mut out = Vec::with_capacity(src.len() / ts * l.device_block_bytes());
    for b in src.chunks_exact(ts) {
        out.extend_from_slice(&b[..l.at]);
        out.extend(std::iter::repeat_n(0u8, l.pad));
        out.extend_from_slice(&b[l.at..]);
    }
    Ok(out)
}

/// Undo [`to_device_layout`]: ggml's own block bytes.
pub fn from_device_layout(ty: GgmlType, dev: &[u8]) -> std::result::Result<Vec<u8>, String> {
    let l = BlockPad::of(ty)?;
    let db = l.device_block_bytes();
    if dev.len() % db != 0 {
        return Err(format!(
            "{} bytes is not a whole number of device {ty} blocks of {db} bytes",
            dev.len()
        ));
    }
    let mut out = Vec::with_capacity(dev.len() / db * ty.type_size());
    for b in dev.chunks_exact(db) {
        out.extend_from_slice(&b[..l.at]);
        out.extend_from_slice(&b[l.at + l.pad..]);
    }
    Ok(out)
}

/// A 2D quantized weight `[rows, cols]` on the device in the [`BlockPad`]
/// layout, split by whole rows into chunks that each fit one binding.
pub struct QTensor {
    pub name: String,
    pub ty: GgmlType,
    /// `[rows, cols]` as in the checkpoint (`[out, in]` for linear weights).
    pub shape: [usize; 2],
    pub chunks: Vec<Chunk>,
}

impl QTensor {
    pub fn rows(&self) -> usize {
        self.shape[0]
    }
    pub fn cols(&self) -> usize {
        self.shape[1]
    }
    /// Blocks per row.
    pub fn blocks_per_row(&self) -> usize {
        self.shape[1] / self.ty.block_size()
    }
    /// Bytes the tensor occupies on the device.
    pub fn device_bytes(&self) -> u64 {
        self.chunks.iter().map(|c| c.device_bytes()).sum()
    }

    /// Upload ggml block bytes (`rows * cols` elements of `ty`, row-major as
    /// in a GGUF file with `ne = [cols, rows]`).
    pub fn upload(
        gpu: &Gpu,
        name: &str,
        ty: GgmlType,
        shape: [usize; 2],
        bytes: &[u8],
    ) -> Result<Self> {
        let bad =
            |m: String| Error::invalid(format!("tensor `{name}` ({ty}, shape {shape:?}): {m}"));
        let layout = BlockPad::of(ty).map_err(bad)?;
        let [rows, cols] = shape;
        let bs = ty.block_size();
        if rows == 0 || cols == 0 || cols % bs != 0 {
            return Err(bad(format!(
                "a row must be a non-empty whole number of {bs}-element blocks"
            )));
        }
        let bpr = cols / bs;
        let want = rows * bpr * ty.type_size();
        if bytes.len() != want {
            return Err(bad(format!("{} bytes, expected {want}", bytes.len())));
        }
        let dev = to_device_layout(ty, bytes).map_err(bad)?;
        let plan = split_rows(rows, bpr, layout.device_block_bytes(), gpu.caps.max_binding)
            .map_err(bad)?;
        let row_bytes = bpr * layout.device_block_bytes();
        let chunks = plan
            .into_iter()
            .map(|(row_start, n)| {
                let data = &dev[row_start * row_bytes..(row_start + n) * row_bytes];
                Ok(Chunk {
                    storage: ChunkStorage::Buffer(gpu.storage_init(name, data)?),
                    row_start,
                    rows: n,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(QTensor {
            name: name.to_string(),
            ty,
            shape,
            chunks,
        })
    }

    /// Read the tensor back as ggml block bytes (round-trip tests).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn read_ggml(&self, gpu: &Gpu) -> Result<Vec<u8>> {
        let db = BlockPad::of(self.ty)
            .map_err(Error::invalid)?
            .device_block_bytes();
        let mut dev = Vec::new();
        for c in &self.chunks {
            let len = (c.rows * self.blocks_per_row() * db) as u64;
            dev.extend(gpu.read_bytes(c.buffer(&self.name)?, 0, len)?);
        }
        from_device_layout(self.ty, &dev).map_err(Error::invalid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::dequant::dequantize;
    use crate::testutil::gpu_with_split;
    use rand::{Rng, SeedableRng};

    fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random::<u8>()).collect()
    }

    #[test]
    fn every_device_block_is_word_aligned_and_round_trips() {
        for (i, &ty) in GPU_TYPES.iter().enumerate() {
            let l = BlockPad::of(ty).unwrap();
            assert_eq!(l.device_block_bytes() % 4, 0, "{ty}");
            let src = random_bytes(ty.type_size() * 5, i as u64);
            let dev = to_device_layout(ty, &src).unwrap();
            assert_eq!(dev.len(), 5 * l.device_block_bytes(), "{ty}");
            assert_eq!(from_device_layout(ty, &dev).unwrap(), src, "{ty}");
            // the inserted bytes are zero and the rest is the block, in order
            for (b, d) in src
                .chunks(ty.type_size())
                .zip(dev.chunks(l.device_block_bytes()))
            {
                assert_eq!(&d[..l.at], &b[..l.at]);
                assert!(d[l.at..l.at + l.pad].iter().all(|&x| x == 0));
                assert_eq!(&d[l.at + l.pad..], &b[l.at..]);
            }
        }
        // the word-aligned fields the kernels rely on: Q8_0's quants start
        // at byte 4, Q6_K's f16 scale sits in the low half of word 52
        let q8 = BlockPad::of(GgmlType::Q8_0).unwrap();
        assert_eq!((q8.at + q8.pad, q8.device_block_bytes()), (4, 36));
        let q6 = BlockPad::of(GgmlType::Q6_K).unwrap();
        assert_eq!((q6.at, q6.device_block_bytes()), (210, 212));
        // Q3_K's f16 d in the low half of word 27; Q2_K (84 bytes, its two
        // f16 in word 20) is stored as it is
        let q3 = BlockPad::of(GgmlType::Q3_K).unwrap();
        assert_eq!((q3.at, q3.device_block_bytes()), (110, 112));
        let q2 = BlockPad::of(GgmlType::Q2_K).unwrap();
        assert_eq!((q2.pad, q2.device_block_bytes()), (0, 84));
        assert!(to_device_layout(GgmlType::Q8_0, &[0; 35]).is_err());
        assert!(BlockPad::of(GgmlType::IQ2_XXS)
            .unwrap_err()
            .contains("IQ2_XXS"));
    }

    #[test]
    fn upload_splits_by_whole_rows_and_reads_back() {
        // Q8_0, 64 columns = 2 blocks = 72 device bytes per row; a 300-byte
        // binding holds 4 rows, so 11 rows are chunks of 4, 4, 3.
        let gpu = gpu_with_split(300);
        let ty = GgmlType::Q8_0;
        let mut src = Vec::new();
        for b in 0..22 {
            // finite f16 scales so dequantized values are comparable
            src.extend(half::f16::from_f32(0.01 * (b + 1) as f32).to_le_bytes());
            src.extend(random_bytes(32, b));
        }
        let t = QTensor::upload(&gpu, "w", ty, [11, 64], &src).unwrap();
        let rows: Vec<usize> = t.chunks.iter().map(|c| c.rows).collect();
        assert_eq!(rows, [4, 4, 3]);
        assert_eq!(t.read_ggml(&gpu).unwrap(), src);
        let mut a = vec![0f32; 11 * 64];
        dequantize(ty, &t.read_ggml(&gpu).unwrap(), &mut a).unwrap();
        let mut b = vec![0f32; 11 * 64];
        dequantize(ty, &src, &mut b).unwrap();
        assert_eq!(a, b);
        // bad inputs name the tensor
        let e = QTensor::upload(&gpu, "blk.0.w", ty, [11, 60], &src)
            .err()
            .unwrap();
        assert!(e.to_string().contains("blk.0.w"), "{e}");
        let e = QTensor::upload(&gpu, "blk.1.w", ty, [10, 64], &src)
            .err()
            .unwrap();
        assert!(e.to_string().contains("expected"), "{e}");
        let e = QTensor::upload(&gpu, "big", GgmlType::Q4_K, [1, 768], &[0; 432])
            .err()
            .unwrap();
        assert!(e.to_string().contains("max storage binding"), "{e}");
    }
}
