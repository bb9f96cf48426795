"""Run-time shims that let the unmodified Fast-dLLM / Streaming-dLLM code run
under the installed torch and transformers (written against transformers
4.46-4.49; the GPU machine has 5.x). Nothing here edits their files: each
shim patches a module attribute or installs a stand-in module, only when the
installed version lacks what the reference expects, and is listed in
`APPLIED` so that the report can say which ones were in force.
"""

from __future__ import annotations

import sys
import types

APPLIED: list[str] = []


def _einops_stub() -> None:
    """Fast-dLLM's modeling_llada.py imports einops.rearrange at module level
    but calls it only in LLaDABlockDiffBlock.cross_attn_flex (block-diffusion
    training with flex attention), never on the inference paths used here.
    When einops is not installed, a stand-in module makes the import work and
    fails loudly if the function is ever called."""
    try:
        import einops  # noqa: F401

        return
    except ImportError:
        pass
    mod = types.ModuleType("einops")

    def rearrange(*args, **kwargs):
        raise RuntimeError("einops is not installed (bench/compare stand-in): rearrange was called")

    mod.rearrange = rearrange
    mod.__dict__["__dllm_compare_stub__"] = True
    sys.modules["einops"] = mod
    APPLIED.append("einops: stand-in module (rearrange is imported but unused on inference paths)")


def _rope_default() -> None:
    """transformers 5 dropped the "default" entry of ROPE_INIT_FUNCTIONS; Dream's
    DreamRotaryEmbedding (and Streaming-dLLM's LLaDA RotaryEmbedding, which
    only looks it up) index it by that name. Restore it with the 4.x formula:
    inv_freq = 1 / base^(arange(0, dim, 2) / dim), attention scaling 1."""
    import torch
    from transformers import modeling_rope_utils as mru

    if "default" in mru.ROPE_INIT_FUNCTIONS:
        return

    def _compute_default_rope_parameters(config=None, device=None, seq_len=None, **rope_kwargs):
        if config is not None and not rope_kwargs:
            base = getattr(config, "rope_theta", None)
            if base is None:
                base = (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
            partial = getattr(config, "partial_rotary_factor", 1.0)
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            dim = int(head_dim * partial)
        else:
            base, dim = rope_kwargs["base"], rope_kwargs["dim"]
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))
        return inv_freq, 1.0

    mru.ROPE_INIT_FUNCTIONS["default"] = _compute_default_rope_parameters
    APPLIED.append('transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["default"]: restored (removed in transformers 5)')


def install() -> None:
    """Apply every shim the installed packages need. Call before importing the
    reference code."""
    _einops_stub()
    _rope_default()
