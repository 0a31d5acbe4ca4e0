"""A study's maps, finding by finding: token rows -> token-grid map -> heatmap on the study's pixels or
voxels -> gated map -> the finding's region (the lesion's own extent in the image where it gives one, else
attention's) -> one label map. :class:`FilmMaps` for a radiograph, :class:`CTMaps` for a CT volume.

What a study's findings share is made once (a film's lung fields and the image extent's film cache; a CT's
body and lungs, their gates and the extent's smoothed volume), and each finding is mapped on its own, in the
map threads (:func:`grounding.maps.each`).

**Mapped while the model writes** (:meth:`StudyMaps.ahead`, called by the decode every few steps): once a
finding's sentence is complete (:func:`language.findings.written_upto`), its maps are made beside the rest of
the decode, and the label map of the findings written so far. The reading takes such a result only for a
finding of the final answer that reads the same words the same way (kind, side, level, region, box), on the
same token rows, with the same settings (:meth:`StudyMaps.key`): every input of its maps is then the same,
the attention rows being the same copies (:class:`decoding.LiveRows`). Any other finding is mapped anew, so
a mask never depends on when it was made.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from . import anatomy, ct_extent, ct_maps, extent, film_extent, maps
from ..allocator import zeros
from ..io.ct import CTVolume, ModelSlices
from ..io.xray import Radiograph, SquarePad, pixel_spacing_mm
from ..language.findings import Finding, read_answer, written_upto
from ..model.generation import Generation, Partial
from .boxes import Boxed, bounds, within

logger = logging.getLogger(__name__)

# cues that gate a finding's heatmap before its mask is cut (grounding.json "gates"): "side" (the named
# side of the body), "zone" (radiograph: the named third of that lung field, found in the image), "box"
# (radiograph: the [y0, x0, y1, x1] box the model gave in the finding's sentence), "lung" (CT: the lungs
# found by HU)
DEFAULT_XRAY_GATES = ("side", "zone", "box")
DEFAULT_CT_GATES = ("side", "lung")
ASSUMED_SPACING = "assumed: the film's longer side 430 mm (the file gives no pixel spacing)"
LANGUAGE_ENTRIES = ("zh",)  # answer languages a grounding entry may carry its own entry for (English: the entry)


# takes a written answer's attention rows and starts its findings' maps, one answer's sentences after another
_STARTER = ThreadPoolExecutor(1, thread_name_prefix="maps_ahead")
_AHEAD = ThreadPoolExecutor(1, thread_name_prefix="shared_ahead")  # what a CT's findings share, made beside the model


@dataclass
class Mapped:
    """One finding's maps: its token-grid map(s), raw heatmap, gated map, region and what the image
    measured (display grid for a CT); ``support``: the box outside which its gated map is zero (or None), and
    ``span`` that map's range."""

    grid: np.ndarray
    heatmap: np.ndarray
    gated: np.ndarray
    region: np.ndarray
    info: dict
    support: tuple[slice, ...] | None = None
    span: tuple[float, float] | None = None  # the gated map's range (maps.support_range), found once
    region_box: tuple[slice, ...] | None = None  # where known, the box outside which the region is all False
    peak: tuple[int, ...] | None = None  # where known, the gated map's peak (maps.Peaks)


