#!/usr/bin/env bash
# dllm side by side with llama.cpp's diffusion CLI on the CPU (issue 14).
# A bench script, not CI: it fetches and builds llama.cpp, writes a random
# LLaDA-layout model, converts it to GGUF F16 / Q8_0 / Q4_0 with llama.cpp's
# own converter and llama-quantize, and runs both engines on the same prompt
# ids and schedule, one format at a time, printing the raw logs.
#
#   bash scripts/llama_cpp_side_by_side.sh > side-by-side.log 2>&1
#
# Everything it downloads or writes goes to bench/llama.cpp/ (git-ignored).
# Needs: cargo, cmake, a C++ compiler, curl, python3 with numpy, torch,
# transformers and safetensors (convert_hf_to_gguf.py imports them).
#
# GitHub is out of reach from this project's machines; PyPI is not, and the
# llama-cpp-python sdist vendors the whole llama.cpp tree (examples/diffusion
# and convert_hf_to_gguf.py included), so the source comes from there,
# pinned by version and checksum.
set -euo pipefail

LCP_VERSION=${LCP_VERSION:-0.3.36}
LCP_SHA256=${LCP_SHA256:-832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e}
D_MODEL=${D_MODEL:-2048}
LAYERS=${LAYERS:-16}
# The issue suggests prompt 512, gen 64; the defaults are smaller to fit one
# session on a shared 2-core VM (override them).
PROMPT=${PROMPT:-128}   # prompt tokens, chat template and BOS included
GEN=${GEN:-32}
# One fixed schedule for both engines: STEPS steps, GEN / STEPS tokens each.
STEPS=${STEPS:-8}
# dllm's full forward alone (--cache none), for the same-work comparison.
FULL_STEPS=${FULL_STEPS:-2}
BLOCK=${BLOCK:-32}
FORMATS=${FORMATS:-"F16:bf16 Q8_0:int8 Q4_0:int4"}

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# Paths below are relative to the repository root, so the logged commands
# read the same on any machine.
cd "$ROOT"
WORK=bench/llama.cpp
SRC=$WORK/src
BIN=$WORK/build/bin
MODEL=$WORK/models/llada-d${D_MODEL}-l${LAYERS}
DLLM=target/release/dllm
mkdir -p "$WORK/models"

# 1. llama.cpp's source, from the llama-cpp-python sdist.
if [ ! -f "$SRC/examples/diffusion/diffusion-cli.cpp" ]; then
    url=$(curl -fsSL https://pypi.org/simple/llama-cpp-python/ |
        grep -o "https://[^\"#]*llama_cpp_python-${LCP_VERSION}\.tar\.gz" | head -1)
    curl -fsSL -o "$WORK/sdist.tar.gz" "$url"
    echo "$LCP_SHA256  $WORK/sdist.tar.gz" | sha256sum -c -
    rm -rf "$SRC" && mkdir -p "$SRC"
    tar xzf "$WORK/sdist.tar.gz" -C "$SRC" --strip-components=3 \
        "llama_cpp_python-${LCP_VERSION}/vendor/llama.cpp"
    # The vendored tree's .git names a submodule directory that is not there.
    rm -f "$SRC/.git"
fi

# 2. Build only what is used: CPU only, Release, this CPU's instructions.
if [ ! -x "$BIN/llama-diffusion-cli" ] || [ ! -x "$BIN/llama-quantize" ] || [ ! -x "$BIN/llama-tokenize" ]; then
    cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
        -DGGML_CUDA=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_HTML=OFF
    cmake --build "$WORK/build" --config Release -j2 \
        --target llama-diffusion-cli llama-quantize llama-tokenize
fi
[ -x "$DLLM" ] || cargo build --release

# 3. The model: random weights, LLaDA's layout, config and special tokens.
[ -f "$MODEL/model.safetensors" ] ||
    python3 "$ROOT/scripts/llada_random_model.py" --out "$MODEL" --d-model "$D_MODEL" --layers "$LAYERS"

# 4. GGUF with llama.cpp's converter. The stand-in tokenizer is Qwen2's BPE
# cut to LLaDA's vocabulary (see llada_random_model.py), whose token hash the
# converter does not know: it is told the pre-tokenizer instead ("qwen2"),
# the one place the converter is steered.
if [ ! -f "$MODEL-F16.gguf" ]; then
    python3 - "$SRC" "$MODEL" --outtype f16 --outfile "$MODEL-F16.gguf" <<'EOF'
import runpy, sys
src = sys.argv.pop(1)
sys.path[:0] = [src, src + "/gguf-py"]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
sys.argv[0] = src + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
EOF
fi
for q in Q8_0 Q4_0; do
    [ -f "$MODEL-$q.gguf" ] || "$BIN/llama-quantize" "$MODEL-F16.gguf" "$MODEL-$q.gguf" "$q" 2
