"""The lungs' territory (:func:`territory`): per plane, the convex hull of each piece of aerated lung. Each
plane's territory is its own, so a CT box's planes may be split among helper processes
(:func:`helper_processes.in_slabs`) and made side by side: on a GPU reader a focal finding's search spends
much of its time here. It can also be made on the GPU (:mod:`territory_device`, the same voxels; off: slower
beside the decode)."""

from __future__ import annotations

import numpy as np

from . import helper_processes, hulls
from .morphology import open_in_plane

# a GPU reader's CT territories made on its GPU (territory_device) instead of in slabs over the helper processes.
# Off: its first version (pixels labelled) made the H100's CT reading 2.54-2.80 s (eight of nine readings 2.71-2.80
# s) against 2.52-2.57 s without (three A/Bs beside the decode, runs DS-DU), though with the maps made after the
# answer it shortened the findings' chains from 0.69 to 0.56 s (medians, run DR); the version on the rows' runs
# is not yet measured beside the decode (prefill_ab.py's territory-gpu)
ON_DEVICE = False


def territory(lungs: np.ndarray, min_pixels: int = 20, device=None) -> np.ndarray:
    """The lungs' territory: per plane, the convex hull of each piece of aerated lung (``lungs``, found by its
    values) of at least ``min_pixels``. A lesion against the chest wall or the mediastinum dents the aerated
    lung; the hull takes it in, while the chest wall outside the lung's curve stays out. A plane of fewer
    than ``min_pixels`` lung pixels has no territory; a plane of more than four times that is opened (a
    3 x 3 cross) before its pieces are found. A large box's planes go to the helper processes in slabs where
    there are any; with :data:`ON_DEVICE` on (off in the library), a box's planes are made on ``device`` when it
    is a GPU. The same voxels every way."""
    lungs = np.asarray(lungs, bool)
    if lungs.ndim == 3 and ON_DEVICE and device is not None:
        import torch  # (here: the helper processes import this module, and torch takes them seconds)

        from . import territory_device

        if torch.device(device).type == "cuda":
            return territory_device.territory_on_device(lungs, min_pixels, device)
    if lungs.ndim == 3:
        done = helper_processes.in_slabs("territory", lungs, territory_here, min_pixels)
        if done is not None:
            return done
    return territory_here(lungs, min_pixels)


def territory_here(lungs: np.ndarray, min_pixels: int = 20) -> np.ndarray:
    """:func:`territory` in this thread. All planes are opened in one pass, and all their pieces found and
    hulled at once (:func:`hulls.filled`: the pieces from the rows' runs, skimage's ``convex_hull_image`` of each,
    without a Python loop over planes or pieces)."""
    planes = np.asarray(lungs, bool)
    planes = planes[None] if planes.ndim == 2 else planes
    sums = np.count_nonzero(planes.reshape(len(planes), -1), axis=1)
    few = sums < min_pixels  # no territory
    small = ~few & (sums <= 4 * min_pixels)  # not opened
    kept = open_in_plane(planes)  # the 3 x 3 cross in each plane
    kept[few] = False
    kept[small] = planes[small]
    out = hulls.filled(kept, min_pixels)  # 8-connected pieces within each plane
    out |= planes
    out[few] = False
    return out[0] if lungs.ndim == 2 else out
