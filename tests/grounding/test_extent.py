"""The image says how far (grounding/extent.py): a reading takes its masks' extent from the image; the kinds'
rules themselves are tested through each image's growth (test_ct_extent.py, test_film_extent.py)."""

from __future__ import annotations

import pytest

from monailabel_app.jobs.evaluation import dice
from monailabel_app.phantoms.ct import make_ct_phantom
from monailabel_app.phantoms.films import make_phantom


def test_a_reading_takes_its_masks_extent_from_the_image(reader, monkeypatch):
    """Through the reader (the model made to say the phantom's own findings): each finding's mask is the
    lesion's outline from the image, said so with its measured size; switched off it is the attention's."""
    from monailabel_app.io.xray import Geometry, Radiograph
    from monailabel_app.phantoms.ct import phantom_volume

    ph = make_ct_phantom(3)
    reading = reader.read(phantom_volume(ph), answer=ph.report)
    for k, (f, les) in enumerate(zip(reading.findings_json(), ph.lesions), start=1):
        assert f["extent"] == "image" and f["measured"]["method"] == "focal", f
        assert dice(reading.labels == k, les.mask) >= 0.8
        assert f["measured"]["diameter_mm"] == pytest.approx(2 * les.radius_mm, rel=0.35)
    film = make_phantom(5)
    xr = reader.read(Radiograph(film.image, Geometry.plain(*film.image.shape)), answer=film.report)
    f = xr.findings_json()[0]
    assert f["extent"] == "image" and "assumed" in f["measured"]["spacing"]
    assert dice(xr.labels == 1, film.lesions[0].mask) >= 0.7
    monkeypatch.setitem(reader.info.grounding["ct"], "extent", "attention")
    off = reader.read(phantom_volume(ph), answer=ph.report)
    assert all(f["extent"] == "attention" and "switched off" in f["extent_reason"] for f in off.findings_json())
    assert dice(off.labels == 1, ph.lesions[0].mask) < dice(reading.labels == 1, ph.lesions[0].mask)
