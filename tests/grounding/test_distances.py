"""The distance inside a mask (edt) against scipy's distance_transform_edt, which it replaces."""

import numpy as np
from scipy import ndimage

from monailabel_app.grounding.distances import inside, inside_here


def test_distance_inside_equals_scipys_to_float32_rounding():
    rng = np.random.default_rng(7)
    for shape, spacing in (((12, 40, 35), (2.5, 0.6, 0.7)), ((50, 61), (0.4, 0.9)), ((9, 9, 9), (1.0, 1.0, 1.0))):
        mask = ndimage.gaussian_filter(rng.normal(size=shape), 1.5) > -0.2
        mask[(0,) * len(shape)] = True  # a corner inside: the array's edge is not a border
        got = inside(mask[..., 1:], spacing)  # a view, not contiguous
        want = ndimage.distance_transform_edt(mask[..., 1:], sampling=spacing)
        assert got.dtype == np.float32 and got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-5 * max(1.0, want.max())
        assert not got[~mask[..., 1:]].any()
    assert inside(np.zeros((0, 4), bool), (1.0, 1.0)).shape == (0, 4)


def test_distances_on_several_threads_are_the_same_bits():
    """edt on several threads of its own (a map thread's call: it holds the interpreter anyway) gives the
    one-thread distances bit for bit."""
    rng = np.random.default_rng(8)
    for shape, spacing in (((30, 70, 66), (2.5, 0.6, 0.7)), ((120, 97), (0.4, 0.9))):
        mask = ndimage.gaussian_filter(rng.normal(size=shape), 2.0) > -0.3
        one = inside_here(mask, spacing, 1)
        for threads in (2, 4):
            assert np.array_equal(inside_here(mask, spacing, threads), one), threads

