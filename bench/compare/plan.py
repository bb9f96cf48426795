"""The comparison matrix: which cases run, with which arguments on each side,
in which order, how many forwards each must take, and the DESIGN §4 floor of
that work.

Random weights make confidences meaningless, so the work is made identical by
the schedule alone: a fixed number of steps per block (threshold none), each
step committing the reference's quota k_i (DESIGN §2). With s >= 2 steps per
block every block ends on its s-th forward on both engines (no idle
reference forward, DESIGN §3.7), so both NFE equal `steps` exactly.

Besides the timed cases, each model has an agreement probe: the prompt and
one masked block, decoded in a single step without a cache, so that every
generated id is the argmax of one full forward over identical inputs on both
engines (report.py says what is checked).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

# strategy -> (family, reference impl, reference function, dllm flags)
STRATEGIES = {
    "baseline": ("llada", "fast-llada", "generate", ["--cache", "none"]),
    "prefix": ("llada", "fast-llada", "generate_with_prefix_cache", ["--cache", "prefix"]),
    "dual": ("llada", "fast-llada", "generate_with_dual_cache", ["--cache", "dual"]),
    "streaming": ("llada", "stream-llada", "generate_with_prefix_cache", ["--cache", "prefix", "--early-exit"]),
    "dream-prefix": ("dream", "fast-dream", "diffusion_generate", ["--cache", "prefix", "--alg", "entropy"]),
    "dream-dual": ("dream", "fast-dream", "diffusion_generate", ["--cache", "dual", "--alg", "entropy"]),
}
# family -> (reference impl, reference function, dllm flags) of the agreement probe
PROBES = {
    "llada": ("fast-llada", "generate", ["--cache", "none"]),
    "dream": ("fast-dream", "diffusion_generate_unblocked", ["--cache", "none", "--alg", "entropy"]),
}
REFERENCE_NAMES = {
    "baseline": "Fast-dLLM llada/generate.py generate",
    "prefix": "Fast-dLLM llada/generate.py generate_with_prefix_cache",
    "dual": "Fast-dLLM llada/generate.py generate_with_dual_cache",
    "streaming": "Streaming-dLLM LLaDA-1.5/generate.py generate_with_prefix_cache",
    "dream-prefix": "Fast-dLLM dream generation_utils_block diffusion_generate (dual_cache=False)",
    "dream-dual": "Fast-dLLM dream generation_utils_block diffusion_generate (dual_cache=True)",
    "llada-probe": "Fast-dLLM llada/generate.py generate, one step",
    "dream-probe": "Fast-dLLM dream generation_utils diffusion_generate, one step",
}
# Streaming-dLLM's GSM8K settings (LLaDA-1.5/eval_llada.sh): window per gen
# length, and confidence_alpha (inert here: it relaxes a threshold, and the
# fixed schedule has none).
WINDOW = {256: 96, 512: 128}
ALPHA = {256: 0.4, 512: 0.6}


def window_for(gen_length: int) -> int:
    return WINDOW.get(gen_length, max(1, round(gen_length * 3 / 8)))


def steps_per_block(block_length: int, tokens_per_forward: float) -> int:
    """Steps per block that commit about `tokens_per_forward` tokens a forward
    (at least 2: the Dream reference leaves a 1-step block unfinished and the
    LLaDA cached references index past their schedule)."""
    return max(2, min(block_length, round(block_length / tokens_per_forward)))


def prompt_ids(length: int, config: dict, seed: int) -> list[int]:
    """Seeded random ids below every special id (mask, eos, bos, pad)."""
    import numpy as np

    special = [config.get(k) for k in ("mask_token_id", "eos_token_id", "bos_token_id", "pad_token_id")]
    high = min(v for v in special if isinstance(v, int))
    rng = np.random.default_rng([seed, length])
    return rng.integers(0, high, size=length).tolist()


def _case(case_id, family, strategy, impl, function, ckpt, config, ids, g, block_length, steps, dflags, **extra):
    """One case: the reference's arguments and dllm's request flags for the
    same prompt and schedule."""
    args = {
        "gen_length": g,
        "block_length": block_length,
        "steps": steps,
        "threshold": None,
        "mask_id": config["mask_token_id"],
        "eos_id": config["eos_token_id"],
        **extra,
    }
    return {
        "id": case_id,
        "model": family,
        "strategy": strategy,
        "reference": REFERENCE_NAMES[strategy],
        "impl": impl,
        "function": function,
        "ckpt": str(ckpt),
        "prompt_len": len(ids),
        "gen_length": g,
        "block_length": block_length,
        "steps": steps,
        "steps_per_block": steps * block_length // g,
        "tokens_per_forward": g / steps,
        "expected_nfe": steps,
        "args": args,
        "prompt_ids": ids,
        "dllm_args": [
            "--prompt-ids", ",".join(map(str, ids)),
            "--gen-length", str(g), "--block-length", str(block_length), "--steps", str(steps),
            "--threshold", "none", *dflags,
        ],
    }


def build_cases(
    models: list[str],
    strategies: list[str],
    ckpts: dict[str, Path],
    prompt_lengths: list[int],
    gen_lengths: list[int],
    block_length: int,
    tokens_per_forward: list[float],
    seed: int,
) -> list[dict]:
    """Every model's agreement probe (at the first prompt length), then the
    timed cases: strategy x prompt x gen length x schedule."""
    cases = []
    for family in models:
        config = json.loads((ckpts[family] / "config.json").read_text())
        impl, function, flags = PROBES[family]
        p = prompt_lengths[0]
        probe_args = {"alg": "entropy"} if family == "dream" else {}
        cases.append(_case(f"{family}-probe-p{p}", family, f"{family}-probe", impl, function, ckpts[family],
                           config, prompt_ids(p, config, seed), block_length, block_length, 1, flags,
                           **probe_args))
    for strategy in strategies:
        family, impl, function, flags = STRATEGIES[strategy]
        if family not in models:
            continue
        config = json.loads((ckpts[family] / "config.json").read_text())
        for p in prompt_lengths:
            ids = prompt_ids(p, config, seed)
            for g in gen_lengths:
                if g % block_length:
                    raise SystemExit(f"error: gen length {g} is not a multiple of block {block_length}")
                seen = set()
                for t in tokens_per_forward:
                    s = steps_per_block(block_length, t)
                    if s in seen:
                        continue
                    seen.add(s)
                    extra, dflags = {}, list(flags)
                    if strategy == "streaming":
                        extra = {"window_size": window_for(g), "confidence_alpha": ALPHA.get(g, 0.3), "factor": None}
                        dflags += ["--suffix-window", str(window_for(g))]
                    if family == "dream":
                        extra = {"alg": "entropy", "dual_cache": strategy == "dream-dual"}
                    case_id = f"{family}-{strategy.removeprefix('dream-')}-p{p}-g{g}-s{s}"
                    cases.append(_case(case_id, family, strategy, impl, function, ckpts[family], config, ids, g,
                                       block_length, s * (g // block_length), dflags, **extra))
    return cases


def is_probe(case: dict) -> bool:
    return case["strategy"].endswith("-probe")


def run_order(cases: list[dict]) -> list[dict]:
    """What every engine process runs, in order: its model's probe, then per
    strategy one untimed warm-up (a copy of the strategy's first case) before
    that strategy's cases. A process takes the entries of its own
    implementation (references) or model (dllm), so both engines run the same
    warm-ups, in the same order, before the same cases."""
    order, warmed = [], set()
    for c in cases:
        if not is_probe(c) and c["strategy"] not in warmed:
            warmed.add(c["strategy"])
            order.append(dict(c, id=f"{c['id']}.warmup", warmup=True))
        order.append(c)
    return order


def dllm_requests(entries: list[dict]) -> str:
    """The requests file of `dllm batch` for these entries."""
    lines = [json.dumps({"id": e["id"], "args": e["dllm_args"], **({"warmup": True} if e.get("warmup") else {})})
             for e in entries]
    return "\n".join(lines) + "\n"


def dllm_command(case: dict, dllm: str, device: str) -> str:
    """The single `dllm generate` equivalent of a case, prompt ids elided."""
    return short_argv([dllm, "generate", "--model", case["ckpt"], "--device", device, "--json", *case["dllm_args"]])


def short_argv(argv: list[str]) -> str:
    """A command with the prompt ids elided, for the report."""
    out = []
    for i, a in enumerate(argv):
        if i > 0 and argv[i - 1] == "--prompt-ids":
            out.append(f"<{a.count(',') + 1} ids>")
        else:
            out.append(a)
    return " ".join(out)


# ---- DESIGN §4 cost model -------------------------------------------------

def model_costs(ckpt: Path) -> dict:
    """Bytes and parameter counts read from the checkpoint headers."""
    config = json.loads((ckpt / "config.json").read_text())
    index = ckpt / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    total = embed = 0
    for f in files:
        with open(ckpt / f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for name, t in header.items():
            if name == "__metadata__":
                continue
            numel = math.prod(t["shape"])
            total += numel
            if name.endswith("wte.weight") or name.endswith("embed_tokens.weight"):
                embed += numel
    if config.get("model_type") == "llada":
        layers, heads, kv = config["n_layers"], config["n_heads"], config.get("n_kv_heads") or config["n_heads"]
        hd = config["d_model"] // heads
    else:
        layers, heads, kv = config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]
        hd = config["hidden_size"] // heads
    return {
        "params": total,
        "embedding_params": embed,
        # A forward streams every weight but the embedding (only gathered).
        "weight_bytes_per_forward": 2 * (total - embed),
        "matmul_params": total - embed,
        "layers": layers,
        "q_dim": heads * hd,
        "kv_dim": kv * hd,
    }


def planned_forwards(case: dict) -> list[tuple[int, int, bool]]:
    """(query tokens, attended keys, cached) of every forward the schedule
    runs, as both engines run it."""
    p, g, bk, s = case["prompt_len"], case["gen_length"], case["block_length"], case["steps_per_block"]
    total = p + g
    out = []
    for b in range(g // bk):
        bs, be = p + b * bk, p + (b + 1) * bk
        if case["strategy"] == "baseline" or is_probe(case):
            out += [(total, total, False)] * s
            continue
        if case["strategy"] == "streaming":
            w = case["args"]["window_size"]
            after = total - be
            kept = be + (after if after <= w else w + 1)
        else:
            kept = total
        out.append((kept, kept, False))
        cached_q = bk if case["strategy"].endswith("dual") else kept - bs
        out += [(cached_q, kept, True)] * (s - 1)
    return out


def forward_floor_s(q: int, kv: int, costs: dict, floors: dict) -> float:
    """max(memory time, compute time) of one forward (DESIGN §4): the weights
    and the attended keys/values are read once; 2 flops per parameter per
    query token, plus attention (QK^T and PV)."""
    mem = costs["weight_bytes_per_forward"] + kv * costs["layers"] * 2 * costs["kv_dim"] * 2
    flops = 2 * costs["matmul_params"] * q + 4 * costs["layers"] * q * kv * costs["q_dim"]
    return max(mem / floors["copy_bytes_per_s"], flops / floors["matmul_flops_per_s"])


def case_floor_s(case: dict, costs: dict, floors: dict) -> float:
    return sum(forward_floor_s(q, kv, costs, floors) for q, kv, _ in planned_forwards(case))
