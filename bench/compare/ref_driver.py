#!/usr/bin/env python3
"""Runs the public PyTorch reference samplers (Fast-dLLM, Streaming-dLLM) on a
checkpoint, case by case, and writes one JSON result per case.

The reference code is imported unmodified from bench/compare/refs/ (see
fetch-refs.sh); refcompat.py and the loader below adapt it to the installed
transformers at run time. One process serves one implementation:

  fast-llada    Fast-dLLM llada/generate.py: generate, generate_with_prefix_cache,
                generate_with_dual_cache (llada/model/modeling_llada.py)
  stream-llada  Streaming-dLLM LLaDA-1.5/generate.py: generate_with_prefix_cache
                (LLaDA-1.5/model/modeling_llada.py)
  fast-dream    Fast-dLLM dream/model/generation_utils_block.py (diffusion_generate
                with and without dual_cache, dream/model/modeling_dream.py), and
                dream/model/generation_utils.py for the one-step agreement probe

The cases file lists what to run in order (plan.run_order): warm-ups are run
like the cases and written with "warmup": true. Timing: the case's call is timed whole (synchronised before and after); the
first forward's end is synchronised once to time the prompt phase; every
forward is bracketed by CUDA events (no extra synchronisation) for per-forward
times. A forward hook also counts the reference's idle forwards: cached
forwards on a block that holds no mask any more (DESIGN 3.7).

    ref_driver.py run --impl fast-llada --refs DIR --ckpt DIR --cases FILE --out-dir DIR [--device cuda] [--threads N]
    ref_driver.py golden --impl fast-llada --refs DIR --golden tests/data/golden/llada_tiny_s1
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import platform
import statistics
import sys
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import refcompat  # noqa: E402

IMPL_DIRS = {
    "fast-llada": ("fast-dllm", "llada"),
    "stream-llada": ("streaming-dllm", "LLaDA-1.5"),
    "fast-dream": ("fast-dllm", "dream"),
}


class Reference:
    """The imported reference code of one implementation."""

    def __init__(self, impl: str, refs: Path):
        repo, sub = IMPL_DIRS[impl]
        root = refs / repo / sub
        if not root.is_dir():
            raise SystemExit(f"error: {root} is missing: run bench/compare/fetch-refs.sh")
        self.impl, self.root = impl, root
        refcompat.install()
        sys.path.insert(0, str(root))
        if impl.endswith("llada"):
            self.gen = importlib.import_module("generate")
            self.cfgmod = importlib.import_module("model.configuration_llada")
            self.modeling = importlib.import_module("model.modeling_llada")
        else:
            self.cfgmod = importlib.import_module("model.configuration_dream")
            self.modeling = importlib.import_module("model.modeling_dream")
            self.gu = importlib.import_module("model.generation_utils")
            self.gub = importlib.import_module("model.generation_utils_block")
            self._patch_generation_config_validate()

    @property
    def shims(self) -> list[str]:
        return list(refcompat.APPLIED)

    def _patch_generation_config_validate(self):
        """DreamGenerationConfig.validate(self, is_init=False) is a no-op;
        transformers 5's GenerationConfig.update calls it with a
        user_set_attributes keyword it does not take. Accept and ignore it."""
        for mod in (self.gu, self.gub):
            cls = mod.DreamGenerationConfig
            params = inspect.signature(cls.validate).parameters.values()
            if any(p.kind == p.VAR_KEYWORD for p in params):
                continue
            orig = cls.validate

            def validate(self, is_init=False, *args, _orig=orig, **kwargs):
                return _orig(self, is_init)

            cls.validate = validate
            refcompat.APPLIED.append(
                f"{mod.__name__}.DreamGenerationConfig.validate: accepts (and ignores) transformers 5's keywords"
            )

    # ---- model loading -------------------------------------------------
    def make_config(self, cfg: dict):
        cls = self.cfgmod.LLaDAConfig if self.impl.endswith("llada") else self.cfgmod.DreamConfig
        config = cls(**cfg)
        # transformers 5 drops config keys it considers generation parameters
        # (use_cache among them); the 4.x config kept every key of config.json.
        for key, value in cfg.items():
            if not hasattr(config, key):
                setattr(config, key, value)
                note = f"config.{key}: restored from config.json (dropped by this transformers)"
                if note not in refcompat.APPLIED:
                    refcompat.APPLIED.append(note)
        return config

    def build_meta(self, cfg: dict):
        """The reference model class built on the meta device (no 8B-parameter
        random init): its names and shapes, no data."""
        import torch

        config = self.make_config(cfg)
        if self.impl.endswith("llada"):
            mc = self.modeling.create_model_config_from_pretrained_config(config)
            mc.init_device = "meta"
            model = self.modeling.LLaDAModelLM(config, model=self.modeling.LLaDAModel(mc, init_params=False))
        else:
            with torch.device("meta"):
                model = self.modeling.DreamModel(config)
        return model, config

    @staticmethod
    def checkpoint_files(ckpt: Path) -> list[str]:
        index = ckpt / "model.safetensors.index.json"
        if index.exists():
            return sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return ["model.safetensors"]

    @staticmethod
    def header_shapes(ckpt: Path) -> dict:
        shapes = {}
        for f in Reference.checkpoint_files(ckpt):
            with open(ckpt / f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
            shapes.update({k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})
        return shapes

    @staticmethod
    def layout_diff(model, have: dict) -> str | None:
        want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if want == have:
            return None
        missing = sorted(set(want) - set(have))[:5]
        extra = sorted(set(have) - set(want))[:5]
        shapes = [(k, want[k], have[k]) for k in want if k in have and want[k] != have[k]][:5]
        return f"missing {missing}, unexpected {extra}, shapes (model, file) {shapes}"

    def load(self, ckpt: Path, device: str):
        from safetensors.torch import load_file

        cfg = json.loads((ckpt / "config.json").read_text())
        model, config = self.build_meta(cfg)
        diff = self.layout_diff(model, self.header_shapes(ckpt))
        if diff:
            raise SystemExit(f"error: {ckpt} does not have the reference model's layout: {diff}")
        # Assign the checkpoint's tensors: the same weights the files hold.
        state = {}
        for f in self.checkpoint_files(ckpt):
            state.update(load_file(str(ckpt / f), device=device))
        model.load_state_dict(state, assign=True, strict=True)
        del state
        if not self.impl.endswith("llada"):
            # Non-persistent RoPE buffers were made on meta: rebuild them with
            # the reference's own class and constructor call.
            for name, mod in list(model.named_modules()):
                for child_name, child in list(mod.named_children()):
                    if isinstance(child, self.modeling.DreamRotaryEmbedding):
                        setattr(mod, child_name, self.modeling.DreamRotaryEmbedding(config=config))
            self._bind_dream_sampler(model, self.gub)
        model = model.to(device).eval()
        meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        if meta:
            raise SystemExit(f"error: tensors left on the meta device: {meta[:5]}")
        self.model, self.config, self.cfg = model, config, cfg
        return model

    @staticmethod
    def _bind_dream_sampler(model, module):
        """Dream's samplers are mixins (generation_utils, generation_utils_block)
        whose diffusion_generate calls self._sample: bind both of one module."""
        for name in ("diffusion_generate", "_sample"):
            setattr(model, name, types.MethodType(getattr(module.DreamGenerationMixin, name), model))

    # ---- one call of a reference sampler -------------------------------
    def call(self, function: str, prompt, a: dict):
        """Runs one reference function; returns (x, nfe or None)."""
        m = self.model
        if function == "generate":
            return self.gen.generate(
                m, prompt, steps=a["steps"], gen_length=a["gen_length"], block_length=a["block_length"],
                temperature=0.0, remasking="low_confidence", mask_id=a["mask_id"], threshold=a.get("threshold"),
            )
        if function == "generate_with_prefix_cache" and self.impl == "fast-llada":
            return self.gen.generate_with_prefix_cache(
                m, prompt, steps=a["steps"], gen_length=a["gen_length"], block_length=a["block_length"],
                temperature=0.0, remasking="low_confidence", mask_id=a["mask_id"], threshold=a.get("threshold"),
            )
        if function == "generate_with_dual_cache":
            return self.gen.generate_with_dual_cache(
                m, prompt, steps=a["steps"], gen_length=a["gen_length"], block_length=a["block_length"],
                temperature=0.0, remasking="low_confidence", mask_id=a["mask_id"], threshold=a.get("threshold"),
            )
        if function == "generate_with_prefix_cache" and self.impl == "stream-llada":
            return self.gen.generate_with_prefix_cache(
                m, prompt, steps=a["steps"], gen_length=a["gen_length"], block_length=a["block_length"],
                temperature=0.0, remasking="low_confidence", mask_id=a["mask_id"], eos_id=a["eos_id"],
                threshold=a.get("threshold"), factor=a.get("factor"), window_size=a["window_size"],
                confidence_alpha=a.get("confidence_alpha", 0.0),
            )
        if function in ("diffusion_generate", "diffusion_generate_unblocked"):
            c = self.config
            # What DreamGenerationConfig.from_model_config(model.config) gives
            # under transformers 4.x (the special ids of the model config,
            # defaults elsewhere); transformers 5's from_model_config cannot
            # build this subclass, so it is passed in explicitly.
            gc = self.gu.DreamGenerationConfig(
                mask_token_id=c.mask_token_id, pad_token_id=c.pad_token_id,
                bos_token_id=getattr(c, "bos_token_id", None), eos_token_id=c.eos_token_id,
            )
            common = dict(
                generation_config=gc, attention_mask=None, max_new_tokens=a["gen_length"], output_history=False,
                return_dict_in_generate=True, steps=a["steps"], temperature=0.0, top_p=None, top_k=None,
                alg=a["alg"], alg_temp=0.0,
            )
            if function == "diffusion_generate":
                out = m.diffusion_generate(prompt, threshold=a.get("threshold"), block_length=a["block_length"],
                                           dual_cache=a["dual_cache"], **common)
                return out.sequences, None
            # The sampler without blocks or cache (generation_utils), for the
            # probe; the block sampler is bound again afterwards.
            self._bind_dream_sampler(m, self.gu)
            try:
                return m.diffusion_generate(prompt, **common).sequences, None
            finally:
                self._bind_dream_sampler(m, self.gub)
        raise SystemExit(f"error: {self.impl} has no function {function}")


class ForwardRecorder:
    """Forward hooks on the top-level model: per-forward timing, query and
    key/value lengths, and idle forwards."""

    def __init__(self, model, device: str, block_length: int, mask_id: int, kv_axis: int):
        import torch

        self.torch, self.cuda = torch, device.startswith("cuda")
        self.block_length, self.mask_id, self.kv_axis = block_length, mask_id, kv_axis
        self.records: list[dict] = []
        self.t0 = None
        self.first_done_s = None
        self.handles = [
            model.register_forward_pre_hook(self._pre, with_kwargs=True),
            model.register_forward_hook(self._post, with_kwargs=True),
        ]

    def start(self):
        self.records, self.first_done_s = [], None
        self.t0 = time.perf_counter()

    def _ids(self, args, kwargs):
        return args[0] if args else kwargs["input_ids"]

    def _pre(self, module, args, kwargs):
        ids = self._ids(args, kwargs)
        past = kwargs.get("past_key_values")
        q = int(ids.shape[1])
        rec = {"q": q, "cached": past is not None}
        if past is not None:
            past_len = int(past[0][0].shape[self.kv_axis])
            rec["kv"] = past_len if kwargs.get("replace_position") is not None else past_len + q
            # Idle: a cached forward on a block with no mask left. Kept as a
            # device tensor, read after the run (no synchronisation here).
            rec["_has_mask"] = (ids[:, : self.block_length] == self.mask_id).any()
        else:
            rec["kv"] = q
        if self.cuda:
            rec["_ev"] = (self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True))
            rec["_ev"][0].record()
        else:
            rec["_t"] = time.perf_counter()
        self.records.append(rec)

    def _post(self, module, args, kwargs, output):
        rec = self.records[-1]
        if self.cuda:
            rec["_ev"][1].record()
        else:
            rec["ms"] = (time.perf_counter() - rec.pop("_t")) * 1e3
        if self.first_done_s is None:
            if self.cuda:
                self.torch.cuda.synchronize()
            self.first_done_s = time.perf_counter() - self.t0

    def finish(self) -> list[dict]:
        out = []
        for rec in self.records:
            if "_ev" in rec:
                start, end = rec.pop("_ev")
                rec["ms"] = start.elapsed_time(end)
            has_mask = rec.pop("_has_mask", None)
            rec["idle"] = bool(has_mask is not None and not bool(has_mask))
            out.append(rec)
        return out


def set_threads(threads: int | None) -> None:
    """torch's CPU threads: as many as the other engine is given (compare.py
    passes the same number to dllm), or torch's default."""
    import torch

    if threads:
        torch.set_num_threads(threads)


