//! The GPU model: weights, preallocated activations and KV cache, bind groups
//! built once at load, and the per-step command stream (one submission per
//! step) with optional taps read back for verification.

use std::path::Path;
use std::sync::Arc;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Step};
use crate::loader::{Checkpoint, LoadDType, MemoryPlan, Weights};
use crate::ops::argmax::{Argmax, ArgmaxBinding};
use crate::ops::attention::{self, Attention};
use crate::ops::elementwise::{self, Binary, Elementwise};
use crate::ops::embedding::{Embedding, EmbeddingBinding};
use crate::ops::kv_copy::{self, KvCache, KvCopy};
use crate::ops::matmul::{Linear, LinearBinding};
use crate::ops::rmsnorm::{self, RmsNorm};
use crate::ops::rope::{self, Rope, RopeTables};
use crate::taps::TapSet;
use crate::tensor::{DeviceTensor, WDType};

/// Deliberate bugs for proving that `verify` catches real porting mistakes.
/// Test-only: not reachable from the CLI. Weight faults are applied to the
/// uploaded weights; kernel faults compile a wrong kernel variant.
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
    /// RMSNorm weight applied as (1 + w) (Gemma convention).
    pub norm_one_plus_w: bool,
    /// q/k/v projection biases dropped.
    pub drop_qkv_bias: bool,
}

#[derive(Clone, Debug)]
pub struct ModelOptions {
    /// KV cache length; default: the config's max_position_embeddings,
    /// capped at 4096 and by what one storage binding can hold.
    pub max_context: Option<usize>,
    /// Most tokens in one prefill pass (longer prompts go in chunks).
    pub max_batch: usize,
    pub dtype: LoadDType,
    #[doc(hidden)]
    pub faults: Faults,
}

impl Default for ModelOptions {
    fn default() -> Self {
        ModelOptions {
            max_context: None,
            max_batch: 128,
            dtype: LoadDType::Auto,
            faults: Faults::default(),
        }
    }
}

/// What a generation step reads back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Readback {
    /// The argmax token id (4 bytes).
    NextId,
    /// The last token's logits.
    Logits,
}

/// Which logits a pass computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token's (generation).
    Last,
    /// Every token's (verification; limited to `logits_rows` tokens).
    All,
}

/// Kernels, compiled once per weight dtype they meet.
struct Kernels {
    norm: Vec<(WDType, RmsNorm)>,
    linear: Vec<((WDType, bool), Linear)>,
    embed: Embedding,
    rope: Rope,
    attention: Attention,
    kv_copy: KvCopy,
    swiglu: Elementwise,
    add: Elementwise,
    argmax: Argmax,
    faults: Faults,
}

impl Kernels {
    fn norm(&mut self, gpu: &Gpu, dt: WDType) -> Result<&RmsNorm> {
        if let Some(i) = self.norm.iter().position(|(d, _)| *d == dt) {
            return Ok(&self.norm[i].1);
        }
        let f = self.faults;
        let k = RmsNorm::with_faults(gpu, dt, f.norm_eps_outside, f.norm_one_plus_w)?;
        self.norm.push((dt, k));
        Ok(&self.norm.last().expect("pushed").1)
    }
    fn linear(&mut self, gpu: &Gpu, dt: WDType, bias: bool) -> Result<&Linear> {
        if let Some(i) = self.linear.iter().position(|(d, _)| *d == (dt, bias)) {
            return Ok(&self.linear[i].1);
        }
        let k = Linear::new(gpu, dt, bias)?;
        self.linear.push(((dt, bias), k));
        Ok(&self.linear.last().expect("pushed").1)
    }
    fn norm_for(&self, dt: WDType) -> &RmsNorm {
        &self
            .norm
            .iter()
            .find(|(d, _)| *d == dt)
            .expect("built at load")
            .1
    }
    fn linear_for(&self, lb: &Bound) -> &Linear {
        &self
            .linear
            .iter()
            .find(|(d, _)| *d == lb.key)
            .expect("built at load")
            .1
    }
}

