//! The model's weights, on the device ([`Weights`]) or as the f32 values the
//! device sees, on the host ([`HostWeights`], for the CPU reference).

use std::borrow::Cow;

use ::safetensors::Dtype;

use super::finite::{first_non_finite, narrowed_to_bf16_error};
use super::plan::{LayerRole, MemoryPlan, PlannedTensor, Role};
use super::Checkpoint;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::qtensor::QTensor;
use crate::tensor::{f32_to_bf16_bytes, round_bf16, DeviceTensor, WDType, WeightLayout};

/// One weight on the device: dense (bf16/f32) or quantized at a GGUF's own
/// ggml type. The kernel that reads it is chosen by this, per tensor (the
/// program's ops are the same either way).
pub enum WTensor {
    Dense(DeviceTensor),
    Quant(QTensor),
}

impl WTensor {
    pub fn name(&self) -> &str {
        match self {
            WTensor::Dense(t) => &t.name,
            WTensor::Quant(t) => &t.name,
        }
    }
    /// The dense tensor, if this one is.
    pub fn dense(&self) -> Option<&DeviceTensor> {
        match self {
            WTensor::Dense(t) => Some(t),
            WTensor::Quant(_) => None,
        }
    }
    /// The quantized tensor, if this one is.
    pub fn quant(&self) -> Option<&QTensor> {
        match self {
            WTensor::Quant(t) => Some(t),
            WTensor::Dense(_) => None,
        }
    }
    /// The dense tensor, or an error naming it for a reader (`what`) that
    /// has no quantized kernel.
    pub fn require_dense(&self, what: &str) -> Result<&DeviceTensor> {
        match self {
            WTensor::Dense(t) => Ok(t),
            WTensor::Quant(q) => Err(Error::invalid(format!(
                "tensor `{}` is quantized ({}), but {what} reads only bf16/f32 weights",
                q.name, q.ty
            ))),
        }
    }
    /// Bytes the tensor occupies on the device.
    pub fn device_bytes(&self) -> u64 {
        match self {
            WTensor::Dense(t) => t.chunks.iter().map(|c| c.device_bytes()).sum(),
            WTensor::Quant(t) => t.device_bytes(),
        }
    }
    /// What it is stored as on the device (`Bf16`, `F32`, `Q4_1`, ...).
    pub fn device_type(&self) -> String {
        match self {
            WTensor::Dense(t) => format!("{:?}", t.dtype),
            WTensor::Quant(t) => t.ty.to_string(),
        }
    }
}

/// One decoder layer's tensors. Biases are present exactly when the config
/// says so (see `ModelConfig::has_qkv_bias` / `has_o_bias` / `has_mlp_bias`).
pub struct LayerWeights<T> {
    pub attn_norm: T,
    pub q: T,
    pub k: T,
    pub v: T,
    pub o: T,
    pub q_bias: Option<T>,
    pub k_bias: Option<T>,
    pub v_bias: Option<T>,
    pub o_bias: Option<T>,
    pub mlp_norm: T,
    pub gate: T,
    pub up: T,
    pub down: T,
    pub gate_bias: Option<T>,
    pub up_bias: Option<T>,
    pub down_bias: Option<T>,
    pub q_norm: Option<T>,
    pub k_norm: Option<T>,
    pub post_attn_norm: Option<T>,
    pub post_mlp_norm: Option<T>,
}

impl<T> LayerWeights<T> {
    /// The tensor playing `role`, if this layer has one.
    pub fn get(&self, role: LayerRole) -> Option<&T> {
        use LayerRole::*;
        match role {
            AttnNorm => Some(&self.attn_norm),
            Q => Some(&self.q),
            K => Some(&self.k),
            V => Some(&self.v),
            O => Some(&self.o),
            QBias => self.q_bias.as_ref(),
            KBias => self.k_bias.as_ref(),
            VBias => self.v_bias.as_ref(),
            OBias => self.o_bias.as_ref(),
            MlpNorm => Some(&self.mlp_norm),
            Gate => Some(&self.gate),
            Up => Some(&self.up),
            Down => Some(&self.down),
            GateBias => self.gate_bias.as_ref(),
            UpBias => self.up_bias.as_ref(),
            DownBias => self.down_bias.as_ref(),
            QNorm => self.q_norm.as_ref(),
            KNorm => self.k_norm.as_ref(),
            PostAttnNorm => self.post_attn_norm.as_ref(),
            PostMlpNorm => self.post_mlp_norm.as_ref(),
        }
    }
}

/// All model tensors. `lm_head` is `None` when tied to `embed` (use
/// [`ModelWeights::lm_head`]).
pub struct ModelWeights<T> {
    pub embed: T,
    pub layers: Vec<LayerWeights<T>>,
    pub norm: T,
    pub lm_head: Option<T>,
}

/// Weights on the device.
pub type Weights = ModelWeights<WTensor>;
/// The same weights on the host, as f32 values identical to what the device
/// holds after the dtype policy (e.g. bf16-rounded when the device keeps bf16).
pub type HostWeights = ModelWeights<HostTensor>;

