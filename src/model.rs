//! The GPU model: weights, preallocated activations and KV cache, the
//! [`Program`]'s ops bound once at load, and the per-step command stream
//! (the program's ops in order, one submission per step) with optional taps
//! read back for verification.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::AtomicU8;
#[cfg(not(target_arch = "wasm32"))]
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::gguf::GgmlType;
use crate::gpu::{Gpu, Step};
use crate::loader::{Checkpoint, LayerRole, LoadDType, MemoryPlan, Role, WTensor, Weights};
use crate::ops::argmax::{Argmax, ArgmaxBinding, RowStats, STATS_WORDS};
use crate::ops::attention::{self, Attention};
use crate::ops::elementwise::{self, AddRmsNorm, Binary, Elementwise, Softcap};
use crate::ops::embedding::{Embedding, EmbeddingBinding};
use crate::ops::fused::{self, Fused};
use crate::ops::kv_copy::{self, KvCache, KvCopy};
use crate::ops::matmul::{Linear, LinearBinding, LinearPath};
use crate::ops::qmatmul::{
    QEmbedding, QEmbeddingBinding, QFaults, QKernel, QLinear, QLinearBinding,
};
use crate::ops::rmsnorm::{self, RmsNorm};
use crate::ops::rope::{self, Rope, RopeKv, RopeTables};
use crate::ops::sample::{Candidates, TopK, TopKBinding};
use crate::ops::sample_full::{Draw, GpuSampler, Picked, SampleBinding};
use crate::program::{attention_params, Activation, Buf, Op, OpKind, Program, RopeTable, Scope};
use crate::taps::TapSet;
use crate::tensor::{DeviceTensor, WDType};

/// Deliberate bugs for proving that `verify` catches real porting mistakes.
/// Test-only: not reachable from the CLI. Weight faults are applied to the
/// uploaded weights; program faults edit the GPU model's [`Program`] (an op
/// dropped, a convention or parameter misread); kernel faults compile a
/// wrong kernel variant (see ARCHITECTURE.md "Fault injection").
#[doc(hidden)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// q_proj and o_proj data transposed (shape unchanged: square matrices).
    pub transpose_qo: bool,
    /// k_proj and v_proj data transposed and read with the original shape.
    pub transpose_kv: bool,
    /// RoPE on interleaved pairs (2i, 2i+1) instead of rotate_half.
    pub rope_interleaved: bool,
    /// Query head h reads KV head h % n_kv_heads instead of h / group.
    pub gqa_modulo: bool,
    /// RMSNorm with eps outside the sqrt: x / (sqrt(mean) + eps).
    pub norm_eps_outside: bool,
    /// RMSNorm weight applied as (1 + w) (Gemma's convention, in a family
    /// that applies w).
    pub norm_one_plus_w: bool,
    /// Gemma's (1 + w) RMSNorm weight applied as w.
    pub norm_plain_w: bool,
    /// q/k/v projection biases dropped.
    pub drop_qkv_bias: bool,
    /// The per-head q/k RMSNorm forgotten (Qwen3, Gemma 3).
    pub drop_qk_norm: bool,
    /// The sliding window ignored: every layer attends to the whole cache.
    pub ignore_window: bool,
    /// Quantized linear kernels read each byte's nibbles in the wrong order
    /// (a kernel pipeline constant, `ops::qmatmul::QFaults`).
    pub q_nibble_swap: bool,
    /// Quantized linear kernels read a block's f16 scale as f32 bits.
    pub q_scale_f32: bool,
}

#[derive(Clone, Debug)]
pub struct ModelOptions {
    /// KV cache length; default: the config's max_position_embeddings,
    /// capped at 4096 and by what one storage binding can hold.
    pub max_context: Option<usize>,
    /// Positions the caller knows it will use at most (a one-shot prompt
    /// plus its max new tokens). With `max_context` unset, the default
    /// context is capped by it, so a short `run` does not allocate and
    /// zero a 4096-position KV cache. Ignored when `max_context` is set.
    pub context_hint: Option<usize>,
    /// Most tokens in one prefill pass (longer prompts go in chunks).
    pub max_batch: usize,
    pub dtype: LoadDType,
    /// Independent sequences (KV cache regions) the model holds; slot 0 is
    /// the single sequence of `forward_*` (see [`Model::decode_batch`]).
    pub slots: usize,
    #[doc(hidden)]
    pub faults: Faults,
}

impl Default for ModelOptions {
    fn default() -> Self {
        ModelOptions {
            max_context: None,
            context_hint: None,
            max_batch: 128,
            dtype: LoadDType::Auto,
            slots: 1,
            faults: Faults::default(),
        }
    }
}

/// The KV cache length `opts` asks for: `max_context` as given, else the
/// config's `max_position_embeddings` capped at 4096, by what one binding
/// holds for `opts.slots` regions, and by `context_hint`. The memory plan
/// checks the same figure the model then allocates.
fn kv_context(cfg: &ModelConfig, caps: &crate::gpu::Caps, opts: &ModelOptions) -> usize {
    let per_pos = (cfg.num_key_value_heads * cfg.head_dim * 4 * opts.slots.max(1)) as u64;
    match opts.max_context {
        Some(c) => c,
        None => cfg
            .max_position_embeddings
            .clamp(1, 4096)
            .min((caps.max_binding / per_pos.max(1)) as usize)
            .min(opts.context_hint.unwrap_or(usize::MAX).max(1)),
    }
}

/// The projections `WGLLM_DOT2` names for the opt-in Dot2 prefill kernels
/// (issue #14; ARCHITECTURE.md, "Dot2 for chosen projections"): a
/// comma-separated list of Q, K, V, O, Gate, Up, Down and Head (the LM
/// head); unset or empty is none, and any other name is an error naming the
/// variable and the allowed names.
fn dot2_roles() -> Result<Vec<String>> {
    const NAMES: [&str; 8] = ["Q", "K", "V", "O", "Gate", "Up", "Down", "Head"];
    let sel = std::env::var("WGLLM_DOT2").unwrap_or_default();
    sel.split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(|n| {
            NAMES
                .iter()
                .find(|a| a.eq_ignore_ascii_case(n))
                .map(|a| a.to_string())
                .ok_or_else(|| {
                    Error::invalid(format!(
                        "WGLLM_DOT2: '{n}' is not a projection; expected a comma-separated list of {}",
                        NAMES.join(", ")
                    ))
                })
        })
        .collect()
}

/// What a generation step reads back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Readback {
    /// The argmax token id (4 bytes).
    NextId,
    /// The last token's logits.
    Logits,
    /// The sampling candidates of the last token's logits, and their
    /// finiteness (see [`Model::forward_candidates`]).
    Candidates,
    /// The GPU sampler's pick and the last row's finiteness (see
    /// [`Model::forward_sampled`]).
    Sampled,
}

/// Which logits a pass computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token's (generation).
    Last,
    /// Every token's (verification; limited to `logits_rows` tokens).
    All,
}

/// A kernel cache keyed by what the kernel was compiled for.
struct Cache<K, T>(Vec<(K, T)>);

impl<K: PartialEq + Copy, T> Cache<K, T> {
    fn get_or(&mut self, key: K, make: impl FnOnce() -> Result<T>) -> Result<&T> {
        if let Some(i) = self.0.iter().position(|(k, _)| *k == key) {
            return Ok(&self.0[i].1);
        }
        self.0.push((key, make()?));
        Ok(&self.0.last().expect("pushed").1)
    }
    fn get(&self, key: K) -> &T {
        &self
            .0
            .iter()
            .find(|(k, _)| *k == key)
            .expect("built at load")
            .1
    }
}

/// Kernels, compiled at load for the variants the program meets.
struct Kernels {
    /// By (weight dtype, unit offset).
    norm: Cache<(WDType, bool), RmsNorm>,
    /// By (weight dtype, has bias).
    linear: Cache<(WDType, bool, bool), Linear>,
    /// Over quantized weights, by (ggml type, has bias).
    qlinear: Cache<(GgmlType, bool), QLinear>,
    embed: EmbedKernel,
    rope: Rope,
    rope_kv: RopeKv,
    attention: Attention,
    kv_copy: KvCopy,
    /// The position-aware kernels for slot steps (each row at its own
    /// position in its own KV slot; `kv_copy::rows_prelude`).
    rope_b: Rope,
    rope_kv_b: RopeKv,
    attention_b: Attention,
    kv_copy_b: KvCopy,
    glu: Cache<Activation, Elementwise>,
    add: Elementwise,
    /// By (weight dtype, unit offset).
    add_norm: Cache<(WDType, bool), AddRmsNorm>,
    softcap: Cache<(), Softcap>,
    argmax: Argmax,
    faults: Faults,
    /// Sampling candidates (`ops::sample`), after the last-row argmax.
    topk: TopK,
    /// Whole sampling on the GPU (`ops::sample_full`), after the argmax.
    sampler: GpuSampler,
}

/// The embedding gather for the table's type.
enum EmbedKernel {
    Dense(Embedding),
    Quant(QEmbedding),
}

enum EmbedBinding {
    Dense(EmbeddingBinding),
    Quant(QEmbeddingBinding),
}

/// One program op with its kernel variant, bind group and static sizes.
enum Bound {
    Embed(EmbedBinding),
    Norm {
        key: (WDType, bool),
        bg: wgpu::BindGroup,
        rows_per_token: u32,
    },
    Linear {
        key: (WDType, bool, bool),
        b: LinearBinding,
    },
    /// A linear op whose weight is quantized.
    QLinear {
        key: (GgmlType, bool),
        b: QLinearBinding,
    },
    /// `bat`: the same op for slot steps (binds the batched step).
    Rope {
        bg: wgpu::BindGroup,
        bat: wgpu::BindGroup,
        params: rope::Params,
    },
    KvAppend {
        bg: wgpu::BindGroup,
        bat: wgpu::BindGroup,
    },
    Attention {
        bg: attention::Binding,
        bat: attention::Binding,
        params: attention::Params,
    },
    Glu {
        act: Activation,
        bg: wgpu::BindGroup,
        width: usize,
    },
    Add {
        bg: wgpu::BindGroup,
        width: usize,
    },
    Softcap {
        bg: wgpu::BindGroup,
        width: usize,
    },
    /// Buffer copy (indices into `Buffers::acts`), bytes per token.
    Copy {
        x: usize,
        y: usize,
        row_bytes: u64,
    },
}

/// One item of a layer's fast path (recording without taps): a program op
/// as bound, or several consecutive ops done by one fused kernel.
enum Fast {
    /// `layers[i][j]`.
    Op(usize),
    /// RoPE of q, RoPE of k and the KV append (three program ops).
    RopeKv {
        bg: wgpu::BindGroup,
        /// For slot steps.
        bat: wgpu::BindGroup,
        params: rope::KvParams,
        info: StepOp,
    },
    /// A residual add and the RMSNorm of its sum (two program ops).
    AddNorm {
        key: (WDType, bool),
        bg: wgpu::BindGroup,
        info: StepOp,
    },
    /// The q, k and v projections, RoPE of q and k and the KV append (six
    /// program ops) in one dispatch, for one-token steps of the single
    /// sequence; other passes record `fallback` (the three linear ops and
    /// their [`Fast::RopeKv`]).
    QkvRope {
        f: Fused,
        fallback: Vec<Fast>,
        info: StepOp,
    },
    /// The gate and up projections and the GLU (three program ops) in one
    /// dispatch, for one-token steps of the single sequence; other passes
    /// record `fallback` (the three ops).
    GateUp {
        f: Fused,
        fallback: Vec<Fast>,
        info: StepOp,
    },
}

impl Fast {
    /// What the bench reports of a fused item (None for a plain op).
    fn info(&self) -> Option<&StepOp> {
        match self {
            Fast::Op(_) => None,
            Fast::RopeKv { info, .. }
            | Fast::AddNorm { info, .. }
            | Fast::QkvRope { info, .. }
            | Fast::GateUp { info, .. } => Some(info),
        }
    }

    /// Whether a pass of `n` tokens in `mode` records this item's fused
    /// kernel (else its fallback ops; only the one-token fusions have one).
    fn fused_for(&self, n: u32, mode: Mode) -> bool {
        match self {
            Fast::QkvRope { .. } | Fast::GateUp { .. } => n == 1 && mode == Mode::Seq,
            _ => true,
        }
    }
}

/// An item of a decode step: a bound op or a fused kernel.
enum Item<'a> {
    Op(&'a BoundOp),
    /// Never `Fast::Op` (resolved to `Op`).
    Fused(&'a Fast, &'a StepOp),
}

/// A bound op, the tap it feeds and what the bench reports of it.
struct BoundOp {
    bound: Bound,
    /// (full tap name, buffer index, floats per token).
    tap: Option<(String, usize, usize)>,
    info: StepOp,
}

/// One op of a decode step as the bench reports it.
#[doc(hidden)]
#[derive(Clone, Debug)]
pub struct StepOp {
    /// The op's kind (`q_proj`, `rmsnorm`, `attention`, ...).
    pub class: &'static str,
    /// Dispatches it records.
    pub dispatches: usize,
    /// Weight bytes it reads (one row of the embedding table).
    pub weight_bytes: u64,
    /// KV-cache bytes it reads per cached position (attention).
    pub kv_bytes_per_position: u64,
    /// The attention window (at most this many positions read); 0 = none.
    pub window: usize,
}

/// How a pass places its rows (see [`Model::decode_batch`]).
#[cfg_attr(target_arch = "wasm32", allow(dead_code))] // slot passes are native-only
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// The single sequence: row t at position `pos_offset + t` of slot 0.
    Seq,
    /// Rows of one slot's prefill, placed by the batched step; the same
    /// kernel paths as `Seq` for the same token count.
    SlotPrefill,
    /// One row per sequence (a batched decode step): every per-row
    /// reduction in the order of a one-row step, whatever the batch.
    SlotDecode,
}

/// Activation buffers, sized for `max_batch` tokens.
#[cfg_attr(target_arch = "wasm32", allow(dead_code))] // slot passes are native-only
struct Buffers {
    step: wgpu::Buffer,
    /// The batched step of slot passes (`kv_copy::rows_prelude`): a `Step`,
    /// then (slot, position) per row, for up to `max_rows` rows.
    bstep: wgpu::Buffer,
    max_rows: u32,
    /// Logits of a batched decode step, `[slots, vocab]` (rows asked for
    /// or left to the host, compacted, in a sampled step).
    batch_logits_staging: wgpu::Buffer,
    /// A batched sampled step's argmax of every row and each row's
    /// [`RowStats`] (`[slots]`, `[slots, STATS_WORDS]`), and the readback
    /// of those and of the sampled rows' picks (see
    /// [`Model::decode_batch_picks`]).
    #[cfg_attr(target_arch = "wasm32", allow(dead_code))] // slot passes are native-only
    batch_next: wgpu::Buffer,
    #[cfg_attr(target_arch = "wasm32", allow(dead_code))]
    batch_stats: wgpu::Buffer,
    #[cfg_attr(target_arch = "wasm32", allow(dead_code))]
    picks_staging: wgpu::Buffer,
    step_one: wgpu::Buffer,
    ids: wgpu::Buffer,
    /// Every program buffer, plus the residual stream's two halves and the
    /// last-row copy (`h0`, `h1`, `last`).
    acts: Vec<wgpu::Buffer>,
    /// Per buffer of `acts`: the float offset of its rows' low halves when
    /// it holds the residual stream as (hi, lo), else 0.
    lo: Vec<u32>,
    /// Index in `acts` of each program buffer (the residual stream aside).
    index: HashMap<Buf, usize>,
    h: [usize; 2],
    last: usize,
    next: wgpu::Buffer,
    /// The last row's [`RowStats`] words, written by the argmax with `next`.
    next_stats: wgpu::Buffer,
    /// Persistent readback buffers for generation (no per-token allocation).
    next_staging: wgpu::Buffer,
    logits_staging: wgpu::Buffer,
    /// The candidate kernel's output and the last row's stats after it.
    cand_staging: wgpu::Buffer,
    /// Uniforms of the bind groups (kept alive here).
    params: Vec<wgpu::Buffer>,
    /// `Step::new(1, p)` for every position `p` of the cache: a pipelined
    /// decode step copies its entry into `step` (and into `step_one` on the
    /// op-by-op path, whose last-row head binds it) on the GPU, so no host
    /// write is needed per token.
    #[cfg_attr(target_arch = "wasm32", allow(dead_code))]
    // the pipelined decode is native-only
    steps: wgpu::Buffer,
    /// Ring of 4-byte staging buffers the pipelined decode reads token ids
    /// back through, with each slot's map state (see [`MapState`]).
    #[cfg_attr(target_arch = "wasm32", allow(dead_code))]
    // the pipelined decode is native-only
    ring: Vec<wgpu::Buffer>,
    #[cfg_attr(target_arch = "wasm32", allow(dead_code))] // the pipelined decode is native-only
    ring_state: Vec<Arc<AtomicU8>>,
    /// The submission each ring slot's map waits on (its step's), so that
    /// [`Model::wait_ring`] waits for that step and not for the steps
    /// submitted after it.
    #[cfg_attr(target_arch = "wasm32", allow(dead_code))]
    // the pipelined decode is native-only
    ring_sub: Vec<std::sync::Mutex<Option<wgpu::SubmissionIndex>>>,
    /// Each ring slot's copy of its step's logits row, for a sampled step
    /// the GPU left to the host (see [`Model::decode_sampled`]).
    #[cfg_attr(target_arch = "wasm32", allow(dead_code))]
    // the pipelined decode is native-only
    ring_rows: Vec<wgpu::Buffer>,
}

