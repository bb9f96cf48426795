#!/usr/bin/env python3
"""dllm against the PyTorch references (Fast-dLLM, Streaming-dLLM) on one
device: same random checkpoints, same prompts, same fixed schedules.

Steps (each skipped when its output is already there, so an interrupted run
continues where it stopped when started again):
  1. random bf16 checkpoints in the real LLaDA-8B / Dream-7B layouts (make_checkpoint.py)
  2. the references reproduce the golden vectors through this harness's
     loader and shims (ref_driver.py golden, CPU, tiny models)
  3. the DESIGN §4 floors, measured now (floors.py)
  4. every case on the references (ref_driver.py run, one process per implementation)
  5. every case on dllm (`dllm generate --json`, one process per case)
  6. the report (report.py): fails when the two sides' NFE differ

Usually started by run.sh; see README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
import plan  # noqa: E402

GOLDEN = {"fast-llada": "llada_tiny_s1", "stream-llada": "llada_tiny_s1", "fast-dream": "dream_tiny_s1"}


def log(msg: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def csv(s: str, conv=str) -> list:
    return [conv(x) for x in s.split(",") if x.strip()]


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    log("$ " + plan.short_argv([str(c) for c in cmd]))
    return subprocess.run([str(c) for c in cmd], **kw)


def environment(args) -> dict:
    env = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(),
        "device": args.device,
        "python": platform.python_version(),
        "command": os.environ.get("DLLM_COMPARE_COMMAND") or " ".join(sys.argv),
    }
    try:
        import torch
        import transformers

        env["torch"], env["transformers"] = torch.__version__, transformers.__version__
        if args.device.startswith("cuda") and torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
            env["cuda_runtime"] = torch.version.cuda
    except Exception as e:  # noqa: BLE001
        env["torch_error"] = str(e)
    if shutil.which("nvidia-smi"):
        q = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
             "--format=csv,noheader"],
            capture_output=True, text=True,
        )
        env["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                env["cpu"] = line.split(":", 1)[1].strip()
                break
        env["cpu_count"] = os.cpu_count()
    except OSError:
        pass
    git = lambda *a: subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True).stdout.strip()
    env["dllm_commit"] = git("rev-parse", "HEAD")
    env["dllm_dirty"] = bool(git("status", "--porcelain", "--untracked-files=no", "--", "src", "Cargo.toml"))
    for name in ("fast-dllm", "streaming-dllm"):
        f = Path(args.refs) / name / "COMMIT"
        env[f"{name}_commit"] = f.read_text().strip() if f.exists() else None
    return env


def run_dllm(case: dict, out: Path, timeout: float) -> dict:
    t = time.perf_counter()
    try:
        p = subprocess.run(case["dllm_argv"], capture_output=True, text=True, timeout=timeout)
        rc, stdout, stderr = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        rc, stdout, stderr = 124, e.stdout or "", (e.stderr or "") + f"\ntimed out after {timeout} s"
        stdout = stdout.decode() if isinstance(stdout, bytes) else stdout
        stderr = stderr.decode() if isinstance(stderr, bytes) else stderr
    wall = time.perf_counter() - t
    result = {
        "engine": "dllm",
        "id": case["id"],
        "command": plan.short_argv(case["dllm_argv"]),
        "rc": rc,
        "process_wall_s": wall,
        "host": platform.node(),
    }
    if rc == 0:
        try:
            result.update(json.loads(stdout.strip().splitlines()[-1]))
        except (ValueError, IndexError):
            result.update(rc=-1, error="no JSON on stdout: " + stdout[-500:])
    else:
        result["error"] = stderr.strip()[-2000:]
    tmp = out.with_name("." + out.name + ".tmp")
    tmp.write_text(json.dumps(result) + "\n")
    tmp.rename(out)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="golden tiny shapes and short lengths (CPU testing)")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--models", default="llada,dream")
    ap.add_argument("--strategies", default=",".join(plan.STRATEGIES))
    ap.add_argument("--prompt-lengths", default=None, help="default 900,128 (tiny: 96,16)")
    ap.add_argument("--gen-lengths", default=None, help="default 256,512 (tiny: 64,128)")
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--tokens-per-forward", default="1,2.8,8",
                    help="schedules: steps per block = round(block / this), at least 2")
    ap.add_argument("--seed", type=int, default=20250601)
    ap.add_argument("--repeats", type=int, default=1, help="runs per case on each engine; the median is kept")
    ap.add_argument("--work", default=None, help="checkpoints and raw runs (default bench/compare/work)")
    ap.add_argument("--results", default=None, help="report folder (default bench/results; tiny: <work>/results)")
    ap.add_argument("--refs", default=str(HERE / "refs"))
    ap.add_argument("--dllm", default=str(REPO / "target" / "release" / "dllm"))
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no new case after this many seconds; the report then says what is missing")
    ap.add_argument("--fresh", action="store_true", help="rerun every case (checkpoints are kept)")
    ap.add_argument("--skip-golden", action="store_true")
    ap.add_argument("--golden-limit", type=int, default=12, help="golden cases per implementation (0: all)")
    ap.add_argument("--case-timeout-s", type=float, default=900)
    args = ap.parse_args(argv)

    started = time.time()
    deadline = started + args.budget_s if args.budget_s else None
    tiny = args.tiny
    models = csv(args.models)
    strategies = [s for s in csv(args.strategies) if plan.STRATEGIES[s][0] in models]
    prompt_lengths = csv(args.prompt_lengths or ("96,16" if tiny else "900,128"), int)
    gen_lengths = csv(args.gen_lengths or ("64,128" if tiny else "256,512"), int)
    tpf = csv(args.tokens_per_forward, float)
    work = Path(args.work or HERE / "work")
    tag = f"{'tiny-' if tiny else ''}{args.device.replace(':', '')}"
    runs = work / "runs" / tag
    results = Path(args.results or (work / "results" if tiny else REPO / "bench" / "results"))
    for d in (runs / "ref", runs / "dllm", results):
        d.mkdir(parents=True, exist_ok=True)
    if args.fresh:
        for d in (runs / "ref", runs / "dllm"):
            for f in d.glob("*.json"):
                f.unlink()

    dllm = Path(args.dllm)
    if not dllm.exists():
        log(f"error: no dllm binary at {dllm} (run.sh builds it with cargo build --release)")
        return 1
    py = sys.executable

    # 1. checkpoints
    ckpts = {}
    for m in models:
        ckpts[m] = work / "ckpt" / f"{m}{'-tiny' if tiny else ''}"
        cmd = [py, HERE / "make_checkpoint.py", "--model", m, "--out", ckpts[m], "--seed", str(args.seed)]
        if tiny:
            cmd += ["--tiny", "--device", "cpu"]
        if run(cmd).returncode != 0:
            log(f"error: making the {m} checkpoint failed")
            return 1

    cases = plan.build_cases(models, strategies, ckpts, prompt_lengths, gen_lengths, args.block_length, tpf,
                             args.seed, args.device, str(dllm))
    impls = sorted({c["impl"] for c in cases})
    ref_cmds = {}
    for impl in impls:
        family = plan.STRATEGIES[next(c["strategy"] for c in cases if c["impl"] == impl)][0]
        ref_cmds[impl] = [py, HERE / "ref_driver.py", "run", "--impl", impl, "--refs", args.refs,
                          "--ckpt", ckpts[family], "--cases", runs / "cases.json", "--out-dir", runs / "ref",
                          "--device", args.device, "--repeats", str(args.repeats)]
    for c in cases:
        c["ref_command"] = plan.short_argv([str(x) for x in ref_cmds[c["impl"]]])
    # Cases of earlier invocations with other options (--models llada, then
    # --models dream) stay in the report when both their results are there.
    previous = runs / "cases.json"
    current = {c["id"] for c in cases}
    kept = []
    if previous.exists() and not args.fresh:
        for c in json.loads(previous.read_text()):
            if c["id"] not in current and all((runs / e / f"{c['id']}.json").exists() for e in ("ref", "dllm")):
                kept.append(c)
    (runs / "cases.json").write_text(json.dumps(cases + kept) + "\n")
    if kept:
        log(f"the report also covers {len(kept)} finished cases of earlier runs")
    log(f"{len(cases)} cases: {', '.join(strategies)} x prompts {prompt_lengths} x gen {gen_lengths} x "
        f"steps/block {sorted({c['steps_per_block'] for c in cases}, reverse=True)}")

    # 2. golden check of the reference harness
    golden_status = {}
    if not args.skip_golden:
        for impl in impls:
            golden_dir = REPO / "tests" / "data" / "golden" / GOLDEN[impl]
            cmd = [py, HERE / "ref_driver.py", "golden", "--impl", impl, "--refs", args.refs,
                   "--golden", golden_dir, "--limit", str(args.golden_limit)]
            p = run(cmd, capture_output=True, text=True)
            golden_status[impl] = (p.stdout.strip() or p.stderr.strip()[-500:])
            log(golden_status[impl])
            if p.returncode != 0:
                log(f"error: the {impl} reference does not reproduce the golden vectors under this "
                    f"torch/transformers; its timings would not be of the reference's algorithm")
                sys.stderr.write(p.stderr[-3000:])
                return 1

    # 3. floors, measured in this run
    floors_file = runs / "floors.json"
    if run([py, HERE / "floors.py", "--device", args.device, "--out", floors_file]).returncode != 0:
        log("error: measuring the floors failed")
        return 1

    # A case's two engines must run on the same machine: results carried over
    # from another machine count only as complete pairs.
    host = platform.node()
    for c in cases:
        files = [runs / "ref" / f"{c['id']}.json", runs / "dllm" / f"{c['id']}.json"]
        found = [json.loads(f.read_text()) if f.exists() else None for f in files]
        complete = all(r is not None and r.get("rc", 0) == 0 for r in found)
        for f, r in zip(files, found):
            if r is not None and not complete and r.get("host") not in (None, host):
                log(f"{f.name}: from {r.get('host')}, its pair is not: running it again here")
                f.unlink()

    # 4, 5. references and dllm, one implementation's cases at a time
    incomplete = False
    for impl in impls:
        if deadline and time.time() > deadline:
            incomplete = True
            break
        cmd = list(ref_cmds[impl])
        if args.fresh:
            cmd.append("--fresh")
        if deadline:
            cmd += ["--deadline", str(deadline)]
        rc = run(cmd).returncode
        if rc == 3:
            incomplete = True
        elif rc != 0:
            log(f"error: reference {impl} exited with {rc}; continuing (the report shows what is missing)")

        for c in (c for c in cases if c["impl"] == impl):
            out = runs / "dllm" / f"{c['id']}.json"
            if out.exists() and json.loads(out.read_text()).get("rc") == 0:
                continue
            if not (runs / "ref" / f"{c['id']}.json").exists():
                continue  # its reference half did not run (budget or failure)
            if deadline and time.time() > deadline:
                incomplete = True
                break
            reps = []
            for _ in range(args.repeats):
                reps.append(run_dllm(c, out, args.case_timeout_s))
                if reps[-1]["rc"] != 0:
                    break
            ok = [r for r in reps if r["rc"] == 0]
            if len(ok) > 1:
                ok.sort(key=lambda r: r["timings"]["total_s"])
                best = dict(ok[len(ok) // 2], repeats_total_s=[r["timings"]["total_s"] for r in ok])
                out.write_text(json.dumps(best) + "\n")
            r = reps[-1]
            if r["rc"] == 0:
                log(f"[dllm] {c['id']}: nfe {r['nfe']}, total {r['timings']['total_s']:.3f} s, "
                    f"prompt {r['timings']['prompt_s']:.3f} s, {r['timings']['tokens_per_s']:.1f} tok/s")
            else:
                log(f"[dllm] {c['id']}: FAILED (rc {r['rc']}): {r.get('error', '')[-300:]}")

    # 6. report
    env = environment(args)
    env["golden_check"] = golden_status
    env["elapsed_s"] = time.time() - started
    env["incomplete"] = incomplete
    (runs / "env.json").write_text(json.dumps(env, indent=1) + "\n")
    date = dt.date.today().isoformat()
    stem = results / f"compare-{date}{'-tiny-' + args.device if tiny else ''}"
    cmd = [py, HERE / "report.py", "--runs", runs, "--out", stem]
    rc = run(cmd).returncode
    out_dir = os.environ.get("OUT")
    if out_dir and Path(out_dir).is_dir():
        for f in results.glob(stem.name + ".*"):
            shutil.copy2(f, out_dir)
        shutil.make_archive(str(Path(out_dir) / f"compare-runs-{tag}"), "gztar", runs)
        log(f"copied the report and raw runs to $OUT ({out_dir})")
    if incomplete and rc == 0:
        log("incomplete: the time budget ran out; run the same command again to finish (done cases are kept)")
        return 3
    return rc


if __name__ == "__main__":
    sys.exit(main())
