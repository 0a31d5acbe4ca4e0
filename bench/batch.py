#!/usr/bin/env python
"""Batch pre-labelling throughput: the local engine and Ray, on the same phantom dataset.

    .venv/bin/python bench/batch.py [--xrays 40] [--cts 4] [--workers 2] [--out bench/results/batch.md]

Draws X-ray and CT phantoms into a temporary folder, runs ``medgemma-label batch`` on it with each
engine (a fresh output folder each), and prints studies per second end to end (model loading and, for
Ray, start-up included) and while reading, per worker for Ray.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from monailabel_app.io.writers import write_in_geometry  # noqa: E402
from monailabel_app.phantoms.ct import make_ct_phantom, phantom_volume  # noqa: E402
from monailabel_app.phantoms.films import make_phantom  # noqa: E402


def dataset(folder: str, xrays: int, cts: int) -> None:
    for seed in range(xrays):
        Image.fromarray(make_phantom(seed).image).save(os.path.join(folder, f"xray_{seed:03d}.png"))
    for seed in range(cts):
        vol = phantom_volume(make_ct_phantom(seed))
        write_in_geometry(vol.hu, vol.geometry, os.path.join(folder, f"ct_{seed:03d}.nii.gz"), np.float32)


def run(folder: str, out: str, *extra) -> tuple[float, list[dict]]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "monailabel_app.cli", "batch", "--no-progress", "-i", folder, "-o", out,
                        *extra], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"batch failed ({r.returncode}):\n{r.stderr[-3000:]}")
    with open(os.path.join(out, "manifest.jsonl")) as f:
        return seconds, [json.loads(line) for line in f]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--xrays", type=int, default=40)
    ap.add_argument("--cts", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=None, help="also write the table as markdown here")
    args = ap.parse_args()
    lines = [f"## bench/batch.py, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, phantom model",
             "", f"{args.xrays} X-ray phantoms + {args.cts} CT phantoms (20 slices shown each)", "",
             "| engine | studies | wall s (model load, start-up included) | studies/s end to end | studies/s while reading |",
             "|---|---|---|---|---|"]
    per_worker = []
    with tempfile.TemporaryDirectory(prefix="medgemma_bench_batch_") as tmp:
        data = os.path.join(tmp, "data")
        os.makedirs(data)
        dataset(data, args.xrays, args.cts)
        for engine, extra in (("local", ()), (f"ray, {args.workers} CPU workers", ("--engine", "ray", "--workers", str(args.workers)))):
            seconds, rows = run(data, os.path.join(tmp, engine.split(",")[0]), *extra)
            reading = sum(r["latency_s"] for r in rows)
            workers = {}
            for r in rows:
                workers.setdefault(r["worker"], []).append(r["latency_s"])
            parallel = len(rows) / max(max(sum(v) for v in workers.values()), 1e-9)
            lines.append(f"| {engine} | {len(rows)} | {seconds:.1f} | {len(rows) / seconds:.2f} | {parallel:.2f} |")
            if len(workers) > 1:
                per_worker += [f"- {engine}: worker {w}: {len(v)} studies, {len(v) / sum(v):.2f} studies/s while reading"
                               for w, v in sorted(workers.items())]
            print(lines[-1], f"(sum of per-study latencies {reading:.1f} s)", flush=True)
    text = "\n".join(lines + [""] + per_worker) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
