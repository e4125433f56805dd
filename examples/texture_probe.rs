//! Probe for issue #9: does the bf16 row GEMV read its weights faster
//! through a texture than through a storage buffer on a CPU-type adapter?
//!
//! The kernel is the decode row GEMV exactly as `ops::matmul` assembles it
//! (`gemv_rows.wgsl` + `matmul_xw_vec.wgsl`, TB = 1, k % 8 == 0); the
//! texture variants change only where `w8(gw)` gets its 16 bytes:
//! - `buffer`: `w[gw]` from `array<vec4<u32>>` (what wgllm does);
//! - `rgba32uint`: `textureLoad(t, vec2(gw % W, gw / W), 0)`, one texel =
//!   the same 8 bf16 (texel g = elements 8g..8g+7 of the row-major matrix);
//! - `r32uint`: four texel fetches of one word each (word i at i % W, i / W).
//!
//! Same summation order, so every variant's output must equal the buffer's
//! bit for bit; the probe checks that before timing. Timing: for each shape
//! the variants are run interleaved (one submission of `reps` dispatches
//! each, in turn), `rounds` times; best and median GB/s of weights read.
//!
//! Modes: `decode` (the row GEMV, 1 token, workgroups of `wg`), `batch`
//! (the same kernel with TB = 4 over 4 tokens, batched decode's shape) and
//! `prefill` (`matmul_rowblk.wgsl`, the default 8 rows x 8 tokens block in
//! workgroups of 16, 128 tokens; `wg` ignored).
//!
//! ```text
//! cargo run --release --example texture_probe -- [decode|batch|prefill] [rounds] [wg]
//! ```

use std::time::Instant;

use wgllm::gpu::{Gpu, GpuOptions, Kernel, Step};
use wgllm::ops::matmul::{rowblk_source, Params, RowBlock, SRC_COMMON, SRC_GEMV_ROWS, SRC_XW_VEC};

const BUF_DECL: &str = "@group(0) @binding(3) var<storage, read> w: array<vec4<u32>>;";

#[derive(Clone, Copy, PartialEq, Debug)]
enum Variant {
    Buffer,
    Rgba32Uint,
    R32Uint,
}

const W_LOG2: u32 = 12; // texture width 4096 texels

fn xw_source(v: Variant) -> String {
    let tex = match v {
        Variant::Buffer => return SRC_XW_VEC.to_string(),
        Variant::Rgba32Uint => format!(
            "@group(0) @binding(3) var wt: texture_2d<u32>;\n\
             fn wtex(gw: u32) -> vec4<u32> {{\n\
             \x20   return textureLoad(wt, vec2<u32>(gw & {m}u, gw >> {W_LOG2}u), 0);\n}}",
            m = (1u32 << W_LOG2) - 1
        ),
        Variant::R32Uint => format!(
            "@group(0) @binding(3) var wt: texture_2d<u32>;\n\
             fn wword(i: u32) -> u32 {{\n\
             \x20   return textureLoad(wt, vec2<u32>(i & {m}u, i >> {W_LOG2}u), 0).x;\n}}\n\
             fn wtex(gw: u32) -> vec4<u32> {{\n\
             \x20   let i = 4u * gw;\n\
             \x20   return vec4<u32>(wword(i), wword(i + 1u), wword(i + 2u), wword(i + 3u));\n}}",
            m = (1u32 << W_LOG2) - 1
        ),
    };
    assert!(SRC_XW_VEC.contains(BUF_DECL));
    SRC_XW_VEC
        .replace(BUF_DECL, &tex)
        .replace("w[gw]", "wtex(gw)")
        .replace("w[2u * gw]", "wtex(2u * gw)")
        .replace("w[2u * gw + 1u]", "wtex(2u * gw + 1u)")
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 32) as u32
    }
    fn f32(&mut self, scale: f32) -> f32 {
        (self.next() as f32 / u32::MAX as f32 * 2.0 - 1.0) * scale
    }
}

