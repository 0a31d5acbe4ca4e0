#!/usr/bin/env python
"""Grounding table on held-out phantoms: (a) raw attention, (b) final masks, (c) text-only, (d) chance.

    .venv/bin/python bench/grounding.py [--seeds 0:300] [--model DIR]

Prints zone accuracy and, per map, pointing game (within half a token cell, and strict) and Dice; see
monailabel_app/grounding.py for the exact definitions. Seeds 0..99999 were never used in training.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from monailabel_app.grounding import evaluate, table  # noqa: E402
from monailabel_app.reader import Reader  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0:300", help="START:STOP of held-out phantom seeds")
    ap.add_argument("--model", default=None)
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args()
    start, stop = (int(x) for x in args.seeds.split(":"))
    reader = Reader(args.model)
    t0 = time.time()
    result = evaluate(reader, range(start, stop))
    result["seconds"] = round(time.time() - t0, 1)
    result["model"] = reader.info.public()
    result["layers"] = reader.layers
    print(table(result))
    print(f"({result['seconds']} s on {reader.info.device}, {reader.info.precision}; layers {reader.layers})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
