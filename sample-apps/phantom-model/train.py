#!/usr/bin/env python
"""Train the phantom model (a tiny real Gemma 3; a TEST model, NOT MedGemma) on synthetic phantoms.

    python sample-apps/phantom-model/train.py --out monailabel_app/models/phantom-gemma3

Builds the tokenizer, processor and config of :mod:`monailabel_app.phantom_model`, gives the
multimodal projector a small random start (it initialises to zero), and trains with next-token loss on
the answer tokens only (``token_type_ids`` passed, so image tokens attend bidirectionally), on fresh
phantoms every step (seeds from 10**6 up: the evaluation seeds 0..99999 are never seen). AdamW with
warm-up and cosine decay, gradient clipping 1.0. Runs on CUDA when present (a few minutes on one GPU)
or on the CPU (much longer). Saves safetensors (float32), tokenizer, processor and chat template, then
prints greedy zone accuracy on held-out seeds.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from monailabel_app import phantom_model as pm  # noqa: E402
from monailabel_app.phantoms import make_phantom  # noqa: E402
from monailabel_app.xray import pad_to_square  # noqa: E402

TRAIN_SEED_BASE = 10**6


class PhantomBatches(torch.utils.data.IterableDataset):
    """Endless batches of processed phantoms; each worker draws its own disjoint seeds."""

    def __init__(self, processor, batch: int, start: int):
        self.processor, self.batch, self.start = processor, batch, start

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        i = 0
        while True:
            first = TRAIN_SEED_BASE + self.start + (i * nw + wid) * self.batch
            yield encode_batch(self.processor, range(first, first + self.batch))
            i += 1


def encode_batch(processor, seeds):
    tok = processor.tokenizer
    texts, images = [], []
    for seed in seeds:
        ph = make_phantom(seed)
        rgb, _ = pad_to_square(ph.image)
        question = pm.QUESTIONS[seed % len(pm.QUESTIONS)]
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": ph.report}]},
        ]
        texts.append(processor.apply_chat_template(messages, tokenize=False))
        images.append([Image.fromarray(rgb)])
    enc = processor(text=texts, images=images, return_tensors="pt", padding=True, add_special_tokens=False)
    ids = enc["input_ids"]
    labels = torch.full_like(ids, -100)
    sot = tok.convert_tokens_to_ids("<start_of_turn>")
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    head = len(tok("<start_of_turn>model\n", add_special_tokens=False)["input_ids"])
    for b in range(ids.shape[0]):
        row = ids[b].tolist()
        start = max(i for i, t in enumerate(row) if t == sot) + head
        end = row.index(eot, start) + 1  # answer tokens and the closing <end_of_turn>
        labels[b, start:end] = ids[b, start:end]
    enc["labels"] = labels
    return dict(enc)


@torch.no_grad()
def zone_accuracy(model, processor, seeds, device, batch=32):
    """Greedy answers on ``seeds``: fraction of lesions whose zone (side+level) and kind are named."""
    from monailabel_app.report import parse_report

    tok = processor.tokenizer
    tok.padding_side = "left"
    hit_zone = hit_kind = lesions = empty_ok = empties = 0
    for i in range(0, len(seeds), batch):
        chunk = seeds[i : i + batch]
        phs = [make_phantom(s) for s in chunk]
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": pm.DEFAULT_QUESTION}]}]
        prompt = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        imgs = [[Image.fromarray(pad_to_square(p.image)[0])] for p in phs]
        enc = processor(text=[prompt] * len(phs), images=imgs, return_tensors="pt", padding=True,
                        add_special_tokens=False).to(device)
        out = model.generate(**enc, max_new_tokens=40, do_sample=False)
        answers = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for ph, ans in zip(phs, answers):
            found = parse_report(ans)
            named = {(f.side, f.level): f.kind for f in found}
            if not ph.lesions:
                empties += 1
                empty_ok += not found
            for les in ph.lesions:
                lesions += 1
                if (les.side, les.level) in named:
                    hit_zone += 1
                    hit_kind += named[(les.side, les.level)] == les.kind
    tok.padding_side = "right"
    return {"zone": hit_zone / max(1, lesions), "kind": hit_kind / max(1, lesions),
            "empty_correct": empty_ok / max(1, empties), "lesions": lesions, "empty_images": empties}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=pm.PHANTOM_MODEL_DIR)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--minutes", type=float, default=0, help="stop early after this many minutes (0: no limit)")
    ap.add_argument("--eval-seeds", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True
    tokenizer = pm.build_tokenizer()
    processor = pm.build_processor(tokenizer)
    config = pm.build_config(tokenizer)
    from transformers import Gemma3ForConditionalGeneration

    config._attn_implementation = "sdpa"
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # the projector starts at zero: every image token would look the same
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.02)
    model.to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"phantom model: {n_params / 1e6:.2f} M parameters, device {device}", flush=True)

    # no weight decay on norms, biases and embeddings: decaying Gemma's (1 + w) q/k norms flattens attention
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / args.warmup)
        * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, args.steps)))),
    )
    loader = torch.utils.data.DataLoader(
        PhantomBatches(processor, args.batch, args.seed * 10**8), batch_size=None,
        num_workers=args.workers, prefetch_factor=4 if args.workers else None, persistent_workers=bool(args.workers),
    )
    t0, ema = time.time(), None
    for step, batch in enumerate(loader):
        if step >= args.steps or (args.minutes and time.time() - t0 > args.minutes * 60):
            break
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 100 == 0:
            print(f"step {step:5d}  loss {ema:.4f}  lr {sched.get_last_lr()[0]:.2e}  {time.time() - t0:6.0f}s", flush=True)
        if step and step % 1000 == 0:
            model.eval()
            print(f"  zone accuracy on seeds 0..63: {zone_accuracy(model, processor, list(range(64)), device)}", flush=True)
            model.train()
    print(f"trained {step} steps in {time.time() - t0:.0f}s", flush=True)

    model.eval()
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    processor.save_pretrained(args.out)
    acc = zone_accuracy(model, processor, list(range(args.eval_seeds)), device)
    print(f"held-out seeds 0..{args.eval_seeds - 1}: {acc}", flush=True)


if __name__ == "__main__":
    main()
