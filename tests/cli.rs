//! The `wgllm` binary, run as a user runs it: every command line README.md
//! shows and the main flags of each subcommand, on the committed tiny
//! fixtures (`--model <folder>`, so nothing is fetched). Each test checks the
//! exit status (0 success / all taps pass, 1 a verify failure, 2 a usage or
//! input error, 130 chat ended by Ctrl-C) and the shape of the output.
//!
//! The fixtures have no tokenizer; for the commands that need one, a folder
//! is assembled here: a fixture's config and weights plus a byte-level BPE
//! tokenizer (256 byte tokens, 254 merges of letter pairs, `<|im_start|>`,
//! `<|im_end|>`: 512 tokens, the fixtures' vocab) written by the library's
//! own `write_tokenizer_files`, and a ChatML template.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{fixture, scratch, CHATML};
use serde_json::Value as Json;

/// The result of one run of the binary.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn from(o: Output) -> Self {
        Run {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
    fn expect_code(self, code: i32, what: &str) -> Self {
        assert_eq!(
            self.code,
            Some(code),
            "{what}: exit status\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout,
            self.stderr
        );
        self
    }
    fn json(&self) -> Json {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", self.stdout))
    }
}

/// A command for the binary, with its model cache in a scratch folder so a
/// test never writes to (or reads from) the user's cache.
fn cmd(args: &[&str]) -> Command {
    let mut c = common::wgllm_command(&scratch().join("cache"));
    c.args(args);
    c
}

fn wgllm(args: &[&str]) -> Run {
    Run::from(cmd(args).output().expect("run wgllm"))
}

fn wgllm_stdin(args: &[&str], input: &str) -> Run {
    let mut child = cmd(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn wgllm");
    // A child that exits before reading (a usage error) closes the pipe:
    // that is its answer, not the test's failure.
    let mut stdin = child.stdin.take().unwrap();
    if let Err(e) = stdin.write_all(input.as_bytes()) {
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::BrokenPipe,
            "writing stdin: {e}"
        );
    }
    drop(stdin);
    Run::from(child.wait_with_output().unwrap())
}

/// Each test uses its own subfolder of the scratch folder.
fn subdir(name: &str) -> PathBuf {
    let d = scratch().join(name);
    std::fs::create_dir_all(&d).unwrap();
    d
}

// ------------------------------------------------------------ the fixtures

/// `base` fixture's config, weights and generation config, plus the
/// tokenizer and template, in a fresh folder.
fn with_tokenizer(base: &str, name: &str) -> PathBuf {
    common::with_tokenizer(base, &subdir(name))
}

/// The Qwen2 fixture (config `eos_token_id: null`: replies always run to
/// `--max-tokens`) with a tokenizer, made once.
fn chat_model() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| with_tokenizer("qwen2_bias_tied", "chat_model"))
        .clone()
}

