#!/usr/bin/env python3
"""Float64 goldens for tests/precision.rs (issue #14): how near the exact answer is?

    /work/venv/bin/python tools/make_f64_goldens.py fixtures [tests/fixtures]
    /work/venv/bin/python tools/make_f64_goldens.py real MODEL_DIR --name smollm2|qwen25

The float64 forward is tools/numpy_forward.py's `forward` (numpy, independent
of torch and of the Rust f32 path), on the same bf16 weights.

The taps kept are the ones the precision claim is about: every layer's
`layers.{i}.out`, the final `norm` and the `logits`.

* `fixtures`: writes `<fixture>/reference_f64.safetensors` beside each
  fixture's `reference_f32.safetensors` (transformers f32, every position):
  each tap as float64 for every position of the dump's tokens, except
  logits wider than 4096 (qwen2_big_vocab), kept for the last position only.
  A tap holds the LAST rows of the sequence (the test compares wgllm's last
  rows to it).
* `real`: writes `tests/fixtures/real/NAME_f64.safetensors` for every prompt
  of `tests/fixtures/real/NAME.json` plus its reference token sequence, last
  position only. To keep the file small (Qwen's logits are 151936 wide) the
  float64 value is stored as transformers' float32 value `P.f32.TAP` plus the
  float32 difference `P.f64_minus_f32.TAP`: f64 = f32 + diff, exact to about
  |diff| * 6e-8 (< 1e-11 here), so one file gives both the golden and
  transformers' own distance to it. `P.tokens` (i64) is the sequence.
  Transformers runs as tools/make_real_goldens.py does: float32 compute on the
  bf16 weights, eager attention, CPU; the taps are read with forward hooks on
  each decoder layer and the final norm.
"""

import argparse
import json
import os
import sys

import numpy as np
from safetensors.numpy import load_file, save_file

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy_forward  # noqa: E402

WIDE_LOGITS = 4096


def kept(cfg, taps):
    """The precision taps of a numpy_forward result."""
    names = [f"layers.{i}.out" for i in range(cfg["num_hidden_layers"])] + ["norm", "logits"]
    return {n: taps[n] for n in names}


def fixtures(root):
    for name in sorted(os.listdir(root)):
        d = os.path.join(root, name)
        ref_path = os.path.join(d, "reference_f32.safetensors")
        if not os.path.isfile(ref_path):
            continue
        cfg = json.load(open(os.path.join(d, "config.json")))
        W = numpy_forward.load_bf16_safetensors(os.path.join(d, "model.safetensors"))
        ref = load_file(ref_path)
        tokens = ref["tokens"].tolist()
        out = {}
        for tap, v in kept(cfg, numpy_forward.forward(cfg, W, tokens)).items():
            if tap == "logits" and v.shape[1] > WIDE_LOGITS:
                v = v[-1:]
            out[tap] = np.ascontiguousarray(v, dtype=np.float64)
            r = ref[tap][-v.shape[0] :].astype(np.float64)
            print(f"{name:22} {tap:14} transformers f32 max|d| to f64 {np.abs(r - v).max():.3e}")
        out["tokens"] = np.asarray(tokens, dtype=np.int64)
        save_file(out, os.path.join(d, "reference_f64.safetensors"), metadata={"made_by": "tools/make_f64_goldens.py"})


def transformers_taps(model, tokens, n_layers):
    import torch

    got = {}

    def hook(name):
        def f(_mod, _inp, out):
            o = out[0] if isinstance(out, tuple) else out
            got[name] = o[0, -1].detach().to(torch.float64).numpy()

        return f

    hs = [model.model.layers[i].register_forward_hook(hook(f"layers.{i}.out")) for i in range(n_layers)]
    hs.append(model.model.norm.register_forward_hook(hook("norm")))
    with torch.no_grad():
        logits = model(torch.tensor([tokens]), use_cache=False).logits[0, -1]
    for h in hs:
        h.remove()
    got["logits"] = logits.to(torch.float64).numpy()
    return got


def real(model_dir, name, out_dir):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    golden = json.load(open(os.path.join(out_dir, f"{name}.json")))
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    seqs = [(p["name"], p["prompt_ids"]) for p in golden["prompts"]]
    seqs.append(("reference", golden["reference"]["tokens"]))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    W = numpy_forward.load_bf16_safetensors(os.path.join(model_dir, "model.safetensors"), dtype=np.float32)
    out = {}
    for pname, tokens in seqs:
        tf = transformers_taps(model, tokens, cfg["num_hidden_layers"])
        exact = kept(cfg, numpy_forward.forward(cfg, W, tokens))
        for tap, v in exact.items():
            e = v[-1:]
            t32 = tf[tap].astype(np.float32)[None, :]
            out[f"{pname}.f32.{tap}"] = t32
            out[f"{pname}.f64_minus_f32.{tap}"] = (e - t32.astype(np.float64)).astype(np.float32)
            if tap in ("norm", "logits") or tap.endswith(f".{cfg['num_hidden_layers'] - 1}.out"):
                print(f"{name} {pname:15} {tap:14} transformers f32 max|d| to f64 {np.abs(t32 - e).max():.3e}")
        out[f"{pname}.tokens"] = np.asarray(tokens, dtype=np.int64)
    path = os.path.join(out_dir, f"{name}_f64.safetensors")
    save_file(out, path, metadata={"made_by": "tools/make_f64_goldens.py", "torch": torch.__version__})
    print(f"wrote {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    f = sub.add_parser("fixtures")
    f.add_argument("root", nargs="?", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures"))
    r = sub.add_parser("real")
    r.add_argument("model_dir")
    r.add_argument("--name", required=True, choices=["smollm2", "qwen25"])
    r.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "real"))
    a = ap.parse_args()
    if a.what == "fixtures":
        fixtures(a.root)
    else:
        real(a.model_dir, a.name, a.out_dir)


if __name__ == "__main__":
    main()
