"""Anatomy found in the image itself, used to gate attention maps: lung fields and their zones.

* Radiograph (:func:`xray_lung_fields`): the lungs are the large dark regions inside the body. Dark is
  below an Otsu threshold over the (smoothed) image; the air around the patient is the darkest part of
  that (below a second Otsu threshold among the dark pixels) connected to the image border. The lungs
  are the remaining dark pixels, opened to cut thin bridges; on each half of the image the largest such
  region is that side's lung field (PA display: the patient's right on the image's left), its holes
  (lesions inside it) filled. A side where no region of at least
  ``min_area`` of the image is found has no field, and gates on it are skipped (never guessed).
* Zones (:func:`level_rows`): the radiological upper / middle / lower zones are the thirds of each lung
  field's height. The gate keeps the named third widened by ``margin`` pixels; the upper zone is open
  upward and the lower zone downward, so a lesion that hides part of the field (an effusion filling the
  base) stays inside its gate.
* CT (:func:`ct_lung_mask`): voxels below -400 HU inside the body, holes filled slice by slice (nodules
  and masses inside the lung are soft tissue, so they are holes in the air-filled lung), dilated by
  ``margin`` voxels in-plane: a lesion against the chest wall or the diaphragm is no hole, so the gate
  reaches half a token cell (the maps' own resolution) beyond the air.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from . import components
from .blocks import block_mean, block_min, blocks_back
from .morphology import close_in_plane, dilate_in_plane, open_in_plane


def otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` (a 1-D array)."""
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(float)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = (np.sum(hist * centres) - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(centres[int(np.argmax(between))])


@dataclass
class LungFields:
    """Per side (``right``/``left``, patient sides) a bool mask on the image's pixels, or None."""

    right: np.ndarray | None
    left: np.ndarray | None

    def side(self, side: str) -> np.ndarray | None:
        return {"right": self.right, "left": self.left}.get(side)


FIELD_SIDE = 512  # lung fields are found on a copy no larger than this (the gates are coarser still)


def xray_lung_fields(pixels: np.ndarray, min_area: float = 0.02) -> LungFields:
    """Lung fields of a PA/AP radiograph (display convention) from its pixel values alone. A film larger
    than :data:`FIELD_SIDE` is analysed on a block-averaged copy and the fields scaled back (nearest)."""
    step = -(-max(pixels.shape) // FIELD_SIDE)
    if step == 1:
        return _lung_fields(pixels, min_area)
    found = _lung_fields(block_mean(pixels, step), min_area)
    return LungFields(*(None if m is None else _unpooled(m, step, pixels.shape) for m in (found.right, found.left)))


def _unpooled(mask: np.ndarray, step: int, shape) -> np.ndarray:
    """A mask found on blocks (:mod:`blocks`) back on the full grid ``shape`` (nearest; the cropped edge repeated:
    what ``np.pad(..., mode="edge")`` gives). Through :func:`blocks_back` rather than ``np.repeat``, which held
    the interpreter's lock for the whole copy, twice (a CT's body and lungs: 35 MB each)."""
    out = blocks_back(mask, step, shape)
    h, w = mask.shape[-2] * step, mask.shape[-1] * step
    out[..., :h, w:] = out[..., :h, w - 1 : w]  # the last block column repeated to the edge
    out[..., h:, :] = out[..., h - 1 : h, :]  # then the last row (the corner from the column just made)
    return out


def _lung_fields(pixels: np.ndarray, min_area: float) -> LungFields:
    img = ndimage.gaussian_filter(np.asarray(pixels, np.float32), max(1.0, min(pixels.shape) / 128))
    low = img < otsu(img.ravel())
    if low.sum() < 100:
        return LungFields(None, None)
    air = img < otsu(img[low])
    labels, _ = ndimage.label(air)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    outside = np.isin(labels, border[border > 0])
    dark = open_in_plane(low & ~dilate_in_plane(outside, 2, square=False), iterations=2)
    rows, cols = pixels.shape
    half = cols // 2
    fields = {}
    for side, cut in (("right", slice(0, half)), ("left", slice(half, cols))):
        part = np.zeros_like(dark)
        part[:, cut] = dark[:, cut]
        lung = components.fill_holes_in_plane(components.largest(part))
        fields[side] = lung if lung.sum() >= min_area * pixels.size else None
    return LungFields(**fields)


def level_rows(rows: int, lung: np.ndarray | None, level: str, margin: float) -> np.ndarray:
    """float32 (rows,), a film's zone gate (its row factor, :func:`maps.gated`): 1 in the rows of the named
    zone (third of the lung field's height) +- ``margin``; all 1 without a field or a zone."""
    if lung is None or level not in ("upper", "middle", "lower"):
        return np.ones(rows, np.float32)
    found = np.nonzero(lung.any(axis=1))[0]
    top, bottom = found.min(), found.max() + 1
    third = (bottom - top) / 3.0
    i = ("upper", "middle", "lower").index(level)
    lo = -np.inf if i == 0 else top + i * third - margin
    hi = np.inf if i == 2 else top + (i + 1) * third + margin
    r = np.arange(rows)
    return ((r >= lo) & (r < hi)).astype(np.float32)


def ct_lung_mask(hu: np.ndarray, body: np.ndarray, margin: int = 4) -> np.ndarray:
    """bool (z, y, x): the lungs (air inside the body, lesions within them included)."""
    air = (hu < -400) & body
    out = components.fill_holes_in_plane(close_in_plane(air, 2))  # every plane at once: closed, its holes filled
    return dilate_in_plane(out, margin) if margin else out


CT_ANATOMY_SIDE = 256  # CT body and lungs are found on planes no larger than this (block minimum)


def body_mask(hu: np.ndarray, threshold: float = -500.0) -> np.ndarray:
    """bool: the patient's body (largest connected region above ``threshold`` HU, holes such as the
    lungs filled slice by slice)."""
    body = components.largest(hu > threshold)
    if not body.any():
        return np.ones(hu.shape, bool)
    return components.fill_holes_in_plane(body)


def ct_body_and_lungs(hu: np.ndarray, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """(body, lungs) bool masks of a CT display array; ``margin`` (voxels) widens the lungs in-plane.
    Planes larger than :data:`CT_ANATOMY_SIDE` are reduced first by the block *minimum* (a block is air if
    any voxel in it is, so the thin air gap between an arm or the table and the body survives and the body,
    and with it the midline of the side gate, stays as at full resolution; a block mean merged them and
    moved the midline 15 voxels on a real scan) and the masks scaled back (nearest): a 512 x 512 x 300 scan
    then takes a second or two, not half a minute."""
    step = -(-max(hu.shape[1:]) // CT_ANATOMY_SIDE)
    if step == 1:
        body = body_mask(hu)
        return body, ct_lung_mask(hu, body, int(np.ceil(margin)))
    small = block_min(hu, step).astype(np.float32, copy=False)
    body = body_mask(small)
    lungs = ct_lung_mask(small, body, int(np.ceil(margin / step)))
    return _unpooled(body, step, hu.shape), _unpooled(lungs, step, hu.shape)
