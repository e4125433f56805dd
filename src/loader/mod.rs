//! Checkpoint loading: a Hugging Face model folder (`config.json` plus
//! `model.safetensors` or `model.safetensors.index.json` and its shards),
//! memory-mapped, validated against the config, then uploaded.
//!
//! Nothing here decides anything from a tensor's shape beyond checking it
//! equals the shape the config implies, and nothing is ever transposed:
//! weights reach the device in the file's `[out_features, in_features]`
//! layout.

mod finite;
mod gguf_source;
mod plan;
mod shard;
mod weights;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ::safetensors::Dtype;

pub use finite::{check_finite, first_non_finite};
pub use gguf_source::{manifest_gguf, GgufSource, GGUF_MANIFEST};
pub use plan::{
    default_context, expected_tensors, supported_dtype, DeviceMemory, LayerRole, LoadDType,
    MemoryPlan, PlannedTensor, Role, TensorSpec,
};
pub use shard::{parse_safetensors_bytes, TensorMeta};
pub use weights::{HostTensor, HostWeights, LayerWeights, ModelWeights, WTensor, Weights};

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
    /// The GGUF the tensors are read from, in place of safetensors shards
    /// (a folder with a [`GGUF_MANIFEST`], or [`Checkpoint::open_gguf`]).
    gguf: Option<GgufSource>,
}

