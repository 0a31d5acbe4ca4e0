import numpy as np
import pytest
from scipy import ndimage

from monailabel_app.grounding import maps
from monailabel_app.grounding.boxes import bounds
from monailabel_app.io.xray import SquarePad


@pytest.mark.parametrize("rows,cols", [(300, 220), (220, 300), (256, 256), (1955, 1841)])
def test_token_cell_maps_back_to_its_pixels(rows, cols):
    pad = SquarePad(rows, cols)
    g = 16
    cell = pad.side / g
    for i, j in [(3, 5), (12, 4), (8, 8), (15, 15), (0, 0)]:
        grid = np.zeros((g, g), np.float32)
        grid[i, j] = 1.0
        h = maps.grid_to_pixels(grid, pad)
        assert h.shape == (rows, cols)
        # the token's centre in the padded square, moved by the padding offset into the original image
        r0, c0 = (i + 0.5) * cell - pad.top, (j + 0.5) * cell - pad.left
        inside = 0 <= r0 < rows and 0 <= c0 < cols
        if inside:
            r, c = np.unravel_index(np.argmax(h), h.shape)
            assert abs(r - r0) <= cell / 2 + 1 and abs(c - c0) <= cell / 2 + 1  # edge tokens plateau to the border
            assert h[min(rows - 1, round(r0)), min(cols - 1, round(c0))] >= 0.9 * h.max()
            far = np.hypot(*np.meshgrid(np.arange(rows) - r0, np.arange(cols) - c0, indexing="ij")) > 1.5 * cell
            assert h[far].max(initial=0) < 1e-6  # nothing beyond the neighbouring cells
    # a left-half map stays on the image's left half (patient right on a PA radiograph)
    grid = np.zeros((g, g), np.float32)
    grid[:, : g // 2] = 1.0
    h = maps.grid_to_pixels(grid, pad)
    mid = pad.side / 2 - pad.left
    assert h[:, : int(mid) - int(cell)].min() > 0.99 and h[:, int(mid) + int(cell) :].max() < 0.01


@pytest.mark.parametrize("rows,cols,g", [(512, 512, 16), (600, 400, 8), (400, 601, 16), (2458, 2048, 16), (7, 5, 4)])
def test_pixels_are_torchs_bilinear_upsampling_of_the_square_cropped(rows, cols, g):
    """The CPU's two products with linear weights give what F.interpolate gives on the padded square, cropped
    (the GPU's path), for square, tall, wide, odd-sized and tiny images."""
    import torch
    import torch.nn.functional as F

    pad = SquarePad(rows, cols)
    grids = torch.rand(3, g, g, generator=torch.Generator().manual_seed(rows))
    square = F.interpolate(grids[:, None], size=(pad.side, pad.side), mode="bilinear", align_corners=False)[:, 0]
    want = square[:, pad.top : pad.top + rows, pad.left : pad.left + cols]
    got = maps.grids_to_pixels(grids, pad)
    assert got.shape == (3, rows, cols)
    assert torch.allclose(got, want, rtol=0, atol=2e-6)
    assert np.array_equal(maps.grid_to_pixels(grids[1].numpy(), pad), got[1].numpy())


def test_peak_region_and_label_map():
    h1 = np.zeros((50, 60), np.float32)
    h1[10:20, 10:20] = 1.0
    h1[40:45, 40:45] = 0.8  # a second blob above threshold but not connected to the peak
    h2 = np.zeros((50, 60), np.float32)
    h2[15:30, 15:30] = 0.5
    h2[15:30, 15:30] += np.linspace(0, 0.5, 15)[None, :]
    r1 = maps.peak_region(h1)
    assert r1[10:20, 10:20].all() and not r1[40:45, 40:45].any()
    labels = maps.label_map([h1, h2])
    assert labels.dtype == np.uint8 and set(np.unique(labels)) == {0, 1, 2}
    assert labels[12, 12] == 1 and labels[25, 25] == 2
    assert maps.peak_region(np.zeros((5, 5))).sum() == 0


def test_peak_region_is_scipys_piece_at_the_peak():
    """Against an independent reference: the piece of the map scaled to 0..1 at >= threshold that holds the
    first voxel at the maximum, its pieces connected through faces, edges and corners (scipy's labelling of
    26 neighbours), for volumes with many pieces, ties at the peak and values below zero; on the gate's box
    too where the map is zero outside it."""
    rng = np.random.default_rng(21)
    for trial in range(12):
        h = ndimage.gaussian_filter(rng.random((9, 30, 27)).astype(np.float32), 1.2) ** 6
        h[rng.random(h.shape) > 0.85] = 0
        if trial % 3 == 1:
            h[2, 3, 4] = h[7, 20, 20] = h.max()  # a tie: the first in C order is the peak
        if trial % 3 == 2:
            h -= 0.3 * h.max()
        for threshold in (0.2, 0.5, 0.8):
            scaled = (h - h.min()) / (h.max() - h.min())
            labels, _ = ndimage.label(scaled >= threshold, structure=np.ones((3, 3, 3), bool))
            want = labels == labels[np.unravel_index(int(np.argmax(h)), h.shape)]
            assert np.array_equal(maps.peak_region(h, threshold), want), (trial, threshold)
            if trial % 3 != 2:  # zero outside a box: the same region found on the box
                gated = np.zeros((11, 34, 30), np.float32)
                box = (slice(1, 10), slice(2, 32), slice(3, 30))
                gated[box] = h
                got = maps.peak_region(gated, threshold, support=box)
                assert np.array_equal(got[box], want) and not got.sum() - got[box].sum(), (trial, threshold)


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.9])
def test_peak_region_and_scaling_on_the_support_box_equal_the_whole_maps(threshold):
    """A gated map is zero outside its gate's box: its peak region, range and scaling found on the box alone
    are the whole map's, bit for bit (ties at the peak go to the same voxel). Where values below zero inside
    put the threshold at or below zero, the zeros outside would pass it: the whole map is used then."""
    rng = np.random.default_rng(11)
    box = (slice(2, 9), slice(5, 30), slice(4, 17))
    for trial in range(6):
        h = np.zeros((12, 40, 25), np.float32)
        sub = rng.random((7, 25, 13)).astype(np.float32) ** 3
        sub[rng.random(sub.shape) > 0.6] = 0  # gaps: pieces that are not connected to the peak
        if trial == 1:
            sub[3, 10, 5] = sub[1, 2, 3] = sub.max()  # a tie for the peak
        if trial == 2:  # below zero inside, the peak on the box's edge: the level falls under the zeros outside
            sub[:] = -1.0
            sub[0, 0, 0] = 0.1
        if trial == 3:
            sub[:] = 0  # flat
        if trial == 4:
            sub += 0.2  # no zero inside: the map's minimum is the zeros outside
        if trial == 5:
            sub = -(sub + 0.1)  # all below zero: the maximum is the zeros outside
        h[box] = sub
        got, want = maps.peak_region(h, threshold, support=box), maps.peak_region(h, threshold)
        assert np.array_equal(got, want)
        assert maps.support_range(h, box) == (float(h.min()), float(h.max()))
        at = np.flatnonzero(want) if want.any() else np.arange(10)
        assert np.array_equal(maps.normalise(h, at, box), maps.normalise(h, at))
        if trial == 2:
            assert want[0, 0, 0]  # the zeros outside are in the region: the whole map was used
    whole = tuple(slice(0, n) for n in h.shape)  # a box that is the whole map: its own range
    h[box] = -1.0
    assert maps.support_range(h, whole) == (-1.0, 0.0)


