"""Ask the model about one or more images and generate, keeping what the maps need.

The chat is built with the processor's own (Gemma 3) chat template: an optional system text, the
images, then the question, then the model's turn. Generation is greedy. Besides the answer it keeps,
per generated token: its probability, where its text ends in the answer, and (through
:mod:`monailabel_app.model.capture`) the attention of the query that emitted it to every image token on the
chosen layers.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from PIL import Image

from . import prompt_ids, streams
from .decoding import Context, loop_start, prefill_and_decode  # noqa: F401 (loop_start: public here too)


class NonFiniteOutput(RuntimeError):
    """The model produced NaN/inf scores or an empty answer (fp16 overflow in Gemma 3)."""


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    token_ends: list[int]  # character offset in ``text`` where each generated token's text ends
    token_probs: list[float]
    attention: torch.Tensor  # (steps, layers, heads, n_image_tokens), float32, on the CPU
    layers: list[int]
    dropped_layers: dict
    prompt_tokens: int
    image_tokens_per_image: int
    seconds: dict = field(default_factory=dict)
    stop_reason: str = "eos"  # eos, max_new_tokens, or repetition (a loop, cut off)
    rollout: bool = False  # attention rolled out inside each image (capture.AttentionRecorder)
    timings: dict = field(default_factory=dict)  # the decoder's own: prefill, decode (s), decode_steps
    conversation: "Conversation | None" = None  # with ``keep``: the chat so far, to ask a follow-up

    def token_range(self, span: tuple[int, int]) -> list[int]:
        """Indices of the generated tokens whose text overlaps the character span ``span``."""
        start, end = span
        out, prev = [], 0
        for i, stop in enumerate(self.token_ends):
            if stop > start and prev < end and self.text[prev:stop].strip():
                out.append(i)
            prev = stop
        return out


@dataclass
class Partial:
    """An answer while it is being written (a batch of one: :func:`generate_batch`'s ``progress``): its text
    so far, and on demand (:meth:`generation`) a :class:`Generation` of it whose attention rows are the final
    ones (:class:`decoding.LiveRows`); its token probabilities are not known yet (NaN)."""

    text: str
    make: Callable[[], Generation]

    def generation(self) -> Generation:
        return self.make()


@dataclass
class Conversation:
    """A chat about one study: its messages so far (images as placeholders) and the decoder's kept
    context (keys and values of every token so far, image positions, rollout products)."""

    messages: list[dict]
    context: Context
    turns: int = 1
    last_token: int | None = None  # the answer's last token (never fed, so not in the context's ids)

    @property
    def nbytes(self) -> int:
        return self.context.nbytes

    def history(self) -> list[dict]:
        """Per turn: the question (the user turn's last text) and the model's answer."""
        users = [m for m in self.messages if m["role"] == "user"]
        answers = [m for m in self.messages if m["role"] == "assistant"]
        return [{"question": u["content"][-1]["text"], "answer": a["content"][0]["text"].strip()}
                for u, a in zip(users, answers)]


def text_turn(role: str, text: str) -> dict:
    """A chat turn of text alone (system text, a follow-up question, an answer)."""
    return {"role": role, "content": [{"type": "text", "text": text}]}


def chat_ids(processor, messages: list[dict]) -> list[int]:
    """Token ids of ``messages`` with the model's turn opened, without processing any image: each image
    placeholder becomes the processor's full image sequence, as ``Gemma3Processor`` does."""
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    text = text.replace(processor.boi_token, processor.full_image_sequence)
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def _placeholders(content: list) -> list:
    return [c if isinstance(c, str) else None for c in content]


def chat_messages(content: list, question: str, system: str | None = None, answer: str | None = None) -> list[dict]:
    """Gemma 3 chat: optional system text, the user's ``content`` (images and texts, in order) and the
    question, then (for training) the model's ``answer``. Images are given as ``{"type": "image"}``
    items carrying the image when it is not a placeholder."""
    items = []
    for c in content:
        if isinstance(c, str):
            items.append({"type": "text", "text": c})
        else:
            items.append({"type": "image", "image": c} if c is not None else {"type": "image"})
    items.append({"type": "text", "text": question})
    messages = ([text_turn("system", system)] if system else []) + [{"role": "user", "content": items}]
    if answer is not None:
        messages.append(text_turn("assistant", answer))
    return messages


def build_inputs(processor, content: list, question: str, system: str | None, device, dtype):
    """Token ids, masks and pixel values of one chat. On CUDA a torchvision-based image processor (what
    ``AutoProcessor`` gives when torchvision is installed) resizes and normalises on the GPU. Images are
    PIL images or uint8 arrays (rows x cols grey, shown as RGB with three equal channels, or rows x cols x 3
    RGB): see :func:`processor_image`. A prompt seen before is not tokenised again (:mod:`prompt_ids`)."""
    image_kwargs = None
    on_device = None
    if not type(processor.image_processor).__name__.endswith("Pil"):
        on_device = torch.device(device)
        if on_device.type == "cuda":
            image_kwargs = {"device": str(device)}
    content = [c if isinstance(c, str) else processor_image(c, on_device) for c in content]
    images = [c for c in content if c is not None and not isinstance(c, str)]
    inputs = prompt_ids.inputs(processor, chat_messages(content, question, system), images, image_kwargs)
    inputs = inputs.to(device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs


def processor_image(image, device: torch.device | None):
    """``image`` as the image processor takes it best: a uint8 array becomes a channels-first tensor on
    ``device`` for a torchvision-based processor (a grey one is uploaded once and expanded to three equal
    channels there, no RGB copy on the host), or an RGB PIL image for a PIL-based one (``device`` None).
    PIL images and tensors are handed over as they are."""
    if not isinstance(image, np.ndarray):
        return image
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"a model image is uint8 rows x cols or rows x cols x 3, got {image.dtype} {image.shape}")
    if device is None:
        return Image.fromarray(image).convert("RGB")
    pixels = torch.from_numpy(np.ascontiguousarray(image)).to(device)
    return pixels.expand(3, *pixels.shape) if pixels.ndim == 2 else pixels.permute(2, 0, 1)


ENDS_BLOCK = 16  # tokens whose ends :func:`_token_ends` finds from one decoded prefix


def _token_ends(tokenizer, ids: list[int], known: list[int] | None = None) -> list[int]:
    """Per token, where its text ends in the decoded answer: the length of ``ids[:i + 1]`` decoded (special
    tokens skipped); ``known``: those of a prefix of ``ids``, kept.

    Decoding every prefix is quadratic: a 200-token answer decodes 20,000 tokens (6 ms here), and a batch of
    64 answers held the serving process's main thread between two batches for a large part of a second. Text
    decodes token by token except inside a run of byte tokens (byte fallback: the run is one UTF-8 string,
    or one replacement character per byte where it is not valid), so the ends are found a block of
    :data:`ENDS_BLOCK` tokens at a time: the decoded length of the prefix before the block plus each in-block
    prefix decoded from the block's start. A block starts only between two tokens that each decode alone to
    text without replacement characters (never inside such a run), and its first and last ends are checked
    against their whole prefixes decoded; where either condition fails, that token's end is its whole prefix
    decoded and the next block starts after it. A 200-token answer: 3.4 times faster here (English), the same
    ends."""
    ends = list(known or [])[: len(ids)]

    def length(some: list[int]) -> int:
        return len(tokenizer.decode(some, skip_special_tokens=True))

    def plain(token: int) -> bool:
        text = tokenizer.decode([token], skip_special_tokens=True)
        return bool(text) and "\ufffd" not in text

    i = len(ends)
    while i < len(ids):
        stop = min(i + ENDS_BLOCK, len(ids))
        block = None
        if i == 0:  # prefixes from the start: each end as defined
            block = [length(ids[: k + 1]) for k in range(i, stop)]
        elif stop - i > 1 and plain(ids[i - 1]) and plain(ids[i]):
            block = [ends[-1] + length(ids[i : k + 1]) for k in range(i, stop)]
            if block[0] != length(ids[: i + 1]) or block[-1] != length(ids[:stop]):
                block = None
        ends += block if block is not None else [length(ids[: i + 1])]
        i = len(ends)
    return ends


def _batch(processor, model, studies: list[tuple[list, str]], system, device, dtype) -> dict:
    """One left-padded batch of chats (input_ids, attention_mask, token_type_ids, pixel_values)."""
    each = [build_inputs(processor, content, question, system, device, dtype) for content, question in studies]
    if len(each) == 1:
        return dict(each[0])
    width = max(e["input_ids"].shape[1] for e in each)
    pad_id = processor.tokenizer.pad_token_id or 0

    def left(t, value):
        return torch.nn.functional.pad(t, (width - t.shape[1], 0), value=value)

    out = {"input_ids": torch.cat([left(e["input_ids"], pad_id) for e in each]),
           "attention_mask": torch.cat([left(e["attention_mask"], 0) for e in each]),
           "token_type_ids": torch.cat([left(e["token_type_ids"], 0) for e in each])}
    if any("pixel_values" in e for e in each):
        out["pixel_values"] = torch.cat([e["pixel_values"] for e in each if "pixel_values" in e])
    return out


def generate(model, processor, content, question, layers, max_new_tokens=128, system=None,
             rollout: bool = False, answer: str | None = None) -> Generation:
    """Greedy answer to ``question`` about ``content`` (PIL images and texts, in chat order); with
    ``rollout`` the recorded attention is rolled out inside each image (:mod:`monailabel_app.model.capture`).
    With ``answer`` the model is made to say that text instead (teacher forcing; ``token_probs`` are
    still the model's own probabilities of those tokens)."""
    return generate_batch(model, processor, [(content, question)], layers, max_new_tokens, system, rollout,
                          None if answer is None else [answer])[0]


def follow_up(model, processor, conversation: Conversation, question: str, layers, max_new_tokens=128,
              rollout: bool = False) -> Generation:
    """The answer to a follow-up ``question`` in ``conversation``: only the new turn is prefilled (the
    images and earlier turns come from the kept context); its attention rows and maps are as in the first
    turn. The returned generation carries the conversation one turn longer."""
    t0 = time.perf_counter()
    messages = conversation.messages + [text_turn("user", question)]
    ids = torch.tensor([_turn_ids(processor, conversation, messages)], device=model.device)
    t_prep = time.perf_counter()
    result = prefill_and_decode(model, {"input_ids": ids}, list(layers), int(model.config.mm_tokens_per_image),
                                max_new_tokens, rollout, None, sorted(_eos_ids(model)), past=conversation.context,
                                keep=True)
    gen = _generations(model, processor, result, [ids.shape[1]], t0, t_prep)[0]
    gen.conversation = Conversation(messages + [text_turn("assistant", gen.text)], result.context, conversation.turns + 1,
                                    gen.token_ids[-1] if gen.token_ids else None)
    return gen


def _turn_ids(processor, conversation: Conversation, messages: list[dict]) -> list[int]:
    """Token ids of the conversation with the new question: the rendered chat when it starts with the kept
    tokens; else (the answer's text re-tokenises differently) the kept tokens continued exactly, so that
    all of them are reused (a sliding window's ring cannot be cut back)."""
    ids = chat_ids(processor, messages)
    kept = conversation.context.ids
    if ids[: len(kept)] == kept or conversation.last_token is None:
        return ids
    tok = processor.tokenizer
    end = tok.convert_tokens_to_ids("<end_of_turn>")
    before = processor.apply_chat_template(messages[:-1], tokenize=False)
    after = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if not after.startswith(before):
        return ids
    closing = [conversation.last_token] + ([] if conversation.last_token == end else [end])
    return kept + closing + tok("\n" + after[len(before):], add_special_tokens=False)["input_ids"]


@dataclass
class Prepared:
    """A batch's model inputs (token ids, masks, pixel values on the model's device) and forced answers,
    made apart from its generation (:func:`prepare_batch`), e.g. while the batch before it generates."""

    studies: list[tuple[list, str]]  # the (content, question) chats they were made from
    inputs: dict
    forced: list[list[int]] | None
    waited: float  # seconds the generation waited for these inputs (all of their making, when made inline)


def prepare_batch(model, processor, studies: list[tuple[list, str]], system=None,
                  answers: list[str] | None = None) -> Prepared:
    """The inputs of :func:`generate_batch` for (content, question) studies that show the same number of
    images. On CUDA they are made on their own stream and complete when this returns (the generation that
    uses them on the default stream ends with a device synchronisation before they are freed)."""
    t0 = time.perf_counter()
    counts = {sum(not isinstance(c, str) for c in content) for content, _ in studies}
    if len(counts) != 1:
        raise ValueError(f"a batch needs the same number of images per study, got {sorted(counts)}")
    # a stream of its own (None without CUDA): the copies and resizes do not queue behind the decode steps that
    # another batch has queued on the default stream
    stream = streams.kept(model.device, "inputs")
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        inputs = _batch(processor, model, studies, system, model.device, model.dtype)
    if stream is not None:
        stream.synchronize()
    per_image = int(model.config.mm_tokens_per_image)
    found = (inputs["input_ids"] == model.config.image_token_index).sum(-1)
    if not bool((found == per_image * counts.pop()).all()):
        raise RuntimeError(f"expected {per_image} image tokens per image, found {found.tolist()}")
    forced = None
    if answers is not None:
        tok = processor.tokenizer
        end = tok.convert_tokens_to_ids("<end_of_turn>")
        forced = [tok(a, add_special_tokens=False)["input_ids"] + [end] for a in answers]
    return Prepared(studies, inputs, forced, time.perf_counter() - t0)


def generate_batch(model, processor, studies: list[tuple[list, str]], layers, max_new_tokens=128, system=None,
                   rollout: bool = False, answers: list[str] | None = None, keep: bool = False,
                   prepared: Prepared | None = None,
                   progress: Callable[[Partial], None] | None = None) -> list[Generation]:
    """:func:`generate` for several (content, question) studies at once, one batch through the model
    (:mod:`monailabel_app.model.decoding`: static cache, CUDA graph on GPUs). Every study must show the same
    number of images. ``keep`` (one study): the generation carries its :class:`Conversation`.
    ``prepared``: the studies' inputs made ahead (:func:`prepare_batch`; its ``answers`` are the ones forced).
    ``progress`` (one study): called with the :class:`Partial` answer every few decode steps, while the next
    steps decode."""
    prepared = prepared or prepare_batch(model, processor, studies, system, answers)
    t_prep = time.perf_counter()
    t0 = t_prep - prepared.waited
    inputs = prepared.inputs
    per_image = int(model.config.mm_tokens_per_image)
    prompt_tokens = inputs["attention_mask"].sum(-1).tolist()
    watch = None if progress is None else _Partials(processor, progress, prompt_tokens[0], per_image)
    result = prefill_and_decode(model, inputs, list(layers), per_image, max_new_tokens, rollout, prepared.forced,
                                sorted(_eos_ids(model)), stop_loops=prepared.forced is None,
                                keep=keep and len(studies) == 1, progress=watch)
    gens = _generations(model, processor, result, prompt_tokens, t0, t_prep, watch.ends if watch else None)
    if result.context is not None:
        (content, question), gen = studies[0], gens[0]
        messages = chat_messages(_placeholders(content), question, system, answer=gen.text)
        gen.conversation = Conversation(messages, result.context, 1, gen.token_ids[-1] if gen.token_ids else None)
    return gens


class _Partials:
    """The decoder's progress callback (token ids, rows(), layers) as :class:`Partial` answers for ``progress``;
    :attr:`ends`: the token ends found so far (each look decodes only its new tokens). An object, not a closure
    keeping its ends on itself: that function referred to itself, a reference cycle that held the study's maps
    (``progress`` is their :meth:`StudyMaps.ahead`) until Python's cyclic collector ran."""

    def __init__(self, processor, progress: Callable[[Partial], None], prompt_tokens: int, per_image: int):
        self.tok, self.progress = processor.tokenizer, progress
        self.prompt_tokens, self.per_image = int(prompt_tokens), per_image
        self.ends: list[int] = []

    def __call__(self, ids: list[int], rows, layers: list[int]) -> None:
        text = self.tok.decode(ids, skip_special_tokens=True)
        ends = self.ends = _token_ends(self.tok, ids, self.ends)
        prompt_tokens, per_image = self.prompt_tokens, self.per_image  # the answer's Generation holds no self
        self.progress(Partial(text, lambda: Generation(
            text=text, token_ids=ids, token_ends=ends, token_probs=[float("nan")] * len(ids),
            attention=rows()[:, :, 0], layers=list(layers), dropped_layers={}, prompt_tokens=prompt_tokens,
            image_tokens_per_image=per_image)))


def _generations(model, processor, result, prompt_tokens: list[int], t0: float, t_prep: float,
                 known_ends: list[int] | None = None) -> list[Generation]:
    """One :class:`Generation` per decoded row of ``result``; raises :class:`NonFiniteOutput`.
    ``known_ends``: the first row's token ends found while it was written (a prefix of its tokens)."""
    tok = processor.tokenizer
    rows, attention, used, dropped = result.rows, result.attention, result.layers, result.dropped
    per_image = int(model.config.mm_tokens_per_image)
    if attention is not None:
        attention = attention.float().cpu()
    t_gen = time.perf_counter()
    out = []
    for b, row in enumerate(rows):
        probs = [math.exp(lp) if math.isfinite(lp) else float("nan") for lp in row.logprobs]
        text = tok.decode(row.token_ids, skip_special_tokens=True)
        if row.nonfinite or any(not math.isfinite(p) for p in probs) or (
                row.token_ids and not text.strip() and model.dtype == torch.float16):
            raise NonFiniteOutput("non-finite scores or an empty answer")
        n = len(row.token_ids)
        out.append(Generation(
            text=text,
            token_ids=row.token_ids,
            token_ends=_token_ends(tok, row.token_ids, known_ends if b == 0 else None),
            token_probs=probs,
            attention=attention[:n, :, b] if attention is not None else torch.zeros(n, 0, 0, 0),
            layers=used,
            dropped_layers=dropped,
            prompt_tokens=int(prompt_tokens[b]),
            image_tokens_per_image=per_image,
            seconds={"prepare": t_prep - t0, "generate": t_gen - t_prep},
            timings={k: round(v, 4) for k, v in result.seconds.items()},
            stop_reason=row.stop_reason,
            rollout=bool(result.rolled_out),
        ))
    if not used:
        raise RuntimeError(f"no layer recorded attention to the image: {dropped}")
    return out


def _eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [eos])
