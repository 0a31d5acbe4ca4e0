"""Attention heads zero-padded to a width that the GPU's fused attention kernels run faster.

MedGemma's vision tower (SigLIP) has heads of 72. On an H100 a CT's 85 images spend about 0.51 s of their 1.6 s
prefill in the tower's attention, cuDNN's Hopper flash kernel running at 35 % of the card's bf16 rate (run DM in
``bench/results/fast_path.md``); kernels are tuned for head widths such as 64, 96 and 128.

Zeros appended to every head's queries and keys leave each dot product as it was, so each softmax weight; zeros
appended to its values add output columns of zeros, which are cut off. With the scale given as the true width's
(72 ** -0.5), the padded call computes the same attention in another kernel's summation order.
``bench/tower_attention.py`` times the widths; :data:`WIDTH` is the one the library pads to (0: none), on the
devices in :data:`DEVICES` only, for layers without a mask (the tower's: each image's patches see each other).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

WIDTH_ENV = "MEDGEMMA_HEAD_PAD"
WIDTH = int(os.environ.get(WIDTH_ENV, "0"))  # the head width padded to; 0: heads as the model has them
DEVICES = ("cuda",)
LONG = 1024  # shorter sequences (text, a decode step) are left alone: their heads are wide and few


def wanted(query: torch.Tensor, mask) -> bool:
    """Whether this attention call's heads are to be padded: a long unmasked call on a padded device whose heads are
    narrower than :data:`WIDTH`."""
    return (0 < query.shape[-1] < WIDTH and mask is None and query.shape[2] >= LONG
            and query.device.type in DEVICES)


def padded(attend, query, key, value, scale: float):
    """``attend(query, key, value, s=scale)`` (B, H, L, D) -> (B, L, H, D) on heads padded with zeros to :data:`WIDTH`
    and the output cut back to the heads' own width (a view; the caller's reshape makes it whole)."""
    width = query.shape[-1]
    pad = (0, WIDTH - width)
    out = attend(F.pad(query, pad), F.pad(key, pad), F.pad(value, pad), s=scale)
    return out[..., :width]
