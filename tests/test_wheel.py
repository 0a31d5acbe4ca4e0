"""Installed from a wheel, outside the checkout, the package serves and reads as a checkout does.

The wheel is built from this checkout (``pip wheel .``) and installed into a fresh virtual environment in a
temporary folder; its dependencies come from the project's own environment (a path line in a ``.pth``
file, which does not run that environment's editable-install hook, so ``monailabel_app`` can only come
from the wheel). Every command runs from a folder outside the checkout, without PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile

import pytest
import requests

from conftest import ROOT
from monailabel_app.phantoms.films import make_phantom
from monailabel_app.serve.server import ServerProcess

CLEAN_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def run(cmd, cwd, timeout=600):
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=CLEAN_ENV, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel file, the fresh environment's folder, a work folder outside the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist",
                 ROOT], cwd=tmp)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("monailabel_medgemma-*.whl")
    env = tmp / "env"
    made = run([sys.executable, "-m", "venv", env], cwd=tmp)
    assert made.returncode == 0, made.stderr[-3000:]
    python = env / "bin" / "python"
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp).stdout.strip()
    with open(os.path.join(site, "project-dependencies.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    done = run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], cwd=tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    work = tmp / "work"
    (work / "studies").mkdir(parents=True)
    from PIL import Image

    Image.fromarray(make_phantom(7).image).save(work / "studies" / "phantom_7.png")
    return wheel, env, work


def test_the_wheel_holds_the_app_and_the_model_and_nothing_of_the_checkout(installed):
    wheel, _, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("monailabel_app/app/main.py", "monailabel_app/app/configs/medgemma.py",
                   "monailabel_app/app/infers/medgemma.py", "monailabel_app/models/phantom-gemma3/model.safetensors",
                   "monailabel_app/models/phantom-gemma3/grounding.json"):
        assert needed in names, needed
    assert not [n for n in names if n.split("/")[0] in ("main.py", "lib", "tests", "bench")]


def test_the_package_comes_from_the_wheel(installed):
    _, env, work = installed
    r = run([env / "bin" / "python", "-c", "import monailabel_app.app as a; print(a.APP_DIR)"], cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().startswith(str(env)) and not r.stdout.strip().startswith(ROOT)


def test_serve_from_the_wheel_answers_info_and_infer(installed):
    _, env, work = installed
    with ServerProcess(str(work / "studies"), entry=[str(env / "bin" / "medgemma-label"), "serve"], cwd=str(work),
                       env={"PYTHONPATH": ""}) as server:
        info = requests.get(server.url + "/info/", timeout=30).json()
        assert "medgemma" in info["models"]
        assert info["models"]["medgemma"]["model"]["id"].startswith(str(env))  # the wheel's embedded model
        r = requests.post(server.url + "/infer/medgemma", params={"image": "phantom_7", "output": "json"},
                          data={"params": "{}"}, timeout=120)
        assert r.status_code == 200, r.text[:2000]
        assert r.json()["report"] == make_phantom(7).report
        assert f"Initializing App from: {env}" in server.log_tail(200000)  # MONAI Label ran the wheel's app


def test_read_and_batch_commands_from_the_wheel(installed):
    _, env, work = installed
    cli = env / "bin" / "medgemma-label"
    r = run([cli, "-i", work / "studies" / "phantom_7.png", "-o", work / "one"], cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((work / "one" / "findings.json").read_text())["report"] == make_phantom(7).report
    (work / "films").mkdir()
    os.link(work / "studies" / "phantom_7.png", work / "films" / "phantom_7.png")  # the server writes into studies/
    r = run([cli, "batch", "-i", work / "films", "-o", work / "batch"], cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    (row,) = [json.loads(line) for line in (work / "batch" / "manifest.jsonl").read_text().splitlines()]
    assert row["status"] == "ok" and row["report"] == make_phantom(7).report