/// A host copy of one tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl<T> ModelWeights<T> {
    /// The output projection: `lm_head.weight`, or the embedding when tied.
    pub fn lm_head(&self) -> &T {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// The tensor playing `role` (`LmHead` is the embedding when tied).
    pub fn get(&self, role: Role) -> Option<&T> {
        match role {
            Role::Embed => Some(&self.embed),
            Role::FinalNorm => Some(&self.norm),
            Role::LmHead => Some(self.lm_head()),
            Role::Layer(i, r) => self.layers.get(i)?.get(r),
        }
    }

    /// Build from the plan, producing each tensor with `make` in plan order.
    fn build(
        plan: &MemoryPlan,
        n_layers: usize,
        mut make: impl FnMut(&PlannedTensor) -> Result<T>,
    ) -> Result<Self> {
        let mut embed = None;
        let mut norm = None;
        let mut lm_head = None;
        let mut slots: Vec<[Option<T>; 20]> = (0..n_layers)
            .map(|_| std::array::from_fn(|_| None))
            .collect();
        for t in &plan.tensors {
            let v = make(t)?;
            match t.spec.role {
                Role::Embed => embed = Some(v),
                Role::FinalNorm => norm = Some(v),
                Role::LmHead => lm_head = Some(v),
                Role::Layer(i, r) => {
                    let slot = slots.get_mut(i).ok_or_else(|| {
                        Error::invalid(format!("plan names layer {i} of {n_layers}"))
                    })?;
                    slot[r as usize] = Some(v);
                }
            }
        }
        let missing = |what: &str| Error::invalid(format!("memory plan has no {what}"));
        let layers = slots
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                let [attn_norm, q, k, v, o, q_bias, k_bias, v_bias, o_bias, mlp_norm, gate, up, down, gate_bias, up_bias, down_bias, q_norm, k_norm, post_attn_norm, post_mlp_norm] =
                    s;
                let req = |x: Option<T>, r: LayerRole| x.ok_or_else(|| missing(&format!("layer {i} {r:?}")));
                Ok(LayerWeights {
                    attn_norm: req(attn_norm, LayerRole::AttnNorm)?,
                    q: req(q, LayerRole::Q)?,
                    k: req(k, LayerRole::K)?,
                    v: req(v, LayerRole::V)?,
                    o: req(o, LayerRole::O)?,
                    q_bias,
                    k_bias,
                    v_bias,
                    o_bias,
                    mlp_norm: req(mlp_norm, LayerRole::MlpNorm)?,
                    gate: req(gate, LayerRole::Gate)?,
                    up: req(up, LayerRole::Up)?,
                    down: req(down, LayerRole::Down)?,
                    gate_bias,
                    up_bias,
                    down_bias,
                    q_norm,
                    k_norm,
                    post_attn_norm,
                    post_mlp_norm,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        if !plan.tied && lm_head.is_none() {
            return Err(missing("lm_head"));
        }
        Ok(ModelWeights {
            embed: embed.ok_or_else(|| missing("embedding"))?,
            layers,
            norm: norm.ok_or_else(|| missing("final norm"))?,
            lm_head,
        })
    }
}

// The array slot order in `build` is the declaration order of `LayerRole`.
const _: () = {
    assert!(LayerRole::AttnNorm as usize == 0);
    assert!(LayerRole::PostMlpNorm as usize == 19);
};

/// `t`'s values as f32, refused when any is NaN or infinite.
fn widen(ckpt: &Checkpoint, t: &PlannedTensor) -> Result<Vec<f32>> {
    ckpt.finite_f32(&t.spec.name)
}

/// The error for a value that narrowing to bf16 made infinite.
fn narrowed_error(ckpt: &Checkpoint, t: &PlannedTensor, i: usize) -> Error {
    match ckpt.meta(&t.spec.name) {
        Some(m) => narrowed_to_bf16_error(m, i),
        None => Error::invalid(format!("tensor `{}` vanished", t.spec.name)),
    }
}

/// The bytes the device gets for `t`: borrowed from the mmap when no
/// conversion is needed. Non-finite values are refused either way (the
/// scan reads the bytes once more, at memory speed, just before the upload
/// copies them).
fn device_bytes<'a>(ckpt: &'a Checkpoint, t: &PlannedTensor) -> Result<Cow<'a, [u8]>> {
    if t.zero_copy {
        return Ok(Cow::Borrowed(ckpt.finite_bytes(&t.spec.name)?));
    }
    let v = widen(ckpt, t)?;
    Ok(Cow::Owned(match t.device_dtype {
        WDType::Bf16 => {
            let b = f32_to_bf16_bytes(&v);
            if let Some(i) = first_non_finite(Dtype::BF16, &b) {
                return Err(narrowed_error(ckpt, t, i));
            }
            b
        }
        WDType::F32 => bytemuck::cast_slice(&v).to_vec(),
    }))
}

