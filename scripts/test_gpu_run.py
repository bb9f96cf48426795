"""Tests of the GPU run's logic that need neither a GPU nor a build: the time
plan, the step limits, compute-sanitizer's outcomes, the report.

    python3 -m unittest discover -s scripts -p 'test_*.py' -v
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import unittest
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_report  # noqa: E402
import gpu_run  # noqa: E402


def script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


class Fixture(unittest.TestCase):
    def setUp(self):
        self.tmp = Path(tempfile.mkdtemp())
        self.addCleanup(lambda: __import__("shutil").rmtree(self.tmp, ignore_errors=True))
        os.environ["OUT"] = str(self.tmp / "out")
        self.addCleanup(os.environ.pop, "OUT")

    def run_in(self, mode: str, budget: float = 60) -> gpu_run.Run:
        args = SimpleNamespace(dry_run=mode == "dry", budget_s=budget, folder=str(self.tmp / "folder"),
                               work=str(self.tmp / "work"))
        return gpu_run.Run(args)


class TimePlan(unittest.TestCase):
    def test_the_gpu_run_fits_eight_minutes_dream_only_if_time_is_left(self):
        self.assertLessEqual(gpu_run.BUDGET["gpu"], 8 * 60)
        planned = sum(s.estimate["gpu"] for s in gpu_run.STEPS if s.key != "e-dream")
        self.assertLessEqual(planned, gpu_run.BUDGET["gpu"])
        # The command that runs it must end inside a device call's 10 minutes,
        # at twice the estimate of the step in flight when the budget ends.
        self.assertLess(gpu_run.BUDGET["gpu"] + 60, 10 * 60)

    def test_the_dry_run_fits_its_budget(self):
        self.assertLessEqual(sum(s.estimate["dry"] for s in gpu_run.STEPS), gpu_run.BUDGET["dry"])

    def test_correctness_gates_come_first(self):
        keys = [s.key for s in gpu_run.STEPS]
        gates = [keys.index(s.key) for s in gpu_run.STEPS if s.gate]
        self.assertEqual(gates, [1, 2])


class Limits(Fixture):
    def test_a_step_past_its_limit_is_stopped_with_its_children(self):
        r = self.run_in("gpu")
        step = gpu_run.Step("x-slow", "sleeps", {"gpu": 1, "dry": 1})
        marker = self.tmp / "child-still-running"
        slow = script(self.tmp / "slow.sh", f"(sleep 4; touch {marker}) & sleep 30")
        started = time.time()
        outcome = r.execute(step, [slow])
        self.assertEqual(outcome.status, "TIMEOUT")
        self.assertLess(time.time() - started, 5)
        self.assertIn("limit of 2 s", outcome.detail)
        time.sleep(4.5)
        self.assertFalse(marker.exists(), "the step's background child outlived it")

    def test_the_limit_never_passes_the_budget(self):
        r = self.run_in("gpu", budget=8)
        step = gpu_run.Step("x-long", "sleeps", {"gpu": 100, "dry": 100})
        outcome = r.execute(step, [script(self.tmp / "slow.sh", "sleep 30")])
        self.assertEqual(outcome.status, "TIMEOUT")
        self.assertLess(outcome.seconds, 5)


class Sanitizer(Fixture):
    STEP = next(s for s in gpu_run.STEPS if s.key == "c-memcheck")

    def sanitize(self, sanitizer_body: str | None) -> gpu_run.Outcome:
        r = self.run_in("gpu")
        script(r.work / "bin" / "test-cuda", "echo test result: ok")
        tools = self.tmp / "tools"
        tools.mkdir(exist_ok=True)
        if sanitizer_body is not None:
            script(tools / "compute-sanitizer", sanitizer_body)
        r.env["PATH"] = f"{tools}:/usr/bin:/bin"
        return r.sanitizer(self.STEP, "memcheck")

    def test_absent_is_a_skip_with_the_reason(self):
        o = self.sanitize(None)
        self.assertEqual((o.status, o.detail), ("SKIP", "compute-sanitizer is not installed (it comes with the CUDA toolkit)"))

    def test_a_refused_device_is_a_skip(self):
        o = self.sanitize("echo '========= Error: Device not supported'; exit 1")
        self.assertEqual(o.status, "SKIP")
        self.assertIn("refused the device", o.detail)

    def test_errors_found_fail_and_a_clean_run_passes(self):
        o = self.sanitize("echo '========= ERROR SUMMARY: 2 errors'; exit 1")
        self.assertEqual((o.status, o.data["summary"]), ("FAIL", "========= ERROR SUMMARY: 2 errors"))
        o = self.sanitize('shift 4; "$@"; echo "========= ERROR SUMMARY: 0 errors"')
        self.assertEqual((o.status, o.data["summary"]), ("PASS", "========= ERROR SUMMARY: 0 errors"))


class Report(Fixture):
    def test_a_failed_step_fails_the_run_and_every_step_is_reported(self):
        outcomes = {s.key: gpu_run.Outcome("PASS", 1.0, log="$ x\nok") for s in gpu_run.STEPS}
        outcomes["a-device"].data = {"dllm_version": "dllm 0.1.0 (commit abc)", "manifest_commit": "abc"}
        outcomes["c-racecheck"] = gpu_run.Outcome("SKIP", detail="compute-sanitizer is not installed")
        outcomes["e-llada"] = gpu_run.Outcome("FAIL", 3.0, "exit status 1", data={
            "verdict": "FAIL: 1 of 2 cases failed (tokens differ); 1 passed", "report": "compare-x.md",
            "cases": [{"id": "llada-probe-p900", "nfe_ref": 1, "nfe_dllm": 1, "ref_total_s": None,
                       "dllm_total_s": None, "dllm_prepare_s": None, "speedup": None,
                       "first_block_agreement": 0.0, "status": "tokens-differ"}]})
        stem = self.tmp / "gpu-run-2026-01-01-0000"
        verdict = gpu_report.write(stem, "gpu", gpu_run.STEPS, outcomes, 480, 100)
        self.assertTrue(verdict.startswith("FAIL: e-llada"), verdict)
        md = stem.with_suffix(".md").read_text()
        for s in gpu_run.STEPS:
            self.assertIn(f"| {s.key} |", md)
        self.assertIn("| llada-probe-p900 | 1 | 1 | – | – | – | – | 0% | tokens-differ |", md)
        raw = json.loads(stem.with_suffix(".json").read_text())
        self.assertEqual([s["status"] for s in raw["steps"]].count("SKIP"), 1)


if __name__ == "__main__":
    unittest.main()
