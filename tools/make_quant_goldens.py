#!/usr/bin/env python3
"""Goldens for running the two real GGUF files at their own quantized types
(tests/quant_models.rs).

    /work/venv/bin/python tools/make_quant_goldens.py GGUF --name smollm2|qwen25 \
        --out tests/fixtures/quant/NAME.json [--steps 32] [--logits-prompts 2] [--max-prompts N]

GGUF is the PyPI file wgllm fetches (`<cache>/gguf-files/<model>/*.gguf`):
SmolLM2-135M-Instruct Q4_1 (Q8_0 embedding) or Qwen2.5-Coder-0.5B-Instruct
Q4_K_M (Q5_0, Q8_0, Q4_K, Q6_K). The model is loaded with
`AutoModelForCausalLM.from_pretrained(dir, gguf_file=name, dtype=float32)`:
transformers dequantizes every block with the `gguf` package (llama.cpp's own
dequantizer), so the f32 weights are the values wgllm's kernels dequantize
from the same blocks. Before anything is recorded the script checks that
(asserted): the embedding, the output projection (Qwen's GGUF stores its own
`output.weight`, so that model is untied) and every layer's tensors equal
`gguf.quants.dequantize` of the file's blocks, bit for bit (q/k rows after
llama.cpp's permutation is undone, for the llama architecture).

Prompts: the token ids of the existing real-model goldens
(tests/fixtures/real/NAME.json), fed as ids. Text is not tokenized here:
transformers' GGUF tokenizer conversion drops steps of the upstream
pipelines (see the tokenizer traps in /work/shared/NOTES.md), and wgllm's
tokenizer is tested elsewhere.

Per prompt: the greedy continuation of --steps tokens (prefill, then one token
per step through the KV cache, argmax of the raw logits; EOS does not stop),
per step the top-5 ids and logits and the top-1 minus top-2 gap (the same
loop as tools/make_real_goldens.py, imported from it), and for the first
--logits-prompts prompts the whole last-position logits row after the prompt,
written to `<out dir>/NAME_logits.safetensors` (`logits.<prompt name>`, f32).
"""

