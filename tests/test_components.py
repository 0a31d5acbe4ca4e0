"""The one labelling of connected pieces (cc3d for volumes) against scipy's, which it replaces."""

import numpy as np
import pytest
from scipy import ndimage

from monailabel_app.components import label, largest


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
