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
image-sized arrays come back in one block of shared memory per reading (:func:`_pack`), and the caller puts
back the study and the generation it already has.

Who frees a reading's memory matters: a 2048 x 2458 film's reading with three findings is about 130 MB, and
freeing it takes the kernel 20-30 ms, paid by whichever process lets go of it last: the serving process (the
worker lets go as soon as it has sent the reading). Torch's shared tensors are freed with the interpreter's lock held: on the
H200 that was a quarter of the serving process's time in a curation run, the decode loop waiting on it.
This module's blocks are ``mmap`` objects, whose release lets the other threads run (:func:`_attached`).

``MEDGEMMA_MAP_PROCESSES``: how many workers (0: threads in the serving process, as without a GPU). The
default: on a GPU with at least 4 cores, one fewer than the cores (at most 15); else 0.
``MEDGEMMA_MAP_PROCESS_NICE``: how much lower the workers' scheduling priority is than the serving
process's (``nice``; 0: the same), so that its decode loop gets a core when it wakes among busy workers.
``MEDGEMMA_MAP_PROCESS_DEVICE``: where the workers upsample heatmaps and filter the film's blobs: ``cpu``
(the default) or ``cuda`` (the serving process's GPU: a CUDA context of about 0.5 GB per worker, and the
GPU's maps, equal to the CPU's within the device maps' tolerance). ``MEDGEMMA_BLOBS_AHEAD=0``: the workers
filter the films' blobs themselves instead of getting them made for the whole batch on the GPU
(:func:`extent.film_blob_responses`).
"""

from __future__ import annotations

import mmap
import multiprocessing
import os
import secrets
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import resource_tracker

import numpy as np
import torch

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
        self._pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_start, initargs=(info, grid, str(device), niceness()))

    def remap(self, study, gen, blobs=None) -> Future:
        """A future of ``(reading, seconds)``: the film's reading from ``gen``, its study and generation
        put back, and the seconds its maps took in the worker. ``blobs``: the film's blob filter responses
        made ahead (:func:`extent.film_blob_responses`, best in shared memory: :func:`shared_empty`)."""
        done: Future = Future()

        def back(f: Future) -> None:
            try:
                reading, block, seconds = f.result()
                reading.study, reading.generation = study, gen
                done.set_result((_unpack(reading, block), seconds))
            except BaseException as e:  # noqa: BLE001 (the caller's future carries it)
                done.set_exception(e)

        self._pool.submit(_remap, study, gen, blobs).add_done_callback(back)
        return done

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


_READER = None


def _start(info, grid: int, device: str = "cpu", nice: int = 0) -> None:
    """Worker start: ``nice`` steps below the serving process's priority, one map thread (the workers are the
    parallelism) and a reader without a model that maps on ``device``."""
    global _READER
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
    return (*_pack(reading), seconds)


def _each_array(reading, convert):
    """``reading`` with ``convert`` applied to each of its :data:`SHARED_FIELDS` arrays (in place)."""
    for name in SHARED_FIELDS:
        value = getattr(reading, name)
        setattr(reading, name, [convert(v) for v in value] if isinstance(value, list) else convert(value))
    return reading


SHM_DIR = "/dev/shm"  # where Linux keeps POSIX shared memory
ALIGN = 64  # bytes: each array of a block starts on a cache line


@dataclass(frozen=True)
class _Place:
    """Where one of a reading's arrays lies in its block."""

    offset: int
    shape: tuple
    dtype: str


def _pack(reading) -> tuple:
    """Worker side: ``(reading, block)``, the reading's :data:`SHARED_FIELDS` arrays copied into one new
    block of shared memory, each replaced by its :class:`_Place`, and ``block`` the block's (name, size); or
    ``(reading, None)``, the arrays left to go by pipe, where there is no shared memory (none on this system,
    or too little left). The worker closes its mapping at once; the block lives on by its name until the
    caller takes it (:func:`_unpack`), or until the processes' resource tracker removes it at exit."""
    arrays = []
    _each_array(reading, lambda a: arrays.append(a) or a)
    arrays = [a for a in arrays if isinstance(a, np.ndarray) and a.nbytes and not a.dtype.hasobject]
    size = sum(-(-a.nbytes // ALIGN) * ALIGN for a in arrays)
    made = _new_block(size) if size else None
    if made is None:
        return reading, None
    name, block = made
    offset = 0

    def put(a):
        nonlocal offset
        if not any(a is b for b in arrays):
            return a
        np.frombuffer(block, a.dtype, a.size, offset).reshape(a.shape)[...] = a
        place, offset = _Place(offset, a.shape, a.dtype.str), offset + -(-a.nbytes // ALIGN) * ALIGN
        return place

    try:
        _each_array(reading, put)
    finally:
        block.close()
    return reading, (name, size)


def _new_block(size: int) -> tuple[str, mmap.mmap] | None:
    """(name, mapping) of a new block of ``size`` bytes of shared memory, its pages reserved now: a block
    only sized (as ``multiprocessing.shared_memory`` makes them) kills the process that writes past what
    /dev/shm holds (SIGBUS; Docker gives containers 64 MB by default). None where it does not fit. The block
    is registered with the processes' resource tracker, which removes it at exit if no one has."""
    if not os.path.isdir(SHM_DIR):
        return None
    name = f"medgemma-{os.getpid()}-{secrets.token_hex(8)}"
    path = os.path.join(SHM_DIR, name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
        block = mmap.mmap(fd, size)
    except OSError:  # no room left in shared memory
        os.unlink(path)
        return None
    finally:
        os.close(fd)
    resource_tracker.register("/" + name, "shared_memory")
    return name, block


def _unpack(reading, block):
    """Caller side: ``reading`` from :func:`_pack` with its arrays back, views of the block mapped here."""
    if block is None:
        return reading
    mapped = _attached(*block)
    return _each_array(reading, lambda p: np.frombuffer(mapped, np.dtype(p.dtype), int(np.prod(p.shape)), p.offset)
                       .reshape(p.shape) if isinstance(p, _Place) else p)


def _attached(name: str, size: int) -> mmap.mmap:
    """The block ``name`` mapped here and its name removed (no other process needs it): its memory goes when
    the last array on the mapping goes. The mapping is an ``mmap`` object, and its release (the kernel freeing
    the block's pages, 20-30 ms for a large film's reading) lets the other threads of this process run, where
    a torch shared tensor's holds the interpreter's lock."""
    path = os.path.join(SHM_DIR, name)
    fd = os.open(path, os.O_RDWR)
    try:
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)
        os.unlink(path)
        resource_tracker.unregister("/" + name, "shared_memory")  # registered by the worker (_new_block)


def shared_empty(shape, dtype=torch.float32) -> torch.Tensor:
    """An empty CPU tensor in shared memory, which reaches a worker as a handle instead of its bytes by
    pipe; a plain one where shared memory is full (a small /dev/shm). Made in shared memory directly: an
    empty tensor moved there by ``share_memory_`` is written twice (27 against 6 ms for a film's 13 MB here)."""
    size = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
    try:
        return torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(size), 0, tuple(shape))
    except (AttributeError, RuntimeError):  # (a torch without it; no shared memory left)
        return torch.empty(shape, dtype=dtype)
