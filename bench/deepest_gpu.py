#!/usr/bin/env python
"""The deepest voxel of a CT search's candidate (``ct_extent.deepest``) on the host and on the GPU, part by part.

    python bench/deepest_gpu.py [--repeat 5]

Parts: ellipsoids at a CT's spacing (0.7 x 0.7 x 2.5 mm) from a nodule's to an effusion's size (the real CT's
candidates span 0.1-40 M voxels; over a million they are measured on 2 x 2 in-plane blocks), each measured:

- on the host with edt (the library's: in a helper process there, one core);
- on the GPU with the lower envelopes in one Triton kernel (``distances.ENVELOPE_KERNEL``, the default there) and
  in torch's blocks: wall time (synchronised) and the card's own time (CUDA events), with the same voxel checked.

The card's time is what a deepest voxel takes from a decode beside it (run CW: the blocks cost an H100's decode
0.07-0.08 ms a token); the wall time is what it takes from the search's chain."""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import numpy as np
import torch

from monailabel_app.grounding import ct_extent, distances

SPACING = (2.5, 0.7, 0.7)
RADII_MM = (8, 20, 45, 70, 100, 150)  # a nodule's to an effusion's


def ellipsoid(radius_mm: float) -> np.ndarray:
    r = [radius_mm * f / s for f, s in zip((1.0, 1.1, 0.9), SPACING)]
    shape = [int(2 * x) + 5 for x in r]
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum(((g - n / 2 + 0.3) / x) ** 2 for g, n, x in zip(grids, shape, r)) <= 1


def timed(fn, repeat: int) -> tuple[float, float, object]:
    """(median wall ms, median card ms, the answer) of ``fn``, after a warm call."""
    out = fn()
    walls, cards = [], []
    for _ in range(repeat):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        walls.append(1e3 * (time.perf_counter() - t0))
        cards.append(start.elapsed_time(end))
    return statistics.median(walls), statistics.median(cards), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    print(f"### bench/deepest_gpu.py on {torch.cuda.get_device_name()} (torch {torch.__version__})\n")
    print("| part (radius mm) | voxels | measured on | host edt ms | GPU kernel: wall ms (card ms) | "
          "GPU torch blocks: wall ms (card ms) | same voxel |")
    print("|---|---|---|---|---|---|---|")
    for radius in RADII_MM:
        part = ellipsoid(radius)
        box = part[ct_extent.bounds(part, [1, 1, 1])]  # deepest's own rule: its bounding box's size
        blocks = "2 x 2 blocks" if box.size > ct_extent.DEEPEST_FINE_VOXELS else "voxels"
        t0 = time.perf_counter()
        host = [ct_extent.deepest(part, SPACING) for _ in range(args.repeat)][0]
        host_ms = 1e3 * (time.perf_counter() - t0) / args.repeat
        k_wall, k_card, k_at = timed(lambda: ct_extent.deepest(part, SPACING, "cuda"), args.repeat)
        with mock.patch.object(distances, "ENVELOPE_KERNEL", False):
            b_wall, b_card, b_at = timed(lambda: ct_extent.deepest(part, SPACING, "cuda"), args.repeat)
        print(f"| {radius} | {int(part.sum()):,} | {blocks} | {host_ms:.1f} | {k_wall:.1f} ({k_card:.1f}) | "
              f"{b_wall:.1f} ({b_card:.1f}) | {host == k_at == b_at} |")


if __name__ == "__main__":
    main()
