//! The layer program: the one description of what a model computes.
//!
//! A [`Program`] is an ordered list of [`Op`]s — each with its input and
//! output activation buffers ([`Buf`]), its weights (loader [`Role`]s) and
//! the name of its tap — for the embedding, for every decoder layer, and for
//! the head (final norm, lm_head, soft-cap). Everything that depends on the
//! order of operations is derived from it, never written out again:
//!
//! - `model::Model` binds every op at load and records them in order;
//! - `reference::CpuModel` runs the same ops with the kernels' CPU references;
//! - the tap names, their order and their sizes ([`Program::taps`]);
//! - `bench`'s per-op breakdown and the bytes a decode step reads.
//!
//! A family is a function that lists its layer's ops in the order of the
//! paper (see [`llama_layer`], [`qwen3_layer`], [`gemma3_layer`]); what every
//! family shares (the attention block, the gated MLP, biases as the config
//! says) is in the [`LayerBuilder`] helpers they call.

use std::collections::BTreeSet;

use crate::config::RopeScaling;
use crate::config::{Arch, ModelConfig};
use crate::error::Result;
use crate::loader::{LayerRole, Role};
use crate::ops::attention;

/// A named activation buffer: f32 `[n_tokens, width]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Buf {
    /// The residual stream entering a layer (the embedding's output for
    /// layer 0; the last layer's output in the head).
    Stream,
    /// The residual stream leaving a layer (the next layer's `Stream`).
    StreamOut,
    AttnNorm,
    Q,
    K,
    V,
    QNorm,
    KNorm,
    QRope,
    KRope,
    Attn,
    AttnOut,
    PostAttnNorm,
    Resid,
    MlpNorm,
    Gate,
    Up,
    Act,
    MlpOut,
    PostMlpNorm,
    Norm,
    Logits,
}

impl Buf {
    /// Whether it holds the residual stream (entering or leaving a layer, or
    /// between its two residual adds): the buffers kept as (hi, lo) pairs
    /// (common.wgsl's `stream_add`).
    pub fn is_stream(self) -> bool {
        matches!(self, Buf::Stream | Buf::StreamOut | Buf::Resid)
    }

    /// Floats per token.
    pub fn width(self, c: &ModelConfig) -> usize {
        use Buf::*;
        match self {
            Q | QNorm | QRope | Attn => c.q_dim(),
            K | V | KNorm | KRope => c.kv_dim(),
            Gate | Up | Act => c.intermediate_size,
            Logits => c.vocab_size,
            Stream | StreamOut | AttnNorm | AttnOut | PostAttnNorm | Resid | MlpNorm | MlpOut
            | PostMlpNorm | Norm => c.hidden_size,
        }
    }
}

/// The gated MLP's activation on the gate projection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `silu` (Llama, Mistral, Qwen2, Qwen3).
    Silu,
    /// `gelu_pytorch_tanh` (Gemma).
    GeluTanh,
}

/// Which cos/sin table a RoPE op reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RopeTable {
    /// `rope_theta` and `rope_scaling` (every layer of most families).
    Global,
    /// Gemma 3's sliding-window layers (their own theta, no scaling).
    Sliding,
}

/// One operation.
#[derive(Clone, Debug, PartialEq)]
pub enum OpKind {
    /// Gather the token ids' embedding rows, times `scale`.
    Embed { y: Buf, scale: f32 },
    /// RMSNorm over rows of `x.width / heads` (`heads` rows per token: 1 for
    /// the hidden state, the head count for a per-head q/k norm); the weight
    /// is applied as `(1 + w)` with `unit_offset`.
    Norm {
        x: Buf,
        w: Role,
        y: Buf,
        heads: usize,
        unit_offset: bool,
    },
    /// `y = x · wᵀ (+ bias)`.
    Linear {
        x: Buf,
        w: Role,
        bias: Option<Role>,
        y: Buf,
    },
    /// rotate_half RoPE at each token's position.
    Rope {
        x: Buf,
        y: Buf,
        heads: usize,
        table: RopeTable,
    },
    /// Append this step's K and V rows to the layer's cache.
    KvAppend { k: Buf, v: Buf },
    /// Causal GQA attention of `q` over the layer's cache; `window` 0 is
    /// full attention, else a query at position p sees keys j > p - window.
    Attention {
        q: Buf,
        y: Buf,
        window: usize,
        scale: f32,
    },
    /// `y = act(gate) * up`.
    Glu {
        gate: Buf,
        up: Buf,
        y: Buf,
        act: Activation,
    },
    /// `y = a + b`.
    Add { a: Buf, b: Buf, y: Buf },
    /// `x = tanh(x / cap) * cap`, in place.
    Softcap { x: Buf, cap: f32 },
    /// `y = x`. No family uses it: it is what a test-only edit leaves where
    /// it removes an op ([`Program::bypass`]), so the op's tap still exists.
    Copy { x: Buf, y: Buf },
}

