#!/usr/bin/env python3
"""Seeded task generator and character-level tokenizer for the tiny-arith model.

Task family (every answer is a deterministic function of the prompt, the prompt
always ends with '=' and the answer is what follows it).  Field widths are
fixed per task (numbers zero-padded, strings of a fixed length), so each
output character sits at a constant offset from the prompt characters it
depends on; this is what lets a 3.5M-parameter model learn the family in a
few minutes of CPU time.

  add   `add AAAAAAAAAA+BBBBBBBBBB=`  A, B: 10-digit zero-padded integers (the
                        values themselves have 1..10 digits).  Answer: A+B with
                        exactly 11 digits, zero-padded.
                        `add 0000004821+0000000937=` -> `00000005758`
  sort  `sort S=`       S: 16 digits.  Answer: the digits of S in ascending
                        order.  `sort 9051872346601928=` -> `0011223456678899`
  rev   `rev S=`        S: 16 chars from [0-9a-z].  Answer: S reversed.
  copy  `copy S=`       S: 16 chars from [0-9a-z].  Answer: S.
  rep   `rep N S=`      N in 2..8, S: 8 chars from [0-9a-z].  Answer: S
                        repeated N times (16..64 chars).

All answers are 11..64 characters long.  After the answer the generation region
is filled with <|eos|> (LLaDA SFT convention).

Tokenizer: one token per character.  ids 0..94 are the printable ASCII
characters chr(32)..chr(126) (id = ord(c) - 32), then the special tokens.
The embedding is padded to VOCAB_SIZE rows (unused ids are never produced).

Usage:  python3 tools/tasks.py [--out models/tiny-arith/eval.jsonl] [--n 200]
        writes the held-out evaluation set (seed EVAL_SEED).
"""
import argparse
import json
import os
import random

# ---------------------------------------------------------------- tokenizer
PRINTABLE = [chr(c) for c in range(32, 127)]  # 95 chars, ids 0..94
EOS_TOKEN = "<|eos|>"
MASK_TOKEN = "<|mask|>"
PAD_TOKEN = "<|pad|>"
UNK_TOKEN = "<|unk|>"
EOS_ID = 95
MASK_ID = 96
PAD_ID = 97
UNK_ID = 98
SPECIALS = [(EOS_TOKEN, EOS_ID), (MASK_TOKEN, MASK_ID), (PAD_TOKEN, PAD_ID), (UNK_TOKEN, UNK_ID)]
N_TOKENS = 99          # tokens the tokenizer knows
VOCAB_SIZE = 128       # embedding rows (vocab_size = embedding_size in config)

GEN_LENGTH = 64        # generation region (answer + eos padding)
MAX_PROMPT = 26        # longest prompt of the family (add: "add " + 10 + "+" + 10 + "=")
MAX_SEQUENCE = MAX_PROMPT + GEN_LENGTH  # the longest sequence training shows the model
# Where tools/train.py writes its checkpoints (git ignores tools/work/).
CKPT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "work", "tiny-arith-ckpt")

CHAR_TO_ID = {c: i for i, c in enumerate(PRINTABLE)}
ID_TO_STR = {i: c for i, c in enumerate(PRINTABLE)}
for _tok, _id in SPECIALS:
    ID_TO_STR[_id] = _tok


def encode(text):
    return [CHAR_TO_ID.get(c, UNK_ID) for c in text]


def decode(ids, stop_at_eos=True):
    out = []
    for i in ids:
        i = int(i)
        if stop_at_eos and i == EOS_ID:
            break
        out.append(ID_TO_STR.get(i, ""))
    return "".join(out)


# ---------------------------------------------------------------- tasks
ALNUM = "0123456789abcdefghijklmnopqrstuvwxyz"
TASKS = ["add", "sort", "rev", "copy", "rep"]
ADD_WIDTH = 11
EVAL_SEED = 20250101
TRAIN_SEED_BASE = 1234


def _rand_str(rng, lo, hi):
    n = rng.randint(lo, hi)
    return "".join(rng.choice(ALNUM) for _ in range(n))


def _rand_int(rng, ndig):
    if ndig == 1:
        return rng.randint(0, 9)
    return rng.randint(10 ** (ndig - 1), 10 ** ndig - 1)


STR_LEN = 16
REP_LEN = 8
DIGITS = "0123456789"


def _fixed_str(rng, n, alphabet=ALNUM):
    return "".join(rng.choice(alphabet) for _ in range(n))


def make_example(rng, task):
    if task == "add":
        a = _rand_int(rng, rng.randint(1, 10))
        b = _rand_int(rng, rng.randint(1, 10))
        return f"add {a:010d}+{b:010d}=", str(a + b).zfill(ADD_WIDTH)
    if task == "sort":
        s = _fixed_str(rng, STR_LEN, DIGITS)
        return f"sort {s}=", "".join(sorted(s))
    if task == "rev":
        s = _fixed_str(rng, STR_LEN)
        return f"rev {s}=", s[::-1]
    if task == "copy":
        s = _fixed_str(rng, STR_LEN)
        return f"copy {s}=", s
    if task == "rep":
        n = rng.randint(2, 8)
        s = _fixed_str(rng, REP_LEN)
        return f"rep {n} {s}=", s * n
    raise ValueError(task)


def solve(prompt):
    """Reference solver: the answer is a function of the prompt alone."""
    assert prompt.endswith("=")
    body = prompt[:-1]
    if body.startswith("add "):
        a, b = body[4:].split("+")
        return str(int(a) + int(b)).zfill(ADD_WIDTH)
    if body.startswith("sort "):
        return "".join(sorted(body[5:]))
    if body.startswith("rev "):
        return body[4:][::-1]
    if body.startswith("copy "):
        return body[5:]
    if body.startswith("rep "):
        n, s = body[4:].split(" ")
        return s * int(n)
    raise ValueError(prompt)


def sample(rng):
    task = rng.choice(TASKS)
    p, a = make_example(rng, task)
    assert 8 <= len(a) <= GEN_LENGTH, (p, a)
    assert solve(p) == a
    return task, p, a


def eval_set(n=200, seed=EVAL_SEED):
    """n examples, n/len(TASKS) per task, all prompts distinct."""
    rng = random.Random(seed)
    out, seen = [], set()
    per = n // len(TASKS)
    for task in TASKS:
        k = 0
        while k < per:
            p, a = make_example(rng, task)
            if p in seen:
                continue
            seen.add(p)
            out.append({"task": task, "prompt": p, "answer": a})
            k += 1
    return out


def load_jsonl(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="models/tiny-arith/eval.jsonl")
    ap.add_argument("--n", type=int, default=200)
    args = ap.parse_args()
    import os
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    rows = eval_set(args.n)
    with open(args.out, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"wrote {len(rows)} examples to {args.out}")
    for r in rows[:: max(1, len(rows) // 10)]:
        print(" ", r)


if __name__ == "__main__":
    main()
