"""A CT's extent from the image (grounding/ct_extent.py): regions grown from a point per kind, in millimetres,
on phantoms with exact lesions, on synthetic shapes with a known answer and on a real CT with four radiologists'
outlines (LIDC-IDRI-0001); a finding's search of its candidates and what a volume's findings share."""

from __future__ import annotations

import gc
import glob

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from conftest import shared
from monailabel_app.grounding import ct_extent, extent, helper_processes
from monailabel_app.io.study import load_study
from monailabel_app.jobs.evaluation import dice
from monailabel_app.jobs.lidc import read_outlines, series_uids
from monailabel_app.phantoms.ct import make_ct_phantom

LIDC = shared("ct", "lidc", "LIDC-IDRI-0001")


def _ball_volume(shape=(40, 80, 80), spacing=(2.0, 1.0, 1.0)):
    """Aerated lung (-850 HU with noise) in a body; returns (hu, spacing, helper to add balls)."""
    rng = np.random.default_rng(0)
    hu = np.full(shape, -850.0, np.float32) + rng.normal(0, 20, shape).astype(np.float32)
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]

    def ball(centre, radius_mm, value=30.0):
        d2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grids, centre, spacing))
        m = d2 <= radius_mm**2
        hu[m] = value
        return m

    return hu, spacing, ball


@pytest.mark.parametrize("layers", [False, True], ids=["box", "volume layers"])


def test_a_ct_nodule_from_its_centre_is_the_nodule_on_phantoms(layers):
    """From each lesion's centre, with the smoothed HU and aerated lung made for the search box or read from
    the volume's layers (ct_extent.ct_layers, as a reading does)."""
    scores = []
    for seed in range(6):
        ph = make_ct_phantom(seed)
        hu, spacing = ph.hu.astype(np.float32), ph.spacing[::-1]
        made = ct_extent.ct_layers(hu, spacing) if layers else None
        for les in ph.lesions:
            e = ct_extent.grow_ct(hu, spacing, les.center, les.kind, layers=made)
            assert e.mask[les.center] and e.mask.sum() > 1
            scores.append(dice(e.mask, les.mask))
            assert e.diameter_mm == pytest.approx(2 * les.radius_mm, rel=0.35)
    assert np.mean(scores) >= 0.85, scores


def test_a_nodule_touching_the_chest_wall_and_a_vessel_is_cut_off_from_them():
    hu, spacing, ball = _ball_volume()
    hu[:, :, :12] = 40.0  # the chest wall
    nodule = ball((20, 40, 20), 9.0)  # reaches into the wall
    nodule &= ~(np.arange(80)[None, None, :] < 12)
    vessel = np.zeros(hu.shape, bool)
    vessel[:, 39:42, 20:60] = True  # a 3-mm vessel from the nodule into the lung
    hu[vessel] = 40.0
    e = ct_extent.grow_ct(hu, spacing, (20, 40, 20), "nodule")
    assert not e.mask[:, :, :11].any(), "the chest wall is not the nodule"
    assert e.mask[:, 40, 45:].sum() == 0, "the vessel beyond the nodule is cut off"
    assert dice(e.mask, nodule) >= 0.85


def test_the_kinds_limits_in_millimetres():
    hu, spacing, ball = _ball_volume()
    big = ball((20, 40, 40), 24.0)  # 48 mm across: a mass, not a nodule
    with pytest.raises(extent.NoExtent, match="larger than a nodule"):
        ct_extent.grow_ct(hu, spacing, (20, 40, 40), "nodule")
    assert dice(ct_extent.grow_ct(hu, spacing, (20, 40, 40), "mass").mask, big) >= 0.9
    hu2, spacing2, ball2 = _ball_volume((40, 40, 40), (0.5, 0.5, 0.5))
    ball2((20, 20, 20), 1.0)  # 2 mm: under the 3 mm of anything focal
    with pytest.raises(extent.NoExtent, match="under the 3 mm"):
        ct_extent.grow_ct(hu2, spacing2, (20, 20, 20), "nodule")


