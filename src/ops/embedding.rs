//! Embedding gather from a (possibly row-split) table, widened to f32 and
//! multiplied by a scale (1 for most families; Gemma's `sqrt(hidden)`).

use crate::error::{Error, Result};
use std::sync::OnceLock;

use crate::gpu::{Gpu, Kernel, TEXTURE_WIDTH};
use crate::tensor::{DeviceTensor, WDType, WeightLayout};

pub const SRC: &str = include_str!("../../shaders/embedding.wgsl");
const WG: u32 = 256;

#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Params {
    pub hidden: u32,
    pub row_start: u32,
    pub rows: u32,
    /// Every gathered value is multiplied by this (one f32 product, as
    /// `embedding * embed_scale` in torch; 1.0 leaves values exact).
    pub scale: f32,
}

pub struct Embedding {
    pub kernel: Kernel,
    pub dtype: WDType,
    /// The gather on a texture table ([`WeightLayout::Texture`]: a tied
    /// embedding the lm_head reads as a texture), built on first use.
    tex: OnceLock<Kernel>,
}

/// `embedding.wgsl` reading its bf16 table from an `rgba32uint` texture:
/// word i of the chunk is component i % 4 of texel i / 4 (the texture
/// layout of `tensor`), so every value gathered is the same bits.
pub fn texture_source() -> String {
    let decl = "@group(0) @binding(3) var<storage, read> table: array<u32>;";
    debug_assert!(SRC.contains(decl) && SRC.contains("table[e >> 1u]"));
    let shift = TEXTURE_WIDTH.trailing_zeros();
    SRC.replace(
        decl,
        &format!(
            "@group(0) @binding(3) var table: texture_2d<u32>;\n\
             fn word(i: u32) -> u32 {{\n\
             \x20   let g = i >> 2u;\n\
             \x20   return textureLoad(table, vec2<u32>(g & {m}u, g >> {shift}u), 0)[i & 3u];\n}}",
            m = TEXTURE_WIDTH - 1
        ),
    )
    .replace("table[e >> 1u]", "word(e >> 1u)")
    .replace("bitcast<f32>(table[e])", "bitcast<f32>(word(e))")
}

/// Bind groups (one per table chunk) and their params, built at load.
pub struct EmbeddingBinding {
    /// The kernel the groups were made for (buffer or texture table).
    pub kernel: Kernel,
    pub groups: Vec<wgpu::BindGroup>,
    pub params: Vec<wgpu::Buffer>,
    pub hidden: usize,
}

impl Embedding {
    pub fn new(gpu: &Gpu, dtype: WDType) -> Result<Self> {
        let kernel = gpu.kernel(
            "embedding",
            SRC,
            "main",
            &[("WG", WG as f64), ("W_BF16", dtype.is_bf16_const())],
        )?;
        Ok(Embedding {
            kernel,
            dtype,
            tex: OnceLock::new(),
        })
    }

    /// Bindings for `ids` (u32 `[n_tokens]`) → `y` (f32 `[n_tokens, hidden]`),
    /// rows multiplied by `scale`.
    pub fn bind(
        &self,
        gpu: &Gpu,
        step: &wgpu::Buffer,
        ids: &wgpu::Buffer,
        table: &DeviceTensor,
        scale: f32,
        y: &wgpu::Buffer,
    ) -> Result<EmbeddingBinding> {
        if table.dtype != self.dtype || table.shape.len() != 2 {
            return Err(Error::invalid(format!(
                "embedding `{}`: expected a 2D {:?} table, got {:?} {:?}",
                table.name, self.dtype, table.shape, table.dtype
            )));
        }
        let hidden = table.cols();
        let kernel = if table.layout() == WeightLayout::Texture {
            if let Some(k) = self.tex.get() {
                k.clone()
            } else {
                let k = gpu.kernel(
                    "embedding.tex",
                    &texture_source(),
                    "main",
                    &[("WG", WG as f64), ("W_BF16", self.dtype.is_bf16_const())],
                )?;
                self.tex.get_or_init(|| k).clone()
            }
        } else {
            self.kernel.clone()
        };
        let mut groups = Vec::new();
        let mut params = Vec::new();
        for c in &table.chunks {
            let p = gpu.uniform(
                "embedding.params",
                &Params {
                    hidden: hidden as u32,
                    row_start: c.row_start as u32,
                    rows: c.rows as u32,
                    scale,
                },
            )?;
            groups.push(gpu.bind_resources(
                &kernel,
                &[
                    (0, p.as_entire_binding()),
                    (1, step.as_entire_binding()),
                    (2, ids.as_entire_binding()),
                    (3, c.resource()),
                    (4, y.as_entire_binding()),
                ],
            ));
            params.push(p);
        }
        Ok(EmbeddingBinding {
            kernel,
            groups,
            params,
            hidden,
        })
    }

