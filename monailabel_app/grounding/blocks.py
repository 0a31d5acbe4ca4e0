"""Arrays reduced over ``step`` x ``step`` blocks of their last two axes and given back: the working copies
that a big film's extent, a large CT kind's growth and the anatomy are found on. A remainder of rows or
columns that makes no whole block is left out."""

from __future__ import annotations

import numpy as np


def _crop(a: np.ndarray, step: int) -> np.ndarray:
    return a[..., : a.shape[-2] // step * step, : a.shape[-1] // step * step]


def _planes(a: np.ndarray, step: int):
    """The blocks' strided planes: each block's (i, j) element, for every (i, j) of a block."""
    cropped = _crop(a, step)
    return [cropped[..., i::step, j::step] for i in range(step) for j in range(step)]


# the blocks are reduced a slab of about this many bytes at a time: each of a block's step x step strided
# planes reads every cache line of the array, and a whole CT's 140 MB read 25 times over (step 5) streamed
# 3.5 GB through memory; a slab stays in cache for all of them (79 -> 40 ms on the 2-core VM; 36 ms with 1 MB
# slabs, but four times the numpy calls, each one a hand-over of the interpreter that a GPU's decode loop shares)
SLAB_BYTES = 4 << 20


def _in_slabs(reduce, a: np.ndarray, step: int) -> np.ndarray:
    """``reduce(a, step)`` made a slab at a time (planes of a volume, whole block rows of a plane): each output
    value comes from its own block alone, by the same operations in the same order, so the same values."""
    if a.ndim < 2 or a.nbytes <= 2 * SLAB_BYTES:
        return reduce(a, step)
    if a.ndim >= 3:  # slabs of planes along the first axis
        n = max(1, SLAB_BYTES // max(1, a[0].nbytes))
        parts = [reduce(a[i : i + n], step) for i in range(0, a.shape[0], n)]
        return np.concatenate(parts, axis=0)
    rows = max(1, SLAB_BYTES // max(1, a[:step].nbytes)) * step  # whole block rows of a plane
    usable = a.shape[0] // step * step
    return np.concatenate([reduce(a[i : min(i + rows, usable)], step) for i in range(0, usable, rows)], axis=0)


def block_mean(a: np.ndarray, step: int) -> np.ndarray:
    """float32: ``a`` averaged over the blocks. Whole numbers (bool, 8- and 16-bit integers: a film's pixels,
    a mask) are summed exactly in integers over the blocks' strided planes and divided once: the same float32
    means as averaging them as float32 (whose sums of whole numbers are exact), 4x faster. Other values are
    summed in float32 over the strided planes in a fixed order (see below). Large arrays are reduced a slab
    at a time (:data:`SLAB_BYTES`)."""
    return _in_slabs(_block_mean, np.asarray(a), step)


def _block_mean(a: np.ndarray, step: int) -> np.ndarray:
    if a.dtype == bool or (a.dtype.kind in "iu" and a.itemsize <= 2):
        planes = _planes(a, step)
        total = np.zeros(planes[0].shape, np.int32)
        for p in planes:
            total += p
        return total.astype(np.float32) / np.float32(step * step)
    # each block row's pixels summed along the row, then the block's rows one after another: the order numpy's
    # mean over C-ordered reshaped blocks takes (the same float32 values bit for bit), 3x faster, and the same
    # whatever the input's memory layout (numpy's order follows the layout)
    planes = _planes(np.asarray(a, np.float32), step)  # row by row: (0, 0), (0, 1), ..., (1, 0), ...
    total = None
    for i in range(step):
        row = planes[i * step].copy()
        for p in planes[i * step + 1 : (i + 1) * step]:
            row += p
        total = row if total is None else np.add(total, row, out=total)
    return np.true_divide(total, step * step)


def block_min(a: np.ndarray, step: int) -> np.ndarray:
    """``a``'s minimum over the blocks, in its own dtype (bool: whether the whole block is set), taken over
    the blocks' strided planes (exact in any order; a reshaped multi-axis reduction is 4-8x slower), a slab
    at a time for large arrays."""
    return _in_slabs(_block_min, np.asarray(a), step)


def _block_min(a: np.ndarray, step: int) -> np.ndarray:
    planes = _planes(np.asarray(a), step)
    out = planes[0].copy()
    for p in planes[1:]:
        np.minimum(out, p, out=out)
    return out


def blocks_back(small: np.ndarray, step: int, shape=None, fill=0, out: np.ndarray | None = None) -> np.ndarray:
    """Each value of ``small`` (from :func:`block_mean`) given to its block's pixels, on an array of
    ``shape`` (or written into ``out``, e.g. a box of a larger array); the remainder that made no block gets
    ``fill``.

    Copied in two broadcast assignments (each value to its block's row, each block row to its block's rows),
    which let the interpreter go: ``np.repeat`` held it for the whole copy (a large CT kind's mask, 35 MB: 26-38 ms
    on the H200's host with another thread at 15-20 % of its speed, the GPU's decode loop included;
    ``bench/gil_hold.py``)."""
    out = np.empty(shape, small.dtype) if out is None else out
    rows, cols = small.shape[-2], small.shape[-1]
    h, w = rows * step, cols * step
    lead = small.shape[:-2]
    in_rows = np.broadcast_to(small[..., None], (*small.shape, step)).reshape(*lead, rows, w)  # a copy
    core = out[..., :h, :w]
    st = core.strides
    blocks = np.lib.stride_tricks.as_strided(core, (*lead, rows, step, w), (*st[:-2], st[-2] * step, st[-2], st[-1]))
    blocks[...] = in_rows[..., :, None, :]
    out[..., h:, :] = fill
    out[..., :h, w:] = fill
    return out
