#!/usr/bin/env bash
# Installs NVIDIA's CUDA compiler (nvcc 13.0) from PyPI wheels into .nvcc/ in
# the repository, so that build.rs can compile kernels/*.cu into the binary.
# nvcc -cubin needs no GPU and no driver: this works on any x86-64 Linux box
# with python3 and pip (CI, a laptop); the GPU is only needed to run.
#
#   scripts/install-nvcc.sh            # installs into ./.nvcc
#   DLLM_NVCC_WHEEL_DIR=/opt/nvcc scripts/install-nvcc.sh
#
# build.rs looks in ./.nvcc by itself; for another folder, export what the
# last line prints before `cargo build`.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
dest=${DLLM_NVCC_WHEEL_DIR:-$root/.nvcc}
version=13.0.88
nvcc=$dest/nvidia/cu13/bin/nvcc

if [ -x "$nvcc" ] && "$nvcc" --version | grep -q "V$version"; then
  echo "nvcc $version is already installed in $dest"
else
  # The versions are pinned together: nvcc's own requirements are unpinned
  # and would pull the newest runtime and front end, which need not match it.
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps \
    --upgrade --target "$dest" \
    "nvidia-cuda-nvcc==$version" \
    "nvidia-cuda-crt==$version" \
    "nvidia-nvvm==$version" \
    "nvidia-cuda-runtime==$version" \
    "nvidia-cuda-cccl==13.0.85"
fi

"$nvcc" --version | tail -n 2
# Cargo re-runs build.rs only when something it watches changes; a build made
# before nvcc was here would otherwise keep its kernel-less build script output.
touch "$root/build.rs"
echo "export DLLM_NVCC_WHEEL_DIR=$dest"
