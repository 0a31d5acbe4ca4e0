"""Attention maps on the image-token grid -> heatmaps on the original pixels -> one mask per finding.

Geometry. The model sees the radiograph centred in a black square (:func:`xray.pad_to_square`),
resized to its input size; its image tokens tile that square in a ``g x g`` grid (16 x 16 for MedGemma
and the phantom model), token ``(i, j)`` covering rows ``[i, i+1) * side / g`` and columns
``[j, j+1) * side / g`` of the square. A grid map is therefore upsampled (bilinear, cell centres at
``(i + 1/2) * side / g``) to the square's side and the padding is cropped off; the result is on the
original pixel grid, whatever the input size or aspect.

Side gate (safety): a mask on the wrong side of the patient is worse than none. When a finding's text
names the patient's right or left, its heatmap is zeroed on the other half of the image before the
mask is made (PA display: patient right = image columns left of the centre). Bilateral or unsided
findings are not gated. The raw heatmap is kept as well, ungated.

Anatomy and box gates: :class:`reader.Reader` also keeps the heatmap inside the zone the finding names,
a third of that side's lung field as found in the image (:mod:`anatomy`), and inside the box the model
gave for it (MedGemma 1.5 answers localisation questions with ``[y0, x0, y1, x1]`` in 0..1000 of its
input square; :func:`box_factors`), before the mask rule.

Attention's own mask (documented in the README): per finding, the (gated) heatmap is scaled to 0..1 over
the image (min-max); the mask is the 8-connected region around the heatmap's peak where it is at least
``threshold`` (calibrated; 0.5: the half-maximum contour). The reader replaces it by the region the image
gives around the place attention points at (:mod:`extent`) where there is one (:func:`assign`). Where the masks of two findings overlap, a pixel goes to
the finding whose scaled heatmap is larger there. Labels are 1..n in finding order; 0 is background.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from . import components, helper_processes
from ..allocator import zeros
from ..io.xray import SquarePad
from .boxes import Boxed, bounds, union, within


def grid_to_pixels(grid: np.ndarray, pad: SquarePad) -> np.ndarray:
    """Upsample a (g, g) token-grid map to the square and crop the padding: float32 (rows, cols)."""
    return grids_to_pixels(torch.as_tensor(np.asarray(grid, np.float32))[None], pad)[0].numpy()


def grids_to_pixels(grids: torch.Tensor, pad: SquarePad) -> torch.Tensor:
    """:func:`grid_to_pixels` for a stack of grids (n, g, g), on their device: (n, rows, cols) float32.

    Bilinear resampling is one linear resampling along each axis, so on the CPU it is two matrix products with
    the rows' and the columns' weights (:func:`linear_weights`) for the image's own pixels only: the padded
    square is never made and cropped. The same values as ``F.interpolate`` up to float rounding (a padded
    600 x 400 CT: 3x faster; a 2458 x 2048 film: 6x). On a GPU ``F.interpolate`` (TF32 may be switched on for
    matrix products there)."""
    grids = grids.float()
    if grids.device.type != "cpu":
        square = F.interpolate(grids[:, None], size=(pad.side, pad.side), mode="bilinear", align_corners=False)[:, 0]
        return square[:, pad.top : pad.top + pad.rows, pad.left : pad.left + pad.cols].contiguous()
    g_rows, g_cols = grids.shape[-2:]
    rows = linear_weights(g_rows, pad.side, pad.top, pad.rows)
    cols = linear_weights(g_cols, pad.side, pad.left, pad.cols)
    return torch.matmul(torch.matmul(rows, grids), cols.T)


def linear_weights(n_in: int, n_out: int, start: int, count: int) -> torch.Tensor:
    """(count, n_in) float32: the weights of outputs ``start .. start + count`` of ``F.interpolate``'s linear
    resampling of ``n_in`` samples to ``n_out`` (``align_corners=False``: output i reads source position
    (i + 0.5) n_in / n_out - 0.5, clamped at 0, between its two neighbours; the last sample stands alone)."""
    src = ((torch.arange(start, start + count, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp_min(0)
    lo = src.floor().long().clamp_max(n_in - 1)
    hi = (lo + 1).clamp_max(n_in - 1)
    w_hi = (src - lo).float()
    out = torch.zeros(count, n_in)
    at = torch.arange(count)
    out.index_put_((at, lo), 1 - w_hi, accumulate=True)
    out.index_put_((at, hi), w_hi, accumulate=True)
    return out


# A film's gates are each a row factor, a column factor or both (a zone is rows, a side columns, a box both):
# a finding's gate is the outer product of its row and column factors, applied by :func:`gated`.


def side_columns(cols: int, side: str) -> np.ndarray:
    """float32 (cols,): 1 on the image half that shows the patient's ``side`` (PA view), else 0."""
    gate = np.ones(cols, np.float32)
    half = cols // 2
    if side == "right":  # patient right = image left
        gate[half:] = 0
    elif side == "left":
        gate[: cols - half] = 0
    return gate


