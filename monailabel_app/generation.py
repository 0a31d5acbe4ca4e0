"""Ask the model about one or more images and generate, keeping what the maps need.

The chat is built with the processor's own (Gemma 3) chat template: an optional system text, the
images, then the question, then the model's turn. Generation is greedy. Besides the answer it keeps,
per generated token: its probability, where its text ends in the answer, and (through
:mod:`monailabel_app.capture`) the attention of the query that emitted it to every image token on the
chosen layers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from PIL import Image

from .capture import recording


class RepetitionStop:
    """Stopping criterion: the answer has fallen into a loop (one n-gram, n <= 8, three times in a row).

    Small or out-of-distribution models can repeat themselves until ``max_new_tokens``; the loop carries
    no information, costs decode time and would become spurious findings. :func:`loop_start` tells where
    the first repetition begins so the answer can be cut there.
    """

    def __init__(self, prompt_len: int, max_period: int = 8, times: int = 3):
        self.prompt_len, self.max_period, self.times = prompt_len, max_period, times
        self.stopped = False

    def __call__(self, input_ids, scores, **kwargs):
        new = input_ids[0, self.prompt_len :].tolist()
        self.stopped = loop_start(new, self.max_period, self.times) is not None
        return torch.full((input_ids.shape[0],), self.stopped, dtype=torch.bool, device=input_ids.device)


def loop_start(ids: list[int], max_period: int = 8, times: int = 3) -> int | None:
    """Index where the tail's repeated n-gram first repeats (keep ``ids[:index]``), or None."""
    for p in range(1, max_period + 1):
        if len(ids) < p * times:
            continue
        gram = ids[-p:]
        if all(ids[-(k + 1) * p : len(ids) - k * p] == gram for k in range(times)):
            return len(ids) - (times - 1) * p
    return None


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

    def token_range(self, span: tuple[int, int]) -> list[int]:
        """Indices of the generated tokens whose text overlaps the character span ``span``."""
        start, end = span
        out, prev = [], 0
        for i, stop in enumerate(self.token_ends):
            if stop > start and prev < end and self.text[prev:stop].strip():
                out.append(i)
            prev = stop
        return out


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
    messages = ([{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []) + [
        {"role": "user", "content": items}
    ]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def build_inputs(processor, content: list, question: str, system: str | None, device, dtype):
    inputs = processor.apply_chat_template(
        chat_messages(content, question, system), add_generation_prompt=True, tokenize=True, return_dict=True,
        return_tensors="pt",
    )
    inputs = inputs.to(device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs


def _token_ends(tokenizer, ids: list[int]) -> list[int]:
    ends = []
    for i in range(len(ids)):
        ends.append(len(tokenizer.decode(ids[: i + 1], skip_special_tokens=True)))
    return ends


class ForcedAnswer:
    """Logits processor that makes generation emit ``ids`` (then stop): the model's attention while it
    "says" given words about an image, recorded exactly as for its own answers."""

    def __init__(self, ids: list[int], prompt_len: int):
        self.ids, self.prompt_len = ids, prompt_len

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_len
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.ids[min(step, len(self.ids) - 1)]] = 0.0
        return forced


@torch.inference_mode()
def generate(model, processor, content, question, layers, max_new_tokens=128, system=None,
             rollout: bool = False, answer: str | None = None) -> Generation:
    """Greedy answer to ``question`` about ``content`` (PIL images and texts, in chat order); with
    ``rollout`` the recorded attention is rolled out inside each image (:mod:`monailabel_app.capture`).
    With ``answer`` the model is made to say that text instead (teacher forcing; ``token_probs`` are
    still the model's own probabilities of those tokens)."""
    t0 = time.perf_counter()
    device, dtype = model.device, model.dtype
    inputs = build_inputs(processor, content, question, system, device, dtype)
    images = [c for c in content if not isinstance(c, str)]
    t_prep = time.perf_counter()
    ids = inputs["input_ids"][0]
    image_positions = (ids == model.config.image_token_index).nonzero()[:, 0].cpu()
    per_image = int(model.config.mm_tokens_per_image)
    if len(image_positions) != per_image * len(images):
        raise RuntimeError(f"expected {per_image * len(images)} image tokens, found {len(image_positions)}")
    prompt_len = int(ids.shape[0])
    from transformers import LogitsProcessorList, StoppingCriteriaList

    repetition = RepetitionStop(prompt_len)
    extra = {}
    if answer is not None:
        tok = processor.tokenizer
        forced = tok(answer, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<end_of_turn>")]
        extra = {"logits_processor": LogitsProcessorList([ForcedAnswer(forced, prompt_len)]), "output_logits": True}
        max_new_tokens = len(forced)
    with recording(layers, image_positions.to(device), prompt_len, rollout, per_image) as rec:
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            stopping_criteria=StoppingCriteriaList([] if answer is not None else [repetition]),
            **extra,
        )
    t_gen = time.perf_counter()
    new = out.sequences[0, prompt_len:].tolist()
    stop_reason = "eos" if new and new[-1] in _eos_ids(model) else "max_new_tokens"
    if repetition.stopped:
        new = new[: loop_start(new)]
        stop_reason = "repetition"
    tok = processor.tokenizer
    probs = []
    for step, score in enumerate((out.logits if answer is not None else out.scores)[: len(new)]):
        logp = torch.log_softmax(score[0].float(), dim=-1)[new[step]].item()
        probs.append(math.exp(logp) if math.isfinite(logp) else float("nan"))
    text = tok.decode(new, skip_special_tokens=True)
    if any(not math.isfinite(p) for p in probs) or (new and not text.strip() and model.dtype == torch.float16):
        raise NonFiniteOutput("non-finite scores or empty answer")
    attention = rec.stacked()[: len(new), :, 0].float()  # (steps, layers, heads, n_image_tokens)
    return Generation(
        text=text,
        token_ids=new,
        token_ends=_token_ends(tok, new),
        token_probs=probs,
        attention=attention,
        layers=rec.usable_layers,
        dropped_layers={**rec.dropped, **{f"mixing {layer}": "keys did not cover the prompt: rollout took it as "
                                          "identity" for layer in rec.unmixed}},
        prompt_tokens=prompt_len,
        image_tokens_per_image=per_image,
        seconds={"prepare": t_prep - t0, "generate": t_gen - t_prep},
        stop_reason=stop_reason,
        rollout=rec.rollout,
    )


def _eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [eos])
