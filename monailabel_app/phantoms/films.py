"""Synthetic chest X-ray phantoms with known lesions (test data, not anatomy).

A phantom is a grey PA chest-like image: body ellipse, two dark lung fields, a bright mediastinum with
the heart bulging to the patient's left, faint ribs, low-frequency texture and noise. It carries 0-2
lesions, each of one kind in one zone:

* kinds: ``nodule`` (small sharp disc), ``opacity`` (larger soft irregular blob), ``effusion``
  (fluid filling the lung base under a meniscus; lower zones only);
* zones: patient ``right``/``left`` x ``upper``/``middle``/``lower`` third of that lung's height.

Display convention as in a PA radiograph: the patient's right is on the image's left (low column
index); row 0 is superior. Every lesion comes with its exact mask (the pixels where the lesion adds at
least half of its peak brightness, inside the lung) and the reference findings text in the project's
report format (:func:`monailabel_app.language.report.format_findings`). Everything is deterministic by seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage, special

from ..language.report import KINDS, LEVELS, SIDES, Finding, format_findings

LESION_COUNT_P = (0.2, 0.45, 0.35)  # probability of 0, 1, 2 lesions


@dataclass
class Lesion:
    kind: str
    side: str
    level: str
    mask: np.ndarray  # bool (H, W)
    center: tuple[int, int] = (0, 0)  # (row, col) where the lesion was placed; inside its zone

    @property
    def zone(self) -> str:
        return f"{self.side} {self.level}"

    def centroid(self) -> tuple[float, float]:
        rows, cols = np.nonzero(self.mask)
        return float(rows.mean()), float(cols.mean())


@dataclass
class Phantom:
    seed: int
    image: np.ndarray  # uint8 (H, W), bright = dense
    lesions: list[Lesion]
    lungs: dict[str, np.ndarray] = field(default_factory=dict)  # side -> bool (H, W)

    @property
    def findings(self) -> list[Finding]:
        return [Finding(kind=les.kind, side=les.side, level=les.level) for les in self.lesions]

    @property
    def report(self) -> str:
        return format_findings(self.findings)


def _ellipse(shape, cy, cx, ry, rx):
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2


def _smooth_noise(rng, shape, cells, sigma):
    small = rng.standard_normal((cells, cells)).astype(np.float32)
    up = ndimage.zoom(small, (shape[0] / cells, shape[1] / cells), order=1)
    return ndimage.gaussian_filter(up[: shape[0], : shape[1]], sigma)


def _level_band(lung: np.ndarray, level: str) -> tuple[int, int]:
    """Rows [top, bottom) of one third of a lung's vertical extent."""
    rows = np.nonzero(lung.any(axis=1))[0]
    top, bottom = rows.min(), rows.max() + 1
    third = (bottom - top) / 3.0
    i = LEVELS.index(level)
    return int(round(top + i * third)), int(round(top + (i + 1) * third))


def _draw_anatomy(rng, h, w):
    img = np.zeros((h, w), np.float32)
    cy, cx = h * rng.uniform(0.50, 0.56), w * rng.uniform(0.47, 0.53)
    body_ry, body_rx = h * rng.uniform(0.43, 0.48), w * rng.uniform(0.42, 0.47)
    body = _ellipse((h, w), cy, cx, body_ry, body_rx) <= 1
    img[body] = 0.55
    lungs = {}
    lung_ry, lung_rx = body_ry * rng.uniform(0.72, 0.8), body_rx * rng.uniform(0.34, 0.4)
    gap = body_rx * rng.uniform(0.42, 0.5)
    for side, sign in (("right", -1), ("left", +1)):  # patient right = image left
        lx = cx + sign * gap
        ly = cy - body_ry * 0.05 + rng.normal(0, 2)
        lung = _ellipse((h, w), ly, lx, lung_ry * rng.uniform(0.95, 1.05), lung_rx) <= 1
        lung &= body
        lungs[side] = lung
    # heart: bright ellipse low in the mediastinum, bulging to the patient's left (image right)
    heart = _ellipse((h, w), cy + body_ry * 0.28, cx + body_rx * 0.12, body_ry * 0.25, body_rx * 0.33) <= 1
    for side in lungs:
        lungs[side] &= ~heart
    for lung in lungs.values():
        img[lung] = 0.18
    img[heart] = 0.62
    # ribs: faint arcs across each lung
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    rib_phase = rng.uniform(0, 2 * np.pi)
    rib_period = h * rng.uniform(0.07, 0.09)
    arcs = np.sin(2 * np.pi * (yy + 0.002 * (xx - cx) ** 2) / rib_period + rib_phase)
    lung_any = lungs["right"] | lungs["left"]
    img += 0.035 * (arcs > 0.6) * lung_any
    img += 0.04 * _smooth_noise(rng, (h, w), 12, 2.0) * body
    return img, lungs, body


