"""The lower envelopes of the GPU's inside distance (:func:`distances.squared_inside_torch`) in one Triton kernel.

Per line of ``n`` values ``f`` and voxel ``i`` it gives ``min_q f[q] + (w (i - q))^2``, as torch's broadcast
``amin`` there does, with the same float64 operations in the same order and no fused multiply-add (so the same
values), but without the ``(lines, n, n)`` block that torch writes to the card's memory and reads back: each
program reads its line once and keeps the candidates in registers. Beside a decode that reads the weights at the
card's bandwidth, that block was the cost (run CW: 0.07-0.08 ms a token on an H100, four to eight calls a
reading).

Imported only where it is used (a GPU reader's deepest voxels): Triton compiles the kernel on its first call, once
for all line lengths. ``TRITON_INTERPRET=1`` runs it on the CPU (the tests)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_I = 64  # voxels of a line per program
BLOCK_Q = 64  # candidates per step of its loop
# Triton's compile options at launch: no fused multiply-adds (its default fuses them). torch's blocks round the
# square before the sum, and so must the kernel: fused, its values differed from torch's by up to 2.8e-14 on an
# H100 (run CX), where the PTX had an fma.rn.f64 for each mul.rn.f64 + add
OPTIONS = {"enable_fp_fusion": False}


@triton.jit
def _envelope(f_ptr, out_ptr, n, w_ptr, BLOCK_I: tl.constexpr, BLOCK_Q: tl.constexpr):
    line = tl.program_id(0).to(tl.int64)
    w = tl.load(w_ptr)  # float64 (a Python float argument would be compiled as float32)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    best = tl.full([BLOCK_I], float("inf"), tl.float64)
    for q0 in range(0, n, BLOCK_Q):
        q = q0 + tl.arange(0, BLOCK_Q)
        fq = tl.load(f_ptr + line * n + q, mask=q < n, other=float("inf"))
        reach = (i[:, None] - q[None, :]).to(tl.float64) * w
        best = tl.minimum(best, tl.min(fq[None, :] + reach * reach, axis=1))
    tl.store(out_ptr + line * n + i, best, mask=i < n)


def lower_envelopes(flat: torch.Tensor, w: float) -> torch.Tensor:
    """float64 ``(lines, n)``: per line its lower envelope under parabolas of width ``w`` (see the module)."""
    flat = flat.contiguous()
    lines, n = flat.shape
    out = torch.empty_like(flat)
    if flat.numel():
        width = torch.full((1,), float(w), dtype=torch.float64, device=flat.device)
        _envelope[(lines, triton.cdiv(n, BLOCK_I))](flat, out, n, width, BLOCK_I=BLOCK_I, BLOCK_Q=BLOCK_Q, **OPTIONS)
    return out
