//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) and every
//! crash regression (`fuzz/regressions/<target>/`) through the entry points
//! the cargo-fuzz targets call ([`wgllm::fuzzing`]), as ordinary stable
//! tests: any input that once panicked must now return an error. The seeds
//! come from `write_seed_corpus` below (run it with `--ignored` to
//! regenerate them); the valid ones must still parse, so a parser that
//! started refusing everything would fail here too.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use safetensors::Dtype;
use wgllm::config::ModelConfig;
use wgllm::gguf::GgufFile;
use wgllm::loader::{parse_index_bytes, parse_safetensors_bytes};
use wgllm::tokenizer::{token_type, Tokenizer, VocabSpec};

const TARGETS: [&str; 4] = ["safetensors", "gguf", "config", "tokenizer"];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file() && !p.file_name().unwrap().to_string_lossy().starts_with('.'))
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

fn run(target: &str, data: &[u8]) {
    match target {
        "safetensors" => wgllm::fuzzing::safetensors(data),
        "gguf" => wgllm::fuzzing::gguf(data),
        "config" => wgllm::fuzzing::config(data),
        "tokenizer" => wgllm::fuzzing::tokenizer(data),
        _ => unreachable!(),
    }
}

/// The parser's verdict on one input (an error as its message).
fn parse(target: &str, name: &str, data: &[u8]) -> Result<(), String> {
    match target {
        "safetensors" if name.ends_with(".json") => parse_index_bytes(Path::new(name), data)
            .map(drop)
            .map_err(|e| e.to_string()),
        "safetensors" => parse_safetensors_bytes(Path::new(name), data)
            .map(drop)
            .map_err(|e| e.to_string()),
        "gguf" => GgufFile::from_bytes(name, data.to_vec())
            .map(drop)
            .map_err(|e| e.to_string()),
        "config" => {
            ModelConfig::from_json_str(std::str::from_utf8(data).map_err(|e| e.to_string())?, name)
                .map(drop)
                .map_err(|e| e.to_string())
        }
        "tokenizer" => Tokenizer::from_json_bytes(Path::new(name), data)
            .map(drop)
            .map_err(|e| e.to_string()),
        _ => unreachable!(),
    }
}

/// Seeds named `valid-*` must be accepted by their parser.
fn check_valid(target: &str, name: &str, data: &[u8]) {
    if let Err(e) = parse(target, name, data) {
        panic!("valid seed {target}/{name} was refused: {e}");
    }
}

#[test]
fn committed_corpus_and_crash_regressions_replay() {
    for t in TARGETS {
        let corpus = files(&fuzz_dir().join("corpus").join(t));
        assert!(
            corpus.iter().any(|p| p
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("valid-")),
            "fuzz/corpus/{t} has no valid-* seed (regenerate with `cargo test --release --test fuzz_corpus -- --ignored write_seed_corpus`)"
        );
        let regressions = files(&fuzz_dir().join("regressions").join(t));
        // Every crash found so far was a malformed file: it must now be
        // refused with an error (and not panic, which `run` checks).
        for p in &regressions {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let data = std::fs::read(p).unwrap();
            let e = parse(t, &name, &data)
                .err()
                .unwrap_or_else(|| panic!("crash regression {t}/{name} is now accepted"));
            println!("{t}/{name}: {e}");
        }
        for p in corpus.iter().chain(&regressions) {
            let data = std::fs::read(p).unwrap();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            run(t, &data);
            if name.starts_with("valid-") {
                check_valid(t, &name, &data);
            }
        }
        println!(
            "{t}: {} corpus inputs, {} crash regressions replayed",
            corpus.len(),
            regressions.len()
        );
    }
}

// ---------------------------------------------------------------------------
// Seed corpus: small valid files the project makes itself.

/// A minimal little-endian GGUF v3 writer (the format as documented in
/// `wgllm::gguf::reader`).
#[derive(Default)]
struct Gguf {
    kv: Vec<u8>,
    n_kv: u64,
    infos: Vec<u8>,
    data: Vec<u8>,
    n_tensors: u64,
}

fn gstr(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u64).to_le_bytes().to_vec();
    v.extend(s.as_bytes());
    v
}

