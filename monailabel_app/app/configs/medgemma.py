"""MONAI Label task config ``medgemma``: which model, on which device, in which precision.

``--conf`` keys (all optional):

* ``model``: Hugging Face id or local folder (default: the embedded phantom model, a TEST model that
  is NOT MedGemma); ``device``: auto, cpu, cuda[:N]; ``precision``: auto, bf16, fp32, fp16;
* ``question``: the default question (default: one for radiographs, one for CT, in the answer's language);
  ``language``: the default answer language (auto: the question's; zh; en);
  ``max_new_tokens``: the default answer length limit;
* CT volumes: ``min_slices`` (1), ``max_voxels`` (268435456), ``max_obliquity_deg`` (10),
  ``resample`` (false: oblique volumes are refused; true: resampled onto patient axes);
* ``memory_guard_mib``: refuse (503) a study whose estimated working memory is larger (0: off);
* server guards (main.py): ``max_upload_mib`` (2048), ``max_queue`` (8 inference requests at once);
* conversations: ``conversations`` (16 open at most), ``conversation_mib`` (2048: kept context in all),
  ``conversation_ttl_s`` (1800: idle time before one expires);
* start-up: ``warm_up`` (auto: on a GPU; true; false): right after loading, in the background, read a phantom
  radiograph and a phantom CT so that the common decode shapes are compiled and captured before the first
  request (a log line per shape with its time; ``/info/`` says ``warm_up.state``: running, done, failed);
  ``compile_cache`` (folder for compiled kernels, reused by a restart; default
  ``~/.cache/monailabel-medgemma/compile``).

Per request (``params``): ``question``, ``language`` (auto, zh, en), ``max_new_tokens``, ``modality`` (auto, ct, xray),
``max_slices`` (CT: slices shown to the model; default the model's, 85 for MedGemma 1.5),
``result_extension``, ``result_dtype``, ``conversation`` ("new", or the id of an open conversation
about the same image: a follow-up question).
"""

from __future__ import annotations


import os
import threading

from monailabel.interfaces.config import TaskConfig

from monailabel_app import allocator
from monailabel_app.app.infers.medgemma import MedGemmaInfer
from monailabel_app.errors import InputError
from monailabel_app.io.ct import Limits
from monailabel_app.language.asking import check_language
from monailabel_app.model.decoding import COMPILE_CACHE_ENV, use_compile_cache
from monailabel_app.reader import Reader
from monailabel_app.serve.conversation import MAX_BYTES, MAX_CONVERSATIONS, TTL_SECONDS, Conversations


class MedGemma(TaskConfig):
    def init(self, name, model_dir, conf, planner, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        if conf.get("compile_cache"):
            os.environ[COMPILE_CACHE_ENV] = os.path.abspath(conf["compile_cache"])
        use_compile_cache()
        self.reader = Reader(
            conf.get("model") or None,
            device=conf.get("device", "auto"),
            precision=conf.get("precision", "auto"),
            limits=Limits(
                min_slices=int(conf.get("min_slices", Limits.min_slices)),
                max_voxels=int(conf.get("max_voxels", Limits.max_voxels)),
                max_obliquity_deg=float(conf.get("max_obliquity_deg", Limits.max_obliquity_deg)),
                resample=str(conf.get("resample", "false")).lower() in ("1", "true", "yes"),
                memory_guard_mib=float(conf.get("memory_guard_mib", 0)),
            ),
        )
        self.conversations = Conversations(
            max_count=int(conf.get("conversations", MAX_CONVERSATIONS)),
            max_bytes=int(float(conf.get("conversation_mib", MAX_BYTES / 2**20)) * 2**20),
            ttl_s=float(conf.get("conversation_ttl_s", TTL_SECONDS)),
        )
        self.default_question = conf.get("question") or None
        self.language = check_language(conf.get("language") or "auto")
        self.max_new_tokens = int(conf.get("max_new_tokens", 128))
        if wants_warm_up(conf.get("warm_up", "auto"), self.reader.info.device):
            threading.Thread(target=self.reader.warm_up, kwargs={"max_new_tokens": self.max_new_tokens,
                                                                   "language": self.language,
                                                                   "heap_reserve": heap_reserve(conf)},
                             name="warm-up", daemon=True).start()

    def infer(self):
        info = self.reader.info
        label = f" [{info.label}]" if info.label else ""
        return MedGemmaInfer(
            self.reader,
            description=f"Findings text and one attention mask per finding from {info.id}{label}",
            config={
                "question": self.default_question,
                "language": self.language,
                "max_new_tokens": self.max_new_tokens,
                "modality": "auto",
                "max_slices": int(self.reader.ct["max_slices"]),
                "precision": info.precision,
                "device": info.device,
                "model": info.id,
            },
            conversations=self.conversations,
        )

    def trainer(self):
        return None


def heap_reserve(conf: dict) -> int:
    """``--conf heap_reserve_gb``: the heap the warm-up grows for the first clinical studies (GiB; 0: none; absent:
    ``MEDGEMMA_HEAP_RESERVE_GB``, else 4), in bytes; a bad value of either stops the server at start."""
    value = conf.get("heap_reserve_gb")
    try:
        return allocator.reserve_bytes() if value is None else allocator.reserve_bytes(value, "--conf heap_reserve_gb")
    except ValueError as e:
        raise InputError(str(e)) from None


def wants_warm_up(value, device: str) -> bool:
    """``--conf warm_up``: auto (on a GPU, where compiling and capturing the decode steps takes long), true,
    false."""
    value = str(value).strip().lower()
    if value == "auto":
        return device.startswith("cuda")
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise InputError(f"--conf warm_up must be auto, true or false, got {value!r}")
