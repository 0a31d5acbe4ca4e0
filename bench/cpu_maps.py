#!/usr/bin/env python
"""Where a CT reading's time goes on this CPU, with the phantom model: generation against maps.

    python bench/cpu_maps.py [--repeat 3] [--warm 4] [--profile] [--films 4] [--reserve-gb 4]

The study is a real chest CT at a clinical grid: TotalSegmentator's ``example_ct.nii.gz`` (122 x 101 x
112 voxels of 3 mm; ``../shared/data``) resampled (linear) to 134 slices of 512 x 512, written as NIfTI
and read back through the server's own loader. The phantom model is made to say four findings (teacher
forcing), so every reading does the same mask work: a nodule, a mass, an effusion and an opacity, on both
sides. Printed: the reading's stages (median of ``--repeat`` warm readings), then with ``--profile`` the
maps' top functions. Before them, ``--warm`` readings, each kept until the next is made, as the timed ones
are (and as the server keeps its last readings for corrections): the process's heap grows over its first
few CT readings (on this VM 850 MB of fresh pages in the second, none from about the fifth) and the timed
readings are the steady state a server reaches (``--reserve-gb``: the heap grown first, as a server's warm-up
grows it, so that no reading faults in fresh pages; each timed reading's page faults are printed). Then ``--films`` phantom radiographs at 2048 x 2458 (the GPU benchmark's film size),
three findings each, image extent on: their maps, median per film.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import resource
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

import numpy as np  # noqa: E402

from monailabel_app import allocator  # noqa: E402
from monailabel_app.io.study import load_study  # noqa: E402
from monailabel_app.reader import Reader  # noqa: E402

SOURCE = os.path.join(HERE, "..", "..", "shared", "data", "ct", "totalsegmentator", "example_ct.nii.gz")
SHAPE = (134, 512, 512)
FILM_FINDINGS = "Nodule in the right middle zone. Opacity in the left lower zone. Effusion in the right lower zone."
FINDINGS = ("Nodule in the right upper lobe. Mass in the left lower lobe. Effusion in the right lower lobe. "
            "Opacity in the left upper lobe.")


def clinical_ct(path: str) -> str:
    """The example CT resampled to ``SHAPE`` (z, y, x), same orientation and extent, as NIfTI at ``path``."""
    import SimpleITK as sitk

    src = sitk.ReadImage(SOURCE)
    size = (SHAPE[2], SHAPE[1], SHAPE[0])
    spacing = [s * n / m for s, n, m in zip(src.GetSpacing(), src.GetSize(), size)]
    out = sitk.Resample(src, size, sitk.Transform(), sitk.sitkLinear, src.GetOrigin(), spacing,
                        src.GetDirection(), -1024.0, sitk.sitkInt16)
    sitk.WriteImage(out, path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--warm", type=int, default=4, help="readings before the timed ones (the heap's growth)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--films", type=int, default=4, help="phantom films at 2048 x 2458 to time (0: none)")
    ap.add_argument("--reserve-gb", type=float, default=0.0,
                    help="the heap grown first, as a server's warm-up grows it (allocator.reserve; 0: not grown)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = clinical_ct(os.path.join(tmp, "ct_134x512x512.nii.gz"))
        reader = Reader(precision="fp32")
        grown = allocator.reserve(int(args.reserve_gb * 2**30)) if args.reserve_gb > 0 else None
        if grown:
            print(f"heap grown by {args.reserve_gb} GiB in {grown['seconds']} s")
        study = load_study(path, "ct", reader.limits)
        print(f"CT {study.shape} spacing {tuple(round(s, 3) for s in study.spacing)} mm; {os.cpu_count()} CPUs")
        reading = None
        for _ in range(max(1, args.warm)):  # warm: the model's first run, the heap's growth
            reading = reader.read(study, answer=FINDINGS)
        totals, maps_s, gen_s, faults = [], [], [], []
        for _ in range(args.repeat):
            reader.forget_anatomy()  # every reading pays for its anatomy, as a new study does
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            reading = reader.read(study, answer=FINDINGS)
            totals.append(time.perf_counter() - t0)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
            maps_s.append(reading.latencies["maps"])
            gen_s.append(reading.latencies["generate"])
        labels = [int((reading.labels == k).sum()) for k in range(1, len(reading.names) + 1)]
        print(f"findings: {reading.names}; voxels per label: {labels}")
        print(f"extent per finding: {[e.get('extent') for e in reading.extras]}")
        print(f"end to end {statistics.median(totals):.2f} s; generate {statistics.median(gen_s):.2f} s; "
              f"maps {statistics.median(maps_s):.2f} s (median of {args.repeat}: {[round(m, 2) for m in maps_s]}); "
              f"page faults per reading {faults}")
        if args.profile:
            reader.forget_anatomy()
            gen = reading.generation
            prof = cProfile.Profile()
            prof.enable()
            reader.remap(study, gen)
            prof.disable()
            pstats.Stats(prof).sort_stats("cumulative").print_stats(35)
        np.save(os.path.join(tmp, "labels.npy"), reading.labels)
    if args.films:
        films_maps(reader, args.films)


def films_maps(reader, count: int) -> None:
    from PIL import Image

    from monailabel_app.io.xray import Geometry, Radiograph
    from monailabel_app.phantoms.films import make_phantom

    times = []
    for seed in range(3, 3 + count):
        img = np.asarray(Image.fromarray(make_phantom(seed).image).resize((2048, 2458), Image.BILINEAR))
        film = Radiograph(img, Geometry.plain(2458, 2048))
        gen = reader.read(film, answer=FILM_FINDINGS).generation
        reader.forget_anatomy()  # the film's lung fields found anew, as for a new study
        t0 = time.perf_counter()
        reader.remap(film, gen)
        times.append(time.perf_counter() - t0)
    print(f"{count} films of 2048 x 2458, 3 findings each: maps {statistics.median(times):.2f} s per film "
          f"(median; {[round(t, 2) for t in times]})")


if __name__ == "__main__":
    main()
