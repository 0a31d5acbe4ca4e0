"""DICOM SEG and SR from local DICOM input (real scans from ../shared/data): geometry, orientation,
references, read back by an independent reader (dcmqi), the CLI, and clear errors."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pydicom
import pytest

from monailabel_app.errors import InputError
from monailabel_app.io import dicom_export
from monailabel_app.io.ct import load_ct
from monailabel_app.io.writers import write_in_geometry
from tests.conftest import shared

LIDC = ("ct/lidc/LIDC-IDRI-0001/1.3.6.1.4.1.14519.5.2.1.6279.6001.298806137288633453246975630178/"
        "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192")
CR = "cxr/dicom/RG1_UNCR.dcm"


def reading(findings, report="", modality="ct"):
    return {"report": report or " ".join(f["text"] for f in findings), "findings": findings, "modality": modality,
            "label_names": {f["name"]: f["label"] for f in findings},
            "model": {"id": "/srv/models/phantom-gemma3", "label": "phantom-gemma3 (synthetic test model, NOT MedGemma)",
                      "precision": "fp32", "device": "cpu"}}


LEFT_UPPER = {"label": 1, "name": "left upper lobe nodule", "text": "nodule in the left upper lobe.", "kind": "nodule",
              "location": "left upper lobe", "side": "left", "level": "upper"}
RIGHT_LOWER = {"label": 2, "name": "right lower lobe opacity", "text": "opacity in the right lower lobe.",
               "kind": "opacity", "location": "right lower lobe", "side": "right", "level": "lower"}


@pytest.fixture(scope="module")
def lidc_export(tmp_path_factory):
    """A label drawn on the display grid (x toward patient left, z toward the head): finding 1 in the
    patient's left upper corner of the slab, finding 2 in the right lower corner; back on the stored
    grid, written as the server writes labels, exported."""
    folder = shared(LIDC)
    vol = load_ct(folder)
    nz, ny, nx = vol.shape
    display = np.zeros(vol.shape, np.uint8)
    display[nz - 4:, ny // 3: ny // 2, nx - 150: nx - 100] = 1  # top slices, patient left
    display[:4, ny // 3: ny // 2, 100:150] = 2  # bottom slices, patient right
    path = str(tmp_path_factory.mktemp("lidc") / "label.nii.gz")
    write_in_geometry(vol.to_input(display, nearest=True), vol.geometry, path)
    seg, sr = dicom_export.export(folder, path, reading([LEFT_UPPER, RIGHT_LOWER]))
    return folder, path, reread(seg), sr


def reread(ds):
    """The object as a receiver reads it (written and parsed again)."""
    from io import BytesIO

    buf = BytesIO()
    ds.save_as(buf)
    buf.seek(0)
    return pydicom.dcmread(buf)


def world_points(seg, segment: int) -> np.ndarray:
    """Patient coordinates (LPS, mm) of the segment's pixels, from the SEG's own plane positions."""
    shared_fg = seg.SharedFunctionalGroupsSequence[0]
    iop = np.array(shared_fg.PlaneOrientationSequence[0].ImageOrientationPatient, float)
    spacing = np.array(shared_fg.PixelMeasuresSequence[0].PixelSpacing, float)
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    out = []
    for i, fg in enumerate(seg.PerFrameFunctionalGroupsSequence):
        if int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber) != segment:
            continue
        r, c = np.nonzero(pixels[i])
        ipp = np.array(fg.PlanePositionSequence[0].ImagePositionPatient, float)
        out.append(ipp + np.outer(c * spacing[1], iop[:3]) + np.outer(r * spacing[0], iop[3:]))
    return np.concatenate(out)


def test_seg_lands_on_the_patients_side_and_level_on_a_real_ct(lidc_export):
    """Orientation: the left-upper finding's voxels are at larger LPS x (patient left) and z (head) than
    the right-lower one's; both named as the findings."""
    _, _, seg, _ = lidc_export
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["left upper lobe nodule", "right lower lobe opacity"]
    left_upper, right_lower = world_points(seg, 1), world_points(seg, 2)
    assert len(left_upper) == len(right_lower) == 4 * 50 * (512 // 2 - 512 // 3)
    assert left_upper[:, 0].min() > right_lower[:, 0].max()  # L of LPS: patient left is +x
    assert left_upper[:, 2].min() > right_lower[:, 2].max()  # S of LPS: head is +z


def test_seg_frames_reference_their_source_slices(lidc_export):
    folder, _, seg, _ = lidc_export
    sources = {str(ds.SOPInstanceUID): ds for ds in dicom_export.read_sources(folder)}
    for fg in seg.PerFrameFunctionalGroupsSequence:
        src = sources[str(fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)]
        assert np.allclose(np.array(fg.PlanePositionSequence[0].ImagePositionPatient, float),
                           np.array(src.ImagePositionPatient, float))
    assert seg.FrameOfReferenceUID == next(iter(sources.values())).FrameOfReferenceUID


def test_an_independent_reader_puts_the_seg_on_the_labels_voxels(lidc_export, tmp_path):
    """dcmqi (DCMTK/ITK, not our code) reads the SEG back into patient space: each segment covers the
    same physical voxels as the label it came from."""
    import SimpleITK as sitk

    tool = shutil.which("segimage2itkimage") or os.path.join(os.path.dirname(sys.executable), "segimage2itkimage")
    _, label_path, seg, _ = lidc_export
    seg.save_as(str(tmp_path / "seg.dcm"))
    subprocess.run([tool, "--inputDICOM", str(tmp_path / "seg.dcm"), "--outputDirectory", str(tmp_path), "-t", "nifti"],
                   check=True, capture_output=True, timeout=120)
    label = sitk.ReadImage(label_path)
    for k in (1, 2):
        (out,) = glob.glob(str(tmp_path / f"*{k}.nii*"))
        mask = sitk.ReadImage(out)
        on_label = sitk.Resample(mask, label, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        got, want = sitk.GetArrayFromImage(on_label) > 0, sitk.GetArrayFromImage(label) == k
        assert (got == want).all(), f"segment {k}: {int((got != want).sum())} voxels differ"


def test_sr_holds_report_findings_sites_and_model(lidc_export):
    import highdicom as hd

    _, _, seg, sr = lidc_export
    doc = hd.sr.Comprehensive3DSR.from_dataset(reread(sr))
    texts = {i.ConceptNameCodeSequence[0].CodeMeaning: i.TextValue for i in doc.ContentSequence if i.ValueType == "TEXT"}
    assert texts["Findings"] == "nodule in the left upper lobe. opacity in the right lower lobe."
    groups = doc.content.get_volumetric_roi_measurement_groups()
    assert [g.tracking_identifier for g in groups] == ["left upper lobe nodule", "right lower lobe opacity"]
    assert [(g.finding_type.value, g.finding_type.scheme_designator) for g in groups] == [("27925004", "SCT"), ("112001", "DCM")]
    site = groups[0].finding_sites[0]
    assert (site.value.value, site.laterality.value) == ("45653009", "7771000")  # upper lobe of lung, left
    site = groups[1].finding_sites[0]
    assert (site.value.value, site.laterality.value) == ("90572001", "24028007")  # lower lobe of lung, right
    items = {i.ConceptNameCodeSequence[0].CodeMeaning: i.TextValue for i in groups[0][0].ContentSequence if i.ValueType == "TEXT"}
    assert items["Algorithm Name"] == "phantom-gemma3 (synthetic test model, NOT MedGemma)"
    assert "/srv/" not in str(sr) and "/srv/" not in str(seg)  # no server path in the objects
    assert sr.SeriesDescription.endswith("not a diagnosis)") and seg.SeriesDescription.endswith("not a diagnosis)")


def test_radiograph_seg_is_pixel_for_pixel(tmp_path):
    path = shared(CR)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    plane = np.zeros((ds.Rows, ds.Columns), np.uint8)
    plane[200:400, 1200:1500] = 1
    from monailabel_app.io.xray import Geometry

    label = write_in_geometry(plane, Geometry.plain(ds.Rows, ds.Columns), str(tmp_path / "label.nii.gz"))
    finding = dict(RIGHT_LOWER, label=1, name="right upper zone opacity", location="right upper zone", level="upper")
    seg, sr = dicom_export.export(path, label, reading([finding], modality="xray"))
    assert int(seg.NumberOfFrames) == 1 and (seg.pixel_array.reshape(plane.shape) == plane).all()
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    assert sr.StudyInstanceUID == ds.StudyInstanceUID


def test_annotators_label_names_and_no_reading(lidc_export):
    """A corrected label saved with the Slicer plugin's label_info and no model reading: a SEG named as
    the annotator named the segments, and no SR (there is no report to hold)."""
    folder, path, _, _ = lidc_export
    seg, sr = dicom_export.export(folder, path, None, [{"name": "nodule (edited)", "idx": 1}, {"name": "scar", "idx": 2}])
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["nodule (edited)", "scar"] and sr is None


@pytest.mark.parametrize("case,words", [
    ("deidentified", "de-identified"),
    ("size", "must match"),
    ("png", "need DICOM input"),
])
def test_clear_errors(case, words, tmp_path):
    if case == "deidentified":  # the TotalSegmentator series as shipped: its UIDs were blanked
        src, label = shared("ct/totalsegmentator/example_ct_dicom"), str(tmp_path / "none.nii.gz")
    elif case == "size":
        from monailabel_app.io.xray import Geometry

        src = shared(CR)
        label = write_in_geometry(np.zeros((10, 10), np.uint8), Geometry.plain(10, 10), str(tmp_path / "l.nii.gz"))
    else:
        src, label = shared("cxr/nih/00000001_000.png"), str(tmp_path / "none.nii.gz")
    with pytest.raises(InputError, match=words):
        dicom_export.export(src, label, reading([LEFT_UPPER]))


def test_cli_writes_seg_and_sr_for_local_dicom(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "monailabel_app.cli", "-i", shared(CR), "-o", str(out), "--dicom"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads((out / "findings.json").read_text())
    assert result["files"]["seg"] == os.path.join("dicom", "seg.dcm") and result["files"]["sr"] == os.path.join("dicom", "sr.dcm")
    sr = pydicom.dcmread(str(out / "dicom" / "sr.dcm"))
    texts = [i.TextValue for i in sr.ContentSequence if i.ValueType == "TEXT"]
    assert result["report"] in texts
    seg = pydicom.dcmread(str(out / "dicom" / "seg.dcm"))
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [f["name"] for f in result["findings"]]


def test_cli_refuses_dicom_output_for_non_dicom_input_before_reading(tmp_path):
    r = subprocess.run([sys.executable, "-m", "monailabel_app.cli", "-i", shared("cxr/nih/00000001_000.png"),
                        "-o", str(tmp_path / "o"), "--dicom"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "need DICOM input" in r.stderr
    assert not (tmp_path / "o").exists()


def test_a_folder_holding_one_radiograph_is_that_radiograph(tmp_path):
    """How a CR/DX series arrives from a PACS: a folder with one file. It is read as the radiograph (its
    MONOCHROME1 applied); a folder of several images is a CT series, and two radiographs are not one."""
    from monailabel_app.io.study import detect, load_study

    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(shared(CR), one / "image.dcm")
    assert detect(str(one)) == "xray"
    study = load_study(str(one))
    assert study.source["photometric"] == "MONOCHROME1" and study.pixels.shape == (1955, 1841)
    shutil.copy(shared("cxr/dicom/dx_image.dcm"), one / "second.dcm")
    assert detect(str(one)) == "ct"
    with pytest.raises(InputError, match="2 DICOM series"):
        load_study(str(one))


def test_a_chinese_report_and_structured_report_read_back_unchanged(tmp_path):
    """SpecificCharacterSet ISO_IR 192 (UTF-8): pydicom reads the Chinese report, the finding's sentence and the
    structured report back unchanged, the bytes on disk are UTF-8, and dcmqi's SR reader (DCMTK) reads the
    document: the finding's group with its tracking identifier, coded kind and site (its JSON has no free text)."""
    from monailabel_app.language.findings import read_answer
    from monailabel_app.language.structured import structured_report

    folder = shared(LIDC)
    vol = load_ct(folder)
    nz, ny, nx = vol.shape
    display = np.zeros(vol.shape, np.uint8)
    display[nz - 4:, ny // 3: ny // 2, nx - 150: nx - 100] = 1  # patient left, top slices
    label = str(tmp_path / "label.nii.gz")
    write_in_geometry(vol.to_input(display, nearest=True), vol.geometry, label)
    text = "左肺上叶见结节，大小约8 mm，边界清楚。"
    answer = read_answer(text)
    names = ["left upper lobe nodule"]
    finding = dict(LEFT_UPPER, text=answer.findings[0].text)
    r = reading([finding], report=text)
    r["structured_report"] = structured_report(answer.findings, names, answer.text, "zh")
    seg, sr = dicom_export.export(folder, label, r)
    paths = dicom_export.write((seg, sr), str(tmp_path))
    back = pydicom.dcmread(paths["sr"])
    assert back.SpecificCharacterSet == "ISO_IR 192"
    import highdicom as hd

    doc = hd.sr.Comprehensive3DSR.from_dataset(back)
    texts = {i.ConceptNameCodeSequence[0].CodeMeaning: i.TextValue for i in doc.ContentSequence if i.ValueType == "TEXT"}
    assert texts["Findings"] == text and texts["Impression"] == r["structured_report"]["text"]
    assert "影像所见" in texts["Impression"] and "左肺上叶见结节" in texts["Impression"]
    (group,) = doc.content.get_volumetric_roi_measurement_groups()
    items = {i.ConceptNameCodeSequence[0].CodeMeaning: i.TextValue for i in group[0].ContentSequence if i.ValueType == "TEXT"}
    assert items["Finding"] == answer.findings[0].text
    assert text.encode("utf-8") in open(paths["sr"], "rb").read()
    tool = shutil.which("tid1500reader") or os.path.join(os.path.dirname(sys.executable), "tid1500reader")
    out = subprocess.run([tool, "--inputDICOM", paths["sr"], "--outputMetadata", str(tmp_path / "sr.json")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    (m,) = json.loads((tmp_path / "sr.json").read_text(encoding="utf-8"))["Measurements"]
    assert m["TrackingIdentifier"] == names[0] and m["Finding"]["CodeValue"] == "27925004"
    assert (m["FindingSite"]["CodeValue"], m["Laterality"]["CodeValue"]) == ("45653009", "7771000")