/// Upload a tensor the device keeps as stored, straight from the memory
/// map in bounded pieces: each piece is scanned for non-finite values just
/// before wgpu copies it, and its pages are dropped from resident memory
/// just after, so the load holds about one piece of the file at a time
/// instead of every page it has read.
fn stream_from_map(gpu: &Gpu, ckpt: &Checkpoint, t: &PlannedTensor) -> Result<DeviceTensor> {
    let name = &t.spec.name;
    let bytes = ckpt.tensor_bytes(name)?;
    let mut check = |_: usize, piece: &[u8]| match first_non_finite(t.file_dtype, piece) {
        // The error path re-scans the whole tensor for the full message.
        Some(_) => ckpt.finite_bytes(name).map(|_| ()),
        None => Ok(()),
    };
    let mut done = |piece: &[u8]| ckpt.release_pages(piece);
    DeviceTensor::upload_streamed(
        gpu,
        name,
        t.device_dtype,
        &t.spec.shape,
        bytes,
        layout_of(gpu, t),
        &mut check,
        &mut done,
    )
}

/// The device layout of a dense tensor ([`WeightLayout::for_tensor`]: a
/// texture for every 2D bf16 tensor with k % 8 == 0 under
/// `weights=texture`, whatever it is; a buffer otherwise).
fn layout_of(gpu: &Gpu, t: &PlannedTensor) -> WeightLayout {
    WeightLayout::for_tensor(&gpu.caps, t.device_dtype == WDType::Bf16, &t.spec.shape)
}

fn check_plan(ckpt: &Checkpoint, plan: &MemoryPlan) -> Result<()> {
    for t in &plan.tensors {
        let m = ckpt.meta(&t.spec.name);
        if m.map(|m| (m.dtype, &m.shape)) != Some((t.file_dtype, &t.spec.shape)) {
            return Err(Error::invalid(format!(
                "memory plan does not match the checkpoint at {} (tensor `{}`); make the plan from this checkpoint",
                ckpt.dir.display(),
                t.spec.name
            )));
        }
    }
    Ok(())
}

impl Weights {
    /// Upload every planned tensor. bf16 → bf16 and f32 → f32 go straight
    /// from the memory map; other conversions go through one host buffer per
    /// tensor. A tensor holding a NaN or an infinity is refused with an
    /// error naming its file, name and first bad element.
    pub fn upload(gpu: &Gpu, ckpt: &Checkpoint, plan: &MemoryPlan) -> Result<Weights> {
        if plan.max_binding != gpu.caps.max_binding {
            return Err(Error::invalid(format!(
                "memory plan was made for a max binding of {} bytes, but this device splits at {} bytes; make the plan with this device's caps",
                plan.max_binding, gpu.caps.max_binding
            )));
        }
        check_plan(ckpt, plan)?;
        let weights = ModelWeights::build(plan, ckpt.config.num_hidden_layers, |t| {
            if let Some(ty) = t.quant {
                let (Some(g), &[r, c]) = (ckpt.gguf(), &t.spec.shape[..]) else {
                    return Err(Error::invalid(format!(
                        "memory plan keeps `{}` quantized, but it is not a 2D GGUF tensor",
                        t.spec.name
                    )));
                };
                let blocks = g.blocks(&t.spec.name)?;
                let q = QTensor::upload(gpu, &t.spec.name, ty, [r, c], &blocks)?;
                debug_assert_eq!(q.chunks.len(), t.chunks);
                return Ok(WTensor::Quant(q));
            }
            let d = if t.zero_copy {
                stream_from_map(gpu, ckpt, t)?
            } else {
                let bytes = device_bytes(ckpt, t)?;
                DeviceTensor::upload_as(
                    gpu,
                    &t.spec.name,
                    t.device_dtype,
                    &t.spec.shape,
                    &bytes,
                    layout_of(gpu, t),
                )?
            };
            // (a texture chunk may also be split at max_texture_dimension_2d)
            debug_assert!(d.layout() == WeightLayout::Texture || d.chunks.len() == t.chunks);
            Ok(WTensor::Dense(d))
        })?;
        gpu.finish_uploads()?;
        Ok(weights)
    }
}

impl HostWeights {
    /// The f32 values the device holds under `plan`'s dtype policy (for a
    /// quantized tensor: `gguf::dequant` of the same blocks); refuses
    /// non-finite values as [`Weights::upload`] does.
    pub fn load(ckpt: &Checkpoint, plan: &MemoryPlan) -> Result<HostWeights> {
        check_plan(ckpt, plan)?;
        ModelWeights::build(plan, ckpt.config.num_hidden_layers, |t| {
            let mut data = widen(ckpt, t)?;
            if t.device_dtype == WDType::Bf16 && t.file_dtype != Dtype::BF16 {
                data = round_bf16(&data);
                if let Some(i) = data.iter().position(|x| !x.is_finite()) {
                    return Err(narrowed_error(ckpt, t, i));
                }
            }
            Ok(HostTensor {
                name: t.spec.name.clone(),
                shape: t.spec.shape.clone(),
                data,
            })
        })
    }
}
