//! A small autotuner for the shader decisions ([`crate::gpu::Decisions`]).
//!
//! For one model's shapes it times each candidate of each tuned kernel alone
//! on the device, picks the fastest and caches the choice as JSON in the
//! wgllm cache folder (`tune.json`), keyed by the adapter's name, backend,
//! driver and driver_info, the kernel and the shape. A load then reads the
//! cache (no timing); only `--tune auto` / `WGLLM_TUNE=auto` without a
//! cache entry, or `wgllm tune`, pays for a tuning run ([`prepare`]).
//!
//! Tuned kernels and their candidates ([`candidates`]):
//! - `weights`: the dense bf16 weight layout (`weights=buffer|texture`,
//!   [`WeightLayout`]), timed as the decode step's linears (GEMV, with the
//!   lm_head) plus the prefill pass's linears per prompt token, each on
//!   weights uploaded in the candidate's layout. First, because `gemv` and
//!   `prefill` are then timed on the layout it chose (a fixture's weights
//!   are always in the layout the candidate's decisions give the model).
//! - `gemv`: the decode GEMV (`gemv`, `gemv_rows_wg`), timed over every
//!   distinct Linear shape of a decoder layer and the lm_head, weighted by
//!   how often a decode step runs it. The fused q/k/v and gate/up decode
//!   kernels take the same variant, so this one choice sets them too.
//! - `prefill`: the many-token matmul (`prefill`, `prefill_tile`), the
//!   layers' shapes at [`PREFILL_TOKENS`] tokens.
//! - `attention`: decode attention (`attention`, `attn_splits`,
//!   `attn_min_split`) for the model's heads at KV lengths [`ATTN_KV`].
//! - `argmax`: the greedy argmax (`argmax_wg`) over the vocabulary.
//!
//! Time is the GPU's own (timestamp queries around the pass) when the
//! adapter has TIMESTAMP_QUERY and they read sensibly, else the wall clock
//! around submit + wait; each candidate runs once to warm up (pipeline
//! compilation, first touch) and then up to [`REPEATS`] times (fewer once
//! its runs add up to half a second), and its median counts. Every candidate is a kernel the parity tests hold to the same
//! tolerances, so the choice changes speed only.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::gpu::{
    attention_name, gemv_name, prefill_name, weights_name, AttentionKernel, DecisionKey, Decisions,
    Gpu, GpuOptions, LinearVariant, PrefillKernel, Step, TuneMode, WeightLayout, TEXTURE_WIDTH,
};
use crate::ops::argmax::Argmax;
use crate::ops::attention::{Attention, Params as AttnParams, Shape};
use crate::ops::kv_copy::{KvCache, Params as KvParams};
use crate::ops::matmul::{Linear, LinearPath, TileConfig};
use crate::tensor::{DeviceTensor, WDType};

/// Timed runs per candidate (after one warm-up); the median counts.
pub const REPEATS: usize = 5;
/// Once a pass's timed runs add up to this many seconds, it stops
/// repeating (at least one timed run): slow candidates on slow devices
/// (a shared-memory GEMV on lavapipe) then cost a few runs, not five.
const PASS_BUDGET_S: f64 = 0.5;
/// Tokens of the prefill matmul's timed runs.
pub const PREFILL_TOKENS: u32 = 64;
/// KV lengths decode attention is timed at (their times are summed: a
/// short and a long context weigh alike).
pub const ATTN_KV: [u32; 2] = [256, 2048];
/// Weight bytes a GEMV timing cycles through at least, so the weights are
/// not all served from the host's last-level cache on CPU devices (a real
/// decode step streams every layer's weights once).
const GEMV_WORKING_SET: usize = 64 << 20;
/// Largest weight (bytes) one timing uploads; a bigger one (an lm_head) is
/// timed on its first rows and the time scaled by the row count.
const MAX_TIMED_WEIGHT: usize = 64 << 20;
/// File name of the cache in the wgllm cache folder.
pub const CACHE_FILE: &str = "tune.json";
/// The cache's format tag.
const FORMAT: &str = "wgllm-tune-1";

/// The tuned kernels, in the order they are tuned and printed.
pub const KERNELS: [&str; 5] = ["weights", "gemv", "prefill", "attention", "argmax"];

/// The decisions a tuned kernel sets.
pub fn kernel_keys(kernel: &str) -> &'static [DecisionKey] {
    match kernel {
        "weights" => &[DecisionKey::Weights],
        "gemv" => &[DecisionKey::Gemv, DecisionKey::GemvRowsWg],
        "prefill" => &[DecisionKey::Prefill, DecisionKey::PrefillTile],
        "attention" => &[
            DecisionKey::Attention,
            DecisionKey::AttnSplits,
            DecisionKey::AttnMinSplit,
        ],
        "argmax" => &[DecisionKey::ArgmaxWg],
        _ => &[],
    }
}

/// The shapes of one model that the tuned kernels run on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelShapes {
    pub wdtype: WDType,
    pub layers: usize,
    /// Distinct (k, n) Linear shapes of one decoder layer, with how many of
    /// the layer's Linears have it.
    pub linears: Vec<(usize, usize, usize)>,
    /// (k, n) of the lm_head.
    pub lm_head: (usize, usize),
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
}

