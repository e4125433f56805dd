#!/usr/bin/env python3
"""Write tiny random-weight Hugging Face checkpoints used as wgllm test fixtures.

Each fixture is a folder ``tests/fixtures/<name>/`` holding exactly what
``PreTrainedModel.save_pretrained`` writes (``config.json``,
``generation_config.json``, ``model.safetensors`` in bf16) plus a
``prompt.json`` ({"tokens": [...]}) with the prompt token ids that
``tools/dump_reference.py`` is run on.

The models are built with transformers' own config/model classes, so the file
layout (tensor names, tied-weight handling, config keys) is whatever the
pinned transformers version writes. Weights are set deterministically from a
per-fixture seed (torch CPU generator, parameters visited in sorted name order)
in float32 and then cast to bfloat16 before saving.

Weight scales (chosen so every tap in the reference dump is far from zero and
logits are spread out):
  * embed_tokens:          normal(0, 1), or normal(0, embed_std) where a fixture sets it
  * linear weights:        normal(0, gain / sqrt(in_features))
  * untied lm_head:        normal(0, head_gain / sqrt(hidden))
  * RMSNorm weights:       1 + 0.2 * normal(0, 1)   (never all ones, so a
                           runtime that drops the weight or applies (1 + w)
                           produces different results)
  * biases (Qwen2 q/k/v):  normal(0, 0.5)

Usage:
  python tools/make_tiny_models.py [--out-dir tests/fixtures] [--only NAME ...]
"""

import argparse
import json
import math
import os
import shutil
import sys

import numpy as np
import torch
import transformers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

# ---------------------------------------------------------------------------
# Fixture table.
#
# seed:        weight seed (torch.Generator().manual_seed(seed))
# prompt_seed: numpy default_rng seed for the prompt token ids
# gain:        std multiplier for linear layers (std = gain / sqrt(in_features))
# head_gain:   std multiplier for an untied lm_head
#
# Seed/gain history (the greedy continuation must have a top-1/top-2 logit gap
# >= 1e-3 at every one of the 16 generated steps, see tools/README.md):
#   No fixture ever had a gap below 1e-3 with the seeds below. Two fixtures
#   were re-seeded for a different reason: their first greedy continuation was
#   degenerate (one token repeated many times), which would let a decode-path
#   position/KV-cache bug go unnoticed. Selection rule applied: >= 10 distinct
#   tokens among 16, no token repeated more than 3 times in a row, min gap
#   >= 1e-2, no EOS; for qwen2_big_vocab also >= 1 generated id > 65535.
#   * qwen2_bias_tied: seed 1001 gain 1.5 gave [399, 211 x4, 88 x2, 321 x9]
#     (min gap 0.77) -> seed 1011 gain 2.0.
#   * qwen2_big_vocab: hidden shrunk 32 -> 16 and prompt 8 -> 6 tokens to stay
#     under the 10 MB budget; seed 1005 gain 1.5 at that size repeated 56755 x3
#     with no id > 65535 -> seed 1105 gain 2.0 (3 generated ids > 65535).
#   * qwen3_qk_norm: seed 1006 gain 1.5 gave 292 x16 -> seed 1016 gain 2.0.
#   * gemma3_window: every seed with N(0,1) embeddings repeated the last
#     prompt token (tied head, see the fixture) -> embed_std 0.03 with the
#     final norm scaled ~50 (seed 1007 unchanged).
#   Counter-example seen while searching: qwen2_bias_tied seed 1021 gain 2.0
#   has a step with gap 3e-4 (rejected).
# ---------------------------------------------------------------------------

COMMON = dict(
    num_hidden_layers=2,
    max_position_embeddings=256,
    hidden_act="silu",
    attention_dropout=0.0,
    use_cache=True,
)

