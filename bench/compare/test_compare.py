"""Tests of the comparison harness that need no GPU (CPU, tiny shapes).

    python3 -m unittest discover -s bench/compare -p 'test_*.py' -v

Tests that need torch, the exported references (fetch-refs.sh) or the dllm
binary are skipped when those are missing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
import plan  # noqa: E402
import report  # noqa: E402

DLLM = REPO / "target" / "release" / "dllm"
HAVE_NUMPY = importlib.util.find_spec("numpy") is not None
HAVE_TORCH = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None
HAVE_REFS = (HERE / "refs" / "fast-dllm" / "COMMIT").exists() and (HERE / "refs" / "streaming-dllm" / "COMMIT").exists()
GOLDEN = REPO / "tests" / "data" / "golden"
ENV = dict(os.environ)


def py(*args, **kw):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=ENV, **kw)


def make_tiny(tmp: Path, model: str, *extra) -> Path:
    out = tmp / f"{model}-ckpt"
    p = py(HERE / "make_checkpoint.py", "--model", model, "--out", out, *extra)
    assert p.returncode == 0, p.stderr
    return out


class ReportLogic(unittest.TestCase):
    """The pass/fail rules, on fabricated results."""

    def case(self, nfe=8, strategy="prefix"):
        return {
            "id": "x", "model": "llada", "strategy": strategy, "impl": "fast-llada",
            "function": "generate_with_prefix_cache", "prompt_len": 16, "gen_length": 64,
            "block_length": 32, "steps": nfe, "steps_per_block": nfe // 2, "tokens_per_forward": 8.0,
            "expected_nfe": nfe, "args": {},
        }

    def ref(self, nfe, idle=0, tokens=None):
        return {"nfe": nfe, "nfe_idle": idle, "nfe_forwards": nfe, "tokens": tokens or [1] * 64,
                "non_eos_tokens": 64, "timings": {"total_s": 1.0, "prompt_s": 0.1}}

    def dllm(self, nfe, tokens=None, full=2):
        return {"nfe": nfe, "tokens": tokens or [1] * 64, "non_eos_tokens": 64,
                "timings": {"request_s": 0.5, "prepare_s": 0.01, "total_s": 0.49, "prompt_s": 0.05,
                            "full_forwards": full, "cached_forwards": nfe - full}}

    def test_planned_work_and_agreeing_tokens_pass(self):
        self.assertEqual(report.check_case(self.case(), self.ref(8), self.dllm(8))["status"], "ok")

    def test_different_nfe_fails(self):
        chk = report.check_case(self.case(), self.ref(9), self.dllm(8))
        self.assertEqual(chk["status"], "nfe-mismatch")
        self.assertIn("NFE", chk["notes"][0])

    def test_idle_reference_forwards_are_subtracted(self):
        # Fast-dLLM's cached variants run one forward on an already complete
        # block (DESIGN 3.7); dllm does not: 10 - 2 idle == 8.
        self.assertEqual(report.check_case(self.case(), self.ref(10, idle=2), self.dllm(8))["status"], "ok")
        self.assertEqual(report.check_case(self.case(), self.ref(10, idle=1), self.dllm(8))["status"], "nfe-mismatch")

    def test_dllm_must_run_the_planned_kind_of_forwards(self):
        # Equal NFE, but three full forwards where the plan has two (one a block).
        chk = report.check_case(self.case(), self.ref(8), self.dllm(8, full=3))
        self.assertEqual(chk["status"], "forwards-differ")

    def test_first_block_must_agree(self):
        # A quarter of the first block is enough (past the first near-tie
        # the runs part); less is a different function.
        quarter = [1] * 8 + [2] * 56
        self.assertEqual(report.check_case(self.case(), self.ref(8), self.dllm(8, tokens=quarter))["status"], "ok")
        less = [1] * 7 + [2] * 57
        chk = report.check_case(self.case(), self.ref(8), self.dllm(8, tokens=less))
        self.assertEqual(chk["status"], "tokens-differ")
        self.assertIn("22% of positions, below 25%", chk["notes"][0])

    def test_probe_ids_must_agree_almost_everywhere(self):
        probe = dict(self.case(nfe=1, strategy="llada-probe"), gen_length=32, steps_per_block=1)
        ref = dict(self.ref(1, tokens=[1] * 32))
        one_flip = [2] + [1] * 31
        self.assertEqual(report.check_case(probe, ref, self.dllm(1, tokens=one_flip, full=1))["status"], "ok")
        four_flips = [2] * 4 + [1] * 28
        self.assertEqual(report.check_case(probe, ref, self.dllm(1, tokens=four_flips, full=1))["status"],
                         "tokens-differ")

    def test_missing_and_failed(self):
        self.assertEqual(report.check_case(self.case(), None, self.dllm(8))["status"], "missing")
        self.assertEqual(report.check_case(self.case(), self.ref(8), {"error": "boom"})["status"], "error")

    def test_report_exit_status(self):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            ckpt = tmp / "ckpt"
            ckpt.mkdir()
            (ckpt / "config.json").write_text((GOLDEN / "llada_tiny_s1" / "config.json").read_text())
            (ckpt / "model.safetensors").write_bytes((GOLDEN / "llada_tiny_s1" / "bf16" / "model.safetensors").read_bytes())
            runs = tmp / "runs"
            (runs / "ref").mkdir(parents=True)
            (runs / "dllm").mkdir()
            cases = []
            for i in range(2):
                c = dict(self.case(), id=f"c{i}", ckpt=str(ckpt), dllm_args=["--prompt-ids", "1,2"])
                cases.append(c)
                (runs / "ref" / f"c{i}.json").write_text(json.dumps(self.ref(8)))
                (runs / "dllm" / f"c{i}.json").write_text(json.dumps(self.dllm(8)))
            (runs / "cases.json").write_text(json.dumps(cases))
            (runs / "floors.json").write_text(json.dumps({
                "copy_bytes": 1 << 20, "copy_bytes_per_s": 1e10, "matmul_shape": [8, 8, 8],
                "matmul_dtype": "float32", "matmul_flops_per_s": 1e11}))
            (runs / "env.json").write_text(json.dumps({"tiny": True, "device": "cpu", "ref_device": "cpu"}))
            run = lambda: py(HERE / "report.py", "--runs", runs, "--out", tmp / "r")
            p = run()
            self.assertEqual(p.returncode, 0, p.stderr)
            md = (tmp / "r.md").read_text()
            self.assertIn("PASS", md)
            self.assertIn("Harness test, not a speed comparison** (tiny shapes, CPU)", md)
            (runs / "dllm" / "c1.json").write_text(json.dumps(self.dllm(7)))
            p = run()
            self.assertEqual(p.returncode, 1, p.stderr)
            self.assertIn("NFE differs", (tmp / "r.md").read_text())
            (runs / "dllm" / "c1.json").unlink()
            p = run()
            self.assertEqual(p.returncode, 3, p.stderr)
            raw = json.loads((tmp / "r.json").read_text())
            self.assertEqual(raw["cases"][1]["check"]["status"], "missing")


class Plan(unittest.TestCase):
    def test_schedules(self):
        self.assertEqual([plan.steps_per_block(32, t) for t in (1, 2.8, 8)], [32, 11, 4])
        self.assertEqual(plan.steps_per_block(32, 64), 2)  # never 1

    @unittest.skipUnless(HAVE_NUMPY, "needs numpy")
    def test_prompt_avoids_special_ids(self):
        cfg = json.loads((GOLDEN / "llada_tiny_s1" / "config.json").read_text())
        ids = plan.prompt_ids(900, cfg, 1)
        self.assertEqual(len(ids), 900)
        self.assertLess(max(ids), min(cfg["mask_token_id"], cfg["eos_token_id"]))
        self.assertEqual(ids, plan.prompt_ids(900, cfg, 1))

    def test_streaming_kept_positions(self):
        c = {"strategy": "streaming", "prompt_len": 10, "gen_length": 128, "block_length": 32,
             "steps_per_block": 2, "args": {"window_size": 48}}
        f = plan.planned_forwards(c)
        # block 0 ends at 42; 96 positions follow: 48 of them + the last one.
        self.assertEqual(f[0], (42 + 49, 42 + 49, False))
        self.assertEqual(f[1], (42 + 49 - 10, 42 + 49, True))
        # last block: nothing follows.
        self.assertEqual(f[-1], (32, 138, True))

    @unittest.skipUnless(HAVE_NUMPY, "needs numpy")
    def test_run_order_warms_each_strategy_up_once_after_the_probe(self):
        ckpts = {m: GOLDEN / f"{m}_tiny_s1" for m in ("llada", "dream")}
        cases = plan.build_cases(["llada", "dream"], ["prefix", "baseline", "dream-dual"], ckpts, [16], [64, 128],
                                 32, [2.8, 8], 1)
        order = plan.run_order([c for c in cases if c["model"] == "llada"])
        ids = [e["id"] for e in order]
        self.assertEqual(ids[0], "llada-probe-p16")
        self.assertEqual(ids[1:3], ["llada-prefix-p16-g64-s11.warmup", "llada-prefix-p16-g64-s11"])
        warmups = [e for e in order if e.get("warmup")]
        self.assertEqual([e["strategy"] for e in warmups], ["prefix", "baseline"])
        # A warm-up is its strategy's first case, run in full, just before it.
        first_baseline = next(e for e in order if e["strategy"] == "baseline" and not e.get("warmup"))
        self.assertEqual(warmups[1]["dllm_args"], first_baseline["dllm_args"])
        self.assertEqual(order.index(warmups[1]) + 1, order.index(first_baseline))
        # The probe: one block in one step, no cache, on both engines.
        probe = order[0]
        self.assertEqual((probe["gen_length"], probe["steps"], probe["expected_nfe"]), (32, 1, 1))
        self.assertIn("none", probe["dllm_args"][probe["dllm_args"].index("--cache") + 1])
        lines = [json.loads(line) for line in plan.dllm_requests(order).splitlines()]
        self.assertEqual([line["id"] for line in lines], ids)
        self.assertTrue(lines[1]["warmup"])
        self.assertNotIn("warmup", lines[2])


class Checkpoints(unittest.TestCase):
    @unittest.skipUnless(HAVE_TORCH, "needs torch")
    def test_tiny_layout_is_golden_and_loads_in_dllm(self):
        with tempfile.TemporaryDirectory() as tmp:
            for model in ("llada", "dream"):
                out = make_tiny(Path(tmp), model, "--tiny", "--device", "cpu")
                golden_cfg = json.loads((GOLDEN / f"{model}_tiny_s1" / "config.json").read_text())
                cfg = json.loads((out / "config.json").read_text())
                self.assertEqual(sorted(cfg), sorted(golden_cfg))
                self.assertTrue((out / "model.safetensors.index.json").exists())
                if DLLM.exists():
                    p = subprocess.run([DLLM, "info", "--model", out], capture_output=True, text=True)
                    self.assertEqual(p.returncode, 0, p.stderr)
                    self.assertIn("bf16", p.stdout)
                # Same seed, same bytes.
                again = make_tiny(Path(tmp) / "again", model, "--tiny", "--device", "cpu")
                for f in out.glob("*.safetensors"):
                    self.assertEqual(f.read_bytes(), (again / f.name).read_bytes())

    @unittest.skipUnless(HAVE_TORCH and HAVE_REFS, "needs torch and bench/compare/refs")
    def test_real_shapes_match_the_reference_classes_and_dllm(self):
        # Sparse files: the real headers, no data written.
        with tempfile.TemporaryDirectory() as tmp:
            for model, impls, params in (("llada", ("fast-llada", "stream-llada"), "8.016"),
                                         ("dream", ("fast-dream",), "7.616")):
                out = make_tiny(Path(tmp), model, "--sparse")
                cfg = json.loads((out / "config.json").read_text())
                # The published configs, where a checkout has ../shared beside it.
                real = REPO.parent / "shared" / "assets" / ("llada-config" if model == "llada" else "dream-tokenizer") / "config.json"
                if real.exists():
                    real_cfg = json.loads(real.read_text())
                    for k, v in cfg.items():
                        self.assertEqual(v, real_cfg.get(k, v), f"{model} config key {k}")
                for impl in impls:
                    p = py(HERE / "ref_driver.py", "layout", "--impl", impl, "--ckpt", out)
                    self.assertEqual(p.returncode, 0, p.stdout + p.stderr[-2000:])
                    self.assertIn(f"{params} B parameters: identical", p.stdout)
                if DLLM.exists():
                    p = subprocess.run([DLLM, "info", "--model", out], capture_output=True, text=True)
                    self.assertEqual(p.returncode, 0, p.stderr)


@unittest.skipUnless(HAVE_TORCH and HAVE_REFS, "needs torch and bench/compare/refs")
class References(unittest.TestCase):
    def run_driver(self, tmp: Path, impl: str, ckpt: Path, cases: list[dict]) -> dict:
        (tmp / "cases.json").write_text(json.dumps(cases))
        p = py(HERE / "ref_driver.py", "run", "--impl", impl, "--ckpt", ckpt, "--cases", tmp / "cases.json",
               "--out-dir", tmp / "ref", "--device", "cpu", "--threads", "1")
        self.assertEqual(p.returncode, 0, p.stderr[-3000:])
        return {c["id"]: json.loads((tmp / "ref" / f"{c['id']}.json").read_text()) for c in cases if c["impl"] == impl}

    def test_forwards_follow_the_plan(self):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            ckpts = {m: make_tiny(tmp, m, "--tiny", "--device", "cpu") for m in ("llada", "dream")}
            cases = plan.build_cases(["llada", "dream"], list(plan.STRATEGIES), ckpts, [16], [64], 32, [8], 1)
            self.assertEqual(len(cases), len(plan.STRATEGIES) + len(plan.PROBES))
            for impl in sorted({c["impl"] for c in cases}):
                results = self.run_driver(tmp, impl, ckpts[cases[0]["model"] if impl.endswith("llada") else "dream"], cases)
                for c in cases:
                    if c["impl"] != impl:
                        continue
                    r = results[c["id"]]
                    self.assertEqual(r["nfe"], c["expected_nfe"], c["id"])
                    self.assertEqual(r["nfe_idle"], 0, c["id"])
                    ran = [(f["q"], f["kv"], f["cached"]) for f in r["forwards"]]
                    self.assertEqual(ran, plan.planned_forwards(c), c["id"])
                    self.assertNotIn(c["args"]["mask_id"], r["tokens"])
                    self.assertNotIn(c["args"]["eos_id"], r["tokens"])

    @unittest.skipUnless(DLLM.exists(), "needs target/release/dllm")
    def test_idle_forward_is_counted_and_accounted(self):
        # A threshold that every token passes: the block-start full forward
        # completes each block, Fast-dLLM's prefix cache then runs one idle
        # cached forward per block, dllm does not.
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            ckpt = GOLDEN / "llada_tiny_s1"
            data = json.loads((ckpt / "cases.json").read_text())
            prompt = data["prompts"][0]
            args = {"gen_length": 64, "block_length": 32, "steps": 64, "threshold": 1e-9,
                    "mask_id": data["mask_id"], "eos_id": data["eos_id"]}
            case = {"id": "idle", "impl": "fast-llada", "function": "generate_with_prefix_cache", "args": args,
                    "prompt_ids": prompt, "expected_nfe": 2}
            r = self.run_driver(tmp, "fast-llada", ckpt, [case])["idle"]
            self.assertEqual((r["nfe"], r["nfe_idle"]), (4, 2))
            p = subprocess.run(
                [DLLM, "generate", "--model", ckpt, "--prompt-ids", ",".join(map(str, prompt)), "--gen-length", "64",
                 "--block-length", "32", "--steps", "64", "--cache", "prefix", "--threshold", "1e-9", "--json"],
                capture_output=True, text=True)
            self.assertEqual(p.returncode, 0, p.stderr)
            d = json.loads(p.stdout)
            self.assertEqual(d["nfe"], 2)
            self.assertEqual(d["tokens"], r["tokens"])
            # Each block completes at its first (full) forward: one step a block.
            c = {"id": "idle", "strategy": "prefix", "prompt_len": len(prompt), "gen_length": 64, "block_length": 32,
                 "steps_per_block": 1, "expected_nfe": 2}
            chk = report.check_case(c, dict(r, forwards=None), d)
            self.assertEqual(chk["status"], "ok", chk)


if __name__ == "__main__":
    unittest.main()