impl ModelShapes {
    pub fn from_config(cfg: &ModelConfig, wdtype: WDType) -> Self {
        let h = cfg.hidden_size;
        let mut linears: Vec<(usize, usize, usize)> = Vec::new();
        for (k, n) in [
            (h, cfg.q_dim()),
            (h, cfg.kv_dim()),
            (h, cfg.kv_dim()),
            (cfg.q_dim(), h),
            (h, cfg.intermediate_size),
            (h, cfg.intermediate_size),
            (cfg.intermediate_size, h),
        ] {
            match linears.iter_mut().find(|(a, b, _)| (*a, *b) == (k, n)) {
                Some(e) => e.2 += 1,
                None => linears.push((k, n, 1)),
            }
        }
        ModelShapes {
            wdtype,
            layers: cfg.num_hidden_layers,
            linears,
            lm_head: (h, cfg.vocab_size),
            n_heads: cfg.num_attention_heads,
            n_kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            vocab: cfg.vocab_size,
        }
    }

    /// The shape part of a cache key for `kernel`.
    pub fn key(&self, kernel: &str) -> String {
        let dt = match self.wdtype {
            WDType::Bf16 => "bf16",
            WDType::F32 => "f32",
        };
        let lin = || {
            let mut v: Vec<String> = self
                .linears
                .iter()
                .map(|(k, n, c)| format!("{k}x{n}*{c}"))
                .collect();
            v.push(format!("head {}x{}", self.lm_head.0, self.lm_head.1));
            format!("{dt} layers {} {}", self.layers, v.join(" "))
        };
        let lin_layers = || {
            let v: Vec<String> = self
                .linears
                .iter()
                .map(|(k, n, c)| format!("{k}x{n}*{c}"))
                .collect();
            format!("{dt} layers {} {}", self.layers, v.join(" "))
        };
        match kernel {
            "weights" => format!("{} tokens {PREFILL_TOKENS}", lin()),
            "gemv" => lin(),
            "prefill" => format!("{} tokens {PREFILL_TOKENS}", lin_layers()),
            "attention" => format!(
                "heads {} kv_heads {} head_dim {} kv {:?}",
                self.n_heads, self.n_kv_heads, self.head_dim, ATTN_KV
            ),
            "argmax" => format!("vocab {}", self.vocab),
            _ => String::new(),
        }
    }
}

// -------------------------------------------------------------- the cache

/// One cached choice.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub adapter: String,
    pub backend: String,
    pub driver: String,
    pub driver_info: String,
    pub kernel: String,
    pub shape: String,
    /// The chosen decisions (`WGLLM_DECISIONS` syntax).
    pub choice: String,
    /// What was timed: (decisions, milliseconds per decode step or pass;
    /// `None` when the candidate failed on this adapter).
    #[serde(default)]
    pub candidates: Vec<(String, Option<f64>)>,
    /// `gpu timestamps` or `wall clock`.
    #[serde(default)]
    pub clock: String,
}

/// The identity of an adapter in the cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdapterKey {
    pub adapter: String,
    pub backend: String,
    pub driver: String,
    pub driver_info: String,
}

