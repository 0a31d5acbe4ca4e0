#!/usr/bin/env python
"""Peak memory of attention capture vs. sequence length (CT slices), next to plain SDPA generation.

    python bench/capture_memory.py                       # phantom model on this machine (CPU or GPU)
    python bench/capture_memory.py --medgemma-shapes     # MedGemma-4B shapes, random weights (GPU)

For each slice count it builds a CT-shaped prompt (per slice: <start_of_image>, 256 image tokens,
<end_of_image>, "SLICE n"; then a question), runs greedy generation of ``--new-tokens`` tokens
(1) with plain SDPA, (2) with the capture attention recording every generated token's row on the
global layers and (3) the same with rollout inside each slice (the CT default: one n x n mixing matrix
per slice kept per read layer; both through the project's decoder), and prints the peak memory of each (CUDA: ``max_memory_allocated`` above the model;
CPU: peak RSS of a fresh process per run). It also prints what keeping the full L x L attention of
every layer would take (the eager ``output_attentions`` path) -- never built here.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

def build_model(medgemma: bool, device: str, dtype):
    """(model, prompt spec): the phantom model, or MedGemma-4B shapes with random weights
    (``bench/medgemma_shapes.py``)."""
    if medgemma:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from medgemma_shapes import build

        model, _ = build(device, dtype, attn="sdpa")
        model.generation_config.eos_token_id = None  # random weights: always run the full new-token count
    else:
        from monailabel_app.model.loading import load_model

        model, _, _ = load_model(_phantom_dir(), device, "fp32")
    cfg = model.config
    return model, dict(image_token=cfg.image_token_index, boi=cfg.boi_token_index, eoi=cfg.eoi_token_index,
                       image_size=cfg.vision_config.image_size)


def _phantom_dir():
    from monailabel_app.phantoms.model import PHANTOM_MODEL_DIR

    return PHANTOM_MODEL_DIR


def ct_prompt(spec: dict, slices: int, device, dtype):
    ids, types = [2], [0]
    for n in range(slices):
        ids += [spec["boi"]] + [spec["image_token"]] * 256 + [spec["eoi"], 10 + n % 50, 11]
        types += [0] + [1] * 256 + [0, 0, 0]
    ids += [12, 13, 14, 15]
    types += [0] * 4
    size = spec["image_size"]
    return {
        "input_ids": torch.tensor([ids], device=device),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long, device=device),
        "token_type_ids": torch.tensor([types], device=device),
        "pixel_values": torch.rand(slices, 3, size, size, device=device, dtype=dtype) * 2 - 1,
    }


def global_layers(model) -> list[int]:
    types = model.config.text_config.layer_types
    return [i for i, t in enumerate(types) if t == "full_attention"]


_MODELS: dict = {}  # one model per process (on CUDA all runs share it; on the CPU each run is a process)


def run_once(medgemma: bool, slices: int, mode: str, new_tokens: int, device: str) -> dict:
    from monailabel_app.model.capture import CAPTURE_ATTN
    from monailabel_app.model.decoding import prefill_and_decode

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if medgemma not in _MODELS:
        _MODELS[medgemma] = build_model(medgemma, device, dtype)
    model, spec = _MODELS[medgemma]
    model.set_attn_implementation("sdpa" if mode == "plain" else CAPTURE_ATTN)
    inputs = ct_prompt(spec, slices, device, dtype)
    length = int(inputs["input_ids"].shape[1])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    with torch.inference_mode():
        if mode in ("capture", "rollout"):
            per_image = int(model.config.mm_tokens_per_image)
            res = prefill_and_decode(model, inputs, global_layers(model), per_image, new_tokens, mode == "rollout",
                                     stop_loops=False)
            kept = res.attention.numel() * res.attention.element_size()
        else:
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            kept = 0
    seconds = time.perf_counter() - t0
    cfg = model.config.text_config
    full = cfg.num_hidden_layers * cfg.num_attention_heads * length * length * (2 if dtype == torch.bfloat16 else 4)
    out = {"slices": slices, "tokens": length, "mode": mode, "seconds": round(seconds, 2),
           "captured_bytes": kept, "full_attention_bytes": full}
    if device.startswith("cuda"):
        out["peak_bytes"] = torch.cuda.max_memory_allocated() - base
    else:
        out["peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--medgemma-shapes", action="store_true")
    ap.add_argument("--slices", default="1,5,10,20,40")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # "slices,mode": a single run (CPU: in its own process)
    args = ap.parse_args(argv)
    if args.one:
        slices, mode = args.one.split(",")
        print(json.dumps(run_once(args.medgemma_shapes, int(slices), mode, args.new_tokens, args.device)))
        return
    gib = 1 / 2**30
    print(f"{'slices':>6} {'tokens':>7} {'plain peak GiB':>15} {'capture peak GiB':>17} {'kept rows MiB':>14} "
          f"{'rollout peak GiB':>17} {'rollout kept MiB':>17} "
          f"{'full LxL GiB':>13} {'plain s':>8} {'capture s':>10} {'rollout s':>10}  ({args.device}, "
          f"{'MedGemma-4B shapes' if args.medgemma_shapes else 'phantom model'})", flush=True)
    for slices in [int(s) for s in args.slices.split(",")]:
        row = {}
        for mode in ("plain", "capture", "rollout"):
            if args.device.startswith("cuda"):
                row[mode] = run_once(args.medgemma_shapes, slices, mode, args.new_tokens, args.device)
                torch.cuda.empty_cache()
            else:  # peak RSS only grows within a process: one process per run
                cmd = [sys.executable, os.path.abspath(__file__), "--one", f"{slices},{mode}", "--device", args.device,
                       "--new-tokens", str(args.new_tokens)] + (["--medgemma-shapes"] if args.medgemma_shapes else [])
                row[mode] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
        p, c, r = row["plain"], row["capture"], row["rollout"]
        print(f"{slices:>6} {p['tokens']:>7} {p['peak_bytes'] * gib:>15.3f} {c['peak_bytes'] * gib:>17.3f} "
              f"{c['captured_bytes'] / 2**20:>14.3f} {r['peak_bytes'] * gib:>17.3f} {r['captured_bytes'] / 2**20:>17.3f} "
              f"{p['full_attention_bytes'] * gib:>13.2f} {p['seconds']:>8.2f} {c['seconds']:>10.2f} {r['seconds']:>10.2f}",
              flush=True)


if __name__ == "__main__":
    main()