def sync(device):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_case(ref: Reference, rec: ForwardRecorder, case: dict, device: str, eos_id: int) -> dict:
    import torch

    a = case["args"]
    prompt = torch.tensor([case["prompt_ids"]], dtype=torch.long, device=device)
    rec.block_length = a["block_length"]
    sync(device)
    rec.start()
    t0 = time.perf_counter()
    x, nfe = ref.call(case["function"], prompt, a)
    sync(device)
    total = time.perf_counter() - t0
    forwards = rec.finish()
    tokens = x[0, prompt.shape[1]:].tolist()
    non_eos = sum(1 for t in tokens if t != eos_id)
    prompt_s = rec.first_done_s or 0.0
    full = [f["ms"] for f in forwards if not f["cached"]]
    cached = [f["ms"] for f in forwards if f["cached"] and not f["idle"]]
    return {
        "tokens": tokens,
        "nfe": nfe if nfe is not None else len(forwards),
        "nfe_forwards": len(forwards),
        "nfe_idle": sum(1 for f in forwards if f["idle"]),
        "non_eos_tokens": non_eos,
        "timings": {
            "prompt_s": prompt_s,
            "decode_s": total - prompt_s,
            "total_s": total,
            "tokens_per_s": non_eos / max(total, 1e-12),
        },
        "full_forward_ms_mean": statistics.fmean(full) if full else None,
        "cached_forward_ms_mean": statistics.fmean(cached) if cached else None,
        "forwards": forwards,
    }


