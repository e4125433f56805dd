#!/usr/bin/env python3
"""Dump per-layer PyTorch reference activations of a Hugging Face causal LM.

    python tools/dump_reference.py MODEL_DIR (--tokens 1,2,3 | --prompt TEXT) \
        --out OUT.safetensors [--dtype f32|bf16] [--generate N]

The model is loaded with ``AutoModelForCausalLM.from_pretrained(MODEL_DIR,
attn_implementation="eager", dtype=...)``. ``--dtype f32`` upcasts the stored
weights (bf16 for the tiny fixtures) to float32 and computes in float32;
``--dtype bf16`` computes natively in bfloat16 (HF's own mixed-precision spots
still apply: RMSNorm statistics, softmax and RoPE cos/sin are computed in f32
and rounded back to bf16).

One forward pass over the prompt (batch 1, no KV cache) is run with forward
hooks. Every tap is written as a float32 tensor of shape [tokens, width] (batch
dim dropped; attention heads flattened head-major, i.e. [tokens, n_heads *
head_dim], the layout q_proj's output has):

  embed                   embed_tokens output
  layers.{i}.attn_norm    input_layernorm output
  layers.{i}.q/.k/.v      q/k/v_proj output (bias included, before RoPE)
  layers.{i}.q_rope       q after RoPE
  layers.{i}.k_rope       k after RoPE
  layers.{i}.attn         attention output before o_proj (= o_proj input)
  layers.{i}.attn_out     o_proj output
  layers.{i}.resid_attn   hidden after attention residual add
                          (= post_attention_layernorm input)
  layers.{i}.mlp_norm     post_attention_layernorm output
  layers.{i}.mlp_out      mlp (down_proj) output
  layers.{i}.out          decoder layer output
  norm                    final model.norm output
  logits                  [tokens, vocab] (after the final soft-cap where the config sets one)

Family taps (found from the modules: a self_attn.q_norm, a pre_feedforward_layernorm):
  layers.{i}.q_norm/.k_norm    Qwen3, Gemma 3: per-head norm output, the RoPE input
  layers.{i}.post_attn_norm    Gemma 3: post_attention_layernorm(attn_out), added to the residual
  layers.{i}.mlp_norm          Gemma 3: pre_feedforward_layernorm output
  layers.{i}.post_mlp_norm     Gemma 3: post_feedforward_layernorm(mlp_out), added to the residual
  embed                        Gemma 3: the scaled embedding (embed_tokens output)

Extra tensors (none of them 2D float32, so wgllm's TapSet::load skips them):
  tokens                  int32 [tokens], the prompt ids
  rope.inv_freq           float32 [head_dim/2], the rotary module's inv_freq buffer
  generated               int32 [N]   (with --generate N) greedy continuation
  generated_top2_gap      float32 [N] top-1 minus top-2 logit at each step

The safetensors ``__metadata__`` holds dtype, library versions, the command
line and the results of the built-in consistency checks.

Consistency checks (asserted): tap shapes; resid_attn == layer input +
attn_out and out == resid_attn + mlp_out (exact, in the compute dtype);
norm == model.norm(layers.{last}.out) and logits == lm_head(norm) (exact);
HF's output_hidden_states: hidden_states[0] == embed, hidden_states[i] ==
layers.{i-1}.out for 0 < i < L, and hidden_states[L] == norm (transformers 5.x
``capture_outputs(tie_last_hidden_states=True)`` replaces the last entry by
the *normed* last_hidden_state, it is NOT layers.{L-1}.out); q_rope/k_rope
match an independent float64 RoPE recomputation from q/k; with --generate, the
greedy tokens are re-derived by a cache-free forward over prompt+generated.
Where a layer has a sliding window: the logits recomputed with the window
widened past the prompt equal the dump exactly before the window's edge and
differ after it (else the fixture could not show the window), and the prompt
is at least 3 windows long.
"""

import argparse
import json
import math
import shlex
import struct
import sys

import numpy as np
import safetensors
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GenerationConfig

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--tokens", help="comma-separated prompt token ids")
    src.add_argument("--prompt", help="prompt text, tokenized with the folder's tokenizer")
    ap.add_argument("--out", required=True, help="output .safetensors path")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="f32")
    ap.add_argument("--generate", type=int, default=0, metavar="N", help="greedy-generate N tokens")
    return ap.parse_args(argv)