/// Slots in the token readback ring: more than any decode depth.
const RING: usize = 8;
/// How long a ring slot's map may stay pending after the device poll that
/// finished its step (see [`Model::wait_ring`]); far above any scheduling
/// delay, short of a hang.
#[cfg(not(target_arch = "wasm32"))]
const RING_MAP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Steps the pipelined greedy decode keeps in flight by default.
pub const DECODE_DEPTH: usize = 3;
/// Bytes of a row's argmax [`RowStats`] words, and of an id followed by
/// them (what a generation step reads back).
const STATS_BYTES: u64 = 4 * STATS_WORDS as u64;
const ID_STATS_BYTES: u64 = 4 + STATS_BYTES;
/// Bytes of the candidate kernel's output.
const CAND_BYTES: u64 = 4 * crate::ops::sample::OUT_WORDS as u64;
/// Bytes of the GPU sampler's output (the id and its flags).
const SAMPLED_BYTES: u64 = 4 * crate::ops::sample_full::OUT_WORDS as u64;
/// Bytes a GPU-sampled step reads back: the pick and the row's stats.
pub const SAMPLED_READBACK_BYTES: u64 = SAMPLED_BYTES + STATS_BYTES;
/// Most bytes a row of a batched sampled step reads back besides its
/// logits: its argmax id, its stats and its sampler's pick.
const PICK_ROW_BYTES: u64 = 4 + STATS_BYTES + SAMPLED_BYTES;
/// Bytes of a token ring slot: a greedy step's id and stats, or a sampled
/// step's pick and stats.
const RING_BYTES: u64 = if ID_STATS_BYTES > SAMPLED_READBACK_BYTES {
    ID_STATS_BYTES
} else {
    SAMPLED_READBACK_BYTES
};
/// History ring entries kept free for the steps a sampled decode discards
/// after a stop or a rollback (they append to the ring too): more than
/// twice the deepest pipeline.
const HIST_SPARE: usize = 2 * RING;
/// Bytes of one [`Step`] uniform.
#[cfg_attr(target_arch = "wasm32", allow(dead_code))] // the pipelined decode is native-only
const STEP_BYTES: u64 = std::mem::size_of::<Step>() as u64;

/// A ring slot's map: requested and pending, done, or failed.
struct MapState;
#[cfg_attr(target_arch = "wasm32", allow(dead_code))] // the pipelined decode is native-only
impl MapState {
    const IDLE: u8 = 0;
    const PENDING: u8 = 1;
    const MAPPED: u8 = 2;
    const FAILED: u8 = 3;
}

/// What a pipelined greedy decode did (see [`Model::decode_greedy`]).
#[derive(Clone, Debug, Default)]
pub struct DecodeRun {
    /// Steps submitted, wasted ones (past a stop) included.
    pub submitted: usize,
    /// Steps whose token was delivered (the KV cache keeps these).
    pub kept: usize,
    /// Host thread CPU seconds to record and submit each step.
    pub record_cpu_s: Vec<f64>,
    /// Compute dispatches recorded per step.
    pub dispatches_per_step: u64,
    /// Sampled decode: steps the GPU left to the host (flagged uncertain),
    /// steps whose id the host changed, and steps discarded after those.
    pub host_sampled: usize,
    pub host_changed: usize,
    pub rolled_back: usize,
}

/// What a pipelined decode does after a delivered step (see
/// [`Model::decode_ring`]).
#[cfg(not(target_arch = "wasm32"))]
enum Deliver {
    Go,
    Stop,
    /// Drop the steps in flight and go on from this id (the host's).
    Refeed(u32),
}

/// What a sampled decode's caller decided for a step (see
/// [`Model::decode_sampled`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SampledStep {
    /// Go on with this id (the GPU's pick, or the host's own).
    Next(u32),
    /// Stop here.
    Stop,
}

/// One row of a batched sampled step ([`Model::decode_batch_picks`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotStep {
    pub slot: usize,
    /// The token to append to the slot.
    pub token: u32,
    /// Pick with the slot's GPU sampler (as [`Model::begin_slot_sampled`]
    /// set it up), else the argmax of the row.
    pub sample: bool,
    /// Read the row's logits back too (log-probabilities).
    pub want_row: bool,
}

/// What a row of a batched sampled step gives back.
#[derive(Clone, Debug, PartialEq)]
pub struct SlotPick {
    /// The sampler's pick (`why != 0`: left to the host, see
    /// [`Picked::uncertain`]), or the row's argmax as a decided pick.
    pub pick: Picked,
    /// The row's finiteness.
    pub stats: RowStats,
    /// The row's logits: asked for, or the pick left to the host.
    pub row: Option<Vec<f32>>,
}

/// A batched sampled step's rows, in the order asked, and the bytes it read
/// back from the device.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchPicks {
    pub picks: Vec<SlotPick>,
    pub bytes_read: u64,
}

/// A GPU sampler's pick and its row's [`RowStats`] as a step reads them
/// back.
fn pick_stats(b: &[u8]) -> (Picked, RowStats) {
    let w = |i: usize| u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]);
    let n = crate::ops::sample_full::OUT_WORDS;
    let s = RowStats::from_words([w(n), w(n + 1), w(n + 2), w(n + 3)]);
    (Picked::from_words(&[w(0), w(1), w(2), w(3)]), s)
}

/// An id and its row's [`RowStats`] as a step reads them back.
fn id_stats(b: &[u8]) -> (u32, RowStats) {
    let w = |i: usize| u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]);
    (w(0), RowStats::from_words([w(1), w(2), w(3), w(4)]))
}

/// CPU time of the calling thread, in seconds (None where the platform
/// gives none).
pub fn thread_cpu_s() -> Option<f64> {
    #[cfg(unix)]
    {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec through a valid pointer.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        (rc == 0).then_some(ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9)
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// Where a scope's residual stream lives.
#[derive(Clone, Copy)]
struct Env {
    stream: usize,
    stream_out: usize,
    /// The step uniform its ops bind (`step_one` for the last-row head).
    one_row: bool,
    /// Whether `Stream` holds low halves: not when it is the embedding's
    /// output (layer 0 reads it as hi alone).
    stream_lo: bool,
}

impl Buffers {
    fn idx(&self, env: Env, b: Buf) -> usize {
        match b {
            Buf::Stream => env.stream,
            Buf::StreamOut => env.stream_out,
            other => self.index[&other],
        }
    }

    /// The float offset of `b`'s low halves as its reader sees them (0:
    /// none, or none written, as for the embedding's output).
    fn lo(&self, env: Env, b: Buf) -> u32 {
        if b == Buf::Stream && !env.stream_lo {
            return 0;
        }
        self.lo[self.idx(env, b)]
    }
}

/// A model on the GPU: weights, KV cache, activations and every bind group,
/// all created at load. A server can own one and `reset` it between
/// sequences.
pub struct Model {
    pub gpu: Arc<Gpu>,
    pub cfg: ModelConfig,
    pub weights: Weights,
    pub max_context: usize,
    pub max_batch: usize,
    /// Most tokens whose logits fit the logits buffer at once.
    pub logits_rows: usize,
    /// What this model computes (with any test-only faults applied).
    program: Program,
    k: Kernels,
    b: Buffers,
    kv_params: kv_copy::Params,
    embed: Vec<BoundOp>,
    layers: Vec<Vec<BoundOp>>,
    /// Each layer's fast path (see [`Fast`]).
    fast: Vec<Vec<Fast>>,
    /// Record the fast path when no taps are read (tests turn it off to
    /// compare it with the op-by-op path).
    fuse: bool,
    /// The head over every token (taps) and over the last token only.
    head_all: Vec<BoundOp>,
    head_last: Vec<BoundOp>,
    argmax_last: ArgmaxBinding,
    /// The argmax of a one-token pass, which runs `head_all` on the stream
    /// itself (no copy of its only row into `last`) under the `step`
    /// uniform (equal to `step_one` when one token runs).
    argmax_one: ArgmaxBinding,
    /// The candidate kernel over the last-row logits.
    topk_last: TopKBinding,
    /// The GPU sampler over the last-row logits; also slot 0's sampler in
    /// a batched step (slot 0 is the single sequence).
    sample_last: SampleBinding,
    /// Batched sampled steps: the argmax and stats of every row, and the
    /// GPU sampler of slots 1.. over the batch logits (see
    /// [`Self::decode_batch_picks`]).
    #[cfg_attr(target_arch = "wasm32", allow(dead_code))] // slot passes are native-only
    argmax_batch: ArgmaxBinding,
    #[cfg_attr(target_arch = "wasm32", allow(dead_code))]
    slot_samplers: Vec<SampleBinding>,
    /// Ring index of the current sampled generation's first pick (see
    /// [`Self::begin_sampled`]).
    sampled_at: usize,
    kv: Vec<KvCache>,
    _rope_tables: Vec<(RopeTable, RopeTables)>,
    /// Tokens already in the KV cache.
    pos: usize,
    /// Tokens cached per sequence slot; slot 0's count is `pos`.
    #[cfg_attr(target_arch = "wasm32", allow(dead_code))]
    slot_pos: Vec<usize>,
    faults: Faults,
    /// Where the load's time went.
    pub load_times: LoadTimes,
}

/// Where [`Model::load`]'s time went, in seconds (`bench` prints it).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LoadTimes {
    /// Opening the checkpoint: mapping the files, parsing the headers and
    /// the config (0 when the caller opened it: [`Model::from_checkpoint`]).
    pub open_s: f64,
    /// The memory plan and its check against the device.
    pub plan_s: f64,
    /// Scanning, converting and copying the weights to the device, up to
    /// the device having them.
    pub upload_s: f64,
    /// Compiling the kernels, making the activation buffers, the KV cache,
    /// the RoPE tables and every bind group.
    pub build_s: f64,
}

impl LoadTimes {
    pub fn total_s(&self) -> f64 {
        self.open_s + self.plan_s + self.upload_s + self.build_s
    }
}

/// Records one step: compute passes, interrupted only for tap copies.
struct Rec {
    enc: Option<wgpu::CommandEncoder>,
    pass: Option<wgpu::ComputePass<'static>>,
    taps: Option<TapPlan>,
    mode: Mode,
}

struct TapPlan {
    staging: wgpu::Buffer,
    offset: u64,
    entries: Vec<(String, usize, usize, u64)>,
}

impl Rec {
    fn new(gpu: &Gpu, taps: Option<TapPlan>) -> Self {
        Rec {
            enc: Some(gpu.encoder()),
            pass: None,
            taps,
            mode: Mode::Seq,
        }
    }
    fn pass(&mut self) -> &mut wgpu::ComputePass<'static> {
        if self.pass.is_none() {
            let enc = self.enc.as_mut().expect("encoder present until finish");
            self.pass = Some(
                enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("wgllm step"),
                    timestamp_writes: None,
                })
                .forget_lifetime(),
            );
        }
        self.pass.as_mut().expect("just set")
    }
    fn end_pass(&mut self) {
        self.pass = None;
    }
    fn enc(&mut self) -> &mut wgpu::CommandEncoder {
        self.end_pass();
        self.enc.as_mut().expect("encoder present until finish")
    }
    /// Copy `rows x cols` f32 of `buf` into the tap staging buffer.
    fn tap(&mut self, name: impl FnOnce() -> String, buf: &wgpu::Buffer, rows: usize, cols: usize) {
        if self.taps.is_none() {
            return;
        }
        let bytes = (rows * cols * 4) as u64;
        self.end_pass();
        let enc = self.enc.as_mut().expect("encoder");
        let plan = self.taps.as_mut().expect("checked");
        enc.copy_buffer_to_buffer(buf, 0, &plan.staging, plan.offset, bytes);
        plan.entries.push((name(), rows, cols, plan.offset));
        plan.offset += bytes;
    }
    fn finish(mut self) -> (wgpu::CommandBuffer, Option<TapPlan>) {
        self.end_pass();
        let enc = self.enc.take().expect("encoder");
        (enc.finish(), self.taps.take())
    }
}

/// An f32 activation buffer, padded to 16 bytes so kernels may bind it as
/// `array<vec4<f32>>` (the GEMV fast path needs that).
fn f32_buf(gpu: &Gpu, label: &str, n: usize) -> wgpu::Buffer {
    gpu.storage(label, crate::gpu::pad16((n.max(1) * 4) as u64))
}

impl Model {
    /// Load a Hugging Face model folder onto `gpu`.
    pub fn load(gpu: Arc<Gpu>, dir: &Path, opts: &ModelOptions) -> Result<Self> {
        let t = crate::gpu::now_s();
        let ckpt = Checkpoint::open(dir)?;
        let open_s = crate::gpu::now_s() - t;
        let mut m = Self::from_checkpoint(gpu, &ckpt, opts)?;
        m.load_times.open_s = open_s;
        Ok(m)
    }

    pub fn from_checkpoint(gpu: Arc<Gpu>, ckpt: &Checkpoint, opts: &ModelOptions) -> Result<Self> {
        let cfg = ckpt.config.clone();
        let t = crate::gpu::now_s();
        let plan = MemoryPlan::new(&cfg, ckpt, opts.dtype, &gpu.caps)?;
        plan.device_memory_slots(
            &cfg,
            Some(kv_context(&cfg, &gpu.caps, opts)),
            opts.max_batch,
            opts.slots,
            &gpu.caps,
        )?;
        let plan_s = crate::gpu::now_s() - t;
        let t = crate::gpu::now_s();
        #[cfg_attr(target_arch = "wasm32", allow(unused_mut))]
        let mut weights = Weights::upload(&gpu, ckpt, &plan)?;
        #[cfg(not(target_arch = "wasm32"))]
        apply_weight_faults(&gpu, &mut weights, &opts.faults)?;
        gpu.wait()?;
        let upload_s = crate::gpu::now_s() - t;
        let t = crate::gpu::now_s();
        let mut m = Self::build(gpu, cfg, weights, opts)?;
        m.load_times = LoadTimes {
            open_s: 0.0,
            plan_s,
            upload_s,
            build_s: crate::gpu::now_s() - t,
        };
        Ok(m)
    }

