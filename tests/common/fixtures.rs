//! The committed tiny fixtures (tests/fixtures), the GPU the tests share,
//! a byte-level tokenizer for the fixtures' 512-token vocabularies, and the
//! built `wgllm` binary: what several test files need the same way.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, OnceLock};

use wgllm::gpu::CounterSnapshot;
use wgllm::model::{Model, ModelOptions};
use wgllm::tokenizer::{token_type, Tokenizer, VocabSpec};
use wgllm::{Gpu, GpuOptions};

/// The built binary (cargo builds it for integration tests).
pub const WGLLM: &str = env!("CARGO_BIN_EXE_wgllm");

/// Every committed tiny fixture (tools/make_tiny_models.py), one per
/// family and feature the loader and program must get right.
pub const FIXTURES: [&str; 8] = [
    "qwen2_bias_tied",
    "llama_gqa3_untied",
    "llama3_rope_scaling",
    "mistral_head_dim",
    "qwen2_big_vocab",
    "qwen3_qk_norm",
    "gemma3_window",
    "mistral_window",
];

/// The repository's root (the crate's manifest folder).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A committed fixture's folder, `tests/fixtures/<name>`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Integer tensor `name` of a reference file (e.g. `tokens`, `generated`
/// in a fixture's `reference_f32.safetensors`), as token ids.
pub fn read_ints(path: &Path, name: &str) -> Vec<u32> {
    wgllm::taps::read_i32(path, name)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .unwrap_or_else(|| panic!("{}: no `{name}`", path.display()))
        .into_iter()
        .map(|x| {
            u32::try_from(x).unwrap_or_else(|_| panic!("{}: `{name}` holds {x}", path.display()))
        })
        .collect()
}

/// A fixture's prompt and transformers' greedy continuation of it
/// (`tokens` and `generated` of its `reference_f32.safetensors`).
pub fn fixture_reference(name: &str) -> (Vec<u32>, Vec<u32>) {
    let r = fixture(name).join("reference_f32.safetensors");
    (read_ints(&r, "tokens"), read_ints(&r, "generated"))
}

/// The token ids in a fixture's `prompt.json` (`{"tokens": [...]}`).
pub fn prompt_json_tokens(name: &str) -> Vec<u32> {
    let path = fixture(name).join("prompt.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let p: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    p["tokens"]
        .as_array()
        .unwrap_or_else(|| panic!("{}: no `tokens` list", path.display()))
        .iter()
        .map(|t| {
            t.as_u64()
                .and_then(|t| u32::try_from(t).ok())
                .unwrap_or_else(|| panic!("{}: token {t} is not a u32", path.display()))
        })
        .collect()
}

/// One GPU per test binary (the device the environment asks for, as the
/// CLI picks it).
pub fn gpu() -> Arc<Gpu> {
    static G: OnceLock<Arc<Gpu>> = OnceLock::new();
    G.get_or_init(|| Arc::new(Gpu::new(&GpuOptions::default()).expect("GPU")))
        .clone()
}

/// Fixture `name` loaded on [`gpu`].
pub fn load_fixture(name: &str, opts: &ModelOptions) -> Model {
    Model::load(gpu(), &fixture(name), opts).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Fixture `name` on [`gpu`] with a KV cache of `max_context` tokens and
/// passes of up to `max_batch` tokens.
pub fn load_sized(name: &str, max_context: usize, max_batch: usize) -> Model {
    let opts = ModelOptions {
        max_context: Some(max_context),
        max_batch,
        ..Default::default()
    };
    load_fixture(name, &opts)
}

/// Nothing was created on the device between two counter snapshots (no
/// buffer, bind group or pipeline `per`: "per token", "per step").
pub fn assert_nothing_created(before: &CounterSnapshot, after: &CounterSnapshot, per: &str) {
    assert_eq!(after.buffers, before.buffers, "buffers created {per}");
    assert_eq!(after.bind_groups, before.bind_groups, "bind groups {per}");
    assert_eq!(after.pipelines, before.pipelines, "pipelines {per}");
}

/// One scratch folder per test process under cargo's target/tmp, named
/// after the test file (statics are never dropped, so it is not removed at
/// exit: what a failed test wrote stays there to look at).
pub fn scratch() -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        tempfile::Builder::new()
            .prefix(&format!("{}-", env!("CARGO_CRATE_NAME")))
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .unwrap()
    })
    .path()
    .to_path_buf()
}

