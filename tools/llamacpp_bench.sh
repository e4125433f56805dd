#!/usr/bin/env bash
# Same-run speed comparison of wgllm with llama.cpp on this machine (issue #9):
# llama.cpp's Vulkan backend on the same lavapipe device, and llama.cpp's native CPU backend.
# A developer tool, never run by CI.
#
# What it installs / downloads (all outside the repository):
#   - Debian packages, through apt-get when missing (needs root): cmake, g++, glslc (shaderc),
#     libvulkan-dev, spirv-headers, vulkan-tools (vulkaninfo, for the log only).
#   - The llama-cpp-python sdist, pinned below, from PyPI (`pip download --no-binary :all:`),
#     checked against its sha256. Its vendor/llama.cpp is what gets built; no git clone of llama.cpp.
#   - Two builds of `llama-bench` in $LLAMACPP_SCRATCH: build-vulkan (-DGGML_VULKAN=ON) and
#     build-cpu (CPU backend only), and F16 GGUF files converted from the cached safetensors with the
#     vendored convert_hf_to_gguf.py (F16 because glslc here lacks GL_EXT_bfloat16, so llama.cpp's
#     Vulkan backend has no bf16 shaders on this device).
# Every step is skipped when its output is already there, so a rerun only benchmarks.
#
# Usage: tools/llamacpp_bench.sh [build|bench|all]     (default: all)
# Environment:
#   WGLLM_BIN         wgllm binary to compare (default: target/release/wgllm)
#   WGLLM_CACHE       wgllm's cache; models are read from $WGLLM_CACHE/models/<name>/ (default ~/.cache/wgllm)
#   LLAMACPP_SCRATCH  scratch dir for the sdist, builds, GGUF files and results (default ~/.cache/wgllm-llamacpp)
#   PYTHON            a python with torch, transformers, numpy, safetensors for the GGUF conversion
#                     (default python3)
#   MODELS            space-separated cached model names (default: the two below)
#   ROUNDS            rounds of the A B A C A pattern per model (default 2)
#   JOBS              build parallelism (default 2)
#
# The bench step runs, per model and round, with `uptime` recorded before every run:
#   A: wgllm bench --prompt-tokens 128 --gen-tokens 64 (lavapipe, Vulkan)
#   B: llama-bench (Vulkan build, lavapipe) -ngl 99 -p 128 -n 64 -r 3
#   A: wgllm bench again
#   C: llama-bench (CPU build) -t 2 -p 128 -n 64 -r 3
#   A: wgllm bench again
# and writes every raw JSON plus summary.md (each llama.cpp figure against the mean of the wgllm
# runs just before and after it) into $LLAMACPP_SCRATCH/results/<UTC time>/.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=0.3.36
LLAMA_CPP_PYTHON_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
LVP_ICD=/usr/share/vulkan/icd.d/lvp_icd.x86_64.json

REPO=$(cd "$(dirname "$0")/.." && pwd)
WGLLM_BIN=${WGLLM_BIN:-$REPO/target/release/wgllm}
WGLLM_CACHE=${WGLLM_CACHE:-$HOME/.cache/wgllm}
SCRATCH=${LLAMACPP_SCRATCH:-$HOME/.cache/wgllm-llamacpp}
PYTHON=${PYTHON:-python3}
MODELS=${MODELS:-"smollm2-135m-instruct qwen2.5-coder-0.5b-instruct"}
ROUNDS=${ROUNDS:-2}
JOBS=${JOBS:-2}
SDIST_DIR=$SCRATCH/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION
SRC=$SDIST_DIR/vendor/llama.cpp
PROMPT=128
GEN=64

