"""The distance inside a mask (edt) against scipy's distance_transform_edt, which it replaces."""

import numpy as np
from scipy import ndimage

from monailabel_app.distances import inside


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
