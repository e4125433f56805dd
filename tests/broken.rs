//! Proof that `verify` catches the classic porting bugs and names the tap
//! where they first show. Each case breaks the GPU model on purpose (a
//! test-only weight transform, edit of the model's layer program or kernel
//! variant, `model::Faults`, not reachable from the CLI), runs verify against
//! both the CPU reference and the PyTorch f32 dump, and checks the first
//! failing tap of each.

mod common;

use common::{fixture, gpu};

use wgllm::model::Faults;
use wgllm::verify::{run, VerifyOptions};

/// Run verify with `faults` and check the first failure of every report.
fn check(name: &str, faults: Faults, first: Option<&str>) {
    let dir = fixture(name);
    let o = VerifyOptions {
        model: dir.clone(),
        reference: Some(dir.join("reference_f32.safetensors")),
        faults,
        ..Default::default()
    };
    let r = run(gpu(), &o).unwrap_or_else(|e| panic!("{name} {faults:?}: {e}"));
    assert_eq!(r.reports.len(), 2, "CPU reference and PyTorch dump");
    for rep in &r.reports {
        assert_eq!(
            rep.first_failure.as_deref(),
            first,
            "{name} {faults:?} against {}:\n{}",
            rep.against,
            rep.table()
        );
        // A fault is caught by a wide margin, not at the edge of the bound.
        if let Some(f) = first {
            let row = rep.rows.iter().find(|x| x.tap == f).unwrap();
            assert!(
                row.metrics.nmse > 100.0 * row.tolerance.nmse,
                "{name} {faults:?}: {f} fails only narrowly (nmse {:e})",
                row.metrics.nmse
            );
        }
    }
    assert_eq!(r.pass, first.is_none());
}

#[test]
fn correct_models_pass() {
    check("qwen2_bias_tied", Faults::default(), None);
    check("llama_gqa3_untied", Faults::default(), None);
    check("qwen3_qk_norm", Faults::default(), None);
    check("gemma3_window", Faults::default(), None);
    check("mistral_window", Faults::default(), None);
}

#[test]
fn dropped_qk_norm_is_caught_at_q_norm() {
    // The program keeps the q_norm tap (it reads the un-normalized q).
    let f = Faults {
        drop_qk_norm: true,
        ..Default::default()
    };
    check("qwen3_qk_norm", f, Some("layers.0.q_norm"));
    check("gemma3_window", f, Some("layers.0.q_norm"));
}

#[test]
fn gemma_one_plus_w_read_as_w_is_caught_at_attn_norm() {
    let f = Faults {
        norm_plain_w: true,
        ..Default::default()
    };
    check("gemma3_window", f, Some("layers.0.attn_norm"));
}

#[test]
fn ignored_window_is_caught_at_the_first_windowed_attn() {
    // Prompts are 28 tokens over a window of 8: rows 8.. attend to keys
    // outside the window when it is ignored. Gemma's layer 0 is sliding,
    // Mistral's every layer.
    let f = Faults {
        ignore_window: true,
        ..Default::default()
    };
    check("gemma3_window", f, Some("layers.0.attn"));
    check("mistral_window", f, Some("layers.0.attn"));
}

#[test]
fn square_q_and_o_transposed_is_caught_at_q() {
    // q_proj is [64, 64]: a shape check cannot see the transpose.
    let f = Faults {
        transpose_qo: true,
        ..Default::default()
    };
    check("qwen2_bias_tied", f, Some("layers.0.q"));
}

#[test]
fn k_and_v_transposed_is_caught_at_k() {
    let f = Faults {
        transpose_kv: true,
        ..Default::default()
    };
    check("qwen2_bias_tied", f, Some("layers.0.k"));
    check("llama_gqa3_untied", f, Some("layers.0.k"));
}

#[test]
fn interleaved_rope_is_caught_at_q_rope() {
    let f = Faults {
        rope_interleaved: true,
        ..Default::default()
    };
    check("qwen2_bias_tied", f, Some("layers.0.q_rope"));
    check("llama3_rope_scaling", f, Some("layers.0.q_rope"));
}

#[test]
fn wrong_gqa_mapping_is_caught_at_attn() {
    // 4 query heads over 2 KV heads: h % 2 and h / 2 differ for heads 1, 2.
    let f = Faults {
        gqa_modulo: true,
        ..Default::default()
    };
    check("qwen2_bias_tied", f, Some("layers.0.attn"));
    // GQA ratio 3 (6 heads over 2)
    check("llama_gqa3_untied", f, Some("layers.0.attn"));
}

#[test]
fn rmsnorm_eps_outside_sqrt_is_caught_at_attn_norm() {
    // llama_gqa3_untied has realistic small embeddings (std 0.02), so
    // mean(x^2) ~ 4e-4 is comparable to eps 1e-5 and the placement matters.
    let f = Faults {
        norm_eps_outside: true,
        ..Default::default()
    };
    check("llama_gqa3_untied", f, Some("layers.0.attn_norm"));
}

#[test]
fn rmsnorm_one_plus_w_is_caught_at_attn_norm() {
    let f = Faults {
        norm_one_plus_w: true,
        ..Default::default()
    };
    check("qwen2_bias_tied", f, Some("layers.0.attn_norm"));
}

#[test]
fn dropped_qkv_bias_is_caught_at_q() {
    let f = Faults {
        drop_qkv_bias: true,
        ..Default::default()
    };
    check("qwen2_bias_tied", f, Some("layers.0.q"));
}
