#!/usr/bin/env python
"""Where a CT's slices for the model go on a GPU reader (``io.ct.model_slices``: before the prefill, on its path).

    python bench/model_slices_parts.py [--runs 7]

The benchmark's CT (``fast_path.ct``: 200 x 512 x 512 float32 HU), 85 slices: the library's call, the same before
``io.ct.upload_planes``, then the parts one by one (median of ``--runs``, each synchronised): the planes gathered on the host, their upload
(pageable, and from page-locked memory), the windowing on the device, the RGB squares copied back for the reading's
``model_inputs``. Run CA (H200 host) timed the whole at 0.036 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args(argv)
    import numpy as np
    import torch
    from fast_path import ct

    from monailabel_app.io.ct import SquarePad, model_slices, sample_slices, windowed

    device = torch.device("cuda")
    volume = ct(3)
    indices = sample_slices(volume.shape[0], 85)
    pad = SquarePad(volume.shape[1], volume.shape[2])

    def timed(fn):
        times = []
        for _ in range(args.runs):
            torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    gathered = np.ascontiguousarray(volume.hu[indices], np.float32)
    pinned = torch.empty(gathered.shape, dtype=torch.float32).pin_memory()
    planes = torch.from_numpy(gathered).to(device)
    square = torch.full((len(indices), pad.side, pad.side), -1024.0, dtype=torch.float32, device=device)
    rgb = windowed(square)

    def window():
        square[:, pad.top : pad.top + pad.rows, pad.left : pad.left + pad.cols] = planes
        return windowed(square)

    def before():  # the library's before upload_planes: numpy's gather, a pageable upload
        up = torch.from_numpy(np.ascontiguousarray(volume.hu[indices], np.float32)).to(device)
        padded = torch.full((len(indices), pad.side, pad.side), -1024.0, dtype=torch.float32, device=device)
        padded[:, pad.top : pad.top + pad.rows, pad.left : pad.left + pad.cols] = up
        return windowed(padded).permute(0, 2, 3, 1).contiguous().cpu().numpy()

    chosen = torch.tensor(indices, dtype=torch.long)
    rows = [
        ("the library's model_slices (all of it)", lambda: model_slices(volume, 85, device=device)),
        ("the same before upload_planes (numpy's gather, a pageable upload)", before),
        ("planes gathered by torch into page-locked memory (index_select(out=))",
         lambda: torch.index_select(torch.from_numpy(volume.hu), 0, chosen, out=pinned)),
        ("planes gathered on the host (np.ascontiguousarray(hu[indices]))",
         lambda: np.ascontiguousarray(volume.hu[indices], np.float32)),
        ("planes gathered into page-locked memory (np.take(out=))",
         lambda: np.take(volume.hu, indices, axis=0, out=pinned.numpy())),
        ("upload, pageable", lambda: torch.from_numpy(gathered).to(device)),
        ("upload, page-locked", lambda: pinned.to(device, non_blocking=True)),
        ("padded and windowed on the device", window),
        ("RGB squares copied back (the reading's model_inputs)",
         lambda: rgb.permute(0, 2, 3, 1).contiguous().cpu().numpy()),
    ]
    print(f"### bench/model_slices_parts.py on {torch.cuda.get_device_name()}: 85 of {volume.shape} float32 HU, "
          f"median of {args.runs}")
    print()
    print("| part | ms |")
    print("|---|---|")
    for name, fn in rows:
        fn()  # once first (allocations, kernels)
        print(f"| {name} | {1000 * timed(fn):.2f} |", flush=True)


if __name__ == "__main__":
    main()
