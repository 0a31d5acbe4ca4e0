"""Labels and distances of large 3-D masks computed in helper processes, so that the calling thread lets the
interpreter go while they run; and the lung territory, plane by plane, in slabs over several helpers at once
(:func:`in_slabs`).

cc3d's labelling (:func:`components.label`) and edt's distance transform (:func:`distances.inside`) hold the
interpreter's lock for their whole call: beside a 0.4 s cc3d call a Python loop in another thread ran 6 % of
its speed, beside a 1.4 s edt call 2 %. A CT's findings are searched in threads, one per finding, beside the
decode loop on a GPU; on this project's CPU these calls are 1.7 of a real CT's 2.8 s of maps that hold the
lock, so the searches and the decode loop took turns through them. A helper has its own interpreter: the
calling thread copies the mask into shared memory, waits on a socket (the lock let go) and copies the answer
out. The helper runs the same function of the same library: the same numbers.

``MEDGEMMA_HELPER_PROCESSES``: how many helpers (0: every call stays in its thread). The default: on a GPU
reader with at least 4 cores, half of them up to :data:`DEFAULT_HELPERS`; else 0 (on 2 cores the calls have no
core to go to).
Masks under :data:`MIN_VOXELS` stay in the calling thread (a few milliseconds). A helper that
fails or dies has its call made in the calling thread, and a dead one is replaced; the caller sees no
difference but the time.
"""

from __future__ import annotations

import atexit
import importlib
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection

import numpy as np

from . import shared_blocks

