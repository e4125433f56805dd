//! What tensors a config needs, validation of the checkpoint against that
//! list, the device dtype policy and the memory plan.

use std::fmt;
use std::path::PathBuf;

use ::safetensors::Dtype;

use super::Checkpoint;
use crate::config::ModelConfig;
use crate::error::{Error, Hint, Result, Setting};
use crate::gguf::GgmlType;
use crate::gpu::{pad4, Caps};
use crate::qtensor::{gpu_supports, BlockPad};
use crate::tensor::{split_rows, WDType};

/// The part a tensor plays inside one decoder layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LayerRole {
    AttnNorm,
    Q,
    K,
    V,
    O,
    QBias,
    KBias,
    VBias,
    OBias,
    MlpNorm,
    Gate,
    Up,
    Down,
    GateBias,
    UpBias,
    DownBias,
    /// Per-head RMSNorm weights on q and k (Qwen3, Gemma 3).
    QNorm,
    KNorm,
    /// Gemma 3's norms on the attention and MLP outputs, before each
    /// residual add.
    PostAttnNorm,
    PostMlpNorm,
}

/// The part a tensor plays in the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Embed,
    Layer(usize, LayerRole),
    FinalNorm,
    LmHead,
}

/// One tensor the config requires: its Hugging Face name and exact shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub role: Role,
    /// The shape in config terms, for error messages.
    pub dims: String,
}

/// Every tensor `cfg` requires, in a fixed order (embedding, layers in
/// order, final norm, lm_head unless tied). Shapes follow PyTorch's
/// `nn.Linear` layout `[out_features, in_features]`.
pub fn expected_tensors(cfg: &ModelConfig) -> Vec<TensorSpec> {
    let h = cfg.hidden_size;
    let (q, kv, ffn) = (cfg.q_dim(), cfg.kv_dim(), cfg.intermediate_size);
    let mut out = Vec::new();
    let mut push = |name: String, shape: Vec<usize>, role: Role, dims: &str| {
        out.push(TensorSpec {
            name,
            shape,
            role,
            dims: dims.to_string(),
        })
    };
    push(
        "model.embed_tokens.weight".into(),
        vec![cfg.vocab_size, h],
        Role::Embed,
        "[vocab_size, hidden_size]",
    );
    let qd = "[num_attention_heads*head_dim, hidden_size]";
    let kvd = "[num_key_value_heads*head_dim, hidden_size]";
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let l = |r| Role::Layer(i, r);
        use LayerRole::*;
        push(
            format!("{p}.input_layernorm.weight"),
            vec![h],
            l(AttnNorm),
            "[hidden_size]",
        );
        push(format!("{p}.self_attn.q_proj.weight"), vec![q, h], l(Q), qd);
        if cfg.has_qk_norm() {
            let hd = vec![cfg.head_dim];
            let d = "[head_dim]";
            push(
                format!("{p}.self_attn.q_norm.weight"),
                hd.clone(),
                l(QNorm),
                d,
            );
            push(format!("{p}.self_attn.k_norm.weight"), hd, l(KNorm), d);
        }
        push(
            format!("{p}.self_attn.k_proj.weight"),
            vec![kv, h],
            l(K),
            kvd,
        );
        push(
            format!("{p}.self_attn.v_proj.weight"),
            vec![kv, h],
            l(V),
            kvd,
        );
        if cfg.has_qkv_bias() {
            push(
                format!("{p}.self_attn.q_proj.bias"),
                vec![q],
                l(QBias),
                "[num_attention_heads*head_dim]",
            );
            push(
                format!("{p}.self_attn.k_proj.bias"),
                vec![kv],
                l(KBias),
                "[num_key_value_heads*head_dim]",
            );
            push(
                format!("{p}.self_attn.v_proj.bias"),
                vec![kv],
                l(VBias),
                "[num_key_value_heads*head_dim]",
            );
        }
        push(
            format!("{p}.self_attn.o_proj.weight"),
            vec![h, q],
            l(O),
            "[hidden_size, num_attention_heads*head_dim]",
        );
        if cfg.has_o_bias() {
            push(
                format!("{p}.self_attn.o_proj.bias"),
                vec![h],
                l(OBias),
                "[hidden_size]",
            );
        }
        // Gemma 3 names its MLP input norm pre_feedforward_layernorm and
        // normalizes each sub-block's output (post_attention_layernorm,
        // post_feedforward_layernorm); the others' post_attention_layernorm
        // is the MLP input norm.
        if cfg.arch == crate::config::Arch::Gemma3 {
            for (name, role) in [
                ("post_attention_layernorm", PostAttnNorm),
                ("pre_feedforward_layernorm", MlpNorm),
                ("post_feedforward_layernorm", PostMlpNorm),
            ] {
                push(
                    format!("{p}.{name}.weight"),
                    vec![h],
                    l(role),
                    "[hidden_size]",
                );
            }
        } else {
            push(
                format!("{p}.post_attention_layernorm.weight"),
                vec![h],
                l(MlpNorm),
                "[hidden_size]",
            );
        }
        push(
            format!("{p}.mlp.gate_proj.weight"),
            vec![ffn, h],
            l(Gate),
            "[intermediate_size, hidden_size]",
        );
        push(
            format!("{p}.mlp.up_proj.weight"),
            vec![ffn, h],
            l(Up),
            "[intermediate_size, hidden_size]",
        );
        push(
            format!("{p}.mlp.down_proj.weight"),
            vec![h, ffn],
            l(Down),
            "[hidden_size, intermediate_size]",
        );
        if cfg.has_mlp_bias() {
            push(
                format!("{p}.mlp.gate_proj.bias"),
                vec![ffn],
                l(GateBias),
                "[intermediate_size]",
            );
            push(
                format!("{p}.mlp.up_proj.bias"),
                vec![ffn],
                l(UpBias),
                "[intermediate_size]",
            );
            push(
                format!("{p}.mlp.down_proj.bias"),
                vec![h],
                l(DownBias),
                "[hidden_size]",
            );
        }
    }
    push(
        "model.norm.weight".into(),
        vec![h],
        Role::FinalNorm,
        "[hidden_size]",
    );
    if !cfg.tie_word_embeddings {
        push(
            "lm_head.weight".into(),
            vec![cfg.vocab_size, h],
            Role::LmHead,
            "[vocab_size, hidden_size]",
        );
    }
    out
}

