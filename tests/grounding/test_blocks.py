"""Block reductions (grounding/blocks.py) against the plain reshaped reductions they replace."""

import numpy as np

from monailabel_app.grounding.blocks import block_mean, block_min, blocks_back


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


def test_block_means_of_floats_are_numpys_mean_in_any_memory_layout():
    """Float maps (a film's attention heat, CT values) are summed over the strided planes in the order numpy's
    mean over reshaped C-ordered blocks takes: the same float32 values bit for bit (a mask's threshold sees
    the same numbers), whatever the shape, the block size, the magnitudes and the input's memory layout."""
    rng = np.random.default_rng(10)
    for trial in range(60):
        step = int(rng.integers(2, 8))
        shape = tuple(int(n) for n in rng.integers(2 * step, 400, 2))
        if trial % 3 == 0:
            shape = (int(rng.integers(1, 4)),) + shape
        a = (np.exp(rng.normal(size=shape)) * rng.choice([1e-3, 1.0, 1e5])).astype(np.float32)
        want = _reshaped(np.ascontiguousarray(a), step, np.mean)
        got = block_mean(a, step)
        assert got.dtype == np.float32 and np.array_equal(got, want), (trial, shape, step)
        flipped = np.ascontiguousarray(np.swapaxes(a, -1, -2))  # the same values, laid out the other way
        assert np.array_equal(block_mean(np.swapaxes(flipped, -1, -2), step), want), (trial, "layout")
    film = rng.random((2458, 2048), dtype=np.float32)  # the GPU benchmark's film, 3 x 3 blocks
    assert np.array_equal(block_mean(film, 3), _reshaped(film, 3, np.mean))


def test_block_minimum_equals_the_reshaped_minimum():
    rng = np.random.default_rng(9)
    for a in (rng.normal(size=(4, 31, 26)).astype(np.float32), rng.integers(-1000, 1000, size=(2, 17, 40)).astype(np.int16),
              rng.random((3, 22, 23)) > 0.2):
        for step in (1, 2, 3):
            got = block_min(a, step)
            assert got.dtype == a.dtype and np.array_equal(got, _reshaped(a, step, np.min))


def _repeated(small, step, shape, fill):
    out = np.full(shape, fill, small.dtype)
    big = np.repeat(np.repeat(small, step, axis=-2), step, axis=-1)
    out[..., : big.shape[-2], : big.shape[-1]] = big
    return out


def test_blocks_back_gives_each_value_to_its_block_and_the_remainder_the_fill():
    """Each value to its block's pixels (np.repeat's result), the rows and columns that made no block the fill;
    also written into a box of a larger array (a CT kind's box in its volume), nothing outside the box touched."""
    rng = np.random.default_rng(11)
    for trial in range(40):
        step = int(rng.integers(1, 6))
        shape = tuple(int(n) for n in rng.integers(step, 90, 2))
        if trial % 2:
            shape = (int(rng.integers(1, 5)),) + shape
        small_shape = shape[:-2] + (shape[-2] // step, shape[-1] // step)
        for dtype, fill in ((bool, False), (bool, True), (np.float32, -7.5), (np.uint8, 3)):
            small = (rng.random(small_shape) * 250).astype(dtype)
            want = _repeated(small, step, shape, fill)
            got = blocks_back(small, step, shape, fill)
            assert got.dtype == small.dtype and np.array_equal(got, want), (trial, shape, step, dtype)
            big = np.full(tuple(n + 9 for n in shape), 99, dtype)
            box = tuple(slice(4, 4 + n) for n in shape)
            blocks_back(small, step, fill=fill, out=big[box])
            assert np.array_equal(big[box], want)
            big[box] = 99
            assert (big == np.asarray(99, dtype)).all(), "written outside its box"


def test_reductions_made_a_slab_at_a_time_give_the_same_values(monkeypatch):
    """Large arrays are reduced a slab at a time (planes of a volume, whole block rows of a plane, the rows and
    columns that make no block left out): the same values as the reshaped reductions, for slabs of one plane,
    of several, and of block rows that do not divide the plane."""
    from monailabel_app.grounding import blocks

    rng = np.random.default_rng(11)
    volume = (rng.normal(size=(7, 53, 41)) * 300).astype(np.float32)
    plane = rng.random((301, 87), dtype=np.float32)
    for slab in (1, volume[0].nbytes, 3 * volume[0].nbytes, 2000):
        monkeypatch.setattr(blocks, "SLAB_BYTES", slab)
        for step in (2, 3, 5):
            for a in (volume, plane, volume > 0, (volume * 10).astype(np.int16)):
                want = _reshaped(a.astype(np.float32), step, np.mean)
                got = block_mean(a, step)
                assert got.shape == want.shape and np.array_equal(got, want), (slab, step, a.dtype, a.ndim)
                assert np.array_equal(block_min(a, step), _reshaped(a, step, np.min)), (slab, step, a.dtype)