    fn build(
        gpu: Arc<Gpu>,
        cfg: ModelConfig,
        weights: Weights,
        opts: &ModelOptions,
    ) -> Result<Self> {
        let g: &Gpu = &gpu;
        let vocab = cfg.vocab_size;
        let hd = cfg.head_dim;
        let nkv = cfg.num_key_value_heads;
        let batch = opts.max_batch.max(1);
        let slots = opts.slots.max(1);
        // KV cache: one binding per layer for K and for V, [slots, n_kv, ctx,
        // hd] f32.
        let max_context = kv_context(&cfg, &g.caps, opts);
        if max_context == 0 {
            return Err(Error::invalid("max context must be at least 1"));
        }
        let logits_rows = ((g.caps.max_binding / (vocab as u64 * 4)) as usize).clamp(1, batch);
        if slots > batch || slots > logits_rows {
            return Err(Error::invalid(format!(
                "{slots} sequence slots: a batched decode step runs one row per slot, but the \
                 activation buffers hold {batch} rows (max_batch) and the logits buffer {logits_rows}; \
                 use at most {} slots",
                batch.min(logits_rows)
            )));
        }
        // Rows a batched step describes: a prefill chunk or a decode step,
        // as many as one uniform binding holds (a Step, then 16 bytes a row;
        // longer slot prefills go in chunks of max_rows).
        let uniform_rows =
            (g.device.limits().max_uniform_buffer_binding_size as usize).saturating_sub(16) / 16;
        if slots > uniform_rows {
            return Err(Error::invalid(format!(
                "{slots} sequence slots: the batched step uniform holds at most {uniform_rows} rows on this device"
            )));
        }
        let max_rows = batch.max(slots).min(uniform_rows) as u32;
        let f = opts.faults;
        let mut program = Program::new(&cfg);
        apply_program_faults(&mut program, &f);

        let mut k = Kernels {
            norm: Cache(Vec::new()),
            linear: Cache(Vec::new()),
            qlinear: Cache(Vec::new()),
            embed: match &weights.embed {
                WTensor::Dense(t) => EmbedKernel::Dense(Embedding::new(g, t.dtype)?),
                WTensor::Quant(t) => EmbedKernel::Quant(QEmbedding::new(g, t.ty)?),
            },
            rope: Rope::with_faults(g, f.rope_interleaved)?,
            rope_kv: RopeKv::with_faults(g, f.rope_interleaved)?,
            attention: Attention::with_faults(g, hd, f.gqa_modulo)?,
            kv_copy: KvCopy::new(g)?,
            rope_b: Rope::with_rows(g, f.rope_interleaved, Some(max_rows))?,
            rope_kv_b: RopeKv::with_rows(g, f.rope_interleaved, Some(max_rows))?,
            attention_b: Attention::batched(g, hd, f.gqa_modulo, max_rows, slots as u32)?,
            kv_copy_b: KvCopy::with_rows(g, Some(max_rows))?,
            glu: Cache(Vec::new()),
            add: Elementwise::new(g, Binary::Add)?,
            add_norm: Cache(Vec::new()),
            softcap: Cache(Vec::new()),
            argmax: Argmax::new(g)?,
            topk: TopK::new(g)?,
            sampler: GpuSampler::new(g)?,
            faults: f,
        };
        let kv_params = kv_copy::Params::new(nkv, hd, max_context)?;
        let tables = program
            .rope_tables(&cfg)
            .into_iter()
            .map(|(t, theta, scaling)| {
                Ok((t, RopeTables::upload(g, hd, theta, scaling, max_context)?))
            })
            .collect::<Result<Vec<_>>>()?;

        // Activation buffers: one per program buffer, sized for max_batch
        // tokens (logits for logits_rows), the residual stream twice. The
        // residual stream's buffers (h0, h1, Resid, last) hold it as
        // (hi, lo) (common.wgsl's stream_add): rows of hi from offset 0
        // (what taps and every other op read), the rows' lo halves after
        // them, from float offset `lo[i]`.
        let mut acts = Vec::new();
        let mut lo = Vec::new();
        let mut index = HashMap::new();
        let mut push = |acts: &mut Vec<wgpu::Buffer>, label: &str, n: usize, split: bool| {
            lo.push(if split { n as u32 } else { 0 });
            acts.push(f32_buf(g, label, if split { 2 * n } else { n }));
        };
        for b in program.buffers() {
            if matches!(b, Buf::Stream | Buf::StreamOut) {
                continue;
            }
            let rows = if b == Buf::Logits { logits_rows } else { batch };
            index.insert(b, acts.len());
            let n = rows * b.width(&cfg);
            push(&mut acts, &format!("{b:?}"), n, b.is_stream());
        }
        let hidden = cfg.hidden_size;
        let h = [acts.len(), acts.len() + 1];
        push(&mut acts, "h0", batch * hidden, true);
        push(&mut acts, "h1", batch * hidden, true);
        let last = acts.len();
        push(&mut acts, "last", hidden, true);
        let mut b = Buffers {
            step: g.uniform("step", &Step::new(0, 0))?,
            bstep: g.create_buffer(&wgpu::BufferDescriptor {
                label: Some("batch step"),
                size: kv_copy::batch_step_bytes(max_rows),
                // Bound as a uniform or a read-only storage buffer, as
                // every Step (gpu::ParamsBinding).
                usage: wgpu::BufferUsages::UNIFORM
                    | wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
            max_rows,
            batch_logits_staging: g.staging("batch_logits_staging", (slots * vocab * 4) as u64),
            batch_next: g.storage("batch_next", (slots * 4) as u64),
            batch_stats: g.storage("batch_stats", slots as u64 * STATS_BYTES),
            picks_staging: g.staging("picks_staging", slots as u64 * PICK_ROW_BYTES),
            step_one: g.uniform("step_one", &Step::new(1, 0))?,
            ids: g.storage("ids", (batch * 4) as u64),
            acts,
            lo,
            index,
            h,
            last,
            next: g.storage("next", 4),
            next_stats: g.storage("next_stats", STATS_BYTES),
            next_staging: g.staging("next_staging", ID_STATS_BYTES),
            logits_staging: g.staging("logits_staging", (vocab * 4) as u64),
            cand_staging: g.staging("cand_staging", CAND_BYTES + STATS_BYTES),
            params: Vec::new(),
            steps: {
                let table: Vec<Step> = (0..max_context as u32).map(|p| Step::new(1, p)).collect();
                g.storage_init("steps", bytemuck::cast_slice(&table))?
            },
            ring: (0..RING)
                .map(|i| g.staging(&format!("next_ring{i}"), RING_BYTES))
                .collect(),
            ring_state: (0..RING)
                .map(|_| Arc::new(AtomicU8::new(MapState::IDLE)))
                .collect(),
            ring_sub: (0..RING).map(|_| std::sync::Mutex::new(None)).collect(),
            ring_rows: (0..if cfg!(target_arch = "wasm32") {
                0
            } else {
                RING
            })
                .map(|i| g.storage(&format!("ring_row{i}"), (vocab * 4) as u64))
                .collect(),
        };
        let ctx = BindCtx {
            g,
            cfg: &cfg,
            weights: &weights,
            max_context,
            tables: &tables,
            dot2: dot2_roles()?,
        };
        let nl = program.layers.len();
        let embed_env = Env {
            stream: b.h[0],
            stream_out: b.h[0],
            one_row: false,
            stream_lo: false,
        };
        let embed = ctx.bind_all(
            &mut k,
            &mut b,
            &program.embed,
            Scope::Embed,
            embed_env,
            None,
        )?;
        let mut kv = Vec::new();
        let mut layers = Vec::new();
        let mut fast = Vec::new();
        let mut envs = Vec::new();
        for (i, ops) in program.layers.iter().enumerate() {
            let cache = KvCache::with_slots(g, kv_params, slots)?;
            let env = Env {
                stream: b.h[i % 2],
                stream_out: b.h[(i + 1) % 2],
                one_row: false,
                stream_lo: i > 0,
            };
            let bound = ctx.bind_all(&mut k, &mut b, ops, Scope::Layer(i), env, Some(&cache))?;
            fast.push(ctx.fuse_layer(&mut k, &b, ops, env, &cache)?);
            layers.push(bound);
            kv.push(cache);
            envs.push(env);
        }
        // A layer's last residual add and the next layer's first norm (the
        // layer boundary) as one dispatch, too.
        for i in 1..nl {
            let (prev, this) = (&program.layers[i - 1], &program.layers[i]);
            let (Some(add), Some(norm)) = (prev.last(), this.first()) else {
                continue;
            };
            let ends_plain =
                matches!(fast[i - 1].last(), Some(Fast::Op(j)) if *j + 1 == prev.len());
            let starts_plain = matches!(fast[i].first(), Some(Fast::Op(0)));
            let mut norm = norm.clone();
            // The next layer's Stream is this layer's StreamOut.
            match &mut norm.kind {
                OpKind::Norm {
                    x: x @ Buf::Stream, ..
                } => *x = Buf::StreamOut,
                _ => continue,
            }
            if !(ends_plain && starts_plain) {
                continue;
            }
            let pair = [add.clone(), norm];
            if let Some(f) = ctx.fuse_add_norm(&mut k, &b, Some(&pair), envs[i - 1])? {
                *fast[i - 1].last_mut().expect("checked") = f;
                fast[i].remove(0);
            }
        }
        let head_env = Env {
            stream: b.h[nl % 2],
            stream_out: b.h[nl % 2],
            one_row: false,
            stream_lo: nl > 0,
        };
        let head_all = ctx.bind_all(&mut k, &mut b, &program.head, Scope::Head, head_env, None)?;
        let last_env = Env {
            stream: b.last,
            stream_out: b.last,
            one_row: true,
            stream_lo: nl > 0,
        };
        let head_last = ctx.bind_all(&mut k, &mut b, &program.head, Scope::Head, last_env, None)?;
        let logits = &b.acts[b.index[&Buf::Logits]];
        let argmax_last = k
            .argmax
            .bind(g, &b.step_one, logits, vocab, &b.next, &b.next_stats)?;
        let argmax_one = k
            .argmax
            .bind(g, &b.step, logits, vocab, &b.next, &b.next_stats)?;
        let topk_last = k.topk.bind(g, logits, vocab)?;
        // the history ring holds a whole context and the spare; a
        // generation samples at most a context of tokens
        let sample_last = k.sampler.bind(
            g,
            logits,
            vocab,
            max_context.max(crate::ops::sample_full::MAX_WINDOW) + HIST_SPARE,
            max_context,
        )?;
        let argmax_batch =
            k.argmax
                .bind(g, &b.step, logits, vocab, &b.batch_next, &b.batch_stats)?;
        // Slots 1.. (slot 0 samples with `sample_last`): a history ring of
        // the kernel's least, a uniform for every step a slot can run.
        let slot_samplers = (1..if cfg!(target_arch = "wasm32") {
            1
        } else {
            slots
        })
            .map(|_| {
                k.sampler.bind(
                    g,
                    logits,
                    vocab,
                    crate::ops::sample_full::MAX_WINDOW,
                    max_context,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Model {
            gpu,
            cfg,
            weights,
            max_context,
            max_batch: batch,
            logits_rows,
            program,
            k,
            b,
            kv_params,
            embed,
            layers,
            fast,
            fuse: true,
            head_all,
            head_last,
            argmax_last,
            argmax_one,
            topk_last,
            sample_last,
            argmax_batch,
            slot_samplers,
            sampled_at: 0,
            kv,
            _rope_tables: tables,
            pos: 0,
            slot_pos: vec![0; slots],
            faults: f,
            load_times: LoadTimes::default(),
        })
    }

    /// The program this model runs (with any test-only faults applied).
    pub fn program(&self) -> &Program {
        &self.program
    }

    /// Tokens currently in the KV cache.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Forget the sequence; the next pass starts at position 0. The cache
    /// contents need no clearing: attention reads only positions < kv_len.
    pub fn reset(&mut self) {
        self.pos = 0;
    }

    /// Keep only the first `n` cached tokens (e.g. when a chat turn shares
    /// only a prefix with what was cached). Positions past `n` are simply
    /// overwritten later: attention never reads past the current length.
    pub fn truncate(&mut self, n: usize) -> Result<()> {
        if n > self.pos {
            return Err(Error::invalid(format!(
                "cannot keep {n} cached tokens: only {} are cached",
                self.pos
            )));
        }
        self.pos = n;
        Ok(())
    }

    fn check_tokens(&self, tokens: &[u32], n_logits: Logits) -> Result<()> {
        if tokens.is_empty() {
            return Err(Error::invalid("no tokens to process"));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            return Err(Error::invalid(format!(
                "token id {bad} is outside the vocabulary (vocab_size {})",
                self.cfg.vocab_size
            )));
        }
        if self.pos + tokens.len() > self.max_context {
            return Err(Error::invalid(format!(
                "context full: {} tokens in the cache + {} new > max context {}",
                self.pos,
                tokens.len(),
                self.max_context
            )));
        }
        if n_logits == Logits::All && tokens.len() > self.logits_rows {
            return Err(Error::invalid(format!(
                "all-token logits for {} tokens exceed the logits buffer ({} rows of {} fit the device's max storage binding)",
                tokens.len(),
                self.logits_rows,
                self.cfg.vocab_size
            )));
        }
        Ok(())
    }

    /// Run `tokens` (appended after the cached ones) and return the greedy
    /// next token after the last of them. Long inputs go in `max_batch` chunks.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn forward_next(&mut self, tokens: &[u32]) -> Result<u32> {
        crate::gpu::block_on(self.forward_next_async(tokens))
    }

    /// [`Model::forward_next`] as a future (the browser build awaits it).
    pub async fn forward_next_async(&mut self, tokens: &[u32]) -> Result<u32> {
        Ok(self.forward_next_checked_async(tokens).await?.0)
    }

    /// [`Self::forward_next`] with the last row's logits' finiteness
    /// (computed by the argmax beside the id; the logits stay on the GPU).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn forward_next_checked(&mut self, tokens: &[u32]) -> Result<(u32, RowStats)> {
        crate::gpu::block_on(self.forward_next_checked_async(tokens))
    }

    /// [`Self::forward_next_checked`] as a future.
    pub async fn forward_next_checked_async(&mut self, tokens: &[u32]) -> Result<(u32, RowStats)> {
        let bytes = self.run_last(tokens, Readback::NextId).await?;
        Ok(id_stats(&bytes))
    }

    /// Run `tokens` and return the last token's sampling candidates: the
    /// `want` largest logits (ties included) and the logits of the `extra`
    /// ids (`ops::sample`), with the row's finiteness. Only those come back,
    /// not the row; when too many tie, `overflow` is set and
    /// [`Self::last_logits`] reads the row.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn forward_candidates(
        &mut self,
        tokens: &[u32],
        want: usize,
        extra: &[u32],
    ) -> Result<(Candidates, RowStats)> {
        crate::gpu::block_on(self.forward_candidates_async(tokens, want, extra))
    }

    /// [`Self::forward_candidates`] as a future.
    pub async fn forward_candidates_async(
        &mut self,
        tokens: &[u32],
        want: usize,
        extra: &[u32],
    ) -> Result<(Candidates, RowStats)> {
        self.k
            .topk
            .prepare(&self.gpu, &self.topk_last, want, extra)?;
        let bytes = self.run_last(tokens, Readback::Candidates).await?;
        let words: Vec<u32> = bytemuck::pod_collect_to_vec(&bytes);
        let n = crate::ops::sample::OUT_WORDS;
        let c = Candidates::from_words(&words[..n], extra.len());
        let s = RowStats::from_words([words[n], words[n + 1], words[n + 2], words[n + 3]]);
        Ok((c, s))
    }

    /// Run `tokens` and sample the last token's logits on the GPU
    /// (`ops::sample_full`) with `draw` and the penalty `window`: only the
    /// pick and the row's finiteness come back (32 bytes). A pick flagged
    /// uncertain is to be sampled on the host from [`Self::last_logits`].
    #[cfg(not(target_arch = "wasm32"))]
    pub fn forward_sampled(
        &mut self,
        tokens: &[u32],
        draw: &Draw,
        window: &[u32],
    ) -> Result<(Picked, RowStats)> {
        crate::gpu::block_on(self.forward_sampled_async(tokens, draw, window))
    }

    /// [`Self::forward_sampled`] as a future.
    pub async fn forward_sampled_async(
        &mut self,
        tokens: &[u32],
        draw: &Draw,
        window: &[u32],
    ) -> Result<(Picked, RowStats)> {
        self.k
            .sampler
            .prepare(&self.gpu, &self.sample_last, draw, window)?;
        self.forward_sampled_step_async(tokens).await
    }

    /// Whether the GPU sampler's history ring and uniform table hold a
    /// generation of `steps` steps after `history` tokens with the
    /// penalty window `last_n` (as in [`Self::begin_sampled`]).
    pub fn sampled_fits(&self, last_n: Option<usize>, history: usize, steps: usize) -> bool {
        let b = &self.sample_last;
        GpuSampler::max_window(last_n, history, steps) + HIST_SPARE <= b.hist_cap
            && steps <= b.n_draws
    }

    /// Start a sampled generation of up to `steps` steps on the GPU
    /// sampler: its settings `d` (`r` unused), the penalty window of
    /// `history` (`last_n` None: no penalty; Some(0): all of it; Some(n):
    /// the last n) and the steps' uniforms `draws` (none for greedy) are
    /// written once; then each [`Self::forward_sampled_step`] and each
    /// step of [`Self::decode_sampled`] takes the next uniform and appends
    /// its pick to the window on the GPU, with nothing written per step.
    pub fn begin_sampled(
        &mut self,
        d: &Draw,
        last_n: Option<usize>,
        history: &[u32],
        steps: usize,
        draws: &[f32],
    ) -> Result<()> {
        self.sampled_at = self.k.sampler.begin(
            &self.gpu,
            &self.sample_last,
            d,
            last_n,
            history,
            steps,
            draws,
            HIST_SPARE,
        )?;
        Ok(())
    }

    /// The host decided step `step` (0: the first pick after
    /// [`Self::begin_sampled`]) as `id` instead of the GPU's pick: write it
    /// into the GPU's history and step counter.
    pub fn fix_sampled(&self, step: usize, id: u32) -> Result<()> {
        self.k.sampler.fix(
            &self.gpu,
            &self.sample_last,
            self.sampled_at + step,
            step,
            id,
        )
    }

    /// Run `tokens` and sample the last row on the GPU with the state
    /// [`Self::begin_sampled`] set (the next uniform, the window so far):
    /// only the pick and the row's finiteness come back. A pick flagged
    /// uncertain is to be sampled on the host from [`Self::last_logits`],
    /// and a different id written back with [`Self::fix_sampled`].
    #[cfg(not(target_arch = "wasm32"))]
    pub fn forward_sampled_step(&mut self, tokens: &[u32]) -> Result<(Picked, RowStats)> {
        crate::gpu::block_on(self.forward_sampled_step_async(tokens))
    }

    /// [`Self::forward_sampled_step`] as a future.
    pub async fn forward_sampled_step_async(
        &mut self,
        tokens: &[u32],
    ) -> Result<(Picked, RowStats)> {
        let bytes = self.run_last(tokens, Readback::Sampled).await?;
        Ok(pick_stats(&bytes))
    }

    /// The last pass's last-row logits, read again (nothing runs).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn last_logits(&mut self) -> Result<Vec<f32>> {
        crate::gpu::block_on(self.last_logits_async())
    }

