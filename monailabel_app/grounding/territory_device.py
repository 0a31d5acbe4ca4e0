"""The lungs' territory (:func:`territory.territory_here`'s voxels) made in torch on a GPU: the planes opened with
the 3 x 3 cross, their 8-connected pieces labelled, each piece's convex hull filled. A GPU reader's focal and
airspace searches make it in slabs over the helper processes: 0.19 s for the benchmark CT's whole volume with eight
helpers, 0.9 s in one thread, 0.04 s here (``fast_path.md``, run DR). **Off in the library**
(:data:`territory.ON_DEVICE`): beside an H100's decode a search box's territory took 0.54-0.57 s (0.05-0.06 s of
its thread's CPU), and the CT reading about 0.2 s longer (runs DS-DU). It waits for the card some 60 times (the
pieces' rounds, the envelopes' rounds, the sizes of what it keeps); neither its stream above the decode's priority
nor 32 hardware queues changed that. With the maps made after the answer it shortened the findings' chains by
0.13 s (run DR).

- **Opening**: :func:`morphology.open_in_plane`'s cross, as shifted views (outside the plane: background).
- **Pieces**: each pair of 8-connected neighbours within a plane joins their trees, the later root hooked under
  the earlier (``scatter_reduce``'s minimum), the trees then flattened by pointer jumps, until no pair lies in two
  trees: each piece's root is its first pixel (C order). The pieces are those of ``scipy.ndimage.label`` with the
  in-plane 8-connected structure; only their numbers differ, and the hulls do not read them.
- **Hulls**: :mod:`hulls`' construction (each row's outermost pixels' edge midpoints in half pixels, the lower
  convex envelope of the left chain and of the negated right chain, a row's bounds read off them in integers),
  with each piece's row extremes gathered from its runs by a sort instead of numpy's ``reduceat``. The same
  whole-number arithmetic, so the same pixels.
"""

from __future__ import annotations

import numpy as np
import torch

from . import maps


def territory_on_device(lungs: np.ndarray, min_pixels: int, device) -> np.ndarray:
    """:func:`territory.territory_here` of ``lungs`` (bool, planes along the first axis), made on ``device`` (a GPU:
    on the calling thread's side stream) and copied back."""
    a = np.ascontiguousarray(lungs, dtype=bool)
    t = torch.from_numpy(a if a.flags.writeable else a.copy())
    if torch.device(device).type != "cuda":
        return territory_torch(t.to(device), min_pixels).cpu().numpy()
    with maps.side_stream():  # not queued behind the model's steps (its upload, work and copy back on this stream)
        return territory_torch(t.pin_memory().to(device, non_blocking=True), min_pixels).cpu().numpy()


def territory_torch(planes: torch.Tensor, min_pixels: int = 20) -> torch.Tensor:
    """bool (planes, rows, columns): the territory of ``planes`` (bool), on their device."""
    sums = planes.sum(dim=(1, 2))
    some = (sums >= min_pixels)[:, None, None]
    big = (sums > 4 * min_pixels)[:, None, None]
    kept = torch.where(big, open_cross(planes), planes) & some
    return (planes & some) | filled(pieces_in_plane(kept), min_pixels)


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


def pieces_in_plane(mask: torch.Tensor) -> torch.Tensor:
    """int64 (the shape of ``mask``): each 8-connected piece of each plane of ``mask`` numbered by its first pixel's
    flat index plus one (C order), 0 outside ``mask``."""
    flat = mask.reshape(-1)
    parent = torch.arange(flat.numel(), device=mask.device)  # a pixel's parent: itself, or a pixel before it
    u, v = _neighbours(mask)
    while len(u):
        ru, rv = parent[u], parent[v]  # (parents are roots: compressed below)
        apart = ru != rv
        u, v, ru, rv = u[apart], v[apart], ru[apart], rv[apart]  # a pair once joined stays joined
        if not len(u):
            break
        parent.scatter_reduce_(0, torch.maximum(ru, rv), torch.minimum(ru, rv), "amin")  # the later root hooked
        while True:  # two jumps a look (each look waits for the device)
            up = parent[parent]
            up = up[up]
            if torch.equal(up, parent):
                break
            parent = up
    return torch.where(flat, parent + 1, 0).reshape(mask.shape)


