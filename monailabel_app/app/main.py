"""MONAI Label app: MedGemma findings with attention masks.

    python -m monailabel.main start_server --app <this folder> --studies DIR --conf models medgemma --host 127.0.0.1

It ships inside the package (``monailabel_app/app``, :data:`monailabel_app.app.APP_DIR`), so that a wheel
install serves the same app as a checkout; the repository root's ``main.py`` points here for
``--app .``. Each TaskConfig in ``configs/*.py`` is a model the app can serve
(``--conf models NAME[,NAME]``); its infer task lives in ``infers/``.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import pkgutil
import sys

from fastapi import HTTPException
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.config import TaskConfig

from monailabel_app.app import configs
from monailabel_app.app.infers.medgemma import HEATMAP_TAG
from monailabel_app.serve.datastore import SafeLocalDatastore
from monailabel_app.serve.guards import check_image_id
from monailabel_app.serve.pacs import MODALITIES, PACSDatastore, pacs_from_settings

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ["*.nii.gz", "*.nii", "*.nrrd", "*.mha", "*.png", "*.jpg", "*.jpeg", "*.bmp", "*.tif", "*.tiff", "*.dcm", "*.zip"]  # .zip: a DICOM series


def task_configs() -> dict[str, type]:
    found = {}
    for mod in pkgutil.iter_modules(configs.__path__):
        module = importlib.import_module(f"{configs.__name__}.{mod.name}")
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, TaskConfig) and obj is not TaskConfig:
                found[mod.name] = obj
    return found


def _install_server_guards(conf: dict) -> None:
    """Malformed ``params`` (not JSON) is a 400 with the parser's message; request bodies over
    ``--conf max_upload_mib`` are a 413; more than ``--conf max_queue`` inference requests at once get a
    503 with Retry-After; inference runs off the event loop (the server keeps answering meanwhile)."""
    try:
        from monailabel.app import app as fastapi_app
    except Exception:  # imported outside the server (tests, tools): nothing to register
        return
    from fastapi.responses import JSONResponse

    from monailabel_app.serve.guards import MAX_QUEUE, QUEUE, Guards, run_infer_off_the_event_loop

    async def bad_json(request, exc: json.JSONDecodeError):
        return JSONResponse(status_code=400, content={"detail": f"params is not valid JSON: {exc}"})

    # the app is created while the server starts, after Starlette built its middleware stack (and
    # with it a copy of the handlers): let it rebuild the stack on the next request
    fastapi_app.middleware_stack = None
    fastapi_app.add_exception_handler(json.JSONDecodeError, bad_json)
    if not any(m.cls is Guards for m in fastapi_app.user_middleware):
        QUEUE.max_queue = int(conf.get("max_queue", MAX_QUEUE))  # one queue for /infer and the reading page
        fastapi_app.add_middleware(Guards, max_upload_bytes=max_upload_bytes(conf), queue=QUEUE)
        run_infer_off_the_event_loop(fastapi_app)


def max_upload_bytes(conf: dict) -> int:
    from monailabel_app.serve.guards import MAX_UPLOAD_BYTES

    return int(float(conf.get("max_upload_mib", MAX_UPLOAD_BYTES / 2**20)) * 2**20)


def _log_to_file(conf: dict) -> None:
    """``--conf log_file PATH``: this app's own log lines (precision at load, vision and language dtypes,
    fallback WARNINGs, out-of-memory ERRORs, one line per reading) also go to PATH."""
    path = conf.get("log_file")
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    root = logging.getLogger("monailabel_app")
    if any(getattr(h, "baseFilename", None) == os.path.abspath(path) for h in root.handlers):
        return
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def _mount_reading_page(app, conf: dict) -> None:
    """The reading page at ``/reader/`` (``--conf reader_page false``: none), sharing this app's model."""
    if str(conf.get("reader_page", "true")).lower() in ("false", "0", "no", "off"):
        return
    try:
        from monailabel.app import app as fastapi_app
    except Exception:  # imported outside the server (tests, tools): nothing to mount
        return
    from monailabel_app.serve.web.page import mount

    fastapi_app.middleware_stack = None
    mount(fastapi_app, app, max_upload_bytes(conf))


class MyApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        _log_to_file(conf)
        _install_server_guards(conf)
        available = task_configs()
        names = [n.strip() for n in conf.get("models", "medgemma").split(",") if n.strip()]
        unknown = [n for n in names if n not in available]
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; available: {sorted(available)}")
        self.models: dict[str, TaskConfig] = {}
        for name in names:
            self.models[name] = available[name]()
            self.models[name].init(name, os.path.join(app_dir, "model"), conf, None)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="monailabel-medgemma",
            description="MedGemma findings text with one attention-derived mask per finding",
            version="0.1.0",
        )
        _mount_reading_page(self, conf)

    def init_datastore(self):
        if self.studies.startswith(("http://", "https://")):
            return self._pacs_datastore()
        return SafeLocalDatastore(
            self.studies,
            extensions=IMAGE_EXTENSIONS,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def _pacs_datastore(self):
        # MONAI Label's own SEG tools (dcmqi, from PyPI) sit beside this interpreter; a venv's python run
        # without activating it does not have them on PATH, and MONAI Label would try to download them
        scripts = os.path.dirname(sys.executable)
        if scripts not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")
        self._download_dcmqi_tools()
        return pacs_from_settings(self.studies, self.conf.get("modalities", ",".join(MODALITIES)).split(","))

    def on_save_label(self, image_id, label_id):
        """The save's answer names the SEG and SR it stored on the PACS (their series and instance UIDs)."""
        datastore = self.datastore()
        if isinstance(datastore, PACSDatastore):
            return {"dicom": datastore.export_of(label_id)}
        return super().on_save_label(image_id, label_id)

    def batch_infer(self, request, datastore=None):
        """MONAI Label's ``/batch/infer`` (labels saved with their params); a study that fails is reported
        with its error and status and the batch goes on (MONAI Label's one-worker path would stop there).
        Without a GPU, its default ``multi_gpu`` spreads the studies over zero devices (a division by
        zero): it is turned off there."""
        import torch

        if not torch.cuda.device_count():
            request = {**request, "multi_gpu": False, "device": "cpu"}

        def infer_one(req, ds):
            try:
                return self.infer(req, ds)
            except HTTPException as e:
                return {"error": e.detail, "status": e.status_code}
            except Exception as e:  # a fault on one study: logged, reported, the batch goes on
                logger.exception("batch infer failed on %s", req.get("image"))
                return {"error": f"{type(e).__name__}: {e}", "status": 500}

        return self._batch_infer(request, datastore or self.datastore(), infer_one)

    def init_infers(self):
        return {name: cfg.infer() for name, cfg in self.models.items()}

    def infer(self, request, datastore=None):
        """MONAI Label's infer, plus: unknown image ids are a 404, and the heatmap goes to the datastore."""
        datastore = datastore or self.datastore()
        if request.get("model") not in self._infers:
            raise HTTPException(status_code=404, detail=f"unknown model {request.get('model')!r}; this server has {sorted(self._infers)}")
        image_id = request.get("image")
        sessions = (settings.MONAI_LABEL_SESSION_PATH or "").strip() or os.path.join(os.path.expanduser("~"), ".cache", "monailabel", "sessions")
        from_datastore = check_image_id(image_id, sessions)
        if from_datastore and not datastore.get_image_uri(image_id):
            raise HTTPException(status_code=404, detail=f"unknown image id {image_id!r}: not in the datastore")
        result = super().infer(request, datastore)
        params = result.get("params") or {}
        if from_datastore and isinstance(datastore, PACSDatastore):
            datastore.remember_reading(image_id, {k: v for k, v in params.items() if k != "heatmap_file"})
        heatmap = params.pop("heatmap_file", None)
        if heatmap and os.path.exists(heatmap):
            if from_datastore:
                label_id = datastore.save_label(image_id, heatmap, HEATMAP_TAG, {"model": request.get("model")})
                params["heatmap"] = {
                    "tag": HEATMAP_TAG,
                    "url": f"/datastore/label?label={label_id}&tag={HEATMAP_TAG}",
                    "description": "float32, per pixel the largest 0..1-scaled finding heatmap, in the image's geometry",
                }
            os.unlink(heatmap)
        if from_datastore and request.get("save_label") and result.get("label"):  # /batch/infer saved the label
            # with the params as they were, the heatmap's temporary path included: store them as answered
            datastore.update_label_info(result["label"], request.get("label_tag") or "original", {"params": params})
        return result
