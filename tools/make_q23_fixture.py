#!/usr/bin/env python3
"""Reference values for wgllm's Q2_K and Q3_K dequantization, from llama.cpp's
own `gguf` Python package (an implementation independent of ours).

Writes tests/fixtures/gguf/synthetic_q2k_q3k.json: for Q2_K and Q3_K, seeded
random blocks (every byte random, then the f16 fields d / dmin set to finite
values of either sign, some of them f16-subnormal) and the f32 bit patterns
`gguf.quants.dequantize` gives for them. Same record format as the
`synthetic.json` of tools/gguf_check.py (kept as a separate file so that
fixture stays byte-identical). Needs no model file.

Usage (from the repository root, in a venv with `gguf` and numpy):
    python tools/make_q23_fixture.py
"""

import json
import os
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "gguf", "synthetic_q2k_q3k.json")
SEED = 2323
N_BLOCKS = 6


def f16_field(rng, n, scale):
    v = rng.standard_normal(n) * scale
    v[n // 2] = 3.0e-6  # an f16 subnormal (below 2^-14)
    return v.astype(np.float16).view(np.uint8).reshape(n, 2)


def record(qt, raw):
    raw = np.ascontiguousarray(raw.reshape(-1), dtype=np.uint8)
    bs, _ = gguf.GGML_QUANT_SIZES[qt]
    v = dequantize(raw, qt).reshape(-1).astype(np.float32)
    assert v.size == N_BLOCKS * bs and np.isfinite(v).all()
    return {
        "type": qt.name,
        "n_elements": int(v.size),
        "data_hex": raw.tobytes().hex(),
        "expected_f32_bits_hex": v.astype("<f4").tobytes().hex(),
    }


def main():
    rng = np.random.default_rng(SEED)
    cases = []
    # (type, [(byte offset of an f16 field, scale)]): Q2_K's d and dmin sit
    # after scales[16] and qs[64]; Q3_K's d after hmask[32], qs[64], scales[12].
    for qt, halves in [(T.Q2_K, [(80, 0.01), (82, 0.01)]), (T.Q3_K, [(108, 0.01)])]:
        _, ts = gguf.GGML_QUANT_SIZES[qt]
        raw = rng.integers(0, 256, size=(N_BLOCKS, ts), dtype=np.uint8)
        for off, scale in halves:
            raw[:, off : off + 2] = f16_field(rng, N_BLOCKS, scale)
        cases.append(record(qt, raw))
    try:
        from importlib.metadata import version

        ver = version("gguf")
    except Exception:
        ver = None
    with open(OUT, "w") as f:
        json.dump({"seed": SEED, "gguf_package_version": ver, "cases": cases}, f, indent=1)
        f.write("\n")
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
