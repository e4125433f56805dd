#!/usr/bin/env bash
# Recreate every tiny-model fixture under tests/fixtures/ from scratch:
# checkpoints (make_tiny_models.py) and PyTorch reference dumps
# (dump_reference.py, f32 with a 16-token greedy continuation, and native bf16).
#
# Usage: tools/regenerate_fixtures.sh            (uses $PYTHON, default: python3)
#        PYTHON=.venv/bin/python tools/regenerate_fixtures.sh
# Requires the pinned packages from tools/requirements.txt (torch etc.); never run in CI.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
FIXTURES=tests/fixtures
GENERATE=16

# Deterministic CPU math, no hub access, no hub kernels.
export CUDA_VISIBLE_DEVICES=""
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export USE_HUB_KERNELS=0
export PYTHONHASHSEED=0

"$PYTHON" tools/make_tiny_models.py --out-dir "$FIXTURES"

for name in $("$PYTHON" tools/make_tiny_models.py --list); do
    dir="$FIXTURES/$name"
    tokens=$("$PYTHON" -c 'import json,sys; print(",".join(str(t) for t in json.load(open(sys.argv[1]))["tokens"]))' "$dir/prompt.json")
    echo "== $name (tokens: $tokens)"
    "$PYTHON" tools/dump_reference.py "$dir" --tokens "$tokens" --dtype f32 --generate "$GENERATE" \
        --out "$dir/reference_f32.safetensors"
    "$PYTHON" tools/dump_reference.py "$dir" --tokens "$tokens" --dtype bf16 \
        --out "$dir/reference_bf16.safetensors"
done

"$PYTHON" tools/check_fixtures.py "$FIXTURES"
"$PYTHON" tools/numpy_forward.py "$FIXTURES"
du -sh "$FIXTURES"
