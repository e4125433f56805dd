//! Quantized kernels against a CPU reference that uses exactly the values
//! of `gguf::dequant` (the values the CPU reference model and the f32
//! PyTorch reference of a GGUF hold), on seeded random blocks.

use super::*;
use crate::gguf::dequant::dequantize;
use crate::qtensor::GPU_TYPES;
use crate::testutil::{gpu, gpu_with_split, rand_vec};
use rand::{Rng, SeedableRng};

/// Byte offsets of a block's f16 fields (scales, mins).
fn f16_fields(ty: GgmlType) -> &'static [usize] {
    use GgmlType::*;
    match ty {
        Q4_0 | Q5_0 | Q8_0 => &[0],
        Q4_1 | Q5_1 | Q4_K | Q5_K => &[0, 2],
        Q6_K => &[208],
        Q2_K => &[80, 82],
        Q3_K => &[108],
        _ => unreachable!("not a GPU type"),
    }
}

/// Byte offset of the f16 min / dmin of types that add an offset.
fn min_field(ty: GgmlType) -> Option<usize> {
    use GgmlType::*;
    match ty {
        Q4_1 | Q5_1 | Q4_K | Q5_K => Some(2),
        Q2_K => Some(82),
        _ => None,
    }
}

/// Random blocks: random quant bytes, random finite f16 scales of either
/// sign around 1e-2, every 5th block with an f16-subnormal scale.
fn random_blocks(ty: GgmlType, n_blocks: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let ts = ty.type_size();
    let mut b: Vec<u8> = (0..n_blocks * ts).map(|_| rng.random::<u8>()).collect();
    for i in 0..n_blocks {
        for &off in f16_fields(ty) {
            let v = if i % 5 == 3 {
                rng.random_range(-4.0e-5f32..4.0e-5)
            } else {
                rng.random_range(-0.02f32..0.02)
            };
            let h = half::f16::from_f32(v).to_bits().to_le_bytes();
            b[i * ts + off..i * ts + off + 2].copy_from_slice(&h);
        }
    }
    b
}

fn deq(ty: GgmlType, bytes: &[u8]) -> Vec<f32> {
    let mut y = vec![0f32; bytes.len() / ty.type_size() * ty.block_size()];
    dequantize(ty, bytes, &mut y).unwrap();
    y
}

/// |offset| of every element: the dequantized value minus the value with
/// the block's min zeroed (0 for types without an offset).
fn offsets(ty: GgmlType, bytes: &[u8]) -> Vec<f32> {
    let w = deq(ty, bytes);
    let Some(off) = min_field(ty) else {
        return vec![0.0; w.len()];
    };
    let mut z = bytes.to_vec();
    for blk in z.chunks_mut(ty.type_size()) {
        blk[off..off + 2].copy_from_slice(&[0, 0]);
    }
    w.iter()
        .zip(deq(ty, &z))
        .map(|(a, b)| (a - b).abs())
        .collect()
}

/// Worst ratio of |got - want| to the error bound, over all outputs.
/// want is the f64 dot product of x with the dequantized weights (the
/// exact values `gguf::dequant` gives). Bound: (k + 2)·2^-24·(Σ|x w| + |b|)
/// for any f32 summation order and the bias add (the γ_k bound, as in
/// ops::matmul's tests), plus 2^-23·Σ|x|·(|w| + |offset|) for the one
/// dequantization step a device may fuse: `q * d + m` and `d1 * q - m1`
/// computed as one fma differ from the two-rounding value by at most one
/// ulp of the product (|product| <= |w| + |offset|). Any real bug (a wrong
/// nibble, bit, scale or row) is O(1) relative and lands far above 1.
#[allow(clippy::too_many_arguments)]
fn worst_ratio(
    got: &[f32],
    x: &[f32],
    w: &[f32],
    off: &[f32],
    b: Option<&[f32]>,
    m: usize,
    k: usize,
    n: usize,
) -> (f64, usize) {
    let want = crate::ops::matmul::reference(x, w, b, m, k, n);
    assert_eq!(got.len(), want.len());
    let mut worst = (0f64, 0usize);
    for i in 0..m {
        for j in 0..n {
            let mut s = 0f64;
            let mut f = 0f64;
            for t in 0..k {
                let xa = x[i * k + t].abs() as f64;
                s += xa * w[j * k + t].abs() as f64;
                f += xa * (w[j * k + t].abs() as f64 + off[j * k + t] as f64);
            }
            if let Some(b) = b {
                s += b[j].abs() as f64;
            }
            let bound = (k as f64 + 2.0) * 2f64.powi(-24) * s + 2f64.powi(-23) * f + 1e-30;
            let err = (got[i * n + j] as f64 - want[i * n + j] as f64).abs();
            let r = if err.is_nan() {
                f64::INFINITY
            } else {
                err / bound
            };
            if r > worst.0 {
                worst = (r, i * n + j);
            }
        }
    }
    worst
}

