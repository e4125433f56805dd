//! GGUF v2/v3 reader.
//!
//! Layout (all little-endian): magic `GGUF`, `u32` version, `u64` tensor
//! count, `u64` metadata count, the metadata key/value pairs (`string` key,
//! `u32` value type, value), the tensor infos (`string` name, `u32` n_dims,
//! `u64` dims innermost first, `u32` ggml type, `u64` offset into the data
//! section), padding to `general.alignment` (default 32), the data section.
//! A `string` is a `u64` byte length then UTF-8 bytes; an array is a `u32`
//! element type, a `u64` count, then the elements.
//!
//! The file is memory-mapped. Every read is bounds-checked: a count or
//! length is compared with the bytes left in the file before anything is
//! allocated, so a hostile file gives an [`Error::Format`] or
//! [`Error::Tensor`] naming the file, the key or tensor and what was
//! expected, never a panic and never an allocation out of proportion to the
//! file's size.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::dequant::{self, GgmlType};
use crate::error::{Error, Result};

pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's `GGML_MAX_DIMS`.
pub const MAX_DIMS: u32 = 4;
/// Deepest nesting of arrays inside arrays accepted in metadata (real files
/// use at most 2; the limit keeps recursion bounded on hostile input).
pub const MAX_ARRAY_NESTING: usize = 8;