impl AdapterKey {
    pub fn of(gpu: &Gpu) -> Self {
        let i = &gpu.adapter.info;
        AdapterKey {
            adapter: i.name.clone(),
            backend: format!("{:?}", i.backend),
            driver: i.driver.clone(),
            driver_info: i.driver_info.clone(),
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct CacheFile {
    format: String,
    entries: Vec<Entry>,
}

/// The tune cache: every entry of one file.
#[derive(Clone, Debug, Default)]
pub struct Cache {
    pub entries: Vec<Entry>,
}

/// `tune.json` in the wgllm cache folder (`fetch::cache_root`).
pub fn cache_path() -> Result<PathBuf> {
    Ok(crate::fetch::cache_root()?.join(CACHE_FILE))
}

impl Cache {
    /// Read `path`. A missing file is an empty cache; a file that is not a
    /// tune cache (bad JSON, another format) is an empty cache and a
    /// warning naming the file (it is rewritten on the next save).
    pub fn load(path: &Path) -> (Cache, Option<String>) {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (Cache::default(), None),
            Err(e) => {
                return (
                    Cache::default(),
                    Some(format!(
                        "tune cache {}: cannot read it ({e}); ignoring it",
                        path.display()
                    )),
                )
            }
        };
        match serde_json::from_str::<CacheFile>(&text) {
            Ok(f) if f.format == FORMAT => (Cache { entries: f.entries }, None),
            Ok(f) => (
                Cache::default(),
                Some(format!(
                    "tune cache {}: format {:?}, expected {FORMAT:?}; ignoring it",
                    path.display(),
                    f.format
                )),
            ),
            Err(e) => (
                Cache::default(),
                Some(format!(
                    "tune cache {}: not a tune cache ({e}); ignoring it",
                    path.display()
                )),
            ),
        }
    }

    /// Write the cache to `path` (through a temporary file and a rename, so
    /// a concurrent reader never sees half a file).
    pub fn save(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let f = CacheFile {
            format: FORMAT.into(),
            entries: self.entries.clone(),
        };
        let text = serde_json::to_string_pretty(&f).expect("plain data serializes");
        let tmp = path.with_extension(format!("json.{}.tmp", std::process::id()));
        std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    }

    /// The entry for this adapter, kernel and shape.
    pub fn find(&self, a: &AdapterKey, kernel: &str, shape: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| {
            e.adapter == a.adapter
                && e.backend == a.backend
                && e.driver == a.driver
                && e.driver_info == a.driver_info
                && e.kernel == kernel
                && e.shape == shape
        })
    }

    /// Add `e`, replacing an entry with the same key.
    pub fn put(&mut self, e: Entry) {
        self.entries.retain(|o| {
            !(o.adapter == e.adapter
                && o.backend == e.backend
                && o.driver == e.driver
                && o.driver_info == e.driver_info
                && o.kernel == e.kernel
                && o.shape == e.shape)
        });
        self.entries.push(e);
    }
}

// ---------------------------------------------------------- the candidates

/// The candidates of `kernel` this adapter can run, the device's current
/// choice (the profile's default on a fresh device) first. Adding a variant is one line here.
pub fn candidates(gpu: &Gpu, kernel: &str) -> Vec<Decisions> {
    let caps = &gpu.caps;
    let mut out: Vec<Decisions> = Vec::new();
    let mut push = |d: Decisions| {
        if !out.contains(&d) {
            out.push(d);
        }
    };
    match kernel {
        "weights" => {
            push(current_decisions(gpu, kernel));
            push(weights_only(WeightLayout::Buffer));
            if texture_weights_readable(gpu) {
                push(weights_only(WeightLayout::Texture));
            }
        }
        "gemv" => {
            push(current_decisions(gpu, kernel));
            for wg in [8, 16, 32, 64, 128, 256] {
                if wg <= caps.max_invocations {
                    push(Decisions {
                        gemv: Some(LinearVariant::RowPerThread),
                        gemv_rows_wg: Some(wg),
                        ..Default::default()
                    });
                }
            }
            if caps.subgroup {
                push(gemv_only(LinearVariant::WorkgroupSubgroup));
            }
            push(gemv_only(LinearVariant::WorkgroupShared));
        }
        "prefill" => {
            push(current_decisions(gpu, kernel));
            push(Decisions {
                prefill: Some(PrefillKernel::RowBlocks),
                ..Default::default()
            });
            for t in TileConfig::candidates() {
                if t.fits_adapter(caps) {
                    push(Decisions {
                        prefill: Some(PrefillKernel::Tiled),
                        prefill_tile: Some(t.bm),
                        ..Default::default()
                    });
                }
            }
        }
        "attention" => {
            push(current_decisions(gpu, kernel));
            let att = |k, splits, min| Decisions {
                attention: Some(k),
                attn_splits: Some(splits),
                attn_min_split: Some(min),
                ..Default::default()
            };
            for (splits, min) in [
                (4, 128),
                (8, 128),
                (16, 128),
                (32, 128),
                (16, 64),
                (16, 256),
            ] {
                push(att(AttentionKernel::Rows, splits, min));
            }
            for (splits, min) in [(8, 1), (32, 1), (64, 1)] {
                push(att(AttentionKernel::Workgroup, splits, min));
            }
        }
        "argmax" => {
            push(current_decisions(gpu, kernel));
            for wg in [64, 128, 256, 512, 1024] {
                if wg <= caps.max_invocations && 20 * wg <= caps.max_workgroup_storage {
                    push(Decisions {
                        argmax_wg: Some(wg),
                        ..Default::default()
                    });
                }
            }
        }
        _ => {}
    }
    out
}

fn weights_only(l: WeightLayout) -> Decisions {
    Decisions {
        weights: Some(l),
        ..Default::default()
    }
}

/// The texture layout is a candidate where the adapter holds a texture row
/// of [`TEXTURE_WIDTH`] texels (`max_texture_dimension_2d`; rgba32uint with
/// TEXTURE_BINDING and `textureLoad` are core WebGPU) and every linear
/// kernel the device runs now reads textures: every GEMV variant and the
/// row-block prefill do (the texture form of `matmul_xw_vec.wgsl`), the
/// tiled prefill (the GPU profile's default) reads buffers only, so there
/// texture is offered only with `prefill=rows` decided.
fn texture_weights_readable(gpu: &Gpu) -> bool {
    gpu.device.limits().max_texture_dimension_2d >= TEXTURE_WIDTH
        && PrefillKernel::for_adapter(&gpu.caps) == PrefillKernel::RowBlocks
}

/// Why `gpu`'s decisions cannot run together, when they cannot: a
/// `weights=texture` decision with a `prefill=tiled` one (the tiled matmul
/// reads weights from buffers only; without a weights decision a tiled
/// prefill gets buffers, [`WeightLayout::for_adapter`]).
pub fn conflict(gpu: &Gpu) -> Option<String> {
    conflict_in(gpu, &Decisions::default())
}

/// [`conflict`] while `cand`, a tuning candidate laid over the device's
/// decisions, is timed (its decisions are named as the candidate's).
fn conflict_in(gpu: &Gpu, cand: &Decisions) -> Option<String> {
    let caps = &gpu.caps;
    let by = |k: DecisionKey| {
        if cand.get(k).is_some() {
            "candidate"
        } else {
            gpu.decision_source(k)
        }
    };
    (WeightLayout::for_adapter(caps) == WeightLayout::Texture
        && PrefillKernel::for_adapter(caps) == PrefillKernel::Tiled)
        .then(|| {
            format!(
                "weights=texture ({}) and prefill=tiled ({}) cannot run together: the tiled \
                 prefill matmul reads weights from buffers only",
                by(DecisionKey::Weights),
                by(DecisionKey::Prefill)
            )
        })
}

/// Settle a [`conflict`] left by the cache (an old cache, a hand edit, or
/// a kernel tuned against another's cached choice): `weights=buffer` unless
/// the weights decision is forced, else `prefill=rows` unless that one is
/// forced. Returns the warning and the kernel changed; `None` when there
/// is no conflict or both are forced (the user's own mix: the model load
/// then names the tensor and the fix).
fn settle_conflict(gpu: &mut Gpu) -> Option<(String, &'static str)> {
    let why = conflict(gpu)?;
    let (fix, kernel) = if !gpu.decision_forced(DecisionKey::Weights) {
        (weights_only(WeightLayout::Buffer), "weights")
    } else if !gpu.decision_forced(DecisionKey::Prefill) {
        (
            Decisions {
                prefill: Some(PrefillKernel::RowBlocks),
                ..Default::default()
            },
            "prefill",
        )
    } else {
        return None;
    };
    gpu.set_decisions(&fix, "fallback");
    Some((format!("{why}; falling back to {fix}"), kernel))
}

fn gemv_only(v: LinearVariant) -> Decisions {
    Decisions {
        gemv: Some(v),
        ..Default::default()
    }
}

/// `kernel`'s decisions as the device makes them now (options, cache or
/// profile), spelled out in full (the profile's defaults on a fresh device
/// without options).
pub fn current_decisions(gpu: &Gpu, kernel: &str) -> Decisions {
    let mut d = Decisions::default();
    for (k, v) in effective(gpu) {
        if kernel_keys(kernel).contains(&k) {
            if let Some(v) = v {
                d.set(k, &v).expect("effective values parse");
            }
        }
    }
    // A row-per-thread GEMV's workgroup matters only for that variant.
    if d.gemv != Some(LinearVariant::RowPerThread) {
        d.gemv_rows_wg = None;
    }
    if d.prefill != Some(PrefillKernel::Tiled) {
        d.prefill_tile = None;
    }
    d
}

/// Every decision's value as the ops will take it on `gpu` (`None`: not
/// applicable, e.g. a tile when no tile fits).
pub fn effective(gpu: &Gpu) -> Vec<(DecisionKey, Option<String>)> {
    let caps = &gpu.caps;
    let shape = Shape::for_gpu(caps);
    DecisionKey::ALL
        .into_iter()
        .map(|k| {
            let v = match k {
                DecisionKey::Gemv => Some(gemv_name(LinearVariant::for_adapter(caps)).to_string()),
                DecisionKey::GemvRowsWg => {
                    Some(LinearVariant::RowPerThread.workgroup(caps).to_string())
                }
                DecisionKey::Prefill => {
                    Some(prefill_name(PrefillKernel::for_adapter(caps)).to_string())
                }
                DecisionKey::PrefillTile => {
                    TileConfig::for_adapter(caps).ok().map(|t| t.bm.to_string())
                }
                DecisionKey::Attention => Some(
                    attention_name(if shape.rows {
                        AttentionKernel::Rows
                    } else {
                        AttentionKernel::Workgroup
                    })
                    .to_string(),
                ),
                DecisionKey::AttnSplits => Some(shape.splits.to_string()),
                DecisionKey::AttnMinSplit => Some(shape.min_split.to_string()),
                DecisionKey::ArgmaxWg => Some(crate::ops::argmax::workgroup(caps).to_string()),
                DecisionKey::Weights => Some(
                    crate::gpu::weights_name(crate::gpu::WeightLayout::for_adapter(caps))
                        .to_string(),
                ),
            };
            (k, v)
        })
        .collect()
}

/// One line per tuned kernel: its effective decisions and what set them,
/// e.g. `gemv: gemv=rows,gemv_rows_wg=64 (cache)`.
pub fn describe(gpu: &Gpu) -> Vec<String> {
    KERNELS
        .iter()
        .map(|kernel| {
            let d = current_decisions(gpu, kernel);
            let mut sources: Vec<&str> = kernel_keys(kernel)
                .iter()
                .filter(|k| d.get(**k).is_some())
                .map(|k| gpu.decision_source(*k))
                .collect();
            sources.dedup();
            format!("{kernel}: {d} ({})", sources.join(", "))
        })
        .collect()
}

// ----------------------------------------------------------------- timing

/// Records the dispatches of one timed pass.
type Record<'a> = dyn FnMut(&mut wgpu::ComputePass<'_>) -> Result<()> + 'a;

