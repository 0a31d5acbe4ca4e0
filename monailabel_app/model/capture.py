"""Capture the attention of each generated token's query to the image tokens, without eager attention.

The model runs with the attention implementation ``medgemma_capture``: every layer computes its output
with PyTorch SDPA (as ``attn_implementation="sdpa"`` would), and on the chosen layers it also computes
softmax(q k^T) for *one query row per study and step* and keeps the columns of the image tokens:

* at prefill (:class:`AttentionRecorder`), the last prompt row, the query that emits the first answer
  token;
* at each decode step (:class:`DecodeRecorder`), the single new row. The decode recorder writes into a
  preallocated buffer at an index held on the device, so the step can be replayed as a CUDA graph
  (:mod:`monailabel_app.model.decoding`).

Row ``t`` of a recording is therefore the attention of the query that emitted generated token ``t``:
the tokens that wrote a finding index straight into it. Nothing else is materialised: never the L x L
matrices, never eager attention for the whole model.

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
end. ``A``'s softmax denominators span every key the image tokens see; they are computed a chunk of
whole images at a time (bounded memory), each chunk against the keys up to its last image; only the
scores are held (exponentiated in place for the denominators), never a softmax of the same size beside
them. Memory: n x n per image per read layer (85 CT slices: 22 MiB each in float32), never L x L.

**Denominators from the attention kernel** (:func:`attention_and_lse`). The fused attention that computes
a layer's output already has every row's log-sum-exp of its scores: on the layers that are mixed, the
layer's attention runs through the kernel entry point that returns it (cuDNN or memory-efficient attention
on CUDA, the flash kernel on the CPU), and each image's own n x n scores are all the rollout computes
itself: exp(score - lse). A CT's mixing then costs a few small matmuls per layer instead of a second pass
over every key in float32. Where no such kernel takes the layer's inputs, the chunked pass above is used.
"""

from __future__ import annotations

import contextvars
import logging
from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import prefill_attention

logger = logging.getLogger(__name__)
CAPTURE_ATTN = "medgemma_capture"
CHUNK_BYTES = 2**30  # scores of one chunk of images in the rollout's denominators (1 GiB)
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("recorder", default=None)


