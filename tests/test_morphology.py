"""The in-plane opening with numpy shifts against scipy's binary_opening, which it replaces."""

import numpy as np
from scipy import ndimage

from monailabel_app.grounding.morphology import open_in_plane


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