/// A metadata value type, by its GGUF id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl ValueType {
    pub fn from_id(id: u32) -> Option<Self> {
        use ValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }
    pub fn id(self) -> u32 {
        use ValueType::*;
        match self {
            U8 => 0,
            I8 => 1,
            U16 => 2,
            I16 => 3,
            U32 => 4,
            I32 => 5,
            F32 => 6,
            Bool => 7,
            String => 8,
            Array => 9,
            U64 => 10,
            I64 => 11,
            F64 => 12,
        }
    }
    /// The fewest bytes one value of this type takes in a file.
    fn min_size(self) -> u64 {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 12,
        }
    }
    pub fn name(self) -> &'static str {
        use ValueType::*;
        match self {
            U8 => "u8",
            I8 => "i8",
            U16 => "u16",
            I16 => "i16",
            U32 => "u32",
            I32 => "i32",
            F32 => "f32",
            Bool => "bool",
            String => "string",
            Array => "array",
            U64 => "u64",
            I64 => "i64",
            F64 => "f64",
        }
    }
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Array),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// A metadata array, stored by element type (so a long array of small
/// values costs what it costs in the file, not a `Value` per element).
#[derive(Clone, Debug, PartialEq)]
pub enum Array {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<Array>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

impl Array {
    pub fn elem_type(&self) -> ValueType {
        match self {
            Array::U8(_) => ValueType::U8,
            Array::I8(_) => ValueType::I8,
            Array::U16(_) => ValueType::U16,
            Array::I16(_) => ValueType::I16,
            Array::U32(_) => ValueType::U32,
            Array::I32(_) => ValueType::I32,
            Array::F32(_) => ValueType::F32,
            Array::Bool(_) => ValueType::Bool,
            Array::String(_) => ValueType::String,
            Array::Array(_) => ValueType::Array,
            Array::U64(_) => ValueType::U64,
            Array::I64(_) => ValueType::I64,
            Array::F64(_) => ValueType::F64,
        }
    }
    pub fn len(&self) -> usize {
        match self {
            Array::U8(v) => v.len(),
            Array::I8(v) => v.len(),
            Array::U16(v) => v.len(),
            Array::I16(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::I32(v) => v.len(),
            Array::F32(v) => v.len(),
            Array::Bool(v) => v.len(),
            Array::String(v) => v.len(),
            Array::Array(v) => v.len(),
            Array::U64(v) => v.len(),
            Array::I64(v) => v.len(),
            Array::F64(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The elements as i64 when they are integers (any width).
    fn to_i64s(&self) -> Option<Vec<i64>> {
        Some(match self {
            Array::U8(v) => v.iter().map(|&x| x as i64).collect(),
            Array::I8(v) => v.iter().map(|&x| x as i64).collect(),
            Array::U16(v) => v.iter().map(|&x| x as i64).collect(),
            Array::I16(v) => v.iter().map(|&x| x as i64).collect(),
            Array::U32(v) => v.iter().map(|&x| x as i64).collect(),
            Array::I32(v) => v.iter().map(|&x| x as i64).collect(),
            Array::I64(v) => v.clone(),
            Array::U64(v) => v
                .iter()
                .map(|&x| i64::try_from(x).ok())
                .collect::<Option<_>>()?,
            _ => return None,
        })
    }
}

impl Value {
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array(_) => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }
    /// A short description for error messages (`u32 7`, `string "llama"`,
    /// `array of 49152 string`).
    pub fn describe(&self) -> String {
        match self {
            Value::String(s) => {
                let short: String = s.chars().take(40).collect();
                let ell = if short.len() < s.len() { "..." } else { "" };
                format!("string {short:?}{ell}")
            }
            Value::Array(a) => format!("array of {} {}", a.len(), a.elem_type().name()),
            Value::U8(x) => format!("u8 {x}"),
            Value::I8(x) => format!("i8 {x}"),
            Value::U16(x) => format!("u16 {x}"),
            Value::I16(x) => format!("i16 {x}"),
            Value::U32(x) => format!("u32 {x}"),
            Value::I32(x) => format!("i32 {x}"),
            Value::U64(x) => format!("u64 {x}"),
            Value::I64(x) => format!("i64 {x}"),
            Value::F32(x) => format!("f32 {x}"),
            Value::F64(x) => format!("f64 {x}"),
            Value::Bool(x) => format!("bool {x}"),
        }
    }
    /// The value as an integer, when it is one (any width).
    pub fn as_i128(&self) -> Option<i128> {
        Some(match *self {
            Value::U8(x) => x as i128,
            Value::I8(x) => x as i128,
            Value::U16(x) => x as i128,
            Value::I16(x) => x as i128,
            Value::U32(x) => x as i128,
            Value::I32(x) => x as i128,
            Value::U64(x) => x as i128,
            Value::I64(x) => x as i128,
            _ => return None,
        })
    }
}

/// One tensor's description.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml's `ne`: dimensions innermost (contiguous) first. A matrix with
    /// dims `[in, out]` is the row-major `[out, in]` matrix of PyTorch.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
    pub n_elements: u64,
    pub n_bytes: u64,
}

impl TensorInfo {
    /// The shape in PyTorch / safetensors order (outermost first): `dims`
    /// reversed. No data moves: ggml and PyTorch both store row-major, they
    /// only list the dimensions in opposite orders.
    pub fn shape(&self) -> Vec<u64> {
        self.dims.iter().rev().copied().collect()
    }
    /// Elements in one row (`ne[0]`); 1 for a tensor with no dimensions.
    pub fn row_len(&self) -> u64 {
        self.dims.first().copied().unwrap_or(1)
    }
    /// Number of rows (`n_elements / ne[0]`).
    pub fn n_rows(&self) -> u64 {
        self.dims.iter().skip(1).product()
    }
}

/// Most items reserved ahead from a count read in the file: counts are
/// already bounded by the bytes left, and this keeps a hostile count from
/// reserving a multiple of the file size before its items are read.
const PREALLOC_CAP: usize = 1 << 16;

/// Magic, version, tensor count, metadata count.
const HEADER_LEN: u64 = 24;

fn too_short(path: PathBuf, len: u64) -> Error {
    Error::Format {
        path,
        msg: format!(
            "file is {len} bytes, too short for a GGUF header ({HEADER_LEN} bytes: magic, version, tensor and metadata counts)"
        ),
    }
}

enum Backing {
    #[cfg(not(target_arch = "wasm32"))]
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            #[cfg(not(target_arch = "wasm32"))]
            Backing::Mmap(m) => m,
            Backing::Owned(v) => v,
        }
    }
}

/// An opened, validated GGUF file.
pub struct GgufFile {
    path: PathBuf,
    backing: Backing,
    pub version: u32,
    pub alignment: u64,
    /// Absolute file offset of the data section.
    pub data_offset: u64,
    metadata: Vec<(String, Value)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("n_metadata", &self.metadata.len())
            .field("n_tensors", &self.tensors.len())
            .finish()
    }
}

