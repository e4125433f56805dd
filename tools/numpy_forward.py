#!/usr/bin/env python3
"""Torch-free float64 re-implementation of the fixture models, checked against the f32 references.

    python tools/numpy_forward.py [tests/fixtures]

Needs only numpy + safetensors (reads bf16 via the raw bytes). It is a
readable specification of the exact math the Rust runtime must reproduce
(config parsing, weight names, tied embeddings, q/k/v biases, GQA head
mapping, half-split RoPE incl. llama3 scaling, explicit head_dim, RMSNorm with
eps inside the sqrt, SiLU-gated MLP; Qwen3's per-head q/k norm; Gemma 3's
scaled embedding, (1 + w) norms, four norms per layer, GELU-tanh,
query_pre_attn_scalar, per-layer-type rope theta and final logit soft-capping;
the sliding window of Mistral and Gemma 3) and verifies every tap of every
reference_f32.safetensors to ~1e-4 relative, plus the greedy continuation
(recomputed without a KV cache).
"""

import json
import math
import os
import struct
import sys

import numpy as np
from safetensors.numpy import load_file


def load_bf16_safetensors(path, dtype=np.float64):
    """Return {name: array}; bf16 is widened by shifting into the high half of an f32.

    The arrays are float64 by default. `dtype=np.float32` keeps them at half
    the memory (bf16 and f32 are exact in f32) for the real models; every
    product in `forward` still runs in float64, as the activations are float64.
    """
    with open(path, "rb") as f:
        data = f.read()
    (hlen,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + hlen])
    base = 8 + hlen
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        raw = data[base + a : base + b]
        if info["dtype"] == "BF16":
            u16 = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            arr = u16.view(np.float32)
        elif info["dtype"] == "F32":
            arr = np.frombuffer(raw, dtype="<f4")
        else:
            raise ValueError(f"{name}: dtype {info['dtype']}")
        out[name] = arr.reshape(info["shape"]).astype(dtype)
    return out


def rope_params(cfg, layer_type=None):
    # transformers 5.x writes "rope_parameters" (rope_theta inside); 4.x / hub
    # checkpoints write top-level "rope_theta" and optional "rope_scaling".
    # Gemma 3 (5.x) keys rope_parameters by layer type, each with its own theta.
    if "rope_parameters" in cfg and cfg["rope_parameters"]:
        rp = cfg["rope_parameters"]
        rp = dict(rp if "rope_theta" in rp else rp[layer_type])
    else:
        rp = dict(cfg.get("rope_scaling") or {})
        rp["rope_theta"] = cfg.get("rope_theta", 10000.0)
    rp["rope_type"] = rp.get("rope_type", rp.get("type", "default"))
    return rp


def inv_freq(cfg, head_dim, layer_type=None):
    rp = rope_params(cfg, layer_type)
    base = float(rp["rope_theta"])
    inv = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if rp["rope_type"] == "llama3":
        factor, lo, hi = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"]
        old = rp["original_max_position_embeddings"]
        wl = 2 * math.pi / inv
        smooth = (old / wl - lo) / (hi - lo)
        scaled = np.where(wl > old / lo, inv / factor, inv)
        medium = ~(wl < old / hi) & ~(wl > old / lo)
        inv = np.where(medium, (1 - smooth) * inv / factor + smooth * inv, scaled)
    elif rp["rope_type"] != "default":
        raise NotImplementedError(rp["rope_type"])
    return inv


