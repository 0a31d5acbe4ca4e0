"""A chat's text inputs (token ids, attention mask, token types) kept per rendered prompt, so that a prompt
seen before is not tokenised again: only its images go through the image processor.

A CT's prompt is 85 images and their "SLICE n" texts: the processor expands each image into 256 image
tokens and tokenises the 22,532-token text, then counts the image tokens back. On the H200's host that was
0.22 of a CT's 0.25 s of preprocessing (the images themselves: 6 ms on the GPU; ``bench/prefill_ab.py --parts
prepare``). Every CT asked the default question renders to the same prompt, and so does every film of a
batch.

Exact by construction: the key is the rendered prompt (the chat template's text, image placeholders
included) and the kept tensors are what the processor itself made of it. The image processor alone is used
only after it was checked, once per processor, to give the processor's own pixel values bit for bit
(:func:`inputs`); where it does not, every call goes through the processor.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import OrderedDict

import torch
from transformers import BatchFeature

log = logging.getLogger(__name__)

KEPT = 32  # prompts kept per processor (a CT's text inputs: 0.5 MB)

_lock = threading.Lock()
_kept: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # processor -> OrderedDict(prompt -> text inputs)
# processor -> the keys its image processor alone gives (checked to equal the processor's own), or False
_images_alone: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def inputs(processor, messages: list[dict], images: list, processor_kwargs: dict | None = None) -> BatchFeature:
    """The processor's inputs for the chat ``messages`` (what ``apply_chat_template(..., tokenize=True,
    return_dict=True, return_tensors="pt")`` gives), with ``images`` the images they carry in order and
    ``processor_kwargs`` the image processor's own (a device). A prompt made before takes its text inputs
    from what was kept and only its images through the image processor."""
    if not images:  # a text-only chat: short, nothing worth keeping
        return _made(processor, messages, processor_kwargs)
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    with _lock:
        keys = _images_alone.get(processor)
        text = _kept.get(processor, {}).get(prompt) if keys else None
    if text is not None:
        alone = _images(processor, images, processor_kwargs)
        # (clones: a caller that writes into its inputs must not change the next reading's)
        return BatchFeature({**{k: v.clone() for k, v in text.items()}, **{k: alone[k] for k in keys}})
    made = _made(processor, messages, processor_kwargs)
    with _lock:
        image_keys = _images_alone.get(processor)
    if image_keys is None:  # the first prompt with images: is the image processor alone the processor's own?
        image_keys = _checked_keys(processor, made, images, processor_kwargs)
    with _lock:
        _images_alone[processor] = image_keys
        if image_keys:
            kept = _kept.setdefault(processor, OrderedDict())
            kept[prompt] = {k: v.detach().cpu() for k, v in made.items() if k not in image_keys}
            kept.move_to_end(prompt)
            while len(kept) > KEPT:
                kept.popitem(last=False)
    return made


def _made(processor, messages: list[dict], processor_kwargs: dict | None) -> BatchFeature:
    """The processor's own inputs (given a copy of ``processor_kwargs``: transformers 5.17 adds its own keys
    to the dict it is given, and the image processor alone must not get them)."""
    kwargs = {"processor_kwargs": dict(processor_kwargs)} if processor_kwargs else {}
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt", **kwargs)


def _checked_keys(processor, made: BatchFeature, images: list, processor_kwargs: dict | None) -> frozenset | bool:
    """The keys of the image processor's outputs that equal the processor's own ``made`` from ``images``, bit
    for bit (pixel values among them); False where they do not, or where calling it alone fails."""
    try:
        alone = _images(processor, images, processor_kwargs)
        keys = frozenset(k for k in alone if k in made)  # (the processor drops some, e.g. crop counts)
        if "pixel_values" in keys and _same(made, alone, keys):
            return keys
        why = "does not give the processor's pixel values"
    except Exception as e:  # noqa: BLE001 (the processor's own way still works: the reading goes on)
        why = f"cannot be called alone ({type(e).__name__}: {str(e)[-200:]})"
    log.warning("%s %s: every prompt is tokenised anew", type(processor.image_processor).__name__, why)
    return False


def _images(processor, images: list, processor_kwargs: dict | None) -> dict:
    return dict(processor.image_processor(images, return_tensors="pt", **(processor_kwargs or {})))


def _same(made: BatchFeature, alone: dict, keys) -> bool:
    """Whether the image processor's outputs ``keys`` alone equal the processor's own, bit for bit."""
    return all(torch.is_tensor(alone[k]) and torch.is_tensor(made[k]) and alone[k].shape == made[k].shape
               and torch.equal(alone[k].to(made[k].device), made[k]) for k in keys)


def forget() -> None:
    """Drop every kept prompt and check (tests)."""
    with _lock:
        _kept.clear()
        _images_alone.clear()
