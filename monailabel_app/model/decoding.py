"""Greedy decoding with a static KV cache and attention capture, replayed as a CUDA graph on GPUs.

Plain ``model.generate`` launches every kernel of every decode step from Python: on a GPU it is bound by
that overhead, not by the card (MedGemma-4B: ~90 ms per token where reading the weights takes ~2 ms).
This module runs the same model code (transformers' own Gemma 3 modules, SDPA attention) in a loop whose
decode step has fixed shapes and fixed buffers, so on CUDA it is captured once as a CUDA graph and
replayed:

1. **Prefill** (one ``model(...)`` call over the whole prompt, images included, with the capture
   attention and an :class:`~monailabel_app.model.capture.AttentionRecorder`): the first answer token, the
   prompt's keys and values, the first attention rows and the rollout mixing.
2. The prompt's keys and values move into a :class:`StaticKV` sized for prompt + answer. Global layers
   keep every position; a sliding-window layer whose window is shorter than that keeps a ring of
   ``window`` slots (keys carry their rotary position, so their order in the buffer does not matter).
3. **Decode steps** (:meth:`Decoder.step`): the new token's embedding, the text decoder with masks
   computed on the device from the slot counter, the next token (greedy, or the forced answer's), its
   log-probability, an end-of-answer flag, and the new query's attention rows written by a
   :class:`~monailabel_app.model.capture.DecodeRecorder` (for a study of one on a GPU, rolled out at the end of each
   replay: :data:`ROLL_IN_REPLAY`). Every input and output is a buffer updated in place,
   so the step contains no host synchronisation. On CUDA the step is compiled with ``torch.compile``
   (which fuses the many small element-wise kernels of each layer; ``MEDGEMMA_COMPILE=0`` turns it off)
   and captured as CUDA graphs, before the buffers hold a request: one of :data:`CHECK_EVERY` steps in a
   row and one of a single step (for the last few). Each layer's queries, keys and values are one matrix
   product in the step (:mod:`projections`).
4. The host replays :data:`CHECK_EVERY` steps at a time, then looks at the tokens: stop when every row has
   ended (end of turn, or a loop: see :func:`loop_start`). One replay per look, not per token, so the
   decode loop asks for the interpreter 25 times for 200 tokens, and threads making another batch's maps
   beside it (holding the GIL) delay it 25 times, not 200.

Several studies decode together as one batch (left padding; per-row pad offsets give each row its own
positions and masks). Rows that end early keep stepping (fixed shapes) and are cut afterwards.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from dataclasses import dataclass, field

import torch

from . import capture, fused_norms, prefill_attention, projections, streams, vision_mlp
from .capture import AttentionRecorder, DecodeRecorder, NoRecorder, recording

logger = logging.getLogger(__name__)

CHECK_EVERY = 8  # decode steps per replay and between looks at the tokens (one host synchronisation each)
MAX_AHEAD = 6  # replays in flight at most (AHEAD_ENV): a sliding ring has room for the steps they may run past an answer
LONG_AHEAD = 3  # replays in flight for a study of one with a long prompt whose maps run beside its decode (a CT)
GRAPH_CACHE = 2  # decoders (CUDA graphs with their buffers) always kept per model: the ones used last
# A GPU with room keeps more (:func:`decoders_to_keep`): a dropped shape pays its warm-up and capture again when it
# comes back (run CK: 3.75 s for a CT whose decoder had been dropped, against 2.77 s; a film 1.6 s, against 0.73 s)
GRAPH_CACHE_MAX = 8
GRAPH_CACHE_FREE = 16 << 30  # bytes a GPU keeps free for readings beyond the kept decoders (a CT's peak: 6.4 GiB)
# a study's decode rows rolled out inside its replays (:meth:`DecodeRecorder.roll`), so that the decode loop only
# copies them off the device (:class:`LiveRows`): each torch call on the loop waits for the interpreter while the
# findings' maps run. "gpu": a study of one on a GPU (its rows are copied off while it decodes); "always": on the
# CPU too (tests); "never"
ROLL_IN_REPLAY = "gpu"


LOOP_PERIOD, LOOP_TIMES = 8, 3
LOOP_GIVEN_BACK = (LOOP_TIMES - 1) * LOOP_PERIOD  # tokens before the look that found a loop that its cut drops
# what the decode step's capture forbids. torch's default ("global") lets any thread's wait for the card break it:
# run DV's probe thread, waiting on a stream of its own while a reading captured its step, made that decoder step
# without its graph for good (37.95 against 4.5 ms a token; fast_path.md). The map threads wait so, and a batch's
# maps run beside the next batch, which may be a new shape to capture. "thread_local": this thread's own unsafe
# calls alone break it
CAPTURE_MODE = "thread_local"


def loop_start(ids: list[int], max_period: int = LOOP_PERIOD, times: int = LOOP_TIMES) -> int | None:
    """Index where the tail's repeated n-gram first repeats (keep ``ids[:index]``), or None.

    Small or out-of-distribution models can repeat themselves until the token limit; the loop carries no
    information, costs decode time and would become spurious findings."""
    for p in range(1, max_period + 1):
        if len(ids) < p * times:
            continue
        gram = ids[-p:]
        if all(ids[-(k + 1) * p : len(ids) - k * p] == gram for k in range(times)):
            return len(ids) - (times - 1) * p
    return None


VISION_BATCH = 16  # images per vision-tower pass at prefill (an 85-slice CT: 6 passes, not one of 85)


def batch_vision_tower(model, images: int = VISION_BATCH) -> None:
    """Run ``model``'s vision tower over at most ``images`` images at a time (installed once per model).

    Gemma 3 encodes every image of a prompt in one pass: for an 85-slice CT, MedGemma's SigLIP holds 85 x
    4096 patch tokens through each layer, its MLP alone about 3 GiB in bf16, the largest allocation of the
    prefill. Each image is encoded on its own anyway (no attention across images), so passes of ``images``
    give the same features with a sixth of that memory; 16 images still fill a large GPU. The patch embeddings
    are also made contiguous (:func:`_contiguous_output`), and on CUDA the MLPs' GELU goes into their first
    product (:mod:`vision_mlp`)."""
    tower = getattr(model.model, "vision_tower", None)
    if tower is None or getattr(tower, "_medgemma_batched", False):
        return
    forward = tower.forward

    def batched(pixel_values=None, *args, **kwargs):
        if pixel_values is None or pixel_values.shape[0] <= images or args or kwargs.get("output_hidden_states") \
                or kwargs.get("output_attentions"):
            return forward(pixel_values, *args, **kwargs)
        parts = [forward(pixel_values[i : i + images], **kwargs) for i in range(0, pixel_values.shape[0], images)]
        if isinstance(parts[0], tuple):
            return tuple(torch.cat(p) if isinstance(p[0], torch.Tensor) else p[0] for p in zip(*parts))
        out = parts[0]
        for key in ("last_hidden_state", "pooler_output"):
            if getattr(out, key, None) is not None:
                out[key] = torch.cat([getattr(p, key) for p in parts])
        return out

    tower.forward = batched
    tower._medgemma_batched = True
    vision_mlp.install(tower)
    embeddings = getattr(getattr(tower, "vision_model", tower), "embeddings", None)
    if embeddings is not None:
        embeddings.register_forward_hook(_contiguous_output)


def _contiguous_output(module, args, out):
    """SigLIP's patch embeddings come out of the patch convolution transposed ((B, C, n) strides for a (B, n, C)
    tensor), and every elementwise operation after keeps that layout: each layer norm of each encoder layer
    then copied its input first (two of 151 MB per layer and pass of 16 images; 0.23 s of an 85-slice CT's
    2.0 s prefill on an H200). Made contiguous once here; the same values."""
    return out.contiguous()


VOCAB_BLOCKS = 256  # a row of scores is reduced in this many blocks, then over the blocks (split_rows)


def split_rows(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` (batch, vocab) as (batch, blocks, vocab / blocks) when the vocabulary divides into
    :data:`VOCAB_BLOCKS` blocks (Gemma 3: 262,144 = 256 x 1,024), else (batch, 1, vocab). A reduction over
    a whole row is one GPU program per row: at one row per decode step the compiled argmax over 262k scores
    took 60 us; over blocks first, many programs share it."""
    b, v = logits.shape
    return logits.view(b, VOCAB_BLOCKS, v // VOCAB_BLOCKS) if v % VOCAB_BLOCKS == 0 else logits.view(b, 1, v)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax (its first maximum, NaN counting as the maximum, as ``torch.argmax``), reduced per
    block of :func:`split_rows` and then over the blocks' maxima."""
    blocks = split_rows(logits)
    inner = blocks.argmax(-1)  # (batch, blocks): each block's first maximum
    best = blocks.gather(2, inner[..., None])[..., 0].argmax(-1)  # the first block holding the row's maximum
    return best * blocks.shape[2] + inner.gather(1, best[:, None])[:, 0]


def chosen_logprob(logits: torch.Tensor, chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability of each row's ``chosen`` token, whether the row's scores are not finite), from float32
    ``logits`` (batch, vocab): the chosen logit minus the row's log-sum-exp (per block of :func:`split_rows`,
    then over the blocks), the same number as ``log_softmax(...).gather`` without writing a log-softmax over
    the whole vocabulary (262k for Gemma 3) at every step. A NaN or an overflow anywhere in the row makes its
    log-sum-exp non-finite."""
    lse = torch.logsumexp(torch.logsumexp(split_rows(logits), dim=-1), dim=-1)
    return logits.gather(1, chosen[:, None])[:, 0] - lse, ~torch.isfinite(lse)


def prefill_masks(text_config, token_type_ids: torch.Tensor, padding: torch.Tensor) -> dict[str, torch.Tensor]:
    """The prefill's attention masks per layer type, (batch, 1, L, L) bool (True: attend), as transformers'
    Gemma 3 builds them: a key is seen when it is not padding and it is earlier than the query or in the same
    image (images attend to themselves both ways); sliding-window layers also need it within the window
    (``kv > q - window``). Made here with a few tensor operations: transformers builds them through ``vmap``,
    about 30 ms of interpreter a prefill (most of an X-ray's prefill on the CPU; on a GPU its launch cost)."""
    length = token_type_ids.shape[1]
    idx = torch.arange(length, device=token_type_ids.device)
    is_image = token_type_ids == 1
    starts = is_image & ~torch.nn.functional.pad(is_image, (1, 0))[:, :-1]
    group = torch.where(is_image, starts.int().cumsum(1) - 1, -1)  # each image's tokens share a number
    seen = (group[:, :, None] == group[:, None, :]) & (group >= 0)[:, :, None]
    seen |= idx[None, :] <= idx[:, None]  # causal
    seen &= padding.bool()[:, None, :]
    masks = {"full_attention": seen[:, None]}
    if "sliding_attention" in set(getattr(text_config, "layer_types", None) or ()):
        masks["sliding_attention"] = (seen & (idx[None, :] > idx[:, None] - text_config.sliding_window))[:, None]
    return masks


def _cache_keyword(fn) -> str:
    return "cache" if "cache" in inspect.signature(fn).parameters else "past_key_values"  # transformers < 5.2x


class StaticKV:
    """Keys and values of every text layer in fixed buffers of ``length`` slots (a ring for a sliding layer
    whose window is shorter: ``window`` slots and ``spare`` more, so that steps run past the end of an answer
    never overwrite a position the answer's window still holds). The slot written by the current step is
    ``slot`` (a one-element device tensor); the model calls :meth:`update` from each attention layer."""

    def __init__(self, text_config, batch: int, length: int, device, dtype, spare: int = 0):
        kvh, hd = text_config.num_key_value_heads, text_config.head_dim
        window = getattr(text_config, "sliding_window", None)
        self.types = getattr(text_config, "layer_types", None) or ["full_attention"] * text_config.num_hidden_layers
        self.length, self.window = length, window
        self.ring = [t == "sliding_attention" and bool(window) and window < length for t in self.types]
        self.sizes = [min(window + spare, length) if ring else length for ring in self.ring]
        self.keys = [torch.zeros(batch, kvh, s, hd, device=device, dtype=dtype) for s in self.sizes]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.index = {s: torch.zeros(1, dtype=torch.long, device=device) for s in set(self.sizes)}

    @property
    def full_layers(self) -> list[int]:
        """Layers that keep every position (the only ones whose attention covers every image token)."""
        return [i for i, ring in enumerate(self.ring) if not ring]

    def fill(self, cache, prompt_len: int) -> None:
        """Copy a prefill's cache (transformers ``DynamicCache``; a sliding layer keeps only its tail)."""
        for i, layer in enumerate(cache.layers):
            k, v = layer.keys, layer.values
            kept = k.shape[2]
            slots = torch.arange(prompt_len - kept, prompt_len, device=k.device) % self.sizes[i]
            self.keys[i][:, :, slots] = k
            self.values[i][:, :, slots] = v

    def advance_index(self) -> None:
        for size, index in self.index.items():
            torch.remainder(self.slot, size, out=index)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        index = self.index[self.sizes[layer_idx]]
        self.keys[layer_idx].index_copy_(2, index, key_states)
        self.values[layer_idx].index_copy_(2, index, value_states)
        return self.keys[layer_idx], self.values[layer_idx]

    def masks(self, pad: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per layer type, (batch, 1, 1, size) bool: slot r holds position slot - ((slot - r) mod size), visible
        when that is a real position of the row (>= its left padding), not in the future and, on a ring,
        within the window (``position > slot - window``, as transformers' sliding masks)."""
        out = {}
        for kind in dict.fromkeys(self.types):
            i = self.types.index(kind)
            size = self.sizes[i]
            r = torch.arange(size, device=pad.device)
            held = self.slot - torch.remainder(self.slot - r, size)
            seen = held[None, :] >= pad[:, None]
            if self.ring[i]:
                seen = seen & (held > self.slot - self.window)[None, :]
            out[kind] = seen[:, None, None, :]
        return out


@dataclass
class Decoded:
    """One row's answer: token ids (end-of-turn included), their log-probabilities, why it stopped."""

    token_ids: list[int]
    logprobs: list[float]
    stop_reason: str  # eos, max_new_tokens, repetition
    nonfinite: bool


@dataclass
class Context:
    """What a conversation keeps between turns so that a follow-up question neither re-reads the images
    nor re-computes the earlier turns: the token ids whose keys and values are kept (positions
    ``[0, len(ids))``), those keys and values per layer (a sliding layer only its last window - 1), the
    image tokens' positions and the rollout products of the images (batch of one)."""

    ids: list[int]
    keys: list[torch.Tensor]  # per layer (1, kv_heads, kept, head_dim): positions [len(ids) - kept, len(ids))
    values: list[torch.Tensor]
    image_positions: torch.Tensor  # (1, n_image_tokens)
    mixing: dict = field(default_factory=dict)  # read layer -> (1, images, n, n) rollout product

    @property
    def nbytes(self) -> int:
        tensors = self.keys + self.values + list(self.mixing.values())
        return sum(t.numel() * t.element_size() for t in tensors)

    def reusable(self, ids: list[int]) -> int:
        """How many leading positions of ``ids`` can come from this context (0: none)."""
        k = 0
        for a, b in zip(self.ids, ids):
            if a != b:
                break
            k += 1
        k = min(k, len(ids) - 1)  # the last prompt token is always fed: its row emits the first answer token
        if k <= int(self.image_positions.max()):  # the images themselves differ: read anew
            return 0
        n = len(self.ids)
        if k < n and any(key.shape[2] < n for key in self.keys):  # a ring cannot be cut back
            return 0
        return k

    def cache(self, text_config, upto: int):
        """A transformers cache holding positions ``[0, upto)`` (a sliding layer: its tail, as its own)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=text_config)
        n = len(self.ids)
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k.shape[2] < n:  # ring tail: the sliding layer keeps only it, but must count every position
                full_k = k.new_zeros(*k.shape[:2], n, k.shape[3])
                full_v = v.new_zeros(*v.shape[:2], n, v.shape[3])
                full_k[:, :, n - k.shape[2]:], full_v[:, :, n - v.shape[2]:] = k, v
                k, v = full_k, full_v
            cache.update(k[:, :, :upto], v[:, :, :upto], i)
        return cache


@dataclass
class DecodeResult:
    rows: list[Decoded]
    attention: torch.Tensor | None  # (steps, layers, batch, heads, n_image_tokens) on the model's device
    layers: list[int]  # the layers recorded
    dropped: dict  # layers asked for but not recorded, and why
    seconds: dict = field(default_factory=dict)  # prefill, decode (synchronised), decode_steps
    context: Context | None = None  # with ``keep``: the conversation so far, for a follow-up
    rolled_out: bool = False  # the rows were rolled out inside each image


WARM_UP_STEPS = 3  # eager decode steps before a CUDA graph is captured (on the buffers, before any request)


class Decoder:
    """Fixed buffers and the decode step for one (batch, prompt + answer length, recorded layers) shape;
    on CUDA the step is captured as a CUDA graph on first use and replayed after."""

    def __init__(self, model, batch: int, length: int, max_new: int, layers: list[int], n_image_tokens: int,
                 eos: list[int], compile: bool = False, tokens_per_image: int = 0):
        text_cfg = model.config.get_text_config()
        device, dtype = model.device, model.dtype
        self.model, self.batch, self.length, self.max_new = model, batch, length, max_new
        # spare ring slots: the replays in flight, plus the 16 tokens a loop's cut may give back (loop_start)
        self.kv = StaticKV(text_cfg, batch, length, device, dtype, spare=CHECK_EVERY * MAX_AHEAD + LOOP_GIVEN_BACK)
        self.layers = [layer for layer in layers if layer in self.kv.full_layers]
        long = dict(dtype=torch.long, device=device)
        self.token = torch.zeros(batch, 1, **long)
        self.pad = torch.zeros(batch, **long)
        self.step_index = torch.zeros(1, **long)
        # the step buffers have room for prepare's warm-up steps too: for an answer of one or two tokens those
        # steps indexed past buffers sized for the answer, a device assert that ends the process's use of the GPU
        room = max(max_new, WARM_UP_STEPS)
        self.forced = torch.full((batch, room), -1, **long)
        self.tokens = torch.zeros(batch, room, **long)
        self.logprobs = torch.zeros(batch, room, device=device)
        self.nonfinite = torch.zeros(batch, dtype=torch.bool, device=device)
        self._eos = set(eos)  # on the host: a look at the tokens reads nothing else from the device
        self._staging: dict[tuple, torch.Tensor] = {}  # shape -> page-locked host rows (:meth:`staging`)
        self.image_positions = torch.zeros(batch, n_image_tokens, **long)
        heads = text_cfg.num_attention_heads
        self.recorder = DecodeRecorder(self.layers, self.image_positions, room, heads, self.step_index) \
            if self.layers else None
        # a study of one on a GPU: its rows rolled out by each replay (its rows are copied off while it decodes)
        wanted = ROLL_IN_REPLAY == "always" or (ROLL_IN_REPLAY == "gpu" and device.type == "cuda")
        self.rolls_rows = bool(wanted and self.recorder is not None and batch == 1 and tokens_per_image
                               and n_image_tokens % tokens_per_image == 0)
        if self.rolls_rows:
            self.recorder.enable_rollout(tokens_per_image)
        lm = model.model.language_model
        self._lm, self._cache_kw = lm, _cache_keyword(lm.forward)
        self._attention = [layer.self_attn for layer in lm.layers]
        self._fused = [m for m in self._attention if projections.fuse(m)]  # q, k and v as one product
        self._fused_mlps = [layer.mlp for layer in lm.layers if projections.fuse_mlp(layer.mlp)]  # gate and up
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}  # steps in a row -> the captured graph
        self.use_graph = device.type == "cuda"
        self.compile = compile and self.use_graph
        self._compiled = None  # the step compiled (a GPU's, :meth:`prepare`); None: :meth:`step` itself
        # the last run's host seconds: launching replays, looking at tokens (waiting for the device), callbacks
        self.host_seconds: dict[str, float] = {}

    def step(self) -> None:
        """One decode step on the buffers (graph-safe: device tensors only, updated in place)."""
        kv = self.kv
        kv.advance_index()
        mask_by_type = kv.masks(self.pad)
        positions = (kv.slot - self.pad)[:, None]
        embeds = self._lm.embed_tokens(self.token)
        hidden = self._lm(inputs_embeds=embeds, attention_mask=mask_by_type, position_ids=positions,
                          use_cache=True, **{self._cache_kw: kv}).last_hidden_state
        logits = self.model.lm_head(hidden[:, -1]).float()
        forced = self.forced.index_select(1, self.step_index)[:, 0]
        nxt = torch.where(forced >= 0, forced, greedy(logits))
        logp, bad = chosen_logprob(logits, nxt)
        self.nonfinite |= bad
        self.tokens.index_copy_(1, self.step_index, nxt[:, None])
        self.logprobs.index_copy_(1, self.step_index, logp[:, None])
        self.token.copy_(nxt[:, None])
        kv.slot += 1
        self.step_index += 1

    @contextmanager
    def _recording(self):
        """While a step is traced or run eagerly: the decode recorder on every attention module, and each
        layer's queries, keys and values as one product, its MLP's gate and up likewise (:mod:`projections`)."""
        recorder = self.recorder or NoRecorder()
        for m in self._attention:
            m.decode_recorder = recorder
        try:
            with projections.installed(self._fused, self._fused_mlps):
                yield
        finally:
            for m in self._attention:
                m.decode_recorder = None

    @property
    def graph(self):
        """The captured graph of :data:`CHECK_EVERY` steps (None before :meth:`prepare` or without CUDA)."""
        return self.graphs.get(CHECK_EVERY)

    def _replay(self, steps: int) -> None:
        """``steps`` decode steps in a row: one graph replay (1 or :data:`CHECK_EVERY`), else stepped."""
        if steps in self.graphs:
            self.graphs[steps].replay()
            return
        with self._recording():
            self._steps(steps)

    def _steps(self, steps: int) -> None:
        """``steps`` decode steps, then their rows rolled out (:attr:`rolls_rows`): what a replay runs."""
        step = self.step if self._compiled is None else self._compiled
        for _ in range(steps):
            step()
        if self.rolls_rows:
            self.recorder.roll(steps)

    def prepare(self) -> None:
        """On CUDA, before the buffers hold a request: compile the step (``compile``) and capture it as
        a CUDA graph. The warm-up steps write into the cache, so this must not run on live data. A step
        that cannot be compiled or captured (e.g. bitsandbytes int8) runs without, with a warning."""
        if not self.use_graph or self.graphs:
            return
        t0 = time.perf_counter()
        if self.compile:
            use_compile_cache()  # (Triton's too: the check's kernel is kept there for a restart)
        # before the step is traced, which reads the outcome
        capture.decode_kernel_works(self.model.config.get_text_config(), self.tokens.device, self.model.dtype,
                                    self.length)
        if self.compile:
            try:
                self._compiled = compile_step(self.step, mode=compile_mode())
            except Exception as e:  # noqa: BLE001
                logger.warning("torch.compile of the decode step failed (%s): eager kernels", e)
        try:
            with self._recording():
                stream = streams.kept(self.tokens.device, "decoder warm-up")
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    self._steps(WARM_UP_STEPS)
                torch.cuda.current_stream().wait_stream(stream)
                graphs, pool = {}, None
                for steps in (CHECK_EVERY, 1):  # the two share one memory pool (never replayed at once)
                    graphs[steps] = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graphs[steps], pool=pool, capture_error_mode=CAPTURE_MODE):
                        self._steps(steps)
                    pool = graphs[steps].pool()
            self.graphs = graphs
            logger.info("decode step for batch %d, %d positions, %d new tokens %s and captured in %.1f s",
                        self.batch, self.length, self.max_new, "compiled" if self.compile else "(eager kernels)",
                        time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 (any capture failure: run the same step eagerly)
            logger.warning("decode step cannot be captured as a CUDA graph (%s: %s): stepping without one",
                           type(e).__name__, str(e)[:300])
            self.use_graph = False
            self._compiled = None
            torch.cuda.synchronize()

    def _advance(self, launched: int, top: int) -> int:
        """Launch the next steps (never past ``top``): :data:`CHECK_EVERY` in one replay, or the last few
        one by one (the single-step graph); returns the steps launched so far. Nothing waits for them."""
        n = min(CHECK_EVERY, top - launched)
        if n == CHECK_EVERY or 1 not in self.graphs:
            self._replay(n)
        else:
            for _ in range(n):
                self._replay(1)
        return launched + n

    def run(self, prefill_cache, prompt_len: int, pad: torch.Tensor, first_logits: torch.Tensor,
            image_positions: torch.Tensor, forced: list[list[int]] | None, stop_loops: bool,
            on_check=None, ahead: int = 1, products: dict[int, torch.Tensor] | None = None) -> list[Decoded]:
        """Decode from a prefill: its cache, its last logits (batch, vocab) and the rows' left padding.
        ``products``: the prefill's rollout products by read layer (:attr:`AttentionRecorder.at_layer`), which the
        replays roll the rows out through where :attr:`rolls_rows` (none: the rows as recorded).

        ``on_check(steps, tokens)``: called after each look at the tokens (``tokens``: every row's first
        ``steps`` token ids) while the device already runs the next steps, e.g. to start a finding's maps
        once its sentence is written. ``ahead``: replays in flight at once; with 2 the device has the next
        steps queued while the host looks at the last ones (and while other threads hold the interpreter),
        at the cost of up to :data:`CHECK_EVERY` steps run past the end of an answer that ends early."""
        b = self.batch
        self.prepare()
        self.kv.fill(prefill_cache, prompt_len)
        self.kv.slot.fill_(prompt_len)
        self.pad.copy_(pad)
        self.image_positions.copy_(image_positions)
        self.forced.fill_(-1)
        limits = [self.max_new] * b
        if forced:
            for i, ids in enumerate(forced):
                self.forced[i, : len(ids)] = torch.tensor(ids, device=self.forced.device)
                limits[i] = len(ids)
        first_logits = first_logits.float()
        first = torch.where(self.forced[:, 0] >= 0, self.forced[:, 0], greedy(first_logits))
        logp, bad = chosen_logprob(first_logits, first)
        self.nonfinite.copy_(bad)
        self.tokens[:, 0] = first
        self.logprobs[:, 0] = logp
        self.token.copy_(first[:, None])
        self.step_index.fill_(1)
        if self.recorder is not None:
            self.recorder.zero_()
            if self.rolls_rows:
                self.recorder.set_products(products or {})
        ended = [None] * b  # per row: (length, reason) once known
        top, launched, steps, checked = max(limits), 1, 1, 0
        in_flight: list[tuple] = []  # (steps, CUDA event or None) at the end of each launched replay, oldest first
        looked = None  # (steps, tokens) of the last look, handed to on_check once the next steps run
        host = self.host_seconds = dict.fromkeys(("launch", "look", "callbacks"), 0.0)
        clock = time.perf_counter
        while True:
            t = clock()
            while len(in_flight) < max(1, ahead) and launched < top:
                launched = self._advance(launched, top)
                in_flight.append((launched, self._event()))
            host["launch"] += clock() - t
            if looked is not None:
                t = clock()
                on_check(*looked)
                looked = None
                host["callbacks"] += clock() - t
            if not in_flight:
                break
            steps, event = in_flight.pop(0)
            t = clock()
            checked, tokens = self._check(steps, checked, limits, ended, stop_loops, event)
            host["look"] += clock() - t
            if all(e is not None for e in ended):
                break
            if on_check is not None and (in_flight or launched < top):
                looked = (steps, tokens)
        if checked < steps:
            self._check(steps, checked, limits, ended, stop_loops)
        tokens, logprobs, nonfinite = self.tokens[:, :steps].tolist(), self.logprobs[:, :steps].tolist(), \
            self.nonfinite.tolist()
        out = []
        for i in range(b):
            n, reason = ended[i] or (min(steps, limits[i]), "max_new_tokens")
            out.append(Decoded(tokens[i][:n], logprobs[i][:n], reason, bool(nonfinite[i])))
        return out

    def _event(self):
        """A CUDA event at this point of the default stream (None without CUDA graphs)."""
        if not self.use_graph:
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def _tokens(self, steps: int, event=None) -> list[list[int]]:
        """Every row's first ``steps`` tokens, read once ``event`` has passed (on a stream of its own, so
        the read does not wait for replays launched after it)."""
        if event is None:
            return self.tokens[:, :steps].tolist()
        look = streams.kept(self.tokens.device, "decoder looks")
        with torch.cuda.stream(look):
            look.wait_event(event)
            return self.tokens[:, :steps].tolist()

    def _check(self, steps: int, checked: int, limits: list[int], ended: list, stop_loops: bool,
               event=None) -> tuple[int, list[list[int]]]:
        """Mark rows that ended within tokens ``checked..steps`` (complete at ``event``): end of turn, a loop,
        or their limit; returns (steps, every row's first ``steps`` tokens)."""
        tokens = self._tokens(steps, event)
        eos = self._eos
        for i, row in enumerate(tokens):
            if ended[i] is not None:
                continue
            for t in range(checked, min(steps, limits[i])):
                if row[t] in eos:
                    ended[i] = (t + 1, "eos")
                    break
                cut = loop_start(row[: t + 1]) if stop_loops else None
                if cut is not None:
                    ended[i] = (cut, "repetition")
                    break
            else:
                if steps >= limits[i]:
                    ended[i] = (limits[i], "max_new_tokens")
        return steps, tokens

    def snapshot(self, n: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Copies of the keys and values of positions [0, n) (a ring: its last window - 1 positions)."""
        keys, values = [], []
        for k, v, size, ring in zip(self.kv.keys, self.kv.values, self.kv.sizes, self.kv.ring):
            kept = min(n, self.kv.window - 1) if ring else n
            slots = torch.arange(n - kept, n, device=k.device) % size
            keys.append(k[:1, :, slots].clone())
            values.append(v[:1, :, slots].clone())
        return keys, values

    def decode_rows(self, steps: int, start: int = 1, layers: list[int] | None = None) -> torch.Tensor | None:
        """(steps - start, layers, batch, heads, n) attention rows of the decode steps from ``start`` (the first
        decode step is 1: step 0's row is the prefill's); ``layers``: indices into :attr:`layers` (default all)."""
        return None if self.recorder is None else self.recorder.rows(start, steps, layers)

    def staging(self, shape: tuple) -> torch.Tensor:
        """Page-locked float32 host memory of ``shape`` for :class:`LiveRows`' copies of this decoder's rows,
        allocated once per shape and used again by each answer (one answer at a time: the decoder's buffers are
        too)."""
        if shape not in self._staging:
            self._staging.clear()
            self._staging[shape] = torch.empty(shape, dtype=torch.float32, pin_memory=True)
        return self._staging[shape]


class LiveRows:
    """A batch of one's attention rows (as :meth:`AttentionRecorder.stacked` makes them) copied off the device
    while the decode goes on, a few steps at a time, on a stream of their own: the rows of a finding whose
    sentence is written can be mapped while the rest of the answer is decoded, and a CT's 0.8 GB of rows are
    not all copied (and rolled out, on the GPU at once) after the last step. The whole answer's rows are these
    same copies, so a finding mapped early or at the end reads identical rows (rolled out the same).

    The decode loop launches each copy (:meth:`advance`: the rows, already rolled out by the replays that wrote them
    where :attr:`Decoder.rolls_rows`, else stacked and rolled out here in a few torch calls, copied into the
    decoder's page-locked staging without waiting: a copy into pageable memory
    waits for the device and the host's memory, 27 ms for a CT's 8 steps in run AS); a thread of its own
    (:data:`_LANDING`) moves each into :attr:`rows` once the device is done. Launched from a thread of its own
    instead, each copy waited about one replay (28-31 ms, no CPU time: run BG), the loop's next replay being
    queued before it. A reader of the rows (:meth:`upto`) waits for the copies it needs."""

    def __init__(self, recorder: AttentionRecorder, decoder: "Decoder"):
        self.recorder, self.decoder = recorder, decoder
        self.recorded = [decoder.layers.index(layer) for layer in recorder.usable_layers]
        first = recorder.rows[recorder.usable_layers[0]]  # (1, heads, n): the prefill's row of a recorded layer
        shape = (decoder.max_new, len(self.recorded), 1, *first.shape[1:])
        self.rows = torch.empty(shape, dtype=torch.float32)  # on the CPU, filled as copied
        self.count = 0  # rows queued so far
        self.lock = threading.Lock()
        device = decoder.tokens.device
        # on a GPU: a stream of high priority (the copies' few kernels go before the decode's), and page-locked
        # staging the size of the rows, the decoder's, allocated once (pinning a new block took 0.6 ms a MB on the
        # H200's host, run BG: 16 ms for each new size of a CT's copies)
        self.stream = streams.kept(device, "rows", priority=-1)  # one for every reading (:mod:`streams`)
        self.staging = decoder.staging(shape) if device.type == "cuda" else None
        self.landed: Future | None = None  # the last queued copy into :attr:`rows` (its thread: one, in order)

    def advance(self, steps: int) -> None:
        """Start copying the rows of the first ``steps`` tokens (decoded ones only: called once the decoder has
        looked at them), without waiting for the copy on a GPU. In inference mode: the staging is the decode's,
        and a finding's map thread calls this (through :meth:`upto`) where the loop did not (a step run without a
        CUDA graph: run CY's map threads failed on the staging's copy and mapped after the answer)."""
        with self.lock, torch.inference_mode():
            if steps <= self.count:
                return
            start, self.count = self.count, steps
            with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
                part = answer_rows(self.recorder, self.decoder, start, steps, self.recorded)
                staged, copied = part, None  # on the CPU: already in host memory
                if self.stream is not None:
                    staged = self.staging[start:steps]
                    staged.copy_(part, non_blocking=True)
                    copied = torch.cuda.Event()
                    copied.record(self.stream)
                self.landed = _LANDING.submit(_land, self.rows[start:steps], staged, copied)

    def upto(self, steps: int) -> torch.Tensor:
        """(steps, layers, 1, heads, n) float32 on the CPU: the rows of the first ``steps`` tokens (decoded
        ones only), once copied; a view of the rows copied so far."""
        self.advance(steps)
        with self.lock:
            landed = self.landed
        if landed is not None:
            landed.result()  # copies land in order: the last one queued covers these rows
        return self.rows[:steps]


def answer_rows(recorder: AttentionRecorder, decoder: Decoder, start: int, steps: int,
                layers: list[int]) -> torch.Tensor:
    """(steps - start, layers, batch, heads, n) rows of the answer's tokens ``[start, steps)`` on the device, rolled
    out if asked: token 0's is the prefill's (rolled out here), the decode's are rolled out here or, where
    :attr:`Decoder.rolls_rows`, already by their replays. ``layers``: indices into the decoder's recorded layers."""
    decode = decoder.decode_rows(steps, max(start, 1), layers) if steps > 1 else None
    if not decoder.rolls_rows:
        return recorder.stacked(decode) if start == 0 else recorder.rolled_rows(decode)
    if start > 0:
        return decode
    first = recorder.rolled_rows(recorder.prefill_rows())
    return first if decode is None else torch.cat([first, decode])


_LANDING = ThreadPoolExecutor(1, thread_name_prefix="rows")  # staged attention rows into their study's rows


def _land(rows: torch.Tensor, staged: torch.Tensor, copied) -> None:
    """``staged`` into ``rows`` once the device's copy into it (``copied``: a CUDA event; None on the CPU) is
    done. In inference mode: the rows are made in the decode's."""
    if copied is not None:
        copied.synchronize()
    with torch.inference_mode():
        rows.copy_(staged)


AHEAD_ENV = "MEDGEMMA_DECODE_AHEAD"  # decode replays in flight (default: replays_ahead's choice)


def replays_ahead(batch: int, live: bool, graphs: bool = True, long: bool = False) -> int:
    """Decode replays kept in flight (:meth:`Decoder.run`): with CUDA graphs two for a batch (its next inputs
    and the last batch's maps are made beside it) and for one study whose attention rows are copied while it
    decodes (``live``: every capturing study on a GPU; its findings' maps start then too), three
    (:data:`LONG_AHEAD`) for such a study with a ``long`` prompt (a CT: its findings' searches hold the
    interpreter for tens of milliseconds; with two in flight the device waited: 8.85 ms a token against 6.38
    with three, run AT), else one (an answer that ends early wastes no steps; without graphs the steps run as
    they are launched, so one); :data:`AHEAD_ENV` sets it."""
    value = os.environ.get(AHEAD_ENV, "").strip()
    if value:
        if value not in [str(n) for n in range(1, MAX_AHEAD + 1)]:
            raise ValueError(f"{AHEAD_ENV} must be 1 to {MAX_AHEAD}, got {value!r}")
        return int(value)
    if not graphs:
        return 1
    if batch == 1 and live:
        return LONG_AHEAD if long else 2
    return 2 if batch > 1 else 1


COMPILE_CACHE_ENV = "MEDGEMMA_COMPILE_CACHE"  # folder for compiled kernels (default ~/.cache/monailabel-medgemma/compile)


def use_compile_cache() -> str:
    """Point torch.compile's on-disk caches (Inductor's FX graphs and kernels, AOTAutograd, Triton) at one
    folder that outlives the process, so that a restarted server compiles its decode steps from cache
    instead of from scratch. An explicit ``TORCHINDUCTOR_CACHE_DIR`` / ``TRITON_CACHE_DIR`` is kept."""
    folder = os.environ.get(COMPILE_CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache",
                                                                  "monailabel-medgemma", "compile")
    os.makedirs(folder, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(folder, "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(folder, "triton"))
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


# decode step shapes one process compiles (TorchDynamo keeps one entry per shape on the step's code, whichever decoder
# made it, and ran the step uncompiled from the ninth shape on: its default limit, 8; a server meets a shape per
# batch size, CT slice count, conversation turn's length...)
STEP_SHAPES = 1024


def compile_step(step, **options):
    """``torch.compile(step)`` in one fixed shape, called under a recompile limit of :data:`STEP_SHAPES` (the
    process's other compiled code keeps TorchDynamo's own): a new decoder's shape is compiled, not run eagerly, after
    eight others. Its compiled code is only called when a decoder is warmed up and captured; its replays run
    without it. ``options``: ``torch.compile``'s (``mode``; a test's ``backend``)."""
    compiled = torch.compile(step, dynamic=False, fullgraph=False, **options)
    limits = {name: value for name, value in (("recompile_limit", STEP_SHAPES),
                                              ("accumulated_recompile_limit", STEP_SHAPES * 4))
              if hasattr(torch._dynamo.config, name)}  # (names of torch 2.6 and later)

    def run(*args):
        with torch._dynamo.config.patch(**limits):
            return compiled(*args)

    return run


COMPILE_MODE_ENV = "MEDGEMMA_COMPILE_MODE"  # torch.compile mode of the decode step: default | max-autotune
COMPILE_MODES = {"default": None, "max-autotune": "max-autotune-no-cudagraphs"}  # the step is our own CUDA graph


def compile_mode() -> str | None:
    """``torch.compile``'s mode for the decode step (``MEDGEMMA_COMPILE_MODE``): ``default``, or
    ``max-autotune``, which times Triton templates against cuBLAS for each matrix product when it compiles
    (longer to compile, kept in the compile cache; CUDA graphs stay this module's own)."""
    wanted = os.environ.get(COMPILE_MODE_ENV, "default").strip().lower() or "default"
    if wanted not in COMPILE_MODES:
        logger.warning("%s=%r is not one of %s: compiling in the default mode", COMPILE_MODE_ENV, wanted,
                       ", ".join(COMPILE_MODES))
        return None
    return COMPILE_MODES[wanted]


def compile_default() -> bool:
    """Compile the decode step on CUDA unless ``MEDGEMMA_COMPILE=0`` (compiling takes a while per shape)."""
    return os.environ.get("MEDGEMMA_COMPILE", "1").strip().lower() not in ("0", "false", "no", "off")


def room_for_decoders(device: torch.device) -> bool:
    """Whether ``device`` is a GPU with :data:`GRAPH_CACHE_FREE` bytes free for new allocations: the driver's
    count, in which PyTorch's cached blocks count as used (a conservative measure)."""
    return device.type == "cuda" and torch.cuda.mem_get_info(device)[0] >= GRAPH_CACHE_FREE


def decoders_to_keep(device: torch.device, kept: int) -> int:
    """How many decoders a model may keep, before a new one is made, with ``kept`` kept now: one more than now,
    up to :data:`GRAPH_CACHE_MAX`, on a GPU with room (:func:`room_for_decoders`); otherwise :data:`GRAPH_CACHE`.
    A GPU's readings then switch between a film, a CT and a conversation's longer prompts without a new capture
    each time, and a card or CPU without room keeps what it kept before."""
    if kept < GRAPH_CACHE or not room_for_decoders(device):
        return GRAPH_CACHE
    return min(kept + 1, GRAPH_CACHE_MAX)


def kept_decoders(model) -> list[dict]:
    """The decode shapes ``model`` keeps warm, least recently used first (``/info/``): each decoder's batch, its
    cache's length (the prompt and the answer, in a multiple of 256: prompts up to it less the answer share it),
    the answer's length, whether its step is compiled and captured as a CUDA graph."""
    kept = list(getattr(model, "__dict__", {}).get("_medgemma_decoders", {}).values())  # a copy, in one step
    return [{"batch": d.batch, "cache_tokens": d.length, "max_new_tokens": d.max_new,
             "compiled": d._compiled is not None, "captured": d.graph is not None} for d in kept]


def decoder_for(model, batch: int, length: int, max_new: int, layers: list[int], n_image_tokens: int,
                eos: list[int], compile: bool | None = None, tokens_per_image: int = 0) -> Decoder:
    """A decoder for this shape, reused across calls (its CUDA graph with it); lengths are rounded up to
    a multiple of 256 so that similar prompts share one."""
    length = -(-length // 256) * 256
    compile = compile_default() if compile is None else compile
    key = (batch, length, max_new, tuple(layers), n_image_tokens, tuple(eos), model.dtype, compile,
           compile_mode() if compile else None, tokens_per_image, ROLL_IN_REPLAY, capture.DECODE_KERNEL_FROM)
    cache = model.__dict__.setdefault("_medgemma_decoders", {})
    if key not in cache:
        while len(cache) >= decoders_to_keep(model.device, len(cache)):
            if cache.pop(next(iter(cache)))._compiled is not None:
                # a compiled step holds its decoder (a bound method's): a cycle that only the cyclic collector
                # frees, which counts no tensors and may come late, with the cache and graphs the decoder holds
                # (a CT's: gigabytes of the GPU's) kept meanwhile; freed now (0.2 s, where the new shape's
                # compile and capture take far longer). An uncompiled decoder goes as soon as it is dropped.
                gc.collect()
        cache[key] = Decoder(model, batch, length, max_new, layers, n_image_tokens, eos, compile, tokens_per_image)
    else:
        cache[key] = cache.pop(key)  # most recently used last
    return cache[key]


@torch.inference_mode()
def prefill_and_decode(model, inputs: dict, layers: list[int], tokens_per_image: int, max_new_tokens: int,
                       rollout: bool = False, forced: list[list[int]] | None = None, eos: list[int] = (),
                       stop_loops: bool = True, compile: bool | None = None, past: Context | None = None,
                       keep: bool = False, progress=None) -> DecodeResult:
    """Greedy answers for a left-padded batch ``inputs`` (input_ids, attention_mask, token_type_ids,
    pixel_values), with the attention rows of ``layers`` (none: no capture at all).

    A conversation (batch of one): ``keep`` returns the :class:`Context` after the answer; with ``past``
    ``inputs`` holds the whole conversation's ``input_ids`` (no pixels) and only what ``past`` lacks is
    prefilled, its images' positions and rollout products reused.

    ``progress(token_ids, rows, layers)`` (a batch of one): called every few decode steps with the answer's
    tokens so far while the next ones decode; ``rows()`` gives their attention rows on ``layers`` ((steps,
    layers, 1, heads, n), on the CPU; :class:`LiveRows`: the same rows the result holds)."""
    from transformers import DynamicCache

    batch_vision_tower(model)
    ids = inputs["input_ids"]
    batch, prompt_len = ids.shape
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    pad = (mask == 0).sum(-1)
    start = past.reusable(ids[0].tolist()) if past is not None and batch == 1 else 0
    if past is not None and start == 0:
        raise ValueError("the conversation's kept context does not match this prompt")
    image_positions = past.image_positions.to(ids.device) if past is not None else \
        torch.stack([(row == model.config.image_token_index).nonzero()[:, 0] for row in ids])
    # a given answer decodes in the shape of the model's own answers (no new decoder to compile and capture for
    # each answer's length), or in its own where it is longer
    max_new = max([max_new_tokens] + [len(f) for f in forced or []])
    decoder = decoder_for(model, batch, prompt_len + max_new, max_new, list(layers), image_positions.shape[1],
                          list(eos), compile, tokens_per_image)
    dropped = {layer: f"sliding window ({decoder.kv.window}) shorter than the sequence"
               for layer in layers if layer not in decoder.layers}
    if past is not None:  # a follow-up rolls out only through the products its images already have
        rollout = rollout and bool(past.mixing)
    recorder = AttentionRecorder(decoder.layers, image_positions, rollout and bool(decoder.layers),
                                 tokens_per_image, mixed=past.mixing if past is not None else None) \
        if decoder.layers else None
    t0 = _now(model)
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    if past is None:
        cache = DynamicCache(config=model.config.get_text_config())
        args = {**inputs, "attention_mask": mask, "position_ids": position_ids}
        if "token_type_ids" in inputs:
            args["attention_mask"] = prefill_masks(model.config.get_text_config(), inputs["token_type_ids"], mask)
    else:  # only the new tokens: text after the images, causal
        cache = past.cache(model.config.get_text_config(), start)
        args = {"input_ids": ids[:, start:], "attention_mask": mask, "position_ids": position_ids[:, start:]}
    args.update({"use_cache": True, "logits_to_keep": 1, _cache_keyword(model.forward): cache})
    with recording(recorder), fused_norms.installed(model, decoder.compile, int(args["input_ids"].numel())):
        out = model(**args)
    t1 = _now(model)
    # one study's rows are copied off the GPU while the next steps run (a CT's are 0.8 GB: not all at the end)
    live = LiveRows(recorder, decoder) if batch == 1 and recorder is not None and recorder.usable_layers and (
        progress is not None or decoder.use_graph) else None

    def on_check(steps: int, tokens: list[list[int]]) -> None:
        if decoder.use_graph:
            t = time.perf_counter()
            live.advance(steps)
            decoder.host_seconds["rows"] = decoder.host_seconds.get("rows", 0.0) + time.perf_counter() - t
        if progress is not None:
            progress(tokens[0], partial(live.upto, steps), recorder.usable_layers)

    rows = decoder.run(cache, prompt_len, pad, out.logits[:, -1], image_positions, forced, stop_loops,
                       None if live is None else on_check, replays_ahead(batch, live is not None, decoder.use_graph,
                                                  prompt_len >= prefill_attention.LONG),
                       recorder.at_layer if recorder is not None and recorder.rollout else None)
    t2 = _now(model)
    attention = None
    steps = max(len(r.token_ids) for r in rows)
    used = recorder.usable_layers if recorder is not None else []
    if recorder is not None:
        dropped.update(recorder.dropped)
        if used and live is not None:
            attention = live.upto(steps)
        elif used:
            attention = answer_rows(recorder, decoder, 0, steps, [decoder.layers.index(layer) for layer in used])
        dropped.update({f"mixing {layer}": "keys did not cover the prompt: rollout took it as identity"
                        for layer in recorder.unmixed})
    context = None
    if keep and batch == 1:
        fed = ids[0].tolist() + rows[0].token_ids[:-1]  # the last answer token was never fed
        keys, values = decoder.snapshot(len(fed))
        context = Context(fed, keys, values, image_positions, dict(recorder.at_layer) if recorder else {})
    return DecodeResult(rows, attention, used, dropped,
                        {"prefill": t1 - t0, "decode": t2 - t1, "decode_steps": steps - 1, "reused_tokens": start,
                         **{f"decode_{k}": v for k, v in decoder.host_seconds.items()}},
                        context, bool(recorder is not None and recorder.rollout and used))


def _now(model) -> float:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    return time.perf_counter()