/// Bounds-checked little-endian reads over the file's bytes. Errors are
/// plain messages; the caller adds which key or tensor was being read.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }
    fn take(&mut self, n: u64) -> std::result::Result<&'a [u8], String> {
        if n > self.remaining() {
            return Err(format!(
                "needs {n} bytes at offset {}, but the file ends at {} (truncated file?)",
                self.pos,
                self.buf.len()
            ));
        }
        let n = n as usize; // <= remaining, so fits
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self) -> std::result::Result<[u8; N], String> {
        let s = self.take(N as u64)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u32(&mut self) -> std::result::Result<u32, String> {
        self.arr().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> std::result::Result<u64, String> {
        self.arr().map(u64::from_le_bytes)
    }
    /// A count of items of at least `min_size` bytes each: rejected when the
    /// rest of the file cannot hold that many, before anything is allocated.
    fn count(&mut self, min_size: u64, what: &str) -> std::result::Result<usize, String> {
        let at = self.pos;
        let n = self.u64()?;
        let fits = n
            .checked_mul(min_size)
            .is_some_and(|b| b <= self.remaining());
        if !fits {
            return Err(format!(
                "{what} count {n} (at offset {at}) cannot fit in the {} bytes left in the file",
                self.remaining()
            ));
        }
        Ok(n as usize) // n * min_size <= remaining, so n fits in usize
    }
    fn string(&mut self) -> std::result::Result<String, String> {
        let at = self.pos;
        let len = self.u64()?;
        if len > self.remaining() {
            return Err(format!(
                "string length {len} (at offset {at}) runs past the end of the file ({} bytes left)",
                self.remaining()
            ));
        }
        let bytes = self.take(len)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(e) => Err(format!("string at offset {at} is not valid UTF-8 ({e})")),
        }
    }
    fn value(&mut self, ty: ValueType, depth: usize) -> std::result::Result<Value, String> {
        Ok(match ty {
            ValueType::U8 => Value::U8(self.arr::<1>()?[0]),
            ValueType::I8 => Value::I8(self.arr::<1>()?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.arr()?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.arr()?)),
            ValueType::U32 => Value::U32(self.u32()?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.arr()?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.arr()?)),
            ValueType::U64 => Value::U64(self.u64()?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.arr()?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.arr()?)),
            ValueType::Bool => Value::Bool(self.bool()?),
            ValueType::String => Value::String(self.string()?),
            ValueType::Array => Value::Array(self.array(depth + 1)?),
        })
    }
    fn bool(&mut self) -> std::result::Result<bool, String> {
        let at = self.pos;
        match self.arr::<1>()?[0] {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(format!("bool at offset {at} is {b}, expected 0 or 1")),
        }
    }
    fn value_type(&mut self) -> std::result::Result<ValueType, String> {
        let at = self.pos;
        let id = self.u32()?;
        ValueType::from_id(id)
            .ok_or_else(|| format!("unknown value type {id} at offset {at} (GGUF defines 0..=12)"))
    }
    fn array(&mut self, depth: usize) -> std::result::Result<Array, String> {
        if depth > MAX_ARRAY_NESTING {
            return Err(format!("arrays nested more than {MAX_ARRAY_NESTING} deep"));
        }
        let ty = self.value_type()?;
        let n = self.count(ty.min_size(), &format!("array of {}", ty.name()))?;
        fn many<T>(
            n: usize,
            mut f: impl FnMut() -> std::result::Result<T, String>,
        ) -> std::result::Result<Vec<T>, String> {
            let mut v = Vec::with_capacity(n.min(PREALLOC_CAP));
            for i in 0..n {
                v.push(f().map_err(|e| format!("element {i} of {n}: {e}"))?);
            }
            Ok(v)
        }
        Ok(match ty {
            ValueType::U8 => Array::U8(self.take(n as u64)?.to_vec()),
            ValueType::I8 => Array::I8(self.take(n as u64)?.iter().map(|&b| b as i8).collect()),
            ValueType::U16 => Array::U16(many(n, || self.arr().map(u16::from_le_bytes))?),
            ValueType::I16 => Array::I16(many(n, || self.arr().map(i16::from_le_bytes))?),
            ValueType::U32 => Array::U32(many(n, || self.u32())?),
            ValueType::I32 => Array::I32(many(n, || self.arr().map(i32::from_le_bytes))?),
            ValueType::F32 => Array::F32(many(n, || self.arr().map(f32::from_le_bytes))?),
            ValueType::U64 => Array::U64(many(n, || self.u64())?),
            ValueType::I64 => Array::I64(many(n, || self.arr().map(i64::from_le_bytes))?),
            ValueType::F64 => Array::F64(many(n, || self.arr().map(f64::from_le_bytes))?),
            ValueType::Bool => Array::Bool(many(n, || self.bool())?),
            ValueType::String => Array::String(many(n, || self.string())?),
            ValueType::Array => Array::Array(many(n, || self.array(depth + 1))?),
        })
    }
}

