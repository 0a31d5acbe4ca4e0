"""Euclidean distance inside a mask, the one the masks' code uses (the image extent's openings, deepest
voxels and reaches).

Computed with ``edt`` (the seung-lab package, LGPL-3.0 like cc3d): scipy's ``distance_transform_edt``
with ``sampling`` to float32 rounding (tested; 3e-6 mm at most on a real CT's regions), 2.4 times faster
on those regions on this project's 2-core CPU (0.45 s against 1.06 s for the 13 regions of one reading)."""

from __future__ import annotations

import os

import numpy as np

from . import helper_processes


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
