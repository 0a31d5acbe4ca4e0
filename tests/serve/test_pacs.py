"""The app on a real PACS: Orthanc with DICOMweb, real CT series and chest radiographs from ../shared/data.

Upload, list (CT and CR/DX), infer by series UID through the MONAI Label server, save the label, then
read the DICOM SEG and SR back from Orthanc and check them against the sources and against what the
client was told. Then the failures: unknown series, a series deleted from the PACS, Orthanc stopped
(and restarted), wrong credentials.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

import numpy as np
import pydicom
import pytest
import requests

from tests.conftest import ROOT, shared
from tests.orthanc import Orthanc, available

sys.path.insert(0, os.path.join(ROOT, "plugins", "slicer", "MedGemma"))
from MedGemmaLib import MedGemmaClient, ServerError  # noqa: E402

# skipped where Orthanc is not installed, unless scripts/test.sh (and so CI) asks for it: then it fails
pytestmark = [pytest.mark.server,
              pytest.mark.skipif(bool(available()) and not os.environ.get("MEDGEMMA_REQUIRE_ORTHANC"), reason=available() or "")]

USERS = {"medgemma": "s3cret-pacs"}
LIDC = "ct/lidc/LIDC-IDRI-0001/1.3.6.1.4.1.14519.5.2.1.6279.6001.298806137288633453246975630178/1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"
RADIOGRAPHS = ["cxr/dicom/RG1_UNCR.dcm", "cxr/dicom/dx_image.dcm"]


def with_uids(src_dir: str, out_dir: str) -> list[str]:
    """The TotalSegmentator series was de-identified with its UIDs blanked: give it study/series UIDs and
    each slice its SOP UIDs from the file meta, as a PACS import would; Orthanc refuses it otherwise."""
    os.makedirs(out_dir, exist_ok=True)
    study = pydicom.uid.generate_uid(entropy_srcs=["totalsegmentator example_ct_dicom study"])
    series = pydicom.uid.generate_uid(entropy_srcs=["totalsegmentator example_ct_dicom series"])
    paths = []
    for f in sorted(glob.glob(os.path.join(src_dir, "*"))):
        ds = pydicom.dcmread(f)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.PatientID = study, series, "TS-EXAMPLE"
        paths.append(os.path.join(out_dir, os.path.basename(f) + ".dcm"))
        ds.save_as(paths[-1])
    return paths


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    work = tmp_path_factory.mktemp("orthanc")
    with Orthanc(str(work / "pacs"), users=USERS) as orthanc:
        series = {}
        files = {
            "lidc": sorted(glob.glob(os.path.join(shared(LIDC), "*"))),
            "totalseg": with_uids(shared("ct/totalsegmentator/example_ct_dicom"), str(work / "ts")),
            "cr": [shared(RADIOGRAPHS[0])],
            "dx": [shared(RADIOGRAPHS[1])],
            "siim": sorted(glob.glob(os.path.join(shared("cxr/siim"), "*.dcm"))),
        }
        for name, paths in files.items():
            orthanc.upload(paths)
            series[name] = str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
        orthanc.series, orthanc.files = series, files
        yield orthanc


@pytest.fixture(scope="module")
def server(pacs, tmp_path_factory):
    from monailabel_app.serve.server import ServerProcess

    user, password = pacs.auth
    env = {"MONAI_LABEL_DICOMWEB_USERNAME": user, "MONAI_LABEL_DICOMWEB_PASSWORD": password}
    with ServerProcess(pacs.dicomweb, env=env, workdir=str(tmp_path_factory.mktemp("server"))) as s:
        yield s


def dicomweb(pacs):
    from dicomweb_client import DICOMwebClient
    from dicomweb_client.session_utils import create_session_from_user_pass

    return DICOMwebClient(pacs.dicomweb, session=create_session_from_user_pass(*pacs.auth))


def infer(server, series_uid: str, **params):
    """(status, result JSON or error body, label file) of /infer/medgemma on a PACS series, through the
    module's client (plain Python, the one the Slicer module uses)."""
    try:
        r = MedGemmaClient(server.url).infer(series_uid, result_extension=".nii.gz", **params)
    except ServerError as e:
        return e.status, {"detail": e.message}, None
    return 200, r.raw, r.label_file


