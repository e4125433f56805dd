#!/usr/bin/env bash
# Install what wgllm needs to build and test on a Debian/Ubuntu machine:
# a Vulkan driver. Without a GPU driver this is Mesa's software Vulkan
# (lavapipe), a real Vulkan 1.3 device that runs compute shaders on the CPU.
set -euo pipefail

have_vulkan_icd() {
    ls /usr/share/vulkan/icd.d/*.json /etc/vulkan/icd.d/*.json >/dev/null 2>&1
}

if have_vulkan_icd; then
    echo "setup: a Vulkan driver is installed"
else
    echo "setup: no Vulkan driver found; installing Mesa's software Vulkan (mesa-vulkan-drivers)"
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
            echo "setup: need root to run: apt-get install -y mesa-vulkan-drivers" >&2
            exit 1
        fi
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "setup: no apt-get here; install your distribution's Mesa Vulkan drivers (lavapipe) or a GPU driver" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq mesa-vulkan-drivers >/dev/null
fi

# rustfmt and clippy are part of the toolchain on CI; add them if missing.
if command -v rustup >/dev/null 2>&1; then
    rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
    rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
fi