class StudyMaps:
    """What one study's findings share and how each is mapped (:meth:`_finding`, :meth:`_finish`: subclasses),
    with the maps made while the model writes (:meth:`ahead`) and taken when they stand (:meth:`finding`)."""

    def __init__(self, reader):
        self.reader = reader  # a Reader: its grid, maps device and the study's kept anatomy
        self._lock = threading.Lock()  # what the findings share, made once by the first that needs it
        self._counted = threading.Lock()  # reused, waited, anatomy_waited
        self.started: dict[tuple, Future] = {}  # key -> the finding's maps, started while the model wrote
        self.started_labels: dict[tuple, Future] = {}  # the findings' keys in order -> (labels, extras)
        self.starting: list[Future] = []  # the maps being started while the model writes (_start_ahead)
        self.looked_upto = 0  # characters of the answer being written already read for findings
        self.latest_labels: tuple | None = None  # the findings of the last label map started while the model wrote
        self.reused = 0
        self.waited = 0.0  # seconds the reading waited for maps started while the model wrote
        self.anatomy_waited = 0.0  # seconds the findings' maps waited for the study's anatomy (found beside the model)
        self.ready_at: float | None = None  # when what was started while the model wrote last finished (perf_counter)

    @staticmethod
    def key(f: Finding, rows: list[int], gen: Generation, settings: dict) -> tuple:
        """Everything :meth:`_finding` reads of a finding, its generation and its settings (the attention
        values aside: the same rows of one generation)."""
        return (f.kind, f.side, f.level, f.region, f.box, tuple(rows), tuple(gen.layers),
                json.dumps(settings, sort_keys=True, default=str))

    def finding(self, f: Finding, rows: list[int], gen: Generation, settings: dict) -> Mapped:
        """One finding's maps: those made while the model wrote when they have this :meth:`key`, else made now."""
        self._started()
        made = self.started.get(self.key(f, rows, gen, settings))
        if made is not None and self._wait(made):
            with self._counted:
                self.reused += 1
            return made.result()
        return self._finding(f, rows, gen, settings)

    def finish(self, keys: list[tuple], done: list[Mapped]) -> tuple[np.ndarray, list[dict]]:
        """(label map, per-finding extras) of the findings (their :meth:`key`\\ s and maps, in order): made
        while the model wrote for exactly these findings, else made now."""
        self._started()
        made = self.started_labels.get(tuple(keys))
        labels = made.result() if made is not None and self._wait(made) else None
        return self._finish(done) if labels is None else labels

    def _wait(self, made: Future) -> bool:
        """Wait for ``made`` (counted in :attr:`waited`); whether it succeeded."""
        t0 = time.perf_counter()
        failed = made.exception() is not None
        with self._counted:
            self.waited += time.perf_counter() - t0
        return not failed

    def _anatomy(self, get):
        """``get()`` (the reader's kept anatomy of this study), the time it blocked counted in
        :attr:`anatomy_waited`."""
        t0 = time.perf_counter()
        got = get()
        with self._counted:
            self.anatomy_waited += time.perf_counter() - t0
        return got

    def _finish_started(self, keys: tuple, made: list[Future]) -> tuple[np.ndarray, list[dict]] | None:
        """The label map of the findings ``keys`` once their maps stand, unless a later finding came meanwhile:
        then None, given up (the later label map is the one the answer may need; this one is made again if it
        is, by :meth:`finish`), as its work would only slow the findings' maps still under way. Not an
        exception: one kept in its future holds this frame, and through it the study's maps, in a reference
        cycle that only Python's cyclic collector frees, late (1.26 GB a reading of a real CT)."""
        done = [m.result() for m in made]
        return self._finish(done) if keys == self.latest_labels else None

    def ahead(self, written: Partial, settings: dict) -> None:
        """The decode's progress: start the maps of the findings in the newly completed sentences of the
        answer being ``written`` (the modality's grounding ``settings``), and the label map of all of them.
        The decode loop only reads the text here: the answer's attention rows (they wait for their copy off
        the device) are taken, and the maps started, in a thread of their own (:meth:`_start_ahead`), so the
        loop goes back to the device at once. Never raises into the decode."""
        try:
            upto = written_upto(written.text)
            if upto <= self.looked_upto:
                return
            self.looked_upto = upto
            answer = read_answer(written.text[:upto])
            if answer.findings:
                self.starting.append(_STARTER.submit(self._start_ahead, answer, written, settings))
        except Exception:  # noqa: BLE001 (the answer goes on; its findings are mapped after it)
            logger.exception("mapping findings while the model writes failed: they are mapped after the answer")

    def _started(self) -> None:
        """Wait until the maps started while the model wrote are all in :attr:`started` (each start never
        raises)."""
        for f in self.starting:
            f.result()

    def _start_ahead(self, answer, written: Partial, settings: dict) -> None:
        """:meth:`ahead`'s maps for the findings of ``answer`` (the text written up to a sentence's end)."""
        try:
            own, gen = in_language(settings, answer.language, written.generation())
            keys = []
            for f in answer.findings:
                rows = gen.token_range(f.span)
                keys.append(self.key(f, rows, gen, own))
                if keys[-1] not in self.started:
                    started = maps.start(self._timed, self._finding, f, rows, gen, own)
                    if started is None:
                        return
                    self.started[keys[-1]] = started
            if tuple(keys) not in self.started_labels:  # the label map, if no other finding follows
                self.latest_labels = tuple(keys)
                self.started_labels[tuple(keys)] = maps.start(self._timed, self._finish_started, tuple(keys),
                                                              [self.started[k] for k in keys])
        except Exception:  # noqa: BLE001 (the answer goes on; its findings are mapped after it)
            logger.exception("mapping findings while the model writes failed: they are mapped after the answer")

    def _timed(self, fn, *args):
        """``fn(*args)`` (a map or label map started while the model wrote), :attr:`ready_at` set as it ends. (Not
        a future's done callback: the future would hold this study through it, a reference cycle.)"""
        try:
            return fn(*args)
        finally:
            with self._counted:
                self.ready_at = time.perf_counter()

    def forget(self) -> None:
        """Drop what was started (its generation is not the one the reading uses)."""
        self._started()
        self.starting.clear()
        self.started.clear()
        self.started_labels.clear()
        self.latest_labels = None
        self.looked_upto = 0

    def prepare(self, findings: list[Finding], settings: dict) -> None:
        """Start what the ``findings``' maps (the final answer's, with their grounding ``settings``) will share
        and wait for, before their maps start (:meth:`CTMaps.prepare`)."""

    def _finding(self, f: Finding, rows: list[int], gen: Generation, settings: dict) -> Mapped:
        raise NotImplementedError

    def _finish(self, done: list[Mapped]) -> tuple[np.ndarray, list[dict]]:
        raise NotImplementedError


