#!/usr/bin/env python3
"""Golden token ids and chat renderings for wgllm's GGUF tokenizer (tests/tokenizer.rs).

For each real GGUF this script

1. reads the `tokenizer.ggml.*` metadata with llama.cpp's own `gguf` package,
2. builds the UPSTREAM Hugging Face pipeline of that model family (the one in the
   model's original tokenizer.json) with the Python `tokenizers` API, from the
   GGUF vocabulary and merges,
3. encodes a fixed list of strings (no special tokens added) and records the ids
   and the decoded text,
4. records what transformers' own GGUF loading (`AutoTokenizer.from_pretrained(dir,
   gguf_file=...)`) gives for the same strings, and flags where it differs,
5. renders a few conversations with transformers' `apply_chat_template`, using the
   GGUF's `tokenizer.chat_template` and a few synthetic templates that exercise
   the Jinja features chat templates use (Python string methods, tojson,
   namespace, loop controls, raise_exception, tools/documents being None).

and writes tests/fixtures/tokenizer/<name>_golden.json (ids only, no vocabulary).

Pipelines (normalizer / pre-tokenizer / decoder), by `tokenizer.ggml.pre`:
  smollm : no normalizer; Sequence[Digits(individual_digits=True),
           ByteLevel(add_prefix_space=False, use_regex=True)]
  qwen2  : NFC; Sequence[Split(QWEN2_RE, Isolated), ByteLevel(use_regex=False)]
and ByteLevel decoding, BPE without byte fallback, ignore_merges=False.
This is written independently of src/tokenizer.rs (same spec, different code).

Vocabulary layout (same rule as src/tokenizer.rs, see its docs): the trailing block
of non-normal tokens (types 3 control, 4 user-defined, 5 unused) after the last
normal token is not part of the BPE model vocabulary; its control / user-defined
tokens become added tokens (special = control), its unused filler entries
([PAD151665]... in Qwen's GGUF) are dropped. Control / user-defined tokens inside
the main range (SmolLM2's ids 0..16) stay in the model vocabulary AND are added
tokens, exactly as in the upstream tokenizer.json files.

Usage:
  /work/torchvenv/bin/python tools/tokenizer_reference.py            # write golden files
  /work/torchvenv/bin/python tools/tokenizer_reference.py --no-transformers
  /work/torchvenv/bin/python tools/tokenizer_reference.py --check-export DIR --model smollm2
      (loads DIR/tokenizer.json + tokenizer_config.json written by wgllm's
       write_tokenizer_files with AutoTokenizer and compares with the golden file)
"""

import argparse
import json
import os
import sys
import unicodedata
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import gguf  # noqa: E402
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers  # noqa: E402
from tokenizers import pre_tokenizers  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "tokenizer"
MODELS_DIR = Path(os.environ.get("WGLLM_TOK_MODELS", "/work/models/tok"))
MODELS = {
    "smollm2": MODELS_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf",
    "qwen25": MODELS_DIR / "qwen2.5-coder-0.5b-instruct.gguf",
}

QWEN2_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Strings to encode. Each has a short name used in test failure messages.
CASES = [
    ("plain", "Hello world"),
    ("multi_space", "Hello  world   with    spaces"),
    ("leading_trailing_space", "  leading and trailing  "),
    ("only_spaces", "   "),
    ("empty", ""),
    ("newlines", "line1\nline2\n\nline3\r\nline4\n"),
    ("only_newlines", "\n\n\n"),
    ("tabs", "tabs\tand\t\ttabs \t mixed"),
    ("digits", "numbers 1234567 and 3.14159 and 1,000,000"),
    ("long_number", "123456789012345678901234567890"),
    ("date_time", "2024-11-22 12:34:56"),
    ("half", " \u00bd"),
    ("other_numerics", "\u216b \u00b2 \u00b3 \u00bc \u2460 \u0661\u0662\u0663"),
    ("combining_accent", "cafe\u0301 e\u0301"),
    ("precomposed_accent", "caf\u00e9 \u00e9"),
    ("ring_and_ligature", "A\u030angstr\u00f6m \u212b \ufb01"),
    ("hangul_jamo", "\u1100\u1161 \uac00"),
    ("emoji", "\U0001F600\U0001F44D\U0001F3FD\U0001F1FA\U0001F1F8 \u2764\ufe0f"),
    ("cjk", "\u4f60\u597d\uff0c\u4e16\u754c\uff01\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 \ud55c\uad6d\uc5b4"),
    ("cyrillic_arabic", "\u0420\u043e\u0441\u0441\u0438\u044f \u0645\u0631\u062d\u0628\u0627"),
    ("contractions", "I'm sure they'll say it's fine, DON'T you think? We've seen it."),
    ("code", "def foo(x):\n    return x ** 2  # comment\n\tif x:\n\t\tpass\n"),
    ("code_braces", "fn main() {\n    let v: Vec<u32> = (0..10).collect();\n}\n"),
    ("nbsp_zwsp", "x\u00a0y a\u200bb"),
    ("chatml", "<|im_start|>user\nhi<|im_end|>\n"),
    ("chatml_spaced", " <|im_start|> assistant <|im_end|> "),
    ("endoftext", "text<|endoftext|>more"),
    ("tool_call", "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>"),
    ("fim", "<|fim_prefix|>def f():<|fim_suffix|>\n<|fim_middle|>"),
    ("pad_filler_text", "[PAD151665]"),
]

