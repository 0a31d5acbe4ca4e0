"""What the reading page draws: a reading's image in display orientation with its heatmap and masks.

Radiographs are drawn as read (PA: the patient's right on the image's left). CT planes are axial slices of
the display grid (rows front to back, columns patient right to left, as radiologists view them), windowed
by a preset. "R" and "L" mark the patient's sides on every image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

WINDOWS = {"lung": (-600.0, 1500.0), "mediastinum": (40.0, 400.0), "bone": (400.0, 1800.0)}  # (level, width) HU
COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60)]  # finding k has COLOURS[(k - 1) % 8]
MIN_SIDE = 512  # small images are drawn larger (nearest neighbour: a mask's edge stays a pixel edge)


@dataclass
class View:
    """The arrays one reading is drawn from, on the display grid: ``base`` (rows, cols) uint8 for a
    radiograph or (slices, rows, cols) HU for CT; ``labels`` and ``heat`` alike (heat 0..1)."""

    modality: str
    base: np.ndarray
    labels: np.ndarray
    heat: np.ndarray
    names: list[str]
    strongest: list[int]  # per finding: its strongest slice (display index; 0 for radiographs)

    @property
    def slices(self) -> int:
        return self.base.shape[0] if self.modality == "ct" else 1


def view_of(reading) -> View:
    """The display arrays of a :class:`reader.Reading`."""
    if reading.modality == "ct":
        labels = reading.display_labels
        heats = reading.display_heatmaps
        base = reading.study.hu
    else:
        base = reading.radiograph.pixels
        labels = reading.labels.reshape(base.shape)
        heats = [h.reshape(base.shape) for h in reading.mask_maps]
    heat = np.zeros(base.shape, np.float32)
    for h in heats:
        peak = float(h.max())
        if peak > 0:
            heat = np.maximum(heat, h / peak)
    strongest = [int(np.unravel_index(int(np.argmax(h)), h.shape)[0]) if reading.modality == "ct" else 0 for h in heats]
    return View(reading.modality, base, labels.astype(np.uint8), heat, list(reading.names), strongest)


def window(hu: np.ndarray, preset: str) -> np.ndarray:
    level, width = WINDOWS.get(preset, WINDOWS["lung"])
    lo = level - width / 2
    return (np.clip((hu - lo) / width, 0, 1) * 255).astype(np.uint8)


def _font(size: int):
    try:
        return ImageFont.truetype("DejaVuSans-Bold.ttf", size)
    except OSError:
        return ImageFont.load_default(size)


def render(view: View, z: int = 0, preset: str = "lung", heatmap: bool = True, shown: list[int] | None = None,
           opacity: float = 0.45) -> np.ndarray:
    """RGB uint8 image: slice ``z`` (CT) or the radiograph, the heatmap (if ``heatmap``), the masks of the
    findings numbered in ``shown`` (default: all) blended at ``opacity`` with their outlines drawn solid,
    and the side markers."""
    if view.modality == "ct":
        z = int(np.clip(z, 0, view.slices - 1))
        grey, labels, heat = window(view.base[z], preset), view.labels[z], view.heat[z]
    else:
        grey, labels, heat = view.base, view.labels, view.heat
    rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
    alpha = float(np.clip(opacity, 0.0, 1.0))
    if heatmap:
        a = (np.clip((heat - 0.2) / 0.8, 0, 1) * alpha)[..., None]
        hot = np.stack([np.full_like(heat, 255), np.clip(heat * 2 - 0.5, 0, 1) * 255, np.zeros_like(heat)], -1)
        rgb = rgb * (1 - a) + hot * a
    shown = list(range(1, len(view.names) + 1)) if shown is None else shown
    for k in shown:
        m = labels == k
        if not m.any():
            continue
        colour = np.array(COLOURS[(k - 1) % len(COLOURS)], np.float32)
        rgb[m] = rgb[m] * (1 - alpha) + colour * alpha
        inner = m.copy()
        inner[1:] &= m[:-1]
        inner[:-1] &= m[1:]
        inner[:, 1:] &= m[:, :-1]
        inner[:, :-1] &= m[:, 1:]
        edge = m & ~inner
        rgb[edge] = colour
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    scale = max(1, int(np.ceil(MIN_SIDE / max(image.size))))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(image)
    size = max(14, image.height // 20)
    font = _font(size)
    pad = size // 3
    for letter, x in (("R", pad), ("L", image.width - pad - size * 0.7)):  # patient right on the image left
        draw.text((x, image.height // 2 - size // 2), letter, fill=(255, 255, 0), font=font, stroke_width=2,
                  stroke_fill=(0, 0, 0))
    return np.asarray(image)
