//! Weights on the device: dtype tags, host-side packing and row-split buffers.
//!
//! A weight matrix keeps PyTorch's `nn.Linear` layout `[out_features,
//! in_features]`, row-major, exactly as in the file. The only device-side
//! transform is splitting by whole rows into several buffers when the tensor
//! is larger than the adapter's max storage binding; the split is the same for
//! every tensor and never depends on what the tensor is.
//!
//! Each chunk is a storage buffer or, for 2D bf16 matrices with k % 8 == 0
//! under the `weights=texture` decision ([`WeightLayout`]), an `rgba32uint`
//! texture holding the same bytes in the same order (texel g = elements
//! 8g..8g+7 of the chunk, [`TEXTURE_WIDTH`] texels per texture row): a named
//! transform applied to every such tensor alike, round-trip tested below.

use crate::error::{Error, Result};
pub use crate::gpu::WeightLayout;
use crate::gpu::{Gpu, TEXTURE_WIDTH};

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

/// Where one chunk's bytes live ([`WeightLayout`]).
pub enum ChunkStorage {
    Buffer(wgpu::Buffer),
    /// `rgba32uint`, [`TEXTURE_WIDTH`] texels per row, texel g = bytes
    /// 16g..16g+16 of the row-major chunk.
    Texture {
        texture: wgpu::Texture,
        view: wgpu::TextureView,
        /// The chunk's own bytes (the last texel row is padded to
        /// [`TEXTURE_WIDTH`] texels: up to 64 KiB more on the device).
        data_bytes: u64,
    },
}

/// One buffer or texture of a row-split tensor: rows
/// `[row_start, row_start + rows)`.
pub struct Chunk {
    pub storage: ChunkStorage,
    pub row_start: usize,
    pub rows: usize,
}

impl Chunk {
    /// The chunk's storage buffer; an error naming `tensor` when it is a
    /// texture (a kernel that reads buffers must not bind it).
    pub fn buffer(&self, tensor: &str) -> Result<&wgpu::Buffer> {
        match &self.storage {
            ChunkStorage::Buffer(b) => Ok(b),
            ChunkStorage::Texture { .. } => Err(Error::invalid(format!(
                "tensor `{tensor}` is stored as a texture (weights=texture), but this kernel \
                 reads it from a buffer; set WGLLM_DECISIONS=weights=buffer"
            ))),
        }
    }