def read_back(pacs, study_uid: str, series_uid: str, sop_uid: str):
    return dicomweb(pacs).retrieve_instance(study_uid, series_uid, sop_uid)


def frame_sources(seg) -> list[str]:
    return [str(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
            for f in seg.PerFrameFunctionalGroupsSequence]


def segment_of_frame(seg, i: int) -> int:
    return int(seg.PerFrameFunctionalGroupsSequence[i].SegmentIdentificationSequence[0].ReferencedSegmentNumber)


def check_round_trip(pacs, server, name: str, tmp_path):
    """Infer on the PACS series ``name``, save, read SEG and SR back; return (result, seg, sr, label)."""
    import SimpleITK as sitk

    uid = pacs.series[name]
    status, result, label = infer(server, uid)
    assert status == 200, result
    assert result["findings"], f"{name}: the phantom model found nothing to round-trip: {result['report']}"
    stored = MedGemmaClient(server.url).save(uid, label)["dicom"]  # the stock plugin's save: no reading sent
    assert set(stored) == {"seg", "sr"}
    seg, sr = (read_back(pacs, stored[k]["StudyInstanceUID"], stored[k]["SeriesInstanceUID"], stored[k]["SOPInstanceUID"])
               for k in ("seg", "sr"))
    label_map = sitk.GetArrayFromImage(sitk.ReadImage(label))
    sources = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in pacs.files[name])}

    # references resolve to the source instances on the PACS
    assert seg.Modality == "SEG" and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
    assert seg.StudyInstanceUID == next(iter(sources.values())).StudyInstanceUID
    referenced = {str(i.ReferencedSOPInstanceUID) for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(sources)
    on_pacs = {str(pydicom.Dataset.from_json(d).SOPInstanceUID) for d in dicomweb(pacs).search_for_instances(
        series_instance_uid=uid)}
    assert set(frame_sources(seg)) <= on_pacs
    # segment labels are the finding names, in label order
    names = sorted(result["label_names"], key=result["label_names"].get)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == names == [f["name"] for f in result["findings"]]
    # geometry: each frame sits where its source frame sits, and holds the label's voxels of that segment
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    counts = {}
    for i, sop in enumerate(frame_sources(seg)):
        src = sources[sop]
        assert (seg.Rows, seg.Columns) == (src.Rows, src.Columns)
        if "ImagePositionPatient" in src:
            pos = seg.PerFrameFunctionalGroupsSequence[i].PlanePositionSequence[0].ImagePositionPatient
            assert np.allclose([float(v) for v in pos], [float(v) for v in src.ImagePositionPatient], atol=1e-3)
            orient = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
            assert np.allclose([float(v) for v in orient], [float(v) for v in src.ImageOrientationPatient], atol=1e-4)
        k = segment_of_frame(seg, i)
        counts[k] = counts.get(k, 0) + int(pixels[i].sum())
    for k in range(1, len(names) + 1):
        assert counts.get(k, 0) == int((label_map == k).sum()), f"{name}: segment {k} voxel count differs from the label"
    # the SR: report text, one group per finding referencing its segment, model and precision
    import highdicom as hd

    doc = hd.sr.Comprehensive3DSR.from_dataset(sr)
    texts = {i.ConceptNameCodeSequence[0].CodeMeaning: i.TextValue for i in doc.ContentSequence if i.ValueType == "TEXT"}
    assert texts["Findings"] == result["report"]
    groups = doc.content.get_volumetric_roi_measurement_groups()
    assert [g.tracking_identifier for g in groups] == [f["name"] for f in result["findings"]]
    for k, (g, f) in enumerate(zip(groups, result["findings"]), start=1):
        items = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in g[0].ContentSequence}
        assert items["Finding"].TextValue == f["text"]
        ref = items["Referenced Segment"].ReferencedSOPSequence[0]
        assert (ref.ReferencedSOPInstanceUID, int(ref.ReferencedSegmentNumber)) == (seg.SOPInstanceUID, k)
        assert seg.SegmentSequence[k - 1].SegmentLabel == f["name"]
        assert items["Algorithm Name"].TextValue == result["model"]["label"]
        params = [i.TextValue for i in g[0].ContentSequence if i.ConceptNameCodeSequence[0].CodeMeaning == "Algorithm Parameters"]
        assert f"precision={result['model']['precision']}" in params
    evidence = {str(s.SeriesInstanceUID): {str(i.ReferencedSOPInstanceUID) for i in s.ReferencedSOPSequence}
                for key in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence")
                for st in sr.get(key, []) for s in st.ReferencedSeriesSequence}
    assert evidence[uid] == set(sources) and evidence[seg.SeriesInstanceUID] == {seg.SOPInstanceUID}
    return result, seg, sr, label_map