    /// [`Self::last_logits`] as a future.
    pub async fn last_logits_async(&mut self) -> Result<Vec<f32>> {
        let b = &self.b;
        let len = (self.cfg.vocab_size * 4) as u64;
        let mut enc = self.gpu.encoder();
        enc.copy_buffer_to_buffer(&b.acts[b.index[&Buf::Logits]], 0, &b.logits_staging, 0, len);
        self.gpu.queue.submit([enc.finish()]);
        let bytes = self.gpu.map_staging_async(&b.logits_staging, len).await?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    /// Run `tokens` and return the last token's logits (for sampling).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn forward_logits(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        crate::gpu::block_on(self.forward_logits_async(tokens))
    }

    /// [`Model::forward_logits`] as a future (the browser build awaits it).
    pub async fn forward_logits_async(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let bytes = self.run_last(tokens, Readback::Logits).await?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    /// Run `tokens` in `max_batch` chunks (one submission each); the last
    /// chunk computes the last token's logits and argmax and copies what
    /// `readback` asks for into a persistent staging buffer in the same
    /// submission.
    async fn run_last(&mut self, tokens: &[u32], readback: Readback) -> Result<Vec<u8>> {
        self.check_tokens(tokens, Logits::Last)?;
        let n_chunks = tokens.len().div_ceil(self.max_batch);
        for (ci, chunk) in tokens.chunks(self.max_batch).enumerate() {
            let last = ci + 1 == n_chunks;
            let (cmd, _) = self.record(
                chunk,
                last.then_some(Logits::Last),
                false,
                last.then_some(readback),
            )?;
            self.gpu.queue.submit([cmd]);
            self.pos += chunk.len();
        }
        let (staging, len) = match readback {
            Readback::NextId => (&self.b.next_staging, ID_STATS_BYTES),
            Readback::Logits => (&self.b.logits_staging, (self.cfg.vocab_size * 4) as u64),
            Readback::Candidates => (&self.b.cand_staging, CAND_BYTES + STATS_BYTES),
            Readback::Sampled => (&self.b.cand_staging, SAMPLED_BYTES + STATS_BYTES),
        };
        self.gpu.map_staging_async(staging, len).await
    }

    /// Run `tokens` in one pass with every tap read back (verification).
    /// Limited to `min(max_batch, logits_rows)` tokens.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn forward_taps(&mut self, tokens: &[u32]) -> Result<TapSet> {
        crate::gpu::block_on(self.forward_taps_async(tokens))
    }

    /// [`Model::forward_taps`] as a future (the browser's Verify awaits it).
    pub async fn forward_taps_async(&mut self, tokens: &[u32]) -> Result<TapSet> {
        self.check_tokens(tokens, Logits::All)?;
        if tokens.len() > self.max_batch {
            return Err(Error::invalid(format!(
                "verification runs the prompt in one pass: {} tokens > max batch {}",
                tokens.len(),
                self.max_batch
            )));
        }
        let (cmd, plan) = self.record(tokens, Some(Logits::All), true, None)?;
        self.gpu.queue.submit([cmd]);
        let plan = plan.expect("taps requested");
        let bytes = self
            .gpu
            .map_staging_async(&plan.staging, plan.offset)
            .await?;
        self.pos += tokens.len();
        let mut set = TapSet::default();
        for (name, rows, cols, off) in plan.entries {
            let s = &bytes[off as usize..off as usize + rows * cols * 4];
            set.push(name, rows, cols, bytemuck::cast_slice(s).to_vec());
        }
        Ok(set)
    }

    fn tap_bytes(&self, n: usize) -> u64 {
        (self.program.tap_floats_per_token(&self.cfg) * n * 4) as u64
    }

    /// Dispatch one bound op over `n` tokens into `pass`.
    fn dispatch(&self, bound: &Bound, pass: &mut wgpu::ComputePass<'_>, n: u32) -> Result<()> {
        self.dispatch_mode(bound, pass, n, Mode::Seq)
    }

    /// [`Self::dispatch`] for a pass of `mode`: slot passes take the
    /// position-aware ops' batched bindings, and a batched decode step keeps
    /// every row's reductions in the order of a one-row step.
    fn dispatch_mode(
        &self,
        bound: &Bound,
        pass: &mut wgpu::ComputePass<'_>,
        n: u32,
        mode: Mode,
    ) -> Result<()> {
        let (g, k) = (&*self.gpu, &self.k);
        match (bound, mode) {
            (Bound::Linear { key, b }, Mode::SlotDecode) => {
                // One row: the one-token GEMV itself; more: the batched GEMV,
                // which sums each row exactly as the GEMV does.
                let path = if n == 1 {
                    LinearPath::Gemv
                } else {
                    LinearPath::Batch
                };
                k.linear.get(*key).encode_path(g, pass, b, n, path)?;
                return Ok(());
            }
            (Bound::QLinear { key, b }, Mode::SlotDecode) => {
                // Quantized weights: one row, the one-token GEMV; more, the
                // prefill-shaped kernel, one weight pass per
                // qmatmul::PREFILL_TOKENS rows, which sums each row exactly
                // as the GEMV does (so a sequence's bits do not depend on
                // its batch; ops::qmatmul's tests check the bits).
                k.qlinear.get(*key).encode_path(g, pass, b, n, n > 1)?;
                return Ok(());
            }
            (Bound::Rope { bat, params, .. }, Mode::SlotPrefill | Mode::SlotDecode) => {
                k.rope_b.encode(g, pass, bat, params, n);
                return Ok(());
            }
            (Bound::KvAppend { bat, .. }, Mode::SlotPrefill | Mode::SlotDecode) => {
                k.kv_copy_b.encode(g, pass, bat, &self.kv_params, n);
                return Ok(());
            }
            (Bound::Attention { bat, params, .. }, Mode::SlotPrefill) => {
                k.attention_b.encode(g, pass, bat, params, n);
                return Ok(());
            }
            (Bound::Attention { bat, params, .. }, Mode::SlotDecode) => {
                k.attention_b.encode_decode(g, pass, bat, params, n);
                return Ok(());
            }
            _ => {}
        }
        match bound {
            Bound::Embed(b) => match (&k.embed, b) {
                (EmbedKernel::Dense(e), EmbedBinding::Dense(b)) => e.encode(g, pass, b, n),
                (EmbedKernel::Quant(e), EmbedBinding::Quant(b)) => e.encode(g, pass, b, n),
                _ => {
                    return Err(Error::invalid(
                        "embedding bound for a different table type than its kernel",
                    ))
                }
            },
            Bound::Norm {
                key,
                bg,
                rows_per_token,
            } => k.norm.get(*key).encode(g, pass, bg, n * rows_per_token),
            Bound::Linear { key, b } => k.linear.get(*key).encode(g, pass, b, n)?,
            Bound::QLinear { key, b } => k.qlinear.get(*key).encode(g, pass, b, n)?,
            Bound::Rope { bg, params, .. } => k.rope.encode(g, pass, bg, params, n),
            Bound::KvAppend { bg, .. } => k.kv_copy.encode(g, pass, bg, &self.kv_params, n),
            Bound::Attention { bg, params, .. } => k.attention.encode(g, pass, bg, params, n),
            Bound::Glu { act, bg, width } => k.glu.get(*act).encode(g, pass, bg, n, *width),
            Bound::Add { bg, width } => k.add.encode(g, pass, bg, n, *width),
            Bound::Softcap { bg, width } => k.softcap.get(()).encode(g, pass, bg, n, *width),
            Bound::Copy { .. } => {
                return Err(Error::invalid(
                    "a copy op is a buffer copy, not a dispatch in a compute pass",
                ))
            }
        }
        Ok(())
    }

    /// Dispatch a fused fast-path item over `n` tokens.
    fn encode_fused(&self, f: &Fast, pass: &mut wgpu::ComputePass<'_>, n: u32) -> Result<()> {
        self.encode_fused_mode(f, pass, n, Mode::Seq)
    }

    /// [`Self::encode_fused`] for a pass of `mode`.
    fn encode_fused_mode(
        &self,
        f: &Fast,
        pass: &mut wgpu::ComputePass<'_>,
        n: u32,
        mode: Mode,
    ) -> Result<()> {
        let g = &*self.gpu;
        match f {
            Fast::RopeKv { bat, params, .. } if mode != Mode::Seq => {
                self.k.rope_kv_b.encode(g, pass, bat, params, n)
            }
            Fast::RopeKv { bg, params, .. } => self.k.rope_kv.encode(g, pass, bg, params, n),
            Fast::AddNorm { key, bg, .. } => self.k.add_norm.get(*key).encode(g, pass, bg, n),
            Fast::QkvRope { f, .. } | Fast::GateUp { f, .. } if n == 1 && mode == Mode::Seq => {
                f.encode(g, pass)
            }
            Fast::QkvRope { .. } | Fast::GateUp { .. } => {
                return Err(Error::invalid(
                    "a one-token fused kernel in a pass of several tokens or slots (its fallback \
                     ops record that pass)",
                ))
            }
            Fast::Op(_) => {
                return Err(Error::invalid(
                    "a plain op is recorded by encode_op, not as a fused item",
                ))
            }
        }
        Ok(())
    }

    /// Record one bound op over `n` tokens, then its tap.
    fn encode_op(&self, op: &BoundOp, r: &mut Rec, n: u32) -> Result<()> {
        match &op.bound {
            Bound::Copy { x, y, row_bytes } => {
                let (x, y) = (&self.b.acts[*x], &self.b.acts[*y]);
                r.enc()
                    .copy_buffer_to_buffer(x, 0, y, 0, row_bytes * n as u64);
            }
            b => {
                let mode = r.mode;
                self.dispatch_mode(b, r.pass(), n, mode)?
            }
        }
        if let Some((name, buf, width)) = &op.tap {
            r.tap(|| name.clone(), &self.b.acts[*buf], n as usize, *width);
        }
        Ok(())
    }

    /// Record one fast-path item of a layer (`ops`) over `n` tokens: a
    /// plain op, a fused kernel, or the fallback ops of a one-token fusion
    /// that this pass does not take.
    fn encode_fast(&self, ops: &[BoundOp], f: &Fast, r: &mut Rec, n: u32) -> Result<()> {
        match f {
            Fast::Op(j) => self.encode_op(&ops[*j], r, n),
            Fast::QkvRope { fallback, .. } | Fast::GateUp { fallback, .. }
                if !f.fused_for(n, r.mode) =>
            {
                for f in fallback {
                    self.encode_fast(ops, f, r, n)?;
                }
                Ok(())
            }
            f => {
                let mode = r.mode;
                self.encode_fused_mode(f, r.pass(), n, mode)
            }
        }
    }