/// A command for the binary with its model cache in `cache` (so a test
/// never writes to or reads from the user's cache) and the device left to
/// the binary's default (`WGLLM_ADAPTER` removed).
pub fn wgllm_command(cache: &Path) -> Command {
    let mut c = Command::new(WGLLM);
    c.env("WGLLM_CACHE", cache).env_remove("WGLLM_ADAPTER");
    c
}

/// Runs the built binary with `args`: the variables `cleared` removed from
/// its environment (so the caller's settings, CI's `WGLLM_KERNELS` for one,
/// cannot leak into a test that chooses them), then `env` set.
pub fn wgllm_output(cleared: &[&str], env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut c = Command::new(WGLLM);
    c.args(args);
    for k in cleared {
        c.env_remove(k);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("running wgllm")
}

/// A process's stdout or stderr as text (invalid UTF-8 replaced).
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// GPT-2's byte-to-unicode map (the byte-level BPE alphabet).
pub fn byte_symbol(b: u8) -> char {
    let direct = |b: u8| (b'!'..=b'~').contains(&b) || (0xa1..=0xac).contains(&b) || b >= 0xae;
    if direct(b) {
        char::from(b)
    } else {
        let n = (0..b).filter(|&x| !direct(x)).count() as u32;
        char::from_u32(256 + n).unwrap()
    }
}

/// The ChatML template (Qwen2's, without a default system message).
pub const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// A 512-token byte-level vocabulary, the size of the fixtures' vocab: 256
/// byte tokens, 254 merges of letter pairs, then the control tokens
/// `<|im_start|>` (510) and `<|im_end|>` (511, the EOS); with [`CHATML`].
pub fn byte_level_vocab() -> VocabSpec {
    let mut tokens: Vec<String> = (0..=255u8).map(|b| byte_symbol(b).to_string()).collect();
    let mut merges = Vec::new();
    'outer: for a in b'a'..=b'z' {
        for b in b'a'..=b'z' {
            if tokens.len() == 510 {
                break 'outer;
            }
            let (a, b) = (char::from(a), char::from(b));
            merges.push(format!("{a} {b}"));
            tokens.push(format!("{a}{b}"));
        }
    }
    let mut types = vec![token_type::NORMAL; tokens.len()];
    for t in ["<|im_start|>", "<|im_end|>"] {
        tokens.push(t.into());
        types.push(token_type::CONTROL);
    }
    assert_eq!(tokens.len(), 512);
    VocabSpec {
        model: "gpt2".into(),
        pre: Some("gpt2".into()),
        eos: Some(511),
        tokens,
        token_types: Some(types),
        merges,
        chat_template: Some(CHATML.into()),
        ..Default::default()
    }
}

/// [`byte_level_vocab`] as a tokenizer.
pub fn byte_level_tokenizer() -> Tokenizer {
    Tokenizer::from_vocab_spec(&byte_level_vocab()).unwrap()
}

/// Fixture `base`'s config, generation config and weights, plus the
/// [`byte_level_vocab`] tokenizer and template (written by the library's
/// own `write_tokenizer_files`), in the folder `dir` (created).
pub fn with_tokenizer(base: &str, dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    for f in ["config.json", "generation_config.json", "model.safetensors"] {
        std::fs::copy(fixture(base).join(f), dir.join(f))
            .unwrap_or_else(|e| panic!("copying {f} of {base}: {e}"));
    }
    wgllm::tokenizer::write_tokenizer_files(&byte_level_vocab(), dir).unwrap();
    dir.to_path_buf()
}
