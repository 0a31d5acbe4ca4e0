import json
import os
import subprocess
import sys

import numpy as np
import SimpleITK as sitk
from PIL import Image

from conftest import ROOT, shared


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "monailabel_app.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_phantom_and_read_commands(tmp_path):
    p = run_cli("phantom", "--seed", "11", "--out", str(tmp_path / "ph"))
    assert p.returncode == 0, p.stderr
    meta = json.load(open(tmp_path / "ph" / "phantom_000011.json"))
    assert meta["report"] == "nodule in the right middle zone. effusion in the left lower zone."
    mask = np.array(Image.open(tmp_path / "ph" / "phantom_000011_mask.png"))
    assert set(np.unique(mask)) == {0, 1, 2}

    out = tmp_path / "out"
    p = run_cli("-i", str(tmp_path / "ph" / "phantom_000011.png"), "-o", str(out), "--save-inputs")
    assert p.returncode == 0, p.stderr
    assert "NOT MedGemma" in p.stdout
    res = json.load(open(out / "findings.json"))
    assert res["report"] == meta["report"] and [f["label"] for f in res["findings"]] == [1, 2]
    image = np.array(Image.open(tmp_path / "ph" / "phantom_000011.png"))
    for name, dtype in (("mask.nii.gz", np.uint8), ("heatmap.nii.gz", np.float32)):
        img = sitk.ReadImage(str(out / name))
        arr = sitk.GetArrayFromImage(img)
        assert arr.shape == image.shape and arr.dtype == dtype and img.GetSpacing() == (1.0, 1.0)
    assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "mask.nii.gz"))))) == {0, 1, 2}
    overlay = Image.open(out / "overlay.png")
    assert overlay.size == (image.shape[1], image.shape[0]) and overlay.mode == "RGB"
    # --save-inputs: the exact square RGB handed to the processor, and where it came from
    sq = np.array(Image.open(out / "inputs" / "image_000.png"))
    index = json.load(open(out / "inputs" / "index.json"))[0]
    assert sq.shape == (index["square_side"],) * 2 + (3,)
    t, l = index["pad_top"], index["pad_left"]
    assert np.array_equal(sq[t : t + image.shape[0], l : l + image.shape[1], 0], image)


def test_a_chinese_reading_from_the_command_line(tmp_path):
    """The issue's own check: a Chinese question writes a Chinese report, its findings with masks and the
    structured report."""
    from monailabel_app.language.report import format_findings
    from monailabel_app.phantoms.films import make_phantom

    ph = make_phantom(11)
    Image.fromarray(ph.image).save(tmp_path / "phantom.png")
    p = run_cli("-i", str(tmp_path / "phantom.png"), "-o", str(tmp_path / "out"), "--question", "请描述这张胸片的异常")
    assert p.returncode == 0, p.stderr
    assert "影像所见" in p.stdout and "诊断意见" in p.stdout
    res = json.loads((tmp_path / "out" / "findings.json").read_text(encoding="utf-8"))
    assert res["report"] == format_findings(ph.findings, "zh") and res["structured_report"]["language"] == "zh"
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "mask.nii.gz")))
    assert sorted(set(np.unique(mask)) - {0}) == [f["label"] for f in res["findings"]] == [1, 2]
    p = run_cli("-i", str(tmp_path / "phantom.png"), "-o", str(tmp_path / "out2"), "--language", "fr")
    assert p.returncode == 2 and "invalid choice" in p.stderr


def test_dicom_geometry_and_bad_input(tmp_path):
    src = shared("cxr", "dicom", "dx_image.dcm")
    p = run_cli("-i", src, "-o", str(tmp_path / "dx"))
    assert p.returncode == 0, p.stderr
    img = sitk.ReadImage(str(tmp_path / "dx" / "mask.nii.gz"))
    ref = sitk.ReadImage(src)
    assert img.GetSize() == ref.GetSize()[:2]
    assert np.allclose(img.GetSpacing(), ref.GetSpacing()[:2])
    (tmp_path / "bad.dcm").write_bytes(b"\x00" * 10)
    p = run_cli("-i", str(tmp_path / "bad.dcm"), "-o", str(tmp_path / "bad"))
    assert p.returncode == 2 and "error:" in p.stderr
    assert not os.path.exists(tmp_path / "bad" / "findings.json")