/// A bias in one buffer (never split), f32 or bf16.
fn bias_tensor(gpu: &Gpu, n: usize, dt: WDType, seed: u64) -> (Vec<f32>, DeviceTensor) {
    let mut b = rand_vec(n, 1.0, seed);
    if dt == WDType::Bf16 {
        b = crate::tensor::round_bf16(&b);
    }
    let bytes = match dt {
        WDType::Bf16 => crate::tensor::f32_to_bf16_bytes(&b),
        WDType::F32 => bytemuck::cast_slice(&b).to_vec(),
    };
    let t = DeviceTensor {
        name: "b".into(),
        dtype: dt,
        shape: vec![n],
        chunks: vec![crate::tensor::Chunk {
            storage: crate::tensor::ChunkStorage::Buffer(gpu.storage_init("b", &bytes).unwrap()),
            row_start: 0,
            rows: 1,
        }],
    };
    (b, t)
}

/// Run one case and return the worst error ratio.
#[allow(clippy::too_many_arguments)]
fn case(
    gpu: &Gpu,
    lin: &QLinear,
    m: usize,
    k: usize,
    n: usize,
    bias: Option<WDType>,
    prefill: bool,
    seed: u64,
) -> f64 {
    let ty = lin.ty();
    let bytes = random_blocks(ty, n * k / ty.block_size(), seed);
    let w = deq(ty, &bytes);
    let off = offsets(ty, &bytes);
    let x = rand_vec(m * k, 1.0, seed + 1);
    let wt = QTensor::upload(gpu, "w", ty, [n, k], &bytes).unwrap();
    let b = bias.map(|dt| bias_tensor(gpu, n, dt, seed + 2));
    let got = lin
        .run_once(gpu, &x, m, &wt, b.as_ref().map(|(_, t)| t), prefill)
        .unwrap();
    let (r, at) = worst_ratio(&got, &x, &w, &off, b.as_ref().map(|(v, _)| &v[..]), m, k, n);
    let what = format!(
        "{ty} {:?} prefill={prefill} m={m} k={k} n={n} bias={bias:?} chunks={}",
        lin.kernel(),
        wt.chunks.len()
    );
    assert!(r <= 1.0, "{what}: output {at} at {r:.2}x the bound");
    r
}

fn ks(ty: GgmlType) -> &'static [usize] {
    if ty.block_size() == 32 {
        &[32, 96, 896]
    } else {
        &[256, 768]
    }
}

/// n: 1 row, rows that fill no whole workgroup (7), just past one
/// prefill workgroup of the row kernel (65 > 64 x 1 rows), just past one
/// decode workgroup (129 > 32 x 4 rows) and two prefill ones.
const NS: [usize; 4] = [1, 7, 65, 129];

#[test]
fn every_type_both_kernels_decode_and_prefill() {
    let gpu = gpu();
    for (ti, &ty) in GPU_TYPES.iter().enumerate() {
        for kernel in [QKernel::Rows, QKernel::Workgroup] {
            let f = QFaults::default();
            let plain = QLinear::with_kernel(gpu, ty, false, kernel, f).unwrap();
            let biased = QLinear::with_kernel(gpu, ty, true, kernel, f).unwrap();
            for (i, &k) in ks(ty).iter().enumerate() {
                for (j, &n) in NS.iter().enumerate() {
                    let seed = (ti * 1000 + i * 10 + j) as u64;
                    let (lin, bias) = match (i + j) % 3 {
                        0 => (&biased, Some(WDType::F32)),
                        1 => (&biased, Some(WDType::Bf16)),
                        _ => (&plain, None),
                    };
                    for m in [1, 2] {
                        case(gpu, lin, m, k, n, bias, false, seed + m as u64);
                    }
                    // prefill: one partial block of 4 tokens, one exact, one past
                    for m in [3, 4, 9] {
                        case(gpu, lin, m, k, n, bias, true, seed + 7 * m as u64);
                    }
                }
            }
        }
    }
}

