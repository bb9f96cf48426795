#!/usr/bin/env python3
"""Random checkpoints in the real LLaDA-8B / Dream-7B layouts.

The tensor names, shapes and config.json keys are those of the golden tiny
models in tests/data/golden/{llada,dream}_tiny_s1 (which copy the real
checkpoints' layout), with the real models' values (REAL below, taken from the
published config.json of GSAI-ML/LLaDA-8B-Instruct and
Dream-org/Dream-v0-Instruct-7B). Weights are bf16, seeded, written as shards
plus model.safetensors.index.json like the real checkpoints.

Weights are random, so confidences mean nothing; two rows of the output head
are zero so that the mask id and the EOS id always score exactly 0 while the
best of the other ~10^5 logits is far above it. Neither is ever the argmax:
a fixed schedule then commits exactly its quota every step on both engines
(no mask id committed, no early exit), which is what makes the work identical.

    python3 make_checkpoint.py --model llada --out DIR            # real shapes, on cuda if present
    python3 make_checkpoint.py --model dream --out DIR --tiny     # golden tiny shapes, CPU

Re-running with the same arguments on a complete directory does nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "data" / "golden"

# Values of the real config.json for every key where the golden tiny config
# differs (the golden key set is otherwise the real one, less auto_map and
# transformers_version, which only name remote code).
REAL = {
    "llada": {
        "d_model": 4096,
        "embedding_size": 126464,
        "vocab_size": 126464,
        "n_heads": 32,
        "n_kv_heads": 32,
        "n_layers": 32,
        "mlp_hidden_size": 12288,
        "eos_token_id": 126081,
        "pad_token_id": 126081,
        "mask_token_id": 126336,
        "init_device": "meta",
    },
    "dream": {
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_attention_heads": 28,
        "num_hidden_layers": 28,
        "num_key_value_heads": 4,
        "max_window_layers": 28,
        "vocab_size": 152064,
        "max_position_embeddings": 131072,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "pad_token_id": 151643,
        "mask_token_id": 151666,
        "torch_dtype": "bfloat16",
        "use_cache": True,
    },
}
GOLDEN_DIR = {"llada": "llada_tiny_s1", "dream": "dream_tiny_s1"}
FORMAT_VERSION = 1


def make_config(model: str, tiny: bool) -> dict:
    config = json.loads((GOLDEN / GOLDEN_DIR[model] / "config.json").read_text())
    if tiny:
        if "torch_dtype" in config:
            config["torch_dtype"] = "bfloat16"
    else:
        for key, value in REAL[model].items():
            assert key in config, f"golden config has no {key}"
            config[key] = value
    return config


def tensor_layout(model: str, c: dict) -> list[tuple[str, list[int], str]]:
    """(name, shape, kind) in the golden order; kind picks the init."""
    out = []
    if model == "llada":
        d, heads, kv, mlp = c["d_model"], c["n_heads"], c["n_kv_heads"], c["mlp_hidden_size"]
        vocab = c.get("embedding_size") or c["vocab_size"]
        hd = d // heads
        p = "model.transformer."
        for i in range(c["n_layers"]):
            b = f"{p}blocks.{i}."
            out += [
                (b + "attn_norm.weight", [d], "norm"),
                (b + "attn_out.weight", [d, heads * hd], "linear"),
                (b + "ff_norm.weight", [d], "norm"),
                (b + "ff_out.weight", [d, mlp], "linear"),
                (b + "ff_proj.weight", [mlp, d], "linear"),
                (b + "k_proj.weight", [kv * hd, d], "linear"),
                (b + "q_proj.weight", [heads * hd, d], "linear"),
                (b + "up_proj.weight", [mlp, d], "linear"),
                (b + "v_proj.weight", [kv * hd, d], "linear"),
            ]
        out += [
            (p + "ff_out.weight", [vocab, d], "head"),
            (p + "ln_f.weight", [d], "norm"),
            (p + "wte.weight", [vocab, d], "embedding"),
        ]
    else:
        h, heads, kv, inter = (
            c["hidden_size"],
            c["num_attention_heads"],
            c["num_key_value_heads"],
            c["intermediate_size"],
        )
        vocab, hd = c["vocab_size"], c["hidden_size"] // c["num_attention_heads"]
        out += [("lm_head.weight", [vocab, h], "head"), ("model.embed_tokens.weight", [vocab, h], "embedding")]
        for i in range(c["num_hidden_layers"]):
            b = f"model.layers.{i}."
            out += [
                (b + "input_layernorm.weight", [h], "norm"),
                (b + "mlp.down_proj.weight", [h, inter], "linear"),
                (b + "mlp.gate_proj.weight", [inter, h], "linear"),
                (b + "mlp.up_proj.weight", [inter, h], "linear"),
                (b + "post_attention_layernorm.weight", [h], "norm"),
                (b + "self_attn.k_proj.bias", [kv * hd], "bias"),
                (b + "self_attn.k_proj.weight", [kv * hd, h], "linear"),
                (b + "self_attn.o_proj.weight", [h, heads * hd], "linear"),
                (b + "self_attn.q_proj.bias", [heads * hd], "bias"),
                (b + "self_attn.q_proj.weight", [heads * hd, h], "linear"),
                (b + "self_attn.v_proj.bias", [kv * hd], "bias"),
                (b + "self_attn.v_proj.weight", [kv * hd, h], "linear"),
            ]
        out.append(("model.norm.weight", [h], "norm"))
    return out


def golden_layout(model: str) -> list[tuple[str, list[int]]]:
    """Names and shapes in the golden tiny checkpoint's safetensors header."""
    path = GOLDEN / GOLDEN_DIR[model] / "model.safetensors"
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return [(k, v["shape"]) for k, v in header.items() if k != "__metadata__"]


