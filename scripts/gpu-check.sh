#!/usr/bin/env bash
# The checks of the CUDA backend that need an NVIDIA GPU:
#   1. tests/cuda.rs, whose tests are ignored where there is no GPU (CI runs
#      all the others);
#   2. compute-sanitizer memcheck and racecheck on the kernel tests;
#   3. the kernel benchmarks (benches/kernels.rs) and `dllm bench` on a
#      synthetic LLaDA-8B;
# and writes a report (device, each command, its raw output) to $OUT when it
# is set, else to bench/results/. Exits non-zero if any step failed.
#
#   scripts/gpu-check.sh            on a GPU machine with cargo and nvcc
#   scripts/gpu-check.sh --build    on a machine with cargo (no GPU needed):
#                                   builds the binaries into gpu-bin/
#   scripts/gpu-check.sh            on a GPU machine without Rust, with the
#                                   gpu-bin/ folder copied along: runs those
set -uo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bin=$root/gpu-bin

# dllm, tests/cuda.rs and benches/kernels.rs as gpu-bin/{dllm,test-cuda,
# bench-kernels}: about 20 MB stripped, so they travel with the repository.
# The test binary finds tests/data through the repository path it was built
# in, recorded in manifest_dir.
build() {
  set -e
  rm -rf "$bin" && mkdir -p "$bin"
  cargo build --release --bins
  cp target/release/dllm "$bin/dllm"
  # `cargo bench` builds optimised already and takes no --release.
  for kind in test bench; do
    cargo "$kind" $([ "$kind" = test ] && echo --release) --no-run --message-format=json \
      --"$kind" "$([ "$kind" = test ] && echo cuda || echo kernels)" | python3 -c '
import json, shutil, sys
kind, dest = sys.argv[1], sys.argv[2]
for line in sys.stdin:
    msg = json.loads(line)
    if msg.get("reason") == "compiler-artifact" and msg["target"]["kind"] == [kind]:
        shutil.copy(msg["executable"], f"{dest}/{kind}-" + msg["target"]["name"])
' "$kind" "$bin"
  done
  strip "$bin"/* 2>/dev/null || true
  echo "$root" >"$bin/manifest_dir"
  ls -la "$bin"
  set +e
}

if [ "${1:-}" = "--build" ]; then
  build
  exit
fi

if [ ! -d "$bin" ]; then
  command -v cargo >/dev/null || { echo "no cargo and no gpu-bin/: run scripts/gpu-check.sh --build where cargo is, and bring gpu-bin/ along" >&2; exit 2; }
  build || exit 2
fi
# The test binary reads tests/data under the path it was built in.
built_in=$(cat "$bin/manifest_dir")
if [ ! -e "$built_in/tests/data" ]; then
  mkdir -p "$(dirname "$built_in")" && ln -sfn "$root" "$built_in"
fi

# nvidia-smi and compute-sanitizer may live only in the toolkit's bin.
export PATH=$PATH:/usr/local/cuda/bin
# cuBLASLt: from the CUDA toolkit or the nvidia-cublas wheel.
for dir in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
  $(python3 -c 'import nvidia; print(" ".join(p + "/cu13/lib" for p in nvidia.__path__))' 2>/dev/null); do
  if [ -e "$dir/libcublasLt.so.13" ]; then
    export LD_LIBRARY_PATH=$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    break
  fi
done

out=${OUT:-$root/bench/results}
mkdir -p "$out"
report=$out/gpu-check-$(date -u +%Y%m%d-%H%M%S).md
failed=()
summary=()

# run NAME COMMAND...: runs it, appends command and output to the report.
run() {
  local name=$1
  shift
  printf '\n## %s\n\n```\n$ %s\n' "$name" "$*" >>"$report"
  echo "== $name: $*"
  local start=$SECONDS
  "$@" 2>&1 | tee -a "$report"
  local status=${PIPESTATUS[0]}
  printf '```\nexit %s, %s s\n' "$status" "$((SECONDS - start))" >>"$report"
  if [ "$status" -eq 0 ]; then
    summary+=("PASS $name")
  else
    summary+=("FAIL $name (exit $status)")
    failed+=("$name")
  fi
}

{
  echo "# GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), binaries from $bin"
  echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
} >"$report"
run device nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv

run "tests/cuda.rs" "$bin/test-cuda" --include-ignored --test-threads=1

# The kernel tests only: the end-to-end ones would take hours under the tools.
kernels=(--include-ignored --test-threads=1 --skip lockstep --skip forward_logits --skip a_cache_larger)
if command -v compute-sanitizer >/dev/null; then
  run memcheck compute-sanitizer --tool memcheck --error-exitcode 1 "$bin/test-cuda" "${kernels[@]}"
  run racecheck compute-sanitizer --tool racecheck --error-exitcode 1 "$bin/test-cuda" "${kernels[@]}"
else
  summary+=("SKIP compute-sanitizer (not installed)")
fi

run "kernel benchmarks" "$bin/bench-kernels" --bench
if "$bin/dllm" bench --help 2>/dev/null | grep -q -- --synthetic; then
  run "dllm bench llada-8b" "$bin/dllm" bench --synthetic llada-8b --device cuda \
    --prompt-length 1024 --gen-length 64 --block-length 32
fi

printf '\n## Summary\n\n' >>"$report"
printf '%s\n' "${summary[@]}" | tee -a "$report"
echo "report: $report"
[ ${#failed[@]} -eq 0 ]
