#!/usr/bin/env python
"""Train the phantom model (a tiny real Gemma 3; a TEST model, NOT MedGemma) on synthetic phantoms.

    # stage 1: chest X-ray phantoms, from scratch
    python sample-apps/phantom-model/train.py --out monailabel_app/models/phantom-gemma3 --ct-share 0 --steps 4000
    # stage 2: X-ray and CT phantoms, continuing from stage 1, with the CT curriculum
    python sample-apps/phantom-model/train.py --init monailabel_app/models/phantom-gemma3 \
        --out monailabel_app/models/phantom-gemma3 --ct-share 0.85 --ct-batch 24 --ct-ramp-minutes 5 \
        --lr 2e-3 --warmup 100 --steps 100000 --minutes 8.5
    (the shipped weights' exact lineage is in monailabel_app/models/phantom-gemma3/README.md)

CT examples follow the MedGemma 1.5 recipe as inference does (:func:`ct.model_slices`: three HU windows
as RGB, ``SLICE n`` after each image). With ``--ct-ramp-minutes`` they follow a curriculum: at first one
slice through a lesion, then ever longer slabs at the recipe's slice spacing, the full ``CT_MAX_SLICES``
recipe after the ramp (then 70 % of batches full, the rest shorter). Without it the lesion is 1-4 of
5,000 image tokens and the model never learned to find it (see the model README). The reference text of
an example names only the lesions its slices cut.

Builds the tokenizer, processor and config of :mod:`monailabel_app.phantoms.model`, gives the
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
import re
import sys
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from monailabel_app.io.ct import interleave, model_slices, sample_slices  # noqa: E402
from monailabel_app.io.xray import pad_to_square  # noqa: E402
from monailabel_app.language.asking import ANSWER_IN, ask_in  # noqa: E402
from monailabel_app.language.report import format_findings  # noqa: E402
from monailabel_app.language.structured import KIND_NAMES, site_zh  # noqa: E402
from monailabel_app.model.generation import chat_messages, text_turn  # noqa: E402
from monailabel_app.phantoms import model as pm  # noqa: E402
from monailabel_app.phantoms.ct import make_ct_phantom, phantom_volume  # noqa: E402
from monailabel_app.phantoms.films import make_phantom  # noqa: E402

TRAIN_SEED_BASE = 10**6


class PhantomBatches(torch.utils.data.IterableDataset):
    """Endless batches of processed phantoms; each worker draws its own disjoint seeds.

    A share ``ct_share`` of the batches (spread evenly by global batch number) are CT batches of
    ``ct_batch`` volumes, the others X-ray batches of ``batch`` images. With ``ct_ramp_s`` > 0 the CT
    batches follow a curriculum (:func:`ct_slice_count`): short slabs through a lesion first, the full
    recipe after ``ct_ramp_s`` seconds of training.
    """

    def __init__(self, processor, batch: int, start: int, ct_share: float = 0.0, ct_batch: int = 12,
                 ct_ramp_s: float = 0.0, follow_up_share: float = 0.0, zh_share: float = 0.0):
        self.processor, self.batch, self.start = processor, batch, start
        self.ct_share, self.ct_batch, self.ct_ramp_s = ct_share, ct_batch, ct_ramp_s
        self.follow_up_share, self.zh_share = follow_up_share, zh_share
        self.t0 = time.time()

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        i = 0
        while True:
            number = i * nw + wid
            first = TRAIN_SEED_BASE + self.start + number * max(self.batch, 4 * self.ct_batch)
            if int((number + 1) * self.ct_share) > int(number * self.ct_share):
                progress = (time.time() - self.t0) / self.ct_ramp_s if self.ct_ramp_s else 1.0
                n = ct_slice_count(progress, np.random.default_rng(first))
                examples = self.ct_batch * min(4, pm.CT_MAX_SLICES // n)  # about the same tokens per batch
                per = min(8, pm.CT_MAX_SLICES // n)  # short slabs: several per phantom (drawing one costs most)
                yield encode_ct_batch(self.processor, range(first, first + -(-examples // per)), n, per, self.zh_share)
            else:
                yield encode_batch(self.processor, range(first, first + self.batch), self.follow_up_share,
                                   self.zh_share)
            i += 1


def ct_slice_count(progress: float, rng) -> int:
    """Slices per CT example at curriculum ``progress`` (0..1+): the cap grows from 1 to the full count;
    70 % of batches use the cap, the rest fewer (so short volumes stay in distribution)."""
    full = pm.CT_MAX_SLICES
    cap = max(1, min(full, int(round(1 + (full - 1) * progress))))
    return cap if rng.random() < 0.7 else int(rng.integers(1, cap + 1))


def training_slices(ph, n: int, rng) -> list[int]:
    """Display indices (head first) of ``n`` slices: the inference recipe when ``n`` is the full count,
    else a slab with the recipe's slice spacing through a random lesion (a random place if none)."""
    nz, full = ph.hu.shape[0], pm.CT_MAX_SLICES
    if n >= full:
        return sample_slices(nz, full)
    step = (nz - 1) / (full - 1)
    length = (n - 1) * step
    if ph.lesions:
        cz = ph.lesions[rng.integers(len(ph.lesions))].center[0]
        start = rng.uniform(cz - length - step / 2, cz + step / 2)
    else:
        start = rng.uniform(0, nz - 1 - length)
    start = float(np.clip(start, 0, nz - 1 - length))
    picked = np.unique(np.clip(np.round(start + step * np.arange(n)), 0, nz - 1).astype(int))
    return [int(z) for z in picked[::-1]]


