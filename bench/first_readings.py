#!/usr/bin/env python
"""A fresh server's first CT readings after its warm-up, with the heap grown at warm-up or not.

    python bench/first_readings.py [--reserve-gb 4] [--readings 6] [--device cuda|cpu]

A process's heap grows over its first CT readings, and their page faults slow them (on a GPU the decode beside
the maps ran at 6-7 ms a token against 3.75 once grown: ``results/fast_path.md``, runs CI and CJ). A server's
warm-up grows it by ``--conf heap_reserve_gb`` (``allocator.reserve``). This reads what the first readings cost:

- ``cuda``: MedGemma-4B's shapes (random weights, bf16) as ``fast_path.py`` builds them, its 200 x 512 x 512 CT
  and three findings' 200-token report;
- ``cpu``: the phantom model in fp32 and ``cpu_maps.py``'s 134-slice real CT with its four findings.

The reader warms up as a server does (``Reader.warm_up`` on the CT alone, ``--reserve-gb`` grown), then reads the
CT ``--readings`` times, each a fresh copy dropped once timed. Per reading: end to end, ms a decode token, maps
after the answer, page faults, and whether it compiled a decode shape the warm-up had not. A reserve cannot be
undone in a process: run it once per size (``--reserve-gb 0``, then ``4``), the compile cache shared.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

from monailabel_app import allocator  # noqa: E402
from monailabel_app.grounding import helper_processes  # noqa: E402

allocator.keep_freed_memory()  # (set by the package's import already: before any thread of this script)


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def study_for(device: str, tmp: str):
    """(reader, study, answer) for ``device``."""
    if device == "cpu":
        import cpu_maps

        from monailabel_app.io.study import load_study
        from monailabel_app.reader import Reader

        reader = Reader(precision="fp32")
        path = cpu_maps.clinical_ct(os.path.join(tmp, "ct_134x512x512.nii.gz"))
        return reader, load_study(path, "ct", reader.limits), cpu_maps.FINDINGS
    import torch
    from fast_path import CT_FINDINGS, ct, reader_for, report
    from medgemma_shapes import build

    from monailabel_app.model.capture import CAPTURE_ATTN

    model, processor = build("cuda", torch.bfloat16, attn=CAPTURE_ATTN)
    return reader_for(model, processor, "bf16"), ct(3), report(processor.tokenizer, CT_FINDINGS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reserve-gb", type=float, default=4.0)
    ap.add_argument("--readings", type=int, default=6)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--timeline-first", action="store_true",
                    help="the first reading's maps call by call (map_timeline.py): what a fresh server's first CT pays")
    ap.add_argument("--timeline", action="store_true",
                    help="then one more reading's maps call by call (map_timeline.py), in the same warm process")
    args = ap.parse_args()
    from fast_path import NEW, fresh, sync

    with tempfile.TemporaryDirectory() as tmp:
        reader, study, answer = study_for(args.device, tmp)
        t0 = time.perf_counter()
        # the decode shape the readings take: the 200-token report's (cuda), read()'s default 128 tokens (cpu)
        warm = reader.warm_up(max_new_tokens=NEW if args.device == "cuda" else 128, modalities=("ct",),
                              heap_reserve=int(args.reserve_gb * 2**30))
        shapes = set(reader.model.__dict__.get("_medgemma_decoders", {}))
        print(f"### First CT readings after a warm-up ({args.device}; heap grown by {warm.get('heap_reserved_gib')} "
              f"GiB; warm-up {time.perf_counter() - t0:.1f} s, {warm['state']})")
        print()
        sync_here = sync if args.device == "cuda" else lambda: None
        first = 1
        if args.timeline_first:
            import map_timeline

            print("Reading 1, call by call:", end=" ")
            f0, heap = faults(), allocator.heap_bytes() or 0
            map_timeline.timeline(reader, study, answer, fresh=fresh, sync=sync_here, warm=False)
            print(f"Reading 1: {faults() - f0} page faults, heap grew {((allocator.heap_bytes() or 0) - heap) / 1e6:.0f} "
                  "MB")
            print()
            first, shapes = 2, set(reader.model.__dict__.get("_medgemma_decoders", {}))
        print("| reading | end to end s | ms / decode token | maps after the answer s | page faults | heap grew MB | "
              "helpers' blocks made (MB) | new decode shape |")
        print("|---|---|---|---|---|---|---|---|")
        for i in range(first, args.readings + 1):
            copy = fresh(study)
            heap, blocks = allocator.heap_bytes() or 0, helper_processes.blocks_made()
            f0, t = faults(), time.perf_counter()
            r = reader.read(copy, answer=answer)
            if args.device == "cuda":
                sync()
            total, lat = time.perf_counter() - t, r.latencies
            del r, copy
            known = set(reader.model.__dict__.get("_medgemma_decoders", {}))
            ms = 1000 * lat["decoder_decode"] / max(1, lat["decoder_decode_steps"])
            made = [a - b for a, b in zip(helper_processes.blocks_made(), blocks)]
            print(f"| {i} | {total:.3f} | {ms:.2f} | {lat['maps']:.3f} | {faults() - f0} | "
                  f"{((allocator.heap_bytes() or 0) - heap) / 1e6:.0f} | {made[0]} ({made[1] / 1e6:.0f}) | "
                  f"{'yes' if known - shapes else 'no'} |", flush=True)
            shapes = known
        print()
        if args.timeline:
            import map_timeline

            map_timeline.timeline(reader, study, answer, fresh=fresh, sync=sync_here)


if __name__ == "__main__":
    main()
