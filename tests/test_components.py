"""The one labelling of connected pieces (cc3d for volumes) against scipy's, which it replaces."""

import numpy as np
import pytest
from scipy import ndimage

from monailabel_app.components import fill_holes_in_plane, label, largest


@pytest.mark.parametrize("full", [False, True])
def test_volume_labels_equal_scipys_numbering_included(full):
    rng = np.random.default_rng(3)
    structure = np.ones((3, 3, 3), bool) if full else None
    for i in range(12):
        vol = ndimage.gaussian_filter(rng.normal(size=(9 + i, 31, 27)), 1.2) > rng.uniform(-0.1, 0.3)
        view = vol[:, 3:-2, ::2]  # a box of a larger array, not contiguous
        for mask in (vol, view):
            got, n = label(mask, full)
            want, m = ndimage.label(mask, structure=structure)
            assert n == m and np.array_equal(got, want)


def test_planes_and_empty_volumes():
    rng = np.random.default_rng(4)
    plane = ndimage.gaussian_filter(rng.normal(size=(40, 50)), 1.5) > 0.1
    for full in (False, True):
        got, n = label(plane, full)
        want, m = ndimage.label(plane, structure=np.ones((3, 3), bool) if full else None)
        assert n == m and np.array_equal(got, want)
    got, n = label(np.zeros((4, 5, 6), bool))
    assert n == 0 and not got.any()
    got, n = label(np.zeros((0, 5, 6), bool))
    assert n == 0 and got.shape == (0, 5, 6)


def test_the_largest_piece():
    mask = np.zeros((3, 6, 6), bool)
    mask[0, :2, :2] = True  # 4 voxels
    mask[2, 2:5, 2:5] = True  # 9 voxels
    mask[1, 5, 5] = True
    want = np.zeros_like(mask)
    want[2, 2:5, 2:5] = True
    assert np.array_equal(largest(mask), want)
    assert not largest(np.zeros((2, 3, 4), bool)).any()


def test_holes_filled_plane_by_plane_in_one_call_equal_scipys():
    """fill_holes_in_plane against scipy's binary_fill_holes on each plane: random masks, holes inside holes,
    regions touching a plane's edge (never holes), empty and full planes, a single plane, a single row."""
    rng = np.random.default_rng(11)
    for i in range(12):
        vol = ndimage.gaussian_filter(rng.normal(size=(5, 17 + i, 23)), 1.2) > rng.uniform(-0.4, 0.4)
        vol[1] = False
        vol[2] = True
        vol[3] = False  # rings: a hole, inside it an island with a hole of its own, and a ring cut by the edge
        vol[3, 2:12, 2:12], vol[3, 4:10, 4:10], vol[3, 5:9, 5:9], vol[3, 6:8, 6:8] = True, False, True, False
        vol[3, 10:16, 14:23], vol[3, 12:14, 16:23] = True, False
        got = fill_holes_in_plane(vol)
        assert got.shape == vol.shape and got.dtype == bool
        for z in range(len(vol)):
            assert np.array_equal(got[z], ndimage.binary_fill_holes(vol[z])), (i, z)
        assert np.array_equal(fill_holes_in_plane(vol[3]), ndimage.binary_fill_holes(vol[3]))
    assert got[3, 6, 6] and got[3, 4, 4] and not got[3, 13, 20]  # the nested holes filled, the cut ring not
    row = np.array([[True, False, True]])
    assert np.array_equal(fill_holes_in_plane(row), row)
    assert fill_holes_in_plane(np.zeros((0, 4, 4), bool)).shape == (0, 4, 4)