def visible_report(ph, indices, min_voxels: int = 6, language: str = "en") -> str:
    """The reference text for what these slices show: lesions cut by a shown slice (>= ``min_voxels``)."""
    shown = [f for f, les in zip(ph.findings, ph.lesions) if les.mask[indices].sum(axis=(1, 2)).max() >= min_voxels]
    return format_findings(shown, language)


def question_and_language(seed: int, zh_share: float, english: tuple, chinese: tuple) -> tuple[str, str]:
    """(question, answer language) of one example: English; or, for a share ``zh_share``, a Chinese answer
    to a Chinese question (plain, without its final mark, or with "请用中文回答。") or to an English one
    with "请用中文回答。"; a few Chinese questions with "Please answer in English." are answered in English."""
    rng = np.random.default_rng((seed, 11))
    if rng.random() >= zh_share:
        return english[seed % len(english)], "en"
    pick = rng.random()
    question = chinese[seed % len(chinese)]
    if pick < 0.35:
        return question, "zh"
    if pick < 0.5:
        return question.rstrip("。？"), "zh"
    if pick < 0.75:
        return ask_in(question, "zh"), "zh"
    if pick < 0.9:
        return f"{english[seed % len(english)]} {ANSWER_IN['zh']}", "zh"
    return f"{question} {ANSWER_IN['en']}", "en"


def _answer_labels(tok, ids):
    """Next-token labels on the model's answer (and its closing <end_of_turn>) only."""
    labels = torch.full_like(ids, -100)
    sot = tok.convert_tokens_to_ids("<start_of_turn>")
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    head = len(tok("<start_of_turn>model\n", add_special_tokens=False)["input_ids"])
    for b in range(ids.shape[0]):
        row = ids[b].tolist()
        start = max(i for i, t in enumerate(row) if t == sot) + head
        end = row.index(eot, start) + 1
        labels[b, start:end] = ids[b, start:end]
    return labels


def _encode(processor, texts, images):
    enc = processor(text=texts, images=images, return_tensors="pt", padding=True, add_special_tokens=False)
    enc["labels"] = _answer_labels(processor.tokenizer, enc["input_ids"])
    return dict(enc)


FOLLOW_UPS = ("Where is it?", "Which side is it on?", "Where is the first finding?")
# the Chinese follow-ups: where "it" is, and (the seed's second question) its density and margins
LOOKS_ZH = {"nodule": "密度均匀，边界清楚。", "opacity": "密度不均，边界欠清。", "effusion": "呈液体密度，边界清楚。"}


