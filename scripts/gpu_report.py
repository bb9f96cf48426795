"""The report of a GPU run (scripts/gpu_run.py): <stem>.md, <stem>.json
(every step's outcome and numbers) and <stem>.png (each step's time against
its estimate; dllm's forwards against the DESIGN §4 floors; the comparison's
request times on both engines). Only numbers the run measured appear, beside
the estimates, which are labelled as such.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench" / "compare"))
import plan  # noqa: E402

MODE_TEXT = {"gpu": "an H200", "dry": "a dry run on 2 CPU cores"}


def compare_row(c: dict) -> dict:
    """One case of a comparison report (bench/compare/report.py's JSON)."""
    n, chk = c["numbers"], c["check"]
    return {
        "id": c["case"]["id"],
        "nfe_ref": c["reference"]["nfe"] if c["reference"] else None,
        "nfe_dllm": c["dllm"].get("nfe") if c["dllm"] else None,
        "ref_total_s": n.get("ref_total"),
        "dllm_total_s": n.get("dllm_total"),
        "dllm_prepare_s": n.get("dllm_prepare"),
        "speedup": n.get("speedup"),
        "first_block_agreement": chk.get("first_block_agreement"),
        "status": chk["status"],
    }


def verdict_of(outcomes: dict) -> str:
    bad = [k for k, o in outcomes.items() if o.status in ("FAIL", "TIMEOUT")]
    skipped = [k for k, o in outcomes.items() if o.status == "SKIP"]
    passed = len(outcomes) - len(bad) - len(skipped)
    if bad:
        return f"FAIL: {', '.join(bad)}; {passed} passed, {len(skipped)} skipped"
    return f"PASS: {passed} steps passed, {len(skipped)} skipped (reasons below)"


def fmt(x, spec=".3f") -> str:
    return "–" if x is None else format(x, spec)


def summary_table(steps, outcomes: dict, mode: str) -> str:
    lines = [f"| step | status | time s | estimate s ({MODE_TEXT[mode]}) | what | note |", "|---|---|---:|---:|---|---|"]
    for s in steps:
        o = outcomes[s.key]
        lines.append(f"| {s.key} | {o.status} | {o.seconds:.1f} | {s.estimate[mode]} | {s.title} | {o.detail} |")
    return "\n".join(lines)


def bench_floors(rows: list[dict], floors: dict | None) -> list[dict]:
    """dllm bench's forwards beside the floors of the same forwards: a full
    forward over prompt + gen tokens, and a cached step of one block over them
    (the DualCache step; a prefix-cache step also recomputes what follows)."""
    out = []
    for r in rows:
        m = r["model"]
        costs = {"weight_bytes_per_forward": 2 * (m["parameters"] - m["embedding_parameters"]),
                 "matmul_params": m["parameters"] - m["embedding_parameters"],
                 "layers": m["layers"], "q_dim": m["q_dim"], "kv_dim": m["kv_dim"]}
        length = r["prompt_tokens"] + r["gen_length"]
        floor = (lambda q: 1e3 * plan.forward_floor_s(q, length, costs, floors)) if floors else (lambda q: None)
        out.append({
            "strategy": r["strategy"], "nfe": r["nfe"], "prompt_s": r["prompt_s"], "total_s": r["total_s"],
            "full_forward_ms": r["full_forward_ms"] if r["full_forwards"] else None,
            "full_floor_ms": floor(length),
            "cached_forward_ms": r["cached_forward_ms"] if r["cached_forwards"] else None,
            "cached_floor_ms": floor(32) if r["cached_forwards"] else None,
            "tokens_per_s": r["tokens_per_s"], "device": r["device"],
        })
    return out


def write(stem: Path, mode: str, steps, outcomes: dict, budget: float, elapsed: float) -> str:
    verdict = verdict_of(outcomes)
    device = outcomes["a-device"].data
    gpu_line = next((line for line in outcomes["a-device"].log.splitlines()
                     if line.count(",") >= 3 and not line.startswith("$")), None)
    floors = outcomes["d-floors"].data or None
    bench = bench_floors(outcomes["d-bench"].data.get("rows", []), floors)
    title = "GPU run" if mode == "gpu" else "Dry run of the GPU run"
    L = [f"# {title}, {stem.name.split('-run-')[-1].removeprefix('dry-')}", "", f"**{verdict}.**", ""]
    if mode == "dry":
        L += ["This is a dry run: the CUDA steps ran on the emulated device (the kernels compiled for the host, "
              "DLLM_CUDA=emulated) at tiny shapes, PyTorch on the CPU. It checks the script, the gates and the "
              "report; its times describe a CPU, not a GPU.", ""]
    L += [f"Whole run: {elapsed:.0f} s of its {budget:.0f} s budget; the estimates add up to "
          f"{sum(s.estimate[mode] for s in steps)} s. Each step's limit is twice its estimate.", "",
          "## Steps", "", summary_table(steps, outcomes, mode), ""]

    L += ["## a. Device and versions", ""]
    L.append(f"- dllm: `{device.get('dllm_version', '?')}`; prepared from commit {str(device.get('manifest_commit'))[:12]}"
             f"{' with uncommitted source changes' if device.get('sources_dirty') else ''} on {device.get('prepared', '?')}")
    changed = device.get("checkout_changed_since_prepare")
    if changed:
        L.append(f"- **The checkout changed since --prepare**: {', '.join(changed)}")
    L.append(f"- Driver: {device.get('driver', '?')}" + (f"; GPU (nvidia-smi: name, driver, memory, max SM clock, "
                                                          f"power limit): {gpu_line}" if mode == "gpu" and gpu_line else ""))
    L.append(f"- cuBLASLt: {device.get('cublaslt', '?')}")
    L.append(f"- Python {device.get('python', '?')}; {device.get('torch', '?')}")
    L.append(f"- Host CPU: {device.get('cpu', '?')} x {device.get('cpu_count', '?')}")
    L.append("")

    L += ["## b. Correctness gates", ""]
    L.append(f"- tests/cuda.rs: {outcomes['b-tests'].status}: {outcomes['b-tests'].data.get('summary') or outcomes['b-tests'].detail}")
    L.append(f"- tests/cuda_batch.rs: {outcomes['b-batch'].status}: "
             f"{outcomes['b-batch'].data.get('summary') or outcomes['b-batch'].detail}")
    L.append(f"- `dllm eval --device cuda --check` on models/tiny-arith: {outcomes['b-eval'].status}"
             f"{': ' + outcomes['b-eval'].detail if outcomes['b-eval'].detail else ''}")
    if outcomes["b-eval"].data.get("table"):
        L += [""] + outcomes["b-eval"].data["table"]
    L.append("")

    L += ["## c. compute-sanitizer on the kernel tests", ""]
    for key in ("c-memcheck", "c-racecheck"):
        o = outcomes[key]
        L.append(f"- {key[2:]}: {o.status}: {o.data.get('summary') or ''} {o.detail}".rstrip())
    L.append("")

    L += ["## d. Forwards against the DESIGN §4 floors", ""]
    if floors:
        L.append(f"Floors measured in this run (PyTorch on {floors['device']}): copy {floors['copy_bytes_per_s'] / 1e12:.3f} "
                 f"TB/s (read + write), {floors['matmul_dtype']} matmul {floors['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s.")
    else:
        L.append(f"Floors not measured: {outcomes['d-floors'].detail or outcomes['d-floors'].status}.")
    L.append("")
    if bench:
        L.append(f"`dllm bench` on {outcomes['d-bench'].data['model']}, {bench[0]['device']}: "
                 f"`{outcomes['d-bench'].command}`")
        L.append("")
        L.append("| strategy | NFE | prompt s | total s | full forward ms | its floor ms | cached step ms | "
                 "floor of a one-block step ms | tok/s |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for b in bench:
            L.append(f"| {b['strategy']} | {b['nfe']} | {b['prompt_s']:.3f} | {b['total_s']:.3f} | "
                     f"{fmt(b['full_forward_ms'], '.2f')} | {fmt(b['full_floor_ms'], '.2f')} | "
                     f"{fmt(b['cached_forward_ms'], '.2f')} | {fmt(b['cached_floor_ms'], '.2f')} | {b['tokens_per_s']:.1f} |")
    else:
        L.append(f"`dllm bench`: {outcomes['d-bench'].status} {outcomes['d-bench'].detail}")
    batched = outcomes["d-batch"].data.get("rows")
    if batched:
        L += ["", f"Concurrent requests decoded together (`{outcomes['d-batch'].command}`):", "",
              "| strategy | batch | aggregate tok/s | mean latency s | batched forwards | mean forward ms | "
              "sequences a forward |", "|---|---:|---:|---:|---:|---:|---:|"]
        L += [f"| {r['strategy']} | {r['batch']} | {r['aggregate_tokens_per_s']:.1f} | {r['mean_latency_s']:.3f} | "
              f"{r['batched_forwards']} | {fmt(r['mean_forward_ms'], '.2f')} | {r['mean_batch']:.2f} |" for r in batched]
    else:
        L.append(f"`dllm bench --batch`: {outcomes['d-batch'].status} {outcomes['d-batch'].detail}")
    kernels = outcomes["d-kernels"].data.get("lines")
    if kernels:
        L += ["", "Kernel benchmarks (criterion; `" + outcomes["d-kernels"].command + "`):", "", "```", *kernels, "```"]
    L.append("")

    L += ["## e. Comparison with the PyTorch references", ""]
    for key in ("e-llada", "e-dream"):
        o = outcomes[key]
        if not o.data:
            L.append(f"- {key[2:]}: {o.status}{': ' + o.detail if o.detail else ''}")
            continue
        L.append(f"- {key[2:]}: {o.data['verdict']} (the full report: [{o.data['report']}]({o.data['report']}))")
        L.append("")
        L.append("| case | NFE ref | NFE dllm | total s ref | total s dllm | of it prepare s | speedup | "
                 "first block agrees | check |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|---|")
        for c in o.data["cases"]:
            agree = c["first_block_agreement"]
            L.append(f"| {c['id']} | {c['nfe_ref']} | {c['nfe_dllm']} | {fmt(c['ref_total_s'])} | "
                     f"{fmt(c['dllm_total_s'])} | {fmt(c['dllm_prepare_s'])} | "
                     f"{fmt(c['speedup'], '.2f')}{'x' if c['speedup'] else ''} | "
                     f"{fmt(100 * agree if agree is not None else None, '.0f')}{'%' if agree is not None else ''} | "
                     f"{c['status']} |")
        L.append("")
    L += ["", f"![step times and forwards]({stem.name}.png)", "", "## Logs (each step's last lines; all of them in "
          f"{stem.name}-logs.tar.gz)", ""]
    for s in steps:
        o = outcomes[s.key]
        if o.log:
            L += [f"### {s.key}", "", "```", *o.log.splitlines()[-30:], "```", ""]
    stem.with_suffix(".md").write_text("\n".join(L) + "\n")

    raw = {"verdict": verdict, "mode": mode, "budget_s": budget, "elapsed_s": elapsed,
           "steps": [{"key": s.key, "title": s.title, "estimate_s": s.estimate[mode], "gate": s.gate,
                      "status": outcomes[s.key].status, "seconds": outcomes[s.key].seconds,
                      "detail": outcomes[s.key].detail, "command": outcomes[s.key].command,
                      "data": outcomes[s.key].data} for s in steps],
           "bench_against_floors": bench}
    stem.with_suffix(".json").write_text(json.dumps(raw, indent=1) + "\n")
    try:
        plot(stem.with_suffix(".png"), mode, steps, outcomes, bench)
    except ImportError as e:
        print(f"report: no PNG ({e}: matplotlib is not installed)", file=sys.stderr)
    return verdict


def plot(path: Path, mode: str, steps, outcomes: dict, bench: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for key in ("e-llada", "e-dream") for c in outcomes[key].data.get("cases", [])
             if c["ref_total_s"] and c["dllm_total_s"]]
    panels = 1 + bool(bench) + bool(cases)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
    axes = list(axes.flat)

    ax = axes.pop(0)
    keys = [s.key for s in steps][::-1]
    ax.barh(keys, [next(s.estimate[mode] for s in steps if s.key == k) for k in keys], color="lightgray",
            label="estimate")
    ax.barh(keys, [outcomes[k].seconds for k in keys], height=0.45,
            color=["tab:green" if outcomes[k].status == "PASS" else "tab:gray" if outcomes[k].status == "SKIP"
                   else "tab:red" for k in keys], label="measured (green pass, grey skip, red fail)")
    ax.set_xlabel("seconds")
    ax.set_title(f"steps: time against the estimate for {MODE_TEXT[mode]}", fontsize=9)
    ax.legend(fontsize=7)

    if bench:
        ax = axes.pop(0)
        labels, measured, floor = [], [], []
        for b in bench:
            for kind in ("full", "cached"):
                if b[f"{kind}_forward_ms"] is not None:
                    labels.append(f"{b['strategy']}\n{kind}")
                    measured.append(b[f"{kind}_forward_ms"])
                    floor.append(b[f"{kind}_floor_ms"] or 0)
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], measured, width=0.4, label="dllm, measured")
        if any(floor):
            ax.bar([x + 0.2 for x in xs], floor, width=0.4, label="floor (DESIGN §4)", color="lightgray")
        ax.set_xticks(list(xs), labels, fontsize=7, rotation=45, ha="right")
        ax.set_yscale("log")
        ax.set_ylabel("ms per forward")
        ax.set_title(f"dllm bench: forwards{' against their floors' if any(floor) else ' (floors not measured)'}",
                     fontsize=9)
        ax.legend(fontsize=7)

    if cases:
        ax = axes.pop(0)
        xs = range(len(cases))
        ax.bar([x - 0.2 for x in xs], [c["ref_total_s"] for c in cases], width=0.4, label="reference")
        ax.bar([x + 0.2 for x in xs], [c["dllm_total_s"] for c in cases], width=0.4, label="dllm")
        ax.set_xticks(list(xs), [c["id"] for c in cases], rotation=60, ha="right", fontsize=6)
        ax.set_ylabel("seconds per request")
        ax.set_title("comparison: whole requests", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"{'dry run (emulated device, tiny shapes): not GPU numbers' if mode == 'dry' else 'GPU run'}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