@pytest.mark.parametrize("thresholds", [(0.5, 0.3), (0.3, 0.5), (0.9, 0.2, 0.5), (0.4, 0.4)])
def test_peak_regions_at_several_thresholds_equal_one_peak_region_each(thresholds):
    """A finding's own region and its search region, found together (each higher level on the box of the
    one below): the same voxels as peak_region at each level, with and without the gate's box, for maps with
    gaps, ties at the peak, values below zero and flat ones; and the lower region holds the higher."""
    rng = np.random.default_rng(12)
    box = (slice(2, 11), slice(5, 33), slice(4, 19))
    for trial in range(8):
        h = np.zeros((14, 40, 25), np.float32)
        sub = ndimage.gaussian_filter(rng.random((9, 28, 15)).astype(np.float32), 1.0) ** 4
        sub[rng.random(sub.shape) > 0.8] = 0  # gaps: pieces apart from the peak's
        if trial == 1:
            sub[3, 10, 5] = sub[1, 2, 3] = sub.max()  # a tie for the peak
        if trial == 2:
            sub[:] = -1.0
            sub[0, 0, 0] = 0.1
        if trial == 3:
            sub[:] = 0
        if trial == 4:
            sub -= 0.5 * sub.max()  # values below zero inside: some levels fall under the zeros outside
        h[box] = sub
        for support in (box, None):
            peaks = maps.peak_regions(h, thresholds, support)
            got = [r.mask for r in peaks.regions]
            for region, t in zip(peaks.regions, thresholds):
                assert np.array_equal(region.mask, maps.peak_region(h, t, support=support)), (trial, t, support)
                assert region.box == (bounds(region.mask) if region.mask.any() else None), (trial, t, support)
            low = got[int(np.argmin(thresholds))]
            assert all(not (r & ~low).any() for r in got)
            flat = trial == 3
            assert peaks.peak == (None if flat else np.unravel_index(int(np.argmax(h)), h.shape)), (trial, support)
        assert trial == 3 or got[0].any()


