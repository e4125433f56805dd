//! GGUF → Hugging Face checkpoint: `config.json`, `model.safetensors`,
//! `generation_config.json`, and (through a caller-supplied writer) the
//! tokenizer files.
//!
//! Tensor layout: GGUF lists dimensions innermost first, so a GGUF matrix
//! with dims `[in, out]` is the row-major `[out, in]` matrix PyTorch stores;
//! the shape is reversed and no data moves. The one data change is for the
//! `llama` architecture: llama.cpp's converter permutes the rows of the Q
//! and K projections (`LlamaModel.permute` in `convert_hf_to_gguf.py`) to
//! suit its interleaved RoPE, and [`unpermute_rows`] undoes it. `qwen2`
//! GGUFs are written unpermuted.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, View};
use serde_json::{json, Map, Value as Json};

use super::reader::{GgufFile, TensorInfo};
use crate::error::{Error, Result};

/// Output dtype of [`convert`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ConvertDType {
    /// bfloat16, rounded to nearest even (as `torch.Tensor.to(torch.bfloat16)`).
    #[default]
    Bf16,
    /// float16, rounded to nearest even; a finite value beyond the f16 range
    /// is an error, not an infinity.
    F16,
    F32,
}

impl ConvertDType {
    /// `bf16`, `f16` or `f32` (also `bfloat16`, `float16`, `float32`).
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "f16" | "fp16" | "float16" | "half" => Ok(Self::F16),
            "f32" | "fp32" | "float32" | "float" => Ok(Self::F32),
            _ => Err(Error::invalid(format!(
                "unknown output dtype `{s}` (expected bf16, f16 or f32)"
            ))),
        }
    }
    /// Short name (`bf16`, `f16`, `f32`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
            Self::F32 => "f32",
        }
    }
    /// The PyTorch dtype name written to `config.json`.
    pub fn torch_name(self) -> &'static str {
        match self {
            Self::Bf16 => "bfloat16",
            Self::F16 => "float16",
            Self::F32 => "float32",
        }
    }
    pub fn safetensors_dtype(self) -> Dtype {
        match self {
            Self::Bf16 => Dtype::BF16,
            Self::F16 => Dtype::F16,
            Self::F32 => Dtype::F32,
        }
    }
    pub fn size(self) -> usize {
        match self {
            Self::Bf16 | Self::F16 => 2,
            Self::F32 => 4,
        }
    }
}

impl std::fmt::Display for ConvertDType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The signature of the tokenizer-file writer `convert` calls: it reads the
/// GGUF's tokenizer metadata itself (the GGUF reader knows nothing about
/// tokenizers) and writes the tokenizer files into the folder, returning
/// whether the file had a tokenizer to write.
pub type TokenizerWriter<'a> = &'a dyn Fn(&GgufFile, &Path) -> Result<bool>;

/// What [`convert`] did.
#[derive(Clone, Debug)]
pub struct ConvertSummary {
    pub out_dir: PathBuf,
    /// `general.architecture` (`llama`, `qwen2`).
    pub gguf_arch: String,
    /// The transformers class written (`LlamaForCausalLM`, ...).
    pub hf_architecture: String,
    pub dtype: ConvertDType,
    pub n_tensors: usize,
    /// No `output.weight`: `lm_head` is the embedding.
    pub tied: bool,
    /// Tensor count per source ggml type name.
    pub source_types: BTreeMap<String, usize>,
    /// Bytes of tensor data written to model.safetensors.
    pub tensor_bytes: u64,
    /// Whether the GGUF had tokenizer metadata (and the writer was called).
    pub tokenizer_written: bool,
    pub config: Json,
}

/// Supported `general.architecture` values and their transformers classes.
pub const SUPPORTED_ARCHS: &[(&str, &str)] =
    &[("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM")];