fn prompt_tokens(fx: &str) -> String {
    common::prompt_json_tokens(fx)
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

// ----------------------------------------------------------------- devices

#[test]
fn devices_text_and_json() {
    let r = wgllm(&["devices"]).expect_code(0, "devices");
    assert!(r.stdout.starts_with("[0] "), "{}", r.stdout);
    assert_eq!(r.stdout.matches("(selected)").count(), 1, "{}", r.stdout);
    for field in ["backend:", "max_storage_buffer_binding_size:", "features:"] {
        assert!(r.stdout.contains(field), "no `{field}`:\n{}", r.stdout);
    }

    let r = wgllm(&["devices", "--json"]).expect_code(0, "devices --json");
    let v = r.json();
    let list = v.as_array().expect("a JSON array of adapters");
    assert!(!list.is_empty());
    assert_eq!(list.iter().filter(|d| d["default"] == true).count(), 1);
    for d in list {
        assert!(d["name"].is_string() && d["backend"].is_string(), "{d}");
        assert!(
            d["limits"]["max_storage_buffer_binding_size"]
                .as_u64()
                .unwrap()
                > 0
        );
    }

    // --adapter 0 selects the first adapter; an unknown one is an input error.
    let r = wgllm(&["devices", "--adapter", "0"]).expect_code(0, "devices --adapter 0");
    assert!(
        r.stdout.starts_with("[0] ") && r.stdout.lines().next().unwrap().ends_with("(selected)")
    );
    let r = wgllm(&[
        "run",
        "--adapter",
        "no-such-adapter",
        "--model",
        path(&chat_model()),
        "--prompt",
        "hi",
    ])
    .expect_code(2, "run --adapter no-such-adapter");
    assert!(r.stderr.contains("no-such-adapter"), "{}", r.stderr);
}

// ------------------------------------------------------------------ verify

#[test]
fn verify_tokens_on_a_folder_without_tokenizer() {
    let fx = fixture("qwen2_bias_tied");
    assert!(!fx.join("tokenizer.json").exists());
    let r = wgllm(&["verify", "--model", path(&fx), "--tokens", "1,2,3"])
        .expect_code(0, "verify --tokens");
    assert!(r.stdout.contains("tokens (3): [1, 2, 3]"), "{}", r.stdout);
    // One table (the CPU reference), one row per tap: 2 layers x 12 + 3.
    let rows: Vec<&str> = r
        .stdout
        .lines()
        .filter(|l| l.ends_with(" ok") || l.contains(" FAIL"))
        .collect();
    assert_eq!(rows.len(), 27, "{}", r.stdout);
    assert!(rows[0].starts_with("embed ") && rows[26].starts_with("logits "));
    assert!(r.stdout.contains("all 27 taps pass") && r.stdout.trim_end().ends_with("PASS"));
}

#[test]
fn verify_reference_json_and_dump() {
    let fx = fixture("llama_gqa3_untied");
    let reference = fx.join("reference_f32.safetensors");
    let dump = subdir("verify_dump").join("taps.safetensors");
    // Tokens from the dump itself.
    let r = wgllm(&[
        "verify",
        "--model",
        path(&fx),
        "--reference",
        path(&reference),
        "--json",
        "--dump",
        path(&dump),
    ])
    .expect_code(0, "verify --reference --json --dump");
    let v = r.json();
    assert_eq!(v["pass"], true);
    assert_eq!(
        v["tokens"].as_array().unwrap().len(),
        prompt_tokens("llama_gqa3_untied").split(',').count()
    );
    let reports = v["reports"].as_array().unwrap();
    assert_eq!(reports.len(), 2, "CPU reference and the dump");
    assert_eq!(reports[0]["against"], "cpu-reference");
    assert!(reports[1]["against"]
        .as_str()
        .unwrap()
        .ends_with("reference_f32.safetensors"));
    for rep in reports {
        let rows = rep["rows"].as_array().unwrap();
        assert_eq!(rows.len(), 2 * 12 + 3);
        assert!(rep["first_failure"].is_null());
        for row in rows {
            assert_eq!(row["pass"], true, "{row}");
            assert!(row["nmse"].as_f64().unwrap() <= row["tolerance"]["nmse"].as_f64().unwrap());
        }
    }
    // The dump holds every tap under the same names, readable as a reference.
    let taps = wgllm::taps::TapSet::load(&dump).unwrap();
    assert_eq!(taps.taps.len(), 27);
    assert_eq!(taps.taps[0].name, "embed");
    assert!(taps.get("logits").is_some() && taps.get("layers.1.q_rope").is_some());
    let r = wgllm(&[
        "verify",
        "--model",
        path(&fx),
        "--tokens",
        &prompt_tokens("llama_gqa3_untied"),
        "--reference",
        path(&dump),
        "--no-cpu",
    ])
    .expect_code(0, "verify against its own dump");
    assert!(r.stdout.contains("all 27 taps pass"), "{}", r.stdout);
}

#[test]
fn verify_fails_with_exit_1() {
    let fx = fixture("qwen2_bias_tied");
    let tokens = prompt_tokens("qwen2_bias_tied");
    let dir = subdir("verify_fail");

    // Bounds no f32 computation in a different order can meet: every tap
    // with any error fails, the first of them is named, and a tap that is
    // exact (`embed` is a copy) still passes.
    let tight = dir.join("tight.json");
    let tight_kinds: Vec<String> = [
        "embed",
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
        "norm",
        "logits",
    ]
    .iter()
    .map(|k| format!("\"{k}\": {{\"nmse\": 1e-30, \"max_rel\": 1e-30}}"))
    .collect();
    std::fs::write(
        &tight,
        format!(
            "{{\"default\": {{\"nmse\": 1e-30, \"max_rel\": 1e-30}}, \"kinds\": {{{}}}}}",
            tight_kinds.join(", ")
        ),
    )
    .unwrap();
    let r = wgllm(&[
        "verify",
        "--model",
        path(&fx),
        "--tokens",
        &tokens,
        "--tolerance-file",
        path(&tight),
        "--json",
    ])
    .expect_code(1, "verify with absurdly tight tolerances");
    let v = r.json();
    assert_eq!(v["pass"], false);
    let rows = v["reports"][0]["rows"].as_array().unwrap();
    let exact = |row: &Json| row["nmse"] == 0.0 && row["max_rel"] == 0.0;
    for row in rows {
        assert_eq!(row["pass"], exact(row), "{row}");
    }
    let first = rows
        .iter()
        .find(|r| !exact(r))
        .expect("some tap has an error");
    assert_eq!(v["reports"][0]["first_failure"], first["tap"]);
    assert!(rows.iter().filter(|r| !exact(r)).count() > 20);

    // A tampered reference: one tap shifted; verify names it as the first
    // failure of that table, the CPU reference still passes.
    let mut taps = wgllm::taps::TapSet::load(&fx.join("reference_f32.safetensors")).unwrap();
    let t = taps
        .taps
        .iter_mut()
        .find(|t| t.name == "layers.1.attn")
        .unwrap();
    t.data.iter_mut().for_each(|x| *x += 0.5);
    let tampered = dir.join("tampered_f32.safetensors");
    taps.save(&tampered, Default::default()).unwrap();
    let r = wgllm(&[
        "verify",
        "--model",
        path(&fx),
        "--tokens",
        &tokens,
        "--reference",
        path(&tampered),
    ])
    .expect_code(1, "verify against a tampered reference");
    assert!(r.stdout.trim_end().ends_with("FAIL"), "{}", r.stdout);
    let v = wgllm(&[
        "verify",
        "--model",
        path(&fx),
        "--tokens",
        &tokens,
        "--reference",
        path(&tampered),
        "--json",
    ])
    .expect_code(1, "verify --json against a tampered reference")
    .json();
    assert_eq!(v["reports"][0]["pass"], true);
    assert_eq!(v["reports"][1]["first_failure"], "layers.1.attn");
    let failing: Vec<&Json> = v["reports"][1]["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["pass"] == false)
        .collect();
    assert_eq!(failing.len(), 1, "only the tampered tap differs");

    // A per-tap override loose enough for the shift makes it pass.
    let loose = dir.join("loose.json");
    std::fs::write(
        &loose,
        r#"{"taps": {"layers.1.attn": {"nmse": 10.0, "max_rel": 10.0}}}"#,
    )
    .unwrap();
    wgllm(&[
        "verify",
        "--model",
        path(&fx),
        "--tokens",
        &tokens,
        "--reference",
        path(&tampered),
        "--tolerance-file",
        path(&loose),
    ])
    .expect_code(0, "verify with the tampered tap's bound loosened");
}

#[test]
fn verify_input_errors_exit_2() {
    let fx = fixture("qwen2_bias_tied");
    let m = path(&fx);
    let dir = subdir("verify_errors");
    let bad_json = dir.join("bad.json");
    std::fs::write(&bad_json, "{\"default\": {\"nmse\": \"x\"}}").unwrap();
    let unknown = dir.join("unknown.json");
    std::fs::write(&unknown, r#"{"defaults": {}}"#).unwrap();
    // Dumps whose `tokens` cannot be run.
    let tokens_dump = |name: &str, ids: &[i32]| {
        let p = dir.join(name);
        let bytes: Vec<u8> = ids.iter().flat_map(|x| x.to_le_bytes()).collect();
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::I32, vec![ids.len()], &bytes)
                .unwrap();
        safetensors::serialize_to_file([("tokens", view)], None, &p).unwrap();
        p
    };
    let negative = tokens_dump("negative.safetensors", &[3, -1]);
    let empty = tokens_dump("empty.safetensors", &[]);
    let (reference, config) = (fx.join("reference_f32.safetensors"), fx.join("config.json"));
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["verify", "--model", m, "--tokens", "1,x"],
            "`x` is not a token id",
        ),
        (vec!["verify", "--model", m, "--tokens", ""], "no token ids"),
        (
            vec!["verify", "--model", m, "--tokens=-1"],
            "`-1` is not a token id",
        ),
        (
            vec!["verify", "--model", m, "--tokens", "1,512"],
            "token id 512 is outside the vocabulary (vocab_size 512)",
        ),
        (vec!["verify", "--model", m], "give --tokens or --prompt"),
        (
            vec!["verify", "--model", m, "--prompt", "hi"],
            "no tokenizer.json in the model folder (pass token ids with --tokens instead)",
        ),
        (
            vec!["verify", "--model", m, "--prompt", "hi", "--tokens", "1"],
            "cannot be used with",
        ),
        (
            vec!["verify", "--model", "/no/such/model", "--tokens", "1"],
            "/no/such/model",
        ),
        (
            vec![
                "verify",
                "--model",
                m,
                "--tokens",
                "1,2",
                "--reference",
                path(&reference),
            ],
            "differ from the reference dump's `tokens`",
        ),
        (
            vec![
                "verify",
                "--model",
                m,
                "--tokens",
                "1",
                "--reference",
                path(&config),
            ],
            "config.json",
        ),
        (
            vec![
                "verify",
                "--model",
                m,
                "--tokens",
                "1",
                "--tolerance-file",
                path(&bad_json),
            ],
            "bad.json",
        ),
        (
            vec![
                "verify",
                "--model",
                m,
                "--tokens",
                "1",
                "--tolerance-file",
                path(&unknown),
            ],
            "unknown field",
        ),
        (
            vec!["verify", "--model", m, "--tokens", "1", "--dtype", "int3"],
            "--dtype",
        ),
        (vec!["verify", "--tokens", "1"], "--model"),
        (
            vec!["verify", "--model", m, "--reference", path(&negative)],
            "tensor `tokens`: token id -1 is not a valid id",
        ),
        (
            vec!["verify", "--model", m, "--reference", path(&empty)],
            "no tokens to verify",
        ),
    ];
    for (args, want) in cases {
        let r = wgllm(&args).expect_code(2, &args.join(" "));
        assert!(
            r.stderr.contains(want),
            "{}: stderr lacks `{want}`:\n{}",
            args.join(" "),
            r.stderr
        );
        assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    }
    // A missing file names it and says why once (the error's own text holds
    // its source's; the CLI does not print that again).
    let missing = dir.join("missing.json");
    let why = std::fs::read(&missing).unwrap_err().to_string();
    let args = [
        "verify",
        "--model",
        m,
        "--tokens",
        "1",
        "--tolerance-file",
        path(&missing),
    ];
    let r = wgllm(&args).expect_code(2, "missing tolerance file");
    assert!(r.stderr.contains(path(&missing)), "{}", r.stderr);
    assert_eq!(r.stderr.matches(why.as_str()).count(), 1, "{}", r.stderr);
}

