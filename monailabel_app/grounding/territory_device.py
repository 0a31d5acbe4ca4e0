"""The lungs' territory (:func:`territory.territory_here`'s voxels) made in torch on a GPU: the planes opened with
the 3 x 3 cross, their 8-connected pieces found, each piece's convex hull filled. A GPU reader's focal and airspace
searches make it in slabs over the helper processes (0.19 s for the benchmark CT's whole volume with eight helpers,
0.9 s in one thread on an H100's host, run DR; the host's pieces now come from runs too, :func:`hulls._pieces`:
2.4-3.6 times as fast in one thread on the project's CPU). **Off in the library** (:data:`territory.ON_DEVICE`).

Its first version labelled pixels (a tree per pixel, joined through every pair of neighbours): 0.04 s for the whole
volume alone, and with the maps made after the answer it shortened the findings' chains from 0.69 to 0.56 s (run
DR); but beside an H100's decode a search box's territory took 0.24-0.57 s, most of it labelling (0.19 s in run DV),
and the CT reading up to 0.2 s longer (runs DS-DU). Its passes over the box's pixels (gathers of 8-byte indices, some
twenty rounds) competed with the decode for the card's memory, and each of its waits followed one. This version
joins the rows' runs instead (a lung box's runs are some 1 % of its pixels), not yet measured beside the decode.

- **Opening**: :func:`morphology.open_in_plane`'s cross, as shifted views (outside the plane: background).
- **Pieces** (:class:`Runs`): the runs of each row; each pair of runs on consecutive rows of a plane that touch
  (their columns overlap or meet at a corner: 8-connected) joins their trees, the later root hooked under the
  earlier (``scatter_reduce``'s minimum), the trees then flattened by pointer jumps, until no pair lies in two
  trees. The pieces are those of ``scipy.ndimage.label`` with the in-plane 8-connected structure (tested); the
  hulls do not read their numbers.
- **Hulls**: :mod:`hulls`' construction (each row's outermost pixels' edge midpoints in half pixels, the lower
  convex envelope of the left chain and of the negated right chain, a row's bounds read off them in integers),
  with each piece's row extremes gathered from its runs. The same whole-number arithmetic, so the same pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import maps
from .extent import _to_device


def territory_on_device(lungs: np.ndarray, min_pixels: int, device) -> np.ndarray:
    """:func:`territory.territory_here` of ``lungs`` (bool, planes along the first axis), made on ``device`` (a GPU:
    on the calling thread's side stream) and copied back."""
    a = np.ascontiguousarray(lungs, dtype=bool)
    t = torch.from_numpy(a if a.flags.writeable else a.copy())
    with maps.side_stream():  # not queued behind the model's steps (its upload, work and copy back on this stream)
        return territory_torch(_to_device(t, device), min_pixels).cpu().numpy()


def territory_torch(planes: torch.Tensor, min_pixels: int = 20) -> torch.Tensor:
    """bool (planes, rows, columns): the territory of ``planes`` (bool), on their device."""
    sums = planes.sum(dim=(1, 2))
    some = (sums >= min_pixels)[:, None, None]
    big = (sums > 4 * min_pixels)[:, None, None]
    kept = torch.where(big, open_cross(planes), planes) & some
    return (planes & some) | filled(Runs.of(kept), min_pixels)


def open_cross(a: torch.Tensor) -> torch.Tensor:
    """``a`` (bool planes) opened in each plane with the 3 x 3 cross: :func:`morphology.open_in_plane`."""
    eroded = a.clone()
    eroded[:, 1:] &= a[:, :-1]
    eroded[:, :-1] &= a[:, 1:]
    eroded[:, :, 1:] &= a[:, :, :-1]
    eroded[:, :, :-1] &= a[:, :, 1:]
    for edge in (0, -1):  # (slices: an index list would be copied to the device)
        eroded[:, edge] = False
        eroded[:, :, edge] = False
    out = eroded.clone()
    out[:, 1:] |= eroded[:, :-1]
    out[:, :-1] |= eroded[:, 1:]
    out[:, :, 1:] |= eroded[:, :, :-1]
    out[:, :, :-1] |= eroded[:, :, 1:]
    return out


@dataclass
class Runs:
    """The runs of a stack of bool planes along their rows (:meth:`of`), in raster order: each run's line (plane
    times rows plus row), first and last column, and the 8-connected piece of its plane it belongs to (the
    index of the piece's first run)."""

    shape: tuple[int, int, int]
    line: torch.Tensor
    start: torch.Tensor
    end: torch.Tensor
    piece: torch.Tensor

    @classmethod
    def of(cls, mask: torch.Tensor) -> "Runs":
        z, rows, cols = mask.shape
        framed = torch.zeros((z * rows, cols + 2), dtype=torch.int8, device=mask.device)
        framed[:, 1:-1] = mask.reshape(z * rows, cols)
        step = framed[:, 1:] - framed[:, :-1]  # +1 before a run's first column, -1 after its last
        line, start = torch.nonzero(step == 1, as_tuple=True)
        end = torch.nonzero(step == -1, as_tuple=True)[1] - 1  # (the same runs in the same order)
        return cls((z, rows, cols), line, start, end, _joined(len(line), *_touching(line, start, end, rows, cols)))


def _touching(line, start, end, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b): each pair of runs 8-connected across a row (``b`` on the row below ``a``'s, in the same plane: their
    columns overlap or meet at a corner), as indices into the runs (raster order); the host's pairs are found the
    same way in numpy (:func:`hulls._pieces`)."""
    width = cols + 2  # keys of (line, column) with the columns -1..cols
    begins, ends = line * width + start + 1, line * width + end + 1  # both increasing (runs apart on a line)
    below = line + 1
    first = torch.searchsorted(ends, below * width + start)  # the first run below whose end reaches start - 1
    last = torch.searchsorted(begins, below * width + end + 2, right=True) - 1  # the last beginning by end + 1
    count = torch.where(below % rows == 0, 0, (last - first + 1).clamp_min(0))  # (no row below in the plane)
    a = torch.repeat_interleave(torch.arange(len(line), device=line.device), count)
    offset = torch.arange(len(a), device=line.device) - torch.repeat_interleave(torch.cumsum(count, 0) - count, count)
    return a, first[a] + offset


def _joined(n: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int64 (n,): each of ``n`` nodes' root, the least node joined to it through the pairs (``a``, ``b``): each pair's
    later root hooked under its earlier one (``scatter_reduce``'s minimum) and the trees flattened by pointer jumps,
    until no pair lies in two trees."""
    parent = torch.arange(n, device=a.device)  # a node's parent: itself, or a node before it
    while len(a):
        ra, rb = parent[a], parent[b]  # (parents are roots: flattened below)
        apart = ra != rb
        a, b, ra, rb = a[apart], b[apart], ra[apart], rb[apart]  # a pair once joined stays joined
        if not len(a):
            break
        parent.scatter_reduce_(0, torch.maximum(ra, rb), torch.minimum(ra, rb), "amin")
        while True:  # two jumps a look (each look waits for the device)
            up = parent[parent]
            up = up[up]
            if torch.equal(up, parent):
                break
            parent = up
    return parent


def filled(runs: Runs, min_pixels: int) -> torch.Tensor:
    """bool, the shape of the planes of ``runs``: the union of the filled convex hulls of their pieces of at least
    ``min_pixels`` (:func:`hulls.filled`)."""
    z, rows, cols = runs.shape
    piece, line, left, right = _row_extremes(runs, min_pixels)
    out = torch.zeros((z * rows, cols), dtype=torch.bool, device=runs.line.device)
    if len(piece):
        lo = _bounds(piece, line, left, right, False, z * rows)
        hi = _bounds(piece, line, left, right, True, z * rows)
        used, at = torch.unique(line, return_inverse=True)
        count = torch.zeros((len(used), cols + 1), dtype=torch.int32, device=out.device)
        one = torch.ones(len(at), dtype=torch.int32, device=out.device)
        count.index_put_((at, lo), one, accumulate=True)  # +1 where a hull's row starts, -1 after its end
        count.index_put_((at, hi + 1), -one, accumulate=True)
        out[used] = torch.cumsum(count, dim=1)[:, :cols] > 0
    return out.reshape(runs.shape)


def _row_extremes(runs: Runs, min_pixels: int) -> tuple[torch.Tensor, ...]:
    """(piece, line, leftmost column, rightmost column) per line of each piece of at least ``min_pixels``, sorted
    by piece then line."""
    n_lines = runs.shape[0] * runs.shape[1]
    length = runs.end - runs.start + 1
    size = torch.zeros(len(length), dtype=torch.int64, device=length.device).index_add_(0, runs.piece, length)
    big = size[runs.piece] >= min_pixels
    piece, line, start, end = runs.piece[big], runs.line[big], runs.start[big], runs.end[big]
    keys, at = torch.unique(piece * n_lines + line, return_inverse=True)  # sorted: by piece, then line
    left = torch.full((len(keys),), runs.shape[2], dtype=torch.int64, device=keys.device)
    right = torch.full((len(keys),), -1, dtype=torch.int64, device=keys.device)
    left.scatter_reduce_(0, at, start, "amin")
    right.scatter_reduce_(0, at, end, "amax")
    return keys // n_lines, keys % n_lines, left, right


def _bounds(piece, row, left, right, upper: bool, n_lines: int) -> torch.Tensor:
    """Per (piece, row): the first (``upper`` False) or last column whose centre lies in the piece's hull
    (:func:`hulls._bounds`' chain and rounding)."""
    c = -2 * right if upper else 2 * left  # lower envelopes only: the right chain negated
    first = torch.ones(len(piece), dtype=torch.bool, device=piece.device)
    first[1:] = piece[1:] != piece[:-1]
    last = torch.ones(len(piece), dtype=torch.bool, device=piece.device)
    last[:-1] = piece[1:] != piece[:-1]
    nxt = torch.where(last, c, torch.roll(c, -1))
    h = torch.cat([2 * row, 2 * row + 1, 2 * row[first] - 1])
    v = torch.cat([c - 1, torch.minimum(c, nxt), c[first]])
    p = torch.cat([piece, piece, piece[first]])
    h_min, span = -1, 2 * n_lines + 3  # h lies in -1 .. 2 n_lines + 1 (known: no wait for the device)
    key = p * span + (h - h_min)
    key, order = torch.sort(key)  # by piece, then h (each pair once)
    h, v, p = h[order], v[order], p[order]
    keep = _lower_envelope(p, h, v)
    key, h, v = key[keep], h[keep], v[keep]
    # each row centre's envelope segment: the last vertex at or above it (the chain starts above the first row)
    at = torch.searchsorted(key, piece * span + (2 * row - h_min), right=True) - 1
    h0, v0, h1, v1 = h[at], v[at], h[at + 1], v[at + 1]
    num = v0 * (h1 - h0) + (v1 - v0) * (2 * row - h0)  # the envelope at 2 row, times (h1 - h0) > 0
    den = 2 * (h1 - h0)
    floor = torch.div(-num, den, rounding_mode="floor")
    return floor if upper else -floor


def _lower_envelope(p: torch.Tensor, h: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Indices of the vertices of each piece's lower convex envelope of the points (``h``, ``v``), sorted by piece
    ``p`` then ``h``: :func:`hulls._lower_envelope`'s rounds, every point on or above the chord of its neighbours
    dropped at once."""
    idx = torch.arange(len(h), device=h.device)
    while len(idx) > 2:
        pp, hh, vv = p[idx], h[idx], v[idx]
        same = (pp[:-2] == pp[1:-1]) & (pp[2:] == pp[1:-1])
        above = (vv[1:-1] - vv[:-2]) * (hh[2:] - hh[:-2]) >= (vv[2:] - vv[:-2]) * (hh[1:-1] - hh[:-2])
        inner = torch.zeros(len(idx), dtype=torch.bool, device=h.device)
        inner[1:-1] = same & above
        kept = idx[~inner]
        if len(kept) == len(idx):
            break
        idx = kept
    return idx
