//! The CPU reference forward: the model's [`Program`] run op by op in plain
//! f32 Rust with the kernels' CPU references, producing the same taps as the
//! GPU. It is the oracle in tests and in `wgllm verify`; readable over fast.

use std::collections::HashMap;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::loader::{HostTensor, HostWeights, Role};
use crate::ops::{attention, elementwise, embedding, kv_copy, matmul, rmsnorm, rope};
use crate::program::{attention_params, Activation, Buf, OpKind, Program, RopeTable, Scope};
use crate::taps::TapSet;

/// A CPU model with its own KV cache (same layout as the GPU's:
/// `[n_kv_heads, max_context, head_dim]` per layer).
pub struct CpuModel<'w> {
    pub cfg: &'w ModelConfig,
    pub w: &'w HostWeights,
    pub max_context: usize,
    program: Program,
    /// (cos, sin) per RoPE table the program uses.
    tables: Vec<(RopeTable, Vec<f32>, Vec<f32>)>,
    kvp: kv_copy::Params,
    kv_k: Vec<Vec<f32>>,
    kv_v: Vec<Vec<f32>>,
    pos: usize,
}

impl<'w> CpuModel<'w> {
    pub fn new(cfg: &'w ModelConfig, w: &'w HostWeights, max_context: usize) -> Result<Self> {
        let program = Program::new(cfg);
        let tables = program
            .rope_tables(cfg)
            .into_iter()
            .map(|(t, theta, scaling)| {
                let (cos, sin) = rope::rope_tables(cfg.head_dim, theta, scaling, max_context)?;
                Ok((t, cos, sin))
            })
            .collect::<Result<Vec<_>>>()?;
        let (nkv, hd) = (cfg.num_key_value_heads, cfg.head_dim);
        let per_layer = nkv * max_context * hd;
        Ok(CpuModel {
            cfg,
            w,
            max_context,
            program,
            tables,
            kvp: kv_copy::Params::new(nkv, hd, max_context)?,
            kv_k: vec![vec![0.0; per_layer]; cfg.num_hidden_layers],
            kv_v: vec![vec![0.0; per_layer]; cfg.num_hidden_layers],
            pos: 0,
        })
    }

    pub fn reset(&mut self) {
        self.pos = 0;
    }

    pub fn position(&self) -> usize {
        self.pos
    }

