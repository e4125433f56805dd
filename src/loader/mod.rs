//! Checkpoint loading: a Hugging Face model folder (`config.json` plus
//! `model.safetensors` or `model.safetensors.index.json` and its shards),
//! memory-mapped, validated against the config, then uploaded.
//!
//! Nothing here decides anything from a tensor's shape beyond checking it
//! equals the shape the config implies, and nothing is ever transposed:
//! weights reach the device in the file's `[out_features, in_features]`
//! layout.

mod finite;
mod plan;
mod shard;
mod weights;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ::safetensors::Dtype;

pub use finite::{check_finite, first_non_finite};
pub use plan::{
    default_context, expected_tensors, supported_dtype, DeviceMemory, LayerRole, LoadDType,
    MemoryPlan, PlannedTensor, Role, TensorSpec,
};
pub use shard::{parse_safetensors_bytes, TensorMeta};
pub use weights::{HostTensor, HostWeights, LayerWeights, ModelWeights, Weights};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use shard::Shard;

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// An opened model folder: its config and its memory-mapped tensors.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: ModelConfig,
    /// The index file when the checkpoint is sharded.
    pub index: Option<PathBuf>,
    shards: Vec<Shard>,
    tensors: HashMap<String, TensorMeta>,
}

impl Checkpoint {
    /// Open a Hugging Face model folder. As transformers does, a single
    /// `model.safetensors` is preferred over an index when both exist.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        match std::fs::metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(Error::Io {
                    path: dir,
                    msg: "not a directory (expected a Hugging Face model folder with config.json and model.safetensors)".into(),
                    source: None,
                })
            }
            Err(e) => {
                return Err(Error::Io {
                    msg: format!("model folder cannot be read: {e}"),
                    path: dir,
                    source: Some(e),
                })
            }
        }
        let config = ModelConfig::from_file(dir.join("config.json"))?;

        let single = dir.join(SINGLE_FILE);
        let index_path = dir.join(INDEX_FILE);
        let (shards, tensors, index) = if single.is_file() {
            let shard = Shard::open(&single, 0)?;
            let tensors = shard.tensors.clone();
            (vec![shard], tensors, None)
        } else if index_path.is_file() {
            let (shards, tensors) = open_sharded(&dir, &index_path)?;
            (shards, tensors, Some(index_path))
        } else {
            let mut found: Vec<String> = std::fs::read_dir(&dir)
                .map(|rd| {
                    rd.filter_map(|e| e.ok())
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            found.sort();
            let hint = if found
                .iter()
                .any(|f| f.ends_with(".bin") || f.ends_with(".pt") || f.ends_with(".pth"))
            {
                " PyTorch pickle checkpoints (.bin/.pt) are not supported; convert them to safetensors."
            } else if found.iter().any(|f| f.ends_with(".gguf")) {
                " GGUF files are not read by this loader."
            } else {
                ""
            };
            return Err(Error::Format {
                path: dir,
                msg: format!(
                    "no {SINGLE_FILE} or {INDEX_FILE} in the model folder (found: {}).{hint}",
                    if found.is_empty() {
                        "nothing".to_string()
                    } else {
                        found.join(", ")
                    }
                ),
            });
        };
        Ok(Checkpoint {
            dir,
            config,
            index,
            shards,
            tensors,
        })
    }

    /// The safetensors files, in shard order.
    pub fn files(&self) -> Vec<&Path> {
        self.shards.iter().map(|s| s.path.as_path()).collect()
    }

    /// Every tensor name in the checkpoint (unordered).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn meta(&self, name: &str) -> Option<&TensorMeta> {
        self.tensors.get(name)
    }

    /// Where a missing tensor was looked for: (path for the error, detail).
    fn searched(&self) -> (PathBuf, String) {
        match &self.index {
            Some(ix) => (
                ix.clone(),
                format!("not in its weight_map; shards: {}", self.shard_names()),
            ),
            None => (
                self.shards[0].path.clone(),
                "not in this file's header".to_string(),
            ),
        }
    }

    fn shard_names(&self) -> String {
        self.shards
            .iter()
            .map(|s| {
                s.path
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn lookup(&self, name: &str) -> Result<&TensorMeta> {
        self.tensors.get(name).ok_or_else(|| {
            let (path, detail) = self.searched();
            Error::Tensor {
                path,
                tensor: name.to_string(),
                msg: format!("missing from the checkpoint ({detail})"),
            }
        })
    }

    /// The tensor's raw bytes, straight from the memory map.
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let m = self.lookup(name)?;
        Ok(self.shards[m.shard].bytes(m))
    }

    /// Drop `bytes` (a range of one of this checkpoint's memory maps, e.g.
    /// from [`Checkpoint::tensor_bytes`]) from resident memory after they
    /// were copied to the device (see `Shard::release`); other slices are
    /// ignored.
    pub fn release_pages(&self, bytes: &[u8]) {
        for s in &self.shards {
            if s.release(bytes) {
                return;
            }
        }
    }

    /// The tensor's raw bytes, refused with an error naming the first bad
    /// element when any value is NaN or infinite ([`check_finite`]). The
    /// load path ([`Weights::upload`], [`HostWeights::load`]) reads every
    /// tensor through this.
    pub fn finite_bytes(&self, name: &str) -> Result<&[u8]> {
        let m = self.lookup(name)?;
        let b = self.shards[m.shard].bytes(m);
        check_finite(m, b)?;
        Ok(b)
    }

    /// The tensor's values widened exactly to f32 (BF16, F16 or F32 files).
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>> {
        let m = self.lookup(name)?;
        widen_to_f32(m, self.shards[m.shard].bytes(m))
    }

    /// [`Checkpoint::tensor_f32`] after [`Checkpoint::finite_bytes`]'s check.
    pub fn finite_f32(&self, name: &str) -> Result<Vec<f32>> {
        let m = self.lookup(name)?;
        widen_to_f32(m, self.finite_bytes(name)?)
    }

    /// Check that `spec`'s tensor exists with a supported dtype and exactly
    /// the expected shape.
    pub fn validate_tensor(&self, spec: &TensorSpec, cfg: &ModelConfig) -> Result<&TensorMeta> {
        let m = self.tensors.get(&spec.name).ok_or_else(|| {
            let hint = if spec.role == Role::LmHead {
                format!(
                    "; {} has tie_word_embeddings = false, so a separate lm_head.weight is required",
                    cfg.path.display()
                )
            } else {
                String::new()
            };
            let (path, detail) = self.searched();
            Error::Tensor {
                path,
                tensor: spec.name.clone(),
                msg: format!("missing from the checkpoint ({detail}){hint}"),
            }
        })?;
        if !supported_dtype(m.dtype) {
            return Err(unsupported_dtype(m, m.dtype));
        }
        if m.shape != spec.shape {
            let mut rev = spec.shape.clone();
            rev.reverse();
            let hint = if spec.shape.len() == 2 && m.shape == rev {
                format!(
                    "; looks transposed: it is stored as [in_features, out_features], but wgllm expects the PyTorch nn.Linear layout {} exactly as transformers saves it, and never transposes",
                    spec.dims
                )
            } else {
                String::new()
            };
            return Err(Error::Tensor {
                path: m.file.clone(),
                tensor: spec.name.clone(),
                msg: format!(
                    "shape {:?} does not match the expected {:?} = {} from {}{hint}",
                    m.shape,
                    spec.shape,
                    spec.dims,
                    cfg.path.display()
                ),
            });
        }
        Ok(m)
    }
}

fn widen_to_f32(m: &TensorMeta, b: &[u8]) -> Result<Vec<f32>> {
    match m.dtype {
        Dtype::BF16 => Ok(crate::tensor::bf16_bytes_to_f32(b)),
        Dtype::F16 => Ok(crate::tensor::f16_bytes_to_f32(b)),
        Dtype::F32 => Ok(b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()),
        d => Err(unsupported_dtype(m, d)),
    }
}

fn unsupported_dtype(m: &TensorMeta, d: Dtype) -> Error {
    Error::Tensor {
        path: m.file.clone(),
        tensor: m.name.clone(),
        msg: format!("dtype {d} is not supported; expected BF16, F16 or F32"),
    }
}

type Opened = (Vec<Shard>, HashMap<String, TensorMeta>);

fn open_sharded(dir: &Path, index_path: &Path) -> Result<Opened> {
    let text = std::fs::read(index_path).map_err(|e| Error::io(index_path, e))?;
    let (files, wanted) = parse_index(index_path, &text)?;
    open_shards(dir, index_path, files, wanted)
}

/// A parsed `model.safetensors.index.json`: the shard file names (sorted)
/// and every (tensor, shard file) pair of its `weight_map`.
pub type ShardIndex = (Vec<String>, Vec<(String, String)>);

/// Parse and validate a sharded checkpoint's index held in memory; `path`
/// only labels errors. Shard names must be plain file names inside the
/// model folder (no `..`, no absolute paths). (The index half of the
/// safetensors fuzz target.)
pub fn parse_index_bytes(path: &Path, bytes: &[u8]) -> Result<ShardIndex> {
    parse_index(path, bytes)
}

fn parse_index(index_path: &Path, bytes: &[u8]) -> Result<ShardIndex> {
    let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| Error::Json {
        path: index_path.to_path_buf(),
        msg: e.to_string(),
    })?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::Config {
            path: index_path.to_path_buf(),
            field: "weight_map".into(),
            msg: "missing or not an object of tensor name → shard file".into(),
        })?;
    // Shards in order of first appearance, sorted by file name for stability.
    let mut files: Vec<String> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut wanted: Vec<(String, String)> = Vec::with_capacity(map.len());
    for (name, f) in map {
        let f = f.as_str().ok_or_else(|| Error::Config {
            path: index_path.to_path_buf(),
            field: format!("weight_map.{name}"),
            msg: format!("expected a shard file name, got {f}"),
        })?;
        let p = Path::new(f);
        let mut comps = p.components();
        let plain =
            matches!(comps.next(), Some(std::path::Component::Normal(_))) && comps.next().is_none();
        if !plain {
            return Err(Error::Config {
                path: index_path.to_path_buf(),
                field: format!("weight_map.{name}"),
                msg: format!("shard `{f}` must be a file name inside the model folder"),
            });
        }
        if seen.insert(f) {
            files.push(f.to_string());
        }
        wanted.push((name.clone(), f.to_string()));
    }
    files.sort();
    Ok((files, wanted))
}

