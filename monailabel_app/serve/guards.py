"""What keeps one server usable for a whole team: request limits, a bounded inference queue, safe ids.

* :class:`Guards` (ASGI middleware): a request body over ``max_upload_bytes`` is a 413 before it is read;
  more than ``max_queue`` inference requests in progress or waiting is a 503 with ``Retry-After`` (the
  estimate from recent inference times), instead of an unbounded pile-up.
* :func:`run_infer_off_the_event_loop`: MONAI Label's ``POST /infer/{model}`` is an ``async`` endpoint that
  computes in the event loop, so while one CT is read the server answers nothing else, not even
  ``/info/``, and no queue can be counted. The same endpoint is re-registered as a plain function, which
  FastAPI runs in its thread pool; the model itself reads one request at a time (its own lock).
* :func:`check_image_id`: an image id names a datastore image; a path is only accepted where MONAI Label
  itself puts uploads and sessions (so no id reaches other files of the server).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import tempfile
import threading
import time

from fastapi import HTTPException
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.responses import JSONResponse

MAX_UPLOAD_BYTES = 2 << 30
MAX_QUEUE = 8


class Busy(Exception):
    """More inference requests than the queue's limit; ``retry_s``: when to try again."""

    def __init__(self, message: str, retry_s: int):
        super().__init__(message)
        self.retry_s = retry_s


class InferenceQueue:
    """The count of inference requests in progress or waiting, shared by ``/infer`` and the reading page."""

    def __init__(self, max_queue: int = MAX_QUEUE):
        self.max_queue = max_queue
        self.in_flight = 0
        self.seconds = 1.0  # running estimate of one inference request's time
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def slot(self):
        with self._lock:
            if self.in_flight >= self.max_queue:
                retry = max(1, int(round(self.seconds * (self.in_flight - self.max_queue + 1))))
                raise Busy(f"busy: {self.in_flight} inference requests are in progress or waiting (limit "
                           f"{self.max_queue}, --conf max_queue); retry in about {retry} s", retry)
            self.in_flight += 1
        t0 = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                self.in_flight -= 1
                self.seconds = 0.8 * self.seconds + 0.2 * (time.perf_counter() - t0)


QUEUE = InferenceQueue()  # the server's one queue (its limit set by the app from --conf max_queue)


class Guards(BaseHTTPMiddleware):
    def __init__(self, app, max_upload_bytes: int = MAX_UPLOAD_BYTES, max_queue: int = MAX_QUEUE,
                 queue: InferenceQueue | None = None):
        super().__init__(app)
        self.max_upload_bytes = max_upload_bytes
        self.queue = queue or InferenceQueue(max_queue)

    async def dispatch(self, request, call_next):
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_upload_bytes:
            return JSONResponse(status_code=413, content={"detail": (
                f"request body of {int(length) / 2**20:.1f} MiB is over this server's limit of "
                f"{self.max_upload_bytes / 2**20:.0f} MiB (--conf max_upload_mib)")})
        if request.method != "POST" or not request.url.path.rstrip("/").startswith("/infer/"):
            return await call_next(request)
        try:
            with self.queue.slot():
                return await call_next(request)
        except Busy as e:
            return JSONResponse(status_code=503, headers={"Retry-After": str(e.retry_s)}, content={"detail": str(e)})


def run_infer_off_the_event_loop(fastapi_app) -> bool:
    """Re-register MONAI Label's ``POST /infer/{model}`` as a sync endpoint (same parameters, same work)."""
    from fastapi.routing import APIRoute
    from monailabel.endpoints import infer as infer_endpoints

    original = infer_endpoints.api_run_inference

    def threaded(background_tasks, model, image="", session_id="", params="{}", file=None, label=None, output=None,
                 user=None):
        check_params_object(params)
        return infer_endpoints.run_inference(background_tasks, model, image, session_id, params, file, label, output)

    threaded.__signature__ = inspect.signature(original)  # FastAPI reads the parameters (Form, File, auth) from here
    threaded.__doc__ = original.__doc__

    def replace_in(router) -> bool:
        for i, route in enumerate(router.routes):
            if isinstance(route, APIRoute) and route.endpoint is original:
                router.routes[i] = APIRoute(route.path, threaded, methods=list(route.methods), summary=route.summary,
                                            tags=route.tags, dependencies=route.dependencies, name=route.name)
                if hasattr(router, "_routes_version"):  # FastAPI caches the routes of included routers by version
                    router._routes_version += 1
                return True
            # FastAPI >= 0.16x keeps an included router as one entry holding the original router
            inner = getattr(route, "original_router", None) or getattr(route, "router", None)
            if inner is not None and replace_in(inner):
                return True
        return False

    return replace_in(fastapi_app.router)


def check_params_object(params) -> None:
    """The infer form field ``params`` must be a JSON object (MONAI Label merges it into the request; a
    list or a number there was a 500). Text that is not JSON at all raises JSONDecodeError: a 400."""
    value = json.loads(params) if isinstance(params, (str, bytes)) and params else {}
    if not isinstance(value, dict):
        raise HTTPException(status_code=422, detail=f"params must be a JSON object {{...}}, got a {type(value).__name__}")


def _inside(path: str, folder: str) -> bool:
    folder = os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def check_image_id(image_id, session_path: str | None = None) -> bool:
    """True for a datastore id; False for an upload's or a session's file (a path MONAI Label made);
    an HTTP error for anything else (empty, a path elsewhere, parent references)."""
    if not isinstance(image_id, str) or not image_id:
        raise HTTPException(status_code=422, detail="'image' must be an image id")
    if "\x00" in image_id:
        raise HTTPException(status_code=422, detail="image id contains a NUL character")
    is_path = os.path.isabs(image_id) or "/" in image_id or "\\" in image_id or image_id.startswith("..")
    if not is_path:
        return True
    real = os.path.realpath(image_id)
    upload = os.path.dirname(real) == os.path.realpath(tempfile.gettempdir()) and os.path.basename(real).startswith("tmp")
    session = bool(session_path) and _inside(real, session_path)
    if ((upload or session) and os.path.isfile(real)) or (session and os.path.isdir(real)):
        return False
    raise HTTPException(status_code=404, detail=(
        f"unknown image id {image_id[:200]!r}: image ids name images of the datastore, not files of the server"))
