"""Capture, during generation, the attention of each generated token's query to the image tokens.

The model runs with the attention implementation ``medgemma_capture``: every layer computes its output
with PyTorch SDPA (as ``attn_implementation="sdpa"`` would), and on the chosen layers it also computes
softmax(q k^T) for the *last query row only* (at prefill: the row that emits the first answer token;
at each decode step: the single new row) and keeps the columns of the image tokens. Nothing else is
materialised: never the L x L matrices, never eager attention for the whole model.

Row ``t`` of a recording is therefore the attention of the query that emitted generated token ``t``:
the tokens that wrote a finding index straight into it.

Only layers whose keys cover the whole sequence can be used (in Gemma 3 the global layers always; a
sliding-window layer only while the sequence fits its window); a layer whose key length falls short is
dropped from the recording and reported.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

CAPTURE_ATTN = "medgemma_capture"
_ACTIVE: contextvars.ContextVar["AttentionRecorder | None"] = contextvars.ContextVar("recorder", default=None)


class AttentionRecorder:
    """Collects, per layer, one (batch, heads, n_image_tokens) row per forward call."""

    def __init__(self, layers: list[int], image_positions: torch.Tensor, prompt_len: int):
        self.layers = set(layers)
        self.image_positions = image_positions  # (n_image_tokens,) key positions of image tokens
        self.prompt_len = prompt_len
        self.rows: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
        self.dropped: dict[int, str] = {}

    def record(self, layer: int, query, key, attention_mask, scaling: float) -> None:
        if layer in self.dropped:
            return
        last = self.image_positions.max().item()
        # a full-attention layer's keys are the prompt at prefill, then grow by one per decode step
        expected = self.prompt_len + len(self.rows[layer])
        if key.shape[2] <= last or (self.rows[layer] and key.shape[2] != expected):
            self.dropped[layer] = f"keys cover {key.shape[2]} positions (window shorter than the sequence)"
            self.rows[layer].clear()
            return
        q = query[:, :, -1:, :].float()
        k = key.float()
        if k.shape[1] != q.shape[1]:  # grouped-query attention: repeat the KV heads
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
        if attention_mask is not None:
            m = attention_mask[..., -1:, : k.shape[2]]
            scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
        weights = torch.softmax(scores, dim=-1)[:, :, 0, :]
        self.rows[layer].append(weights[:, :, self.image_positions].detach().cpu())

    @property
    def usable_layers(self) -> list[int]:
        return sorted(layer for layer in self.layers if layer not in self.dropped and self.rows[layer])

    def stacked(self) -> torch.Tensor:
        """(steps, layers, batch, heads, n_image_tokens) for the usable layers."""
        layers = self.usable_layers
        if not layers:
            raise RuntimeError(f"no layer recorded attention to the image: {self.dropped}")
        steps = min(len(self.rows[layer]) for layer in layers)
        return torch.stack([torch.stack(self.rows[layer][:steps]) for layer in layers], dim=1)


def _capture_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    out = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    recorder = _ACTIVE.get()
    layer = getattr(module, "layer_idx", None)
    if recorder is not None and layer in recorder.layers:
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        recorder.record(layer, query, key, attention_mask, scaling)
    return out


AttentionInterface.register(CAPTURE_ATTN, _capture_attention)
AttentionMaskInterface.register(CAPTURE_ATTN, sdpa_mask)


@contextmanager
def recording(layers: list[int], image_positions: torch.Tensor, prompt_len: int):
    recorder = AttentionRecorder(layers, image_positions, prompt_len)
    token = _ACTIVE.set(recorder)
    try:
        yield recorder
    finally:
        _ACTIVE.reset(token)