impl GgufFile {
    /// Open and validate a GGUF file (memory-mapped).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::File::open(&path).map_err(|e| Error::Io {
            msg: format!("cannot open GGUF file: {e}"),
            path: path.clone(),
            source: Some(e),
        })?;
        let len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        if len < HEADER_LEN {
            return Err(too_short(path, len));
        }
        #[cfg(not(target_arch = "wasm32"))]
        // SAFETY: the map is read-only and private to this struct. As with
        // every memory-mapped model loader, the file must not be truncated
        // or rewritten while it is open.
        let backing =
            Backing::Mmap(unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::Io {
                msg: format!("cannot memory-map GGUF file: {e}"),
                path: path.clone(),
                source: Some(e),
            })?);
        #[cfg(target_arch = "wasm32")]
        let backing = {
            use std::io::Read;
            let mut v = Vec::new();
            let mut file = file;
            file.read_to_end(&mut v).map_err(|e| Error::io(&path, e))?;
            Backing::Owned(v)
        };
        Self::parse(path, backing)
    }

    /// Parse a GGUF image held in memory; `path` only labels errors. (Used
    /// by tests and fuzzing; the same checks as [`GgufFile::open`].)
    pub fn from_bytes(path: impl AsRef<Path>, bytes: Vec<u8>) -> Result<Self> {
        Self::parse(path.as_ref().to_path_buf(), Backing::Owned(bytes))
    }

    fn parse(path: PathBuf, backing: Backing) -> Result<Self> {
        let buf = backing.bytes();
        let ferr = |msg: String| Error::Format {
            path: path.clone(),
            msg,
        };
        if (buf.len() as u64) < HEADER_LEN {
            return Err(too_short(path, buf.len() as u64));
        }
        let mut c = Cursor { buf, pos: 0 };

        let magic: [u8; 4] = c.arr().map_err(|m| ferr(format!("GGUF magic: {m}")))?;
        if magic != GGUF_MAGIC {
            return Err(ferr(format!(
                "not a GGUF file: magic bytes are {magic:02x?}, expected \"GGUF\" (47 47 55 46)"
            )));
        }
        let version = c.u32().map_err(|m| ferr(format!("GGUF version: {m}")))?;
        match version {
            2 | 3 => {}
            1 => {
                return Err(ferr(
                    "GGUF version 1 is not supported (only versions 2 and 3); re-convert the model with a current llama.cpp".into(),
                ))
            }
            v if (1..=3).contains(&v.swap_bytes()) => {
                return Err(ferr(format!(
                    "this is a big-endian GGUF (version field reads {v:#x}); only little-endian GGUF is supported"
                )))
            }
            v => {
                return Err(ferr(format!(
                    "unsupported GGUF version {v} (supported: 2 and 3)"
                )))
            }
        }
        // Smallest tensor info: empty name (8) + n_dims (4) + type (4) + offset (8).
        let n_tensors = c
            .count(24, "tensor")
            .map_err(|m| ferr(format!("GGUF header: {m}")))?;
        // Smallest key/value: empty key (8) + type (4) + one byte of value.
        let n_kv = c
            .count(13, "metadata key/value")
            .map_err(|m| ferr(format!("GGUF header: {m}")))?;

        let mut metadata = Vec::with_capacity(n_kv.min(PREALLOC_CAP));
        let mut meta_index = HashMap::with_capacity(n_kv.min(PREALLOC_CAP));
        for i in 0..n_kv {
            let key = c
                .string()
                .map_err(|m| ferr(format!("metadata entry {i} of {n_kv}: key: {m}")))?;
            let ty = c
                .value_type()
                .map_err(|m| ferr(format!("metadata key `{key}`: {m}")))?;
            let value = c
                .value(ty, 0)
                .map_err(|m| ferr(format!("metadata key `{key}` ({}): {m}", ty.name())))?;
            if meta_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(ferr(format!("metadata key `{key}` appears twice")));
            }
            metadata.push((key, value));
        }

        let alignment = match metadata
            .get(
                meta_index
                    .get("general.alignment")
                    .copied()
                    .unwrap_or(usize::MAX),
            )
            .map(|kv| &kv.1)
        {
            None => DEFAULT_ALIGNMENT,
            Some(Value::U32(a)) if *a != 0 && a.is_power_of_two() => *a as u64,
            Some(v) => {
                return Err(ferr(format!(
                    "metadata key `general.alignment`: expected a u32 power of two, got {}",
                    v.describe()
                )))
            }
        };

        let mut tensors: Vec<TensorInfo> = Vec::with_capacity(n_tensors.min(PREALLOC_CAP));
        let mut tensor_index = HashMap::with_capacity(n_tensors.min(PREALLOC_CAP));
        for i in 0..n_tensors {
            let name = c
                .string()
                .map_err(|m| ferr(format!("tensor info {i} of {n_tensors}: name: {m}")))?;
            let terr = |msg: String| Error::Tensor {
                path: path.clone(),
                tensor: name.clone(),
                msg,
            };
            let n_dims = c.u32().map_err(|m| terr(format!("n_dims: {m}")))?;
            if n_dims > MAX_DIMS {
                return Err(terr(format!(
                    "has {n_dims} dimensions, at most {MAX_DIMS} are allowed"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for d in 0..n_dims {
                dims.push(c.u64().map_err(|m| terr(format!("dimension {d}: {m}")))?);
            }
            let n_elements = dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .filter(|&n| n <= i64::MAX as u64)
                .ok_or_else(|| terr(format!("dimensions {dims:?} overflow the element count")))?;
            if dims
                .iter()
                .skip(1)
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .is_none()
            {
                return Err(terr(format!("dimensions {dims:?} overflow the row count")));
            }
            let type_id = c.u32().map_err(|m| terr(format!("type: {m}")))?;
            let ty = GgmlType::from_id(type_id).ok_or_else(|| {
                terr(format!(
                    "unknown ggml type id {type_id} (known: 0-3, 6-30, 34, 35, 39-41)"
                ))
            })?;
            let offset = c.u64().map_err(|m| terr(format!("data offset: {m}")))?;
            let row = dims.first().copied().unwrap_or(1);
            if row % ty.block_size() as u64 != 0 {
                return Err(terr(format!(
                    "type {ty} needs rows (dimension 0) in multiples of {} elements, got {row}",
                    ty.block_size()
                )));
            }
            let n_bytes = ty
                .bytes_for(n_elements)
                .ok_or_else(|| terr(format!("{n_elements} elements of {ty}: size overflows")))?;
            if offset % alignment != 0 {
                return Err(terr(format!(
                    "data offset {offset} is not a multiple of the alignment {alignment}"
                )));
            }
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                return Err(terr("tensor name appears twice".into()));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
                n_elements,
                n_bytes,
            });
        }

        let file_len = buf.len() as u64;
        let data_offset = (c.pos as u64).next_multiple_of(alignment);
        for t in &tensors {
            let end = data_offset
                .checked_add(t.offset)
                .and_then(|s| s.checked_add(t.n_bytes));
            if end.is_none_or(|e| e > file_len) {
                return Err(Error::Tensor {
                    path: path.clone(),
                    tensor: t.name.clone(),
                    msg: format!(
                        "data ({} bytes of {} at offset {} in the data section, which starts at {data_offset}) runs past the end of the file ({file_len} bytes; truncated file?)",
                        t.n_bytes, t.ty, t.offset
                    ),
                });
            }
        }

        // No two tensors may share bytes: ggml writes them one after the
        // other (each padded to the alignment), so an overlap is a forged or
        // corrupt table. Empty tensors occupy nothing and are skipped.
        let mut spans: Vec<(u64, u64, usize)> = tensors
            .iter()
            .enumerate()
            .filter(|(_, t)| t.n_bytes > 0)
            .map(|(i, t)| (t.offset, t.offset + t.n_bytes, i))
            .collect();
        spans.sort_unstable();
        for w in spans.windows(2) {
            let ((_, end, a), (start, _, b)) = (w[0], w[1]);
            if start < end {
                let (ta, tb) = (&tensors[a], &tensors[b]);
                return Err(Error::Tensor {
                    path: path.clone(),
                    tensor: tb.name.clone(),
                    msg: format!(
                        "data at offset {start} overlaps tensor `{}` (offset {}, {} bytes, so it ends at {end}); tensors must not share bytes",
                        ta.name, ta.offset, ta.n_bytes
                    ),
                });
            }
        }

        Ok(GgufFile {
            path,
            backing,
            version,
            alignment,
            data_offset,
            metadata,
            meta_index,
            tensors,
            tensor_index,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Metadata in file order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }
    /// Tensor infos in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }
    /// `tensor(name)` or an error naming it.
    pub fn require_tensor(&self, name: &str) -> Result<&TensorInfo> {
        self.tensor(name).ok_or_else(|| Error::Tensor {
            path: self.path.clone(),
            tensor: name.into(),
            msg: "not in the GGUF file".into(),
        })
    }

    fn key_err(&self, key: &str, msg: String) -> Error {
        Error::Format {
            path: self.path.clone(),
            msg: format!("metadata key `{key}`: {msg}"),
        }
    }
    fn wrong_type(&self, key: &str, want: &str, v: &Value) -> Error {
        self.key_err(key, format!("expected {want}, got {}", v.describe()))
    }
    fn missing(&self, key: &str, want: &str) -> Error {
        self.key_err(key, format!("missing (expected {want})"))
    }

    fn opt_int<T: TryFrom<i128>>(&self, key: &str, want: &str) -> Result<Option<T>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_i128()
                .and_then(|x| T::try_from(x).ok())
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, want, v)),
        }
    }
    /// An integer key that fits in a u32 (stored as any integer type).
    pub fn opt_u32(&self, key: &str) -> Result<Option<u32>> {
        self.opt_int(key, "an integer in u32 range")
    }
    pub fn get_u32(&self, key: &str) -> Result<u32> {
        self.opt_u32(key)?
            .ok_or_else(|| self.missing(key, "an integer in u32 range"))
    }
    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        self.opt_int(key, "an integer in u64 range")
    }
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        self.opt_u64(key)?
            .ok_or_else(|| self.missing(key, "an integer in u64 range"))
    }
    pub fn opt_i64(&self, key: &str) -> Result<Option<i64>> {
        self.opt_int(key, "an integer in i64 range")
    }
    pub fn get_i64(&self, key: &str) -> Result<i64> {
        self.opt_i64(key)?
            .ok_or_else(|| self.missing(key, "an integer in i64 range"))
    }
    /// A float key (f32, or f64 read as f64).
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(*x as f64)),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(v) => Err(self.wrong_type(key, "f32 or f64", v)),
        }
    }
    pub fn get_f64(&self, key: &str) -> Result<f64> {
        self.opt_f64(key)?
            .ok_or_else(|| self.missing(key, "f32 or f64"))
    }
    /// An f32 key (an f64 value is rounded to f32).
    pub fn opt_f32(&self, key: &str) -> Result<Option<f32>> {
        Ok(self.opt_f64(key)?.map(|x| x as f32))
    }
    pub fn get_f32(&self, key: &str) -> Result<f32> {
        self.opt_f32(key)?.ok_or_else(|| self.missing(key, "f32"))
    }
    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.wrong_type(key, "bool", v)),
        }
    }
    pub fn get_bool(&self, key: &str) -> Result<bool> {
        self.opt_bool(key)?.ok_or_else(|| self.missing(key, "bool"))
    }
    pub fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.wrong_type(key, "string", v)),
        }
    }
    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.opt_str(key)?
            .ok_or_else(|| self.missing(key, "string"))
    }
    pub fn opt_array(&self, key: &str) -> Result<Option<&Array>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(self.wrong_type(key, "array", v)),
        }
    }
    pub fn opt_str_array(&self, key: &str) -> Result<Option<&[String]>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(Array::String(v))) => Ok(Some(v)),
            Some(v) => Err(self.wrong_type(key, "array of string", v)),
        }
    }
    pub fn get_str_array(&self, key: &str) -> Result<&[String]> {
        self.opt_str_array(key)?
            .ok_or_else(|| self.missing(key, "array of string"))
    }
    /// An integer array whose elements fit in i32 (stored with any integer
    /// element type).
    pub fn opt_i32_array(&self, key: &str) -> Result<Option<Vec<i32>>> {
        match self.get(key) {
            None => Ok(None),
            Some(v @ Value::Array(a)) => a
                .to_i64s()
                .and_then(|xs| xs.into_iter().map(|x| i32::try_from(x).ok()).collect())
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, "array of integers in i32 range", v)),
            Some(v) => Err(self.wrong_type(key, "array of integers", v)),
        }
    }
    pub fn get_i32_array(&self, key: &str) -> Result<Vec<i32>> {
        self.opt_i32_array(key)?
            .ok_or_else(|| self.missing(key, "array of integers"))
    }
    pub fn opt_f32_array(&self, key: &str) -> Result<Option<&[f32]>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(Array::F32(v))) => Ok(Some(v)),
            Some(v) => Err(self.wrong_type(key, "array of f32", v)),
        }
    }

    /// The raw bytes of a tensor (bounds were checked at open).
    pub fn tensor_bytes(&self, t: &TensorInfo) -> &[u8] {
        let start = (self.data_offset + t.offset) as usize;
        &self.backing.bytes()[start..start + t.n_bytes as usize]
    }

    fn tensor_err(&self, t: &TensorInfo, msg: String) -> Error {
        Error::Tensor {
            path: self.path.clone(),
            tensor: t.name.clone(),
            msg,
        }
    }

    /// Dequantize rows `row_start .. row_start + out.len() / row_len` of `t`
    /// (a row is `dims[0]` elements, always whole blocks) into `out`.
    pub fn dequantize_rows(&self, t: &TensorInfo, row_start: u64, out: &mut [f32]) -> Result<()> {
        let row_len = t.row_len();
        if row_len == 0 || out.len() as u64 % row_len != 0 {
            return Err(self.tensor_err(
                t,
                format!(
                    "output of {} elements is not whole rows of {row_len}",
                    out.len()
                ),
            ));
        }
        let n_rows = out.len() as u64 / row_len;
        if row_start.checked_add(n_rows).is_none_or(|e| e > t.n_rows()) {
            return Err(self.tensor_err(
                t,
                format!(
                    "rows {row_start}..{} requested, the tensor has {}",
                    row_start.saturating_add(n_rows),
                    t.n_rows()
                ),
            ));
        }
        let row_bytes = row_len / t.ty.block_size() as u64 * t.ty.type_size() as u64;
        let bytes = self.tensor_bytes(t);
        let start = (row_start * row_bytes) as usize;
        let src = &bytes[start..start + (n_rows * row_bytes) as usize];
        dequant::dequantize(t.ty, src, out).map_err(|m| self.tensor_err(t, m))
    }

    /// The whole tensor as f32, in file (row-major) order.
    pub fn dequantize(&self, t: &TensorInfo) -> Result<Vec<f32>> {
        if !t.ty.can_dequantize() {
            return Err(self.tensor_err(t, format!("ggml type {} cannot be dequantized", t.ty)));
        }
        let n = usize::try_from(t.n_elements)
            .map_err(|_| self.tensor_err(t, "too many elements for this machine".into()))?;
        let mut out = vec![0f32; n];
        if n > 0 {
            self.dequantize_rows(t, 0, &mut out)?;
        }
        Ok(out)
    }

    /// `dequantize(require_tensor(name))`.
    pub fn dequantize_by_name(&self, name: &str) -> Result<Vec<f32>> {
        let t = self.require_tensor(name)?;
        self.dequantize(t)
    }
}
