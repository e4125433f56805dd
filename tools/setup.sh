#!/usr/bin/env bash
# Install what wgllm needs to build and test on a Debian/Ubuntu machine:
# a Vulkan driver, and EGL + a GL driver for wgpu's GL backend (CI runs the
# parity tests on both, WGLLM_BACKEND=gl). Without a GPU these are Mesa's
# software drivers: lavapipe (a real Vulkan 1.3 device that runs compute
# shaders on the CPU) and llvmpipe through EGL (OpenGL 4.5).
set -euo pipefail

# True when any of the paths (globs) exists.
any_exists() {
    local p
    for p in "$@"; do
        [ -e "$p" ] && return 0
    done
    return 1
}

have_vulkan_icd() {
    any_exists /usr/share/vulkan/icd.d/*.json /etc/vulkan/icd.d/*.json
}

# wgpu's GL backend opens libEGL.so.1 (glvnd), which needs a vendor library
# (Mesa's libEGL_mesa, registered in glvnd's egl_vendor.d) and a DRI driver
# (swrast_dri.so = llvmpipe when there is no GPU).
have_egl_gl() {
    local libs
    libs="$({ ldconfig -p || /sbin/ldconfig -p; } 2>/dev/null || true)"
    [[ "$libs" == *"libEGL.so.1 "* && "$libs" == *"libEGL_mesa.so.0 "* ]] \
        && any_exists /usr/lib/*/dri/swrast_dri.so /usr/lib/dri/swrast_dri.so
}

apt_install() {
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
            echo "setup: need root to run: apt-get install -y $*" >&2
            exit 1
        fi
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "setup: no apt-get here; install your distribution's packages for: $*" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    if [ -z "${APT_UPDATED:-}" ]; then
        $SUDO apt-get update -qq
        APT_UPDATED=1
    fi
    $SUDO apt-get install -y -qq "$@" >/dev/null
}

if have_vulkan_icd; then
    echo "setup: a Vulkan driver is installed"
else
    echo "setup: no Vulkan driver found; installing Mesa's software Vulkan (mesa-vulkan-drivers)"
    apt_install mesa-vulkan-drivers
fi

if have_egl_gl; then
    echo "setup: EGL and a GL driver are installed (wgpu's GL backend)"
else
    echo "setup: no EGL/GL driver found; installing Mesa's EGL and GL drivers (libegl1 libegl-mesa0 libgl1-mesa-dri libgles2)"
    apt_install libegl1 libegl-mesa0 libgl1-mesa-dri libgles2
fi

# tests/serve.rs makes a venv under target/ with `python3 -m venv` and pip
# installs the `openai` client into it (Debian splits venv/ensurepip out).
if python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    echo "setup: python3 venv is available (the openai client check in tests/serve.rs)"
else
    echo "setup: python3 cannot make venvs; installing python3-venv"
    apt_install python3-venv
fi

# rustfmt and clippy are part of the toolchain on CI; add them if missing.
if command -v rustup >/dev/null 2>&1; then
    rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
    rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
fi

# The browser build (web/, tests/web.rs): the wasm32 target, the
# wasm-bindgen CLI of exactly the version the wasm-bindgen crate is locked
# to (it refuses modules built by another), and Debian's Chromium to run the
# page headless (WebGPU on SwiftShader). Each is skipped when present.
if command -v rustup >/dev/null 2>&1; then
    rustup target list --installed 2>/dev/null | grep -qx 'wasm32-unknown-unknown' \
        || rustup target add wasm32-unknown-unknown
fi
wb_want="$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/[^0-9.]/, ""); print; exit }' "$(dirname "$0")/../Cargo.lock")"
PATH="$HOME/.cargo/bin:$PATH"
if [ "$(wasm-bindgen --version 2>/dev/null | awk '{print $2}')" = "$wb_want" ]; then
    echo "setup: wasm-bindgen $wb_want is installed"
else
    # No prebuilt binary can be downloaded here (crates.io, PyPI and Debian
    # only): cargo builds it, a few minutes once per machine.
    echo "setup: installing wasm-bindgen-cli $wb_want (cargo install, a few minutes)"
    cargo install -q wasm-bindgen-cli --version "$wb_want"
fi
if command -v chromium >/dev/null 2>&1; then
    echo "setup: chromium is installed"
else
    echo "setup: installing Debian's chromium (headless WebGPU for tests/web.rs)"
    apt_install chromium
fi
