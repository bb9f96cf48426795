#!/usr/bin/env bash
# Races between the threads of a block, found on the CPU: builds the emulated
# device under ThreadSanitizer (DLLM_EMU_SANITIZE=thread, its own target
# folder) and runs, with the sanitizer's runtime preloaded,
#   - tests/emulator.rs, whose racy probe the sanitizer must report, and
#   - kernel tests of tests/cuda.rs, which must run without a report: by
#     default RMSNorm's and confidence's (shared memory and warp shuffles,
#     a few minutes); name others to run them instead, e.g. `attention`
#     (its test takes about 12 minutes under the sanitizer on 2 cores).
# A report stops the test binary with exit status 66. docs/cuda.md has the
# details.
#
#   scripts/tsan.sh               # about 12 minutes on 2 cores, most of it the build
#   scripts/tsan.sh attention     # the attention kernel's tests instead
set -euo pipefail
cd "$(dirname "$0")/.."

runtime=$(gcc -print-file-name=libtsan.so)
[ -e "$runtime" ] || { echo "no libtsan.so for gcc: install gcc's sanitizer runtime" >&2; exit 2; }
export DLLM_EMU_SANITIZE=thread
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/tsan}
# Only the test binaries run under the sanitizer, not cargo and rustc.
export CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="env LD_PRELOAD=$runtime TSAN_OPTIONS=halt_on_error=1:exitcode=66:suppressions=$PWD/kernels/emulator/tsan.supp"

cargo test --release --test emulator -- --include-ignored
if [ $# -eq 0 ]; then
  set -- rms_norm confidence confident
fi
cargo test --release --test cuda -- "$@"
