"""The decode step's matrix products alone, on a CUDA GPU: MedGemma-4B's text projections at one row (one
study) and at 64 rows (a batch), each captured in a CUDA graph of ``REPEAT`` calls so that launches do not
count, as achieved memory bandwidth (the weights' bytes over the time: a decode step only reads them).

Rows: each projection alone (cuBLAS through ``F.linear``), q/k/v and gate/up fused into one product (what
:func:`monailabel_app.model.decoding` could do), ``torch.compile`` with max-autotune (Triton templates against
cuBLAS), and int8 weight-only (int8 weights, per-channel scales, the dequantisation fused by Inductor: what
torchao's ``Int8WeightOnlyConfig`` compiles to).

    python bench/decode_gemm.py [--out bench/results/decode_gemm.md]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

HIDDEN, INTER, Q, KV = 2560, 10240, 8 * 256, 4 * 256
SHAPES = {  # name: (in, out) features of MedGemma-4B's text layer (34 of them) and output head
    "q": (HIDDEN, Q), "k (v alike)": (HIDDEN, KV), "o": (Q, HIDDEN), "gate (up alike)": (HIDDEN, INTER),
    "down": (INTER, HIDDEN), "q+k+v fused": (HIDDEN, Q + 2 * KV), "gate+up fused": (HIDDEN, 2 * INTER),
    "output head": (HIDDEN, 262208),
}
REPEAT = 50
LINES: list[str] = []


def emit(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)


def timed(fn, x) -> float:
    """Seconds per call of ``fn(x)``, replayed from a CUDA graph of REPEAT calls (median of 5 replays)."""
    for _ in range(3):
        fn(x)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(REPEAT):
            fn(x)
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        t = time.perf_counter()
        g.replay()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) / REPEAT)
    return sorted(times)[2]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,64")
    ap.add_argument("--autotune", default="q,k (v alike),o,q+k+v fused", help="shapes to compile with max-autotune")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    emit(f"## bench/decode_gemm.py on {torch.cuda.get_device_name()} (torch {torch.__version__}), "
         f"{time.strftime('%Y-%m-%d')}")
    emit()
    emit("| rows | product | weights MB | cuBLAS us | GB/s | max-autotune us | int8 weight-only us |")
    emit("|---|---|---|---|---|---|---|")
    torch.manual_seed(0)
    for m in [int(r) for r in args.rows.split(",")]:
        for name, (k, n) in SHAPES.items():
            w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            plain = timed(lambda a: F.linear(a, w), x)
            tuned = ""
            if name in args.autotune.split(","):
                torch._dynamo.reset()
                fn = torch.compile(lambda a: F.linear(a, w), mode="max-autotune-no-cudagraphs", dynamic=False)
                tuned = f"{timed(fn, x) * 1e6:.1f}"
            scale = w.abs().amax(1).float() / 127
            w8 = torch.round(w.float() / scale[:, None]).to(torch.int8)
            s16 = scale.to(torch.bfloat16)
            torch._dynamo.reset()
            q8 = torch.compile(lambda a: F.linear(a, w8.to(a.dtype)) * s16, dynamic=False)
            int8 = timed(q8, x)
            emit(f"| {m} | {name} | {w.numel() * 2 / 1e6:.1f} | {plain * 1e6:.1f} | "
                 f"{w.numel() * 2 / plain / 1e9:.0f} | {tuned} | {int8 * 1e6:.1f} |")
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(LINES) + "\n\n")


if __name__ == "__main__":
    main()
