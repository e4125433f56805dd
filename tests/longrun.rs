//! Long runs (issue #11): generation to the full context, the behaviour at
//! the context limit, and a soak of many sequential generations with reset,
//! on a tiny fixture so they fit in CI. Each prints resident memory
//! (`/proc/self/status` VmRSS / VmHWM) and the device allocator's total
//! (wgpu's `generate_allocator_report`, when the backend provides one) at
//! the start and the end. The full-size runs are `#[ignore]`d with the
//! command to run them; their figures are in BENCHMARKS.md.

mod common;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use common::*;
use safetensors::Dtype;
use wgllm::model::{Model, ModelOptions};
use wgllm::{Gpu, GpuOptions};

/// The tests measure process-wide memory, so they run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn gpu() -> Arc<Gpu> {
    static G: OnceLock<Arc<Gpu>> = OnceLock::new();
    G.get_or_init(|| {
        Arc::new(Gpu::new(&GpuOptions::default()).unwrap_or_else(|e| panic!("test GPU: {e}")))
    })
    .clone()
}

/// The same on wgpu's GL backend (llvmpipe here), whose kernels keep their
/// parameters in uniform buffers (the path every non-lavapipe adapter
/// takes), so both bindings are soaked in CI.
fn gpu_gl() -> Arc<Gpu> {
    static G: OnceLock<Arc<Gpu>> = OnceLock::new();
    G.get_or_init(|| {
        let opts = GpuOptions {
            backends: Some(wgllm::gpu::BackendChoice(wgpu::Backends::GL)),
            ..Default::default()
        };
        Arc::new(Gpu::new(&opts).unwrap_or_else(|e| panic!("GL test GPU: {e}")))
    })
    .clone()
}

/// (VmRSS, VmHWM) in KiB.
fn rss_kib() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |k: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Bytes the device allocator holds, when the backend reports it.
fn device_bytes(g: &Gpu) -> Option<u64> {
    g.device
        .generate_allocator_report()
        .map(|r| r.total_allocated_bytes)
}

fn tiny_model(max_context: usize) -> (tempfile::TempDir, Model) {
    tiny_model_on(gpu(), max_context)
}

fn tiny_model_on(g: Arc<Gpu>, max_context: usize) -> (tempfile::TempDir, Model) {
    let d = tempfile::tempdir().unwrap();
    let m = Tiny::new("LlamaForCausalLM");
    write_model(d.path(), &m, Dtype::BF16, 11);
    let opts = ModelOptions {
        max_context: Some(max_context),
        ..Default::default()
    };
    let model = Model::load(g, d.path(), &opts).unwrap_or_else(|e| panic!("load: {e}"));
    (d, model)
}

/// Greedy generation of `n` tokens after `prompt`, from an empty cache.
fn greedy(model: &mut Model, prompt: &[u32], n: usize) -> Vec<u32> {
    model.reset();
    let mut out = Vec::with_capacity(n);
    let mut id = model.forward_next(prompt).unwrap();
    out.push(id);
    while out.len() < n {
        id = model.forward_next(&[id]).unwrap();
        out.push(id);
        if out.len() % 64 == 0 {
            // Fail fast rather than exhaust a shared machine's memory.
            let rss = rss_kib().0;
            assert!(
                rss <= RSS_CEILING_KIB,
                "VmRSS reached {rss} KiB after {} tokens",
                out.len()
            );
        }
    }
    out
}

/// A tiny model's process stays far under this; past it the run stops.
const RSS_CEILING_KIB: u64 = 1024 * 1024;

/// Memory may move by allocator noise (page-granular arenas, wgpu's staging
/// belt); growth proportional to the tokens generated would be far above
/// this over thousands of steps, so it is the bound for "flat".
const FLAT_RSS_KIB: u64 = 16 * 1024;

fn full_context(ctx: usize) {
    full_context_on(gpu(), ctx)
}

fn full_context_on(g: Arc<Gpu>, ctx: usize) {
    let _s = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (_d, mut model) = tiny_model_on(g.clone(), ctx);
    let prompt = [1u32, 5, 9, 2];
    // Warm up (pipelines, first allocations), then measure.
    greedy(&mut model, &prompt, 8);
    let (rss0, _) = rss_kib();
    let dev0 = device_bytes(&g);
    let t = Instant::now();
    let out = greedy(&mut model, &prompt, ctx - prompt.len() + 1);
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(model.position(), ctx, "the cache is exactly full");
    let (rss1, hwm) = rss_kib();
    let dev1 = device_bytes(&g);
    println!(
        "full context {ctx}: {} tokens in {secs:.1} s ({:.0} tok/s); VmRSS {rss0} -> {rss1} KiB (VmHWM {hwm}); device {dev0:?} -> {dev1:?} bytes",
        out.len(),
        out.len() as f64 / secs
    );
    assert!(out.iter().all(|&t| (t as usize) < 96));
    // At the limit: one more token is refused, naming the numbers.
    let e = model
        .forward_next(&[out[out.len() - 1]])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!(
            "context full: {ctx} tokens in the cache + 1 new > max context {ctx}"
        )),
        "{e}"
    );
    // After reset the model works again and repeats itself exactly.
    assert_eq!(greedy(&mut model, &prompt, 8), out[..8]);
    assert!(
        rss1 <= rss0 + FLAT_RSS_KIB,
        "resident memory grew {} KiB over the run",
        rss1 - rss0
    );
    assert_eq!(dev0, dev1, "device allocations changed during generation");
}

