//! `weights=texture` against `weights=buffer` on the fixtures (issue #9).
//! In a test binary of its own: it opens two more devices, and on wgpu's GL
//! backend several devices busy in parallel threads of one process can time
//! out on the adapter's context lock (wgpu-hal's "Could not lock adapter
//! context") under a loaded machine.

mod common;

use std::sync::Arc;

use common::{fixture, fixture_reference};

use wgllm::model::{Model, ModelOptions};
use wgllm::{Gpu, GpuOptions};

const FIXTURES: [&str; 4] = [
    "qwen2_bias_tied",
    "llama_gqa3_untied",
    "qwen3_qk_norm",
    "gemma3_window",
];

/// `weights=texture` (issue #9: bf16 Linear weights and the tied embedding
/// as rgba32uint textures, the CPU profile's default) reads the same bytes
/// as `weights=buffer` and every kernel sums them in the same order, so
/// prefill and decode logits must be the same bits; no tolerance. The
/// fixtures are loaded as bf16 (the layout holds bf16 only), and the test
/// checks that the texture model really holds textures.
#[test]
fn texture_and_buffer_weights_agree_bit_for_bit() {
    use wgllm::gpu::{KernelChoice, KernelProfile, WeightLayout};
    use wgllm::loader::LoadDType;
    let dev = |layout: &str| {
        Arc::new(
            Gpu::new(&GpuOptions {
                kernels: Some(KernelChoice::Force(KernelProfile::CpuDevice)),
                decisions: Some(format!("weights={layout}").parse().unwrap()),
                ..Default::default()
            })
            .expect("GPU"),
        )
    };
    let (gb, gt) = (dev("buffer"), dev("texture"));
    for name in FIXTURES {
        let (tokens, want) = fixture_reference(name);
        let opts = ModelOptions {
            max_context: Some(tokens.len() + want.len()),
            max_batch: tokens.len(),
            dtype: LoadDType::Bf16,
            ..Default::default()
        };
        let mut mb = Model::load(gb.clone(), &fixture(name), &opts).unwrap();
        let mut mt = Model::load(gt.clone(), &fixture(name), &opts).unwrap();
        let layout = |m: &Model| m.weights.embed.dense().map(|t| t.layout());
        assert_eq!(layout(&mb), Some(WeightLayout::Buffer), "{name}");
        let hidden = mt.cfg.hidden_size;
        let want_layout = if hidden % 8 == 0 {
            WeightLayout::Texture
        } else {
            WeightLayout::Buffer
        };
        assert_eq!(layout(&mt), Some(want_layout), "{name}: embedding layout");
        let mut input = tokens.clone();
        for (step, &next) in want.iter().enumerate() {
            let a = mb.forward_logits(&input).unwrap();
            let b = mt.forward_logits(&input).unwrap();
            assert_eq!(a.len(), b.len());
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{name} step {step} ({} tokens): logits differ",
                input.len()
            );
            input = vec![next];
        }
    }
}