    /// Encode one pass over `tokens` at the current position.
    fn record(
        &self,
        tokens: &[u32],
        logits: Option<Logits>,
        taps: bool,
        readback: Option<Readback>,
    ) -> Result<(wgpu::CommandBuffer, Option<TapPlan>)> {
        let g: &Gpu = &self.gpu;
        let n = tokens.len();
        let nu = n as u32;
        let step = Step::new(nu, self.pos as u32);
        g.queue
            .write_buffer(&self.b.step, 0, bytemuck::bytes_of(&step));
        g.queue
            .write_buffer(&self.b.ids, 0, bytemuck::cast_slice(tokens));
        let last_step = Step::new(1, (self.pos + n - 1) as u32);
        g.queue
            .write_buffer(&self.b.step_one, 0, bytemuck::bytes_of(&last_step));

        let plan = taps.then(|| TapPlan {
            staging: g.staging("taps", self.tap_bytes(n)),
            offset: 0,
            entries: Vec::new(),
        });
        let mut r = Rec::new(g, plan);
        self.encode_body(&mut r, nu, logits)?;
        let b = &self.b;
        let logits_buf = &b.acts[b.index[&Buf::Logits]];
        match readback {
            None => {}
            Some(Readback::NextId) => {
                r.enc()
                    .copy_buffer_to_buffer(&b.next, 0, &b.next_staging, 0, 4);
                r.enc()
                    .copy_buffer_to_buffer(&b.next_stats, 0, &b.next_staging, 4, STATS_BYTES);
            }
            Some(Readback::Logits) => {
                let len = (self.cfg.vocab_size * 4) as u64;
                r.enc()
                    .copy_buffer_to_buffer(logits_buf, 0, &b.logits_staging, 0, len);
            }
            Some(rb @ (Readback::Sampled | Readback::Candidates)) => {
                // the kernel after the argmax, then its output and the
                // row's stats
                let (out, len) = if rb == Readback::Sampled {
                    self.k.sampler.encode(g, r.pass(), &self.sample_last);
                    (&self.sample_last.out, SAMPLED_BYTES)
                } else {
                    self.k.topk.encode(g, r.pass(), &self.topk_last);
                    (&self.topk_last.out, CAND_BYTES)
                };
                let enc = r.enc();
                enc.copy_buffer_to_buffer(out, 0, &b.cand_staging, 0, len);
                enc.copy_buffer_to_buffer(&b.next_stats, 0, &b.cand_staging, len, STATS_BYTES);
            }
        }
        Ok(r.finish())
    }

    /// Record the program over `n` tokens into `r`: embedding, layers, and
    /// the head `logits` asks for (the last-row head ends with the argmax
    /// into `next`).
    fn encode_body(&self, r: &mut Rec, n: u32, logits: Option<Logits>) -> Result<()> {
        let (g, b) = (&*self.gpu, &self.b);
        for op in &self.embed {
            self.encode_op(op, r, n)?;
        }
        if r.taps.is_some() || !self.fuse {
            for op in self.layers.iter().flatten() {
                self.encode_op(op, r, n)?;
            }
        } else {
            for (ops, fast) in self.layers.iter().zip(&self.fast) {
                for f in fast {
                    self.encode_fast(ops, f, r, n)?;
                }
            }
        }
        match logits {
            None => {}
            Some(Logits::All) => {
                for op in &self.head_all {
                    self.encode_op(op, r, n)?;
                }
            }
            Some(Logits::Last) if self.one_token_head(n, r.mode) => {
                // One token: its row is the stream's only row, so the head
                // over every row is the head over the last one, with no
                // copy and no second pass (the same kernels on the same
                // values as the copy path below, which the op-by-op path
                // keeps so that tests/decode.rs compares the two).
                for op in &self.head_all {
                    self.encode_op(op, r, 1)?;
                }
                self.k.argmax.encode(g, r.pass(), &self.argmax_one, 1)?;
            }
            Some(Logits::Last) => {
                // The head on the last token's row only.
                let row = (self.cfg.hidden_size * 4) as u64;
                let h = b.h[self.layers.len() % 2];
                let stream = &b.acts[h];
                // Its hi row, then its lo row (see `Buffers::lo`).
                for (from, to) in [(0, 0), (b.lo[h], b.lo[b.last])] {
                    r.enc().copy_buffer_to_buffer(
                        stream,
                        4 * from as u64 + row * (n as u64 - 1),
                        &b.acts[b.last],
                        4 * to as u64,
                        row,
                    );
                }
                for op in &self.head_last {
                    self.encode_op(op, r, 1)?;
                }
                self.k.argmax.encode(g, r.pass(), &self.argmax_last, 1)?;
            }
        }
        Ok(())
    }

    /// Whether a pass of `n` tokens in `mode` runs its last-row head as
    /// `head_all` on the stream (one token, fast path) instead of copying
    /// the row into `last`. Sequence passes only: a slot pass does not
    /// write `step`.
    fn one_token_head(&self, n: u32, mode: Mode) -> bool {
        n == 1 && mode == Mode::Seq && self.fuse
    }

    /// The argmax binding a one-token step's head ends with.
    fn argmax_for_one_token(&self) -> &ArgmaxBinding {
        if self.one_token_head(1, Mode::Seq) {
            &self.argmax_one
        } else {
            &self.argmax_last
        }
    }

    /// Record one greedy decode step at position `pos` without any host
    /// write: the step uniform comes from the `steps` table, the input id
    /// from the previous step's argmax (`next`) unless `host_id` (the first
    /// step, whose id the host wrote into `ids`), and the new id is copied
    /// into ring slot `slot`.
    #[cfg_attr(target_arch = "wasm32", allow(dead_code))] // the pipelined decode is native-only
    fn record_decode_step(
        &self,
        pos: usize,
        host_id: bool,
        slot: usize,
    ) -> Result<wgpu::CommandBuffer> {
        let b = &self.b;
        let mut r = self.record_fed_step(pos, (!host_id).then_some(&b.next))?;
        r.enc()
            .copy_buffer_to_buffer(&b.next, 0, &b.ring[slot], 0, 4);
        r.enc()
            .copy_buffer_to_buffer(&b.next_stats, 0, &b.ring[slot], 4, STATS_BYTES);
        Ok(r.finish().0)
    }

    /// The start of a pipelined one-token step at position `pos` with no
    /// host write: its uniforms copied from the `steps` table, its input id
    /// from `fed`'s first word (the previous step's pick) unless None (the
    /// host wrote it into `ids`), then the forward pass and the last-row
    /// head (the argmax into `next`).
    #[cfg_attr(target_arch = "wasm32", allow(dead_code))] // the pipelined decode is native-only
    fn record_fed_step(&self, pos: usize, fed: Option<&wgpu::Buffer>) -> Result<Rec> {
        let b = &self.b;
        let mut r = Rec::new(&self.gpu, None);
        let enc = r.enc();
        let off = pos as u64 * STEP_BYTES;
        enc.copy_buffer_to_buffer(&b.steps, off, &b.step, 0, STEP_BYTES);
        // The fast path's one-token head binds `step`, not `step_one` (see
        // encode_body).
        if !self.one_token_head(1, Mode::Seq) {
            enc.copy_buffer_to_buffer(&b.steps, off, &b.step_one, 0, STEP_BYTES);
        }
        if let Some(from) = fed {
            enc.copy_buffer_to_buffer(from, 0, &b.ids, 0, 4);
        }
        self.encode_body(&mut r, 1, Some(Logits::Last))?;
        Ok(r)
    }

    /// Host-side profiling only: record `steps` pipelined decode steps (the
    /// command buffers [`Self::decode_greedy`] submits) at the current
    /// position. With `submit` each is submitted and waited for (the wait
    /// outside the figures), else dropped unsubmitted so nothing runs on the
    /// device; `between` runs after each step, outside the figures. Returns
    /// each step's thread CPU seconds to record and to submit. The KV cache
    /// is left as it was (`examples/record_steps`).
    #[doc(hidden)]
    #[cfg(not(target_arch = "wasm32"))]
    pub fn profile_record_decode(
        &self,
        steps: usize,
        submit: bool,
        mut between: impl FnMut(),
    ) -> Result<Vec<(f64, f64)>> {
        let mut out = Vec::with_capacity(steps);
        for i in 0..steps {
            let t0 = thread_cpu_s();
            let cmd = self.record_decode_step(self.pos, i == 0, i % RING)?;
            let t1 = thread_cpu_s();
            if submit {
                self.gpu.queue.submit([cmd]);
            } else {
                drop(cmd);
            }
            if let (Some(t0), Some(t1), Some(t2)) = (t0, t1, thread_cpu_s()) {
                out.push((t1 - t0, t2 - t1));
            }
            if submit {
                self.gpu.wait()?;
            }
            between();
        }
        Ok(out)
    }