ENV = "MEDGEMMA_HELPER_PROCESSES"
# a CT's searches run in three threads, its anatomy in one, each territory in slabs over the helpers: on the
# H200's 16 cores 8 helpers gave the CT in 4.05-4.19 s, 4 in 4.44-4.67 s (runs AZ, BC)
DEFAULT_HELPERS = 8
# below this a call stays in its thread: edt and cc3d hold the interpreter's lock throughout, about 4 ms at
# 2^16 voxels on the H200's host (2^18: 14-18 ms, bench/gil_hold.py), while a helper's round trip is a
# fraction of a millisecond plus the copies
MIN_VOXELS = 1 << 16
SLAB_VOXELS = 1 << 18  # the territory's slabs are at least this many voxels (a slab per helper up to that)
# what each call gives back, per voxel
OUT_DTYPES = {"label": np.uint32, "component": np.bool_, "inside": np.float32, "territory": np.bool_}
# where monailabel_app is imported from
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def helpers_for(device, cores: int | None = None) -> int:
    """How many helpers a reader mapping on ``device`` (a torch.device) uses (``MEDGEMMA_HELPER_PROCESSES``
    overrides)."""
    wanted = os.environ.get(ENV, "").strip()
    if wanted:
        try:
            value = int(wanted)
        except ValueError:
            value = -1
        if not 0 <= value <= 64:
            raise ValueError(f"{ENV} must be a whole number of processes from 0 to 64, got {wanted!r}")
        return value
    cores = cores or os.cpu_count() or 1
    return min(DEFAULT_HELPERS, cores // 2) if device.type == "cuda" and cores >= 4 else 0


class _Helper:
    """One helper process, its socket, and the two blocks of shared memory its calls go through."""

    def __init__(self):
        mine, theirs = socket.socketpair()
        code = (f"import sys; sys.path.insert(0, {ROOT!r}); "
                "from monailabel_app.grounding.helper_processes import serve; serve(int(sys.argv[1]))")
        self.process = subprocess.Popen([sys.executable, "-c", code, str(theirs.fileno())], pass_fds=[theirs.fileno()],
                                        stdin=subprocess.DEVNULL)
        theirs.close()
        self.conn = Connection(mine.detach())
        self.blocks: dict[str, tuple[str, int, object]] = {}  # "in" / "out" -> (name, capacity, mapping)

    def _block(self, which: str, size: int):
        held = self.blocks.get(which)
        if held is not None and held[1] >= size:
            return held
        if held is not None:
            self._drop(which)
        capacity = max(size, 1 << 20)
        made = shared_blocks.new(capacity + capacity // 2)  # room to grow before the next block
        if made is None:
            raise OSError("no shared memory for a helper's block")
        _count("blocks_made", 1)
        _count("block_bytes", capacity + capacity // 2)
        self.blocks[which] = (made[0], capacity + capacity // 2, made[1])
        return self.blocks[which]

    def _drop(self, which: str) -> None:
        name, _, mapping = self.blocks.pop(which)
        mapping.close()
        shared_blocks.remove(name)

    def run(self, op: str, mask: np.ndarray, args: tuple):
        """(result, extra) of ``op`` on ``mask`` in the helper; raises on any failure there."""
        out_dtype = np.dtype(OUT_DTYPES[op])
        name_in, cap_in, block_in = self._block("in", mask.size)
        name_out, cap_out, block_out = self._block("out", mask.size * out_dtype.itemsize)
        np.frombuffer(block_in, np.bool_, mask.size).reshape(mask.shape)[...] = mask
        self.conn.send((op, mask.shape, args, name_in, cap_in, name_out, cap_out))
        status, value, *seconds = self.conn.recv()  # an error's answer has no seconds
        if status != "ok":
            raise RuntimeError(f"helper process: {value}")
        _spent(op, seconds[0])
        return np.frombuffer(block_out, out_dtype, mask.size).reshape(mask.shape).copy(), value

    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self) -> None:
        try:
            self.conn.close()
        except OSError:
            pass
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for which in list(self.blocks):
            self._drop(which)


class _Pool:
    def __init__(self):
        self.owner = os.getpid()  # a forked child gets a pool of its own (its parent's helpers are not its)
        self.idle: queue.Queue[_Helper] = queue.Queue()
        self.count = 0
        self.served = 0  # calls answered by a helper (tests, benchmarks)
        self.busy = 0  # calls under way in a helper
        self.blocks_made = 0  # shared blocks made for the helpers' calls, and their bytes (benchmarks)
        self.block_bytes = 0
        self.computing: dict[str, list] = {}  # op -> [calls, seconds the helpers computed them] (benchmarks)
        self.lock = threading.Lock()

    def grow(self, count: int) -> None:
        with self.lock:
            while self.count < count:
                self.idle.put(_Helper())
                self.count += 1

    def close(self) -> None:
        """Close every helper, waiting for those under way (not holding the lock: they count themselves out
        under it)."""
        with self.lock:
            closing, self.count = self.count, 0
        for _ in range(closing):
            self.idle.get().close()


_POOL = _Pool()


def _forget_in_child() -> None:
    global _POOL, _WAITERS, _WAITERS_LOCK
    _POOL = _Pool()  # no helpers: the parent's sockets and blocks stay the parent's
    _WAITERS, _WAITERS_LOCK = None, threading.Lock()  # nor its threads


def _close_at_exit() -> None:
    if _POOL.owner == os.getpid():
        _POOL.close()


os.register_at_fork(after_in_child=_forget_in_child)
atexit.register(_close_at_exit)


def start(count: int) -> int:
    """At least ``count`` helpers running (started now, in the background: they import their calls' modules,
    :func:`load`); the number running."""
    if count > 0:
        _POOL.grow(count)
    return _POOL.count


def stop() -> None:
    """No helpers: every call stays in its thread again (waits for the calls under way)."""
    _POOL.close()


def served() -> int:
    """How many calls helpers have answered in this process."""
    return _POOL.served


def computing() -> dict[str, tuple[int, float]]:
    """Per call (``"label"``, ``"inside"``, ...): how many the helpers answered in this process and the seconds
    they spent computing them (the function and the answer's copy into its block; not the wait for a free
    helper, the mask's copy in or the answer's copy out). A call's wall time less these is its overhead."""
    with _POOL.lock:
        return {op: (n, s) for op, (n, s) in _POOL.computing.items()}


def blocks_made() -> tuple[int, int]:
    """(how many shared blocks this process has made for its helpers' calls, their bytes): a new block's pages
    are first touched by the call that made it (page faults in this process and the helper's)."""
    with _POOL.lock:
        return _POOL.blocks_made, _POOL.block_bytes


def _spent(op: str, seconds: float) -> None:
    with _POOL.lock:
        kept = _POOL.computing.setdefault(op, [0, 0.0])
        kept[0], kept[1] = kept[0] + 1, kept[1] + seconds


def call(op: str, mask: np.ndarray, *args):
    """``op``'s (result, extra) computed by a helper, or None where it is to be made in the calling thread:
    no helpers, a small mask, or a helper that failed (a dead one is replaced)."""
    if mask.size < MIN_VOXELS:
        return None
    helper = None
    while helper is None:  # a free helper, unless the helpers are stopped meanwhile
        if not _POOL.count:
            return None
        try:
            helper = _POOL.idle.get(timeout=0.1)
        except queue.Empty:
            pass
    _count("busy", 1)
    try:
        answer = helper.run(op, mask, args)
        _count("served", 1)
        return answer
    except (OSError, EOFError, RuntimeError, ValueError):
        if not helper.alive():
            helper.close()
            helper = _Helper()
        return None
    finally:
        _count("busy", -1)
        _POOL.idle.put(helper)


def call_later(op: str, mask: np.ndarray, *args):
    """:func:`call` started now in a thread that waits on the helper, so that the caller computes meanwhile: a
    function that gives :func:`call`'s answer (None: to be made in the calling thread) once it is there.
    ``mask`` must not change until then."""
    if mask.size < MIN_VOXELS or not _POOL.count:
        return lambda: None
    return _waiters().submit(call, op, mask, *args).result


_WAITERS: ThreadPoolExecutor | None = None  # the threads that wait on helpers for slabs (made when first needed)
_WAITERS_LOCK = threading.Lock()


def in_slabs(op: str, mask: np.ndarray, here, *args) -> np.ndarray | None:
    """``op``'s result for a 3-D ``mask`` that is computed plane by plane (each plane's answer its own, so the
    planes may be split anywhere): the planes split into as many slabs as there are helpers (each at least
    :data:`SLAB_VOXELS`), computed side by side; None where it is to be made in the calling thread (no helpers,
    a small mask). A slab no helper answered is made here (``here(slab, *args)``): the same result."""
    slabs = min(_POOL.count, mask.shape[0], mask.size // SLAB_VOXELS) if mask.ndim == 3 else 0
    if slabs < 1:
        return None
    edges = np.linspace(0, mask.shape[0], slabs + 1).round().astype(int)
    parts = [mask[a:b] for a, b in zip(edges[:-1], edges[1:])]
    waiting = [_waiters().submit(call, op, part, *args) for part in parts[1:]]  # the first: in this thread
    answers = [call(op, parts[0], *args)] + [w.result() for w in waiting]
    out = np.empty(mask.shape, OUT_DTYPES[op])
    for a, b, part, done in zip(edges[:-1], edges[1:], parts, answers):
        out[a:b] = here(part, *args) if done is None else done[0]
    return out


def _waiters() -> ThreadPoolExecutor:
    global _WAITERS
    with _WAITERS_LOCK:
        if _WAITERS is None:
            _WAITERS = ThreadPoolExecutor(max_workers=16, thread_name_prefix="helper_wait")
        return _WAITERS


def _count(name: str, step: int) -> None:
    with _POOL.lock:
        setattr(_POOL, name, getattr(_POOL, name) + step)


def running() -> int:
    """How many helpers are running (0: every call is made in its calling thread)."""
    return _POOL.count


def busy() -> int:
    """How many calls are under way in helpers now."""
    return _POOL.busy


# ------------------------------------------------------------------------------------------ the helper side


def _compute(op: str, mask: np.ndarray, args: tuple):
    from . import components, distances

    if op == "label":
        return components.label_here(mask, *args)
    if op == "component":
        return components.component_here(mask, *args), None
    if op == "inside":
        return distances.inside_here(mask, *args), None
    if op == "territory":
        from .territory import territory_here

        return territory_here(mask, *args), None
    raise ValueError(f"unknown call {op!r}")


def load() -> None:
    """Imports what a helper's calls use; a helper does so as it starts (beside its reader's own start), not in
    its first call. None of them imports torch, which takes a helper seconds: its first territory took 4.5 s on
    an H100's host while the territory's module imported torch (run DX)."""
    for name in ("components", "distances", "territory"):
        importlib.import_module(f".{name}", __package__)


def serve(fd: int) -> None:
    """The helper's loop: a call per message on socket ``fd`` until it closes."""
    load()
    conn = Connection(fd)
    mapped: dict[str, object] = {}
    while True:
        try:
            op, shape, args, name_in, cap_in, name_out, cap_out = conn.recv()
        except (EOFError, OSError):
            return
        try:
            for name in set(mapped) - {name_in, name_out}:  # blocks the caller replaced
                mapped.pop(name).close()
            for name, cap in ((name_in, cap_in), (name_out, cap_out)):
                if name not in mapped:
                    mapped[name] = shared_blocks.mapped(name, cap)
            size = int(np.prod(shape))
            mask = np.frombuffer(mapped[name_in], np.bool_, size).reshape(shape)
            t0 = time.perf_counter()
            result, extra = _compute(op, mask, args)
            np.frombuffer(mapped[name_out], OUT_DTYPES[op], size).reshape(shape)[...] = result
            conn.send(("ok", extra, time.perf_counter() - t0))
        except Exception as e:  # noqa: BLE001 (the caller makes the call itself)
            conn.send(("error", f"{type(e).__name__}: {e}"))
