"""CUDA streams made once per device and use, then kept for the process.

torch keeps a cuBLAS workspace (32 MiB on Hopper) for every pair of cuBLAS handle (one per thread) and stream that
has run a matrix product, for as long as the process lives. A stream made anew for each decoder (its warm-up steps)
or each reading (the attention rows' copies and roll-out) came from torch's pool of 32 and, until the pool had
gone round, brought a new workspace with it: on the H200 the allocated memory grew 0.12-0.16 GiB with each round of
three reading shapes (run CN, `bench/decoder_cache_memory.py`), with no tensor of the readings left behind. One kept
stream per use bounds those workspaces to the few uses below."""

from __future__ import annotations

import threading

import torch

_KEPT: dict = {}
_LOCK = threading.Lock()


def kept(device, use: str, priority: int = 0):
    """The stream for ``use`` on ``device`` (made on the first call; None off CUDA). ``priority``: torch's stream
    priority (-1 high), part of the key."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, use, priority)
    with _LOCK:
        if key not in _KEPT:
            _KEPT[key] = torch.cuda.Stream(index, priority=priority)
        return _KEPT[key]