def test_lists_ct_series_and_chest_radiographs(pacs, server):
    r = requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=60)
    assert r.status_code == 200, r.text
    listed = r.json()["objects"]
    assert set(pacs.series.values()) == set(listed)  # CT, CR and DX; nothing else was stored yet
    modality = {name: listed[uid]["image"]["info"]["Modality"] for name, uid in pacs.series.items()}
    assert modality == {"lidc": "CT", "totalseg": "CT", "cr": "CR", "dx": "DX", "siim": "CR"}


@pytest.mark.parametrize("name", ["lidc", "totalseg"])
def test_ct_series_round_trip_seg_and_sr(pacs, server, name, tmp_path):
    result, seg, _, _ = check_round_trip(pacs, server, name, tmp_path)
    assert result["modality"] == "ct" and int(seg.NumberOfFrames) >= 1


@pytest.mark.parametrize("name", ["cr", "siim"])
def test_radiograph_round_trip_seg_and_sr(pacs, server, name, tmp_path):
    result, seg, _, label = check_round_trip(pacs, server, name, tmp_path)
    assert result["modality"] == "xray"
    assert result["source"]["format"] == "DICOM" and result["source"]["modality"] == "CR"
    assert np.squeeze(label).shape == (seg.Rows, seg.Columns)


def test_monochrome1_radiograph_read_from_dicom_not_nifti(pacs, server):
    """The CR arrives as DICOM: its MONOCHROME1 inversion and window are applied (a NIfTI conversion
    would drop them)."""
    status, result, _ = infer(server, pacs.series["cr"])
    assert status == 200, result
    assert result["source"]["photometric"] == "MONOCHROME1"


def test_dx_radiograph_is_listed_and_read(pacs, server):
    status, result, _ = infer(server, pacs.series["dx"])
    assert status == 200, result
    assert result["modality"] == "xray" and result["source"]["modality"] == "DX"


def test_unknown_series_is_404(pacs, server):
    status, result, _ = infer(server, "1.2.3.4.5.6.7.8.9")
    assert status == 404 and "not on the PACS" in result["detail"]


def test_series_deleted_from_the_pacs_is_404_and_server_keeps_serving(pacs, server, tmp_path):
    extra = tmp_path / "extra.dcm"
    ds = pydicom.dcmread(shared(RADIOGRAPHS[1]))
    ds.SeriesInstanceUID, ds.SOPInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ds.save_as(str(extra))
    pacs.upload([str(extra)])
    pacs.delete_series(str(ds.SeriesInstanceUID))
    status, result, _ = infer(server, str(ds.SeriesInstanceUID))
    assert status == 404 and str(ds.SeriesInstanceUID) in result["detail"]
    assert requests.get(f"{server.url}/info/", timeout=30).status_code == 200