impl Gguf {
    fn kv(&mut self, key: &str, ty: u32, value: Vec<u8>) -> &mut Self {
        self.kv.extend(gstr(key));
        self.kv.extend(ty.to_le_bytes());
        self.kv.extend(value);
        self.n_kv += 1;
        self
    }
    fn u32(&mut self, key: &str, v: u32) -> &mut Self {
        self.kv(key, 4, v.to_le_bytes().to_vec())
    }
    fn f32(&mut self, key: &str, v: f32) -> &mut Self {
        self.kv(key, 6, v.to_le_bytes().to_vec())
    }
    fn str(&mut self, key: &str, v: &str) -> &mut Self {
        self.kv(key, 8, gstr(v))
    }
    fn strs(&mut self, key: &str, v: &[String]) -> &mut Self {
        let mut b = 8u32.to_le_bytes().to_vec();
        b.extend((v.len() as u64).to_le_bytes());
        for s in v {
            b.extend(gstr(s));
        }
        self.kv(key, 9, b)
    }
    fn i32s(&mut self, key: &str, v: &[i32]) -> &mut Self {
        let mut b = 5u32.to_le_bytes().to_vec();
        b.extend((v.len() as u64).to_le_bytes());
        for x in v {
            b.extend(x.to_le_bytes());
        }
        self.kv(key, 9, b)
    }
    /// A tensor with `dims` (innermost first) of ggml type `ty`; `bytes` is
    /// its data, padded to the 32-byte alignment.
    fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, bytes: &[u8]) -> &mut Self {
        self.infos.extend(gstr(name));
        self.infos.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            self.infos.extend(d.to_le_bytes());
        }
        self.infos.extend(ty.to_le_bytes());
        self.infos.extend((self.data.len() as u64).to_le_bytes());
        self.data.extend(bytes);
        self.data.resize(self.data.len().next_multiple_of(32), 0);
        self.n_tensors += 1;
        self
    }
    fn build(&self) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(self.n_tensors.to_le_bytes());
        b.extend(self.n_kv.to_le_bytes());
        b.extend(&self.kv);
        b.extend(&self.infos);
        b.resize(b.len().next_multiple_of(32), 0);
        b.extend(&self.data);
        b
    }
}

/// Block bytes of ggml type `ty` for `n` elements: every f16 scale is 1/64
/// (0x2400), the quants a fixed pattern, so values are finite.
fn blocks(ty: u32, n: usize) -> Vec<u8> {
    // (elements per block, bytes per block, offsets of f16 fields)
    let (bs, size, f16s): (usize, usize, &[usize]) = match ty {
        0 => (1, 4, &[]),
        1 | 30 => (1, 2, &[]),
        2 => (32, 18, &[0]),
        3 => (32, 20, &[0, 2]),
        6 => (32, 22, &[0]),
        7 => (32, 24, &[0, 2]),
        8 => (32, 34, &[0]),
        12 => (256, 144, &[0, 2]),
        13 => (256, 176, &[0, 2]),
        14 => (256, 210, &[208]),
        _ => panic!("type {ty}"),
    };
    let mut out = Vec::new();
    for blk in 0..n / bs {
        let mut b: Vec<u8> = (0..size)
            .map(|i| (i * 37 + blk * 11) as u8 & 0x3f)
            .collect();
        match ty {
            0 => b = (0.25f32 * (blk as f32 - 3.0)).to_le_bytes().to_vec(),
            1 => b = half::f16::from_f32(0.5 * blk as f32).to_le_bytes().to_vec(),
            30 => {
                b = half::bf16::from_f32(-0.5 * blk as f32)
                    .to_le_bytes()
                    .to_vec()
            }
            _ => {}
        }
        for &o in f16s {
            b[o..o + 2].copy_from_slice(&0x2400u16.to_le_bytes());
        }
        out.extend(b);
    }
    out
}

/// GPT-2's byte-to-unicode map.
fn byte_symbol(b: u8) -> String {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xa1..=0xac).contains(&b) || b >= 0xae;
    if printable(b) {
        char::from_u32(b as u32).unwrap().to_string()
    } else {
        let n = (0u8..b).filter(|&x| !printable(x)).count() as u32;
        char::from_u32(256 + n).unwrap().to_string()
    }
}

