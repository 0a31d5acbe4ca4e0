"""One reading of one radiograph: the path a request takes, start to end.

    load_radiograph -> pad_to_square -> generate (with attention capture) -> parse_report
      -> per finding: token rows -> 16x16 grid map -> heatmap on the original pixels -> label map

:class:`Reader` holds the loaded model; :meth:`Reader.read` returns a :class:`Reading` with the report,
the findings, one float heatmap per finding and the label map, all on the input's pixel grid.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from . import maps
from .errors import InputError
from .generation import Generation, NonFiniteOutput, generate
from .loading import load_model, normalise_precision
from .phantom_model import DEFAULT_QUESTION, MODEL_LABEL, PHANTOM_MODEL_DIR
from .report import Finding, parse_report, unique_names
from .xray import Radiograph, SquarePad, load_radiograph, pad_to_square

logger = logging.getLogger(__name__)

MAX_QUESTION_CHARS = 2000
MAX_NEW_TOKENS_LIMIT = 1024


@dataclass
class Reading:
    report: str
    findings: list[Finding]
    names: list[str]
    grids: list[np.ndarray]  # per finding, (g, g) map on the image-token grid
    heatmaps: list[np.ndarray]  # per finding, raw attention (float32) on the input's pixels
    mask_maps: list[np.ndarray]  # per finding, the heatmap the mask is cut from (side-gated)
    labels: np.ndarray  # uint8 on the input's pixels, finding k -> k
    radiograph: Radiograph
    pad: SquarePad
    model_input: np.ndarray  # the exact RGB square handed to the processor
    question: str
    model: dict
    latencies: dict = field(default_factory=dict)
    generation: Generation | None = None

    def findings_json(self) -> list[dict]:
        return [
            {
                "label": k,
                "name": name,
                "text": f.text,
                "kind": f.kind,
                "location": f.location,
                "side": f.side,
                "level": f.level,
                "score": round(f.score, 4),
                "peak_pixel": [int(i) for i in np.unravel_index(int(np.argmax(h)), h.shape)],
            }
            for k, (f, name, h) in enumerate(zip(self.findings, self.names, self.mask_maps), start=1)
        ]

    def result_json(self) -> dict:
        return {
            "report": self.report,
            "findings": self.findings_json(),
            "label_names": {name: k for k, name in enumerate(self.names, start=1)},
            "question": self.question,
            "model": self.model,
            "latencies": self.latencies,
            "source": self.radiograph.source,
        }


def check_params(question, max_new_tokens) -> tuple[str, int]:
    """Validated (question, max_new_tokens); raises InputError with what was wrong."""
    if question is None or (isinstance(question, str) and not question.strip()):
        question = DEFAULT_QUESTION
    if not isinstance(question, str):
        raise InputError(f"'question' must be text, got {type(question).__name__}")
    if len(question) > MAX_QUESTION_CHARS:
        raise InputError(f"'question' is {len(question)} characters long; the limit is {MAX_QUESTION_CHARS}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, float, str)):
        raise InputError(f"'max_new_tokens' must be a whole number, got {type(max_new_tokens).__name__}")
    try:
        n = int(max_new_tokens)
        if isinstance(max_new_tokens, float) and not max_new_tokens.is_integer():
            raise ValueError
    except (TypeError, ValueError):
        raise InputError(f"'max_new_tokens' must be a whole number, got {max_new_tokens!r}") from None
    if not 1 <= n <= MAX_NEW_TOKENS_LIMIT:
        raise InputError(f"'max_new_tokens' must be between 1 and {MAX_NEW_TOKENS_LIMIT}, got {n}")
    return question.strip(), n


class Reader:
    """A loaded model that reads radiographs. ``model`` is a hub id or folder (default: phantom model)."""

    def __init__(self, model: str | None = None, device: str = "auto", precision: str = "auto", system: str | None = None):
        self.model_ref = model or PHANTOM_MODEL_DIR
        self.device_request = device
        self.system = system
        label = MODEL_LABEL if self.model_ref == PHANTOM_MODEL_DIR else ""
        self.model, self.processor, self.info = load_model(self.model_ref, device, normalise_precision(precision), label)
        grid = math.isqrt(int(self.model.config.mm_tokens_per_image))
        if grid * grid != int(self.model.config.mm_tokens_per_image):
            raise ValueError("mm_tokens_per_image must be a perfect square")
        self.grid = grid

    @property
    def layers(self) -> list[int]:
        return list(self.info.grounding["layers"])

    def _fall_back_to_fp32(self) -> None:
        logger.warning("fp16 produced non-finite scores or an empty answer (Gemma 3 overflow): reloading in fp32")
        self.model, self.processor, self.info = load_model(self.model_ref, self.device_request, "fp32", self.info.label)
        self.info.precision_reason = "fp16 overflowed: fp32 fallback"

    def read(self, image: str | Radiograph, question: str | None = None, max_new_tokens: int = 128) -> Reading:
        t0 = time.perf_counter()
        question, max_new_tokens = check_params(question, max_new_tokens)
        radiograph = image if isinstance(image, Radiograph) else load_radiograph(image)
        square, pad = pad_to_square(radiograph.pixels)
        t_load = time.perf_counter()
        pil = Image.fromarray(square)
        try:
            gen = generate(self.model, self.processor, [pil], question, self.layers, max_new_tokens, self.system)
        except NonFiniteOutput:
            if self.info.precision != "fp16":
                raise
            self._fall_back_to_fp32()
            gen = generate(self.model, self.processor, [pil], question, self.layers, max_new_tokens, self.system)
        t_gen = time.perf_counter()
        findings = parse_report(gen.text)
        grids, heatmaps = [], []
        for f in findings:
            rows = gen.token_range(f.span)
            f.score = float(np.mean([gen.token_probs[i] for i in rows])) if rows else 0.0
            grid = finding_grid(gen, rows, self.grid)
            grids.append(grid)
            heatmaps.append(maps.grid_to_pixels(grid, pad))
        threshold = float(self.info.grounding.get("threshold", 0.5))
        mask_maps = [h * maps.side_gate(h.shape, f.side) for f, h in zip(findings, heatmaps)]
        labels = maps.label_map(mask_maps, threshold) if mask_maps else np.zeros(radiograph.pixels.shape, np.uint8)
        t_maps = time.perf_counter()
        return Reading(
            report=gen.text.strip(),
            findings=findings,
            names=unique_names(findings),
            grids=grids,
            heatmaps=heatmaps,
            mask_maps=mask_maps,
            labels=labels,
            radiograph=radiograph,
            pad=pad,
            model_input=square,
            question=question,
            model={**self.info.public(), "layers": gen.layers, "dropped_layers": gen.dropped_layers,
                   "grounding": self.info.grounding.get("source")},
            latencies={
                "load_image": round(t_load - t0, 4),
                "prepare": round(gen.seconds["prepare"], 4),
                "generate": round(gen.seconds["generate"], 4),
                "maps": round(t_maps - t_gen, 4),
                "total": round(t_maps - t0, 4),
                "new_tokens": len(gen.token_ids),
                "prompt_tokens": gen.prompt_tokens,
                "stop_reason": gen.stop_reason,
            },
            generation=gen,
        )


def finding_grid(gen: Generation, rows: list[int], grid: int, image: int = 0) -> np.ndarray:
    """(grid, grid) map: attention of the finding's token rows to image ``image``'s tokens.

    Each (token, layer, head) row is scaled to sum 1 over the image's tokens (where the query looked
    *within* the image, whatever share of its attention went to the image), then averaged.
    """
    n = gen.image_tokens_per_image
    if not rows:
        return np.zeros((grid, grid), np.float32)
    a = gen.attention[rows][..., image * n : (image + 1) * n]  # (tokens, layers, heads, n)
    a = a / a.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return a.mean(dim=(0, 1, 2)).reshape(grid, grid).numpy().astype(np.float32)