fn open_shards(
    dir: &Path,
    index_path: &Path,
    files: Vec<String>,
    wanted: Vec<(String, String)>,
) -> Result<Opened> {
    let mut shards = Vec::with_capacity(files.len());
    for (i, f) in files.iter().enumerate() {
        let p = dir.join(f);
        if !p.is_file() {
            let users: Vec<&str> = wanted
                .iter()
                .filter(|(_, s)| s == f)
                .map(|(n, _)| n.as_str())
                .collect();
            return Err(Error::Format {
                path: index_path.to_path_buf(),
                msg: format!(
                    "weight_map points at shard `{f}` (for {} tensors, e.g. `{}`), but {} does not exist",
                    users.len(),
                    users[0],
                    p.display()
                ),
            });
        }
        shards.push(Shard::open(&p, i)?);
    }
    let shard_of: HashMap<&str, usize> = files
        .iter()
        .enumerate()
        .map(|(i, f)| (f.as_str(), i))
        .collect();
    let mut tensors = HashMap::with_capacity(wanted.len());
    for (name, f) in wanted {
        let Some(&i) = shard_of.get(f.as_str()) else {
            return Err(Error::Format {
                path: index_path.to_path_buf(),
                msg: format!(
                    "weight_map maps `{name}` to shard `{f}`, which is not in its file list"
                ),
            });
        };
        let meta = shards[i].tensors.get(&name).ok_or_else(|| Error::Tensor {
            path: shards[i].path.clone(),
            tensor: name.clone(),
            msg: format!(
                "{} maps it to this shard, but the shard's header does not contain it",
                index_path.display()
            ),
        })?;
        tensors.insert(name, meta.clone());
    }
    Ok((shards, tensors))
}
