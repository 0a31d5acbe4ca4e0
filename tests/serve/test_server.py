"""End to end through a real MONAI Label server, called exactly as the 3D Slicer plugin calls it."""

from __future__ import annotations

import glob
import os
import shutil
import time

import numpy as np
import pytest
import requests
import SimpleITK as sitk
from PIL import Image

from conftest import CXR, auto_precision, shared
from monailabel_app import allocator
from monailabel_app.io.xray import load_radiograph
from monailabel_app.phantoms.films import make_phantom

SERVER_WARM_UP = True  # conftest's server warms up at start here, as a GPU server does (tested below)
PHANTOM_SEEDS = [7, 11, 23, 42]
EMPTY_SEED = next(s for s in range(100) if not make_phantom(s).lesions)
SLICER = {"result_extension": ".nrrd", "result_dtype": "uint8"}
REAL = {
    "real_png": "nih/00000001_000.png",
    "real_cr_j2k": "dicom/RG1_J2KR.dcm",
    "real_dx": "dicom/dx_image.dcm",
    "real_siim_cr": "siim/*.dcm",
    "real_jpg": "lungseg2d/2.jpg",
}
BAD = {  # image id -> (file content or source, expected status, words in the message)
    "bad_empty": (b"", 422, "empty"),
    "bad_noise": (os.urandom(3000), 422, "DICOM"),
    "bad_truncated": ("truncated", 422, "pixel data"),
    "bad_sr": (("dicom_objects", "sr_document.dcm"), 422, "structured report"),
    "bad_ct_sequence": (("ct", "dicom_slices", "bad_sequence.dcm"), 422, "malformed"),
}
BAD_EXT = {"bad_empty": ".png", "bad_noise": ".dcm", "bad_truncated": ".dcm", "bad_sr": ".dcm", "bad_ct_sequence": ".dcm"}


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    d = tmp_path_factory.mktemp("studies")
    for seed in PHANTOM_SEEDS + [EMPTY_SEED]:
        Image.fromarray(make_phantom(seed).image).save(d / f"phantom_{seed}.png")
    for name, pattern in REAL.items():
        src = sorted(glob.glob(os.path.join(CXR, pattern)))[0]
        shutil.copy(src, d / (name + ("." + src.rsplit(".", 1)[1])))
    for name, (content, _, _) in BAD.items():
        dest = d / (name + BAD_EXT[name])
        if content == "truncated":
            data = open(shared("cxr", "dicom", "RG1_UNCR.dcm"), "rb").read()
            dest.write_bytes(data[: len(data) // 3])
        elif isinstance(content, tuple):
            shutil.copy(shared(*content), dest)
        else:
            dest.write_bytes(content)
    return d


def _path(studies, image_id):
    return next(p for p in glob.glob(str(studies / (image_id + ".*"))))


def test_info_lists_medgemma_for_the_slicer_plugin(client):
    info = client.info()
    m = info["models"]["medgemma"]
    assert m["type"] == "segmentation" and m["dimension"] == 3
    assert {"question", "max_new_tokens", "precision", "modality", "max_slices"} <= set(m["config"])
    # the server reads in the precision the policy gives this machine, and says why
    assert m["config"]["precision"] == m["model"]["precision"] == auto_precision()
    assert m["model"]["precision_reason"] and "NOT MedGemma" in m["model"]["label"]


def test_the_server_warms_up_at_start_and_says_so(server):
    """``--conf warm_up true``: in the background, a phantom radiograph and a phantom CT are read twice each;
    ``/info/`` says when it is done, with each shape's times, and the log has a line per shape."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        warm = requests.get(server.url + "/info/", timeout=30).json()["models"]["medgemma"]["warm_up"]
        if warm["state"] != "running":
            break
        time.sleep(0.5)
    assert warm["state"] == "done", warm
    assert [s["modality"] for s in warm["shapes"]] == ["xray", "ct"]
    assert all(s["prompt_tokens"] > 0 and s["first_s"] > 0 and s["then_s"] > 0 for s in warm["shapes"])
    assert warm["heap_reserved_gib"] == (0.25 if allocator.keep_freed_memory() else 0.0)  # --conf heap_reserve_gb 0.25
    # the shapes a request now finds warm: the radiograph's and the CT's, each cache (the prompt and the answer) in
    # its multiple of 256
    shapes = requests.get(server.url + "/info/", timeout=30).json()["models"]["medgemma"]["decode_shapes"]
    assert [(d["batch"], d["max_new_tokens"]) for d in shapes] == [(1, s["max_new_tokens"]) for s in warm["shapes"]]
    assert [d["cache_tokens"] for d in shapes] == [-(-(s["prompt_tokens"] + s["max_new_tokens"]) // 256) * 256
                                                   for s in warm["shapes"]], (shapes, warm)
    assert not any(d["compiled"] or d["captured"] for d in shapes)  # (the CPU steps eagerly)
    log = server.log_tail(200_000)
    assert "warm-up xray:" in log and "warm-up ct:" in log and "warm-up done" in log


@pytest.mark.parametrize("seed", PHANTOM_SEEDS)
def test_phantom_through_the_server(client, server, studies, seed, tmp_path):
    ph = make_phantom(seed)
    label_file, res = client.infer("medgemma", f"phantom_{seed}", SLICER)
    assert label_file.endswith(".nrrd")
    label = sitk.ReadImage(label_file)
    arr = sitk.GetArrayFromImage(label)
    assert arr.shape == ph.image.shape and arr.dtype == np.uint8  # the input's geometry
    assert label.GetSpacing() == (1.0, 1.0) and label.GetOrigin() == (0.0, 0.0)
    # the text names the right side and zone for each lesion, segments are named after the findings
    assert res["report"] == ph.report
    assert [(f["side"], f["level"], f["kind"]) for f in res["findings"]] == [(l.side, l.level, l.kind) for l in ph.lesions]
    assert res["label_names"] == {f["name"]: f["label"] for f in res["findings"]}
    assert sorted(set(np.unique(arr)) - {0}) == [f["label"] for f in res["findings"]]
    for f, les in zip(res["findings"], ph.lesions):
        cols = np.nonzero(arr == f["label"])[1]
        assert (cols.mean() < arr.shape[1] / 2) == (les.side == "right")  # patient right = image left
        assert f["text"] in res["report"] and 0 < f["score"] <= 1
    assert res["model"]["precision"] == auto_precision() and res["latencies"]["total"] > 0
    # the float heatmap is reachable through the datastore API, in the same geometry
    r = requests.get(server.url + res["heatmap"]["url"], timeout=30)
    assert r.status_code == 200
    hm_file = tmp_path / "hm.nrrd"
    hm_file.write_bytes(r.content)
    hm = sitk.ReadImage(str(hm_file))
    assert hm.GetSize() == label.GetSize() and sitk.GetArrayFromImage(hm).dtype == np.float32


def test_defaults_and_empty_answer(client):
    label_file, res = client.infer("medgemma", f"phantom_{EMPTY_SEED}", {})
    assert label_file.endswith(".nii.gz")
    arr = sitk.GetArrayFromImage(sitk.ReadImage(label_file))
    assert arr.shape == make_phantom(EMPTY_SEED).image.shape and not arr.any()
    assert res["findings"] == [] and res["label_names"] == {} and res["report"] == "no focal abnormality."


def test_a_chinese_question_through_the_server(client):
    """In Chinese through MONAI Label's client: the Chinese report, its findings named as segments with their
    labels, and the structured report in Chinese; "language": "en" asks a Chinese question for English."""
    from monailabel_app.language.report import format_findings

    ph = make_phantom(11)
    label_file, res = client.infer("medgemma", "phantom_11", {**SLICER, "question": "请描述这张胸片的异常"})
    arr = sitk.GetArrayFromImage(sitk.ReadImage(label_file))
    assert res["language"] == res["answer_language"] == "zh" and res["report"] == format_findings(ph.findings, "zh")
    assert res["label_names"] == {f["name"]: f["label"] for f in res["findings"]}
    assert sorted(set(np.unique(arr)) - {0}) == [f["label"] for f in res["findings"]]
    s = res["structured_report"]
    assert s["language"] == "zh" and s["text"].startswith("影像所见") and "诊断意见" in s["text"]
    assert {line["segment"] for line in s["sections"][1]["lines"]} == set(res["label_names"])
    _, res = client.infer("medgemma", "phantom_11", {"question": "请描述这张胸片的异常", "language": "en"})
    assert res["report"] == ph.report and res["structured_report"]["text"].startswith("Findings:")


@pytest.mark.parametrize("image_id", sorted(REAL))
def test_real_xrays_answer_in_their_geometry(client, studies, image_id):
    label_file, res = client.infer("medgemma", image_id, SLICER)
    label = sitk.ReadImage(label_file)
    src = load_radiograph(_path(studies, image_id))
    assert sitk.GetArrayFromImage(label).shape == src.pixels.shape
    assert np.allclose(label.GetSpacing(), src.geometry.spacing)
    assert isinstance(res["report"], str) and res["report"].strip()
    for f in res["findings"]:
        assert {"label", "name", "text", "kind", "location", "score"} <= set(f)
    assert res["latencies"]["stop_reason"] in ("eos", "max_new_tokens", "repetition")


def test_uploaded_one_slice_volume_as_slicer_sends_it(client, tmp_path):
    ph = make_phantom(11)
    img = sitk.GetImageFromArray(ph.image[None].astype(np.int16))
    img.SetSpacing((0.3, 0.3, 1.0))
    img.SetOrigin((-40.0, -35.0, 12.0))
    path = tmp_path / "volume.nrrd"
    sitk.WriteImage(img, str(path))
    label_file, res = client.infer("medgemma", "uploaded", SLICER, file=str(path))
    label = sitk.ReadImage(label_file)
    assert label.GetSize() == img.GetSize() and label.GetSpacing() == img.GetSpacing()
    assert label.GetOrigin() == img.GetOrigin() and label.GetDirection() == img.GetDirection()
    assert res["report"] == ph.report and "heatmap" not in res  # uploads are not kept in the datastore


def _still_serving(server, client):
    assert requests.get(server.url + "/info/", timeout=30).status_code == 200
    _, res = client.infer("medgemma", "phantom_7", SLICER)
    assert res["report"] == make_phantom(7).report


@pytest.mark.parametrize("image_id", sorted(BAD))
def test_bad_images_get_a_4xx_and_the_server_keeps_serving(server, client, image_id):
    _, status, words = BAD[image_id]
    r = requests.post(f"{server.url}/infer/medgemma?image={image_id}", data={"params": "{}"}, timeout=120)
    assert r.status_code == status, r.text
    assert words.lower() in r.json()["detail"].lower()
    _still_serving(server, client)


@pytest.mark.parametrize("model,image,params,status,words", [
    ("medgemma", "no_such_image", "{}", 404, "unknown image id"),
    ("nope", "phantom_7", "{}", 404, "unknown model"),
    ("medgemma", "phantom_7", '{"max_new_tokens": -5}', 422, "between 1 and"),
    ("medgemma", "phantom_7", '{"max_new_tokens": "lots"}', 422, "whole number"),
    ("medgemma", "phantom_7", '{"question": 12}', 422, "must be text"),
    ("medgemma", "phantom_7", '{"question": "' + "why " * 600 + '"}', 422, "characters long"),
    ("medgemma", "phantom_7", '{"result_extension": ".exe"}', 422, "result_extension"),
    ("medgemma", "phantom_7", '{"result_dtype": "complex64"}', 422, "result_dtype"),
    ("medgemma", "phantom_7", '{"precision": "fp16"}', 422, "precision"),
    ("medgemma", "phantom_7", "{not json", 400, "not valid JSON"),
])
def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(server, client, model, image, params, status, words):
    r = requests.post(f"{server.url}/infer/{model}?image={image}", data={"params": params}, timeout=120)
    assert r.status_code == status, r.text
    assert words.lower() in r.json()["detail"].lower()
    _still_serving(server, client)


def test_sided_findings_on_a_real_radiograph_land_on_that_side_of_the_patient(client):
    """Real PA chest X-ray with reference lung masks: a finding the text puts in the patient's right
    must come back (through the server's label file) on the right lung's side, the image's left."""
    lungs = np.array(Image.open(shared("cxr", "lungseg2d", "2-mask.png")).convert("L")) > 127
    half = lungs.shape[1] // 2
    right_lung, left_lung = lungs.copy(), lungs.copy()
    right_lung[:, half:], left_lung[:, :half] = False, False
    assert right_lung.sum() > left_lung.sum()  # the heart narrows the left lung: the image is not mirrored
    label_file, res = client.infer("medgemma", "real_jpg", SLICER)
    arr = sitk.GetArrayFromImage(sitk.ReadImage(label_file))
    sided = [f for f in res["findings"] if f["side"] in ("right", "left")]
    assert sided, res["report"]
    for f in sided:
        m = arr == f["label"]
        own, other = (right_lung, left_lung) if f["side"] == "right" else (left_lung, right_lung)
        # the phantom model cannot read real X-rays, so where on that side it looks is not asserted;
        # what must hold is safety: nothing on the other lung, everything on the named half
        assert m.any() and (m & other).sum() == 0, f
        cols = np.nonzero(m)[1]
        assert (cols < half).all() if f["side"] == "right" else (cols >= half).all(), f


def test_monai_label_batch_infer_saves_labels_with_their_params(server, studies):
    """MONAI Label's own /batch/infer with our task: every image read, its label saved in the datastore
    with the result params (report, findings); the bad images are reported with their errors."""
    r = requests.post(f"{server.url}/batch/infer/medgemma", params={"images": "all", "run_sync": "true"},
                      json={"label_tag": "original", "save_label": True, "max_workers": 1, "device": "cpu"}, timeout=900)
    assert r.status_code == 200, r.text
    results = r.json()
    failed = {image: v for image, v in results.items() if "error" in v}
    assert set(failed) == set(BAD), failed
    assert all(400 <= v["status"] < 500 for v in failed.values())
    objects = requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=60).json()["objects"]
    for seed in PHANTOM_SEEDS:
        info = objects[f"phantom_{seed}"]["labels"]["original"]["info"]
        assert info["params"]["report"] == make_phantom(seed).report
        assert "heatmap_file" not in info["params"] and info["params"]["heatmap"]["tag"] == "medgemma_heatmap"
        assert [f["name"] for f in info["params"]["findings"]] == list(info["params"]["label_names"])
    _still_serving_after_batch = requests.get(server.url + "/info/", timeout=30)
    assert _still_serving_after_batch.status_code == 200


STREAMING_APP = '''
import argparse, asyncio
import uvicorn
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

async def info(request):
    return PlainTextResponse("ok")

async def stream(request):  # a heartbeat stream like Gradio's: cancelled, it carries on to its next beat
    async def beats():
        yield b"beat\\n"
        while True:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                pass
    return StreamingResponse(beats())

ap = argparse.ArgumentParser()
for name in ("--studies", "--host", "--port"):
    ap.add_argument(name)
ap.add_argument("--conf", nargs=2, action="append")
a = ap.parse_args()
uvicorn.run(Starlette(routes=[Route("/info/", info), Route("/stream", stream)]), host=a.host, port=int(a.port))
'''


def test_a_server_with_a_stream_open_stops_within_seconds(tmp_path):
    """A client's open stream (the reading page's heartbeat) does not hold a stopping server for its 20 s: after
    the grace period the server is told to stop waiting for it (a real uvicorn server, this app's stop)."""
    import sys

    from monailabel_app.serve.server import STOP_GRACE_S, ServerProcess

    script = tmp_path / "streaming_app.py"
    script.write_text(STREAMING_APP)
    server = ServerProcess(str(tmp_path), workdir=str(tmp_path / "work"), entry=[sys.executable, str(script)],
                           timeout=60).start()
    try:
        stream = requests.get(server.url + "/stream", stream=True, timeout=10)
        assert next(stream.iter_lines()) == b"beat"  # the stream is open
        t0 = time.perf_counter()
        server.stop()
        took = time.perf_counter() - t0
    finally:
        server.stop()
    assert not server.alive() and STOP_GRACE_S <= took < STOP_GRACE_S + 8, took
    assert "to force quit" in open(server.log_path).read()  # uvicorn waited for the open stream
    stream.close()


def test_the_warm_ups_heap_from_the_servers_conf(monkeypatch):
    """``--conf heap_reserve_gb``: the heap a warm-up grows (absent: the environment's, else 4 GiB; 0: none); a bad
    value of either is refused with its name."""
    from monailabel_app.app.configs.medgemma import heap_reserve
    from monailabel_app.errors import InputError

    monkeypatch.delenv("MEDGEMMA_HEAP_RESERVE_GB", raising=False)
    assert heap_reserve({}) == 4 << 30
    monkeypatch.setenv("MEDGEMMA_HEAP_RESERVE_GB", "1")
    assert heap_reserve({}) == 1 << 30 and heap_reserve({"heap_reserve_gb": "0"}) == 0
    assert heap_reserve({"heap_reserve_gb": "0.5"}) == 1 << 29
    for bad in ("-1", "lots", "nan"):
        with pytest.raises(InputError, match="heap_reserve_gb"):
            heap_reserve({"heap_reserve_gb": bad})
    monkeypatch.setenv("MEDGEMMA_HEAP_RESERVE_GB", "lots")
    with pytest.raises(InputError, match="MEDGEMMA_HEAP_RESERVE_GB"):
        heap_reserve({})