# Why transformers' GGUF tokenizer differs, per model (filled in per case below).
DIFF_REASONS = {
    "smollm2": "transformers' GGUF conversion drops the upstream Digits(individual_digits=True) step and "
    "keeps only ByteLevel(use_regex=True), whose GPT-2 regex ' ?\\p{N}+' glues a preceding space to a "
    "numeric run. Plain ASCII digit runs still give the same ids (SmolLM2's vocabulary has no multi-digit "
    "tokens, so BPE splits them anyway), but ' \u00bd', ' \u00b2', ' \u00bc' etc. become one pre-token "
    "(space + numeral) instead of ' ' and the numeral",
    "qwen25": "transformers' GGUF conversion has no normalizer; upstream Qwen2 applies NFC first, so "
    "decomposed text (combining accents, jamo, A+ring, U+212B) is tokenized differently",
}

CONVERSATIONS = [
    ("single_user", [{"role": "user", "content": "What is 2+2?"}]),
    (
        "system_user",
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name a prime."},
        ],
    ),
    (
        "multi_turn",
        [
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Write  code:\n\tprint('x')  "},
        ],
    ),
    (
        "system_multi_turn",
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "caf\u00e9 or cafe\u0301? \u00bd"},
            {"role": "assistant", "content": "Either."},
            {"role": "user", "content": "Thanks"},
        ],
    ),
]

# Synthetic templates exercising what real chat templates use from Jinja/Python.
SYNTHETIC_TEMPLATES = {
    # Llama-3-like: bos_token, strip(), trim, namespace, tools is none, loop controls.
    "pycompat_strip_namespace": (
        "{{- bos_token }}"
        "{%- set ns = namespace(sys='', n=0) %}"
        "{%- if messages[0]['role'] == 'system' %}{% set ns.sys = messages[0]['content'] | trim %}{% endif %}"
        "{%- if tools is not none %}TOOLS{% endif %}"
        "{%- if documents is not none %}DOCS{% endif %}"
        "{%- if ns.sys %}<<SYS>>{{ ns.sys }}<</SYS>>\n{% endif %}"
        "{%- for m in messages %}"
        "{%- if m['role'] == 'system' %}{% continue %}{% endif %}"
        "{%- set ns.n = ns.n + 1 %}"
        "[{{ ns.n }}:{{ m['role'] | upper }}] {{ m['content'].strip() }}"
        "{%- if m.content.startswith('Write') %} (code){% endif %}"
        "{%- if m['content'].endswith('?') %} (q){% endif %}\n"
        "{%- if ns.n >= 3 %}{% break %}{% endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}[ASSISTANT]{% endif %}"
        "{{- eos_token }}"
    ),
    # Block tags on their own lines: trim_blocks / lstrip_blocks behaviour.
    "trim_lstrip_blocks": (
        "{% for message in messages %}\n"
        "    {% if message.role == 'user' %}\n"
        "U: {{ message.content | replace('\\n', ' ') }}\n"
        "    {% else %}\n"
        "{{ message.role[0] | upper }}: {{ message.content.split(' ') | length }} words\n"
        "    {% endif %}\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}\n"
        "A:\n"
        "{% endif %}\n"
    ),
    # tojson (transformers' json.dumps(ensure_ascii=False)), items(), lower(), replace().
    "tojson_items": (
        "{%- for m in messages %}"
        "{{ m | tojson }}|{{ m.content | tojson(indent=2) }}|"
        "{%- for k, v in m.items() %}{{ k }}={{ v.lower().replace(' ', '_') }};{% endfor %}\n"
        "{%- endfor %}"
    ),
}

RAISE_TEMPLATE = (
    "{%- for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
    "{{ raise_exception('Only user and assistant roles are supported, got ' + m['role']) }}"
    "{% endif %}{{ m['content'] }}{% endfor %}"
)


