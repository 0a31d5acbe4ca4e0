"""Anatomy found in the image: lung fields on phantoms and on real radiographs, zone gates, CT lungs."""

import numpy as np
import pytest
from PIL import Image

from conftest import shared
from monailabel_app.grounding.anatomy import body_mask, ct_lung_mask, level_rows, xray_lung_fields
from monailabel_app.io.xray import load_radiograph
from monailabel_app.phantoms.ct import make_ct_phantom
from monailabel_app.phantoms.films import make_phantom


def _dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_phantom_lung_fields_match_the_drawn_lungs_on_the_right_sides():
    for seed in range(20000, 20030):
        ph = make_phantom(seed)
        fields = xray_lung_fields(ph.image)
        for side in ("right", "left"):
            assert fields.side(side) is not None, (seed, side)
            assert _dice(fields.side(side), ph.lungs[side]) >= 0.7, (seed, side)
        # patient right on the image's left
        assert np.nonzero(fields.right)[1].mean() < np.nonzero(fields.left)[1].mean()


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_real_radiograph_lung_fields_overlap_the_reference_masks(n):
    r = load_radiograph(shared("cxr", "lungseg2d", f"{n}.jpg"))
    ref = np.array(Image.open(shared("cxr", "lungseg2d", f"{n}-mask.png")).convert("L")) > 127
    fields = xray_lung_fields(r.pixels)
    half = ref.shape[1] // 2
    for side, cut in (("right", slice(0, half)), ("left", slice(half, None))):
        part = np.zeros_like(ref)
        part[:, cut] = ref[:, cut]
        assert fields.side(side) is not None and _dice(fields.side(side), part) >= 0.6, (n, side)


def test_no_lung_field_on_a_flat_image_means_no_gate():
    fields = xray_lung_fields(np.full((128, 128), 90, np.uint8))
    assert fields.right is None and fields.left is None
    assert level_rows(128, None, "upper", 4).all()


def test_zone_gates_split_the_field_in_thirds_open_at_the_ends():
    lung = np.zeros((90, 40), bool)
    lung[30:60, 5:35] = True  # rows 30..59: thirds at 30-40, 40-50, 50-60
    up, mid, low = (level_rows(lung.shape[0], lung, lv, margin=2) for lv in ("upper", "middle", "lower"))
    assert up.shape == (90,) and up.dtype == np.float32
    assert up[:42].all() and not up[42:].any()  # open upward, ends 2 rows below the first third
    assert mid[38:52].all() and not mid[:38].any() and not mid[52:].any()
    assert low[48:].all() and not low[:48].any()  # open downward (an effusion hides the base)


def test_ct_lungs_contain_the_lesions_and_not_the_mediastinum():
    ph = make_ct_phantom(5)
    hu = ph.hu.astype(np.float32)
    half_cell = int(np.ceil(max(hu.shape[1:]) / 16 / 2))
    lungs = ct_lung_mask(hu, body_mask(hu), half_cell)
    drawn = ph.lungs["right"] | ph.lungs["left"]
    assert (lungs & drawn).sum() >= 0.99 * drawn.sum()
    for les in ph.lesions:
        assert lungs[les.mask].mean() >= 0.9, les.lobe
    assert lungs.sum() < 2 * drawn.sum()
    spine = ph.hu > 400  # bone
    assert lungs[spine].mean() < 0.3


@pytest.mark.parametrize("series", ["totalsegmentator", "lidc"])
def test_ct_anatomy_on_reduced_planes_matches_full_resolution_on_real_scans(series):
    """Real 512 x 512 series: the body and lungs found on reduced planes agree with full resolution and the
    side gate's midline (patient right = low display x) does not move."""
    import glob

    from monailabel_app.grounding.anatomy import ct_body_and_lungs
    from monailabel_app.grounding.ct_maps import column_profile, side_columns
    from monailabel_app.io.ct import load_ct

    path = shared("ct", "totalsegmentator", "example_ct_dicom") if series == "totalsegmentator" else \
        glob.glob(shared("ct", "lidc", "LIDC-IDRI-0001") + "/1*/1*")[0]
    hu = load_ct(path).hu
    assert hu.shape[1:] == (512, 512)
    body, lungs = ct_body_and_lungs(hu, 16)
    full_body = body_mask(hu)
    assert _dice(body, full_body) >= 0.99
    assert _dice(lungs, ct_lung_mask(hu, full_body, 16)) >= 0.85
    profile = column_profile(body)
    assert np.array_equal(profile, body.sum(axis=(0, 1)))  # the counts numpy's own sum gives
    for side in ("right", "left"):
        assert abs(int(side_columns(body, side).sum()) - int(side_columns(full_body, side).sum())) <= 1
        assert np.array_equal(side_columns(body, side, profile), side_columns(body, side))


def test_masks_found_on_blocks_come_back_as_nearest_with_the_edge_repeated():
    """Anatomy found on block minima or means goes back to the full grid as each block's value on its pixels,
    the cropped remainder taking the last row and column (``np.pad``'s edge mode after ``np.repeat``), on 2-D
    films and on CT planes, for every step and remainder."""
    from monailabel_app.grounding.anatomy import _unpooled

    rng = np.random.default_rng(7)
    for trial in range(200):
        step = int(rng.integers(1, 5))
        lead = (int(rng.integers(1, 4)),) if trial % 2 else ()
        small = rng.random((*lead, int(rng.integers(1, 12)), int(rng.integers(1, 12)))) > 0.5
        shape = (*lead, small.shape[-2] * step + int(rng.integers(0, step)),
                 small.shape[-1] * step + int(rng.integers(0, step)))
        big = np.repeat(np.repeat(small, step, axis=-2), step, axis=-1)
        pad = [(0, 0)] * len(lead) + [(0, shape[-2] - big.shape[-2]), (0, shape[-1] - big.shape[-1])]
        out = _unpooled(small, step, shape)
        assert out.dtype == bool and np.array_equal(out, np.pad(big, pad, mode="edge")), (trial, step, shape)
