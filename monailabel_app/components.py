"""Connected components of a bool array, the one labelling the masks' code uses.

3-D arrays (CT volumes and their boxes) are labelled with cc3d (``connected-components-3d``): the same
components as ``scipy.ndimage.label`` with the same connectivity, numbered in the same raster order (tested),
in a fifth of the time on a CT's thresholded attention (38 ms against 186 ms for a 134 x 478 x 264 box on
this project's 2-core CPU). 2-D arrays stay with scipy: cc3d numbers a plane's 8-connected pieces in
another order."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from . import helper_processes


def label(mask: np.ndarray, full: bool = False) -> tuple[np.ndarray, int]:
    """(labels, n): the connected pieces of ``mask`` numbered 1..n (0: background), connected through faces
    (6 neighbours in 3-D, 4 in 2-D) or, ``full``, also through edges and corners (26, 8). A large 3-D mask
    goes to a helper process where there are any (:mod:`helper_processes`)."""
    mask = np.asarray(mask, bool)
    if mask.ndim == 3:
        done = helper_processes.call("label", mask, full)
        if done is not None:
            return done
    return label_here(mask, full)


def label_here(mask: np.ndarray, full: bool = False) -> tuple[np.ndarray, int]:
    """:func:`label` in this thread."""
    mask = np.asarray(mask, bool)
    if mask.ndim == 3 and mask.size:
        import cc3d

        labels, n = cc3d.connected_components(mask, connectivity=26 if full else 6, return_N=True,
                                              out_dtype=np.uint32)
        return labels, int(n)
    return ndimage.label(mask, structure=np.ones((3,) * mask.ndim, bool) if full else None)


def largest(mask: np.ndarray) -> np.ndarray:
    """bool: the largest piece of ``mask`` (connected through faces); all False when ``mask`` is empty."""
    labels, n = label(mask)
    if n == 0:
        return np.zeros(np.shape(mask), bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))