/// Median seconds of `record`'s pass over [`REPEATS`] runs after one
/// warm-up (fewer once they add up to [`PASS_BUDGET_S`]), and the clock
/// used.
fn time_pass(gpu: &Gpu, record: &mut Record<'_>) -> Result<(f64, &'static str)> {
    let ts = gpu
        .adapter
        .features
        .contains(wgpu::Features::TIMESTAMP_QUERY)
        .then(|| {
            let set = gpu.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("tune.timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: 2,
            });
            let resolve = gpu.create_buffer(&wgpu::BufferDescriptor {
                label: Some("tune.timestamps.resolve"),
                size: 16,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            (set, resolve)
        });
    let mut gpu_s = Vec::new();
    let mut wall_s = Vec::new();
    for rep in 0..=REPEATS {
        let mut enc = gpu.encoder();
        {
            let timestamp_writes = ts
                .as_ref()
                .map(|(set, _)| wgpu::ComputePassTimestampWrites {
                    query_set: set,
                    beginning_of_pass_write_index: Some(0),
                    end_of_pass_write_index: Some(1),
                });
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("tune"),
                timestamp_writes,
            });
            record(&mut pass)?;
        }
        if let Some((set, resolve)) = &ts {
            enc.resolve_query_set(set, 0..2, resolve, 0);
        }
        let t0 = crate::gpu::now_s();
        gpu.submit_wait(enc)?;
        let wall = crate::gpu::now_s() - t0;
        if rep == 0 {
            continue;
        }
        wall_s.push(wall);
        let last = rep == REPEATS || wall_s.iter().sum::<f64>() >= PASS_BUDGET_S;
        if let Some((_, resolve)) = &ts {
            let q: Vec<u64> = bytemuck::pod_collect_to_vec(&gpu.read_bytes(resolve, 0, 16)?);
            if q[1] > q[0] {
                let period = f64::from(gpu.queue.get_timestamp_period());
                gpu_s.push((q[1] - q[0]) as f64 * period * 1e-9);
            }
        }
        if last {
            break;
        }
    }
    // Timestamps that read zero or beyond the wall clock are not trusted.
    let wall = median(&mut wall_s);
    if !gpu_s.is_empty() && gpu_s.len() == wall_s.len() {
        let g = median(&mut gpu_s);
        if g > 0.0 && g <= wall * 1.5 {
            return Ok((g, "gpu timestamps"));
        }
    }
    Ok((wall, "wall clock"))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Pseudo-random f32 in [-0.5, 0.5) (the tuner needs data, not values).
