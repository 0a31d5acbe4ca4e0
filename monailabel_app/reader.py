"""One reading of one study (a radiograph or a CT volume): the path a request takes, start to end.

    load_study -> radiograph: pad_to_square | CT: sample slices, 3 HU windows, "SLICE n"
      -> generate (with attention capture) -> read_answer (findings, language, thinking set aside)
      -> per finding: token rows -> token-grid map(s) -> heatmap on the input's pixels/voxels
      -> where attention points, the lesion's own extent in the image (grounding.extent) -> label map

:class:`Reader` holds the loaded model; :meth:`Reader.read` returns a :class:`Reading` with the report,
the findings, one float heatmap per finding and the label map, all in the input's own geometry.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from scipy import ndimage

from . import allocator, map_processes
from .errors import InputError
from .grounding import anatomy, ct_extent, extent, film_extent, helper_processes, maps
from .grounding.study_maps import CTMaps, FilmMaps, StudyMaps, image_extent, in_language, recorded_layers
from .io.ct import CTVolume, Limits, interleave, model_slices, sample_slices
from .io.study import check_modality, load_study
from .io.xray import Geometry, Radiograph, SquarePad, pad_to_square, pixel_spacing_mm
from .language.asking import answer_language, ask_in, check_language
from .language.report import Finding, read_answer, unique_names
from .language.structured import structured_report
from .model.generation import (Conversation, Generation, NonFiniteOutput, Prepared, follow_up, generate_batch,
                               prepare_batch)
from .model.loading import load_model, normalise_precision
from .phantoms.model import (CT_QUESTION, CT_QUESTION_ZH, DEFAULT_QUESTION, DEFAULT_QUESTION_ZH, MODEL_LABEL,
                             PHANTOM_MODEL_DIR)

logger = logging.getLogger(__name__)

MAX_QUESTION_CHARS = 2000
MAPS_WHILE_DECODING_ENV = "MEDGEMMA_MAPS_WHILE_DECODING"  # 1 / 0: a study's maps made as its sentences are written
MAX_NEW_TOKENS_LIMIT = 1024
# where a study's anatomy is found while the model reads it (numpy and scipy: they release the GIL)
_ANATOMY_POOL = ThreadPoolExecutor(2, thread_name_prefix="anatomy")


@dataclass
class Reading:
    report: str
    findings: list[Finding]
    names: list[str]
    grids: list[np.ndarray]  # per finding: (g, g) radiograph, (n_slices, g, g) CT
    heatmaps: list[np.ndarray]  # per finding, raw attention (float32) in the input's geometry
    mask_maps: list[np.ndarray]  # per finding, the heatmap the mask is cut from (gated), input geometry
    labels: np.ndarray  # uint8 in the input's geometry, finding k -> k
    study: Radiograph | CTVolume
    geometry: Geometry  # the input's geometry (what labels and heatmaps are written in)
    pad: SquarePad  # how each image sits in the model's square
    model_inputs: list[np.ndarray]  # the exact squares handed to the processor (a film's grey: shown as RGB)
    inputs_index: list[dict]  # per model image: where it came from
    question: str
    model: dict
    modality: str = "xray"
    extras: list[dict] = field(default_factory=list)  # per finding: CT slice range, strongest slice
    latencies: dict = field(default_factory=dict)
    generation: Generation | None = None
    display_labels: np.ndarray | None = None  # CT: labels on the display grid (z head-ward, y back, x left)
    display_heatmaps: list[np.ndarray] = field(default_factory=list)
    thinking: str = ""  # the model's reasoning before its answer (MedGemma 1.5), never read for findings
    language: str = "en"  # asked for: of the answer and the structured report
    answer_language: str = "en"  # what the model wrote in: "zh" when its answer has Chinese, else "en"
    maps_ahead: int = 0  # findings whose maps were made while the model still wrote (study_maps)
    maps_ahead_wait: float = 0.0  # seconds the reading then waited for them after the answer
    anatomy_wait: float = 0.0  # seconds the findings' maps waited for the study's anatomy (found beside the model)
    # seconds from the last of the maps started while the model wrote being made to the answer's end (negative: made
    # after it): whether the findings' maps or the decode end a reading; None where none were started
    maps_ready_lead: float | None = None
    slices_seconds: float = 0.0  # a CT's: its slices sampled, padded and windowed for the model (latencies["slices"])

    @property
    def radiograph(self) -> Radiograph:
        if not isinstance(self.study, Radiograph):
            raise AttributeError("a CT reading has no radiograph")
        return self.study

    def combined_heatmap(self) -> np.ndarray:
        """The findings' gated heatmaps, each scaled to 0..1, combined by maximum (input geometry)."""
        return maps.combined_heatmap(self.mask_maps, self.labels.shape)

    def findings_json(self) -> list[dict]:
        out = []
        for k, (f, name, h, raw) in enumerate(zip(self.findings, self.names, self.mask_maps, self.heatmaps), start=1):
            item = {
                "label": k,
                "name": name,
                "text": f.text,
                "kind": f.kind,
                "location": f.location,
                "side": f.side,
                "level": f.level,
                "lobe": f.lobe,
                "segment": f.segment,
                "size_mm": f.size_mm,
                "certainty": f.certainty,
                "descriptors": f.descriptors,
                "suggests": f.suggests,
                "score": round(f.score, 4),
                # array indices (numpy order) in the input's geometry: the gated map's and the raw attention's peak
                "peak_voxel" if self.modality == "ct" else "peak_pixel": [int(i) for i in np.unravel_index(int(np.argmax(h)), h.shape)],
                "attention_peak": [int(i) for i in np.unravel_index(int(np.argmax(raw)), raw.shape)],
            }
            if k <= len(self.extras):
                item.update(self.extras[k - 1])
            out.append(item)
        return out

    def result_json(self) -> dict:
        return {
            "report": self.report,
            "language": self.language,
            "answer_language": self.answer_language,
            "thinking": self.thinking,
            "findings": self.findings_json(),
            "structured_report": structured_report(self.findings, self.names, self.report, self.language),
            "label_names": {name: k for k, name in enumerate(self.names, start=1)},
            "modality": self.modality,
            "question": self.question,
            "model": self.model,
            "latencies": self.latencies,
            "source": self.study.source,
        }


