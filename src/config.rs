//! Model configuration: a Hugging Face `config.json` for `Qwen2ForCausalLM`,
//! `LlamaForCausalLM`, `MistralForCausalLM`, `Qwen3ForCausalLM` or
//! `Gemma3ForCausalLM` (text only, `model_type` `gemma3_text`).
//!
//! Defaults follow the transformers config classes (checked against
//! transformers 5.x `configuration_{llama,qwen2,mistral}.py` and
//! `modeling_rope_utils.py`), because the numbers we must match are the ones
//! PyTorch computes from the same file:
//!
//! - `tie_word_embeddings`: `false` for all three classes.
//! - `num_key_value_heads`: when the key is absent, LlamaConfig uses
//!   `num_attention_heads`, but Qwen2Config defaults to 32 and MistralConfig
//!   to 8; an explicit `null` means `num_attention_heads` for all three.
//! - `head_dim`: honoured when present and non-null (Qwen2's modeling code
//!   reads it too, although Qwen2Config does not declare it); otherwise
//!   `hidden_size / num_attention_heads`.
//! - `rope_theta`: 10000.0 (`RotaryEmbeddingConfigMixin.default_theta`).
//!   transformers 5 writes RoPE settings as `rope_parameters: {rope_type,
//!   rope_theta, ...}`; transformers 4 wrote top-level `rope_theta` plus
//!   `rope_scaling: {type | rope_type, factor, ...}`. As in transformers,
//!   a non-empty `rope_scaling` wins over `rope_parameters`, and `rope_theta`
//!   inside the chosen dict wins over the top-level key.
//! - `attention_bias`, `mlp_bias`: Llama only, default `false` (Llama's
//!   `attention_bias` covers q/k/v **and** o_proj). Qwen2 always has q/k/v
//!   biases and no o_proj bias; Mistral never has biases (MistralAttention
//!   hard-codes `bias=False` and ignores the key).
//! - `rms_norm_eps`: 1e-6; `max_position_embeddings`: 2048 (Llama), 32768
//!   (Qwen2), 131072 (Mistral).
//! - Sliding window: Qwen2 applies `sliding_window` only when
//!   `use_sliding_window` is true, and only on layers whose `layer_types`
//!   entry is `sliding_attention` (derived from `max_window_layers` when
//!   `layer_types` is absent); Mistral applies `sliding_window` to every layer
//!   when it is non-null; Llama has none.
//! - Qwen3 (`configuration_qwen3.py`): like Qwen2 for the window, but
//!   `head_dim` defaults to 128 and `num_key_value_heads` to 32 when absent,
//!   and `attention_bias` (default false) covers q/k/v **and** o_proj. Every
//!   layer has a per-head RMSNorm on q and k (`q_norm`, `k_norm`).
//! - Gemma 3 text (`configuration_gemma3.py`, `Gemma3TextConfig`): defaults
//!   head_dim 256, num_key_value_heads 4, `hidden_activation`
//!   `gelu_pytorch_tanh`, tie_word_embeddings true, query_pre_attn_scalar
//!   256, sliding_window 4096, max_position_embeddings 131072. `layer_types`
//!   when absent: layer i is sliding unless `(i + 1) % sliding_window_pattern
//!   == 0` (pattern default 6). RoPE per layer type: transformers 5 writes
//!   `rope_parameters: {full_attention: {...}, sliding_attention: {...}}`;
//!   the legacy keys are `rope_theta` (global, default 1e6),
//!   `rope_local_base_freq` (sliding, default 1e4) and `rope_scaling` (applied
//!   to full_attention only). `final_logit_softcapping` is applied when set;
//!   `attn_logit_softcapping` and `use_bidirectional_attention` are not
//!   implemented and are refused when set.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Largest accepted `num_hidden_layers`. Real checkpoints have at most a
/// few hundred; the bound keeps a corrupt config from allocating per-layer
/// tables out of proportion to the file.
pub const MAX_LAYERS: usize = 1 << 12;
/// Largest accepted vocabulary, hidden, intermediate, head count and
/// head_dim (real values stay under 2^19). Any product of two such sizes
/// fits easily in u64, so size arithmetic downstream cannot overflow.
pub const MAX_DIM: usize = 1 << 24;

/// The supported model families.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Arch {
    Qwen2,
    Llama,
    Mistral,
    Qwen3,
    Gemma3,
}

const ARCHS: [Arch; 5] = [
    Arch::Qwen2,
    Arch::Llama,
    Arch::Mistral,
    Arch::Qwen3,
    Arch::Gemma3,
];

impl Arch {
    /// The transformers class name (`architectures[0]`).
    pub fn hf_class(self) -> &'static str {
        match self {
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Llama => "LlamaForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
            Arch::Qwen3 => "Qwen3ForCausalLM",
            Arch::Gemma3 => "Gemma3ForCausalLM",
        }
    }
    /// The `model_type` string.
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Qwen2 => "qwen2",
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma3 => "gemma3_text",
        }
    }
    fn from_class(s: &str) -> Option<Self> {
        ARCHS.into_iter().find(|a| a.hf_class() == s)
    }
    fn from_model_type(s: &str) -> Option<Self> {
        ARCHS.into_iter().find(|a| a.model_type() == s)
    }
}

