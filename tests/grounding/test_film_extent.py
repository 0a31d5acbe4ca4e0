"""A radiograph's extent from the image (grounding/film_extent.py): lesions grown from their centres on
phantoms, the film's spacing, blob filters shared by a film's findings and its working copy."""

from __future__ import annotations

import glob

import numpy as np
import pytest
from scipy import ndimage

from conftest import shared
from monailabel_app.grounding import extent, film_extent
from monailabel_app.grounding.anatomy import xray_lung_fields
from monailabel_app.jobs.evaluation import dice
from monailabel_app.phantoms.films import make_phantom


def test_radiograph_lesions_from_their_centres_on_phantoms():
    scores = {}
    for seed in range(40):
        ph = make_phantom(seed)
        fields = xray_lung_fields(ph.image)
        for les in ph.lesions:
            try:
                e = film_extent.grow_radiograph(ph.image, (1.6, 1.6), les.center, les.kind, fields, search_mm=5)
                scores.setdefault(les.kind, []).append(dice(e.mask, les.mask))
            except extent.NoExtent:  # said, and counted as a miss
                scores.setdefault(les.kind, []).append(0.0)
    means = {k: float(np.mean(v)) for k, v in scores.items()}
    assert means["nodule"] >= 0.85 and means["opacity"] >= 0.7 and means["effusion"] >= 0.7, means


def test_film_spacing_is_the_files_or_an_assumed_detector():
    from monailabel_app.io.xray import ASSUMED_FILM_MM, load_radiograph, pixel_spacing_mm

    png = load_radiograph(shared("cxr", "nih", "00000001_000.png"))
    (row, col), known = pixel_spacing_mm(png)
    assert not known and row == col == pytest.approx(ASSUMED_FILM_MM / max(png.pixels.shape))
    siim = glob.glob(shared("cxr", "siim") + "/*.dcm")[0]
    assert pixel_spacing_mm(load_radiograph(siim)) == ((0.168, 0.168), True)  # its PixelSpacing
    zero = load_radiograph(shared("cxr", "dicom", "RG1_UNCR.dcm"))  # PixelSpacing 0\0: none given
    assert pixel_spacing_mm(zero) == ((ASSUMED_FILM_MM / 1955,) * 2, False)


def test_hulls_fill_the_same_pixels_as_skimage():
    """The territory's hulls, all pieces of a stack of planes at once (pieces from the rows' runs, row extremes,
    envelopes in whole half-pixels), against skimage's ``convex_hull_image`` of each 8-connected piece of each
    plane on random planes of many pieces, small and large: the same pixels, borders included; a piece under
    ``min_pixels`` has no hull, and no piece reaches across planes (each plane's last row touches the next
    plane's first)."""
    from skimage.morphology import convex_hull_image

    from monailabel_app.grounding import hulls

    rng = np.random.default_rng(5)
    for i in range(300):
        side = (2, 40) if i % 4 else (100, 300)
        h, w = rng.integers(*side, 2)
        planes = 1 if i % 5 else 3
        blobs = np.stack([ndimage.gaussian_filter(rng.random((h, w)), rng.uniform(0.5, 8)) > rng.uniform(0.3, 0.7)
                          for _ in range(planes)])
        blobs[:-1, -1, : w // 2 + 1] = blobs[1:, 0, : w // 2 + 1] = True  # touching across each planes' seam
        least = int(rng.integers(1, 30))
        expected = np.zeros(blobs.shape, bool)
        for plane, got in zip(blobs, expected):
            labels, n = ndimage.label(plane, structure=np.ones((3, 3)))
            for k in range(1, n + 1):
                if (labels == k).sum() >= least:
                    got |= convex_hull_image(labels == k)
        assert np.array_equal(hulls.filled(blobs, least), expected), (i, blobs.shape, least)
        if planes == 1:
            assert np.array_equal(hulls.filled(blobs[0], least), expected[0]), (i, blobs.shape, least)


def test_a_big_films_blob_centres_are_found_on_its_blocks():
    """A film over 1024 pixels is searched on its block average (its working copy): one bright disc gives one
    centre, in the disc (not one per block: on a block-constant copy every block's inner pixels would be maxima)."""
    film = np.zeros((2100, 1900), np.float32)
    rows, cols = np.ogrid[:2100, :1900]
    film[(rows - 900) ** 2 + (cols - 700) ** 2 <= 60**2] = 200.0
    cache = film_extent.film_cache(film)
    step = cache["step"]
    assert step == 3 and cache["pixels"].shape == (700, 633)
    strength, radius, centres = film_extent.blobs(cache["pixels"], (0.2 * step, 0.2 * step), "nodule")
    (r, c), = np.argwhere(centres & (strength >= 0.5 * strength[centres].max()))
    assert radius[r, c] >= 8.0
    r, c = r * step + step // 2, c * step + step // 2  # back on the film's pixels
    assert abs(r - 900) <= 3 and abs(c - 700) <= 3


def test_a_films_findings_share_their_blob_filters():
    """The filter response per radius is made once per film: an opacity's blobs after a nodule's filter only
    the radii the nodule did not need, and both equal blobs made alone."""
    rng = np.random.default_rng(2)
    film = ndimage.gaussian_filter(rng.normal(size=(300, 260)), 2).astype(np.float32)
    film[100:130, 60:90] += 3.0
    responses: dict = {}
    nodule = film_extent.blobs(film, (1.0, 1.0), "nodule", responses=responses)
    assert sorted(responses) == [2.0, 4.0, 8.0, 16.0]
    kept = {r: responses[r] for r in responses}
    opacity = film_extent.blobs(film, (1.0, 1.0), "opacity", responses=responses)
    assert sorted(responses) == [2.0, 4.0, 8.0, 16.0, 32.0, 64.0]
    assert all(responses[r] is kept[r] for r in kept)  # reused, not made again
    for shared, alone in ((nodule, film_extent.blobs(film, (1.0, 1.0), "nodule")),
                          (opacity, film_extent.blobs(film, (1.0, 1.0), "opacity"))):
        assert all(np.array_equal(a, b) for a, b in zip(shared, alone))


def test_a_big_films_extent_on_its_working_copy_matches_full_resolution(reader, monkeypatch):
    """Films over FILM_WORK_SIDE pixels are measured on their block average: on phantom films enlarged to
    2048 x 2458 and read by the model, each lesion's mask agrees with the truth as the full-resolution
    extent's does, from the same image regions."""
    from PIL import Image

    from monailabel_app.io.xray import Geometry, Radiograph

    work_side = film_extent.FILM_WORK_SIDE
    for seed in (101, 106, 113):
        ph = make_phantom(seed)
        img = np.asarray(Image.fromarray(ph.image).resize((2048, 2458), Image.BILINEAR))
        film = Radiograph(img, Geometry.plain(2458, 2048))
        gen = reader.read(film).generation
        truth = [np.asarray(Image.fromarray(les.mask.astype(np.uint8)).resize((2048, 2458), Image.NEAREST)) > 0
                 for les in ph.lesions]
        got = {}
        for side in (work_side, 10**6):
            monkeypatch.setattr(film_extent, "FILM_WORK_SIDE", side)
            reader.forget_anatomy()
            r = reader.remap(film, gen)
            got[side] = ([e["extent"] for e in r.extras],
                         [max(dice(r.labels == k, t) for k in range(1, len(r.names) + 1)) for t in truth])
        (kinds, work), (full_kinds, full) = got.values()
        assert kinds == full_kinds and "image" in kinds, seed
        assert all(w >= f - 0.02 and w >= 0.8 for w, f in zip(work, full)), (seed, work, full)
