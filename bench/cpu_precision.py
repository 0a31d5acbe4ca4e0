#!/usr/bin/env python
"""Is bf16 faster than fp32 on this CPU? The phantom model end to end, and MedGemma-4B-sized layers.

    python bench/cpu_precision.py [--runs 5] [--quick]

Prints a markdown report (kept in ``bench/results/cpu_precision.md``):

1. the CPU: model name, its bf16 instructions (AVX512-BF16, AMX) and what torch dispatches to;
2. matmuls in MedGemma-4B's shapes (hidden 2560, MLP 10240, vocabulary 262,208): one row (a decode step),
   256 and 2048 rows (a prefill);
3. one MedGemma-4B text decoder layer (random weights, SDPA) for a prefill and for one decode step over
   that prefill's cache, and one SigLIP vision layer over an 896 px image's 4096 patches; from those an
   estimate of a whole X-ray reading (vision tower, prefill of 300 tokens, 128 decode steps with the
   language-model head) in each precision;
4. the phantom model read end to end by :class:`monailabel_app.reader.Reader` (radiograph and CT
   phantoms, median of ``--runs``), in fp32 and bf16, and whether both give the same report.

Every number is a median wall time with ``torch.get_num_threads()`` threads (printed).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from medgemma_shapes import MEDGEMMA_4B  # noqa: E402
from monailabel_app.model.loading import cpu_bf16_kind  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def median_s(fn, runs: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cpu_lines() -> list[str]:
    name = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return [f"- CPU: {name}; bf16 instructions: {cpu_bf16_kind() or 'none (AVX2 at best)'}; "
            f"torch {torch.__version__} dispatches to {torch.backends.cpu.get_cpu_capability()}; "
            f"{torch.get_num_threads()} threads"]


def matmul_rows(runs: int) -> list[tuple[str, float, float]]:
    h, m, v = MEDGEMMA_4B["text"]["hidden_size"], MEDGEMMA_4B["text"]["intermediate_size"], MEDGEMMA_4B["text"]["vocab_size"]
    shapes = [(f"MLP up, decode step ({1} x {h} @ {h} x {m})", 1, h, m),
              (f"MLP up, prefill ({256} x {h} @ {h} x {m})", 256, h, m),
              (f"MLP up, prefill ({2048} x {h} @ {h} x {m})", 2048, h, m),
              (f"LM head, decode step (1 x {h} @ {h} x {v})", 1, h, v)]
    rows = []
    for label, n, k, out in shapes:
        t = {}
        for name, dt in DTYPES.items():
            x, w = torch.randn(n, k, dtype=dt), torch.randn(out, k, dtype=dt)  # weights stored as nn.Linear's
            t[name] = median_s(lambda: torch.nn.functional.linear(x, w), runs)
            del x, w
        rows.append((label, t["fp32"], t["bf16"]))
    return rows


def text_layer(dtype):
    from transformers import Gemma3TextConfig, Gemma3TextModel

    s = MEDGEMMA_4B["text"]
    cfg = Gemma3TextConfig(**{**s, "vocab_size": 16, "num_hidden_layers": 1, "layer_types": ["full_attention"]})
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return Gemma3TextModel(cfg).to(dtype).eval()


def vision_layer(dtype):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    cfg = SiglipVisionConfig(**{**MEDGEMMA_4B["vision"], "num_hidden_layers": 1})
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return SiglipVisionModel(cfg).to(dtype).eval()


@torch.no_grad()
def layer_rows(runs: int, prefill_tokens: int = 300) -> dict:
    from transformers import DynamicCache

    h = MEDGEMMA_4B["text"]["hidden_size"]
    out = {}
    for name, dt in DTYPES.items():
        model = text_layer(dt)
        x = torch.randn(1, prefill_tokens, h, dtype=dt)

        def prefill():
            return model(inputs_embeds=x, past_key_values=DynamicCache(config=model.config), use_cache=True)

        t_prefill = median_s(prefill, runs)
        cache = prefill().past_key_values
        step = torch.randn(1, 1, h, dtype=dt)
        pos = torch.tensor([[prefill_tokens]])

        def decode():
            model(inputs_embeds=step, past_key_values=cache, position_ids=pos, use_cache=True)
            cache.crop(-1)  # the same cache length every step

        t_decode = median_s(decode, runs * 4)
        del model, cache
        vision = vision_layer(dt)
        px = torch.randn(1, 3, 896, 896, dtype=dt)
        t_vision = median_s(lambda: vision(pixel_values=px), max(2, runs // 2))
        del vision
        v = MEDGEMMA_4B["text"]["vocab_size"]
        head_w = torch.randn(v, h, dtype=dt)
        row = torch.randn(1, h, dtype=dt)
        t_head = median_s(lambda: torch.nn.functional.linear(row, head_w), runs)
        del head_w
        out[name] = {"prefill": t_prefill, "decode": t_decode, "vision": t_vision, "head": t_head}
    return out


def xray_estimate(t: dict, new_tokens: int = 128) -> float:
    """A MedGemma-4B X-ray reading from per-layer times: 27 vision layers, 34 text layers' prefill,
    ``new_tokens`` decode steps through 34 layers and the head (embedding and projector left out)."""
    n_text, n_vision = MEDGEMMA_4B["text"]["num_hidden_layers"], MEDGEMMA_4B["vision"]["num_hidden_layers"]
    return n_vision * t["vision"] + n_text * t["prefill"] + new_tokens * (n_text * t["decode"] + t["head"])


def phantom_rows(runs: int) -> list[tuple[str, float, float, str]]:
    from monailabel_app.io.xray import Geometry, Radiograph
    from monailabel_app.phantoms.ct import make_ct_phantom, phantom_volume
    from monailabel_app.phantoms.films import make_phantom
    from monailabel_app.reader import Reader

    studies = {
        "radiograph phantom": lambda i: Radiograph((ph := make_phantom(i)).image, Geometry.plain(*ph.image.shape)),
        "CT phantom (20 slices)": lambda i: phantom_volume(make_ct_phantom(i)),
    }
    readers = {name: Reader(device="cpu", precision=name) for name in DTYPES}
    rows = []
    for label, make in studies.items():
        t, reports = {}, {}
        for name, reader in readers.items():
            times = []
            for i in range(runs + 1):  # the first reading warms up
                study = make(i)
                t0 = time.perf_counter()
                reading = reader.read(study)
                if i:
                    times.append(time.perf_counter() - t0)
                reports.setdefault(name, []).append(reading.report)
            t[name] = statistics.median(times)
        same = sum(a == b for a, b in zip(reports["fp32"], reports["bf16"]))
        rows.append((label, t["fp32"], t["bf16"], f"{same}/{len(reports['fp32'])}"))
    return rows


def ratio(fp32: float, bf16: float) -> str:
    return f"{fp32 / bf16:.2f}x" if bf16 else "-"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="matmuls and the phantom model only (no MedGemma layers)")
    args = ap.parse_args(argv)
    lines = ["# bf16 vs fp32 on this CPU", "", *cpu_lines(), "",
             "## Matmuls in MedGemma-4B shapes", "", "| shape | fp32 ms | bf16 ms | bf16 speed-up |", "|---|---|---|---|"]
    for label, a, b in matmul_rows(args.runs):
        lines.append(f"| {label} | {a * 1e3:.2f} | {b * 1e3:.2f} | {ratio(a, b)} |")
    print("\n".join(lines), flush=True)
    lines = []
    if not args.quick:
        t = layer_rows(args.runs)
        lines += ["", "## MedGemma-4B layers (random weights, SDPA)", "",
                  "| part | fp32 ms | bf16 ms | bf16 speed-up |", "|---|---|---|---|"]
        for part, label in [("vision", "SigLIP layer, 896 px image (4096 patches)"),
                            ("prefill", "text decoder layer, prefill of 300 tokens"),
                            ("decode", "text decoder layer, one decode step (300 cached)"),
                            ("head", "LM head, one decode step")]:
            lines.append(f"| {label} | {t['fp32'][part] * 1e3:.2f} | {t['bf16'][part] * 1e3:.2f} | "
                         f"{ratio(t['fp32'][part], t['bf16'][part])} |")
        a, b = xray_estimate(t["fp32"]), xray_estimate(t["bf16"])
        lines.append(f"| **estimated X-ray reading** (27 vision + 34 text layers, 128 new tokens) | "
                     f"{a * 1e3:.0f} | {b * 1e3:.0f} | {ratio(a, b)} |")
    lines += ["", "## The phantom model end to end (`Reader.read`, median of %d)" % args.runs, "",
              "| study | fp32 s | bf16 s | bf16 speed-up | same report |", "|---|---|---|---|---|"]
    for label, a, b, same in phantom_rows(args.runs):
        lines.append(f"| {label} | {a:.3f} | {b:.3f} | {ratio(a, b)} | {same} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
