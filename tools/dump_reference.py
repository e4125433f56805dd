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
  logits                  [tokens, vocab]

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


def rope_inv_freq_f64(config):
    """inv_freq as transformers 5.23 defines it, but evaluated in float64."""
    rp = config.rope_parameters
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
        reg_in(layer.post_attention_layernorm, p + "resid_attn")
        reg_out(layer.post_attention_layernorm, p + "mlp_norm")
        reg_out(layer.mlp, p + "mlp_out")
        reg_out(layer, p + "out")
    reg_out(base.norm, "norm")

    def rotary_hook(mod, inp, out):
        cos, sin = out
        store("rope.cos", cos)
        store("rope.sin", sin)

    handles.append(base.rotary_emb.register_forward_hook(rotary_hook))

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
    widths["rope.cos"] = head_dim
    widths["rope.sin"] = head_dim
    assert set(taps) == set(widths), f"taps mismatch: {sorted(set(taps) ^ set(widths))}"
    for name, w in widths.items():
        t = taps[name]
        assert tuple(t.shape) == (S, w), f"{name}: shape {tuple(t.shape)} want {(S, w)}"
        assert t.dtype == dtype, f"{name}: dtype {t.dtype}"
        assert torch.isfinite(t.float()).all(), f"{name}: non-finite"

    for i in range(L):
        p = f"layers.{i}."
        prev = taps["embed"] if i == 0 else taps[f"layers.{i - 1}.out"]
        assert torch.equal(taps[p + "in"], prev), f"{p}in != previous output"
        assert torch.equal(taps[p + "resid_attn"], prev + taps[p + "attn_out"]), f"{p}resid_attn"
        assert torch.equal(taps[p + "out"], taps[p + "resid_attn"] + taps[p + "mlp_out"]), f"{p}out"
        assert torch.equal(layers[i].input_layernorm(prev[None])[0], taps[p + "attn_norm"]), f"{p}attn_norm"
    last = taps[f"layers.{L - 1}.out"]
    assert torch.equal(base.norm(last[None])[0], taps["norm"]), "norm != model.norm(layers.last.out)"
    assert torch.equal(model.lm_head(taps["norm"][None])[0], taps["logits"]), "logits != lm_head(norm)"

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

    # RoPE: model buffer vs documented formula, and taps vs float64 recomputation.
    inv64, bands = rope_inv_freq_f64(config)
    inv_model = base.rotary_emb.inv_freq.detach().to(torch.float32).cpu()
    assert inv_model.dtype == torch.float32
    inv_rel = float(np.max(np.abs(inv_model.double().numpy() - inv64) / inv64))
    assert inv_rel < 1e-6, f"inv_freq differs from formula: rel {inv_rel}"
    notes["inv_freq_max_rel_diff_vs_f64_formula"] = f"{inv_rel:.3e}"
    if bands is not None:
        counts = {b: bands.count(b) for b in ("keep", "interp", "scaled")}
        notes["llama3_bands"] = json.dumps({"per_freq": bands, "counts": counts})
        assert all(counts.values()), f"llama3: not every band is exercised: {counts}"
    # cos/sin: float32 angles pos * inv_freq (f32 buffer), cos/sin in f32, then
    # cast to the compute dtype. Check against float64 cos of the same f32 angles.
    ang = (torch.arange(S, dtype=torch.float32)[:, None] * inv_model[None, :]).double()
    ang = torch.cat([ang, ang], dim=-1)
    cs_err = max(max_abs(taps["rope.cos"].double(), ang.cos()), max_abs(taps["rope.sin"].double(), ang.sin()))
    assert cs_err < (1e-5 if dtype == torch.float32 else 1e-2), f"rotary cos/sin err {cs_err}"
    notes["rope_cos_sin_max_abs_err_vs_f64"] = f"{cs_err:.3e}"
    scaling = float(base.rotary_emb.attention_scaling)
    notes["rope_attention_scaling"] = repr(scaling)
    tol = 2e-5 if dtype == torch.float32 else 0.1
    for i in range(L):
        for nm, nh in (("q", n_heads), ("k", n_kv)):
            x = taps[f"layers.{i}.{nm}"].double().numpy()
            ref = rope_apply_f64(x, inv64, nh) * scaling
            got = taps[f"layers.{i}.{nm}_rope"].double().numpy()
            err = float(np.max(np.abs(ref - got)) / max(1.0, float(np.max(np.abs(ref)))))
            assert err < tol, f"layers.{i}.{nm}_rope vs f64 RoPE: rel err {err}"
            notes[f"rope_check.layers.{i}.{nm}"] = f"{err:.3e}"

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
    internal = {k for k in taps if k.endswith(".in")} | {"rope.cos", "rope.sin"}
    tensors = {k: v.to(torch.float32).contiguous() for k, v in taps.items() if k not in internal}
    tensors["tokens"] = torch.tensor(tokens, dtype=torch.int32)
    tensors["rope.inv_freq"] = inv_model.contiguous()
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
    meta.update(notes)
    save_deterministic(tensors, args.out, meta)

    summary = {k: meta[k] for k in ("dtype", "model_type")}
    summary["tokens"] = S
    summary["logits_std"] = round(float(tensors["logits"].std()), 3)
    summary.update({k: v for k, v in notes.items() if not k.startswith("rope_check")})
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
