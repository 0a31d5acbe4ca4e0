"""Gemma 3's RMS norms as one compiled kernel each during a GPU prefill.

transformers' ``Gemma3RMSNorm`` runs eagerly as about eight kernels (to float32, square, mean, add, reciprocal
square root, two products, back to the model's dtype), each a full pass over its input. A CT prompt (22.5k
tokens) goes through six norms in each of the 34 text layers (before and after attention and the MLP, and the
queries' and keys' norms), each input 115 MB in bf16: passes of 230 MB in float32. Compiled, each norm is one
reduction kernel that reads its input once and writes its output once, with the same float32 arithmetic
(``bench/results/fast_path.md``).

The decode step is compiled as a whole already (:mod:`decoding`), so only the prefill needs this:
:func:`installed` gives the model's norms the compiled forward for the block and restores them after. Used on
CUDA when the decode step is compiled (``MEDGEMMA_COMPILE``), for prefills of :data:`MIN_TOKENS` tokens or more
(a CT, a batch of films: a single film's prefill was the same either way); elsewhere the norms stay
transformers' own.
"""

from __future__ import annotations

import logging
import types
from contextlib import contextmanager

import torch

logger = logging.getLogger(__name__)

ENABLED = True  # the benchmark's A/B switch
MIN_TOKENS = 4096  # prompt tokens in the batch from which the norms are compiled: a film's 278 gain nothing


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma 3's RMS norm: ``x`` scaled by the reciprocal root of its mean square over the last axis and by
    ``1 + weight``, in float32, returned in ``x``'s dtype (transformers' ``Gemma3RMSNorm.forward``)."""
    y = x.float()
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    return (y * (1.0 + weight.float())).type_as(x)


_compiled = None
_failed: list[str] = []  # why compiling failed (then every norm runs eagerly)


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    global _compiled
    if not _failed:
        try:
            if _compiled is None:
                _compiled = torch.compile(rms_norm, dynamic=True, fullgraph=True)
            return _compiled(x, self.weight, self.eps)
        except Exception as e:  # noqa: BLE001  (no Triton, an unsupported dtype: transformers' arithmetic)
            _failed.append(str(e).splitlines()[0] if str(e) else type(e).__name__)
            logger.warning("compiling the RMS norms failed (%s): they run eagerly", _failed[0])
    return rms_norm(x, self.weight, self.eps)


def norms(model) -> list:
    """``model``'s Gemma 3 RMS norm modules (by class name: the text and multimodal models have their own)."""
    return [m for m in model.modules() if type(m).__name__.endswith("RMSNorm") and type(m).__name__.startswith("Gemma")
            and isinstance(getattr(m, "eps", None), float) and isinstance(getattr(m, "weight", None), torch.Tensor)]


def wanted(model, compile: bool, tokens: int) -> bool:
    """On CUDA, with the decode step compiled, for a prefill of at least :data:`MIN_TOKENS` tokens (a CT, a
    batch of films): a film's norms are launches of tiny kernels, which a compiled call does not shorten."""
    return ENABLED and compile and model.device.type == "cuda" and tokens >= MIN_TOKENS


@contextmanager
def installed(model, compile: bool, tokens: int = MIN_TOKENS):
    """``model``'s RMS norms run as one compiled kernel each inside the block (:func:`wanted`) for a prefill of
    ``tokens`` (the batch's); as they were after it."""
    found = norms(model) if wanted(model, compile, tokens) else []
    for module in found:
        module.forward = types.MethodType(_forward, module)
    try:
        yield len(found)
    finally:
        for module in found:
            module.__dict__.pop("forward", None)  # (generations are one at a time: the reader's model lock)
