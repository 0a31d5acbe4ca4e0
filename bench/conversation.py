#!/usr/bin/env python
"""First turn vs follow-up question on one study (phantom model, this machine).

    python bench/conversation.py [--runs 5]

The first turn reads the study (prefill of images and question, answer, maps); a follow-up continues the
conversation from its kept context, so only the new question is prefilled. Prints per study kind the
median of ``--runs`` (prefill, decode, end to end, new tokens) for both, and the ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from monailabel_app.io.xray import Geometry, Radiograph  # noqa: E402
from monailabel_app.phantoms.ct import make_ct_phantom, phantom_volume  # noqa: E402
from monailabel_app.phantoms.films import make_phantom  # noqa: E402
from monailabel_app.reader import Reader  # noqa: E402

FOLLOW_UP = "Is it on the right?"


def measure(reader: Reader, make_study, runs: int) -> dict:
    first, follow = [], []
    for i in range(runs + 1):  # the first round warms up
        study = make_study(i)
        t0 = time.perf_counter()
        a = reader.read(study, keep=True)
        t1 = time.perf_counter()
        b = reader.follow_up(a.study, a.generation.conversation, FOLLOW_UP)
        t2 = time.perf_counter()
        if i:
            first.append((t1 - t0, a.latencies))
            follow.append((t2 - t1, b.latencies))

    def summary(rows):
        return {"total": statistics.median(t for t, _ in rows),
                "prefill": statistics.median(lat["decoder_prefill"] for _, lat in rows),
                "decode": statistics.median(lat["decoder_decode"] for _, lat in rows),
                "tokens": statistics.median(lat["new_tokens"] for _, lat in rows),
                "reused": statistics.median(lat["decoder_reused_tokens"] for _, lat in rows)}

    return {"first": summary(first), "follow": summary(follow)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args(argv)
    reader = Reader()
    print(f"phantom model, {reader.info.device}, {reader.info.precision}; median of {args.runs}; follow-up: {FOLLOW_UP!r}")
    print("| study | turn | prefill s | decode s | new tokens | tokens from kept context | end to end s |")
    print("|---|---|---|---|---|---|---|")
    kinds = {
        "X-ray phantom": lambda i: Radiograph(make_phantom(100 + i).image, Geometry.plain(*make_phantom(100 + i).image.shape)),
        "CT phantom (20 slices)": lambda i: phantom_volume(make_ct_phantom(100 + i)),
    }
    for name, make in kinds.items():
        m = measure(reader, make, args.runs)
        for turn in ("first", "follow"):
            s = m[turn]
            print(f"| {name} | {'first' if turn == 'first' else 'follow-up'} | {s['prefill']:.3f} | {s['decode']:.3f} | "
                  f"{s['tokens']:.0f} | {s['reused']:.0f} | {s['total']:.3f} |")
        print(f"| {name} | follow-up / first | | | | | **{m['follow']['total'] / m['first']['total']:.2f}** |", flush=True)


if __name__ == "__main__":
    main()