/// Which dtype weights get on the device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LoadDType {
    /// bf16 stays bf16 (uploaded straight from the mmap), f16 is widened to
    /// f32 (exact; f16 → bf16 would drop mantissa bits), f32 stays f32.
    #[default]
    Auto,
    /// Everything as bf16 (f16/f32 rounded to nearest even). Lossy for f16
    /// and f32 files; only on request.
    Bf16,
    /// Everything widened to f32 (exact).
    F32,
    /// A GGUF's tensors at their own ggml types where a GPU kernel reads
    /// them (`qtensor::gpu_supports`, 2D weights); the rest (norms, F16/F32
    /// tensors, types without a kernel) as `Auto`. On a safetensors folder
    /// the same as `Auto`. `Auto` keeps GGUF types too, so this is the
    /// default for `.gguf` input.
    Native,
}

impl LoadDType {
    /// Device dtype for a tensor stored as `file` (one of BF16/F16/F32).
    pub fn device_dtype(self, file: Dtype) -> WDType {
        match (self, file) {
            (LoadDType::Auto | LoadDType::Native, Dtype::BF16) => WDType::Bf16,
            (LoadDType::Auto | LoadDType::Native, _) => WDType::F32,
            (LoadDType::Bf16, _) => WDType::Bf16,
            (LoadDType::F32, _) => WDType::F32,
        }
    }

    /// Whether a GGUF's quantized tensors stay quantized on the device.
    pub fn keeps_quantized(self) -> bool {
        matches!(self, LoadDType::Auto | LoadDType::Native)
    }
}

impl std::str::FromStr for LoadDType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(LoadDType::Auto),
            "bf16" | "bfloat16" => Ok(LoadDType::Bf16),
            "f32" | "float32" => Ok(LoadDType::F32),
            "native" => Ok(LoadDType::Native),
            _ => Err(Error::invalid(format!(
                "unknown weight dtype `{s}`; expected auto, native, bf16 or f32"
            ))),
        }
    }
}

impl fmt::Display for LoadDType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LoadDType::Auto => "auto",
            LoadDType::Bf16 => "bf16",
            LoadDType::F32 => "f32",
            LoadDType::Native => "native",
        })
    }
}

/// File dtypes we can load.
pub fn supported_dtype(d: Dtype) -> bool {
    matches!(d, Dtype::BF16 | Dtype::F16 | Dtype::F32)
}