class FilmMaps(StudyMaps):
    """A radiograph's maps: the square's padding, the pixel spacing, the lung fields (the reader's kept
    anatomy) and the image extent's film cache (:func:`film_extent.film_cache`) made once for its findings
    (``blobs``: its blob filter responses where they were made ahead, :func:`film_extent.film_blob_responses`)."""

    def __init__(self, reader, radiograph: Radiograph, pad: SquarePad,
                 blobs: film_extent.BlobResponses | None = None):
        super().__init__(reader)
        self.radiograph, self.pad, self.blobs = radiograph, pad, blobs
        self.spacing, self.spacing_known = pixel_spacing_mm(radiograph)
        self._film: dict | None = None

    def fields(self) -> anatomy.LungFields:
        return self._anatomy(lambda: self.reader._lung_fields(self.radiograph.pixels))

    def film(self) -> dict:
        """The image extent's film cache (made once, by the first finding that needs it)."""
        with self._lock:
            if self._film is None:
                self._film = film_extent.film_cache(self.radiograph.pixels, self.fields(), self.reader.maps_device,
                                                    None if self.blobs is None else self.blobs.as_dict())
            return self._film

    def _finding(self, f: Finding, rows: list[int], gen: Generation, settings: dict) -> Mapped:
        pixels, pad, grid_side = self.radiograph.pixels, self.pad, self.reader.grid
        grid = finding_grid(gen, rows, grid_side)
        h = maps.grids_to_pixels(torch.as_tensor(grid[None], device=self.reader.maps_device), pad)[0].cpu().numpy()
        gates = settings.get("gates", DEFAULT_XRAY_GATES)
        margin = pad.side / grid_side / 2  # half a token cell
        rows, cols = np.ones(h.shape[0], np.float32), np.ones(h.shape[1], np.float32)  # the gate's factors
        side_cols = maps.side_columns(h.shape[1], f.side) if "side" in gates else None
        if side_cols is not None:
            cols *= side_cols
        if "zone" in gates and f.region != "lobe":
            rows *= anatomy.level_rows(h.shape[0], self.fields().side(f.side), f.level, margin)
        if "box" in gates and f.box is not None:
            box_rows, box_cols = maps.box_factors(h.shape, f.box, pad, margin)
            rows *= box_rows
            cols *= box_cols
        m = maps.gated(h, rows, cols)
        side = None if side_cols is None else np.broadcast_to(side_cols[None, :] > 0, h.shape)
        region, info = finding_region(f, m, float(settings.get("threshold", 0.5)), image_extent(settings), lambda own: (
            film_extent.find_on_radiograph(pixels, self.spacing, m, f.kind, self.fields(), self.film())),
            lambda p: [int(p[1]), int(p[0]), 0], side)
        if info["extent"] == "image" and not self.spacing_known:
            info["measured"]["spacing"] = ASSUMED_SPACING
        return Mapped(grid, h, m, region.mask, info)

    def _finish(self, done: list[Mapped]) -> tuple[np.ndarray, list[dict]]:
        if not done:
            return np.zeros(self.radiograph.pixels.shape, np.uint8), []
        # over the whole film: a film's regions span much of it, and reading them through the boxes that hold them
        # took 0.363-0.369 s of maps a film against 0.347-0.357 (six films, four rounds)
        return maps.assign([d.region for d in done], [d.gated for d in done]), [d.info for d in done]


