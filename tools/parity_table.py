#!/usr/bin/env python3
"""Worst-tap parity of every tiny fixture against its PyTorch f32 dump, under
each kernel profile and backend, as a Markdown table (for BENCHMARKS.md):
each cell is the largest NMSE / largest max_rel over all taps.

Runs the built binary (`cargo build --release` first):
    python3 tools/parity_table.py [path/to/wgllm]
Settings are passed as wgllm's own variables (WGLLM_BACKEND, WGLLM_KERNELS),
the same way CI selects them. Standard library only.
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = [
    "qwen2_bias_tied",
    "llama_gqa3_untied",
    "llama3_rope_scaling",
    "mistral_head_dim",
    "qwen2_big_vocab",
]
SETTINGS = [
    ("Vulkan, cpu profile", {"WGLLM_BACKEND": "vulkan", "WGLLM_KERNELS": "cpu"}),
    ("Vulkan, gpu profile", {"WGLLM_BACKEND": "vulkan", "WGLLM_KERNELS": "gpu"}),
    ("GL, cpu profile", {"WGLLM_BACKEND": "gl", "WGLLM_KERNELS": "cpu"}),
    ("GL, gpu profile", {"WGLLM_BACKEND": "gl", "WGLLM_KERNELS": "gpu"}),
]


def worst(binary, fixture, env):
    d = os.path.join(ROOT, "tests", "fixtures", fixture)
    out = subprocess.run(
        [binary, "verify", "--model", d, "--no-cpu", "--json",
         "--reference", os.path.join(d, "reference_f32.safetensors")],
        env={**os.environ, **env}, capture_output=True, text=True)
    if out.returncode not in (0, 1):
        sys.exit(f"{fixture} {env}: exit {out.returncode}: {out.stderr.strip()}")
    r = json.loads(out.stdout)
    rows = r["reports"][0]["rows"]
    n = max(rows, key=lambda x: x["nmse"])
    m = max(rows, key=lambda x: x["max_rel"])
    return r, n, m


def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target", "release", "wgllm")
    results = {f: [worst(binary, f, env) for _, env in SETTINGS] for f in FIXTURES}
    for i, (label, _) in enumerate(SETTINGS):
        r = results[FIXTURES[0]][i][0]
        print(f"- {label}: {r['adapter']} ({r['backend']}), kernels {r['kernels']}")
    print()
    print("| fixture | " + " | ".join(label for label, _ in SETTINGS) + " |")
    print("|---|" + "---|" * len(SETTINGS))
    cell = lambda n, m: f"{n['nmse']:.1e} / {m['max_rel']:.1e}"
    for f in FIXTURES:
        row = [cell(n, m) + ("" if r["pass"] else " FAIL") for r, n, m in results[f]]
        print(f"| {f} | " + " | ".join(row) + " |")
    worst_n = [max((results[f][i][1] for f in FIXTURES), key=lambda x: x["nmse"]) for i in range(len(SETTINGS))]
    worst_m = [max((results[f][i][2] for f in FIXTURES), key=lambda x: x["max_rel"]) for i in range(len(SETTINGS))]
    print("| **worst** | " + " | ".join(f"**{cell(n, m)}**" for n, m in zip(worst_n, worst_m)) + " |")


if __name__ == "__main__":
    main()