done

# 5. The prompt. llama-diffusion-cli always wraps -p in the model's chat
# template and adds BOS; text from tiny Shakespeare is cut until llama.cpp's
# own tokenizer makes exactly PROMPT ids of the wrapped text, and dllm gets
# those ids (--prompt-ids).
python3 - "$MODEL" "$ROOT/../shared/assets/text/tiny_shakespeare.txt" "$WORK/prompt" "$PROMPT" \
    "$BIN/llama-tokenize" "$MODEL-F16.gguf" <<'EOF'
import json, subprocess, sys
from transformers import AutoTokenizer
model, corpus, out, want, tokenize, gguf = sys.argv[1:]
tok = AutoTokenizer.from_pretrained(model)
ids = tok.encode(open(corpus).read()[:20000], add_special_tokens=False)
n = int(want)
for _ in range(10):
    # llama.cpp drops a trailing newline of a prompt file.
    text = tok.decode(ids[:n]).rstrip("\n")
    wrapped = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                      add_generation_prompt=True)
    open(out + ".wrapped", "w").write(wrapped)
    got = json.loads(subprocess.run([tokenize, "-m", gguf, "-f", out + ".wrapped", "--ids",
                                     "--log-disable"], capture_output=True, text=True,
                                    check=True).stdout.strip().splitlines()[-1])
    if len(got) == int(want):
        break
    n += int(want) - len(got)
else:
    sys.exit(f"no prompt of {want} tokens found")
open(out + ".txt", "w").write(text)
open(out + ".ids", "w").write(",".join(map(str, got)))
print(f"prompt: {len(got)} ids, first {got[:4]}")
EOF

SEQ=$((PROMPT + GEN))
echo "# $(date -u +%FT%TZ) | $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //') | $(nproc) cores"
echo "# dllm $(git -C "$ROOT" rev-parse --short HEAD) | llama.cpp from llama-cpp-python $LCP_VERSION"
echo "# model d_model $D_MODEL, $LAYERS layers, vocab 126464 | prompt $PROMPT, gen $GEN, sequence $SEQ"
for pair in $FORMATS; do
    gguf=${pair%%:*} weights=${pair##*:}
    echo
    echo "## $gguf vs --weights $weights | load: $(cut -d' ' -f1-3 /proc/loadavg)"
    # llama.cpp: the timestep schedule (--diffusion-eps) runs exactly STEPS
    # forwards over the whole sequence; its block schedule counts the prompt
    # as blocks too and would add a forward per empty block.
    ( set -x; /usr/bin/time -f "wall %e s, max RSS %M kB" "$BIN/llama-diffusion-cli" \
        -m "$MODEL-$gguf.gguf" -f "$WORK/prompt.txt" -t 2 -c "$SEQ" -b "$SEQ" -ub "$SEQ" \
        --diffusion-steps "$STEPS" --diffusion-eps 0.001 --temp 0 --seed 0 ) 2>&1 |
        grep -E "^\+|total time|wall|n_tokens|error" | sed 's/\r.*total time/total time/'
    echo "load: $(cut -d' ' -f1-3 /proc/loadavg)"
    ids=$(cat "$WORK/prompt.ids")
    ( set -x; "$DLLM" generate --model "$MODEL" --weights "$weights" --prompt-ids "$ids" \
        --gen-length "$GEN" --block-length "$GEN" --steps "$FULL_STEPS" --cache none --threshold none --json ) 2>&1 |
        sed "s/--prompt-ids [0-9,]*/--prompt-ids \$(cat prompt.ids)/; s/\"tokens\":\[[^]]*\]/\"tokens\":[...]/; s/\"text\":\"[^\"]*\"/\"text\":\"...\"/"
    echo "load: $(cut -d' ' -f1-3 /proc/loadavg)"
    # The same schedule with DualCache, then the threshold rule (on random
    # weights no token is 0.9 sure, so it commits one a step: GEN steps).
    for rule in "--steps $STEPS --threshold none" "--threshold 0.9"; do
        # shellcheck disable=SC2086 # $rule is two options
        ( set -x; "$DLLM" generate --model "$MODEL" --weights "$weights" --prompt-ids "$ids" \
            --gen-length "$GEN" --block-length "$BLOCK" --cache dual $rule --json ) 2>&1 |
            sed "s/--prompt-ids [0-9,]*/--prompt-ids \$(cat prompt.ids)/; s/\"tokens\":\[[^]]*\]/\"tokens\":[...]/; s/\"text\":\"[^\"]*\"/\"text\":\"...\"/"
        echo "load: $(cut -d' ' -f1-3 /proc/loadavg)"
    done
done