/// A byte-level vocabulary: 256 byte symbols, a few merges, an eos token.
fn tiny_vocab(pre: &str) -> VocabSpec {
    let mut tokens: Vec<String> = (0u8..=255).map(byte_symbol).collect();
    let merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "1 2"];
    for m in merges {
        tokens.push(m.replace(' ', ""));
    }
    tokens.push("<|end|>".into());
    let mut types = vec![token_type::NORMAL; tokens.len()];
    *types.last_mut().unwrap() = token_type::CONTROL;
    VocabSpec {
        model: "gpt2".into(),
        pre: Some(pre.into()),
        eos: Some(tokens.len() as u32 - 1),
        tokens,
        token_types: Some(types),
        merges: merges.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

#[test]
#[ignore = "tool: regenerates the fuzz seed corpus under fuzz/corpus/ (commit the result)"]
fn write_seed_corpus() {
    let root = fuzz_dir().join("corpus");
    let put = |t: &str, name: &str, bytes: &[u8]| {
        let d = root.join(t);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(name), bytes).unwrap();
    };

    // safetensors: a few small tensors of each loadable dtype, and an index.
    let t = |name: &str, shape: &[usize], dtype: Dtype, seed: u64| {
        let n = shape.iter().product();
        T {
            name: name.into(),
            shape: shape.to_vec(),
            dtype,
            bytes: encode(&representable(&values(n, seed), dtype), dtype),
        }
    };
    put(
        "safetensors",
        "valid-three-dtypes.safetensors",
        &safetensors_bytes(&[
            t("model.norm.weight", &[4], Dtype::F32, 1),
            t("model.embed_tokens.weight", &[3, 4], Dtype::BF16, 2),
            t("lm_head.weight", &[2, 4], Dtype::F16, 3),
        ]),
    );
    put(
        "safetensors",
        "valid-scalar-and-empty.safetensors",
        &safetensors_bytes(&[t("s", &[], Dtype::F32, 4), t("e", &[0, 3], Dtype::BF16, 5)]),
    );
    put(
        "safetensors",
        "valid-index.json",
        serde_json::json!({"metadata": {"total_size": 64}, "weight_map": {
            "model.norm.weight": "model-00001-of-00002.safetensors",
            "lm_head.weight": "model-00002-of-00002.safetensors"}})
        .to_string()
        .as_bytes(),
    );

    // gguf: every dequantizable block type, plus llama metadata and a vocab.
    let mut g = Gguf::default();
    g.str("general.architecture", "llama")
        .u32("general.alignment", 32)
        .u32("llama.block_count", 1)
        .u32("llama.context_length", 64)
        .u32("llama.embedding_length", 32)
        .u32("llama.feed_forward_length", 64)
        .u32("llama.attention.head_count", 2)
        .u32("llama.attention.head_count_kv", 1)
        .f32("llama.attention.layer_norm_rms_epsilon", 1e-5);
    for (name, ty, dims) in [
        ("output_norm.weight", 0, vec![32u64]),
        ("blk.0.attn_norm.weight", 1, vec![32]),
        ("x.bf16", 30, vec![8]),
        ("token_embd.weight", 8, vec![32, 4]),
        ("x.q4_0", 2, vec![32]),
        ("x.q4_1", 3, vec![32]),
        ("x.q5_0", 6, vec![32]),
        ("x.q5_1", 7, vec![32]),
        ("x.q4_k", 12, vec![256]),
        ("x.q5_k", 13, vec![256]),
        ("x.q6_k", 14, vec![256]),
    ] {
        let n = dims.iter().product::<u64>() as usize;
        g.tensor(name, &dims, ty, &blocks(ty, n));
    }
    put("gguf", "valid-llama-all-block-types.gguf", &g.build());
    let spec = tiny_vocab("smollm");
    let mut g = Gguf::default();
    g.str("general.architecture", "llama")
        .str("tokenizer.ggml.model", "gpt2")
        .str("tokenizer.ggml.pre", "smollm")
        .strs("tokenizer.ggml.tokens", &spec.tokens)
        .i32s(
            "tokenizer.ggml.token_type",
            spec.token_types.as_ref().unwrap(),
        )
        .strs("tokenizer.ggml.merges", &spec.merges)
        .u32("tokenizer.ggml.eos_token_id", spec.eos.unwrap());
    put("gguf", "valid-vocab.gguf", &g.build());

    // config: the committed fixtures' config.json files.
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for e in std::fs::read_dir(&fixtures).unwrap() {
        let p = e.unwrap().path().join("config.json");
        if p.is_file() {
            let name = p.parent().unwrap().file_name().unwrap().to_string_lossy();
            put(
                "config",
                &format!("valid-{name}.json"),
                &std::fs::read(&p).unwrap(),
            );
        }
    }

    // tokenizer: tokenizer.json as the GGUF tokenizer writer emits it, for
    // each pre-tokenizer pipeline.
    for pre in ["gpt2", "smollm", "qwen2", "llama-bpe"] {
        let d = tempfile::tempdir().unwrap();
        wgllm::tokenizer::write_tokenizer_files(&tiny_vocab(pre), d.path()).unwrap();
        put(
            "tokenizer",
            &format!("valid-{pre}.json"),
            &std::fs::read(d.path().join("tokenizer.json")).unwrap(),
        );
    }
}