def _neighbours(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, v): the flat indices of each pair of 8-connected neighbours within a plane, both in ``mask``."""
    z, rows, cols = mask.shape
    index = torch.arange(mask.numel(), device=mask.device).reshape(mask.shape)
    pairs = []
    for dy, dx in ((0, 1), (1, -1), (1, 0), (1, 1)):  # right, down-left, down, down-right: each pair once
        x0, x1 = max(0, -dx), cols - max(0, dx)
        a = (slice(None), slice(0, rows - dy), slice(x0, x1))
        b = (slice(None), slice(dy, rows), slice(x0 + dx, x1 + dx))
        both = mask[a] & mask[b]
        pairs.append((index[a][both], index[b][both]))
    return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])


def filled(labels: torch.Tensor, min_pixels: int) -> torch.Tensor:
    """bool, the shape of ``labels`` (planes, rows, columns; pieces numbered within their plane, 0 none): the union
    of the filled convex hulls of the pieces of at least ``min_pixels`` (:func:`hulls.filled`)."""
    z, rows, cols = labels.shape
    lines = labels.reshape(z * rows, cols)
    piece, line, left, right = _row_extremes(lines, min_pixels)
    out = torch.zeros((z * rows, cols), dtype=torch.bool, device=labels.device)
    if len(piece):
        lo = _bounds(piece, line, left, right, upper=False)
        hi = _bounds(piece, line, left, right, upper=True)
        used, at = torch.unique(line, return_inverse=True)
        count = torch.zeros((len(used), cols + 1), dtype=torch.int32, device=labels.device)
        one = torch.ones(len(at), dtype=torch.int32, device=labels.device)
        count.index_put_((at, lo), one, accumulate=True)  # +1 where a hull's row starts, -1 after its end
        count.index_put_((at, hi + 1), -one, accumulate=True)
        out[used] = torch.cumsum(count, dim=1)[:, :cols] > 0
    return out.reshape(labels.shape)


def _row_extremes(lines: torch.Tensor, min_pixels: int) -> tuple[torch.Tensor, ...]:
    """(piece, line, leftmost column, rightmost column) per line of each piece of at least ``min_pixels``, sorted
    by piece then line (pieces numbered 0.. in the order of their labels)."""
    n_lines, cols = lines.shape
    edge = torch.ones((n_lines, cols + 1), dtype=torch.bool, device=lines.device)  # a boundary before column c
    torch.ne(lines[:, 1:], lines[:, :-1], out=edge[:, 1:cols])
    line, col = torch.nonzero(edge, as_tuple=True)  # raster order: a line's runs lie between its boundaries
    inside = line[1:] == line[:-1]
    line, start, end = line[:-1][inside], col[:-1][inside], col[1:][inside] - 1
    label = lines[line, start]
    labelled = label > 0
    line, start, end, label = line[labelled], start[labelled], end[labelled], label[labelled]
    labels_used, piece = torch.unique(label, return_inverse=True)
    size = torch.zeros(len(labels_used), dtype=torch.int64, device=lines.device).index_add_(0, piece, end - start + 1)
    big = size[piece] >= min_pixels
    piece, line, start, end = piece[big], line[big], start[big], end[big]
    keys, at = torch.unique(piece * n_lines + line, return_inverse=True)  # sorted: by piece, then line
    left = torch.full((len(keys),), cols, dtype=torch.int64, device=lines.device).scatter_reduce_(0, at, start, "amin")
    right = torch.full((len(keys),), -1, dtype=torch.int64, device=lines.device).scatter_reduce_(0, at, end, "amax")
    return keys // n_lines, keys % n_lines, left, right


def _bounds(piece, row, left, right, upper: bool) -> torch.Tensor:
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
    h_min = int(h.min())
    span = int(h.max()) - h_min + 2
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
