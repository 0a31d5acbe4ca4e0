"""``medgemma-label study``: references from every source, the metrics' definitions, the tables, resuming.

The language rules (logic breaks, key-term errors, agreement) are tested on written answers in both
languages; the references on real data (LIDC XML, an RTSTRUCT drawn from those outlines, label maps of a
RAS-stored phantom, boxes); the whole plan on phantoms with the phantom model, killed and resumed.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, shared
from monailabel_app.jobs import references, studies, study_tables
from monailabel_app.language.findings import read_answer

LIDC = ("ct", "lidc")


def first(text):
    return read_answer(text).findings


# ------------------------------------------------------------------------------------------ language


@pytest.mark.parametrize("first_answer, later, why", [
    ("右肺上叶见结节。", "右肺上叶结节，密度均匀，边界清楚。", ""),
    ("右肺上叶见结节。", "结合上述发现，最可能的诊断是周围型肺癌。", ""),
    ("右肺上叶见结节。", "右肺上叶未见异常。", "denies it"),
    ("右肺上叶见结节。", "未见明显异常。", "denies it"),
    ("右肺上叶见结节。", "左肺上叶见结节。", "another side"),
    ("右肺上叶见结节。", "右肺下叶见结节。", "another lobe or zone"),
    ("右肺上叶见结节。", "右肺上叶见胸腔积液。", "another kind"),
    ("右肺中叶见肿块。右肺下叶见肿块。", "右肺中叶见肿块。右肺下叶见肿块。", ""),  # both repeated: no break
    ("右肺下野见结节。左肺中野见结节。", "右肺中野结节。", "another lobe or zone"),  # a right nodule, another zone
    ("未见明显异常。", "右肺上叶见结节。", "names a finding the first answer did not"),
    ("未见明显异常。", "未见明显异常。", ""),
    ("A nodule in the right upper lobe.", "It is well-defined with uniform density.", ""),
    ("A nodule in the right upper lobe.", "There is no nodule in the right upper lobe.", "denies it"),
    ("A nodule in the right upper lobe.", "The nodule is in the left upper lobe.", "another side"),
    ("A nodule in the right upper lobe.", "Most likely a primary lung cancer.", ""),
    ("Right upper zone opacity.", "A right lower zone opacity.", "another lobe or zone"),
])
def test_logic_break_is_decided_by_the_findings_layer(first_answer, later, why):
    assert studies.logic_break(first(first_answer), later) == why


@pytest.mark.parametrize("answer, error", [
    ("右肺上叶见结节。", False),
    ("右上肺野结节，密度均匀。", False),  # a zone agrees with the lobe's level
    ("左肺上叶见结节。", True),  # the other side
    ("右肺上叶见肿块。", True),  # another kind
    ("未见明显异常。", True),  # denies the nodule that is there
    ("左肺下叶未见异常。", False),  # denies nothing that is there
    ("最可能的诊断是肺癌。", False),  # a diagnosis names no finding
    ("No nodule in the right upper lobe.", True),
    ("Right upper lobe nodule, well-defined.", False),
])
def test_key_term_error_against_the_reference(answer, error):
    assert studies.key_term_error(answer, [("nodule", "right", "upper")]) is error


def test_agreement_is_one_to_one_on_kind_and_site():
    ref = [("nodule", "right", "upper"), ("effusion", "left", "lower")]
    assert studies.agreement_counts([("nodule", "right", "upper")], ref) == {"tp": 1, "predicted": 1, "reference": 2}
    # the same finding said twice matches once
    assert studies.agreement_counts([("nodule", "right", "upper")] * 2, ref)["tp"] == 1
    # wrong side: no match; an unnamed level matches the level
    assert studies.agreement_counts([("nodule", "left", "upper")], ref)["tp"] == 0
    assert studies.agreement_counts([("effusion", "left", "")], ref)["tp"] == 1
    # a reference of unknown kind ("lesion", e.g. a box without text) matches any kind at its site
    assert studies.agreement_counts([("mass", "left", "lower")], [("lesion", "left", "")])["tp"] == 1


def test_bootstrap_intervals_are_seeded_and_hold_the_value():
    num, den = [0, 1, 2, 1, 0, 3, 1], [1, 1, 2, 1, 1, 3, 2]
    a = study_tables.ratio_ci(num, den, "cell", 100)
    assert a == study_tables.ratio_ci(num, den, "cell", 100)  # same name, same draws
    assert a["lo"] <= a["value"] <= a["hi"] and a["n"] == 11 and a["studies"] == 7
    assert a["value"] == pytest.approx(100 * 8 / 11)
    m = study_tables.median_ci([3.0, 1.0, 2.0, 10.0], "latency")
    assert m["value"] == 2.5 and m["lo"] <= 2.5 <= m["hi"]
    assert "–" in study_tables.cell(study_tables.ratio_ci([], [], "empty"))


# ------------------------------------------------------------------------------------------ references


def test_phantom_references_are_the_known_lesions():
    from monailabel_app.phantoms.films import make_phantom

    refs = references.phantom_studies(xray=3, ct=1)
    assert [r.modality for r in refs] == ["xray"] * 3 + ["ct"]
    ph = make_phantom(1)
    assert [(les.kind, les.side, les.level) for les in refs[1].lesions] == [(x.kind, x.side, x.level) for x in ph.lesions]
    assert refs[1].reference_findings() == [(x.kind, x.side, x.level) for x in ph.lesions]
    ct = refs[3].load()
    assert refs[3].lesions and all(les.mask.shape == ct.geometry.shape for les in refs[3].lesions)
    assert all(3 <= les.diameter_mm <= 80 for r in refs for les in r.lesions)


def test_lidc_xml_gives_one_lesion_per_nodule_as_the_readers_consensus():
    import SimpleITK as sitk

    refs = references.folder_studies(shared(*LIDC))
    assert len(refs) == 1 and refs[0].modality == "ct"  # the annotation files are not studies
    (les,) = refs[0].lesions
    consensus = sitk.GetArrayFromImage(sitk.ReadImage(
        shared(*LIDC, "LIDC-IDRI-0001", "annotations", "nodule_consensus_ge2readers.nii.gz"))).astype(bool)
    assert np.array_equal(les.mask, consensus)  # >= half of the 4 readers, voxel for voxel
    assert (les.kind, les.side) == ("nodule", "left")  # image column 316 of 512, the body's centre at 242: patient left
    assert 27 <= les.diameter_mm <= 36 and "4 reader" in les.source


def _write_rtstruct(path, series_folder, volume, rois):
    """A DICOM RTSTRUCT on the series: ``rois`` = [(name, interpreted type, mask on the stored grid)],
    each slice's outline (marching squares) as CLOSED_PLANAR contours in patient coordinates."""
    import glob

    import pydicom
    from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    from skimage.measure import find_contours

    src = pydicom.dcmread(sorted(glob.glob(os.path.join(series_folder, "*.dcm")))[0], stop_before_pixels=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(path, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "RTSTRUCT"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.PatientID = src.StudyInstanceUID, generate_uid(), src.PatientID
    series = Dataset()
    series.SeriesInstanceUID = src.SeriesInstanceUID
    study = Dataset()
    study.RTReferencedSeriesSequence = Sequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = src.FrameOfReferenceUID
    frame.RTReferencedStudySequence = Sequence([study])
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame])
    ds.StructureSetROISequence, ds.ROIContourSequence, ds.RTROIObservationsSequence = Sequence(), Sequence(), Sequence()
    for number, (name, kind, mask) in enumerate(rois, start=1):
        roi = Dataset()
        roi.ROINumber, roi.ROIName, roi.ReferencedFrameOfReferenceUID = number, name, src.FrameOfReferenceUID
        ds.StructureSetROISequence.append(roi)
        obs = Dataset()
        obs.ObservationNumber, obs.ReferencedROINumber, obs.RTROIInterpretedType = number, number, kind
        ds.RTROIObservationsSequence.append(obs)
        contours = Sequence()
        for z in np.nonzero(mask.reshape(mask.shape[0], -1).any(1))[0]:
            for line in find_contours(np.pad(mask[z], 1).astype(float), 0.5):
                pts = [references.to_patient_mm(volume, (z, r - 1, c - 1)) for r, c in line[:-1]]
                c = Dataset()
                c.ContourGeometricType, c.NumberOfContourPoints = "CLOSED_PLANAR", len(pts)
                c.ContourData = [f"{x:.3f}" for p in pts for x in p]
                contours.append(c)
        item = Dataset()
        item.ReferencedROINumber, item.ContourSequence = number, contours
        ds.ROIContourSequence.append(item)
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.save_as(path, write_like_original=False)