fn noise(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761).max(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        })
        .collect()
}

/// The weights and activations the linear timings run on, shared by the
/// candidates of a tuned kernel that give the same weight layout. Its
/// weights are uploaded in the layout the model's would get under the
/// device's decisions when it is built ([`WeightLayout::for_tensor`]), so a
/// candidate is timed on the weights it would run on.
pub struct LinearFixture {
    step: wgpu::Buffer,
    tokens: u32,
    /// The device's layout ([`WeightLayout::for_adapter`]) it was built
    /// under.
    layout: WeightLayout,
    /// Per shape: rows timed, the full row count, how often a step runs it,
    /// and copies of the weight (cycled through) with their x and y.
    shapes: Vec<LinearShape>,
}

struct LinearShape {
    n: usize,
    n_full: usize,
    weight: f64,
    weights: Vec<DeviceTensor>,
    x: wgpu::Buffer,
    y: wgpu::Buffer,
}

impl LinearFixture {
    /// The decode GEMV (`tokens` 1) cycles through copies of each weight
    /// and includes the lm_head; the prefill matmul (compute-bound, and the
    /// head runs on one row there) uses one copy of each layer weight.
    pub fn new(gpu: &Gpu, s: &ModelShapes, tokens: u32) -> Result<Self> {
        let es = s.wdtype.bytes_per_elem();
        let decode = tokens == 1;
        let mut all: Vec<(usize, usize, f64)> = s
            .linears
            .iter()
            .map(|&(k, n, c)| (k, n, (c * s.layers) as f64))
            .collect();
        if decode {
            all.push((s.lm_head.0, s.lm_head.1, 1.0));
        }
        let mut shapes = Vec::new();
        for (i, (k, n_full, weight)) in all.into_iter().enumerate() {
            let n = n_full.min((MAX_TIMED_WEIGHT / (k * es)).max(1));
            let copies = if decode {
                GEMV_WORKING_SET.div_ceil(n * k * es).clamp(1, 64)
            } else {
                1
            };
            let wdata = noise(n * k, 7 + i as u32);
            let bytes: Vec<u8> = match s.wdtype {
                WDType::Bf16 => crate::tensor::f32_to_bf16_bytes(&wdata),
                WDType::F32 => bytemuck::cast_slice(&wdata).to_vec(),
            };
            let layout = WeightLayout::for_tensor(&gpu.caps, s.wdtype == WDType::Bf16, &[n, k]);
            let weights = (0..copies)
                .map(|_| DeviceTensor::upload_as(gpu, "tune.w", s.wdtype, &[n, k], &bytes, layout))
                .collect::<Result<Vec<_>>>()?;
            let x = gpu.storage_init(
                "tune.x",
                bytemuck::cast_slice(&noise(tokens as usize * k, i as u32 + 1)),
            )?;
            let y = gpu.storage("tune.y", (tokens as usize * n * 4) as u64);
            shapes.push(LinearShape {
                n,
                n_full,
                weight,
                weights,
                x,
                y,
            });
        }
        gpu.finish_uploads()?;
        Ok(LinearFixture {
            step: gpu.uniform("tune.step", &Step::new(tokens, 0))?,
            tokens,
            layout: WeightLayout::for_adapter(&gpu.caps),
            shapes,
        })
    }

    /// The device layout it was built under.
    pub fn layout(&self) -> WeightLayout {
        self.layout
    }

    /// Tokens of its timed runs (1: the decode GEMV).
    pub fn tokens(&self) -> u32 {
        self.tokens
    }

    /// The layout of every weight it uploaded, one per distinct shape (the
    /// lm_head last in a decode fixture).
    pub fn weight_layouts(&self) -> Vec<WeightLayout> {
        self.shapes
            .iter()
            .flat_map(|sh| sh.weights.iter().map(DeviceTensor::layout))
            .collect()
    }

    /// Seconds of one decode step's (or one prefill pass's) linears with
    /// `gpu`'s current decisions.
    pub fn time(&self, gpu: &Gpu, wdtype: WDType, path: LinearPath) -> Result<(f64, &'static str)> {
        let lin = Linear::new(gpu, wdtype, false)?;
        let mut total = 0.0;
        let mut clock = "gpu timestamps";
        for sh in &self.shapes {
            let binds = sh
                .weights
                .iter()
                .map(|w| lin.bind(gpu, &self.step, &sh.x, w, None, &sh.y))
                .collect::<Result<Vec<_>>>()?;
            let (t, c) = time_pass(gpu, &mut |pass| {
                for b in &binds {
                    lin.encode_path(gpu, pass, b, self.tokens, path)?;
                }
                Ok(())
            })?;
            if c != "gpu timestamps" {
                clock = c;
            }
            total += t / binds.len() as f64 * (sh.n_full as f64 / sh.n as f64) * sh.weight;
        }
        Ok((total, clock))
    }
}