FIXTURES = {
    "qwen2_bias_tied": dict(
        cls=Qwen2ForCausalLM,
        config_cls=Qwen2Config,
        config=dict(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=160,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            tie_word_embeddings=True,
            use_sliding_window=False,
            bos_token_id=None,
            eos_token_id=None,
        ),
        seed=1011,
        prompt_seed=2001,
        prompt_len=12,
        gain=2.0,
        head_gain=None,
    ),
    "llama_gqa3_untied": dict(
        cls=LlamaForCausalLM,
        config_cls=LlamaConfig,
        config=dict(
            vocab_size=512,
            hidden_size=96,
            intermediate_size=224,
            num_attention_heads=6,
            num_key_value_heads=2,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            tie_word_embeddings=False,
            attention_bias=False,
            mlp_bias=False,
            bos_token_id=1,
            eos_token_id=2,
        ),
        seed=1002,
        prompt_seed=2002,
        prompt_len=12,
        gain=1.5,
        head_gain=4.0,
        # Real checkpoints have small token embeddings (HF initializer_range
        # 0.02): mean(x^2) ~ 4e-4 at layer 0, comparable to eps 1e-5, so an
        # RMSNorm with eps outside the sqrt is visible (~1% at attn_norm).
        # With N(0, 1) embeddings that bug would change results by ~1e-6.
        embed_std=0.02,
    ),
    "llama3_rope_scaling": dict(
        cls=LlamaForCausalLM,
        config_cls=LlamaConfig,
        config=dict(
            vocab_size=512,
            hidden_size=128,
            intermediate_size=200,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            rms_norm_eps=1e-5,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
            tie_word_embeddings=False,
            attention_bias=False,
            mlp_bias=False,
            bos_token_id=1,
            eos_token_id=2,
        ),
        seed=1003,
        prompt_seed=2003,
        prompt_len=40,
        gain=1.5,
        head_gain=4.0,
    ),
    "mistral_head_dim": dict(
        cls=MistralForCausalLM,
        config_cls=MistralConfig,
        config=dict(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=176,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=24,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            sliding_window=None,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
        ),
        seed=1004,
        prompt_seed=2004,
        prompt_len=12,
        gain=1.5,
        head_gain=4.0,
    ),
    "qwen2_big_vocab": dict(
        cls=Qwen2ForCausalLM,
        config_cls=Qwen2Config,
        config=dict(
            vocab_size=70000,
            hidden_size=16,
            intermediate_size=48,
            num_attention_heads=2,
            num_key_value_heads=1,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            tie_word_embeddings=True,
            use_sliding_window=False,
            bos_token_id=None,
            eos_token_id=None,
        ),
        seed=1105,
        prompt_seed=2005,
        # Short prompt and hidden 16: logits are [tokens, 70000] f32 in each
        # reference file and the embedding is 70000 x hidden bf16; the whole
        # tests/fixtures tree must stay under ~10 MB.
        prompt_len=6,
        # Force some prompt ids above 65535 (u16 range) so an embedding gather
        # that truncates ids is caught.
        force_high_ids={1: 65536, 4: 65536},
        gain=2.0,
        head_gain=None,
    ),
    # Qwen3: per-head RMSNorm on q and k (after the projection, before RoPE),
    # no q/k/v bias, head_dim 32 given explicitly != hidden/heads = 16 (q_proj
    # is 128x64), tied embeddings like Qwen3-0.6B.
    "qwen3_qk_norm": dict(
        cls=Qwen3ForCausalLM,
        config_cls=Qwen3Config,
        config=dict(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=160,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            attention_bias=False,
            tie_word_embeddings=True,
            use_sliding_window=False,
            bos_token_id=None,
            eos_token_id=None,
        ),
        seed=1016,
        prompt_seed=2006,
        prompt_len=12,
        gain=2.0,
        head_gain=None,
    ),
    # Gemma 3 text: 3 layers [sliding, sliding, full] with sliding_window 8 and a
    # 28-token prompt (3.5 windows; + 16 generated = 44 positions), separate rope
    # theta per layer kind (1e4 local, 1e6 global), query_pre_attn_scalar 32 !=
    # head_dim 24 (!= hidden/heads = 12), final logit soft-capping 30, GELU-tanh,
    # tied embeddings (Gemma always ties). hidden 48 so sqrt(hidden) = 6.928...
    # is not exactly representable (bf16 rounds the embedding scale to 6.9375).
    "gemma3_window": dict(
        cls=Gemma3ForCausalLM,
        config_cls=Gemma3TextConfig,
        drop_common=("hidden_act",),
        config=dict(
            num_hidden_layers=3,
            vocab_size=512,
            hidden_size=48,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=24,
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=32,
            sliding_window=8,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            },
            final_logit_softcapping=30.0,
            attn_logit_softcapping=None,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            bos_token_id=2,
            eos_token_id=1,
            pad_token_id=0,
        ),
        seed=1007,
        prompt_seed=2007,
        prompt_len=28,
        gain=1.5,
        head_gain=None,
        # Gemma norms compute x_hat * (1 + w): the stored w is an offset around 0.
        norm_init="gemma_offset",
        # Tied head + an embedding scaled by sqrt(hidden): with N(0, 1)
        # embeddings the residual is dominated by the current token's own
        # embedding and greedy decoding repeats it forever. Small embeddings
        # (0.03 * 6.93 = 0.2 rms, like real checkpoints) let the layers decide;
        # the final norm's scale 1 + w ~ 50 then spreads the logits (max
        # |logit| before soft-capping ~ 40) so the tanh cap at 30 is far from
        # linear.
        embed_std=0.03,
        norm_offsets={"model.norm": 49.0},
    ),
    # Mistral with its sliding window switched on: window 8, 28-token prompt.
    "mistral_window": dict(
        cls=MistralForCausalLM,
        config_cls=MistralConfig,
        config=dict(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=160,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            sliding_window=8,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
        ),
        seed=1008,
        prompt_seed=2008,
        prompt_len=28,
        gain=1.5,
        head_gain=4.0,
    ),
}


