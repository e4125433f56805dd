//! One memory-mapped safetensors file: header parsing with clear errors.
//!
//! Format: an 8-byte little-endian header length `n`, `n` bytes of JSON
//! (`{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {..}}`),
//! then the data section; offsets are relative to the data section, must tile
//! it exactly (no gaps, no overlaps, nothing after the last tensor) and each
//! range must hold exactly `numel * dtype size` bytes.
//!
//! The `safetensors` crate's `read_metadata` checks all of this too, but its
//! errors do not always name the tensor (e.g. "invalid shape, data type, or
//! offset for tensor") and never name the file, so we check first with our
//! own messages and keep the crate's reader as a final gate.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ::safetensors::{Dtype, SafeTensors};
use memmap2::Mmap;
use serde_json::Value;

use crate::error::{Error, Result};

/// Where one tensor's bytes live.
#[derive(Clone, Debug)]
pub struct TensorMeta {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// The safetensors file holding it.
    pub file: PathBuf,
    /// Index of that file in the checkpoint's shard list.
    pub shard: usize,
    /// Absolute byte offset of the data in the file.
    pub offset: usize,
    /// Byte length (= numel × dtype size, checked).
    pub len: usize,
}

impl TensorMeta {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A memory-mapped safetensors file and the tensors its header declares.
pub struct Shard {
    pub path: PathBuf,
    pub mmap: Mmap,
    pub tensors: HashMap<String, TensorMeta>,
}

fn fmt_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

fn tensor_err(path: &Path, name: &str, msg: impl Into<String>) -> Error {
    Error::Tensor {
        path: path.to_path_buf(),
        tensor: name.to_string(),
        msg: msg.into(),
    }
}

impl Shard {
    /// Map `path` and validate its header. `shard` is its index in the
    /// checkpoint (recorded in each [`TensorMeta`]).
    pub fn open(path: &Path, shard: usize) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| {
            let msg = if e.kind() == std::io::ErrorKind::NotFound {
                "safetensors file not found".to_string()
            } else {
                format!("cannot open safetensors file: {e}")
            };
            Error::Io {
                path: path.to_path_buf(),
                msg,
                source: Some(e),
            }
        })?;
        // SAFETY: the mapping is read-only. As with every mmap-based loader
        // (safetensors, llama.cpp), the file must not be truncated or
        // rewritten by another process while the checkpoint is open.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::Io {
            path: path.to_path_buf(),
            msg: format!("cannot memory-map safetensors file: {e}"),
            source: Some(e),
        })?;
        let tensors = parse_checked(path, &mmap, shard)?;
        Ok(Shard {
            path: path.to_path_buf(),
            mmap,
            tensors,
        })
    }

    pub fn bytes(&self, t: &TensorMeta) -> &[u8] {
        &self.mmap[t.offset..t.offset + t.len]
    }

    /// Drop the whole pages of `bytes` (a range of this mapping; anything
    /// else is ignored) from the process's resident memory once they have
    /// been copied out: the kernel keeps them in its page cache, and a
    /// later read of them faults them back in from there. Returns whether
    /// `bytes` lies in this mapping.
    pub fn release(&self, bytes: &[u8]) -> bool {
        let base = self.mmap.as_ptr() as usize;
        let start = bytes.as_ptr() as usize;
        if bytes.is_empty() || start < base || start + bytes.len() > base + self.mmap.len() {
            return false;
        }
        #[cfg(unix)]
        {
            let page = page_size();
            let lo = (start - base).div_ceil(page) * page;
            let hi = (start - base + bytes.len()) / page * page;
            if hi > lo {
                // SAFETY: the mapping is read-only and never written through
                // (no private copy-on-write pages to lose), so MADV_DONTNEED
                // only drops clean file pages that later reads fault back in
                // with the same contents. A failure only leaves them resident.
                let _ = unsafe {
                    self.mmap.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        lo,
                        hi - lo,
                    )
                };
            }
        }
        true
    }
}

#[cfg(unix)]
fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

/// Our checks, then the `safetensors` crate's reader as a final gate (it
/// must agree).
fn parse_checked(path: &Path, buf: &[u8], shard: usize) -> Result<HashMap<String, TensorMeta>> {
    let tensors = parse_header(path, buf, shard)?;
    SafeTensors::read_metadata(buf)
        .map_err(|e| fmt_err(path, format!("invalid safetensors file: {e}")))?;
    Ok(tensors)
}

/// Validate a whole safetensors image held in memory (header, tensor table,
/// offsets against the data section) with exactly the checks
/// [`super::Checkpoint::open`] applies to each file; `path` only labels
/// errors. The tensors come back in data order. (The entry point of the
/// fuzz target and its corpus replay.)
pub fn parse_safetensors_bytes(path: &Path, bytes: &[u8]) -> Result<Vec<TensorMeta>> {
    let mut v: Vec<TensorMeta> = parse_checked(path, bytes, 0)?.into_values().collect();
    v.sort_by_key(|t| (t.offset, t.len));
    Ok(v)
}