class CTMaps(StudyMaps):
    """A CT's maps on its display grid: the body and lungs (the reader's kept anatomy), each gate's allowed
    voxels, side columns and box, and the image extent's shared volumes made once for its findings."""

    def __init__(self, reader, volume: CTVolume, ms: ModelSlices):
        super().__init__(reader)
        self.volume, self.ms = volume, ms
        self.shared: dict = {}  # what the image extent makes once for the volume's findings (ct_extent.grow_ct)
        self._gates: dict = {}  # gate set -> (body, allowed voxels, their box)
        self._sides: dict = {}  # (gate set, side) -> (side columns, gated box)
        self._profile = None  # the body's voxels per display column: both sides' midline

    def gate(self, gates, side: str) -> tuple:
        """(allowed voxels (on the maps device), the side's columns (None without a side gate), the box outside
        which the gated map is zero) for ``gates`` and a finding's ``side``; each made once per study."""
        with self._lock:
            gates = tuple(gates)
            if gates not in self._gates:
                body, lungs = self._anatomy(lambda: self.reader._ct_anatomy(self.volume))
                allowed = body & lungs if "lung" in gates else body
                allowed_box = extent.bounding_box(allowed) if allowed.any() else None
                device = self.reader.maps_device
                self._gates[gates] = (body, allowed if device.type == "cpu" else torch.as_tensor(allowed, device=device),
                                      allowed_box)
            body, allowed, allowed_box = self._gates[gates]
            if (gates, side) not in self._sides:
                columns = None
                if "side" in gates:
                    self._profile = ct_maps.column_profile(body) if self._profile is None else self._profile
                    columns = ct_maps.side_columns(body, side, self._profile)
                self._sides[gates, side] = (columns, ct_maps.gate_box(allowed_box, columns))
            return (allowed, *self._sides[gates, side])

    def shared_ahead(self, settings: dict) -> Future:
        """What the findings' maps share, made as soon as the study's anatomy is found, beside the model, instead of
        by the first finding that needs it while the others wait (a GPU reader's way): the grounding ``settings``'
        gates (:meth:`gate`: the allowed voxels, copied to the device, both sides' columns and the gated boxes; on a
        200 x 512 x 512 CT the lungs' voxels, their box and the body's column profile took 27 ms on this project's
        2-core CPU, and the copy is 52 MB), and where the image extent is on, the whole volume's coarse planes that
        a large kind's search grows on (:func:`ct_extent.whole_volume_planes`). A gate set the answer's language
        entry changes is made when a finding asks for it, as before; a failure here is logged and met again
        (raised) by the finding."""

        def make() -> None:
            try:
                self.reader._ct_anatomy(self.volume)  # found beside the model (not the findings' wait for it)
                with maps.side_stream():  # the copy to the device not queued behind the model's prefill
                    for side in ("right", "left"):
                        self.gate(settings.get("gates", DEFAULT_CT_GATES), side)
                if image_extent(settings):
                    ct_extent.whole_volume_planes(self.volume.hu, self.shared)
            except Exception:  # noqa: BLE001 (the findings make what they share themselves)
                logger.exception("what a CT's findings share, made beside the model, failed: its findings make it")

        return _AHEAD.submit(make)

    def prepare(self, findings: list[Finding], settings: dict) -> None:
        """The volume's search layers started now, beside the findings' heatmaps, where a finding will search
        the image (a GPU reader started them beside the model). On this project's 2-core CPU the first search
        used to start them: both map threads then waited 0.42 s for them with a core idle; started here, a
        134-slice CT's reading took 3.60 s against 3.79 (median of six interleaved readings)."""
        if image_extent(settings) and any(extent.method_of(f.kind, 3) is not None for f in findings):
            self.reader._ct_layers_future(self.volume)

    def _finding(self, f: Finding, rows: list[int], gen: Generation, settings: dict) -> Mapped:
        volume, device = self.volume, self.reader.maps_device
        allowed, columns, box = self.gate(settings.get("gates", DEFAULT_CT_GATES), f.side)
        g = ct_maps.slice_grids(gen.attention, rows, self.reader.grid, len(self.ms.images))
        h = ct_maps.volume_heatmap(g, self.ms, volume.shape[0], device)
        # the gated map is zero outside the gate's box: gated, peak regions and search on it alone
        if device.type == "cpu":  # gated with numpy (faster than torch on the CPU)
            h = h.numpy()
            gated = ct_maps.gated_map(h, allowed, columns, box)
        else:
            gated = ct_maps.gated_map(h, allowed, None if columns is None else torch.as_tensor(columns, device=device),
                                      box)
            h = maps.to_host_later(h)  # the raw heatmap's copy beside the search
        m, span = gated.map, gated.span
        side = columns[None, None, :] if columns is not None else None
        threshold, from_image = float(settings.get("threshold", 0.5)), image_extent(settings)
        # the attention's own region and the one its extent is searched in: one pass over the gate's box
        peaks = maps.peak_regions(m, (threshold, extent.SEARCH_LEVEL) if from_image else (threshold,), box, span,
                                  gated.peak)
        own, search = peaks.regions[0], peaks.regions[-1]
        region, info = finding_region(f, m, threshold, from_image, lambda own: ct_extent.find_in_ct(
            volume.hu, volume.spacing, m, f.kind, own, self.shared, box, device, search, self._layers(f.kind)),
            lambda p: [int(i) for i in reversed(volume.stored_index(p))], side, box, own)
        return Mapped(g, h.result() if isinstance(h, Future) else h, m, region.mask, info, box, span, region.box,
                      peaks.peak)

    def _layers(self, kind: str) -> ct_extent.CTLayers | None:
        """The volume's search layers (the reader's, found beside the model) for a ``kind`` with an image
        method (None without one: it searches nothing), the time it blocked counted with the anatomy's."""
        if extent.method_of(kind, 3) is None:
            return None
        return self._anatomy(lambda: self.reader._ct_layers(self.volume))

    def _finish(self, done: list[Mapped]) -> tuple[np.ndarray, list[dict]]:
        if not done:
            return zeros(self.volume.shape, np.uint8), []
        labels, planes = maps.assign([d.region for d in done], [d.gated for d in done], [d.support for d in done],
                                     [d.span for d in done], planes=True, boxes=[d.region_box for d in done])
        extras = [{**ct_maps.slice_info_of_planes(self.volume, d.grid, d.gated, p, d.support, d.span, d.peak), **d.info}
                  for d, p in zip(done, planes)]
        return labels, extras


