//! A GGUF file as a checkpoint's tensor source, read in place (`--dtype
//! native`): no converted copy exists anywhere, the blocks the device gets
//! are the file's own (`gguf::native_blocks`: whole rows, llama's Q/K row
//! permutation undone), and every other view of a tensor — the f32 values
//! of the CPU reference, a widened upload — is `gguf::dequant` of those same
//! blocks (`gguf::convert::tensor_to_bytes` in f32), so the GPU and the
//! reference see exactly the same numbers.
//!
//! Names, shapes and completeness are checked by `gguf::convert::plan_tensors`
//! (the conversion's own plan), so a file that converts also runs natively.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ::safetensors::Dtype;

use super::shard::TensorMeta;
use crate::error::{Error, Hint, Result, Setting};
use crate::gguf::convert::{plan_tensors, tensor_to_bytes, PlannedTensor};
use crate::gguf::{native_blocks, ConvertDType, GgmlType, GgufFile};

/// The manifest a GGUF-backed model folder carries in place of
/// `model.safetensors`: `{"gguf": <path>, "size": <bytes>, "sha256": ..}`.
/// The folder holds only the small files (config, tokenizer); the weights
/// are read from the named GGUF.
pub const GGUF_MANIFEST: &str = "wgllm-gguf-native.json";

struct Entry {
    index: usize,
    hf_name: String,
    shape: Vec<usize>,
    unpermute_heads: Option<usize>,
}

/// An opened GGUF file and the Hugging Face name of each of its tensors.
pub struct GgufSource {
    pub file: GgufFile,
    by_name: HashMap<String, Entry>,
}

impl GgufSource {
    pub fn open(path: &Path) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let by_name = plan_tensors(&file)?
            .into_iter()
            .map(|p| {
                let index = file
                    .tensors()
                    .iter()
                    .position(|t| std::ptr::eq(t, p.info))
                    .expect("planned tensors are the file's");
                (
                    p.hf_name.clone(),
                    Entry {
                        index,
                        hf_name: p.hf_name,
                        shape: p.shape,
                        unpermute_heads: p.unpermute_heads,
                    },
                )
            })
            .collect();
        Ok(GgufSource { file, by_name })
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    fn planned(&self, name: &str) -> Result<PlannedTensor<'_>> {
        let e = self.by_name.get(name).ok_or_else(|| Error::Tensor {
            path: self.path().to_path_buf(),
            tensor: name.to_string(),
            msg: "no GGUF tensor maps to this Hugging Face name".into(),
        })?;
        Ok(PlannedTensor {
            info: &self.file.tensors()[e.index],
            hf_name: e.hf_name.clone(),
            shape: e.shape.clone(),
            unpermute_heads: e.unpermute_heads,
        })
    }

    /// The ggml type `name` is stored as.
    pub fn ggml_type(&self, name: &str) -> Option<GgmlType> {
        self.by_name
            .get(name)
            .map(|e| self.file.tensors()[e.index].ty)
    }

    /// `name`'s values as f32 in Hugging Face layout: `gguf::dequant` of the
    /// file's blocks, refused (naming the element) when one is not finite.
    pub fn f32(&self, name: &str) -> Result<Vec<f32>> {
        let b = tensor_to_bytes(&self.file, &self.planned(name)?, ConvertDType::F32)?;
        Ok(b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    /// `name`'s own ggml blocks in Hugging Face row order (2D tensors).
    pub fn blocks(&self, name: &str) -> Result<Vec<u8>> {
        native_blocks(&self.file, &self.planned(name)?)
    }

    /// A [`TensorMeta`] per tensor for the checkpoint's validation. Its
    /// dtype is what the tensor's values widen to without loss: BF16 and
    /// F16 as stored, every other ggml type F32 (the dequantized values).
    /// The offsets point at the ggml bytes and are not safetensors data.
    pub fn metas(&self) -> HashMap<String, TensorMeta> {
        self.by_name
            .iter()
            .map(|(name, e)| {
                let t = &self.file.tensors()[e.index];
                let dtype = match t.ty {
                    GgmlType::BF16 => Dtype::BF16,
                    GgmlType::F16 => Dtype::F16,
                    _ => Dtype::F32,
                };
                let meta = TensorMeta {
                    name: name.clone(),
                    dtype,
                    shape: e.shape.clone(),
                    file: self.path().to_path_buf(),
                    shard: usize::MAX,
                    offset: (self.file.data_offset + t.offset) as usize,
                    len: t.n_bytes as usize,
                };
                (name.clone(), meta)
            })
            .collect()
    }
}

/// Read a folder's [`GGUF_MANIFEST`]: the GGUF it points at, checked to
/// exist with the recorded size (a moved or replaced file is named, with
/// what to do).
pub fn manifest_gguf(dir: &Path) -> Result<Option<PathBuf>> {
    let mpath = dir.join(GGUF_MANIFEST);
    let text = match std::fs::read_to_string(&mpath) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(&mpath, e)),
    };
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Json {
        path: mpath.clone(),
        msg: e.to_string(),
    })?;
    let field = |f: &str, msg: &str| Error::Config {
        path: mpath.clone(),
        field: f.into(),
        msg: msg.into(),
    };
    let gguf = PathBuf::from(
        v["gguf"]
            .as_str()
            .ok_or_else(|| field("gguf", "missing or not a path string"))?,
    );
    let size = v["size"]
        .as_u64()
        .ok_or_else(|| field("size", "missing or not a byte count"))?;
    let stale = |what: String| {
        Error::Io {
            path: gguf.clone(),
            msg: format!("{what}; {} names this file as its weights", mpath.display()),
            source: None,
        }
        .hint(
            Hint::new()
                .text("give the .gguf itself as the ")
                .name(Setting::Model)
                .text(" again"),
        )
    };
    match std::fs::metadata(&gguf) {
        Ok(m) if m.len() == size => Ok(Some(gguf)),
        Ok(m) => Err(stale(format!(
            "the GGUF is {} bytes now, {size} when this folder was made",
            m.len()
        ))),
        Err(e) => Err(stale(format!("the GGUF cannot be read ({e})"))),
    }
}
