"""The one labelling of connected pieces (cc3d for volumes) against scipy's, which it replaces."""

import numpy as np
import pytest
from scipy import ndimage

from monailabel_app.grounding.components import component_at, fill_holes_in_plane, label, largest, nearest_label


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


def test_the_nearest_part_of_a_region_is_scipys_feature_transforms():
    """Where an opening ate the seed, the region's nearest part: from the region voxels' distances, the label
    scipy's feature transform gives at the seed (which it used to be computed from), on random regions and on
    a seed equidistant from two parts (the transform's own tie-break)."""
    rng = np.random.default_rng(8)
    for _ in range(40):
        mask = ndimage.gaussian_filter(rng.random((14, 30, 26)), 1.5) > 0.56
        labels, n = label(mask)
        if n < 2:
            continue
        _, idx = ndimage.distance_transform_edt(labels == 0, return_indices=True)
        for seed in np.argwhere(labels == 0)[rng.choice(int((labels == 0).sum()), 25, replace=False)]:
            seed = tuple(int(i) for i in seed)
            assert nearest_label(labels, seed) == labels[tuple(i[seed] for i in idx)], seed
    tie = np.zeros((1, 9, 9), np.uint32)
    tie[0, 4, 0], tie[0, 4, 8] = 1, 2  # the centre is 4 voxels from both
    _, idx = ndimage.distance_transform_edt(tie == 0, return_indices=True)
    assert nearest_label(tie, (0, 4, 4)) == tie[tuple(i[0, 4, 4] for i in idx)]


@pytest.mark.parametrize("full", [False, True])
def test_the_piece_at_a_point_is_its_labels_piece_or_the_nearest(full):
    """The piece that holds a point is the labelling's piece with the point's label; a point outside the mask
    gets the nearest piece; an empty mask, nothing. Planes and volumes, views of larger arrays."""
    rng = np.random.default_rng(5)
    for i in range(10):
        vol = ndimage.gaussian_filter(rng.normal(size=(8 + i, 30, 28)), 1.3) > rng.uniform(0.0, 0.3)
        for mask in (vol, vol[:, 2:-3, ::2], vol[i % 8]):
            labels, n = label(mask, full)
            if n < 2:
                continue
            for point in map(tuple, np.argwhere(np.ones(mask.shape, bool))[rng.choice(mask.size, 12)]):
                k = labels[point] or nearest_label(labels, point)
                got = component_at(mask, point, full)
                assert got.dtype == bool and got.shape == mask.shape
                assert np.array_equal(got, labels == k), (i, point)
    assert not component_at(np.zeros((3, 4, 5), bool), (1, 1, 1)).any()