/// A linear layer's bindings and the kernel key it was bound with.
struct Bound {
    key: (WDType, bool),
    b: LinearBinding,
}

/// A norm's bind group and its weight dtype.
struct NormBound {
    dt: WDType,
    bg: wgpu::BindGroup,
}

/// Activation buffers, sized for `max_batch` tokens.
struct Buffers {
    step: wgpu::Buffer,
    step_one: wgpu::Buffer,
    ids: wgpu::Buffer,
    h: [wgpu::Buffer; 2],
    attn_norm: wgpu::Buffer,
    q: wgpu::Buffer,
    k: wgpu::Buffer,
    v: wgpu::Buffer,
    q_rope: wgpu::Buffer,
    k_rope: wgpu::Buffer,
    attn: wgpu::Buffer,
    attn_out: wgpu::Buffer,
    resid: wgpu::Buffer,
    mlp_norm: wgpu::Buffer,
    gate: wgpu::Buffer,
    up: wgpu::Buffer,
    act: wgpu::Buffer,
    mlp_out: wgpu::Buffer,
    norm: wgpu::Buffer,
    last: wgpu::Buffer,
    logits: wgpu::Buffer,
    next: wgpu::Buffer,
    /// Persistent readback buffers for generation (no per-token allocation).
    next_staging: wgpu::Buffer,
    logits_staging: wgpu::Buffer,
    /// Uniforms shared by many bind groups (kept alive here).
    _params: Vec<wgpu::Buffer>,
}

struct LayerBind {
    attn_norm: NormBound,
    q: Bound,
    k: Bound,
    v: Bound,
    q_rope: wgpu::BindGroup,
    k_rope: wgpu::BindGroup,
    kv_copy: wgpu::BindGroup,
    attention: wgpu::BindGroup,
    o: Bound,
    resid_add: wgpu::BindGroup,
    mlp_norm: NormBound,
    gate: Bound,
    up: Bound,
    swiglu: wgpu::BindGroup,
    down: Bound,
    out_add: wgpu::BindGroup,
}

struct HeadBind {
    embed: EmbeddingBinding,
    norm: NormBound,
    /// lm_head over every token's norm output (n_tokens from `step`).
    lm_all: Bound,
    /// lm_head over the last token only (`last` buffer, `step_one`).
    lm_last: Bound,
    argmax_last: ArgmaxBinding,
}

/// Static shapes of the per-head ops.
struct Shapes {
    q_rope: rope::Params,
    k_rope: rope::Params,
    attention: attention::Params,
    kv: kv_copy::Params,
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
    k: Kernels,
    b: Buffers,
    shapes: Shapes,
    layers: Vec<LayerBind>,
    head: HeadBind,
    kv: Vec<KvCache>,
    _rope_tables: RopeTables,
    /// Tokens already in the KV cache.
    pos: usize,
    faults: Faults,
}

