"""Bounding boxes found on the planes that hold the mask: what a reduction per axis over the whole array gives."""

import numpy as np
import pytest

from monailabel_app.grounding.boxes import Boxed, bounds, grown, union, within


def _per_axis(mask, margin):
    idx = [np.nonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))[0] for axis in range(mask.ndim)]
    return tuple(slice(max(0, int(i[0]) - m), min(n, int(i[-1]) + m + 1)) for i, m, n in zip(idx, margin, mask.shape))


@pytest.mark.parametrize("shape", [(40, 50, 60), (1, 30, 20), (25, 1, 1), (30, 45), (1, 1)])
def test_bounds_are_the_per_axis_reductions_of_the_whole_array(shape):
    rng = np.random.default_rng(len(shape) * 100 + shape[0])
    for trial in range(20):
        mask = np.zeros(shape, bool)
        lo = [int(rng.integers(0, n)) for n in shape]
        hi = [int(rng.integers(a, n)) + 1 for a, n in zip(lo, shape)]
        piece = tuple(slice(a, b) for a, b in zip(lo, hi))
        mask[piece] = rng.random(tuple(b - a for a, b in zip(lo, hi))) > (0.9 if trial % 2 else 0.2)
        mask[tuple(int(rng.integers(a, b)) for a, b in zip(lo, hi))] = True  # never empty
        if trial % 5 == 0:  # a second, distant speck: the box spans both
            mask[tuple(int(rng.integers(0, n)) for n in shape)] = True
        margin = [int(m) for m in rng.integers(0, 4, len(shape))]
        assert bounds(mask, margin) == _per_axis(mask, margin)
        assert bounds(mask) == _per_axis(mask, [0] * len(shape))
        view = mask[..., 1:]  # a box of a larger array, as the searches pass them (not contiguous)
        if view.any():
            assert bounds(view, margin) == _per_axis(view, margin)
    with pytest.raises(IndexError):
        bounds(np.zeros(shape, bool))  # an empty mask has no box


def test_a_masks_box_grown_and_joined_as_bounds_finds_them():
    """Boxed.of finds a mask's bounding box (None: empty); grown() gives bounds() with a margin from the box
    alone, kept inside the array; union() holds every box given and no more."""
    rng = np.random.default_rng(8)
    shape = (20, 30, 25)
    for trial in range(15):
        mask = np.zeros(shape, bool)
        for _ in range(1 + trial % 3):
            mask[tuple(int(rng.integers(0, n)) for n in shape)] = True
        boxed = Boxed.of(mask)
        assert boxed.box == bounds(mask) and boxed.any()
        copied = boxed.copy()
        assert copied.box == boxed.box and copied.mask is not mask and np.array_equal(copied.mask, mask)
        margin = [int(m) for m in rng.integers(0, 9, 3)]
        assert grown(boxed.box, margin, shape) == bounds(mask, margin)
    assert Boxed.of(np.zeros(shape, bool)).box is None and not Boxed.of(np.zeros(shape, bool)).any()
    a, b = np.zeros(shape, bool), np.zeros(shape, bool)
    a[2:5, 10:12, 3:4] = True
    b[8:9, 1:3, 20:22] = True
    assert union([bounds(a), None, bounds(b)]) == bounds(a | b)
    assert union([None, None]) is None
    assert within((slice(2, 9), slice(5, 30)), (slice(1, 3), slice(0, 4))) == (slice(3, 5), slice(5, 9))