def test_no_region_in_open_lung_and_no_method_for_some_kinds():
    hu, spacing, _ = _ball_volume()
    with pytest.raises(extent.NoExtent, match="nothing denser than the lung"):
        ct_extent.grow_ct(hu, spacing, (20, 40, 40), "nodule")
    with pytest.raises(extent.NoExtent, match="no image method"):
        ct_extent.grow_ct(hu, spacing, (20, 40, 40), "cardiomegaly")


def test_a_background_point_cuts_off_what_lies_nearer_to_it():
    hu, spacing, ball = _ball_volume()
    a = ball((20, 40, 30), 7.0)
    b = ball((20, 40, 42), 7.0)  # merging with the first
    both = ct_extent.grow_ct(hu, spacing, (20, 40, 30), "nodule")
    assert (both.mask & b).sum() > 0.5 * b.sum()
    one = ct_extent.grow_ct(hu, spacing, (20, 40, 30), "nodule", background=[(20, 40, 42)])
    assert dice(one.mask, a) >= 0.85 and (one.mask & b).sum() < 0.1 * b.sum()


def test_effusion_and_pneumothorax_on_ct_by_their_densities():
    hu, spacing, _ = _ball_volume()
    fluid = np.zeros(hu.shape, bool)
    fluid[:, 60:, 10:70] = True  # dependent fluid at the back
    hu[fluid] = 15.0
    e = ct_extent.grow_ct(hu, spacing, (20, 70, 40), "effusion")
    assert dice(e.mask, fluid) >= 0.8
    hu2, _, _ = _ball_volume()
    air = np.zeros(hu2.shape, bool)
    air[:, 5:20, 10:70] = True
    hu2[air] = -1000.0
    assert dice(ct_extent.grow_ct(hu2, spacing, (20, 12, 40), "pneumothorax").mask, air) >= 0.8


def _attention_on(vol, lesion, sigma_mm: float = 15.0) -> np.ndarray:
    """float32 attention on ``vol``'s grid: a Gaussian of ``sigma_mm`` centred on ``lesion`` (15 mm: half a lung)."""
    centre = np.argwhere(lesion.mask).mean(axis=0)
    d2 = sum(((g - c) * s) ** 2 for g, c, s in zip(np.indices(vol.shape), centre, vol.spacing))
    return np.exp(-d2 / (2 * sigma_mm**2)).astype(np.float32)


def _phantom_lesions(seeds, sigma_mm: float = 15.0):
    """(phantom, volume, lesion, attention on it: :func:`_attention_on`) for every lesion of the CT phantoms."""
    from monailabel_app.phantoms.ct import make_ct_phantom, phantom_volume

    for seed in seeds:
        ph = make_ct_phantom(seed)
        vol = phantom_volume(ph)
        for les in ph.lesions:
            yield ph, vol, les, _attention_on(vol, les, sigma_mm)


def _attention_on_the_largest_lesion():
    """(CT phantom 4's volume, a broad attention map on its largest lesion: 15 mm Gaussian, half a lung)."""
    from monailabel_app.phantoms.ct import make_ct_phantom, phantom_volume

    ph = make_ct_phantom(4)
    vol = phantom_volume(ph)
    return vol, _attention_on(vol, max(ph.lesions, key=lambda les: les.mask.sum()))