fn texture_for(gpu: &Gpu, words: &[u32], v: Variant) -> wgpu::Texture {
    let (format, texel_words) = match v {
        Variant::Rgba32Uint => (wgpu::TextureFormat::Rgba32Uint, 4),
        Variant::R32Uint => (wgpu::TextureFormat::R32Uint, 1),
        Variant::Buffer => unreachable!(),
    };
    let width = 1u32 << W_LOG2;
    let texels = words.len() / texel_words;
    let height = texels.div_ceil(width as usize) as u32;
    let lim = gpu.device.limits().max_texture_dimension_2d;
    assert!(
        width <= lim && height <= lim,
        "{width}x{height} over the limit {lim}"
    );
    let mut data = words.to_vec();
    data.resize(width as usize * height as usize * texel_words, 0);
    let size = wgpu::Extent3d {
        width,
        height,
        depth_or_array_layers: 1,
    };
    let tex = gpu.device.create_texture(&wgpu::TextureDescriptor {
        label: Some("probe.w"),
        size,
        mip_level_count: 1,
        sample_count: 1,
        dimension: wgpu::TextureDimension::D2,
        format,
        usage: wgpu::TextureUsages::TEXTURE_BINDING | wgpu::TextureUsages::COPY_DST,
        view_formats: &[],
    });
    gpu.queue.write_texture(
        wgpu::TexelCopyTextureInfo {
            texture: &tex,
            mip_level: 0,
            origin: wgpu::Origin3d::ZERO,
            aspect: wgpu::TextureAspect::All,
        },
        bytemuck::cast_slice(&data),
        wgpu::TexelCopyBufferLayout {
            offset: 0,
            bytes_per_row: Some(width * 4 * texel_words as u32),
            rows_per_image: Some(height),
        },
        size,
    );
    tex
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "decode".into());
    let rounds: usize = args.next().map_or(Ok(7), |s| s.parse())?;
    let wg: u32 = args.next().map_or(Ok(64), |s| s.parse())?;
    let rb = RowBlock::DEFAULT;
    // (tokens, consts, entry source, rows per workgroup, tokens per workgroup)
    let (m, consts, entry, span, tb) = match mode.as_str() {
        "decode" => (
            1u32,
            format!("const WG: u32 = {wg}u;\nconst TB: u32 = 1u;\n"),
            SRC_GEMV_ROWS.to_string(),
            4 * wg,
            1u32,
        ),
        "batch" => (
            4,
            format!("const WG: u32 = {wg}u;\nconst TB: u32 = 4u;\n"),
            SRC_GEMV_ROWS.to_string(),
            4 * wg,
            4,
        ),
        "prefill" => (
            128,
            format!(
                "const WG: u32 = {}u;\nconst TB: u32 = {}u;\nconst RQ: u32 = {}u;\n",
                rb.wg, rb.tb, rb.rq
            ),
            rowblk_source(rb.rq, rb.tb),
            4 * rb.rq * rb.wg,
            rb.tb,
        ),
        _ => return Err(format!("unknown mode {mode}: decode, batch or prefill").into()),
    };
    let gpu = Gpu::new(&GpuOptions::default())?;
    println!(
        "mode {mode} ({m} tokens), adapter: {} ({:?}), max_texture_dimension_2d {}, WG {wg}, \
         texture width {}",
        gpu.name(),
        gpu.adapter.info.backend,
        gpu.device.limits().max_texture_dimension_2d,
        1u32 << W_LOG2
    );
    let shapes: &[(&str, usize, usize)] = &[
        ("smol q/o 576x576", 576, 576),
        ("smol k/v 192x576", 192, 576),
        ("smol gate/up 1536x576", 1536, 576),
        ("smol down 576x1536", 576, 1536),
        ("smol head 49152x576", 49152, 576),
        ("qwen q/o 896x896", 896, 896),
        ("qwen gate/up 4864x896", 4864, 896),
        ("qwen down 896x4864", 896, 4864),
    ];
    let variants = [Variant::Buffer, Variant::Rgba32Uint, Variant::R32Uint];
    let kernels: Vec<Kernel> = variants
        .iter()
        .map(|&v| {
            let src = format!("{consts}{SRC_COMMON}\n{}\n{entry}", xw_source(v));
            gpu.kernel(&format!("probe.{v:?}"), &src, "main", &[("W_BF16", 1.0)])
        })
        .collect::<Result<_, _>>()?;
    let step = gpu.uniform("probe.step", &Step::new(m, 0))?;
    let bias = gpu.storage("probe.bias", 16);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    println!("shape | variant | best GB/s | median GB/s | best ms | vs buffer (best, median)");
    for &(name, n, k) in shapes {
        if m > 4 && n > 8192 {
            continue; // the head is not a prefill matmul (last token only)
        }
        let words: Vec<u32> = (0..n * k / 2)
            .map(|_| {
                let lo = rng.f32(0.05).to_bits() >> 16;
                let hi = rng.f32(0.05).to_bits() >> 16;
                lo | (hi << 16)
            })
            .collect();
        let x: Vec<f32> = (0..m as usize * k).map(|_| rng.f32(1.0)).collect();
        let xb = gpu.storage_init("probe.x", bytemuck::cast_slice(&x))?;
        let wb = gpu.storage_init("probe.wbuf", bytemuck::cast_slice(&words))?;
        let params = gpu.uniform(
            "probe.params",
            &Params {
                k: k as u32,
                n: n as u32,
                row_start: 0,
                rows: n as u32,
                bias_mode: 0,
                _p: [0; 3],
            },
        )?;
        let textures: Vec<Option<wgpu::Texture>> = variants
            .iter()
            .map(|&v| (v != Variant::Buffer).then(|| texture_for(&gpu, &words, v)))
            .collect();
        let views: Vec<Option<wgpu::TextureView>> = textures
            .iter()
            .map(|t| t.as_ref().map(|t| t.create_view(&Default::default())))
            .collect();
        let ys: Vec<wgpu::Buffer> = variants
            .iter()
            .map(|_| gpu.storage("probe.y", (m as usize * n * 4) as u64))
            .collect();
        let binds: Vec<wgpu::BindGroup> = (0..variants.len())
            .map(|i| {
                let w_res = match &views[i] {
                    None => wb.as_entire_binding(),
                    Some(v) => wgpu::BindingResource::TextureView(v),
                };
                let entries = [
                    wgpu::BindGroupEntry {
                        binding: 0,
                        resource: params.as_entire_binding(),
                    },
                    wgpu::BindGroupEntry {
                        binding: 1,
                        resource: step.as_entire_binding(),
                    },
                    wgpu::BindGroupEntry {
                        binding: 2,
                        resource: xb.as_entire_binding(),
                    },
                    wgpu::BindGroupEntry {
                        binding: 3,
                        resource: w_res,
                    },
                    wgpu::BindGroupEntry {
                        binding: 4,
                        resource: bias.as_entire_binding(),
                    },
                    wgpu::BindGroupEntry {
                        binding: 5,
                        resource: ys[i].as_entire_binding(),
                    },
                ];
                gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some("probe"),
                    layout: &kernels[i].layout,
                    entries: &entries,
                })
            })
            .collect();
        let groups = (n as u32).div_ceil(span) * m.div_ceil(tb);
        let bytes = (n * k * 2) as f64;
        // ~64 MB of weights x tokens per submission, at least 1 dispatch
        let reps = ((64e6 / (bytes * m as f64)) as usize).clamp(1, 200);
        let run = |i: usize| -> Result<f64, wgllm::Error> {
            let mut e = gpu.encoder();
            {
                let mut pass = e.begin_compute_pass(&Default::default());
                for _ in 0..reps {
                    gpu.dispatch_in(&mut pass, &kernels[i], &binds[i], groups);
                }
            }
            let t = Instant::now();
            gpu.submit_wait(e)?;
            Ok(t.elapsed().as_secs_f64() / reps as f64)
        };
        // correctness first: same bits as the buffer kernel
        for i in 0..variants.len() {
            run(i)?;
        }
        let y0 = gpu.read_f32(&ys[0], m as usize * n)?;
        for (i, v) in variants.iter().enumerate().skip(1) {
            let yi = gpu.read_f32(&ys[i], m as usize * n)?;
            let same = y0.iter().zip(&yi).all(|(a, b)| a.to_bits() == b.to_bits());
            if !same {
                return Err(format!("{name}: {v:?} output differs from the buffer kernel").into());
            }
        }
        let mut times = vec![vec![]; variants.len()];
        for _ in 0..rounds {
            for (i, t) in times.iter_mut().enumerate() {
                t.push(run(i)?);
            }
        }
        let best0 = times[0].iter().cloned().fold(f64::INFINITY, f64::min);
        let med0 = median(times[0].clone());
        for (i, v) in variants.iter().enumerate() {
            let best = times[i].iter().cloned().fold(f64::INFINITY, f64::min);
            let med = median(times[i].clone());
            println!(
                "{name} | {v:?} | {:.2} | {:.2} | {:.3} | {:.2}x, {:.2}x",
                bytes / best / 1e9,
                bytes / med / 1e9,
                best * 1e3,
                best0 / best,
                med0 / med
            );
        }
    }
    Ok(())
}