fn time_attention(gpu: &Gpu, s: &ModelShapes) -> Result<(f64, &'static str)> {
    let att = Attention::new(gpu, s.head_dim)?;
    let max_ctx = *ATTN_KV.iter().max().expect("non-empty") as usize;
    let params = AttnParams::new(s.n_heads, s.n_kv_heads, s.head_dim, max_ctx)?;
    let cache = KvCache::new(gpu, KvParams::new(s.n_kv_heads, s.head_dim, max_ctx)?)?;
    let row = s.n_heads * s.head_dim;
    let q = gpu.storage_init("tune.q", bytemuck::cast_slice(&noise(row, 3)))?;
    let out = gpu.storage("tune.attn_out", (row * 4) as u64);
    let mut total = 0.0;
    let mut clock = "gpu timestamps";
    for kv in ATTN_KV {
        let step = gpu.uniform("tune.step", &Step::new(1, kv - 1))?;
        let bind = att.bind(gpu, &params, &step, &q, &cache, &out)?;
        // One decode step's worth: every layer's attention.
        let (t, c) = time_pass(gpu, &mut |pass| {
            for _ in 0..s.layers {
                att.encode(gpu, pass, &bind, &params, 1);
            }
            Ok(())
        })?;
        if c != "gpu timestamps" {
            clock = c;
        }
        total += t;
    }
    Ok((total, clock))
}

fn time_argmax(gpu: &Gpu, s: &ModelShapes) -> Result<(f64, &'static str)> {
    let op = Argmax::new(gpu)?;
    let step = gpu.uniform("tune.step", &Step::new(1, 0))?;
    let logits = gpu.storage_init("tune.logits", bytemuck::cast_slice(&noise(s.vocab, 5)))?;
    let ob = gpu.storage("tune.argmax", 4);
    let sb = gpu.storage("tune.stats", (4 * crate::ops::argmax::STATS_WORDS) as u64);
    let b = op.bind(gpu, &step, &logits, s.vocab, &ob, &sb)?;
    time_pass(gpu, &mut |pass| {
        for _ in 0..8 {
            op.encode(gpu, pass, &b, 1)?;
        }
        Ok(())
    })
    .map(|(t, c)| (t / 8.0, c))
}

/// Tokens of the linear fixtures `kernel`'s timing runs on.
fn fixture_tokens(kernel: &str) -> &'static [u32] {
    match kernel {
        "weights" => &[1, PREFILL_TOKENS],
        "gemv" => &[1],
        "prefill" => &[PREFILL_TOKENS],
        _ => &[],
    }
}

/// The linear fixtures a candidate runs on: those of `kernel` in the
/// layout `gpu`'s decisions give now, built when `have` holds another
/// layout's (which are dropped first: one layout's weights at a time).
fn fixtures_for<'a>(
    gpu: &Gpu,
    kernel: &str,
    s: &ModelShapes,
    have: &'a mut Vec<LinearFixture>,
) -> Result<&'a [LinearFixture]> {
    let layout = WeightLayout::for_adapter(&gpu.caps);
    let want = fixture_tokens(kernel);
    let fits = have.len() == want.len()
        && have
            .iter()
            .zip(want)
            .all(|(f, &t)| f.layout == layout && f.tokens == t);
    if !fits {
        have.clear();
        for &t in want {
            match LinearFixture::new(gpu, s, t) {
                Ok(f) => have.push(f),
                Err(e) => {
                    have.clear();
                    return Err(e);
                }
            }
        }
    }
    Ok(have)
}

/// Seconds of `kernel` on `gpu` with its current decisions, the linear
/// ones on `fixtures` ([`fixtures_for`]).
fn time_kernel(
    gpu: &Gpu,
    kernel: &str,
    s: &ModelShapes,
    fixtures: &[LinearFixture],
) -> Result<(f64, &'static str)> {
    match (kernel, fixtures) {
        ("weights", [decode, prefill]) => {
            if gpu.caps.decisions.weights == Some(WeightLayout::Texture)
                && !decode
                    .weight_layouts()
                    .into_iter()
                    .chain(prefill.weight_layouts())
                    .any(|l| l == WeightLayout::Texture)
            {
                return Err(Error::invalid(
                    "no linear weight of this model takes the texture layout (it holds 2D bf16 \
                     weights with k % 8 == 0 only)",
                ));
            }
            // Per token of both phases: a decode step's linears (the GEMV
            // over every layer and the lm_head) plus a prefill pass's
            // linears divided by its tokens, so a prompt token and a
            // generated token weigh alike. Decode alone would ignore that
            // the layout also changes the prefill kernel's reads (a chat
            // turn's prompt is often as long as its answer); whole passes
            // would let the 64-token prefill outweigh decode 64 to 1.
            let (g, c1) = decode.time(gpu, s.wdtype, LinearPath::Gemv)?;
            let (p, c2) = prefill.time(gpu, s.wdtype, LinearPath::Prefill)?;
            let clock = if c1 == c2 { c1 } else { "wall clock" };
            Ok((g + p / f64::from(PREFILL_TOKENS), clock))
        }
        ("gemv", [f]) => f.time(gpu, s.wdtype, LinearPath::Gemv),
        ("prefill", [f]) => f.time(gpu, s.wdtype, LinearPath::Prefill),
        ("attention", _) => time_attention(gpu, s),
        ("argmax", _) => time_argmax(gpu, s),
        _ => Err(Error::invalid(format!("tune: no kernel '{kernel}'"))),
    }
}

// ------------------------------------------------------------ the tuner

/// What [`prepare`] did for one kernel.
#[derive(Clone, Debug)]
pub struct KernelReport {
    pub kernel: &'static str,
    pub shape: String,
    /// `tuner`, `cache`, `profile` or `fallback` (a cached choice another
    /// kernel's contradicted, [`conflict`]).
    pub source: &'static str,
    pub choice: Decisions,
    /// The candidates' milliseconds, or why one failed (tuner only).
    pub candidates: Vec<(Decisions, std::result::Result<f64, String>)>,
    /// For each candidate of a linear kernel (`weights`, `gemv`,
    /// `prefill`) whose fixtures were built, the weight layout its
    /// decisions gave them (tuner only).
    pub layouts: Vec<(Decisions, WeightLayout)>,
    pub clock: &'static str,
}

