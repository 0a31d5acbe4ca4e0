"""A gated map's peak regions found on the maps device (a GPU), where its values already are.

:func:`maps.peak_regions` thresholds a finding's gated map on the CPU and labels every piece above the level
to keep the one at the peak (a helper process's cc3d on a GPU's host). Here the map stays on the device: the
voxels above the level are a bool tensor, and the piece at the peak is grown from the peak one ring of
neighbours at a time (faces, edges and corners: the 26 neighbours :func:`maps.peak_region` connects through),
each step kept inside the voxels above the level, until a few steps add nothing. The same voxels as the
labelling's piece, bit for bit: the same values, compared with the same level in float32 (tested against
:func:`maps.peak_regions` on the CPU, and on the lent GPU).

Each step is six in-place maxima over a box around the peak that grows with the steps (the piece cannot
reach farther from its peak than one voxel a step), so a small piece costs little however large the gate's
box; only the pieces come back to the host, one byte a voxel.
"""

from __future__ import annotations

import numpy as np
import torch

from ..allocator import zeros

STEPS = 8  # ring steps between two looks at the piece's size (each look waits for the device)


def span(sub: torch.Tensor, support: tuple[slice, ...], shape) -> tuple[float, float]:
    """:func:`maps.support_range` of a map that is ``sub`` on the box ``support`` of ``shape`` and zero
    elsewhere: (minimum, maximum), one look at the device."""
    lo, hi = (float(v) for v in torch.stack(torch.aminmax(sub)).cpu())
    if sub.numel() < int(np.prod(shape)):  # the zeros outside the box
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    return lo, hi


def _grow(piece: torch.Tensor, scratch: torch.Tensor) -> None:
    """``piece`` (bool) grown in place by its 26 neighbours: a maximum over three voxels along each axis in
    turn (``scratch``: a tensor of the same shape to hold each axis' input)."""
    for axis in range(piece.ndim):
        n = piece.shape[axis]
        if n < 2:
            continue
        scratch.copy_(piece)
        ahead, behind = piece.narrow(axis, 1, n - 1), piece.narrow(axis, 0, n - 1)
        torch.logical_or(ahead, scratch.narrow(axis, 0, n - 1), out=ahead)
        torch.logical_or(behind, scratch.narrow(axis, 1, n - 1), out=behind)


def piece_at(above: torch.Tensor, point: tuple[int, ...], steps: int = STEPS) -> torch.Tensor:
    """bool tensor: the piece of ``above`` (connected through faces, edges and corners) that holds ``point``
    (a voxel of ``above``)."""
    piece = torch.zeros_like(above)
    piece[point] = True
    done, size = 0, 1
    while True:
        done += steps  # the piece lies within ``done`` voxels of the point after these steps
        window = tuple(slice(max(0, p - done), min(n, p + done + 1)) for p, n in zip(point, above.shape))
        grown, allowed = piece[window], above[window]
        scratch = torch.empty_like(grown)
        for _ in range(steps):
            _grow(grown, scratch)
            grown &= allowed
        now = int(torch.count_nonzero(grown))
        if now == size:
            return piece
        size = now


def _bounds(mask: torch.Tensor) -> tuple[slice, ...] | None:
    """The bounding box of ``mask`` (bool tensor), None when it is empty: one look at the device."""
    axes = torch.cat([mask.any(dim=tuple(a for a in range(mask.ndim) if a != axis)) for axis in range(mask.ndim)])
    found = [np.flatnonzero(a) for a in np.split(axes.cpu().numpy(), np.cumsum(mask.shape)[:-1])]
    if not found[0].size:
        return None
    return tuple(slice(int(f[0]), int(f[-1]) + 1) for f in found)


def _first_at(values: torch.Tensor, top: float) -> tuple[int, ...]:
    """:func:`maps.first_at` on the device: the first voxel (C order) of ``values`` equal to ``top``."""
    flat = int(torch.argmax((values == top).reshape(-1).to(torch.uint8)))
    return tuple(int(i) for i in np.unravel_index(flat, tuple(values.shape)))


def _shifted(outer: tuple[slice, ...], inner: tuple[slice, ...]) -> tuple[slice, ...]:
    return tuple(slice(o.start + i.start, o.start + i.stop) for o, i in zip(outer, inner))


def peak_regions(sub: torch.Tensor, support: tuple[slice, ...], shape, thresholds,
                 span_: tuple[float, float] | None = None) -> list[np.ndarray] | None:
    """:func:`maps.peak_regions` of the map that is ``sub`` (a tensor on the maps device) on the box
    ``support`` of ``shape`` and zero elsewhere (a gated map on its gate's box): bool numpy arrays of
    ``shape``, in the order of ``thresholds``; None where a level is not above zero (the zeros outside the
    box would be above it: the CPU labels the whole map then). ``span_``: :func:`span`, when known."""
    lo, hi = span(sub, support, shape) if span_ is None else span_
    out = [zeros(tuple(shape), bool) for _ in thresholds]
    if not hi - lo >= 1e-12:
        return out
    if hi <= 0 or min(lo + t * (hi - lo) for t in thresholds) <= 0:
        return None
    box, values = support, sub
    for k in sorted(range(len(thresholds)), key=lambda k: thresholds[k]):
        above = values >= lo + thresholds[k] * (hi - lo)
        inner = _bounds(above)  # everything above: the peak is in it
        if inner is None:  # a level above the peak
            return out
        above, values = above[inner], values[inner]
        piece = piece_at(above, _first_at(values, hi))
        own = _bounds(piece)  # the piece's own box: the next (higher) level's piece lies in it
        piece, values = piece[own], values[own]
        box = _shifted(box, _shifted(inner, own))
        out[k][box] = piece.cpu().numpy()
    return out