/// The Hugging Face name of a GGUF tensor, or `None` when it has no
/// counterpart. `blk.N.*` maps to `model.layers.N.*`.
pub fn hf_tensor_name(gguf_name: &str) -> Option<String> {
    match gguf_name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, suffix) = rest.split_once('.')?;
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) || layer.len() > 9 {
        return None;
    }
    if layer.len() > 1 && layer.starts_with('0') {
        return None;
    }
    let (part, kind) = suffix.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let hf = match part {
        "attn_norm" if kind == "weight" => "input_layernorm",
        "ffn_norm" if kind == "weight" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// The row permutation llama.cpp applies to Q/K for the `llama`
/// architecture (`LlamaModel.permute`): with `hd = rows / n_head`, HF row
/// `h*hd + s*hd/2 + i` (s in {0, 1}) is stored at GGUF row `h*hd + 2i + s`.
/// Returns, for each HF row, the GGUF row it comes from (so
/// `hf[r] = gguf[src[r]]`). Errors when the rows do not split into
/// `n_head` heads of even size.
pub fn unpermute_rows(rows: usize, n_head: usize) -> std::result::Result<Vec<usize>, String> {
    if n_head == 0 || rows % n_head != 0 || (rows / n_head) % 2 != 0 {
        return Err(format!(
            "{rows} rows do not split into {n_head} heads of even size (needed to undo llama.cpp's Q/K permutation)"
        ));
    }
    let hd = rows / n_head;
    let half = hd / 2;
    let mut src = Vec::with_capacity(rows);
    for h in 0..n_head {
        for s in 0..2 {
            for i in 0..half {
                src.push(h * hd + 2 * i + s);
            }
        }
    }
    Ok(src)
}

/// llama.cpp's permutation itself (`gguf[r] = hf[src[r]]`), the inverse of
/// [`unpermute_rows`]; used by tests and by anyone writing a llama GGUF.
pub fn permute_rows(rows: usize, n_head: usize) -> std::result::Result<Vec<usize>, String> {
    let un = unpermute_rows(rows, n_head)?;
    let mut src = vec![0; rows];
    for (hf_row, &gguf_row) in un.iter().enumerate() {
        src[gguf_row] = hf_row;
    }
    Ok(src)
}

/// Round an f32 to the nearest representable decimal of an f32 (shortest
/// round-trip string), as f64: an f32 `1e-5` stored in GGUF becomes the
/// `1e-05` of the original config.json rather than 9.999999747378752e-06.
/// Both read back to the same f32.
fn f32_as_decimal(x: f32) -> f64 {
    format!("{x}").parse::<f64>().unwrap_or(x as f64)
}

struct ArchInfo<'a> {
    arch: &'a str,
    hf_class: &'static str,
    n_layers: usize,
    hidden: usize,
    ffn: usize,
    n_head: usize,
    n_kv: usize,
    head_dim: usize,
    vocab: usize,
    tied: bool,
    qkv_bias: bool,
    o_bias: bool,
    mlp_bias: bool,
}

