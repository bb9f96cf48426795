#!/usr/bin/env python3
"""Writes a LLaDA checkpoint directory with random bf16 weights.

The layout is the real one (LLaDA-8B's config.json with the sizes changed,
`model.transformer.*` tensor names as in tests/data/golden/llada_*), so that
dllm and llama.cpp's convert_hf_to_gguf.py both load it as they would load
GSAI-ML/LLaDA-8B. Weights are uniform with variance 1/fan_in and norms one,
like `dllm bench --synthetic`, so activations keep their scale.

The tokenizer: shared/assets has LLaDA's tokenizer_config.json (its 269
special tokens at their real ids, 126080..126348) but not its 6.1 MB
tokenizer.json. The stand-in here is the Qwen2 byte-level BPE of
shared/assets/dream-tokenizer cut to ids below 126080 (merges whose tokens
fall outside dropped), plus LLaDA's special tokens at their real ids: the
real vocabulary size and special ids, another BPE. The timings compared
depend on the vocabulary size (the output head), not on which BPE.

numpy only: safetensors' numpy API has no bfloat16, so the file is written
directly (an 8-byte header length, the JSON header, the raw tensors).
"""

import argparse
import gzip
import json
import shutil
import struct
from pathlib import Path

import numpy as np

ASSETS = Path(__file__).resolve().parent.parent.parent / "shared" / "assets"
# The first special token of LLaDA's vocabulary: ordinary BPE tokens stay below.
FIRST_SPECIAL = 126080


def bf16_bytes(values: np.ndarray) -> bytes:
    """float32 -> bfloat16, rounded to nearest even, as little-endian bytes."""
    bits = values.astype(np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype("<u2").tobytes()


def tensors(config: dict):
    """(name, shape) of every tensor of a LLaDA checkpoint, in file order."""
    d, ffn, vocab = config["d_model"], config["mlp_hidden_size"], config["vocab_size"]
    yield "model.transformer.wte.weight", (vocab, d)
    for layer in range(config["n_layers"]):
        p = f"model.transformer.blocks.{layer}."
        yield p + "attn_norm.weight", (d,)
        yield p + "q_proj.weight", (d, d)
        yield p + "k_proj.weight", (d, d)
        yield p + "v_proj.weight", (d, d)
        yield p + "attn_out.weight", (d, d)
        yield p + "ff_norm.weight", (d,)
        yield p + "ff_proj.weight", (ffn, d)
        yield p + "up_proj.weight", (ffn, d)
        yield p + "ff_out.weight", (d, ffn)
    yield "model.transformer.ln_f.weight", (d,)
    yield "model.transformer.ff_out.weight", (vocab, d)


def write_weights(config: dict, path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    header, offset = {}, 0
    shapes = list(tensors(config))
    for name, shape in shapes:
        size = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name, shape in shapes:
            if len(shape) == 1:
                f.write(bf16_bytes(np.ones(shape, np.float32)))
                continue
            bound = np.float32(np.sqrt(3.0 / shape[1]))
            # Row blocks keep the f32 temporaries small (the head is 259 M values).
            for start in range(0, shape[0], 4096):
                rows = min(4096, shape[0] - start)
                block = rng.random((rows, shape[1]), dtype=np.float32)
                f.write(bf16_bytes((2 * block - 1) * bound))


def write_tokenizer(out: Path) -> None:
    with gzip.open(ASSETS / "dream-tokenizer" / "tokenizer.compact.json.gz", "rt") as f:
        tok = json.load(f)
    vocab = {t: i for t, i in tok["model"]["vocab"].items() if i < FIRST_SPECIAL}
    merges = []
    for merge in tok["model"]["merges"]:
        a, b = merge.split(" ") if isinstance(merge, str) else merge
        if a in vocab and b in vocab and a + b in vocab:
            merges.append(merge)
    tok["model"]["vocab"], tok["model"]["merges"] = vocab, merges
    llada = json.loads((ASSETS / "llada-config" / "tokenizer_config.json").read_text())
    tok["added_tokens"] = [
        {"id": int(i), "content": t["content"], "single_word": t["single_word"],
         "lstrip": t["lstrip"], "rstrip": t["rstrip"], "normalized": t["normalized"],
         "special": t["special"]}
        for i, t in sorted(llada["added_tokens_decoder"].items(), key=lambda kv: int(kv[0]))
    ]
    # LLaDA's tokenizer adds no BOS by itself (add_bos_token false), like Qwen2's.
    tok["post_processor"] = None
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    for name in ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        shutil.copy(ASSETS / "llada-config" / name, out / name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--d-model", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    config = json.loads((ASSETS / "llada-config" / "config.json").read_text())
    heads = args.d_model // args.head_dim
    config.update(
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=heads,
        n_kv_heads=heads,
        # LLaDA-8B's ratio: 12288 / 4096.
        mlp_hidden_size=3 * args.d_model,
    )
    config.pop("auto_map")  # no modeling code ships with the directory
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(args.out)
    write_weights(config, args.out / "model.safetensors", args.seed)


if __name__ == "__main__":
    main()
