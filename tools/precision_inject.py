#!/usr/bin/env python3
"""Where a real run's final-norm error comes from, op by op (issue #14).

    /work/venv/bin/python tools/precision_inject.py MODEL_DIR DUMP.safetensors [--f32-stream] [--tokens=FILE[:NAME]] [--ideal=OP,OP]

DUMP is a run with every tap at every position: `wgllm verify --dump` of some
tokens, or a transformers f32 dump (tools/dump_reference.py, a fixture's
reference_f32.safetensors; pass --f32-stream, see below). Llama/Qwen2 layers.

For every op of every layer, the op's own error in that run is
    d_X = (the run's output tap of X) - (X recomputed in float64 from the run's own input taps)
(as tools/precision_op_by_op.py measures it; RoPE on f32 angles). Each op's
d_X alone is then added at X, in every layer, to the exact float64 forward
(tools/numpy_forward.py's `rnd` hook), and the max |d| at the final norm (last
position, and every position) says how much of the final-norm error that
op's own rounding puts there; `all` adds every op's at once (the linearised
total, to compare with the run's real distance, printed beside it), and
`angles32` is the f32 RoPE angles both runs share.

--ideal=q,k (a what-if): those ops' own error replaced by one f32 rounding of
their exact value (what a correctly rounded kernel would leave), so `all`
says what the run's distance would be with them made exact.

Ops: q, k, v (each projection + bias), q_rope, k_rope, attn (scores,
softmax, weighted sum), attn_out (o_proj), mlp (gate, up, activation, their
product and down_proj together: the taps have no MLP intermediate; the
split is tools/precision_ablation.py's), and the norms. wgllm's residual
stream is (hi, lo) and its taps show hi: its norms' input is taken as the
float64 sum of the embedding and every sub-block output tap before them (the
stream is exact to ~u^2 per add), and no residual add rounds. With
--f32-stream (transformers), the norms read the stream taps and `resid`,
`resid2` are the two residual adds' roundings.
"""
import json
import math
import os
import sys