#[test]
fn verify_prompt_through_the_tokenizer() {
    let m = chat_model();
    let r = wgllm(&[
        "verify",
        "--model",
        path(&m),
        "--prompt",
        "hello world",
        "--json",
    ])
    .expect_code(0, "verify --prompt");
    let v = r.json();
    let tok = wgllm::tokenizer::Tokenizer::from_dir(&m).unwrap();
    let want: Vec<Json> = tok
        .encode("hello world")
        .unwrap()
        .into_iter()
        .map(Json::from)
        .collect();
    assert_eq!(v["tokens"], Json::Array(want));
    assert_eq!(v["pass"], true);
}

// ----------------------------------------------------------------- convert

/// A small GGUF writer (F32 tensors and the metadata kinds used here).
struct Gguf {
    kvs: Vec<u8>,
    n_kv: u64,
    tensors: Vec<(String, Vec<u64>, Vec<f32>)>,
}

fn gstr(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
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
    fn strs(&mut self, key: &str, v: &[String]) -> &mut Self {
        let mut b = 8u32.to_le_bytes().to_vec();
        b.extend((v.len() as u64).to_le_bytes());
        v.iter().for_each(|s| b.extend(gstr(s)));
        self.kv(key, 9, &b)
    }
    fn i32s(&mut self, key: &str, v: &[i32]) -> &mut Self {
        let mut b = 5u32.to_le_bytes().to_vec();
        b.extend((v.len() as u64).to_le_bytes());
        v.iter().for_each(|x| b.extend(x.to_le_bytes()));
        self.kv(key, 9, &b)
    }
    /// `shape` in Hugging Face order ([out, in]); GGUF stores it reversed.
    fn tensor(&mut self, name: &str, shape: &[u64], seed: &mut u64) {
        let n: u64 = shape.iter().product();
        let data = (0..n)
            .map(|_| {
                *seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((*seed >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 0.2
            })
            .collect();
        self.tensors
            .push((name.into(), shape.iter().rev().copied().collect(), data));
    }
    fn bytes(&self) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend((self.tensors.len() as u64).to_le_bytes());
        b.extend(self.n_kv.to_le_bytes());
        b.extend(&self.kvs);
        let mut off = 0u64;
        for (name, dims, data) in &self.tensors {
            b.extend(gstr(name));
            b.extend((dims.len() as u32).to_le_bytes());
            dims.iter().for_each(|d| b.extend(d.to_le_bytes()));
            b.extend(0u32.to_le_bytes()); // F32
            b.extend(off.to_le_bytes());
            off = (off + 4 * data.len() as u64).next_multiple_of(32);
        }
        b.resize(b.len().next_multiple_of(32), 0);
        let start = b.len();
        let mut off = 0usize;
        for (_, _, data) in &self.tensors {
            b.resize(start + off, 0);
            data.iter().for_each(|x| b.extend(x.to_le_bytes()));
            off = (off + 4 * data.len()).next_multiple_of(32);
        }
        b
    }
}

/// A 1-layer llama GGUF (hidden 32, 4 heads, 2 KV heads) with the 512-token
/// tokenizer in its metadata.
fn tiny_gguf(path: &Path) {
    let spec = common::byte_level_vocab();
    let (h, f, v) = (32u64, 64u64, 512u64);
    let mut g = Gguf {
        kvs: Vec::new(),
        n_kv: 0,
        tensors: Vec::new(),
    };
    g.str("general.architecture", "llama")
        .str("general.name", "wgllm cli test")
        .u32("llama.block_count", 1)
        .u32("llama.context_length", 256)
        .u32("llama.embedding_length", h as u32)
        .u32("llama.feed_forward_length", f as u32)
        .u32("llama.attention.head_count", 4)
        .u32("llama.attention.head_count_kv", 2)
        .u32("llama.rope.dimension_count", 8)
        .f32("llama.rope.freq_base", 10000.0)
        .f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
        .str("tokenizer.ggml.model", "gpt2")
        .str("tokenizer.ggml.pre", "gpt2")
        .strs("tokenizer.ggml.tokens", &spec.tokens)
        .i32s(
            "tokenizer.ggml.token_type",
            spec.token_types.as_ref().unwrap(),
        )
        .strs("tokenizer.ggml.merges", &spec.merges)
        .u32("tokenizer.ggml.eos_token_id", 511)
        .str("tokenizer.chat_template", CHATML);
    let mut seed = 7u64;
    g.tensor("token_embd.weight", &[v, h], &mut seed);
    for (name, shape) in [
        ("attn_norm.weight", vec![h]),
        ("attn_q.weight", vec![h, h]),
        ("attn_k.weight", vec![16, h]),
        ("attn_v.weight", vec![16, h]),
        ("attn_output.weight", vec![h, h]),
        ("ffn_norm.weight", vec![h]),
        ("ffn_gate.weight", vec![f, h]),
        ("ffn_up.weight", vec![f, h]),
        ("ffn_down.weight", vec![h, f]),
    ] {
        g.tensor(&format!("blk.0.{name}"), &shape, &mut seed);
    }
    g.tensor("output_norm.weight", &[h], &mut seed);
    g.tensor("output.weight", &[v, h], &mut seed);
    std::fs::write(path, g.bytes()).unwrap();
}

#[test]
fn convert_then_run_and_verify_the_result() {
    let dir = subdir("convert");
    let gguf = dir.join("tiny.gguf");
    tiny_gguf(&gguf);
    for dtype in ["bf16", "f32"] {
        let out = dir.join(format!("out_{dtype}"));
        let r = wgllm(&["convert", path(&gguf), path(&out), "--dtype", dtype])
            .expect_code(0, "convert");
        assert!(r.stderr.contains("LlamaForCausalLM"), "{}", r.stderr);
        for f in [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
        ] {
            assert!(out.join(f).is_file(), "convert wrote no {f}");
        }
        let cfg: Json =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["vocab_size"], 512);
        assert_eq!(cfg["num_hidden_layers"], 1);
        // The converted folder runs and matches the CPU reference.
        wgllm(&["verify", "--model", path(&out), "--prompt", "abc def"])
            .expect_code(0, "verify the converted folder");
    }
    // `--model file.gguf` converts into the cache and runs.
    let r = wgllm(&[
        "run",
        "--model",
        path(&gguf),
        "--prompt",
        "hello",
        "--max-tokens",
        "3",
        "--json",
    ])
    .expect_code(0, "run --model tiny.gguf");
    assert_eq!(r.json()["generated_ids"].as_array().unwrap().len(), 3);

    let not_gguf = fixture("qwen2_bias_tied").join("config.json");
    let r = wgllm(&["convert", path(&not_gguf), path(&dir.join("x"))])
        .expect_code(2, "convert a JSON file");
    assert!(r.stderr.contains("config.json"), "{}", r.stderr);
    wgllm(&[
        "convert",
        path(&gguf),
        path(&dir.join("y")),
        "--dtype",
        "q4",
    ])
    .expect_code(2, "convert --dtype q4");
    // Keeping the types is running the GGUF itself, not a copy.
    let r = wgllm(&[
        "convert",
        path(&gguf),
        path(&dir.join("z")),
        "--dtype",
        "native",
    ])
    .expect_code(2, "convert --dtype native");
    assert!(r.stderr.contains("with --model"), "{}", r.stderr);
    assert!(!dir.join("z").exists());
    wgllm(&["verify", "--model", path(&gguf), "--prompt", "abc def"])
        .expect_code(0, "verify --model tiny.gguf (native)");
}

