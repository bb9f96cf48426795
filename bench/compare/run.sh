#!/usr/bin/env bash
# dllm against the Fast-dLLM and Streaming-dLLM PyTorch code, side by side on
# one GPU: same random checkpoints (real LLaDA-8B / Dream-7B layouts), same
# prompts, same fixed schedules. The one command, from the repository root:
#
#   bash bench/compare/run.sh                      # the whole comparison on cuda
#   bash bench/compare/run.sh --tiny --device cpu  # the same pipeline on tiny shapes, CPU
#
# Any option is passed on to compare.py (--help lists them: --models,
# --strategies, --prompt-lengths, --gen-lengths, --repeats, --budget-s, ...).
# Writes bench/results/compare-<date>.{md,json,png}; exits non-zero when the
# two engines' NFE differ (1) or when cases are still missing (3: run again,
# finished cases are kept). Needs python3 with torch, transformers,
# safetensors, numpy, matplotlib; no network.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cd "$repo"

device=cuda
tiny=0
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[$i]}" in
        --device) device="${args[$((i + 1))]:-cuda}" ;;
        --device=*) device="${args[$i]#--device=}" ;;
        --tiny) tiny=1 ;;
        -h|--help) exec python3 "$here/compare.py" --help ;;
    esac
done
say() { echo "[run.sh] $*" >&2; }

# 1. Python packages
python3 - <<'EOF' || { say "error: python3 lacks a package above (see bench/compare/README.md)"; exit 1; }
import importlib, sys
missing = []
for name in ("torch", "transformers", "safetensors", "numpy", "matplotlib"):
    try:
        m = importlib.import_module(name)
        print(f"[run.sh] {name} {getattr(m, '__version__', '?')}", file=sys.stderr)
    except ImportError:
        missing.append(name)
if missing:
    print(f"[run.sh] missing python packages: {', '.join(missing)}", file=sys.stderr)
    sys.exit(1)
EOF
if [ "$device" != cpu ]; then
    python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" ||
        { say "error: torch sees no CUDA device (use --device cpu for a CPU run)"; exit 1; }
fi

# 2. The reference code, exported into bench/compare/refs/ (ignored by git)
if [ ! -f "$here/refs/fast-dllm/COMMIT" ] || [ ! -f "$here/refs/streaming-dllm/COMMIT" ]; then
    say "bench/compare/refs/ is incomplete: exporting the references"
    bash "$here/fetch-refs.sh" || {
        say "error: no reference code. Run bench/compare/fetch-refs.sh where the git mirrors are and bring"
        say "       bench/compare/refs/ along (it is ignored by git; e.g. the device tool's carry)"
        exit 1
    }
fi

# 3. The dllm binary
dllm="$repo/target/release/dllm"
if [ ! -x "$dllm" ] || [ "${DLLM_COMPARE_BUILD:-0}" = 1 ]; then
    command -v cargo >/dev/null || { say "error: no $dllm and no cargo to build it"; exit 1; }
    say "building dllm: cargo build --release ${DLLM_CARGO_FLAGS:-}"
    # shellcheck disable=SC2086
    cargo build --release ${DLLM_CARGO_FLAGS:-}
fi
# Fail early (before minutes of checkpoints and references) if this binary
# cannot run on the device: one tiny request on the golden tiny model.
probe="$("$dllm" generate --model tests/data/golden/llada_tiny_s1/bf16 --prompt-ids 1,2,3 --gen-length 32 \
    --block-length 32 --steps 32 --cache dual --threshold none --device "$device" --json 2>&1)" || {
    say "error: dllm cannot run on $device: $probe"
    exit 1
}

# 4. Everything else
export DLLM_COMPARE_COMMAND="bash bench/compare/run.sh${*:+ $*}"
exec python3 "$here/compare.py" "$@"