#[test]
fn split_weights_every_type() {
    // 65 rows of 2 blocks: a 4-row binding limit (in device bytes) splits
    // them into 16 chunks of 4 and one of 1.
    for &ty in GPU_TYPES {
        let k = 2 * ty.block_size();
        let db = crate::qtensor::BlockPad::of(ty)
            .unwrap()
            .device_block_bytes();
        let g = gpu_with_split((4 * 2 * db) as u64);
        for kernel in [QKernel::Rows, QKernel::Workgroup] {
            let lin = QLinear::with_kernel(&g, ty, true, kernel, QFaults::default()).unwrap();
            case(&g, &lin, 1, k, 65, Some(WDType::F32), false, 3);
            case(&g, &lin, 5, k, 65, Some(WDType::Bf16), true, 4);
        }
        let bytes = random_blocks(ty, 65 * 2, 1);
        let t = QTensor::upload(&g, "w", ty, [65, k], &bytes).unwrap();
        let rows: Vec<usize> = t.chunks.iter().map(|c| c.rows).collect();
        assert_eq!(rows.len(), 17, "{ty}");
        assert_eq!(rows[16], 1, "{ty}");
    }
}

#[test]
fn more_than_65535_workgroups_use_a_2d_grid() {
    let gpu = gpu();
    let lin = QLinear::with_kernel(
        gpu,
        GgmlType::Q8_0,
        false,
        QKernel::Workgroup,
        QFaults::default(),
    )
    .unwrap();
    assert!(70_000 > gpu.caps.max_workgroups_per_dim);
    case(gpu, &lin, 1, 32, 70_000, None, false, 9);
}

#[test]
fn embedding_every_type_equals_dequant() {
    // 40 rows split into chunks of 3: ids in every chunk, repeated, first
    // and last row. Values equal dequant's times the scale exactly on
    // types without an offset; with one, within one ulp of the product
    // (a device may fuse `q * d + m`).
    for &ty in GPU_TYPES {
        let hidden = 2 * ty.block_size();
        let db = crate::qtensor::BlockPad::of(ty)
            .unwrap()
            .device_block_bytes();
        let g = gpu_with_split((3 * 2 * db) as u64);
        let bytes = random_blocks(ty, 40 * 2, 5);
        let table = deq(ty, &bytes);
        let off = offsets(ty, &bytes);
        let t = QTensor::upload(&g, "embed", ty, [40, hidden], &bytes).unwrap();
        assert!(t.chunks.len() > 10);
        let ids = [0u32, 39, 5, 5, 17, 38, 2];
        for scale in [1.0f32, 2.5] {
            let op = QEmbedding::new(&g, ty).unwrap();
            let got = op.run_once(&g, &t, &ids, scale).unwrap();
            for (ti, &id) in ids.iter().enumerate() {
                for c in 0..hidden {
                    let e = id as usize * hidden + c;
                    let want = table[e] * scale;
                    let v = got[ti * hidden + c];
                    let tol = 2f32.powi(-23) * (table[e].abs() + off[e]) * scale;
                    let ok = if min_field(ty).is_some() {
                        (v - want).abs() <= tol
                    } else {
                        v.to_bits() == want.to_bits()
                    };
                    assert!(ok, "{ty} id {id} col {c}: {v} vs {want}");
                }
            }
        }
    }
}

#[test]
fn injected_dequant_bugs_are_caught() {
    // The negative controls: a wrong nibble order (Q4_1, Q4_K) and an f16
    // scale read as f32 (Q8_0, Q6_K) put the result far outside the bound.
    let gpu = gpu();
    let cases = [
        (
            GgmlType::Q4_1,
            QFaults {
                nibble_swap: true,
                ..Default::default()
            },
        ),
        (
            GgmlType::Q4_K,
            QFaults {
                nibble_swap: true,
                ..Default::default()
            },
        ),
        (
            GgmlType::Q8_0,
            QFaults {
                scale_f32: true,
                ..Default::default()
            },
        ),
        (
            GgmlType::Q6_K,
            QFaults {
                scale_f32: true,
                ..Default::default()
            },
        ),
    ];
    for (ty, faults) in cases {
        for kernel in [QKernel::Rows, QKernel::Workgroup] {
            let lin = QLinear::with_kernel(gpu, ty, false, kernel, faults).unwrap();
            let (m, k, n) = (2, 2 * ty.block_size(), 9);
            let bytes = random_blocks(ty, n * k / ty.block_size(), 77);
            let w = deq(ty, &bytes);
            let off = offsets(ty, &bytes);
            let x = rand_vec(m * k, 1.0, 78);
            let wt = QTensor::upload(gpu, "w", ty, [n, k], &bytes).unwrap();
            for prefill in [false, true] {
                let got = lin.run_once(gpu, &x, m, &wt, None, prefill).unwrap();
                let (r, _) = worst_ratio(&got, &x, &w, &off, None, m, k, n);
                assert!(
                    r > 1e3,
                    "{ty} {kernel:?} {faults:?} prefill={prefill}: only {r:.1}x the bound"
                );
            }
        }
    }
}

