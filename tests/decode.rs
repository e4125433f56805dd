//! The pipelined greedy decode (`Model::decode_greedy`: the argmax feeds the
//! next step on the GPU, steps in flight, ids read back through a ring):
//! the same ids as transformers and as the blocking one-step-at-a-time path,
//! a stop that leaves the KV cache exactly as if the wasted steps never ran,
//! and no buffer, bind group or pipeline created per token.

mod common;

use std::sync::Arc;

use common::{assert_nothing_created, fixture, fixture_reference, gpu, load_sized};

use wgllm::model::{Model, ModelOptions};
use wgllm::{Gpu, GpuOptions};

const FIXTURES: [&str; 4] = [
    "qwen2_bias_tied",
    "llama_gqa3_untied",
    "qwen3_qk_norm",
    "gemma3_window",
];

/// Prefill, then `steps` pipelined steps at `depth`: every id delivered.
fn pipelined(m: &mut Model, prompt: &[u32], steps: usize, depth: usize) -> Vec<u32> {
    let first = m.forward_next(prompt).unwrap();
    let mut got = vec![first];
    let run = m
        .decode_greedy(first, steps, depth, |id| {
            got.push(id);
            Ok(true)
        })
        .unwrap();
    assert_eq!((run.submitted, run.kept), (steps, steps));
    got
}

#[test]
fn pipelined_greedy_matches_transformers_at_every_depth() {
    for name in FIXTURES {
        let (tokens, want) = fixture_reference(name);
        let mut m = load_sized(name, tokens.len() + want.len(), tokens.len());
        for depth in [1, 3, 7] {
            m.reset();
            let got = pipelined(&mut m, &tokens, want.len() - 1, depth);
            assert_eq!(got, want, "{name} depth {depth}");
            assert_eq!(m.position(), tokens.len() + want.len() - 1);
        }
    }
}

/// A stop after a few ids, with steps in flight past it: the cache keeps
/// exactly the delivered steps, so the blocking path continues from there
/// with transformers' next ids (the wasted steps' KV rows get overwritten).
#[test]
fn a_stop_discards_the_steps_in_flight() {
    let name = "llama_gqa3_untied";
    let (tokens, want) = fixture_reference(name);
    assert!(
        want.len() >= 6,
        "{name}: the fixture generates {}",
        want.len()
    );
    let mut m = load_sized(name, tokens.len() + want.len(), tokens.len());
    let first = m.forward_next(&tokens).unwrap();
    let mut got = vec![first];
    let run = m
        .decode_greedy(first, want.len() - 1, 4, |id| {
            got.push(id);
            Ok(got.len() < 4)
        })
        .unwrap();
    assert_eq!(got, want[..4]);
    assert_eq!(run.kept, 3);
    assert!(
        run.submitted > run.kept,
        "steps were in flight past the stop"
    );
    assert_eq!(m.position(), tokens.len() + 3);
    let mut last = got[3];
    for &w in &want[4..] {
        last = m.forward_next(&[last]).unwrap();
        assert_eq!(last, w, "{name}: after the stop");
    }
    // and a pipelined decode from there, too
    m.truncate(tokens.len() + 3).unwrap();
    let mut again = vec![];
    m.decode_greedy(got[3], want.len() - 4, 3, |id| {
        again.push(id);
        Ok(true)
    })
    .unwrap();
    assert_eq!(again, want[4..]);
}

/// After warm-up, neither decode path creates a buffer, bind group or
/// pipeline; the recorder's dispatch count equals what the bound ops say.
#[test]
fn nothing_is_created_per_token_and_dispatches_are_counted() {
    let name = "qwen2_bias_tied";
    let (tokens, want) = fixture_reference(name);
    // its own device: the other tests run in parallel on the shared one
    let g = Arc::new(Gpu::new(&GpuOptions::default()).expect("GPU"));
    let opts = ModelOptions {
        max_context: Some(tokens.len() + want.len()),
        max_batch: tokens.len(),
        ..Default::default()
    };
    let mut m = Model::load(g.clone(), &fixture(name), &opts).unwrap();
    pipelined(&mut m, &tokens, 2, 3);
    m.reset();
    let before = g.counters.snapshot();
    let first = m.forward_next(&tokens).unwrap();
    let after_prefill = g.counters.snapshot();
    let run = m
        .decode_greedy(first, want.len() - 1, 3, |_| Ok(true))
        .unwrap();
    let mut id = first;
    m.truncate(tokens.len()).unwrap();
    for _ in 0..3 {
        id = m.forward_next(&[id]).unwrap();
    }
    m.forward_logits(&[id]).unwrap();
    let after = g.counters.snapshot();
    assert_nothing_created(&before, &after, "per token");
    let per_op: usize = m.decode_ops().iter().map(|o| o.dispatches).sum();
    assert_eq!(run.dispatches_per_step, per_op as u64);
    // the pipelined steps and 3 + 1 blocking one-token steps each record
    // exactly the decode step's ops
    assert_eq!(
        after.dispatches - after_prefill.dispatches,
        (run.submitted as u64 + 4) * per_op as u64
    );
    // the prefill pass records the same ops, except that attention over a
    // many-token step needs no split-KV combine pass (one dispatch fewer
    // per layer than a decode step's split attention) and that the
    // one-token fusions (q/k/v + RoPE + KV append: 4 dispatches -> 1;
    // gate/up + GLU: 3 -> 1) record their unfused ops
    let prefill = after_prefill.dispatches - before.dispatches;
    let one_token_fusions = 5 * m.cfg.num_hidden_layers as u64;
    assert!(
        prefill > 0 && prefill <= per_op as u64 + one_token_fusions,
        "prefill pass: {prefill} dispatches, decode step: {per_op}"
    );
}

