"""Blocks of shared memory that carry a film reading's image-sized arrays from a map worker process to the
serving process (:mod:`map_processes`), used again once the serving process lets go of them.

A 2048 x 2458 film's reading with three findings is about 130 MB. A new block for each costs the worker the
block's page allocation (42-45 ms for 158 MB on this project's CPU, ``posix_fallocate``) and the serving
process its freeing (20-30 ms, in whichever of its threads drops the reading last); writing into a block
made before costs neither. So the serving process keeps the blocks its readings came in: when the last
array on a block goes (a ``weakref.finalize`` on its mapping), the block goes back to a queue that the
workers take from (:class:`Returned`), up to ``keep`` blocks; beyond that, or once the workers are gone, it
is removed. A worker takes the first returned block big enough for its reading, puts back those too small,
and makes a new one where none fits (:func:`take`).

Every block is named in /dev/shm and registered with the processes' resource tracker when it is made, so a
block that nobody removes (a process killed) is removed when the processes exit. Its pages are reserved
when it is made: a block that is only sized kills the process that writes past what /dev/shm holds
(SIGBUS; Docker gives a container 64 MB by default); where it does not fit, there is no block (None) and
the caller sends the arrays by pipe.
"""

from __future__ import annotations

import mmap
import os
import queue
import secrets
import threading
import weakref
from multiprocessing import resource_tracker

SHM_DIR = "/dev/shm"  # where Linux keeps POSIX shared memory
TRIES = 4  # returned blocks a worker looks at for one that fits before it makes a new one


def new(size: int) -> tuple[str, mmap.mmap] | None:
    """(name, mapping) of a new block of ``size`` bytes, its pages reserved; None where it does not fit."""
    if not os.path.isdir(SHM_DIR):
        return None
    name = f"medgemma-{os.getpid()}-{secrets.token_hex(8)}"
    path = os.path.join(SHM_DIR, name)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:  # (a /dev/shm this process may not write)
        return None
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


def mapped(name: str, size: int) -> mmap.mmap:
    """Block ``name`` mapped in this process. An ``mmap`` object: its release (when the last array on it goes)
    lets the process's other threads run, where a torch shared tensor's holds the interpreter's lock."""
    fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
    try:
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def remove(name: str) -> None:
    """Remove block ``name`` (its memory goes with the last mapping of it)."""
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        return
    resource_tracker.unregister("/" + name, "shared_memory")  # registered where it was made (new)


def take(returned, size: int) -> tuple[str, int, mmap.mmap] | None:
    """Worker side: (name, capacity, mapping) of a block for ``size`` bytes: a returned one (``returned``: the
    queue of :class:`Returned`, or None) of at least that size, else a new one; None without shared memory."""
    passed, found = [], None
    for _ in range(TRIES if returned is not None else 0):
        try:
            name, capacity = returned.get_nowait()
        except queue.Empty:
            break
        if capacity >= size:
            try:
                found = name, capacity, mapped(name, capacity)
                break
            except FileNotFoundError:  # removed meanwhile
                continue
        passed.append((name, capacity))
    for block in passed:  # too small here, right for a smaller reading
        returned.put(block)
    if found is not None:
        return found
    made = new(size)
    return None if made is None else (made[0], size, made[1])


class Returned:
    """Serving side: the blocks readings came in, put back on ``queue`` for the workers (at most ``keep`` of
    them waiting) when their last array goes, and removed once :meth:`close`\\ d."""

    def __init__(self, queue, keep: int):
        self.queue, self.keep = queue, keep
        self._lock = threading.RLock()  # (a finalizer may run in a thread that holds it)
        self._closed = False
        self._known: set[str] = set()  # blocks seen here and not removed
        self._lent: set[str] = set()  # of which a reading's arrays still lie in

    def lend(self, name: str, capacity: int) -> mmap.mmap:
        """Block ``name`` mapped here for a reading's arrays; it is returned when the mapping goes."""
        block = mapped(name, capacity)
        with self._lock:
            self._known.add(name)
            self._lent.add(name)
        weakref.finalize(block, self._back, name, capacity).atexit = False  # (at exit: close(held_too=True))
        return block

    def _back(self, name: str, capacity: int) -> None:
        with self._lock:
            self._lent.discard(name)
            if not self._closed and self.queue.qsize() < self.keep:
                self.queue.put((name, capacity))
                return
            self._known.discard(name)
        remove(name)

    def close(self, held_too: bool = False) -> None:
        """Remove the blocks no reading holds (call once the workers are gone); the others go with their
        readings, or now with ``held_too`` (at exit: a removed block stays mapped where it is held)."""
        with self._lock:
            self._closed = True
            gone = set(self._known) if held_too else self._known - self._lent
            self._known -= gone
        for name in gone:
            remove(name)