#[test]
fn kernel_profile_picks_the_shape_and_bad_bindings_are_errors() {
    let gpu = gpu();
    let mut caps = gpu.caps.clone();
    caps.kernels = KernelProfile::CpuDevice;
    assert_eq!(QKernel::for_adapter(&caps), QKernel::Rows);
    caps.kernels = KernelProfile::Gpu;
    assert_eq!(QKernel::for_adapter(&caps), QKernel::Workgroup);

    let lin = QLinear::new(gpu, GgmlType::Q8_0, false).unwrap();
    assert_eq!(lin.kernel(), QKernel::for_adapter(&gpu.caps));
    let step = gpu.uniform("s", &Step::new(1, 0)).unwrap();
    let x = gpu.storage("x", 4 * 64);
    let y = gpu.storage("y", 4 * 8);
    let q4 = QTensor::upload(
        gpu,
        "blk.0.q4",
        GgmlType::Q4_1,
        [8, 64],
        &random_blocks(GgmlType::Q4_1, 16, 1),
    )
    .unwrap();
    let e = lin.bind(gpu, &step, &x, &q4, None, &y).err().unwrap();
    assert!(
        e.to_string().contains("blk.0.q4") && e.to_string().contains("Q4_1"),
        "{e}"
    );
    let q8 = QTensor::upload(
        gpu,
        "blk.0.q8",
        GgmlType::Q8_0,
        [8, 64],
        &random_blocks(GgmlType::Q8_0, 16, 1),
    )
    .unwrap();
    let (_, b) = bias_tensor(gpu, 8, WDType::F32, 1);
    let e = lin.bind(gpu, &step, &x, &q8, Some(&b), &y).err().unwrap();
    assert!(e.to_string().contains("bias"), "{e}");
    let e = QLinear::new(gpu, GgmlType::IQ2_XXS, false).err().unwrap();
    assert!(e.to_string().contains("IQ2_XXS"), "{e}");
}

#[test]
fn batch_path_is_bit_identical_to_the_one_row_kernel() {
    // The slot decode of m rows through the prefill path (one weight pass
    // per PREFILL_TOKENS rows) gives every row the bits the one-token
    // decode kernel gives it: each output is summed from the same
    // dequantized values in the same order in both shapes. Rows past a
    // whole block of PREFILL_TOKENS (5, 9) and a weight split into chunks
    // (65 rows at 4 rows per chunk) included, in both kernel shapes.
    for &ty in GPU_TYPES {
        let k = 2 * ty.block_size();
        let db = crate::qtensor::BlockPad::of(ty)
            .unwrap()
            .device_block_bytes();
        for split in [None, Some((4 * 2 * db) as u64)] {
            let split_gpu;
            let g: &Gpu = match split {
                Some(b) => {
                    split_gpu = gpu_with_split(b);
                    &split_gpu
                }
                None => gpu(),
            };
            let bytes = random_blocks(ty, 65 * 2, 11);
            let wt = QTensor::upload(g, "w", ty, [65, k], &bytes).unwrap();
            assert_eq!(wt.chunks.len() > 1, split.is_some(), "{ty}");
            for kernel in [QKernel::Rows, QKernel::Workgroup] {
                let lin = QLinear::with_kernel(g, ty, false, kernel, QFaults::default()).unwrap();
                for m in [2usize, 3, 4, 5, 9] {
                    let x = rand_vec(m * k, 1.0, 12 + m as u64);
                    let batch = lin.run_once(g, &x, m, &wt, None, true).unwrap();
                    for t in 0..m {
                        let one = lin
                            .run_once(g, &x[t * k..(t + 1) * k], 1, &wt, None, false)
                            .unwrap();
                        let b: Vec<u32> = batch[t * 65..(t + 1) * 65]
                            .iter()
                            .map(|v| v.to_bits())
                            .collect();
                        let o: Vec<u32> = one.iter().map(|v| v.to_bits()).collect();
                        assert_eq!(b, o, "{ty} {kernel:?} split={split:?} m={m} row {t}");
                    }
                }
            }
        }
    }
}
