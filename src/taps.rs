//! Taps: named per-layer outputs read back for verification.
//!
//! Every tap is an f32 `[tokens, width]` tensor. Names follow the issue's
//! scheme and PyTorch dumps (`tools/dump_reference.py`) use the same names, so
//! any two sources can be compared tap by tap.

use std::collections::HashMap;
use std::path::Path;

use crate::error::{Error, Result};

/// The per-layer tap kinds, in execution order within a layer.
pub const LAYER_TAPS: [&str; 12] = [
    "attn_norm",
    "q",
    "k",
    "v",
    "q_rope",
    "k_rope",
    "attn",
    "attn_out",
    "resid_attn",
    "mlp_norm",
    "mlp_out",
    "out",
];

/// All tap names of a model with `n_layers` layers, in execution order.
pub fn tap_names(n_layers: usize) -> Vec<String> {
    let mut v = vec!["embed".to_string()];
    for i in 0..n_layers {
        for k in LAYER_TAPS {
            v.push(format!("layers.{i}.{k}"));
        }
    }
    v.push("norm".into());
    v.push("logits".into());
    v
}

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
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| Error::Format {
            path: path.to_path_buf(),
            msg: format!("not a valid safetensors file: {e}"),
        })?;
        let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
        // keep a stable, execution-like order: by layer, then kind order
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
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| Error::Format {
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

fn order_key(name: &str) -> (usize, usize) {
    let kind = tap_kind(name);
    let layer = tap_layer(name);
    match (name, layer) {
        ("embed", _) => (0, 0),
        ("norm", _) => (usize::MAX - 1, 0),
        ("logits", _) => (usize::MAX, 0),
        (_, Some(l)) => (
            1 + l,
            LAYER_TAPS.iter().position(|k| *k == kind).unwrap_or(99),
        ),
        _ => (usize::MAX - 2, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_kinds() {
        let n = tap_names(2);
        assert_eq!(n.len(), 1 + 2 * 12 + 2);
        assert_eq!(n[0], "embed");
        assert_eq!(n[1], "layers.0.attn_norm");
        assert_eq!(n[12], "layers.0.out");
        assert_eq!(n.last().unwrap(), "logits");
        assert_eq!(tap_kind("layers.10.q_rope"), "q_rope");
        assert_eq!(tap_layer("layers.10.q_rope"), Some(10));
        assert_eq!(tap_kind("logits"), "logits");
    }

    #[test]
    fn save_load_roundtrip_keeps_execution_order() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        let mut s = TapSet::default();
        for name in tap_names(11) {
            s.push(name, 2, 3, vec![1.0, 2.0, 3.0, 4.0, 5.0, -6.5]);
        }
        s.save(&p, HashMap::new()).unwrap();
        let l = TapSet::load(&p).unwrap();
        let a: Vec<_> = s.taps.iter().map(|t| &t.name).collect();
        let b: Vec<_> = l.taps.iter().map(|t| &t.name).collect();
        assert_eq!(a, b);
        assert_eq!(l.taps[5].data, s.taps[5].data);
    }
}
