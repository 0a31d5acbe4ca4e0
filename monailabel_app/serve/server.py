"""Start and stop a real MONAI Label server running this app (for the demo and the tests).

    with ServerProcess(studies_dir) as server:
        client = MONAILabelClient(server.url)

The server is ``python -m monailabel.main start_server --app <the package's app folder> ...`` on 127.0.0.1
and a free port, in its own process group; its session and temp folders live under ``workdir`` (a temp dir by
default) so a run leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import requests

from ..app import APP_DIR

STOP_GRACE_S = 5  # seconds a stopping server has to close its connections before it is told to stop waiting
# where monailabel_app imports from
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, studies: str, conf: dict | None = None, workdir: str | None = None, timeout: float = 180,
                 env: dict | None = None, ready: tuple[int, ...] = (200,), entry: list[str] | None = None,
                 cwd: str | None = None):
        """``entry``: the command that starts the server, given ``--studies``, ``--host``, ``--port`` and
        ``--conf`` after it (default: MONAI Label's ``start_server`` on this checkout's app, with this
        package first on PYTHONPATH; e.g. ``[".../bin/medgemma-label", "serve"]`` for an installed one)."""
        self.studies, self.conf, self.timeout = studies, {"models": "medgemma", **(conf or {})}, timeout
        self.entry, self.cwd = entry, cwd
        self.extra_env = dict(env or {})
        self.ready = ready  # /info/ statuses that mean "up" (401 with auth on)
        self._own_workdir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="medgemma-server-")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(self.workdir, "server.log")
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ServerProcess":
        entry = self.entry or [sys.executable, "-m", "monailabel.main", "start_server", "--app", APP_DIR]
        cmd = [*entry, "--studies", self.studies, "--host", "127.0.0.1", "--port", str(self.port)]
        for k, v in self.conf.items():
            cmd += ["--conf", k, str(v)]
        env = dict(os.environ)
        env.update({
            "MONAI_LABEL_SESSION_PATH": os.path.join(self.workdir, "sessions"),
            "MONAI_LABEL_DICOMWEB_CACHE_PATH": os.path.join(self.workdir, "dicomweb"),
            "TMPDIR": os.path.join(self.workdir, "tmp"),
        })
        if self.entry is None:
            env["PYTHONPATH"] = PACKAGE_PARENT + os.pathsep + env.get("PYTHONPATH", "")
        env.update(self.extra_env)
        os.makedirs(env["TMPDIR"], exist_ok=True)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                     cwd=self.cwd)
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/info/", timeout=5).status_code in self.ready:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server did not answer /info/ within {self.timeout}s:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            with open(self.log_path) as f:
                return f.read()[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM; after :data:`STOP_GRACE_S` still running, SIGINT, uvicorn's "force quit": it stops waiting for
        the connections still open (a reading page's or ``gradio_client``'s heartbeat stream ends only at its next
        beat: these servers took 13-20 s to stop after the page's tests; the app's own shutdown only prints); 20 s
        after that, SIGKILL."""
        if self.proc is not None and self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGINT, 20)):
                os.killpg(self.proc.pid, sig)
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    pass
            else:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
