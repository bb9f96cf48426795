"""Where CUDA 13's cuBLASLt is on this machine, found the same way by every
script that starts dllm on a GPU (scripts/gpu_run.py, bench/compare/compare.py).

dllm opens `libcublasLt.so.13` at run time by name, so its folder must be on
LD_LIBRARY_PATH. Looked for, in order: the folder $DLLM_CUBLASLT_DIR names;
the nvidia-cublas wheel of this python (nvidia/cu13/lib, which PyTorch's CUDA
13 builds install); the CUDA toolkit (/usr/local/cuda).

    python3 scripts/cuda_libs.py      # prints the folder, or why there is none
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

LIBRARY = "libcublasLt.so.13"
TOOLKIT_DIRS = ("/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib")


def candidates() -> list[Path]:
    found = []
    if os.environ.get("DLLM_CUBLASLT_DIR"):
        found.append(Path(os.environ["DLLM_CUBLASLT_DIR"]))
    try:
        import nvidia  # the namespace package of NVIDIA's wheels

        found += [Path(p) / "cu13" / "lib" for p in nvidia.__path__]
    except ImportError:
        pass
    found += [Path(d) for d in TOOLKIT_DIRS]
    return found


def cublaslt_dir() -> Path | None:
    """The first candidate folder that holds libcublasLt.so.13."""
    return next((d for d in candidates() if (d / LIBRARY).exists()), None)


def with_cublaslt(env: dict[str, str]) -> dict[str, str]:
    """`env` with the cuBLASLt folder first on LD_LIBRARY_PATH (unchanged
    when there is none: dllm then says what is missing)."""
    found = cublaslt_dir()
    if found is None:
        return dict(env)
    path = env.get("LD_LIBRARY_PATH")
    return dict(env, LD_LIBRARY_PATH=f"{found}:{path}" if path else str(found))


def describe() -> str:
    """The library found (its real file name carries the version), for reports."""
    found = cublaslt_dir()
    if found is None:
        return f"{LIBRARY} not found (looked in: {', '.join(map(str, candidates()))})"
    return str((found / LIBRARY).resolve())


if __name__ == "__main__":
    print(describe())
    sys.exit(0 if cublaslt_dir() else 1)
