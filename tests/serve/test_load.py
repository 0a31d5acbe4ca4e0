"""Concurrent requests on one server (bench/load.py, smaller): every answer is its own image's or a 503
with Retry-After from the bounded queue; nothing lost, nothing mixed up; the server answers /info/ while
it reads."""

from __future__ import annotations

import os
import sys
import threading

import pytest
import requests
from PIL import Image

from monailabel_app.io.writers import write_in_geometry
from monailabel_app.phantoms.ct import make_ct_phantom, phantom_volume
from monailabel_app.phantoms.films import make_phantom
from tests.conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
from load import check, run_load  # noqa: E402

pytestmark = pytest.mark.server
SEEDS = [1, 2, 3, 4]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import numpy as np

    from monailabel_app.serve.server import ServerProcess

    d = tmp_path_factory.mktemp("load")
    for seed in SEEDS:
        Image.fromarray(make_phantom(seed).image).save(d / f"phantom_{seed}.png")
    vol = phantom_volume(make_ct_phantom(0))
    write_in_geometry(vol.hu, vol.geometry, str(d / "ct_0.nii.gz"), np.float32)
    with ServerProcess(str(d), conf={"max_queue": 3}) as s:
        yield s


def test_concurrent_requests_are_answered_or_refused_never_mixed_up(server):
    expected = {f"phantom_{s}": make_phantom(s).report for s in SEEDS}
    results = run_load(server.url, sorted(expected), n_requests=12, processes=3)
    assert len(results) == 12
    assert check(results, expected) == []
    assert any(r["status"] == 200 for r in results)
    assert requests.get(server.url + "/info/", timeout=30).status_code == 200


def test_the_server_answers_while_it_reads_a_ct(server):
    """Inference runs off the event loop: /info/ is answered while a CT read (seconds on this CPU) is
    still going, not after it."""
    done = threading.Event()

    def read_ct():
        r = requests.post(f"{server.url}/infer/medgemma", params={"image": "ct_0", "output": "json"},
                          data={"params": "{}"}, timeout=600)
        assert r.status_code == 200
        done.set()

    t = threading.Thread(target=read_ct)
    t.start()
    done.wait(0.5)  # let the request reach the server
    info = requests.get(server.url + "/info/", timeout=30)
    answered_during_read = not done.is_set()
    t.join()
    assert info.status_code == 200 and done.is_set()
    assert answered_during_read, "/info/ was answered only after the CT read ended"
