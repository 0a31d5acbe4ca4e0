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

**Rollout inside each image** (``rollout=True``). A finding token on a late layer often attends to an
image token that has already gathered the image's content from its neighbours: Gemma 3's image tokens
attend to each other bidirectionally, so after a few layers one token of a CT slice (the spine, in the
phantom model) can stand for the whole slice. Attention rollout (Abnar & Zuidema, "Quantifying Attention
Flow in Transformers", ACL 2020) follows such attention back to the tokens it came from: each layer's
token mixing is ``0.5 I + 0.5 A`` (``A``: head-averaged attention, the residual stream as the identity),
and the product over the layers below a read layer maps the read layer's image tokens back onto the
input's. Here the mixing is kept only *inside each image* (image tokens to the same image's tokens,
renormalised), so at prefill the recorder keeps, per image, one running n x n product (n = tokens per
image, 256 in Gemma 3) and a copy of it at each read layer; decode rows are mapped through it at the
end. Memory: n x n per image per read layer (85 CT slices: 22 MiB each in float32), never L x L.
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
    """Collects, per layer, one (batch, heads, n_image_tokens) row per forward call; with ``rollout``
    also each image's token mixing at prefill (see the module docstring)."""

    def __init__(self, layers: list[int], image_positions: torch.Tensor, prompt_len: int, rollout: bool = False,
                 tokens_per_image: int = 256):
        self.layers = set(layers)
        self.image_positions = image_positions  # (n_image_tokens,) key positions of image tokens
        self.prompt_len = prompt_len
        self.rows: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
        self.dropped: dict[int, str] = {}
        self.rollout = rollout and bool(layers)
        self.blocks = image_positions.view(-1, tokens_per_image) if self.rollout else None  # (images, n)
        self.mixing: torch.Tensor | None = None  # (images, n, n) product of the layers seen so far
        self.at_layer: dict[int, torch.Tensor] = {}  # read layer -> the product of the layers below it
        self.unmixed: list[int] = []  # prefill layers whose keys did not cover the prompt (taken as identity)

    def mix(self, layer: int, query, key, attention_mask, scaling: float) -> None:
        """Prefill of ``layer``: snapshot the product for a read layer, then multiply in this layer's mixing."""
        if layer > max(self.layers):
            return
        n = self.blocks.shape[1]
        if self.mixing is None:
            eye = torch.eye(n, device=query.device, dtype=torch.float32)
            self.mixing = eye.expand(self.blocks.shape[0], n, n).clone()
        if layer in self.layers:
            self.at_layer[layer] = self.mixing.clone()
        if layer == max(self.layers):
            return
        if key.shape[2] != query.shape[2]:
            self.unmixed.append(layer)
            return
        for b, pos in enumerate(self.blocks):
            end = int(pos[-1]) + 1
            q = query[:1, :, pos, :].float()
            k = key[:1, :, :end, :].float()
            if k.shape[1] != q.shape[1]:
                k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            scores = torch.matmul(q, k.transpose(-1, -2)) * scaling  # (1, heads, n, end)
            if attention_mask is not None:
                m = attention_mask[:1, :, pos, :end]
                scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
            within = torch.softmax(scores, dim=-1)[0][..., pos].mean(0)  # (n, n) head-averaged, this image
            within = within / within.sum(-1, keepdim=True).clamp_min(1e-12)
            step = 0.5 * torch.eye(n, device=within.device) + 0.5 * within
            self.mixing[b] = step @ self.mixing[b]

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
        """(steps, layers, batch, heads, n_image_tokens) for the usable layers (rolled out if asked)."""
        layers = self.usable_layers
        if not layers:
            raise RuntimeError(f"no layer recorded attention to the image: {self.dropped}")
        steps = min(len(self.rows[layer]) for layer in layers)
        return torch.stack([self._rolled(layer, torch.stack(self.rows[layer][:steps])) for layer in layers], dim=1)

    def _rolled(self, layer: int, rows: torch.Tensor) -> torch.Tensor:
        """(steps, batch, heads, images * n) rows mapped back onto the input's image tokens."""
        if not self.rollout or layer not in self.at_layer:
            return rows
        images, n = self.blocks.shape
        r = rows.reshape(*rows.shape[:-1], images, n)
        out = torch.einsum("...si,sij->...sj", r, self.at_layer[layer].to(rows.device))
        return out.reshape(rows.shape)


def _capture_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    out = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    recorder = _ACTIVE.get()
    layer = getattr(module, "layer_idx", None)
    if recorder is not None and layer is not None:
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        if recorder.rollout and query.shape[2] > 1:  # prefill: the image tokens' own mixing
            recorder.mix(layer, query, key, attention_mask, scaling)
        if layer in recorder.layers:
            recorder.record(layer, query, key, attention_mask, scaling)
    return out


AttentionInterface.register(CAPTURE_ATTN, _capture_attention)
AttentionMaskInterface.register(CAPTURE_ATTN, sdpa_mask)


@contextmanager
def recording(layers: list[int], image_positions: torch.Tensor, prompt_len: int, rollout: bool = False,
              tokens_per_image: int = 256):
    recorder = AttentionRecorder(layers, image_positions, prompt_len, rollout, tokens_per_image)
    token = _ACTIVE.set(recorder)
    try:
        yield recorder
    finally:
        _ACTIVE.reset(token)