/// Records one step: compute passes, interrupted only for tap copies.
struct Rec {
    enc: Option<wgpu::CommandEncoder>,
    pass: Option<wgpu::ComputePass<'static>>,
    taps: Option<TapPlan>,
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
        let ckpt = Checkpoint::open(dir)?;
        Self::from_checkpoint(gpu, &ckpt, opts)
    }

    pub fn from_checkpoint(gpu: Arc<Gpu>, ckpt: &Checkpoint, opts: &ModelOptions) -> Result<Self> {
        let cfg = ckpt.config.clone();
        let plan = MemoryPlan::new(&cfg, ckpt, opts.dtype, &gpu.caps)?;
        let mut weights = Weights::upload(&gpu, ckpt, &plan)?;
        apply_weight_faults(&gpu, &mut weights, &opts.faults)?;
        Self::build(gpu, cfg, weights, opts)
    }

    fn build(
        gpu: Arc<Gpu>,
        cfg: ModelConfig,
        weights: Weights,
        opts: &ModelOptions,
    ) -> Result<Self> {
        let g: &Gpu = &gpu;
        let hidden = cfg.hidden_size;
        let inter = cfg.intermediate_size;
        let qd = cfg.q_dim();
        let kvd = cfg.kv_dim();
        let vocab = cfg.vocab_size;
        let hd = cfg.head_dim;
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let batch = opts.max_batch.max(1);
        // KV cache: one binding per layer for K and for V, [n_kv, ctx, hd] f32.
        let per_pos = (nkv * hd * 4) as u64;
        let ctx_cap = (g.caps.max_binding / per_pos) as usize;
        let max_context = match opts.max_context {
            Some(c) => c,
            None => cfg.max_position_embeddings.clamp(1, 4096).min(ctx_cap),
        };
        if max_context == 0 {
            return Err(Error::invalid("max context must be at least 1"));
        }
        let logits_rows = ((g.caps.max_binding / (vocab as u64 * 4)) as usize).clamp(1, batch);
        let f = opts.faults;
        let mut k = Kernels {
            norm: Vec::new(),
            linear: Vec::new(),
            embed: Embedding::new(g, weights.embed.dtype)?,
            rope: Rope::with_faults(g, f.rope_interleaved)?,
            attention: Attention::with_faults(g, hd, f.gqa_modulo)?,
            kv_copy: KvCopy::new(g)?,
            swiglu: Elementwise::new(g, Binary::SwiGlu)?,
            add: Elementwise::new(g, Binary::Add)?,
            argmax: Argmax::new(g)?,
            faults: f,
        };
        let shapes = Shapes {
            q_rope: rope::Params::new(nh, hd, max_context)?,
            k_rope: rope::Params::new(nkv, hd, max_context)?,
            attention: attention::Params::new(nh, nkv, hd, max_context)?,
            kv: kv_copy::Params::new(nkv, hd, max_context)?,
        };
        let tables = RopeTables::upload(g, hd, cfg.rope_theta, &cfg.rope_scaling, max_context)?;
        let b = Buffers {
            step: g.uniform("step", &Step::new(0, 0))?,
            step_one: g.uniform("step_one", &Step::new(1, 0))?,
            ids: g.storage("ids", (batch * 4) as u64),
            h: [
                f32_buf(g, "h0", batch * hidden),
                f32_buf(g, "h1", batch * hidden),
            ],
            attn_norm: f32_buf(g, "attn_norm", batch * hidden),
            q: f32_buf(g, "q", batch * qd),
            k: f32_buf(g, "k", batch * kvd),
            v: f32_buf(g, "v", batch * kvd),
            q_rope: f32_buf(g, "q_rope", batch * qd),
            k_rope: f32_buf(g, "k_rope", batch * kvd),
            attn: f32_buf(g, "attn", batch * qd),
            attn_out: f32_buf(g, "attn_out", batch * hidden),
            resid: f32_buf(g, "resid", batch * hidden),
            mlp_norm: f32_buf(g, "mlp_norm", batch * hidden),
            gate: f32_buf(g, "gate", batch * inter),
            up: f32_buf(g, "up", batch * inter),
            act: f32_buf(g, "act", batch * inter),
            mlp_out: f32_buf(g, "mlp_out", batch * hidden),
            norm: f32_buf(g, "norm", batch * hidden),
            last: f32_buf(g, "last", hidden),
            logits: f32_buf(g, "logits", logits_rows * vocab),
            next: g.storage("next", 4),
            next_staging: g.staging("next_staging", 4),
            logits_staging: g.staging("logits_staging", (vocab * 4) as u64),
            _params: Vec::new(),
        };
        let norm_p = g.uniform(
            "norm.params",
            &rmsnorm::Params::new(hidden, cfg.rms_norm_eps as f32),
        )?;
        let hid_p = g.uniform("ew.hidden", &elementwise::Params::new(hidden))?;
        let inter_p = g.uniform("ew.inter", &elementwise::Params::new(inter))?;

        // Bind helpers: each builds its kernel variant on first use.
        fn lin(
            k: &mut Kernels,
            g: &Gpu,
            step: &wgpu::Buffer,
            x: &wgpu::Buffer,
            w: &DeviceTensor,
            bias: Option<&DeviceTensor>,
            y: &wgpu::Buffer,
        ) -> Result<Bound> {
            let key = (w.dtype, bias.is_some());
            let b = k.linear(g, key.0, key.1)?.bind(g, step, x, w, bias, y)?;
            Ok(Bound { key, b })
        }
        fn norm(
            k: &mut Kernels,
            g: &Gpu,
            p: &wgpu::Buffer,
            step: &wgpu::Buffer,
            x: &wgpu::Buffer,
            w: &DeviceTensor,
            y: &wgpu::Buffer,
        ) -> Result<NormBound> {
            let bg = k
                .norm(g, w.dtype)?
                .bind(g, p, step, x, &w.chunks[0].buffer, y);
            Ok(NormBound { dt: w.dtype, bg })
        }

        let mut kv = Vec::new();
        let mut layers = Vec::new();
        for (i, lw) in weights.layers.iter().enumerate() {
            let cache = KvCache::new(g, shapes.kv)?;
            let h_in = &b.h[i % 2];
            let h_out = &b.h[(i + 1) % 2];
            fn keep(t: &Option<DeviceTensor>, drop: bool) -> Option<&DeviceTensor> {
                t.as_ref().filter(|_| !drop)
            }
            let qkv_bias = |t| keep(t, f.drop_qkv_bias);
            let lb = LayerBind {
                attn_norm: norm(
                    &mut k,
                    g,
                    &norm_p,
                    &b.step,
                    h_in,
                    &lw.attn_norm,
                    &b.attn_norm,
                )?,
                q: lin(
                    &mut k,
                    g,
                    &b.step,
                    &b.attn_norm,
                    &lw.q,
                    qkv_bias(&lw.q_bias),
                    &b.q,
                )?,
                k: lin(
                    &mut k,
                    g,
                    &b.step,
                    &b.attn_norm,
                    &lw.k,
                    qkv_bias(&lw.k_bias),
                    &b.k,
                )?,
                v: lin(
                    &mut k,
                    g,
                    &b.step,
                    &b.attn_norm,
                    &lw.v,
                    qkv_bias(&lw.v_bias),
                    &b.v,
                )?,
                q_rope: k
                    .rope
                    .bind(g, &shapes.q_rope, &b.step, &b.q, &tables, &b.q_rope)?,
                k_rope: k
                    .rope
                    .bind(g, &shapes.k_rope, &b.step, &b.k, &tables, &b.k_rope)?,
                kv_copy: k.kv_copy.bind(g, &b.step, &b.k_rope, &b.v, &cache)?,
                attention: k.attention.bind(
                    g,
                    &shapes
                        .attention
                        .with_window(cfg.layer_sliding_window(i).unwrap_or(0)),
                    &b.step,
                    &b.q_rope,
                    &cache,
                    &b.attn,
                )?,
                o: lin(
                    &mut k,
                    g,
                    &b.step,
                    &b.attn,
                    &lw.o,
                    lw.o_bias.as_ref(),
                    &b.attn_out,
                )?,
                resid_add: k.add.bind(g, &hid_p, &b.step, h_in, &b.attn_out, &b.resid),
                mlp_norm: norm(
                    &mut k,
                    g,
                    &norm_p,
                    &b.step,
                    &b.resid,
                    &lw.mlp_norm,
                    &b.mlp_norm,
                )?,
                gate: lin(
                    &mut k,
                    g,
                    &b.step,
                    &b.mlp_norm,
                    &lw.gate,
                    lw.gate_bias.as_ref(),
                    &b.gate,
                )?,
                up: lin(
                    &mut k,
                    g,
                    &b.step,
                    &b.mlp_norm,
                    &lw.up,
                    lw.up_bias.as_ref(),
                    &b.up,
                )?,
                swiglu: k.swiglu.bind(g, &inter_p, &b.step, &b.gate, &b.up, &b.act),
                down: lin(
                    &mut k,
                    g,
                    &b.step,
                    &b.act,
                    &lw.down,
                    lw.down_bias.as_ref(),
                    &b.mlp_out,
                )?,
                out_add: k.add.bind(g, &hid_p, &b.step, &b.resid, &b.mlp_out, h_out),
            };
            layers.push(lb);
            kv.push(cache);
        }
        let h_last = &b.h[weights.layers.len() % 2];
        let lm_w = weights.lm_head();
        let head = HeadBind {
            embed: k.embed.bind(g, &b.step, &b.ids, &weights.embed, &b.h[0])?,
            norm: norm(&mut k, g, &norm_p, &b.step, h_last, &weights.norm, &b.norm)?,
            lm_all: lin(&mut k, g, &b.step, &b.norm, lm_w, None, &b.logits)?,
            lm_last: lin(&mut k, g, &b.step_one, &b.last, lm_w, None, &b.logits)?,
            argmax_last: k.argmax.bind(g, &b.step_one, &b.logits, vocab, &b.next)?,
        };
        let b = Buffers {
            _params: vec![norm_p, hid_p, inter_p],
            ..b
        };
        Ok(Model {
            gpu,
            cfg,
            weights,
            max_context,
            max_batch: batch,
            logits_rows,
            k,
            b,
            shapes,
            layers,
            head,
            kv,
            _rope_tables: tables,
            pos: 0,
            faults: f,
        })
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
    pub fn forward_next(&mut self, tokens: &[u32]) -> Result<u32> {
        let bytes = self.run_last(tokens, Readback::NextId)?;
        Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    /// Run `tokens` and return the last token's logits (for sampling).
    pub fn forward_logits(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let bytes = self.run_last(tokens, Readback::Logits)?;
        Ok(bytemuck::cast_slice(&bytes).to_vec())
    }

    /// Run `tokens` in `max_batch` chunks (one submission each); the last
    /// chunk computes the last token's logits and argmax and copies what
    /// `readback` asks for into a persistent staging buffer in the same
    /// submission.
    fn run_last(&mut self, tokens: &[u32], readback: Readback) -> Result<Vec<u8>> {
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
            Readback::NextId => (&self.b.next_staging, 4),
            Readback::Logits => (&self.b.logits_staging, (self.cfg.vocab_size * 4) as u64),
        };
        self.gpu.map_staging(staging, len)
    }

    /// Run `tokens` in one pass with every tap read back (verification).
    /// Limited to `min(max_batch, logits_rows)` tokens.
    pub fn forward_taps(&mut self, tokens: &[u32]) -> Result<TapSet> {
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
        let bytes = self.gpu.map_staging(&plan.staging, plan.offset)?;
        self.pos += tokens.len();
        let mut set = TapSet::default();
        for (name, rows, cols, off) in plan.entries {
            let s = &bytes[off as usize..off as usize + rows * cols * 4];
            set.push(name, rows, cols, bytemuck::cast_slice(s).to_vec());
        }
        Ok(set)
    }

    fn tap_bytes(&self, n: usize) -> u64 {
        let c = &self.cfg;
        // attn_norm, attn_out, resid_attn, mlp_norm, mlp_out, out; q, q_rope,
        // attn; k, v, k_rope
        let per_layer = 6 * c.hidden_size + 3 * c.q_dim() + 3 * c.kv_dim();
        let total = c.hidden_size * 2 + per_layer * c.num_hidden_layers + c.vocab_size;
        (total * n * 4) as u64
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
        let c = &self.cfg;
        let (hidden, inter, qd, kvd) = (c.hidden_size, c.intermediate_size, c.q_dim(), c.kv_dim());
        let k = &self.k;
        let b = &self.b;
        let sh = &self.shapes;
        let mut r = Rec::new(g, plan);
        let lin = |lb: &Bound, r: &mut Rec, n: u32| k.linear_for(lb).encode(g, r.pass(), &lb.b, n);
        let norm = |nb: &NormBound, r: &mut Rec| k.norm_for(nb.dt).encode(g, r.pass(), &nb.bg, nu);
        k.embed.encode(g, r.pass(), &self.head.embed, nu);
        r.tap(|| "embed".into(), &b.h[0], n, hidden);
        for (i, l) in self.layers.iter().enumerate() {
            let h_out = &b.h[(i + 1) % 2];
            norm(&l.attn_norm, &mut r);
            r.tap(|| format!("layers.{i}.attn_norm"), &b.attn_norm, n, hidden);
            lin(&l.q, &mut r, nu)?;
            r.tap(|| format!("layers.{i}.q"), &b.q, n, qd);
            lin(&l.k, &mut r, nu)?;
            r.tap(|| format!("layers.{i}.k"), &b.k, n, kvd);
            lin(&l.v, &mut r, nu)?;
            r.tap(|| format!("layers.{i}.v"), &b.v, n, kvd);
            k.rope.encode(g, r.pass(), &l.q_rope, &sh.q_rope, nu);
            r.tap(|| format!("layers.{i}.q_rope"), &b.q_rope, n, qd);
            k.rope.encode(g, r.pass(), &l.k_rope, &sh.k_rope, nu);
            r.tap(|| format!("layers.{i}.k_rope"), &b.k_rope, n, kvd);
            k.kv_copy.encode(g, r.pass(), &l.kv_copy, &sh.kv, nu);
            k.attention
                .encode(g, r.pass(), &l.attention, &sh.attention, nu);
            r.tap(|| format!("layers.{i}.attn"), &b.attn, n, qd);
            lin(&l.o, &mut r, nu)?;
            r.tap(|| format!("layers.{i}.attn_out"), &b.attn_out, n, hidden);
            k.add.encode(g, r.pass(), &l.resid_add, nu, hidden);
            r.tap(|| format!("layers.{i}.resid_attn"), &b.resid, n, hidden);
            norm(&l.mlp_norm, &mut r);
            r.tap(|| format!("layers.{i}.mlp_norm"), &b.mlp_norm, n, hidden);
            lin(&l.gate, &mut r, nu)?;
            lin(&l.up, &mut r, nu)?;
            k.swiglu.encode(g, r.pass(), &l.swiglu, nu, inter);
            lin(&l.down, &mut r, nu)?;
            r.tap(|| format!("layers.{i}.mlp_out"), &b.mlp_out, n, hidden);
            k.add.encode(g, r.pass(), &l.out_add, nu, hidden);
            r.tap(|| format!("layers.{i}.out"), h_out, n, hidden);
        }
        norm(&self.head.norm, &mut r);
        r.tap(|| "norm".into(), &b.norm, n, hidden);
        match logits {
            None => {}
            Some(Logits::All) => {
                lin(&self.head.lm_all, &mut r, nu)?;
                r.tap(|| "logits".into(), &b.logits, n, c.vocab_size);
            }
            Some(Logits::Last) => {
                let row = ((n - 1) * hidden * 4) as u64;
                r.enc()
                    .copy_buffer_to_buffer(&b.norm, row, &b.last, 0, (hidden * 4) as u64);
                lin(&self.head.lm_last, &mut r, 1)?;
                k.argmax.encode(g, r.pass(), &self.head.argmax_last, 1)?;
            }
        }
        match readback {
            None => {}
            Some(Readback::NextId) => {
                r.enc()
                    .copy_buffer_to_buffer(&b.next, 0, &b.next_staging, 0, 4);
            }
            Some(Readback::Logits) => {
                let len = (c.vocab_size * 4) as u64;
                r.enc()
                    .copy_buffer_to_buffer(&b.logits, 0, &b.logits_staging, 0, len);
            }
        }
        Ok(r.finish())
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

/// Weight-level faults: transform uploaded weights the way a buggy port would.
fn apply_weight_faults(gpu: &Gpu, w: &mut Weights, f: &Faults) -> Result<()> {
    let transpose = |t: &DeviceTensor| -> Result<DeviceTensor> {
        let v = t.read_f32(gpu)?;
        let (r, c) = (t.rows(), t.cols());
        let mut out = vec![0f32; v.len()];
        for i in 0..r {
            for j in 0..c {
                out[j * r + i] = v[i * c + j];
            }
        }
        // Same shape as before: the data is what a transposed store holds.
        DeviceTensor::from_f32(gpu, &t.name, t.dtype, &t.shape, &out)
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
