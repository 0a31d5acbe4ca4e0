#!/usr/bin/env python
"""When each step of a CT reading's maps runs, in which thread, and whether it computes or waits.

    python bench/map_timeline.py [--helpers 0,2]         # the CPU: bench/cpu_maps.py's real CT
    python bench/fast_path.py --only timeline             # the GPU benchmark's CT (MedGemma-4B shapes)

One warm reading is made with the maps' functions wrapped (the findings' heatmaps, gates, peak regions, the
image extent's search and its parts, labels and distances, the label map, the anatomy; and the decode loop's
callbacks where the maps are made while the model writes: the rows queued off the device, the text read for
findings). Each call is printed
with its thread, its start (seconds from the reading's start), its wall time and its thread's CPU time: a
call whose wall time is far above its CPU time waited (for the interpreter's lock, the GPU, a helper process
or a lock of the maps), one with both alike computed. Then each function's count and totals, and the
reading's own latencies (prefill, decode) to place the decode in the timeline. Helper processes' calls are
named by what they compute (``call label``: the wait for a free helper and the round trip; ``run label``: the
round trip) and their wall time split: waiting for a free helper, the round trip's own cost, and the helpers'
computing (:func:`helper_processes.computing`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import threading
import time
from collections import defaultdict
from contextlib import contextmanager

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

from monailabel_app.grounding import (anatomy, components, ct_extent, ct_maps, distances,  # noqa: E402
                                     helper_processes, maps, territory_device)
from monailabel_app.grounding.study_maps import CTMaps, StudyMaps  # noqa: E402
from monailabel_app.model import decoding, generation  # noqa: E402

WATCHED = [(anatomy, "ct_body_and_lungs"), (ct_maps, "slice_grids"), (ct_maps, "volume_heatmap"),
           # inside the heatmap: the token grids' upsampling (the rest is their copy to the device; run CP: the
           # whole 0.064 s of which 0.001 s on the CPU, in each of the CT's three findings)
           (maps, "grids_to_pixels"),
           (ct_maps, "gated_map"), (maps, "peak_regions"), (maps, "peak_region"), (ct_extent, "find_in_ct"),
           (ct_extent, "smoothed_hu"), (ct_extent, "territory"), (helper_processes, "in_slabs"),
           # the territory on the GPU (territory.ON_DEVICE, off in the library): its pieces and hulls' parts
           (territory_device, "_touching"), (territory_device, "_joined"), (territory_device, "_row_extremes"),
           (territory_device, "_bounds"),
           (ct_extent, "grow_ct"), (ct_extent, "deepest"), (components, "label"), (components, "component_at"),
           (distances, "inside"),
           (maps, "assign"),
           (ct_maps, "slice_info"),
           # a helper's call: waiting for a free helper and its round trip (the mask in, the answer out)
           (helper_processes, "call"), (helper_processes._Helper, "run"),
           # the decode loop's callbacks: the rows queued off the device, the answer's text read for findings
           (decoding.LiveRows, "advance"), (decoding.LiveRows, "upto"), (generation, "_token_ends"),
           (decoding, "_land"),  # the rows' copies landed in their thread
           (StudyMaps, "ahead"), (StudyMaps, "_start_ahead"),
           (CTMaps, "gate")]  # a CT's gates: made beside the model on a GPU (shared_ahead), else by the first finding


# printed however short: when the decode loop looked for finished sentences and a finding's maps started
ALWAYS_SHOWN = {"ahead", "_start_ahead", "slice_grids"}


@contextmanager
def watched(events: list):
    """Every call of :data:`WATCHED` in the block appended to ``events`` as (thread, name, start, wall, cpu,
    depth)."""
    depth = threading.local()
    kept = [(module, name, getattr(module, name)) for module, name in WATCHED]

    def wrap(name, real):
        def call(*args, **kwargs):
            shown = _helper_call_name(name, args)
            d = getattr(depth, "n", 0)
            depth.n = d + 1
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return real(*args, **kwargs)
            finally:
                depth.n = d
                events.append((threading.current_thread().name, shown, t0, time.perf_counter() - t0,
                               time.thread_time() - c0, d))
        return call

    for module, name, real in kept:
        setattr(module, name, wrap(name, real))
    try:
        yield events
    finally:
        for module, name, real in kept:
            setattr(module, name, real)


def _helper_call_name(name: str, args: tuple) -> str:
    """A helper's call named with what it computes (``call label``, ``run inside``)."""
    if name == "call" and args:
        return f"call {args[0]}"
    if name == "run" and len(args) > 1:  # _Helper.run(self, op, ...)
        return f"run {args[1]}"
    return name


