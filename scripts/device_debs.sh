#!/usr/bin/env bash
# Run HERE (Debian 12, network): downloads the Debian packages the build needs that the GPU machine
# lacks (protobuf, CLI11, OpenBLAS, GoogleTest) into .debs/ (git-ignored), for
#   device run --carry .debs "bash scripts/device_check.sh"
# (the device tool copies the working tree; .debs travels because it is named in carry).
# NCCL is not among them (Debian 12's main archive has none): device_check.sh takes the GPU
# machine's own — the CUDA tree's, or the nvidia-nccl wheel PyTorch brings — and says which.
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=(
  libprotobuf-dev libprotobuf32 libprotobuf-lite32 libprotoc32 protobuf-compiler zlib1g-dev
  libcli11-dev
  libopenblas-dev libopenblas-pthread-dev libopenblas0-pthread libopenblas0 libgfortran5
  libgtest-dev libgmock-dev
)
mkdir -p .debs
cd .debs
if ! apt-get download "${PACKAGES[@]}" >/dev/null 2>&1; then
  apt-get update -qq
  apt-get download "${PACKAGES[@]}"
fi
ls -1 ./*.deb | wc -l | xargs echo "device_debs: packages in .debs:"
du -sh . | cut -f1 | xargs echo "device_debs: size"