fn arch_info(g: &GgufFile) -> Result<ArchInfo<'_>> {
    let path = g.path().to_path_buf();
    let ferr = |msg: String| Error::Format {
        path: path.clone(),
        msg,
    };
    let arch = g.get_str("general.architecture")?;
    let hf_class = SUPPORTED_ARCHS
        .iter()
        .find(|(a, _)| *a == arch)
        .map(|(_, c)| *c)
        .ok_or_else(|| {
            ferr(format!(
                "architecture `{arch}` is not supported (supported: {})",
                SUPPORTED_ARCHS
                    .iter()
                    .map(|(a, _)| *a)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
    let key = |k: &str| format!("{arch}.{k}");
    let usize_key = |k: &str| -> Result<usize> {
        let v = g.get_u32(&key(k))?;
        if v == 0 {
            return Err(ferr(format!("metadata key `{}` is 0", key(k))));
        }
        Ok(v as usize)
    };
    let n_layers = usize_key("block_count")?;
    let hidden = usize_key("embedding_length")?;
    let ffn = usize_key("feed_forward_length")?;
    let n_head = usize_key("attention.head_count")?;
    let n_kv = match g.opt_u32(&key("attention.head_count_kv"))? {
        Some(0) => {
            return Err(ferr(format!(
                "metadata key `{}` is 0",
                key("attention.head_count_kv")
            )))
        }
        Some(v) => v as usize,
        None => n_head,
    };
    if n_head % n_kv != 0 {
        return Err(ferr(format!(
            "attention.head_count {n_head} is not a multiple of attention.head_count_kv {n_kv}"
        )));
    }
    let head_dim = match g.opt_u32(&key("attention.key_length"))? {
        Some(0) => {
            return Err(ferr(format!(
                "metadata key `{}` is 0",
                key("attention.key_length")
            )))
        }
        Some(v) => v as usize,
        None => {
            if hidden % n_head != 0 {
                return Err(ferr(format!(
                    "embedding_length {hidden} is not a multiple of attention.head_count {n_head} and `{}` is absent",
                    key("attention.key_length")
                )));
            }
            hidden / n_head
        }
    };
    if let Some(vl) = g.opt_u32(&key("attention.value_length"))? {
        if vl as usize != head_dim {
            return Err(ferr(format!(
                "attention.value_length {vl} differs from the key length {head_dim}; transformers' {hf_class} needs them equal"
            )));
        }
    }
    if let Some(rot) = g.opt_u32(&key("rope.dimension_count"))? {
        if rot as usize != head_dim {
            return Err(ferr(format!(
                "rope.dimension_count {rot} differs from head_dim {head_dim} (partial rotary embeddings are not supported for {arch})"
            )));
        }
    }
    let emb = g.require_tensor("token_embd.weight")?;
    if emb.dims.len() != 2 {
        return Err(Error::Tensor {
            path: path.clone(),
            tensor: emb.name.clone(),
            msg: format!("expected 2 dimensions, got {:?}", emb.dims),
        });
    }
    let vocab = emb.dims[1] as usize;
    let tied = g.tensor("output.weight").is_none();
    let any = |suffix: &str| {
        g.tensors()
            .iter()
            .any(|t| t.name.starts_with("blk.") && t.name.ends_with(suffix))
    };
    let qkv_bias = any(".attn_q.bias");
    let o_bias = any(".attn_output.bias");
    let mlp_bias = any(".ffn_up.bias");
    Ok(ArchInfo {
        arch,
        hf_class,
        n_layers,
        hidden,
        ffn,
        n_head,
        n_kv,
        head_dim,
        vocab,
        tied,
        qkv_bias,
        o_bias,
        mlp_bias,
    })
}

/// The Hugging Face `config.json` for a GGUF file (as written by [`convert`]).
pub fn hf_config(g: &GgufFile, dtype: ConvertDType) -> Result<Json> {
    let a = arch_info(g)?;
    let key = |k: &str| format!("{}.{k}", a.arch);
    let path = g.path().to_path_buf();
    let ferr = |msg: String| Error::Format {
        path: path.clone(),
        msg,
    };
    let eps = g.get_f32(&key("attention.layer_norm_rms_epsilon"))?;
    let rope_theta = g.opt_f32(&key("rope.freq_base"))?.unwrap_or(10000.0);
    let ctx = g.get_u32(&key("context_length"))?;

    // RoPE scaling: none, or linear (`rope.scaling.type` = linear, or the
    // older `rope.scale_linear`). Others (yarn, llama3's rope_freqs tensor)
    // cannot be reconstructed exactly from GGUF metadata.
    let scaling_type = g.opt_str(&key("rope.scaling.type"))?;
    let factor = match g.opt_f32(&key("rope.scaling.factor"))? {
        Some(f) => Some(f),
        None => g.opt_f32(&key("rope.scale_linear"))?,
    };
    let rope_scaling = match (scaling_type, factor) {
        (None | Some("none"), None) => Json::Null,
        (None | Some("linear"), Some(1.0)) => Json::Null,
        (None | Some("linear"), Some(f)) => {
            json!({"rope_type": "linear", "factor": f32_as_decimal(f)})
        }
        (Some("none"), Some(_)) => Json::Null,
        (Some(t), _) => {
            return Err(ferr(format!(
                "metadata key `{}`: RoPE scaling `{t}` is not supported (supported: none, linear)",
                key("rope.scaling.type")
            )))
        }
    };

    let bos = g.opt_u32("tokenizer.ggml.bos_token_id")?;
    let eos = g.opt_u32("tokenizer.ggml.eos_token_id")?;
    let pad = g.opt_u32("tokenizer.ggml.padding_token_id")?;

    let mut c = Map::new();
    c.insert("architectures".into(), json!([a.hf_class]));
    c.insert("model_type".into(), json!(a.arch));
    c.insert("vocab_size".into(), json!(a.vocab));
    c.insert("hidden_size".into(), json!(a.hidden));
    c.insert("intermediate_size".into(), json!(a.ffn));
    c.insert("num_hidden_layers".into(), json!(a.n_layers));
    c.insert("num_attention_heads".into(), json!(a.n_head));
    c.insert("num_key_value_heads".into(), json!(a.n_kv));
    c.insert("head_dim".into(), json!(a.head_dim));
    c.insert("hidden_act".into(), json!("silu"));
    c.insert("max_position_embeddings".into(), json!(ctx));
    c.insert("rms_norm_eps".into(), json!(f32_as_decimal(eps)));
    c.insert("rope_theta".into(), json!(f32_as_decimal(rope_theta)));
    c.insert("rope_scaling".into(), rope_scaling);
    c.insert("tie_word_embeddings".into(), json!(a.tied));
    c.insert("attention_dropout".into(), json!(0.0));
    c.insert("initializer_range".into(), json!(0.02));
    c.insert("use_cache".into(), json!(true));
    c.insert("torch_dtype".into(), json!(dtype.torch_name()));
    c.insert("bos_token_id".into(), json!(bos));
    c.insert("eos_token_id".into(), json!(eos));
    if let Some(p) = pad {
        c.insert("pad_token_id".into(), json!(p));
    }
    match a.arch {
        "llama" => {
            if a.qkv_bias != a.o_bias {
                return Err(ferr(format!(
                    "llama with q/k/v biases {} but o_proj bias {}: transformers' LlamaForCausalLM has one `attention_bias` flag for all four",
                    a.qkv_bias, a.o_bias
                )));
            }
            c.insert("attention_bias".into(), json!(a.qkv_bias));
            c.insert("mlp_bias".into(), json!(a.mlp_bias));
            c.insert("pretraining_tp".into(), json!(1));
        }
        "qwen2" => {
            if !a.qkv_bias || a.o_bias || a.mlp_bias {
                return Err(ferr(format!(
                    "qwen2 needs q/k/v biases and no o_proj or MLP biases (found q/k/v bias: {}, o_proj bias: {}, MLP bias: {})",
                    a.qkv_bias, a.o_bias, a.mlp_bias
                )));
            }
            c.insert("use_sliding_window".into(), json!(false));
            c.insert("sliding_window".into(), Json::Null);
            c.insert("max_window_layers".into(), json!(a.n_layers));
        }
        _ => unreachable!("arch_info accepts only supported architectures"),
    }
    Ok(Json::Object(c))
}

/// `generation_config.json`: the special token ids.
pub fn hf_generation_config(g: &GgufFile) -> Result<Json> {
    let mut c = Map::new();
    c.insert("_from_model_config".into(), json!(true));
    if let Some(b) = g.opt_u32("tokenizer.ggml.bos_token_id")? {
        c.insert("bos_token_id".into(), json!(b));
    }
    if let Some(e) = g.opt_u32("tokenizer.ggml.eos_token_id")? {
        c.insert("eos_token_id".into(), json!(e));
    }
    if let Some(p) = g.opt_u32("tokenizer.ggml.padding_token_id")? {
        c.insert("pad_token_id".into(), json!(p));
    }
    Ok(Json::Object(c))
}

/// One tensor to write: source, HF name and shape, and the Q/K
/// un-permutation to apply.
#[derive(Clone, Debug)]
pub struct PlannedTensor<'a> {
    pub info: &'a TensorInfo,
    pub hf_name: String,
    /// PyTorch shape (outermost first).
    pub shape: Vec<usize>,
    /// `Some(n_head)`: undo llama.cpp's Q/K row permutation with this many heads.
    pub unpermute_heads: Option<usize>,
}

/// Map every tensor of `g` to its HF name and check names, layer indices
/// and shapes against the metadata, so a file that converts also loads.
pub fn plan_tensors(g: &GgufFile) -> Result<Vec<PlannedTensor<'_>>> {
    let a = arch_info(g)?;
    let path = g.path().to_path_buf();
    let terr = |t: &str, msg: String| Error::Tensor {
        path: path.clone(),
        tensor: t.into(),
        msg,
    };
    let dim = |n: usize, what: &str| {
        n.checked_mul(a.head_dim).ok_or_else(|| Error::Format {
            path: path.clone(),
            msg: format!("{what} {n} x head_dim {} overflows", a.head_dim),
        })
    };
    let (h, q, kv, f, v) = (
        a.hidden,
        dim(a.n_head, "head_count")?,
        dim(a.n_kv, "head_count_kv")?,
        a.ffn,
        a.vocab,
    );
    let mut plan = Vec::with_capacity(g.tensors().len());
    let mut seen = BTreeSet::new();
    for t in g.tensors() {
        let name = t.name.as_str();
        if name == "rope_freqs.weight" {
            return Err(terr(
                name,
                "RoPE frequency factors (Llama 3 style rope scaling) are not supported".into(),
            ));
        }
        let hf_name = hf_tensor_name(name).ok_or_else(|| {
            terr(
                name,
                format!(
                    "no Hugging Face counterpart known for this tensor (architecture {})",
                    a.arch
                ),
            )
        })?;
        let layer_part = name.strip_prefix("blk.").map(|r| {
            let (l, s) = r.split_once('.').unwrap_or((r, ""));
            (l.parse::<usize>().unwrap_or(usize::MAX), s)
        });
        let expected: Vec<usize> = match layer_part {
            None => match name {
                "token_embd.weight" | "output.weight" => vec![v, h],
                "output_norm.weight" => vec![h],
                _ => unreachable!("hf_tensor_name maps only these top-level names"),
            },
            Some((layer, suffix)) => {
                if layer >= a.n_layers {
                    return Err(terr(
                        name,
                        format!("layer {layer} is beyond block_count {}", a.n_layers),
                    ));
                }
                match suffix {
                    "attn_norm.weight" | "ffn_norm.weight" => vec![h],
                    "attn_q.weight" => vec![q, h],
                    "attn_k.weight" | "attn_v.weight" => vec![kv, h],
                    "attn_output.weight" => vec![h, q],
                    "ffn_gate.weight" | "ffn_up.weight" => vec![f, h],
                    "ffn_down.weight" => vec![h, f],
                    "attn_q.bias" => vec![q],
                    "attn_k.bias" | "attn_v.bias" => vec![kv],
                    "attn_output.bias" | "ffn_down.bias" => vec![h],
                    "ffn_gate.bias" | "ffn_up.bias" => vec![f],
                    _ => unreachable!("hf_tensor_name maps only these layer names"),
                }
            }
        };
        let shape: Vec<usize> = t.shape().iter().map(|&d| d as usize).collect();
        if shape != expected {
            return Err(terr(
                name,
                format!(
                    "shape {shape:?} (GGUF dims {:?}) does not match {expected:?} implied by the metadata",
                    t.dims
                ),
            ));
        }
        if !t.ty.can_dequantize() {
            return Err(terr(
                name,
                format!("ggml type {} cannot be dequantized by wgllm", t.ty),
            ));
        }
        let unpermute_heads = if a.arch == "llama" {
            match layer_part.map(|(_, s)| s) {
                Some("attn_q.weight" | "attn_q.bias") => Some(a.n_head),
                Some("attn_k.weight" | "attn_k.bias") => Some(a.n_kv),
                _ => None,
            }
        } else {
            None
        };
        seen.insert(name.to_string());
        plan.push(PlannedTensor {
            info: t,
            hf_name,
            shape,
            unpermute_heads,
        });
    }
    // Completeness: everything transformers will look for. Checked layer by
    // layer, so an absurd block_count fails at its first missing layer.
    let mut parts = vec![
        "attn_norm.weight",
        "ffn_norm.weight",
        "attn_q.weight",
        "attn_k.weight",
        "attn_v.weight",
        "attn_output.weight",
        "ffn_gate.weight",
        "ffn_up.weight",
        "ffn_down.weight",
    ];
    if a.qkv_bias {
        parts.extend(["attn_q.bias", "attn_k.bias", "attn_v.bias"]);
    }
    if a.o_bias {
        parts.push("attn_output.bias");
    }
    if a.mlp_bias {
        parts.extend(["ffn_gate.bias", "ffn_up.bias", "ffn_down.bias"]);
    }
    let top = [
        "token_embd.weight".to_string(),
        "output_norm.weight".to_string(),
    ];
    let layers = (0..a.n_layers).flat_map(|l| parts.iter().map(move |p| format!("blk.{l}.{p}")));
    if let Some(missing) = top.into_iter().chain(layers).find(|r| !seen.contains(r)) {
        return Err(terr(&missing, "missing from the GGUF file".into()));
    }
    Ok(plan)
}

fn out_of_range_f16(x: f32) -> bool {
    x.is_finite() && half::f16::from_f32(x).is_infinite()
}

/// Append `src` converted to `dtype` (little-endian) to `out`.
fn push_converted(
    src: &[f32],
    dtype: ConvertDType,
    out: &mut Vec<u8>,
) -> std::result::Result<(), String> {
    match dtype {
        ConvertDType::F32 => {
            for &x in src {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        ConvertDType::Bf16 => {
            for &x in src {
                let b = half::bf16::from_f32(x);
                if b.is_infinite() {
                    // Finite (checked before), but beyond bf16's largest value.
                    return Err(format!(
                        "value {x:e} is outside the bfloat16 range; convert to f32 instead"
                    ));
                }
                out.extend_from_slice(&b.to_bits().to_le_bytes());
            }
        }
        ConvertDType::F16 => {
            for &x in src {
                if out_of_range_f16(x) {
                    return Err(format!(
                        "value {x} is outside the float16 range; convert to bf16 or f32 instead"
                    ));
                }
                out.extend_from_slice(&half::f16::from_f32(x).to_bits().to_le_bytes());
            }
        }
    }
    Ok(())
}

/// Refuse a NaN or infinite value among `vals`, the dequantized elements of
/// `t` from flat index `base` on (GGUF order: row-major, a row is `dims[0]`
/// long), naming the element and how it looks in GGUF terms.
fn check_dequantized(t: &TensorInfo, vals: &[f32], base: usize) -> std::result::Result<(), String> {
    let Some(i) = vals.iter().position(|x| !x.is_finite()) else {
        return Ok(());
    };
    let flat = base + i;
    let row_len = (t.row_len() as usize).max(1);
    Err(format!(
        "dequantized element {flat} (row {}, column {} of GGUF dims {:?}, ggml type {}) is {}; \
         weights must be finite: the file is corrupt (e.g. a block scale is NaN or infinite)",
        flat / row_len,
        flat % row_len,
        t.dims,
        t.ty,
        match vals[i] {
            x if x.is_nan() => "NaN",
            x if x > 0.0 => "+Inf",
            _ => "-Inf",
        }
    ))
}

/// Dequantize one planned tensor into HF layout and `dtype` bytes. Holds the
/// output plus a scratch of at most ~1M f32, not a full f32 copy.
pub fn tensor_to_bytes(
    g: &GgufFile,
    p: &PlannedTensor<'_>,
    dtype: ConvertDType,
) -> Result<Vec<u8>> {
    let t = p.info;
    let terr = |msg: String| Error::Tensor {
        path: g.path().to_path_buf(),
        tensor: t.name.clone(),
        msg,
    };
    let n = usize::try_from(t.n_elements).map_err(|_| terr("too large for this machine".into()))?;
    let mut out = Vec::with_capacity(n * dtype.size());
    let row_len = t.row_len() as usize;
    let n_rows = t.n_rows() as usize;
    if n == 0 {
        return Ok(out);
    }
    match p.unpermute_heads {
        None => {
            let rows_per_chunk = (1usize << 20).div_ceil(row_len).max(1);
            let mut scratch = vec![0f32; rows_per_chunk.min(n_rows) * row_len];
            let mut r = 0;
            while r < n_rows {
                let k = rows_per_chunk.min(n_rows - r);
                let buf = &mut scratch[..k * row_len];
                g.dequantize_rows(t, r as u64, buf)?;
                check_dequantized(t, buf, r * row_len).map_err(terr)?;
                push_converted(buf, dtype, &mut out).map_err(terr)?;
                r += k;
            }
        }
        Some(n_head) if t.dims.len() == 1 => {
            // A bias: permute its elements as the rows of an [n, 1] matrix.
            let all = g.dequantize(t)?;
            check_dequantized(t, &all, 0).map_err(terr)?;
            let src = unpermute_rows(n, n_head).map_err(terr)?;
            let v: Vec<f32> = src.iter().map(|&s| all[s]).collect();
            push_converted(&v, dtype, &mut out).map_err(terr)?;
        }
        Some(n_head) => {
            let src = unpermute_rows(n_rows, n_head).map_err(terr)?;
            let mut scratch = vec![0f32; row_len];
            for &s in &src {
                g.dequantize_rows(t, s as u64, &mut scratch)?;
                check_dequantized(t, &scratch, s * row_len).map_err(terr)?;
                push_converted(&scratch, dtype, &mut out).map_err(terr)?;
            }
        }
    }
    debug_assert_eq!(out.len(), n * dtype.size());
    Ok(out)
}

struct WriteState<'p> {
    progress: &'p mut dyn FnMut(u64, u64),
    done: u64,
    total: u64,
    error: Option<Error>,
}

/// A tensor materialized only when safetensors asks for its bytes, so the
/// writer holds one converted tensor at a time.
struct LazyTensor<'a, 'p> {
    g: &'a GgufFile,
    plan: PlannedTensor<'a>,
    dtype: ConvertDType,
    state: &'a RefCell<WriteState<'p>>,
}

impl View for LazyTensor<'_, '_> {
    fn dtype(&self) -> Dtype {
        self.dtype.safetensors_dtype()
    }
    fn shape(&self) -> &[usize] {
        &self.plan.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        let len = self.data_len();
        let bytes = match tensor_to_bytes(self.g, &self.plan, self.dtype) {
            Ok(b) => b,
            Err(e) => {
                // View::data cannot fail: remember the first error, write
                // zeros, and let convert() report it and discard the file.
                let mut st = self.state.borrow_mut();
                st.error.get_or_insert(e);
                vec![0u8; len]
            }
        };
        let mut st = self.state.borrow_mut();
        st.done += len as u64;
        let (d, t) = (st.done, st.total);
        (st.progress)(d, t);
        std::borrow::Cow::Owned(bytes)
    }
    fn data_len(&self) -> usize {
        self.plan.shape.iter().product::<usize>() * self.dtype.size()
    }
}

pub(crate) fn write_json(path: &Path, v: &Json) -> Result<()> {
    let mut s = serde_json::to_string_pretty(v).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    s.push('\n');
    std::fs::write(path, s).map_err(|e| Error::io(path, e))
}

/// Convert a GGUF file into a Hugging Face model folder `out_dir` (created
/// if needed; existing files of the same names are replaced):
/// `model.safetensors` (HF names and layout, `dtype`), `config.json`,
/// `generation_config.json`, and whatever `tokenizer_writer` writes from the
/// GGUF's tokenizer metadata (not called when the file has none).
/// `progress(done, total)` counts bytes of tensor data written.
/// config.json is written last, so a folder without it is incomplete.
pub fn convert(
    gguf_path: impl AsRef<Path>,
    out_dir: impl AsRef<Path>,
    dtype: ConvertDType,
    tokenizer_writer: TokenizerWriter<'_>,
    progress: impl FnMut(u64, u64),
) -> Result<ConvertSummary> {
    let g = GgufFile::open(gguf_path)?;
    convert_file(&g, out_dir, dtype, tokenizer_writer, progress)
}

/// [`convert`] for an already opened file.
pub fn convert_file(
    g: &GgufFile,
    out_dir: impl AsRef<Path>,
    dtype: ConvertDType,
    tokenizer_writer: TokenizerWriter<'_>,
    mut progress: impl FnMut(u64, u64),
) -> Result<ConvertSummary> {
    let out_dir = out_dir.as_ref();
    let config = hf_config(g, dtype)?;
    let gen_config = hf_generation_config(g)?;
    let plan = plan_tensors(g)?;
    let a = arch_info(g)?;

    std::fs::create_dir_all(out_dir).map_err(|e| Error::Io {
        msg: format!("cannot create output folder: {e}"),
        path: out_dir.to_path_buf(),
        source: Some(e),
    })?;

    let mut source_types = BTreeMap::new();
    for p in &plan {
        *source_types
            .entry(p.info.ty.name().to_string())
            .or_insert(0) += 1;
    }
    let total: u64 = plan
        .iter()
        .map(|p| p.shape.iter().product::<usize>() as u64 * dtype.size() as u64)
        .sum();
    let n_tensors = plan.len();
    let state = RefCell::new(WriteState {
        progress: &mut progress,
        done: 0,
        total,
        error: None,
    });
    let st_path = out_dir.join("model.safetensors");
    let tensors: Vec<(String, LazyTensor)> = plan
        .into_iter()
        .map(|p| {
            (
                p.hf_name.clone(),
                LazyTensor {
                    g,
                    plan: p,
                    dtype,
                    state: &state,
                },
            )
        })
        .collect();
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    // safetensors writes to a temporary file and renames it into place.
    let res = safetensors::serialize_to_file(tensors, Some(meta), &st_path);
    let state = state.into_inner();
    if let Some(e) = state.error {
        let _ = std::fs::remove_file(&st_path);
        return Err(e);
    }
    res.map_err(|e| Error::Io {
        path: st_path.clone(),
        msg: format!("cannot write safetensors: {e}"),
        source: None,
    })?;

    let gen_path = out_dir.join("generation_config.json");
    write_json(&gen_path, &gen_config)?;
    // safetensors writes through a private (0600) temporary file; give the
    // result the permissions an ordinary new file gets here.
    if let Ok(m) = std::fs::metadata(&gen_path) {
        let _ = std::fs::set_permissions(&st_path, m.permissions());
    }
    let tokenizer_written = tokenizer_writer(g, out_dir)?;
    write_json(&out_dir.join("config.json"), &config)?;

    Ok(ConvertSummary {
        out_dir: out_dir.to_path_buf(),
        gguf_arch: a.arch.to_string(),
        hf_architecture: a.hf_class.to_string(),
        dtype,
        n_tensors,
        tied: a.tied,
        source_types,
        tensor_bytes: total,
        tokenizer_written,
        config,
    })
}

/// Whether `path` starts with the GGUF magic (false when unreadable).
pub fn is_gguf_file(path: impl AsRef<Path>) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == super::reader::GGUF_MAGIC
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llama.cpp's permute written as in convert_hf_to_gguf.py, on row
    /// indices: reshape(n_head, 2, hd/2) → swapaxes(1, 2) → flatten.
    fn reference_permute(rows: usize, n_head: usize) -> Vec<usize> {
        let hd = rows / n_head;
        let mut out = Vec::new();
        for h in 0..n_head {
            for i in 0..hd / 2 {
                for s in 0..2 {
                    out.push(h * hd + s * (hd / 2) + i);
                }
            }
        }
        out // out[gguf_row] = hf_row
    }

    #[test]
    fn permute_matches_llama_cpp_and_unpermute_inverts_it() {
        for (rows, heads) in [(8, 1), (8, 2), (12, 3), (576, 9), (192, 3), (64, 4)] {
            let p = permute_rows(rows, heads).unwrap();
            assert_eq!(
                p,
                reference_permute(rows, heads),
                "rows {rows} heads {heads}"
            );
            let u = unpermute_rows(rows, heads).unwrap();
            // gguf[r] = hf[p[r]] and hf[r] = gguf[u[r]]  =>  p[u[r]] = r.
            for r in 0..rows {
                assert_eq!(p[u[r]], r);
                assert_eq!(u[p[r]], r);
            }
        }
        // Hand-computed: one head of 8 rows, hf rows a0 a1 a2 a3 b0 b1 b2 b3
        // (first half a, second half b) are stored interleaved a0 b0 a1 b1 ...
        assert_eq!(permute_rows(8, 1).unwrap(), vec![0, 4, 1, 5, 2, 6, 3, 7]);
        assert_eq!(unpermute_rows(8, 1).unwrap(), vec![0, 2, 4, 6, 1, 3, 5, 7]);
        // Two heads of 4: per head rows [0, 2, 1, 3].
        assert_eq!(unpermute_rows(8, 2).unwrap(), vec![0, 2, 1, 3, 4, 6, 5, 7]);
        assert!(unpermute_rows(9, 2).is_err());
        assert!(unpermute_rows(6, 2).is_err()); // head size 3 is odd
        assert!(unpermute_rows(8, 0).is_err());
    }

    #[test]
    fn names() {
        let cases = [
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("output_norm.weight", "model.norm.weight"),
            ("output.weight", "lm_head.weight"),
            (
                "blk.0.attn_norm.weight",
                "model.layers.0.input_layernorm.weight",
            ),
            (
                "blk.12.ffn_norm.weight",
                "model.layers.12.post_attention_layernorm.weight",
            ),
            (
                "blk.3.attn_q.weight",
                "model.layers.3.self_attn.q_proj.weight",
            ),
            ("blk.3.attn_q.bias", "model.layers.3.self_attn.q_proj.bias"),
            (
                "blk.3.attn_k.weight",
                "model.layers.3.self_attn.k_proj.weight",
            ),
            ("blk.3.attn_v.bias", "model.layers.3.self_attn.v_proj.bias"),
            (
                "blk.3.attn_output.weight",
                "model.layers.3.self_attn.o_proj.weight",
            ),
            (
                "blk.29.ffn_gate.weight",
                "model.layers.29.mlp.gate_proj.weight",
            ),
            ("blk.29.ffn_up.weight", "model.layers.29.mlp.up_proj.weight"),
            (
                "blk.29.ffn_down.weight",
                "model.layers.29.mlp.down_proj.weight",
            ),
        ];
        for (g, h) in cases {
            assert_eq!(hf_tensor_name(g).as_deref(), Some(h), "{g}");
        }
        for bad in [
            "blk.x.attn_q.weight",
            "blk..attn_q.weight",
            "blk.01.attn_q.weight",
            "blk.1.attn_norm.bias",
            "blk.1.attn_q.scale",
            "blk.1.ffn_gate_exps.weight",
            "rope_freqs.weight",
            "blk.1",
            "",
        ] {
            assert_eq!(hf_tensor_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn dtype_rounding() {
        // bf16 round to nearest even: 1 + 2^-8 is halfway between 1 and
        // 1 + 2^-7 and rounds to the even mantissa (1.0); 1 + 3*2^-8 is
        // halfway between 1 + 2^-7 and 1 + 2^-6 and rounds up to 1 + 2^-6.
        let mut out = Vec::new();
        let xs = [1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8), -2.5];
        push_converted(&xs, ConvertDType::Bf16, &mut out).unwrap();
        let got: Vec<u16> = out
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        assert_eq!(got, vec![0x3f80, 0x3f82, 0xc020]);
        let mut out = Vec::new();
        assert!(push_converted(&[70000.0], ConvertDType::F16, &mut out).is_err());
        let mut out = Vec::new();
        push_converted(&[1.5, f32::INFINITY], ConvertDType::F16, &mut out).unwrap();
        assert_eq!(out, vec![0x00, 0x3e, 0x00, 0x7c]);
        assert_eq!(ConvertDType::parse("BF16").unwrap(), ConvertDType::Bf16);
        assert!(ConvertDType::parse("int8").is_err());
    }

    #[test]
    fn decimal_floats() {
        assert_eq!(f32_as_decimal(1e-5), 1e-5);
        assert_eq!(f32_as_decimal(1e-6), 1e-6);
        assert_eq!(f32_as_decimal(100000.0), 100000.0);
        assert_eq!(f32_as_decimal(1e-5) as f32, 1e-5f32);
    }
}
