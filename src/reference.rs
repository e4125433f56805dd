//! The CPU reference forward: the whole model in plain f32 Rust, built only
//! from the kernels' CPU references, producing the same taps as the GPU.
//! It is the oracle in tests and in `wgllm verify`; readable over fast.

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::loader::{HostTensor, HostWeights};
use crate::ops::{attention, elementwise, embedding, kv_copy, matmul, rmsnorm, rope};
use crate::taps::TapSet;

/// A CPU model with its own KV cache (same layout as the GPU's:
/// `[n_kv_heads, max_context, head_dim]` per layer).
pub struct CpuModel<'w> {
    pub cfg: &'w ModelConfig,
    pub w: &'w HostWeights,
    pub max_context: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
    attn: attention::Params,
    kvp: kv_copy::Params,
    kv_k: Vec<Vec<f32>>,
    kv_v: Vec<Vec<f32>>,
    pos: usize,
}

fn bias(b: &Option<HostTensor>) -> Option<&[f32]> {
    b.as_ref().map(|t| t.data.as_slice())
}

impl<'w> CpuModel<'w> {
    pub fn new(cfg: &'w ModelConfig, w: &'w HostWeights, max_context: usize) -> Result<Self> {
        let (cos, sin) =
            rope::rope_tables(cfg.head_dim, cfg.rope_theta, &cfg.rope_scaling, max_context)?;
        let (nh, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let per_layer = nkv * max_context * hd;
        Ok(CpuModel {
            cfg,
            w,
            max_context,
            cos,
            sin,
            attn: attention::Params::new(nh, nkv, hd, max_context)?,
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
        let (hidden, hd) = (c.hidden_size, c.head_dim);
        let (nh, nkv) = (c.num_attention_heads, c.num_key_value_heads);
        let (qd, kvd, inter) = (c.q_dim(), c.kv_dim(), c.intermediate_size);
        let eps = c.rms_norm_eps as f32;
        let mut taps = TapSet::default();

        let mut h = embedding::reference(&self.w.embed.data, hidden, tokens);
        taps.push("embed", n, hidden, h.clone());
        for (i, lw) in self.w.layers.iter().enumerate() {
            let name = |k: &str| format!("layers.{i}.{k}");
            let x = rmsnorm::reference(&h, &lw.attn_norm.data, hidden, eps);
            taps.push(name("attn_norm"), n, hidden, x.clone());
            let q = matmul::reference(&x, &lw.q.data, bias(&lw.q_bias), n, hidden, qd);
            let k = matmul::reference(&x, &lw.k.data, bias(&lw.k_bias), n, hidden, kvd);
            let v = matmul::reference(&x, &lw.v.data, bias(&lw.v_bias), n, hidden, kvd);
            taps.push(name("q"), n, qd, q.clone());
            taps.push(name("k"), n, kvd, k.clone());
            taps.push(name("v"), n, kvd, v.clone());
            let q_rope = rope::reference(&q, &self.cos, &self.sin, nh, hd, self.pos);
            let k_rope = rope::reference(&k, &self.cos, &self.sin, nkv, hd, self.pos);
            taps.push(name("q_rope"), n, qd, q_rope.clone());
            taps.push(name("k_rope"), n, kvd, k_rope.clone());
            kv_copy::reference(
                &mut self.kv_k[i],
                &mut self.kv_v[i],
                &k_rope,
                &v,
                &self.kvp,
                self.pos,
            );
            let ap = self
                .attn
                .with_window(c.layer_sliding_window(i).unwrap_or(0));
            let a = attention::reference(&q_rope, &self.kv_k[i], &self.kv_v[i], &ap, self.pos);
            taps.push(name("attn"), n, qd, a.clone());
            let o = matmul::reference(&a, &lw.o.data, bias(&lw.o_bias), n, qd, hidden);
            taps.push(name("attn_out"), n, hidden, o.clone());
            let resid = elementwise::add_reference(&h, &o);
            taps.push(name("resid_attn"), n, hidden, resid.clone());
            let x2 = rmsnorm::reference(&resid, &lw.mlp_norm.data, hidden, eps);
            taps.push(name("mlp_norm"), n, hidden, x2.clone());
            let gate = matmul::reference(&x2, &lw.gate.data, bias(&lw.gate_bias), n, hidden, inter);
            let up = matmul::reference(&x2, &lw.up.data, bias(&lw.up_bias), n, hidden, inter);
            let act = elementwise::swiglu_reference(&gate, &up);
            let down =
                matmul::reference(&act, &lw.down.data, bias(&lw.down_bias), n, inter, hidden);
            taps.push(name("mlp_out"), n, hidden, down.clone());
            h = elementwise::add_reference(&resid, &down);
            taps.push(name("out"), n, hidden, h.clone());
        }
        let normed = rmsnorm::reference(&h, &self.w.norm.data, hidden, eps);
        taps.push("norm", n, hidden, normed.clone());
        let lm = &self.w.lm_head().data;
        let logits = matmul::reference(&normed, lm, None, n, hidden, c.vocab_size);
        taps.push("logits", n, c.vocab_size, logits);
        self.pos += n;
        Ok(taps)
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
