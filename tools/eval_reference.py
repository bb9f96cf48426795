#!/usr/bin/env python3
"""Held-out accuracy of tiny-arith under baseline LLaDA decoding
(gen_length 64, block_length 32, steps 64: one token committed per step, the
most confident masked token of the current block, low-confidence remasking,
greedy argmax), computed in float32.

  python3 tools/eval_reference.py                      # exported bf16 weights (models/tiny-arith)
  python3 tools/eval_reference.py --ckpt tools/work/tiny-arith-ckpt/ckpt.pt   # fp32 master weights
  python3 tools/eval_reference.py --ckpt tools/work/tiny-arith-ckpt/ckpt.pt --round_bf16

Prompts are encoded with models/tiny-arith/tokenizer.json (checked to give
one id per character).  Prompts are grouped by length, so no padding and no
attention mask are involved: every row computes what a batch-1 run would.
"""
import argparse
import json
import os
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tasks  # noqa: E402
from lladamodel import LLaDA, generate_baseline  # noqa: E402


def load_model(model_dir, ckpt=None, round_bf16=False):
    if ckpt:
        st = torch.load(ckpt, weights_only=False, map_location="cpu")
        cfg, sd = st["config"], st["model"]
    else:
        from safetensors.torch import load_file
        with open(os.path.join(model_dir, "config.json")) as f:
            cfg = json.load(f)
        sd = load_file(os.path.join(model_dir, "model.safetensors"))
    if round_bf16:
        sd = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    sd = {k: v.float() for k, v in sd.items()}
    model = LLaDA(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=True), None
    model.eval()
    return model, cfg


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model_dir", default="models/tiny-arith")
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--round_bf16", action="store_true")
    ap.add_argument("--eval_file", default="models/tiny-arith/eval.jsonl")
    ap.add_argument("--gen_length", type=int, default=64)
    ap.add_argument("--block_length", type=int, default=32)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--show_errors", type=int, default=10)
    ap.add_argument("--json_out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model, cfg = load_model(args.model_dir, args.ckpt, args.round_bf16)
    mask_id, eos_id = cfg["mask_token_id"], cfg["eos_token_id"]
    from tokenizers import Tokenizer
    tk = Tokenizer.from_file(os.path.join(args.model_dir, "tokenizer.json"))
    rows = tasks.load_jsonl(args.eval_file)
    groups = defaultdict(list)
    for i, r in enumerate(rows):
        ids = tk.encode(r["prompt"], add_special_tokens=False).ids
        assert ids == tasks.encode(r["prompt"]) and len(ids) == len(r["prompt"])
        groups[len(ids)].append((i, ids))
    preds = [None] * len(rows)
    t0 = time.time()
    nfe_tot = 0
    for _, g in sorted(groups.items()):
        outs, nfe = generate_baseline(model, [ids for _, ids in g], mask_id, gen_length=args.gen_length,
                                      block_length=args.block_length, steps=args.steps, pad_id=eos_id)
        nfe_tot += nfe
        for (i, _), o in zip(g, outs):
            n = o.index(eos_id) if eos_id in o else len(o)
            preds[i] = tk.decode(o[:n], skip_special_tokens=False)
    per = defaultdict(lambda: [0, 0])
    errors = []
    for r, p in zip(rows, preds):
        ok = p == r["answer"]
        per[r["task"]][0] += ok
        per[r["task"]][1] += 1
        if not ok:
            errors.append((r["prompt"], r["answer"], p))
    tot = sum(c[0] for c in per.values())
    src = args.ckpt or os.path.join(args.model_dir, "model.safetensors")
    print(f"weights: {src}{' (rounded to bf16)' if args.round_bf16 else ''}; compute float32; "
          f"gen_length {args.gen_length} block {args.block_length} steps {args.steps}")
    print(f"exact match: {tot}/{len(rows)} = {tot/len(rows):.3f}   ({time.time()-t0:.0f}s)")
    for k, (c, n) in per.items():
        print(f"  {k:5s} {c}/{n} = {c/n:.3f}")
    for e in errors[:args.show_errors]:
        print(f"  ERR {e[0]!r} want {e[1]!r} got {e[2]!r}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"weights": src, "round_bf16": args.round_bf16, "accuracy": tot / len(rows),
                       "per_task": {k: c / n for k, (c, n) in per.items()}, "n": len(rows),
                       "gen_length": args.gen_length, "block_length": args.block_length,
                       "steps": args.steps, "errors": errors}, f, indent=1)


if __name__ == "__main__":
    main()