/// One tensor of the plan: where it comes from and what it becomes.
#[derive(Clone, Debug)]
pub struct PlannedTensor {
    pub spec: TensorSpec,
    pub file: PathBuf,
    pub file_dtype: Dtype,
    /// The dense device dtype (unused when `quant` is set).
    pub device_dtype: WDType,
    /// Uploaded as a `qtensor::QTensor` of this ggml type: the GGUF's own
    /// blocks in the `BlockPad` layout.
    pub quant: Option<GgmlType>,
    /// Device bytes over all chunks (each chunk padded to 4 bytes).
    pub bytes: u64,
    /// Number of row chunks (separate buffers).
    pub chunks: usize,
    /// Uploaded straight from the memory map without conversion.
    pub zero_copy: bool,
}

/// The device-side layout of every weight, computed before any upload.
#[derive(Clone, Debug)]
pub struct MemoryPlan {
    pub policy: LoadDType,
    /// The split limit the chunk counts were computed with.
    pub max_binding: u64,
    pub tensors: Vec<PlannedTensor>,
    pub total_bytes: u64,
    /// lm_head is the embedding (no separate upload).
    pub tied: bool,
    /// Tensors in the checkpoint that the model does not use (e.g.
    /// `lm_head.weight` in a tied checkpoint, which transformers also ignores).
    pub ignored: Vec<String>,
}

impl MemoryPlan {
    /// Validate every tensor `cfg` needs (presence, dtype, exact shape) and
    /// plan its device dtype and row chunks for a device with `caps`.
    pub fn new(
        cfg: &ModelConfig,
        ckpt: &Checkpoint,
        policy: LoadDType,
        caps: &Caps,
    ) -> Result<Self> {
        let specs = expected_tensors(cfg);
        let mut tensors = Vec::with_capacity(specs.len());
        let mut total = 0u64;
        for spec in specs {
            let meta = ckpt.validate_tensor(&spec, cfg)?;
            let device_dtype = policy.device_dtype(meta.dtype);
            let (rows, cols) = match spec.shape[..] {
                [n] => (1, n),
                [r, c] => (r, c),
                _ => unreachable!("expected_tensors yields 1D/2D shapes"),
            };
            // A GGUF's quantized 2D weight with a GPU kernel keeps its type;
            // a row is then `cols / block` device blocks.
            let quant = ckpt
                .gguf()
                .filter(|_| policy.keeps_quantized() && spec.shape.len() == 2)
                .and_then(|g| g.ggml_type(&spec.name))
                .filter(|&t| gpu_supports(t) && cols % t.block_size() == 0);
            let (units, unit_bytes, what) = match quant {
                Some(t) => {
                    let l = BlockPad::of(t).map_err(Error::invalid)?;
                    (cols / t.block_size(), l.device_block_bytes(), t.to_string())
                }
                None => (
                    cols,
                    device_dtype.bytes_per_elem(),
                    format!("{device_dtype:?}"),
                ),
            };
            let split = split_rows(rows, units, unit_bytes, caps.max_binding).map_err(|m| {
                Error::Tensor {
                    path: meta.file.clone(),
                    tensor: spec.name.clone(),
                    msg: format!("shape {:?} as {what}: {m}", spec.shape),
                }
            })?;
            let mut bytes = 0u64;
            for &(_, n) in &split {
                let chunk = pad4((n * units * unit_bytes) as u64);
                if chunk > caps.max_buffer {
                    return Err(Error::Tensor {
                        path: meta.file.clone(),
                        tensor: spec.name.clone(),
                        msg: format!(
                            "a chunk of {chunk} bytes exceeds the device's max buffer size of {} bytes",
                            caps.max_buffer
                        ),
                    });
                }
                bytes += chunk;
            }
            total += bytes;
            tensors.push(PlannedTensor {
                file: meta.file.clone(),
                file_dtype: meta.dtype,
                zero_copy: ckpt.gguf().is_none()
                    && matches!(
                        (meta.dtype, device_dtype),
                        (Dtype::BF16, WDType::Bf16) | (Dtype::F32, WDType::F32)
                    ),
                device_dtype,
                quant,
                bytes,
                chunks: split.len(),
                spec,
            });
        }
        let used: std::collections::HashSet<&str> =
            tensors.iter().map(|t| t.spec.name.as_str()).collect();
        let mut ignored: Vec<String> = ckpt
            .names()
            .filter(|n| !used.contains(n))
            .map(str::to_string)
            .collect();
        ignored.sort();
        Ok(MemoryPlan {
            policy,
            max_binding: caps.max_binding,
            tensors,
            total_bytes: total,
            tied: cfg.tie_word_embeddings,
            ignored,
        })
    }