fn parse_header(path: &Path, buf: &[u8], shard: usize) -> Result<HashMap<String, TensorMeta>> {
    let file_len = buf.len();
    if file_len < 8 {
        return Err(fmt_err(
            path,
            format!("file is {file_len} bytes, too short for a safetensors file (8-byte header length + JSON header); truncated or not safetensors"),
        ));
    }
    let n = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
    if n > (file_len - 8) as u64 {
        return Err(fmt_err(
            path,
            format!(
                "header length {n} bytes goes beyond the end of the file ({file_len} bytes); the file is truncated or not safetensors"
            ),
        ));
    }
    let n = n as usize;
    let header = std::str::from_utf8(&buf[8..8 + n])
        .map_err(|e| fmt_err(path, format!("safetensors header is not UTF-8: {e}")))?;
    let json: Value = serde_json::from_str(header)
        .map_err(|e| fmt_err(path, format!("safetensors header is not valid JSON: {e}")))?;
    let Value::Object(obj) = json else {
        return Err(fmt_err(path, "safetensors header is not a JSON object"));
    };
    let data_start = 8 + n;
    let data_len = file_len - data_start;

    let mut out = HashMap::with_capacity(obj.len());
    for (name, v) in &obj {
        if name == "__metadata__" {
            continue;
        }
        let bad = |what: &str| tensor_err(path, name, format!("bad header entry: {what}"));
        let dtype_s = v
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("`dtype` missing or not a string"))?;
        let dtype: Dtype = serde_json::from_value(Value::String(dtype_s.to_string()))
            .map_err(|_| tensor_err(path, name, format!("unknown dtype `{dtype_s}` in header")))?;
        let shape = v
            .get("shape")
            .and_then(Value::as_array)
            .and_then(|a| {
                a.iter()
                    .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                    .collect::<Option<Vec<usize>>>()
            })
            .ok_or_else(|| bad("`shape` missing or not a list of non-negative integers"))?;
        let offs = v
            .get("data_offsets")
            .and_then(Value::as_array)
            .filter(|a| a.len() == 2)
            .and_then(|a| {
                Some((
                    usize::try_from(a[0].as_u64()?).ok()?,
                    usize::try_from(a[1].as_u64()?).ok()?,
                ))
            })
            .ok_or_else(|| bad("`data_offsets` missing or not [begin, end]"))?;
        let (b, e) = offs;
        if e < b {
            return Err(tensor_err(
                path,
                name,
                format!("data_offsets [{b}, {e}] end before they begin"),
            ));
        }
        // In u128 so that any claim up to 2^128 bits is measured (and then
        // refused against the file) rather than reported as an overflow.
        let want = shape
            .iter()
            .try_fold(1u128, |a, &d| a.checked_mul(d as u128))
            .and_then(|numel| numel.checked_mul(dtype.bitsize() as u128))
            .filter(|bits| bits % 8 == 0)
            .map(|bits| bits / 8)
            .ok_or_else(|| {
                tensor_err(
                    path,
                    name,
                    format!("shape {shape:?} × dtype {dtype} overflows or is not a whole number of bytes"),
                )
            })?;
        if want > data_len as u128 {
            return Err(tensor_err(
                path,
                name,
                format!(
                    "dtype {dtype} × shape {shape:?} needs {want} bytes, more than the whole data section ({data_len} bytes after the {n}-byte header); the header is corrupt or the file truncated"
                ),
            ));
        }
        let want = want as usize; // <= data_len
        if e - b != want {
            return Err(tensor_err(
                path,
                name,
                format!(
                    "data_offsets [{b}, {e}] hold {} bytes, but dtype {dtype} × shape {shape:?} needs {want} bytes",
                    e - b
                ),
            ));
        }
        if e > data_len {
            return Err(tensor_err(
                path,
                name,
                format!(
                    "data_offsets [{b}, {e}] go beyond the data section, which has only {data_len} bytes after the {n}-byte header; the file is truncated"
                ),
            ));
        }
        out.insert(
            name.clone(),
            TensorMeta {
                name: name.clone(),
                dtype,
                shape,
                file: path.to_path_buf(),
                shard,
                offset: data_start + b,
                len: want,
            },
        );
    }

    // The ranges must tile the data section exactly.
    let mut spans: Vec<(usize, usize, &str)> = out
        .values()
        .map(|t| {
            (
                t.offset - data_start,
                t.offset - data_start + t.len,
                t.name.as_str(),
            )
        })
        .collect();
    spans.sort();
    let mut end = 0usize;
    let mut prev: Option<&str> = None;
    for &(b, e, name) in &spans {
        if b < end {
            return Err(tensor_err(
                path,
                name,
                format!(
                    "data_offsets [{b}, {e}] overlap tensor `{}` (which ends at {end})",
                    prev.unwrap_or("?")
                ),
            ));
        }
        if b > end {
            return Err(tensor_err(
                path,
                name,
                format!("data_offsets [{b}, {e}] leave a gap of {} unindexed bytes before it (safetensors forbids holes)", b - end),
            ));
        }
        end = e;
        prev = Some(name);
    }
    if end < data_len {
        return Err(fmt_err(
            path,
            format!(
                "{} bytes after the last tensor are not covered by the header (data section {data_len} bytes, tensors end at {end})",
                data_len - end
            ),
        ));
    }
    Ok(out)
}