def follow_up_answer(findings, language: str = "en", question: str = "") -> str:
    """What a follow-up about "it" should answer: where the first finding of the earlier turn is (and, asked
    about its density and margins in Chinese, how it looks)."""
    if language == "zh":
        if not findings:
            return pm.NO_FINDINGS_ZH
        first = findings[0]
        if question == pm.DESCRIBE_ZH:
            return f"{site_zh(first)}{KIND_NAMES[first.kind][0]}，{LOOKS_ZH[first.kind]}"
        return f"它位于{site_zh(first)}。"
    if not findings:
        return "there is no focal abnormality."
    return f"it is in the {findings[0].location}."


def follow_up_messages(first_question: str, report: str, findings, n: int, language: str = "en") -> list[dict]:
    """A two-turn chat: the study and its report, then a follow-up about "it" (question ``n``) and its answer;
    the labels (:func:`_answer_labels`) cover the last answer only."""
    asked = (*pm.FOLLOW_UPS_ZH, pm.DESCRIBE_ZH) if language == "zh" else FOLLOW_UPS
    question = asked[n % len(asked)]
    return chat_messages([None], first_question, answer=report) + [
        text_turn("user", question), text_turn("assistant", follow_up_answer(findings, language, question))]


def encode_batch(processor, seeds, follow_up_share: float = 0.0, zh_share: float = 0.0):
    """An X-ray batch; a share ``follow_up_share`` of the examples are two-turn chats (a follow-up about
    "it" after the report), taught on the follow-up's answer; a share ``zh_share`` is in Chinese."""
    texts, images = [], []
    for seed in seeds:
        ph = make_phantom(seed)
        square, _ = pad_to_square(ph.image)
        question, language = question_and_language(seed, zh_share, pm.QUESTIONS, pm.QUESTIONS_ZH)
        report = format_findings(ph.findings, language)
        if np.random.default_rng((seed, 7)).random() < follow_up_share:
            messages = follow_up_messages(question, report, ph.findings, seed, language)
        else:
            messages = chat_messages([None], question, answer=report)
        texts.append(processor.apply_chat_template(messages, tokenize=False))
        images.append([Image.fromarray(square).convert("RGB")])
    return _encode(processor, texts, images)


def ct_example(processor, seed, n):
    """One CT example as the processor sees it: phantom, chat text and the slice images."""
    ph = make_ct_phantom(seed)
    indices = training_slices(ph, n, np.random.default_rng(seed))
    ms = model_slices(phantom_volume(ph), n, indices)
    question = pm.CT_QUESTIONS[seed % len(pm.CT_QUESTIONS)]
    text = processor.apply_chat_template(
        chat_messages(interleave([None] * len(ms.images)), question, answer=visible_report(ph, indices)), tokenize=False)
    return ph, text, [Image.fromarray(im) for im in ms.images]


def encode_ct_batch(processor, seeds, n: int = pm.CT_MAX_SLICES, per_phantom: int = 1, zh_share: float = 0.0):
    """A CT batch of ``n``-slice examples (as :func:`ct_example`; ``per_phantom`` slabs from each seed's
    phantom), tokenised here; its slices stay uint8 squares, resized on the device (:func:`ct_pixels`).

    The processor's own path (PIL resize of 240 images, tokenising 5,000 expanded image tokens per
    volume) costs more CPU than the GPU step. Here each image is tokenised as one
    ``<image_soft_token>`` and expanded to ``mm_tokens_per_image`` ids afterwards (special tokens split
    the text, so the ids are identical to the processor's; checked by :func:`check_fast_ct`).
    """
    rows, squares = [], []
    for seed in seeds:
        ph = make_ct_phantom(seed)
        volume = phantom_volume(ph)
        for j in range(per_phantom):
            indices = training_slices(ph, n, np.random.default_rng(seed if j == 0 else (seed, j)))
            ms = model_slices(volume, n, indices)
            question, language = question_and_language(seed + j, zh_share, pm.CT_QUESTIONS, pm.CT_QUESTIONS_ZH)
            rows.append(fast_ids(processor, len(ms.images), question, visible_report(ph, indices, language=language)))
            squares.append(torch.from_numpy(np.stack(ms.images)))
    tok = processor.tokenizer
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r)
        mask[b, : len(r)] = 1
    image_token = tok.convert_tokens_to_ids(tok.image_token)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": (ids == image_token).long(),
            "labels": _answer_labels(tok, ids), "squares": squares}