/// An operation and the name of its tap (the value of its output after it
/// ran), if it has one.
#[derive(Clone, Debug, PartialEq)]
pub struct Op {
    pub kind: OpKind,
    pub tap: Option<&'static str>,
}

impl Op {
    /// The buffer the op writes (in place for `Softcap`); `None` for the KV
    /// append, which writes the cache.
    pub fn output(&self) -> Option<Buf> {
        use OpKind::*;
        match &self.kind {
            Embed { y, .. }
            | Norm { y, .. }
            | Linear { y, .. }
            | Rope { y, .. }
            | Attention { y, .. }
            | Glu { y, .. }
            | Add { y, .. }
            | Copy { y, .. } => Some(*y),
            Softcap { x, .. } => Some(*x),
            KvAppend { .. } => None,
        }
    }

    /// The buffers the op reads.
    pub fn inputs(&self) -> Vec<Buf> {
        use OpKind::*;
        match &self.kind {
            Embed { .. } => vec![],
            Norm { x, .. }
            | Linear { x, .. }
            | Rope { x, .. }
            | Softcap { x, .. }
            | Copy { x, .. } => {
                vec![*x]
            }
            KvAppend { k, v } => vec![*k, *v],
            Attention { q, .. } => vec![*q],
            Glu { gate, up, .. } => vec![*gate, *up],
            Add { a, b, .. } => vec![*a, *b],
        }
    }

    /// The weight tensors the op reads.
    pub fn weights(&self) -> Vec<Role> {
        match &self.kind {
            OpKind::Embed { .. } => vec![Role::Embed],
            OpKind::Norm { w, .. } => vec![*w],
            OpKind::Linear { w, bias, .. } => std::iter::once(*w).chain(*bias).collect(),
            _ => vec![],
        }
    }

    /// The op's kind for reports (bench's breakdown): a linear layer by its
    /// weight (`q_proj`, ..., `lm_head`), other ops by kernel.
    pub fn class(&self) -> &'static str {
        use OpKind::*;
        match &self.kind {
            Embed { .. } => "embedding",
            Norm { heads: 1, .. } => "rmsnorm",
            Norm { .. } => "qk_rmsnorm",
            Linear { w, .. } => match w {
                Role::Layer(_, r) => match r {
                    LayerRole::Q => "q_proj",
                    LayerRole::K => "k_proj",
                    LayerRole::V => "v_proj",
                    LayerRole::O => "o_proj",
                    LayerRole::Gate => "gate_proj",
                    LayerRole::Up => "up_proj",
                    LayerRole::Down => "down_proj",
                    _ => "linear",
                },
                Role::LmHead => "lm_head",
                _ => "linear",
            },
            Rope { .. } => "rope (q, k)",
            KvAppend { .. } => "kv_copy",
            Attention { .. } => "attention",
            Glu {
                act: Activation::Silu,
                ..
            } => "swiglu",
            Glu {
                act: Activation::GeluTanh,
                ..
            } => "gelu_tanh_glu",
            Add { .. } => "residual add",
            Softcap { .. } => "softcap",
            Copy { .. } => "copy",
        }
    }
}

/// Where an op sits in the program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Embed,
    Layer(usize),
    Head,
}

impl Scope {
    /// The full tap name of a tap `kind` in this scope (`layers.3.q`).
    pub fn tap_name(self, kind: &str) -> String {
        match self {
            Scope::Layer(i) => format!("layers.{i}.{kind}"),
            Scope::Embed | Scope::Head => kind.to_string(),
        }
    }
}

/// The whole forward pass: embedding, every layer, head.
#[derive(Clone, Debug, PartialEq)]
pub struct Program {
    pub embed: Vec<Op>,
    pub layers: Vec<Vec<Op>>,
    /// Final norm, lm_head and what follows (`Logits` is the result).
    pub head: Vec<Op>,
}