def read_gguf_meta(path):
    r = gguf.GGUFReader(str(path))

    def get(key, default=None):
        f = r.fields.get(key)
        return default if f is None else f.contents()

    return {
        "model": get("tokenizer.ggml.model"),
        "pre": get("tokenizer.ggml.pre"),
        "tokens": get("tokenizer.ggml.tokens"),
        "token_types": get("tokenizer.ggml.token_type"),
        "merges": get("tokenizer.ggml.merges"),
        "bos": get("tokenizer.ggml.bos_token_id"),
        "eos": get("tokenizer.ggml.eos_token_id"),
        "padding": get("tokenizer.ggml.padding_token_id"),
        "add_bos": get("tokenizer.ggml.add_bos_token"),
        "chat_template": get("tokenizer.chat_template"),
    }


def versions():
    import importlib.metadata as md

    out = {}
    for pkg in ("tokenizers", "transformers", "gguf", "jinja2"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def build_upstream(meta):
    """The upstream tokenizer.json pipeline for the GGUF's pre-tokenizer name."""
    if meta["model"] != "gpt2":
        raise SystemExit(f"tokenizer.ggml.model {meta['model']!r} is not a byte-level BPE (gpt2) vocabulary")
    tokens, types = meta["tokens"], meta["token_types"]
    NORMAL = 1
    last_normal = max(i for i, t in enumerate(types) if t == NORMAL)
    n_model = last_normal + 1
    vocab = {tokens[i]: i for i in range(n_model)}
    merges = [tuple(m.split(" ", 1)) for m in meta["merges"]]
    model = models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, fuse_unk=False,
                       byte_fallback=False, ignore_merges=False)
    tok = Tokenizer(model)
    pre = meta["pre"]
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ])
    elif pre == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_RE), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ])
    else:
        raise SystemExit(f"no reference pipeline for pre-tokenizer {pre!r}")
    tok.decoder = decoders.ByteLevel()
    added = []
    for i, t in enumerate(types):
        if t in (3, 4):  # control -> special, user-defined -> added but not special
            added.append((i, AddedToken(tokens[i], special=(t == 3), normalized=False)))
    # Ids of added tokens outside the model vocabulary are assigned in order from
    # the model's size, so they must be contiguous there.
    tail = [i for i, _ in added if i >= n_model]
    assert tail == list(range(n_model, n_model + len(tail))), "added tokens past the vocab are not contiguous"
    tok.add_tokens([a for _, a in added])
    for i, a in added:
        assert tok.token_to_id(a.content) == i, (a.content, i, tok.token_to_id(a.content))
    return tok, n_model + len(tail)


def encode_cases(tok):
    out = []
    for name, text in CASES:
        ids = tok.encode(text, add_special_tokens=False).ids
        out.append({
            "name": name,
            "text": text,
            "ids": ids,
            "decoded": tok.decode(ids, skip_special_tokens=False),
            "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
        })
    return out


def render(tok_tf, template, messages, add_generation_prompt, **kw):
    return tok_tf.apply_chat_template(messages, chat_template=template, tokenize=False,
                                      add_generation_prompt=add_generation_prompt, **kw)


