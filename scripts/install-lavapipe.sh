#!/usr/bin/env bash
# Installs Mesa's CPU Vulkan driver (lavapipe) and the Vulkan loader, so the wgpu backend's tests
# run for real on a machine without a GPU. Idempotent: does nothing when both are installed.
# Debian/Ubuntu only; elsewhere it says what is missing and exits non-zero.
set -euo pipefail

packages=(mesa-vulkan-drivers libvulkan1)
missing=()
for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done

if [ ${#missing[@]} -eq 0 ]; then
    echo "install-lavapipe: ${packages[*]} already installed"
    exit 0
fi

if ! command -v apt-get >/dev/null; then
    echo "install-lavapipe: missing ${missing[*]} and no apt-get here; install a Vulkan driver by hand" >&2
    exit 1
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
fi
echo "install-lavapipe: installing ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
