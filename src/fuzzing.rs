//! Byte-slice entry points for the parsers that read untrusted files, shared
//! by the cargo-fuzz targets in `fuzz/` and by `tests/fuzz_corpus.rs`, which
//! replays the committed corpus on stable. Each function runs one parser on
//! arbitrary bytes and, when the input is accepted, exercises what the rest
//! of the library does next with the result (tensor slices, the non-finite
//! scan, dequantization, planning). An error is a correct outcome; a panic,
//! an out-of-bounds read, a hang or an allocation out of proportion to the
//! input is a bug.

use std::path::Path;

use crate::config::ModelConfig;
use crate::gguf::{self, ConvertDType, GgufFile};
use crate::loader::{self, check_finite};
use crate::tokenizer::{build_tokenizer, Tokenizer, VocabSpec};

/// Largest tensor the GGUF target dequantizes (elements), so one input
/// cannot make the fuzzer spend seconds on a legitimately large tensor.
const MAX_DEQUANT: u64 = 1 << 16;
/// Largest vocabulary the GGUF target builds a tokenizer from.
const MAX_VOCAB: usize = 1 << 12;

/// The safetensors header and tensor table of a whole file image
/// ([`loader::parse_safetensors_bytes`]), then every accepted tensor's bytes
/// through the non-finite scan; and the same bytes as a sharded index
/// ([`loader::parse_index_bytes`]).
pub fn safetensors(data: &[u8]) {
    if let Ok(tensors) = loader::parse_safetensors_bytes(Path::new("fuzz.safetensors"), data) {
        for t in &tensors {
            let bytes = &data[t.offset..t.offset + t.len];
            if loader::supported_dtype(t.dtype) {
                let _ = check_finite(t, bytes);
            }
        }
    }
    let _ = loader::parse_index_bytes(Path::new("fuzz.index.json"), data);
}

/// The GGUF reader ([`GgufFile::from_bytes`]: header, metadata, arrays,
/// tensor infos, alignment), then dequantization of every small tensor, the
/// conversion planner, the config and generation-config builders and the
/// tokenizer built from the file's vocabulary.
pub fn gguf(data: &[u8]) {
    let Ok(f) = GgufFile::from_bytes("fuzz.gguf", data.to_vec()) else {
        return;
    };
    for t in f.tensors() {
        let _ = f.tensor_bytes(t).len();
        if t.ty.can_dequantize() && t.n_elements <= MAX_DEQUANT {
            let _ = f.dequantize(t);
        }
    }
    let _ = gguf::convert::plan_tensors(&f);
    let _ = gguf::hf_config(&f, ConvertDType::Bf16);
    let _ = gguf::convert::hf_generation_config(&f);
    if let Ok(Some(spec)) = VocabSpec::from_gguf(&f) {
        if spec.tokens.len() <= MAX_VOCAB && spec.merges.len() <= MAX_VOCAB {
            let _ = build_tokenizer(&spec);
        }
    }
}

/// `config.json` parsing and validation ([`ModelConfig::from_json_str`]; a
/// file that is not UTF-8 is refused by `from_file`'s read before this),
/// then the tensor list and layer program a valid config implies.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = ModelConfig::from_json_str(text, "fuzz/config.json") {
        let _ = loader::expected_tensors(&cfg);
        let _ = crate::program::Program::new(&cfg);
    }
}

/// `tokenizer.json` loading ([`Tokenizer::from_json_bytes`]).
pub fn tokenizer(data: &[u8]) {
    let _ = Tokenizer::from_json_bytes(Path::new("fuzz/tokenizer.json"), data);
}