    fn weight(&self, r: Role) -> Result<&'w HostTensor> {
        self.w
            .get(r)
            .ok_or_else(|| Error::invalid(format!("cpu reference: the weights have no {r:?}")))
    }

    /// Run `tokens` after the cached ones; returns every tap (all tokens'
    /// logits included).
    pub fn forward(&mut self, tokens: &[u32]) -> Result<TapSet> {
        let c = self.cfg;
        let n = tokens.len();
        if n == 0 || self.pos + n > self.max_context {
            return Err(Error::invalid(format!(
                "cpu reference: {} new tokens at position {} (max context {})",
                n, self.pos, self.max_context
            )));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(Error::invalid(format!(
                "token id {bad} is outside the vocabulary (vocab_size {})",
                c.vocab_size
            )));
        }
        let program = self.program.clone();
        let mut taps = TapSet::default();
        let mut acts: HashMap<Buf, Vec<f32>> = HashMap::new();
        // The residual stream's low halves (the GPU's (hi, lo) stream, see
        // elementwise::add_split_reference), for the buffers the residual
        // adds wrote; `acts` holds the hi halves, what the taps show.
        let mut lo: HashMap<Buf, Vec<f32>> = HashMap::new();
        for (scope, op) in program.ops() {
            let layer = match scope {
                Scope::Layer(i) => i,
                _ => 0,
            };
            self.run_op(&op.kind, layer, tokens, &mut acts, &mut lo)?;
            if let (Some(t), Some(b)) = (op.tap, op.output()) {
                taps.push(scope.tap_name(t), n, b.width(c), acts[&b].clone());
            }
            // The layer's output is the next layer's input.
            if let Some(out) = acts.remove(&Buf::StreamOut) {
                acts.insert(Buf::Stream, out);
                match lo.remove(&Buf::StreamOut) {
                    Some(l) => lo.insert(Buf::Stream, l),
                    None => lo.remove(&Buf::Stream),
                };
            }
        }
        self.pos += n;
        Ok(taps)
    }

    fn run_op(
        &mut self,
        op: &OpKind,
        layer: usize,
        tokens: &[u32],
        acts: &mut HashMap<Buf, Vec<f32>>,
        lo: &mut HashMap<Buf, Vec<f32>>,
    ) -> Result<()> {
        let c = self.cfg;
        let n = tokens.len();
        let (hd, eps) = (c.head_dim, c.rms_norm_eps as f32);
        let get = |acts: &HashMap<Buf, Vec<f32>>, b: Buf| -> Result<Vec<f32>> {
            acts.get(&b)
                .cloned()
                .ok_or_else(|| Error::invalid(format!("cpu reference: {b:?} read before written")))
        };
        let (y, v) = match *op {
            OpKind::Embed { y, scale } => {
                let e = self.weight(Role::Embed)?;
                (
                    y,
                    embedding::reference(&e.data, c.hidden_size, tokens, scale),
                )
            }
            OpKind::Norm {
                x,
                w,
                y,
                heads,
                unit_offset,
            } => {
                let w = &self.weight(w)?.data;
                let width = x.width(c) / heads;
                let l = lo.get(&x).map(Vec::as_slice);
                let v = rmsnorm::reference_split(&get(acts, x)?, l, w, width, eps, unit_offset);
                (y, v)
            }
            OpKind::Linear { x, w, bias, y } => {
                let w = &self.weight(w)?.data;
                let b = bias.map(|b| self.weight(b)).transpose()?;
                let b = b.map(|t| t.data.as_slice());
                let v = matmul::reference(&get(acts, x)?, w, b, n, x.width(c), y.width(c));
                (y, v)
            }
            OpKind::Rope { x, y, heads, table } => {
                let (_, cos, sin) = self
                    .tables
                    .iter()
                    .find(|(t, _, _)| *t == table)
                    .expect("tables built for every rope op");
                (
                    y,
                    rope::reference(&get(acts, x)?, cos, sin, heads, hd, self.pos),
                )
            }
            OpKind::KvAppend { k, v } => {
                let (k, v) = (get(acts, k)?, get(acts, v)?);
                kv_copy::reference(
                    &mut self.kv_k[layer],
                    &mut self.kv_v[layer],
                    &k,
                    &v,
                    &self.kvp,
                    self.pos,
                );
                return Ok(());
            }
            OpKind::Attention {
                q,
                y,
                window,
                scale,
            } => {
                let p = attention_params(c, self.max_context, window, scale)?;
                let v = attention::reference(
                    &get(acts, q)?,
                    &self.kv_k[layer],
                    &self.kv_v[layer],
                    &p,
                    self.pos,
                );
                (y, v)
            }
            OpKind::Glu { gate, up, y, act } => {
                let (g, u) = (get(acts, gate)?, get(acts, up)?);
                let v = match act {
                    Activation::Silu => elementwise::swiglu_reference(&g, &u),
                    Activation::GeluTanh => elementwise::gelu_tanh_glu_reference(&g, &u),
                };
                (y, v)
            }
            OpKind::Add { a, b, y } => {
                let l = lo.get(&a).map(Vec::as_slice);
                let (hi, l) = elementwise::add_split_reference(&get(acts, a)?, l, &get(acts, b)?);
                acts.insert(y, hi);
                lo.insert(y, l);
                return Ok(());
            }
            OpKind::Softcap { x, cap } => {
                let mut v = get(acts, x)?;
                elementwise::softcap_reference(&mut v, cap);
                (x, v)
            }
            OpKind::Copy { x, y } => (y, get(acts, x)?),
        };
        acts.insert(y, v);
        // Any other op writes hi alone.
        lo.remove(&y);
        Ok(())
    }

    /// Greedy generation of `max_new` tokens after `prompt` (first token
    /// index of the maximum on ties, like torch.argmax).
    pub fn generate_greedy(&mut self, prompt: &[u32], max_new: usize) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        let mut input = prompt.to_vec();
        for _ in 0..max_new {
            let taps = self.forward(&input)?;
            let l = taps.get("logits").expect("logits tap");
            let last = &l.data[(l.rows - 1) * l.cols..];
            let next = crate::ops::argmax::reference(last, l.cols)[0];
            out.push(next);
            input = vec![next];
        }
        Ok(out)
    }
}