def test_rtstruct_contours_become_lesions_on_the_series(tmp_path):
    """An RTSTRUCT drawn from the LIDC consensus (a nodule, and a body outline that is anatomy) on the real
    series, read back through the study's references: the nodule's voxels, named by the ROI."""
    import SimpleITK as sitk

    from monailabel_app.grounding.anatomy import body_mask
    from monailabel_app.io.ct import load_ct

    series = os.path.dirname(next(p for p in _walk(shared(*LIDC)) if p.endswith(".dcm")))
    case = tmp_path / "case"
    (case / "series").mkdir(parents=True)
    for name in os.listdir(series):
        os.symlink(os.path.join(series, name), case / "series" / name)
    volume = load_ct(str(case / "series"))
    nodule = sitk.GetArrayFromImage(sitk.ReadImage(
        shared(*LIDC, "LIDC-IDRI-0001", "annotations", "nodule_consensus_ge2readers.nii.gz"))).astype(bool)
    body = volume.to_input(body_mask(volume.hu).astype(np.float32), nearest=True) > 0.5
    _write_rtstruct(str(case / "rtstruct.dcm"), str(case / "series"), volume,
                    [("left lower lobe nodule", "GTV", nodule), ("Body", "EXTERNAL", body)])
    (ref,) = references.folder_studies(str(tmp_path))  # the RTSTRUCT is a reference, not a study
    (les,) = ref.lesions  # the body outline is anatomy
    assert (les.kind, les.side, les.level) == ("nodule", "left", "lower")
    assert studies_dice(les.mask, nodule) > 0.95


