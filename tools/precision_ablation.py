#!/usr/bin/env python3
"""Which f32 rounding puts the most error into the final norm (issue #14)?

    /work/venv/bin/python tools/precision_ablation.py fixture NAME [NAME ...]
    /work/venv/bin/python tools/precision_ablation.py real MODEL_DIR KEY [PROMPT ...]

The float64 forward of tools/numpy_forward.py, with chosen intermediates
rounded to float32 as they are produced and everything else kept in float64
(numpy_forward.forward's `rnd` hook; `angles32` = RoPE angles in f32, as
transformers and wgllm compute them). For every sequence (a fixture's dump
tokens; a real model's golden prompts from tests/fixtures/real/KEY.json and
KEY_f64.safetensors, or only the PROMPTs named), the max |d| to the exact
forward at the last position of `norm` (and of `logits` for fixtures) for:

* `only X`: X alone rounded (what that rounding, propagated through the rest
  of the exact model, puts into the final norm);
* `wgllm`: every rounding wgllm makes (its f32 buffers: the norms' outputs,
  q/k/v, RoPE's output, the attention's scores, probabilities and output,
  o_proj's, gate's, up's, the activation's and down's outputs, the final
  norm's; the residual stream is (hi, lo), so no residual add rounds), f32
  angles; an idealised wgllm whose every op is exact before its one
  rounding;
* `wgllm - X`: the same without X (how much removing X would gain).

Each figure is one sequence's: roundings of ~u grow chaotically, so only the
ranking over many sequences means much. The kernels' own error inside an op
(compensated sums, exp to ~1 ulp) is left out; the op-by-op tool
(tools/precision_op_by_op.py) measures that from real dumps.
"""
import json
import os
import sys

import numpy as np
from safetensors.numpy import load_file

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy_forward as nf  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")

# What wgllm rounds to f32 (per layer unless said), in execution order.
WGLLM = [
    "embed", "attn_norm", "q", "k", "v", "q_norm", "k_norm", "q_rope", "k_rope", "scores", "probs", "attn",
    "attn_out", "post_attn_norm", "mlp_norm", "gate", "up", "silu", "act", "mlp_out", "post_mlp_norm", "norm",
]
ANGLES = "angles32"


def run(cfg, W, tokens, points, with_logits):
    pts = set(points)

    def rnd(point, _layer, x):
        return x.astype(np.float32).astype(np.float64) if point in pts else x

    return nf.forward(cfg, W, tokens, rnd=rnd, angles32=ANGLES in pts, with_logits=with_logits)


def ablate(cfg, W, tokens, taps=("norm",), label="", n=1):
    wl = "logits" in taps
    exact = nf.forward(cfg, W, tokens, with_logits=wl)
    relevant = [p for p in WGLLM + [ANGLES]]

    def dist(points):
        t = run(cfg, W, tokens, points, wl)
        return [float(np.abs(t[k][-n:] - exact[k][-n:]).max()) for k in taps]

    rows = {}
    rows["wgllm"] = dist(WGLLM + [ANGLES])
    base = rows["wgllm"][0]
    for p in relevant:
        rows[f"only {p}"] = dist([p])
        rows[f"wgllm - {p}"] = dist([q for q in WGLLM + [ANGLES] if q != p])
    rows["wgllm - (act, silu)"] = dist([q for q in WGLLM + [ANGLES] if q not in ("act", "silu")])
    rows["wgllm - (gate, up, silu, act)"] = dist(
        [q for q in WGLLM + [ANGLES] if q not in ("gate", "up", "silu", "act")]
    )
    rows["wgllm - (attn, attn_out)"] = dist([q for q in WGLLM + [ANGLES] if q not in ("attn", "attn_out")])
    rows["wgllm - (act, silu, mlp_out)"] = dist([q for q in WGLLM + [ANGLES] if q not in ("act", "silu", "mlp_out")])
    where = "the last position" if n == 1 else "every position"
    print(f"== {label} ({len(tokens)} tokens): max|d| to f64 at {where} of {', '.join(taps)}")
    only = sorted(((v, k) for k, v in rows.items() if k.startswith("only ")), reverse=True)
    for v, k in only:
        if v[0] == 0.0:
            continue
        print(f"  {k:34} " + "  ".join(f"{x:.2e}" for x in v))
    print(f"  {'wgllm':34} " + "  ".join(f"{x:.2e}" for x in rows["wgllm"]))
    minus = sorted(((v, k) for k, v in rows.items() if k.startswith("wgllm - ")))
    for v, k in minus:
        if abs(v[0] - base) < 1e-30:
            continue
        print(f"  {k:34} " + "  ".join(f"{x:.2e}" for x in v) + f"   ({v[0] / base:.2f}x)")
    sys.stdout.flush()
    return rows


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    if sys.argv[1] == "fixture":
        for name in sys.argv[2:]:
            d = os.path.join(ROOT, name)
            cfg = json.load(open(os.path.join(d, "config.json")))
            W = nf.load_bf16_safetensors(os.path.join(d, "model.safetensors"))
            tokens = load_file(os.path.join(d, "reference_f32.safetensors"))["tokens"].tolist()
            # as tests/precision.rs compares: every position (the logits of
            # a vocabulary over 4096: the last)
            ablate(cfg, W, tokens, taps=("norm",), label=name, n=len(tokens))
            ablate(cfg, W, tokens, taps=("logits",), label=name, n=1 if cfg["vocab_size"] > 4096 else len(tokens))
    elif sys.argv[1] == "real":
        d, key = sys.argv[2], sys.argv[3]
        cfg = json.load(open(os.path.join(d, "config.json")))
        W = nf.load_bf16_safetensors(os.path.join(d, "model.safetensors"), dtype=np.float32)
        golden = json.load(open(os.path.join(ROOT, "real", f"{key}.json")))
        g64 = load_file(os.path.join(ROOT, "real", f"{key}_f64.safetensors"))
        names = sys.argv[4:] or [p["name"] for p in golden["prompts"]] + ["reference"]
        for s in names:
            ablate(cfg, W, g64[f"{s}.tokens"].tolist(), label=f"{key}.{s}")
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
