"""Block reductions (grounding/blocks.py) against the plain reshaped reductions they replace."""

import numpy as np

from monailabel_app.grounding.blocks import block_mean, block_min


def _reshaped(a, step, reduce):
    rows, cols = a.shape[-2] // step * step, a.shape[-1] // step * step
    blocks = a[..., :rows, :cols].reshape(*a.shape[:-2], rows // step, step, cols // step, step)
    return reduce(blocks, axis=(-3, -1))


def test_block_means_of_whole_numbers_equal_the_float32_mean():
    """Pixels and masks (bool, 8- and 16-bit integers) are block-averaged by exact integer sums: the same
    float32 values as the float32 mean over reshaped blocks."""
    rng = np.random.default_rng(8)
    for dtype, top in ((np.uint8, 256), (np.uint16, 65536), (np.int16, 32768), (bool, 2)):
        for step in (2, 3):
            a = rng.integers(-top if dtype == np.int16 else 0, top, size=(2, 38, 29)).astype(dtype)
            want = _reshaped(a.astype(np.float32), step, np.mean)
            got = block_mean(a, step)
            assert got.dtype == np.float32 and np.array_equal(got, want)
    x = rng.normal(size=(3, 20, 17)).astype(np.float32)
    assert np.array_equal(block_mean(x, 2), _reshaped(x, 2, np.mean))


def test_block_minimum_equals_the_reshaped_minimum():
    rng = np.random.default_rng(9)
    for a in (rng.normal(size=(4, 31, 26)).astype(np.float32), rng.integers(-1000, 1000, size=(2, 17, 40)).astype(np.int16),
              rng.random((3, 22, 23)) > 0.2):
        for step in (1, 2, 3):
            got = block_min(a, step)
            assert got.dtype == a.dtype and np.array_equal(got, _reshaped(a, step, np.min))
