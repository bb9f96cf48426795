#!/usr/bin/env bash
# dllm against the Fast-dLLM and Streaming-dLLM PyTorch code, side by side:
# same random checkpoints (real LLaDA-8B / Dream-7B layouts), same prompts,
# same fixed schedules. The one command, from the repository root:
#
#   bash bench/compare/run.sh                      # the comparison on cuda
#   bash bench/compare/run.sh --tiny --device cpu  # a harness test on tiny shapes, CPU
#
# Options go to compare.py (--help lists them). Builds target/release/dllm
# with cargo when it is missing; writes compare-<date>.{md,json,png} and the
# raw runs; exits 0 when every case passed, 1 when one failed, 3 when cases
# did not run. Needs python3 with torch, transformers, safetensors, numpy,
# matplotlib, and bench/compare/refs (fetch-refs.sh); no network.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/../.."

for arg in "$@"; do
    case "$arg" in -h | --help) exec python3 "$here/compare.py" --help ;; esac
done
if [ ! -x target/release/dllm ]; then
    echo "[run.sh] building dllm: cargo build --release" >&2
    cargo build --release
fi
export DLLM_COMPARE_COMMAND="bash bench/compare/run.sh${*:+ $*}"
exec python3 "$here/compare.py" "$@"