    /// The chunk as a binding resource (buffer or texture view).
    pub fn resource(&self) -> wgpu::BindingResource<'_> {
        match &self.storage {
            ChunkStorage::Buffer(b) => b.as_entire_binding(),
            ChunkStorage::Texture { view, .. } => wgpu::BindingResource::TextureView(view),
        }
    }

    pub fn layout(&self) -> WeightLayout {
        match self.storage {
            ChunkStorage::Buffer(_) => WeightLayout::Buffer,
            ChunkStorage::Texture { .. } => WeightLayout::Texture,
        }
    }

    /// Bytes of weight data the chunk holds: what a kernel reads of it and
    /// what the checkpoint holds (a buffer's size; a texture's data without
    /// the padding of its last texel row, see [`Self::allocated_bytes`]).
    pub fn device_bytes(&self) -> u64 {
        match &self.storage {
            ChunkStorage::Buffer(b) => b.size(),
            ChunkStorage::Texture { data_bytes, .. } => *data_bytes,
        }
    }

    /// Bytes the device allocated for the chunk, padding included.
    pub fn allocated_bytes(&self) -> u64 {
        match &self.storage {
            ChunkStorage::Buffer(b) => b.size(),
            ChunkStorage::Texture { texture, .. } => {
                u64::from(texture.width()) * u64::from(texture.height()) * 16
            }
        }
    }
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

    /// The layout of its chunks (all chunks of a tensor share one).
    pub fn layout(&self) -> WeightLayout {
        self.chunks
            .first()
            .map_or(WeightLayout::Buffer, Chunk::layout)
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
        Self::upload_as(gpu, name, dtype, shape, bytes, WeightLayout::Buffer)
    }

    /// [`DeviceTensor::upload`] in `layout` ([`WeightLayout::Texture`]: a
    /// 2D bf16 tensor with k % 8 == 0 only).
    pub fn upload_as(
        gpu: &Gpu,
        name: &str,
        dtype: WDType,
        shape: &[usize],
        bytes: &[u8],
        layout: WeightLayout,
    ) -> Result<Self> {
        Self::upload_streamed(
            gpu,
            name,
            dtype,
            shape,
            bytes,
            layout,
            &mut |_, _| Ok(()),
            &mut |_| {},
        )
    }

    /// [`DeviceTensor::upload`], streamed in bounded pieces
    /// ([`Gpu::storage_streamed`]): `check(offset, piece)` sees every piece
    /// (offset in `bytes`) before it is written, `done(piece)` after.
    #[allow(clippy::too_many_arguments)]
    pub fn upload_streamed(
        gpu: &Gpu,
        name: &str,
        dtype: WDType,
        shape: &[usize],
        bytes: &[u8],
        layout: WeightLayout,
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
        let texture = layout == WeightLayout::Texture;
        if texture && (dtype != WDType::Bf16 || shape.len() != 2 || cols % 8 != 0) {
            return Err(Error::invalid(format!(
                "tensor `{name}` shape {shape:?} {dtype:?}: the texture layout holds 2D bf16 \
                 tensors whose rows are whole 8-element texels (k % 8 == 0)"
            )));
        }
        // A texture chunk also fits max_texture_dimension_2d texel rows.
        let max_bytes = if texture {
            let dim = u64::from(gpu.device.limits().max_texture_dimension_2d);
            gpu.caps
                .max_binding
                .min(dim * u64::from(TEXTURE_WIDTH) * 16)
        } else {
            gpu.caps.max_binding
        };
        let plan = split_rows(rows, cols, es, max_bytes)
            .map_err(|m| Error::invalid(format!("tensor `{name}` shape {shape:?}: {m}")))?;
        let row_bytes = cols * es;
        let chunks = plan
            .into_iter()
            .map(|(row_start, n)| {
                let start = row_start * row_bytes;
                let data = &bytes[start..(row_start + n) * row_bytes];
                let mut check_at = |off: usize, piece: &[u8]| check(start + off, piece);
                let storage = if texture {
                    let (texture, view) = gpu.texture_streamed(name, data, &mut check_at, done)?;
                    ChunkStorage::Texture {
                        texture,
                        view,
                        data_bytes: data.len() as u64,
                    }
                } else {
                    ChunkStorage::Buffer(gpu.storage_streamed(name, data, &mut check_at, done)?)
                };
                Ok(Chunk {
                    storage,
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

    /// The device bytes of one chunk, as uploaded (texture padding dropped).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn read_chunk_bytes(&self, gpu: &Gpu, c: &Chunk) -> Result<Vec<u8>> {
        let len = (c.rows * self.cols() * self.dtype.bytes_per_elem()) as u64;
        match &c.storage {
            ChunkStorage::Buffer(b) => gpu.read_bytes(b, 0, len),
            ChunkStorage::Texture { texture, .. } => gpu.read_texture(texture, len),
        }
    }

    /// Read the whole tensor back as f32 (for round-trip tests and debugging).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn read_f32(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(self.numel());
        for c in &self.chunks {
            let b = self.read_chunk_bytes(gpu, c)?;
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

    /// The texture layout is the row-major bytes, texel g = elements
    /// 8g..8g+7: uploading and reading back gives the same bytes, chunk by
    /// chunk, for a tensor split into several textures (a cap of 8 weight
    /// rows per chunk) whose chunks end inside a texture row.
    #[test]
    fn texture_layout_round_trips_the_bytes() {
        let row_texels = TEXTURE_WIDTH as usize;
        // 40 rows of k = 4104 bf16 (513 texels per row): 8 rows = 4104
        // texels per chunk, so each chunk is 2 texture rows, the second
        // one partial (8 texels).
        let (rows, k) = (40usize, 4104usize);
        let gpu = crate::testutil::gpu_with_split((8 * k * 2) as u64);
        let bytes: Vec<u8> = (0..rows * k * 2)
            .map(|i| (i * 7 + i / 4099) as u8)
            .collect();
        let t = DeviceTensor::upload_as(
            &gpu,
            "rt.w",
            WDType::Bf16,
            &[rows, k],
            &bytes,
            WeightLayout::Texture,
        )
        .unwrap();
        assert_eq!(t.layout(), WeightLayout::Texture);
        assert_eq!(t.chunks.len(), 5);
        let mut back = Vec::new();
        for c in &t.chunks {
            let ChunkStorage::Texture { texture, .. } = &c.storage else {
                panic!("chunk at row {} is not a texture", c.row_start)
            };
            assert_eq!(texture.width() as usize, row_texels);
            assert_eq!(
                texture.height() as usize,
                (c.rows * k / 8).div_ceil(row_texels)
            );
            back.extend(t.read_chunk_bytes(&gpu, c).unwrap());
        }
        assert!(back == bytes, "texture bytes differ from the uploaded ones");
        // the f32 view agrees with the host conversion (bits: the bytes hold NaNs)
        let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
        assert!(bits(t.read_f32(&gpu).unwrap()) == bits(bf16_bytes_to_f32(&bytes)));
        // a buffer-reading kernel gets an error naming the tensor
        let e = t.chunks[0].buffer(&t.name).unwrap_err().to_string();
        assert!(e.contains("rt.w") && e.contains("texture"), "{e}");
        // tensors the layout cannot hold are refused by name
        for (shape, dt) in [(vec![4, 12], WDType::Bf16), (vec![4, 8], WDType::F32)] {
            let n: usize = shape.iter().product::<usize>() * dt.bytes_per_elem();
            let e = DeviceTensor::upload_as(
                &gpu,
                "rt.bad",
                dt,
                &shape,
                &vec![0; n],
                WeightLayout::Texture,
            )
            .err()
            .unwrap()
            .to_string();
            assert!(e.contains("rt.bad") && e.contains("k % 8"), "{e}");
        }
    }
}
