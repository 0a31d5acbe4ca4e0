"""A real Orthanc PACS with its DICOMweb plugin, for the tests: loopback only, its own config and storage.

    with Orthanc(workdir, users={"medgemma": "secret"}) as pacs:
        pacs.upload(paths)                  # REST POST /instances
        pacs.dicomweb                       # http://127.0.0.1:PORT/dicom-web
        pacs.stop(); pacs.start()           # same storage: what it held is back

Orthanc and its plugin come from the Debian packages ``orthanc`` and ``orthanc-dicomweb`` (.ci/run).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import requests

from monailabel_app.serve.server import free_port

BINARY = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def available() -> str:
    """Why Orthanc cannot run here ('' when it can)."""
    if not os.path.exists(BINARY):
        return "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb; .ci/run does)"
    if not os.path.exists(DICOMWEB_PLUGIN):
        return "the Orthanc DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)"
    return ""


class Orthanc:
    def __init__(self, workdir: str, users: dict[str, str] | None = None):
        self.workdir, self.users = workdir, dict(users or {})
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dicomweb = f"{self.url}/dicom-web"
        self.config_path = os.path.join(workdir, "orthanc.json")
        self.log_path = os.path.join(workdir, "orthanc.log")
        self.proc: subprocess.Popen | None = None
        config = {
            "Name": "medgemma-test-pacs",
            "HttpPort": self.port,
            "RemoteAccessAllowed": False,  # loopback clients only
            "DicomServerEnabled": False,  # DICOMweb and REST only, no DIMSE port
            "StorageDirectory": os.path.join(workdir, "storage"),
            "IndexDirectory": os.path.join(workdir, "index"),
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users,
        }
        os.makedirs(workdir, exist_ok=True)
        with open(self.config_path, "w") as f:
            json.dump(config, f, indent=2)

    @property
    def auth(self):
        return next(iter(self.users.items()), None)

    def start(self, timeout: float = 30) -> "Orthanc":
        self._log = open(self.log_path, "a")
        self.proc = subprocess.Popen([BINARY, self.config_path], stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/system", auth=self.auth, timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            with open(self.log_path) as f:
                return f.read()[-chars:]
        except OSError:
            return ""

    def upload(self, paths) -> list[dict]:
        """Store DICOM files through Orthanc's REST API; its answers (ids, status) per file."""
        answers = []
        for p in paths:
            with open(p, "rb") as f:
                r = requests.post(self.url + "/instances", data=f.read(), auth=self.auth, timeout=60)
            r.raise_for_status()
            answers.append(r.json())
        return answers

    def delete_series(self, series_uid: str) -> None:
        r = requests.post(self.url + "/tools/lookup", data=series_uid, auth=self.auth, timeout=10)
        r.raise_for_status()
        for hit in r.json():
            if hit["Type"] == "Series":
                requests.delete(self.url + hit["Path"], auth=self.auth, timeout=30).raise_for_status()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