impl Program {
    /// The program of `cfg`'s family.
    pub fn new(cfg: &ModelConfig) -> Program {
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let mut b = LayerBuilder::new(cfg, i);
                match cfg.arch {
                    Arch::Llama | Arch::Mistral | Arch::Qwen2 => llama_layer(&mut b),
                    Arch::Qwen3 => qwen3_layer(&mut b),
                    Arch::Gemma3 => gemma3_layer(&mut b),
                }
                b.ops
            })
            .collect();
        Program {
            embed: vec![Op {
                kind: OpKind::Embed {
                    y: Buf::Stream,
                    scale: cfg.embed_scale().unwrap_or(1.0),
                },
                tap: Some("embed"),
            }],
            layers,
            head: head(cfg),
        }
    }

    /// Every op with its scope, in execution order.
    pub fn ops(&self) -> impl Iterator<Item = (Scope, &Op)> {
        let embed = self.embed.iter().map(|o| (Scope::Embed, o));
        let layers = self
            .layers
            .iter()
            .enumerate()
            .flat_map(|(i, l)| l.iter().map(move |o| (Scope::Layer(i), o)));
        let head = self.head.iter().map(|o| (Scope::Head, o));
        embed.chain(layers).chain(head)
    }

    /// Every tap: (full name, the buffer it reads), in execution order.
    pub fn taps(&self) -> Vec<(String, Buf)> {
        self.ops()
            .filter_map(|(s, o)| Some((s.tap_name(o.tap?), o.output()?)))
            .collect()
    }

    /// Every tap name, in execution order.
    pub fn tap_names(&self) -> Vec<String> {
        self.taps().into_iter().map(|(n, _)| n).collect()
    }

    /// Floats all taps of one token take.
    pub fn tap_floats_per_token(&self, cfg: &ModelConfig) -> usize {
        self.taps().iter().map(|(_, b)| b.width(cfg)).sum()
    }

    /// Every activation buffer an op reads or writes (the residual stream
    /// included).
    pub fn buffers(&self) -> BTreeSet<Buf> {
        self.ops()
            .flat_map(|(_, o)| o.inputs().into_iter().chain(o.output()))
            .collect()
    }

    /// Each RoPE table the program's ops read, with the (rope_theta,
    /// scaling) of the layers that read it.
    pub fn rope_tables<'c>(&self, cfg: &'c ModelConfig) -> Vec<(RopeTable, f64, &'c RopeScaling)> {
        let mut out: Vec<(RopeTable, f64, &RopeScaling)> = Vec::new();
        for (s, o) in self.ops() {
            if let (OpKind::Rope { table, .. }, Scope::Layer(i)) = (&o.kind, s) {
                if !out.iter().any(|(t, _, _)| t == table) {
                    let (theta, scaling) = cfg.layer_rope(i);
                    out.push((*table, theta, scaling));
                }
            }
        }
        out
    }

    /// Every weight the program reads, each once, in first-use order.
    pub fn weights(&self) -> Vec<Role> {
        let mut out: Vec<Role> = Vec::new();
        for (_, o) in self.ops() {
            for w in o.weights() {
                if !out.contains(&w) {
                    out.push(w);
                }
            }
        }
        out
    }

    /// Edit every op (test-only program faults use this).
    pub fn edit(&mut self, mut f: impl FnMut(&mut OpKind)) {
        for o in self
            .embed
            .iter_mut()
            .chain(self.layers.iter_mut().flatten())
            .chain(self.head.iter_mut())
        {
            f(&mut o.kind);
        }
    }

    /// Replace every single-input op matching `pred` by a copy of its input
    /// (keeping its tap): the program as if that op were forgotten.
    pub fn bypass(&mut self, pred: impl Fn(&OpKind) -> bool) {
        self.edit(|k| {
            let xy = match k {
                OpKind::Norm { x, y, .. } | OpKind::Rope { x, y, .. } => Some((*x, *y)),
                _ => None,
            };
            if let Some((x, y)) = xy.filter(|_| pred(k)) {
                *k = OpKind::Copy { x, y };
            }
        });
    }
}

/// The attention kernel's params for one layer of `c`: its window and
/// softmax scale, over a cache of `max_context` positions.
pub fn attention_params(
    c: &ModelConfig,
    max_context: usize,
    window: usize,
    scale: f32,
) -> Result<attention::Params> {
    attention::Params::new(
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
        max_context,
    )?
    .with_window(window)
    .with_scale(scale)
}