def fast_ids(processor, n_images: int, question: str, answer: str | None) -> list[int]:
    tok = processor.tokenizer
    text = processor.apply_chat_template(chat_messages(interleave([None] * n_images), question, answer=answer),
                                         tokenize=False, add_generation_prompt=answer is None)
    short = text.replace(tok.boi_token, f"\n\n{tok.boi_token}{tok.image_token}{tok.eoi_token}\n\n")
    image_token = tok.convert_tokens_to_ids(tok.image_token)
    out = []
    for t in tok(short, add_special_tokens=False)["input_ids"]:
        out.extend([t] * processor.image_seq_length if t == image_token else [t])
    return out


def ct_pixels(squares, size: int, device, dtype=torch.float32) -> torch.Tensor:
    """uint8 (n, side, side, 3) squares per volume -> normalised (sum n, 3, size, size) on ``device``."""
    out = []
    for sq in squares:
        x = sq.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out.append((x.round().clamp(0, 255) / 255.0 - 0.5) / 0.5)
    return torch.cat(out).to(dtype)


def check_fast_ct(processor, seed: int = 10**6, n: int = pm.CT_MAX_SLICES) -> float:
    """Fast CT encoding vs. the processor: ids must be equal; returns the largest pixel difference."""
    ph, text, imgs = ct_example(processor, seed, n)
    ref = processor(text=[text], images=[imgs], return_tensors="pt", add_special_tokens=False)
    fast = encode_ct_batch(processor, [seed], n)
    n = fast["input_ids"].shape[1]
    if not torch.equal(ref["input_ids"][0, :n], fast["input_ids"][0]) or ref["input_ids"].shape[1] != n:
        raise SystemExit("fast CT tokenisation differs from the processor's")
    size = processor.image_processor.size["height"]
    return float((ct_pixels(fast["squares"], size, "cpu") - ref["pixel_values"]).abs().max())


@torch.no_grad()
def zone_accuracy(model, processor, seeds, device, batch=32, language: str = "en"):
    """Greedy answers on ``seeds``: fraction of lesions whose zone (side+level) and kind are named; asked in
    ``language`` (Chinese: the default Chinese question with "请用中文回答。", as the reader asks it), and the
    share of answers in that language."""
    from monailabel_app.language.report import parse_report

    tok = processor.tokenizer
    tok.padding_side = "left"
    hit_zone = hit_kind = lesions = empty_ok = empties = in_language = 0
    question = ask_in(pm.DEFAULT_QUESTION_ZH, "zh") if language == "zh" else pm.DEFAULT_QUESTION
    for i in range(0, len(seeds), batch):
        chunk = seeds[i : i + batch]
        phs = [make_phantom(s) for s in chunk]
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompt = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        imgs = [[Image.fromarray(pad_to_square(p.image)[0]).convert("RGB")] for p in phs]
        enc = processor(text=[prompt] * len(phs), images=imgs, return_tensors="pt", padding=True,
                        add_special_tokens=False).to(device)
        out = model.generate(**enc, max_new_tokens=40, do_sample=False)
        answers = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for ph, ans in zip(phs, answers):
            found = parse_report(ans)
            in_language += (language == "zh") == bool(re.search(r"[\u4e00-\u9fff]", ans))
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
            "empty_correct": empty_ok / max(1, empties), "lesions": lesions, "empty_images": empties,
            "in_language": in_language / max(1, len(seeds))}


@torch.no_grad()
def follow_up_accuracy(model, processor, seeds, device, language: str = "en") -> float:
    """Share of held-out phantoms whose follow-up "Where is it?" / "它在哪里？" (after the reference report)
    names the first finding's side and level (or no finding, for lesion-free phantoms)."""
    from monailabel_app.language.report import parse_report

    ok = 0
    first_question = ask_in(pm.DEFAULT_QUESTION_ZH, "zh") if language == "zh" else pm.DEFAULT_QUESTION
    follow = pm.FOLLOW_UPS_ZH[0] if language == "zh" else FOLLOW_UPS[0]
    for seed in seeds:
        ph = make_phantom(seed)
        square, _ = pad_to_square(ph.image)
        messages = chat_messages([None], first_question, answer=format_findings(ph.findings, language)) + [
            text_turn("user", follow)]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        enc = processor(text=[text], images=[[Image.fromarray(square).convert("RGB")]], return_tensors="pt", add_special_tokens=False)
        enc = {k: v.to(device) for k, v in enc.items()}
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=24, do_sample=False)
        answer = processor.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        said = parse_report(answer)
        if not ph.findings:
            ok += not said
        else:
            ok += bool(said) and (said[0].side, said[0].level) == (ph.findings[0].side, ph.findings[0].level)
    return ok / max(1, len(seeds))


