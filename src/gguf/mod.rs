//! GGUF import: read GGUF v2/v3 files ([`reader`]), dequantize their
//! tensors bit-exactly as ggml does ([`dequant`]), and convert them to
//! Hugging Face checkpoints ([`convert()`]: `config.json`,
//! `model.safetensors` with HF names and `[out, in]` layout,
//! `generation_config.json`, and the tokenizer files through a callback).
//!
//! This module is a leaf: it knows nothing of the cache, the catalogue of
//! known models (both in [`crate::fetch`]) or tokenizers (the tokenizer
//! reads its own metadata from a [`GgufFile`], see
//! `tokenizer::VocabSpec::from_gguf`; `convert` hands the open file to a
//! writer callback).

pub mod convert;
pub mod dequant;
pub mod native;
pub mod reader;
pub mod sha256;

pub use convert::{
    convert, convert_file, hf_config, hf_tensor_name, is_gguf_file, permute_rows, unpermute_rows,
    ConvertDType, ConvertSummary, TokenizerWriter,
};
pub use dequant::GgmlType;
pub use native::native_blocks;
pub use reader::{Array, GgufFile, TensorInfo, Value, ValueType};
pub use sha256::{sha256_file, sha256_hex};
