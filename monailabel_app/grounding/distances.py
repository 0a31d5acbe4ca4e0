"""Euclidean distance inside a mask, the one the masks' code uses (the image extent's openings, deepest
voxels and reaches).

Computed with ``edt`` (the seung-lab package, LGPL-3.0 like cc3d): scipy's ``distance_transform_edt``
with ``sampling`` to float32 rounding (tested; 3e-6 mm at most on a real CT's regions), 2.4 times faster
on those regions on this project's 2-core CPU (0.45 s against 1.06 s for the 13 regions of one reading)."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import numpy as np

from . import helper_processes

logger = logging.getLogger(__name__)

if TYPE_CHECKING:  # (torch is imported where it is used: the helper processes import this module without it)
    import torch


def inside(mask: np.ndarray, spacing) -> np.ndarray:
    """float32, ``mask``'s shape: per voxel of ``mask``, the distance (in ``spacing``'s units per axis) to the
    nearest voxel outside it; 0 outside. The array's edge is not a border (as scipy's). A large mask goes to a
    helper process where there are any (:mod:`helper_processes`); else it is computed here, a mask of
    :data:`THREADED_VOXELS` or more on :data:`THREADS` of edt's own threads (edt holds the interpreter's lock for
    the whole call, so no other map thread runs meanwhile)."""
    spacing = tuple(float(s) for s in spacing)
    large = np.size(mask) >= THREADED_VOXELS
    done = helper_processes.call("inside", np.asarray(mask, bool), spacing, HELPER_THREADS if large else 1)
    if done is not None:
        return done[0]
    return inside_here(mask, spacing, min(THREADS, os.cpu_count() or 1) if large else 1)


# edt's threads for a distance made in a map thread: on this project's 2-core CPU two made the CT's maps 2.94-3.09
# -> 2.70-2.74 s; more threads than free cores made a call up to 5 times slower (16 on 2 cores), and below about
# 2^16 voxels a second thread gains nothing (cpu_maps.md)
THREADS = 2
THREADED_VOXELS = 1 << 16
# edt's threads for a distance made in a helper process: one (a helper per call; eight helpers on the H200's 16
# cores). Four gained nothing in run CJ (a reading 3.34 s against 3.26, fast_path.md), when the maps after the
# answer took 0.9 s; bench/prefill_ab.py's ``edt-N`` variant tries N again
HELPER_THREADS = 1


def inside_here(mask: np.ndarray, spacing, threads: int = 1) -> np.ndarray:
    """:func:`inside` in this thread, on ``threads`` of edt's own (the same distances on any number: each
    line of a pass is computed alone, tested); a helper process uses one."""
    import edt

    mask = np.ascontiguousarray(mask, dtype=bool)
    if mask.size == 0:
        return np.zeros(mask.shape, np.float32)
    return edt.edt(mask, anisotropy=tuple(float(s) for s in spacing), black_border=False, parallel=max(1, threads))


# elements of a min-plus pass's (lines, L, L) block made at a time (float64: 128 MB on the device)
BLOCK_ELEMENTS = 1 << 24
# a GPU's lower envelopes in one Triton kernel (envelope_kernel: the same values without writing those blocks to the
# card's memory, beside a decode that reads the weights at its bandwidth); False: torch's blocks there too
ENVELOPE_KERNEL = True


def squared_inside_torch(mask: torch.Tensor, spacing, kernel: bool | None = None) -> torch.Tensor:
    """float64 on ``mask``'s device (a 3-D bool tensor): per voxel the squared distance (``spacing``'s units
    per axis) to the nearest voxel outside ``mask``, the array's edge not a border (as :func:`inside`); 0
    outside, inf everywhere when no voxel is outside. Separable (Saito and Toriwaki's decomposition, exact):
    along the last axis the nearest outside voxel before and after each voxel, then along each other axis the
    lower envelope ``min_q f[q] + (w (i - q))^2``, taken whole over each line (``L^2`` a line of ``L``
    voxels: a GPU's work, for a few parts of millions of voxels, where edt holds a CPU core for 0.1-0.2 s).
    ``kernel``: the envelopes in one Triton kernel (:mod:`envelope_kernel`; the default on a GPU where
    :data:`ENVELOPE_KERNEL`) instead of torch's blocks (the same values). Where the default kernel cannot be
    built (no Triton, no compiler for its launcher), a warning says so once and the blocks are used from then on."""
    global ENVELOPE_KERNEL
    import torch

    z, y, x = mask.shape
    dtype, inf = torch.float64, float("inf")
    index = torch.arange(x, dtype=dtype, device=mask.device).expand(z, y, x)
    outside = ~mask
    before = torch.where(outside, index, -inf).cummax(dim=2).values
    after = torch.where(outside, index, inf).flip(2).cummin(dim=2).values.flip(2)
    f = (torch.minimum(index - before, after - index) * float(spacing[2])) ** 2
    chosen = kernel is not None
    if not chosen:
        kernel = _kernel_by_default(mask)
    for axis in (1, 0):
        lines = f.movedim(axis, -1).contiguous()
        flat, w = lines.reshape(-1, lines.shape[-1]), float(spacing[axis])
        if kernel:
            try:
                from .envelope_kernel import lower_envelopes

                out = lower_envelopes(flat, w)
            except Exception as e:  # noqa: BLE001 (the blocks give the same values)
                if chosen:
                    raise
                logger.warning("the GPU's distance kernel failed (%s: %s); torch's blocks from now on",
                               type(e).__name__, str(e)[:300])
                ENVELOPE_KERNEL = kernel = False
        if not kernel:
            out = _envelopes_in_blocks(flat, w)
        f = out.reshape(lines.shape).movedim(-1, axis)
    return f


def _kernel_by_default(mask: torch.Tensor) -> bool:
    return mask.is_cuda and ENVELOPE_KERNEL


def _envelopes_in_blocks(flat: torch.Tensor, w: float) -> torch.Tensor:
    """:func:`squared_inside_torch`'s lower envelopes of ``flat``'s lines by torch's broadcast ``amin`` over
    blocks of :data:`BLOCK_ELEMENTS`. A line wholly outside (all 0) stays 0 and is skipped (30-87 % of the lines
    of the real CT's deepest parts)."""
    import torch

    n = flat.shape[-1]
    at = torch.arange(n, dtype=torch.float64, device=flat.device)
    reach = ((at[:, None] - at[None, :]) * w) ** 2  # (i, q)
    active = flat.any(dim=1).nonzero().squeeze(1)
    out = torch.zeros_like(flat)
    rows = max(1, BLOCK_ELEMENTS // (n * n))
    for s in range(0, active.numel(), rows):
        at_rows = active[s : s + rows]
        out[at_rows] = torch.amin(flat[at_rows, None, :] + reach, dim=2)
    return out
