#!/usr/bin/env python
"""The GPU memory a server keeps, and the time it takes, as readings of different shapes follow one another.

    python bench/decoder_cache_memory.py [--order xray,ct,ct40,xray,ct,ct40,xray] [--most-kept N]

The reader keeps a compiled, captured decoder per prompt shape (``decoding.decoder_for``), each with its KV cache and
CUDA graphs: a CT's holds gigabytes. Two are always kept (the two used last); a GPU with room keeps up to
``decoding.GRAPH_CACHE_MAX`` (``--most-kept``: 2 is the policy before, each new shape dropping the least recently
used one). This reads MedGemma-4B's shapes (random weights, bf16, ``fast_path.py``'s studies and 200-token reports)
in the given order (``ct40``: a CT of 40 slices, a third shape) and prints, after each reading, the GPU's allocated
and reserved memory, the decoders kept and the reading's seconds: a reading whose decoder was kept takes its warm
time; the allocated memory should stop growing once every shape has its decoder, whatever the order.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--order", default="xray,ct,ct40,xray,ct,ct40,xray")
    ap.add_argument("--most-kept", type=int, default=None, help="decoders kept at most (the library's: "
                    "decoding.GRAPH_CACHE_MAX on a GPU with room)")
    args = ap.parse_args(argv)
    import torch

    from monailabel_app.model import decoding

    if args.most_kept is not None:
        decoding.GRAPH_CACHE_MAX = args.most_kept
    from fast_path import CT_FINDINGS, XRAY_FINDINGS, ct, fresh, reader_for, report, xray
    from medgemma_shapes import build

    from monailabel_app.model.capture import CAPTURE_ATTN

    model, processor = build("cuda", torch.bfloat16, attn=CAPTURE_ATTN)
    reader = reader_for(model, processor, "bf16")
    studies = {"xray": (xray(0), report(processor.tokenizer, XRAY_FINDINGS)),
               "ct": (ct(3), report(processor.tokenizer, CT_FINDINGS)),
               "ct40": (ct(3, shape=(40, 512, 512)), report(processor.tokenizer, CT_FINDINGS))}
    gib = 2 ** -30
    torch.cuda.synchronize()
    print(f"weights: {torch.cuda.memory_allocated() * gib:.2f} GiB allocated; decoders kept: at least "
          f"{decoding.GRAPH_CACHE}, at most {decoding.GRAPH_CACHE_MAX} while {decoding.GRAPH_CACHE_FREE * gib:.0f} GiB "
          f"stay free")
    print("| reading | study | s | allocated GiB | reserved GiB | decoders kept |")
    print("|---|---|---|---|---|---|")
    for n, name in enumerate(args.order.split(","), 1):
        study, answer = studies[name]
        t0 = time.perf_counter()
        r = reader.read(fresh(study), answer=answer)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        del r
        kept = model.__dict__.get("_medgemma_decoders", {})
        shapes = ", ".join(f"{d.length} tokens" for d in kept.values())
        print(f"| {n} | {name} | {seconds:.2f} | {torch.cuda.memory_allocated() * gib:.2f} | "
              f"{torch.cuda.memory_reserved() * gib:.2f} | {len(kept)} ({shapes}) |", flush=True)


if __name__ == "__main__":
    main()
