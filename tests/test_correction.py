"""Click to correct (correction.py) and the CLI's points: a mask grown from a point, in the input's own
geometry whatever its stored orientation, with no language model; bad points are refused with a message."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from monailabel_app import correction
from monailabel_app.errors import InputError
from monailabel_app.io.study import load_study
from monailabel_app.io.xray import Geometry, Radiograph
from monailabel_app.jobs.evaluation import dice
from monailabel_app.phantoms import ct as ct_phantoms
from monailabel_app.phantoms.films import make_phantom

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 3  # a right-lung nodule and a left-lung mass


@pytest.fixture(scope="module")
def ras(tmp_path_factory):
    """CT phantom stored RAS (i toward the patient's right): its file, lesion masks on the same grid."""
    d = tmp_path_factory.mktemp("ras")
    ph = ct_phantoms.make_ct_phantom(SEED)
    image = ct_phantoms.save(ph, str(d / "ct.nii.gz"), "RAS")
    labels = np.zeros(ph.hu.shape, np.uint8)
    for k, les in enumerate(ph.lesions, start=1):
        labels[les.mask] = k
    ct_phantoms.save(ph, str(d / "lesions.nii.gz"), "RAS", array=labels)
    return ph, image, sitk.GetArrayFromImage(sitk.ReadImage(str(d / "lesions.nii.gz")))


def _lesion_mm(ph, les) -> list[float]:
    return [o + c * s for o, c, s in zip(ph.origin, les.center[::-1], ph.spacing)]  # LPS, identity direction


def test_a_point_in_patient_mm_grows_the_lesion_on_the_files_own_grid(ras):
    ph, image, truth = ras
    volume = load_study(image, "auto")
    for k, les in enumerate(ph.lesions, start=1):
        ijk = correction.index_of_mm(volume.geometry, _lesion_mm(ph, les))
        points = correction.parse_points([ijk], "foreground", volume.geometry.shape)
        reading = correction.correct(volume, les.kind, points, [])
        assert reading.labels.shape == truth.shape
        assert dice(reading.labels == 1, truth == k) >= 0.9
        f = reading.findings_json()[0]
        assert f["side"] == les.side and f["extent"] == "image" and f["placed_by"] == "point"
        assert f["measured"]["point"] == [int(round(v)) for v in ijk]
        assert reading.model["name"] is None and reading.report == ""


def test_a_point_replaces_one_findings_mask_and_keeps_the_others(ras):
    ph, image, truth = ras
    volume = load_study(image, "auto")
    shape = volume.geometry.shape
    first = correction.correct(volume, "nodule", correction.parse_points(
        [correction.index_of_mm(volume.geometry, _lesion_mm(ph, ph.lesions[0]))], "foreground", shape), [])
    both = correction.correct(volume, "mass", correction.parse_points(
        [correction.index_of_mm(volume.geometry, _lesion_mm(ph, ph.lesions[1]))], "foreground", shape), [], base=first)
    assert [f.kind for f in both.findings] == ["nodule", "mass"] and both.names == ["right lung nodule", "left lung mass"]
    assert dice(both.labels == 2, truth == 2) >= 0.9 and np.array_equal(both.labels == 1, first.labels == 1)
    # finding 2 moved onto the nodule: its old mask goes, finding 1 stays as it was
    moved = correction.correct(volume, None, correction.parse_points(
        [correction.index_of_mm(volume.geometry, _lesion_mm(ph, ph.lesions[0]))], "foreground", shape), [],
        base=both, finding="left lung mass")
    assert moved.findings[1].kind == "mass" and not ((moved.labels == 2) & (truth == 2)).any()
    assert (moved.labels == 2).sum() > 0 and (moved.labels == 1).sum() == 0  # the nodule's voxels went to the click


def test_a_radiograph_point_as_slicer_sends_it():
    ph = make_phantom(5)
    les = ph.lesions[0]
    film = Radiograph(ph.image, Geometry.plain(*ph.image.shape))
    row, col = les.center
    for point in ([col, row], [col, row, 0]):
        reading = correction.correct(film, les.kind, correction.parse_points([point], "foreground", ph.image.shape), [])
        assert dice(reading.labels == 1, les.mask) >= 0.7
        assert reading.findings[0].side == les.side


@pytest.mark.parametrize("value, words", [
    ("12,3,4", "list of"), ([[1, 2]], "three indices"), ([[1, 2, 3, 4]], "each point"), ([[1, "a", 3]], "each point"),
    ([[1, 2, 9999]], "outside the image"), ([[-1, 2, 3]], "outside the image"), ([[0, 0, 0]] * 33, "at most"),
    ([[True, 2, 3]], "each point"), ([[float("nan"), 2, 3]], "each point"),
])
def test_bad_points_are_refused_with_what_was_wrong(value, words):
    with pytest.raises(InputError, match=words):
        correction.parse_points(value, "foreground", (20, 30, 30))


def test_bad_kind_finding_and_regions_are_refused(ras):
    ph, image, _ = ras
    volume = load_study(image, "auto")
    shape = volume.geometry.shape
    inside = correction.parse_points([correction.index_of_mm(volume.geometry, _lesion_mm(ph, ph.lesions[0]))],
                                     "foreground", shape)
    with pytest.raises(InputError, match="'kind' must be one of"):
        correction.correct(volume, "blob", inside, [])
    with pytest.raises(InputError, match="read it first"):
        correction.correct(volume, None, inside, [], finding=1)
    base = correction.correct(volume, "nodule", inside, [])
    with pytest.raises(InputError, match="label value 1..1"):
        correction.correct(volume, None, inside, [], base=base, finding=7)
    air = correction.parse_points([[2, 2, 2]], "foreground", shape)  # outside the body
    with pytest.raises(InputError, match="no nodule region") as e:
        correction.correct(volume, "nodule", air, [])
    assert e.value.status == 422
    with pytest.raises(InputError, match="at least one point"):
        correction.correct(volume, "nodule", [], [])


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "monailabel_app.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def test_cli_point_mm_writes_a_reading_without_the_model(ras, tmp_path):
    ph, image, truth = ras
    mm = ",".join(f"{v:.3f}" for v in _lesion_mm(ph, ph.lesions[0]))
    r = _cli("-i", image, "-o", str(tmp_path / "out"), "--kind", "nodule", f"--point-mm={mm}")
    assert r.returncode == 0, r.stderr
    assert "model: none" in r.stdout
    result = json.loads((tmp_path / "out" / "findings.json").read_text())
    mask = sitk.ReadImage(str(tmp_path / "out" / result["files"]["mask"]))
    src = sitk.ReadImage(image)
    assert np.allclose(mask.GetDirection(), src.GetDirection()) and mask.GetSize() == src.GetSize()
    assert dice(sitk.GetArrayFromImage(mask) == 1, truth == 1) >= 0.9
    assert result["findings"][0]["extent"] == "image" and result["label_names"] == {"right lung nodule": 1}


@pytest.mark.parametrize("args, words", [
    (["--point", "1,2,3"], "--kind"),
    (["--point", "1,2", "--kind", "nodule"], "three indices"),
    (["--point", "a,b,c", "--kind", "nodule"], "numbers separated by commas"),
    (["--point", "1,2,3", "--kind", "blob"], "'kind' must be one of"),
    (["--point-mm=1,2", "--kind", "nodule"], "three numbers"),
])
def test_cli_bad_points_exit_2_with_a_message(ras, tmp_path, args, words, capsys):
    """In this process (the command's own exit path; a subprocess per case cost 8 s of start-up each)."""
    from monailabel_app.cli import main

    _, image, _ = ras
    try:
        code = main(["-i", image, "-o", str(tmp_path / "out"), *args])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and words in err, err
