#!/usr/bin/env python3
"""Train the tiny-arith masked-diffusion LM (LLaDA layout) on CPU.

Objective = LLaDA SFT: sequence = prompt ++ answer ++ <|eos|> padding up to
GEN_LENGTH; per example t ~ U(0,1] (stratified over the batch), every position
of the generation region (answer + eos padding) is masked with probability
p = (1 - 1e-3) t + 1e-3, the prompt never; loss = sum over masked positions of
CE / p, divided by the generation-region length (LLaDA's `answer_lengths`),
averaged over the batch.  Forward/backward run under bf16 autocast (AMX), the
master weights and the optimizer are float32.

  see tools/README.md for the exact command of the shipped run

Checkpoints (`ckpt.pt`, resumable with --resume) are written every
--ckpt_every steps; `train_meta.json` records the arguments and the time.
"""
import argparse
import json
import math
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tasks  # noqa: E402
from lladamodel import LLaDA, generate_baseline  # noqa: E402


def make_config(args):
    return {
        "d_model": args.d_model,
        "n_layers": args.n_layers,
        "n_heads": args.n_heads,
        "n_kv_heads": args.n_heads,
        "mlp_hidden_size": args.mlp,
        "vocab_size": tasks.VOCAB_SIZE,
        "embedding_size": tasks.VOCAB_SIZE,
        "rope_theta": args.rope_theta,
        "rms_norm_eps": 1e-5,
        "mask_token_id": tasks.MASK_ID,
        "eos_token_id": tasks.EOS_ID,
    }




def make_batch(rng, batch, banned):
    prompts, answers, names = [], [], []
    while len(prompts) < batch:
        task, p, a = tasks.sample(rng)
        if p in banned:
            continue
        prompts.append(tasks.encode(p))
        answers.append(tasks.encode(a))
        names.append(task)
    G = tasks.GEN_LENGTH
    # Fixed shapes keep oneDNN kernels cached.
    L = max(tasks.MAX_PROMPT, max(len(p) for p in prompts)) + G
    ids = torch.full((batch, L), tasks.PAD_ID, dtype=torch.long)
    valid = torch.zeros((batch, L), dtype=torch.bool)
    gen = torch.zeros((batch, L), dtype=torch.bool)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        n = len(p)
        ids[i, :n] = torch.tensor(p)
        ids[i, n:n + G] = tasks.EOS_ID
        ids[i, n:n + len(a)] = torch.tensor(a)
        valid[i, :n + G] = True
        gen[i, n:n + G] = True
    return ids, valid, gen