def box_factors(shape: tuple[int, int], box, pad: SquarePad, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """float32 (rows,) and (cols,): 1 inside the model's box, ``[y0, x0, y1, x1]`` in 0..1000 of its input
    square (the padded square), widened by ``margin`` pixels, on the original pixels; else 0. The box's
    gate is their outer product."""
    y0, x0, y1, x1 = (v / 1000.0 * pad.side for v in box)
    rows = np.arange(shape[0]) + pad.top + 0.5  # pixel centres in square coordinates
    cols = np.arange(shape[1]) + pad.left + 0.5
    return (((rows >= y0 - margin) & (rows <= y1 + margin)).astype(np.float32),
            ((cols >= x0 - margin) & (cols <= x1 + margin)).astype(np.float32))


def gated(heatmap: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """float32 ``heatmap`` (rows, cols) times the gate whose row and column factors (0 or 1) are given: the
    same values as multiplying by the gate image, without making it."""
    out = np.multiply(heatmap, rows[:, None], dtype=np.float32)
    out *= cols[None, :]
    return out


def normalise(heatmap: np.ndarray, at: np.ndarray | None = None, support: tuple[slice, ...] | None = None,
              span: tuple[float, float] | None = None) -> np.ndarray:
    """float32 ``heatmap`` scaled to 0..1 by its own minimum and maximum (zeros when flat); ``at`` (flat
    indices): only those values, scaled by the whole map's range. ``support``: a box outside which the map is
    zero (:func:`support_range`: the same range, from the box's values); ``span``: that range, when known."""
    lo, hi = support_range(heatmap, support) if span is None else span
    values = heatmap if at is None else np.asarray(heatmap).reshape(-1)[at]
    if hi - lo < 1e-12:
        return zeros(values.shape, np.float32)
    out = np.subtract(values, lo, dtype=np.float32)
    out *= np.float32(1.0 / (hi - lo))
    return out


def support_range(heatmap: np.ndarray, support: tuple[slice, ...] | None = None) -> tuple[float, float]:
    """(minimum, maximum) of ``heatmap``; ``support``: a box outside which it is zero (a gated map: its gate's
    box), so that the box's values and that zero give the whole map's range without a pass over it."""
    if support is None:
        return float(heatmap.min()), float(heatmap.max())
    sub = heatmap[support]
    lo, hi = float(sub.min()), float(sub.max())
    if sub.size < heatmap.size:  # the zeros outside the box
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    return lo, hi


def combined_heatmap(heatmaps: list[np.ndarray], shape) -> np.ndarray:
    """Per pixel, the largest of the findings' heatmaps each scaled to 0..1 (zeros without findings)."""
    if not heatmaps:
        return zeros(shape, np.float32)
    return np.max(np.stack([normalise(h) for h in heatmaps]), axis=0)


def peak_region(heatmap: np.ndarray, threshold: float = 0.5, scaled: np.ndarray | None = None,
                support: tuple[slice, ...] | None = None) -> np.ndarray:
    """Bool mask: the connected region around the peak of ``heatmap`` scaled to 0..1, at >= threshold
    (``scaled``: that scaling, when already computed). ``support``: a box outside which ``heatmap`` is zero
    (a gated map): the same region, found on the box alone when the threshold lies above zero (the zeros
    outside are then below it, and the peak is inside)."""
    if scaled is not None:
        peak = np.unravel_index(int(np.argmax(scaled)), scaled.shape)
        if scaled[peak] <= 0:
            return zeros(heatmap.shape, bool)
        return _around_peak(scaled >= threshold, peak)[0]
    return _peak_region(heatmap, threshold, support)[0]


@dataclass
class Peaks:
    """:func:`peak_regions`' answer: a region per threshold, each with its own bounding box (None: empty), and
    the map's peak (its first voxel at the maximum in C order, as ``np.argmax`` finds it; None for a flat map)."""

    regions: list[Boxed]
    peak: tuple[int, ...] | None


def peak_regions(heatmap: np.ndarray, thresholds, support: tuple[slice, ...] | None = None,
                 span: tuple[float, float] | None = None, peak: tuple[int, ...] | None = None) -> Peaks:
    """:func:`peak_region` at each of ``thresholds`` (a finding's own region and the region its extent is
    searched in), in their order: the lowest as :func:`peak_region` finds it, each higher one on the bounding
    box of the one below. The same regions: both hold the same peak, and the higher one's voxels, above
    the lower level and connected to the peak, are all in the lower one; a large gate's box is passed over
    once instead of once a threshold. The peak is found once: the first voxel at the maximum in a box is the
    first in any smaller box that holds it. ``span``: :func:`support_range`, when known; ``peak``: the map's
    first voxel at its maximum, when known (:class:`ct_maps.Gated`)."""
    order = sorted(range(len(thresholds)), key=lambda k: thresholds[k])
    out: list = [None] * len(thresholds)
    lo, hi = support_range(heatmap, support) if span is None else span
    if LEVELS_TOGETHER and len(order) == 2 and helper_processes.running():
        together = _two_levels_together(heatmap, [thresholds[k] for k in order], support, (lo, hi), peak)
        if together is not None:
            (out[order[0]], out[order[1]]), peak = together
            return Peaks(out, peak)
    region, box, peak = _peak_region(heatmap, thresholds[order[0]], support, (lo, hi), peak)
    if box is not None:
        box = within(box, bounds(region[box]))  # the region's own box, within the one labelled
    out[order[0]] = Boxed(region, box)
    for k in order[1:]:
        if box is None:
            out[k] = Boxed(zeros(heatmap.shape, bool), None)
            continue
        sub = heatmap[box]
        local = tuple(p - b.start for p, b in zip(peak, box))
        region, inner = _around_peak(sub >= lo + thresholds[k] * (hi - lo), local)
        mask = zeros(heatmap.shape, bool)
        mask[box] = region
        box = within(box, within(inner, bounds(region[inner])))  # found on what was labelled
        out[k] = Boxed(mask, box)
    return Peaks(out, peak)


# where helper processes run (a GPU reader): a finding's two levels' pieces found side by side, each by a helper
# (the higher level's on the box of everything above it in the gate's box, not on the lower piece's box: the
# same piece, since a piece above the higher level that holds the peak lies in the lower level's piece), instead
# of one after the other (run CK: two calls of 0.06-0.09 s in each CT finding's chain)
LEVELS_TOGETHER = True


def _two_levels_together(heatmap: np.ndarray, levels, support: tuple[slice, ...] | None, span, peak):
    """:func:`peak_regions`' two regions (``levels``: its thresholds, lowest first) found side by side in helper
    processes, and the peak: ((lower, higher) as :class:`Boxed`, peak); None where the one-after-the-other way
    is to be taken (no gate's box, a flat map or one whose levels do not lie above the zeros outside the box)."""
    lo, hi = span
    if support is None or not hi - lo >= 1e-12 or not hi > 0 or not lo + levels[0] * (hi - lo) > 0:
        return None
    sub = heatmap[support]
    local = first_at(sub, hi) if peak is None else tuple(p - b.start for p, b in zip(peak, support))
    started = []
    for t in levels:  # each level's piece started in a helper before the next level's mask is made
        above = sub >= lo + t * (hi - lo)
        box = bounds(above)
        started.append((box, components.component_later(above[box], tuple(p - b.start for p, b in zip(local, box)),
                                                         full=True)))
    regions = []
    for box, piece in started:
        region = piece()
        mask = zeros(heatmap.shape, bool)
        at = within(support, box)
        mask[at] = region
        regions.append(Boxed(mask, within(at, bounds(region))))
    return regions, tuple(b.start + p for b, p in zip(support, local))


def _peak_region(heatmap: np.ndarray, threshold: float, support: tuple[slice, ...] | None,
                 span: tuple[float, float] | None = None, peak: tuple[int, ...] | None = None):
    """(:func:`peak_region`'s region, a box that holds it (None when it is empty), the map's peak (None: flat));
    ``peak``: that peak, when known (its maximum above zero)."""
    # the threshold in the map's own units: no scaled copy of a whole volume
    lo, hi = support_range(heatmap, support) if span is None else span
    if not hi - lo >= 1e-12:
        return zeros(heatmap.shape, bool), None, None
    level = lo + threshold * (hi - lo)
    if support is not None and level > 0 and hi > 0:
        sub = heatmap[support]
        out = zeros(heatmap.shape, bool)
        local = first_at(sub, hi) if peak is None else tuple(p - b.start for p, b in zip(peak, support))
        out[support], inner = _around_peak(sub >= level, local)
        return out, within(support, inner), tuple(b.start + p for b, p in zip(support, local))
    if peak is None or hi <= 0:
        peak = tuple(int(i) for i in np.unravel_index(int(np.argmax(heatmap)), heatmap.shape))
    return (*_around_peak(heatmap >= level, peak), peak)


def first_at(values: np.ndarray, top: float) -> tuple[int, ...]:
    """The index of the first voxel (C order) of ``values`` equal to ``top``, their maximum: argmax's peak,
    found on a bool copy (argmax of a strided float box copies it whole and compares floats; a bool one stops
    at the first True)."""
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(values == top)), values.shape))


