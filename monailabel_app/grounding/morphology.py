"""In-plane binary opening, closing and dilation of a stack of planes with numpy shifts: scipy's
``binary_opening``, ``binary_closing`` and ``binary_dilation`` with a 3 x 3 cross or square in each plane
(outside the array counts as background, as scipy's ``border_value=0``), the same voxels (tested), in a third
of the time or less on a CT box: the lung territory and the aerated lung open every plane of every box they
are given, and the CT's lungs are closed and widened plane by plane."""

from __future__ import annotations

import numpy as np


def _pair(ndim: int, axis: int) -> tuple[tuple, tuple]:
    """Index tuples of all but the last and all but the first element along ``axis``."""
    lo, hi = [slice(None)] * ndim, [slice(None)] * ndim
    lo[axis], hi[axis] = slice(None, -1), slice(1, None)
    return tuple(lo), tuple(hi)


def _erode(a: np.ndarray, axes) -> np.ndarray:
    """Each voxel and its two neighbours along each of ``axes`` (the array's edge: background)."""
    out = a.copy()
    for axis in axes:
        lo, hi = _pair(a.ndim, axis)
        out[hi] &= a[lo]
        out[lo] &= a[hi]
        edge = [slice(None)] * a.ndim
        for end in (0, -1):
            edge[axis] = end
            out[tuple(edge)] = False
    return out


def _dilate(a: np.ndarray, axes) -> np.ndarray:
    """Each voxel or either neighbour along each of ``axes``."""
    out = a.copy()
    for axis in axes:
        lo, hi = _pair(a.ndim, axis)
        out[hi] |= a[lo]
        out[lo] |= a[hi]
    return out


def open_in_plane(mask: np.ndarray, square: bool = False, iterations: int = 1) -> np.ndarray:
    """bool: ``mask`` (2-D, or planes along the first axis) opened in each plane with a 3 x 3 cross
    (``square``: the full 3 x 3 square), eroded ``iterations`` times and then dilated as often, never across
    planes."""
    return dilate_in_plane(_erode_in_plane(mask, iterations, square), iterations, square)


def close_in_plane(mask: np.ndarray, iterations: int = 1) -> np.ndarray:
    """bool: ``mask`` (2-D, or planes along the first axis) closed in each plane with a 3 x 3 cross, dilated
    ``iterations`` times and then eroded as often (scipy's ``binary_closing``), never across planes."""
    return _erode_in_plane(dilate_in_plane(mask, iterations, square=False), iterations, square=False)


def _erode_in_plane(mask: np.ndarray, iterations: int, square: bool) -> np.ndarray:
    """bool: ``mask`` eroded ``iterations`` times in each plane with the 3 x 3 square (its row segment, then
    its column segment) or the cross (a pixel and its four edge neighbours)."""
    a = np.asarray(mask, bool)
    rows, cols = a.ndim - 2, a.ndim - 1
    for _ in range(iterations):
        a = _erode(_erode(a, [rows]), [cols]) if square else _erode(a, [rows, cols])
    return a


def dilate_in_plane(mask: np.ndarray, iterations: int = 1, square: bool = True) -> np.ndarray:
    """bool: ``mask`` (2-D, or planes along the first axis) dilated ``iterations`` times in each plane with the
    full 3 x 3 square (its row segment, then its column segment; not ``square``: the cross), never across
    planes."""
    a = np.asarray(mask, bool)
    if iterations < 1:
        return a.copy()  # never the caller's own array back
    rows, cols = a.ndim - 2, a.ndim - 1
    for _ in range(iterations):
        a = _dilate(_dilate(a, [rows]), [cols]) if square else _dilate(a, [rows, cols])
    return a