    /// One dispatch per table chunk; every output element is written by
    /// exactly the chunk that holds its token's row.
    pub fn encode(
        &self,
        gpu: &Gpu,
        pass: &mut wgpu::ComputePass<'_>,
        binding: &EmbeddingBinding,
        n_tokens: u32,
    ) {
        let n = (n_tokens as usize * binding.hidden).div_ceil(WG as usize) as u32;
        for g in &binding.groups {
            gpu.dispatch_in(pass, &binding.kernel, g, n);
        }
    }
}

/// CPU reference: rows of `table` (`[vocab, hidden]`) for each id, times
/// `scale`.
pub fn reference(table: &[f32], hidden: usize, ids: &[u32], scale: f32) -> Vec<f32> {
    ids.iter()
        .flat_map(|&id| {
            let r = id as usize * hidden;
            table[r..r + hidden].iter().map(move |v| v * scale)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::Step;
    use crate::tensor::round_bf16;
    use crate::testutil::{gpu, gpu_with_split, rand_vec};

    fn run(gpu: &Gpu, vocab: usize, hidden: usize, ids: &[u32], dtype: WDType) -> usize {
        run_scaled(gpu, vocab, hidden, ids, dtype, 1.0)
    }

    fn run_scaled(
        gpu: &Gpu,
        vocab: usize,
        hidden: usize,
        ids: &[u32],
        dtype: WDType,
        scale: f32,
    ) -> usize {
        let mut table = rand_vec(vocab * hidden, 2.0, (vocab * 31 + hidden) as u64);
        if dtype == WDType::Bf16 {
            table = round_bf16(&table);
        }
        let t = DeviceTensor::from_f32(gpu, "embed", dtype, &[vocab, hidden], &table).unwrap();
        let op = Embedding::new(gpu, dtype).unwrap();
        let step = gpu
            .uniform("step", &Step::new(ids.len() as u32, 0))
            .unwrap();
        let idb = gpu.storage_init("ids", bytemuck::cast_slice(ids)).unwrap();
        let yb = gpu.storage("y", (ids.len() * hidden * 4) as u64);
        let b = op.bind(gpu, &step, &idb, &t, scale, &yb).unwrap();
        let mut enc = gpu.encoder();
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            op.encode(gpu, &mut pass, &b, ids.len() as u32);
        }
        gpu.submit_wait(enc).unwrap();
        let got = gpu.read_f32(&yb, ids.len() * hidden).unwrap();
        // A gather is a copy (bf16 widening is exact) and the scale one
        // correctly rounded f32 product on both sides: bit-for-bit equality.
        assert_eq!(
            got,
            reference(&table, hidden, ids, scale),
            "embedding {vocab}x{hidden} {dtype:?}"
        );
        t.chunks.len()
    }

    #[test]
    fn gathers_rows() {
        let g = gpu();
        for dtype in [WDType::Bf16, WDType::F32] {
            run(g, 10, 1, &[0, 9, 3], dtype);
            run(g, 100, 7, &[5, 99, 0, 5, 42], dtype);
            run(g, 300, 64, &[299, 1, 150], dtype);
        }
    }

    #[test]
    fn scaled_rows() {
        // Gemma: sqrt(hidden) as f32.
        run_scaled(
            gpu(),
            50,
            24,
            &[3, 49, 0],
            WDType::Bf16,
            (24f64).sqrt() as f32,
        );
    }

    #[test]
    fn split_table_is_gathered_across_chunks() {
        // 64-byte bindings force many chunks: 7-wide bf16 rows go two at a time
        // (28 bytes; odd element counts need pairs), f32 rows of 5 three at a time.
        let g = gpu_with_split(64);
        let ids: Vec<u32> = vec![0, 1, 2, 37, 38, 39, 12, 13, 0];
        assert!(run(&g, 40, 7, &ids, WDType::Bf16) >= 10);
        assert!(run(&g, 40, 5, &ids, WDType::F32) >= 10);
    }

    #[test]
    fn vocab_over_65535_rows() {
        let g = gpu();
        let ids = [0u32, 65535, 65536, 69999];
        run(g, 70000, 4, &ids, WDType::Bf16);
    }
}
