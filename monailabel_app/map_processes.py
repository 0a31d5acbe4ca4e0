"""A batch's film maps made in worker processes, beside the next batch's decode.

``read_many`` on a GPU makes one batch's maps while the next batch generates. Made by threads of the
serving process, the maps share its interpreter with the decode loop and with each other: on the H200's
16 cores, 8 or 16 map threads finished 256 films' maps at about 5 films a second, whatever their number,
and slowed the next batch's generation twofold (``bench/results/fast_path.md``, runs L, O, P). Worker
processes each have their own interpreter and memory map.

Each worker holds a model-less :class:`~monailabel_app.reader.Reader` (the grounding settings and token
grid; :meth:`Reader.for_maps`) and makes a film's reading from its generation with :meth:`Reader.remap` on
the CPU: the same code and numbers as the serving process's CPU maps (within the documented tolerance of
the device maps when the serving process maps on its GPU). The film goes to the worker by pipe (5 MB); the
image-sized arrays come back in one block of shared memory per reading (:func:`_pack`, :mod:`shared_blocks`:
freeing torch's shared tensors had held the serving process's interpreter lock, a quarter of its time in a
curation run on the H200; the blocks are used again), and the caller puts back the study and the generation
it already has.

``MEDGEMMA_MAP_PROCESSES``: how many workers (0: threads in the serving process, as without a GPU). The
default: on a GPU with at least 4 cores, one fewer than the cores (at most 15); else 0.
``MEDGEMMA_MAP_PROCESS_NICE``: how much lower the workers' scheduling priority is than the serving
process's (``nice``; 0, the default: the same), so that its decode loop gets a core when it wakes among
busy workers.
``MEDGEMMA_MAP_PROCESS_DEVICE``: where the workers upsample heatmaps and filter the film's blobs: ``cpu``
(the default) or ``cuda`` (the serving process's GPU: a CUDA context of about 0.5 GB per worker, and the
GPU's maps, equal to the CPU's within the device maps' tolerance). ``MEDGEMMA_BLOBS_AHEAD=0``: the workers
filter the films' blobs themselves instead of getting them made for the whole batch on the GPU
(:func:`film_extent.film_blob_responses`).
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .grounding import shared_blocks

ENV = "MEDGEMMA_MAP_PROCESSES"
DEVICE_ENV = "MEDGEMMA_MAP_PROCESS_DEVICE"
BLOBS_AHEAD_ENV = "MEDGEMMA_BLOBS_AHEAD"
NICE_ENV = "MEDGEMMA_MAP_PROCESS_NICE"
DEFAULT_NICE = 0
SHARED_FIELDS = ("heatmaps", "mask_maps", "model_inputs", "labels")  # a film reading's image-sized arrays


def workers_for(device: torch.device, cores: int | None = None) -> int:
    """How many map processes a reader on ``device`` uses (``MEDGEMMA_MAP_PROCESSES`` overrides)."""
    wanted = os.environ.get(ENV, "").strip()
    if wanted:
        try:
            return max(0, int(wanted))
        except ValueError:
            raise ValueError(f"{ENV} must be a whole number of processes, got {wanted!r}") from None
    cores = cores or os.cpu_count() or 1
    return min(15, cores - 1) if device.type == "cuda" and cores >= 4 else 0


def device_for(device: torch.device) -> torch.device:
    """Where the workers of a reader on ``device`` make their maps (``MEDGEMMA_MAP_PROCESS_DEVICE``)."""
    wanted = os.environ.get(DEVICE_ENV, "cpu").strip().lower() or "cpu"
    if wanted not in ("cpu", "cuda"):
        raise ValueError(f"{DEVICE_ENV} must be cpu or cuda, got {wanted!r}")
    return device if wanted == "cuda" and device.type == "cuda" else torch.device("cpu")


def niceness() -> int:
    """How much lower the workers' priority is (``MEDGEMMA_MAP_PROCESS_NICE``, 0 to 19)."""
    wanted = os.environ.get(NICE_ENV, "").strip()
    try:
        value = int(wanted) if wanted else DEFAULT_NICE
    except ValueError:
        raise ValueError(f"{NICE_ENV} must be a whole number from 0 to 19, got {wanted!r}") from None
    if not 0 <= value <= 19:
        raise ValueError(f"{NICE_ENV} must be a whole number from 0 to 19, got {wanted!r}")
    return value


def blobs_ahead() -> bool:
    """Whether a GPU reader makes its batches' film blob filters for the workers (``MEDGEMMA_BLOBS_AHEAD``,
    1 by default)."""
    wanted = os.environ.get(BLOBS_AHEAD_ENV, "1").strip() or "1"
    if wanted not in ("0", "1"):
        raise ValueError(f"{BLOBS_AHEAD_ENV} must be 0 or 1, got {wanted!r}")
    return wanted == "1"