def studies_dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def _walk(root):
    return sorted(os.path.join(r, n) for r, _, names in os.walk(root) for n in names)


def test_label_maps_of_a_ras_stored_ct_keep_each_lesions_side(tmp_path):
    """A CT phantom and its label map both stored RAS (the index x axis toward the patient's right): the
    lesions come back on the stored grid, each on its own side, named by the label JSON."""
    from monailabel_app.phantoms.ct import make_ct_phantom, save

    ph = make_ct_phantom(3)
    labels = np.zeros(ph.hu.shape, np.uint8)
    for k, les in enumerate(ph.lesions, start=1):
        labels[les.mask] = k
    save(ph, str(tmp_path / "chest.nii.gz"), "RAS")
    save(ph, str(tmp_path / "chest_label.nii.gz"), "RAS", array=labels)
    with open(tmp_path / "chest_label.json", "w") as f:
        json.dump({str(k): les.kind for k, les in enumerate(ph.lesions, start=1)}, f)  # kind only: the side is derived
    (ref,) = references.folder_studies(str(tmp_path))
    assert ref.modality == "ct" and len(ref.lesions) == len(ph.lesions)
    for les, truth in zip(ref.lesions, ph.lesions):
        assert les.kind == truth.kind and les.side == truth.side
        assert les.mask.sum() == truth.mask.sum()
        # stored RAS: x reversed against the phantom's LPS array, same patient position
        volume = ref.load()
        assert np.allclose(references.to_patient_mm(volume, references.centre_index(les.mask)),
                           references.to_patient_mm(_lps(ph), references.centre_index(truth.mask)), atol=1e-3)


def _lps(ph):
    from monailabel_app.phantoms.ct import phantom_volume

    return phantom_volume(ph)


def test_boxes_and_report_text_are_references(tmp_path):
    from PIL import Image

    from monailabel_app.phantoms.films import make_phantom

    ph = make_phantom(1)
    Image.fromarray(ph.image).save(tmp_path / "film.png")
    Image.fromarray(ph.image).save(tmp_path / "other.png")
    rows = []
    for les in ph.lesions:
        ys, xs = np.nonzero(les.mask)
        rows.append({"image": "film.png", "y0": ys.min(), "x0": xs.min(), "y1": ys.max() + 1, "x1": xs.max() + 1,
                     "finding": f"{les.kind} in the {les.side} {les.level} zone"})
    with open(tmp_path / "boxes.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(tmp_path / "reports.csv", "w", newline="", encoding="utf-8") as f:
        f.write("study,report\nother.png,右下肺野见斑片影，左侧胸腔积液。\n")
    film, other = references.folder_studies(str(tmp_path))
    assert [(les.kind, les.side, les.level) for les in film.lesions] == [(x.kind, x.side, x.level) for x in ph.lesions]
    assert all(les.mask[x.mask].all() for les, x in zip(film.lesions, ph.lesions))  # each box covers its lesion
    assert other.lesions == [] and other.reference_findings() == [("opacity", "right", "lower"), ("effusion", "left", "")]


# ------------------------------------------------------------------------------------------ the run


def _table(path, drop=("latency", "prefill", "decode", "maps", "peak_memory")):
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [{k: v for k, v in r.items() if not k.startswith(drop)} for r in rows]


ARGS = ["--xray", "2", "--ct", "1", "--precisions", "fp32,int8", "--dose", "0.2", "--language", "zh"]


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("study") / "whole")
    records = studies.run("phantoms", out, precisions="fp32,int8", dose=0.2, language="zh", xray=2, ct=1,
                          progress=False, log=lambda *a: None)
    return out, records