def make_prompt(spec):
    vocab = spec["config"]["vocab_size"]
    rng = np.random.default_rng(spec["prompt_seed"])
    # Avoid ids 0..3 (typical special tokens) so prompts look like ordinary text.
    tokens = [int(t) for t in rng.integers(4, vocab, size=spec["prompt_len"])]
    for pos, lo in spec.get("force_high_ids", {}).items():
        tokens[pos] = int(rng.integers(lo, vocab))
    return tokens


def init_weights(model, spec):
    """Deterministically overwrite every parameter (fp32 init, bf16 later)."""
    cfg = model.config
    g = torch.Generator().manual_seed(spec["seed"])
    gain = spec["gain"]
    params = dict(model.named_parameters())  # tied params appear once
    with torch.no_grad():
        for name in sorted(params):
            p = params[name]
            shape = tuple(p.shape)
            z = torch.randn(shape, generator=g, dtype=torch.float32)
            if name.endswith("embed_tokens.weight"):
                val = z * spec.get("embed_std", 1.0)
            elif name == "lm_head.weight":
                val = z * (spec["head_gain"] / math.sqrt(cfg.hidden_size))
            elif "norm" in name and name.endswith(".weight"):
                if spec.get("norm_init") == "gemma_offset":
                    # Gemma scales by (1 + w): w = 0.3 N(0,1) gives scales around 1,
                    # and a runtime that reads the scale as w is off by ~100%.
                    # norm_offsets shifts w for the named norms (see the fixture).
                    offs = [v for k, v in spec.get("norm_offsets", {}).items() if k in name]
                    val = (offs[0] if offs else 0.0) + 0.3 * z
                else:
                    val = 1.0 + 0.2 * z
            elif name.endswith(".bias"):
                val = 0.5 * z
            elif name.endswith(".weight") and len(shape) == 2:
                val = z * (gain / math.sqrt(shape[1]))
            else:
                raise RuntimeError(f"no init rule for parameter {name} {shape}")
            p.copy_(val)


def build(name, spec, out_dir):
    cfg_kwargs = dict(COMMON)
    for key in spec.get("drop_common", ()):
        del cfg_kwargs[key]
    cfg_kwargs.update(spec["config"])
    config = spec["config_cls"](**cfg_kwargs)
    torch.manual_seed(0)  # only affects HF's own init, which we overwrite anyway
    model = spec["cls"](config)
    model.eval()
    init_weights(model, spec)

    tied = bool(cfg_kwargs.get("tie_word_embeddings"))
    same = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert same == tied, f"{name}: tie_word_embeddings={tied} but lm_head shared={same}"

    model = model.to(torch.bfloat16)
    folder = os.path.join(out_dir, name)
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    os.makedirs(folder)
    model.save_pretrained(folder)

    tokens = make_prompt(spec)
    with open(os.path.join(folder, "prompt.json"), "w") as f:
        json.dump({"tokens": tokens}, f)
        f.write("\n")

    verify_saved(folder, name, spec, tokens)
    return folder


def verify_saved(folder, name, spec, tokens):
    from safetensors import safe_open

    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    want = spec["config"]
    for key in ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "tie_word_embeddings"):
        assert cfg[key] == want[key], f"{name}: config.json {key}={cfg.get(key)} want {want[key]}"
    assert cfg["num_hidden_layers"] == want.get("num_hidden_layers", COMMON["num_hidden_layers"])
    for key in ("sliding_window", "layer_types", "query_pre_attn_scalar", "final_logit_softcapping"):
        if key in want:
            assert cfg[key] == want[key], f"{name}: config.json {key}={cfg.get(key)} want {want[key]}"
    if "head_dim" in want:
        assert cfg["head_dim"] == want["head_dim"], f"{name}: head_dim not saved"
    path = os.path.join(folder, "model.safetensors")
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
        dtypes = {f.get_slice(k).get_dtype() for k in keys}
    assert dtypes == {"BF16"}, f"{name}: dtypes {dtypes}"
    assert ("lm_head.weight" in keys) == (not want["tie_word_embeddings"]), f"{name}: lm_head presence"
    has_bias = any(k.endswith("q_proj.bias") for k in keys)
    assert has_bias == (spec["cls"] is Qwen2ForCausalLM), f"{name}: q_proj.bias presence"
    assert all(0 <= t < want["vocab_size"] for t in tokens)
    size = os.path.getsize(path)
    print(f"{name}: {len(keys)} tensors, {size / 1e6:.2f} MB, prompt {len(tokens)} tokens")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out-dir", default=os.path.join(here, "..", "tests", "fixtures"))
    ap.add_argument("--only", nargs="*", help="fixture names to (re)build; default all")
    ap.add_argument("--list", action="store_true", help="print fixture names and exit")
    args = ap.parse_args()
    if args.list:
        print("\n".join(FIXTURES))
        return
    names = args.only or list(FIXTURES)
    for n in names:
        if n not in FIXTURES:
            sys.exit(f"unknown fixture {n}; known: {', '.join(FIXTURES)}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    for n in names:
        build(n, FIXTURES[n], os.path.normpath(args.out_dir))


if __name__ == "__main__":
    main()
