#!/usr/bin/env python
"""py-spy's raw samples reduced to small tables: which threads held the samples, and where in the project.

    py-spy record --gil --threads --nonblocking -r 100 -f raw -o spy.txt -- python bench/fast_path.py ...
    python bench/spy_summary.py spy.txt [--top 30] [--skip torch/_dynamo,torch/_inductor]

py-spy's raw file (one line per distinct stack: ``thread (id): name;frame;...;frame count``) runs to tens of
megabytes for a benchmark; the device gives back only small files, so it is reduced where it was recorded.
With ``--gil`` only the thread holding the interpreter's lock is sampled: the tables then say who held it.

Printed (markdown): samples per thread kind (the thread's name without its number: ``maps_3`` -> ``maps``);
per kind, the deepest frame of this project's code (``monailabel_app/``, ``bench/``) and the leaf frame, each
with its share of that kind's samples. Stacks with a frame matching ``--skip`` are left out (compiling).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict

PROJECT = ("monailabel_app/", "bench/")


def thread_kind(head: str) -> str:
    """``thread (0x7f..): maps_3`` -> ``maps``; a thread without a name -> ``thread``."""
    name = head.split(":", 1)[1].strip() if ":" in head else "thread"
    return re.sub(r"[_-]?\d+$", "", name) or name


def frame_name(frame: str) -> str:
    """``func (path/to/file.py:12)`` -> ``func (file.py:12)``."""
    m = re.match(r"(.*) \((.*?)\)$", frame)
    if not m:
        return frame
    return f"{m.group(1)} ({m.group(2).rsplit('/', 1)[-1]})"


def summarise(lines, skip: tuple[str, ...] = ()) -> tuple[Counter, dict, dict, int]:
    """(samples per kind, per kind a Counter of deepest project frames, per kind a Counter of leaves, skipped)."""
    kinds: Counter = Counter()
    deepest: dict = defaultdict(Counter)
    leaves: dict = defaultdict(Counter)
    skipped = 0
    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            continue
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        head, *frames = stack.split(";")
        if any(s in f for f in frames for s in skip):
            skipped += n
            continue
        kind = thread_kind(head)
        kinds[kind] += n
        own = [f for f in frames if any(p in f for p in PROJECT)]
        deepest[kind][frame_name(own[-1]) if own else "(no project frame)"] += n
        leaves[kind][frame_name(frames[-1]) if frames else "(empty)"] += n
    return kinds, deepest, leaves, skipped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("raw", help="py-spy's raw output (-f raw)")
    ap.add_argument("--top", type=int, default=30, help="rows per table")
    ap.add_argument("--skip", default="torch/_dynamo,torch/_inductor,torch/fx",
                    help="leave out stacks with a frame containing any of these (comma-separated)")
    args = ap.parse_args()
    with open(args.raw) as f:
        kinds, deepest, leaves, skipped = summarise(f, tuple(s for s in args.skip.split(",") if s))
    total = sum(kinds.values())
    print(f"{total} samples ({skipped} more left out: {args.skip})\n")
    print("| thread kind | samples | share |\n|---|---|---|")
    for kind, n in kinds.most_common():
        print(f"| {kind} | {n} | {100 * n / max(total, 1):.1f} % |")
    for kind, n in kinds.most_common():
        if n < total / 100:
            continue
        for title, table in (("deepest project frame", deepest[kind]), ("leaf frame", leaves[kind])):
            print(f"\n**{kind}** ({n} samples), by {title}\n\n| frame | samples | share |\n|---|---|---|")
            for frame, m in table.most_common(args.top):
                print(f"| {frame} | {m} | {100 * m / n:.1f} % |")


if __name__ == "__main__":
    main()
