#!/usr/bin/env python
"""A helper process's call, alone and beside a thread that holds the interpreter as a GPU's decode loop does.

    python bench/helper_beside_loop.py [--duty 0.75] [--step-ms 3.75] [--repeat 12]

On the H200 a CT's map threads hand their labels and distances to helper processes (``helper_processes``)
while the decode loop, in the same process, runs Python for about three quarters of each 3.75 ms token (runs
CG, CI: "loop: look"). A thread that waits on a helper's socket lets the interpreter go and must take it back
when the answer comes, from a loop that holds it most of the time. This measures what that costs: each call's
median wall time through one helper and in the calling thread, first alone, then beside a pure-Python thread
that spins for ``duty`` of every ``step-ms`` and sleeps (the lock let go) for the rest. The mask is a search
box of 60 x 200 x 200 voxels with 70 % of a 40 x 120 x 140 block in it set.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402
from cpu_precision import median_s  # noqa: E402

from monailabel_app.grounding import components, distances, helper_processes  # noqa: E402

SPACING = (2.5, 0.6, 0.7)
POINT = (30, 100, 100)


class Loop:
    """A thread that holds the interpreter ``duty`` of every ``step`` seconds (pure Python) until stopped."""

    def __init__(self, duty: float, step: float):
        self.duty, self.step, self.stop = duty, step, False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop:
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < self.duty * self.step:
                pass
            time.sleep((1 - self.duty) * self.step)

    def close(self):
        self.stop = True
        self.thread.join()


def median_ms(fn, repeat: int) -> float:
    return 1000 * median_s(fn, repeat)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duty", type=float, default=0.75, help="the loop's share of each step in Python")
    ap.add_argument("--step-ms", type=float, default=3.75, help="one decode step (ms)")
    ap.add_argument("--repeat", type=int, default=12)
    args = ap.parse_args()
    helper_processes.start(1)
    rng = np.random.default_rng(0)
    mask = np.zeros((60, 200, 200), bool)
    mask[10:50, 40:160, 30:170] = rng.random((40, 120, 140)) > 0.3
    calls = {
        "label": (lambda: components.label(mask), lambda: components.label_here(mask)),
        "component": (lambda: components.component_at(mask, POINT), lambda: components.component_here(mask, POINT)),
        "inside": (lambda: distances.inside(mask, SPACING), lambda: distances.inside_here(mask, SPACING)),
    }
    print(f"{os.cpu_count()} CPUs; mask {mask.shape}, {int(mask.sum())} voxels set; median of {args.repeat}")
    print("| loop | call | through a helper ms | in the thread ms |")
    print("|---|---|---|---|")
    for busy in (False, True):
        loop = Loop(args.duty, args.step_ms / 1000) if busy else None
        for name, (helper, here) in calls.items():
            label = f"{args.duty:.0%} of {args.step_ms} ms" if busy else "none"
            print(f"| {label} | {name} | {median_ms(helper, args.repeat):.1f} | {median_ms(here, args.repeat):.1f} |")
        if loop:
            loop.close()
    helper_processes.stop()


if __name__ == "__main__":
    main()
