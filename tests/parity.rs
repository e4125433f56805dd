//! Parity with PyTorch on the tiny fixtures (tests/fixtures, made by
//! tools/make_tiny_models.py and tools/dump_reference.py): every tap of the
//! GPU forward and of the CPU reference forward against transformers in f32,
//! the GPU against transformers' native bf16 run at the bf16 tolerances, and
//! greedy continuations token for token.

mod common;

use common::{fixture, gpu, load_sized, read_ints, FIXTURES};

use wgllm::compare::{compare, RefKind, Tolerances};
use wgllm::config::Arch;
use wgllm::loader::{Checkpoint, HostWeights, LoadDType, MemoryPlan};
use wgllm::reference::CpuModel;
use wgllm::taps::TapSet;
use wgllm::GpuOptions;

/// Taps per layer, counted from each family's modeling code (written out
/// here, not taken from wgllm's program, so a dropped tap cannot hide).
fn taps_per_layer(arch: Arch) -> usize {
    match arch {
        // attn_norm q k v q_rope k_rope attn attn_out resid_attn mlp_norm mlp_out out
        Arch::Llama | Arch::Qwen2 | Arch::Mistral => 12,
        // + q_norm k_norm
        Arch::Qwen3 => 14,
        // + q_norm k_norm post_attn_norm post_mlp_norm
        Arch::Gemma3 => 16,
    }
}

/// CI runs this file on several devices through wgllm's own variables
/// (WGLLM_BACKEND, WGLLM_KERNELS), read by `Gpu::new` as the CLI reads them:
/// the device really is the one asked for, and the log says which it was.
#[test]
fn device_is_the_one_the_environment_asks_for() {
    let g = gpu();
    eprintln!(
        "parity device: {} ({:?}), kernels {}",
        g.name(),
        g.adapter.info.backend,
        g.kernels_desc()
    );
    let (backends, by) = GpuOptions::default().resolve_backends().unwrap();
    assert!(
        backends.contains(g.adapter.info.backend.into()),
        "{by} asks for {backends:?}, got {:?}",
        g.adapter.info.backend
    );
    let (choice, _) = GpuOptions::default().resolve_kernels().unwrap();
    assert_eq!(g.caps.kernels, choice.resolve(g.caps.is_cpu));
}

#[test]
fn gpu_taps_match_pytorch_f32_at_every_tap() {
    for name in FIXTURES {
        let r = fixture(name).join("reference_f32.safetensors");
        let tokens = read_ints(&r, "tokens");
        let mut m = load_sized(name, tokens.len(), tokens.len());
        let got = m.forward_taps(&tokens).unwrap();
        let want = TapSet::load(&r).unwrap();
        // Default F32 tolerances (see compare::Tolerances::defaults).
        let rep = compare(
            &got,
            &want,
            name,
            RefKind::F32,
            &Tolerances::defaults(RefKind::F32),
        );
        assert!(rep.pass, "{name}:\n{}", rep.table());
        // every tap the model produces was compared (no silent gaps)
        let per_layer = taps_per_layer(m.cfg.arch);
        assert_eq!(rep.rows.len(), 2 + per_layer * m.cfg.num_hidden_layers + 1);
    }
}

#[test]
fn gpu_taps_match_pytorch_bf16_within_bf16_tolerances() {
    for name in FIXTURES {
        let r = fixture(name).join("reference_bf16.safetensors");
        let tokens = read_ints(&r, "tokens");
        let mut m = load_sized(name, tokens.len(), tokens.len());
        let got = m.forward_taps(&tokens).unwrap();
        let want = TapSet::load(&r).unwrap();
        let rep = compare(
            &got,
            &want,
            name,
            RefKind::Bf16,
            &Tolerances::defaults(RefKind::Bf16),
        );
        assert!(rep.pass, "{name}:\n{}", rep.table());
    }
}

#[test]
fn cpu_reference_matches_pytorch_f32_at_every_tap() {
    for name in FIXTURES {
        let r = fixture(name).join("reference_f32.safetensors");
        let tokens = read_ints(&r, "tokens");
        let ckpt = Checkpoint::open(fixture(name)).unwrap();
        let plan = MemoryPlan::new(&ckpt.config, &ckpt, LoadDType::Auto, &gpu().caps).unwrap();
        let host = HostWeights::load(&ckpt, &plan).unwrap();
        let mut cpu = CpuModel::new(&ckpt.config, &host, tokens.len()).unwrap();
        let got = cpu.forward(&tokens).unwrap();
        let want = TapSet::load(&r).unwrap();
        let rep = compare(
            &got,
            &want,
            name,
            RefKind::F32,
            &Tolerances::defaults(RefKind::F32),
        );
        assert!(rep.pass, "{name}:\n{}", rep.table());
    }
}

