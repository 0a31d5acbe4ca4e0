"""How far a finding reaches, read from the image around a point: attention (or a click) says where, the
image says how far. This module holds the rule and what both images share; :mod:`ct_extent` applies it to a CT
(its smoothing, the search among the dense regions attention points at), :mod:`film_extent` to a radiograph
(its blobs, its working copy).

One point (a voxel or pixel index) and the finding's kind give a region of the image grown from that
point, by the image's own values, per kind:

* **focal** (nodule, mass, lesion, calcification, cavity): the connected region at the point that is
  denser than halfway between the point's own level and the surrounding lung's (the half-level contour).
  CT works in Hounsfield units, a radiograph in grey levels (lightly smoothed) against the lung fields
  around the point: local contrast, never the whole film's.
  Vessels and the chest wall touching the lesion are cut off by a morphological opening: the smallest
  radius that leaves the point's region within the kind's limits (always at least a quarter of the
  region's own inscribed radius, which takes off vessels thinner than that).
* **airspace** (opacity, consolidation, ground-glass opacity, pneumonia, atelectasis, edema): the same
  half-level region, with the limits of a lobe-sized process rather than a focal one.
* **fluid** (effusion): on CT the connected fluid-density region (-20..60 HU, smoothed) at the point, away
  from the chest wall by the same opening rule; on a film the half-level region at the point, inside the
  lung's territory (the fluid whites out the base the aerated field stops at).
* **air** (pneumothorax): CT only: the connected air (below -950 HU, smoothed) at the point inside the
  body, which the lung's own parenchyma (about -850 HU) is not.

Kinds without an image method (cardiomegaly, fracture, emphysema, fibrosis, ...) and regions that break
the kind's limits come back as ``None`` with the reason: the caller keeps the attention mask and says so.

Limits (:data:`LIMITS_MM`) are on the longest diameter in the axial plane (CT) or the film plane, in
millimetres from the pixel spacing: a nodule is at most 30 mm by definition (the table allows 35: outlines
drawn on the lesion's edge measure a few millimetres more; LIDC-IDRI-0001's four outlines of one nodule
measure 32 to 34 mm), a mass larger; nothing focal is smaller than 3 mm; no region may take more than
:data:`MAX_LUNG_SHARE` of the lungs (or, on a radiograph, of the film's lung fields).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from . import components, distances
from ..allocator import zeros
from .boxes import bounds

FOCAL = ("nodule", "mass", "lesion", "calcification", "cavity", "lymphadenopathy")
AIRSPACE = ("opacity", "consolidation", "ground-glass opacity", "pneumonia", "atelectasis", "edema")
FLUID = ("effusion",)
AIR = ("pneumothorax",)
# kind -> (smallest, largest) longest in-plane diameter in mm
LIMITS_MM = {"nodule": (3.0, 35.0), "mass": (20.0, 200.0), "lesion": (3.0, 200.0), "calcification": (1.0, 35.0),
             "cavity": (5.0, 150.0), "lymphadenopathy": (5.0, 80.0)}
AIRSPACE_MM = (5.0, 250.0)
FLUID_MM = (5.0, 400.0)
SEARCH = 1.5  # the region is looked at within this many of the kind's largest diameter around the point
MAX_LUNG_SHARE = 0.6  # of the lungs (CT) / lung fields (radiograph): "the size of a lung" is never a finding's extent


@dataclass
class Extent:
    """A region grown from a point: ``mask`` on the array given (bool), its longest in-plane diameter, its
    area (mm², radiograph) or volume (mm³, CT), and the point it was grown from (array index)."""

    mask: np.ndarray
    diameter_mm: float
    size_mm: float  # area in mm² (2-D) or volume in mm³ (3-D)
    seed: tuple[int, ...]
    method: str  # focal / airspace / fluid / air
    box: tuple[slice, ...] | None = None  # where known, the box outside which ``mask`` is all False

    def json(self) -> dict:
        key = "volume_mm3" if self.mask.ndim == 3 else "area_mm2"
        return {"diameter_mm": round(self.diameter_mm, 1), key: round(self.size_mm, 1), "method": self.method}


class NoExtent(Exception):
    """The image gives no plausible region for this kind at this point: the reason, for the finding."""


def method_of(kind: str, ndim: int) -> str | None:
    """The image method for ``kind`` on a ``ndim``-D image (None: no image method; attention only)."""
    if kind in FOCAL:
        return "focal"
    if kind in AIRSPACE:
        return "airspace"
    if kind in FLUID:
        return "fluid"
    if ndim == 3 and kind in AIR:
        return "air"
    return None


def limits_mm(kind: str) -> tuple[float, float]:
    if kind in LIMITS_MM:
        return LIMITS_MM[kind]
    return FLUID_MM if kind in FLUID + AIR else AIRSPACE_MM


def search_cost(kind: str, ndim: int) -> float:
    """How much image a finding of ``kind`` makes its extent search look at, for ordering findings' work
    (largest first): its largest diameter (the search box's side), 0 without an image method."""
    return limits_mm(kind)[1] if method_of(kind, ndim) is not None else 0.0


# ------------------------------------------------------------------------------------------ helpers


def _box(shape, centre, reach) -> tuple[slice, ...]:
    return tuple(slice(max(0, c - r), min(n, c + r + 1)) for c, r, n in zip(centre, reach, shape))


def search_box(shape, seed, hi_mm: float, spacing) -> tuple[slice, ...]:
    """The box a region of at most ``hi_mm`` is searched in around ``seed`` (:data:`SEARCH` times that, and two
    voxels): :func:`grow` reads its values there and nowhere else."""
    return _box(shape, seed, [int(np.ceil(SEARCH * hi_mm / float(s))) + 2 for s in spacing])


def _touches_border(mask: np.ndarray, box, shape) -> bool:
    """The region reaches a side of its search box that is not the image's own edge (it may go on)."""
    for axis, (sl, n) in enumerate(zip(box, shape)):
        first = np.take(mask, 0, axis=axis).any()
        last = np.take(mask, -1, axis=axis).any()
        if (first and sl.start > 0) or (last and sl.stop < n):
            return True
    return False


def longest_diameter(mask: np.ndarray, spacing) -> float:
    """Longest in-plane diameter (mm) of ``mask``: on its largest axial plane (3-D: z first) or its plane."""
    plane, sp = (mask, spacing) if mask.ndim == 2 else (mask[int(np.argmax(mask.sum(axis=(1, 2))))], spacing[1:])
    pts = np.argwhere(plane)
    if len(pts) == 0:
        return 0.0
    if len(pts) == 1:
        return float(min(sp))
    edge = plane & ~ndimage.binary_erosion(plane)
    pts = np.argwhere(edge) * np.asarray(sp, float)
    if len(pts) > 400:
        pts = pts[np.linspace(0, len(pts) - 1, 400).astype(int)]
    d = np.sqrt(((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1)).max()
    return float(d + min(sp))  # edge centres to edge centres, plus one pixel


def bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """The bounding box of a non-empty ``mask``."""
    return bounds(mask)


def inside_distance(region: np.ndarray, spacing) -> np.ndarray:
    """``distance_transform_edt(region)`` (mm to the nearest voxel outside it; :func:`distances.inside`),
    computed on the region's bounding box and one voxel more: the same numbers, on a fraction of a large
    search box."""
    out = zeros(region.shape, np.float64)
    if region.any():
        box = bounds(region, [1] * region.ndim)
        out[box] = distances.inside(region[box], spacing)
    return out


def _within(core: np.ndarray, radius_mm: float, spacing) -> np.ndarray:
    """bool: voxels at most ``radius_mm`` from ``core`` (computed around ``core`` only)."""
    out = zeros(core.shape, bool)
    box = bounds(core, [int(np.ceil(radius_mm / s)) + 1 for s in spacing])
    out[box] = distances.inside(~core[box], spacing) <= radius_mm
    return out


def _opened_at(region: np.ndarray, seed, radius_mm: float, spacing, inside: np.ndarray | None = None) -> np.ndarray:
    """``region`` opened with a ball of ``radius_mm`` (distance-transform opening), the part at ``seed``;
    ``inside``: the region's :func:`inside_distance`, when already known (the same for every radius)."""
    inside = inside_distance(region, spacing) if inside is None else inside
    core = components.component_at(inside > radius_mm, seed)
    if not core.any():
        return core
    return components.component_at(_within(core, radius_mm, spacing) & region, seed)


def _separate(region: np.ndarray, seed, spacing, hi_mm: float, box, shape, fits) -> np.ndarray | None:
    """The seed's part of ``region`` after the smallest opening that makes it fit (``fits``); None if none does."""
    inside = inside_distance(region, spacing)
    r_in = float(inside[tuple(seed)]) if region[tuple(seed)] else 0.0
    r_in = max(r_in, float(inside.max()) if region.any() else 0.0) if r_in == 0 else r_in
    start = max(0.25 * r_in, 0.5 * min(spacing))
    radius = start
    while radius <= max(hi_mm / 3, start):
        part = _opened_at(region, seed, radius, spacing, inside) if radius > 0 else region
        if part.any() and not _touches_border(part, box, shape) and fits(part):
            return part
        radius *= 1.5
    return None


# ------------------------------------------------------------------------------------- the one rule


def grow(values: np.ndarray, spacing, seed, kind: str, lung_level: float, min_contrast: float,
         territory_mask=None, background: list | None = None, lungs_size: float = np.inf,
         unit: str = "") -> Extent:
    """The half-level region of ``kind`` at ``seed`` in ``values`` (HU, or a smoothed film), against the lung's
    level ``lung_level``: the connected region at the seed denser than halfway between the seed's level and
    the lung's, inside ``territory_mask`` (an array, or a function that makes it when it is needed), cut off
    from what touches it by the smallest opening that makes it fit the kind's limits; ``background`` points cut off the part nearer to them. Raises :class:`NoExtent`."""
    method = method_of(kind, values.ndim)
    lo, hi = limits_mm(kind)
    spacing = tuple(float(s) for s in spacing)
    box = search_box(values.shape, seed, hi, spacing)
    local = tuple(int(c - b.start) for c, b in zip(seed, box))
    sub = values[box]
    if method == "fluid" and values.ndim == 3:
        region = (sub >= -20) & (sub <= 60)
    elif method == "air":
        region = sub < -950
    else:
        near = tuple(slice(max(0, c - 1), c + 2) for c in local)
        level = float(np.median(sub[near]))
        if level - lung_level < min_contrast:
            raise NoExtent(f"nothing denser than the lung at the point ({level:.0f}{unit} against the lung's "
                           f"{lung_level:.0f}{unit})")
        region = sub >= (level + lung_level) / 2
    if not region[local]:
        raise NoExtent(f"the point is not in a {method} region")
    if territory_mask is not None:  # a callable: made only now (a point outside its kind's values never needs it)
        region &= (territory_mask() if callable(territory_mask) else territory_mask)[box]
        if not region[local]:
            raise NoExtent(f"the point is not in a {method} region")
    region = components.component_at(region, local)
    if method == "focal" and values.ndim == 3:
        region &= _reach(region, local, spacing)
        region = components.component_at(region, local)
    if background:
        region &= _nearer_to_seed(region.shape, local, [tuple(int(p - b.start) for p, b in zip(q, box)) for q in background], spacing)
        region = components.component_at(region, local)

    def fits(part):
        return longest_diameter(part, spacing) <= hi and part.sum() <= MAX_LUNG_SHARE * lungs_size

    part = _separate(region, local, spacing, hi, box, values.shape, fits)
    if part is None:
        raise NoExtent(f"the region at the point is larger than a {kind} ({hi:.0f} mm) and does not separate")
    d = longest_diameter(part, spacing)
    if d < lo:
        raise NoExtent(f"the region at the point measures {d:.1f} mm, under the {lo:.0f} mm of a {kind}")
    mask = zeros(values.shape, bool)
    mask[box] = part
    return Extent(mask, d, float(part.sum() * np.prod(spacing)), tuple(int(s) for s in seed), method, box)


FOCAL_REACH = 2.0  # CT: a focal region reaches at most this many of its inscribed radius from its centre


def _reach(region: np.ndarray, seed, spacing) -> np.ndarray:
    """bool: the ball around the focal region's centre that it may fill. The centre is found by climbing the
    region's inside distance from the seed to its local top (a lesion's centre; a click on its edge climbs
    inward), the radius is :data:`FOCAL_REACH` times the depth there: a nodule against the heart, the
    diaphragm or a vessel reaches as far as its own size says, not along what it touches."""
    depth = inside_distance(region, spacing)
    p = tuple(int(i) for i in seed)
    for _ in range(50):
        r = max(float(depth[p]), max(spacing))
        win = _box(region.shape, p, [int(np.ceil(r / s)) for s in spacing])
        k = np.unravel_index(int(np.argmax(depth[win])), depth[win].shape)
        q = tuple(int(w.start + i) for w, i in zip(win, k))
        if depth[q] <= depth[p]:
            break
        p = q
    grids = np.ogrid[tuple(slice(0, n) for n in region.shape)]
    d2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grids, p, spacing))
    return d2 <= (FOCAL_REACH * max(float(depth[p]), max(spacing))) ** 2


