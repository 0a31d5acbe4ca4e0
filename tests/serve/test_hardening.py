"""Bad inputs, one table through the real server and the CLI: each gets a 4xx (CLI: exit 2) whose message
names the problem, and the server still answers /info/ and a normal request after each. Plus a bounded
fuzz run of the study loaders, and the request-size and image-id guards."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import requests
from PIL import Image

from monailabel_app.phantoms.films import make_phantom
from tests.bad_inputs import BAD_FILES, BAD_FOR_PARAMS
from tests.conftest import shared

GOOD = "phantom_7"
MAX_UPLOAD_MIB = 1


def stem(name: str) -> str:
    return name.replace(".", "_")


def ext(name: str) -> str:
    return "." + name.split(".", 1)[1]


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    d = tmp_path_factory.mktemp("hardening")
    Image.fromarray(make_phantom(7).image).save(d / f"{GOOD}.png")
    for name, (make, *_rest) in {**BAD_FILES, **BAD_FOR_PARAMS}.items():
        make(str(d / (stem(name) + ext(name))))
    return d


@pytest.fixture(scope="module")
def server(studies):
    from monailabel_app.serve.server import ServerProcess

    with ServerProcess(str(studies), conf={"max_upload_mib": MAX_UPLOAD_MIB}) as s:
        yield s


def infer(server, image, params=None, raw_params=None, **kw):
    data = {"params": raw_params if raw_params is not None else json.dumps(params or {})}
    return requests.post(f"{server.url}/infer/{kw.pop('model', 'medgemma')}", params={"image": image}, data=data,
                         timeout=300, **kw)


def still_serving(server):
    assert requests.get(server.url + "/info/", timeout=30).status_code == 200
    r = infer(server, GOOD, output="json") if False else requests.post(
        f"{server.url}/infer/medgemma", params={"image": GOOD, "output": "json"}, data={"params": "{}"}, timeout=300)
    assert r.status_code == 200 and r.json()["report"] == make_phantom(7).report


REQUESTS = {  # case -> (image id, params or raw params text, status, words)
    "unknown model": (GOOD, {}, 404, "unknown model"),
    "unknown image id": ("no_such_image", {}, 404, "unknown image id"),
    "parent path id": ("../../etc/passwd", {}, 404, "not files of the server"),
    "absolute path id": ("/etc/passwd", {}, 404, "not files of the server"),
    "path inside the datastore": ("__STUDIES__/phantom_7.png", {}, 404, "not files of the server"),
    "encoded parent id": ("..%2F..%2Fetc%2Fpasswd", {}, 404, "unknown image id"),
    "question too long": (GOOD, {"question": "why " * 600}, 422, "characters long"),
    "question not text": (GOOD, {"question": 12}, 422, "must be text"),
    "params not JSON": (GOOD, "{not json", 400, "not valid JSON"),
    "params a list": (GOOD, "[1, 2]", 422, "params"),
    "max_new_tokens negative": (GOOD, {"max_new_tokens": -5}, 422, "between 1 and"),
    "max_new_tokens huge": (GOOD, {"max_new_tokens": 10**9}, 422, "between 1 and"),
    "max_new_tokens text": (GOOD, {"max_new_tokens": "lots"}, 422, "whole number"),
    "unknown precision": (GOOD, {"precision": "fp8"}, 422, "unknown precision"),
    "other precision": (GOOD, {"precision": "fp16"}, 422, "chosen at start-up"),
    "unknown modality": (GOOD, {"modality": "mri"}, 422, "modality"),
    "unknown language": (GOOD, {"language": "fr"}, 422, "'language' must be one of"),
    "max_slices zero": (GOOD, {"max_slices": 0}, 422, "max_slices"),
    "result_extension exe": (GOOD, {"result_extension": ".exe"}, 422, "result_extension"),
    "result_dtype complex": (GOOD, {"result_dtype": "complex64"}, 422, "result_dtype"),
    "unknown conversation": (GOOD, {"conversation": "c0ffee"}, 404, "conversation"),
}


@pytest.mark.server
@pytest.mark.parametrize("name", sorted({**BAD_FILES, **BAD_FOR_PARAMS}))
def test_bad_file_through_the_server(server, name):
    params = BAD_FOR_PARAMS[name][1] if name in BAD_FOR_PARAMS else {}
    status, words = (BAD_FOR_PARAMS[name][2:] if name in BAD_FOR_PARAMS else BAD_FILES[name][1:])
    r = infer(server, stem(name), params)
    assert r.status_code == status, r.text
    assert words.lower() in r.json()["detail"].lower(), r.json()["detail"]
    still_serving(server)


@pytest.mark.server
@pytest.mark.parametrize("case", sorted(REQUESTS))
def test_bad_request_through_the_server(server, studies, case):
    image, params, status, words = REQUESTS[case]
    image = image.replace("__STUDIES__", str(studies))
    kw = {"model": "nope"} if case == "unknown model" else {}
    r = infer(server, image, raw_params=params if isinstance(params, str) else None,
              params=params if isinstance(params, dict) else None, **kw)
    assert r.status_code == status, r.text
    assert words.lower() in str(r.json()["detail"]).lower(), r.json()["detail"]
    still_serving(server)


@pytest.mark.server
def test_uploads_over_the_size_limit_are_413_before_they_are_read(server, tmp_path):
    big = tmp_path / "big.png"
    Image.fromarray(make_phantom(7).image).save(big)
    with open(big, "ab") as f:
        f.write(os.urandom((MAX_UPLOAD_MIB << 20) + 1000))
    for method, path, files in (("PUT", "/datastore/", {"file": ("big.png", open(big, "rb"))}),
                                ("POST", "/infer/medgemma", {"file": ("big.png", open(big, "rb"))})):
        r = requests.request(method, server.url + path, params={"image": "big"}, files=files, data={"params": "{}"}, timeout=60)
        assert r.status_code == 413, (path, r.text)
        assert "over this server's limit" in r.json()["detail"]
    assert "big" not in requests.get(server.url + "/datastore/", params={"output": "all"}, timeout=30).json()["objects"]
    still_serving(server)


@pytest.mark.parametrize("name", sorted({**BAD_FILES, **BAD_FOR_PARAMS}))
def test_bad_file_through_the_cli(studies, name, tmp_path, capsys):
    from monailabel_app.cli import main

    argv = ["-i", str(studies / (stem(name) + ext(name))), "-o", str(tmp_path / "out")]
    if name in BAD_FOR_PARAMS:
        argv += ["--modality", BAD_FOR_PARAMS[name][1]["modality"]]
    words = BAD_FOR_PARAMS[name][3] if name in BAD_FOR_PARAMS else BAD_FILES[name][2]
    assert main(argv) == 2
    err = capsys.readouterr().err
    message = err[err.index("error: "):]  # after the model's loading bar
    assert words.lower() in message.lower(), err
    assert not (tmp_path / "out" / "findings.json").exists()


def test_fuzzed_files_are_read_or_refused_never_crash(tmp_path_factory):
    """Random bytes under every study extension, and real files with random bytes overwritten: the
    loaders return a study or raise InputError (the server's 4xx), nothing else."""
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from monailabel_app.errors import InputError
    from monailabel_app.io.study import load_study

    folder = tmp_path_factory.mktemp("fuzz")
    seeds = {".dcm": open(shared("ct", "dicom_slices", "CT_small.dcm"), "rb").read(),
             ".png": open(shared("cxr", "lungseg2d", "2.jpg"), "rb").read()[:20000]}
    extensions = [".dcm", ".png", ".jpg", ".nii", ".nii.gz", ".nrrd", ".mha", ".zip", ".tif"]

    @settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(extensions), st.binary(max_size=4096), st.sampled_from([".dcm", ".png"]),
           st.lists(st.tuples(st.integers(0, 19999), st.integers(0, 255)), max_size=40))
    def check(extension, noise, base, flips):
        data = bytearray(seeds[base])
        for at, value in flips:
            data[at % len(data)] = value
        for suffix, content in ((extension, bytes(noise)), (base, bytes(data))):
            path = folder / f"f{suffix}"
            path.write_bytes(content)
            try:
                load_study(str(path))
            except InputError:
                pass

    check()
    assert hypothesis.__version__
    shutil.rmtree(folder, ignore_errors=True)