log() { printf '[llamacpp_bench %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

install_packages() {
    local missing=()
    for p in cmake g++ glslc libvulkan-dev spirv-headers vulkan-tools; do
        dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || die "missing Debian packages: ${missing[*]} (install them as root: apt-get install ${missing[*]})"
    log "apt-get install ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
}

fetch_sdist() {
    [ -f "$SRC/CMakeLists.txt" ] && return 0
    mkdir -p "$SCRATCH"
    local tarball=$SCRATCH/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz
    if [ ! -f "$tarball" ]; then
        log "pip download llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION (sdist)"
        "$PYTHON" -m pip download --no-binary :all: --no-deps \
            "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$SCRATCH"
    fi
    echo "$LLAMA_CPP_PYTHON_SHA256  $tarball" | sha256sum -c --quiet - \
        || die "$tarball: sha256 differs from the pinned $LLAMA_CPP_PYTHON_SHA256"
    tar -xzf "$tarball" -C "$SCRATCH"
    [ -f "$SRC/CMakeLists.txt" ] || die "$tarball has no vendor/llama.cpp/CMakeLists.txt"
}

# Debian 12's Vulkan headers (1.3.239) predate VK_EXT_layer_settings, which this llama.cpp uses
# unconditionally when it creates its instance (only to turn on the validation layer's best-practice
# checks). Without the headers' support, compile that block out: the instance is then created
# without the settings struct. Exact-text replacement, so a changed source fails loudly.
patch_for_old_vulkan_headers() {
    grep -q 'VK_EXT_layer_settings' /usr/include/vulkan/vulkan_core.h && return 0
    "$PYTHON" - "$SRC/ggml/src/ggml-vulkan/ggml-vulkan.cpp" <<'PY'
import sys
path = sys.argv[1]
src = open(path).read()
marker = "#ifdef VK_EXT_layer_settings /* wgllm tools/llamacpp_bench.sh */"
if marker in src:
    sys.exit(0)
start = "    VkBool32 enable_best_practice = layer_settings;\n"
end = "    vk::InstanceCreateInfo instance_create_info(vk::InstanceCreateFlags{}, &app_info, layers, extensions, &layer_setting_info);\n"
i, j = src.find(start), src.find(end)
if i < 0 or j < i:
    sys.exit(f"{path}: the layer-settings block to patch was not found (llama.cpp source changed?)")
j += len(end)
plain = "    vk::InstanceCreateInfo instance_create_info(vk::InstanceCreateFlags{}, &app_info, layers, extensions);\n"
open(path, "w").write(src[:i] + marker + "\n" + src[i:j] + "#else\n" + plain + "#endif\n" + src[j:])
PY
}

# build_llama_bench <build dir> <extra cmake flags...>
build_llama_bench() {
    local dir=$1
    shift
    if [ ! -f "$dir/CMakeCache.txt" ]; then
        log "configure $dir"
        cmake -S "$SRC" -B "$dir" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DGGML_CCACHE=OFF \
            -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
            -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF \
            -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF "$@" >"$dir.configure.log" 2>&1 \
            || { tail -30 "$dir.configure.log" >&2; die "cmake configure of $dir failed (log: $dir.configure.log)"; }
    fi
    log "build $dir (llama-bench only)"
    cmake --build "$dir" --target llama-bench -j "$JOBS" >"$dir.build.log" 2>&1 \
        || { tail -30 "$dir.build.log" >&2; die "build of $dir failed (log: $dir.build.log)"; }
    [ -x "$dir/bin/llama-bench" ] || die "$dir/bin/llama-bench was not built"
}

gguf_path() { echo "$SCRATCH/gguf/$1-F16.gguf"; }

convert_models() {
    mkdir -p "$SCRATCH/gguf"
    for m in $MODELS; do
        local src=$WGLLM_CACHE/models/$m out
        out=$(gguf_path "$m")
        [ -f "$out" ] && continue
        [ -f "$src/config.json" ] || die "$src/config.json not found: fetch the model first (wgllm fetch) or set WGLLM_CACHE"
        log "convert $m to F16 GGUF"
        PYTHONPATH=$SRC/gguf-py "$PYTHON" "$SRC/convert_hf_to_gguf.py" "$src" --outtype f16 \
            --outfile "$out.tmp" >"$SCRATCH/gguf/$m.convert.log" 2>&1 \
            || { tail -20 "$SCRATCH/gguf/$m.convert.log" >&2; die "conversion of $src failed"; }
        mv "$out.tmp" "$out"
    done
}

build() {
    install_packages
    fetch_sdist
    patch_for_old_vulkan_headers
    build_llama_bench "$SCRATCH/build-vulkan" -DGGML_VULKAN=ON
    build_llama_bench "$SCRATCH/build-cpu" -DGGML_VULKAN=OFF
    convert_models
}

# lavapipe only: the ICD file restricts the loader to it, and GGML_VK_VISIBLE_DEVICES=0 is needed
# because llama.cpp skips CPU-type Vulkan devices unless a device is named explicitly.
lvp_env() { env VK_ICD_FILENAMES="$LVP_ICD" GGML_VK_VISIBLE_DEVICES=0 "$@"; }

bench() {
    [ -x "$WGLLM_BIN" ] || die "$WGLLM_BIN not found (cargo build --release, or set WGLLM_BIN)"
    [ -f "$LVP_ICD" ] || die "$LVP_ICD not found (Debian package mesa-vulkan-drivers)"
    local vk=$SCRATCH/build-vulkan/bin/llama-bench cpu=$SCRATCH/build-cpu/bin/llama-bench
    [ -x "$vk" ] && [ -x "$cpu" ] || die "llama-bench builds missing: run '$0 build' first"
    local out
    out=$SCRATCH/results/$(date -u +%Y%m%dT%H%M%SZ)
    mkdir -p "$out"
    log "results in $out"
    {
        echo "date: $(date -u)"
        echo "host: $(uname -srm); $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); $(nproc) cores"
        echo "wgllm: $WGLLM_BIN ($("$WGLLM_BIN" --version 2>&1 | head -1))"
        echo "llama-cpp-python sdist: $LLAMA_CPP_PYTHON_VERSION; $(grep -m1 'ggml commit' "$SCRATCH/build-vulkan.configure.log" || true)"
        echo "vulkaninfo (lavapipe ICD only):"
        VK_ICD_FILENAMES="$LVP_ICD" vulkaninfo --summary 2>/dev/null | grep -E 'deviceName|driverName|driverInfo|apiVersion|deviceType' | sed 's/^/  /' || true
        echo "llama.cpp Vulkan devices:"
        lvp_env "$vk" --list-devices 2>&1 | sed 's/^/  /'
    } >"$out/environment.txt"
    cat "$out/environment.txt" >&2
    grep -qi llvmpipe "$out/environment.txt" || die "llama.cpp's Vulkan build did not list llvmpipe (see $out/environment.txt)"

    local n=0
    run() { # run <label> <command...>: records uptime, then the JSON output of the command
        n=$((n + 1))
        local f
        f=$(printf '%s/%02d-%s.json' "$out" "$n" "$1")
        shift
        echo "$(basename "$f") $(uptime)" >>"$out/uptime.log"
        log "$(basename "$f"): $(uptime | sed 's/.*load/load/')"
        "$@" >"$f" 2>"${f%.json}.stderr" || die "$(basename "$f") failed: $(tail -5 "${f%.json}.stderr")"
    }
    for round in $(seq 1 "$ROUNDS"); do
        for m in $MODELS; do
            local model=$WGLLM_CACHE/models/$m gguf
            gguf=$(gguf_path "$m")
            [ -f "$gguf" ] || die "$gguf missing: run '$0 build' first"
            local wg=(lvp_env "$WGLLM_BIN" bench --backend vulkan --model "$model"
                --prompt-tokens "$PROMPT" --gen-tokens "$GEN" --json)
            run "$m-r$round-wgllm" "${wg[@]}"
            run "$m-r$round-llamacpp-vulkan" lvp_env "$vk" -m "$gguf" -ngl 99 -t 2 \
                -p "$PROMPT" -n "$GEN" -r 3 -o json
            run "$m-r$round-wgllm" "${wg[@]}"
            run "$m-r$round-llamacpp-cpu" "$cpu" -m "$gguf" -t 2 -p "$PROMPT" -n "$GEN" -r 3 -o json
            run "$m-r$round-wgllm" "${wg[@]}"
        done
    done
    summarize "$out" | tee "$out/summary.md"
}

# summarize <results dir>: a markdown table per model, each llama.cpp figure next to the mean of
# the wgllm runs just before and after it (the A B A pattern), and the ratios with their spread.
summarize() {
    "$PYTHON" - "$1" <<'PY'
import json, pathlib, re, sys

out = pathlib.Path(sys.argv[1])
runs = []
for f in sorted(out.glob("[0-9][0-9]-*.json")):
    m = re.match(r"\d+-(.+)-r(\d+)-(wgllm|llamacpp-vulkan|llamacpp-cpu)\.json$", f.name)
    if m:
        runs.append((m.group(1), int(m.group(2)), m.group(3), json.loads(f.read_text())))

def wg(d):
    return {"pp": d["prefill"]["tokens_per_s"]["median"], "tg": d["decode"]["tokens_per_s"],
            "tg_pipe": d["decode"]["pipelined_tokens_per_s"], "load": d["load_average"]}

def lc(d):
    pp = [e for e in d if e["n_prompt"] > 0 and e["n_gen"] == 0]
    tg = [e for e in d if e["n_gen"] > 0 and e["n_prompt"] == 0]
    return {"pp": pp[0]["avg_ts"], "pp_sd": pp[0]["stddev_ts"], "tg": tg[0]["avg_ts"],
            "tg_sd": tg[0]["stddev_ts"], "info": d[0]}

first = next((lc(d)["info"] for _, _, k, d in runs if k != "wgllm"), None)
if first:
    print(f"llama.cpp build {first.get('build_commit')} ({first.get('build_number')}), "
          f"model types: F16 GGUF; wgllm: bf16 safetensors\n")
ratios = {}
for model in dict.fromkeys(r[0] for r in runs):
    print(f"### {model}\n")
    print("| round | run | prefill 128 tok/s | decode 64 tok/s | load avg (1 min) |")
    print("|---|---|---|---|---|")
    rs = [r for r in runs if r[0] == model]
    for i, (_, rnd, kind, d) in enumerate(rs):
        if kind == "wgllm":
            w = wg(d)
            print(f"| {rnd} | wgllm lavapipe | {w['pp']:.1f} | {w['tg']:.2f} (pipelined {w['tg_pipe']:.2f}) | {str(w['load']).split()[0]} |")
            continue
        x = lc(d)
        print(f"| {rnd} | llama.cpp {kind.split('-')[1]} | {x['pp']:.1f} ± {x['pp_sd']:.1f} | {x['tg']:.2f} ± {x['tg_sd']:.2f} | |")
        nb = [wg(rs[j][3]) for j in (i - 1, i + 1)
              if 0 <= j < len(rs) and rs[j][2] == "wgllm" and rs[j][1] == rnd]
        if nb:
            for key in ("pp", "tg"):
                mean = sum(w[key] for w in nb) / len(nb)
                ratios.setdefault((model, kind, key), []).append(mean / x[key])
    print()
print("### wgllm / llama.cpp (wgllm = mean of the runs just before and after)\n")
print("| model | against | prefill ratio | decode ratio |")
print("|---|---|---|---|")
for (model, kind) in dict.fromkeys((m, k) for m, k, _ in ratios):
    cells = []
    for key in ("pp", "tg"):
        v = ratios.get((model, kind, key), [])
        cells.append(f"{min(v):.2f} to {max(v):.2f} ({len(v)} rounds)" if v else "-")
    print(f"| {model} | llama.cpp {kind.split('-')[1]} | {cells[0]} | {cells[1]} |")
PY
}

case "${1:-all}" in
build) build ;;
bench) bench ;;
all) build && bench ;;
*) die "usage: $0 [build|bench|all]" ;;
esac
