#!/usr/bin/env python
"""Which of the maps' array operations hold the interpreter's lock, and for how long.

    python bench/gil_hold.py [--repeat 10]

A CT's maps run in threads of the serving process beside the GPU's decode loop, which needs the interpreter
between its graph replays. A C call that holds the interpreter's lock for tens of milliseconds stops every
other thread for that long, whatever the switch interval (it only interrupts Python code). py-spy's ``--gil``
samples of run BL showed the map threads holding it in ``np.repeat`` (the unpooling of a large kind's coarse
mask) and on lines that allocate volume-sized zeros.

For each operation, on arrays of a 134-slice 512 x 512 CT, with the serving process's malloc policy
(:func:`allocator.keep_freed_memory`): its time, and how fast a pure-Python counting thread ran meanwhile, as a
share of its speed alone (100 %: the operation let the interpreter go; near 0: it held it throughout). On two
cores the counter shares the machine with the operation, so only low shares mean anything.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from monailabel_app import allocator  # noqa: E402
from monailabel_app.grounding import components, distances  # noqa: E402
from monailabel_app.grounding.blocks import blocks_back  # noqa: E402


class Counter:
    """A thread that counts in pure Python until stopped: its speed says how much of the interpreter it gets."""

    def __init__(self):
        self.count, self.stop = 0, False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        n = 0
        while not self.stop:
            n += 1
            if not n % 512:
                self.count = n

    def speed(self, work, repeat: int) -> tuple[float, float]:
        """(ms per call of ``work``, counts per second meanwhile)."""
        c0, t0 = self.count, time.perf_counter()
        for _ in range(repeat):
            work()
        dt = time.perf_counter() - t0
        return 1000 * dt / repeat, (self.count - c0) / dt


def operations() -> dict:
    rng = np.random.default_rng(0)
    shape = (134, 512, 512)
    coarse = rng.random((134, 170, 170)) > 0.6  # a large kind's mask on planes of 3 x 3 blocks
    volume = np.zeros(shape, bool)
    box = (slice(0, 134), slice(0, 510), slice(0, 510))
    ones = np.ones(shape, bool)
    heat = rng.random(shape, dtype=np.float32)
    ball = np.zeros((40, 60, 60), bool)  # a focal region's box: under the helpers' 2^18 voxels
    ball[5:35, 10:50, 10:50] = True
    pieces = rng.random((60, 120, 120)) > 0.55  # many small pieces: a labelling in the thread
    return {
        "np.zeros bool (35 MB)": lambda: np.zeros(shape, bool),
        "np.zeros float64 (281 MB)": lambda: np.zeros(shape, np.float64),
        "allocator.zeros bool (np.empty + fill)": lambda: allocator.zeros(shape, bool),
        "allocator.zeros float64": lambda: allocator.zeros(shape, np.float64),
        "np.repeat twice (the old unpooling)": lambda: np.repeat(np.repeat(coarse, 3, axis=-2), 3, axis=-1),
        "blocks_back into a box": lambda: blocks_back(coarse, 3, fill=False, out=volume[box]),
        "copy bool": lambda: ones.copy(),
        "bool & bool": lambda: ones & ones,
        "float32 >= level": lambda: heat >= 0.5,
        "argmax float32": lambda: heat.argmax(),
        "edt in the thread (144k voxels; a helper's from 2^16)": lambda: distances.inside_here(ball, (2.5, 0.6, 0.7)),
        "cc3d label in the thread (864k voxels; a helper's from 2^16)": lambda: components.label_here(pieces),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()
    kept = allocator.keep_freed_memory()
    print(f"numpy {np.__version__}, torch {torch.__version__}, Python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs, malloc keeps freed memory: {kept}\n")
    counter = Counter()
    time.sleep(0.2)
    alone = counter.speed(lambda: time.sleep(0.05), 4)[1]
    print("| operation | ms a call | a Python thread's speed meanwhile |\n|---|---|---|")
    for name, work in operations().items():
        work()  # the heap grown, the pages mapped: as in a reading after the first
        ms, speed = counter.speed(work, args.repeat)
        print(f"| {name} | {ms:.1f} | {100 * speed / alone:.0f} % |", flush=True)
    counter.stop = True


if __name__ == "__main__":
    main()
