#!/usr/bin/env python3
"""Writes the comparison report from a runs folder (compare.py's output):
<out>.md, <out>.json (every raw number) and <out>.png (ms per forward against
context length, both engines, with the floor).

Exit status: 0 when every case ran on both engines and their NFE agree;
1 when an NFE differs or an engine failed on a case; 3 when cases are
missing (an interrupted run) but nothing disagrees.

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


def check_case(case: dict, ref: dict | None, dl: dict | None) -> dict:
    """NFE agreement, accounting for the reference's idle forwards (DESIGN §3.7)."""
    out = {"status": "ok", "notes": []}
    if ref is None or dl is None:
        out["status"] = "missing"
        out["notes"].append("no reference result" if ref is None else "no dllm result")
        return out
    if dl.get("rc", 0) != 0:
        out["status"] = "error"
        out["notes"].append(f"dllm failed: {dl.get('error', '')[-300:]}")
        return out
    ref_effective = ref["nfe"] - ref.get("nfe_idle", 0)
    out["ref_nfe_effective"] = ref_effective
    if ref_effective != dl["nfe"]:
        out["status"] = "nfe-mismatch"
        out["notes"].append(
            f"NFE differs: reference {ref['nfe']} - {ref.get('nfe_idle', 0)} idle = {ref_effective}, dllm {dl['nfe']}"
        )
    if ref["nfe"] != ref.get("nfe_forwards", ref["nfe"]):
        out["notes"].append(f"reference returned nfe {ref['nfe']} but ran {ref['nfe_forwards']} forwards")
    if dl["nfe"] != case["expected_nfe"] or ref_effective != case["expected_nfe"]:
        out["notes"].append(f"schedule expected {case['expected_nfe']} forwards")
    # The floor is computed on the planned forwards; check the reference ran
    # exactly those (query tokens, attended keys, cached or not).
    if ref.get("forwards") is not None:
        ran = [(f["q"], f["kv"], f["cached"]) for f in ref["forwards"] if not f.get("idle")]
        out["forwards_as_planned"] = ran == plan.planned_forwards(case)
        if not out["forwards_as_planned"]:
            out["notes"].append("the reference's forwards (query/key lengths) differ from the planned ones used for the floor")
    a, b = ref["tokens"], dl["tokens"]
    out["token_agreement"] = sum(x == y for x, y in zip(a, b)) / max(1, len(a))
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
    r = {}
    if ref:
        t = ref["timings"]
        r["ref_total"], r["ref_prompt"] = t["total_s"], t["prompt_s"]
        r["ref_ms_fwd"] = 1e3 * t["total_s"] / max(1, ref["nfe"])
        r["ref_tps"] = t["tokens_per_s"]
    if dl and dl.get("rc", 0) == 0:
        t = dl["timings"]
        r["dllm_total"], r["dllm_prompt"] = t["total_s"], t["prompt_s"]
        r["dllm_ms_fwd"] = 1e3 * t["total_s"] / max(1, dl["nfe"])
        r["dllm_tps"] = t["tokens_per_s"]
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path, help="path without extension")
    args = ap.parse_args(argv)
    runs, out = args.runs, args.out

    cases = json.loads((runs / "cases.json").read_text())
    floors = load(runs / "floors.json")
    env = load(runs / "env.json") or {}
    ckpts = {}
    for c in cases:  # the first checkpoint path of each model that exists here
        path = Path(c["dllm_argv"][c["dllm_argv"].index("--model") + 1])
        if c["model"] not in ckpts and (path / "config.json").exists():
            ckpts[c["model"]] = path
    # Model costs (and titles) from the checkpoints; saved in the runs folder
    # for cases carried over from a machine whose checkpoints are not here.
    saved = load(runs / "models.json") or {}
    for m, p in ckpts.items():
        saved[m] = {"costs": plan.model_costs(p), "title": model_title(m, p)}
    (runs / "models.json").write_text(json.dumps(saved, indent=1) + "\n")
    missing_models = {c["model"] for c in cases} - set(saved)
    if missing_models:
        print(f"report: no checkpoint of {sorted(missing_models)} here: remake it (compare.py does)", file=sys.stderr)
        return 1
    costs = {m: v["costs"] for m, v in saved.items()}

    rows, shims, torch_v, tf_v = [], [], None, None
    for c in cases:
        ref = load(runs / "ref" / f"{c['id']}.json")
        dl = load(runs / "dllm" / f"{c['id']}.json")
        floor_s = plan.case_floor_s(c, costs[c["model"]], floors)
        check = check_case(c, ref, dl)
        rows.append({"case": c, "ref": ref, "dllm": dl, "check": check, "n": row_numbers(c, ref, dl, floor_s)})
        if ref:
            shims += [x for x in ref.get("shims", []) if x not in shims]
            torch_v, tf_v = ref.get("torch"), ref.get("transformers")

    planned = [r["check"].get("forwards_as_planned") for r in rows if "forwards_as_planned" in r["check"]]
    n_ok = sum(r["check"]["status"] == "ok" for r in rows)
    mism = [r for r in rows if r["check"]["status"] == "nfe-mismatch"]
    errs = [r for r in rows if r["check"]["status"] == "error"]
    missing = [r for r in rows if r["check"]["status"] == "missing"]
    if mism or errs:
        verdict, rc = f"FAIL: {len(mism)} NFE mismatch(es), {len(errs)} dllm failure(s), {n_ok}/{len(rows)} cases agree", 1
    elif missing:
        verdict, rc = f"INCOMPLETE: {len(missing)} of {len(rows)} cases have not run yet (run the same command again); the {n_ok} that ran agree on NFE", 3
    else:
        verdict, rc = f"PASS: NFE identical on both engines in all {len(rows)} cases", 0

    device = env.get("nvidia_smi") or env.get("gpu") or env.get("cpu") or env.get("device", "?")
    device_label = (env.get("gpu") or device.split(",")[0]) if env.get("device", "").startswith("cuda") else f"CPU: {env.get('cpu', '?')}"
    L = []
    L.append(f"# dllm against the PyTorch references, {env.get('date', '')[:10]}")
    L.append("")
    L.append(f"**{verdict}.**")
    L.append("")
    L.append((f"- Device (nvidia-smi: name, driver, memory, max SM clock, power limit): {device}"
              if env.get("nvidia_smi") else f"- Device: {device}") + (f" (CUDA runtime of torch: {env['cuda_runtime']})" if env.get("cuda_runtime") else ""))
    L.append(f"- Host CPU: {env.get('cpu', '?')} x {env.get('cpu_count', '?')}; Python {env.get('python', '?')}, "
             f"torch {torch_v or env.get('torch', '?')}, transformers {tf_v or env.get('transformers', '?')}")
    L.append(f"- dllm: commit {env.get('dllm_commit', '?')[:12]}{' (uncommitted changes in src/)' if env.get('dllm_dirty') else ''}; "
             f"Fast-dLLM {str(env.get('fast-dllm_commit'))[:12]}, Streaming-dLLM {str(env.get('streaming-dllm_commit'))[:12]}")
    L.append(f"- Whole run: `{env.get('command', '?')}` ({env.get('elapsed_s', 0) / 60:.1f} min this invocation)")
    dllm_devices = sorted({r["dllm"]["device"] for r in rows if r["dllm"] and r["dllm"].get("device")})
    if dllm_devices:
        L.append(f"- dllm reports its device as: {', '.join(map(str, dllm_devices))}")
    machines = sorted({f"{r[k].get('host')}" + (f" ({r[k]['gpu']})" if r[k].get("gpu") else "")
                       for r in rows for k in ("ref", "dllm") if r[k] and r[k].get("host")})
    if len(machines) > 1:
        L.append(f"- Cases ran on {len(machines)} machines (each case's two engines on the same one): {', '.join(machines)}")
    split = [r["case"]["id"] for r in rows if r["ref"] and r["dllm"] and r["ref"].get("host") and r["dllm"].get("host")
             and r["ref"]["host"] != r["dllm"]["host"]]
    if split:
        L.append(f"- **Warning**: the two engines of {', '.join(split)} ran on different machines")
    if planned:
        L.append(f"- The reference ran exactly the planned forwards (query and key lengths) in {sum(planned)} of {len(planned)} cases "
                 "(the floors are computed on the plan)")
    if env.get("golden_check"):
        L.append("- Reference harness check (golden vectors, CPU): " + "; ".join(env["golden_check"].values()))
    L.append("")
    L.append("## Method")
    L.append("")
    L.append("Both engines run the same checkpoint files (random bf16 weights in the real layouts, "
             "bench/compare/make_checkpoint.py, fixed seed), the same prompt (seeded random token ids) and the "
             "same schedule: gen length G in blocks of 32, a fixed number s of steps per block, threshold none, "
             "so each step commits exactly its quota k_i (DESIGN §2) and the work — how many forwards, over which "
             "tokens — is identical. Random weights make confidences meaningless, so the tokens themselves differ "
             "where near-ties fall differently in the two implementations' arithmetic; the output head rows of the mask id and EOS id are zero, "
             "so neither is ever committed: no early exit, no block left unfinished. Streaming-dLLM's dynamic "
             "threshold relaxes a threshold, so with threshold none it is inert (its window, tail and EOS check "
             "run). NFE: the reference's count minus its idle forwards on an already complete block (DESIGN "
             "§3.7; none with s >= 2) must equal dllm's, or this report fails.")
    L.append("")
    L.append("Times are of one request, model load excluded, prompt processing included (DESIGN §4): "
             "*total* = wall time of the generate call; *prompt* = until the first forward has finished; "
             "*ms/fwd* = total / NFE; *tok/s* = non-EOS generated tokens / total; *speedup* = reference total / "
             "dllm total. The reference is warmed up by one short call of the same function in the same process; "
             "dllm runs as one `dllm generate --json` process per case (its `prompt_s` includes any first-call "
             "work of the process). *floor* = the sum over the schedule's forwards of max(weights + KV bytes / "
             "copy bandwidth, flops / matmul rate) with the rates below; *at floor* = floor / measured total.")
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
    L.append("")
    L.append("![ms per forward against context length](" + out.name + ".png)")
    L.append("")

    # Summary: geometric-mean speedup per strategy and gen length.
    L.append("## Summary: speedup of dllm (reference total time / dllm total time)")
    L.append("")
    gens = sorted({r["case"]["gen_length"] for r in rows})
    L.append("| model | strategy | reference | " + " | ".join(f"gen {g}" for g in gens) + " |")
    L.append("|---|---|---|" + "---|" * len(gens))
    for strategy in plan.STRATEGIES:
        mine = [r for r in rows if r["case"]["strategy"] == strategy]
        if not mine:
            continue
        cells = []
        for g in gens:
            sp = [r["n"]["speedup"] for r in mine if r["case"]["gen_length"] == g and "speedup" in r["n"]]
            cells.append(f"{math.exp(sum(map(math.log, sp)) / len(sp)):.2f}x (geo-mean of {len(sp)})" if sp else "–")
        L.append(f"| {mine[0]['case']['model']} | {strategy} | {plan.REFERENCE_NAMES[strategy]} | " + " | ".join(cells) + " |")
    L.append("")

    for model in ("llada", "dream"):
        mrows = [r for r in rows if r["case"]["model"] == model]
        if not mrows:
            continue
        L.append(f"## {saved[model]['title']}")
        L.append("")
        for strategy in plan.STRATEGIES:
            srows = [r for r in mrows if r["case"]["strategy"] == strategy]
            if not srows:
                continue
            c0 = srows[0]["case"]
            L.append(f"### {strategy}: {plan.REFERENCE_NAMES[strategy]} vs `dllm generate {' '.join(plan.STRATEGIES[strategy][3])}`")
            L.append("")
            L.append("| prompt | gen | steps (tok/fwd) | NFE ref (idle) | NFE dllm | total s ref | total s dllm | "
                     "prompt s ref | prompt s dllm | ms/fwd ref | ms/fwd dllm | floor ms/fwd | tok/s ref | tok/s dllm | "
                     "speedup | dllm at floor | check |")
            L.append("|" + "---|" * 17)
            for r in sorted(srows, key=lambda r: (r["case"]["prompt_len"], r["case"]["gen_length"], -r["case"]["steps"])):
                c, n, ref, dl, chk = r["case"], r["n"], r["ref"], r["dllm"], r["check"]
                nfe_ref = f"{ref['nfe']} ({ref.get('nfe_idle', 0)})" if ref else "–"
                nfe_dl = str(dl["nfe"]) if dl and dl.get("rc", 0) == 0 else ("failed" if dl else "–")
                status = {"ok": "ok", "missing": "missing", "error": "dllm failed", "nfe-mismatch": "**NFE differs**"}[chk["status"]]
                L.append(
                    f"| {c['prompt_len']} | {c['gen_length']} | {c['steps']} ({c['tokens_per_forward']:.1f}) | {nfe_ref} | {nfe_dl} | "
                    f"{fmt(n.get('ref_total'))} | {fmt(n.get('dllm_total'))} | {fmt(n.get('ref_prompt'))} | {fmt(n.get('dllm_prompt'))} | "
                    f"{fmt(n.get('ref_ms_fwd'), '.2f')} | {fmt(n.get('dllm_ms_fwd'), '.2f')} | {fmt(n.get('floor_ms_fwd'), '.2f')} | "
                    f"{fmt(n.get('ref_tps'), '.1f')} | {fmt(n.get('dllm_tps'), '.1f')} | "
                    f"{fmt(n.get('speedup'), '.2f')}{'x' if 'speedup' in n else ''} | "
                    f"{fmt(100 * n['dllm_floor_frac'] if 'dllm_floor_frac' in n else None, '.0f')}{'%' if 'dllm_floor_frac' in n else ''} | {status} |"
                )
            notes = [(r["case"]["id"], note) for r in srows for note in r["check"]["notes"]]
            if c0["strategy"] == "streaming":
                L.append("")
                L.append(f"Window {', '.join(sorted({str(r['case']['args']['window_size']) + ' (gen ' + str(r['case']['gen_length']) + ')' for r in srows}))}, tail 1; "
                         f"confidence_alpha passed to the reference is inert without a threshold; dllm runs `--early-exit`.")
            if notes:
                L.append("")
                for cid, note in notes:
                    L.append(f"- {cid}: {note}")
            agree = [r["check"]["token_agreement"] for r in srows if "token_agreement" in r["check"]]
            if agree:
                L.append("")
                L.append(f"Generated tokens equal on both engines: {100 * sum(agree) / len(agree):.0f}% on average "
                         f"(random weights: near-ties fall differently in the two implementations' arithmetic; the work does not depend on it).")
            L.append("")

    L.append("## Commands")
    L.append("")
    L.append(f"- Whole comparison: `{env.get('command', 'bash bench/compare/run.sh')}`")
    for c in first_case_per(rows, "impl"):
        L.append(f"- Reference ({c['impl']}): `{c.get('ref_command', '')}` (cases from cases.json)")
    for c in first_case_per(rows, "strategy"):
        L.append(f"- dllm, {c['strategy']} (e.g. {c['id']}): `{plan.short_argv(c['dllm_argv'])}`")
    L.append("")
    if shims:
        L.append("## Compatibility shims in force (bench/compare/refcompat.py, ref_driver.py)")
        L.append("")
        L.append("The reference files are unmodified; these run-time adaptations were needed under the installed "
                 "transformers, and the golden check above shows the references still reproduce their recorded "
                 "tokens and NFE with them:")
        L.append("")
        for s in shims:
            L.append(f"- {s}")
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
        "env": env,
        "floors": floors,
        "model_costs": costs,
        "cases": [
            {
                "case": {k: v for k, v in r["case"].items() if k not in ("prompt_ids", "dllm_argv")},
                "dllm_command": plan.short_argv(r["case"]["dllm_argv"]),
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
        plot(rows, Path(str(out) + ".png"), device_label)
    except Exception as e:  # noqa: BLE001 - a failed plot must not lose the report
        print(f"report: no plot ({type(e).__name__}: {e})", file=sys.stderr)
    print(f"report: {out}.md: {verdict}", file=sys.stderr)
    for r in mism + errs:
        for note in r["check"]["notes"]:
            print(f"  {r['case']['id']}: {note}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