def cmd_run(args) -> int:
    import torch

    entries = [e for e in json.loads(Path(args.cases).read_text()) if e["impl"] == args.impl]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not entries:
        print(f"[{args.impl}] nothing to do", file=sys.stderr)
        return 0
    ref = Reference(args.impl, Path(args.refs))
    t = time.perf_counter()
    ref.load(Path(args.ckpt), args.device)
    load_s = time.perf_counter() - t
    eos_id, mask_id = ref.cfg["eos_token_id"], ref.cfg["mask_token_id"]
    kv_axis = -2 if args.impl.endswith("llada") else 1
    rec = ForwardRecorder(ref.model, args.device, 32, mask_id, kv_axis)
    print(f"[{args.impl}] loaded {args.ckpt} on {args.device} in {load_s:.1f} s; shims: {ref.shims}", file=sys.stderr)

    with torch.no_grad():
        for entry in entries:
            run = run_case(ref, rec, entry, args.device, eos_id)
            result = {
                "engine": "reference",
                "id": entry["id"],
                "warmup": entry.get("warmup", False),
                "impl": args.impl,
                "function": entry["function"],
                "args": entry["args"],
                "command": entry.get("ref_command"),
                "device": args.device,
                "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
                "cpu_threads": torch.get_num_threads(),
                "host": platform.node(),
                "torch": torch.__version__,
                "transformers": importlib.import_module("transformers").__version__,
                "shims": ref.shims,
                "load_s": load_s,
                **run,
            }
            tmp = out_dir / f".{entry['id']}.json.tmp"
            tmp.write_text(json.dumps(result) + "\n")
            tmp.rename(out_dir / f"{entry['id']}.json")
            tm = run["timings"]
            print(
                f"[{args.impl}] {entry['id']}: nfe {run['nfe']} (idle {run['nfe_idle']}), "
                f"total {tm['total_s']:.3f} s, prompt {tm['prompt_s']:.3f} s, {tm['tokens_per_s']:.1f} tok/s",
                file=sys.stderr,
            )
    return 0