def rmsnorm(x, w, eps):
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def rope(x, n_heads, inv, angles32=False):
    S = x.shape[0]
    hd = x.shape[1] // n_heads
    if angles32:
        # transformers' (and wgllm's) angles: inv_freq and the product in f32
        ang = (np.arange(S, dtype=np.float32)[:, None] * inv.astype(np.float32)[None, :]).astype(np.float64)
    else:
        ang = np.arange(S, dtype=np.float64)[:, None] * inv[None, :]
    cos = np.cos(np.concatenate([ang, ang], 1))[:, None, :]
    sin = np.sin(np.concatenate([ang, ang], 1))[:, None, :]
    xh = x.reshape(S, n_heads, hd)
    rot = np.concatenate([-xh[..., hd // 2 :], xh[..., : hd // 2]], -1)
    return (xh * cos + rot * sin).reshape(S, n_heads * hd)


def family(cfg):
    """What differs per model_type, in one place (anything else is refused)."""
    mt = cfg["model_type"]
    if mt in ("qwen2", "llama", "mistral"):
        return dict(qk_norm=False, gemma=False)
    if mt == "qwen3":
        return dict(qk_norm=True, gemma=False)
    if mt == "gemma3_text":
        return dict(qk_norm=True, gemma=True)
    raise NotImplementedError(f"model_type {mt}")


def layer_windows(cfg):
    """Per layer: the sliding window, or None for full causal attention.

    Mistral: config sliding_window on every layer (null = off). Qwen3 (only
    with use_sliding_window; transformers then writes sliding_window) and
    Gemma 3: only the layers whose layer_types entry is sliding_attention.
    """
    n = cfg["num_hidden_layers"]
    w = cfg.get("sliding_window")
    if cfg["model_type"] == "qwen3" and not cfg.get("use_sliding_window", False):
        w = None
    if w is None:
        return [None] * n
    types = cfg.get("layer_types")
    if types is None:
        return [w] * n
    return [w if t == "sliding_attention" else None for t in types]


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _exact(_point, _layer, x):
    return x


def forward(cfg, W, tokens, rnd=_exact, angles32=False, with_logits=True):
    """The float64 forward. `rnd(point, layer, x)` is applied to every
    intermediate as it is produced (identity by default; tools/precision_ablation.py
    rounds chosen ones to f32): points `embed`, `attn_norm`, `q`, `k`, `v`,
    `q_norm`, `k_norm`, `q_rope`, `k_rope`, `scores`, `probs`, `attn`,
    `attn_out`, `post_attn_norm`, `resid` (both residual adds), `mlp_norm`,
    `gate`, `up`, `silu` (the activation before the product), `act` (its
    product with up), `mlp_out`, `post_mlp_norm`, `norm`, `logits`; layer is
    None outside the layers. `angles32`: RoPE angles computed in f32 as
    transformers does. `with_logits=False` stops after the final norm."""
    fam = family(cfg)
    H, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or H // nh
    eps = cfg["rms_norm_eps"]
    gemma = fam["gemma"]
    windows = layer_windows(cfg)
    types = cfg.get("layer_types") or [None] * cfg["num_hidden_layers"]
    S = len(tokens)
    taps = {}

    def norm(x, name):
        w = W[name + ".weight"]
        # Gemma stores the scale as an offset: x_hat * (1 + w).
        return rmsnorm(x, 1.0 + w if gemma else w, eps)

    def head_norm(x, name, n):
        return norm(x.reshape(S, n, hd), name).reshape(S, n * hd)

    layer = [None]

    def r(point, x):
        return rnd(point, layer[0], x)

    x = W["model.embed_tokens.weight"][tokens].astype(np.float64)
    if gemma:
        # sqrt(hidden) as transformers computes it: a Python float put in an f32
        # tensor (cast to the weight dtype: f32 here; bf16 compute rounds it to bf16).
        x = x * float(np.float32(math.sqrt(H)))
    x = rnd("embed", None, x)
    taps["embed"] = x

    def lin(name, v):
        y = v @ W[name + ".weight"].T.astype(np.float64)
        if name + ".bias" in W:
            y = y + W[name + ".bias"]
        return y

    if gemma:
        scale = cfg["query_pre_attn_scalar"] ** -0.5
    else:
        scale = 1.0 / math.sqrt(hd)
    pos = np.arange(S)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t = f"layers.{i}."
        layer[0] = i
        inv = inv_freq(cfg, hd, types[i])
        # Causal, plus the sliding window (transformers' sliding_window_overlay:
        # key j is visible from query q iff j <= q and q - j < window).
        visible = pos[None, :] <= pos[:, None]
        if windows[i] is not None:
            visible &= (pos[:, None] - pos[None, :]) < windows[i]
        mask = np.where(visible, 0.0, -np.inf)
        h = r("attn_norm", norm(x, p + "input_layernorm"))
        taps[t + "attn_norm"] = h
        q, k, v = (r(n, lin(p + f"self_attn.{n}_proj", h)) for n in "qkv")
        taps[t + "q"], taps[t + "k"], taps[t + "v"] = q, k, v
        if fam["qk_norm"]:
            q = r("q_norm", head_norm(q, p + "self_attn.q_norm", nh))
            k = r("k_norm", head_norm(k, p + "self_attn.k_norm", nkv))
            taps[t + "q_norm"], taps[t + "k_norm"] = q, k
        q, k = r("q_rope", rope(q, nh, inv, angles32)), r("k_rope", rope(k, nkv, inv, angles32))
        taps[t + "q_rope"], taps[t + "k_rope"] = q, k
        qh = q.reshape(S, nh, hd)
        kh = k.reshape(S, nkv, hd)
        vh = v.reshape(S, nkv, hd)
        att = np.empty((S, nh, hd))
        for head in range(nh):
            kvh = head // (nh // nkv)  # repeat_kv: consecutive q heads share a kv head
            sc = r("scores", qh[:, head] @ kh[:, kvh].T * scale) + mask
            sc = np.exp(sc - sc.max(-1, keepdims=True))
            att[:, head] = r("probs", sc / sc.sum(-1, keepdims=True)) @ vh[:, kvh]
        att = r("attn", att.reshape(S, nh * hd))
        taps[t + "attn"] = att
        o = r("attn_out", lin(p + "self_attn.o_proj", att))
        taps[t + "attn_out"] = o
        if gemma:
            o = r("post_attn_norm", norm(o, p + "post_attention_layernorm"))
            taps[t + "post_attn_norm"] = o
        x = r("resid", x + o)
        taps[t + "resid_attn"] = x
        h = r("mlp_norm", norm(x, p + ("pre_feedforward_layernorm" if gemma else "post_attention_layernorm")))
        taps[t + "mlp_norm"] = h
        g = r("gate", lin(p + "mlp.gate_proj", h))
        act = r("silu", gelu_tanh(g) if gemma else g / (1 + np.exp(-g)))
        m = r("mlp_out", lin(p + "mlp.down_proj", r("act", act * r("up", lin(p + "mlp.up_proj", h)))))
        taps[t + "mlp_out"] = m
        if gemma:
            m = r("post_mlp_norm", norm(m, p + "post_feedforward_layernorm"))
            taps[t + "post_mlp_norm"] = m
        x = r("resid", x + m)
        taps[t + "out"] = x
    layer[0] = None
    x = r("norm", norm(x, "model.norm"))
    taps["norm"] = x
    if not with_logits:
        return taps
    head = W.get("lm_head.weight", W["model.embed_tokens.weight"])  # absent when tied
    logits = x @ head.T.astype(np.float64)
    cap = cfg.get("final_logit_softcapping")
    if cap is not None:
        logits = np.tanh(logits / cap) * cap
    taps["logits"] = r("logits", logits)
    return taps


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
    worst_all = 0.0
    for name in sorted(os.listdir(root)):
        d = os.path.join(root, name)
        if not os.path.isfile(os.path.join(d, "reference_f32.safetensors")):
            continue
        cfg = json.load(open(os.path.join(d, "config.json")))
        W = load_bf16_safetensors(os.path.join(d, "model.safetensors"))
        ref = load_file(os.path.join(d, "reference_f32.safetensors"))
        tokens = ref["tokens"].tolist()
        taps = forward(cfg, W, tokens)
        ref_taps = {k for k, v in ref.items() if v.ndim == 2 and v.dtype == np.float32}
        assert ref_taps == set(taps), f"{name}: taps not recomputed / not in the file: {sorted(ref_taps ^ set(taps))}"
        worst = (0.0, "")
        for k, v in taps.items():
            r = ref[k].astype(np.float64)
            err = float(np.abs(v - r).max() / max(1.0, np.abs(r).max()))
            worst = max(worst, (err, k))
        hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        inv_err = 0.0
        for key in sorted(k for k in ref if k.startswith("rope.inv_freq")):
            lt = key[len("rope.inv_freq.") :] or None
            want = inv_freq(cfg, hd, lt)
            inv_err = max(inv_err, float(np.max(np.abs(want - ref[key]) / want)))
        gen = ref["generated"].tolist()
        full = forward(cfg, W, tokens + gen[:-1])["logits"][len(tokens) - 1 :]
        gen_ok = full.argmax(-1).tolist() == gen
        window_note = ""
        if any(w is not None for w in layer_windows(cfg)):
            # The same math without the window must miss the reference by far
            # (past the window's edge), or this check could not see the window.
            off = forward(dict(cfg, sliding_window=None), W, tokens)["logits"]
            miss = float(np.abs(off - ref["logits"]).max() / max(1.0, np.abs(ref["logits"]).max()))
            window_note = f", without the window logits rel err {miss:.2e}"
            assert miss > 1e-2, f"{name}: the window makes no visible difference ({miss})"
        print(
            f"{name}: worst tap rel err {worst[0]:.2e} ({worst[1]}), inv_freq rel err {inv_err:.1e},"
            f" greedy match {gen_ok}{window_note}"
        )
        assert worst[0] < 1e-4 and inv_err < 1e-6 and gen_ok, name
        worst_all = max(worst_all, worst[0])
    print(f"numpy float64 forward matches all f32 references (worst {worst_all:.2e})")


if __name__ == "__main__":
    main()