def write_sparse(path: Path, shard) -> int:
    """A safetensors file with the real header and a hole for its data."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, _ in shard:
        nbytes = 2
        for s in shape:
            nbytes *= s
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        f.truncate(8 + len(raw) + offset)
    return offset


def stamp_of(args, config) -> dict:
    return {
        "format": FORMAT_VERSION,
        "model": args.model,
        "tiny": args.tiny,
        "seed": args.seed,
        "config": config,
        "max_shard_bytes": args.max_shard_bytes,
        "sparse": args.sparse,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["llada", "dream"], required=True)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--tiny", action="store_true", help="golden tiny shapes (d 128, 4 layers, vocab 512)")
    ap.add_argument("--seed", type=int, default=20250601)
    ap.add_argument("--device", default=None, help="where to draw the numbers (default: cuda if available)")
    ap.add_argument("--sparse", action="store_true",
                    help="testing aid: real headers, all-zero data written as holes (no drawing, no disk used)")
    ap.add_argument("--max-shard-bytes", type=int, default=None,
                    help="shard size limit (default 5 GB; tiny: 1 MB, so the index path is used too)")
    args = ap.parse_args(argv)

    import torch
    from safetensors.torch import save_file

    if args.max_shard_bytes is None:
        args.max_shard_bytes = 1_000_000 if args.tiny else 5_000_000_000
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = make_config(args.model, args.tiny)
    layout = tensor_layout(args.model, config)
    if args.tiny:
        # The tiny layout must be the golden one, name for name, shape for shape.
        assert [(n, s) for n, s, _ in layout] == golden_layout(args.model), "layout differs from the golden header"
    else:
        want = {n for n, _ in golden_layout(args.model)}
        have = {n for n, _, _ in layout}
        # Same names once the layer index range is scaled.
        norm = lambda names: {".".join("N" if part.isdigit() else part for part in n.split(".")) for n in names}
        assert norm(want) == norm(have), "tensor names differ from the golden layout"

    stamp = stamp_of(args, config)
    out: Path = args.out
    stamp_file = out / ".make_checkpoint.json"
    if stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp:
        print(f"{out}: already made ({args.model}, seed {args.seed})")
        return 0

    mask_id, eos_id = config["mask_token_id"], config["eos_token_id"]
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    started = time.time()

    def draw(name, shape, kind):
        digest = hashlib.sha256(f"{args.seed}:{name}".encode()).digest()
        g = torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        if kind == "norm":
            return torch.ones(shape, dtype=torch.bfloat16, device=device)
        t = torch.randn(shape, generator=g, dtype=torch.float32 if device == "cpu" else torch.bfloat16, device=device)
        if kind in ("linear", "head"):
            t.mul_(shape[1] ** -0.5)  # activations keep their scale
        elif kind == "bias":
            t.mul_(0.02)
        t = t.to(torch.bfloat16)
        if kind == "head":
            t[mask_id].zero_()
            t[eos_id].zero_()
        return t

    # Group into shards in layout order.
    shards, current, size = [], [], 0
    for name, shape, kind in layout:
        nbytes = 2
        for s in shape:
            nbytes *= s
        if current and size + nbytes > args.max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape, kind))
        size += nbytes
    shards.append(current)

    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = (
            "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        )
        if args.sparse:
            total += write_sparse(tmp / fname, shard)
            for name, _, _ in shard:
                weight_map[name] = fname
            continue
        tensors = {}
        for name, shape, kind in shard:
            t = draw(name, shape, kind).cpu().contiguous()
            tensors[name] = t
            weight_map[name] = fname
            total += t.numel() * 2
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        del tensors
        print(f"  {fname}: {len(shard)} tensors", file=sys.stderr)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
    (tmp / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    (tmp / ".make_checkpoint.json").write_text(json.dumps(stamp, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(
        f"{out}: {args.model}{' (tiny)' if args.tiny else ''}, {total / 1e9:.2f} GB bf16 in {len(shards)} file(s), "
        f"seed {args.seed}, {'sparse (zeros)' if args.sparse else 'drawn on ' + device}, {time.time() - started:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
