#!/usr/bin/env python3
"""Summarize and sanity-check the committed fixtures (numpy + safetensors only, no torch).

    python tools/check_fixtures.py [tests/fixtures]

For every fixture folder: the prompt in prompt.json matches the `tokens` stored
in both reference files, the f32 reference has 16 generated tokens whose every
top-1/top-2 logit gap is >= 1e-3, and both references hold the same tap names
and shapes. Prints sizes, min gap, and the max |bf16 - f32| difference of the
logits (and the relative difference per tap, for orientation). Exits non-zero
when a check fails or the tiny-model fixtures together exceed 12 MB (the
real-model goldens under real/, gguf/ and tokenizer/ are not counted: they
belong to other tests).
"""

import json
import os
import sys

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file

MIN_GAP = 1e-3
# 9.35 MB for the first five fixtures + 2.4 MB for qwen3_qk_norm, gemma3_window
# and mistral_window (the windowed ones need prompts of >= 3 windows).
MAX_TOTAL_BYTES = 12 * 1000 * 1000


def tree_size(path):
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    return total


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
    failures = []
    names = sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "config.json")))
    for name in names:
        d = os.path.join(root, name)
        cfg = json.load(open(os.path.join(d, "config.json")))
        prompt = json.load(open(os.path.join(d, "prompt.json")))["tokens"]
        f32 = load_file(os.path.join(d, "reference_f32.safetensors"))
        b16 = load_file(os.path.join(d, "reference_bf16.safetensors"))
        with safe_open(os.path.join(d, "reference_f32.safetensors"), "np") as f:
            meta = f.metadata()
        for tag, ref in (("f32", f32), ("bf16", b16)):
            if ref["tokens"].tolist() != prompt:
                failures.append(f"{name}: {tag} tokens != prompt.json")
        if sorted(f32) != sorted(set(b16) | {"generated", "generated_top2_gap"}):
            failures.append(f"{name}: tap names differ between f32 and bf16 references")
        for k in b16:
            if f32[k].shape != b16[k].shape:
                failures.append(f"{name}: {k} shape {f32[k].shape} vs {b16[k].shape}")
        gen = f32.get("generated")
        gap = f32.get("generated_top2_gap")
        if gen is None or gen.shape != (16,):
            failures.append(f"{name}: missing/short generated tokens")
            min_gap = float("nan")
        else:
            min_gap = float(gap.min())
            if not min_gap >= MIN_GAP:
                failures.append(f"{name}: min top-2 gap {min_gap:.3g} < {MIN_GAP}")
        eos = cfg.get("eos_token_id")
        eos = set(eos if isinstance(eos, list) else ([] if eos is None else [eos]))
        if gen is not None and eos & set(gen.tolist()):
            failures.append(f"{name}: generated tokens contain EOS {sorted(eos)}")
        for tag, ref in (("f32", f32), ("bf16", b16)):
            extra2d = [k for k, v in ref.items() if v.ndim == 2 and v.dtype == np.float32 and not (k in ("embed", "norm", "logits") or k.startswith("layers."))]
            if extra2d:
                failures.append(f"{name}: {tag} has 2D f32 tensors that are not taps: {extra2d}")
        dlog = float(np.abs(b16["logits"] - f32["logits"]).max())
        worst = []
        for k in sorted(b16):
            if k in ("tokens",) or k.startswith("rope.inv"):
                continue
            denom = float(np.abs(f32[k]).max()) or 1.0
            worst.append((float(np.abs(b16[k] - f32[k]).max()) / denom, k))
        worst.sort(reverse=True)
        rp = cfg.get("rope_parameters", {})
        print(
            f"{name}: {cfg['model_type']} hidden={cfg['hidden_size']} heads={cfg['num_attention_heads']}"
            f"/{cfg['num_key_value_heads']} head_dim={meta['head_dim']} inter={cfg['intermediate_size']}"
            f" vocab={cfg['vocab_size']} tied={cfg['tie_word_embeddings']}"
            + (
                f" rope={rp.get('rope_type')}/theta={rp.get('rope_theta')}"
                if "rope_theta" in rp
                else "".join(f" rope[{k}]={v.get('rope_type')}/theta={v.get('rope_theta')}" for k, v in sorted(rp.items()))
            )
        )
        print(
            f"    prompt={len(prompt)} generated={gen.tolist() if gen is not None else None}"
            f"\n    min_top2_gap={min_gap:.4g} max|bf16-f32| logits={dlog:.4g}"
            f" (logits max |f32|={float(np.abs(f32['logits']).max()):.3g})"
            f"\n    worst relative bf16 tap: {worst[0][1]} {worst[0][0]:.3g};"
            f" size={tree_size(d) / 1e6:.2f} MB"
        )
        if "layer_windows" in meta:
            wins = json.loads(meta["layer_windows"])
            w = min(x for x in wins if x is not None)
            print(f"    layer windows {wins}; {meta.get('window_check')}")
            if len(prompt) < 3 * w:
                failures.append(f"{name}: prompt of {len(prompt)} tokens < 3 windows of {w}")
        if "llama3_bands" in meta:
            print(f"    llama3 bands: {json.loads(meta['llama3_bands'])['counts']}")
    total = sum(tree_size(os.path.join(root, n)) for n in names)
    print(f"total of the {len(names)} tiny-model fixtures in {root}: {total / 1e6:.2f} MB")
    if total > MAX_TOTAL_BYTES:
        failures.append(f"tiny-model fixtures total {total} bytes > {MAX_TOTAL_BYTES}")
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        sys.exit(1)
    print("all fixture checks passed")


if __name__ == "__main__":
    main()
