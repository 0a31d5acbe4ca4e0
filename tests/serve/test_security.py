"""Who can reach the server and what it will read: `medgemma-label serve` listens on 127.0.0.1 unless told
otherwise; with MONAI Label's auth mode on, a request without a token is refused; model folders with
pickled weights only are refused (safetensors only, never remote code)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import requests
from PIL import Image

from monailabel_app.phantoms.films import make_phantom
from monailabel_app.serve.server import ServerProcess, free_port

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    d = tmp_path_factory.mktemp("security")
    Image.fromarray(make_phantom(7).image).save(d / "phantom_7.png")
    return d


def listening_addresses(port: int) -> set[str]:
    """Local IPv4 addresses with a socket listening on ``port`` (from /proc/net/tcp)."""
    found = set()
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if state == "0A" and int(p, 16) == port:  # 0A: LISTEN
                found.add(".".join(str(int(addr[i:i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


def test_serve_listens_on_loopback_only_by_default(studies, tmp_path):
    port = free_port()
    env = dict(os.environ, MONAI_LABEL_SESSION_PATH=str(tmp_path / "sessions"))
    proc = subprocess.Popen([sys.executable, "-m", "monailabel_app.cli", "serve", "--studies", str(studies),
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{port}/info/", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.5)
        else:
            pytest.fail("medgemma-label serve did not answer")
        assert listening_addresses(port) == {"127.0.0.1"}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def test_auth_mode_refuses_requests_without_a_token(studies, tmp_path):
    """MONAI Label's auth mode (MONAI_LABEL_AUTH_ENABLE, tokens from a Keycloak realm): no token, no
    answer. There is no identity provider here, so a token cannot be checked: a forged one is not let in."""
    env = {"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": "http://127.0.0.1:9/realms/none"}
    with ServerProcess(str(studies), env=env, workdir=str(tmp_path / "auth"), ready=(200, 401)) as server:
        for method, path in (("POST", "/infer/medgemma?image=phantom_7"), ("GET", "/datastore/?output=all"),
                             ("PUT", "/datastore/label?image=phantom_7"), ("GET", "/info/")):
            r = requests.request(method, server.url + path, data={"params": "{}"}, timeout=60)
            assert r.status_code == 401, (path, r.status_code, r.text[:200])
        r = requests.get(server.url + "/info/", headers={"Authorization": "Bearer forged"}, timeout=60)
        assert r.status_code != 200, r.text[:200]
        # the reading page asks for the same token: its HTML, its config and its API
        for path in ("/reader/", "/reader/config", "/reader/gradio_api/info"):
            for headers in ({}, {"Authorization": "Bearer forged"}):
                r = requests.get(server.url + path, headers=headers, timeout=60)
                assert r.status_code in (401, 403), (path, headers, r.status_code, r.text[:200])


def test_pickled_weights_are_refused(tmp_path):
    """A model folder whose weights are a pickle (pytorch_model.bin) is not loaded: only safetensors."""
    import shutil

    from monailabel_app.model.loading import ModelLoadError, load_model
    from monailabel_app.phantoms.model import PHANTOM_MODEL_DIR

    folder = tmp_path / "pickled"
    shutil.copytree(PHANTOM_MODEL_DIR, folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="only safetensors"):
        load_model(str(folder))
