"""The in-plane opening, closing and dilation with numpy shifts against scipy's, which they replace."""

import numpy as np
from scipy import ndimage

from monailabel_app.grounding.morphology import close_in_plane, dilate_in_plane, open_in_plane


def test_in_plane_opening_equals_scipys():
    rng = np.random.default_rng(6)
    cross, square = ndimage.generate_binary_structure(2, 1), np.ones((3, 3), bool)
    for i in range(15):
        vol = ndimage.gaussian_filter(rng.normal(size=(4, 20 + i, 33)), 1.0) > rng.uniform(-0.3, 0.3)
        vol[:, 0, :3] = True  # pixels on the array's edge (outside counts as background)
        vol[1] = True
        for sq, st in ((False, cross), (True, square)):
            assert np.array_equal(open_in_plane(vol, sq), ndimage.binary_opening(vol, structure=st[None]))
            assert np.array_equal(open_in_plane(vol[2], sq), ndimage.binary_opening(vol[2], structure=st))


def test_in_plane_closing_and_dilation_equal_scipys():
    rng = np.random.default_rng(7)
    cross = ndimage.generate_binary_structure(2, 1)
    for i in range(10):
        vol = ndimage.gaussian_filter(rng.normal(size=(4, 19 + i, 26)), 1.0) > rng.uniform(0.2, 0.6)
        vol[:, 0, :4] = True  # on the array's edge: a closing erodes it there (outside counts as background)
        vol[:, -3:, -1] = True
        vol[1] = False
        for k in (1, 2, 3):
            assert np.array_equal(close_in_plane(vol, k), ndimage.binary_closing(vol, cross[None], iterations=k)), k
            assert np.array_equal(close_in_plane(vol[2], k), ndimage.binary_closing(vol[2], cross, iterations=k))
            assert np.array_equal(dilate_in_plane(vol, k),
                                  ndimage.binary_dilation(vol, np.ones((1, 3, 3), bool), iterations=k)), k
            assert np.array_equal(dilate_in_plane(vol[0], k, square=False),
                                  ndimage.binary_dilation(vol[0], cross, iterations=k)), k
            for sq, st in ((False, cross), (True, np.ones((3, 3), bool))):
                assert np.array_equal(open_in_plane(vol, sq, k), ndimage.binary_opening(vol, st[None], iterations=k))
    assert dilate_in_plane(vol, 0) is not vol and np.array_equal(dilate_in_plane(vol, 0), vol)