/// The fixtures of the fused-path test and the dispatches per layer its
/// fusions save against the op-by-op path: RoPE of q and k and the KV
/// append in one dispatch (3 -> 1), the residual add and the next RMSNorm in
/// one (2 -> 1), gate/up and the GLU in one (3 -> 1), and where there is no
/// per-head q/k norm between them, the q/k/v projections with that RoPE and
/// append in one (6 -> 1 in all).
const FUSED_FIXTURES: [(&str, usize); 7] = [
    ("qwen2_bias_tied", 5 + 1 + 2),
    ("llama_gqa3_untied", 5 + 1 + 2),
    ("llama3_rope_scaling", 5 + 1 + 2),
    ("mistral_window", 5 + 1 + 2),
    ("mistral_head_dim", 5 + 1 + 2),
    ("qwen3_qk_norm", 2 + 1 + 2),
    ("gemma3_window", 2 + 1 + 2),
];

/// The fast path (the fusions of [`FUSED_FIXTURES`]) and the op-by-op path
/// taps record give the same logits and the same KV cache, bit for bit,
/// prefill and one-token steps alike: the fused kernels do the same f32
/// operations on the same values in the same order (each row summed by the
/// GEMV's own inner loop and reduction), so there is no tolerance to give.
/// CI runs this file under both kernel profiles and both backends.
#[test]
fn fused_and_op_by_op_paths_agree_bit_for_bit() {
    for (name, saved) in FUSED_FIXTURES {
        let (tokens, want) = fixture_reference(name);
        let ctx = tokens.len() + want.len();
        let mut fused = load_sized(name, ctx, tokens.len());
        let mut plain = load_sized(name, ctx, tokens.len());
        plain.set_fuse(false);
        let layers = fused.cfg.num_hidden_layers;
        let total = |m: &Model| (0..layers).map(|l| m.layer_dispatches(l)).sum::<usize>();
        // per layer as FUSED_FIXTURES says; at each layer boundary, the out
        // add + the next layer's attn_norm -> 1
        assert_eq!(
            total(&fused) + saved * layers + (layers - 1),
            total(&plain),
            "{name}: the fast path's dispatches"
        );
        let mut input = tokens.clone();
        for (step, &next) in want.iter().enumerate() {
            let a = fused.forward_logits(&input).unwrap();
            let b = plain.forward_logits(&input).unwrap();
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{name} step {step}: logits differ"
            );
            input = vec![next];
        }
        let g = gpu();
        let n = fused.kv_cache(0).params.cache_bytes() as usize / 4;
        for l in 0..layers {
            let (fk, pk) = (fused.kv_cache(l), plain.kv_cache(l));
            assert_eq!(
                g.read_f32(&fk.k, n).unwrap(),
                g.read_f32(&pk.k, n).unwrap(),
                "{name} layer {l}: K cache"
            );
            assert_eq!(
                g.read_f32(&fk.v, n).unwrap(),
                g.read_f32(&pk.v, n).unwrap(),
                "{name} layer {l}: V cache"
            );
        }
    }
}

/// `context_hint` (what `wgllm run` passes: prompt + max new tokens) caps
/// only the default KV cache: an explicit `max_context` wins, a hint past
/// the default changes nothing, and a model sized exactly to its hint
/// decodes the same ids as one with the full default context.
#[test]
fn context_hint_caps_only_the_default_kv_cache() {
    let name = "qwen2_bias_tied"; // max_position_embeddings 256
    let (tokens, want) = fixture_reference(name);
    let load = |max_context: Option<usize>, hint: Option<usize>, max_batch: usize| {
        common::load_fixture(
            name,
            &ModelOptions {
                max_context,
                context_hint: hint,
                max_batch,
                ..Default::default()
            },
        )
    };
    let need = tokens.len() + want.len();
    assert_eq!(load(None, None, 128).max_context, 256);
    assert_eq!(load(None, Some(10_000), 128).max_context, 256);
    assert_eq!(load(Some(64), Some(10), 128).max_context, 64);
    let mut full = load(None, None, 128);
    // Sized as `run` sizes it: the KV cache for exactly the generation and
    // the prefill batch for exactly the prompt.
    let mut fit = load(None, Some(need), tokens.len());
    assert_eq!((fit.max_context, fit.max_batch), (need, tokens.len()));
    let steps = want.len() - 1;
    let a = pipelined(&mut full, &tokens, steps, 2);
    let b = pipelined(&mut fit, &tokens, steps, 2);
    assert_eq!(a, want, "{name}: the default context against transformers");
    assert_eq!(b, a, "{name}: the fitted context against the default");
}
