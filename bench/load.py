#!/usr/bin/env python
"""Load on one server: many concurrent infer requests from several processes, on loopback.

    .venv/bin/python bench/load.py [--requests 50] [--processes 5] [--images 10] [--max-queue 8] [--ct 0]

Starts a MONAI Label server with the phantom model on a folder of phantom radiographs (and ``--ct`` CT
phantoms), then fires ``--requests`` infer requests at once from ``--processes`` processes (threads
inside each). Every answer must be a 200 whose report is the one of its own image, or a 503 with
Retry-After from the bounded queue; anything else is counted as an error. Prints p50/p95 latency of the
answered requests, throughput, the server's memory before and after, and exits 1 on any error or a
mixed-up answer.
"""

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import requests  # noqa: E402


def _fire(url: str, jobs: list[tuple[int, str]], start_at: float) -> list[dict]:
    """One process: each job in its own thread, all released at ``start_at``."""
    out, lock = [], threading.Lock()

    def one(i, image):
        time.sleep(max(0.0, start_at - time.time()))
        t0 = time.perf_counter()
        try:
            r = requests.post(f"{url}/infer/medgemma", params={"image": image, "output": "json"},
                              data={"params": "{}"}, timeout=600)
            body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
            item = {"i": i, "image": image, "status": r.status_code, "report": body.get("report"),
                    "detail": body.get("detail"), "retry_after": r.headers.get("retry-after")}
        except requests.RequestException as e:
            item = {"i": i, "image": image, "status": 0, "detail": f"{type(e).__name__}: {e}"}
        item["seconds"] = time.perf_counter() - t0
        with lock:
            out.append(item)

    threads = [threading.Thread(target=one, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def run_load(url: str, images: list[str], n_requests: int, processes: int) -> list[dict]:
    """Send ``n_requests`` at once (round-robin over ``images``) from ``processes`` processes."""
    jobs = [(i, images[i % len(images)]) for i in range(n_requests)]
    start_at = time.time() + 2.0
    with ProcessPoolExecutor(processes) as pool:
        parts = [pool.submit(_fire, url, jobs[p::processes], start_at) for p in range(processes)]
        return sorted((item for f in parts for item in f.result()), key=lambda x: x["i"])


def check(results: list[dict], expected: dict[str, str]) -> list[str]:
    """What went wrong: errors, answers that are not their image's, 503s without Retry-After."""
    problems = []
    for r in results:
        if r["status"] == 200:
            if r["report"] != expected[r["image"]]:
                problems.append(f"request {r['i']} ({r['image']}): got another image's answer: {r['report']!r}")
        elif r["status"] == 503:
            if not (r.get("retry_after") or "").isdigit():
                problems.append(f"request {r['i']}: 503 without Retry-After")
        else:
            problems.append(f"request {r['i']} ({r['image']}): HTTP {r['status']}: {r.get('detail')}")
    return problems


def rss_mib(pid: int) -> float:
    """Resident memory of a process and its children (MiB), from /proc."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            with open(f"/proc/{p}/task/{p}/children") as f:
                stack += [int(c) for c in f.read().split()]
        except (OSError, StopIteration):
            continue
    return total / 1024


def summary(results: list[dict], wall: float) -> str:
    done = [r["seconds"] for r in results if r["status"] == 200]
    refused = sum(r["status"] == 503 for r in results)
    lines = [f"{len(results)} requests: {len(done)} answered, {refused} refused with 503 + Retry-After, "
             f"{len(results) - len(done) - refused} errors; {wall:.1f} s wall"]
    if done:
        lines.append(f"answered: p50 {np.percentile(done, 50):.2f} s, p95 {np.percentile(done, 95):.2f} s, "
                     f"throughput {len(done) / wall:.2f} requests/s")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--processes", type=int, default=5)
    ap.add_argument("--images", type=int, default=10)
    ap.add_argument("--max-queue", type=int, default=8)
    args = ap.parse_args()

    from PIL import Image

    from monailabel_app.phantoms.films import make_phantom
    from monailabel_app.serve.server import ServerProcess

    with tempfile.TemporaryDirectory(prefix="medgemma_load_") as studies:
        expected = {}
        for seed in range(args.images):
            Image.fromarray(make_phantom(seed).image).save(os.path.join(studies, f"phantom_{seed}.png"))
            expected[f"phantom_{seed}"] = make_phantom(seed).report
        with ServerProcess(studies, conf={"max_queue": args.max_queue}) as server:
            before = rss_mib(server.proc.pid)
            t0 = time.perf_counter()
            results = run_load(server.url, sorted(expected), args.requests, args.processes)
            wall = time.perf_counter() - t0 - 2.0  # the common start delay
            after = rss_mib(server.proc.pid)
            alive = requests.get(server.url + "/info/", timeout=30).status_code == 200
    problems = check(results, expected)
    print(summary(results, wall))
    print(f"server memory: {before:.0f} MiB before, {after:.0f} MiB after; still answering /info/: {alive}")
    print(json.dumps({"problems": problems[:10]}, indent=1) if problems else "no lost or mixed-up answers")
    sys.exit(1 if problems or not alive else 0)


if __name__ == "__main__":
    main()