/// A parsed and validated config.json.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    /// The file this was read from (for error messages).
    pub path: PathBuf,
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    /// As written in the file; PyTorch adds it to an f32 variance, so kernels
    /// use it as f32.
    pub rms_norm_eps: f64,
    /// RoPE of every layer (of the full-attention layers when
    /// [`Self::sliding_rope`] is set).
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    /// Gemma 3: (rope_theta, scaling) of the sliding-window layers.
    pub sliding_rope: Option<(f64, RopeScaling)>,
    /// Gemma 3: attention scores are scaled by `query_pre_attn_scalar^-0.5`.
    pub query_pre_attn_scalar: Option<f64>,
    /// Gemma 3: logits become `tanh(logits / c) * c` when set.
    pub final_logit_softcapping: Option<f64>,
    pub tie_word_embeddings: bool,
    /// The `attention_bias` key as read (Llama only; see [`Self::has_qkv_bias`]).
    pub attention_bias: bool,
    /// The `mlp_bias` key as read (Llama only; see [`Self::has_mlp_bias`]).
    pub mlp_bias: bool,
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    /// `sliding_window` as written (null → None). Whether it applies depends
    /// on the architecture: see [`Self::layer_sliding_window`].
    pub sliding_window: Option<usize>,
    /// Qwen2's `use_sliding_window` (default false); Mistral: true iff
    /// `sliding_window` is set; Llama: false.
    pub use_sliding_window: bool,
    /// Qwen2's `max_window_layers` (default 28).
    pub max_window_layers: Option<usize>,
    /// Per-layer attention kind (`layer_types`; `true` = sliding).
    pub layer_is_sliding: Vec<bool>,
    pub bos_token_id: Option<u32>,
    /// `eos_token_id` as a list (an int becomes one entry; null → empty).
    pub eos_token_ids: Vec<u32>,
    /// `dtype` (transformers 5) or `torch_dtype` (4.x), e.g. "bfloat16".
    pub dtype: Option<String>,
}

impl ModelConfig {
    /// Read and validate `path` (a config.json).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| {
            let msg = if e.kind() == std::io::ErrorKind::NotFound {
                "config.json not found (a Hugging Face model folder needs config.json)".to_string()
            } else {
                format!("cannot read config: {e}")
            };
            Error::Io {
                path: path.to_path_buf(),
                msg,
                source: Some(e),
            }
        })?;
        Self::from_json_str(&text, path)
    }

    /// Parse and validate config.json text; `path` is only used in errors.
    pub fn from_json_str(s: &str, path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let v: Value = serde_json::from_str(s).map_err(|e| Error::Json {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        let Value::Object(obj) = v else {
            return Err(Error::Json {
                path,
                msg: format!("expected a JSON object at the top level, got {}", kind(&v)),
            });
        };
        Reader { path, obj: &obj }.parse()
    }

    /// Query heads per KV head (GQA group size).
    pub fn n_rep(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }
    /// Width of q_proj's output: `num_attention_heads * head_dim`.
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }
    /// Width of k_proj's / v_proj's output: `num_key_value_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }
    /// q/k/v projections carry a bias (Qwen2 always; Llama when `attention_bias`).
    pub fn has_qkv_bias(&self) -> bool {
        match self.arch {
            Arch::Qwen2 => true,
            Arch::Llama | Arch::Qwen3 | Arch::Gemma3 => self.attention_bias,
            Arch::Mistral => false,
        }
    }
    /// o_proj carries a bias (Llama, Qwen3, Gemma 3 when `attention_bias`).
    pub fn has_o_bias(&self) -> bool {
        match self.arch {
            Arch::Llama | Arch::Qwen3 | Arch::Gemma3 => self.attention_bias,
            Arch::Qwen2 | Arch::Mistral => false,
        }
    }
    /// A per-head RMSNorm on q and k before RoPE (Qwen3, Gemma 3).
    pub fn has_qk_norm(&self) -> bool {
        matches!(self.arch, Arch::Qwen3 | Arch::Gemma3)
    }
    /// RMSNorm weights are offsets from one: `x * (1 + w)` (Gemma).
    pub fn norm_unit_offset(&self) -> bool {
        self.arch == Arch::Gemma3
    }
    /// The factor the embedding rows are multiplied by (Gemma:
    /// `hidden_size**0.5`, a Python float that `torch.tensor` stores as f32;
    /// transformers casts it to the weight dtype, which is f32 in the f32
    /// run this runtime's f32 arithmetic matches).
    pub fn embed_scale(&self) -> Option<f32> {
        (self.arch == Arch::Gemma3).then(|| (self.hidden_size as f64).sqrt() as f32)
    }
    /// The softmax scale of attention scores: `query_pre_attn_scalar^-0.5`
    /// when set (Gemma), else `head_dim^-0.5` (a Python float applied to f32
    /// scores, so rounded to f32 once).
    pub fn attention_scale(&self) -> f32 {
        let d = self.query_pre_attn_scalar.unwrap_or(self.head_dim as f64);
        d.powf(-0.5) as f32
    }
    /// (rope_theta, scaling) of `layer`: Gemma's sliding layers have their own.
    pub fn layer_rope(&self, layer: usize) -> (f64, &RopeScaling) {
        match &self.sliding_rope {
            Some((t, s)) if self.layer_is_sliding.get(layer) == Some(&true) => (*t, s),
            _ => (self.rope_theta, &self.rope_scaling),
        }
    }
    /// gate/up/down projections carry a bias (Llama when `mlp_bias`).
    pub fn has_mlp_bias(&self) -> bool {
        self.arch == Arch::Llama && self.mlp_bias
    }
    /// The output projection is the embedding matrix (no `lm_head.weight` used).
    pub fn tied(&self) -> bool {
        self.tie_word_embeddings
    }
    /// The attention window of `layer` as transformers applies it (`None` =
    /// full causal attention).
    pub fn layer_sliding_window(&self, layer: usize) -> Option<usize> {
        match self.arch {
            Arch::Llama => None,
            Arch::Mistral => self.sliding_window,
            Arch::Gemma3 => {
                if self.layer_is_sliding.get(layer) == Some(&true) {
                    self.sliding_window
                } else {
                    None
                }
            }
            Arch::Qwen2 | Arch::Qwen3 => {
                if self.use_sliding_window && self.layer_is_sliding.get(layer) == Some(&true) {
                    self.sliding_window
                } else {
                    None
                }
            }
        }
    }
}

fn kind(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(s) => format!("string {s:?}"),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

struct Reader<'a> {
    path: PathBuf,
    obj: &'a Map<String, Value>,
}

