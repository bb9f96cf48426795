#!/usr/bin/env python3
"""Measures the two DESIGN §4 floors on this machine, now:
  - memory bandwidth: a large device-to-device copy, counted as bytes read
    plus bytes written over the time (torch Tensor.copy_);
  - bf16 matrix rate: torch.matmul of two 8192 x 8192 bf16 matrices,
    2 * 8192^3 flops each.
On --device cpu (testing only) the copy is 256 MiB and the matmul is
float32 2048^3, so that it finishes quickly; the numbers then describe the
CPU, not a GPU.

    floors.py --device cuda --out floors.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _timer(device):
    import torch

    if device.startswith("cuda"):
        def run(fn, iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
    else:
        def run(fn, iters):
            t = time.perf_counter()
            for _ in range(iters):
                fn()
            return time.perf_counter() - t
    return run


def _copy_bandwidth(run, device: str, nbytes: int, iters: int) -> float:
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src.fill_(1)
    dst = torch.empty_like(src)
    run(lambda: dst.copy_(src), 3)
    best = min(run(lambda: dst.copy_(src), iters) / iters for _ in range(3))
    return 2 * nbytes / best  # bytes read + bytes written


def measure(device: str) -> dict:
    import torch

    cuda = device.startswith("cuda")
    run = _timer(device)
    copy_bytes = (4 << 30) if cuda else (256 << 20)
    bandwidth = _copy_bandwidth(run, device, copy_bytes, iters=20 if cuda else 5)

    n, dtype = (8192, torch.bfloat16) if cuda else (2048, torch.float32)
    x = torch.randn(n, n, device=device, dtype=dtype)
    y = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    run(lambda: torch.matmul(x, y, out=out), 3)
    iters = 50 if cuda else 3
    best_mm = min(run(lambda: torch.matmul(x, y, out=out), iters) / iters for _ in range(3))
    rate = 2 * n**3 / best_mm
    return {
        "device": device,
        "copy_bytes": copy_bytes,
        "copy_bytes_per_s": bandwidth,
        "matmul_shape": [n, n, n],
        "matmul_dtype": str(dtype).removeprefix("torch."),
        "matmul_flops_per_s": rate,
        "torch": torch.__version__,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    result = measure(args.device)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(
        f"floors on {args.device}: copy {result['copy_bytes_per_s'] / 1e12:.3f} TB/s, "
        f"{result['matmul_dtype']} matmul {result['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