import argparse
import hashlib
import json
import os
import platform
import shlex
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("USE_HUB_KERNELS", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import gguf  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
sys.dont_write_bytecode = True
sys.path.insert(0, str(TOOLS))
from make_real_goldens import f32, greedy  # noqa: E402


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def unpermute(w, n_head):
    """Undo llama.cpp's q/k row permutation (convert_hf_to_gguf's permute)."""
    rows = w.shape[0]
    hd = rows // n_head
    return w.reshape(n_head, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def check_weights(model, path):
    """Every tensor transformers holds equals the gguf package's dequantization."""
    r = gguf.GGUFReader(str(path))
    arch = str(bytes(r.fields["general.architecture"].parts[-1]), "utf-8")
    n_head = int(r.fields[f"{arch}.attention.head_count"].parts[-1][0])
    n_kv = int(r.fields[f"{arch}.attention.head_count_kv"].parts[-1][0])
    sd = model.state_dict()
    names = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    per_layer = {
        "attn_norm.weight": "input_layernorm.weight",
        "ffn_norm.weight": "post_attention_layernorm.weight",
        "attn_q.weight": "self_attn.q_proj.weight",
        "attn_k.weight": "self_attn.k_proj.weight",
        "attn_v.weight": "self_attn.v_proj.weight",
        "attn_output.weight": "self_attn.o_proj.weight",
        "attn_q.bias": "self_attn.q_proj.bias",
        "attn_k.bias": "self_attn.k_proj.bias",
        "attn_v.bias": "self_attn.v_proj.bias",
        "ffn_gate.weight": "mlp.gate_proj.weight",
        "ffn_up.weight": "mlp.up_proj.weight",
        "ffn_down.weight": "mlp.down_proj.weight",
    }
    types = {}
    checked = 0
    for t in r.tensors:
        if t.name in names:
            hf = names[t.name]
        else:
            _, layer, rest = t.name.split(".", 2)
            hf = f"model.layers.{layer}.{per_layer[rest]}"
        v = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = [int(d) for d in reversed(t.shape)]
        v = v.reshape(shape)
        if arch == "llama" and t.name.endswith(("attn_q.weight", "attn_k.weight")):
            v = unpermute(v, n_head if "attn_q" in t.name else n_kv)
        got = sd[hf].float().numpy()
        assert got.shape == v.shape, f"{t.name} -> {hf}: {got.shape} vs {v.shape}"
        assert np.array_equal(got, v), f"{t.name} -> {hf}: transformers' values differ from gguf.dequantize"
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        checked += 1
    # Without output.weight the head must be the embedding (tied); with it,
    # the loop above compared lm_head with output.weight itself.
    if "output.weight" not in [t.name for t in r.tensors]:
        assert model.config.tie_word_embeddings, "no output.weight but the model is untied"
        assert np.array_equal(sd["lm_head.weight"].numpy(), sd["model.embed_tokens.weight"].numpy())
    return checked, dict(sorted(types.items()))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf", type=Path)
    ap.add_argument("--name", required=True, choices=["smollm2", "qwen25"])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--logits-prompts", type=int, default=2)
    ap.add_argument("--max-prompts", type=int, help="only the first N prompts (Qwen on a slow machine)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_grad_enabled(False)

    path = args.gguf.resolve()
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32, f"{n}: {p.dtype}"
    checked, types = check_weights(model, path)
    print(f"{args.name}: {checked} tensors equal gguf.dequantize ({types})", file=sys.stderr)

    real = json.loads((REPO / "tests/fixtures/real" / f"{args.name}.json").read_text())
    prompts = []
    logits = {}
    for i, rp in enumerate(real["prompts"][: args.max_prompts]):
        ids = rp["prompt_ids"]
        if i < args.logits_prompts:
            out = model(input_ids=torch.tensor([ids]), use_cache=False)
            logits[f"logits.{rp['name']}"] = out.logits[0, -1].float().numpy().copy()
        recs = greedy(model, ids, args.steps)
        gen = [r["token"] for r in recs]
        gaps = [r["gap"] for r in recs]
        prompts.append(
            {
                "name": rp["name"],
                "prompt_ids": ids,
                "generated": gen,
                "min_gap": min(gaps),
                "min_gap_step": gaps.index(min(gaps)),
                "steps": recs,
            }
        )
        same = sum(1 for a, b in zip(gen, rp["generated"]) if a == b)
        print(
            f"{args.name} {rp['name']}: min gap {min(gaps):.4g}; first "
            f"{next((k for k, (a, b) in enumerate(zip(gen, rp['generated'])) if a != b), len(gen))} "
            f"tokens equal the bf16 golden ({same}/{len(gen)} positions)",
            file=sys.stderr,
        )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    lpath = args.out.parent / f"{args.name}_logits.safetensors"
    save_file(logits, str(lpath))
    golden = {
        "model": args.name,
        "gguf": path.name,
        "gguf_sha256": sha256_file(path),
        "gguf_bytes": path.stat().st_size,
        "tensor_types": types,
        "weights_checked": f"{checked} tensors of transformers' model equal gguf.quants.dequantize of the file's blocks",
        "vocab_size": model.config.vocab_size,
        "compute": "transformers AutoModelForCausalLM.from_pretrained(gguf_file=...), dtype float32, eager attention, CPU",
        "greedy": f"{args.steps} steps: prefill, then one token per step with the KV cache; argmax of raw logits; EOS does not stop",
        "prompts_from": f"tests/fixtures/real/{args.name}.json (prompt_ids, fed as ids)",
        "steps": args.steps,
        "logits": {"file": lpath.name, "sha256": sha256_file(lpath), "prompts": sorted(logits)},
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "command": " ".join(shlex.quote(a) for a in ["python", "tools/make_quant_goldens.py"] + sys.argv[1:]),
        "prompts": prompts,
    }
    with open(args.out, "w") as f:
        json.dump(golden, f, indent=1)
        f.write("\n")
    print(f"wrote {args.out} and {lpath}", file=sys.stderr)


if __name__ == "__main__":
    main()