impl Reader<'_> {
    fn err(&self, field: &str, msg: impl Into<String>) -> Error {
        Error::Config {
            path: self.path.clone(),
            field: field.to_string(),
            msg: msg.into(),
        }
    }

    /// The value of `field` in `obj`, treating JSON null as absent.
    fn get<'v>(obj: &'v Map<String, Value>, field: &str) -> Option<&'v Value> {
        obj.get(field).filter(|v| !v.is_null())
    }

    fn uint_value(&self, field: &str, v: &Value) -> Result<usize> {
        v.as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| {
                self.err(
                    field,
                    format!("expected a non-negative integer, got {}", kind(v)),
                )
            })
    }

    fn req_pos(&self, field: &str) -> Result<usize> {
        let v = Self::get(self.obj, field).ok_or_else(|| {
            self.err(
                field,
                "required field is missing or null (expected a positive integer)",
            )
        })?;
        let n = self.uint_value(field, v)?;
        if n == 0 {
            return Err(self.err(field, "expected a positive integer, got 0"));
        }
        Ok(n)
    }

    /// A required positive integer that is at most `max`: sizes that
    /// allocate or multiply are bounded before anything uses them.
    fn req_size(&self, field: &str, max: usize) -> Result<usize> {
        let n = self.req_pos(field)?;
        if n > max {
            return Err(self.err(field, Self::too_big(n, max)));
        }
        Ok(n)
    }

    fn too_big(n: usize, max: usize) -> String {
        format!("{n} is larger than any model this runtime accepts (at most {max}); the config is corrupt")
    }

    fn opt_pos(&self, field: &str) -> Result<Option<usize>> {
        match Self::get(self.obj, field) {
            None => Ok(None),
            Some(v) => {
                let n = self.uint_value(field, v)?;
                if n == 0 {
                    return Err(self.err(field, "expected a positive integer, got 0"));
                }
                Ok(Some(n))
            }
        }
    }

    fn float_in(&self, obj: &Map<String, Value>, field: &str, shown: &str) -> Result<Option<f64>> {
        match Self::get(obj, field) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .map(Some)
                .ok_or_else(|| self.err(shown, format!("expected a number, got {}", kind(v)))),
        }
    }

    fn positive_float(
        &self,
        obj: &Map<String, Value>,
        field: &str,
        shown: &str,
    ) -> Result<Option<f64>> {
        let x = self.float_in(obj, field, shown)?;
        if let Some(x) = x {
            if x <= 0.0 {
                return Err(self.err(shown, format!("expected a positive number, got {x}")));
            }
        }
        Ok(x)
    }

    fn opt_bool(&self, field: &str) -> Result<Option<bool>> {
        match Self::get(self.obj, field) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.err(field, format!("expected true or false, got {}", kind(v)))),
        }
    }

    fn opt_str(&self, field: &str) -> Result<Option<&str>> {
        match Self::get(self.obj, field) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.err(field, format!("expected a string, got {}", kind(v)))),
        }
    }

    fn token_id(&self, field: &str, v: &Value) -> Result<u32> {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| {
                self.err(
                    field,
                    format!("expected a token id (integer >= 0), got {}", kind(v)),
                )
            })
    }

    fn arch(&self) -> Result<Arch> {
        let supported = "supported: Qwen2ForCausalLM, LlamaForCausalLM, MistralForCausalLM, Qwen3ForCausalLM, Gemma3ForCausalLM";
        let model_type = self.opt_str("model_type")?;
        let from_archs = match Self::get(self.obj, "architectures") {
            None => None,
            Some(Value::Array(a)) if a.is_empty() => None,
            Some(Value::Array(a)) => {
                let first = a[0].as_str().ok_or_else(|| {
                    self.err(
                        "architectures",
                        format!(
                            "expected a list of class names, got {} as the first entry",
                            kind(&a[0])
                        ),
                    )
                })?;
                Some(Arch::from_class(first).ok_or_else(|| {
                    self.err(
                        "architectures",
                        format!("unsupported architecture `{first}`; {supported}"),
                    )
                })?)
            }
            Some(v) => {
                return Err(self.err(
                    "architectures",
                    format!("expected a list of class names, got {}", kind(v)),
                ))
            }
        };
        match (from_archs, model_type) {
            (Some(a), Some(mt)) if mt != a.model_type() => Err(self.err(
                "model_type",
                format!(
                    "`{mt}` contradicts architectures[0] = `{}` (expected model_type `{}`)",
                    a.hf_class(),
                    a.model_type()
                ),
            )),
            (Some(a), _) => Ok(a),
            (None, Some(mt)) => Arch::from_model_type(mt).ok_or_else(|| {
                self.err(
                    "model_type",
                    format!("unsupported model_type `{mt}` (and no `architectures`); supported: qwen2, llama, mistral, qwen3, gemma3_text"),
                )
            }),
            (None, None) => Err(self.err(
                "architectures",
                format!("missing: neither `architectures` nor `model_type` is set; {supported}"),
            )),
        }
    }

    /// RoPE settings: (rope_theta, scaling), from either layout.
    fn rope(&self, max_pos: usize, layer_types: &[&str]) -> Result<(f64, RopeScaling)> {
        // transformers: `rope_parameters = rope_scaling or rope_parameters`.
        let nonempty = |f: &str| -> Result<Option<&Map<String, Value>>> {
            match Self::get(self.obj, f) {
                None => Ok(None),
                Some(Value::Object(m)) if m.is_empty() => Ok(None),
                Some(Value::Object(m)) => Ok(Some(m)),
                Some(v) => Err(self.err(f, format!("expected an object or null, got {}", kind(v)))),
            }
        };
        let (field, dict) = match nonempty("rope_scaling")? {
            Some(m) => ("rope_scaling", Some(m)),
            None => ("rope_parameters", nonempty("rope_parameters")?),
        };
        let top_theta = self.positive_float(self.obj, "rope_theta", "rope_theta")?;
        let Some(d) = dict else {
            return Ok((top_theta.unwrap_or(10000.0), RopeScaling::None));
        };
        if let Some(k) = d.keys().find(|k| layer_types.contains(&k.as_str())) {
            return Err(self.err(
                &format!("{field}.{k}"),
                "per-layer-type RoPE parameters are not supported (expected one flat dict)",
            ));
        }
        self.rope_flat(field, d, top_theta.unwrap_or(10000.0), max_pos)
    }

    /// Gemma 3's RoPE per layer type: ((global theta, scaling), (sliding
    /// theta, scaling)), from `rope_parameters.{full,sliding}_attention` or
    /// the legacy `rope_theta` / `rope_local_base_freq` / `rope_scaling`.
    #[allow(clippy::type_complexity)]
    fn rope_gemma(&self, max_pos: usize) -> Result<((f64, RopeScaling), (f64, RopeScaling))> {
        let obj_or_none =
            |m: &Map<String, Value>, f: &str, shown: &str| -> Result<Map<String, Value>> {
                match Self::get(m, f) {
                    None => Ok(Map::new()),
                    Some(Value::Object(m)) => Ok(m.clone()),
                    Some(v) => Err(self.err(
                        shown,
                        format!("expected an object or null, got {}", kind(v)),
                    )),
                }
            };
        let params = obj_or_none(self.obj, "rope_parameters", "rope_parameters")?;
        if let Some(k) = params
            .keys()
            .find(|k| *k != "full_attention" && *k != "sliding_attention")
        {
            return Err(self.err(
                &format!("rope_parameters.{k}"),
                "Gemma 3 expects RoPE parameters per layer type: {\"full_attention\": {...}, \"sliding_attention\": {...}}",
            ));
        }
        let mut full = obj_or_none(&params, "full_attention", "rope_parameters.full_attention")?;
        let sliding = obj_or_none(
            &params,
            "sliding_attention",
            "rope_parameters.sliding_attention",
        )?;
        // transformers: rope_scaling updates the full-attention parameters.
        let legacy = obj_or_none(self.obj, "rope_scaling", "rope_scaling")?;
        let full_field = if legacy.is_empty() {
            "rope_parameters.full_attention"
        } else {
            "rope_scaling"
        };
        full.extend(legacy);
        let global_default = self
            .positive_float(self.obj, "rope_theta", "rope_theta")?
            .unwrap_or(1_000_000.0);
        let local_default = self
            .positive_float(self.obj, "rope_local_base_freq", "rope_local_base_freq")?
            .unwrap_or(10_000.0);
        Ok((
            self.rope_flat(full_field, &full, global_default, max_pos)?,
            self.rope_flat(
                "rope_parameters.sliding_attention",
                &sliding,
                local_default,
                max_pos,
            )?,
        ))
    }

    /// One flat RoPE dict (`{rope_type, rope_theta, factor, ...}`) read as
    /// field `field`; `default_theta` when it has no `rope_theta`.
    fn rope_flat(
        &self,
        field: &str,
        d: &Map<String, Value>,
        default_theta: f64,
        max_pos: usize,
    ) -> Result<(f64, RopeScaling)> {
        let f = |k: &str| format!("{field}.{k}");
        let theta = self
            .positive_float(d, "rope_theta", &f("rope_theta"))?
            .unwrap_or(default_theta);
        let type_key = if d.contains_key("rope_type") {
            "rope_type"
        } else {
            "type"
        };
        let rope_type = match Self::get(d, type_key) {
            None => "default",
            Some(Value::String(s)) => s.as_str(),
            Some(v) => {
                return Err(self.err(&f(type_key), format!("expected a string, got {}", kind(v))))
            }
        };
        let partial = self
            .float_in(d, "partial_rotary_factor", &f("partial_rotary_factor"))?
            .or(self.float_in(self.obj, "partial_rotary_factor", "partial_rotary_factor")?);
        if let Some(p) = partial {
            if p != 1.0 {
                return Err(self.err(
                    &f("partial_rotary_factor"),
                    format!("partial rotary embedding ({p}) is not supported; expected 1.0"),
                ));
            }
        }
        let need = |k: &str| -> Result<f64> {
            self.positive_float(d, k, &f(k))?.ok_or_else(|| {
                self.err(
                    &f(k),
                    format!("required for rope_type `{rope_type}` (expected a positive number)"),
                )
            })
        };
        let scaling = match rope_type {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear {
                factor: need("factor")? as f32,
            },
            "llama3" => {
                // transformers: a top-level `original_max_position_embeddings`
                // takes priority, else the dict's, else max_position_embeddings.
                let omp = match Self::get(self.obj, "original_max_position_embeddings") {
                    Some(v) => self.uint_value("original_max_position_embeddings", v)?,
                    None => match Self::get(d, "original_max_position_embeddings") {
                        Some(v) => self.uint_value(&f("original_max_position_embeddings"), v)?,
                        None => max_pos,
                    },
                };
                if omp == 0 {
                    return Err(self.err(
                        &f("original_max_position_embeddings"),
                        "expected a positive integer, got 0",
                    ));
                }
                RopeScaling::Llama3 {
                    factor: need("factor")? as f32,
                    low_freq_factor: need("low_freq_factor")? as f32,
                    high_freq_factor: need("high_freq_factor")? as f32,
                    original_max_position_embeddings: omp,
                }
            }
            other => {
                return Err(self.err(
                    &f(type_key),
                    format!("unsupported RoPE type `{other}`; supported: default, linear, llama3"),
                ))
            }
        };
        Ok((theta, scaling))
    }

    fn parse(&self) -> Result<ModelConfig> {
        let arch = self.arch()?;
        let vocab_size = self.req_size("vocab_size", MAX_DIM)?;
        let hidden_size = self.req_size("hidden_size", MAX_DIM)?;
        let intermediate_size = self.req_size("intermediate_size", MAX_DIM)?;
        let num_hidden_layers = self.req_size("num_hidden_layers", MAX_LAYERS)?;
        let num_attention_heads = self.req_size("num_attention_heads", MAX_DIM)?;

        // Absent key → the class default; explicit null → num_attention_heads.
        let num_key_value_heads = match self.obj.get("num_key_value_heads") {
            None => match arch {
                Arch::Llama => num_attention_heads,
                Arch::Qwen2 | Arch::Qwen3 => 32,
                Arch::Mistral => 8,
                Arch::Gemma3 => 4,
            },
            Some(Value::Null) => num_attention_heads,
            Some(_) => self.req_size("num_key_value_heads", MAX_DIM)?,
        };
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(self.err(
                "num_key_value_heads",
                format!(
                    "{num_key_value_heads} does not divide num_attention_heads = {num_attention_heads}{}",
                    if self.obj.contains_key("num_key_value_heads") {
                        String::new()
                    } else {
                        format!(
                            " (the key is absent, so transformers' {} default {num_key_value_heads} applies; set it explicitly)",
                            arch.hf_class()
                        )
                    }
                ),
            ));
        }
        let head_dim = match (self.opt_pos("head_dim")?, arch) {
            (Some(d), _) if d > MAX_DIM => {
                return Err(self.err("head_dim", Self::too_big(d, MAX_DIM)));
            }
            (Some(d), _) => d,
            // Qwen3Config / Gemma3TextConfig declare their own defaults.
            (None, Arch::Qwen3) => 128,
            (None, Arch::Gemma3) => 256,
            (None, _) => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(self.err(
                        "head_dim",
                        format!(
                            "absent, and hidden_size {hidden_size} is not a multiple of num_attention_heads {num_attention_heads}; set head_dim explicitly"
                        ),
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(self.err(
                "head_dim",
                format!("{head_dim} is odd; rotary embeddings need an even head_dim"),
            ));
        }
        if num_attention_heads.checked_mul(head_dim).is_none() || u32::try_from(vocab_size).is_err()
        {
            return Err(self.err("vocab_size", "sizes overflow"));
        }

        let rms_norm_eps = self
            .positive_float(self.obj, "rms_norm_eps", "rms_norm_eps")?
            .unwrap_or(1e-6);
        let max_position_embeddings =
            self.opt_pos("max_position_embeddings")?
                .unwrap_or(match arch {
                    Arch::Llama => 2048,
                    Arch::Qwen2 => 32768,
                    Arch::Mistral | Arch::Gemma3 => 4096 * 32,
                    Arch::Qwen3 => 32768,
                });

        // Gemma's MLP reads `hidden_activation`; the others `hidden_act`.
        let (act_field, act_default) = match arch {
            Arch::Gemma3 => ("hidden_activation", "gelu_pytorch_tanh"),
            _ => ("hidden_act", "silu"),
        };
        let hidden_act = self.opt_str(act_field)?.unwrap_or(act_default).to_string();
        // transformers' ACT2FN maps both "silu" and "swish" to SiLU, and
        // "gelu_pytorch_tanh" to GELU's tanh approximation.
        let supported_act = match arch {
            Arch::Gemma3 => hidden_act == "gelu_pytorch_tanh",
            _ => hidden_act == "silu" || hidden_act == "swish",
        };
        if !supported_act {
            return Err(self.err(
                act_field,
                format!("unsupported activation `{hidden_act}`; expected \"{act_default}\""),
            ));
        }

        let tie_word_embeddings = self
            .opt_bool("tie_word_embeddings")?
            .unwrap_or(arch == Arch::Gemma3);
        let attention_bias = self.opt_bool("attention_bias")?.unwrap_or(false);
        let mlp_bias = self.opt_bool("mlp_bias")?.unwrap_or(false);

        // Sliding window.
        let sliding_window = match arch {
            // Qwen2Config's default is 4096 (only used with use_sliding_window).
            Arch::Qwen2 if !self.obj.contains_key("sliding_window") => Some(4096),
            // MistralConfig's, Qwen3Config's and Gemma3TextConfig's default is 4096.
            Arch::Mistral | Arch::Qwen3 | Arch::Gemma3
                if !self.obj.contains_key("sliding_window") =>
            {
                Some(4096)
            }
            _ => match Self::get(self.obj, "sliding_window") {
                None => None,
                Some(v) => Some(self.uint_value("sliding_window", v)?),
            },
        };
        let (use_sliding_window, max_window_layers) = match arch {
            Arch::Qwen2 | Arch::Qwen3 => (
                self.opt_bool("use_sliding_window")?.unwrap_or(false),
                Some(self.opt_pos("max_window_layers")?.unwrap_or(28)),
            ),
            Arch::Mistral | Arch::Gemma3 => (sliding_window.is_some(), None),
            Arch::Llama => (false, None),
        };
        if use_sliding_window && sliding_window == Some(0) {
            return Err(self.err("sliding_window", "expected a positive integer, got 0"));
        }
        let mut layer_type_names: Vec<&str> = Vec::new();
        let layer_is_sliding = match (arch, Self::get(self.obj, "layer_types")) {
            (Arch::Qwen2 | Arch::Qwen3 | Arch::Gemma3, Some(Value::Array(a))) => {
                if a.len() != num_hidden_layers {
                    return Err(self.err(
                        "layer_types",
                        format!(
                            "has {} entries, expected num_hidden_layers = {num_hidden_layers}",
                            a.len()
                        ),
                    ));
                }
                let mut out = Vec::with_capacity(a.len());
                for (i, t) in a.iter().enumerate() {
                    match t.as_str() {
                        Some(s @ "full_attention") => {
                            layer_type_names.push(s);
                            out.push(false)
                        }
                        Some(s @ "sliding_attention") => {
                            layer_type_names.push(s);
                            out.push(true)
                        }
                        _ => {
                            return Err(self.err(
                                &format!("layer_types[{i}]"),
                                format!(
                                    "expected \"full_attention\" or \"sliding_attention\", got {}",
                                    kind(t)
                                ),
                            ))
                        }
                    }
                }
                out
            }
            (Arch::Qwen2 | Arch::Qwen3 | Arch::Gemma3, Some(v)) => {
                return Err(self.err("layer_types", format!("expected a list, got {}", kind(v))))
            }
            (Arch::Gemma3, None) => {
                let pattern = self.opt_pos("sliding_window_pattern")?.unwrap_or(6);
                (0..num_hidden_layers)
                    .map(|i| (i + 1) % pattern != 0)
                    .collect()
            }
            (Arch::Qwen2 | Arch::Qwen3, None) => {
                let on = use_sliding_window && sliding_window.is_some();
                let mwl = max_window_layers.unwrap_or(28);
                (0..num_hidden_layers).map(|i| on && i >= mwl).collect()
            }
            (Arch::Mistral, _) => vec![sliding_window.is_some(); num_hidden_layers],
            (Arch::Llama, _) => vec![false; num_hidden_layers],
        };
        if layer_type_names.is_empty() {
            layer_type_names = vec!["full_attention", "sliding_attention"];
        }

        let ((rope_theta, rope_scaling), sliding_rope) = match arch {
            Arch::Gemma3 => {
                let (global, local) = self.rope_gemma(max_position_embeddings)?;
                (global, Some(local))
            }
            _ => (self.rope(max_position_embeddings, &layer_type_names)?, None),
        };
        let (query_pre_attn_scalar, final_logit_softcapping) = match arch {
            Arch::Gemma3 => {
                for field in ["attn_logit_softcapping"] {
                    if Self::get(self.obj, field).is_some() {
                        return Err(self.err(
                            field,
                            "attention logit soft-capping is not implemented (expected null or absent)",
                        ));
                    }
                }
                if self.opt_bool("use_bidirectional_attention")? == Some(true) {
                    return Err(self.err(
                        "use_bidirectional_attention",
                        "bidirectional attention is not implemented (expected false)",
                    ));
                }
                (
                    Some(
                        self.positive_float(
                            self.obj,
                            "query_pre_attn_scalar",
                            "query_pre_attn_scalar",
                        )?
                        .unwrap_or(256.0),
                    ),
                    self.positive_float(
                        self.obj,
                        "final_logit_softcapping",
                        "final_logit_softcapping",
                    )?,
                )
            }
            _ => (None, None),
        };

        let bos_token_id = match Self::get(self.obj, "bos_token_id") {
            None => None,
            Some(v) => Some(self.token_id("bos_token_id", v)?),
        };
        let eos_token_ids = match Self::get(self.obj, "eos_token_id") {
            None => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| self.token_id("eos_token_id", v))
                .collect::<Result<Vec<_>>>()?,
            Some(v) => vec![self.token_id("eos_token_id", v)?],
        };
        let dtype = match self.opt_str("dtype")? {
            Some(s) => Some(s.to_string()),
            None => self.opt_str("torch_dtype")?.map(str::to_string),
        };

        Ok(ModelConfig {
            path: self.path.clone(),
            arch,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            sliding_rope,
            query_pre_attn_scalar,
            final_logit_softcapping,
            tie_word_embeddings,
            attention_bias,
            mlp_bias,
            hidden_act,
            max_position_embeddings,
            sliding_window,
            use_sliding_window,
            max_window_layers,
            layer_is_sliding,
            bos_token_id,
            eos_token_ids,
            dtype,
        })
    }
}