def finding_region(finding: Finding, heat: np.ndarray, threshold: float, from_image: bool, find, point,
                   side: np.ndarray | None = None, support: tuple[slice, ...] | None = None,
                   own: Boxed | None = None) -> tuple[Boxed, dict]:
    """(region, what the finding says about it): the image's region for the finding (``find()``, from
    :mod:`grounding.extent`) when ``from_image`` and the image gives one, with the point it grew from
    (``point(index)``: as the input's [i, j, k]; ``find`` is given the attention's own region), else the
    attention's own (the gated map's region at ``threshold``), with the reason. ``side``: the named side's half
    (safety: an image region never crosses to the other side of the patient; it is cut at the midline like the
    attention); and it must stand for the finding (:func:`keeps_image_region`). ``support``: the box outside
    which ``heat`` is zero (its gate's; :func:`maps.peak_region`); ``own``: the attention's own region, when
    already found. The region comes with a box outside which it is all False (None: empty)."""
    own = Boxed.of(maps.peak_region(heat, threshold, support=support)) if own is None else own
    if from_image:
        try:
            found = find(own)
            region = _cut_to_side(found, side)
            if not region.any():
                reason = "the image's region lies on the other side of the patient"
            elif not keeps_image_region(region.mask, own.mask, finding.kind, region.box, own.box):
                reason = "the image's region lies away from where attention points"
            else:
                return region, {"extent": "image", "measured": {**found.json(), "point": point(found.seed)}}
        except extent.NoExtent as e:
            reason = str(e)
    else:
        reason = "image extent switched off (grounding.json \"extent\": \"attention\")"
    return own, {"extent": "attention", "extent_reason": reason}