// --------------------------------------------------------------------- run

/// stderr's summary line of `run`: (prompt tokens, generated, stop reason).
fn run_summary(stderr: &str) -> (usize, usize, String) {
    let line = stderr
        .lines()
        .find(|l| l.starts_with('[') && l.contains(" prompt tokens, "))
        .unwrap_or_else(|| panic!("no summary line:\n{stderr}"));
    let nums: Vec<usize> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|t| t.parse().ok())
        .take(2)
        .collect();
    let reason = line.split('(').nth(1).unwrap().split(')').next().unwrap();
    (nums[0], nums[1], reason.to_string())
}

fn ids(v: &Json, field: &str) -> Vec<u64> {
    v[field]
        .as_array()
        .unwrap_or_else(|| panic!("no `{field}` in {v}"))
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

#[test]
fn run_prompt_stdin_chat_and_json() {
    let m = chat_model();
    let m = path(&m);
    // README: wgllm run --prompt "Once upon a time" --max-tokens 64
    let r = wgllm(&[
        "run",
        "--model",
        m,
        "--prompt",
        "Once upon a time",
        "--max-tokens",
        "64",
    ])
    .expect_code(0, "run --prompt");
    let tok = wgllm::tokenizer::Tokenizer::from_dir(Path::new(m)).unwrap();
    let n_prompt = tok.encode_with_special("Once upon a time").unwrap().len();
    assert_eq!(run_summary(&r.stderr), (n_prompt, 64, "max_tokens".into()));
    let text = r.stdout.clone();

    // --json: the same greedy continuation, as ids and text.
    let v = wgllm(&[
        "run",
        "--model",
        m,
        "--prompt",
        "Once upon a time",
        "--max-tokens",
        "64",
        "--json",
    ])
    .expect_code(0, "run --json")
    .json();
    assert_eq!(ids(&v, "prompt_ids").len(), n_prompt);
    let gen = ids(&v, "generated_ids");
    assert_eq!(gen.len(), 64);
    assert_eq!(v["stop_reason"], "max_tokens");
    assert!(v["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(format!("{}\n", v["text"].as_str().unwrap()), text);
    let g32: Vec<u32> = gen.iter().map(|&x| x as u32).collect();
    assert_eq!(v["text"], tok.decode_skip_special(&g32).unwrap());

    // From stdin (README: echo "def fib(n):" | wgllm run --json): same ids
    // as the same text given with --prompt.
    let v = wgllm_stdin(
        &["run", "--model", m, "--max-tokens", "64", "--json"],
        "Once upon a time",
    )
    .expect_code(0, "run from stdin")
    .json();
    assert_eq!(ids(&v, "generated_ids"), gen);
    let r = wgllm_stdin(&["run", "--model", m, "--max-tokens", "5"], "def fib(n):\n")
        .expect_code(0, "run from stdin, text");
    assert_eq!(run_summary(&r.stderr).1, 5);

    // --chat (README: run --chat --system "Be brief." --prompt "What is RoPE?")
    let v = wgllm(&[
        "run",
        "--model",
        m,
        "--chat",
        "--system",
        "Be brief.",
        "--prompt",
        "What is RoPE?",
        "--max-tokens",
        "8",
        "--json",
    ])
    .expect_code(0, "run --chat --system")
    .json();
    let rendered = wgllm::chat::render_chat(
        CHATML,
        &[
            wgllm::chat::ChatMessage::system("Be brief."),
            wgllm::chat::ChatMessage::user("What is RoPE?"),
        ],
        true,
        "",
        "<|im_end|>",
    )
    .unwrap();
    let want: Vec<u64> = tok
        .encode(&rendered)
        .unwrap()
        .into_iter()
        .map(u64::from)
        .collect();
    assert_eq!(ids(&v, "prompt_ids"), want);
    assert_eq!(want[0], 510, "starts with <|im_start|>");
    wgllm(&[
        "run",
        "--model",
        m,
        "--chat",
        "--prompt",
        "Name three primary colors.",
        "--max-tokens",
        "4",
    ])
    .expect_code(0, "run --chat --prompt");

    // Seeded sampling with every filter is reproducible.
    let sampled = |seed: &str| {
        let v = wgllm(&[
            "run",
            "--model",
            m,
            "--prompt",
            "hello",
            "--max-tokens",
            "16",
            "--json",
            "--temperature",
            "0.9",
            "--top-k",
            "40",
            "--top-p",
            "0.95",
            "--min-p",
            "0.01",
            "--repeat-penalty",
            "1.1",
            "--seed",
            seed,
        ])
        .expect_code(0, "run with sampling")
        .json();
        ids(&v, "generated_ids")
    };
    let a = sampled("3");
    assert_eq!(a.len(), 16);
    assert_eq!(a, sampled("3"));
}

#[test]
fn run_input_errors_exit_2() {
    let m = chat_model();
    let m = path(&m);
    let no_tok = fixture("qwen2_bias_tied");
    let no_tok = path(&no_tok);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["run", "--model", m, "--prompt", ""],
            "prompt encodes to no tokens",
        ),
        (
            vec!["run", "--model", m, "--prompt", "hi", "--max-tokens", "0"],
            "nothing would be generated",
        ),
        (
            vec!["run", "--model", m, "--prompt", "hi", "--max-tokens=-3"],
            "--max-tokens",
        ),
        (
            vec![
                "run",
                "--model",
                m,
                "--prompt",
                "hi",
                "--max-tokens",
                "18446744073709551615",
            ],
            "exceeds the context",
        ),
        (
            vec!["run", "--model", m, "--prompt", "hi", "--max-tokens", "300"],
            "exceeds the context of 256 tokens",
        ),
        (
            vec!["run", "--model", m, "--prompt", "hi", "--max-context", "0"],
            "max context",
        ),
        (
            vec!["run", "--model", m, "--prompt", "hi", "--system", "x"],
            "--system needs --chat",
        ),
        (
            vec!["run", "--model", m, "--prompt", "hi", "--temperature=-1"],
            "--temperature",
        ),
        (
            vec!["run", "--model", m, "--prompt", "hi", "--top-p", "0"],
            "--top-p",
        ),
        (
            vec!["run", "--model", m, "--prompt", "hi", "--dtype", "int3"],
            "--dtype",
        ),
        (
            vec!["run", "--model", no_tok, "--prompt", "hi"],
            "no tokenizer.json",
        ),
        (
            vec!["run", "--model", no_tok, "--chat", "--prompt", "hi"],
            "no tokenizer.json",
        ),
        (
            vec!["run", "--model", "/no/such/model", "--prompt", "hi"],
            "/no/such/model",
        ),
        (vec!["run", "--bogus-flag"], "--bogus-flag"),
    ];
    for (args, want) in cases {
        let r = wgllm(&args).expect_code(2, &args.join(" "));
        assert!(
            r.stderr.contains(want),
            "{}: stderr lacks `{want}`:\n{}",
            args.join(" "),
            r.stderr
        );
        assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    }
    // `run` takes no token ids: its missing-tokenizer error names no flag.
    let r = wgllm(&["run", "--model", no_tok, "--prompt", "hi"]).expect_code(2, "no tokenizer");
    assert!(!r.stderr.contains("--tokens"), "{}", r.stderr);
    // An empty prompt from stdin is the same error.
    let r = wgllm_stdin(&["run", "--model", m], "").expect_code(2, "empty stdin");
    assert!(
        r.stderr.contains("prompt encodes to no tokens"),
        "{}",
        r.stderr
    );
    // A chat model folder without a chat template.
    let dir = subdir("no_template");
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(Path::new(m).join(f), dir.join(f)).unwrap();
    }
    let r = wgllm(&["run", "--model", path(&dir), "--chat", "--prompt", "hi"])
        .expect_code(2, "run --chat without a template");
    assert!(r.stderr.contains("no chat template"), "{}", r.stderr);
    // The experimental Dot2 selection names a projection, or is an error
    // naming the variable and the allowed names.
    let r = Run::from(
        cmd(&["run", "--model", m, "--prompt", "hi", "--max-tokens", "1"])
            .env("WGLLM_DOT2", "Q,Kk")
            .output()
            .unwrap(),
    )
    .expect_code(2, "WGLLM_DOT2=Q,Kk");
    assert!(
        r.stderr.contains("WGLLM_DOT2: 'Kk' is not a projection") && r.stderr.contains("Gate"),
        "{}",
        r.stderr
    );
}