/// Builds one decoder layer's ops in order: the shared blocks every family
/// is made of, with the biases, norm convention, window, RoPE table and
/// attention scale the config gives this layer.
pub struct LayerBuilder<'c> {
    cfg: &'c ModelConfig,
    layer: usize,
    pub ops: Vec<Op>,
}

impl<'c> LayerBuilder<'c> {
    pub fn new(cfg: &'c ModelConfig, layer: usize) -> Self {
        LayerBuilder {
            cfg,
            layer,
            ops: Vec::new(),
        }
    }

    fn push(&mut self, kind: OpKind, tap: Option<&'static str>) {
        self.ops.push(Op { kind, tap });
    }

    fn role(&self, r: LayerRole) -> Role {
        Role::Layer(self.layer, r)
    }

    /// RMSNorm over the hidden state (the family's weight convention).
    pub fn norm(&mut self, x: Buf, w: LayerRole, y: Buf, tap: &'static str) {
        let kind = OpKind::Norm {
            x,
            w: self.role(w),
            y,
            heads: 1,
            unit_offset: self.cfg.norm_unit_offset(),
        };
        self.push(kind, Some(tap));
    }

    /// RMSNorm of each of `heads` heads of `x` on its own.
    pub fn head_norm(&mut self, x: Buf, w: LayerRole, y: Buf, heads: usize, tap: &'static str) {
        let kind = OpKind::Norm {
            x,
            w: self.role(w),
            y,
            heads,
            unit_offset: self.cfg.norm_unit_offset(),
        };
        self.push(kind, Some(tap));
    }

    /// A linear layer with its bias when the config gives it one.
    pub fn linear(&mut self, x: Buf, w: LayerRole, y: Buf, tap: Option<&'static str>) {
        use LayerRole::*;
        let c = self.cfg;
        let bias = match w {
            Q if c.has_qkv_bias() => Some(QBias),
            K if c.has_qkv_bias() => Some(KBias),
            V if c.has_qkv_bias() => Some(VBias),
            O if c.has_o_bias() => Some(OBias),
            Gate if c.has_mlp_bias() => Some(GateBias),
            Up if c.has_mlp_bias() => Some(UpBias),
            Down if c.has_mlp_bias() => Some(DownBias),
            _ => None,
        };
        let kind = OpKind::Linear {
            x,
            w: self.role(w),
            bias: bias.map(|b| self.role(b)),
            y,
        };
        self.push(kind, tap);
    }

    /// Self-attention on `x`: q/k/v projections, optionally a per-head norm
    /// on q and k, RoPE, the KV append, attention, o_proj. Returns `AttnOut`.
    pub fn self_attention(&mut self, x: Buf, qk_norm: bool) -> Buf {
        let c = self.cfg;
        let (nh, nkv) = (c.num_attention_heads, c.num_key_value_heads);
        self.linear(x, LayerRole::Q, Buf::Q, Some("q"));
        self.linear(x, LayerRole::K, Buf::K, Some("k"));
        self.linear(x, LayerRole::V, Buf::V, Some("v"));
        let (q, k) = if qk_norm {
            self.head_norm(Buf::Q, LayerRole::QNorm, Buf::QNorm, nh, "q_norm");
            self.head_norm(Buf::K, LayerRole::KNorm, Buf::KNorm, nkv, "k_norm");
            (Buf::QNorm, Buf::KNorm)
        } else {
            (Buf::Q, Buf::K)
        };
        let sliding = c.layer_is_sliding.get(self.layer) == Some(&true);
        let table = if c.sliding_rope.is_some() && sliding {
            RopeTable::Sliding
        } else {
            RopeTable::Global
        };
        let rope = |x, y, heads| OpKind::Rope { x, y, heads, table };
        self.push(rope(q, Buf::QRope, nh), Some("q_rope"));
        self.push(rope(k, Buf::KRope, nkv), Some("k_rope"));
        self.push(
            OpKind::KvAppend {
                k: Buf::KRope,
                v: Buf::V,
            },
            None,
        );
        self.push(
            OpKind::Attention {
                q: Buf::QRope,
                y: Buf::Attn,
                window: c.layer_sliding_window(self.layer).unwrap_or(0),
                scale: c.attention_scale(),
            },
            Some("attn"),
        );
        self.linear(Buf::Attn, LayerRole::O, Buf::AttnOut, Some("attn_out"));
        Buf::AttnOut
    }