def _cut_to_side(found: extent.Extent, side: np.ndarray | None) -> Boxed:
    """The image's region ``found`` within the named ``side`` (a mask that broadcasts to it; None: no side),
    with its bounding box: cut in place on the box the region was grown in, where the search gives it (the
    search's mask is its own), else on a new whole array."""
    if found.box is None:
        return Boxed.of(found.mask if side is None else found.mask & side)
    box = found.box
    if side is not None:
        found.mask[box] &= np.broadcast_to(side, found.mask.shape)[box]
    inside = found.mask[box]
    return Boxed(found.mask, within(box, bounds(inside)) if inside.any() else None)


# when the image's region stands for the finding (chosen on calibration phantoms 20000..20149, never the
# held-out ones): its centre inside the attention's own region, or a quarter of it inside and no more than
# 1.5 times its size; an airspace region under a tenth of the attention's is a speck, not the process
KEEP_OVERLAP, KEEP_LARGEST, KEEP_SMALLEST_AIRSPACE = 0.25, 1.5, 0.1


def keeps_image_region(region: np.ndarray, own: np.ndarray, kind: str, region_box: tuple[slice, ...] | None = None,
                       own_box: tuple[slice, ...] | None = None) -> bool:
    """Whether the image's ``region`` for a finding of ``kind`` stands for it, against the attention's ``own``
    region: it must not move the finding away from where the model looked (a speck beside the lesion, a
    seed on the heart beside an effusion). ``region_box``, ``own_box``: their bounding boxes, when known (both
    or neither; ``own_box`` None: ``own`` is empty)."""
    if region_box is None:  # (voxel counts: a bool sum of a CT volume took 6x as long)
        own_size = np.count_nonzero(own)
    else:
        own_size = 0 if own_box is None else np.count_nonzero(own[own_box])
    if not own_size:
        return True
    box = extent.bounding_box(region) if region_box is None else region_box  # centre and overlap on it only
    size = np.count_nonzero(region[box])
    ratio = size / own_size
    if kind in extent.AIRSPACE and ratio < KEEP_SMALLEST_AIRSPACE:
        return False
    centre = tuple(int(round(c + b.start)) for c, b in zip(centre_of_mass(region[box]), box))
    return bool(own[centre]) or (np.count_nonzero(region[box] & own[box]) >= KEEP_OVERLAP * size and ratio <= KEEP_LARGEST)


