#!/usr/bin/env python3
"""Writes the comparison report from a runs folder (compare.py's output):
<out>.md, <out>.json (every raw number) and <out>.png (ms per forward against
context length, both engines, with the floor).

A case passes when both engines ran the planned forwards and their tokens
agree (check_case says how and why). Exit status: 0 when every case passed;
1 when one failed (an engine error, other forwards, tokens that disagree);
3 when cases are missing (a run stopped early) but none failed.

    report.py --runs bench/compare/work/runs/cuda --out bench/results/compare-2025-06-01
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import plan  # noqa: E402

def model_title(model: str, ckpt: Path) -> str:
    c = json.loads((ckpt / "config.json").read_text())
    if model == "llada":
        real = c["d_model"] == 4096 and c["n_layers"] == 32
        return (f"{'LLaDA-8B' if real else 'LLaDA (tiny)'} layout: random bf16 weights, d_model {c['d_model']}, "
                f"{c['n_layers']} layers, {c['n_heads']}/{c['n_kv_heads']} heads, vocab {c['vocab_size']}")
    real = c["hidden_size"] == 3584 and c["num_hidden_layers"] == 28
    return (f"{'Dream-7B' if real else 'Dream (tiny)'} layout: random bf16 weights, hidden {c['hidden_size']}, "
            f"{c['num_hidden_layers']} layers, GQA {c['num_attention_heads']}/{c['num_key_value_heads']}, "
            f"vocab {c['vocab_size']}")



def load(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


# Agreement rules. Random weights make confidences meaningless, so a fixed
# schedule makes the work identical but not the commit order: where two
# masked positions' confidences are within rounding, the engines may commit
# them in different orders, and from there on each step sees different inputs.
# The ids are comparable where the schedule makes the inputs identical:
#  - the probe decodes one block in one step without a cache, so each of its
#    ids is the argmax of the same full forward over the same inputs on both
#    engines; only a near-tie of the top two logits (within bf16 rounding)
#    can flip one. At least PROBE_AGREEMENT of them must agree.
#  - a timed case must agree on at least FIRST_BLOCK_AGREEMENT of its first
#    block: its first step is comparable, later steps only until the first
#    near-tie in the commit order (correct backends measured 47-100% on the
#    tiny models, bench/compare/README.md).
# A backend with a wrong index computes another function: its argmax ids
# agree with the reference's only by chance (a wrong GQA head mapping, tried
# under the emulated device, dropped Dream's probe to 0-3 of 32 and every
# Dream case's first block to 0 of 32).
PROBE_AGREEMENT = 0.9
FIRST_BLOCK_AGREEMENT = 0.25

STATUS_TEXT = {
    "ok": "ok",
    "missing": "missing",
    "error": "**engine failed**",
    "nfe-mismatch": "**NFE differs**",
    "forwards-differ": "**other forwards**",
    "tokens-differ": "**tokens differ**",
}


def agreement(a: list[int], b: list[int]) -> float:
    return sum(x == y for x, y in zip(a, b)) / max(1, len(a))


def check_case(case: dict, ref: dict | None, dl: dict | None) -> dict:
    """Whether both engines ran the planned forwards, with NFE equal to the
    plan's (the reference's minus its idle forwards, DESIGN §3.7), and agree
    on the comparable ids (the rules above). The first failed condition
    names the status."""
    out = {"status": "ok", "notes": []}
    if ref is None or dl is None:
        out["status"] = "missing"
        out["notes"].append("no reference result" if ref is None else "no dllm result")
        return out
    if dl.get("error"):
        out["status"] = "error"
        out["notes"].append(f"dllm failed: {dl['error'][-300:]}")
        return out

    def fail(status, note):
        if out["status"] == "ok":
            out["status"] = status
        out["notes"].append(note)

    ref_effective = ref["nfe"] - ref.get("nfe_idle", 0)
    out["ref_nfe_effective"] = ref_effective
    if not ref_effective == dl["nfe"] == case["expected_nfe"]:
        fail("nfe-mismatch", f"NFE: reference {ref['nfe']} - {ref.get('nfe_idle', 0)} idle = {ref_effective}, "
                             f"dllm {dl['nfe']}, planned {case['expected_nfe']}")
    if ref["nfe"] != ref.get("nfe_forwards", ref["nfe"]):
        out["notes"].append(f"reference returned nfe {ref['nfe']} but ran {ref['nfe_forwards']} forwards")
    planned = plan.planned_forwards(case)
    if ref.get("forwards") is not None:
        ran = [(f["q"], f["kv"], f["cached"]) for f in ref["forwards"] if not f.get("idle")]
        out["forwards_as_planned"] = ran == planned
        if ran != planned:
            fail("forwards-differ", "the reference's forwards (query/key lengths) differ from the plan")
    full = sum(1 for _, _, cached in planned if not cached)
    t = dl["timings"]
    if (t["full_forwards"], t["cached_forwards"]) != (full, len(planned) - full):
        fail("forwards-differ", f"dllm ran {t['full_forwards']} full and {t['cached_forwards']} cached forwards, "
                                f"planned {full} and {len(planned) - full}")
    a, b = ref["tokens"], dl["tokens"]
    out["token_agreement"] = agreement(a, b)
    block = case["block_length"]
    out["first_block_agreement"] = agreement(a[:block], b[:block])
    need, what = ((PROBE_AGREEMENT, "probe ids") if plan.is_probe(case)
                  else (FIRST_BLOCK_AGREEMENT, "first block's ids"))
    if out["first_block_agreement"] < need:
        fail("tokens-differ", f"{what} agree at {100 * out['first_block_agreement']:.0f}% of positions, "
                              f"below {100 * need:.0f}%")
    return out


def human(x: float) -> str:
    for div, unit in ((1e12, " T"), (1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f} "


def fmt(x, spec=".3f", none="–"):
    if x is None:
        return none
    return format(x, spec)


def row_numbers(case, ref, dl, floor_s):
    """Times of a case on both engines. *total* is the whole request on each
    side: the reference's generate call, dllm's engine call including its
    device preparation (prepare_s, shown apart too). A probe checks ids, not
    speed: it runs first in each process, before any warm-up."""
    r = {}
    if plan.is_probe(case):
        return r
    if ref:
        t = ref["timings"]
        r["ref_total"], r["ref_prompt"] = t["total_s"], t["prompt_s"]
        r["ref_ms_fwd"] = 1e3 * t["total_s"] / max(1, ref["nfe"])
        r["ref_tps"] = ref["non_eos_tokens"] / max(t["total_s"], 1e-12)
    if dl and not dl.get("error"):
        t = dl["timings"]
        r["dllm_total"], r["dllm_prepare"], r["dllm_prompt"] = t["request_s"], t["prepare_s"], t["prompt_s"]
        r["dllm_ms_fwd"] = 1e3 * t["request_s"] / max(1, dl["nfe"])
        r["dllm_tps"] = dl["non_eos_tokens"] / max(t["request_s"], 1e-12)
    r["floor_total"] = floor_s
    r["floor_ms_fwd"] = 1e3 * floor_s / case["expected_nfe"]
    if "ref_total" in r and "dllm_total" in r:
        r["speedup"] = r["ref_total"] / r["dllm_total"]
    if "dllm_total" in r:
        r["dllm_floor_frac"] = floor_s / r["dllm_total"]
    if "ref_total" in r:
        r["ref_floor_frac"] = floor_s / r["ref_total"]
    return r


def plot(rows: list[dict], path: Path, device_label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strategies = [s for s in plan.STRATEGIES if any(r["case"]["strategy"] == s for r in rows)]
    if not strategies:
        return
    ncols = min(3, len(strategies))
    nrows = math.ceil(len(strategies) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 4.0 * nrows), squeeze=False)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    for ax, strategy in zip(axes.flat, strategies):
        mine = [r for r in rows if r["case"]["strategy"] == strategy]
        schedules = sorted({r["case"]["steps_per_block"] for r in mine}, reverse=True)
        for color, s in zip(colors, schedules):
            pts = sorted(((r["case"]["prompt_len"] + r["case"]["gen_length"], r["n"]) for r in mine
                          if r["case"]["steps_per_block"] == s), key=lambda t: t[0])
            tpf = mine[0]["case"]["block_length"] / s
            label = f"{tpf:.1f} tok/fwd"
            for key, style, who in (("dllm_ms_fwd", "-o", "dllm"), ("ref_ms_fwd", "--s", "reference")):
                xs = [x for x, n in pts if key in n]
                ys = [n[key] for x, n in pts if key in n]
                if xs:
                    ax.plot(xs, ys, style, color=color, label=f"{who}, {label}", markersize=4)
            xs = [x for x, _ in pts]
            ax.plot(xs, [n["floor_ms_fwd"] for _, n in pts], ":", color=color, alpha=0.6, linewidth=1,
                    label=f"floor, {label}")
        ax.set_title(f"{strategy} ({plan.REFERENCE_NAMES[strategy].split(' ')[0]})", fontsize=10)
        ax.set_xlabel("context length (prompt + gen tokens)")
        ax.set_ylabel("ms per forward (mean)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        if ax is axes.flat[0]:
            ax.legend(fontsize=6.5, ncol=1)
    for ax in list(axes.flat)[len(strategies):]:
        ax.axis("off")
    fig.suptitle(f"dllm (solid) vs PyTorch reference (dashed), floor dotted — {device_label}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def first_case_per(rows, key):
    """The first row's case for each distinct value of case[key], in order."""
    seen = {}
    for r in rows:
        seen.setdefault(r["case"][key], r["case"])
    return list(seen.values())