# ---------------------------------------------------------------------------
# Independent RoPE formulas (float64), documented for the Rust implementation.
# ---------------------------------------------------------------------------


def rope_param_sets(config):
    """{layer_type or None: rope parameter dict}.

    Gemma 3 keys ``rope_parameters`` by layer type (``sliding_attention`` /
    ``full_attention``, each with its own rope_theta); the other families
    have one dict for every layer (key None).
    """
    rp = config.rope_parameters
    if "rope_theta" in rp:
        return {None: rp}
    return dict(rp)


def layer_rope_key(config, i):
    sets = rope_param_sets(config)
    return None if None in sets else config.layer_types[i]


def rope_inv_freq_f64(config, rp):
    """inv_freq as transformers 5.23 defines it, but evaluated in float64."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dim = int(head_dim * rp.get("partial_rotary_factor", 1.0))
    base = float(rp["rope_theta"])
    inv = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    kind = rp.get("rope_type", "default")
    bands = None
    if kind == "default":
        pass
    elif kind == "llama3":
        factor = rp["factor"]
        lo, hi = rp["low_freq_factor"], rp["high_freq_factor"]
        old = rp["original_max_position_embeddings"]
        low_wl, high_wl = old / lo, old / hi
        wl = 2 * math.pi / inv
        out = np.empty_like(inv)
        bands = []
        for j in range(len(inv)):
            if wl[j] < high_wl:
                out[j] = inv[j]
                bands.append("keep")
            elif wl[j] > low_wl:
                out[j] = inv[j] / factor
                bands.append("scaled")
            else:
                s = (old / wl[j] - lo) / (hi - lo)
                out[j] = (1 - s) * inv[j] / factor + s * inv[j]
                bands.append("interp")
        inv = out
    else:
        raise NotImplementedError(f"rope_type {kind}")
    return inv, bands


def rope_apply_f64(x, inv, n_heads):
    """x: [S, n_heads*hd] float64 (half-split / rotate_half convention)."""
    S = x.shape[0]
    hd = x.shape[1] // n_heads
    pos = np.arange(S, dtype=np.float64)[:, None]
    ang = pos * inv[None, :]  # [S, hd/2]
    cos = np.concatenate([np.cos(ang), np.cos(ang)], axis=1)[:, None, :]
    sin = np.concatenate([np.sin(ang), np.sin(ang)], axis=1)[:, None, :]
    xh = x.reshape(S, n_heads, hd)
    x1, x2 = xh[..., : hd // 2], xh[..., hd // 2 :]
    rot = np.concatenate([-x2, x1], axis=-1)
    return (xh * cos + rot * sin).reshape(S, n_heads * hd)


def save_deterministic(tensors, path, metadata):
    """Write a standard safetensors file with a sorted, byte-reproducible header.

    safetensors' own writer emits ``__metadata__`` in hash-map order, so
    regenerating identical data would still churn the committed files.
    """
    header = {"__metadata__": dict(sorted(metadata.items()))}
    blobs = []
    offset = 0
    codes = {torch.float32: "F32", torch.int32: "I32"}
    for name in sorted(tensors):
        t = tensors[name].contiguous().cpu()
        raw = t.numpy().astype(t.numpy().dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": codes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    hjson = json.dumps(header, separators=(",", ":")).encode()
    hjson += b" " * (-len(hjson) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for raw in blobs:
            f.write(raw)
    # Round-trip through the official reader.
    back = load_file(path)
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), f"round-trip {name}"
    with safe_open(path, "pt") as f:
        assert f.metadata() == metadata


def max_abs(a, b):
    return float((a.float() - b.float()).abs().max())


def layer_window(config, attn):
    """The sliding window of one attention layer, None for full causal attention.

    Mistral applies config.sliding_window to every layer; Gemma 3 (and Qwen3
    with use_sliding_window) only to layers whose layer_types entry is
    "sliding_attention" (the attention module records that as is_sliding /
    sliding_window).
    """
    w = getattr(config, "sliding_window", None)
    if w is None:
        return None
    lts = getattr(config, "layer_types", None)
    if lts is not None:
        return w if lts[attn.layer_idx] == "sliding_attention" else None
    return w



def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    dtype = DTYPES[args.dtype]

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, attn_implementation="eager", dtype=dtype)
    model.eval()
    config = model.config
    for n, p in model.named_parameters():
        assert p.dtype == dtype, f"{n} has dtype {p.dtype}, want {dtype}"

    if args.tokens is not None:
        tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.model_dir)
        tokens = tok(args.prompt)["input_ids"]  # default add_special_tokens=True
    assert tokens and all(0 <= t < config.vocab_size for t in tokens), "token ids out of range"
    ids = torch.tensor([tokens], dtype=torch.long)
    S = len(tokens)

    base = model.model
    layers = base.layers
    L = len(layers)
    attn0 = layers[0].self_attn
    head_dim = attn0.head_dim
    n_heads = config.num_attention_heads
    n_kv = config.num_key_value_heads
    hidden = config.hidden_size
    inter = config.intermediate_size
    vocab = config.vocab_size
    # Family differences, read off the modules themselves (not off model_type):
    qk_norm = hasattr(attn0, "q_norm")  # Qwen3, Gemma 3: per-head RMSNorm on q and k
    sandwich = hasattr(layers[0], "pre_feedforward_layernorm")  # Gemma 3: 4 norms per layer
    softcap = getattr(config, "final_logit_softcapping", None)
    windows = [layer_window(config, layers[i].self_attn) for i in range(L)]

    # -- hooks ---------------------------------------------------------------
    taps = {}
    handles = []

    def first(x):
        return x[0] if isinstance(x, (tuple, list)) else x

    def store(name, t):
        assert name not in taps, f"tap {name} captured twice"
        assert t.shape[0] == 1, f"{name}: batch {t.shape}"
        taps[name] = t[0].detach().clone()

    def out_hook(name):
        def h(mod, inp, out):
            store(name, first(out))

        return h

    def in_hook(name):
        def h(mod, inp, kwargs):
            x = inp[0] if inp else kwargs["hidden_states"]
            store(name, x)

        return h

    def head_norm_hook(name, proj_name, n_heads):
        """Capture a per-head q/k norm output as [tokens, n_heads*head_dim].

        Qwen3 normalizes the [b, seq, heads, hd] view (before the transpose),
        Gemma 3 the [b, heads, seq, hd] tensor (after it). The layout is
        identified by recomputing the norm (mod.forward, no hooks) on the
        already captured projection output in the [b, seq, heads, hd] view.
        """

        def h(mod, inp, out):
            proj = taps[proj_name]  # [S, n*hd], captured by the q/k_proj hook
            want = mod.forward(proj.reshape(1, proj.shape[0], n_heads, -1))
            for cand in (out, out.transpose(1, 2)):
                if tuple(cand.shape) == tuple(want.shape) and torch.equal(cand, want):
                    store(name, cand.reshape(1, proj.shape[0], -1))
                    return
            raise AssertionError(f"{name}: output {tuple(out.shape)} is not the per-head norm of {proj_name}")

        return h

    def reg_out(mod, name):
        handles.append(mod.register_forward_hook(out_hook(name)))

    def reg_in(mod, name):
        handles.append(mod.register_forward_pre_hook(in_hook(name), with_kwargs=True))

    reg_out(base.embed_tokens, "embed")
    current_layer = [None]
    for i, layer in enumerate(layers):
        p = f"layers.{i}."
        sa = layer.self_attn

        def set_layer(mod, inp, kwargs, i=i):
            current_layer[0] = i

        handles.append(sa.register_forward_pre_hook(set_layer, with_kwargs=True))
        reg_in(layer, p + "in")  # internal only: the layer input, for residual checks
        reg_out(layer.input_layernorm, p + "attn_norm")
        reg_out(sa.q_proj, p + "q")
        reg_out(sa.k_proj, p + "k")
        reg_out(sa.v_proj, p + "v")
        reg_in(sa.o_proj, p + "attn")
        reg_out(sa.o_proj, p + "attn_out")
        if qk_norm:
            for nm, nh in (("q", n_heads), ("k", n_kv)):
                handles.append(getattr(sa, nm + "_norm").register_forward_hook(head_norm_hook(p + nm + "_norm", p + nm, nh)))
        if sandwich:
            # Gemma 3: post_attention_layernorm normalizes the attention output
            # BEFORE the residual add; pre_feedforward_layernorm is the MLP's
            # input norm (wgllm's mlp_norm); post_feedforward_layernorm
            # normalizes the MLP output before the second residual add.
            reg_out(layer.post_attention_layernorm, p + "post_attn_norm")
            reg_in(layer.pre_feedforward_layernorm, p + "resid_attn")
            reg_out(layer.pre_feedforward_layernorm, p + "mlp_norm")
            reg_out(layer.post_feedforward_layernorm, p + "post_mlp_norm")
        else:
            reg_in(layer.post_attention_layernorm, p + "resid_attn")
            reg_out(layer.post_attention_layernorm, p + "mlp_norm")
        reg_out(layer.mlp, p + "mlp_out")
        reg_out(layer, p + "out")
    reg_out(base.norm, "norm")

    def rotary_hook(mod, inp, kwargs, out):
        cos, sin = out
        lt = kwargs.get("layer_type", inp[2] if len(inp) > 2 else None)
        sfx = "" if lt is None else "." + lt
        store("rope.cos" + sfx, cos)
        store("rope.sin" + sfx, sin)

    handles.append(base.rotary_emb.register_forward_hook(rotary_hook, with_kwargs=True))

    # RoPE outputs: wrap the modeling module's apply_rotary_pos_emb (attention
    # forward looks it up as a module global at call time).
    modeling = sys.modules[type(attn0).__module__]
    orig_apply = modeling.apply_rotary_pos_emb
    rope_calls = []

    def apply_wrapped(q, k, cos, sin, *a, **kw):
        qe, ke = orig_apply(q, k, cos, sin, *a, **kw)
        i = current_layer[0]
        rope_calls.append(i)
        # [b, heads, seq, hd] -> [b, seq, heads*hd]
        store(f"layers.{i}.q_rope", qe.transpose(1, 2).reshape(qe.shape[0], qe.shape[2], -1))
        store(f"layers.{i}.k_rope", ke.transpose(1, 2).reshape(ke.shape[0], ke.shape[2], -1))
        return qe, ke

    modeling.apply_rotary_pos_emb = apply_wrapped
    try:
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    finally:
        modeling.apply_rotary_pos_emb = orig_apply
        for h in handles:
            h.remove()
    assert rope_calls == list(range(L)), f"apply_rotary_pos_emb wrapper calls: {rope_calls}"
    taps["logits"] = out.logits[0].detach().clone()

    # -- checks ----------------------------------------------------------------
    notes = {}
    rope_sets = rope_param_sets(config)
    widths = {"embed": hidden, "norm": hidden, "logits": vocab}
    for i in range(L):
        p = f"layers.{i}."
        widths.update(
            {
                p + "in": hidden,
                p + "attn_norm": hidden,
                p + "q": n_heads * head_dim,
                p + "k": n_kv * head_dim,
                p + "v": n_kv * head_dim,
                p + "q_rope": n_heads * head_dim,
                p + "k_rope": n_kv * head_dim,
                p + "attn": n_heads * head_dim,
                p + "attn_out": hidden,
                p + "resid_attn": hidden,
                p + "mlp_norm": hidden,
                p + "mlp_out": hidden,
                p + "out": hidden,
            }
        )
        if qk_norm:
            widths[p + "q_norm"] = n_heads * head_dim
            widths[p + "k_norm"] = n_kv * head_dim
        if sandwich:
            widths[p + "post_attn_norm"] = hidden
            widths[p + "post_mlp_norm"] = hidden
    for key in rope_sets:
        sfx = "" if key is None else "." + key
        widths["rope.cos" + sfx] = head_dim
        widths["rope.sin" + sfx] = head_dim
    assert set(taps) == set(widths), f"taps mismatch: {sorted(set(taps) ^ set(widths))}"
    for name, w in widths.items():
        t = taps[name]
        assert tuple(t.shape) == (S, w), f"{name}: shape {tuple(t.shape)} want {(S, w)}"
        assert t.dtype == dtype, f"{name}: dtype {t.dtype}"
        assert torch.isfinite(t.float()).all(), f"{name}: non-finite"

    for i in range(L):
        p = f"layers.{i}."
        layer = layers[i]
        prev = taps["embed"] if i == 0 else taps[f"layers.{i - 1}.out"]
        assert torch.equal(taps[p + "in"], prev), f"{p}in != previous output"
        # What the residual adds: the attention / MLP output itself, or (Gemma
        # 3) its post-norm.
        attn_add = taps[p + "post_attn_norm"] if sandwich else taps[p + "attn_out"]
        mlp_add = taps[p + "post_mlp_norm"] if sandwich else taps[p + "mlp_out"]
        assert torch.equal(taps[p + "resid_attn"], prev + attn_add), f"{p}resid_attn"
        assert torch.equal(taps[p + "out"], taps[p + "resid_attn"] + mlp_add), f"{p}out"
        assert torch.equal(layer.input_layernorm(prev[None])[0], taps[p + "attn_norm"]), f"{p}attn_norm"
        if sandwich:
            pa = layer.post_attention_layernorm(taps[p + "attn_out"][None])[0]
            assert torch.equal(pa, taps[p + "post_attn_norm"]), f"{p}post_attn_norm"
            pm = layer.post_feedforward_layernorm(taps[p + "mlp_out"][None])[0]
            assert torch.equal(pm, taps[p + "post_mlp_norm"]), f"{p}post_mlp_norm"
    last = taps[f"layers.{L - 1}.out"]
    assert torch.equal(base.norm(last[None])[0], taps["norm"]), "norm != model.norm(layers.last.out)"
    head_out = model.lm_head(taps["norm"][None])[0]
    if softcap is not None:
        # Gemma: logits = cap * tanh(lm_head(norm) / cap), in the compute dtype.
        notes["logits_max_abs_before_softcap"] = f"{float(head_out.abs().max()):.4g}"
        head_out = torch.tanh(head_out / softcap) * softcap
    assert torch.equal(head_out, taps["logits"]), "logits != softcap(lm_head(norm))"

    hs = out.hidden_states
    assert len(hs) == L + 1, f"len(hidden_states)={len(hs)}"
    assert torch.equal(hs[0][0], taps["embed"]), "hidden_states[0] != embed"
    for i in range(1, L):
        assert torch.equal(hs[i][0], taps[f"layers.{i - 1}.out"]), f"hidden_states[{i}] != layers.{i - 1}.out"
    if torch.equal(hs[L][0], taps["norm"]):
        notes["hidden_states_last"] = "hidden_states[-1] == norm (final RMSNorm applied; HF 5.x ties it to last_hidden_state)"
    elif torch.equal(hs[L][0], last):
        notes["hidden_states_last"] = "hidden_states[-1] == layers.last.out (pre-norm)"
    else:
        raise AssertionError("hidden_states[-1] matches neither norm nor layers.last.out")

    # Embedding scale (Gemma: sqrt(hidden) as an f32 tensor, cast to the
    # weight dtype, so bf16 compute uses the bf16-rounded value).
    embed_scale = getattr(base.embed_tokens, "embed_scale", None)
    if embed_scale is not None:
        es = embed_scale.to(dtype)
        want = base.embed_tokens.weight[ids[0]] * es
        assert torch.equal(taps["embed"], want), "embed != weight[ids] * embed_scale"
        notes["embed_scale"] = repr(float(es))

    # RoPE: model buffer vs documented formula, and taps vs float64 recomputation.
    inv_models = {}
    for key, rp in rope_sets.items():
        sfx = "" if key is None else "." + key
        inv64, bands = rope_inv_freq_f64(config, rp)
        buf = base.rotary_emb.inv_freq if key is None else getattr(base.rotary_emb, f"{key}_inv_freq")
        inv_model = buf.detach().to(torch.float32).cpu()
        inv_models[key] = (inv_model, inv64)
        inv_rel = float(np.max(np.abs(inv_model.double().numpy() - inv64) / inv64))
        assert inv_rel < 1e-6, f"inv_freq{sfx} differs from formula: rel {inv_rel}"
        notes["inv_freq_max_rel_diff_vs_f64_formula" + sfx] = f"{inv_rel:.3e}"
        if bands is not None:
            counts = {b: bands.count(b) for b in ("keep", "interp", "scaled")}
            notes["llama3_bands"] = json.dumps({"per_freq": bands, "counts": counts})
            assert all(counts.values()), f"llama3: not every band is exercised: {counts}"
        # cos/sin: float32 angles pos * inv_freq (f32 buffer), cos/sin in f32, then
        # cast to the compute dtype. Check against float64 cos of the same f32 angles.
        ang = (torch.arange(S, dtype=torch.float32)[:, None] * inv_model[None, :]).double()
        ang = torch.cat([ang, ang], dim=-1)
        cs_err = max(
            max_abs(taps["rope.cos" + sfx].double(), ang.cos()), max_abs(taps["rope.sin" + sfx].double(), ang.sin())
        )
        assert cs_err < (1e-5 if dtype == torch.float32 else 1e-2), f"rotary cos/sin{sfx} err {cs_err}"
        notes["rope_cos_sin_max_abs_err_vs_f64" + sfx] = f"{cs_err:.3e}"
    if None in rope_sets:
        scaling = float(base.rotary_emb.attention_scaling)
    else:
        scalings = {float(getattr(base.rotary_emb, f"{k}_attention_scaling")) for k in rope_sets}
        assert len(scalings) == 1, f"rope attention_scaling differs per layer type: {scalings}"
        (scaling,) = scalings
    notes["rope_attention_scaling"] = repr(scaling)
    tol = 2e-5 if dtype == torch.float32 else 0.1
    for i in range(L):
        inv64 = inv_models[layer_rope_key(config, i)][1]
        for nm, nh in (("q", n_heads), ("k", n_kv)):
            # RoPE input: the q/k norm output where the family has one.
            src = f"layers.{i}.{nm}_norm" if qk_norm else f"layers.{i}.{nm}"
            x = taps[src].double().numpy()
            ref = rope_apply_f64(x, inv64, nh) * scaling
            got = taps[f"layers.{i}.{nm}_rope"].double().numpy()
            err = float(np.max(np.abs(ref - got)) / max(1.0, float(np.max(np.abs(ref)))))
            assert err < tol, f"layers.{i}.{nm}_rope vs f64 RoPE: rel err {err}"
            notes[f"rope_check.layers.{i}.{nm}"] = f"{err:.3e}"

    # Sliding window: the same forward with the window widened past the
    # prompt must agree exactly before the window's edge and differ after it;
    # otherwise the fixture would not show that the window is applied at all.
    if any(w is not None for w in windows):
        w = min(x for x in windows if x is not None)
        saved = config.sliding_window
        config.sliding_window = 1 << 20
        try:
            wide = model(input_ids=ids, use_cache=False).logits[0]
        finally:
            config.sliding_window = saved
        before = max_abs(wide[:w], taps["logits"][:w])
        after = max_abs(wide[w:], taps["logits"][w:])
        notes["window_check"] = (
            f"window {w}: max|logits - logits(window off)| at positions < {w}: {before:.3e}, at >= {w}: {after:.3e}"
        )
        assert before == 0.0, f"window off changed logits before the window edge: {before}"
        assert S >= 3 * w, f"prompt of {S} tokens is shorter than 3 windows of {w}"
        assert after > 0.1, f"window off changed logits past the edge by only {after}: window not applied?"

    # -- generation ------------------------------------------------------------
    extra = {}
    if args.generate > 0:
        N = args.generate
        gc = GenerationConfig(
            max_new_tokens=N,
            min_new_tokens=0,
            do_sample=False,
            num_beams=1,
            eos_token_id=None,  # never stop early: the fixture needs exactly N tokens
            pad_token_id=0,
            bos_token_id=None,
            output_logits=True,
            return_dict_in_generate=True,
        )
        # transformers 5.23 merges the passed GenerationConfig with the model's
        # generation_config.json, where `eos_token_id=None` counts as "unset":
        # EOS must be cleared on the model's own generation_config to be ignored.
        model.generation_config.eos_token_id = None
        g = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc)
        gen = g.sequences[0, S:]
        assert gen.shape[0] == N, f"generated {gen.shape[0]} tokens, want {N}"
        assert torch.equal(g.sequences[0, :S], ids[0])
        step_logits = torch.stack([x[0].float() for x in g.logits])  # [N, vocab], raw logits
        top2 = step_logits.topk(2, dim=-1).values
        gap = (top2[:, 0] - top2[:, 1]).contiguous()
        assert torch.equal(step_logits.argmax(-1), gen), "generated != argmax of step logits"
        # Re-derive the greedy tokens without a KV cache.
        full = torch.cat([ids[0], gen[:-1]])[None]
        nc_logits = model(input_ids=full, use_cache=False).logits[0, S - 1 :].float()
        nc_ok = torch.equal(nc_logits.argmax(-1), gen)
        notes["generate_cache_free_argmax_matches"] = str(nc_ok)
        notes["generate_max_abs_logit_diff_cache_vs_nocache"] = f"{max_abs(nc_logits, step_logits):.3e}"
        if dtype == torch.float32:
            assert nc_ok, "cache-free greedy re-derivation disagrees with generate()"
        eos = config.eos_token_id
        eos_set = set(eos if isinstance(eos, list) else ([] if eos is None else [eos]))
        notes["generated_contains_eos"] = str(any(int(t) in eos_set for t in gen))
        notes["generated_min_top2_gap"] = f"{float(gap.min()):.6g}"
        extra["generated"] = gen.to(torch.int32).contiguous()
        extra["generated_top2_gap"] = gap.to(torch.float32)

    # -- save ------------------------------------------------------------------
    # Internal-only captures are not written: the layer inputs (`.in`) and the
    # rotary cos/sin tables (2D F32 tensors would be picked up as taps by
    # wgllm's TapSet::load, which takes every 2D F32 tensor in the file).
    internal = {k for k in taps if k.endswith(".in") or k.startswith(("rope.cos", "rope.sin"))}
    tensors = {k: v.to(torch.float32).contiguous() for k, v in taps.items() if k not in internal}
    tensors["tokens"] = torch.tensor(tokens, dtype=torch.int32)
    for key, (inv_model, _) in inv_models.items():
        # `rope.inv_freq`, or per layer type `rope.inv_freq.sliding_attention` etc.
        tensors["rope.inv_freq" + ("" if key is None else "." + key)] = inv_model.contiguous()
    tensors.update(extra)
    meta = {
        "dtype": args.dtype,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "safetensors_version": safetensors.__version__,
        "numpy_version": np.__version__,
        "command": " ".join(shlex.quote(a) for a in (["python", "tools/dump_reference.py"] + sys.argv[1:])),
        "model_type": config.model_type,
        "num_layers": str(L),
        "num_heads": str(n_heads),
        "num_kv_heads": str(n_kv),
        "head_dim": str(head_dim),
        "hidden_size": str(hidden),
        "intermediate_size": str(inter),
        "vocab_size": str(vocab),
        "rope_parameters": json.dumps(config.rope_parameters, sort_keys=True),
        "attn_implementation": "eager",
        "layout": "taps are float32 [tokens, width]; heads flattened head-major like q_proj output",
    }
    # Family extras, written only where they apply (the files of the older
    # fixtures stay byte-identical).
    if any(w is not None for w in windows):
        meta["layer_windows"] = json.dumps(windows)  # per layer; null = full causal
    if float(attn0.scaling) != head_dim**-0.5:
        meta["attn_scale"] = repr(float(attn0.scaling))
    if qk_norm:
        meta["qk_norm"] = "per-head RMSNorm on q and k before RoPE (taps q_norm, k_norm)"
    if sandwich:
        meta["sandwich_norms"] = "post_attn_norm / post_mlp_norm normalize each block output before its residual add"
    if softcap is not None:
        meta["final_logit_softcapping"] = repr(softcap)
    meta.update(notes)
    save_deterministic(tensors, args.out, meta)

    summary = {k: meta[k] for k in ("dtype", "model_type")}
    summary["tokens"] = S
    summary["logits_std"] = round(float(tensors["logits"].std()), 3)
    summary.update({k: v for k, v in notes.items() if not k.startswith("rope_check")})
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
