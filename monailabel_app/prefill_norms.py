"""A long prompt's RMSNorms, one compiled kernel each, on a GPU.

Gemma 3's RMSNorm works in float32: its input cast up, squared, averaged, scaled, multiplied by ``1 + weight``
and cast back, seven kernels in eager mode, five of them over the whole (tokens x width) tensor. A CT's
22.5k-token prefill runs 204 of them (six per text layer: around attention and MLP, and on the queries and
keys), each reading and writing float32 copies of up to 230 MB: about 0.2 s of an H200's 2.0 s prefill
(``bench/results/fast_path_profiles.md``, run AS). Here the same arithmetic is compiled once (``torch.compile``,
shapes dynamic) into one kernel that reads the bf16 input and writes the bf16 output; its mean is summed in
another order than eager's (float32 rounding), as the compiled decode step's norms already are.

Only for a long prefill (:data:`prefill_attention.LONG`) on a GPU; ``MEDGEMMA_FUSED_NORMS=0`` keeps the
library's own norms. A compile that fails leaves the eager norms, with a warning.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

import torch

logger = logging.getLogger(__name__)

FUSED_ENV = "MEDGEMMA_FUSED_NORMS"  # "0": a long prefill keeps the library's own (eager) RMSNorms
NORM_CLASS = "Gemma3RMSNorm"

_COMPILED: dict = {}  # "fn": the compiled norm; "failed": why it could not be compiled


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma 3's RMSNorm of ``x`` (transformers' ``Gemma3RMSNorm.forward``, the same operations in order)."""
    out = x.float()
    out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + eps)
    return (out * (1.0 + weight.float())).type_as(x)


def wanted(model, new_tokens: int) -> bool:
    """Whether a prefill of ``new_tokens`` on ``model`` runs its RMSNorms compiled."""
    from .prefill_attention import LONG

    if os.environ.get(FUSED_ENV, "1").strip() == "0" or "failed" in _COMPILED:
        return False
    return model.device.type == "cuda" and new_tokens >= LONG


def _compiled():
    if "fn" not in _COMPILED:
        from .decoding import use_compile_cache

        use_compile_cache()
        _COMPILED["fn"] = torch.compile(rms_norm, dynamic=True)
    return _COMPILED["fn"]


def _forward(module, x: torch.Tensor) -> torch.Tensor:
    if "failed" not in _COMPILED:
        try:
            return _compiled()(x, module.weight, module.eps)
        except Exception as e:  # noqa: BLE001 (no compiler here: the eager norms, as before)
            _COMPILED["failed"] = f"{type(e).__name__}: {str(e)[:300]}"
            logger.warning("the prefill's RMSNorms cannot be compiled (%s): eager norms", _COMPILED["failed"])
    return rms_norm(x, module.weight, module.eps)


@contextmanager
def fused(model, on: bool = True):
    """In the block, the language model's RMSNorms through the compiled kernel (``on``: else nothing changes)."""
    norms = [m for m in model.model.language_model.modules() if type(m).__name__ == NORM_CLASS] if on else []
    for m in norms:
        m.forward = _forward.__get__(m)  # this instance only, for this block
    try:
        yield
    finally:
        for m in norms:
            m.__dict__.pop("forward", None)