def test_side_gate_keeps_the_named_side_of_the_patient():
    right, left = maps.side_columns(7, "right"), maps.side_columns(7, "left")
    assert right[:3].all() and not right[3:].any()  # patient right = image left
    assert left[4:].all() and not left[:4].any()
    assert maps.side_columns(7, "bilateral").all() and maps.side_columns(7, "").all()


def test_a_gate_applied_by_its_row_and_column_factors_equals_the_gate_image():
    """gated() multiplies by a gate's row and column factors in turn: bit for bit (the sign of a zero
    included) what multiplying by the whole gate image gives, for a side, a zone and a box together."""
    rng = np.random.default_rng(8)
    heat = rng.normal(size=(37, 29)).astype(np.float32)  # negative values too: -0.0 where they are gated off
    rows = (rng.random(37) > 0.3).astype(np.float32)
    cols = maps.side_columns(29, "left") * (rng.random(29) > 0.2).astype(np.float32)
    image = np.ones((37, 29), np.float32) * rows[:, None] * cols[None, :]
    got, want = maps.gated(heat, rows, cols), heat * image
    assert got.dtype == np.float32 and np.array_equal(got, want) and np.array_equal(np.signbit(got), np.signbit(want))
    assert np.signbit(got).any() and (got == 0).any() and got is not heat


def test_assign_gives_overlaps_to_the_larger_scaled_heatmap():
    """Overlapping regions: each voxel to the finding whose heatmap, scaled to 0..1 over the whole map, is
    larger there (the first on ties); a flat heatmap scales to zeros. Against the rule written on whole arrays."""
    rng = np.random.default_rng(3)
    shape = (6, 30, 40)
    heats = [rng.random(shape).astype(np.float32) * s + o for s, o in ((1.0, 0.0), (5.0, 2.0), (0.0, 1.0))]
    regions = [rng.random(shape) > 0.4 for _ in heats]
    expected = _assigned_on_whole_arrays(regions, heats)
    got = maps.assign(regions, heats)
    assert np.array_equal(got, expected) and set(np.unique(got)) == {0, 1, 2, 3}
    # regions on a few planes (the scaled values kept for those alone), one empty; gated maps given with their
    # boxes and ranges: the same rule
    box = (slice(1, 5), slice(3, 25), slice(0, 31))
    gated = [np.zeros(shape, np.float32) for _ in heats]
    for g, h in zip(gated, heats):
        g[box] = h[box]
    regions = [r & (np.arange(shape[0]) >= z)[:, None, None] & (np.arange(shape[0]) < z + 2)[:, None, None]
               for r, z in zip(regions, (2, 3, 9))]
    expected = _assigned_on_whole_arrays(regions, gated)
    spans = [maps.support_range(g, box) for g in gated]
    got = maps.assign(regions, gated, [box] * 3, spans)
    assert np.array_equal(got, expected) and set(np.unique(got)) == {0, 1, 2}
    assert np.array_equal(maps.assign(regions, gated), expected)
    assert not maps.assign([np.zeros(shape, bool)], gated[:1]).any()
    # the regions' boxes given (the one empty region: None): read within the box that holds them all
    boxes = [bounds(r) if r.any() else None for r in regions]
    assert boxes[2] is None and _union_is_smaller(boxes, shape)
    assert np.array_equal(maps.assign(regions, gated, [box] * 3, spans, boxes=boxes), expected)
    with_planes = maps.assign(regions, gated, [box] * 3, spans, planes=True, boxes=boxes)
    assert np.array_equal(with_planes[0], expected) and with_planes[1] == maps.assign(regions, gated, planes=True)[1]
    loose = [(slice(0, shape[0]), b[1], slice(b[2].start, shape[2])) if b is not None else None for b in boxes]
    assert np.array_equal(maps.assign(regions, gated, boxes=loose), expected)  # boxes larger than the regions
    none, planes = maps.assign([np.zeros(shape, bool)], gated[:1], planes=True, boxes=[None])
    assert not none.any() and planes == [None]