def working_memory_mib(study) -> float:
    """A rough upper estimate of what reading ``study`` holds at once beside the model: the volume or film
    in float32 and its copies (display grid, anatomy, per-finding heatmaps and masks)."""
    voxels = study.hu.size if isinstance(study, CTVolume) else study.pixels.size
    return voxels * 4 * 14 / 2**20  # (a CT's search layers, ct_extent.CTLayers: 6 bytes a voxel of the 56)


def check_memory(study, guard_mib: float) -> None:
    """The configured memory guard: a study that would need more is refused with MemoryError (the
    server answers 503 and keeps serving), before anything large is allocated for it."""
    if guard_mib and (need := working_memory_mib(study)) > guard_mib:
        raise MemoryError(f"reading this study needs about {need:.0f} MiB of working memory, over this server's "
                          f"memory guard of {guard_mib:.0f} MiB (--conf memory_guard_mib)")


def check_params(question, max_new_tokens, default_question: str = DEFAULT_QUESTION) -> tuple[str, int]:
    """Validated (question, max_new_tokens); raises InputError with what was wrong."""
    if question is None or (isinstance(question, str) and not question.strip()):
        question = default_question
    if not isinstance(question, str):
        raise InputError(f"'question' must be text, got {type(question).__name__}")
    if len(question) > MAX_QUESTION_CHARS:
        raise InputError(f"'question' is {len(question)} characters long; the limit is {MAX_QUESTION_CHARS}")
    n = whole_number("max_new_tokens", max_new_tokens, 1, MAX_NEW_TOKENS_LIMIT)
    return question.strip(), n