/// On the default adapter (lavapipe here). Before kernels bound their
/// parameters as storage on lavapipe (`wgllm::gpu::ParamsBinding`), host
/// memory grew ~5 MB per forward pass here and this stopped at the 1 GiB
/// guard after 64 tokens.
#[test]
fn tiny_model_generates_to_a_1024_token_context() {
    full_context(1024);
}

/// The CI-sized full-context run on the GL backend (see `gpu_gl`).
#[test]
fn tiny_model_generates_to_a_1024_token_context_on_gl() {
    full_context_on(gpu_gl(), 1024);
}

#[test]
#[ignore = "long run: cargo test --release --test longrun -- --ignored --nocapture full_context_4096"]
fn tiny_model_full_context_4096() {
    full_context(4096);
}

/// A prompt longer than the context, and prompt + max_tokens over it, are
/// refused before anything runs, with the numbers and the flag to change.
#[test]
fn prompt_longer_than_the_context_and_empty_prompt_are_refused() {
    let _s = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (_d, mut model) = tiny_model(16);
    let long: Vec<u32> = (0..17).map(|i| i % 90).collect();
    let e = model.forward_next(&long).unwrap_err().to_string();
    assert!(
        e.contains("context full: 0 tokens in the cache + 17 new > max context 16"),
        "{e}"
    );
    assert_eq!(
        model.position(),
        0,
        "a refused pass leaves the cache as it was"
    );
    let e = model.forward_next(&[]).unwrap_err().to_string();
    assert!(e.contains("no tokens to process"), "{e}");

    // Through generate(): the pre-check names prompt, max tokens, context,
    // and the settings to change (as the CLI renders them: its flags).
    let tok = tiny_tokenizer();
    let opts = wgllm::generate::GenerateOptions {
        max_tokens: 8,
        sampling: Default::default(),
        stop_ids: vec![],
    };
    let e = wgllm::generate::generate(&mut model, &tok, &long[..10], &opts, |_| {}).unwrap_err();
    assert_eq!(
        e.settings(),
        [
            wgllm::error::Setting::MaxTokens,
            wgllm::error::Setting::MaxContext
        ]
    );
    let e = e.render(&wgllm::cli::Flags);
    assert!(
        e.contains("prompt (10 tokens) + 8 new tokens = 18 exceeds the context of 16 tokens")
            && e.contains("(lower --max-tokens or raise --max-context)"),
        "{e}"
    );
    let e = wgllm::generate::generate(&mut model, &tok, &[], &opts, |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("the prompt encodes to no tokens: give a non-empty prompt"),
        "{e}"
    );
}

/// A byte-level tokenizer (only needed for generate()'s signature here):
/// the committed fuzz seed written by the GGUF tokenizer writer.
fn tiny_tokenizer() -> wgllm::tokenizer::Tokenizer {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus/tokenizer/valid-gpt2.json");
    wgllm::tokenizer::Tokenizer::from_json_bytes(&p, &std::fs::read(&p).unwrap()).unwrap()
}

fn soak(g: Arc<Gpu>, runs: usize, n: usize) {
    let _s = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (_d, mut model) = tiny_model_on(g.clone(), 256);
    let prompt = [3u32, 1, 4, 1, 5, 9, 2, 6];
    let first = greedy(&mut model, &prompt, n);
    let (rss0, _) = rss_kib();
    let dev0 = device_bytes(&g);
    let mut times = Vec::with_capacity(runs);
    for i in 0..runs {
        let t = Instant::now();
        let out = greedy(&mut model, &prompt, n);
        times.push(t.elapsed().as_secs_f64());
        assert_eq!(out, first, "generation {i} differs from the first");
        let rss = rss_kib().0;
        if i % 20 == 0 {
            println!("  generation {i}: VmRSS {rss} KiB");
        }
        // Fail fast (instead of exhausting a shared machine's memory).
        assert!(
            rss <= rss0 + FLAT_RSS_KIB,
            "resident memory grew {} KiB after {} generations of {n} tokens",
            rss - rss0,
            i + 1
        );
    }
    let (rss1, hwm) = rss_kib();
    let dev1 = device_bytes(&g);
    let q = runs / 4;
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64 * 1e3;
    println!(
        "soak {runs} x {n} tokens: ms per generation first quarter {:.1}, last quarter {:.1}; VmRSS {rss0} -> {rss1} KiB (VmHWM {hwm}); device {dev0:?} -> {dev1:?} bytes",
        mean(&times[..q.max(1)]),
        mean(&times[runs - q.max(1)..])
    );
    assert!(
        rss1 <= rss0 + FLAT_RSS_KIB,
        "resident memory grew {} KiB over {runs} generations",
        rss1 - rss0
    );
    assert_eq!(dev0, dev1, "device allocations changed during the soak");
}

/// On the default adapter (lavapipe here); see
/// `tiny_model_generates_to_a_1024_token_context` for what this caught.
#[test]
fn soak_200_generations_with_reset_are_identical_and_flat() {
    soak(gpu(), 200, 16);
}

/// The CI-sized soak, on the GL backend (see `gpu_gl`): 200 generations of
/// 16 tokens with reset, identical output, flat memory.
#[test]
fn soak_200_generations_on_gl_are_identical_and_flat() {
    soak(gpu_gl(), 200, 16);
}