def _around_peak(above: np.ndarray, peak: tuple) -> tuple[np.ndarray, tuple[slice, ...]]:
    """(bool mask: the connected piece of ``above`` that holds ``peak``, the box it was labelled on: that of
    everything above)."""
    box = bounds(above)
    out = zeros(above.shape, bool)
    local = tuple(p - b.start for p, b in zip(peak, box))
    out[box] = components.component_at(above[box], local, full=True)  # only where anything is above
    return out, box


def assign(regions: list[np.ndarray], heatmaps: list[np.ndarray], supports: list | None = None,
           spans: list | None = None, planes: bool = False, boxes: list | None = None):
    """uint8 label map of one region per finding (k = 1..n); where regions overlap, the pixel goes to the
    finding whose heatmap, scaled to 0..1, is larger there. ``supports``: each heatmap's box outside which it
    is zero (:func:`support_range`), or None; ``spans``: each heatmap's range, when known. ``planes``: also
    give each label's first and last plane (axis 0; None for a label left with no voxel), read from the
    regions' own voxels: (label map, planes). ``boxes``: each region's box outside which it is False (None:
    empty), when known: the regions are then read, and overlaps settled, within the box that holds them all."""
    out = zeros(regions[0].shape, np.uint8)
    every = tuple(slice(0, n) for n in out.shape)
    where = every if boxes is None else union(boxes)
    if where is None:  # no region has a voxel
        return (out, [None] * len(regions)) if planes else out
    shape = tuple(b.stop - b.start for b in where)
    local = out if where == every else zeros(shape, np.uint8)  # the label map on that box
    flat_local = local.reshape(-1)
    insides = [np.flatnonzero(region[where]) for region in regions]  # C order within the box
    offset = np.array([b.start for b in where])
    for_heat = [np.ravel_multi_index(tuple(c + o for c, o in zip(np.unravel_index(i, shape), offset)), out.shape)
                if where != every else i for i in insides]  # the same voxels' indices in the whole map
    # the scaled values compared where regions overlap are kept for the planes the regions reach alone
    plane = int(np.prod(shape[1:])) if out.ndim > 1 else 1
    first = min((int(i[0]) // plane for i in insides if len(i)), default=0) * plane
    last = max((int(i[-1]) // plane + 1 for i in insides if len(i)), default=0) * plane
    best = np.full(max(last - first, 0), -1.0, np.float32)
    for k, (inside, at, h, support, span) in enumerate(zip(insides, for_heat, heatmaps, supports or [None] * len(regions),
                                                           spans or [None] * len(regions)), start=1):
        scaled = normalise(h, at, support, span)  # on the region's voxels only
        take = scaled > best[inside - first]
        flat_local[inside[take]] = k
        best[inside[take] - first] = scaled[take]
    if local is not out:
        out[where] = local
    if not planes:
        return out
    kept = [inside[flat_local[inside] == k] for k, inside in enumerate(insides, start=1)]  # sorted: C order
    z0 = where[0].start if out.ndim > 1 else 0
    return out, [(z0 + int(i[0]) // plane, z0 + int(i[-1]) // plane) if i.size else None for i in kept]


def label_map(heatmaps: list[np.ndarray], threshold: float = 0.5) -> np.ndarray:
    """uint8 label map of the attention's own masks: finding k (1-based) where its peak region is and its
    scaled heatmap is largest."""
    if not heatmaps:
        raise ValueError("label_map needs the image shape: use empty_label_map for no findings")
    return assign([peak_region(h, threshold) for h in heatmaps], heatmaps)


_POOL: ThreadPoolExecutor | None = None
MAP_THREADS = min(16, os.cpu_count() or 1)
_LOCAL = threading.local()
# the priority of the threads' own streams (torch's: 0 the default stream's; -1 higher). At -1 a finding's few
# kernels go before the decode steps queued on the default stream whenever both wait for the card: where the
# findings' chains, not the decode, end a CT reading (an H200: fast_path.md, run DK). prefill_ab.py's
# ``maps-urgent``; the library's stays 0 until measured there
SIDE_PRIORITY = 0


def side_stream():
    """The calling thread's own CUDA stream (made once per thread and :data:`SIDE_PRIORITY`: a pool thread's,
    or the thread that makes a batch's inputs), so that the maps' GPU work of one batch does not queue between
    the decode steps of another, which run on the default stream; a no-op without CUDA. Each thread makes, uses
    and copies back its tensors on its one stream."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return contextlib.nullcontext()
    made = _LOCAL.__dict__.setdefault("streams", {})
    if SIDE_PRIORITY not in made:
        made[SIDE_PRIORITY] = torch.cuda.Stream(priority=SIDE_PRIORITY)
    return torch.cuda.stream(made[SIDE_PRIORITY])


_COPIER: ThreadPoolExecutor | None = None


def to_host_later(t: torch.Tensor) -> Future:
    """A future of ``t`` (a GPU tensor) as a numpy array, copied by a thread of its own after what the calling
    thread's stream has queued (the tensor's values): the caller goes on meanwhile (a CT finding's 200 MB raw
    heatmap, beside its search). A CPU tensor is given at once."""
    global _COPIER
    if not t.is_cuda:
        done: Future = Future()
        done.set_result(t.numpy())
        return done
    made = torch.cuda.Event()
    made.record()
    if _COPIER is None:
        _COPIER = ThreadPoolExecutor(2, thread_name_prefix="copies")

    def copy():
        made.synchronize()
        with side_stream():  # the copier's own stream: not queued behind the decode steps on the default one
            return t.cpu().numpy()  # (a blocking copy: done before the tensor can be freed)

    return _COPIER.submit(copy)


def _call(fn, args):
    with side_stream():
        return fn(*args)


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(MAP_THREADS, thread_name_prefix="maps")
    return _POOL


def start(fn, *args) -> Future | None:
    """``fn(*args)`` started in the shared pool, on its thread's own CUDA stream (e.g. a finding's maps while
    the model still writes the rest of its answer); None where the maps do not use the pool (one thread)."""
    if MAP_THREADS == 1:
        return None
    return _pool().submit(_call, fn, args)


def each(fn, *items, cost: list | None = None) -> list:
    """``[fn(*args) for args in zip(*items)]``, the calls run side by side in a shared thread pool (a
    reading's findings, or a batch's studies: their map and region work is numpy, scipy and torch code that
    releases the GIL), each pool thread on its own CUDA stream (:func:`side_stream`). One item, one CPU, or
    a call from inside the pool (it would wait on itself) runs in the calling thread. ``cost``: each call's
    expected work (any comparable numbers): the pool starts the costliest first, so that fewer threads than
    calls do not end on one long call started last; the results keep the items' order."""
    args = list(zip(*items))
    if len(args) <= 1 or MAP_THREADS == 1 or threading.current_thread().name.startswith("maps"):
        return [fn(*a) for a in args]
    pool = _pool()
    order = range(len(args)) if cost is None else sorted(range(len(args)), key=lambda i: cost[i], reverse=True)
    futures = {i: pool.submit(_call, fn, args[i]) for i in order}
    return [futures[i].result() for i in range(len(args))]