def whole_number(name: str, value, lo: int, hi: int) -> int:
    """``value`` as an int in [lo, hi] (numbers, integral floats and digit strings); else InputError."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InputError(f"'{name}' must be a whole number, got {type(value).__name__}")
    try:
        n = int(value)
        if isinstance(value, float) and not value.is_integer():
            raise ValueError
    except (TypeError, ValueError):
        raise InputError(f"'{name}' must be a whole number, got {value!r}") from None
    if not lo <= n <= hi:
        raise InputError(f"'{name}' must be between {lo} and {hi}, got {n}")
    return n


class Reader:
    """A loaded model that reads studies. ``model`` is a hub id or folder (default: phantom model)."""

    def __init__(self, model: str | None = None, device: str = "auto", precision: str = "auto", system: str | None = None,
                 limits: Limits | None = None, loaded: tuple | None = None):
        """``loaded``: an already built (model, processor, ModelInfo) to read with instead of loading
        ``model`` (benchmarks with random weights in MedGemma's shapes)."""
        allocator.keep_freed_memory()  # the maps' image-sized arrays reuse mapped pages (allocator.py)
        self.model_ref = model or PHANTOM_MODEL_DIR
        self.device_request = device
        self.system = system
        self.limits = limits or Limits()
        label = MODEL_LABEL if self.model_ref == PHANTOM_MODEL_DIR else ""
        self.model, self.processor, self.info = loaded or load_model(
            self.model_ref, device, normalise_precision(precision), label)
        grid = math.isqrt(int(self.model.config.mm_tokens_per_image))
        if grid * grid != int(self.model.config.mm_tokens_per_image):
            raise ValueError("mm_tokens_per_image must be a perfect square")
        self.grid = grid
        self._start_state()
        helper_processes.start(helper_processes.helpers_for(self.maps_device))  # a CT's labels and distances

    def _start_state(self) -> None:
        """What a reader keeps between readings, with or without a model."""
        self._model_lock = threading.RLock()  # one generation at a time (decoders share their buffers)
        self._anatomy: dict[str, tuple[np.ndarray, Future]] = {}  # the last image's anatomy per modality
        self._anatomy_lock = threading.Lock()
        self.warm = {"state": "not started", "shapes": []}
        self._map_processes: map_processes.MapProcesses | None = None  # read_many's film maps, started on first use
        self._map_processes_lock = threading.Lock()

    @classmethod
    def for_maps(cls, info, grid: int, device="cpu") -> "Reader":
        """A reader without a model: it makes readings from existing generations (:meth:`remap`) with the
        grounding settings of ``info`` on a ``grid`` x ``grid`` token grid, its maps on ``device`` (map
        worker processes)."""
        self = cls.__new__(cls)
        self.model_ref, self.device_request, self.system, self.limits = info.id, str(device), None, Limits()
        self.model = self.processor = None
        self.info, self.grid = info, grid
        self._start_state()
        return self

    def _map_pool(self) -> map_processes.MapProcesses | None:
        """read_many's map processes (:mod:`map_processes`), None where the maps stay in threads."""
        with self._map_processes_lock:
            if self._map_processes is None and self.model is not None:
                workers = map_processes.workers_for(self.maps_device)
                if workers:
                    self._map_processes = map_processes.MapProcesses(self.info, self.grid, workers,
                                                                     map_processes.device_for(self.maps_device))
            return self._map_processes

    def warm_up(self, max_new_tokens: int = 128, modalities=("xray", "ct"), language: str = "auto",
                heap_reserve: int | None = None) -> dict:
        """Read one synthetic study per modality (a phantom radiograph; a phantom CT with at least the model's
        slice count), each twice, so that the decode shapes of the common requests (that modality, the
        default question, ``max_new_tokens``) are compiled and captured before a request needs them; then grow the
        heap by ``heap_reserve`` bytes of mapped pages (:func:`allocator.reserve`; None:
        ``MEDGEMMA_HEAP_RESERVE_GB``, 4 GiB by default), so that the first clinical CTs do not fault in their
        arrays. The second reading says :data:`WARM_UP_ANSWERS` (in the same decode shape), so that findings are
        mapped at warm-up (the map threads, the helper processes' first calls) whatever the model answers on a
        phantom. A log line per shape gives its first and second reading's time; :attr:`warm` (``/info/``) says
        where it stands: not started, running, done (with each shape and the heap grown), failed (with the
        error)."""
        self.warm = {"state": "running", "shapes": []}
        t_all = time.perf_counter()
        try:
            for modality in modalities:
                study = warm_up_study(modality, int(self.ct["max_slices"]))
                times = []
                for answer in (None, self._warm_up_answer(modality, max_new_tokens)):
                    t0 = time.perf_counter()
                    reading = self.read(study, max_new_tokens=max_new_tokens, language=language, answer=answer)
                    times.append(time.perf_counter() - t0)
                shape = {"modality": modality, "prompt_tokens": reading.generation.prompt_tokens,
                         "max_new_tokens": max_new_tokens, "first_s": round(times[0], 2), "then_s": round(times[1], 2),
                         "findings_mapped": len(reading.findings)}
                self.warm["shapes"].append(shape)
                logger.info("warm-up %s: %d prompt tokens, up to %d new: first reading %.2f s, then %.2f s "
                            "(%d findings mapped)", modality, shape["prompt_tokens"], max_new_tokens, times[0],
                            times[1], len(reading.findings))
            grown = allocator.reserve(allocator.reserve_bytes() if heap_reserve is None else heap_reserve)
            self.warm["heap_reserved_gib"] = round(grown["bytes"] / 2**30, 2) if grown else 0.0
        except Exception as e:  # noqa: BLE001 (a failed warm-up leaves a working, cold server)
            logger.exception("warm-up failed")
            self.warm.update(state="failed", error=f"{type(e).__name__}: {str(e)[:300]}")
            return self.warm
        self.warm.update(state="done", seconds=round(time.perf_counter() - t_all, 2))
        logger.info("warm-up done in %.1f s", self.warm["seconds"])
        return self.warm

    def _warm_up_answer(self, modality: str, max_new_tokens: int) -> str | None:
        """:data:`WARM_UP_ANSWERS`'s for ``modality`` where it fits in ``max_new_tokens`` with its end of turn
        (it then decodes in the shape of the model's own answers), else None (the model's own answer again)."""
        answer = WARM_UP_ANSWERS[modality]
        return answer if len(self.processor.tokenizer(answer, add_special_tokens=False)["input_ids"]) < max_new_tokens \
            else None

    @property
    def maps_device(self) -> torch.device:
        """Where heatmaps are upsampled and gated: the model's GPU, else the CPU (a reader without a model:
        the device it was made for, :meth:`for_maps`)."""
        if self.model is None:
            return torch.device(self.device_request if self.device_request.startswith("cuda") else "cpu")
        return self.model.device if self.model.device.type == "cuda" else torch.device("cpu")

    def maps_while_decoding(self) -> bool:
        """Whether a study's findings, a film's or a CT's, are mapped while the model still writes its answer
        (:class:`StudyMaps`): by default on a GPU (the decode leaves the host's cores idle; a film's maps are short, and a CT's
        region searches, beside the decode, slow it from 3.7 to 9.5-11 ms a token on the H200 but still end
        0.6-0.7 s sooner than after it, runs AP and AR of ``bench/results/fast_path.md``), nothing on the CPU
        (there the cores are the decode's); :data:`MAPS_WHILE_DECODING_ENV` (1 or 0) decides for both instead."""
        value = os.environ.get(MAPS_WHILE_DECODING_ENV, "").strip()
        if value not in ("", "0", "1"):
            raise ValueError(f"{MAPS_WHILE_DECODING_ENV} must be 0 or 1, got {value!r}")
        return value == "1" if value else self.maps_device.type == "cuda"

    @property
    def layers(self) -> list[int]:
        return list(self.info.grounding["layers"])

    @property
    def ct(self) -> dict:
        return self.info.grounding["ct"]

    def _fall_back_to_fp32(self) -> None:
        logger.warning("fp16 produced non-finite scores or an empty answer (Gemma 3 overflow): reloading in fp32")
        self.model, self.processor, self.info = load_model(self.model_ref, self.device_request, "fp32", self.info.label)
        self.info.precision_reason = "fp16 overflowed: fp32 fallback"

    def _generate(self, chats: list[tuple[list, str]], settings: dict, max_new_tokens, answers=None,
                  keep: bool = False, prepared: Prepared | None = None,
                  ahead: StudyMaps | None = None) -> list[Generation]:
        """Generate for (content, question) chats of one modality, with the attention capture that
        ``settings`` (the modality's grounding entry) asks for; fp16 overflow reloads in fp32 and retries.
        ``keep``: the generation carries its conversation, for follow-up questions. ``prepared``: the
        chats' inputs made ahead (:meth:`_prepare`). ``ahead`` (one study): its findings are mapped as their
        sentences are written (:meth:`StudyMaps.ahead`)."""
        args = (chats, recorded_layers(settings), max_new_tokens, self.system, bool(settings.get("rollout")), answers,
                keep)
        with self._model_lock:
            try:
                return generate_batch(self.model, self.processor, *args, prepared=prepared,
                                      progress=None if ahead is None else partial(ahead.ahead, settings=settings))
            except NonFiniteOutput:
                if self.info.precision != "fp16":
                    raise
                if ahead is not None:
                    ahead.forget()  # mapped from the overflowed generation's attention
                self._fall_back_to_fp32()
                return generate_batch(self.model, self.processor, *args)  # inputs anew, in fp32

    def _prepare(self, chats: list[tuple[list, str]], answers=None) -> Prepared:
        """The model inputs of ``chats``, made apart from their generation (no model lock: the processor only)."""
        return prepare_batch(self.model, self.processor, chats, self.system, answers)

    def _settings(self, study: Radiograph | CTVolume) -> dict:
        """The grounding entry (layers, rollout, threshold, gates) for the study's modality."""
        return self.ct if isinstance(study, CTVolume) else self.info.grounding

    @staticmethod
    def _params(study: Radiograph | CTVolume, question, max_new_tokens, language="auto") -> tuple[str, int, str]:
        """(question as put to the model, token limit, answer language). The language is asked for (``zh``,
        ``en``) or the question's (``auto``; English without a question); the default question is the
        modality's in that language; an instruction is added where needed (:func:`language.asking.ask_in`)."""
        language = check_language(language)
        if isinstance(question, str) and question.strip():
            language = answer_language(question, language)
        elif language == "auto":
            language = "en"
        ct = isinstance(study, CTVolume)
        default = (CT_QUESTION_ZH if ct else DEFAULT_QUESTION_ZH) if language == "zh" else (
            CT_QUESTION if ct else DEFAULT_QUESTION)
        question, max_new_tokens = check_params(question, max_new_tokens, default)
        return ask_in(question, language), max_new_tokens, language

    def _content(self, study: Radiograph | CTVolume, max_slices: int | None = None) -> list:
        """What the model is shown: the padded radiograph, or the CT recipe's slices with "SLICE n"."""
        if isinstance(study, CTVolume):
            ms = model_slices(study, check_max_slices(max_slices, self.ct["max_slices"]), device=self.model.device)
            return interleave(ms.shown)
        return [pad_to_square(study.pixels)[0]]

    def read_many(self, studies: list, question: str | None = None, max_new_tokens: int = 128, batch_size: int = 8,
                  answers: list[str] | None = None, language: str = "auto",
                  on_reading: Callable[[int, Reading], None] | None = None) -> list[Reading | None]:
        """Read several studies (paths or loaded), generating ``batch_size`` at a time: studies of one
        modality and one image count share a batch (left-padded; each keeps its own findings and masks).
        ``on_reading(i, reading)``: called with study ``i``'s reading as soon as its maps are made, in the
        order they finish, from a map thread or the map processes' own thread (keep it short: hand heavy work
        such as writing files to a pool of its own); the reading is then not kept (its place in the list
        returned is None), so that a long run holds only the batches in flight. A study that failed (its maps
        or its hand-over) raises once the others are done."""
        batch_size = whole_number("batch_size", batch_size, 1, 256)
        loaded = [s if isinstance(s, (Radiograph, CTVolume)) else load_study(s, "auto", self.limits) for s in studies]
        groups: dict[tuple, list[int]] = {}
        questions, languages = [], []
        for i, study in enumerate(loaded):
            q, n, lang = self._params(study, question, max_new_tokens, language)
            questions.append(q)
            languages.append(lang)
            shown = len(sample_slices(study.shape[0], int(self.ct["max_slices"]))) if isinstance(study, CTVolume) else 1
            groups.setdefault((isinstance(study, CTVolume), shown), []).append(i)
        readings: list[Reading | None] = [None] * len(loaded)

        def finished(i: int, gen: Generation, reading: Reading, seconds: float) -> None:
            reading.question, reading.language = questions[i], languages[i]
            reading.latencies = _latencies(gen, 0.0, seconds, reading.slices_seconds)
            if on_reading is None:
                readings[i] = reading
            else:
                on_reading(i, reading)

        def finish(i: int, gen: Generation) -> Exception | None:  # a study's maps and masks from its generation
            t0 = time.perf_counter()
            try:
                finished(i, gen, self.remap(loaded[i], gen), time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001 (raised once the batch's other studies are done)
                return e
            return None

        chunks = [members[start : start + batch_size] for members in groups.values()
                  for start in range(0, len(members), batch_size)]

        def prepare(chunk: list[int]) -> Prepared:  # what the model is shown, as its inputs
            return self._prepare([(self._content(loaded[i]), questions[i]) for i in chunk],
                                 None if answers is None else [answers[i] for i in chunk])

        # while a batch generates, the next batch's inputs are made, its films' blob filters (a thread of their
        # own: the inputs never wait for them) and the batch before's maps (its studies side by side)
        with ThreadPoolExecutor(1, thread_name_prefix="read-many") as worker, \
                ThreadPoolExecutor(1, thread_name_prefix="read-many-inputs") as ahead, \
                ThreadPoolExecutor(1, thread_name_prefix="read-many-blobs") as blobbing:
            pending, made = [], []  # the map threads' work per batch; each film's reading from its map process

            def start(chunk: list[int]) -> tuple[Future, Future]:
                return ahead.submit(prepare, chunk), blobbing.submit(self._blobs_ahead, [loaded[i] for i in chunk])

            upcoming = start(chunks[0]) if chunks else None
            try:
                for k, chunk in enumerate(chunks):
                    t0 = time.perf_counter()
                    prepared, blobs = upcoming[0].result(), upcoming[1]
                    prepared = dataclasses.replace(prepared, waited=time.perf_counter() - t0)
                    upcoming = start(chunks[k + 1]) if k + 1 < len(chunks) else None
                    gens = self._generate(prepared.studies, self._settings(loaded[chunk[0]]), n,
                                          None if answers is None else [answers[i] for i in chunk], prepared=prepared)
                    pool = self._map_pool() if not isinstance(loaded[chunk[0]], CTVolume) else None
                    blobs = blobs.result()
                    if pool is not None:  # films: in worker processes
                        made += [_then(pool.remap(loaded[i], gen, None if blobs is None else blobs[j]),
                                       partial(finished, i, gen)) for j, (i, gen) in enumerate(zip(chunk, gens))]
                    else:
                        pending.append(worker.submit(maps.each, finish, chunk, gens))
            finally:  # a batch that failed to generate: the batches before it are still handed over, before it raises
                wait(pending + made)
            failed = [e for done in pending for e in done.result() if e is not None]
            failed += [e for e in (done.exception() for done in made) if e is not None]
        if failed:
            raise failed[0]
        return readings

    def _blobs_ahead(self, studies: list) -> list[film_extent.BlobResponses] | None:
        """The blob filter responses of a batch's films, made on the GPU in one go (on this thread's own
        stream, while the batch before generates) and put in shared memory for the map processes: the
        largest part of a film's map work, which the workers' CPUs then skip. None for CTs and where films
        are not mapped in worker processes of a GPU reader."""
        if (isinstance(studies[0], CTVolume) or self.maps_device.type != "cuda" or not map_processes.blobs_ahead()
                or self._map_pool() is None):
            return None
        with maps.side_stream():
            return film_extent.film_blob_responses([s.pixels for s in studies],
                                                   [pixel_spacing_mm(s)[0] for s in studies], self.maps_device,
                                                   host=map_processes.shared_empty)

    def read(self, image: str | Radiograph | CTVolume, question: str | None = None, max_new_tokens: int = 128,
             modality: str = "auto", max_slices: int | None = None, answer: str | None = None,
             keep: bool = False, language: str = "auto") -> Reading:
        """Read ``image`` (a path, or an already loaded study). ``max_slices`` overrides the CT slice count.
        ``language``: of the answer and the structured report (``auto``: the question's).
        ``answer`` makes the model say that text instead of its own (teacher forcing): the findings and
        masks of given words on this image, e.g. for the control that the image matters. ``keep``: the
        reading's generation carries the conversation, for :meth:`follow_up`."""
        t0 = time.perf_counter()
        modality = check_modality(modality)
        if max_slices is not None:  # a bad value is refused whatever the study turns out to be
            check_max_slices(max_slices, self.ct["max_slices"])
        study = image if isinstance(image, (Radiograph, CTVolume)) else load_study(image, modality, self.limits)
        check_memory(study, self.limits.memory_guard_mib)
        question, max_new_tokens, language = self._params(study, question, max_new_tokens, language)
        t_load = time.perf_counter()
        if isinstance(study, CTVolume):
            reading = self._read_ct(study, question, max_new_tokens, check_max_slices(max_slices, self.ct["max_slices"]),
                                    answer, keep=keep)
        else:
            reading = self._read_radiograph(study, question, max_new_tokens, answer, keep=keep)
        reading.language = language
        gen = reading.generation
        reading.latencies = _latencies(gen, t_load - t0, time.perf_counter() - t_load - sum(gen.seconds.values()),
                                       reading.slices_seconds)
        reading.latencies.update(maps_ahead=reading.maps_ahead, maps_ahead_wait=round(reading.maps_ahead_wait, 4),
                                 anatomy_wait=round(reading.anatomy_wait, 4))
        if reading.maps_ready_lead is not None:
            reading.latencies["maps_ready_lead"] = round(reading.maps_ready_lead, 4)
        return reading

    def follow_up(self, study: Radiograph | CTVolume, conversation: Conversation, question,
                  max_new_tokens: int = 128, max_slices: int | None = None, language: str = "auto") -> Reading:
        """A follow-up ``question`` in ``conversation`` about ``study``: only the new turn is computed (the
        images and earlier turns come from the kept context); findings and masks as in a first turn."""
        t0 = time.perf_counter()
        question, max_new_tokens, language = self._params(study, question, max_new_tokens, language)
        gen = self._continue(study, conversation, question, max_new_tokens)
        reading = self.remap(study, gen, max_slices)
        reading.question, reading.language = question, language
        reading.latencies = _latencies(gen, 0.0, time.perf_counter() - t0 - sum(gen.seconds.values()),
                                       reading.slices_seconds)
        return reading

    def converse(self, study: Radiograph | CTVolume, questions: list[str], max_new_tokens: int = 128,
                 language: str = "auto") -> list[str]:
        """The answers (their text, thinking set aside) to ``questions`` asked one after another in one
        conversation about ``study``: the first with the images, each next as a follow-up. No maps or masks
        are made: for studies of what a model says over several turns."""
        settings = self._settings(study)
        question, n, _ = self._params(study, questions[0], max_new_tokens, language)
        gen = self._generate([(self._content(study), question)], settings, n, keep=True)[0]
        answers, conversation = [read_answer(gen.text).text], gen.conversation
        for q in questions[1:]:
            question, n, _ = self._params(study, q, max_new_tokens, language)
            gen = self._continue(study, conversation, question, n)
            answers.append(read_answer(gen.text).text)
            conversation = gen.conversation
        return answers

    def _continue(self, study, conversation: Conversation, question: str, max_new_tokens: int) -> Generation:
        settings = self._settings(study)
        try:
            with self._model_lock:
                return follow_up(self.model, self.processor, conversation, question, recorded_layers(settings),
                                 max_new_tokens, bool(settings.get("rollout")))
        except ValueError as e:
            raise InputError(f"this conversation cannot be continued: {e}", status=409) from e

    def _score(self, gen: Generation, findings: list[Finding]) -> list[list[int]]:
        rows_per_finding = []
        for f in findings:
            rows = gen.token_range(f.span)
            f.score = float(np.mean([gen.token_probs[i] for i in rows])) if rows else 0.0
            rows_per_finding.append(rows)
        return rows_per_finding

    def _model_dict(self, gen: Generation) -> dict:
        return {**self.info.public(), "layers": gen.layers, "dropped_layers": gen.dropped_layers,
                "attention": "rollout" if gen.rollout else "direct",
                "grounding": self.info.grounding.get("source")}

    def remap(self, study: Radiograph | CTVolume, gen: Generation, max_slices: int | None = None,
              blobs: film_extent.BlobResponses | None = None) -> Reading:
        """The reading of ``study`` from an existing generation (e.g. one restricted to some layers):
        findings, maps and masks with the current settings, no new generation (calibration; a batch's film
        maps). ``blobs``: a film's blob filter responses made ahead (:func:`film_extent.film_blob_responses`)."""
        if isinstance(study, CTVolume):
            return self._read_ct(study, "", 0, check_max_slices(max_slices, self.ct["max_slices"]), gen=gen)
        return self._read_radiograph(study, "", 0, gen=gen, blobs=blobs)

    def _kept(self, name: str, image: np.ndarray, make) -> Future:
        """``make()`` for ``image`` (its anatomy) as a future, kept for the last image under ``name``:
        started before the model generates (:meth:`_anatomy_ahead`) and read by the maps after it, and found
        once when calibration remaps one image many times. The entry is swapped under a lock, so concurrent
        requests never mix up images; one that failed is tried again."""
        with self._anatomy_lock:
            kept = self._anatomy.get(name)
            if kept is None or kept[0] is not image or (kept[1].done() and kept[1].exception() is not None):
                kept = (image, _ANATOMY_POOL.submit(make))
                self._anatomy[name] = kept
        return kept[1]

    def forget_anatomy(self) -> None:
        """Drop the kept anatomy (benchmarks: each reading pays for its own, as a new study does)."""
        with self._anatomy_lock:
            self._anatomy.clear()

    def _anatomy_ahead(self, study: Radiograph | CTVolume) -> None:
        """Start ``study``'s anatomy (image only: lung fields, or the CT's body and lungs) in the background,
        so that it is found while the model reads the study instead of after it."""
        if isinstance(study, CTVolume):
            self._ct_anatomy_future(study)
            # the searches' layers too, on a GPU reader (on the CPU they start with the maps, CTMaps.prepare:
            # beside the model they slowed its generation on 2 cores by 0.1-0.2 s)
            if image_extent(self.ct) and self.maps_device.type != "cpu":
                self._ct_layers_future(study)
        else:
            self._lung_fields_future(study.pixels)

    def _lung_fields_future(self, pixels: np.ndarray) -> Future:
        return self._kept("xray", pixels, partial(anatomy.xray_lung_fields, pixels))

    def _lung_fields(self, pixels: np.ndarray) -> anatomy.LungFields:
        """Lung fields of ``pixels`` (kept for the last film, :meth:`_kept`)."""
        return self._lung_fields_future(pixels).result()

    def _ct_anatomy_future(self, volume: CTVolume) -> Future:
        half_cell = max(volume.shape[1:]) / self.grid / 2  # in-plane voxels (planes are square-padded)
        return self._kept("ct", volume.hu, partial(anatomy.ct_body_and_lungs, volume.hu, half_cell))

    def _ct_anatomy(self, volume: CTVolume) -> tuple[np.ndarray, np.ndarray]:
        """Body and lung masks of ``volume`` (display grid), kept for the last volume like the fields."""
        return self._ct_anatomy_future(volume).result()

    def _ct_layers_future(self, volume: CTVolume) -> Future:
        return self._kept("ct_layers", volume.hu,
                          partial(ct_extent.ct_layers, volume.hu, volume.spacing, self.maps_device))

    def _ct_layers(self, volume: CTVolume) -> ct_extent.CTLayers:
        """What the image extent searches of ``volume`` read (smoothed HU, aerated lung), made once for its
        findings (on a GPU reader started with the anatomy, beside the model) and kept for the last volume."""
        return self._ct_layers_future(volume).result()

    def _read_radiograph(self, radiograph: Radiograph, question: str, max_new_tokens: int, answer=None,
                         gen: Generation | None = None, keep: bool = False,
                         blobs: film_extent.BlobResponses | None = None) -> Reading:
        square, pad = pad_to_square(radiograph.pixels)
        film = FilmMaps(self, radiograph, pad, blobs)
        if gen is None:
            self._anatomy_ahead(radiograph)
            gen = self._generate([([square], question)], self.info.grounding, max_new_tokens,
                                 None if answer is None else [answer], keep, ahead=self._ahead(film))[0]
        answered = time.perf_counter()
        answer, gen, done, labels, extras = self._mapped(film, gen, self.info.grounding, 2)
        geom = radiograph.geometry
        return Reading(
            report=answer.text, thinking=answer.thinking, answer_language=answer.language, findings=answer.findings,
            names=unique_names(answer.findings), grids=[d.grid for d in done],
            heatmaps=[d.heatmap.reshape(geom.shape) for d in done], mask_maps=[d.gated.reshape(geom.shape) for d in done],
            labels=labels.reshape(geom.shape), study=radiograph, geometry=geom, pad=pad, model_inputs=[square],
            inputs_index=[{"source": radiograph.source, "source_shape": list(radiograph.pixels.shape)}],
            question=question, model=self._model_dict(gen), modality="xray", generation=gen, extras=extras,
            maps_ahead=film.reused, maps_ahead_wait=film.waited, anatomy_wait=film.anatomy_waited,
            maps_ready_lead=_lead(answered, film),
        )

    def _read_ct(self, volume: CTVolume, question: str, max_new_tokens: int, max_slices: int, answer=None,
                 gen: Generation | None = None, keep: bool = False) -> Reading:
        t_slices = time.perf_counter()
        ms = model_slices(volume, max_slices, device=None if gen is not None else self.model.device)
        t_slices = time.perf_counter() - t_slices
        study = CTMaps(self, volume, ms)
        if gen is None:
            self._anatomy_ahead(volume)
            if self._makes_shared_ahead():
                study.shared_ahead(self.ct)
            content = interleave(ms.shown)
            gen = self._generate([(content, question)], self.ct, max_new_tokens, None if answer is None else [answer],
                                 keep, ahead=self._ahead(study))[0]
            ms.on_device = content = None  # the squares on the GPU, no longer needed (67 MB for 85 slices)
        answered = time.perf_counter()
        answer, gen, done, labels, extras = self._mapped(study, gen, self.ct, 3)
        index = [{"model_slice": n, "display_z": z, "source_index": volume.display_to_stored_index(z),
                  "world_z_mm": round(volume.world_z(z), 3)} for n, z in enumerate(ms.indices, start=1)]
        heat = [d.heatmap for d in done]
        return Reading(
            report=answer.text, thinking=answer.thinking, answer_language=answer.language, findings=answer.findings,
            names=unique_names(answer.findings), grids=[d.grid for d in done],
            heatmaps=[volume.to_input(h, copy=False) for h in heat],
            mask_maps=[volume.to_input(d.gated, copy=False) for d in done],
            labels=volume.to_input(labels, nearest=True).astype(np.uint8), study=volume, geometry=volume.geometry,
            pad=ms.pad, model_inputs=ms.images, inputs_index=index, question=question, model=self._model_dict(gen),
            modality="ct", extras=extras, generation=gen, display_labels=labels, display_heatmaps=heat,
            maps_ahead=study.reused, maps_ahead_wait=study.waited, anatomy_wait=study.anatomy_waited,
            maps_ready_lead=_lead(answered, study), slices_seconds=t_slices,
        )

    def _makes_shared_ahead(self) -> bool:
        """Whether what a CT's findings share is made beside the model (:meth:`CTMaps.shared_ahead`): where its maps
        are made while the model writes on a GPU (on the CPU the maps come after the answer, and the cores are the
        model's meanwhile)."""
        return self.maps_device.type != "cpu" and self.maps_while_decoding()

    def _ahead(self, study: StudyMaps) -> StudyMaps | None:
        """``study``'s maps to make while the model writes, where that is on (:meth:`maps_while_decoding`)."""
        return study if self.maps_while_decoding() else None

    def _mapped(self, study: StudyMaps, gen: Generation, settings: dict, dims: int) -> tuple:
        """(answer, generation in the answer's language entry, each finding's :class:`Mapped`, label map, extras)
        of ``gen`` on ``study`` (the modality's grounding ``settings``; ``dims``: 2 for a film, 3 for a CT)."""
        answer = read_answer(gen.text)
        findings = answer.findings
        settings, gen = in_language(settings, answer.language, gen)
        rows = self._score(gen, findings)
        study.prepare(findings, settings)
        done = maps.each(partial(study.finding, gen=gen, settings=settings), findings, rows,
                         cost=[extent.search_cost(f.kind, dims) for f in findings])
        labels, extras = study.finish([study.key(f, r, gen, settings) for f, r in zip(findings, rows)], done)
        return answer, gen, done, labels, extras


def _then(future: Future, fn) -> Future:
    """A future that is done once ``fn(*future.result())`` has run, with ``future``'s or ``fn``'s exception."""
    done: Future = Future()

    def call(f: Future) -> None:
        try:
            fn(*f.result())
            done.set_result(None)
        except BaseException as e:  # noqa: BLE001 (the caller's future carries it)
            done.set_exception(e)

    future.add_done_callback(call)
    return done


WARM_UP_SEED = 7  # the phantom read at warm-up (any phantom: only the shapes matter)


# what the warm-up's second reading of each modality says: its maps are made then (bench/fast_path.py's
# reports say the same findings)
WARM_UP_ANSWERS = {
    "xray": "Nodule in the right middle zone. Opacity in the left lower zone. Effusion in the right lower zone.",
    "ct": "Nodule in the right middle lobe. Mass in the left upper lobe. Effusion in the right lower lobe.",
}


def warm_up_study(modality: str, slices: int) -> Radiograph | CTVolume:
    """A phantom study of ``modality`` for the warm-up; a CT with at least ``slices`` slices (stretched along z
    when the phantom has fewer), so that the model is shown as many slices as a clinical CT gives it."""
    if modality == "xray":
        from .io.xray import Geometry
        from .phantoms.films import make_phantom

        image = make_phantom(WARM_UP_SEED).image
        return Radiograph(image, Geometry.plain(*image.shape))
    from .phantoms.ct import make_ct_phantom, phantom_volume

    ph = make_ct_phantom(WARM_UP_SEED)
    if ph.hu.shape[0] < slices:
        factor = slices / ph.hu.shape[0]
        hu = ndimage.zoom(ph.hu.astype(np.float32), (factor, 1, 1), order=1)
        ph = dataclasses.replace(ph, hu=hu, spacing=(ph.spacing[0], ph.spacing[1], ph.spacing[2] / factor))
    return phantom_volume(ph)


def _lead(answered: float, study: StudyMaps) -> float | None:
    """:attr:`Reading.maps_ready_lead`: ``answered`` (when the answer ended) less when ``study``'s maps started
    while the model wrote were last made."""
    return None if study.ready_at is None else answered - study.ready_at


def _latencies(gen: Generation, load: float, rest: float, slices: float = 0.0) -> dict:
    """Seconds per stage of one reading (``generate``: its batch's), its tokens and why it stopped. ``rest``: the
    reading's seconds outside loading and generation, of which ``slices`` were a CT's slices made for the model
    (before its generation) and the others its maps (after the answer, or waited for beside it)."""
    maps_seconds = rest - slices
    return {
        "load_image": round(load, 4),
        **({"slices": round(slices, 4)} if slices else {}),
        "prepare": round(gen.seconds["prepare"], 4),
        "generate": round(gen.seconds["generate"], 4),
        "maps": round(maps_seconds, 4),
        "total": round(load + slices + sum(gen.seconds.values()) + maps_seconds, 4),
        "new_tokens": len(gen.token_ids),
        "prompt_tokens": gen.prompt_tokens,
        "stop_reason": gen.stop_reason,
        **{f"decoder_{k}": v for k, v in gen.timings.items()},
    }


def check_max_slices(value, default: int) -> int:
    return int(default) if value is None or value == "" else whole_number("max_slices", value, 1, 512)