/// Greedy decoding on the GPU: prefill the prompt in one pass, then one
/// token per step through the KV cache; must equal transformers' generate.
#[test]
fn greedy_continuations_match_transformers_token_for_token() {
    for name in FIXTURES {
        let r = fixture(name).join("reference_f32.safetensors");
        let tokens = read_ints(&r, "tokens");
        let want = read_ints(&r, "generated");
        let mut m = load_sized(name, tokens.len() + want.len(), tokens.len());
        let mut got = vec![m.forward_next(&tokens).unwrap()];
        while got.len() < want.len() {
            let last = *got.last().unwrap();
            got.push(m.forward_next(&[last]).unwrap());
        }
        assert_eq!(got, want, "{name}: GPU greedy");
        assert_eq!(m.position(), tokens.len() + want.len() - 1);
    }
}

#[test]
fn cpu_reference_greedy_matches_transformers() {
    for name in ["qwen2_bias_tied", "llama3_rope_scaling", "gemma3_window"] {
        let r = fixture(name).join("reference_f32.safetensors");
        let tokens = read_ints(&r, "tokens");
        let want = read_ints(&r, "generated");
        let ckpt = Checkpoint::open(fixture(name)).unwrap();
        let plan = MemoryPlan::new(&ckpt.config, &ckpt, LoadDType::Auto, &gpu().caps).unwrap();
        let host = HostWeights::load(&ckpt, &plan).unwrap();
        let mut cpu = CpuModel::new(&ckpt.config, &host, tokens.len() + want.len()).unwrap();
        assert_eq!(
            cpu.generate_greedy(&tokens, want.len()).unwrap(),
            want,
            "{name}"
        );
    }
}

/// The same prompt run in one pass, in uneven chunks (max_batch 5), and one
/// token at a time must give the same last-token logits: positions, the KV
/// cache and the causal mask (and, past the window, the sliding window of
/// Gemma 3's sliding layers and of every Mistral layer) are consistent across
/// entry points.
#[test]
fn chunked_prefill_and_decode_agree_with_one_pass() {
    // llama3_rope_scaling: 40 tokens, positions pass original_max 32;
    // the windowed fixtures: 28 tokens over a window of 8.
    for name in ["llama3_rope_scaling", "gemma3_window", "mistral_window"] {
        let r = fixture(name).join("reference_f32.safetensors");
        let tokens = read_ints(&r, "tokens");
        let want = TapSet::load(&r).unwrap();
        let wl = want.get("logits").unwrap();
        let last_ref = &wl.data[(wl.rows - 1) * wl.cols..];
        for batch in [tokens.len(), 5, 1] {
            let mut m = load_sized(name, tokens.len(), batch);
            let got = m.forward_logits(&tokens).unwrap();
            let met = wgllm::compare::metrics(&got, last_ref);
            // same f32 bound as the taps
            let bound = Tolerances::defaults(RefKind::F32).default.nmse;
            assert!(
                met.nmse < bound,
                "{name} batch {batch}: nmse {:e}",
                met.nmse
            );
        }
    }
}

#[test]
fn reset_and_truncate_reuse_the_cache() {
    let name = "qwen2_bias_tied";
    let r = fixture(name).join("reference_f32.safetensors");
    let tokens = read_ints(&r, "tokens");
    let mut m = load_sized(name, 64, 16);
    let a = m.forward_logits(&tokens).unwrap();
    // a different sequence, then reset: the same prompt must give the same
    // logits (bit for bit: same kernels, same order)
    m.reset();
    m.forward_logits(&[1, 2, 3]).unwrap();
    m.reset();
    assert_eq!(m.forward_logits(&tokens).unwrap(), a);
    // truncate to a prefix and re-run the rest
    m.truncate(5).unwrap();
    assert_eq!(m.forward_logits(&tokens[5..]).unwrap(), a);
    assert!(m.truncate(1000).is_err());
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let mut m = load_sized("qwen2_bias_tied", 16, 8);
    let e = m.forward_next(&[]).unwrap_err().to_string();
    assert!(e.contains("no tokens"), "{e}");
    let e = m.forward_next(&[512]).unwrap_err().to_string();
    assert!(e.contains("outside the vocabulary"), "{e}");
    let e = m.forward_next(&[1; 17]).unwrap_err().to_string();
    assert!(e.contains("context full"), "{e}");
}
