"""MONAI Label infer task ``medgemma``: findings text plus one attention mask per finding.

Thin: it validates the request, calls :class:`monailabel_app.reader.Reader` and writes the label map
(and the float heatmap) in the input's geometry. Bad input becomes an HTTP 4xx with a message.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict

import numpy as np
import torch
from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from monailabel_app import correction
from monailabel_app.errors import InputError
from monailabel_app.io.study import check_modality, load_study
from monailabel_app.io.writers import check_dtype, check_extension, write_in_geometry
from monailabel_app.language.asking import check_language
from monailabel_app.model import decoding
from monailabel_app.model.loading import normalise_precision
from monailabel_app.reader import Reader, check_params
from monailabel_app.serve.conversation import Conversations, Entry

logger = logging.getLogger(__name__)

HEATMAP_TAG = "medgemma_heatmap"
KEEP_READINGS = 2  # images whose latest reading a click can correct (a CT reading holds its volume and maps)


class MedGemmaInfer(InferTask):
    def __init__(self, reader: Reader, description: str, config: dict, conversations: Conversations | None = None):
        super().__init__(
            type=InferType.SEGMENTATION,
            labels=None,  # one label per finding, named in each result's label_names
            dimension=3,  # radiographs (one-plane volumes) and CT volumes
            description=description,
            config=config,
        )
        self.reader = reader
        self.conversations = conversations if conversations is not None else Conversations()
        self._lock = threading.Lock()  # one generation at a time on one model
        self._last: OrderedDict[str, object] = OrderedDict()  # image -> its last reading (what a click corrects)
        self._last_lock = threading.Lock()

    def is_valid(self) -> bool:
        return True

    def info(self):
        info = super().info()
        info["model"] = self.reader.info.public()
        info["warm_up"] = dict(self.reader.warm)
        info["decode_shapes"] = decoding.kept_decoders(self.reader.model)  # the shapes a request finds warm
        return info

    def __call__(self, request):
        try:
            return self._infer(request)
        except InputError as e:
            logger.info("refused request: %s", e)
            raise HTTPException(status_code=e.status, detail=str(e)) from e
        except (MemoryError, torch.OutOfMemoryError) as e:  # the guard, or a real one: free, answer, go on
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            logger.error("out of memory: %s", e)
            raise HTTPException(status_code=503, detail=f"out of memory: {str(e)[:500] or type(e).__name__}; "
                                                        "the server keeps serving smaller requests") from e

    def _infer(self, request):
        ext = check_extension(request.get("result_extension") or ".nii.gz")
        dtype = check_dtype(request.get("result_dtype"), "uint8")
        reading, conversation = self.read(request)
        geom = reading.geometry
        label_file = _temp_path(ext)
        write_in_geometry(reading.labels, geom, label_file, dtype)
        result = reading.result_json()
        if conversation is not None:
            result["conversation"] = conversation
        result["heatmap_file"] = write_in_geometry(
            reading.combined_heatmap(), geom, _temp_path(".nii.gz" if ext == ".png" else ext),
            np.float32,
        )
        return label_file, result

    def read(self, request) -> tuple:
        """(reading, conversation JSON or None) for an infer request's parameters: what ``/infer`` and the
        reading page share (validation, the model's lock, the conversations). Raises InputError."""
        question, max_new_tokens = check_params(  # validated here; the reader picks the default question
            request.get("question") or self._config.get("question"),
            request.get("max_new_tokens", self._config["max_new_tokens"]), default_question="",
        )
        language = check_language(request.get("language") or self._config.get("language"))
        precision = request.get("precision")
        if precision is not None and normalise_precision(precision) not in ("auto", self.reader.info.precision):
            raise InputError(
                f"this server runs the model in {self.reader.info.precision}; precision is chosen at start-up "
                f"(--conf precision ...), not per request (asked for {precision!r})"
            )
        image = request.get("image")
        if not isinstance(image, str) or not image:
            raise InputError("no image: give an image id from the datastore or upload a file", status=404)
        modality = check_modality(request.get("modality") or "auto")
        if request.get("foreground"):
            return self._correct(request, image, modality), None
        with self._lock:
            reading, conversation = self._read(request, image, question, max_new_tokens, modality, language)
        self._keep(image, reading)
        logger.info("medgemma: %s | %s", reading.report[:200], json.dumps(reading.latencies))
        return reading, conversation

    def _keep(self, image: str, reading) -> None:
        """The image's latest reading (a click corrects it); the last few images only."""
        with self._last_lock:
            self._last[image] = reading
            self._last.move_to_end(image)
            while len(self._last) > KEEP_READINGS:
                self._last.popitem(last=False)

    def _correct(self, request, image: str, modality: str):
        """Click to correct (MONAI Label's interactive way): ``foreground`` / ``background`` points ([i, j, k]
        of the input, as Slicer sends them) and ``finding`` (the label to replace in the image's latest
        reading) or ``kind`` (a new finding): the mask grown from the points in the image, no generation."""
        t0 = time.perf_counter()
        with self._last_lock:
            base = self._last.get(image)
        study = base.study if base is not None else load_study(image, modality, self.reader.limits)
        shape = correction.input_shape(study)
        reading = correction.correct(study, request.get("kind"),
                                     correction.parse_points(request.get("foreground"), "foreground", shape),
                                     correction.parse_points(request.get("background"), "background", shape),
                                     base, request.get("finding"))
        reading.latencies = {"correct": round(time.perf_counter() - t0, 4)}
        self._keep(image, reading)
        logger.info("medgemma: corrected %s by points in %.2f s", os.path.basename(image), time.perf_counter() - t0)
        return reading

    def _read(self, request, image: str, question: str, max_new_tokens: int, modality: str, language: str):
        """(reading, conversation JSON or None). ``conversation``: absent (one question), ``"new"`` (keep the
        chat for follow-ups) or an open conversation's id (a follow-up about the same image)."""
        asked = request.get("conversation")
        if asked is None:
            return self.reader.read(image, question, max_new_tokens, modality, request.get("max_slices"),
                                    language=language), None
        if asked == "new":
            reading = self.reader.read(image, question, max_new_tokens, modality, request.get("max_slices"), keep=True,
                                       language=language)
            entry = Entry(image, reading.study, reading.generation.conversation)
            cid = self.conversations.add(entry)
        else:
            entry = self.conversations.get(asked, image)
            cid = asked
            reading = self.reader.follow_up(entry.study, entry.chat, question, max_new_tokens, request.get("max_slices"),
                                            language)
            entry.chat = reading.generation.conversation
            self.conversations.update(cid, entry)
        return reading, {"id": cid, "turn": entry.turn, "expires_after_idle_s": self.conversations.ttl_s,
                         "history": entry.chat.history()}


def _temp_path(ext: str) -> str:
    fd, path = tempfile.mkstemp(suffix=ext, prefix="medgemma_")
    os.close(fd)
    return path