def test_findings_searching_one_box_smooth_it_once_and_find_what_they_find_alone(monkeypatch):
    """Two findings whose attention spans the same box (a mass and an opacity in one lung) share the volume's
    cache: the box is smoothed and its territory made once, and each finds the region it finds without it."""
    vol, heat = _attention_on_the_largest_lesion()
    smoothings = []
    real = ct_extent.smoothed_hu
    monkeypatch.setattr(ct_extent, "smoothed_hu", lambda *a, **k: smoothings.append(a[0].shape) or real(*a, **k))

    def outcome(kind, cache):
        try:
            e = ct_extent.find_in_ct(vol.hu, vol.spacing, heat, kind, cache=cache)
            return e.mask, e.seed, e.json()
        except extent.NoExtent as x:
            return None, str(x)

    cache: dict = {}
    shared = [outcome(kind, cache) for kind in ("mass", "opacity")]
    boxes = [k[1] for k in cache if k[0] == "smoothed"]
    assert len(boxes) == 1 and ("territory", boxes[0]) in cache  # one search box for both findings
    box_shape = tuple(b - a for a, b in boxes[0])
    assert smoothings.count(box_shape) == 1  # smoothed once for the two
    for kind, got in zip(("mass", "opacity"), shared):
        alone = outcome(kind, {})
        assert got[1:] == alone[1:] and (got[0] is None) == (alone[0] is None)
        assert got[0] is None or np.array_equal(got[0], alone[0])


@pytest.mark.parametrize("ahead", [0, 1])