    /// The gated MLP on `x`: `down(act(gate(x)) * up(x))`. Returns `MlpOut`.
    pub fn mlp(&mut self, x: Buf) -> Buf {
        let act = match self.cfg.hidden_act.as_str() {
            "gelu_pytorch_tanh" => Activation::GeluTanh,
            _ => Activation::Silu,
        };
        self.linear(x, LayerRole::Gate, Buf::Gate, None);
        self.linear(x, LayerRole::Up, Buf::Up, None);
        let glu = OpKind::Glu {
            gate: Buf::Gate,
            up: Buf::Up,
            y: Buf::Act,
            act,
        };
        self.push(glu, None);
        self.linear(Buf::Act, LayerRole::Down, Buf::MlpOut, Some("mlp_out"));
        Buf::MlpOut
    }

    /// The residual add.
    pub fn add(&mut self, a: Buf, b: Buf, y: Buf, tap: &'static str) {
        self.push(OpKind::Add { a, b, y }, Some(tap));
    }
}

/// Llama (and Mistral, Qwen2: they differ only in biases and window, which
/// the config gives): `h + attn(norm(h))`, then `h + mlp(norm(h))`.
pub fn llama_layer(b: &mut LayerBuilder) {
    pre_norm_layer(b, false)
}

/// Qwen3: Llama's layer with an RMSNorm on every q and k head before RoPE.
pub fn qwen3_layer(b: &mut LayerBuilder) {
    pre_norm_layer(b, true)
}

fn pre_norm_layer(b: &mut LayerBuilder, qk_norm: bool) {
    b.norm(Buf::Stream, LayerRole::AttnNorm, Buf::AttnNorm, "attn_norm");
    let a = b.self_attention(Buf::AttnNorm, qk_norm);
    b.add(Buf::Stream, a, Buf::Resid, "resid_attn");
    b.norm(Buf::Resid, LayerRole::MlpNorm, Buf::MlpNorm, "mlp_norm");
    let m = b.mlp(Buf::MlpNorm);
    b.add(Buf::Resid, m, Buf::StreamOut, "out");
}

/// Gemma 3: q/k norm, and each sub-block's output normalized before its
/// residual add ("sandwich" norms); every norm is `x * (1 + w)` (the config
/// says so for the whole family), the MLP is GELU-tanh gated.
pub fn gemma3_layer(b: &mut LayerBuilder) {
    b.norm(Buf::Stream, LayerRole::AttnNorm, Buf::AttnNorm, "attn_norm");
    let a = b.self_attention(Buf::AttnNorm, true);
    b.norm(
        a,
        LayerRole::PostAttnNorm,
        Buf::PostAttnNorm,
        "post_attn_norm",
    );
    b.add(Buf::Stream, Buf::PostAttnNorm, Buf::Resid, "resid_attn");
    b.norm(Buf::Resid, LayerRole::MlpNorm, Buf::MlpNorm, "mlp_norm");
    let m = b.mlp(Buf::MlpNorm);
    b.norm(m, LayerRole::PostMlpNorm, Buf::PostMlpNorm, "post_mlp_norm");
    b.add(Buf::Resid, Buf::PostMlpNorm, Buf::StreamOut, "out");
}

