#!/usr/bin/env python3
"""dllm against the PyTorch references (Fast-dLLM, Streaming-dLLM) on one
device: same random checkpoints, same prompts, same fixed schedules.

Cheapest first, so that nothing expensive runs before the cheap checks pass:
  1. the packages, the reference code and the dllm binary are there; the
     references reproduce the golden vectors through this harness's loader and
     shims (ref_driver.py golden, CPU, tiny models); dllm runs one request on
     the device
  2. the DESIGN §4 floors (floors.py), unless --floors gives this run's
  3. per model: its random checkpoint (make_checkpoint.py), written just
     before its engines need it; the references (ref_driver.py run, one
     process per implementation); dllm (`dllm batch`, one process for all of
     the model's requests, so the checkpoint is loaded once); each case is
     checked as soon as both halves are in, and the first failure stops the run
  4. the report (report.py), also when the run stopped early or ran out of time

Both engines run, per process, the model's agreement probe, then one untimed
warm-up of each strategy before its cases (plan.run_order). Started by run.sh
or scripts/gpu_run.py; see README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "scripts"))
import cuda_libs  # noqa: E402
import plan  # noqa: E402
import report  # noqa: E402

GOLDEN = {"fast-llada": "llada_tiny_s1", "stream-llada": "llada_tiny_s1", "fast-dream": "dream_tiny_s1"}
PACKAGES = ("torch", "transformers", "safetensors", "numpy", "matplotlib")


class Stop(Exception):
    """Ends the run early with a reason for the report (no time left, an
    engine failed, a case failed its check)."""


def log(msg: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def csv(s: str, conv=str) -> list:
    return [conv(x) for x in s.split(",") if x.strip()]


class Clock:
    """The run's time budget: every child process gets what is left."""

    def __init__(self, budget_s: float | None):
        self.deadline = time.time() + budget_s if budget_s else None

    def left(self, what: str) -> float | None:
        if self.deadline is None:
            return None
        left = self.deadline - time.time()
        if left <= 0:
            raise Stop(f"the time budget ran out before {what}")
        return left


def run(cmd: list, clock: Clock, what: str, capture: bool = False, env=None) -> subprocess.CompletedProcess:
    """Runs a child in its own process group, killed whole when the budget
    runs out; `capture` keeps its output (text) instead of passing it on."""
    cmd = [str(c) for c in cmd]
    log("$ " + plan.short_argv(cmd))
    pipe = subprocess.PIPE if capture else None
    p = subprocess.Popen(cmd, stdout=pipe, stderr=pipe, text=True, env=env, start_new_session=True)
    try:
        out, err = p.communicate(timeout=clock.left(what))
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise Stop(f"the time budget ran out during {what}") from None
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def check_packages() -> list[str]:
    missing = []
    for name in PACKAGES:
        try:
            m = importlib.import_module(name)
            log(f"{name} {getattr(m, '__version__', '?')}")
        except ImportError:
            missing.append(name)
    return missing


def dllm_env(args) -> dict:
    """dllm's environment: its CPU threads, and cuBLASLt on the library path."""
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), MATMUL_NUM_THREADS=str(args.threads))
    return cuda_libs.with_cublaslt(env) if args.device.startswith("cuda") else env


