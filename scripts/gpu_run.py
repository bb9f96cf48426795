#!/usr/bin/env python3
"""The GPU run, prepared where cargo is and run where the GPU is, in one
command each (scripts/gpu-run.sh is the entry point; README "The GPU run").

  --prepare   here, no GPU needed: builds gpu-run/, the one folder the GPU
              machine needs beside the repository checkout (no Rust there):
              the release binary with its kernels, tests/cuda.rs and
              benches/kernels.rs as binaries, the reference code
              (bench/compare/fetch-refs.sh) and MANIFEST.json (commit, sizes,
              checksums); checks it stays under 60 MiB and that it and the
              checkout fit the 64 MiB a device call carries.
  (default)   on the GPU machine, from gpu-run/: the steps below, each with
              its time limit, then one report (markdown, JSON, PNG) in $OUT
              when set, else in bench/results/.
  --dry-run   the default mode here: the CUDA steps on the emulated device
              (DLLM_CUDA=emulated) at tiny shapes, PyTorch's steps on the CPU
              where torch is installed (skipped, saying so, where it is not),
              the report in <work>/results unless $OUT is set.

The steps (issue 11): a. device, driver and library versions; b. correctness
gates, tests/cuda.rs and `dllm eval --check` on the small model, which stop
the run when they fail; c. compute-sanitizer memcheck and racecheck on the
kernel tests, skipped with the reason where the tool is absent or refuses
the device; d. the DESIGN §4 floors, `dllm bench` on a synthetic LLaDA-8B
and the kernel benchmarks; e. the comparison with the PyTorch references
(bench/compare), LLaDA-8B, then Dream-7B if time is left. Each step has an
estimate for an H200 and for the dry run on 2 CPU cores, and a time limit of
twice its estimate, never past the run's budget (8 minutes on the GPU).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import cuda_libs  # noqa: E402
import gpu_report  # noqa: E402

FOLDER = REPO / "gpu-run"
MAX_FOLDER = 60 << 20  # the limit for the prepared folder
MAX_CARRIED = 64 << 20  # what one device call carries: the checkout and the folder
BINARIES = {  # name in the folder -> the cargo target kind, and how cargo builds it
    "dllm": ("bin", ["build", "--release", "--bin", "dllm"]),
    "test-cuda": ("test", ["test", "--release", "--test", "cuda", "--no-run"]),
    "test-cuda-batch": ("test", ["test", "--release", "--test", "cuda_batch", "--no-run"]),
    "bench-kernels": ("bench", ["bench", "--bench", "kernels", "--no-run"]),
}
# Files of the checkout the run reads; their checksums at --prepare are in the
# manifest, so that a report says when the checkout changed since.
TREE = ["scripts/gpu-run.sh", "scripts/gpu_run.py", "scripts/gpu_report.py", "scripts/cuda_libs.py",
        "bench/compare/*.py", "models/tiny-arith/*"]
# tests/cuda.rs tests that decode whole models; the rest test single kernels.
END_TO_END = ("tiny_arith", "real_width")
# What compute-sanitizer prints when it cannot use the device (seen on some
# virtual machines): then the step is skipped, not failed.
SANITIZER_REFUSALS = ("Device not supported", "device not supported", "Unable to find injection library",
                      "Error: Target application terminated before first instrumented API call")
BUDGET = {"gpu": 480, "dry": 290}  # seconds the default mode and the dry run plan for


@dataclass
class Step:
    key: str
    title: str
    estimate: dict  # mode ("gpu": an H200, "dry": 2 CPU cores, emulated) -> seconds
    gate: bool = False  # a failure stops the run
    needs_torch: bool = False


STEPS = [
    Step("a-device", "device, driver and library versions", {"gpu": 10, "dry": 5}),
    Step("b-tests", "tests/cuda.rs", {"gpu": 60, "dry": 15}, gate=True),
    Step("b-eval", "dllm eval --check on the small model", {"gpu": 20, "dry": 40}, gate=True),
    Step("b-batch", "tests/cuda_batch.rs: requests decoded together as alone", {"gpu": 20, "dry": 15}),
    Step("c-memcheck", "compute-sanitizer memcheck on the kernel tests", {"gpu": 40, "dry": 10}),
    Step("c-racecheck", "compute-sanitizer racecheck on the kernel tests", {"gpu": 40, "dry": 10}),
    Step("d-floors", "DESIGN §4 floors: copy bandwidth and bf16 matmul rate (PyTorch)", {"gpu": 15, "dry": 10},
         needs_torch=True),
    Step("d-bench", "dllm bench --synthetic llada-8b: prompt phase, full forward, cached step", {"gpu": 60, "dry": 15}),
    Step("d-batch", "dllm bench --batch: aggregate throughput of concurrent requests", {"gpu": 30, "dry": 15}),
    Step("d-kernels", "kernel benchmarks (benches/kernels.rs)", {"gpu": 30, "dry": 5}),
    Step("e-llada", "comparison with the PyTorch references: LLaDA-8B", {"gpu": 150, "dry": 90}, needs_torch=True),
    Step("e-dream", "comparison with the PyTorch references: Dream-7B, if time is left", {"gpu": 130, "dry": 60},
         needs_torch=True),
]


@dataclass
class Outcome:
    status: str  # PASS, FAIL, SKIP, TIMEOUT
    seconds: float = 0.0
    detail: str = ""
    command: str = ""
    log: str = ""
    data: dict = field(default_factory=dict)


def say(msg: str) -> None:
    print(f"[gpu-run {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_files() -> list[Path]:
    return sorted(p for pattern in TREE for p in REPO.glob(pattern) if p.is_file())


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout


# ---- --prepare ---------------------------------------------------------------

def cargo_artifact(kind: str, args: list[str]) -> Path:
    """Builds with cargo and returns the executable of the target kind asked
    for (a test build also builds the binary its tests run)."""
    say("$ cargo " + " ".join(args))
    p = subprocess.run(["cargo", *args, "--message-format=json-render-diagnostics"], cwd=REPO,
                       stdout=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise SystemExit(f"error: cargo {' '.join(args)} failed")
    executables = [m["executable"] for m in map(json.loads, p.stdout.splitlines())
                   if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == [kind]]
    if len(executables) != 1:
        raise SystemExit(f"error: cargo {' '.join(args)} made {len(executables)} {kind} executables, expected one")
    return Path(executables[0])


def carried_bytes(folder: Path) -> int:
    """What a device call carries: the tracked and the untracked, not ignored
    files of the checkout (the folder itself is ignored) and the folder."""
    names = git("ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
    tree = sum((REPO / n).stat().st_size for n in names if n and (REPO / n).is_file())
    return tree + folder_bytes(folder)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def prepare(args) -> int:
    folder = Path(args.folder)
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "src", "kernels", "build.rs",
                "Cargo.toml", "Cargo.lock").strip()
    if dirty:
        say("warning: uncommitted changes in the sources; the binaries' built-in commit does not describe them")
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "bin").mkdir(parents=True)
    binaries, built = {}, {}
    for name, (kind, cargo_args) in BINARIES.items():
        built[name] = cargo_artifact(kind, cargo_args)
        with tempfile.TemporaryDirectory() as tmp:
            stripped = Path(tmp) / name
            shutil.copy(built[name], stripped)
            subprocess.run(["strip", str(stripped)], check=True)
            with open(stripped, "rb") as src, gzip.open(folder / "bin" / f"{name}.gz", "wb", compresslevel=9) as dst:
                shutil.copyfileobj(src, dst)
            binaries[name] = {"sha256": sha256(stripped), "bytes": stripped.stat().st_size}
    # The binary must carry its kernels: one request on the emulated device.
    smoke = subprocess.run([str(built["dllm"]), "generate", "--device", "cuda",
                            "--model", str(REPO / "models/tiny-arith"), "--prompt", "add 0000004821+0000000937="],
                           capture_output=True, text=True, env=dict(os.environ, DLLM_CUDA="emulated"))
    if smoke.returncode != 0 or smoke.stdout.strip() != "00000005758":
        raise SystemExit(f"error: the release binary does not run on the emulated device: {smoke.stderr.strip()}")
    refs = None
    if not args.without_refs:
        env = dict(os.environ, REFS_DIR=str(folder / "refs"))
        if subprocess.run(["bash", str(REPO / "bench/compare/fetch-refs.sh")], env=env).returncode != 0:
            raise SystemExit("error: no reference code (see bench/compare/fetch-refs.sh; --without-refs "
                             "prepares a folder whose comparison steps are skipped)")
        refs = {n: (folder / "refs" / n / "COMMIT").read_text().strip() for n in ("fast-dllm", "streaming-dllm")}
    manifest = {
        "commit": git("rev-parse", "HEAD").strip(),
        "sources_dirty": bool(dirty),
        "prepared": dt.datetime.now().isoformat(timespec="seconds"),
        "built_in": str(REPO),
        "binaries": binaries,
        "refs": refs,
        "tree": {str(p.relative_to(REPO)): sha256(p) for p in tree_files()},
    }
    (folder / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    size, carried = folder_bytes(folder), carried_bytes(folder)
    say(f"{folder}: {size / 2**20:.1f} MiB (limit {MAX_FOLDER >> 20} MiB); with the checkout a device call "
        f"carries {carried / 2**20:.1f} MiB (limit {MAX_CARRIED >> 20} MiB)")
    if size > MAX_FOLDER or carried > MAX_CARRIED:
        raise SystemExit("error: too large to carry")
    say(f"prepared commit {manifest['commit'][:12]}{' (sources dirty)' if dirty else ''}; run it with "
        f"`bash scripts/gpu-run.sh` on the GPU machine, carrying {folder}")
    return 0


# ---- the run -----------------------------------------------------------------

class Run:
    """One run of the steps: where things are, the clock, the outcomes."""

    def __init__(self, args):
        self.mode = "dry" if args.dry_run else "gpu"
        self.started = time.time()
        self.budget = args.budget_s or BUDGET[self.mode]
        self.folder = Path(args.folder)
        self.work = Path(args.work or tempfile.mkdtemp(prefix="dllm-gpu-run-"))
        self.logs = self.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        out = os.environ.get("OUT")
        self.results = Path(out) if out else (self.work / "results" if self.mode == "dry" else REPO / "bench/results")
        self.results.mkdir(parents=True, exist_ok=True)
        self.outcomes: dict[str, Outcome] = {}
        self.have_torch = importlib.util.find_spec("torch") is not None
        self.env = dict(os.environ, PATH=os.environ.get("PATH", "") + ":/usr/local/cuda/bin")
        if self.mode == "dry":
            self.env["DLLM_CUDA"] = "emulated"
        else:
            self.env = cuda_libs.with_cublaslt(self.env)

    def left(self) -> float:
        return self.budget - (time.time() - self.started)

    def path(self, name: str) -> str:
        return str(self.work / "bin" / name)

    def execute(self, step: Step, cmd: list, env: dict | None = None, cwd: Path = REPO) -> Outcome:
        """Runs a command in its own process group under the step's limit:
        twice its estimate, never past the budget. Output goes to a log."""
        limit = min(2 * step.estimate[self.mode], self.left() - 5)
        cmd = [str(c) for c in cmd]
        log = self.logs / f"{step.key}.log"
        shown = " ".join(cmd).replace(str(self.work), "<work>")
        with open(log, "a") as f:
            f.write(f"$ {shown}\n")
            f.flush()
            start = time.time()
            p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env or self.env, cwd=cwd,
                                 start_new_session=True)
            try:
                rc = p.wait(timeout=max(1.0, limit))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                rc = None
            seconds = time.time() - start
        text = log.read_text()
        if rc is None:
            return Outcome("TIMEOUT", seconds, f"stopped at its limit of {limit:.0f} s", shown, text)
        return Outcome("PASS" if rc == 0 else "FAIL", seconds, "" if rc == 0 else f"exit status {rc}", shown, text)

    # ---- the steps ----------------------------------------------------------

    def a_device(self, step: Step) -> Outcome:
        cmds = [[self.path("dllm"), "--version"]]
        if self.mode == "gpu":
            cmds.append(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                         "--format=csv,noheader"])
        if shutil.which("compute-sanitizer", path=self.env["PATH"]):
            cmds.append(["compute-sanitizer", "--version"])
        outcome = Outcome("PASS")
        for cmd in cmds:
            o = self.execute(step, cmd)
            outcome.seconds += o.seconds
            outcome.command = "; ".join(filter(None, [outcome.command, o.command]))
            outcome.log = o.log
            if o.status != "PASS":
                outcome.status, outcome.detail = o.status, f"{o.command}: {o.detail}"
                break
        manifest = json.loads((self.folder / "MANIFEST.json").read_text())
        changed = [n for n, h in manifest["tree"].items() if not (REPO / n).exists() or sha256(REPO / n) != h]
        outcome.data = {
            "mode": self.mode,
            "driver": "emulated (DLLM_CUDA=emulated)" if self.mode == "dry" else "hardware",
            "dllm_version": next((line for line in outcome.log.splitlines() if line.startswith("dllm ")), "?"),
            "manifest_commit": manifest["commit"],
            "sources_dirty": manifest["sources_dirty"],
            "prepared": manifest["prepared"],
            "checkout_changed_since_prepare": changed,
            "cublaslt": cuda_libs.describe() if self.mode == "gpu" else "emulated",
            "python": platform.python_version(),
            "torch": torch_versions() if self.have_torch else "not installed",
            "cpu": cpu_name(),
            "cpu_count": os.cpu_count(),
        }
        return outcome

    def b_tests(self, step: Step) -> Outcome:
        args = ["--include-ignored", "--test-threads=1"]
        if self.mode == "dry":  # the kernel tests: whole models take minutes on the emulated device
            args += [a for name in END_TO_END for a in ("--skip", name)]
        outcome = self.execute(step, [self.path("test-cuda"), *args])
        outcome.data = {"summary": last_line(outcome.log, "test result:")}
        return outcome

    def b_batch(self, step: Step) -> Outcome:
        outcome = self.execute(step, [self.path("test-cuda-batch"), "--test-threads=1"])
        outcome.data = {"summary": last_line(outcome.log, "test result:")}
        return outcome

    def b_eval(self, step: Step) -> Outcome:
        cmd = [self.path("dllm"), "eval", "--device", "cuda", "--model", REPO / "models/tiny-arith", "--check"]
        # Full rows on the GPU; on the emulated device two examples, baseline only (a minute of CPU).
        cmd += ["--limit", "40"] if self.mode == "gpu" else ["--limit", "2", "--only", "baseline"]
        outcome = self.execute(step, cmd)
        outcome.data = {"table": [line for line in outcome.log.splitlines() if line.startswith("|")]}
        return outcome

    def sanitizer(self, step: Step, tool: str) -> Outcome:
        sanitizer = shutil.which("compute-sanitizer", path=self.env["PATH"])
        if self.mode == "dry":
            # compute-sanitizer cannot check the emulated device; a stand-in
            # that runs the tests unchecked exercises the step's command.
            sanitizer = stand_in_sanitizer(self.work)
        elif sanitizer is None:
            return Outcome("SKIP", detail="compute-sanitizer is not installed (it comes with the CUDA toolkit)")
        kernel_tests = [a for name in END_TO_END for a in ("--skip", name)]
        outcome = self.execute(step, [sanitizer, "--tool", tool, "--error-exitcode", "1", self.path("test-cuda"),
                                      "--include-ignored", "--test-threads=1", *kernel_tests])
        refusal = next((r for r in SANITIZER_REFUSALS if r in outcome.log), None)
        if self.mode == "dry":
            outcome.status, outcome.detail = "SKIP", (
                f"dry run: compute-sanitizer does not check the emulated device; its command ran through a "
                f"stand-in ({outcome.status.lower()})")
        elif refusal and outcome.status != "PASS":
            outcome.status, outcome.detail = "SKIP", f"compute-sanitizer refused the device: {refusal!r}"
        outcome.data = {"summary": last_line(outcome.log, "ERROR SUMMARY")}
        return outcome

    def d_floors(self, step: Step) -> Outcome:
        out = self.work / "floors.json"
        device = "cuda" if self.mode == "gpu" else "cpu"
        outcome = self.execute(step, [sys.executable, REPO / "bench/compare/floors.py", "--device", device,
                                      "--out", out])
        if outcome.status == "PASS":
            outcome.data = json.loads(out.read_text())
        return outcome

    def d_bench(self, step: Step) -> Outcome:
        if self.mode == "gpu":
            model = ["--synthetic", "llada-8b", "--prompt-length", "1024", "--gen-length", "64"]
        else:
            model = ["--model", REPO / "tests/data/golden/llada_tiny_s1/bf16", "--prompt-length", "64",
                     "--gen-length", "64", "--steps", "8"]
        outcome = self.execute(step, [self.path("dllm"), "bench", *model, "--block-length", "32",
                                      "--only", "baseline,prefix,dual", "--device", "cuda", "--json"])
        rows = [json.loads(line) for line in outcome.log.splitlines() if line.startswith("{")]
        outcome.data = {"rows": rows, "model": "llada-8b (random weights)" if self.mode == "gpu"
                        else "tests/data/golden/llada_tiny_s1 (tiny)"}
        return outcome

    def d_batch(self, step: Step) -> Outcome:
        if self.mode == "gpu":
            model, batches = ["--synthetic", "llada-8b", "--prompt-length", "256", "--gen-length", "64"], "1,8,32"
        else:
            model, batches = ["--model", REPO / "tests/data/golden/llada_tiny_s1/bf16", "--prompt-length", "32",
                              "--gen-length", "32", "--steps", "4"], "1,2"
        outcome = self.execute(step, [self.path("dllm"), "bench", *model, "--block-length", "32", "--only", "dual",
                                      "--batch", batches, "--device", "cuda", "--json"])
        outcome.data = {"rows": [json.loads(line) for line in outcome.log.splitlines() if line.startswith("{")]}
        return outcome

    def d_kernels(self, step: Step) -> Outcome:
        # On the emulated device the benchmarks are listed, not timed.
        args = ["--bench", "--warm-up-time", "0.2", "--measurement-time", "1"] if self.mode == "gpu" else ["--list"]
        outcome = self.execute(step, [self.path("bench-kernels"), *args])
        outcome.data = {"lines": [line for line in outcome.log.splitlines() if "time:" in line or "thrpt:" in line
                                  or line.endswith(": benchmark")]}
        return outcome

    def compare(self, step: Step, model: str) -> Outcome:
        if not (self.folder / "refs/fast-dllm/COMMIT").exists():
            return Outcome("SKIP", detail="the prepared folder has no reference code (prepared --without-refs)")
        if step.key == "e-dream" and self.outcomes["e-llada"].status not in ("PASS", "SKIP"):
            return Outcome("SKIP", detail="the LLaDA comparison failed: the run stops at the first failure")
        limit = min(2 * step.estimate[self.mode], self.left() - 5)
        if step.key == "e-dream" and self.left() - 10 < step.estimate[self.mode]:
            return Outcome("SKIP", detail=f"not enough time left ({self.left():.0f} s of the {self.budget} s "
                                          f"budget; it needs about {step.estimate[self.mode]} s)")
        cmd = [sys.executable, REPO / "bench/compare/compare.py", "--models", model, "--dllm", self.path("dllm"),
               "--refs", self.folder / "refs", "--work", self.work / "compare", "--results", self.results,
               "--golden-limit", "3", "--budget-s", f"{limit - 10:.0f}"]
        if (self.work / "floors.json").exists():
            cmd += ["--floors", self.work / "floors.json"]
        if self.mode == "gpu":
            cmd += ["--device", "cuda", "--prompt-lengths", "900", "--gen-lengths", "256",
                    "--tokens-per-forward", "2.8,8"]
        else:
            cmd += ["--tiny", "--device", "cuda", "--ref-device", "cpu", "--prompt-lengths", "96",
                    "--gen-lengths", "64", "--tokens-per-forward", "8"]
        env = dict(self.env, DLLM_COMPARE_COMMAND=f"scripts/gpu-run.sh{' --dry-run' if self.mode == 'dry' else ''}")
        started = time.time()
        outcome = self.execute(step, cmd, env=env)
        reports = sorted((p for p in self.results.glob("compare-*.json") if p.stat().st_mtime >= started),
                         key=lambda p: p.stat().st_mtime)
        if reports:
            raw = json.loads(reports[-1].read_text())
            outcome.data = {"report": reports[-1].with_suffix(".md").name, "verdict": raw["verdict"],
                            "cases": [gpu_report.compare_row(c) for c in raw["cases"] if c["case"]["model"] == model]}
            if outcome.status == "FAIL":
                outcome.detail = raw["verdict"]
        return outcome

    def step(self, step: Step) -> Outcome:
        if step.needs_torch and not self.have_torch:
            return Outcome("SKIP", detail="PyTorch is not installed (python3 -c 'import torch' fails)")
        if self.left() < 10:
            return Outcome("SKIP", detail=f"the run's {self.budget} s budget is spent")
        if step.key.startswith("c-"):
            return self.sanitizer(step, step.key[2:])
        if step.key.startswith("e-"):
            return self.compare(step, step.key[2:])
        return getattr(self, step.key.replace("-", "_"))(step)

    def unpack(self) -> None:
        """The folder's binaries into <work>/bin, checked against the manifest;
        tests/cuda.rs finds its data through the path it was built in."""
        manifest = json.loads((self.folder / "MANIFEST.json").read_text())
        (self.work / "bin").mkdir(exist_ok=True)
        for name, info in manifest["binaries"].items():
            dest = self.work / "bin" / name
            with gzip.open(self.folder / "bin" / f"{name}.gz", "rb") as src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst)
            if sha256(dest) != info["sha256"]:
                raise SystemExit(f"error: {dest} does not match the manifest: prepare the folder again")
            dest.chmod(dest.stat().st_mode | stat.S_IXUSR)
        built_in = Path(manifest["built_in"])
        if not (built_in / "models/tiny-arith").exists():
            built_in.parent.mkdir(parents=True, exist_ok=True)
            built_in.symlink_to(REPO)
            say(f"{built_in} -> {REPO} (tests/cuda.rs reads its data under the path it was built in)")


def stand_in_sanitizer(work: Path) -> Path:
    path = work / "stand-in" / "compute-sanitizer"
    path.parent.mkdir(exist_ok=True)
    path.write_text('#!/bin/sh\n# dry-run stand-in: runs the program unchecked\n'
                    'while [ "$#" -gt 0 ]; do case "$1" in --tool|--error-exitcode) shift 2 ;; *) break ;; esac; done\n'
                    'echo "========= stand-in: nothing checked"\nexec "$@"\n')
    path.chmod(0o755)
    return path


def last_line(text: str, marker: str) -> str | None:
    return next((line.strip() for line in reversed(text.splitlines()) if marker in line), None)


def torch_versions() -> str:
    import torch
    import transformers

    gpu = f", sees {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}){gpu}, transformers {transformers.__version__}"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def run(args) -> int:
    r = Run(args)
    if not (r.folder / "MANIFEST.json").exists():
        raise SystemExit(f"error: no prepared folder at {r.folder}: run `scripts/gpu-run.sh --prepare` where "
                         f"cargo is, and bring the folder along")
    say(f"{'dry run' if r.mode == 'dry' else 'GPU run'}: budget {r.budget} s, work {r.work}, report to {r.results}")
    r.unpack()
    stopped = None
    for step in STEPS:
        if args.steps and step.key not in args.steps:
            r.outcomes[step.key] = Outcome("SKIP", detail="not asked for (--steps)")
            continue
        if stopped:
            r.outcomes[step.key] = Outcome("SKIP", detail=f"not run: {stopped}")
            continue
        say(f"{step.key}: {step.title} (estimate {step.estimate[r.mode]} s, {r.left():.0f} s left)")
        outcome = r.step(step)
        r.outcomes[step.key] = outcome
        say(f"{step.key}: {outcome.status} in {outcome.seconds:.1f} s{': ' + outcome.detail if outcome.detail else ''}")
        if outcome.status in ("FAIL", "TIMEOUT"):
            print("\n".join(outcome.log.splitlines()[-25:]), flush=True)
            if step.gate:
                stopped = f"the correctness gate {step.key} did not pass"
    stem = r.results / f"gpu-run{'-dry' if r.mode == 'dry' else ''}-{dt.datetime.now().strftime('%Y-%m-%d-%H%M')}"
    with tarfile.open(f"{stem}-logs.tar.gz", "w:gz") as tar:
        tar.add(r.logs, arcname="logs")
    verdict = gpu_report.write(stem, r.mode, STEPS, r.outcomes, r.budget, time.time() - r.started)
    say(f"{verdict}; report {stem}.md")
    print(gpu_report.summary_table(STEPS, r.outcomes, r.mode), flush=True)
    return 0 if verdict.startswith("PASS") else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--prepare", action="store_true", help="build the folder the GPU machine needs (here)")
    mode.add_argument("--dry-run", action="store_true", help="the default mode here, on the emulated device")
    ap.add_argument("--folder", default=str(FOLDER), help="the prepared folder (default gpu-run/)")
    ap.add_argument("--without-refs", action="store_true",
                    help="--prepare without the reference code (its comparison steps are then skipped)")
    ap.add_argument("--work", default=None, help="scratch folder: binaries, logs, checkpoints (default: a new temporary one)")
    ap.add_argument("--steps", type=lambda s: s.split(","), default=None,
                    help=f"run only these steps (comma-separated: {', '.join(s.key for s in STEPS)})")
    ap.add_argument("--budget-s", type=float, default=None,
                    help=f"the run's time (default {BUDGET['gpu']} s on the GPU, {BUDGET['dry']} s for a dry run)")
    args = ap.parse_args(argv)
    unknown = set(args.steps or []) - {s.key for s in STEPS}
    if unknown:
        ap.error(f"no step {', '.join(sorted(unknown))}")
    return prepare(args) if args.prepare else run(args)


if __name__ == "__main__":
    sys.exit(main())