/// Final norm, lm_head, and Gemma's logit soft-cap where the config sets one
/// (the `logits` tap is the last op's output).
fn head(cfg: &ModelConfig) -> Vec<Op> {
    let cap = cfg.final_logit_softcapping.map(|c| c as f32);
    let mut ops = vec![
        Op {
            kind: OpKind::Norm {
                x: Buf::Stream,
                w: Role::FinalNorm,
                y: Buf::Norm,
                heads: 1,
                unit_offset: cfg.norm_unit_offset(),
            },
            tap: Some("norm"),
        },
        Op {
            kind: OpKind::Linear {
                x: Buf::Norm,
                w: Role::LmHead,
                bias: None,
                y: Buf::Logits,
            },
            tap: cap.is_none().then_some("logits"),
        },
    ];
    if let Some(cap) = cap {
        ops.push(Op {
            kind: OpKind::Softcap {
                x: Buf::Logits,
                cap,
            },
            tap: Some("logits"),
        });
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg(v: serde_json::Value) -> ModelConfig {
        ModelConfig::from_json_str(&v.to_string(), "/m/config.json").unwrap()
    }

    fn base(arch: &str) -> serde_json::Value {
        json!({
            "architectures": [arch],
            "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16,
        })
    }

    #[test]
    fn llama_taps_are_the_twelve_per_layer() {
        let p = Program::new(&cfg(base("LlamaForCausalLM")));
        let names = p.tap_names();
        assert_eq!(names.len(), 1 + 3 * 12 + 2);
        assert_eq!(
            &names[1..13],
            [
                "attn_norm",
                "q",
                "k",
                "v",
                "q_rope",
                "k_rope",
                "attn",
                "attn_out",
                "resid_attn",
                "mlp_norm",
                "mlp_out",
                "out"
            ]
            .map(|k| format!("layers.0.{k}"))
        );
        assert_eq!(names.last().unwrap(), "logits");
    }

    #[test]
    fn qwen3_norms_q_and_k_per_head_before_rope() {
        let c = cfg(base("Qwen3ForCausalLM"));
        let p = Program::new(&c);
        let l = &p.layers[0];
        let qn = l.iter().position(|o| o.tap == Some("q_norm")).unwrap();
        let qr = l.iter().position(|o| o.tap == Some("q_rope")).unwrap();
        assert!(qn < qr);
        match &l[qn].kind {
            OpKind::Norm { x, heads, .. } => assert_eq!((*x, *heads), (Buf::Q, 4)),
            k => panic!("{k:?}"),
        }
        assert!(matches!(&l[qr].kind, OpKind::Rope { x: Buf::QNorm, .. }));
        // 4 heads x 16 = 64 floats per q row, at a hidden size of 32
        assert_eq!(Buf::QNorm.width(&c), 64);
    }

    #[test]
    fn gemma3_sandwich_norms_window_and_softcap() {
        let mut v = base("Gemma3ForCausalLM");
        v["layer_types"] = json!(["sliding_attention", "sliding_attention", "full_attention"]);
        v["sliding_window"] = json!(8);
        v["final_logit_softcapping"] = json!(30.0);
        v["query_pre_attn_scalar"] = json!(24);
        let c = cfg(v);
        let p = Program::new(&c);
        let kinds: Vec<_> = p.layers[0].iter().filter_map(|o| o.tap).collect();
        assert_eq!(
            kinds,
            [
                "attn_norm",
                "q",
                "k",
                "v",
                "q_norm",
                "k_norm",
                "q_rope",
                "k_rope",
                "attn",
                "attn_out",
                "post_attn_norm",
                "resid_attn",
                "mlp_norm",
                "mlp_out",
                "post_mlp_norm",
                "out"
            ]
        );
        let att = |l: usize| {
            p.layers[l]
                .iter()
                .find_map(|o| match &o.kind {
                    OpKind::Attention { window, scale, .. } => Some((*window, *scale)),
                    _ => None,
                })
                .unwrap()
        };
        let s = 24f64.powf(-0.5) as f32;
        assert_eq!((att(0), att(2)), ((8, s), (0, s)));
        let table = |l: usize| {
            p.layers[l]
                .iter()
                .find_map(|o| match &o.kind {
                    OpKind::Rope { table, .. } => Some(*table),
                    _ => None,
                })
                .unwrap()
        };
        assert_eq!(
            (table(1), table(2)),
            (RopeTable::Sliding, RopeTable::Global)
        );
        assert!(p.ops().all(|(_, o)| !matches!(
            o.kind,
            OpKind::Norm {
                unit_offset: false,
                ..
            }
        )));
        let last = p.head.last().unwrap();
        assert_eq!(
            (last.kind.clone(), last.tap),
            (
                OpKind::Softcap {
                    x: Buf::Logits,
                    cap: 30.0
                },
                Some("logits")
            )
        );
        assert_eq!(p.tap_names().iter().filter(|n| *n == "logits").count(), 1);
        match &p.embed[0].kind {
            OpKind::Embed { scale, .. } => assert_eq!(*scale, (32f64).sqrt() as f32),
            k => panic!("{k:?}"),
        }
    }

    #[test]
    fn bypass_keeps_the_tap() {
        let mut p = Program::new(&cfg(base("Qwen3ForCausalLM")));
        let before = p.tap_names();
        p.bypass(|k| matches!(k, OpKind::Norm { heads, .. } if *heads > 1));
        assert_eq!(p.tap_names(), before);
        let l = &p.layers[0];
        let qn = l.iter().find(|o| o.tap == Some("q_norm")).unwrap();
        assert_eq!(
            qn.kind,
            OpKind::Copy {
                x: Buf::Q,
                y: Buf::QNorm
            }
        );
    }
}
