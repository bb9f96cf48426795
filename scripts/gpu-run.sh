#!/usr/bin/env bash
# The GPU run in one command each (scripts/gpu_run.py says what each does):
#
#   scripts/gpu-run.sh --prepare    where cargo is (no GPU): builds gpu-run/
#   scripts/gpu-run.sh              on the GPU machine, with gpu-run/ carried along
#   scripts/gpu-run.sh --dry-run    the same run here, on the emulated device
#
# Needs python3 (with PyTorch for the floors and the comparison, which are
# skipped, saying so, without it).
set -euo pipefail
command -v python3 >/dev/null || { echo "error: gpu-run needs python3" >&2; exit 2; }
exec python3 "$(dirname "${BASH_SOURCE[0]}")/gpu_run.py" "$@"
