#!/usr/bin/env python
"""The GPU benchmark's CT reading with the map threads' lock-free copies, against the lock-holding operations
they replaced, interleaved in one process (the H200 hosts lent differ by 20 % from one machine to the next, so
runs on different machines cannot tell such a change apart).

    python bench/lock_ab.py [--rounds 2]

"held": ``np.zeros`` for the maps' zeros (numpy 2 holds the interpreter's lock through its ``calloc``),
``np.repeat`` for a coarse mask's unpooling, and labels and distances under 2^18 voxels in the map thread;
"free": the library as it is (:func:`allocator.zeros`, :func:`blocks.blocks_back`, helpers from 2^16 voxels).
Each row: the median of three readings after a warm one (``fast_path.project_read``); then one reading each
way, whose label maps must be equal.
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import ExitStack, contextmanager
from unittest import mock

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import fast_path  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from fast_path import CT_FINDINGS, ct, emit, project_read, reader_for, report  # noqa: E402
from medgemma_shapes import build  # noqa: E402

from monailabel_app.grounding import ct_extent, ct_maps, extent, helper_processes, maps, study_maps  # noqa: E402
from monailabel_app.model.capture import CAPTURE_ATTN  # noqa: E402


def repeated(small, step, shape=None, fill=0, out=None):
    """The unpooling as it was: np.repeat twice, then copied into place."""
    full = np.full(out.shape if out is not None else shape, fill, small.dtype)
    big = np.repeat(np.repeat(small, step, axis=-2), step, axis=-1)
    full[..., : big.shape[-2], : big.shape[-1]] = big
    if out is None:
        return full
    out[...] = full
    return out


@contextmanager
def lock_held():
    with ExitStack() as stack:
        for module in (extent, ct_extent, maps, ct_maps, study_maps):
            stack.enter_context(mock.patch.object(module, "zeros", np.zeros))
        stack.enter_context(mock.patch.object(ct_extent, "blocks_back", repeated))
        stack.enter_context(mock.patch.object(helper_processes, "MIN_VOXELS", 1 << 18))
        yield


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    model, processor = build("cuda", torch.bfloat16, attn=CAPTURE_ATTN)
    reader = reader_for(model, processor, "bf16")
    study, answer = ct(3), report(processor.tokenizer, CT_FINDINGS)
    emit(f"### bench/lock_ab.py on {torch.cuda.get_device_name()}: the CT reading, map threads' lock held or free")
    emit()
    emit("| round | maps' copies | end to end s | ms / decode token | maps after the answer s | "
         "maps waited for s | decode loop's callbacks s |")
    emit("|---|---|---|---|---|---|---|")
    for r in range(1, args.rounds + 1):
        for name in ("held", "free"):
            with (lock_held() if name == "held" else ExitStack()):
                f = project_read(reader, fast_path.fresh(study), answer)
            emit(f"| {r} | {name} | {f['total']:.3f} | {f['ms_token']:.2f} | {f['maps']:.3f} | "
                 f"{f['maps_ahead_wait']:.3f} | {f['host']['callbacks']:.3f} |")
    emit()
    labels = {}
    for name in ("held", "free"):
        with (lock_held() if name == "held" else ExitStack()):
            labels[name] = reader.read(fast_path.fresh(study), answer=answer).labels
    same = labels["held"].shape == labels["free"].shape and bool(np.array_equal(labels["held"], labels["free"]))
    emit(f"Label maps equal: {same} ({int(np.count_nonzero(labels['free']))} voxels labelled)")
    emit()


if __name__ == "__main__":
    main()