GOLDEN_FUNCTIONS = {
    # golden strategy -> (impl, function, extra args)
    "baseline": ("fast-llada", "generate", {}),
    "baseline_threshold": ("fast-llada", "generate", {}),
    "prefix": ("fast-llada", "generate_with_prefix_cache", {}),
    "prefix_threshold": ("fast-llada", "generate_with_prefix_cache", {}),
    "dual": ("fast-llada", "generate_with_dual_cache", {}),
    "dual_threshold": ("fast-llada", "generate_with_dual_cache", {}),
    "streaming": ("stream-llada", "generate_with_prefix_cache", {}),
    "dream_prefix": ("fast-dream", "diffusion_generate", {"dual_cache": False}),
    "dream_dual": ("fast-dream", "diffusion_generate", {"dual_cache": True}),
}


def cmd_golden(args) -> int:
    """Runs this driver (loader, shims, hooks) on the golden tiny model and
    checks the reference reproduces the recorded tokens and NFE: proof that
    the shims did not change what the reference computes."""
    import torch

    golden = Path(args.golden)
    data = json.loads((golden / "cases.json").read_text())
    ref = Reference(args.impl, Path(args.refs))
    ref.load(golden, "cpu")
    rec = ForwardRecorder(ref.model, "cpu", 32, data["mask_id"], -2 if args.impl.endswith("llada") else 1)
    ok = bad = 0
    mine = [c for c in data["cases"] if GOLDEN_FUNCTIONS.get(c["strategy"], ("",))[0] == args.impl]
    if args.limit:
        # Spread the limit over the strategies, in file order within each.
        by_strategy: dict[str, list] = {}
        for c in mine:
            by_strategy.setdefault(c["strategy"], []).append(c)
        per = -(-args.limit // len(by_strategy))
        keep = {id(c) for cs in by_strategy.values() for c in cs[:per]}
        mine = [c for c in mine if id(c) in keep]
    with torch.no_grad():
        for c in mine:
            spec = GOLDEN_FUNCTIONS[c["strategy"]]
            a = dict(c["args"], mask_id=data["mask_id"], **spec[2])
            a.setdefault("block_length", a["gen_length"])
            a.setdefault("eos_id", data["eos_id"])
            case = {"function": spec[1], "args": a, "prompt_ids": data["prompts"][c["prompt"]]}
            r = run_case(ref, rec, case, "cpu", data["eos_id"])
            want_nfe = c.get("nfe")
            good = r["tokens"] == c["tokens"] and (want_nfe is None or r["nfe"] == want_nfe)
            if c.get("nfe_idle") is not None:
                good = good and r["nfe_idle"] == c["nfe_idle"]
            if good:
                ok += 1
            else:
                bad += 1
                print(f"  MISMATCH {c['strategy']} {c['args']}: nfe {r['nfe']} (want {want_nfe})", file=sys.stderr)
    print(f"golden {args.impl}: {ok} passed, {bad} failed (shims: {len(ref.shims)})")
    return 0 if bad == 0 and ok > 0 else 1


def cmd_layout(args) -> int:
    """Builds the reference model on the meta device from the checkpoint's
    config.json and compares its parameter names and shapes with the
    checkpoint's safetensors headers (reads no tensor data)."""
    ref = Reference(args.impl, Path(args.refs))
    ckpt = Path(args.ckpt)
    model, _ = ref.build_meta(json.loads((ckpt / "config.json").read_text()))
    diff = ref.layout_diff(model, ref.header_shapes(ckpt))
    n = sum(p.numel() for p in model.parameters())
    if diff:
        print(f"layout {args.impl} {ckpt}: DIFFERS: {diff}")
        return 1
    print(f"layout {args.impl} {ckpt}: {len(model.state_dict())} tensors, {n / 1e9:.3f} B parameters: identical")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--impl", choices=sorted(IMPL_DIRS), required=True)
    r.add_argument("--refs", default=str(HERE / "refs"))
    r.add_argument("--ckpt", required=True)
    r.add_argument("--cases", required=True)
    r.add_argument("--out-dir", required=True)
    r.add_argument("--device", default="cuda")
    r.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    g = sub.add_parser("golden")
    g.add_argument("--impl", choices=sorted(IMPL_DIRS), required=True)
    g.add_argument("--refs", default=str(HERE / "refs"))
    g.add_argument("--golden", required=True)
    g.add_argument("--limit", type=int, default=0, help="check at most this many cases (0: all)")
    lay = sub.add_parser("layout")
    lay.add_argument("--impl", choices=sorted(IMPL_DIRS), required=True)
    lay.add_argument("--refs", default=str(HERE / "refs"))
    lay.add_argument("--ckpt", required=True)
    args = ap.parse_args(argv)
    if args.cmd == "layout":
        return cmd_layout(args)
    if args.cmd == "run":
        set_threads(args.threads)
        return cmd_run(args)
    set_threads(1)  # tiny models: more threads only add noise
    return cmd_golden(args)


if __name__ == "__main__":
    sys.exit(main())