    pub fn get(&self, name: &str) -> Option<&PlannedTensor> {
        self.tensors.iter().find(|t| t.spec.name == name)
    }

    /// Human-readable summary (totals per device dtype, split tensors).
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} tensors, {:.1} MiB on the device (policy {}, max binding {} bytes{})",
            self.tensors.len(),
            self.total_bytes as f64 / (1024.0 * 1024.0),
            self.policy,
            self.max_binding,
            if self.tied {
                ", lm_head tied to embed_tokens"
            } else {
                ""
            }
        );
        let mut quant: std::collections::BTreeMap<String, usize> = Default::default();
        for t in &self.tensors {
            if let Some(q) = t.quant {
                *quant.entry(q.to_string()).or_default() += 1;
            }
        }
        if !quant.is_empty() {
            let q: Vec<String> = quant.iter().map(|(t, n)| format!("{n} {t}")).collect();
            s += &format!("\n  quantized on the device: {}", q.join(", "));
        }
        for t in self.tensors.iter().filter(|t| t.chunks > 1) {
            s += &format!(
                "\n  {} {:?} split into {} chunks",
                t.spec.name, t.spec.shape, t.chunks
            );
        }
        if !self.ignored.is_empty() {
            s += &format!(
                "\n  unused tensors in the checkpoint: {}",
                self.ignored.join(", ")
            );
        }
        s
    }
}

/// What a model needs on the device for one context length, computed from
/// the plan and the config before anything is uploaded
/// ([`MemoryPlan::device_memory`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceMemory {
    /// KV cache length in tokens.
    pub context: usize,
    /// Every weight buffer ([`MemoryPlan::total_bytes`]).
    pub weights: u64,
    /// K and V for every layer: `2 × layers × n_kv × context × head_dim × 4`.
    pub kv_cache: u64,
    /// One layer's K (or V) buffer, bound whole by the attention kernel.
    pub kv_layer: u64,
    /// Activation, logits, RoPE-table and staging buffers, estimated from
    /// the config (the widest per-token buffers of the layer program).
    pub scratch: u64,
    pub total: u64,
}

impl DeviceMemory {
    pub fn summary(&self) -> String {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        format!(
            "{:.1} MiB on the device: weights {:.1} MiB, KV cache {:.1} MiB for {} tokens, scratch {:.1} MiB",
            mib(self.total),
            mib(self.weights),
            mib(self.kv_cache),
            self.context,
            mib(self.scratch)
        )
    }

    /// On a CPU-type adapter (lavapipe, llvmpipe, SwiftShader) the device's
    /// memory is the host's: refuse, before any upload, a total beyond the
    /// host's available memory (`available`, bytes), which the driver's
    /// allocations would otherwise overcommit until the kernel's OOM killer
    /// ends the process half-way through. Says what is needed, what is
    /// available and what to change.
    pub fn check_host(&self, available: u64) -> Result<()> {
        if self.total <= available {
            return Ok(());
        }
        let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0));
        let room = available.saturating_sub(self.weights + self.scratch);
        let per_token = self.kv_cache / self.context.max(1) as u64;
        let fit = room / per_token.max(1);
        let fix = if fit >= 1 {
            Hint::new()
                .set(Setting::MaxContext, format!("{fit} or less"))
                .text(", or smaller weights: ")
                .set(Setting::DType, "bf16")
                .text(", or a quantized GGUF")
        } else {
            Hint::new()
                .text("the weights alone do not fit: smaller weights (")
                .set(Setting::DType, "bf16")
                .text(", or a quantized GGUF), or free host memory")
        };
        Err(Error::invalid(format!(
            "this CPU device uses host memory, and the model needs {} but the host has {} available (MemAvailable in /proc/meminfo)",
            self.summary(),
            mib(available)
        ))
        .hint(fix))
    }
}

/// The host's available memory in bytes (Linux `MemAvailable`), when known.
pub fn host_available_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// The KV cache length a model gets when `requested` is `None`: the
/// config's `max_position_embeddings`, at most 4096, and at most what one
/// storage binding holds for one layer's K. (The rule `Model` applies.)
pub fn default_context(cfg: &ModelConfig, caps: &Caps) -> usize {
    let per_pos = (cfg.num_key_value_heads * cfg.head_dim * 4) as u64;
    let ctx_cap = (caps.max_binding / per_pos.max(1)) as usize;
    cfg.max_position_embeddings.clamp(1, 4096).min(ctx_cap)
}

