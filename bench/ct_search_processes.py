#!/usr/bin/env python
"""Would a CT's findings' image-extent searches gain from worker processes instead of the map threads?

    python bench/ct_search_processes.py [--rounds 3] [--workers 2] [--profile]

The study and findings of ``bench/cpu_maps.py`` (the real CT resampled to 134 x 512 x 512, the phantom model
made to say four findings). One reading records the arguments of each finding's ``ct_extent.find_in_ct`` (its
gated map, kind, the attention's own region, the gate's box); then the four searches run, each round:
one after another in this process (one cache for the volume's findings, as the reader shares it), in a pool
of ``--workers`` threads (the reader's way: one interpreter), and in a pool of ``--workers`` forked processes
warmed by two rounds first (each with its own cache; a server's workers would be warm). The processes get
the volume by fork: the cost of handing it over (a shared block per study, a box of the gated map per
finding) is not in their time. Every way must give the same masks. Printed: the wall time of each way and
each search's own time. ``bench/fast_path.py --only searches`` runs the same comparison on the GPU
benchmark's CT.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

import cpu_maps  # noqa: E402

from monailabel_app.grounding import ct_extent, extent  # noqa: E402
from monailabel_app.io.study import load_study  # noqa: E402
from monailabel_app.reader import Reader  # noqa: E402

CALLS: list[tuple] = []  # (gated map, kind, own region, gate box, search region, volume's layers) of each search
VOLUME: list = []  # (hu, spacing) of the study, inherited by the forked workers
_find = ct_extent.find_in_ct


def _recorded(hu, spacing, heat, kind, near=None, cache=None, support=None, device=None, search=None, layers=None):
    CALLS.append((heat.copy(), kind, None if near is None else near.copy(), support,
                  None if search is None else search.copy(), layers))
    return _find(hu, spacing, heat, kind, near, cache, support, device, search, layers)


@contextmanager
def recording(hu, spacing):
    """Record the arguments of every ``ct_extent.find_in_ct`` call in the block (a reading's or a remap's), for
    the study's volume ``hu`` at ``spacing``."""
    CALLS.clear()
    VOLUME[:] = [(hu, spacing)]
    ct_extent.find_in_ct = _recorded
    try:
        yield CALLS
    finally:
        ct_extent.find_in_ct = _find


def search(i: int, cache: dict | None = None) -> tuple:
    """(the search's outcome: voxels of its mask or why none, its seconds)."""
    heat, kind, near, support, found, layers = CALLS[i]
    hu, spacing = VOLUME[0]
    t0 = time.perf_counter()
    try:
        got = int(_find(hu, spacing, heat, kind, near, cache, support, None, found, layers).mask.sum())
    except extent.NoExtent as e:
        got = str(e)
    return got, time.perf_counter() - t0


def compare(workers: int, rounds: int, emit=print, profile: bool = False) -> None:
    """The recorded searches (:func:`recording`), costliest first, each round one after another (one cache, as
    the reader shares it), in ``workers`` threads and in ``workers`` forked processes warmed by two rounds;
    every way must give the same masks. ``profile``: then one round one after another under cProfile, its
    top functions by own time."""
    order = sorted(range(len(CALLS)), key=lambda i: -extent.search_cost(CALLS[i][1], 3))  # costliest first
    hu = VOLUME[0][0]
    emit(f"CT {hu.shape}; {os.cpu_count()} CPUs; searches: {[CALLS[i][1] for i in order]}; "
         f"{workers} threads / processes")
    emit()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        for _ in range(2):  # warm the workers' heaps with a CT's searches
            list(pool.map(search, order))
        for _ in range(rounds):
            t0 = time.perf_counter()
            cache: dict = {}
            alone = [search(i, cache) for i in order]
            t_alone = time.perf_counter() - t0
            t0 = time.perf_counter()
            cache = {}
            with ThreadPoolExecutor(workers) as threads:
                threaded = list(threads.map(lambda i: search(i, cache), order))
            t_threads = time.perf_counter() - t0
            t0 = time.perf_counter()
            forked = list(pool.map(search, order))
            t_processes = time.perf_counter() - t0
            assert [g for g, _ in alone] == [g for g, _ in threaded] == [g for g, _ in forked]
            emit(f"- one after another {t_alone:.2f} s ({[round(s, 2) for _, s in alone]}); threads {t_threads:.2f} s; "
                 f"warm processes {t_processes:.2f} s ({[round(s, 2) for _, s in forked]})")
    emit()
    if profile:
        import cProfile
        import io
        import pstats

        py = cProfile.Profile()
        cache = {}
        py.enable()
        for i in order:
            search(i, cache)
        py.disable()
        text = io.StringIO()
        pstats.Stats(py, stream=text).sort_stats("tottime").print_stats(25)
        emit("```")
        emit(text.getvalue()[-6000:])
        emit("```")
        emit()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="also one round one after another under cProfile")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = cpu_maps.clinical_ct(os.path.join(tmp, "ct_134x512x512.nii.gz"))
        reader = Reader(precision="fp32")
        study = load_study(path, "ct", reader.limits)
    with recording(study.hu, study.spacing):
        reader.read(study, answer=cpu_maps.FINDINGS)
    compare(args.workers, args.rounds, profile=args.profile)


if __name__ == "__main__":
    main()