def make_golden(name, path, use_transformers):
    meta = read_gguf_meta(path)
    tok, n_real = build_upstream(meta)
    cases = encode_cases(tok)
    tokens = meta["tokens"]
    golden = {
        "source": f"tools/tokenizer_reference.py from {path.name}",
        "pre": meta["pre"],
        "vocab_rows": len(tokens),
        "real_tokens": n_real,
        "bos": meta["bos"],
        "eos": meta["eos"],
        "padding": meta["padding"],
        "bos_token": tokens[meta["bos"]] if meta["bos"] is not None else None,
        "eos_token": tokens[meta["eos"]] if meta["eos"] is not None else None,
        "added_tokens": [
            {"id": i, "content": tokens[i], "special": t == 3}
            for i, t in enumerate(meta["token_types"]) if t in (3, 4)
        ],
        "cases": cases,
        # Stored so the chat tests run without the GGUF file.
        "gguf_chat_template": meta["chat_template"],
        "versions": versions(),
    }
    if name == "qwen25":
        golden["notes"] = [
            "ids 151665..151935 are llama.cpp filler rows ([PADnnnnnn], type 5 unused): not tokens, "
            "never produced by encoding and dropped by decoding, as upstream (151643 BPE entries + 22 "
            "added tokens, embedding padded to 151936 rows)",
            "the GGUF marks <|fim_*|>, <|repo_name|> and <|file_sep|> as control (llama.cpp's converter "
            "makes every added token that looks like <|...|> control); upstream Qwen2.5 has them "
            "special: false. Ids are unaffected; decode(skip_special_tokens=True) drops them here and "
            "in transformers' GGUF tokenizer, not upstream",
            "the GGUF has bos_token_id 151643 (<|endoftext|>); upstream Qwen2.5 has bos_token null. "
            "add_bos_token is false either way",
        ]
    if not use_transformers:
        return golden

    from transformers import AutoTokenizer

    tf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    diffs = []
    for c in cases:
        tf_ids = tf.encode(c["text"], add_special_tokens=False)
        c["transformers_gguf_ids"] = tf_ids
        if tf_ids != c["ids"]:
            diffs.append(c["name"])
    golden["transformers_gguf"] = {
        "differs_on": diffs,
        "why": DIFF_REASONS[name],
    }

    chats = []
    bos, eos = golden["bos_token"] or "", golden["eos_token"] or ""
    for conv_name, messages in CONVERSATIONS:
        for agp in (False, True):
            text = render(tf, meta["chat_template"], messages, agp)
            chats.append({
                "template": "gguf",
                "conversation": conv_name,
                "messages": messages,
                "add_generation_prompt": agp,
                "rendered": text,
                "ids": tok.encode(text, add_special_tokens=False).ids,
            })
    if name == "smollm2":
        for tname, template in SYNTHETIC_TEMPLATES.items():
            for conv_name, messages in CONVERSATIONS:
                text = render(tf, template, messages, True, bos_token=bos, eos_token=eos)
                chats.append({
                    "template": tname,
                    "conversation": conv_name,
                    "messages": messages,
                    "add_generation_prompt": True,
                    "rendered": text,
                })
        golden["synthetic_templates"] = SYNTHETIC_TEMPLATES
        golden["raise_template"] = RAISE_TEMPLATE
        try:
            render(tf, RAISE_TEMPLATE, CONVERSATIONS[1][1], False)
            raise SystemExit("raise_exception template did not raise")
        except Exception as e:  # jinja2.TemplateError
            golden["raise_message"] = str(e)
    golden["bos_eos_passed_to_templates"] = [bos, eos]
    golden["chats"] = chats
    return golden


def check_export(export_dir, name):
    """Load a folder written by wgllm (tokenizer.json + tokenizer_config.json) the way
    users will, and compare it with the golden ids and chat renderings."""
    from transformers import AutoTokenizer

    golden = json.loads((FIXTURES / f"{name}_golden.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(export_dir))
    bad = 0
    for c in golden["cases"]:
        ids = tok.encode(c["text"], add_special_tokens=False)
        if ids != c["ids"]:
            bad += 1
            print(f"MISMATCH {c['name']}: {ids} != {c['ids']}")
        dec = tok.decode(ids, skip_special_tokens=True)
        if dec != c["decoded_skip_special"]:
            bad += 1
            print(f"DECODE MISMATCH {c['name']}: {dec!r} != {c['decoded_skip_special']!r}")
    for ch in golden.get("chats", []):
        if ch["template"] != "gguf":
            continue
        text = tok.apply_chat_template(ch["messages"], tokenize=False,
                                       add_generation_prompt=ch["add_generation_prompt"])
        if text != ch["rendered"]:
            bad += 1
            print(f"CHAT MISMATCH {ch['conversation']}: {text!r}")
    print(f"{type(tok).__name__}: bos={tok.bos_token!r} eos={tok.eos_token!r} pad={tok.pad_token!r} "
          f"vocab={len(tok)} added={len(tok.added_tokens_decoder)}")
    print("OK" if bad == 0 else f"{bad} mismatches")
    return bad == 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-transformers", action="store_true", help="skip the transformers GGUF comparison")
    ap.add_argument("--check-export", type=Path, help="folder written by wgllm's write_tokenizer_files")
    ap.add_argument("--model", choices=sorted(MODELS), help="which golden file --check-export compares with")
    args = ap.parse_args()
    if args.check_export:
        if not args.model:
            ap.error("--check-export needs --model")
        sys.exit(0 if check_export(args.check_export, args.model) else 1)

    FIXTURES.mkdir(parents=True, exist_ok=True)
    for name, path in MODELS.items():
        if not path.is_file():
            print(f"skip {name}: {path} not found")
            continue
        golden = make_golden(name, path, not args.no_transformers)
        out = FIXTURES / f"{name}_golden.json"
        out.write_text(json.dumps(golden, ensure_ascii=False, indent=1) + "\n")
        tf = golden.get("transformers_gguf", {})
        print(f"{name}: {len(golden['cases'])} cases, {len(golden.get('chats', []))} chats -> {out} "
              f"({out.stat().st_size} bytes); transformers GGUF differs on {tf.get('differs_on')}")
        for c in golden["cases"]:
            if unicodedata.normalize("NFC", c["text"]) != c["decoded"] and c["text"] != c["decoded"]:
                print(f"  note: {c['name']} does not round-trip: {c['decoded']!r}")


if __name__ == "__main__":
    main()
