"""A long prompt's prefill attention by chunks of queries, each against only the keys its rows can see.

A CT prompt (85 slices) is 22.5k tokens. Its prefill masks are explicit (:func:`decoding.prefill_masks`:
causal, each image's tokens both ways, a window on sliding layers), and a fused attention kernel given an
arbitrary mask computes every query against every key: a sliding layer (window 1024 in Gemma 3) pays for
22.5k keys per query where it sees at most ~1.3k, and a full layer for the masked upper triangle too. On
one H200 each of the 34 text layers' attention took 21 ms, sliding or not (``fast_path_profiles.md``).

Here the queries run in chunks of :data:`CHUNK` rows, each against the one span of keys ``[k0, k1)`` that
holds every key any of its rows sees (read once per mask from the mask itself): a row's softmax and output
are the same numbers whatever masked keys are left out, so the result is the dense one up to the kernels'
summation order. The span of a chunk whose rows see nothing (left padding) is one key, still masked: the
kernel treats such rows as it did over every key. Prompts shorter than :data:`LONG` run dense, as before.
"""

from __future__ import annotations

import os

import numpy as np
import torch

LONG = 4096  # prompts at least this long are chunked (an X-ray's 278 tokens, a batch's, run dense)
# query rows per chunk (its keys: about CHUNK + a window + an image for a sliding layer); 0: every prompt dense
CHUNK = int(os.environ.get("MEDGEMMA_PREFILL_CHUNK", "2048"))


def wanted(query: torch.Tensor, key: torch.Tensor, mask) -> bool:
    """Whether this layer call is a long prefill with an explicit bool mask (B, 1, L, >= L) to chunk."""
    if CHUNK <= 0 or not query.shape[2] == key.shape[2] >= LONG or not isinstance(mask, torch.Tensor):
        return False
    return mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[-2] == query.shape[2]


def key_spans(mask: torch.Tensor, length: int, chunk: int | None = None) -> list[tuple[int, int, int, int]]:
    """``(q0, q1, k0, k1)`` per chunk of query rows: every key that any row of ``[q0, q1)`` sees (in any batch
    row) lies in ``[k0, k1)``; keys beyond ``length`` are not looked at. Kept on the mask (one host sync per
    mask, not per layer: every layer of a type gets the same mask object); ``chunk``: :data:`CHUNK`."""
    chunk = chunk or CHUNK
    cached = getattr(mask, "_medgemma_spans", None)
    if cached is not None and cached[0] == (length, chunk):
        return cached[1]
    starts = list(range(0, mask.shape[-2], chunk))
    seen = torch.stack([mask[:, 0, q0 : q0 + chunk, :length].any(dim=1).any(dim=0) for q0 in starts])
    seen = seen.cpu().numpy()  # (chunks, length) bool, a few hundred kB for a CT
    spans = []
    for q0, cols in zip(starts, seen):
        at = np.flatnonzero(cols)
        k0, k1 = (int(at[0]), int(at[-1]) + 1) if at.size else (0, 1)
        spans.append((q0, min(q0 + chunk, mask.shape[-2]), k0, k1))
    mask._medgemma_spans = ((length, chunk), spans)
    return spans


def attention(attend, query, key, value, mask):
    """``attend(query, key, value, mask)``: by :func:`chunked` where the call is a long prefill (:func:`wanted`),
    else at once."""
    if wanted(query, key, mask):
        return chunked(attend, query, key, value, mask)
    return attend(query, key, value, mask)


def chunked(attend, query, key, value, mask, chunk: int | None = None):
    """``attend(query, key, value, mask)`` -> (B, rows, H, D) output (or a tuple whose first item is that and
    whose second is a (B, H, rows) log-sum-exp), run per chunk of query rows on its span of keys; the chunks'
    results joined along the rows. None when ``attend`` gives None for a chunk (no kernel took it)."""
    outs, lses = [], []
    for q0, q1, k0, k1 in key_spans(mask, key.shape[2], chunk):
        got = attend(query[:, :, q0:q1], key[:, :, k0:k1], value[:, :, k0:k1], mask[:, :, q0:q1, k0:k1])
        if got is None:
            return None
        if isinstance(got, tuple):
            outs.append(got[0])
            lses.append(got[1])
        else:
            outs.append(got)
    out = torch.cat(outs, dim=1)
    return (out, torch.cat(lses, dim=-1)) if lses else out
