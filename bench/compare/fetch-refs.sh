#!/usr/bin/env bash
# Exports the public reference implementations into bench/compare/refs/
# (ignored by git, never committed; under 1 MB):
#   refs/fast-dllm/{llada,dream}        NVlabs/Fast-dLLM
#   refs/streaming-dllm/LLaDA-1.5       xiaoshideta/Streaming-dLLM
# from a git repository of each: $FAST_DLLM_GIT / $STREAMING_DLLM_GIT (a local
# clone or mirror), else a fresh clone of the public repository (needs the
# network). A machine with neither gets the folder brought along instead.
# Re-running replaces what is there. REFS_COMMIT_FAST / REFS_COMMIT_STREAMING
# pin a commit (default HEAD); REFS_DIR exports elsewhere.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
refs="${REFS_DIR:-$here/refs}"
fast_git="${FAST_DLLM_GIT:-https://github.com/NVlabs/Fast-dLLM.git}"
stream_git="${STREAMING_DLLM_GIT:-https://github.com/xiaoshideta/Streaming-dLLM.git}"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

export_paths() { # git-dir-or-url commit dest paths...
    local git_dir="$1" commit="$2" dest="$3"
    shift 3
    if [ ! -d "$git_dir" ]; then
        echo "cloning $git_dir" >&2
        git clone --quiet --no-checkout "$git_dir" "$scratch/$(basename "$dest")" || {
            echo "error: cannot clone $git_dir (set FAST_DLLM_GIT / STREAMING_DLLM_GIT to a local clone)" >&2
            exit 1
        }
        git_dir="$scratch/$(basename "$dest")"
    fi
    if ! git -C "$git_dir" rev-parse --verify -q "$commit^{commit}" >/dev/null; then
        echo "error: no git repository with commit $commit at $git_dir" >&2
        echo "       (set FAST_DLLM_GIT / STREAMING_DLLM_GIT to a clone or mirror)" >&2
        exit 1
    fi
    rm -rf "$dest.tmp"
    mkdir -p "$dest.tmp"
    # A partial mirror may lack blobs outside the exported paths; git archive
    # warns about them on stderr but exports the requested paths in full.
    git -C "$git_dir" archive --format=tar "$commit" "$@" 2> >(grep -v "invalid object" >&2 || true) |
        tar -x -C "$dest.tmp"
    for p in "$@"; do
        [ -e "$dest.tmp/$p" ] || { echo "error: $p missing from the export of $git_dir" >&2; exit 1; }
    done
    find "$dest.tmp" -name __pycache__ -type d -prune -exec rm -rf {} +
    git -C "$git_dir" rev-parse "$commit^{commit}" >"$dest.tmp/COMMIT"
    rm -rf "$dest"
    mv "$dest.tmp" "$dest"
    echo "$dest: $(cat "$dest/COMMIT")"
}

mkdir -p "$refs"
export_paths "$fast_git" "${REFS_COMMIT_FAST:-HEAD}" "$refs/fast-dllm" \
    llada/generate.py llada/model dream/model LICENSE
export_paths "$stream_git" "${REFS_COMMIT_STREAMING:-HEAD}" "$refs/streaming-dllm" \
    LLaDA-1.5/generate.py LLaDA-1.5/sampler.py LLaDA-1.5/model