def test_a_search_whose_candidates_fail_leaves_no_cycle_behind(monkeypatch, ahead):
    """A candidate that is not the kind raises NoExtent from deep in the search; its traceback holds the frames
    on the way and their arrays (labels, boxes, the gated map: a real CT's reading left about 200 MB a reading
    to the cyclic collector, which counts no arrays and came late, and the heap grew for every later reading).
    Whether the search then finds a later candidate or fails, nothing is left for the collector; also with the
    next candidate tried ahead in a thread of its own (ct_extent.CANDIDATES_AHEAD)."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(2)
    monkeypatch.setattr(ct_extent, "candidates_ahead", lambda: ahead)
    monkeypatch.setattr(ct_extent, "_candidates_pool", lambda: pool)
    vol, heat = _attention_on_the_largest_lesion()
    real, tried = ct_extent.grow_ct, []

    def first_fails(*a, **k):
        tried.append(a[2])
        if len(tried) == 1 or k.get("kind_fails"):
            raise extent.NoExtent("not this one")
        return real(*a, **k)

    monkeypatch.setattr(ct_extent, "grow_ct", first_fails)
    gc.collect()
    gc.disable()
    try:
        try:  # the first candidate fails; a later one may be found
            found = ct_extent.find_in_ct(vol.hu, vol.spacing, heat, "mass", cache={})
            del found
        except extent.NoExtent:
            pass
        monkeypatch.setattr(ct_extent, "grow_ct", lambda *a, **k: first_fails(*a, kind_fails=True, **k))
        with pytest.raises(extent.NoExtent, match="not this one"):  # every candidate fails
            ct_extent.find_in_ct(vol.hu, vol.spacing, heat, "mass", cache={})
        pool.shutdown(wait=True)  # (a candidate tried ahead may still run after its search has its answer)
        assert len(tried) >= 2
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_candidates_are_tried_ahead_only_where_helper_processes_run(monkeypatch):
    """A CT search tries its next candidates ahead where helpers run (a GPU host's free cores: run CQ), and one
    after another where none do (two cores, which the findings' searches already share)."""
    monkeypatch.setattr(ct_extent, "CANDIDATES_AHEAD", 1)
    helper_processes.stop()
    assert ct_extent.candidates_ahead() == 0
    helper_processes.start(1)
    try:
        assert ct_extent.candidates_ahead() == 1
        monkeypatch.setattr(ct_extent, "CANDIDATES_AHEAD", 0)
        assert ct_extent.candidates_ahead() == 0
    finally:
        helper_processes.stop()
    assert ct_extent.candidates_ahead() == 0


def test_candidates_tried_ahead_in_threads_give_what_one_after_another_gives(monkeypatch):
    """ct_extent.CANDIDATES_AHEAD with helper processes running: the next candidates of a CT search tried in
    threads while the one before is: the answer is the first candidate in order that is the kind, as one after
    another without helpers (the same mask, or the same reason for none), whether the first candidate is it or not
    (attention on each phantom lesion, asked for its own kind and for others, whose first candidates fail)."""
    def outcome(*args):
        try:
            return ct_extent.find_in_ct(*args, cache={}).mask
        except extent.NoExtent as e:
            return str(e)

    seen = {"found": 0, "none": 0, "later": 0}
    real, real_pool = ct_extent.grow_ct, ct_extent._candidates_pool
    submitted = []

    class Counted:  # the candidates' pool, noting which candidate each call tries ahead (its last argument)
        def submit(self, fn, *args):
            submitted.append(args[-1])
            return real_pool().submit(fn, *args)

    monkeypatch.setattr(ct_extent, "_candidates_pool", Counted)
    helper_processes.stop()
    for _, vol, les, heat in _phantom_lesions((4, 6), 25.0):
        for kind in ("nodule", "mass", "effusion"):
            grown = []
            monkeypatch.setattr(ct_extent, "grow_ct", lambda *a, **k: grown.append(1) or real(*a, **k))
            one_by_one = outcome(vol.hu, vol.spacing, heat, kind)  # no helpers: one after another
            tries = len(grown)
            helper_processes.start(1)
            try:
                for ahead in (1, 2):
                    monkeypatch.setattr(ct_extent, "CANDIDATES_AHEAD", ahead)
                    got = outcome(vol.hu, vol.spacing, heat, kind)
                    assert type(got) is type(one_by_one), (les.kind, kind, ahead)
                    assert got == one_by_one if isinstance(got, str) else np.array_equal(got, one_by_one)
            finally:
                helper_processes.stop()
            found = not isinstance(one_by_one, str)
            seen["found" if found else "none"] += 1
            seen["later"] += found and tries > 1
    assert all(seen.values()), seen  # found at once, found after a failed candidate, and not found at all
    assert submitted and set(submitted) <= {1, 2}, submitted  # the later candidates were tried ahead


def test_findings_searched_with_the_volumes_layers_find_the_phantoms_lesions():
    """find_in_ct under attention centred on each lesion of phantom CTs, reading the volume's layers made once
    (ct_extent.ct_layers) instead of its search box's: each lesion found as with the box's own (Dice >= 0.9
    between the two ways, >= 0.8 against the lesion on average), and the layers' arrays never written."""
    agree, scores, made = [], [], None
    for _, vol, les, heat in _phantom_lesions((4, 5, 6)):
        if made is None or made[0] is not vol:  # the volume's layers, once
            made = (vol, ct_extent.ct_layers(vol.hu, vol.spacing))
            for a in (made[1].smooth, made[1].aerated):
                a.flags.writeable = False
        box = ct_extent.find_in_ct(vol.hu, vol.spacing, heat, les.kind, cache={})
        read = ct_extent.find_in_ct(vol.hu, vol.spacing, heat, les.kind, cache={}, layers=made[1])
        agree.append(dice(box.mask, read.mask))
        scores.append(dice(read.mask, les.mask))
    assert min(agree) >= 0.9 and np.mean(scores) >= 0.8, (agree, scores)


def test_a_search_given_its_regions_boxes_finds_what_the_bare_masks_find():
    """find_in_ct given the attention's own region and its search region with their bounding boxes (as the
    reader passes them, maps.peak_regions) reads the boxes instead of finding them again: the same region, seed
    and measures as from the bare masks, and the region lies inside the box its Extent gives."""
    from monailabel_app.grounding import maps

    found = 0
    for _, vol, les, heat in _phantom_lesions((4, 5)):
        own, search = maps.peak_regions(heat, (0.5, extent.SEARCH_LEVEL)).regions
        outcomes = []
        for near, where in ((own.mask, search.mask), (own, search)):
            try:
                e = ct_extent.find_in_ct(vol.hu, vol.spacing, heat, les.kind, near, cache={}, search=where)
                outcomes.append((e.mask, e.seed, e.json()))
                assert e.box is not None and e.mask[e.box].sum() == e.mask.sum() > 0
            except extent.NoExtent as x:
                outcomes.append((None, str(x)))
        assert outcomes[0][1:] == outcomes[1][1:]
        if outcomes[0][0] is not None:
            assert np.array_equal(outcomes[0][0], outcomes[1][0])
            found += 1
    assert found >= 3


def test_a_volumes_findings_share_the_coarse_planes_and_get_the_same_regions(monkeypatch):
    """A large kind's box is looked at on coarse planes; with a cache kept for the volume's findings they
    are made once (a mass and an opacity at one voxel), the regions the same as without it. A point
    outside its kind's values is refused before the lung territory is made."""
    hu, spacing, ball = _ball_volume(shape=(40, 300, 300), spacing=(2.0, 0.7, 0.7))
    ball((20, 150, 150), 30.0)
    calls = []
    real = ct_extent.territory
    monkeypatch.setattr(ct_extent, "territory", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache: dict = {}
    for kind in ("mass", "opacity"):
        shared = ct_extent.grow_ct(hu, spacing, (20, 150, 150), kind, cache=cache)
        alone = ct_extent.grow_ct(hu, spacing, (20, 150, 150), kind)
        assert np.array_equal(shared.mask, alone.mask) and shared.diameter_mm == alone.diameter_mm
    assert len([k for k in cache if k[0] == "blocks"]) == 1  # one coarse copy of the volume for both
    assert len(calls) == 3  # the territory once with the cache (both kinds cut it alike), once each without
    calls.clear()
    with pytest.raises(extent.NoExtent, match="not in a fluid region"):
        ct_extent.grow_ct(hu, spacing, (20, 40, 40), "effusion", cache=cache)
    assert not calls


def test_the_whole_volumes_coarse_planes_made_ahead_are_the_ones_a_large_kind_grows_on(monkeypatch):
    """ct_extent.whole_volume_planes (a GPU reader makes them beside the prefill): the coarse planes of the whole
    volume in the findings' cache, which a large kind whose search box is the whole volume then reads instead of
    making them: the same regions as without them, no block means made again; nothing for a small volume."""
    hu, spacing, ball = _ball_volume(shape=(40, 300, 300), spacing=(2.0, 0.7, 0.7))
    ball((20, 150, 150), 30.0)
    cache: dict = {}
    ct_extent.whole_volume_planes(hu, cache)
    assert [k for k in cache if k[0] == "blocks"] == [("blocks", ((0, 40), (0, 300), (0, 300)), 2)]
    made, real = [], ct_extent.block_mean
    monkeypatch.setattr(ct_extent, "block_mean", lambda *a: made.append(1) or real(*a))
    for kind in ("mass", "effusion"):
        try:
            ahead = ct_extent.grow_ct(hu, spacing, (20, 150, 150), kind, cache=cache).mask
        except extent.NoExtent as e:
            ahead = str(e)
        assert not made
        try:
            alone = ct_extent.grow_ct(hu, spacing, (20, 150, 150), kind).mask
        except extent.NoExtent as e:
            alone = str(e)
        assert len(made) == 1 and type(ahead) is type(alone)
        assert ahead == alone if isinstance(ahead, str) else np.array_equal(ahead, alone) and ahead.any()
        made.clear()
    small: dict = {}
    ct_extent.whole_volume_planes(hu[:, :100, :100], small)
    assert not small


@pytest.fixture(scope="module")


def lidc():
    series = glob.glob(f"{LIDC}/1*/1*")[0]
    volume = load_study(series, "auto")
    outlines = [o for o in read_outlines(f"{LIDC}/annotations/69.xml", series_uids(series), volume.geometry.shape)
                if o.voxels > 100]
    return volume, outlines


def test_lidc_xml_outlines_are_the_published_reader_masks(lidc):
    """The XML read here (filled polygons with their edge, holes taken out, slices by SOP UID) gives the same
    voxels as the NIfTI masks derived from it for the shared data."""
    volume, outlines = lidc
    assert len(outlines) == 4 and {o.reader for o in outlines} == {0, 1, 2, 3}
    for o in outlines:
        ref = sitk.GetArrayFromImage(sitk.ReadImage(f"{LIDC}/annotations/nodules_reader{o.reader}.nii.gz")) > 0
        assert dice(o.mask, ref) == 1.0


def test_lidc_nodule_from_points_inside_matches_the_radiologists(lidc):
    """From the centre and from points well inside each reader's outline: the mask's Dice against every
    reader's outline (median >= 0.7, as readers agree with each other), never one voxel, never a lung."""
    volume, outlines = lidc
    masks = [volume.orientation.to_display(o.mask) for o in outlines]
    readers = [dice(a, b) for i, a in enumerate(masks) for b in masks[i + 1 :]]
    lungs = ct_extent.aerated_lung(volume.hu)
    rng = np.random.default_rng(1)
    scores = []
    for m in masks:
        depth = ndimage.distance_transform_edt(m, sampling=volume.spacing)
        inside = np.argwhere(depth >= 3.0)
        points = [np.unravel_index(int(np.argmax(depth)), m.shape)] + [tuple(p) for p in inside[rng.choice(len(inside), 2)]]
        for p in points:
            e = ct_extent.grow_ct(volume.hu, volume.spacing, tuple(int(i) for i in p), "nodule")
            assert 100 < e.mask.sum() < 0.2 * lungs.sum()
            assert 20 <= e.diameter_mm <= 35
            scores += [dice(e.mask, r) for r in masks]
    assert np.median(scores) >= 0.7, (np.median(scores), np.median(readers))


def test_territory_is_the_plane_by_plane_hull_of_each_lung_piece():
    """The territory, opened and labelled over all planes at once, against the rule written plane by plane
    with skimage: planes under ``min_pixels`` have none, planes over four times that are opened first, each
    8-connected piece of at least ``min_pixels`` is replaced by its convex hull, the plane's own lung kept."""
    from skimage.morphology import convex_hull_image

    from monailabel_app.grounding.territory import territory

    rng = np.random.default_rng(5)
    vol = ndimage.gaussian_filter(rng.normal(size=(12, 70, 90)), (0, 3, 3)) > 0.12
    vol[3] = False
    vol[4] = False
    vol[4, 10:13, 10:15] = True  # 15 pixels: under min_pixels, no territory
    vol[5] &= np.arange(90)[None] < 12  # a thin strip: few pixels, not opened
    expected = np.zeros(vol.shape, bool)
    for z, plane in enumerate(vol):
        if plane.sum() < 20:
            continue
        kept = ndimage.binary_opening(plane) if plane.sum() > 80 else plane
        labels, n = ndimage.label(kept, structure=np.ones((3, 3)))
        expected[z] = plane
        for k in range(1, n + 1):
            if (labels == k).sum() >= 20:
                expected[z] |= convex_hull_image(labels == k)
    got = territory(vol)
    assert got[4].sum() == 0 and got[5].any() and (got ^ vol).any()
    assert np.array_equal(got, expected)
    assert np.array_equal(territory(vol[7]), expected[7])  # one plane (a film's fields)


def test_smoothing_leaves_out_only_negligible_axes():
    """Thin in-plane pixels and thick slices: the z sigma (0.14 voxels) is left out, within 1e-6 HU of
    filtering it; a z sigma over the limit is still applied."""
    rng = np.random.default_rng(4)
    hu = rng.normal(-500, 400, (12, 40, 40)).astype(np.float32)
    for spacing in ((2.5, 0.59, 0.72), (1.0, 0.7, 0.7)):
        full = ndimage.gaussian_filter(hu, [0.6 * min(spacing) / s for s in spacing])
        assert np.abs(ct_extent.smoothed_hu(hu, spacing) - full).max() < 1e-6 * np.abs(hu).max()


def _outcome(hu, spacing, seed, kind, **kwargs):
    try:
        e = ct_extent.grow_ct(hu, spacing, seed, kind, **kwargs)
        return e.mask, e.diameter_mm, e.size_mm
    except extent.NoExtent as x:
        return None, str(x)


def test_a_ct_region_reads_only_its_search_box(monkeypatch):
    """grow_ct writes the smoothed HU, the aerated lung and the territory on its search box only (the rest of
    those volume-sized arrays is left uncleared): the same regions with dense, aerated, in-territory values
    filled in outside the box. The cases' boxes lie inside their volumes: a nodule (reach 55 voxels in-plane)
    next to the chest wall and a vessel, with and without the lungs given, and a consolidation in a tall
    volume whose size against the lung in its box decides it (the share limit)."""
    hu, spacing, ball = _ball_volume(shape=(80, 200, 200), spacing=(2.5, 1.0, 1.0))
    ball((40, 100, 100), 8.0)
    hu[:, :, :20] = 40.0  # chest wall
    ball((40, 100, 24), 6.0)  # a nodule on the wall
    hu[38:43, 100, 100:140] = 40.0  # a vessel leaving the first
    lungs = hu < -500
    tall, tall_spacing, _ = _ball_volume(shape=(340, 48, 48), spacing=(2.5, 1.0, 1.0))
    tall[:140], tall[200:] = -1000.0, -1000.0  # air (not lung) but for a pocket of lung in the box's planes
    tall[145:195, 4:44, 4:44] = 30.0  # a consolidation of most of that lung: over its share of the lung in the box
    cases = [(hu, spacing, (40, 100, 100), "nodule", {}), (hu, spacing, (40, 100, 24), "nodule", {}),
             (hu, spacing, (40, 100, 100), "nodule", {"lungs": lungs}), (tall, tall_spacing, (170, 24, 24), "consolidation", {})]
    for hu_, spacing_, seed, kind, kwargs in cases:
        box = extent.search_box(hu_.shape, seed, extent.limits_mm(kind)[1], spacing_)
        assert any(0 < b.start or b.stop < n for b, n in zip(box, hu_.shape))  # not the whole volume
    monkeypatch.setattr(ct_extent, "only_box", lambda shape, dtype: np.zeros(shape, dtype))
    cleared = [_outcome(h, s, seed, kind, **kw) for h, s, seed, kind, kw in cases]
    monkeypatch.setattr(ct_extent, "only_box",
                        lambda shape, dtype: np.full(shape, 40.0 if dtype == np.float32 else True, dtype))
    filled = [_outcome(h, s, seed, kind, **kw) for h, s, seed, kind, kw in cases]
    assert [c[0] is None for c in cleared] == [False, False, False, True], cleared  # three regions, one refused
    assert "larger than" in cleared[3][1]
    for a, b in zip(cleared, filled):
        assert (a[0] is None) == (b[0] is None) and a[1:] == b[1:]
        assert a[0] is None or np.array_equal(a[0], b[0])


def test_a_search_measures_its_deepest_voxels_on_its_device_only_when_asked(monkeypatch):
    """ct_extent.DEEPEST_ON_DEVICE: off, a search's candidates' deepest voxels are measured on the host whatever
    its device; on (the library's since run DB), the search's device is passed on (``deepest`` measures on a GPU
    only: a CPU's keep edt)."""
    vol, heat = _attention_on_the_largest_lesion()
    real, asked = ct_extent.deepest, []
    monkeypatch.setattr(ct_extent, "deepest", lambda part, spacing, device=None: asked.append(device) or
                        real(part, spacing, device))
    for on in (False, True):
        monkeypatch.setattr(ct_extent, "DEEPEST_ON_DEVICE", on)
        ct_extent.find_in_ct(vol.hu, vol.spacing, heat, "mass", cache={}, device="cpu")
    assert asked and set(asked[: asked.index("cpu")]) == {None} and asked[-1] == "cpu"