impl Checkpoint {
    /// Open a Hugging Face model folder. As transformers does, a single
    /// `model.safetensors` is preferred over an index when both exist. A
    /// folder with a [`GGUF_MANIFEST`] instead reads the GGUF it names, and
    /// a `.gguf` file itself is [`Checkpoint::open_gguf`].
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        match std::fs::metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) if crate::gguf::is_gguf_file(&dir) => return Self::open_gguf(&dir),
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
        } else if let Some(gguf) = manifest_gguf(&dir)? {
            return Self::with_gguf(dir, config, &gguf);
        } else {
            let found: Vec<String> = std::fs::read_dir(&dir)
                .map(|rd| {
                    rd.filter_map(|e| e.ok())
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            return Err(no_weights(dir, found));
        };
        Ok(Checkpoint {
            dir,
            config,
            index,
            shards,
            tensors,
            gguf: None,
        })
    }

    /// A model folder already in memory (a browser's fetches or picked
    /// files): `config.json`'s bytes and every other file by name. The
    /// same rules and checks as [`Checkpoint::open`]; `dir` only labels
    /// errors (e.g. the URL the folder came from).
    pub fn from_memory(
        dir: impl AsRef<Path>,
        config_json: &[u8],
        mut files: HashMap<String, Vec<u8>>,
    ) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let config_path = dir.join("config.json");
        let text = std::str::from_utf8(config_json).map_err(|e| Error::Json {
            path: config_path.clone(),
            msg: format!("not UTF-8: {e}"),
        })?;
        let config = ModelConfig::from_json_str(text, &config_path)?;
        let (shards, tensors, index) = if let Some(bytes) = files.remove(SINGLE_FILE) {
            let shard = Shard::from_vec(&dir.join(SINGLE_FILE), bytes, 0)?;
            let tensors = shard.tensors.clone();
            (vec![shard], tensors, None)
        } else if let Some(text) = files.remove(INDEX_FILE) {
            let index_path = dir.join(INDEX_FILE);
            let (names, wanted) = parse_index(&index_path, &text)?;
            let (shards, tensors) = open_shards(&dir, &index_path, names, wanted, |f, p, i| {
                files.remove(f).map(|b| Shard::from_vec(p, b, i))
            })?;
            (shards, tensors, Some(index_path))
        } else {
            let found = files.keys().cloned().chain(["config.json".into()]);
            return Err(no_weights(dir, found.collect()));
        };
        Ok(Checkpoint {
            dir,
            config,
            index,
            shards,
            tensors,
            gguf: None,
        })
    }

    /// Open a `.gguf` file as a checkpoint, read in place: the config is
    /// the one conversion would write (`gguf::hf_config`), the tensors are
    /// the file's (see [`GgufSource`]). `dir` is the file's folder.
    pub fn open_gguf(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let src = GgufSource::open(path)?;
        let json = crate::gguf::hf_config(&src.file, crate::gguf::ConvertDType::F32)?;
        let config = ModelConfig::from_json_str(&json.to_string(), path)?;
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        Ok(Self::from_source(dir, config, src))
    }

    fn with_gguf(dir: PathBuf, config: ModelConfig, gguf: &Path) -> Result<Self> {
        Ok(Self::from_source(dir, config, GgufSource::open(gguf)?))
    }

    fn from_source(dir: PathBuf, config: ModelConfig, src: GgufSource) -> Self {
        Checkpoint {
            dir,
            config,
            index: None,
            shards: Vec::new(),
            tensors: src.metas(),
            gguf: Some(src),
        }
    }

    /// The GGUF this checkpoint reads, when it is one.
    pub fn gguf(&self) -> Option<&GgufSource> {
        self.gguf.as_ref()
    }

    /// The safetensors files, in shard order.
    pub fn files(&self) -> Vec<&Path> {
        if let Some(g) = &self.gguf {
            return vec![g.path()];
        }
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
        if let Some(g) = &self.gguf {
            return (
                g.path().to_path_buf(),
                "no tensor of this GGUF maps to it".to_string(),
            );
        }
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
        self.not_gguf(m)?;
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
        self.not_gguf(m)?;
        let b = self.shards[m.shard].bytes(m);
        check_finite(m, b)?;
        Ok(b)
    }

    /// The tensor's values widened exactly to f32 (BF16, F16 or F32 files).
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>> {
        let m = self.lookup(name)?;
        if let Some(g) = &self.gguf {
            return g.f32(name);
        }
        widen_to_f32(m, self.shards[m.shard].bytes(m))
    }

    /// [`Checkpoint::tensor_f32`] after [`Checkpoint::finite_bytes`]'s check.
    /// For a GGUF, the dequantized values (refused when not finite).
    pub fn finite_f32(&self, name: &str) -> Result<Vec<f32>> {
        let m = self.lookup(name)?;
        if let Some(g) = &self.gguf {
            return g.f32(name);
        }
        widen_to_f32(m, self.finite_bytes(name)?)
    }

    /// Raw bytes are safetensors data only; a GGUF's tensors are read
    /// through [`GgufSource`] (blocks or dequantized values).
    fn not_gguf(&self, m: &TensorMeta) -> Result<()> {
        match &self.gguf {
            None => Ok(()),
            Some(g) => Err(Error::Tensor {
                path: g.path().to_path_buf(),
                tensor: m.name.clone(),
                msg: "a GGUF tensor has no safetensors bytes; read its blocks or its \
                      dequantized values"
                    .into(),
            }),
        }
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
    open_shards(dir, index_path, files, wanted, |_, p, i| {
        p.is_file().then(|| Shard::open(p, i))
    })
}

/// The error for a model folder with neither weight layout; `found` lists
/// what it holds.
fn no_weights(dir: PathBuf, mut found: Vec<String>) -> Error {
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
    Error::Format {
        path: dir,
        msg: format!(
            "no {SINGLE_FILE} or {INDEX_FILE} in the model folder (found: {}).{hint}",
            if found.is_empty() {
                "nothing".to_string()
            } else {
                found.join(", ")
            }
        ),
    }
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
    mut open: impl FnMut(&str, &Path, usize) -> Option<Result<Shard>>,
) -> Result<Opened> {
    let mut shards = Vec::with_capacity(files.len());
    for (i, f) in files.iter().enumerate() {
        let p = dir.join(f);
        let Some(shard) = open(f, &p, i) else {
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
        };
        shards.push(shard?);
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