    /// Greedy decode with no host round trip between steps: feed `first` at
    /// the current position, then each step's argmax feeds the next step on
    /// the GPU. Up to `depth` steps are in flight; their ids come back
    /// through a ring of staging buffers, in order, to `on_token`, which
    /// returns false to stop (EOS). At most `max_steps` steps run. The KV
    /// cache then keeps exactly the steps whose ids were delivered; the
    /// (at most `depth - 1`) steps submitted past a stop are discarded.
    /// The same kernels in the same order as [`Self::forward_next`]: the
    /// ids are bit-identical.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn decode_greedy(
        &mut self,
        first: u32,
        max_steps: usize,
        depth: usize,
        mut on_token: impl FnMut(u32) -> Result<bool>,
    ) -> Result<DecodeRun> {
        self.decode_greedy_checked(first, max_steps, depth, |id, _| on_token(id))
    }

    /// [`Self::decode_greedy`] that also hands `on_step` each step's logits'
    /// [`RowStats`] (read back with the id, same ring slot), so a caller can
    /// stop at the first non-finite step without reading any logits.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn decode_greedy_checked(
        &mut self,
        first: u32,
        max_steps: usize,
        depth: usize,
        mut on_step: impl FnMut(u32, RowStats) -> Result<bool>,
    ) -> Result<DecodeRun> {
        let record = Self::record_decode_step;
        self.decode_ring(first, max_steps, depth, record, |m, slot, _| {
            let (id, stats) = m.take_ring(slot, id_stats)?;
            Ok(if on_step(id, stats)? {
                Deliver::Go
            } else {
                Deliver::Stop
            })
        })
    }

    /// The pipeline of [`Self::decode_greedy_checked`] and
    /// [`Self::decode_sampled`]: feed `first` at the current position;
    /// keep up to `depth` steps in flight, each recorded by `record` (at a
    /// position, with whether its input id is the host's in `ids`, into a
    /// ring slot) and its map asked for; hand each slot, in order, to
    /// `deliver`. [`Deliver::Refeed`] drops the steps in flight behind the
    /// delivered one and goes on from the host's id. At most `max_steps`
    /// steps run; the KV cache then keeps exactly the delivered steps.
    #[cfg(not(target_arch = "wasm32"))]
    fn decode_ring(
        &mut self,
        first: u32,
        max_steps: usize,
        depth: usize,
        record: fn(&Self, usize, bool, usize) -> Result<wgpu::CommandBuffer>,
        mut deliver: impl FnMut(&Self, usize, &mut DecodeRun) -> Result<Deliver>,
    ) -> Result<DecodeRun> {
        self.check_tokens(&[first], Logits::Last)?;
        if self.pos + max_steps > self.max_context {
            return Err(Error::invalid(format!(
                "context full: {} tokens in the cache + {max_steps} decode steps > max context {}",
                self.pos, self.max_context
            )));
        }
        let depth = depth.clamp(1, RING - 1);
        let g = self.gpu.clone();
        let start = self.pos;
        g.queue
            .write_buffer(&self.b.ids, 0, bytemuck::bytes_of(&first));
        let mut run = DecodeRun {
            record_cpu_s: Vec::with_capacity(max_steps),
            ..DecodeRun::default()
        };
        let d0 = g.counters.snapshot().dispatches;
        // steps (since `start`) recorded, and delivered; whether the next
        // step's input is the host's
        let (mut next, mut delivered, mut host_fed) = (0usize, 0usize, true);
        let mut stopped = false;
        let result = (|| -> Result<()> {
            loop {
                while !stopped && next < max_steps && next - delivered < depth {
                    let slot = next % RING;
                    let t = thread_cpu_s();
                    let cmd = record(self, start + next, host_fed, slot)?;
                    let sub = g.queue.submit([cmd]);
                    if let (Some(t0), Some(t1)) = (t, thread_cpu_s()) {
                        run.record_cpu_s.push(t1 - t0);
                    }
                    self.map_ring(slot, sub);
                    host_fed = false;
                    next += 1;
                    run.submitted += 1;
                    if run.submitted == 1 {
                        run.dispatches_per_step = g.counters.snapshot().dispatches - d0;
                    }
                }
                if stopped || delivered == next {
                    return Ok(());
                }
                let slot = delivered % RING;
                delivered += 1;
                match deliver(self, slot, &mut run)? {
                    Deliver::Go => {}
                    Deliver::Stop => stopped = true,
                    Deliver::Refeed(id) => {
                        // The steps in flight ran on the GPU's id: drop
                        // them (their positions are overwritten) and feed
                        // the host's.
                        self.drain_ring()?;
                        run.rolled_back += next - delivered;
                        next = delivered;
                        g.queue
                            .write_buffer(&self.b.ids, 0, bytemuck::bytes_of(&id));
                        host_fed = true;
                    }
                }
            }
        })();
        // Steps still in flight (past a stop, or after an error): wait for
        // them and release their slots so the ring is clean for next time.
        let drained = self.drain_ring();
        self.pos = start + delivered;
        run.kept = delivered;
        result?;
        drained?;
        Ok(run)
    }

    /// Record one sampled decode step at position `pos` without any host
    /// write, as [`Self::record_decode_step`] but for the GPU sampler: the
    /// input id is the previous step's pick (`sample_last.out`) unless
    /// `host_id` (the host wrote it into `ids`); the sampler takes its
    /// uniform and window from the state [`Self::begin_sampled`] set and
    /// appends its pick; the pick and the row's stats are copied into ring
    /// slot `slot`, and the logits row into that slot's row buffer (read
    /// only when the step is left to the host).
    #[cfg(not(target_arch = "wasm32"))]
    fn record_sampled_step(
        &self,
        pos: usize,
        host_id: bool,
        slot: usize,
    ) -> Result<wgpu::CommandBuffer> {
        let (g, b) = (&*self.gpu, &self.b);
        let fed = (!host_id).then_some(&self.sample_last.out);
        let mut r = self.record_fed_step(pos, fed)?;
        self.k.sampler.encode(g, r.pass(), &self.sample_last);
        let (enc, ring) = (r.enc(), &b.ring[slot]);
        let logits = &b.acts[b.index[&Buf::Logits]];
        let len = (self.cfg.vocab_size * 4) as u64;
        enc.copy_buffer_to_buffer(logits, 0, &b.ring_rows[slot], 0, len);
        enc.copy_buffer_to_buffer(&self.sample_last.out, 0, ring, 0, SAMPLED_BYTES);
        enc.copy_buffer_to_buffer(&b.next_stats, 0, ring, SAMPLED_BYTES, STATS_BYTES);
        Ok(r.finish().0)
    }

    /// Sampled decode with no host round trip between steps, as
    /// [`Self::decode_greedy_checked`] for the GPU sampler: feed `first` at
    /// the current position; each step's pick feeds the next step on the
    /// GPU, up to `depth` steps in flight, and comes back through the ring
    /// to `on_step` with its row's stats and, when the GPU left the step to
    /// the host (flagged uncertain), the step's logits row. `on_step`
    /// returns the id to go on with, or [`SampledStep::Stop`]. An id other
    /// than the GPU's pick rolls back: the steps after it are discarded
    /// (the KV cache is truncated to it), the GPU's history and step
    /// counter take the host's id, and the decode goes on from it, so the
    /// ids are exactly the host's. `first_step` is the index (since
    /// [`Self::begin_sampled`]) of the first step's pick; at most
    /// `max_steps` steps run. The KV cache then keeps exactly the steps
    /// whose picks were delivered.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn decode_sampled(
        &mut self,
        first: u32,
        first_step: usize,
        max_steps: usize,
        depth: usize,
        mut on_step: impl FnMut(Picked, RowStats, Option<&[f32]>) -> Result<SampledStep>,
    ) -> Result<DecodeRun> {
        let mut step = first_step;
        let record = Self::record_sampled_step;
        self.decode_ring(first, max_steps, depth, record, |m, slot, run| {
            let (pk, stats) = m.take_ring(slot, pick_stats)?;
            let row = if pk.uncertain() {
                run.host_sampled += 1;
                Some(m.ring_row(slot)?)
            } else {
                None
            };
            step += 1;
            Ok(match on_step(pk, stats, row.as_deref())? {
                SampledStep::Stop => Deliver::Stop,
                SampledStep::Next(id) if id != pk.id => {
                    // the GPU's history and step counter take the host's id
                    run.host_changed += 1;
                    m.fix_sampled(step - 1, id)?;
                    Deliver::Refeed(id)
                }
                SampledStep::Next(_) => Deliver::Go,
            })
        })
    }

    /// Wait until ring slot `slot`'s map is no longer pending and return
    /// its state. A device shared by several threads (the tests' one
    /// `Arc<Gpu>`, a server's) may have its map callback collected by
    /// another thread's poll, which runs it only after that poll returns:
    /// our own poll then finds nothing left to do while the slot still
    /// reads pending. So this yields and polls again until the callback has
    /// run, bounded by wall-clock time rather than by a count of polls (an
    /// idle poll returns at once, so a thousand of them can pass before the
    /// other thread is scheduled again, which is how CI once failed here).
    /// Each poll waits for the slot's own submission only (what
    /// [`Self::map_ring`] was given), not for everything submitted: the
    /// steps in flight behind it keep the device busy while the host reads
    /// this one.
    #[cfg(not(target_arch = "wasm32"))]
    fn wait_ring(&self, slot: usize) -> Result<u8> {
        let state = &self.b.ring_state[slot];
        let sub = crate::gpu::lock(&self.b.ring_sub[slot]).clone();
        let t0 = std::time::Instant::now();
        let mut polls = 0u32;
        loop {
            let s = state.load(Ordering::Acquire);
            if s != MapState::PENDING {
                return Ok(s);
            }
            if t0.elapsed() > RING_MAP_TIMEOUT {
                return Err(Error::Gpu {
                    what: "token readback map".into(),
                    msg: format!(
                        "ring slot {slot}'s map did not complete within {} s ({polls} device polls)",
                        RING_MAP_TIMEOUT.as_secs()
                    ),
                });
            }
            match &sub {
                Some(sub) => self.gpu.wait_for(sub)?,
                // a pending map always has its submission; in case not,
                // wait for everything (still correct, only slower)
                None => self.gpu.wait()?,
            }
            polls += 1;
            if polls > 1 && state.load(Ordering::Acquire) == MapState::PENDING {
                // The GPU work is done (the poll waited for it), so only
                // another thread's callback is outstanding: let it run.
                if polls < 64 {
                    std::thread::yield_now();
                } else {
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
            }
        }
    }

    /// Ask for ring slot `slot`'s map once its step (just submitted as
    /// `sub`) is done; [`Self::take_ring`] waits for it.
    #[cfg(not(target_arch = "wasm32"))]
    fn map_ring(&self, slot: usize, sub: wgpu::SubmissionIndex) {
        *crate::gpu::lock(&self.b.ring_sub[slot]) = Some(sub);
        let state = self.b.ring_state[slot].clone();
        state.store(MapState::PENDING, Ordering::Release);
        self.b.ring[slot]
            .slice(..)
            .map_async(wgpu::MapMode::Read, move |r| {
                let s = if r.is_ok() {
                    MapState::MAPPED
                } else {
                    MapState::FAILED
                };
                state.store(s, Ordering::Release);
            });
    }

    /// Wait for ring slot `slot`'s map, read it with `read` and unmap it.
    #[cfg(not(target_arch = "wasm32"))]
    fn take_ring<T>(&self, slot: usize, read: fn(&[u8]) -> T) -> Result<T> {
        let state = &self.b.ring_state[slot];
        self.wait_ring(slot)?;
        let buf = &self.b.ring[slot];
        if state.swap(MapState::IDLE, Ordering::AcqRel) != MapState::MAPPED {
            return Err(Error::Gpu {
                what: "token readback map".into(),
                msg: "the map of a token ring slot failed".into(),
            });
        }
        let v = {
            let view = buf.slice(..).get_mapped_range().map_err(|e| Error::Gpu {
                what: "token readback view".into(),
                msg: e.to_string(),
            })?;
            read(&view)
        };
        buf.unmap();
        Ok(v)
    }

    /// The logits row ring slot `slot`'s step copied (a sampled step the
    /// GPU left to the host); blocks.
    #[cfg(not(target_arch = "wasm32"))]
    fn ring_row(&self, slot: usize) -> Result<Vec<f32>> {
        let len = (self.cfg.vocab_size * 4) as u64;
        let mut enc = self.gpu.encoder();
        enc.copy_buffer_to_buffer(&self.b.ring_rows[slot], 0, &self.b.logits_staging, 0, len);
        self.gpu.queue.submit([enc.finish()]);
        let bytes = self.gpu.map_staging(&self.b.logits_staging, len)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    /// Wait for every pending ring map and unmap what was mapped, so the
    /// ring is clean for the next decode. Every slot is waited for and
    /// released even when one fails; the first failure is returned.
    #[cfg(not(target_arch = "wasm32"))]
    fn drain_ring(&self) -> Result<()> {
        let mut first_err = None;
        for (slot, (buf, s)) in self.b.ring.iter().zip(&self.b.ring_state).enumerate() {
            if let Err(e) = self.wait_ring(slot) {
                first_err.get_or_insert(e);
                continue;
            }
            if s.swap(MapState::IDLE, Ordering::AcqRel) == MapState::MAPPED {
                buf.unmap();
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Every op of one decode step in order (the embedding, every layer, the
    /// last-row head, argmax), as the bench reports them.
    #[doc(hidden)]
    pub fn decode_ops(&self) -> Vec<StepOp> {
        let mut v: Vec<StepOp> = self
            .decode_items()
            .iter()
            .map(|i| match i {
                Item::Op(o) => o.info.clone(),
                Item::Fused(_, info) => (*info).clone(),
            })
            .collect();
        v.push(StepOp {
            class: "argmax",
            dispatches: 1,
            weight_bytes: 0,
            kv_bytes_per_position: 0,
            window: 0,
        });
        v
    }

    /// What one decode step records, in order (the fast path when fusing,
    /// the head over the stream's one row), the argmax aside.
    fn decode_items(&self) -> Vec<Item<'_>> {
        let mut v: Vec<Item> = self.embed.iter().map(Item::Op).collect();
        for (ops, fast) in self.layers.iter().zip(&self.fast) {
            if self.fuse {
                v.extend(fast.iter().map(|f| match f {
                    Fast::Op(j) => Item::Op(&ops[*j]),
                    f => Item::Fused(f, f.info().expect("a fused item")),
                }));
            } else {
                v.extend(ops.iter().map(Item::Op));
            }
        }
        let head = if self.one_token_head(1, Mode::Seq) {
            &self.head_all
        } else {
            &self.head_last
        };
        v.extend(head.iter().map(Item::Op));
        v
    }

    /// Test-only: record op by op even without taps (to compare the fused
    /// fast path with it).
    #[doc(hidden)]
    pub fn set_fuse(&mut self, fuse: bool) {
        self.fuse = fuse;
    }

    /// Set the step uniforms for one decode token at position `kv_len - 1`
    /// (for [`Self::encode_decode_ops`]; the next forward call overwrites
    /// them).
    #[doc(hidden)]
    pub fn prepare_decode_step(&self, kv_len: usize) -> Result<()> {
        if kv_len == 0 || kv_len > self.max_context {
            return Err(Error::invalid(format!(
                "decode step at KV length {kv_len}: expected 1..={}",
                self.max_context
            )));
        }
        let s = Step::new(1, (kv_len - 1) as u32);
        for buf in [&self.b.step, &self.b.step_one] {
            self.gpu.queue.write_buffer(buf, 0, bytemuck::bytes_of(&s));
        }
        Ok(())
    }

    /// Encode the ops of [`Self::decode_ops`] whose index `select` accepts
    /// into `pass` (no taps, no readback).
    #[doc(hidden)]
    pub fn encode_decode_ops(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        select: &dyn Fn(usize) -> bool,
    ) -> Result<()> {
        let items = self.decode_items();
        for (i, item) in items.iter().enumerate() {
            if !select(i) {
                continue;
            }
            match item {
                Item::Op(op) => self.dispatch(&op.bound, pass, 1)?,
                Item::Fused(f, _) => self.encode_fused(f, pass, 1)?,
            }
        }
        let n_ops = items.len();
        if select(n_ops) {
            self.k
                .argmax
                .encode(&self.gpu, pass, self.argmax_for_one_token(), 1)?;
        }
        Ok(())
    }

    /// Dispatches decoder layer `layer` records in a decode step.
    #[doc(hidden)]
    pub fn layer_dispatches(&self, layer: usize) -> usize {
        let (Some(ops), Some(fast)) = (self.layers.get(layer), self.fast.get(layer)) else {
            return 0;
        };
        if !self.fuse {
            return ops.iter().map(|o| o.info.dispatches).sum();
        }
        fast.iter()
            .map(|f| {
                f.info()
                    .map_or_else(|| ops_dispatches(ops, f), |i| i.dispatches)
            })
            .sum()
    }

    /// The K and V cache of `layer` (`[n_kv, max_context, head_dim]` f32).
    pub fn kv_cache(&self, layer: usize) -> &KvCache {
        &self.kv[layer]
    }

    #[doc(hidden)]
    pub fn faults(&self) -> Faults {
        self.faults
    }
}

/// Program-level faults: the program a buggy port would run (an op
/// forgotten, a convention or a parameter misread). Only the GPU model's
/// program is edited; the CPU reference runs the real one.
fn apply_program_faults(p: &mut Program, f: &Faults) {
    if f.drop_qk_norm {
        p.bypass(|k| matches!(k, OpKind::Norm { heads, .. } if *heads > 1));
    }
    p.edit(|k| match k {
        OpKind::Norm { unit_offset, .. } if f.norm_one_plus_w => *unit_offset = true,
        OpKind::Norm { unit_offset, .. } if f.norm_plain_w => *unit_offset = false,
        OpKind::Linear {
            w: Role::Layer(_, LayerRole::Q | LayerRole::K | LayerRole::V),
            bias,
            ..
        } if f.drop_qkv_bias => *bias = None,
        OpKind::Attention { window, .. } if f.ignore_window => *window = 0,
        _ => {}
    });
}

/// What binding needs besides the kernels and buffers.
struct BindCtx<'a> {
    g: &'a Gpu,
    cfg: &'a ModelConfig,
    weights: &'a Weights,
    max_context: usize,
    tables: &'a [(RopeTable, RopeTables)],
    /// The projections given Dot2 prefill kernels ([`dot2_roles`]), read
    /// once per load.
    dot2: Vec<String>,
}

impl BindCtx<'_> {
    fn weight_any(&self, r: Role) -> Result<&WTensor> {
        self.weights
            .get(r)
            .ok_or_else(|| Error::invalid(format!("the model's weights have no {r:?}")))
    }

    /// A weight read by a kernel without a quantized variant (norms, biases).
    fn weight(&self, r: Role) -> Result<&DeviceTensor> {
        self.weight_any(r)?.require_dense(&format!("{r:?}"))
    }

    /// Bind every op of one scope: kernels built on first use, bind groups
    /// and uniforms created once.
    fn bind_all(
        &self,
        k: &mut Kernels,
        b: &mut Buffers,
        ops: &[Op],
        scope: Scope,
        env: Env,
        cache: Option<&KvCache>,
    ) -> Result<Vec<BoundOp>> {
        let (g, c) = (self.g, self.cfg);
        let mut out = Vec::new();
        for op in ops {
            let step = if env.one_row { &b.step_one } else { &b.step };
            let buf = |x: Buf| &b.acts[b.idx(env, x)];
            let cache_of =
                || cache.ok_or_else(|| Error::invalid("a KV op outside a decoder layer"));
            let mut info = StepOp {
                class: op.class(),
                dispatches: 1,
                weight_bytes: 0,
                kv_bytes_per_position: 0,
                window: 0,
            };
            let mut params = Vec::new();
            let bound = match op.kind {
                OpKind::Embed { y, scale } => {
                    let eb = match (&k.embed, &self.weights.embed) {
                        (EmbedKernel::Dense(kern), WTensor::Dense(e)) => {
                            info.weight_bytes = (e.cols() * e.dtype.bytes_per_elem()) as u64;
                            EmbedBinding::Dense(kern.bind(g, step, &b.ids, e, scale, buf(y))?)
                        }
                        (EmbedKernel::Quant(kern), WTensor::Quant(e)) => {
                            info.weight_bytes = e.device_bytes() / e.rows() as u64;
                            EmbedBinding::Quant(kern.bind(g, step, &b.ids, e, scale, buf(y))?)
                        }
                        _ => {
                            return Err(Error::invalid(
                                "the embedding kernel was built for another table type",
                            ))
                        }
                    };
                    info.dispatches = match &eb {
                        EmbedBinding::Dense(e) => e.groups.len(),
                        EmbedBinding::Quant(e) => e.groups.len(),
                    };
                    Bound::Embed(eb)
                }
                OpKind::Norm {
                    x,
                    w,
                    y,
                    heads,
                    unit_offset,
                } => {
                    let w = self.weight(w)?;
                    let key = (w.dtype, unit_offset);
                    let kern = k.norm.get_or(key, || {
                        RmsNorm::with_faults(g, key.0, key.1, k.faults.norm_eps_outside)
                    })?;
                    let p = g.uniform(
                        "norm.params",
                        &rmsnorm::Params::per_token(
                            x.width(c) / heads,
                            heads,
                            c.rms_norm_eps as f32,
                        )
                        .with_lo(b.lo(env, x), 0),
                    )?;
                    let bg = kern.bind(g, &p, step, buf(x), w.chunks[0].buffer(&w.name)?, buf(y));
                    params.push(p);
                    info.weight_bytes = dense_bytes(w);
                    Bound::Norm {
                        key,
                        bg,
                        rows_per_token: heads as u32,
                    }
                }
                OpKind::Linear { x, w, bias, y } => {
                    // Opt-in Dot2 prefill by tensor role (issue #14; off by
                    // default: the decode GEMVs have no Dot2 form yet, and
                    // its cost is not measured). `WGLLM_DOT2=Q,K` names
                    // LayerRole variants, `Head` the LM head.
                    let dot2 = match w {
                        Role::Layer(_, r) => self.dot2.iter().any(|n| *n == format!("{r:?}")),
                        _ => self.dot2.iter().any(|n| n == "Head"),
                    };
                    let w = self.weight_any(w)?;
                    let bias = bias.map(|r| self.weight(r)).transpose()?;
                    info.weight_bytes = w.device_bytes() + bias.map_or(0, dense_bytes);
                    match w {
                        WTensor::Dense(w) => {
                            let key = (w.dtype, bias.is_some(), dot2);
                            let kern = k.linear.get_or(key, || {
                                Ok(Linear::new(g, key.0, key.1)?.with_dot2(key.2))
                            })?;
                            let lb = kern.bind(g, step, buf(x), w, bias, buf(y))?;
                            info.dispatches = lb.chunks.len();
                            Bound::Linear { key, b: lb }
                        }
                        WTensor::Quant(w) => {
                            let key = (w.ty, bias.is_some());
                            let faults = QFaults {
                                nibble_swap: k.faults.q_nibble_swap,
                                scale_f32: k.faults.q_scale_f32,
                            };
                            let kern = k.qlinear.get_or(key, || {
                                QLinear::with_kernel(
                                    g,
                                    key.0,
                                    key.1,
                                    QKernel::for_adapter(&g.caps),
                                    faults,
                                )
                            })?;
                            let lb = kern.bind(g, step, buf(x), w, bias, buf(y))?;
                            info.dispatches = lb.chunks.len();
                            Bound::QLinear { key, b: lb }
                        }
                    }
                }
                OpKind::Rope { x, y, heads, table } => {
                    let t = &self
                        .tables
                        .iter()
                        .find(|(t, _)| *t == table)
                        .expect("a table for every rope op")
                        .1;
                    let params = rope::Params::new(heads, c.head_dim, self.max_context)?;
                    let bg = k.rope.bind(g, &params, step, buf(x), t, buf(y))?;
                    let bat = k.rope_b.bind(g, &params, &b.bstep, buf(x), t, buf(y))?;
                    Bound::Rope { bg, bat, params }
                }
                OpKind::KvAppend { k: kb, v } => {
                    let cache = cache_of()?;
                    info.dispatches = 1;
                    Bound::KvAppend {
                        bg: k.kv_copy.bind(g, step, buf(kb), buf(v), cache)?,
                        bat: k.kv_copy_b.bind(g, &b.bstep, buf(kb), buf(v), cache)?,
                    }
                }
                OpKind::Attention {
                    q,
                    y,
                    window,
                    scale,
                } => {
                    let params = attention_params(c, self.max_context, window, scale)?;
                    let bg = k
                        .attention
                        .bind(g, &params, step, buf(q), cache_of()?, buf(y))?;
                    let bat =
                        k.attention_b
                            .bind(g, &params, &b.bstep, buf(q), cache_of()?, buf(y))?;
                    info.dispatches = k.attention.dispatches(1);
                    info.kv_bytes_per_position = (2 * c.kv_dim() * 4) as u64;
                    info.window = window;
                    Bound::Attention { bg, bat, params }
                }
                OpKind::Glu { gate, up, y, act } => {
                    let width = y.width(c);
                    let kern = k.glu.get_or(act, || {
                        Elementwise::new(
                            g,
                            match act {
                                Activation::Silu => Binary::SwiGlu,
                                Activation::GeluTanh => Binary::GeluTanhGlu,
                            },
                        )
                    })?;
                    let p = g.uniform("glu.params", &elementwise::Params::new(width))?;
                    let bg = kern.bind(g, &p, step, buf(gate), buf(up), buf(y));
                    params.push(p);
                    Bound::Glu { act, bg, width }
                }
                OpKind::Add { a, b: bb, y } => {
                    let width = y.width(c);
                    let p = g.uniform(
                        "add.params",
                        &elementwise::Params::add_split(width, b.lo(env, a), b.lo(env, y)),
                    )?;
                    let bg = k.add.bind(g, &p, step, buf(a), buf(bb), buf(y));
                    params.push(p);
                    Bound::Add { bg, width }
                }
                OpKind::Softcap { x, cap } => {
                    let width = x.width(c);
                    let kern = k.softcap.get_or((), || Softcap::new(g))?;
                    let p =
                        g.uniform("softcap.params", &elementwise::Params::softcap(width, cap))?;
                    let bg = kern.bind(g, &p, step, buf(x));
                    params.push(p);
                    Bound::Softcap { bg, width }
                }
                OpKind::Copy { x, y } => Bound::Copy {
                    x: b.idx(env, x),
                    y: b.idx(env, y),
                    row_bytes: (x.width(c) * 4) as u64,
                },
            };
            let tap = match (op.tap, op.output()) {
                (Some(t), Some(y)) => Some((scope.tap_name(t), b.idx(env, y), y.width(c))),
                _ => None,
            };
            b.params.extend(params);
            out.push(BoundOp { bound, tap, info });
        }
        Ok(out)
    }
}

impl BindCtx<'_> {
    /// `Add { y: r }` then `Norm { x: r }` over the hidden state, as one
    /// [`AddRmsNorm`] dispatch; None when `w` is not that pattern.
    fn fuse_add_norm(
        &self,
        k: &mut Kernels,
        b: &Buffers,
        w: Option<&[Op]>,
        env: Env,
    ) -> Result<Option<Fast>> {
        let (g, c) = (self.g, self.cfg);
        let Some([add, norm]) = w else {
            return Ok(None);
        };
        let (
            OpKind::Add { a, b: bb, y: r },
            OpKind::Norm {
                x,
                w,
                y,
                heads: 1,
                unit_offset,
            },
        ) = (&add.kind, &norm.kind)
        else {
            return Ok(None);
        };
        if x != r || [*a, *bb, *r].contains(y) || a == r || bb == r {
            return Ok(None);
        }
        let wt = self.weight(*w)?;
        let key = (wt.dtype, *unit_offset);
        let eps_outside = k.faults.norm_eps_outside;
        k.add_norm
            .get_or(key, || AddRmsNorm::new(g, key.0, key.1, eps_outside))?;
        let kern = k.add_norm.get(key);
        let p = g.uniform(
            "add_norm.params",
            &rmsnorm::Params::per_token(r.width(c), 1, c.rms_norm_eps as f32)
                .with_lo(b.lo(env, *a), b.lo(env, *r)),
        )?;
        let buf = |x: Buf| &b.acts[b.idx(env, x)];
        let bg = kern.bind(
            g,
            &p,
            &b.step,
            buf(*a),
            buf(*bb),
            wt.chunks[0].buffer(&wt.name)?,
            buf(*r),
            buf(*y),
        );
        let info = StepOp {
            class: "add+rmsnorm (fused)",
            dispatches: 1,
            weight_bytes: dense_bytes(wt),
            kv_bytes_per_position: 0,
            window: 0,
        };
        Ok(Some(Fast::AddNorm { key, bg, info }))
    }

    /// A layer's fast path: its bound ops in order, except that RoPE(q),
    /// RoPE(k) on the same table and the append of that k (with v) become
    /// one [`RopeKv`] dispatch, a residual add and the norm of its sum one
    /// [`AddRmsNorm`], and, for one-token steps, the q/k/v projections with
    /// that RoPE and append one [`Fast::QkvRope`] and gate/up with their GLU
    /// one [`Fast::GateUp`]. The program stays the one description: this
    /// only finds the patterns in it.
    fn fuse_layer(
        &self,
        k: &mut Kernels,
        b: &Buffers,
        ops: &[Op],
        env: Env,
        cache: &KvCache,
    ) -> Result<Vec<Fast>> {
        let mut out = Vec::new();
        let mut j = 0;
        while j < ops.len() {
            if let Some(f) = self.fuse_qkv_rope(k, b, ops, j, env, cache)? {
                out.push(f);
                j += 6;
                continue;
            }
            if let Some(f) = self.fuse_gate_up(b, ops, j, env)? {
                out.push(f);
                j += 3;
                continue;
            }
            if let Some(f) = self.fuse_add_norm(k, b, ops.get(j..j + 2), env)? {
                out.push(f);
                j += 2;
                continue;
            }
            if let Some(f) = self.fuse_rope_kv(k, b, ops.get(j..j + 3), env, cache)? {
                out.push(f);
                j += 3;
                continue;
            }
            out.push(Fast::Op(j));
            j += 1;
        }
        Ok(out)
    }

    /// RoPE(q), RoPE(k) on the same table and the KV append of that k (with
    /// v), as one [`RopeKv`] dispatch; None when `w` is not that pattern.
    fn fuse_rope_kv(
        &self,
        k: &mut Kernels,
        b: &Buffers,
        w: Option<&[Op]>,
        env: Env,
        cache: &KvCache,
    ) -> Result<Option<Fast>> {
        let (g, c) = (self.g, self.cfg);
        let Some(
            [Op {
                kind:
                    OpKind::Rope {
                        x: qx,
                        y: qy,
                        heads: nh,
                        table: tq,
                    },
                ..
            }, Op {
                kind:
                    OpKind::Rope {
                        x: kx,
                        y: ky,
                        heads: nkv,
                        table: tk,
                    },
                ..
            }, Op {
                kind: OpKind::KvAppend { k: kk, v },
                ..
            }],
        ) = w
        else {
            return Ok(None);
        };
        if !(tq == tk && kk == ky && qy != ky && qy != v && qy != kx) {
            return Ok(None);
        }
        let t = self.table(*tq);
        let params = rope::KvParams {
            n_heads: *nh as u32,
            n_kv_heads: *nkv as u32,
            head_dim: c.head_dim as u32,
            max_positions: t.max_positions as u32,
            max_ctx: cache.params.max_ctx,
            _p: [0; 3],
        };
        let buf = |x: Buf| &b.acts[b.idx(env, x)];
        let bg = k.rope_kv.bind(
            g,
            &params,
            &b.step,
            [buf(*qx), buf(*kx), buf(*v)],
            t,
            buf(*qy),
            cache,
        )?;
        let bat = k.rope_kv_b.bind(
            g,
            &params,
            &b.bstep,
            [buf(*qx), buf(*kx), buf(*v)],
            t,
            buf(*qy),
            cache,
        )?;
        let info = StepOp {
            class: "rope+kv (fused)",
            dispatches: 1,
            weight_bytes: 0,
            kv_bytes_per_position: 0,
            window: 0,
        };
        Ok(Some(Fast::RopeKv {
            bg,
            bat,
            params,
            info,
        }))
    }

    fn table(&self, table: RopeTable) -> &RopeTables {
        &self
            .tables
            .iter()
            .find(|(t, _)| *t == table)
            .expect("a table for every rope op")
            .1
    }

    /// A linear op's dense weight and bias; None for a quantized weight
    /// (the fused kernels have no quantized form).
    fn dense_linear(
        &self,
        w: Role,
        bias: Option<Role>,
    ) -> Result<Option<(&DeviceTensor, Option<&DeviceTensor>)>> {
        let WTensor::Dense(w) = self.weight_any(w)? else {
            return Ok(None);
        };
        let bias = bias.map(|r| self.weight(r)).transpose()?;
        Ok(Some((w, bias)))
    }

    /// ops[j..j + 6] = three linear ops over the same x (q, k, v), then the
    /// [`Fast::RopeKv`] pattern over their outputs, none of which the rest
    /// of the layer reads: one [`fused::qkv_rope`] dispatch for one-token
    /// steps. None when not that pattern or not fusable here.
    fn fuse_qkv_rope(
        &self,
        k: &mut Kernels,
        b: &Buffers,
        ops: &[Op],
        j: usize,
        env: Env,
        cache: &KvCache,
    ) -> Result<Option<Fast>> {
        let Some(w) = ops.get(j..j + 6) else {
            return Ok(None);
        };
        let lin = |o: &Op| match o.kind {
            OpKind::Linear { x, w, bias, y } => Some((x, w, bias, y)),
            _ => None,
        };
        let (Some(q), Some(kk), Some(v)) = (lin(&w[0]), lin(&w[1]), lin(&w[2])) else {
            return Ok(None);
        };
        let (
            OpKind::Rope {
                x: qx,
                y: qy,
                table,
                ..
            },
            OpKind::Rope { x: kx, y: ky, .. },
            OpKind::KvAppend { v: vx, .. },
        ) = (&w[3].kind, &w[4].kind, &w[5].kind)
        else {
            return Ok(None);
        };
        let x = q.0;
        let outs = [q.3, kk.3, v.3];
        let later_reads = |bufs: &[Buf]| {
            ops[j + 6..]
                .iter()
                .any(|o| o.inputs().iter().any(|i| bufs.contains(i)))
        };
        if k.faults.rope_interleaved
            || kk.0 != x
            || v.0 != x
            || (*qx, *kx, *vx) != (q.3, kk.3, v.3)
            || outs.contains(&x)
            || *qy == x
            || later_reads(&[q.3, kk.3, v.3, *ky])
        {
            return Ok(None);
        }
        let Some(fallback_rope) = self.fuse_rope_kv(k, b, Some(&w[3..6]), env, cache)? else {
            return Ok(None);
        };
        let (Some(wq), Some(wk), Some(wv)) = (
            self.dense_linear(q.1, q.2)?,
            self.dense_linear(kk.1, kk.2)?,
            self.dense_linear(v.1, v.2)?,
        ) else {
            return Ok(None);
        };
        let buf = |x: Buf| &b.acts[b.idx(env, x)];
        let Some(f) = fused::qkv_rope(
            self.g,
            &b.step,
            buf(x),
            [wq.0, wk.0, wv.0],
            [wq.1, wk.1, wv.1],
            self.cfg.head_dim,
            self.table(*table),
            buf(*qy),
            cache,
        )?
        else {
            return Ok(None);
        };
        let info = StepOp {
            class: "q/k/v+rope+kv (fused)",
            dispatches: 1,
            weight_bytes: [wq, wk, wv].iter().map(|w| linear_bytes(w.0, w.1)).sum(),
            kv_bytes_per_position: 0,
            window: 0,
        };
        Ok(Some(Fast::QkvRope {
            f,
            fallback: vec![Fast::Op(j), Fast::Op(j + 1), Fast::Op(j + 2), fallback_rope],
            info,
        }))
    }

    /// ops[j..j + 3] = gate and up linear ops over the same x and the GLU of
    /// their outputs, which the rest of the layer does not read: one
    /// [`fused::gate_up`] dispatch for one-token steps. None when not that
    /// pattern or not fusable here.
    fn fuse_gate_up(&self, b: &Buffers, ops: &[Op], j: usize, env: Env) -> Result<Option<Fast>> {
        let Some(
            [Op {
                kind:
                    OpKind::Linear {
                        x,
                        w: wg,
                        bias: bg,
                        y: yg,
                    },
                ..
            }, Op {
                kind:
                    OpKind::Linear {
                        x: xu,
                        w: wu,
                        bias: bu,
                        y: yu,
                    },
                ..
            }, Op {
                kind: OpKind::Glu { gate, up, y, act },
                ..
            }],
        ) = ops.get(j..j + 3)
        else {
            return Ok(None);
        };
        let later_reads = ops[j + 3..]
            .iter()
            .any(|o| o.inputs().iter().any(|i| i == yg || i == yu));
        if xu != x || (gate, up) != (yg, yu) || yg == yu || [x, yg, yu].contains(&y) || later_reads
        {
            return Ok(None);
        }
        let (Some(g), Some(u)) = (self.dense_linear(*wg, *bg)?, self.dense_linear(*wu, *bu)?)
        else {
            return Ok(None);
        };
        let buf = |x: Buf| &b.acts[b.idx(env, x)];
        let gelu_tanh = *act == Activation::GeluTanh;
        let Some(f) = fused::gate_up(
            self.g,
            &b.step,
            buf(*x),
            [g.0, u.0],
            [g.1, u.1],
            gelu_tanh,
            buf(*y),
        )?
        else {
            return Ok(None);
        };
        let info = StepOp {
            class: "gate/up+glu (fused)",
            dispatches: 1,
            weight_bytes: linear_bytes(g.0, g.1) + linear_bytes(u.0, u.1),
            kv_bytes_per_position: 0,
            window: 0,
        };
        Ok(Some(Fast::GateUp {
            f,
            fallback: vec![Fast::Op(j), Fast::Op(j + 1), Fast::Op(j + 2)],
            info,
        }))
    }
}

/// Weight bytes of a linear op's weight and bias.
fn linear_bytes(w: &DeviceTensor, bias: Option<&DeviceTensor>) -> u64 {
    dense_bytes(w) + bias.map_or(0, dense_bytes)
}

/// Dispatches of the plain op `f` (`Fast::Op`) of a layer.
fn ops_dispatches(ops: &[BoundOp], f: &Fast) -> usize {
    match f {
        Fast::Op(j) => ops[*j].info.dispatches,
        _ => 0,
    }
}

/// Bytes a weight occupies on the device.
pub fn tensor_bytes(t: &WTensor) -> u64 {
    t.device_bytes()
}

fn dense_bytes(t: &DeviceTensor) -> u64 {
    t.chunks.iter().map(|c| c.device_bytes()).sum()
}

/// Weight-level faults: transform uploaded weights the way a buggy port
/// would (tests only, so native only: it reads the weights back).
#[cfg(not(target_arch = "wasm32"))]
fn apply_weight_faults(gpu: &Gpu, w: &mut Weights, f: &Faults) -> Result<()> {
    let transpose = |t: &WTensor| -> Result<WTensor> {
        let t = t.require_dense("the transpose faults")?;
        let v = t.read_f32(gpu)?;
        let (r, c) = (t.rows(), t.cols());
        let mut out = vec![0f32; v.len()];
        for i in 0..r {
            for j in 0..c {
                out[j * r + i] = v[i * c + j];
            }
        }
        // Same shape as before: the data is what a transposed store holds.
        let bytes = match t.dtype {
            WDType::Bf16 => crate::tensor::f32_to_bf16_bytes(&out),
            WDType::F32 => bytemuck::cast_slice(&out).to_vec(),
        };
        DeviceTensor::upload_as(gpu, &t.name, t.dtype, &t.shape, &bytes, t.layout())
            .map(WTensor::Dense)
    };
    for l in &mut w.layers {
        if f.transpose_qo {
            l.q = transpose(&l.q)?;
            l.o = transpose(&l.o)?;
        }
        if f.transpose_kv {
            l.k = transpose(&l.k)?;
            l.v = transpose(&l.v)?;
        }
    }
    Ok(())
}

/// Sequence slots and the batched decode step (issue #10): `slots`
/// independent sequences, each with its own region of every layer's KV
/// cache; slot 0 is the sequence of `forward_*`/`decode_greedy`. Native
/// only (their readbacks block; the browser page runs one sequence).
#[cfg(not(target_arch = "wasm32"))]
impl Model {
    /// Sequence slots (KV cache regions) this model holds.
    pub fn slots(&self) -> usize {
        self.slot_pos.len()
    }

    /// Tokens cached in `slot` (0 for a bad index; see [`Self::check_slot`]).
    pub fn slot_position(&self, slot: usize) -> usize {
        match slot {
            0 => self.pos,
            s => self.slot_pos.get(s).copied().unwrap_or(0),
        }
    }

    fn set_slot_position(&mut self, slot: usize, n: usize) {
        match slot {
            0 => self.pos = n,
            s => self.slot_pos[s] = n,
        }
    }

    fn check_slot(&self, slot: usize) -> Result<()> {
        if slot >= self.slots() {
            return Err(Error::invalid(format!(
                "sequence slot {slot} does not exist: the model has {} slot(s) (0..{})",
                self.slots(),
                self.slots()
            )));
        }
        Ok(())
    }

    /// Keep the first `n` tokens cached in `slot` (prefix reuse); 0 resets
    /// it. Positions past `n` are overwritten later (attention reads only
    /// a slot's first `position` entries).
    pub fn slot_truncate(&mut self, slot: usize, n: usize) -> Result<()> {
        self.check_slot(slot)?;
        let have = self.slot_position(slot);
        if n > have {
            return Err(Error::invalid(format!(
                "cannot keep {n} cached tokens of sequence slot {slot}: only {have} are cached"
            )));
        }
        self.set_slot_position(slot, n);
        Ok(())
    }

    fn check_slot_tokens(&self, slot: usize, tokens: &[u32]) -> Result<()> {
        self.check_slot(slot)?;
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            return Err(Error::invalid(format!(
                "sequence slot {slot}: token id {bad} is outside the vocabulary (vocab_size {})",
                self.cfg.vocab_size
            )));
        }
        let pos = self.slot_position(slot);
        if pos + tokens.len() > self.max_context {
            return Err(Error::invalid(format!(
                "sequence slot {slot} is full: {pos} tokens cached + {} new > max context {}",
                tokens.len(),
                self.max_context
            )));
        }
        Ok(())
    }

    /// Appends `tokens` to `slot`'s cache (prefill, in `max_batch` chunks,
    /// or smaller where the batched step uniform holds fewer rows)
    /// and returns the last position's logits (`vocab_size` f32). The same
    /// kernels on the same paths as [`Self::forward_logits`]: slot 0 from
    /// the same position gives bit-identical logits, and so does any slot.
    pub fn prefill_slot(&mut self, slot: usize, tokens: &[u32]) -> Result<Vec<f32>> {
        self.check_slot_tokens(slot, tokens)?;
        if tokens.is_empty() {
            return Err(Error::invalid(format!(
                "sequence slot {slot}: no tokens to prefill"
            )));
        }
        let per = self.max_batch.min(self.b.max_rows as usize);
        let n_chunks = tokens.len().div_ceil(per);
        for (ci, chunk) in tokens.chunks(per).enumerate() {
            let last = ci + 1 == n_chunks;
            let pos = self.slot_position(slot);
            let rows: Vec<(usize, usize)> = (0..chunk.len()).map(|i| (slot, pos + i)).collect();
            let mut r = self.record_slots(chunk, &rows, Mode::SlotPrefill)?;
            self.encode_body(&mut r, chunk.len() as u32, last.then_some(Logits::Last))?;
            if last {
                let b = &self.b;
                let len = (self.cfg.vocab_size * 4) as u64;
                r.enc().copy_buffer_to_buffer(
                    &b.acts[b.index[&Buf::Logits]],
                    0,
                    &b.logits_staging,
                    0,
                    len,
                );
            }
            self.gpu.queue.submit([r.finish().0]);
            self.set_slot_position(slot, pos + chunk.len());
        }
        let len = (self.cfg.vocab_size * 4) as u64;
        let bytes = self.gpu.map_staging(&self.b.logits_staging, len)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    /// ONE forward pass advancing every listed `(slot, token)` by one token:
    /// row i is `steps[i]`'s token at its slot's position, attending to its
    /// slot's cache only. Returns each entry's logits, in the same order.
    /// The linear layers run over all rows in one dispatch per weight, and
    /// every row is reduced in the order of a one-row step, so a sequence's
    /// logits are bit-identical whether it runs alone or beside others.
    pub fn decode_batch(&mut self, steps: &[(usize, u32)]) -> Result<Vec<Vec<f32>>> {
        if steps.is_empty() {
            return Ok(Vec::new());
        }
        let n = steps.len();
        let (mut r, rows) = self.record_batch(steps)?;
        let vocab = self.cfg.vocab_size;
        let len = (n * vocab * 4) as u64;
        {
            let b = &self.b;
            r.enc().copy_buffer_to_buffer(
                &b.acts[b.index[&Buf::Logits]],
                0,
                &b.batch_logits_staging,
                0,
                len,
            );
        }
        self.gpu.queue.submit([r.finish().0]);
        let bytes = self.gpu.map_staging(&self.b.batch_logits_staging, len)?;
        for &(s, p) in &rows {
            self.set_slot_position(s, p + 1);
        }
        let all: Vec<f32> = bytemuck::pod_collect_to_vec(&bytes);
        Ok(all.chunks(vocab).map(<[f32]>::to_vec).collect())
    }

    /// The GPU sampler of `slot`'s rows in a batched step (slot 0 shares
    /// the single sequence's).
    fn slot_sampler(&self, slot: usize) -> &SampleBinding {
        match slot {
            0 => &self.sample_last,
            s => &self.slot_samplers[s - 1],
        }
    }

    /// Start a generation of `slot` on its GPU sampler, for the steps of
    /// [`Self::decode_batch_picks`] that sample it: the settings `d` (`r`
    /// unused) and one uniform per step in `draws` (none for greedy),
    /// written once; each sampled step then takes the next uniform on the
    /// GPU. No repetition penalty (`serve`'s sampler has none): so the
    /// kernel reads no history, and a pick the host decides otherwise needs
    /// no write-back (the step counter advances either way).
    pub fn begin_slot_sampled(&mut self, slot: usize, d: &Draw, draws: &[f32]) -> Result<()> {
        self.check_slot(slot)?;
        if d.penalty != 1.0 {
            return Err(Error::invalid(format!(
                "sequence slot {slot}: the batched GPU sampler takes no repetition penalty \
                 (got {}); sample such a sequence on the host",
                d.penalty
            )));
        }
        let b = self.slot_sampler(slot);
        self.k
            .sampler
            .begin(&self.gpu, b, d, None, &[], draws.len(), draws, 0)?;
        Ok(())
    }

    /// [`Self::decode_batch`] that reads back only what the caller needs:
    /// ONE forward pass advancing every listed slot by one token, then per
    /// row its argmax and finiteness ([`RowStats`], from the argmax kernel
    /// over every row) and, for the rows with `sample`, the pick of the
    /// slot's GPU sampler over its row of the batch logits. 20 bytes per row
    /// and 16 per sampled row come back; the logits only for rows with
    /// `want_row` and for picks the sampler left to the host (copied after
    /// the first readback, with nothing run in between). Each row's logits
    /// are the bits [`Self::decode_batch`] returns; the argmax is
    /// [`crate::sampling::argmax`]'s; a decided pick is the CPU sampler's
    /// for that step's uniform (`ops::sample_full`).
    pub fn decode_batch_picks(&mut self, steps: &[SlotStep]) -> Result<BatchPicks> {
        if steps.is_empty() {
            return Ok(BatchPicks {
                picks: Vec::new(),
                bytes_read: 0,
            });
        }
        let tokens: Vec<(usize, u32)> = steps.iter().map(|s| (s.slot, s.token)).collect();
        let (mut r, rows) = self.record_batch(&tokens)?;
        let n = steps.len();
        let g = self.gpu.clone();
        self.k
            .argmax
            .encode(&g, r.pass(), &self.argmax_batch, n as u32)?;
        for (i, s) in steps.iter().enumerate().filter(|(_, s)| s.sample) {
            let sb = self.slot_sampler(s.slot);
            self.k.sampler.set_row(&g, sb, i)?;
            self.k.sampler.encode(&g, r.pass(), sb);
        }
        let b = &self.b;
        let nu = n as u64;
        let stats_at = 4 * nu;
        let picks_at = stats_at + STATS_BYTES * nu;
        let sampled = steps.iter().filter(|s| s.sample).count() as u64;
        let enc = r.enc();
        enc.copy_buffer_to_buffer(&b.batch_next, 0, &b.picks_staging, 0, 4 * nu);
        enc.copy_buffer_to_buffer(
            &b.batch_stats,
            0,
            &b.picks_staging,
            stats_at,
            STATS_BYTES * nu,
        );
        for (j, s) in steps.iter().filter(|s| s.sample).enumerate() {
            let out = &self.slot_sampler(s.slot).out;
            let at = picks_at + SAMPLED_BYTES * j as u64;
            enc.copy_buffer_to_buffer(out, 0, &b.picks_staging, at, SAMPLED_BYTES);
        }
        // the rows asked for, compacted in `batch_logits_staging`
        let row_bytes = (self.cfg.vocab_size * 4) as u64;
        let mut copied: Vec<usize> = (0..n).filter(|&i| steps[i].want_row).collect();
        for (k, &i) in copied.iter().enumerate() {
            let logits = &b.acts[b.index[&Buf::Logits]];
            let (from, to) = (row_bytes * i as u64, row_bytes * k as u64);
            enc.copy_buffer_to_buffer(logits, from, &b.batch_logits_staging, to, row_bytes);
        }
        g.queue.submit([r.finish().0]);
        let len = picks_at + SAMPLED_BYTES * sampled;
        let bytes = g.map_staging(&b.picks_staging, len)?;
        for &(s, p) in &rows {
            self.set_slot_position(s, p + 1);
        }
        let b = &self.b;
        let w: Vec<u32> = bytemuck::pod_collect_to_vec(&bytes);
        let (ids, rest) = w.split_at(n);
        let (stats, picks) = rest.split_at(STATS_WORDS * n);
        let mut picked = picks.chunks(crate::ops::sample_full::OUT_WORDS);
        let mut out: Vec<SlotPick> = Vec::with_capacity(n);
        for (i, s) in steps.iter().enumerate() {
            let st = &stats[STATS_WORDS * i..STATS_WORDS * (i + 1)];
            let pick = match s.sample {
                true => Picked::from_words(picked.next().expect("one per sampled row")),
                false => Picked::from_words(&[ids[i], 0, 0, 0]),
            };
            out.push(SlotPick {
                pick,
                stats: RowStats::from_words([st[0], st[1], st[2], st[3]]),
                row: None,
            });
        }
        // the picks left to the host need their rows too (the logits buffer
        // still holds this pass's)
        let flagged: Vec<usize> = (0..n)
            .filter(|&i| out[i].pick.uncertain() && !steps[i].want_row)
            .collect();
        if !flagged.is_empty() {
            let mut enc = g.encoder();
            let logits = &b.acts[b.index[&Buf::Logits]];
            for (k, &i) in flagged.iter().enumerate() {
                let (from, to) = (row_bytes * i as u64, row_bytes * (copied.len() + k) as u64);
                enc.copy_buffer_to_buffer(logits, from, &b.batch_logits_staging, to, row_bytes);
            }
            g.queue.submit([enc.finish()]);
            copied.extend(flagged);
        }
        let mut bytes_read = len;
        if !copied.is_empty() {
            let len = row_bytes * copied.len() as u64;
            let rows = g.map_staging(&b.batch_logits_staging, len)?;
            bytes_read += len;
            let all: Vec<f32> = bytemuck::pod_collect_to_vec(&rows);
            for (&i, row) in copied.iter().zip(all.chunks(self.cfg.vocab_size)) {
                out[i].row = Some(row.to_vec());
            }
        }
        Ok(BatchPicks {
            picks: out,
            bytes_read,
        })
    }

    /// Check a batched step's `(slot, token)` rows, write its uniforms and
    /// start its recording with the forward pass over all rows (the head
    /// over every row); also the rows' (slot, position).
    fn record_batch(&self, steps: &[(usize, u32)]) -> Result<(Rec, Vec<(usize, usize)>)> {
        let mut seen = vec![false; self.slots()];
        for &(slot, tok) in steps {
            self.check_slot_tokens(slot, &[tok])?;
            if std::mem::replace(&mut seen[slot], true) {
                return Err(Error::invalid(format!(
                    "sequence slot {slot} appears twice in one decode batch"
                )));
            }
        }
        let tokens: Vec<u32> = steps.iter().map(|s| s.1).collect();
        let rows: Vec<(usize, usize)> = steps
            .iter()
            .map(|&(s, _)| (s, self.slot_position(s)))
            .collect();
        let mut r = self.record_slots(&tokens, &rows, Mode::SlotDecode)?;
        self.encode_body(&mut r, steps.len() as u32, Some(Logits::All))?;
        Ok((r, rows))
    }

    /// Write the uniforms and ids of a slot pass over `tokens`, row i at
    /// `rows[i]` = (slot, position), and start its recording.
    fn record_slots(&self, tokens: &[u32], rows: &[(usize, usize)], mode: Mode) -> Result<Rec> {
        let g: &Gpu = &self.gpu;
        let n = tokens.len();
        if n == 0 || n > self.b.max_rows as usize || n > self.max_batch {
            return Err(Error::invalid(format!(
                "a slot pass of {n} rows: expected 1..={}",
                self.max_batch.min(self.b.max_rows as usize)
            )));
        }
        let (_, first) = rows[0];
        let (_, last) = rows[n - 1];
        let head = Step::new(n as u32, first as u32);
        let mut bstep: Vec<u8> = bytemuck::bytes_of(&head).to_vec();
        for &(slot, pos) in rows {
            let row = kv_copy::RowPos {
                slot: slot as u32,
                pos: pos as u32,
                _p: [0; 2],
            };
            bstep.extend_from_slice(bytemuck::bytes_of(&row));
        }
        g.queue.write_buffer(&self.b.bstep, 0, &bstep);
        g.queue
            .write_buffer(&self.b.step, 0, bytemuck::bytes_of(&head));
        g.queue
            .write_buffer(&self.b.ids, 0, bytemuck::cast_slice(tokens));
        let last_step = Step::new(1, last as u32);
        g.queue
            .write_buffer(&self.b.step_one, 0, bytemuck::bytes_of(&last_step));
        let mut r = Rec::new(g, None);
        r.mode = mode;
        Ok(r)
    }
}