def helper_split(events: list, before: dict, after: dict, emit=print) -> None:
    """Each helper call's wall time split: waiting for a free helper (``call`` less ``run``), the round trip's
    own cost (``run`` less the helper's computing: the mask's copy in, the socket, the answer's copy out, the
    interpreter taken back), and the helper computing (:func:`helper_processes.computing`)."""
    walls = defaultdict(lambda: [0.0, 0.0])
    for _, name, _, wall, _, _ in events:
        kind, _, op = name.partition(" ")
        if kind in ("call", "run") and op:
            walls[op][kind == "run"] += wall
    if not any(after.get(op, (0, 0.0))[0] > before.get(op, (0, 0.0))[0] for op in walls):
        return  # no helpers: every call was made in its thread
    emit("| helper call | answered | wall s | waiting for a helper s | round trip s | helper computing s |")
    emit("|---|---|---|---|---|---|")
    for op, (call, run) in sorted(walls.items()):
        n = after.get(op, (0, 0.0))[0] - before.get(op, (0, 0.0))[0]
        spent = after.get(op, (0, 0.0))[1] - before.get(op, (0, 0.0))[1]
        emit(f"| {op} | {n} | {call:.3f} | {call - run:.3f} | {run - spent:.3f} | {spent:.3f} |")
    emit()


def timeline(reader, study, answer, emit=print, fresh=lambda s: s, sync=lambda: None, warm: bool = True) -> dict:
    """One reading of ``study`` (``answer`` said) after a warm one (``warm``; else whatever the reader read
    before), its maps' calls printed (markdown)."""
    if warm:
        reader.read(study, answer=answer)
    events: list = []
    copy = fresh(study)
    sync()
    computed = helper_processes.computing()
    with watched(events):
        t0 = time.perf_counter()
        reading = reader.read(copy, answer=answer)
        sync()
        total = time.perf_counter() - t0
    lat = reading.latencies
    emit(f"Reading {total:.3f} s: preprocessing {lat.get('prepare', 0):.3f}, "
         f"prefill {lat.get('decoder_prefill', 0):.3f}, "
         f"decode {lat.get('decoder_decode', 0):.3f} s, maps after the answer {lat.get('maps', 0):.3f} s; "
         f"{helper_processes.running()} helper processes")
    emit()
    emit("| thread | call | start s | wall s | CPU s |")
    emit("|---|---|---|---|---|")
    for thread, name, start, wall, cpu, depth in sorted(events, key=lambda e: (e[0], e[2])):
        if wall >= 0.005 or name in ALWAYS_SHOWN:
            emit(f"| {thread} | {'. ' * depth}{name} | {start - t0:.3f} | {wall:.3f} | {cpu:.3f} |")
    emit()
    totals = defaultdict(lambda: [0, 0.0, 0.0])
    for _, name, _, wall, cpu, _ in events:
        t = totals[name]
        t[0], t[1], t[2] = t[0] + 1, t[1] + wall, t[2] + cpu
    emit("| call | count | wall s | CPU s |")
    emit("|---|---|---|---|")
    for name, (n, wall, cpu) in sorted(totals.items(), key=lambda kv: -kv[1][1]):
        emit(f"| {name} | {n} | {wall:.3f} | {cpu:.3f} |")
    emit()
    helper_split(events, computed, helper_processes.computing(), emit)
    return {"total": total, "events": events}


def main() -> None:
    import cpu_maps

    from monailabel_app.io.study import load_study
    from monailabel_app.reader import Reader

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--helpers", default="0", help="helper processes to compare, e.g. 0,2")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        reader = Reader(precision="fp32")
        study = load_study(cpu_maps.clinical_ct(os.path.join(tmp, "ct.nii.gz")), "ct", reader.limits)
        for count in [int(h) for h in args.helpers.split(",")]:
            helper_processes.stop()
            helper_processes.start(count)
            reader.forget_anatomy()
            timeline(reader, study, cpu_maps.FINDINGS, fresh=lambda s: dataclasses.replace(s, hu=s.hu.copy()))
            reader.forget_anatomy()


if __name__ == "__main__":
    main()