def centre_of_mass(mask: np.ndarray) -> tuple[float, ...]:
    """``scipy.ndimage.center_of_mass`` of a non-empty bool ``mask``, from its voxel counts per plane along each
    axis: the same exact integer sums over the same count (scipy multiplies the mask by each axis' float64
    coordinates, a pass and a temporary of eight bytes a voxel per axis), so the same numbers."""
    size = np.count_nonzero(mask)
    out = []
    for axis, n in enumerate(mask.shape):
        counts = np.add.reduce(mask, axis=tuple(a for a in range(mask.ndim) if a != axis), dtype=np.int64)
        out.append(float(np.dot(counts, np.arange(n, dtype=np.int64))) / size)
    return tuple(out)


def image_extent(settings: dict) -> bool:
    """Whether masks take their extent from the image (grounding.json ``"extent": "image"``, the default) or
    stay the attention's region (``"attention"``)."""
    value = settings.get("extent", "image")
    if value not in ("image", "attention"):
        raise ValueError(f"grounding.json: 'extent' must be 'image' or 'attention', got {value!r}")
    return value == "image"


def entry_for(settings: dict, language: str) -> dict:
    """The grounding entry as it applies to an answer in ``language``: its own entry (``calibrate --language
    zh``: ``"zh": {"layers": [3], "threshold": 0.6}``, the attention method kept) over the entry. A model's
    attention can point differently while it writes another language."""
    own = settings.get(language) if language in LANGUAGE_ENTRIES else None
    return {**settings, **own} if isinstance(own, dict) else settings


def recorded_layers(settings: dict) -> list[int]:
    """The layers a generation records for ``settings``: its own and those of its per-language entries."""
    return sorted({layer for lang in ("en", *LANGUAGE_ENTRIES) for layer in entry_for(settings, lang)["layers"]})


def in_language(settings: dict, language: str, gen: Generation) -> tuple[dict, Generation]:
    """:func:`entry_for` ``language``, and the generation restricted to that entry's layers."""
    merged = entry_for(settings, language)
    layers = [layer for layer in merged["layers"] if layer in gen.layers]
    if layers and layers != gen.layers:
        idx = [gen.layers.index(layer) for layer in layers]
        gen = dataclasses.replace(gen, attention=gen.attention[:, idx], layers=layers)
    return merged, gen


def finding_grid(gen: Generation, rows: list[int], grid: int, image: int = 0) -> np.ndarray:
    """(grid, grid) map: attention of the finding's token rows to image ``image``'s tokens.

    Each (token, layer, head) row is scaled to sum 1 over the image's tokens (where the query looked
    *within* the image, whatever share of its attention went to the image), then averaged.
    """
    n = gen.image_tokens_per_image
    if not rows:
        return np.zeros((grid, grid), np.float32)
    a = gen.attention[rows][..., image * n : (image + 1) * n]  # (tokens, layers, heads, n)
    a = a / a.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return a.mean(dim=(0, 1, 2)).reshape(grid, grid).numpy().astype(np.float32)
