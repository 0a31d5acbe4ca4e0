#!/usr/bin/env python
"""The vision tower's attention on the GPU: SigLIP's head size of 72 as PyTorch runs it, against the same heads
zero-padded to a wider size that the fused kernels are tuned for.

    python bench/tower_attention.py [--images 16] [--repeat 7]

MedGemma's tower (SigLIP, 896 px images in 14 px patches) attends over 4,096 patches an image with 16 heads of 72 in
each of its 27 layers. On an H100 a CT's 85 images spend 0.51 s of their 1.6 s prefill in that attention (run DM:
cuDNN's Hopper flash kernel at 349 TFLOPS, 35 % of the card's bf16 rate), more than any other kernel. Zeros added to
a head's queries and keys leave every dot product, so every softmax weight, as it was; zeros added to its values
add output columns of zeros that are cut off. With the scale given as 72 ** -0.5 the padded call is the same
attention, in another kernel's summation order.

Each variant runs as a layer of the tower calls it (``transformers``' SDPA path): the projections' outputs
(images, patches, heads x 72) viewed as (images, heads, patches, 72), and the output made (images, patches,
heads x 72) again. The padded ones pay their padding copies and the output's slice inside the time. The table
gives the card's ms a call (CUDA events, median of ``--repeat``), the rate on the unpadded FLOPs, the largest
difference from the default's output, and the seconds a CT's 85 images would spend (27 layers).

Run DY (H100, thirty-ninth session; ``bench/results/fast_path.md``): **padding is slower.** PyTorch's default
(cuDNN) at 72 took 3.18 ms a call (389 TFLOPS), at 80-128 4.03-4.14 ms; FlashAttention-2 5.2-7.1 ms, the
memory-efficient kernel 12-13 ms. Padded inside the whole prefill (a switch tried in the library, then removed)
the tower took 1.26-1.27 s against 1.10-1.12 s, the CT reading 2.715-2.724 s against 2.553-2.558 s.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

HEADS, HEAD, PATCHES, LAYERS, CT_IMAGES = 16, 72, 4096, 27, 85
BACKENDS = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def layer_call(q, k, v, backend, width: int):
    """One layer's attention from the projections' outputs (B, S, H*72) to the output (B, S, H*72), its heads padded
    to ``width`` when wider than 72."""
    b, s, _ = q.shape
    heads = [x.view(b, s, HEADS, HEAD) for x in (q, k, v)]
    if width > HEAD:
        heads = [F.pad(x, (0, width - HEAD)) for x in heads]
    heads = [x.transpose(1, 2) for x in heads]
    if backend is None:
        out = F.scaled_dot_product_attention(*heads, scale=HEAD ** -0.5)
    else:
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(*heads, scale=HEAD ** -0.5)
    return out[..., :HEAD].transpose(1, 2).reshape(b, s, HEADS * HEAD)


def timed_ms(fn, repeat: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=16, help="images a call (the tower's pass; default 16)")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--widths", default="72,80,96,128")
    ap.add_argument("--backends", default="default,cudnn,flash,efficient")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to time")
        return 0
    torch.manual_seed(0)
    shape = (args.images, PATCHES, HEADS * HEAD)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    reference = layer_call(q, k, v, None, HEAD).float()
    flops = 4 * args.images * HEADS * PATCHES * PATCHES * HEAD
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {args.images} images x {HEADS} heads x "
          f"{PATCHES} patches x {HEAD}, bf16")
    print("| backend | head width | ms a call | TFLOPS (72-wide FLOPs) | largest difference | a CT's 85 images s |")
    print("|---|---|---|---|---|---|")
    for name in args.backends.split(","):
        for width in (int(w) for w in args.widths.split(",")):
            backend = BACKENDS[name]
            try:
                out = layer_call(q, k, v, backend, width).float()
                ms = timed_ms(lambda: layer_call(q, k, v, backend, width), args.repeat)
            except RuntimeError as e:  # a backend that does not take this shape
                print(f"| {name} | {width} | - ({str(e).splitlines()[0][:80]}) | | | |")
                continue
            diff = float((out - reference).abs().max())
            ct_s = ms / 1000 * LAYERS * CT_IMAGES / args.images
            print(f"| {name} | {width} | {ms:.3f} | {flops / ms / 1e9:.0f} | {diff:.4f} | {ct_s:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
