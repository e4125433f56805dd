#!/usr/bin/env python3
"""Torch-free float64 re-implementation of the fixture models, checked against the f32 references.

    python tools/numpy_forward.py [tests/fixtures]

Needs only numpy + safetensors (reads bf16 via the raw bytes). It is a
readable specification of the exact math the Rust runtime must reproduce
(config parsing, weight names, tied embeddings, q/k/v biases, GQA head
mapping, half-split RoPE incl. llama3 scaling, explicit head_dim, RMSNorm with
eps inside the sqrt, SiLU-gated MLP) and verifies every tap of every
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


def load_bf16_safetensors(path):
    """Return {name: float64 array}; bf16 is widened by shifting into the high half of an f32."""
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
        out[name] = arr.reshape(info["shape"]).astype(np.float64)
    return out


def rope_params(cfg):
    # transformers 5.x writes "rope_parameters" (rope_theta inside); 4.x / hub
    # checkpoints write top-level "rope_theta" and optional "rope_scaling".
    if "rope_parameters" in cfg and cfg["rope_parameters"]:
        rp = dict(cfg["rope_parameters"])
    else:
        rp = dict(cfg.get("rope_scaling") or {})
        rp["rope_theta"] = cfg.get("rope_theta", 10000.0)
    rp["rope_type"] = rp.get("rope_type", rp.get("type", "default"))
    return rp


def inv_freq(cfg, head_dim):
    rp = rope_params(cfg)
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


def rope(x, n_heads, inv):
    S = x.shape[0]
    hd = x.shape[1] // n_heads
    ang = np.arange(S, dtype=np.float64)[:, None] * inv[None, :]
    cos = np.cos(np.concatenate([ang, ang], 1))[:, None, :]
    sin = np.sin(np.concatenate([ang, ang], 1))[:, None, :]
    xh = x.reshape(S, n_heads, hd)
    rot = np.concatenate([-xh[..., hd // 2 :], xh[..., : hd // 2]], -1)
    return (xh * cos + rot * sin).reshape(S, n_heads * hd)


def forward(cfg, W, tokens):
    H, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or H // nh
    eps = cfg["rms_norm_eps"]
    inv = inv_freq(cfg, hd)
    S = len(tokens)
    taps = {}
    x = W["model.embed_tokens.weight"][tokens]
    taps["embed"] = x

    def lin(name, v):
        y = v @ W[name + ".weight"].T
        if name + ".bias" in W:
            y = y + W[name + ".bias"]
        return y

    mask = np.triu(np.full((S, S), -np.inf), 1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t = f"layers.{i}."
        h = rmsnorm(x, W[p + "input_layernorm.weight"], eps)
        taps[t + "attn_norm"] = h
        q, k, v = (lin(p + f"self_attn.{n}_proj", h) for n in "qkv")
        taps[t + "q"], taps[t + "k"], taps[t + "v"] = q, k, v
        q, k = rope(q, nh, inv), rope(k, nkv, inv)
        taps[t + "q_rope"], taps[t + "k_rope"] = q, k
        qh = q.reshape(S, nh, hd)
        kh = k.reshape(S, nkv, hd)
        vh = v.reshape(S, nkv, hd)
        att = np.empty((S, nh, hd))
        for head in range(nh):
            kvh = head // (nh // nkv)  # repeat_kv: consecutive q heads share a kv head
            sc = qh[:, head] @ kh[:, kvh].T / math.sqrt(hd) + mask
            sc = np.exp(sc - sc.max(-1, keepdims=True))
            att[:, head] = (sc / sc.sum(-1, keepdims=True)) @ vh[:, kvh]
        att = att.reshape(S, nh * hd)
        taps[t + "attn"] = att
        o = lin(p + "self_attn.o_proj", att)
        taps[t + "attn_out"] = o
        x = x + o
        taps[t + "resid_attn"] = x
        h = rmsnorm(x, W[p + "post_attention_layernorm.weight"], eps)
        taps[t + "mlp_norm"] = h
        g = lin(p + "mlp.gate_proj", h)
        m = lin(p + "mlp.down_proj", g / (1 + np.exp(-g)) * lin(p + "mlp.up_proj", h))
        taps[t + "mlp_out"] = m
        x = x + m
        taps[t + "out"] = x
    x = rmsnorm(x, W["model.norm.weight"], eps)
    taps["norm"] = x
    head = W.get("lm_head.weight", W["model.embed_tokens.weight"])  # absent when tied
    taps["logits"] = x @ head.T
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
        worst = (0.0, "")
        for k, v in taps.items():
            r = ref[k].astype(np.float64)
            err = float(np.abs(v - r).max() / max(1.0, np.abs(r).max()))
            worst = max(worst, (err, k))
        hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        inv_err = float(np.max(np.abs(inv_freq(cfg, hd) - ref["rope.inv_freq"]) / inv_freq(cfg, hd)))
        gen = ref["generated"].tolist()
        full = forward(cfg, W, tokens + gen[:-1])["logits"][len(tokens) - 1 :]
        gen_ok = full.argmax(-1).tolist() == gen
        print(f"{name}: worst tap rel err {worst[0]:.2e} ({worst[1]}), inv_freq rel err {inv_err:.1e}, greedy match {gen_ok}")
        assert worst[0] < 1e-4 and inv_err < 1e-6 and gen_ok, name
        worst_all = max(worst_all, worst[0])
    print(f"numpy float64 forward matches all f32 references (worst {worst_all:.2e})")


if __name__ == "__main__":
    main()