def _union_is_smaller(boxes, shape) -> bool:
    from monailabel_app.grounding.boxes import union

    held = union(boxes)
    return np.prod([b.stop - b.start for b in held]) < np.prod(shape)


def test_assign_gives_each_labels_planes_as_the_label_map_has_them():
    """The first and last plane of each label's voxels in the label map, not of its region: a region that loses
    its first planes to a stronger finding starts later, one that loses every voxel has none."""
    shape = (7, 12, 10)
    strong = np.zeros(shape, bool)
    strong[1:3, 2:8, 2:8] = True
    weak = np.zeros(shape, bool)
    weak[1:5, 3:6, 3:6] = True  # planes 1..4; 1 and 2 inside the strong region
    lost = np.zeros(shape, bool)
    lost[1:2, 4:5, 4:5] = True  # wholly inside the strong region
    heats = [np.full(shape, 1.0, np.float32), np.full(shape, 0.5, np.float32), np.full(shape, 0.2, np.float32)]
    for h in heats:
        h[0, 0, 0] = 0.0  # each scaled to 0..1: the strong 1.0, the weak 0.5, the lost 0.2 at every voxel
    regions = [strong, weak, lost]
    labels, planes = maps.assign(regions, heats, planes=True)
    assert np.array_equal(labels, maps.assign(regions, heats))
    boxed = maps.assign(regions, heats, planes=True, boxes=[bounds(r) for r in regions])  # planes from the box
    assert np.array_equal(boxed[0], labels) and boxed[1] == planes
    for k, p in enumerate(planes, start=1):
        zs = np.flatnonzero((labels == k).any(axis=(1, 2)))
        assert p == ((int(zs[0]), int(zs[-1])) if zs.size else None)
    assert planes == [(1, 2), (3, 4), None]


def _assigned_on_whole_arrays(regions, heats) -> np.ndarray:
    """assign()'s rule written on whole arrays."""
    expected = np.zeros(regions[0].shape, np.uint8)
    best = np.full(regions[0].shape, -1.0, np.float32)
    for k, (region, h) in enumerate(zip(regions, heats), start=1):
        scaled = maps.normalise(h)
        take = region & (scaled > best)
        expected[take], best[take] = k, scaled[take]
    return expected


def test_each_starts_the_costliest_calls_first_and_keeps_the_items_order(monkeypatch):
    """With fewer pool threads than calls, the costliest start first (a long call started last would keep
    one thread busy while the others idle); the results come back in the items' order."""
    from concurrent.futures import ThreadPoolExecutor

    started = []
    monkeypatch.setattr(maps, "MAP_THREADS", 2)  # not 1: the pool, not the calling thread
    monkeypatch.setattr(maps, "_POOL", ThreadPoolExecutor(1))  # one thread: calls run in the order they start
    try:
        out = maps.each(lambda name, n: started.append(name) or n * 10, ["a", "b", "c", "d"], [1, 2, 3, 4],
                        cost=[5.0, 400.0, 0.0, 35.0])
        assert out == [10, 20, 30, 40]
        assert started == ["b", "d", "a", "c"]
        started.clear()
        assert maps.each(lambda name, n: started.append(name) or n, ["a", "b"], [1, 2]) == [1, 2]
        assert started == ["a", "b"]  # no cost: the items' order
    finally:
        maps._POOL.shutdown()