def lobe_accuracy(model, processor, seeds, device, batch=8, language: str = "en"):
    """Greedy answers on CT phantom ``seeds`` (full slice count): fraction of lesions whose lobe and kind
    are named, and of answers naming a lobe with no lesion (false findings per volume)."""
    from monailabel_app.language.report import parse_report

    tok = processor.tokenizer
    hit_lobe = hit_kind = lesions = extra = 0
    question = ask_in(pm.CT_QUESTION_ZH, "zh") if language == "zh" else pm.CT_QUESTION
    for i in range(0, len(seeds), batch):
        chunk = [ct_example(processor, s, pm.CT_MAX_SLICES) for s in seeds[i : i + batch]]
        prompts = [processor.apply_chat_template(chat_messages(interleave([None] * len(imgs)), question),
                                                 tokenize=False, add_generation_prompt=True) for _, _, imgs in chunk]
        enc = processor(text=prompts, images=[imgs for _, _, imgs in chunk], return_tensors="pt", padding=True,
                        add_special_tokens=False).to(device)
        out = model.generate(**enc, max_new_tokens=40, do_sample=False)
        answers = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for (ph, _, _), ans in zip(chunk, answers):  # truth: every lesion (all are cut by a shown slice)
            named = {(f.side, f.level): f.kind for f in parse_report(ans)}
            truth = {(les.side, les.level): les.kind for les in ph.lesions}
            extra += len(set(named) - set(truth))
            for key, kind in truth.items():
                lesions += 1
                hit_lobe += key in named
                hit_kind += named.get(key) == kind
    return {"lobe": hit_lobe / max(1, lesions), "kind": hit_kind / max(1, lesions),
            "false_findings_per_volume": extra / max(1, len(seeds)), "lesions": lesions}


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
    ap.add_argument("--init", help="start from this saved model (e.g. the stage-1 X-ray model)")
    ap.add_argument("--ct-share", type=float, default=0.75, help="share of CT batches (0: X-ray only)")
    ap.add_argument("--ct-batch", type=int, default=12)
    ap.add_argument("--ct-eval-seeds", type=int, default=100)
    ap.add_argument("--follow-up-share", type=float, default=0.0,
                    help="share of X-ray examples that are two-turn chats with a follow-up about 'it'")
    ap.add_argument("--zh-share", type=float, default=0.0,
                    help="share of examples in Chinese (Chinese questions, or 请用中文回答, answered in Chinese)")
    ap.add_argument("--ct-ramp-minutes", type=float, default=0,
                    help="curriculum: CT examples grow from one slice through a lesion to the full recipe over "
                         "this many minutes (0: full recipe from the start)")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True
    tokenizer = pm.build_tokenizer()
    processor = pm.build_processor(tokenizer)
    if args.ct_share:
        print(f"fast CT encoding: ids equal to the processor's, pixels within {check_fast_ct(processor):.4f}", flush=True)
    config = pm.build_config(tokenizer)
    from transformers import Gemma3ForConditionalGeneration

    config._attn_implementation = "sdpa"
    if args.init:
        from transformers import AutoConfig

        init_config = AutoConfig.from_pretrained(args.init)
        before = init_config.text_config.vocab_size
        if before > config.text_config.vocab_size:
            raise SystemExit("--init model has a larger vocabulary: the tokenizer recipe changed")
        for key in ("sliding_window", "max_position_embeddings"):  # the recipe's values (no weights change)
            setattr(init_config.text_config, key, getattr(config.text_config, key))
        model = Gemma3ForConditionalGeneration.from_pretrained(args.init, config=init_config, attn_implementation="sdpa",
                                                               dtype=torch.float32)
        if before < config.text_config.vocab_size:  # tokens added at the end (Chinese): new rows, the rest kept
            model.resize_token_embeddings(config.text_config.vocab_size, mean_resizing=True)
            print(f"vocabulary {before} -> {config.text_config.vocab_size} tokens (new rows: the mean embedding)")
    else:
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

    def learning_rate(step: int, elapsed: float) -> float:
        """Warm-up, then cosine decay over ``--steps`` or ``--minutes``, whichever ends first."""
        done = step / max(1, args.steps)
        if args.minutes:
            done = max(done, elapsed / (args.minutes * 60))
        return args.lr * min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))

    loader = torch.utils.data.DataLoader(
        PhantomBatches(processor, args.batch, args.seed * 10**8, args.ct_share, args.ct_batch,
                       args.ct_ramp_minutes * 60, args.follow_up_share, args.zh_share), batch_size=None,
        num_workers=args.workers, prefetch_factor=4 if args.workers else None, persistent_workers=bool(args.workers),
    )
    t0, ema = time.time(), {}  # running loss per batch kind (X-ray, CT)
    for step, batch in enumerate(loader):
        if step >= args.steps or (args.minutes and time.time() - t0 > args.minutes * 60):
            break
        kind = "xray"
        if "squares" in batch:
            n = len(batch["squares"][0])
            kind = "ct" if n == pm.CT_MAX_SLICES else "ct<20" if n > 4 else "ct<=4"
            batch["pixel_values"] = ct_pixels(batch.pop("squares"), pm.IMAGE_SIZE, device)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        lr = learning_rate(step, time.time() - t0)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema[kind] = loss.item() if kind not in ema else 0.95 * ema[kind] + 0.05 * loss.item()
        if step % 100 == 0:
            losses = "  ".join(f"{k} loss {v:.4f}" for k, v in sorted(ema.items()))
            print(f"step {step:5d}  {losses}  lr {lr:.2e}  {time.time() - t0:6.0f}s", flush=True)
        if step and step % 1000 == 0:
            model.eval()
            print(f"  zone accuracy on seeds 0..63: {zone_accuracy(model, processor, list(range(64)), device)}", flush=True)
            if args.zh_share:
                print(f"  in Chinese: {zone_accuracy(model, processor, list(range(64)), device, language='zh')}",
                      flush=True)
            if args.ct_share:
                print(f"  CT lobe accuracy on seeds 0..31: {lobe_accuracy(model, processor, list(range(32)), device)}", flush=True)
            model.train()
    print(f"trained {step} steps in {time.time() - t0:.0f}s", flush=True)

    model.eval()
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    processor.save_pretrained(args.out)
    acc = zone_accuracy(model, processor, list(range(args.eval_seeds)), device)
    print(f"held-out seeds 0..{args.eval_seeds - 1}: {acc}", flush=True)
    if args.ct_share:
        ct_acc = lobe_accuracy(model, processor, list(range(args.ct_eval_seeds)), device)
        print(f"CT held-out seeds 0..{args.ct_eval_seeds - 1}: {ct_acc}", flush=True)
    if args.follow_up_share:
        fa = follow_up_accuracy(model, processor, list(range(100)), device)
        print(f"follow-up 'Where is it?' names the first finding's place on seeds 0..99: {fa:.3f}", flush=True)
    if args.zh_share:
        acc = zone_accuracy(model, processor, list(range(args.eval_seeds)), device, language="zh")
        print(f"in Chinese, held-out seeds 0..{args.eval_seeds - 1}: {acc}", flush=True)
        if args.ct_share:
            ct_acc = lobe_accuracy(model, processor, list(range(args.ct_eval_seeds)), device, language="zh")
            print(f"in Chinese, CT held-out seeds 0..{args.ct_eval_seeds - 1}: {ct_acc}", flush=True)
        if args.follow_up_share:
            fa = follow_up_accuracy(model, processor, list(range(100)), device, language="zh")
            print(f"follow-up '它在哪里？' names the first finding's place on seeds 0..99: {fa:.3f}", flush=True)


if __name__ == "__main__":
    main()