def _nearer_to_seed(shape, seed, others, spacing) -> np.ndarray:
    """bool: voxels at least as near (mm) to ``seed`` as to any of ``others`` (the background clicks)."""
    grids = np.meshgrid(*[np.arange(n, dtype=np.float32) * s for n, s in zip(shape, spacing)], indexing="ij")

    def dist2(p):
        return sum((g - c * s) ** 2 for g, c, s in zip(grids, p, spacing))

    own = dist2(seed)
    keep = np.ones(shape, bool)
    for q in others:
        keep &= own <= dist2(q)
    return keep


# ---------------------------------------------------------------------- attention says where: the seed

SEARCH_LEVEL = 0.3  # the attention's region searched for the finding: its gated map at >= this of its peak


def _search_region(heat: np.ndarray, support: tuple[slice, ...] | None = None) -> np.ndarray:
    """Where attention points: the connected region around the gated map's peak at SEARCH_LEVEL
    (``support``: the box outside which the map is zero, :func:`maps.peak_region`'s)."""
    from .maps import peak_region

    return peak_region(heat, SEARCH_LEVEL, support=support)


def _to_device(t: torch.Tensor, device) -> torch.Tensor:
    """``t`` on ``device``: to a GPU through page-locked memory (a copy from pageable memory is staged by the
    driver, blocking the other threads' launches meanwhile), on the calling thread's stream."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