def harness_test(env: dict) -> str | None:
    """Why this run's times compare nothing (None when they do)."""
    reasons = []
    if env.get("tiny"):
        reasons.append("tiny shapes")
    if "cpu" in (env.get("device"), env.get("ref_device")):
        reasons.append("CPU")
    if env.get("dllm_driver") == "emulated":
        reasons.append("dllm on the emulated device (DLLM_CUDA=emulated)")
    return ", ".join(reasons) or None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path, help="path without extension")
    args = ap.parse_args(argv)
    runs, out = args.runs, args.out

    cases = json.loads((runs / "cases.json").read_text())
    floors = load(runs / "floors.json")
    env = load(runs / "env.json") or {}
    models = {}
    for c in cases:
        if c["model"] not in models:
            ckpt = Path(c["ckpt"])
            models[c["model"]] = {"costs": plan.model_costs(ckpt), "title": model_title(c["model"], ckpt)}
    costs = {m: v["costs"] for m, v in models.items()}

    rows, shims, torch_v, tf_v = [], [], None, None
    for c in cases:
        ref = load(runs / "ref" / f"{c['id']}.json")
        dl = load(runs / "dllm" / f"{c['id']}.json")
        floor_s = plan.case_floor_s(c, costs[c["model"]], floors) if floors else float("nan")
        check = check_case(c, ref, dl)
        rows.append({"case": c, "ref": ref, "dllm": dl, "check": check, "n": row_numbers(c, ref, dl, floor_s)})
        if ref:
            shims += [x for x in ref.get("shims", []) if x not in shims]
            torch_v, tf_v = ref.get("torch"), ref.get("transformers")
    probes = [r for r in rows if plan.is_probe(r["case"])]
    timed = [r for r in rows if not plan.is_probe(r["case"])]

    failed = [r for r in rows if r["check"]["status"] not in ("ok", "missing")]
    missing = [r for r in rows if r["check"]["status"] == "missing"]
    n_ok = len(rows) - len(failed) - len(missing)
    if failed:
        kinds = sorted({STATUS_TEXT[r["check"]["status"]].strip("*") for r in failed})
        verdict, rc = (f"FAIL: {len(failed)} of {len(rows)} cases failed ({', '.join(kinds)}); {n_ok} passed"
                       + (f", {len(missing)} did not run" if missing else ""), 1)
    elif missing:
        verdict, rc = f"INCOMPLETE: {len(missing)} of {len(rows)} cases did not run; the {n_ok} that ran passed", 3
    else:
        verdict, rc = f"PASS: all {len(rows)} cases ran the planned forwards on both engines and agree", 0
    harness = harness_test(env)

    device = env.get("nvidia_smi") or env.get("gpu") or env.get("cpu") or env.get("device", "?")
    device_label = (env.get("gpu") or device.split(",")[0]) if not harness else f"harness test ({harness})"
    ref_threads = sorted({r["ref"].get("cpu_threads") for r in rows if r["ref"]} - {None})
    dllm_threads = sorted({r["dllm"].get("cpu_threads") for r in rows if r["dllm"]} - {None})
    dllm_commits = sorted({r["dllm"].get("commit") for r in rows if r["dllm"]} - {None})
    L = [f"# dllm against the PyTorch references, {env.get('date', '')[:10]}", ""]
    if harness:
        L += [f"**Harness test, not a speed comparison** ({harness}): it shows that every path of the "
              "comparison runs and checks; its times describe nothing.", ""]
    L += [f"**{verdict}.**", ""]
    L.append((f"- Device (nvidia-smi: name, driver, memory, max SM clock, power limit): {device}"
              if env.get("nvidia_smi") else f"- Device: {device}")
             + (f" (CUDA runtime of torch: {env['cuda_runtime']})" if env.get("cuda_runtime") else ""))
    L.append(f"- Engines: reference on {env.get('ref_device', '?')}, dllm on {env.get('device', '?')}"
             + (" (emulated)" if env.get("dllm_driver") == "emulated" else ""))
    L.append(f"- Host CPU: {env.get('cpu', '?')} x {env.get('cpu_count', '?')}; CPU threads: reference (torch) "
             f"{', '.join(map(str, ref_threads)) or '?'}, dllm {', '.join(map(str, dllm_threads)) or '?'}")
    L.append(f"- Python {env.get('python', '?')}, torch {torch_v or env.get('torch', '?')}, "
             f"transformers {tf_v or env.get('transformers', '?')}")
    L.append(f"- dllm: commit {', '.join(dllm_commits) or env.get('dllm_commit', '?')} (built into the binary); "
             f"Fast-dLLM {str(env.get('fast-dllm_commit'))[:12]}, Streaming-dLLM {str(env.get('streaming-dllm_commit'))[:12]}")
    L.append(f"- Whole run: `{env.get('command', '?')}` ({env.get('elapsed_s', 0) / 60:.1f} min)")
    dllm_devices = sorted({r["dllm"]["device"] for r in rows if r["dllm"] and r["dllm"].get("device")})
    if dllm_devices:
        L.append(f"- dllm reports its device as: {', '.join(map(str, dllm_devices))}")
    planned = [r["check"]["forwards_as_planned"] for r in rows if "forwards_as_planned" in r["check"]]
    if planned:
        L.append(f"- The reference ran exactly the planned forwards (query and key lengths) in {sum(planned)} of "
                 f"{len(planned)} cases (the floors are computed on the plan)")
    if env.get("golden_check"):
        L.append("- Reference harness check (golden vectors, CPU): " + "; ".join(env["golden_check"].values()))
    if env.get("stopped"):
        L.append(f"- **Stopped early**: {env['stopped']}")
    L.append("")
    L.append("## Method")
    L.append("")
    L.append("Both engines run the same checkpoint files (random bf16 weights in the real layouts, "
             "bench/compare/make_checkpoint.py, fixed seed), the same prompt (seeded random token ids) and the "
             "same schedule: gen length G in blocks of 32, a fixed number s of steps per block, threshold none, "
             "so each step commits exactly its quota k_i (DESIGN §2) and the work — how many forwards, over which "
             "tokens — is identical. The output head rows of the mask id and EOS id are zero, so neither is ever "
             "committed: no early exit, no block left unfinished. Streaming-dLLM's dynamic threshold relaxes a "
             "threshold, so with threshold none it is inert (its window, tail and EOS check run).")
    L.append("")
    L.append(f"A case passes when (1) both engines ran the planned forwards: NFE equal to the plan's (the "
             f"reference's count minus its idle forwards on an already complete block, DESIGN §3.7), the "
             f"reference's query and key lengths those of the plan, dllm's full and cached forward counts those "
             f"of the plan; and (2) their ids agree where the schedule makes them comparable. Each model's "
             f"*probe* decodes one block in one step without a cache, so every id is the argmax of the same full "
             f"forward over the same inputs on both engines: at least {100 * PROBE_AGREEMENT:.0f}% must agree "
             f"(only a near-tie of the top two logits, within bf16 rounding, can flip one). In a timed case the "
             f"commit order follows confidences that random weights leave nearly tied across positions, so the "
             f"engines may part at the first near-tie; at least {100 * FIRST_BLOCK_AGREEMENT:.0f}% of its first "
             f"block must agree. A backend with a wrong index computes another function, and its ids agree with "
             f"the reference's only by chance. The run stops at the first case that fails.")
    L.append("")
    L.append("Times are of one request, model load excluded (DESIGN §4), after one untimed warm-up request of "
             "each strategy on each engine (the strategy's first case, run once before it): *total* = the whole "
             "request (the reference's generate call; dllm's engine call, including *prepare*, its device "
             "allocation and per-shape preparation before the first forward); *prompt* = until the first forward "
             "has finished; *ms/fwd* = total / NFE; *tok/s* = non-EOS generated tokens / total; *speedup* = "
             "reference total / dllm total. dllm runs every case of a model in one `dllm batch` process (one "
             "checkpoint load). *floor* = the sum over the schedule's forwards of max(weights + KV bytes / copy "
             "bandwidth, flops / matmul rate) with the rates below; *at floor* = floor / measured total.")
    L.append("")
    L.append("## Floors measured in this run (DESIGN §4)")
    L.append("")
    if floors:
        L.append(f"| memory copy bandwidth ({floors['copy_bytes'] >> 20} MiB device-to-device copy, read + write) | "
                 f"{floors['matmul_dtype']} matmul {'x'.join(map(str, floors['matmul_shape']))} |")
        L.append("|---|---|")
        L.append(f"| {floors['copy_bytes_per_s'] / 1e12:.3f} TB/s | {floors['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s |")
        L.append("")
        for m, c in costs.items():
            step = c["weight_bytes_per_forward"] / floors["copy_bytes_per_s"]
            L.append(f"- {m}: {human(c['params'])} parameters; a forward streams {human(c['weight_bytes_per_forward'])}B "
                     f"of weights (embedding only gathered): cached-step floor {1e3 * step:.2f} ms; a full forward over "
                     f"1024 tokens needs {human(2 * c['matmul_params'] * 1024)}FLOP: "
                     f"{1e3 * 2 * c['matmul_params'] * 1024 / floors['matmul_flops_per_s']:.1f} ms.")
    else:
        L.append("Not measured (no floors.json in the runs folder).")
    L.append("")
    L.append("![ms per forward against context length](" + out.name + ".png)")
    L.append("")

    L.append("## Summary: speedup of dllm (reference total time / dllm total time)")
    L.append("")
    gens = sorted({r["case"]["gen_length"] for r in timed})
    L.append("| model | strategy | reference | " + " | ".join(f"gen {g}" for g in gens) + " |")
    L.append("|---|---|---|" + "---|" * len(gens))
    for strategy in plan.STRATEGIES:
        mine = [r for r in timed if r["case"]["strategy"] == strategy]
        if not mine:
            continue
        cells = []
        for g in gens:
            sp = [r["n"]["speedup"] for r in mine if r["case"]["gen_length"] == g and "speedup" in r["n"]]
            cells.append(f"{math.exp(sum(map(math.log, sp)) / len(sp)):.2f}x (geo-mean of {len(sp)})" if sp else "–")
        L.append(f"| {mine[0]['case']['model']} | {strategy} | {plan.REFERENCE_NAMES[strategy]} | " + " | ".join(cells) + " |")
    L.append("")

    for model, info in models.items():
        L.append(f"## {info['title']}")
        L.append("")
        for r in (r for r in probes if r["case"]["model"] == model):
            c, chk = r["case"], r["check"]
            ids = f"{len(set(r['ref']['tokens']))} distinct ids on the reference" if r["ref"] else "no reference ids"
            agree = (f"{100 * chk['first_block_agreement']:.0f}% of {c['gen_length']} ids agree ({ids})"
                     if "first_block_agreement" in chk else "not compared")
            L.append(f"**Agreement probe** ({plan.REFERENCE_NAMES[c['strategy']]}; prompt {c['prompt_len']}, one "
                     f"block of {c['gen_length']} in one step): {agree}: {STATUS_TEXT[chk['status']]}.")
            L += [f"- {note}" for note in chk["notes"]]
            L.append("")
        for strategy in plan.STRATEGIES:
            srows = [r for r in timed if r["case"]["model"] == model and r["case"]["strategy"] == strategy]
            if not srows:
                continue
            L.append(f"### {strategy}: {plan.REFERENCE_NAMES[strategy]} vs `dllm generate {' '.join(plan.STRATEGIES[strategy][3])}`")
            L.append("")
            L.append("| prompt | gen | steps (tok/fwd) | NFE ref (idle) | NFE dllm | total s ref | total s dllm | "
                     "prepare s dllm | prompt s ref | prompt s dllm | ms/fwd ref | ms/fwd dllm | floor ms/fwd | "
                     "tok/s ref | tok/s dllm | speedup | dllm at floor | first block agrees | check |")
            L.append("|" + "---|" * 19)
            for r in sorted(srows, key=lambda r: (r["case"]["prompt_len"], r["case"]["gen_length"], -r["case"]["steps"])):
                c, n, ref, dl, chk = r["case"], r["n"], r["ref"], r["dllm"], r["check"]
                nfe_ref = f"{ref['nfe']} ({ref.get('nfe_idle', 0)})" if ref else "–"
                nfe_dl = ("failed" if dl.get("error") else str(dl["nfe"])) if dl else "–"
                agree = chk.get("first_block_agreement")
                L.append(
                    f"| {c['prompt_len']} | {c['gen_length']} | {c['steps']} ({c['tokens_per_forward']:.1f}) | {nfe_ref} | {nfe_dl} | "
                    f"{fmt(n.get('ref_total'))} | {fmt(n.get('dllm_total'))} | {fmt(n.get('dllm_prepare'))} | "
                    f"{fmt(n.get('ref_prompt'))} | {fmt(n.get('dllm_prompt'))} | "
                    f"{fmt(n.get('ref_ms_fwd'), '.2f')} | {fmt(n.get('dllm_ms_fwd'), '.2f')} | {fmt(n.get('floor_ms_fwd'), '.2f')} | "
                    f"{fmt(n.get('ref_tps'), '.1f')} | {fmt(n.get('dllm_tps'), '.1f')} | "
                    f"{fmt(n.get('speedup'), '.2f')}{'x' if 'speedup' in n else ''} | "
                    f"{fmt(100 * n['dllm_floor_frac'] if 'dllm_floor_frac' in n else None, '.0f')}{'%' if 'dllm_floor_frac' in n else ''} | "
                    f"{fmt(100 * agree if agree is not None else None, '.0f')}{'%' if agree is not None else ''} | "
                    f"{STATUS_TEXT[chk['status']]} |"
                )
            if strategy == "streaming":
                L.append("")
                L.append(f"Window {', '.join(sorted({str(r['case']['args']['window_size']) + ' (gen ' + str(r['case']['gen_length']) + ')' for r in srows}))}, tail 1; "
                         f"confidence_alpha passed to the reference is inert without a threshold; dllm runs `--early-exit`.")
            notes = [(r["case"]["id"], note) for r in srows for note in r["check"]["notes"]]
            if notes:
                L.append("")
                L += [f"- {cid}: {note}" for cid, note in notes]
            whole = [r["check"]["token_agreement"] for r in srows if "token_agreement" in r["check"]]
            if whole:
                L.append("")
                L.append(f"All generated ids equal on both engines: {100 * sum(whole) / len(whole):.0f}% on average "
                         f"(past the first near-tie in the commit order the two runs see different inputs).")
            L.append("")

    dllm_bin, device = env.get("dllm", "dllm"), env.get("device", "cuda")
    L.append("## Commands")
    L.append("")
    L.append(f"- Whole comparison: `{env.get('command', 'bash bench/compare/run.sh')}`")
    for c in first_case_per(rows, "impl"):
        L.append(f"- Reference ({c['impl']}): `{c.get('ref_command', '')}` (its entries of order.json)")
    for model in models:
        L.append(f"- dllm, {model}: `{dllm_bin} batch --model {next(c['ckpt'] for c in cases if c['model'] == model)} "
                 f"--device {device} --requests dllm-{model}.jsonl` (one line per request of order.json)")
    for c in first_case_per(rows, "strategy"):
        L.append(f"- the same request alone, {c['strategy']} (e.g. {c['id']}): `{plan.dllm_command(c, dllm_bin, device)}`")
    L.append("")
    if shims:
        L.append("## Compatibility shims in force (bench/compare/refcompat.py, ref_driver.py)")
        L.append("")
        L.append("The reference files are unmodified; these run-time adaptations were needed under the installed "
                 "transformers, and the golden check above shows the references still reproduce their recorded "
                 "tokens and NFE with them:")
        L.append("")
        L += [f"- {s}" for s in shims]
        L.append("")
    L.append(f"Raw numbers: [{out.name}.json]({out.name}.json) (every case: both engines' full outputs, "
             f"the reference's per-forward times, floors, environment).")
    L.append("")

    out.parent.mkdir(parents=True, exist_ok=True)
    Path(str(out) + ".md").write_text("\n".join(L))

    def compact(ref):
        if not ref or not ref.get("forwards"):
            return ref
        cols = ["q", "kv", "cached", "idle", "ms"]
        rows_ = [[f["q"], f["kv"], f["cached"], f["idle"], round(f["ms"], 4)] for f in ref["forwards"]]
        return dict(ref, forwards={"columns": cols, "rows": rows_})

    raw = {
        "verdict": verdict,
        "harness_test": harness,
        "env": env,
        "floors": floors,
        "model_costs": costs,
        "cases": [
            {
                "case": {k: v for k, v in r["case"].items() if k not in ("prompt_ids", "dllm_args")},
                "dllm_command": plan.dllm_command(r["case"], dllm_bin, device),
                "check": r["check"],
                "numbers": r["n"],
                "reference": compact(r["ref"]),
                "dllm": r["dllm"],
            }
            for r in rows
        ],
    }
    Path(str(out) + ".json").write_text(json.dumps(raw) + "\n")
    try:
        plot(timed, Path(str(out) + ".png"), device_label)
    except Exception as e:  # noqa: BLE001 - a failed plot must not lose the report
        print(f"report: no plot ({type(e).__name__}: {e})", file=sys.stderr)
    print(f"report: {out}.md: {verdict}", file=sys.stderr)
    for r in failed:
        for note in r["check"]["notes"]:
            print(f"  {r['case']['id']}: {note}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