/// `serve` refuses a bad `--max-context` (and `--parallel`) while parsing,
/// before it binds or says it is listening: the model loads on the engine
/// thread only after the address is printed, so a load-time refusal would
/// come after "listening".
#[test]
fn serve_refuses_bad_settings_before_listening() {
    let m = chat_model();
    for (flag, value, want) in [
        ("--max-context", "0", "max context must be at least 1"),
        ("--max-context", "many", "not a token count"),
        ("--parallel", "0", "number of sequences"),
    ] {
        let args = ["serve", "--model", path(&m), "--port", "0", flag, value];
        let r = wgllm(&args).expect_code(2, &args.join(" "));
        assert!(
            r.stderr.contains(flag) && r.stderr.contains(want),
            "{}: stderr lacks `{flag}` / `{want}`:\n{}",
            args.join(" "),
            r.stderr
        );
        assert!(!r.stderr.contains("listening"), "{}", r.stderr);
    }
}

/// A checkpoint whose lm_head overflows f32 at run time (every weight the
/// largest finite bf16, 3.39e38: finite, so the loader accepts it, but any
/// logit sums 64 such products): generation stops at step 0 with an error
/// naming the step, exit 2.
#[test]
fn non_finite_logits_stop_generation() {
    let dir = with_tokenizer("llama_gqa3_untied", "overflow");
    let file = dir.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect();
    let head = tensors
        .iter_mut()
        .find(|t| t.0 == "lm_head.weight")
        .expect("an untied fixture");
    assert_eq!(head.1, safetensors::Dtype::BF16);
    let max_bf16 = half::bf16::MAX.to_bits().to_le_bytes();
    for c in head.3.chunks_exact_mut(2) {
        c.copy_from_slice(&max_bf16);
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    safetensors::serialize_to_file(views, Some(meta), &file).unwrap();

    for args in [
        vec![
            "run",
            "--model",
            path(&dir),
            "--prompt",
            "hello",
            "--max-tokens",
            "4",
        ],
        vec![
            "run",
            "--model",
            path(&dir),
            "--prompt",
            "hello",
            "--max-tokens",
            "4",
            "--temperature",
            "0.7",
        ],
    ] {
        let r = wgllm(&args).expect_code(2, "run on an overflowing lm_head");
        assert!(
            r.stderr.contains("non-finite logits at generation step 0"),
            "{}",
            r.stderr
        );
        assert!(
            r.stdout.trim().is_empty(),
            "no text before the error: {}",
            r.stdout
        );
    }
    let r = wgllm_stdin(
        &["chat", "--model", path(&dir), "--max-tokens", "4"],
        "hello\n",
    )
    .expect_code(2, "chat on an overflowing lm_head");
    assert!(
        r.stderr.contains("non-finite logits at generation step 0"),
        "{}",
        r.stderr
    );
}

// -------------------------------------------------------------------- chat

/// stderr's per-turn lines of `chat`: (new prompt tokens, generated, reason).
fn chat_turns(stderr: &str) -> Vec<(usize, usize, String)> {
    stderr
        .lines()
        .filter(|l| l.starts_with('[') && l.contains(" new prompt tokens, "))
        .map(|line| {
            let nums: Vec<usize> = line
                .split(|c: char| !c.is_ascii_digit())
                .filter_map(|t| t.parse().ok())
                .take(2)
                .collect();
            let reason = line.split('(').nth(1).unwrap().split(')').next().unwrap();
            (nums[0], nums[1], reason.to_string())
        })
        .collect()
}

#[test]
fn chat_through_stdin() {
    let m = chat_model();
    let r = wgllm_stdin(
        &[
            "chat",
            "--model",
            path(&m),
            "--system",
            "Be brief.",
            "--max-tokens",
            "6",
        ],
        "hello\nand again\n",
    )
    .expect_code(0, "chat");
    let turns = chat_turns(&r.stderr);
    assert_eq!(turns.len(), 2, "{}", r.stderr);
    assert!(
        turns.iter().all(|t| t.1 == 6 && t.2 == "max_tokens"),
        "{turns:?}"
    );
    // The second turn reuses the cached conversation: it runs only what is
    // new (the end of the reply, the new user message, the generation
    // prompt), fewer tokens than the whole conversation.
    let tok = wgllm::tokenizer::Tokenizer::from_dir(&m).unwrap();
    let first = tok
        .encode(
            &wgllm::chat::render_chat(
                CHATML,
                &[
                    wgllm::chat::ChatMessage::system("Be brief."),
                    wgllm::chat::ChatMessage::user("hello"),
                ],
                true,
                "",
                "",
            )
            .unwrap(),
        )
        .unwrap();
    assert_eq!(turns[0].0, first.len());
    assert!(turns[1].0 < first.len() + 6, "{turns:?}");
    // The replies are on stdout, one line each (plus what they contain).
    assert!(r.stdout.ends_with('\n'));

    // An empty line ends the session too; nothing at all is fine.
    let r = wgllm_stdin(
        &["chat", "--model", path(&m), "--max-tokens", "2"],
        "hi\n\nignored\n",
    )
    .expect_code(0, "chat ended by an empty line");
    assert_eq!(chat_turns(&r.stderr).len(), 1);
    wgllm_stdin(&["chat", "--model", path(&m)], "").expect_code(0, "chat with no input");
    wgllm_stdin(&["chat", "--model", path(&m), "--max-tokens", "0"], "hi\n")
        .expect_code(2, "chat --max-tokens 0");
}

/// Collects a child's pipe in the background.
fn collect(mut r: impl Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let b = buf.clone();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = r.read(&mut chunk) {
            if n == 0 {
                break;
            }
            b.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    buf
}

fn text(b: &Arc<Mutex<Vec<u8>>>) -> String {
    String::from_utf8_lossy(&b.lock().unwrap()).into_owned()
}

/// Wait (at most a minute: a hang guard, not a timing check) for `cond`.
fn wait_for(
    what: &str,
    out: &Arc<Mutex<Vec<u8>>>,
    err: &Arc<Mutex<Vec<u8>>>,
    cond: impl Fn() -> bool,
) {
    let t0 = Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}\n--- stdout\n{}\n--- stderr\n{}",
            text(out),
            text(err)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A `chat` on the chat model with its pipes open and its output collected
/// in the background. Replies of up to 2000 tokens: 1.5 to 10 s at the tiny
/// model's 200 to 1500 tokens/s on lavapipe, far longer than the ~10 ms a
/// test takes to react to the first output; the context (8192) holds two
/// turns whatever the first one generated before an interrupt.
#[cfg(unix)]
struct LiveChat {
    child: std::process::Child,
    pid: libc::pid_t,
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<Vec<u8>>>,
    stdin: std::process::ChildStdin,
}

#[cfg(unix)]
fn live_chat() -> LiveChat {
    let m = chat_model();
    let args = ["chat", "--model", path(&m), "--max-context", "8192"];
    let mut child = cmd(&args)
        .args(["--max-tokens", "2000"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    LiveChat {
        pid: child.id() as libc::pid_t,
        out: collect(child.stdout.take().unwrap()),
        err: collect(child.stderr.take().unwrap()),
        stdin: child.stdin.take().unwrap(),
        child,
    }
}

/// The child's exit status (at most a minute: a hang guard).
#[cfg(unix)]
fn wait_exit(child: &mut std::process::Child) -> std::process::ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "chat did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Ctrl-C during a reply stops it and the session answers the next turn;
/// Ctrl-C at the prompt ends the session with 130.
#[cfg(unix)]
#[test]
fn chat_ctrl_c_stops_the_reply_then_exits_at_the_prompt() {
    let LiveChat {
        mut child,
        pid,
        out,
        err,
        mut stdin,
    } = live_chat();
    let sigint = || assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);

    stdin.write_all(b"tell me a long story\n").unwrap();
    stdin.flush().unwrap();
    wait_for("the first reply to start", &out, &err, || {
        !out.lock().unwrap().is_empty()
    });
    sigint();
    wait_for("the first reply to stop", &out, &err, || {
        chat_turns(&text(&err)).len() == 1
    });
    let turns = chat_turns(&text(&err));
    assert_eq!(turns[0].2, "interrupted", "{}", text(&err));
    assert!(turns[0].1 < 2000, "{turns:?}");
    assert!(text(&err).contains("kept in the conversation"));

    // The session goes on and answers the next turn in full.
    stdin.write_all(b"go on\n").unwrap();
    stdin.flush().unwrap();
    wait_for("the second reply", &out, &err, || {
        chat_turns(&text(&err)).len() == 2
    });
    let turns = chat_turns(&text(&err));
    assert_eq!(
        (turns[1].1, turns[1].2.as_str()),
        (2000, "max_tokens"),
        "{turns:?}"
    );

    // Ctrl-C at the (empty) prompt ends the session.
    sigint();
    let status = wait_exit(&mut child);
    assert_eq!(status.code(), Some(130), "{}", text(&err));
    assert!(
        text(&err).contains("interrupted at the prompt"),
        "{}",
        text(&err)
    );
    assert!(!text(&err).contains("panicked"));
}

/// Ctrl-C twice in quick succession during a reply ends the session (130).
#[cfg(unix)]
#[test]
fn chat_ctrl_c_twice_in_quick_succession_exits() {
    let LiveChat {
        mut child,
        pid,
        out,
        err,
        mut stdin,
    } = live_chat();
    stdin.write_all(b"hello\n").unwrap();
    stdin.flush().unwrap();
    wait_for("the reply to start", &out, &err, || {
        !out.lock().unwrap().is_empty()
    });
    // Two presses 50 ms apart, as a hand gives them (two signals sent at
    // once may be delivered as one: POSIX does not queue them).
    for _ in 0..2 {
        assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = wait_exit(&mut child);
    // Whether the second press lands before the reply stopped or at the
    // prompt after it, the session ends with 130 (stdin is still open).
    assert_eq!(status.code(), Some(130), "{}", text(&err));
    assert!(text(&err).contains("session ended"), "{}", text(&err));
    drop(stdin);
}

// ------------------------------------------------ the conversation's cache

/// The KV cache after an interrupted reply holds exactly the tokens the
/// conversation says it holds: continuing from it gives the logits a fresh
/// model gives for the same sequence.
#[test]
fn interrupted_turn_keeps_the_kv_cache_exact() {
    use std::cell::Cell;
    use wgllm::generate::{Conversation, GenerateOptions};
    use wgllm::model::{Model, ModelOptions};

    let m = chat_model();
    let gpu = Arc::new(wgllm::Gpu::new(&Default::default()).expect("a wgpu adapter"));
    let tok = wgllm::tokenizer::Tokenizer::from_dir(&m).unwrap();
    let mopts = ModelOptions {
        max_context: Some(256),
        ..Default::default()
    };
    let mut model = Model::load(gpu.clone(), &m, &mopts).unwrap();
    let template = wgllm::chat::ChatTemplate::from_dir(&m).unwrap();
    let mut conv = Conversation::new(template, Some("Be brief.".into()));
    let opts = GenerateOptions {
        max_tokens: 40,
        sampling: Default::default(),
        stop_ids: vec![],
    };

    // Turn 1, interrupted after 5 tokens were shown.
    let shown = Cell::new(0usize);
    let g = conv
        .turn(
            &mut model,
            &tok,
            "hello".into(),
            &opts,
            &|| shown.get() >= 5,
            |_| shown.set(shown.get() + 1),
        )
        .unwrap();
    assert_eq!(g.stop_reason, "interrupted");
    assert_eq!(g.generated_ids.len(), 5);
    // Everything shown was run: the cache is the prompt and the whole reply.
    let want: Vec<u32> = g
        .prompt_ids
        .iter()
        .chain(&g.generated_ids)
        .copied()
        .collect();
    assert_eq!(conv.cached(), &want[..]);
    assert_eq!(model.position(), want.len());
    let last = conv.messages.last().unwrap();
    assert_eq!(last.role, "assistant");
    assert_eq!(
        last.content,
        tok.decode_skip_special(&g.generated_ids).unwrap()
    );

    // The cache's numbers: one more token on the continuing model against
    // a fresh model given the whole sequence. Prefill and decode kernels
    // sum in different orders: NMSE ~1e-12 here (the verify F32 bound is
    // 1e-8); a cache one token off is far outside it (checked below).
    let next = 97u32;
    let cont = model.forward_logits(&[next]).unwrap();
    model.truncate(want.len()).unwrap();
    let nmse = |a: &[f32], b: &[f32]| {
        let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
        num / b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>()
    };
    let mut fresh = Model::load(gpu.clone(), &m, &mopts).unwrap();
    let mut seq = want.clone();
    seq.push(next);
    let full = fresh.forward_logits(&seq).unwrap();
    assert!(nmse(&cont, &full) < 1e-8, "nmse {:e}", nmse(&cont, &full));
    fresh.reset();
    let off_by_one = fresh.forward_logits(&seq[1..]).unwrap();
    assert!(
        nmse(&off_by_one, &full) > 1e-6,
        "the check cannot tell a shifted cache"
    );

    // Turn 2 runs to max_tokens; the last sampled token was never run.
    let g2 = conv
        .turn(&mut model, &tok, "go on".into(), &opts, &|| false, |_| {})
        .unwrap();
    assert_eq!(
        (g2.generated_ids.len(), g2.stop_reason.as_str()),
        (40, "max_tokens")
    );
    let ids2 = {
        let mut c = Conversation::new(conv.template.clone(), None);
        c.messages = conv.messages[..conv.messages.len() - 1].to_vec();
        c.render_ids(&tok).unwrap()
    };
    let mut want2 = ids2.clone();
    want2.extend_from_slice(&g2.generated_ids[..39]);
    assert_eq!(conv.cached(), &want2[..]);
    assert_eq!(model.position(), want2.len());
    // Only the new tail of the conversation was run.
    assert!(g2.prompt_ids.len() < ids2.len());
    assert_eq!(
        &ids2[ids2.len() - g2.prompt_ids.len()..],
        &g2.prompt_ids[..]
    );

    // Interrupted before the first token: nothing shown, the prompt cached.
    let g3 = conv
        .turn(&mut model, &tok, "stop".into(), &opts, &|| true, |_| {})
        .unwrap();
    assert!(g3.generated_ids.is_empty() && g3.stop_reason == "interrupted");
    assert_eq!(conv.cached().len(), model.position());
    assert_eq!(conv.messages.last().unwrap().content, "");

    // A turn that cannot fit is an error that leaves the conversation as
    // it was and the cache consistent with it.
    let n_msgs = conv.messages.len();
    let big = GenerateOptions {
        max_tokens: 250,
        ..opts.clone()
    };
    let e = conv
        .turn(&mut model, &tok, "more".into(), &big, &|| false, |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("exceeds the context"), "{e}");
    assert_eq!(conv.messages.len(), n_msgs);
    assert_eq!(conv.cached().len(), model.position());
    conv.turn(&mut model, &tok, "more".into(), &opts, &|| false, |_| {})
        .unwrap();
    assert_eq!(conv.cached().len(), model.position());
}

/// With a repetition penalty, a turn that reuses the cache samples what the
/// same turn on an empty cache samples: the penalty's history is the whole
/// conversation, not only the tokens run in this turn.
#[test]
fn cached_turn_penalizes_the_whole_conversation() {
    use wgllm::generate::{Conversation, GenerateOptions};
    use wgllm::model::{Model, ModelOptions};

    let m = chat_model();
    let gpu = Arc::new(wgllm::Gpu::new(&Default::default()).expect("a wgpu adapter"));
    let tok = wgllm::tokenizer::Tokenizer::from_dir(&m).unwrap();
    let mopts = ModelOptions {
        max_context: Some(512),
        ..Default::default()
    };
    let template = wgllm::chat::ChatTemplate::from_dir(&m).unwrap();
    let opts = GenerateOptions {
        max_tokens: 100,
        sampling: wgllm::sampling::SamplingParams {
            repeat_penalty: 3.0,
            repeat_last_n: 0,
            ..Default::default()
        },
        stop_ids: vec![],
    };
    let mut model = Model::load(gpu.clone(), &m, &mopts).unwrap();
    let mut conv = Conversation::new(template.clone(), None);
    let nothing = |_: &str| {};
    conv.turn(
        &mut model,
        &tok,
        "the quick brown fox jumps over the lazy dog".into(),
        &opts,
        &|| false,
        nothing,
    )
    .unwrap();
    let cached = conv
        .turn(
            &mut model,
            &tok,
            "hello world, again".into(),
            &opts,
            &|| false,
            nothing,
        )
        .unwrap();
    // The conversation rendered for turn 2 (the cache now also holds 99 of
    // the 100 reply tokens).
    let all = conv.cached().len() - 99;
    assert!(
        cached.prompt_ids.len() < all,
        "the cache was reused: {} of {all} run",
        cached.prompt_ids.len()
    );

    // The same second turn on a fresh model: the whole conversation is run.
    let mut fresh_model = Model::load(gpu, &m, &mopts).unwrap();
    let mut fresh = Conversation::new(template, None);
    fresh.messages = conv.messages[..2].to_vec();
    let whole = fresh
        .turn(
            &mut fresh_model,
            &tok,
            "hello world, again".into(),
            &opts,
            &|| false,
            nothing,
        )
        .unwrap();
    assert_eq!(whole.prompt_ids.len(), all);
    assert_eq!(cached.generated_ids, whole.generated_ids);
}

// ------------------------------------------------------------------- bench

#[test]
fn bench_tiny() {
    let fx = fixture("qwen2_bias_tied");
    let args = [
        "bench",
        "--model",
        path(&fx),
        "--prompt-tokens",
        "8",
        "--gen-tokens",
        "4",
        // two repeats: the second runs the pipelined decodes first
        "--repeats",
        "2",
        "--probe-repeats",
        "1",
    ];
    let r = wgllm(&args).expect_code(0, "bench");
    for row in [
        "probe read",
        "prefill, tokens/s",
        "decode, tokens/s",
        "decode efficiency vs probe",
    ] {
        assert!(r.stdout.contains(row), "no `{row}` row:\n{}", r.stdout);
    }
    let mut json_args = args.to_vec();
    json_args.push("--json");
    let v = wgllm(&json_args).expect_code(0, "bench --json").json();
    assert_eq!(v["settings"]["prompt_tokens"], 8);
    assert_eq!(v["settings"]["gen_tokens"], 4);
    assert_eq!(v["model"]["vocab_size"], 512);
    assert!(v["decode"]["tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["prefill"]["tokens_per_s"]["median"].as_f64().unwrap() > 0.0);
    assert!(v["probe"]["gb_s"]["median"].as_f64().unwrap() > 0.0);
    // in either order, the pipelined greedy decode gives the blocking ids
    // and every repeat the same ones
    assert_eq!(v["decode"]["pipelined_identical_tokens"], true, "{v}");
    assert_eq!(v["decode"]["deterministic_across_repeats"], true, "{v}");
    wgllm(&["bench", "--model", "/no/such/model"]).expect_code(2, "bench on a missing model");
}
