#!/usr/bin/env python
"""A decode step's attention, one layer, on the GPU: the torch path against the Triton kernel split over the keys.

    python bench/decode_attention.py [--steps 200]

MedGemma-4B's layer shape (8 query heads over 4 KV heads, 256 wide), bf16, over the caches a reading's decode
attends: a CT's full layer (22,784 slots: 22,532 prompt tokens and 200 answer tokens, rounded up to 256) and its
sliding layers' ring (1,088: the window of 1,024 and the replays' spare slots), a film's layers (512), and a batch
of 64 films (768). A recorded layer (a full one) also makes its weights over every key.

Each path is compiled as the decode step is (``torch.compile``) and ``--steps`` calls of it are captured in one
CUDA graph, as the step's replays run them; the table gives the card's time a call (CUDA events around a replay,
the median of five), the largest difference of the output and of the weights from the torch path's, and what
one CT step and one film step would save: 5 full layers and 29 sliding ones; a film's 34 layers alike.

``--chunks 128,352,512`` also times the kernel on the CT's full layer with each of those keys a program (the
library's: the fewest that make one wave of two programs a multiprocessor on the card, ``decode_kernel.chunk_for``;
256 before run DG, whose 356 programs took 1.35 waves on an H100). ``--lengths 22784,11008,4352`` times them at
those full-layer lengths (a CT of 85, about 40 and about 16 slices)."""

from __future__ import annotations

import argparse
import statistics

import torch

from monailabel_app.model import capture, decode_kernel

HEADS, KV_HEADS, HEAD = 8, 4, 256
SHAPES = [  # name, batch, cache slots, recorded
    ("CT full layer", 1, 22784, True),
    ("CT sliding ring", 1, 1088, False),
    ("film layer", 1, 512, True),
    ("64 films' layer", 64, 768, True),
]


def torch_path(q, k, v, mask, scale, records):
    weights = capture.decode_weights(q, k, mask, scale)
    return capture.decode_attention(q, k, v, mask, scale, weights), weights if records else None


def kernel_path(q, k, v, mask, scale, records):
    return decode_kernel.attention(q, k, v, mask, scale, scores=records)


def graphed_ms(fn, args, steps: int) -> tuple[float, tuple]:
    """The card's ms a call of ``fn`` compiled, ``steps`` calls replayed as one CUDA graph (median of five)."""
    # one compile a shape, as a decoder's step; in one graph, so that a break (the card's multiprocessors that set the
    # kernel's keys a program are a constant to the compiler) fails here, not a slower step in a reading
    compiled = torch.compile(fn, dynamic=False, fullgraph=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            out = compiled(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(steps):
            out = compiled(*args)
    times = []
    for _ in range(6):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / steps)
    return statistics.median(times[1:]), out


def layer_inputs(batch: int, slots: int, records: bool, padded: bool = True) -> tuple:
    """A decode step's attention call on one layer: (query, keys, values, mask, scale, records); the mask hides the
    150 answer slots not written yet and, ``padded``, the first row's 40 left-padded slots."""
    q = torch.randn(batch, HEADS, 1, HEAD, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(batch, KV_HEADS, slots, HEAD, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mask = torch.ones(batch, 1, 1, slots, device="cuda", dtype=torch.bool)
    mask[..., slots - 150:] = False
    if padded:
        mask[0, ..., :40] = False
    return q, k, v, mask, HEAD ** -0.5, records


def chunk_table(lengths: list[int], asked: list[int], steps: int) -> None:
    """The kernel on a full layer of each length, with the library's keys a program for this card (one wave), its
    256 before run DG, and each asked for: ms a call and the rate its keys and values are read at."""
    print("\n| full-layer slots | keys a program | programs | kernel ms | keys and values read at TB/s |")
    print("|---|---|---|---|---|")
    for slots in lengths:
        inputs = layer_inputs(1, slots, True, padded=False)
        gb = 2 * KV_HEADS * slots * HEAD * 2 / 1e9
        library = decode_kernel.chunk_for(slots, KV_HEADS, decode_kernel.multiprocessors(inputs[0].device))
        for c in dict.fromkeys([library, 256, *asked]):
            ms = graphed_ms(lambda *a, c=c: decode_kernel.attention(*a[:5], scores=a[5], chunk=c), inputs, steps)[0]
            label = f"{c}" + (" (the library's: one wave)" if c == library else "") + (" (before)" if c == 256 else "")
            print(f"| {slots} | {label} | {KV_HEADS * -(-slots // c)} | {ms:.4f} | {gb / ms:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--chunks", default="", help="keys a program takes on the CT's full layer, comma-separated")
    ap.add_argument("--lengths", default="", help="with --chunks: full-layer slots to time them at, comma-separated "
                    "(default: the CT's 22,784 alone)")
    args = ap.parse_args()
    # one compile per shape and chunk, of few functions' code (run DH's lengths stopped at the default limit of 8)
    torch._dynamo.config.recompile_limit = 64
    print(f"### bench/decode_attention.py on {torch.cuda.get_device_name()} (torch {torch.__version__})\n")
    print("| layer | batch | slots | recorded | torch path ms | kernel ms | output's largest difference | "
          "weights' largest difference |")
    print("|---|---|---|---|---|---|---|---|")
    torch.manual_seed(0)
    per_layer = {}
    for name, batch, slots, records in SHAPES:
        inputs = layer_inputs(batch, slots, records)
        torch_ms, (ref, ref_w) = graphed_ms(torch_path, inputs, args.steps)
        kernel_ms, (out, w) = graphed_ms(kernel_path, inputs, args.steps)
        diff_w = f"{(w - ref_w).abs().max().item():.2e}" if records else "-"
        print(f"| {name} | {batch} | {slots} | {records} | {torch_ms:.4f} | {kernel_ms:.4f} | "
              f"{(out.float() - ref.float()).abs().max().item():.2e} | {diff_w} |")
        per_layer[name] = (torch_ms, kernel_ms)
    ct_full, ring, film = per_layer["CT full layer"], per_layer["CT sliding ring"], per_layer["film layer"]
    if args.chunks:
        lengths = [int(n) for n in args.lengths.split(",") if n] or [SHAPES[0][2]]
        chunk_table(lengths, [int(c) for c in args.chunks.split(",") if c], args.steps)
    print()
    for label, parts in (("a CT step (5 full layers, 29 sliding)", [(5, ct_full), (29, ring)]),
                         ("a film step (34 layers)", [(34, film)]),
                         ("a CT step, the kernel on its full layers only", [(5, ct_full)])):
        saved = sum(n * (t - kern) for n, (t, kern) in parts)
        print(f"- {label}: {saved:.3f} ms saved a step ({200 * saved:.1f} ms over 200 tokens)")


if __name__ == "__main__":
    main()
