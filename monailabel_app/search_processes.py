"""A CT's findings' image-extent searches (:func:`extent.find_in_ct`) in worker processes.

In the map threads a CT's searches share the serving process's interpreter with each other and with the
decode loop: on the H200's host (16 cores) three searches took 5.5-6.8 s one after another, 3.7-4.6 s in
three threads and 3.0-3.7 s in three warm processes (``bench/fast_path.py --only searches``), and searches
made in threads while the model still wrote slowed its decode from 3.7 to 9.5 ms a token. A worker holds no
model: it searches with numpy and scipy on its own cores, and the serving process's map thread only waits.

The study's HU go to one block of shared memory per study (:class:`Volume`, made by the first finding that
searches and removed with the study's maps); each finding's gated map goes in a block of its own, as the
box outside which it is zero (its gate's), and the attention's own region by pipe as its box. The region
found comes back as its box. A worker searches with a cache of its own (the findings' shared coarse planes
are made once per worker) and smooths on the CPU: the same regions as the threads' (the GPU's smoothing is
scipy's bit for bit).

``MEDGEMMA_CT_SEARCH_PROCESSES``: how many workers (0: the searches in the map threads). The default: on a
GPU with at least 8 cores, 4 (a CT's findings are a few); else 0 (without a GPU the cores are the model's).
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import weakref
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

from . import shared_blocks
from .grounding import extent

ENV = "MEDGEMMA_CT_SEARCH_PROCESSES"
DEFAULT_WORKERS = 4
KEPT_VOLUMES = 2  # studies' HU a worker keeps mapped (a study being read, and the one before)


def workers_for(device: torch.device, cores: int | None = None) -> int:
    """How many search processes a reader mapping on ``device`` uses (``MEDGEMMA_CT_SEARCH_PROCESSES``
    overrides)."""
    wanted = os.environ.get(ENV, "").strip()
    if wanted:
        try:
            return max(0, int(wanted))
        except ValueError:
            raise ValueError(f"{ENV} must be a whole number of processes, got {wanted!r}") from None
    cores = cores or os.cpu_count() or 1
    return DEFAULT_WORKERS if device.type == "cuda" and cores >= 8 else 0


class SearchProcesses:
    """Worker processes that search CT volumes (spawned: CUDA never crosses a fork)."""

    def __init__(self, workers: int):
        self.workers = workers
        self._pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_start)

    def volume(self, hu: np.ndarray) -> Volume | None:
        """The study's HU in a block of shared memory (None where shared memory is full: the caller searches
        in its own threads)."""
        return Volume.of(hu)

    def find(self, volume: Volume, spacing, heat: np.ndarray, kind: str, near: np.ndarray | None,
             support: tuple[slice, ...] | None) -> extent.Extent:
        """:func:`extent.find_in_ct` of the study in ``volume`` in a worker (the caller waits); raises its
        :class:`extent.NoExtent`."""
        support = support or tuple(slice(0, n) for n in heat.shape)
        block = _put(heat[support])
        if block is None:
            raise MemoryError("no shared memory for the gated map")
        near_box = None if near is None or not near.any() else extent.bounding_box(near)
        near_part = None if near_box is None else np.packbits(near[near_box])
        try:
            kept = self._pool.submit(_search, volume.ref, tuple(float(s) for s in spacing), kind, block[:3],
                                     support, near_box, near_part).result()
        finally:
            shared_blocks.remove(block[0])
        if kept[0] == "none":
            raise extent.NoExtent(kept[1])
        _, box, bits, diameter, size, seed, method = kept
        mask = np.zeros(heat.shape, bool)
        if box is not None:
            shape = tuple(b.stop - b.start for b in box)
            mask[box] = np.unpackbits(bits, count=int(np.prod(shape))).reshape(shape).view(bool)
        return extent.Extent(mask, diameter, size, seed, method)

    def warm(self) -> None:
        """Start every worker (the imports) and let each search a small phantom CT, so that the first study's
        searches find them ready."""
        from .ct_phantoms import make_ct_phantom, phantom_volume

        ph = make_ct_phantom(4)
        vol = phantom_volume(ph)
        grid = np.indices(vol.shape)
        centre = np.argwhere(ph.lesions[0].mask).mean(axis=0)
        heat = np.exp(-sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, vol.spacing)) / 450.0)
        heat = heat.astype(np.float32)
        volume = self.volume(vol.hu)
        if volume is None:
            return
        waits = [threading.Thread(target=self._quietly, args=(volume, vol.spacing, heat, ph.lesions[0].kind))
                 for _ in range(self.workers)]
        for t in waits:
            t.start()
        for t in waits:
            t.join()

    def _quietly(self, *args) -> None:
        try:
            self.find(*args, None, None)
        except extent.NoExtent:
            pass

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class Volume:
    """A study's HU in a block of shared memory, removed when this goes (the study's maps are done)."""

    def __init__(self, name: str, shape: tuple, dtype: str):
        self.ref = (name, shape, dtype)
        weakref.finalize(self, shared_blocks.remove, name)  # (also at exit)

    @classmethod
    def of(cls, hu: np.ndarray) -> Volume | None:
        block = _put(hu)
        return None if block is None else cls(*block[:3])


def _put(a: np.ndarray) -> tuple[str, tuple, str, object] | None:
    """(name, shape, dtype, mapping) of a new block holding a copy of ``a``; None where it does not fit."""
    a = np.asarray(a)
    made = shared_blocks.new(max(1, a.nbytes))
    if made is None:
        return None
    name, block = made
    np.copyto(np.frombuffer(block, a.dtype, a.size).reshape(a.shape), a)
    return name, a.shape, a.dtype.str, block


_VOLUMES: OrderedDict = OrderedDict()  # name -> (mapping, array): the studies a worker has mapped


def _start() -> None:
    from . import allocator

    allocator.keep_freed_memory()  # as in the serving process: a search's arrays reuse mapped pages
    torch.set_num_threads(1)


def _view(ref) -> tuple[object, np.ndarray]:
    name, shape, dtype = ref
    size = max(1, int(np.prod(shape)) * np.dtype(dtype).itemsize)
    block = shared_blocks.mapped(name, size)
    return block, np.frombuffer(block, np.dtype(dtype), int(np.prod(shape))).reshape(shape)


def _volume(ref) -> np.ndarray:
    name = ref[0]
    if name not in _VOLUMES:
        _VOLUMES[name] = _view(ref)
        while len(_VOLUMES) > KEPT_VOLUMES:
            _VOLUMES.popitem(last=False)  # (its mapping goes with its last array)
    _VOLUMES.move_to_end(name)
    return _VOLUMES[name][1]


def _search(volume_ref, spacing, kind, heat_ref, support, near_box, near_part):
    """Worker side: the search, its region as (box, packed bits), or ("none", reason)."""
    hu = _volume(volume_ref)
    heat = np.zeros(hu.shape, np.float32)  # untouched pages: only the support box is written
    block, part = _view(heat_ref)
    heat[support] = part
    del part, block
    near = None
    if near_box is not None:
        near = np.zeros(hu.shape, bool)
        shape = tuple(b.stop - b.start for b in near_box)
        near[near_box] = np.unpackbits(near_part, count=int(np.prod(shape))).reshape(shape).view(bool)
    try:
        found = extent.find_in_ct(hu, spacing, heat, kind, near, {}, support)
    except extent.NoExtent as e:
        return "none", str(e)
    box = extent.bounding_box(found.mask) if found.mask.any() else None
    bits = None if box is None else np.packbits(found.mask[box])
    return "found", box, bits, found.diameter_mm, found.size_mm, found.seed, found.method
