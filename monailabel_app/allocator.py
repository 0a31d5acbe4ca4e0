"""Keep freed memory for the next reading instead of handing it back to the kernel (glibc's malloc).

A reading's maps are numpy and torch arrays the size of the image: a film's are 20 MB each, a 134-slice
512² CT's 140 MB. glibc serves every request over its mmap threshold (128 KiB to 32 MiB, adjusted as it
goes) with a fresh ``mmap`` and returns it with ``munmap`` when the array is freed, so every such array
is first-touch memory: the kernel zeroes and maps it page by page (on a 2-core VM writing a fresh 140 MB
array takes 58 ms, writing it again 5 ms), and each ``munmap`` interrupts every core that runs one of the
process's threads to flush its TLB (the map threads and the decode loop alike).

:func:`keep_freed_memory` tells malloc to serve large requests from its heap and to keep what is freed
there (up to :data:`KEEP_BYTES` beyond what is in use), so the next map reuses pages already mapped. It
also gives every thread the one main arena: a thread's own arena grows in heaps of at most 64 MiB, and
glibc maps any larger request made there on its own whatever ``M_MMAP_MAX`` says (the map threads' CT
heatmaps: a 134-slice CT's maps made 196,000 page faults, 1.1 s of kernel time, per reading on this
project's 2-core VM; none with one arena). The process's resident memory then stays near its peak.
``MEDGEMMA_MALLOC=system`` keeps glibc's own policy. Elsewhere than glibc (musl, macOS, Windows) this does
nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import time

import numpy as np

logger = logging.getLogger(__name__)

ENV = "MEDGEMMA_MALLOC"  # keep (default) | system
KEEP_BYTES = (1 << 31) - 1  # freed memory kept at the heap's top before malloc trims it (mallopt's int: at
# most 2 GiB; a 134-slice CT's reading frees about 1.2 GB of maps at once, and 1 GiB let malloc trim it all)
# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX, M_ARENA_MAX = -1, -2, -4, -8
_done: dict = {}


def _libc():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    libc = ctypes.CDLL(name)
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None


def keep_freed_memory() -> bool:
    """Set the policy once per process (later calls return the first answer): True where it is in force."""
    if "on" in _done:
        return _done["on"]
    wanted = os.environ.get(ENV, "keep").strip().lower()
    libc = _libc() if wanted != "system" else None
    on = False
    if libc is not None:
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        # no mmap for large requests (they come from the heap), one arena for all threads (threads made
        # before this call keep the arena they have), freed memory kept up to KEEP_BYTES, and the heap
        # grown 64 MiB at a time
        on = all(libc.mallopt(p, v) == 1 for p, v in ((M_MMAP_MAX, 0), (M_ARENA_MAX, 1),
                                                       (M_TRIM_THRESHOLD, KEEP_BYTES), (M_TOP_PAD, 64 << 20)))
        logger.info("malloc keeps freed memory for the next reading%s", "" if on else ": mallopt refused")
    _done["on"] = on
    return on


def zeros(shape, dtype=float) -> np.ndarray:
    """``np.zeros(shape, dtype)`` made without holding the interpreter's lock, for the maps' image-sized
    arrays. numpy 2's ``np.zeros`` holds the lock while ``calloc`` clears the memory, and with freed memory
    kept on the heap (:func:`keep_freed_memory`) that is a ``memset`` of the whole array: on the H200's host a
    35 MB mask took 2.5 ms with another thread at 41 % of its speed, a 281 MB float64 volume 28.5 ms at 18 %
    (``bench/gil_hold.py``); the GPU's decode loop waits the same. ``np.empty`` and ``fill`` let it go."""
    out = np.empty(shape, dtype)
    out.fill(0)
    return out


def mapped_blocks() -> int | None:
    """How many blocks glibc's malloc holds as their own mmap now (``mallinfo2().hblks``); None elsewhere."""
    info = _mallinfo()
    return None if info is None else int(info.hblks)


def heap_bytes() -> int | None:
    """The bytes of the main arena's heap now, in use or kept free (``mallinfo2().arena``); None elsewhere."""
    info = _mallinfo()
    return None if info is None else int(info.arena)


def _mallinfo():
    libc = _libc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc.mallinfo2.restype = MallInfo2
    return libc.mallinfo2()


RESERVE_ENV = "MEDGEMMA_HEAP_RESERVE_GB"  # heap grown at warm-up (GiB; 0: none)
DEFAULT_RESERVE_GB = 4.0


def reserve_bytes(value=None, name: str = RESERVE_ENV) -> int:
    """The heap a warm-up grows (:func:`reserve`), in bytes: ``value`` GiB (a server's ``--conf``, named ``name`` in
    the error), else ``MEDGEMMA_HEAP_RESERVE_GB``, else :data:`DEFAULT_RESERVE_GB`. ValueError unless 0 or more."""
    if value is None:
        value = os.environ.get(RESERVE_ENV, "").strip() or DEFAULT_RESERVE_GB
    try:
        gib = float(value)
    except (TypeError, ValueError):
        gib = -1.0
    if not gib >= 0:
        raise ValueError(f"{name} must be 0 or more GiB, got {value!r}")
    return int(gib * 2**30)


def reserve(nbytes: int) -> dict | None:
    """Grow the heap by ``nbytes`` of pages already mapped, for the next readings' arrays: the first readings of a
    process otherwise fault in every page their arrays need beyond what the heap held (on the 2-core VM, a 134-slice
    CT's first two readings after a warm-up on the phantom CT: 253,000-259,000 and 94,000-104,000 faults, maps
    3.61-3.82 and 3.08-3.34 s; after 4 GiB grown, 0-4 faults and 2.49-2.65 s, ``cpu_maps.md``; on a GPU the faults
    slow the decode beside the maps to 6-7 ms a token against 3.75, ``fast_path.md`` runs CI and CJ). The
    block is written once and freed; malloc then never trims its heap (the kept freed memory's 2 GiB limit is
    lifted: the process's resident memory stays at its peak, as it does anyway once readings have grown it).
    Only where the policy is on (:func:`keep_freed_memory`); returns what was done, or None."""
    if nbytes <= 0 or not keep_freed_memory():
        return None
    libc = _libc()
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    t0, f0 = time.perf_counter(), _faults()
    if libc.mallopt(M_TRIM_THRESHOLD, -1) != 1:  # -1: never trim (glibc's mallopt)
        return None
    block = libc.malloc(nbytes)
    if not block:
        return None
    ctypes.memset(block, 0, nbytes)  # (the interpreter's lock let go: a ctypes call)
    libc.free(block)
    done = {"bytes": int(nbytes), "seconds": round(time.perf_counter() - t0, 3), "page_faults": _faults() - f0}
    logger.info("heap grown by %.1f GiB for the next readings in %.1f s", nbytes / 2**30, done["seconds"])
    return done


def _faults() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
