"""Whether an image region stands for its finding: the same decisions and centre as scipy's sums gave."""

import numpy as np
import pytest
from scipy import ndimage

from monailabel_app.grounding import extent
from monailabel_app.grounding.boxes import bounds
from monailabel_app.grounding.study_maps import (KEEP_LARGEST, KEEP_OVERLAP, KEEP_SMALLEST_AIRSPACE, centre_of_mass,
                                                 keeps_image_region)


def test_the_centre_of_mass_is_scipys_to_the_last_bit():
    rng = np.random.default_rng(2)
    for i in range(20):
        vol = ndimage.gaussian_filter(rng.random((7 + i, 40, 33)), 1.5) > 0.52
        for mask in (vol, vol[1:, 5:-3, ::2], vol[i % 7]):
            if mask.any():
                assert centre_of_mass(mask) == tuple(ndimage.center_of_mass(mask)), i


def _before(region, own, kind):  # the rule as it was written with scipy's centre and bool sums
    if not own.any():
        return True
    ratio = region.sum() / own.sum()
    if kind in extent.AIRSPACE and ratio < KEEP_SMALLEST_AIRSPACE:
        return False
    centre = tuple(int(round(c)) for c in ndimage.center_of_mass(region))
    return bool(own[centre]) or ((region & own).sum() >= KEEP_OVERLAP * region.sum() and ratio <= KEEP_LARGEST)


@pytest.mark.parametrize("kind", ["nodule", "opacity"])
def test_an_image_region_is_kept_as_before(kind):
    """Regions inside, beside, around and far larger than the attention's own, on either side of each rule's
    line: the same decision as the rule computed over whole volumes."""
    rng = np.random.default_rng(5)
    kept = dropped = 0
    for trial in range(60):
        shape = (12, 48, 40)
        own = np.zeros(shape, bool)
        region = np.zeros(shape, bool)
        z, y, x = rng.integers(2, 9), rng.integers(8, 36), rng.integers(8, 30)
        own[z - 2:z + 3, y - 6:y + 7, x - 6:x + 7] = True
        r = int(rng.integers(1, 12))
        dz, dy, dx = rng.integers(-4, 5), rng.integers(-14, 15), rng.integers(-14, 15)
        c = (int(np.clip(z + dz, 0, 11)), int(np.clip(y + dy, 0, 47)), int(np.clip(x + dx, 0, 39)))
        region[max(c[0] - r // 4, 0):c[0] + r // 4 + 1, max(c[1] - r, 0):c[1] + r + 1, max(c[2] - r, 0):c[2] + r + 1] = True
        if trial % 5 == 0:
            region &= rng.random(shape) > 0.4  # a ragged region: its centre may fall outside it
        if not region.any():
            continue
        want = _before(region, own, kind)
        assert keeps_image_region(region, own, kind) == want, trial
        assert keeps_image_region(region, own, kind, bounds(region), bounds(own)) == want, trial  # boxes known
        kept, dropped = kept + want, dropped + (not want)
    assert kept > 5 and dropped > 5  # both sides of the rule were met
    assert keeps_image_region(region, np.zeros_like(own), kind)
    assert keeps_image_region(region, np.zeros_like(own), kind, bounds(region), None)


def test_an_image_region_across_the_midline_of_a_real_ct_is_cut_to_the_named_side():
    """Safety: an image region that a search grew across the midline of the real example CT keeps only the named
    side's voxels (patient right: low display x), cut on the box it was grown in: the same voxels as cutting the
    whole volume, with its own bounding box; without a box (a film's search) the same cut."""
    from conftest import shared
    from monailabel_app.grounding import ct_maps
    from monailabel_app.grounding.anatomy import body_mask
    from monailabel_app.grounding.study_maps import _cut_to_side
    from monailabel_app.io.ct import load_ct

    vol = load_ct(shared("ct", "totalsegmentator", "example_ct.nii.gz"))
    body = body_mask(vol.hu)
    z, y, x = vol.shape
    box = (slice(z // 3, 2 * z // 3), slice(y // 4, 3 * y // 4), slice(x // 4, 3 * x // 4))  # across the midline
    grown = np.zeros(vol.shape, bool)
    grown[box] = vol.hu[box] > -500  # dense tissue: the mediastinum and both sides' walls
    for side in ("right", "left"):
        columns = ct_maps.side_columns(body, side)
        mid = int(np.flatnonzero(columns).max() + 1) if side == "right" else int(np.flatnonzero(columns).min())
        assert box[2].start < mid < box[2].stop and grown[..., : mid].any() and grown[..., mid:].any()
        want = grown & columns[None, None, :]
        found = extent.Extent(grown.copy(), 40.0, 1000.0, (z // 2, y // 2, mid), "focal", box)
        got = _cut_to_side(found, columns[None, None, :])
        assert np.array_equal(got.mask, want) and got.box == bounds(want)
        xs = np.nonzero(got.mask)[2]
        assert (xs < mid).all() if side == "right" else (xs >= mid).all()
        unboxed = _cut_to_side(extent.Extent(grown.copy(), 40.0, 1000.0, (0, 0, 0), "focal"), columns[None, None, :])
        assert np.array_equal(unboxed.mask, want) and unboxed.box == got.box