import numpy as np
from safetensors.numpy import load_file

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy_forward as nf  # noqa: E402


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if len(args) != 2:
        sys.exit(__doc__)
    f32_stream = "--f32-stream" in sys.argv
    ideal = set(sum([a[len("--ideal="):].split(",") for a in sys.argv if a.startswith("--ideal=")], []))
    d, dump_path = args
    cfg = json.load(open(os.path.join(d, "config.json")))
    W = nf.load_bf16_safetensors(os.path.join(d, "model.safetensors"), dtype=np.float32)
    dump = {k: v.astype(np.float64) for k, v in load_file(dump_path).items() if v.dtype == np.float32}
    # --tokens=FILE[:NAME]: the tokens tensor NAME (default `tokens`) of FILE,
    # for dumps that do not hold their tokens (wgllm verify --dump)
    tok = [a[len("--tokens="):] for a in sys.argv if a.startswith("--tokens=")]
    tfile, _, tname = (tok[0] if tok else dump_path).partition(":")
    tensors = load_file(tfile)
    if (tname or "tokens") not in tensors:
        sys.exit(f"{tfile}: no `{tname or 'tokens'}` tensor (give --tokens=FILE[:NAME])")
    tokens = tensors[tname or "tokens"].tolist()
    H, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or H // nh
    eps = cfg["rms_norm_eps"]
    L = cfg["num_hidden_layers"]
    S = len(tokens)
    inv32 = nf.inv_freq(cfg, hd).astype(np.float32)

    def lin(name, v):
        y = v @ W[name + ".weight"].T.astype(np.float64)
        if name + ".bias" in W:
            y = y + W[name + ".bias"]
        return y

    def rope32(x, n):
        ang = (np.arange(S, dtype=np.float32)[:, None] * inv32[None, :]).astype(np.float64)
        cos = np.cos(np.concatenate([ang, ang], 1))[:, None, :]
        sin = np.sin(np.concatenate([ang, ang], 1))[:, None, :]
        xh = x.reshape(S, n, hd)
        rot = np.concatenate([-xh[..., hd // 2 :], xh[..., : hd // 2]], -1)
        return (xh * cos + rot * sin).reshape(S, n * hd)

    def attn(q, k, v):
        qh, kh, vh = q.reshape(S, nh, hd), k.reshape(S, nkv, hd), v.reshape(S, nkv, hd)
        out = np.empty((S, nh, hd))
        for h in range(nh):
            g = h // (nh // nkv)
            s = qh[:, h] @ kh[:, g].T / math.sqrt(hd)
            s = np.where(np.tri(S) > 0, s, -np.inf)
            s -= s.max(1, keepdims=True)
            p = np.exp(s)
            p /= p.sum(1, keepdims=True)
            out[:, h] = p @ vh[:, g]
        return out.reshape(S, nh * hd)

    def silu(x):
        return x / (1 + np.exp(-x))

    # Each op's own error in the run, per layer.
    delta = {}
    # wgllm's residual stream is (hi, lo), exact to ~u^2 per add, and its taps
    # show hi: the stream its norms read is the f64 sum of the embedding and
    # every sub-block output tap before it.
    acc = dump["embed"].copy()
    for i in range(L):
        p, t = f"model.layers.{i}.", f"layers.{i}."
        r = dump
        stream = r["embed"] if i == 0 else r[f"layers.{i-1}.out"]
        if not f32_stream:
            s_in = acc.copy()
            acc += r[t + "attn_out"]
            s_mid = acc.copy()
            acc += r[t + "mlp_out"]
        ops = {
            "q": lin(p + "self_attn.q_proj", r[t + "attn_norm"]),
            "k": lin(p + "self_attn.k_proj", r[t + "attn_norm"]),
            "v": lin(p + "self_attn.v_proj", r[t + "attn_norm"]),
            "q_rope": rope32(r[t + "q"], nh),
            "k_rope": rope32(r[t + "k"], nkv),
            "attn": attn(r[t + "q_rope"], r[t + "k_rope"], r[t + "v"]),
            "attn_out": lin(p + "self_attn.o_proj", r[t + "attn"]),
            "mlp_out": lin(
                p + "mlp.down_proj",
                silu(lin(p + "mlp.gate_proj", r[t + "mlp_norm"])) * lin(p + "mlp.up_proj", r[t + "mlp_norm"]),
            ),
        }
        if f32_stream:
            ops["attn_norm"] = nf.rmsnorm(stream, W[p + "input_layernorm.weight"].astype(np.float64), eps)
            ops["mlp_norm"] = nf.rmsnorm(
                r[t + "resid_attn"], W[p + "post_attention_layernorm.weight"].astype(np.float64), eps
            )
        else:
            ops["attn_norm"] = nf.rmsnorm(s_in, W[p + "input_layernorm.weight"].astype(np.float64), eps)
            ops["mlp_norm"] = nf.rmsnorm(s_mid, W[p + "post_attention_layernorm.weight"].astype(np.float64), eps)
        if f32_stream:
            ops["resid"] = stream + r[t + "attn_out"]
            ops["resid2"] = r[t + "resid_attn"] + r[t + "mlp_out"]
        for k, want in ops.items():
            tap = {"resid": "resid_attn", "resid2": "out"}.get(k, k)
            delta[(k, i)] = r[t + tap] - want
            if k in ideal:
                # what-if: the op correctly rounded (one f32 rounding of its exact value)
                delta[(k, i)] = want.astype(np.float32).astype(np.float64) - want
    last = r[f"layers.{L-1}.out"] if f32_stream else acc
    delta[("norm", None)] = r["norm"] - nf.rmsnorm(last, W["model.norm.weight"].astype(np.float64), eps)

    exact = nf.forward(cfg, W, tokens, with_logits=False)["norm"]
    actual = dump["norm"]

    def inject(names, angles32=False):
        names = set(names)

        def rnd(point, layer, x):
            if point == "resid":
                # numpy_forward calls `resid` for both adds of a layer, in order
                key = "resid" if ("resid", layer) not in seen else "resid2"
                seen.add(("resid", layer))
                return x + delta[(key, layer)] if key in names else x
            if point in names and (point, layer) in delta:
                return x + delta[(point, layer)]
            return x

        seen = set()
        n = nf.forward(cfg, W, tokens, rnd=rnd, angles32=angles32, with_logits=False)["norm"]
        return float(np.abs(n[-1] - exact[-1]).max()), float(np.abs(n - exact).max())

    ops = ["q", "k", "v", "q_rope", "k_rope", "attn", "attn_out", "mlp_out"]
    ops += ["attn_norm", "mlp_norm", "norm"]
    if f32_stream:
        ops += ["resid", "resid2"]
    print(f"{dump_path} ({S} tokens): final norm max|d| to f64, last position / every position")
    print(f"  {'the run itself':14} {np.abs(actual[-1] - exact[-1]).max():.2e} / {np.abs(actual - exact).max():.2e}")
    allv = inject(ops, angles32=True)
    print(f"  {'all (+angles32)':14} {allv[0]:.2e} / {allv[1]:.2e}")
    rows = [(inject([o]), o) for o in ops] + [(inject([], angles32=True), "angles32")]
    for v, o in sorted(rows, reverse=True):
        print(f"  {o:14} {v[0]:.2e} / {v[1]:.2e}")


if __name__ == "__main__":
    main()