/// `rope_scaling` from config.json, as far as wgllm supports it.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// No scaling (`rope_scaling` absent or `rope_type: "default"`).
    None,
    /// `rope_type: "linear"`: positions divided by `factor`.
    Linear { factor: f32 },
    /// `rope_type: "llama3"`.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
}

impl RopeScaling {
    /// HF's `attention_scaling` (the factor applied to cos and sin): 1.0 for
    /// every type supported here.
    pub fn attention_scaling(&self) -> f32 {
        1.0
    }

    /// Reject parameters HF would divide by zero with or that make no sense.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str, v: String| {
            Err(Error::invalid(format!(
                "rope scaling {self:?}: {what} (got {v})"
            )))
        };
        match *self {
            RopeScaling::None => Ok(()),
            RopeScaling::Linear { factor } => {
                if !(factor.is_finite() && factor > 0.0) {
                    return bad("factor must be a positive number", factor.to_string());
                }
                Ok(())
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                if !(factor.is_finite() && factor > 0.0) {
                    return bad("factor must be a positive number", factor.to_string());
                }
                if !(low_freq_factor.is_finite() && low_freq_factor > 0.0) {
                    return bad(
                        "low_freq_factor must be a positive number",
                        low_freq_factor.to_string(),
                    );
                }
                if !(high_freq_factor.is_finite() && high_freq_factor != low_freq_factor) {
                    return bad(
                        "high_freq_factor must be finite and differ from low_freq_factor",
                        high_freq_factor.to_string(),
                    );
                }
                if original_max_position_embeddings == 0 {
                    return bad(
                        "original_max_position_embeddings must be positive",
                        "0".into(),
                    );
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<ModelConfig> {
        ModelConfig::from_json_str(&v.to_string(), "/m/config.json")
    }

    fn base(arch: &str) -> Value {
        json!({
            "architectures": [arch],
            "vocab_size": 512, "hidden_size": 64, "intermediate_size": 160,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-5,
        })
    }

    fn with(mut v: Value, k: &str, x: Value) -> Value {
        v[k] = x;
        v
    }

    fn msg(r: Result<ModelConfig>) -> String {
        r.expect_err("expected an error").to_string()
    }

    #[test]
    fn defaults_per_arch() {
        let c = parse(base("LlamaForCausalLM")).unwrap();
        assert_eq!(c.arch, Arch::Llama);
        assert_eq!(c.head_dim, 16);
        assert_eq!((c.q_dim(), c.kv_dim(), c.n_rep()), (64, 32, 2));
        assert_eq!(c.rope_theta, 10000.0);
        assert_eq!(c.rope_scaling, RopeScaling::None);
        assert!(!c.tie_word_embeddings && !c.has_qkv_bias() && !c.has_o_bias());
        assert_eq!(c.max_position_embeddings, 2048);
        assert_eq!(c.layer_sliding_window(0), None);

        let q = parse(base("Qwen2ForCausalLM")).unwrap();
        assert!(q.has_qkv_bias() && !q.has_o_bias() && !q.has_mlp_bias());
        // Qwen2Config's sliding_window default is 4096 but off unless use_sliding_window.
        assert_eq!(q.layer_sliding_window(1), None);

        let m = parse(with(
            base("MistralForCausalLM"),
            "attention_bias",
            json!(true),
        ))
        .unwrap();
        assert!(
            !m.has_qkv_bias() && !m.has_o_bias(),
            "MistralAttention has no biases"
        );
        assert_eq!(m.layer_sliding_window(0), Some(4096));
        let m = parse(with(
            base("MistralForCausalLM"),
            "sliding_window",
            Value::Null,
        ))
        .unwrap();
        assert_eq!(m.layer_sliding_window(0), None);

        let l = parse(with(
            base("LlamaForCausalLM"),
            "attention_bias",
            json!(true),
        ))
        .unwrap();
        assert!(l.has_qkv_bias() && l.has_o_bias());
    }

    #[test]
    fn kv_heads_defaults_follow_transformers() {
        let mut v = base("LlamaForCausalLM");
        v.as_object_mut().unwrap().remove("num_key_value_heads");
        assert_eq!(parse(v.clone()).unwrap().num_key_value_heads, 4);
        let v = with(v, "num_attention_heads", json!(32));
        let v = with(v, "hidden_size", json!(2048));
        let q = parse(with(
            v.clone(),
            "architectures",
            json!(["Qwen2ForCausalLM"]),
        ))
        .unwrap();
        assert_eq!(q.num_key_value_heads, 32);
        let m = parse(with(
            v.clone(),
            "architectures",
            json!(["MistralForCausalLM"]),
        ))
        .unwrap();
        assert_eq!(m.num_key_value_heads, 8);
        let n = parse(with(
            with(v, "architectures", json!(["MistralForCausalLM"])),
            "num_key_value_heads",
            Value::Null,
        ))
        .unwrap();
        assert_eq!(n.num_key_value_heads, 32);
    }

    #[test]
    fn rope_layouts() {
        // transformers 4.x: top-level rope_theta + rope_scaling with `type`.
        let v = with(base("LlamaForCausalLM"), "rope_theta", json!(500000.0));
        let v = with(v, "rope_scaling", json!({"type": "linear", "factor": 2.0}));
        let c = parse(v).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 2.0 });

        // transformers 5: everything in rope_parameters.
        let v = with(
            base("LlamaForCausalLM"),
            "rope_parameters",
            json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}),
        );
        let c = parse(v).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(
            c.rope_scaling,
            RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192
            }
        );

        // rope_scaling wins over rope_parameters; theta falls back to top level.
        let v = with(base("LlamaForCausalLM"), "rope_theta", json!(7.0));
        let v = with(
            v,
            "rope_scaling",
            json!({"rope_type": "linear", "factor": 2.0}),
        );
        let v = with(
            v,
            "rope_parameters",
            json!({"rope_type": "default", "rope_theta": 9.0}),
        );
        let c = parse(v).unwrap();
        assert_eq!(
            (c.rope_theta, c.rope_scaling),
            (7.0, RopeScaling::Linear { factor: 2.0 })
        );

        // llama3 without original_max_position_embeddings → max_position_embeddings.
        let v = with(
            base("LlamaForCausalLM"),
            "max_position_embeddings",
            json!(100),
        );
        let v = with(
            v,
            "rope_scaling",
            json!({"rope_type": "llama3", "factor": 2.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
        );
        match parse(v).unwrap().rope_scaling {
            RopeScaling::Llama3 {
                original_max_position_embeddings: 100,
                ..
            } => {}
            other => panic!("{other:?}"),
        }

        let e = msg(parse(with(
            base("LlamaForCausalLM"),
            "rope_scaling",
            json!({"rope_type": "yarn", "factor": 4.0}),
        )));
        assert!(
            e.contains("rope_scaling.rope_type") && e.contains("yarn"),
            "{e}"
        );
        let e = msg(parse(with(
            base("LlamaForCausalLM"),
            "rope_parameters",
            json!({"type": "dynamic", "factor": 4.0}),
        )));
        assert!(
            e.contains("rope_parameters.type") && e.contains("dynamic"),
            "{e}"
        );
        let e = msg(parse(with(
            base("LlamaForCausalLM"),
            "rope_parameters",
            json!({"rope_type": "linear"}),
        )));
        assert!(e.contains("rope_parameters.factor"), "{e}");
    }

    #[test]
    fn head_dim_honoured_and_validated() {
        let c = parse(with(base("Qwen2ForCausalLM"), "head_dim", json!(24))).unwrap();
        assert_eq!((c.head_dim, c.q_dim(), c.kv_dim()), (24, 96, 48));
        let c = parse(with(base("Qwen2ForCausalLM"), "head_dim", Value::Null)).unwrap();
        assert_eq!(c.head_dim, 16);
        let e = msg(parse(with(base("LlamaForCausalLM"), "head_dim", json!(15))));
        assert!(e.contains("head_dim") && e.contains("odd"), "{e}");
    }

    #[test]
    fn bad_fields_name_file_and_field() {
        let e = msg(parse(with(
            base("GPT2LMHeadModel"),
            "model_type",
            json!("gpt2"),
        )));
        assert!(
            e.contains("/m/config.json")
                && e.contains("architectures")
                && e.contains("GPT2LMHeadModel"),
            "{e}"
        );
        let e = msg(parse(with(
            base("LlamaForCausalLM"),
            "num_key_value_heads",
            json!(3),
        )));
        assert!(e.contains("num_key_value_heads") && e.contains('3'), "{e}");
        let e = msg(parse(with(
            base("LlamaForCausalLM"),
            "hidden_size",
            json!(0),
        )));
        assert!(e.contains("hidden_size") && e.contains("positive"), "{e}");
        let e = msg(parse(with(
            base("LlamaForCausalLM"),
            "hidden_size",
            json!("64"),
        )));
        assert!(e.contains("hidden_size") && e.contains("string"), "{e}");
        let e = msg(parse(with(
            base("LlamaForCausalLM"),
            "hidden_act",
            json!("gelu"),
        )));
        assert!(e.contains("hidden_act") && e.contains("gelu"), "{e}");
        let e = msg(parse(with(
            base("LlamaForCausalLM"),
            "model_type",
            json!("mistral"),
        )));
        assert!(e.contains("model_type") && e.contains("contradicts"), "{e}");
        let mut v = base("LlamaForCausalLM");
        v.as_object_mut().unwrap().remove("architectures");
        let e = msg(parse(v.clone()));
        assert!(
            e.contains("architectures") && e.contains("model_type"),
            "{e}"
        );
        let c = parse(with(v, "model_type", json!("qwen2"))).unwrap();
        assert_eq!(c.arch, Arch::Qwen2);
        let e = msg(ModelConfig::from_json_str("{\"a\": ", "/m/config.json"));
        assert!(
            e.contains("/m/config.json") && e.contains("invalid JSON"),
            "{e}"
        );
    }

    #[test]
    fn token_ids_and_dtype() {
        let v = with(base("LlamaForCausalLM"), "eos_token_id", json!([2, 7]));
        let v = with(v, "torch_dtype", json!("float16"));
        let c = parse(with(v, "bos_token_id", json!(1))).unwrap();
        assert_eq!(
            (c.bos_token_id, c.eos_token_ids.clone()),
            (Some(1), vec![2, 7])
        );
        assert_eq!(c.dtype.as_deref(), Some("float16"));
        let v = with(base("LlamaForCausalLM"), "eos_token_id", json!(5));
        let v = with(v, "torch_dtype", json!("float16"));
        let c = parse(with(v, "dtype", json!("bfloat16"))).unwrap();
        assert_eq!(
            (c.eos_token_ids.clone(), c.dtype.as_deref()),
            (vec![5], Some("bfloat16"))
        );
    }

    #[test]
    fn qwen2_layer_types_and_window() {
        let v = with(base("Qwen2ForCausalLM"), "use_sliding_window", json!(true));
        let v = with(v, "sliding_window", json!(64));
        let c = parse(with(v.clone(), "max_window_layers", json!(1))).unwrap();
        assert_eq!(
            (c.layer_sliding_window(0), c.layer_sliding_window(1)),
            (None, Some(64))
        );
        let c = parse(with(
            v.clone(),
            "layer_types",
            json!(["sliding_attention", "full_attention"]),
        ))
        .unwrap();
        assert_eq!(
            (c.layer_sliding_window(0), c.layer_sliding_window(1)),
            (Some(64), None)
        );
        let e = msg(parse(with(v, "layer_types", json!(["full_attention"]))));
        assert!(e.contains("layer_types"), "{e}");
    }

    #[test]
    fn qwen3_defaults() {
        let mut v = with(base("Qwen3ForCausalLM"), "num_attention_heads", json!(32));
        v.as_object_mut().unwrap().remove("num_key_value_heads");
        let c = parse(v).unwrap();
        // Qwen3Config: head_dim 128 and 32 KV heads when absent (not hidden/heads)
        assert_eq!((c.head_dim, c.num_key_value_heads), (128, 32));
        assert!(c.has_qk_norm() && !c.norm_unit_offset() && !c.has_qkv_bias());
        assert_eq!(c.embed_scale(), None);
        let c = parse(with(
            base("Qwen3ForCausalLM"),
            "attention_bias",
            json!(true),
        ))
        .unwrap();
        assert!(c.has_qkv_bias() && c.has_o_bias() && !c.has_mlp_bias());
    }

    #[test]
    fn gemma3_defaults_layer_types_and_rope() {
        let c = parse(base("Gemma3ForCausalLM")).unwrap();
        assert_eq!(c.arch.model_type(), "gemma3_text");
        assert_eq!(
            (c.head_dim, c.hidden_act.as_str()),
            (256, "gelu_pytorch_tanh")
        );
        assert!(c.tie_word_embeddings && c.norm_unit_offset() && c.has_qk_norm());
        assert_eq!(c.attention_scale(), (256f64).powf(-0.5) as f32);
        assert_eq!(c.embed_scale(), Some(8.0));
        assert_eq!(c.final_logit_softcapping, None);
        // no layer_types: sliding unless (i + 1) % 6 == 0; window 4096
        let mut v = with(base("Gemma3ForCausalLM"), "num_hidden_layers", json!(7));
        let c = parse(v.clone()).unwrap();
        assert_eq!(
            c.layer_is_sliding,
            [true, true, true, true, true, false, true]
        );
        assert_eq!(
            (c.layer_sliding_window(0), c.layer_sliding_window(5)),
            (Some(4096), None)
        );
        // legacy keys: rope_theta (global), rope_local_base_freq, rope_scaling on global only
        v["rope_theta"] = json!(5e5);
        v["rope_local_base_freq"] = json!(1234.0);
        v["rope_scaling"] = json!({"rope_type": "linear", "factor": 8.0});
        let c = parse(v).unwrap();
        assert_eq!(c.layer_rope(5), (5e5, &RopeScaling::Linear { factor: 8.0 }));
        assert_eq!(c.layer_rope(0), (1234.0, &RopeScaling::None));
        // transformers 5 layout
        let v = with(
            base("Gemma3ForCausalLM"),
            "rope_parameters",
            json!({"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                   "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
        );
        let v = with(
            v,
            "layer_types",
            json!(["sliding_attention", "full_attention"]),
        );
        let c = parse(v).unwrap();
        assert_eq!((c.layer_rope(0).0, c.layer_rope(1).0), (1e4, 1e6));
        let e = msg(parse(with(
            base("Gemma3ForCausalLM"),
            "rope_parameters",
            json!({"rope_type": "default", "rope_theta": 1e6}),
        )));
        assert!(
            e.contains("rope_parameters.rope_t") && e.contains("per layer type"),
            "{e}"
        );
    }

    #[test]
    fn gemma3_refuses_what_it_does_not_implement() {
        let e = msg(parse(with(
            base("Gemma3ForCausalLM"),
            "attn_logit_softcapping",
            json!(50.0),
        )));
        assert!(e.contains("attn_logit_softcapping"), "{e}");
        let e = msg(parse(with(
            base("Gemma3ForCausalLM"),
            "use_bidirectional_attention",
            json!(true),
        )));
        assert!(e.contains("use_bidirectional_attention"), "{e}");
        let e = msg(parse(with(
            base("Gemma3ForCausalLM"),
            "hidden_activation",
            json!("gelu"),
        )));
        assert!(e.contains("hidden_activation") && e.contains("gelu"), "{e}");
        let c = parse(with(
            base("Gemma3ForCausalLM"),
            "final_logit_softcapping",
            json!(30.0),
        ))
        .unwrap();
        assert_eq!(c.final_logit_softcapping, Some(30.0));
        let e = msg(parse(with(
            base("LlamaForCausalLM"),
            "model_type",
            json!("gemma2"),
        )));
        assert!(e.contains("model_type"), "{e}");
    }
}