def scores_f32(q: torch.Tensor, k: torch.Tensor, scaling: float) -> torch.Tensor:
    """``q k^T * scaling`` in float32 for q (B, H, m, D) and k (B, KVH, S, D), grouped-query heads
    matched without copying the keys (query head h reads KV head h // (H / KVH)). On CUDA the bf16/fp16
    products are accumulated and returned in float32 by the matmul itself."""
    b, h, m, d = q.shape
    kvh = k.shape[1]
    qg = (q * scaling).reshape(b * kvh, (h // kvh) * m, d)
    kt = k.reshape(b * kvh, k.shape[2], d).transpose(1, 2)
    if q.is_cuda and q.dtype != torch.float32:
        try:
            s = torch.bmm(qg, kt, out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            s = torch.bmm(qg.float(), kt.float())
    else:
        s = torch.bmm(qg.float(), kt.float())
    return s.view(b, h, m, k.shape[2])


def _masked(scores: torch.Tensor, mask: torch.Tensor | None, inplace: bool = False) -> torch.Tensor:
    """Scores with the attention mask applied (bool: False = not seen; float: added)."""
    if mask is None:
        return scores
    if mask.dtype == torch.bool:
        return scores.masked_fill_(~mask, float("-inf")) if inplace else scores.masked_fill(~mask, float("-inf"))
    return scores.add_(mask) if inplace else scores + mask.float()


def _positions(image_positions: torch.Tensor) -> torch.Tensor:
    return image_positions if image_positions.dim() == 2 else image_positions[None]


class AttentionRecorder:
    """Prefill: per chosen layer one (batch, heads, n_image_tokens) row (the last prompt row); with
    ``rollout`` also each image's token mixing (see the module docstring). ``image_positions`` is
    (n_image_tokens,) or, for a batch, (batch, n_image_tokens)."""

    def __init__(self, layers: list[int], image_positions: torch.Tensor, rollout: bool = False,
                 tokens_per_image: int = 256, mixed: dict | None = None):
        """``mixed``: rollout products already computed (a follow-up turn: its images are in the past)."""
        self.layers = set(layers)
        self.image_positions = _positions(image_positions)  # (B, N) key positions of image tokens
        self.rows: dict[int, torch.Tensor] = {}
        self.dropped: dict[int, str] = {}
        self.rollout = rollout and bool(layers)
        batch = self.image_positions.shape[0]
        self.blocks = self.image_positions.view(batch, -1, tokens_per_image) if self.rollout else None  # (B, I, n)
        self.mixing: torch.Tensor | None = None  # (B, I, n, n) product of the layers seen so far
        self.at_layer: dict[int, torch.Tensor] = dict(mixed or {})  # read layer -> product of the layers below
        self.mixed = bool(mixed)
        self.unmixed: list[int] = []  # prefill layers whose keys did not cover the prompt (taken as identity)
        self._stacked_products: tuple[list[int], torch.Tensor] | None = None  # (layers, products): _products

    def wants_lse(self, layer: int, query, key) -> bool:
        """This prefill layer's tokens are mixed (its attention's log-sum-exp makes that cheap)."""
        return self.rollout and not self.mixed and layer < max(self.layers) and key.shape[2] == query.shape[2]

    def observe(self, layer: int, query, key, attention_mask, scaling: float, lse: torch.Tensor | None = None) -> None:
        if self.rollout and not self.mixed:
            self.mix(layer, query, key, attention_mask, scaling, lse)
        if layer in self.layers:
            self.record(layer, query, key, attention_mask, scaling)

    def mix(self, layer: int, query, key, attention_mask, scaling: float, lse: torch.Tensor | None = None) -> None:
        """Prefill of ``layer``: snapshot the product for a read layer, then multiply in this layer's mixing."""
        if layer > max(self.layers):
            return
        batch, images, n = self.blocks.shape
        if self.mixing is None:
            eye = torch.eye(n, device=query.device, dtype=torch.float32)
            self.mixing = eye.expand(batch, images, n, n).clone()
        if layer in self.layers:
            self.at_layer[layer] = self.mixing.clone()
        if layer == max(self.layers):
            return
        if key.shape[2] != query.shape[2]:
            self.unmixed.append(layer)
            return
        eye = torch.eye(n, device=query.device)
        for b in range(batch):
            mask = None if attention_mask is None else attention_mask[b if attention_mask.shape[0] > 1 else 0]
            within = self._within(query[b : b + 1], key[b : b + 1], mask, self.blocks[b], scaling) if lse is None \
                else self._within_lse(query[b : b + 1], key[b : b + 1], lse[b], mask, self.blocks[b], scaling)
            self.mixing[b] = torch.matmul(0.5 * eye + 0.5 * within, self.mixing[b])

    @staticmethod
    def _within(query, key, mask, blocks, scaling: float) -> torch.Tensor:
        """(images, n, n) head-averaged softmax attention among each image's own tokens, renormalised.

        The softmax runs over every key a token sees (all keys up to its chunk's last image token, the
        mask applied), then each image keeps its own columns."""
        images, n = blocks.shape
        heads = query.shape[1]
        # whole images per chunk: bounded memory, and at least 8 chunks so that early images skip late keys
        per_chunk = max(1, min(CHUNK_BYTES // (4 * heads * n * (int(blocks[-1, -1]) + 1)), -(-images // 8)))
        out = []
        for i in range(0, images, per_chunk):
            chunk = blocks[i : i + per_chunk]  # (k, n)
            rows, end = chunk.reshape(-1), int(chunk[-1, -1]) + 1  # later keys are masked for these rows
            s = scores_f32(query[:, :, rows], key[:, :, :end], scaling)[0]  # (H, k*n, end)
            if mask is not None:
                s = _masked(s, mask[:, rows, :end], inplace=True)
            own = s.view(heads, len(chunk), n, end).gather(-1, chunk[None, :, None, :].expand(heads, len(chunk), n, n))
            top = s.amax(-1, keepdim=True)  # the softmax over every key, without a second (H, k*n, end) tensor:
            total = s.sub_(top).exp_().sum(-1, keepdim=True)  # its denominators in place, the own columns apart
            shape = (heads, len(chunk), n, 1)
            out.append((torch.exp(own - top.view(shape)) / total.view(shape)).mean(0))  # (k, n, n)
        p = torch.cat(out)
        return p / p.sum(-1, keepdim=True).clamp_min(1e-12)

    @staticmethod
    def _within_lse(query, key, lse, mask, blocks, scaling: float) -> torch.Tensor:
        """:meth:`_within` from each row's log-sum-exp over every key it sees (``lse`` (H, L), float32, from
        the layer's attention kernel): only each image's own n x n scores are computed."""
        q = query[0][:, blocks].transpose(0, 1).contiguous()  # (I, H, n, D)
        k = key[0][:, blocks].transpose(0, 1).contiguous()  # (I, KVH, n, D)
        s = scores_f32(q, k, scaling)  # (I, H, n, n)
        if mask is not None:
            own = mask[:, blocks[:, :, None], blocks[:, None, :]]  # (1, I, n, n)
            s = _masked(s, own.transpose(0, 1), inplace=True)
        s.sub_(lse[:, blocks].transpose(0, 1)[..., None]).exp_()
        p = s.mean(1)  # (I, n, n)
        return p / p.sum(-1, keepdim=True).clamp_min(1e-12)

    def record(self, layer: int, query, key, attention_mask, scaling: float) -> None:
        if layer in self.dropped or layer in self.rows:
            return
        if key.shape[2] <= int(self.image_positions.max()):
            self.dropped[layer] = f"keys cover {key.shape[2]} positions (window shorter than the sequence)"
            return
        scores = scores_f32(query[:, :, -1:], key, scaling)
        if attention_mask is not None:
            scores = _masked(scores, attention_mask[..., -1:, : key.shape[2]])
        weights = torch.softmax(scores, dim=-1)[:, :, 0, :]  # (B, H, S)
        index = self.image_positions[:, None, :].expand(-1, weights.shape[1], -1)
        self.rows[layer] = weights.gather(-1, index)

    @property
    def usable_layers(self) -> list[int]:
        return sorted(layer for layer in self.layers if layer not in self.dropped and layer in self.rows)

    def stacked(self, decode: torch.Tensor | None = None) -> torch.Tensor:
        """(steps, layers, batch, heads, n_image_tokens) for the usable layers (rolled out if asked):
        the prefill row, then ``decode`` rows (steps - 1, layers, batch, heads, n) when given."""
        rows = self.prefill_rows()
        if decode is not None:
            rows = torch.cat([rows, decode.to(rows.device)], dim=0)
        return self.rolled_rows(rows)

    def prefill_rows(self) -> torch.Tensor:
        """(1, layers, batch, heads, n): the first answer token's rows (the prefill's last query), as recorded."""
        layers = self.usable_layers
        if not layers:
            raise RuntimeError(f"no layer recorded attention to the image: {self.dropped}")
        return torch.stack([self.rows[layer] for layer in layers])[None]

    def rolled_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """(steps, layers, batch, heads, n) rows of the usable layers, rolled out if asked (each step alone):
        every layer in one product where each has its mixing (a few torch calls, not a few per layer: the rows'
        copying thread waits for the interpreter at each one while the findings' maps run)."""
        products = self._products()
        if products is None:
            return torch.stack([self._rolled(layer, rows[:, li]) for li, layer in enumerate(self.usable_layers)],
                               dim=1)
        layers, batch, images, n, _ = products.shape
        r = rows.reshape(*rows.shape[:-1], images, n)  # (steps, L, B, H, I, n)
        return torch.einsum("tlbhsi,lbsij->tlbhsj", r, products.to(rows.device)).reshape(rows.shape)

    def _products(self) -> torch.Tensor | None:
        """(layers, batch, images, n, n): the usable layers' mixing products stacked once (each layer's entry
        of :attr:`at_layer` then a view of it); None unless every usable layer is rolled out."""
        layers = self.usable_layers
        if not self.rollout or not layers or any(layer not in self.at_layer for layer in layers):
            return None
        stacked = self._stacked_products
        if stacked is None or stacked[0] != layers:
            products = torch.stack([self.at_layer[layer] for layer in layers])
            self.at_layer.update({layer: products[i] for i, layer in enumerate(layers)})
            stacked = self._stacked_products = (layers, products)
        return stacked[1]

    def _rolled(self, layer: int, rows: torch.Tensor) -> torch.Tensor:
        """(steps, batch, heads, images * n) rows mapped back onto the input's image tokens."""
        if not self.rollout or layer not in self.at_layer:
            return rows
        batch, images, n = self.blocks.shape
        r = rows.reshape(*rows.shape[:-1], images, n)  # (steps, B, H, I, n)
        out = torch.einsum("tbhsi,bsij->tbhsj", r, self.at_layer[layer].to(rows.device))
        return out.reshape(rows.shape)


class DecodeRecorder:
    """Decode steps: on ``layers``, the new query row's attention to the image tokens, written into row
    ``step`` of that layer's buffer ((steps, batch, heads, n_image_tokens), float32) where ``step`` is a
    one-element device tensor. No host synchronisation: safe inside a CUDA graph.

    One buffer per layer, each written in place: a row written into a view of one buffer for all layers
    (``buffer[:, layer]``) was compiled as a copy of that layer's whole buffer per step and the whole buffer
    written back (a CT's 200 x 8 x 21,760 rows per layer: 1.2 of a step's 5.0 ms on an H200)."""

    def __init__(self, layers: list[int], image_positions: torch.Tensor, steps: int, heads: int,
                 step: torch.Tensor):
        self.slot = {layer: i for i, layer in enumerate(layers)}
        self.image_positions = _positions(image_positions)
        batch, n = self.image_positions.shape
        self.index = self.image_positions[:, None, :].expand(batch, heads, n)
        self.buffers = [torch.zeros(steps, batch, heads, n, device=step.device) for _ in layers]
        self.step = step
        self.products: torch.Tensor | None = None  # (layers, batch, images, n, n): :meth:`roll`'s, once enabled
        self._offsets: torch.Tensor | None = None

    def enable_rollout(self, tokens_per_image: int) -> None:
        """Make :meth:`roll` possible: per recorded layer a product (batch, images, n, n) that a reading fills
        (:meth:`set_products`; the identity until then, and for a layer the reading does not roll out)."""
        batch, total = self.image_positions.shape
        images, n = total // tokens_per_image, tokens_per_image
        eye = torch.eye(n, device=self.step.device)
        self.products = eye.expand(len(self.buffers), batch, images, n, n).clone()
        self._offsets = torch.arange(-len(self.buffers[0]), 0, device=self.step.device)  # (every buffer's length)

    def set_products(self, at_layer: dict[int, torch.Tensor]) -> None:
        """The reading's rollout products (read layer -> (batch, images, n, n), :attr:`AttentionRecorder.at_layer`;
        empty: no rollout); a recorded layer without one keeps its rows as they are (the identity)."""
        n = self.products.shape[-1]
        eye = torch.eye(n, device=self.products.device)
        for layer, li in self.slot.items():
            mixing = at_layer.get(layer)
            self.products[li].copy_(eye.expand_as(self.products[li]) if mixing is None else mixing)

    def roll(self, steps: int) -> None:
        """Roll out, in place, the rows of the last ``steps`` steps (those before :attr:`step`) through
        :attr:`products`, as :meth:`AttentionRecorder.rolled_rows` would: graph-safe (the rows' indices are
        made on the device), so a decode replay leaves its rows rolled out and the host only copies them."""
        index = self.step + self._offsets[-steps:]  # (steps,) the rows just written
        rows = torch.stack([b.index_select(0, index) for b in self.buffers], dim=1)  # (steps, L, B, H, N)
        layers, batch, images, n, _ = self.products.shape
        r = rows.view(*rows.shape[:-1], images, n)
        out = torch.einsum("tlbhsi,lbsij->tlbhsj", r, self.products).reshape(rows.shape)
        for li, buffer in enumerate(self.buffers):
            buffer.index_copy_(0, index, out[:, li])

    def records(self, layer: int) -> bool:
        return layer in self.slot

    def observe(self, layer: int, weights: torch.Tensor) -> None:
        """``weights``: the step's attention (B, H, 1, S), float32 (:func:`decode_weights`, the same that make
        the layer's output)."""
        li = self.slot.get(layer)
        if li is None:
            return
        self.buffers[li].index_copy_(0, self.step, weights[:, :, 0, :].gather(-1, self.index)[None])

    def rows(self, start: int, stop: int, layers: list[int] | None = None) -> torch.Tensor:
        """(stop - start, layers, batch, heads, n): the rows of steps ``[start, stop)`` of the buffers at
        ``layers`` (indices into the recorded layers; all of them by default), stacked once."""
        chosen = self.buffers if layers is None else [self.buffers[i] for i in layers]
        return torch.stack([b[start:stop] for b in chosen], dim=1)

    def zero_(self) -> None:
        for b in self.buffers:
            b.zero_()


class NoRecorder:
    """Observes nothing (a decode step without capture)."""

    def records(self, layer: int) -> bool:
        return False

    def observe(self, *args) -> None:
        return None


# keys from which a GPU decode step's attention runs in one Triton kernel split over them (:mod:`decode_kernel`):
# None never; 4096 a CT's full layers (a film's and the sliding rings' caches are shorter, where the kernel is
# slower: run CZ); 0 every layer. Part of a decoder's shape (decoder_for). On by default since run DB (an H100, three
# interleaved rounds): with the deepest voxels on the GPU the CT's readings took 2.583-2.598 s against the torch
# path's 2.667-2.702 s, its decode 4.41 against 4.42-4.44 ms a token (alone 4.33-4.34)
DECODE_KERNEL_FROM: int | None = 4096
_DECODE_KERNEL_OFF = False  # the kernel failed to build or run here (decode_kernel_works): the torch path from then on
_DECODE_KERNEL_CHECKED: set = set()  # (device, dtype) where decode_kernel_works launched it
_NO_LSE: set = set()  # (device type, kernel name or "any") that refused: not tried again ("any": warned once)


def attention_and_lse(query, key, value, attention_mask, scaling: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A prefill layer's attention output, laid out as ``sdpa_attention_forward`` returns it (B, L, H, D), and
    each row's log-sum-exp of its scaled, masked scores (B, H, L), float32, from one fused kernel: cuDNN (else
    memory-efficient) attention on CUDA (bf16 / fp16: an fp32 model's mixing on the GPU came out non-finite),
    the flash kernel on the CPU. None when no kernel takes the inputs."""
    if query.is_cuda and query.dtype == torch.float32:  # the fused CUDA kernels' log-sum-exp: half types only
        return None
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # query head h reads KV head h // groups (repeat_kv)
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    batch, heads, length, _ = query.shape
    causal = attention_mask is None
    kind = query.device.type
    bias = None
    if attention_mask is not None:  # additive, of the query's dtype, its rows padded to 16 (CUDA's alignment)
        size = attention_mask.shape[-1]
        bias = torch.zeros(*attention_mask.shape[:-1], -(-size // 16) * 16, dtype=query.dtype,
                           device=query.device)[..., :size]
        if attention_mask.dtype == torch.bool:
            bias.masked_fill_(~attention_mask, float("-inf"))
        else:
            bias.copy_(attention_mask)
    try:
        if kind == "cuda":
            bias = None if bias is None else bias.expand(batch, heads, length, bias.shape[-1])
            errors = []
            for op in (torch.ops.aten._scaled_dot_product_cudnn_attention,
                       torch.ops.aten._scaled_dot_product_efficient_attention):
                if (kind, op.__name__) in _NO_LSE:
                    continue
                try:
                    out, lse = op(query, key, value, bias, True, 0.0, causal, scale=scaling)[:2]
                    break
                except RuntimeError as e:
                    errors.append(f"{op.__name__}: {str(e).splitlines()[0]}")
                    _NO_LSE.add((kind, op.__name__))
            else:
                raise RuntimeError("; ".join(errors))
        else:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                query, key, value, 0.0, causal, attn_mask=bias, scale=scaling)
    except RuntimeError as e:
        if (kind, "any") not in _NO_LSE:
            logger.warning("rollout: no attention kernel returns the log-sum-exp here (%s); the mixing computes its "
                           "denominators itself", e)
            _NO_LSE.add((kind, "any"))
        return None
    return out.transpose(1, 2).contiguous(), lse.reshape(batch, heads, -1)[..., :length].float()


def decode_weights(query, key, attention_mask, scaling: float) -> torch.Tensor:
    """A decode step's attention weights (B, H, 1, S), float32: softmax of the masked scores."""
    return torch.softmax(_masked(scores_f32(query, key, scaling), attention_mask), dim=-1)


def decode_attention(query, key, value, attention_mask, scaling: float,
                     weights: torch.Tensor | None = None) -> torch.Tensor:
    """A decode step's attention: one new query row per sequence, softmax(q k^T) v with the grouped-query heads
    read in place (under torch.compile, SDPA's path copies the whole cache into repeated heads on every layer
    and step: most of a batch's step), the scores in float32. Laid out as ``sdpa_attention_forward`` returns
    it (B, 1, H, D). ``weights``: :func:`decode_weights` already made (a recorded layer's: read once)."""
    b, h, _, _ = query.shape
    kvh, length, dv = key.shape[1], key.shape[2], value.shape[-1]
    p = decode_weights(query, key, attention_mask, scaling) if weights is None else weights  # (B, H, 1, S)
    out = torch.bmm(p.to(value.dtype).view(b * kvh, h // kvh, length), value.reshape(b * kvh, length, dv))
    return out.view(b, h, 1, dv).transpose(1, 2).contiguous()


def _decode_kernel_takes(query, key, attention_mask) -> bool:
    """A decode step's attention runs in :mod:`decode_kernel`: asked for (:data:`DECODE_KERNEL_FROM`), on CUDA, over
    that many keys or more, and of a kind it takes."""
    if DECODE_KERNEL_FROM is None or _DECODE_KERNEL_OFF or not query.is_cuda or key.shape[2] < DECODE_KERNEL_FROM:
        return False
    return _decode_kernel().supported(query, key, attention_mask)


def decode_kernel_works(text_config, device, dtype, length: int) -> bool:
    """Whether :mod:`decode_kernel` builds and runs here for a decoder of ``length`` positions: one launch in the
    model's shapes over a long cache (the variant a CT's decode steps compile first), before that decoder is compiled
    and captured. A host where Triton cannot build (no compiler for its launcher, an unknown card) then reads on the
    torch path, with one warning, instead of failing in every decode step (the step's compile would fail, and its
    eager run call the kernel again). Not asked for (:data:`DECODE_KERNEL_FROM` None, or a cache shorter: a film's,
    so that a server of films launches nothing), off after a failure, or not CUDA: False, nothing launched."""
    if DECODE_KERNEL_FROM is None or length < DECODE_KERNEL_FROM or _DECODE_KERNEL_OFF or \
            torch.device(device).type != "cuda":
        return False
    return _decode_kernel_launches(text_config, device, dtype)


def _decode_kernel_launches(text_config, device, dtype) -> bool:
    """:func:`decode_kernel_works`'s launch on any device (Triton's interpreter's CPU in the tests): once per device
    and type; a failure warned and the kernel off from then on."""
    global _DECODE_KERNEL_OFF
    if (str(device), dtype) in _DECODE_KERNEL_CHECKED:
        return True
    heads, kv_heads, dim = text_config.num_attention_heads, text_config.num_key_value_heads, text_config.head_dim
    length = max(DECODE_KERNEL_FROM or 0, 4097)  # a long cache's chunks
    try:
        kernel = _decode_kernel()
        query = torch.randn(1, heads, 1, dim, device=device, dtype=dtype)
        key, value = (torch.randn(1, kv_heads, length, dim, device=device, dtype=dtype) for _ in range(2))
        seen = torch.ones(1, 1, 1, length, device=device, dtype=torch.bool)
        if kernel.supported(query, key, seen):
            out, _ = kernel.attention(query, key, value, seen, dim ** -0.5, True)
            if not bool(torch.isfinite(out).all()):
                raise RuntimeError("its output is not finite")
    except Exception as e:  # noqa: BLE001 (the torch path gives the same answer)
        logger.warning("the decode attention kernel cannot run here (%s: %s); decode steps on the torch path",
                       type(e).__name__, str(e)[:300])
        _DECODE_KERNEL_OFF = True
        return False
    _DECODE_KERNEL_CHECKED.add((str(device), dtype))
    return True


def _decode_kernel():
    from . import decode_kernel  # (Triton: imported only where the kernel is asked for)

    return decode_kernel


def _capture_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    # a decode step sets its recorder on the attention modules (a plain attribute: torch.compile traces it);
    # prefill goes through the context variable
    recorder = getattr(module, "decode_recorder", None)
    layer = getattr(module, "layer_idx", None)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    if recorder is not None and query.shape[2] == 1 and kwargs.get("softcap") is None:
        if _decode_kernel_takes(query, key, attention_mask):
            out, weights = _decode_kernel().attention(query, key, value, attention_mask, scale, recorder.records(layer))
            if weights is not None:
                recorder.observe(layer, weights)
            return out, None
        weights = decode_weights(query, key, attention_mask, scale)  # the recorded rows are the output's own
        recorder.observe(layer, weights)
        return decode_attention(query, key, value, attention_mask, scale, weights), None
    if recorder is None:
        recorder = _ACTIVE.get()
    if recorder is not None and layer is not None and isinstance(recorder, AttentionRecorder) and \
            (query.device.type, "any") not in _NO_LSE and recorder.wants_lse(layer, query, key):
        fused = prefill_attention.attention(lambda q, k, v, m: attention_and_lse(q, k, v, m, scale),
                                            query, key, value, attention_mask)
        if fused is not None:
            recorder.observe(layer, query, key, attention_mask, scale, lse=fused[1])
            return fused[0], None

    def attend(q, k, v, m):
        return sdpa_attention_forward(module, q, k, v, m, scaling=scaling, dropout=dropout, **kwargs)[0]

    out = prefill_attention.attention(attend, query, key, value, attention_mask), None
    if recorder is not None and layer is not None:
        recorder.observe(layer, query, key, attention_mask, scale)
    return out


AttentionInterface.register(CAPTURE_ATTN, _capture_attention)
AttentionMaskInterface.register(CAPTURE_ATTN, sdpa_mask)


@contextmanager
def recording(recorder):
    """Route the capture attention's observations to ``recorder`` inside the block."""
    token = _ACTIVE.set(recorder)
    try:
        yield recorder
    finally:
        _ACTIVE.reset(token)
