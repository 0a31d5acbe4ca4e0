"""Faults: a missing or corrupt model stops the server at start with a clear message; out of memory (the
configured guard) is a 503 and the next request works; SIGKILL while labels are saved leaves the
datastore readable and consistent; a full disk gives a clear error and no output that looks complete."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import requests
from PIL import Image

from monailabel_app.io.writers import write_in_geometry
from monailabel_app.phantoms.ct import make_ct_phantom, phantom_volume
from monailabel_app.phantoms.films import make_phantom
from monailabel_app.phantoms.model import PHANTOM_MODEL_DIR
from monailabel_app.serve.server import ServerProcess
from tests.conftest import ROOT

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    Image.fromarray(make_phantom(7).image).save(d / "phantom_7.png")
    vol = phantom_volume(make_ct_phantom(0))
    write_in_geometry(vol.hu, vol.geometry, str(d / "ct_0.nii.gz"), np.float32)
    return d


@pytest.mark.parametrize("damage,words", [("missing", "model folder not found"), ("corrupt", "cannot load model")])
def test_server_refuses_to_start_without_a_loadable_model(studies, tmp_path, damage, words):
    model = tmp_path / "model"
    if damage == "corrupt":
        shutil.copytree(PHANTOM_MODEL_DIR, model)
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(RuntimeError) as e:
        ServerProcess(str(studies), conf={"model": str(model)}, timeout=120).start()
    assert "server exited" in str(e.value) and words in str(e.value)


def test_out_of_memory_is_a_503_and_the_next_request_works(studies):
    with ServerProcess(str(studies), conf={"memory_guard_mib": 20}) as server:
        r = requests.post(f"{server.url}/infer/medgemma", params={"image": "ct_0"}, data={"params": "{}"}, timeout=300)
        assert r.status_code == 503 and "out of memory" in r.json()["detail"] and "memory_guard_mib" in r.json()["detail"]
        r = requests.post(f"{server.url}/infer/medgemma", params={"image": "phantom_7", "output": "json"},
                          data={"params": "{}"}, timeout=300)
        assert r.status_code == 200 and r.json()["report"] == make_phantom(7).report


SAVER = r"""
import os, sys, numpy as np
sys.path.insert(0, sys.argv[2])
from monailabel_app.serve.datastore import SafeLocalDatastore
label = os.path.join(sys.argv[1], "..", "label.nii.gz")
for _ in sys.stdin:  # one saver per line, forked from here: the imports (15 s) paid once, not per kill
    pid = os.fork()
    if pid == 0:
        ds = SafeLocalDatastore(sys.argv[1], extensions=["*.png"], auto_reload=False)
        print("ready", os.getpid(), flush=True)
        i = 0
        while True:
            for image in ("a", "b", "c"):
                ds.save_label(image, label, "final", {"round": i, "note": "x" * 2000})
            i += 1
    os.waitpid(pid, 0)
    print("gone", flush=True)
"""


def test_sigkill_while_saving_labels_leaves_the_datastore_consistent(tmp_path):
    """A process saves labels in a loop and is killed at arbitrary moments; after each kill the index parses,
    and every label it lists is a whole file. The savers are forked from one process that imported once."""
    from monailabel_app.io.xray import Geometry

    store = tmp_path / "store"
    store.mkdir()
    for image in ("a", "b", "c"):
        Image.fromarray(make_phantom(3).image).save(store / f"{image}.png")
    plane = (np.arange(512 * 512).reshape(512, 512) % 7).astype(np.uint8)  # a label of some size
    write_in_geometry(plane, Geometry.plain(512, 512), str(tmp_path / "label.nii.gz"))
    savers = subprocess.Popen([sys.executable, "-c", SAVER, str(store), ROOT], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        for kill in range(5):
            savers.stdin.write("go\n")
            savers.stdin.flush()
            ready, pid = savers.stdout.readline().split()
            assert ready == "ready"
            time.sleep(0.3 + 0.37 * kill)
            os.kill(int(pid), signal.SIGKILL)
            assert savers.stdout.readline().strip() == "gone"
            _check_store(store, plane)
        assert json.loads((store / "datastore_v2.json").read_text())["objects"]["a"]["labels"].get("final")
    finally:
        savers.kill()
        savers.wait()


def _check_store(store, plane):
    """The index parses and every label it lists, and every label file under a real name, is whole."""
    import SimpleITK as sitk

    from monailabel_app.serve.datastore import SafeLocalDatastore

    index = json.loads((store / "datastore_v2.json").read_text())  # parses: never half-written
    ds = SafeLocalDatastore(str(store), extensions=["*.png"], auto_reload=False)
    for image in ("a", "b", "c"):
        info = index["objects"][image]["labels"].get("final")
        if info is None:
            continue
        path = ds.get_label_uri(image, "final")
        assert (sitk.GetArrayFromImage(sitk.ReadImage(path)).reshape(512, 512) == plane).all()
    # a kill may leave a temporary file (never under a real name); every real label file is whole
    for name in os.listdir(store / "labels" / "final"):
        if not name.startswith(".tmp-"):
            img = sitk.ReadImage(str(store / "labels" / "final" / name))
            assert (sitk.GetArrayFromImage(img).reshape(512, 512) == plane).all()


def _full_disk(folder):
    """Mount a 256 KiB tmpfs at ``folder`` (root on Linux); None where that is not allowed."""
    folder.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)], capture_output=True)
    return folder if r.returncode == 0 else None


def test_a_full_disk_is_a_clear_error_and_leaves_nothing_that_looks_done(studies, tmp_path):
    out = _full_disk(tmp_path / "small")
    if out is None:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        big = tmp_path / "big.png"
        Image.fromarray(np.tile(make_phantom(7).image, (3, 3))).save(big)  # outputs larger than the disk
        r = subprocess.run([sys.executable, "-m", "monailabel_app.cli", "-i", str(big), "-o", str(out / "reading")],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 4, r.stderr[-2000:]
        assert "No space left on device" in r.stderr
        assert not (out / "reading" / "findings.json").exists()
        names = [n for _, _, files in os.walk(out) for n in files]
        assert not [n for n in names if n.startswith(".tmp-")], names  # temporary files removed
    finally:
        subprocess.run(["umount", str(out)], capture_output=True)