def test_one_command_gives_the_three_tables_with_intervals(whole_run):
    out, records = whole_run
    assert {"report.md", "localisation.csv", "multi_turn.csv", "low_dose.csv", "precision.png", "multi_turn.png",
            "low_dose.png", "manifest.jsonl", "study.json"} <= set(os.listdir(out))
    ok = [r for r in records if r["status"] == "ok"]
    # 3 readings, 3 chains, 1 CT at the reduced dose; int8 once, as not run (no CUDA here)
    assert sorted(r["condition"] for r in ok) == ["chain"] * 3 + ["dose"] + ["reading"] * 3
    (missing,) = [r for r in records if r["status"] == "unavailable"]
    assert missing["precision"] == "int8" and "CUDA" in missing["error"]
    t1 = _table(os.path.join(out, "localisation.csv"), drop=())
    assert [(r["precision"], r["modality"]) for r in t1] == [("fp32", "xray"), ("fp32", "ct"), ("int8", "")]
    assert t1[2]["note"].startswith("not run") and "CUDA" in t1[2]["note"]
    for r in t1[:2]:
        for key in ("localisation_error_mm", "pointing", "agreement_f1", "latency_s"):
            assert r[key] != "" and float(r[f"{key}_lo"]) <= float(r[key]) <= float(r[f"{key}_hi"]), (key, r)
            assert int(r[f"{key}_n"]) > 0
    chain = [r for r in ok if r["condition"] == "chain"]
    assert all(len(r["chain"]["answers"]) == 3 and len(r["chain"]["breaks"]) == 2 for r in chain)
    assert any("结节" in a or "影" in a or "肿块" in a or "积液" in a for r in chain for a in r["chain"]["answers"])
    t3 = _table(os.path.join(out, "low_dose.csv"), drop=())
    assert [(r["precision"], r["dose"]) for r in t3] == [("fp32", "1.0"), ("fp32", "0.2"), ("int8", "")]
    report = open(os.path.join(out, "report.md"), encoding="utf-8").read()
    assert "右肺上叶有什么异常？" in report and "not run" in report and "[" in report and "(n=" in report


def test_a_killed_run_resumes_to_the_same_tables(whole_run, tmp_path, monkeypatch, capsys):
    """The same plan run by the CLI, killed (SIGKILL) after three finished units, then started again (here,
    through the CLI's main): the units already done are not read again, and the tables equal the
    uninterrupted run's (timings aside)."""
    from monailabel_app.cli import main

    out, _ = whole_run
    resumed = str(tmp_path / "resumed")
    cmd = [sys.executable, "-m", "monailabel_app.cli", "study", "--out", resumed, "--no-progress", *ARGS]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = os.path.join(resumed, "manifest.jsonl")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if os.path.exists(manifest) and sum(1 for _ in open(manifest)) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = {json.loads(line)["study"] for line in open(manifest) if line.strip()}
    assert 3 <= len(done_before) < 8
    monkeypatch.chdir(ROOT)
    capsys.readouterr()
    assert main(cmd[3:]) == 0
    assert f"{len(done_before)} units done" in capsys.readouterr().out
    lines = [json.loads(line) for line in open(manifest) if line.strip()]
    assert len(lines) == 8 and len({r["study"] for r in lines}) == 8  # nothing read twice
    for name in ("localisation.csv", "multi_turn.csv", "low_dose.csv"):
        assert _table(os.path.join(resumed, name)) == _table(os.path.join(out, name)), name


def test_bad_arguments_exit_2_with_a_message(tmp_path, whole_run):
    from monailabel_app.cli import main

    assert main(["study", "--out", str(tmp_path / "a"), "--precisions", "fp64"]) == 2
    assert main(["study", "--out", str(tmp_path / "b"), "--data", str(tmp_path / "none")]) == 2
    assert main(["study", "--out", str(tmp_path / "c"), "--dose", "1.5"]) == 2
    out, _ = whole_run  # a finished run asked to continue with other settings
    assert main(["study", "--out", out, *ARGS[:-1], "en"]) == 2