def _draw_lesion(rng, img, lungs, kind, side, level):
    h, w = img.shape
    lung = lungs[side]
    top, bottom = _level_band(lung, level)
    band = np.zeros_like(lung)
    band[top:bottom] = True
    if kind == "effusion":
        # fluid fills the base of the lung below a meniscus rising laterally
        rows = np.nonzero(lung.any(axis=1))[0]
        lung_bottom = rows.max()
        depth = (bottom - top) * rng.uniform(0.45, 0.85)
        cols = np.nonzero(lung.any(axis=0))[0]
        lateral = cols.min() if side == "right" else cols.max()
        xx = np.arange(w, dtype=np.float32)
        rel = np.abs(xx - lateral) / max(1.0, cols.max() - cols.min())
        surface = lung_bottom - depth * (1.0 - 0.5 * rel)  # higher at the lateral wall
        yy = np.arange(h, dtype=np.float32)[:, None]
        fluid = (yy >= surface[None, :]) & lung
        soft = ndimage.gaussian_filter(fluid.astype(np.float32), 1.0)
        img += 0.42 * soft
        mask = fluid & (soft >= 0.5)
        rows, cols = np.nonzero(mask)
        return mask, (int(rows.mean()), int(cols.mean()))
    candidates = np.argwhere(lung & band & (ndimage.distance_transform_edt(lung) > 4))
    if len(candidates) == 0:
        candidates = np.argwhere(lung & band)
    py, px = candidates[rng.integers(len(candidates))]
    scale = min(h, w) / 240.0
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    if kind == "nodule":
        r = rng.uniform(4.5, 8.0) * scale
        d = np.sqrt((yy - py) ** 2 + (xx - px) ** 2)
        blob = special.expit((r - d) / 0.6)
        amp = rng.uniform(0.40, 0.50)
    else:  # opacity: a few overlapping soft gaussians
        r = rng.uniform(11.0, 20.0) * scale
        blob = np.zeros((h, w), np.float32)
        for _ in range(3):
            oy, ox = rng.normal(0, r * 0.35, 2)
            s = r * rng.uniform(0.55, 0.8)
            blob = np.maximum(blob, np.exp(-((yy - py - oy) ** 2 + (xx - px - ox) ** 2) / (2 * s * s)))
        amp = rng.uniform(0.34, 0.44)
    blob = blob * lung
    img += amp * blob
    return blob >= 0.5 * blob.max(), (int(py), int(px))


def make_phantom(seed: int, lesions: bool = True) -> Phantom:
    """Draw phantom number ``seed`` (same seed, same pixels, lesions and text). ``lesions=False`` gives
    its lesion-free twin: the same anatomy and noise, the lesions drawn on a scratch copy and dropped."""
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(232, 297)), int(rng.integers(208, 273))
    img, lungs, body = _draw_anatomy(rng, h, w)
    n = rng.choice(3, p=LESION_COUNT_P)
    zones = [(s, lv) for s in SIDES for lv in LEVELS]
    chosen = [zones[i] for i in rng.choice(len(zones), size=n, replace=False)]
    found, canvas = [], img if lesions else img.copy()
    for side, level in chosen:
        kinds = KINDS if level == "lower" else tuple(k for k in KINDS if k != "effusion")
        kind = str(rng.choice(kinds))
        mask, center = _draw_lesion(rng, canvas, lungs, kind, side, level)
        found.append(Lesion(kind=kind, side=side, level=level, mask=mask, center=center))
    lesions = found if lesions else []
    img += rng.normal(0, 0.025, img.shape).astype(np.float32)
    img = ndimage.gaussian_filter(img, 0.7)
    image = np.clip(img * 255 / 0.9, 0, 255).astype(np.uint8)
    order = {f"{s} {lv}": i for i, (s, lv) in enumerate(zones)}
    lesions.sort(key=lambda les: order[les.zone])
    return Phantom(seed=seed, image=image, lesions=lesions, lungs=lungs)