class MapProcesses:
    """Worker processes that make film readings from generations (spawned, so CUDA never crosses a fork)."""

    def __init__(self, info, grid: int, workers: int, device: torch.device = torch.device("cpu")):
        self.workers, self.device = workers, device
        context = multiprocessing.get_context("spawn")
        self._returned = shared_blocks.Returned(context.Queue(), keep=workers)  # readings' blocks, used again
        atexit.register(self._returned.close, True)  # (else the resource tracker removes them, with a warning)
        self._pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start,
                                         initargs=(info, grid, str(device), niceness(), self._returned.queue))

    def remap(self, study, gen, blobs=None) -> Future:
        """A future of ``(reading, seconds)``: the film's reading from ``gen``, its study and generation
        put back, and the seconds its maps took in the worker. ``blobs``: the film's blob filter responses
        made ahead (:func:`film_extent.film_blob_responses`, best in shared memory: :func:`shared_empty`)."""
        done: Future = Future()

        def back(f: Future) -> None:
            try:
                reading, block, seconds = f.result()
                reading.study, reading.generation = study, gen
                done.set_result((_unpack(reading, block, self._returned), seconds))
            except BaseException as e:  # noqa: BLE001 (the caller's future carries it)
                done.set_exception(e)

        self._pool.submit(_remap, study, gen, blobs).add_done_callback(back)
        return done

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._returned.close()


_READER = None
_RETURNED = None  # the queue of blocks the serving process gives back (shared_blocks.Returned)


def _start(info, grid: int, device: str = "cpu", nice: int = 0, returned=None) -> None:
    """Worker start: ``nice`` steps below the serving process's priority, one map thread (the workers are the
    parallelism), a reader without a model that maps on ``device``, and ``returned``: the blocks given back."""
    global _READER, _RETURNED
    _RETURNED = returned
    from . import allocator
    from .grounding import maps
    from .reader import Reader

    if nice:
        os.nice(nice)
    allocator.keep_freed_memory()  # as in the serving process: a film's arrays reuse mapped pages
    torch.set_num_threads(1)
    maps.MAP_THREADS = 1
    _READER = Reader.for_maps(info, grid, device)


def _remap(study, gen, blobs=None):
    t0 = time.perf_counter()
    reading = _READER.remap(study, gen, blobs=blobs)
    seconds = time.perf_counter() - t0
    reading.study, reading.generation = None, None  # the caller has them
    return (*_pack(reading, _RETURNED), seconds)


def _each_array(reading, convert):
    """``reading`` with ``convert`` applied to each of its :data:`SHARED_FIELDS` arrays (in place)."""
    for name in SHARED_FIELDS:
        value = getattr(reading, name)
        setattr(reading, name, [convert(v) for v in value] if isinstance(value, list) else convert(value))
    return reading


ALIGN = 64  # bytes: each array of a block starts on a cache line


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


@dataclass(frozen=True)
class _Place:
    """Where one of a reading's arrays lies in its block."""

    offset: int
    shape: tuple
    dtype: str


def _pack(reading, returned=None) -> tuple:
    """Worker side: ``(reading, block)``, the reading's :data:`SHARED_FIELDS` arrays copied into one block
    of shared memory (:func:`shared_blocks.take` from ``returned``, the queue of blocks given back), each
    replaced by its :class:`_Place`, and ``block`` the block's (name, capacity); or ``(reading, None)``, the
    arrays left to go by pipe, where there is no shared memory (none on this system, or too little left)."""
    arrays = []
    _each_array(reading, lambda a: arrays.append(a) or a)
    arrays = [a for a in arrays if isinstance(a, np.ndarray) and a.nbytes and not a.dtype.hasobject]
    size = sum(_aligned(a.nbytes) for a in arrays)
    made = shared_blocks.take(returned, size) if size else None
    if made is None:
        return reading, None
    name, capacity, block = made
    offset = 0

    def put(a):
        nonlocal offset
        if not any(a is b for b in arrays):
            return a
        np.frombuffer(block, a.dtype, a.size, offset).reshape(a.shape)[...] = a
        place, offset = _Place(offset, a.shape, a.dtype.str), offset + _aligned(a.nbytes)
        return place

    try:
        _each_array(reading, put)
    finally:
        block.close()
    return reading, (name, capacity)


def _unpack(reading, block, returned: shared_blocks.Returned | None = None):
    """Caller side: ``reading`` from :func:`_pack` with its arrays back, views of the block mapped here. The
    block goes back to ``returned`` when the last of them goes; without it, it is removed at once (its
    memory goes with the arrays)."""
    if block is None:
        return reading
    if returned is not None:
        mapped = returned.lend(*block)
    else:
        mapped = shared_blocks.mapped(*block)
        shared_blocks.remove(block[0])
    return _each_array(reading, lambda p: np.frombuffer(mapped, np.dtype(p.dtype), int(np.prod(p.shape)), p.offset)
                       .reshape(p.shape) if isinstance(p, _Place) else p)


def shared_empty(shape, dtype=torch.float32) -> torch.Tensor:
    """An empty CPU tensor in shared memory, which reaches a worker as a handle instead of its bytes by
    pipe; a plain one where shared memory is full (a small /dev/shm). Made in shared memory directly: an
    empty tensor moved there by ``share_memory_`` is written twice (27 against 6 ms for a film's 13 MB here)."""
    size = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
    try:
        return torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(size), 0, tuple(shape))
    except (AttributeError, RuntimeError):  # (a torch without it; no shared memory left)
        return torch.empty(shape, dtype=dtype)