def test_pacs_stopped_gives_503_then_works_after_restart(pacs, server):
    uid = pacs.series["siim"]
    cache = os.path.join(server.workdir, "dicomweb")
    cached = glob.glob(os.path.join(cache, "**", uid), recursive=True)
    assert cached, "the series was not in the server's cache"
    for d in cached:  # make the server fetch it again
        shutil.rmtree(d)
    pacs.stop()
    try:
        status, result, _ = infer(server, uid)
        assert status == 503, result
        assert "cannot be reached" in result["detail"] and pacs.dicomweb in result["detail"]
        assert requests.get(f"{server.url}/info/", timeout=30).status_code == 200
        r = requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=60)
        assert r.status_code in (200, 503)  # listing: cached for a while, else the same clear error
        if r.status_code == 503:
            assert "cannot be reached" in r.json()["detail"]
    finally:
        pacs.start()
    status, result, _ = infer(server, uid)
    assert status == 200, result
    assert not glob.glob(os.path.join(cache, "**", "*.partial-*"), recursive=True), "a broken-off fetch left a partial series"


def test_wrong_credentials_are_a_clear_error(pacs, tmp_path):
    from monailabel_app.serve.server import ServerProcess

    env = {"MONAI_LABEL_DICOMWEB_USERNAME": "medgemma", "MONAI_LABEL_DICOMWEB_PASSWORD": "wrong"}
    with ServerProcess(pacs.dicomweb, env=env, workdir=str(tmp_path / "wrong")) as wrong:
        status, result, _ = infer(wrong, pacs.series["dx"])
        assert status == 502, result
        assert "refused this server's credentials" in result["detail"] and "401" in result["detail"]
        info = requests.get(f"{wrong.url}/info/", timeout=30)
        assert info.status_code == 200 and "401" in info.json()["datastore"]["error"]


def test_batch_prelabels_every_series_of_the_pacs(pacs, tmp_path):
    """medgemma-label batch with a DICOMweb URL: every CT/CR/DX series fetched (credentials from the
    environment, as for the server), read, and in the manifest."""
    import subprocess

    user, password = pacs.auth
    env = dict(os.environ, MONAI_LABEL_DICOMWEB_USERNAME=user, MONAI_LABEL_DICOMWEB_PASSWORD=password)
    out = tmp_path / "batch"
    r = subprocess.run([sys.executable, "-m", "monailabel_app.cli", "batch", "--no-progress", "-i", pacs.dicomweb,
                        "-o", str(out)], capture_output=True, text=True, timeout=1200, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    import json as _json

    rows = [_json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert {x["study"] for x in rows} >= set(pacs.series.values())  # SEG/SR series stored earlier are not listed
    assert all(x["status"] == "ok" for x in rows)
    modality = {x["study"]: x["modality"] for x in rows}
    assert modality[pacs.series["lidc"]] == "ct" and modality[pacs.series["cr"]] == "xray"


def test_the_reading_page_reads_a_pacs_series_and_stores_its_sr_there(pacs, server):
    """The reading page on a PACS datastore: the series is offered and read by its UID, and the SR export
    is stored on the PACS (with its SEG), where it reads back with the page's report."""
    from gradio_client import Client

    uid = pacs.series["lidc"]
    page = Client(server.url + "/reader/", verbose=False)
    shown = page.predict(None, uid, "", "zh", api_name="/analyse")
    report, status = shown[7], shown[9]  # the outputs the client sees (the session's state stays on the server)
    assert "第 1 次阅片完成" in status and "影像所见" in report, (status, report)
    files, note = page.predict(report + "\n医师复核：同意。", "zh", 1, "lung", True, [1], 0.45, api_name="/export_sr")
    assert any(os.path.basename(f).endswith("sr.dcm") for f in files)
    assert "已存入 PACS" in note, note
    sr_series = note.split("sr ")[1].split(",")[0].strip()
    found = dicomweb(pacs).search_for_instances(search_filters={"SeriesInstanceUID": sr_series})
    assert len(found) == 1, (note, [pydicom.Dataset.from_json(d).Modality for d in found][:3])
    meta = pydicom.Dataset.from_json(found[0])
    sr = read_back(pacs, str(meta.StudyInstanceUID), sr_series, str(meta.SOPInstanceUID))
    assert sr.Modality == "SR" and "医师复核：同意。" in str(sr.to_json_dict())
