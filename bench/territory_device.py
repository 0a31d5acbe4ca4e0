#!/usr/bin/env python
"""The lungs' territory of a CT search box, made four ways: in this thread (``territory_here``), in slabs over the
helper processes (a GPU reader's), on the GPU (``territory_device``, ``territory.ON_DEVICE``) and the same torch code
on the CPU (its work, whatever the card); the median of seven calls after a warm one, each checked against the
first.

    python bench/territory_device.py [--helpers 8] [--repeat 7]

The benchmark's CT (``fast_path.ct``: a phantom at 200 x 512 x 512), its aerated lung as the search layers make it
(``ct_extent.ct_layers``), in three boxes: a nodule's search (a 60 mm cube in the right lung), one lung (an
airspace kind's search) and the whole volume.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from fast_path import ct  # noqa: E402

from monailabel_app.grounding import ct_extent, helper_processes  # noqa: E402
from monailabel_app.grounding.boxes import bounds  # noqa: E402
from monailabel_app.grounding.territory import territory_here  # noqa: E402
from monailabel_app.grounding.territory_device import territory_on_device  # noqa: E402


def timed(fn, repeat: int):
    """(the answer of a warm call, the median seconds of ``repeat`` more, whether they all gave the same)."""
    first = fn()
    seconds, same = [], True
    for _ in range(repeat):
        t0 = time.perf_counter()
        got = fn()
        seconds.append(time.perf_counter() - t0)
        same &= np.array_equal(got, first)
    return first, statistics.median(seconds), same


def boxes(aerated: np.ndarray, spacing) -> dict[str, tuple[slice, ...]]:
    right = aerated.copy()
    right[:, :, aerated.shape[2] // 2 :] = False  # patient right = low x on the display grid
    lung = bounds(right)
    z, y, x = (int((b.start + b.stop) // 2) for b in lung)
    reach = [int(np.ceil(30 / s)) for s in spacing]
    cube = tuple(slice(max(0, c - r), c + r) for c, r in zip((z, y, x), reach))
    return {"nodule's 60 mm cube": cube, "right lung": lung, "whole volume": tuple(slice(0, n) for n in aerated.shape)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--helpers", type=int, default=helper_processes.DEFAULT_HELPERS)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    volume = ct(0)
    aerated = ct_extent.ct_layers(volume.hu, volume.spacing, "cuda" if cuda else None).aerated
    helper_processes.start(min(args.helpers, os.cpu_count() or 1))
    name = torch.cuda.get_device_name() if cuda else "no GPU"
    print(f"## bench/territory_device.py ({name}; {helper_processes.running()} helpers; torch {torch.__version__})\n")
    print("| box | voxels | lung voxels | here s | helpers s | GPU s | torch on the CPU s | the same |")
    print("|---|---|---|---|---|---|---|---|")
    try:
        for label, box in boxes(aerated, volume.spacing).items():
            lungs = aerated[box]
            here, t_here, same = timed(lambda: territory_here(lungs), args.repeat)
            slabs, t_slabs, s2 = timed(lambda: helper_processes.in_slabs("territory", lungs, territory_here, 20),
                                       args.repeat)
            gpu, t_gpu, s3 = (None, float("nan"), True)
            if cuda:
                with torch.cuda.stream(torch.cuda.Stream()):
                    gpu, t_gpu, s3 = timed(lambda: territory_on_device(lungs, 20, "cuda"), args.repeat)
            on_cpu, t_cpu, s4 = timed(lambda: territory_on_device(lungs, 20, "cpu"), args.repeat)
            agree = same and s2 and s3 and s4 and (slabs is None or np.array_equal(slabs, here))
            agree &= (gpu is None or np.array_equal(gpu, here)) and np.array_equal(on_cpu, here)
            print(f"| {label} | {lungs.size:,} | {int(lungs.sum()):,} | {t_here:.4f} | {t_slabs:.4f} | {t_gpu:.4f} | "
                  f"{t_cpu:.4f} | {'yes' if agree else '**no**'} |")
    finally:
        helper_processes.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