/// What [`prepare`] did.
#[derive(Clone, Debug, Default)]
pub struct TuneReport {
    pub mode: Option<TuneMode>,
    pub kernels: Vec<KernelReport>,
    /// Cache problems (a corrupt file, a foreign entry), to show the user.
    pub warnings: Vec<String>,
    pub cache: Option<PathBuf>,
}

/// Time every candidate of `kernel` and return them and the fastest. The
/// device's decisions are restored afterwards.
pub fn tune_kernel(gpu: &mut Gpu, kernel: &'static str, s: &ModelShapes) -> KernelReport {
    let saved = gpu.caps.decisions;
    let mut timed = Vec::new();
    let mut layouts = Vec::new();
    let mut clock = "gpu timestamps";
    let mut fixtures = Vec::new();
    for cand in candidates(gpu, kernel) {
        gpu.caps.decisions = saved.overlaid(&cand);
        // A candidate that contradicts a decision already made (prefill=
        // tiled under weights=texture) is not run.
        let r = match conflict_in(gpu, &cand) {
            Some(why) => Err(Error::invalid(format!("not run: {why}"))),
            None => fixtures_for(gpu, kernel, s, &mut fixtures).and_then(|f| {
                if let Some(first) = f.first() {
                    layouts.push((cand, first.layout()));
                }
                time_kernel(gpu, kernel, s, f)
            }),
        };
        // A failed candidate leaves nothing behind for the next one.
        let health = gpu.check_health();
        let r = match (r, health) {
            (Ok((t, c)), Ok(())) => {
                if c != "gpu timestamps" {
                    clock = c;
                }
                Ok(t * 1e3)
            }
            (Err(e), _) | (_, Err(e)) => Err(e.to_string()),
        };
        timed.push((cand, r));
    }
    gpu.caps.decisions = saved;
    let choice = timed
        .iter()
        .filter_map(|(d, r)| r.as_ref().ok().map(|t| (*d, *t)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(d, _)| d)
        .unwrap_or_else(|| current_decisions(gpu, kernel));
    KernelReport {
        kernel,
        shape: s.key(kernel),
        source: "tuner",
        choice,
        candidates: timed,
        layouts,
        clock,
    }
}

/// Apply the tune cache (and with [`TuneMode::Auto`], a tuning run where it
/// has no entry) to `gpu` for a model of `shapes`, before the model's ops
/// are built. `force` tunes every kernel whatever the cache holds (`wgllm
/// tune`). The cache at `path` is rewritten when anything was tuned.
pub fn prepare_with(
    gpu: &mut Gpu,
    shapes: &ModelShapes,
    mode: TuneMode,
    force: bool,
    path: &Path,
) -> Result<TuneReport> {
    prepare_with_progress(gpu, shapes, mode, force, path, &mut |_| {})
}

/// [`prepare_with`], calling `progress` with each kernel's report as soon
/// as it is decided (a tuning run of a real model takes minutes on a CPU
/// device).
pub fn prepare_with_progress(
    gpu: &mut Gpu,
    shapes: &ModelShapes,
    mode: TuneMode,
    force: bool,
    path: &Path,
    progress: &mut dyn FnMut(&KernelReport),
) -> Result<TuneReport> {
    let mut report = TuneReport {
        mode: Some(mode),
        cache: Some(path.to_path_buf()),
        ..Default::default()
    };
    if mode == TuneMode::Off && !force {
        return Ok(report);
    }
    let (mut cache, warn) = Cache::load(path);
    report.warnings.extend(warn);
    let who = AdapterKey::of(gpu);
    let mut dirty = false;
    // Every usable cached choice is applied before anything is tuned, so a
    // kernel tuned now is timed against the others' cached choices: a
    // missing weights entry under a cached prefill=tiled is tuned with
    // texture ruled out (`conflict_in`), not chosen as texture, overruled
    // by the fallback below, and so warned about again at every load.
    let cached: Vec<Option<Decisions>> = KERNELS
        .iter()
        .map(|&kernel| {
            if force {
                return None;
            }
            let d = cache.find(&who, kernel, &shapes.key(kernel)).and_then(|e| {
                match validate(gpu, kernel, &e.choice) {
                    Ok(d) => Some(d),
                    Err(w) => {
                        report.warnings.push(format!(
                            "tune cache {}: {kernel} entry for '{}': {w}; ignoring it",
                            path.display(),
                            who.adapter
                        ));
                        None
                    }
                }
            });
            if let Some(d) = &d {
                gpu.set_decisions(d, "cache");
            }
            d
        })
        .collect();
    for (kernel, cached) in KERNELS.into_iter().zip(cached) {
        let shape = shapes.key(kernel);
        if let Some(d) = cached {
            report.kernels.push(KernelReport {
                kernel,
                shape,
                source: "cache",
                choice: d,
                candidates: Vec::new(),
                layouts: Vec::new(),
                clock: "",
            });
            progress(report.kernels.last().expect("just pushed"));
            continue;
        }
        if mode != TuneMode::Auto && !force {
            report.kernels.push(KernelReport {
                kernel,
                shape,
                source: "profile",
                choice: current_decisions(gpu, kernel),
                candidates: Vec::new(),
                layouts: Vec::new(),
                clock: "",
            });
            progress(report.kernels.last().expect("just pushed"));
            continue;
        }
        let r = tune_kernel(gpu, kernel, shapes);
        gpu.set_decisions(&r.choice, "tuner");
        cache.put(Entry {
            adapter: who.adapter.clone(),
            backend: who.backend.clone(),
            driver: who.driver.clone(),
            driver_info: who.driver_info.clone(),
            kernel: kernel.into(),
            shape: r.shape.clone(),
            choice: r.choice.to_string(),
            candidates: r
                .candidates
                .iter()
                .map(|(d, t)| (d.to_string(), t.as_ref().ok().copied()))
                .collect(),
            clock: r.clock.into(),
        });
        dirty = true;
        progress(&r);
        report.kernels.push(r);
    }
    // A profile choice reported before a later kernel's cached or tuned
    // one changed it (weights under a cached prefill=tiled) reads as run.
    for k in report.kernels.iter_mut().filter(|k| k.source == "profile") {
        k.choice = current_decisions(gpu, k.kernel);
    }
    // Each kernel's entry is checked on its own above; together a weights
    // and a prefill choice can still contradict each other.
    if let Some((w, kernel)) = settle_conflict(gpu) {
        report
            .warnings
            .push(format!("tune cache {}: {w}", path.display()));
        if let Some(k) = report.kernels.iter_mut().find(|k| k.kernel == kernel) {
            k.choice = current_decisions(gpu, kernel);
            k.source = "fallback";
        }
    }
    if dirty {
        cache.save(path)?;
    }
    Ok(report)
}

/// A cached choice for `kernel`, when it parses, sets only that kernel's
/// decisions and is one of this adapter's candidates.
fn validate(gpu: &Gpu, kernel: &str, choice: &str) -> std::result::Result<Decisions, String> {
    let d: Decisions = choice.parse()?;
    if let Some((k, _)) = d
        .entries()
        .into_iter()
        .find(|(k, _)| !kernel_keys(kernel).contains(k))
    {
        return Err(format!(
            "it sets {}, which is not a {kernel} decision",
            k.name()
        ));
    }
    if !candidates(gpu, kernel).contains(&d) {
        return Err(format!("'{choice}' is not a candidate on this adapter"));
    }
    Ok(d)
}

/// [`prepare_with`] on the model folder `dir` (its config.json) with the
/// mode from `opts` (`GpuOptions::tune`, `WGLLM_TUNE`) and the cache in
/// the wgllm cache folder. A folder without a readable config.json is left
/// to the model loader to report: nothing is tuned then.
pub fn prepare(
    gpu: &mut Gpu,
    opts: &GpuOptions,
    dir: &Path,
    wdtype: WDType,
    force: bool,
    progress: &mut dyn FnMut(&KernelReport),
) -> Result<TuneReport> {
    let (mode, _) = opts.resolve_tune()?;
    if mode == TuneMode::Off && !force {
        return Ok(TuneReport {
            mode: Some(mode),
            ..Default::default()
        });
    }
    let Ok(cfg) = ModelConfig::from_file(dir.join("config.json")) else {
        return Ok(TuneReport {
            mode: Some(mode),
            ..Default::default()
        });
    };
    let shapes = ModelShapes::from_config(&cfg, wdtype);
    let path = match cache_path() {
        Ok(p) => p,
        // No cache folder: tune (when asked) without remembering it.
        Err(e) if !force && mode != TuneMode::Auto => {
            return Ok(TuneReport {
                mode: Some(mode),
                warnings: vec![format!("tune cache: {e}")],
                ..Default::default()
            })
        }
        Err(e) => return Err(e),
    };
    prepare_with_progress(gpu, &shapes, mode, force, &path, progress)
}

/// A [`Gpu`] for the model in `dir` with the tune cache (or tuner) applied:
/// [`Gpu::new`] then [`prepare`].
pub fn gpu_for_model(opts: &GpuOptions, dir: &Path, wdtype: WDType) -> Result<(Gpu, TuneReport)> {
    let mut gpu = Gpu::new(opts)?;
    let report = prepare(&mut gpu, opts, dir, wdtype, false, &mut |_| {})?;
    Ok((gpu, report))
}

/// One kernel's report as text: its candidates' times (when tuned) and the
/// choice with where it came from.
pub fn format_kernel(k: &KernelReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "{} [{}]", k.kernel, k.shape);
    for (d, t) in &k.candidates {
        let mark = if *d == k.choice { " <- chosen" } else { "" };
        // The layout a linear candidate was timed on, when its decisions
        // do not say it.
        let on = match k.layouts.iter().find(|(c, _)| c == d) {
            Some((_, l)) if d.weights.is_none() => format!(" (on {} weights)", weights_name(*l)),
            _ => String::new(),
        };
        match t {
            Ok(ms) => {
                let _ = writeln!(s, "  {ms:>10.3} ms  {d}{on}{mark}");
            }
            Err(e) => {
                let _ = writeln!(s, "      failed  {d}: {e}");
            }
        }
    }
    let clock = if k.clock.is_empty() {
        String::new()
    } else {
        format!(", {}", k.clock)
    };
    let _ = writeln!(s, "  choice: {} ({}{clock})", k.choice, k.source);
    s
}

/// The whole report as text: [`format_kernel`] of each, then the warnings.
pub fn format_report(r: &TuneReport) -> String {
    let mut s: String = r.kernels.iter().map(format_kernel).collect();
    for w in &r.warnings {
        s.push_str(&format!("warning: {w}\n"));
    }
    s
}

/// What a load should tell the user about `r` (stderr): the whole report
/// when something was tuned, else only the warnings; empty when neither.
pub fn load_notes(r: &TuneReport) -> String {
    if r.kernels.iter().any(|k| k.source == "tuner") {
        format_report(r)
    } else {
        r.warnings
            .iter()
            .map(|w| format!("warning: {w}\n"))
            .collect()
    }
}

/// The weight dtype a load with `dtype` puts on the device for the dense
/// Linears the tuner times (f32 when widened, else bf16).
pub fn wdtype_for(dtype: crate::loader::LoadDType) -> WDType {
    match dtype {
        crate::loader::LoadDType::F32 => WDType::F32,
        _ => WDType::Bf16,
    }
}
