#!/usr/bin/env bash
# Installs every system package the project needs from Debian's repositories.
# Idempotent; run as root (or with sudo) on Debian 12.
set -euo pipefail

PACKAGES=(
  build-essential cmake ninja-build pkg-config
  libopenmpi-dev openmpi-bin
  libprotobuf-dev protobuf-compiler
  libgtest-dev libgmock-dev
  libopenblas-dev
  libcli11-dev
  clang libclang-rt-14-dev
  python3-torch python3-numpy
  pybind11-dev python3-pybind11 python3-pytest
  fortunes python3-matplotlib
  iproute2 util-linux
)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ "${#missing[@]}" -eq 0 ]; then
  echo "setup: all packages present"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null
echo "setup: done"
