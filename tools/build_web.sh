#!/usr/bin/env bash
# Build the browser page's wasm module (web/src/lib.rs over the wgllm
# library) into web/pkg/, next to web/index.html and web/wgllm.js.
# Needs: rustup's wasm32-unknown-unknown target and the wasm-bindgen CLI of
# exactly the version web/Cargo.toml pins (tools/setup.sh installs both).
set -euo pipefail
cd "$(dirname "$0")/.."
target_dir="${CARGO_TARGET_DIR:-target}"
cargo build --release --target wasm32-unknown-unknown -p wgllm-web
wasm-bindgen --target web --no-typescript --out-dir web/pkg \
    "$target_dir/wasm32-unknown-unknown/release/wgllm_web.wasm"
echo "built web/pkg ($(du -h web/pkg/wgllm_web_bg.wasm | cut -f1) of wasm)"