impl MemoryPlan {
    /// The device memory for a KV cache of `max_context` tokens (default:
    /// [`default_context`]) and `max_batch` tokens per forward pass, checked
    /// against the device's limits. Refuses, before any upload, a context
    /// whose per-layer K/V buffer exceeds the largest binding or buffer the
    /// device offers, a logits row or activation buffer that cannot be
    /// bound, and a total that overflows; each message says what is needed,
    /// what the device offers and what to change. wgpu 30 reports no free
    /// memory, so the total itself is checked only by the allocation (see
    /// `Gpu`'s error scopes).
    pub fn device_memory(
        &self,
        cfg: &ModelConfig,
        max_context: Option<usize>,
        max_batch: usize,
        caps: &Caps,
    ) -> Result<DeviceMemory> {
        self.device_memory_slots(cfg, max_context, max_batch, 1, caps)
    }

    /// [`MemoryPlan::device_memory`] for `slots` independent sequences: each
    /// layer's K and V buffer holds `slots` regions of `max_context`
    /// positions (the default context shrinks so that they fit one binding),
    /// and `kv_cache` / `kv_layer` count all of them.
    pub fn device_memory_slots(
        &self,
        cfg: &ModelConfig,
        max_context: Option<usize>,
        max_batch: usize,
        slots: usize,
        caps: &Caps,
    ) -> Result<DeviceMemory> {
        let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0));
        let limit = caps.max_binding.min(caps.max_buffer);
        let slots = slots.max(1) as u64;
        let per_pos = (cfg.num_key_value_heads as u64) * (cfg.head_dim as u64) * 4 * slots;
        let context = max_context.unwrap_or_else(|| {
            default_context(cfg, caps).min((caps.max_binding / per_pos.max(1)) as usize)
        });
        if context == 0 {
            return Err(Error::invalid("max context must be at least 1"));
        }
        let fit = limit / per_pos.max(1);
        let kv_layer = per_pos.checked_mul(context as u64);
        if kv_layer.is_none_or(|b| b > limit) {
            return Err(Error::invalid(format!(
                "a context of {context} tokens needs a KV cache buffer of {} per layer for K and again for V \
                 ({} KV heads × head_dim {} × 4 bytes × {slots} sequence slot(s) = {per_pos} bytes per token), but this device binds at most {} \
                 ({limit} bytes) in one buffer",
                kv_layer.map_or_else(|| "more than 2^64 bytes".into(), mib),
                cfg.num_key_value_heads,
                cfg.head_dim,
                mib(limit),
            ))
            .hint(Hint::new().set(Setting::MaxContext, format!("{fit} or less"))));
        }
        let kv_layer = kv_layer.unwrap_or_default();
        let vocab_row = cfg.vocab_size as u64 * 4;
        if vocab_row > limit {
            return Err(Error::invalid(format!(
                "one row of logits ({} tokens × 4 bytes = {vocab_row} bytes) exceeds the {limit} bytes this device binds in one buffer",
                cfg.vocab_size
            )));
        }
        let batch = max_batch.max(1) as u64;
        let h = cfg.hidden_size as u64;
        let widest = [
            h,
            cfg.q_dim() as u64,
            cfg.kv_dim() as u64,
            cfg.intermediate_size as u64,
        ]
        .into_iter()
        .max()
        .unwrap_or(0);
        if batch * widest * 4 > limit {
            return Err(Error::invalid(format!(
                "an activation buffer for {batch} tokens × {widest} values × 4 bytes exceeds the {limit} bytes this device binds in one buffer; use a smaller prefill batch (ModelOptions::max_batch)"
            )));
        }
        let logits_rows = (limit / vocab_row).clamp(1, batch);
        // Per token: the residual stream twice, its norm, q, k, v, the
        // attention output, gate, up and their product; then logits, the
        // last row, staging, and cos/sin tables per RoPE type (≤ 2).
        let per_token = 4 * (3 * h + 2 * cfg.q_dim() as u64 + 2 * cfg.kv_dim() as u64)
            + 4 * 3 * cfg.intermediate_size as u64;
        let rope = 2 * 2 * context as u64 * cfg.head_dim as u64 * 4;
        let scratch = batch * per_token + (logits_rows + 1) * vocab_row + 4 * h + rope;
        let layers = cfg.num_hidden_layers as u64;
        let kv_cache = kv_layer * 2 * layers;
        let total = self
            .total_bytes
            .checked_add(kv_cache)
            .and_then(|t| t.checked_add(scratch))
            .ok_or_else(|| Error::invalid("device memory total overflows u64"))?;
        let mem = DeviceMemory {
            context,
            weights: self.total_bytes,
            kv_cache,
            kv_layer,
            scratch,
            total,
        };
        if caps.is_cpu {
            if let Some(available) = host_available_bytes() {
                mem.check_host(available)?;
            }
        }
        Ok(mem)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn names(v: serde_json::Value) -> Vec<(String, Vec<usize>)> {
        let cfg = ModelConfig::from_json_str(&v.to_string(), "/m/config.json").unwrap();
        expected_tensors(&cfg)
            .into_iter()
            .filter(|t| t.name.starts_with("model.layers.0."))
            .map(|t| (t.name["model.layers.0.".len()..].to_string(), t.shape))
            .collect()
    }

    fn cfg(arch: &str) -> serde_json::Value {
        // head_dim 32 != hidden 64 / 4 heads
        json!({"architectures": [arch], "vocab_size": 100, "hidden_size": 64,
               "intermediate_size": 96, "num_hidden_layers": 1,
               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32})
    }

    /// The host-memory precheck for CPU devices: refuses a total beyond
    /// what is available, naming the need, the offer and the fix.
    #[test]
    fn host_memory_precheck_refuses_what_the_host_cannot_hold() {
        let mib = 1024 * 1024;
        let mem = DeviceMemory {
            context: 4096,
            weights: 1000 * mib,
            kv_cache: 400 * mib,
            kv_layer: 8 * mib,
            scratch: 100 * mib,
            total: 1500 * mib,
        };
        assert!(mem.check_host(1500 * mib).is_ok());
        let e = mem.check_host(1300 * mib).unwrap_err();
        // The fix names the settings, not a front end's spelling of them.
        assert_eq!(e.settings(), [Setting::MaxContext, Setting::DType]);
        let e = e.to_string();
        // 200 MiB of room at 0.1 MiB of KV per token: 2048 tokens.
        assert!(
            e.contains("1500.0 MiB on the device")
                && e.contains("1300.0 MiB available")
                && e.contains("set max context to 2048 or less"),
            "{e}"
        );
        let e = mem.check_host(900 * mib).unwrap_err();
        assert_eq!(e.settings(), [Setting::DType]);
        let e = e.to_string();
        assert!(e.contains("the weights alone do not fit"), "{e}");
        assert!(host_available_bytes().is_some_and(|b| b > 0) || !cfg!(target_os = "linux"));
    }

    #[test]
    fn qwen3_and_gemma3_layer_tensors() {
        // Names and shapes as transformers' Qwen3 / Gemma3 modules save them.
        let s = |n: &str, shape: &[usize]| (n.to_string(), shape.to_vec());
        let attn = [
            s("self_attn.q_proj.weight", &[128, 64]),
            s("self_attn.q_norm.weight", &[32]),
            s("self_attn.k_norm.weight", &[32]),
            s("self_attn.k_proj.weight", &[64, 64]),
            s("self_attn.v_proj.weight", &[64, 64]),
            s("self_attn.o_proj.weight", &[64, 128]),
        ];
        let mlp = [
            s("mlp.gate_proj.weight", &[96, 64]),
            s("mlp.up_proj.weight", &[96, 64]),
            s("mlp.down_proj.weight", &[64, 96]),
        ];
        let mut want = vec![s("input_layernorm.weight", &[64])];
        want.extend(attn.clone());
        want.push(s("post_attention_layernorm.weight", &[64]));
        want.extend(mlp.clone());
        assert_eq!(names(cfg("Qwen3ForCausalLM")), want);

        let mut want = vec![s("input_layernorm.weight", &[64])];
        want.extend(attn);
        want.push(s("post_attention_layernorm.weight", &[64]));
        want.push(s("pre_feedforward_layernorm.weight", &[64]));
        want.push(s("post_feedforward_layernorm.weight", &[64]));
        want.extend(mlp);
        assert_eq!(names(cfg("Gemma3ForCausalLM")), want);

        // Llama has no q/k norm
        assert!(!names(cfg("LlamaForCausalLM"))
            .iter()
            .any(|(n, _)| n.contains("q_norm")));
    }
}
