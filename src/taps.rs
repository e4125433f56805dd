//! Taps: named per-layer outputs read back for verification.
//!
//! Every tap is an f32 `[tokens, width]` tensor. Which taps a model has, in
//! what order and of what width, is its [`crate::program::Program`]'s
//! (`Program::taps`). PyTorch dumps (`tools/dump_reference.py`) use the same
//! names, so any two sources can be compared tap by tap.

use std::collections::HashMap;
use std::path::Path;

use crate::error::{Error, Result};

/// The kind of a tap name: `layers.3.q_rope` → `q_rope`, `logits` → `logits`.
pub fn tap_kind(name: &str) -> &str {
    match name.strip_prefix("layers.") {
        Some(rest) => rest.split_once('.').map(|(_, k)| k).unwrap_or(rest),
        None => name,
    }
}

/// The layer of a tap name, if it has one.
pub fn tap_layer(name: &str) -> Option<usize> {
    name.strip_prefix("layers.")?
        .split_once('.')?
        .0
        .parse()
        .ok()
}

#[derive(Clone, Debug, PartialEq)]
pub struct Tap {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

/// Taps in execution order.
#[derive(Clone, Debug, Default)]
pub struct TapSet {
    pub taps: Vec<Tap>,
}

impl TapSet {
    pub fn push(&mut self, name: impl Into<String>, rows: usize, cols: usize, data: Vec<f32>) {
        debug_assert_eq!(data.len(), rows * cols);
        self.taps.push(Tap {
            name: name.into(),
            rows,
            cols,
            data,
        });
    }

    pub fn get(&self, name: &str) -> Option<&Tap> {
        self.taps.iter().find(|t| t.name == name)
    }

    /// Write every tap as an F32 tensor `[rows, cols]` to a safetensors file.
    pub fn save(&self, path: &Path, metadata: HashMap<String, String>) -> Result<()> {
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = self
            .taps
            .iter()
            .map(|t| {
                let bytes: &[u8] = bytemuck::cast_slice(&t.data);
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    vec![t.rows, t.cols],
                    bytes,
                )
                .map(|v| (t.name.clone(), v))
                .map_err(|e| Error::invalid(format!("tap `{}`: {e}", t.name)))
            })
            .collect::<Result<_>>()?;
        safetensors::serialize_to_file(views, Some(metadata), path).map_err(|e| Error::Format {
            path: path.to_path_buf(),
            msg: format!("writing taps: {e}"),
        })
    }

    /// Read taps from a safetensors file (e.g. a PyTorch dump). Only F32 2D
    /// tensors whose names are taps are taken; others (`tokens`, `generated`)
    /// are left to [`read_i32`].
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(path, &bytes)
    }

    /// [`TapSet::load`] from a file's bytes held in memory (`path` labels
    /// errors).
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Self> {
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| Error::Format {
            path: path.to_path_buf(),
            msg: format!("not a valid safetensors file: {e}"),
        })?;
        let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
        // a stable order: embed, layer by layer (by name within a layer),
        // norm, logits; comparisons follow the model's own (program) order
        names.sort_by_key(|n| order_key(n));
        let mut out = TapSet::default();
        for name in names {
            let t = st.tensor(&name).map_err(|e| Error::Tensor {
                path: path.to_path_buf(),
                tensor: name.clone(),
                msg: e.to_string(),
            })?;
            if t.dtype() != safetensors::Dtype::F32 || t.shape().len() != 2 {
                continue;
            }
            let data: Vec<f32> = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            out.push(name, t.shape()[0], t.shape()[1], data);
        }
        Ok(out)
    }
}

/// Read an integer tensor (I32 or I64) such as `tokens` or `generated`.
pub fn read_i32(path: &Path, name: &str) -> Result<Option<Vec<i64>>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    read_i32_bytes(path, &bytes, name)
}

/// [`read_i32`] from a file's bytes held in memory (`path` labels errors).
pub fn read_i32_bytes(path: &Path, bytes: &[u8], name: &str) -> Result<Option<Vec<i64>>> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| Error::Format {
        path: path.to_path_buf(),
        msg: format!("not a valid safetensors file: {e}"),
    })?;
    let Ok(t) = st.tensor(name) else {
        return Ok(None);
    };
    let v = match t.dtype() {
        safetensors::Dtype::I32 => t
            .data()
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
            .collect(),
        safetensors::Dtype::I64 => t
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect(),
        other => {
            return Err(Error::Tensor {
                path: path.to_path_buf(),
                tensor: name.into(),
                msg: format!("expected I32 or I64, got {other:?}"),
            })
        }
    };
    Ok(Some(v))
}

fn order_key(name: &str) -> (usize, String) {
    let bucket = match (name, tap_layer(name)) {
        ("embed", _) => 0,
        ("norm", _) => usize::MAX - 1,
        ("logits", _) => usize::MAX,
        (_, Some(l)) => 1 + l,
        _ => usize::MAX - 2,
    };
    (bucket, tap_kind(name).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_kinds() {
        assert_eq!(tap_kind("layers.10.q_rope"), "q_rope");
        assert_eq!(tap_layer("layers.10.q_rope"), Some(10));
        assert_eq!(tap_kind("logits"), "logits");
        assert_eq!(tap_layer("logits"), None);
    }

    #[test]
    fn save_load_roundtrip_orders_by_layer() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        let mut s = TapSet::default();
        let mut names = vec!["embed".to_string()];
        for i in 0..11 {
            for k in ["attn_norm", "q", "out"] {
                names.push(format!("layers.{i}.{k}"));
            }
        }
        names.extend(["norm".to_string(), "logits".to_string()]);
        for (i, name) in names.iter().enumerate() {
            s.push(
                name.clone(),
                2,
                3,
                vec![1.0, 2.0, 3.0, 4.0, 5.0, -6.5 + i as f32],
            );
        }
        s.save(&p, HashMap::new()).unwrap();
        let l = TapSet::load(&p).unwrap();
        let got: Vec<_> = l.taps.iter().map(|t| t.name.clone()).collect();
        let mut want = names.clone();
        want.sort_by_key(|n| order_key(n));
        assert_eq!(got, want);
        assert_eq!(got[0], "embed");
        assert_eq!(
            &got[1..4],
            ["layers.0.attn_norm", "layers.0.out", "layers.0.q"]
        );
        assert_eq!(got[4], "layers.1.attn_norm");
        assert_eq!(got.last().unwrap(), "logits");
        for t in &s.taps {
            assert_eq!(l.get(&t.name).unwrap().data, t.data);
        }
    }
}