def environment(args, dllm_version: str) -> dict:
    env = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(),
        "device": args.device,
        "ref_device": args.ref_device,
        "dllm_driver": os.environ.get("DLLM_CUDA", "hardware") if args.device.startswith("cuda") else None,
        "tiny": args.tiny,
        "threads": args.threads,
        "python": platform.python_version(),
        "command": os.environ.get("DLLM_COMPARE_COMMAND") or " ".join(sys.argv),
        "dllm": args.dllm,
        "dllm_version": dllm_version,
        "dllm_commit": dllm_version.split("commit ")[-1].rstrip(")") if "commit " in dllm_version else None,
        "cublaslt": cuda_libs.describe() if args.device.startswith("cuda") else None,
    }
    import torch
    import transformers

    env["torch"], env["transformers"] = torch.__version__, transformers.__version__
    if args.ref_device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda_runtime"] = torch.version.cuda
    if shutil.which("nvidia-smi"):
        q = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
             "--format=csv,noheader"],
            capture_output=True, text=True,
        )
        env["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            env["cpu"] = line.split(":", 1)[1].strip()
            break
    env["cpu_count"] = os.cpu_count()
    for name in ("fast-dllm", "streaming-dllm"):
        f = Path(args.refs) / name / "COMMIT"
        env[f"{name}_commit"] = f.read_text().strip() if f.exists() else None
    return env


def cheap_checks(args, clock: Clock) -> tuple[str, dict]:
    """Everything that takes seconds: packages, reference code, the dllm
    binary on the device, the reference harness on the golden vectors.
    Returns dllm's version line and the golden check's results."""
    missing = check_packages()
    if missing:
        raise Stop(f"python lacks {', '.join(missing)} (bench/compare/README.md lists what the comparison needs)")
    for name in ("fast-dllm", "streaming-dllm"):
        if not (Path(args.refs) / name / "COMMIT").exists():
            raise Stop(f"no reference code in {args.refs}/{name}: run bench/compare/fetch-refs.sh where the "
                       f"reference repositories are, and bring {args.refs} along")
    if args.ref_device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise Stop("torch sees no CUDA device (--device cpu runs the harness test on the CPU)")
    dllm = Path(args.dllm)
    if not dllm.exists():
        raise Stop(f"no dllm binary at {dllm} (cargo build --release, or scripts/gpu-run.sh --prepare)")
    version = run([dllm, "--version"], clock, "dllm --version", capture=True).stdout.strip()
    # One tiny request on the device, so a binary that cannot run there
    # fails now, not after minutes of checkpoints and references.
    probe = run([dllm, "generate", "--model", REPO / "tests/data/golden/llada_tiny_s1/bf16", "--prompt-ids",
                 "1,2,3", "--gen-length", "32", "--steps", "32", "--cache", "dual", "--threshold", "none",
                 "--device", args.device, "--json"], clock, "the dllm device check",
                capture=True, env=dllm_env(args))
    if probe.returncode != 0:
        raise Stop(f"dllm cannot run on {args.device}: {probe.stderr.strip()[-500:]}")
    golden = {}
    if args.golden_limit >= 0:
        for impl in sorted({plan.STRATEGIES[s][1] for s in args.strategies} | {plan.PROBES[m][0] for m in args.models}):
            p = run([sys.executable, HERE / "ref_driver.py", "golden", "--impl", impl, "--refs", args.refs,
                     "--golden", REPO / "tests/data/golden" / GOLDEN[impl], "--limit", str(args.golden_limit)],
                    clock, f"the {impl} golden check", capture=True)
            golden[impl] = p.stdout.strip() or p.stderr.strip()[-500:]
            log(golden[impl])
            if p.returncode != 0:
                sys.stderr.write(p.stderr[-3000:])
                raise Stop(f"the {impl} reference does not reproduce the golden vectors under this "
                           f"torch/transformers: its timings would not be of the reference's algorithm")
    return version, golden


def run_model(args, clock: Clock, model: str, cases: list[dict], runs: Path) -> None:
    """One model's checkpoint, references and dllm; raises Stop at the first
    failure."""
    mine = [c for c in cases if c["model"] == model]
    order = plan.run_order(mine)
    (runs / f"order-{model}.json").write_text(json.dumps(order) + "\n")
    for engine in ("ref", "dllm"):
        for e in order:
            (runs / engine / f"{e['id']}.json").unlink(missing_ok=True)

    for impl in sorted({c["impl"] for c in mine}):
        p = run([sys.executable, HERE / "ref_driver.py", "run", "--impl", impl, "--refs", args.refs,
                 "--ckpt", mine[0]["ckpt"], "--cases", runs / f"order-{model}.json", "--out-dir", runs / "ref",
                 "--device", args.ref_device, "--threads", str(args.threads)], clock, f"the {impl} reference")
        if p.returncode != 0:
            raise Stop(f"the {impl} reference exited with status {p.returncode}")

    requests = runs / f"dllm-{model}.jsonl"
    requests.write_text(plan.dllm_requests(order))
    cmd = [args.dllm, "batch", "--model", mine[0]["ckpt"], "--device", args.device, "--requests", requests]
    log("$ " + " ".join(map(str, cmd)))
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, text=True, env=dllm_env(args),
                            start_new_session=True)
    # The requests stream back one line each; the budget's end kills the
    # process even while it is silent.
    left = clock.left(f"dllm's {model} requests")
    watchdog = threading.Timer(left, os.killpg, (proc.pid, signal.SIGKILL)) if left else None
    if watchdog:
        watchdog.start()
    by_id = {c["id"]: c for c in mine}
    try:
        for line in proc.stdout:
            result = json.loads(line)
            (runs / "dllm" / f"{result['id']}.json").write_text(json.dumps(result) + "\n")
            if result.get("warmup"):
                continue
            case = by_id[result["id"]]
            ref = json.loads((runs / "ref" / f"{case['id']}.json").read_text())
            check = report.check_case(case, ref, result)
            if "error" in result:
                log(f"[dllm] {case['id']}: FAILED: {result['error']}")
            else:
                t = result["timings"]
                log(f"[dllm] {case['id']}: nfe {result['nfe']}, request {t['request_s']:.3f} s "
                    f"(prepare {t['prepare_s']:.3f}), first block agrees "
                    f"{100 * check.get('first_block_agreement', 0):.0f}%: {check['status']}")
            if check["status"] != "ok":
                raise Stop(f"{case['id']} failed ({check['status']}): {'; '.join(check['notes'])}")
        proc.wait()
        clock.left(f"the end of dllm's {model} requests")
        if proc.returncode != 0:
            raise Stop(f"dllm batch exited with status {proc.returncode}")
    finally:
        if watchdog:
            watchdog.cancel()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="golden tiny shapes and short lengths (a harness test)")
    ap.add_argument("--device", default="cuda", help="dllm's device: cuda (default) or cpu")
    ap.add_argument("--ref-device", default=None, help="the references' device (default: --device)")
    ap.add_argument("--models", default="llada,dream")
    ap.add_argument("--strategies", default=",".join(plan.STRATEGIES))
    ap.add_argument("--prompt-lengths", default=None, help="default 900 (tiny: 96)")
    ap.add_argument("--gen-lengths", default=None, help="default 256 (tiny: 64)")
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--tokens-per-forward", default="2.8,8",
                    help="schedules: steps per block = round(block / this), at least 2")
    ap.add_argument("--seed", type=int, default=20250601)
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads of each engine, torch and dllm alike (default: every core; tiny: 1, "
                         "since the tiny models gain nothing from more and spinning threads make times erratic)")
    ap.add_argument("--work", default=None, help="checkpoints and raw runs (default bench/compare/work)")
    ap.add_argument("--results", default=None, help="report folder (default $OUT, else bench/results; tiny: <work>/results)")
    ap.add_argument("--refs", default=str(HERE / "refs"))
    ap.add_argument("--dllm", default=str(REPO / "target" / "release" / "dllm"))
    ap.add_argument("--floors", default=None, help="floors.json measured earlier in the same run (default: measure)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop after this many seconds; the report then says what did not run")
    ap.add_argument("--golden-limit", type=int, default=12,
                    help="golden cases per reference implementation (0: all, -1: skip the check)")
    args = ap.parse_args(argv)

    started = time.time()
    clock = Clock(args.budget_s)
    args.ref_device = args.ref_device or args.device
    args.threads = args.threads or (1 if args.tiny else os.cpu_count())
    args.models = csv(args.models)
    args.strategies = [s for s in csv(args.strategies) if plan.STRATEGIES[s][0] in args.models]
    prompt_lengths = csv(args.prompt_lengths or ("96" if args.tiny else "900"), int)
    gen_lengths = csv(args.gen_lengths or ("64" if args.tiny else "256"), int)
    work = Path(args.work or HERE / "work")
    tag = f"{'tiny-' if args.tiny else ''}{args.device.replace(':', '')}"
    runs = work / "runs" / tag
    default_results = (work / "results") if args.tiny else Path(os.environ.get("OUT") or REPO / "bench" / "results")
    results = Path(args.results or default_results)
    for d in (runs / "ref", runs / "dllm", results):
        d.mkdir(parents=True, exist_ok=True)

    stopped, version, golden, ran_models = None, "?", {}, []
    try:
        version, golden = cheap_checks(args, clock)
        floors = runs / "floors.json"
        if args.floors:
            shutil.copy(args.floors, floors)
        elif run([sys.executable, HERE / "floors.py", "--device", args.ref_device, "--out", floors], clock,
                 "the floors").returncode != 0:
            raise Stop("measuring the floors failed")
        for model in args.models:
            ckpt = work / "ckpt" / f"{model}{'-tiny' if args.tiny else ''}"
            cmd = [sys.executable, HERE / "make_checkpoint.py", "--model", model, "--out", ckpt, "--seed", args.seed]
            if args.tiny:
                cmd += ["--tiny", "--device", "cpu"]
            if run(cmd, clock, f"the {model} checkpoint").returncode != 0:
                raise Stop(f"making the {model} checkpoint failed")
            cases = plan.build_cases([model], args.strategies, {model: ckpt}, prompt_lengths, gen_lengths,
                                     args.block_length, csv(args.tokens_per_forward, float), args.seed)
            for c in cases:
                c["ref_command"] = (f"python3 bench/compare/ref_driver.py run --impl {c['impl']} --ckpt {ckpt} "
                                    f"--cases order-{model}.json --device {args.ref_device} --threads {args.threads}")
            ran_models.append((model, cases))
            write_cases(runs, ran_models)
            run_model(args, clock, model, cases, runs)
    except Stop as e:
        stopped = str(e)
        log(f"stopped: {stopped}")

    if not ran_models:
        log("no case ran: no report")
        return 1
    env = environment(args, version)
    env.update(golden_check=golden, elapsed_s=time.time() - started, stopped=stopped)
    (runs / "env.json").write_text(json.dumps(env, indent=1) + "\n")
    stem = results / f"compare-{dt.date.today().isoformat()}{'-' + tag if args.tiny else ''}"
    rc = subprocess.run([sys.executable, HERE / "report.py", "--runs", runs, "--out", stem]).returncode
    shutil.make_archive(str(results / f"{stem.name}-runs"), "gztar", runs)
    log(f"report {stem}.md, raw runs {stem}-runs.tar.gz")
    return rc if rc != 0 or not stopped else 1


def write_cases(runs: Path, ran_models: list[tuple[str, list[dict]]]) -> None:
    """cases.json: this run's cases of every model started so far, and those
    of earlier runs in the same folder for the other models (so that
    `--models llada`, then `--models dream` make one report)."""
    mine = {m for m, _ in ran_models}
    previous = runs / "cases.json"
    kept = [c for c in json.loads(previous.read_text()) if c["model"] not in mine] if previous.exists() else []
    (runs / "cases.json").write_text(json.dumps(kept + [c for _, cs in ran_models for c in cs]) + "\n")


if __name__ == "__main__":
    sys.exit(main())