def loss_fn(model, ids, valid, gen, gen_t):
    B, L = ids.shape
    eps = 1e-3
    t = (torch.arange(B, dtype=torch.float32) + torch.rand(B, generator=gen_t)) / B
    t = t[torch.randperm(B, generator=gen_t)]
    p_mask = (1 - eps) * t + eps
    r = torch.rand(B, L, generator=gen_t)
    masked = gen & (r < p_mask[:, None])
    noisy = torch.where(masked, torch.full_like(ids, tasks.MASK_ID), ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(noisy, valid)
    logits = logits.float()
    ce = F.cross_entropy(logits[masked], ids[masked], reduction="none")
    w = (1.0 / p_mask)[:, None].expand(B, L)[masked]
    loss = (ce * w).sum() / (tasks.GEN_LENGTH * B)
    # plain masked-token CE for monitoring
    return loss, ce.mean().item()


def evaluate(model, rows, bf16=True, batch=100):
    model.eval()
    res = {}
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        outs, _ = generate_baseline(model, [tasks.encode(r["prompt"]) for r in chunk], tasks.MASK_ID,
                                    gen_length=tasks.GEN_LENGTH, block_length=32, steps=tasks.GEN_LENGTH,
                                    pad_id=tasks.PAD_ID, autocast_bf16=bf16,
                                    min_len=tasks.MAX_SEQUENCE)
        for r, o in zip(chunk, outs):
            ok = tasks.decode(o) == r["answer"]
            c = res.setdefault(r["task"], [0, 0])
            c[0] += ok
            c[1] += 1
    model.train()
    tot = sum(c[0] for c in res.values()) / max(1, sum(c[1] for c in res.values()))
    return tot, {k: c[0] / c[1] for k, c in res.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--min_lr_frac", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--wd", type=float, default=0.05)
    ap.add_argument("--d_model", type=int, default=256)
    ap.add_argument("--n_layers", type=int, default=6)
    ap.add_argument("--n_heads", type=int, default=8)
    ap.add_argument("--mlp", type=int, default=768)
    ap.add_argument("--rope_theta", type=float, default=10000.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=tasks.CKPT_DIR)
    ap.add_argument("--eval_file", default="models/tiny-arith/eval.jsonl")
    ap.add_argument("--eval_every", type=int, default=500)
    ap.add_argument("--dev_n", type=int, default=100)
    ap.add_argument("--ckpt_every", type=int, default=250)
    ap.add_argument("--log_every", type=int, default=25)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--time_limit", type=float, default=0, help="stop (and save) after this many seconds")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    cfg = make_config(args)
    model = LLaDA(cfg)
    nparam = sum(p.numel() for p in model.parameters())
    print(f"config {cfg}\nparams {nparam/1e6:.2f}M", flush=True)

    # held-out prompts are never trained on; a separate dev set (other seed) is monitored
    banned = set()
    if os.path.exists(args.eval_file):
        banned = {r["prompt"] for r in tasks.load_jsonl(args.eval_file)}
    dev = [r for r in tasks.eval_set(args.dev_n, seed=tasks.EVAL_SEED + 1) if r["prompt"] not in banned]
    banned |= {r["prompt"] for r in dev}

    decay = [p for n, p in model.named_parameters() if p.dim() == 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    rng = random.Random(tasks.TRAIN_SEED_BASE + args.seed)
    gen_t = torch.Generator().manual_seed(args.seed)
    step, elapsed0 = 0, 0.0
    ck = os.path.join(args.out, "ckpt.pt")
    if args.resume and os.path.exists(ck):
        st = torch.load(ck, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step, elapsed0 = st["step"], st["elapsed"]
        rng.setstate(st["rng"])
        gen_t.set_state(st["gen_t"])
        print(f"resumed at step {step}", flush=True)

    def lr_at(s):
        if s < args.warmup:
            return args.lr * (s + 1) / args.warmup
        pr = min(1.0, (s - args.warmup) / max(1, args.steps - args.warmup))
        if args.time_limit:  # decay by whichever budget (steps or seconds) runs out first
            pr = max(pr, min(1.0, (elapsed0 + time.time() - t0) / args.time_limit))
        return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * pr)))

    def save(tag="ckpt.pt"):
        tmp = os.path.join(args.out, tag + ".tmp")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                    "elapsed": elapsed0 + time.time() - t0, "rng": rng.getstate(),
                    "gen_t": gen_t.get_state(), "config": cfg, "args": vars(args)}, tmp)
        os.replace(tmp, os.path.join(args.out, tag))

    t0 = time.time()
    model.train()
    run_loss = run_ce = 0.0
    n_run = 0
    history = []
    while step < args.steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        ids, valid, gen = make_batch(rng, args.batch, banned)
        loss, ce = loss_fn(model, ids, valid, gen, gen_t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        run_loss += loss.item()
        run_ce += ce
        n_run += 1
        el = elapsed0 + time.time() - t0
        if step % args.log_every == 0:
            print(f"step {step} loss {run_loss/n_run:.4f} maskedCE {run_ce/n_run:.4f} gn {gn:.2f} "
                  f"lr {lr_at(step):.2e} elapsed {el:.0f}s ({el/step:.2f}s/step)", flush=True)
            run_loss = run_ce = 0.0
            n_run = 0
        if step % args.ckpt_every == 0 or step == args.steps:
            save()
        if step % args.eval_every == 0 or step == args.steps:
            te = time.time()
            acc, per = evaluate(model, dev, bf16=True)
            t0 += time.time() - te  # eval time is not training time
            history.append({"step": step, "dev_acc": acc, "per_task": per})
            print(f"[dev] step {step} acc {acc:.3f} {per} (eval {time.time()-te:.0f}s)", flush=True)
        if args.time_limit and elapsed0 + time.time() - t0 > args.time_limit:
            print("time limit reached", flush=True)
            save()
            break
    el = elapsed0 + time.time() - t0
    save()
    # Where the checkpoint was written says nothing about how it was made.
    made_with = {k: v for k, v in vars(args).items() if k != "out"}
    meta = {"args": made_with, "config": cfg, "params": nparam, "steps_done": step,
            "train_seconds": el, "dev_history": history, "torch": torch.__version__}
    with open(os.path.join(args.out, "train_meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"done: {step} steps, training time {el:.0f}s ({el/60:.1f} min)", flush=True)


if __name__ == "__main__":
    main()
