"""How far a finding reaches, read from the image around a point: attention (or a click) says where, the
image says how far.

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

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from scipy import ndimage

from . import components, distances, filters, maps
from ..allocator import zeros
from .blocks import block_mean, block_min, blocks_back
from .boxes import Boxed, bounds, boxed, grown
from .morphology import open_in_plane
from .territory import territory

FOCAL = ("nodule", "mass", "lesion", "calcification", "cavity", "lymphadenopathy")
AIRSPACE = ("opacity", "consolidation", "ground-glass opacity", "pneumonia", "atelectasis", "edema")
FLUID = ("effusion",)
AIR = ("pneumothorax",)
# kind -> (smallest, largest) longest in-plane diameter in mm
LIMITS_MM = {"nodule": (3.0, 35.0), "mass": (20.0, 200.0), "lesion": (3.0, 200.0), "calcification": (1.0, 35.0),
             "cavity": (5.0, 150.0), "lymphadenopathy": (5.0, 80.0)}
AIRSPACE_MM = (5.0, 250.0)
FLUID_MM = (5.0, 400.0)
MAX_BOX_VOXELS = 2_000_000  # CT: a larger search box (a mass on a 512-pixel grid) is looked at on coarser planes
SEARCH = 1.5  # the region is looked at within this many of the kind's largest diameter around the point
MAX_LUNG_SHARE = 0.6  # of the lungs (CT) / lung fields (radiograph): "the size of a lung" is never a finding's extent
LUNG_HU = -850.0  # aerated lung when the image gives no lung around the point
MIN_CONTRAST_HU = 150.0  # a focal or airspace region must stand this far above the lung around it
MIN_CONTRAST_NOISE = 4.0  # radiographs: the point's contrast over the film's noise


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


def only_box(shape, dtype) -> np.ndarray:
    """An image-sized array whose box alone the caller writes and reads: left uncleared (a CT's float32 volume
    is 140 MB, cleared again for every grown region; tests fill it with values that would change a region
    read outside its box)."""
    return np.empty(shape, dtype)


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


def film_territory(right: np.ndarray | None, left: np.ndarray | None) -> np.ndarray | None:
    """A film's lung territory: per side, the hull of that side's field together with the other side's field
    mirrored across the midline between them. A lesion that whites out the base or the edge of a lung (the
    field found by its darkness stops at it) lies inside; the chest wall and what lies below the lungs stay
    out. One field alone is its own hull; none: None (no territory, never guessed)."""
    fields = [f for f in (right, left) if f is not None and f.any()]
    if not fields:
        return None
    if len(fields) == 1:
        return territory(fields[0])
    cols = [np.nonzero(f.any(axis=0))[0] for f in (right, left)]
    mid = (cols[0].max() + cols[1].min()) / 2  # between the right field's medial edge and the left's
    out = np.zeros(right.shape, bool)
    for own, other in ((right, left), (left, right)):
        mirrored = np.zeros_like(other)
        src = np.nonzero(other.any(axis=0))[0]
        dst = np.rint(2 * mid - src).astype(int)
        ok = (dst >= 0) & (dst < other.shape[1])
        mirrored[:, dst[ok]] = other[:, src[ok]]
        out |= territory(own | mirrored)
    return out


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


# ---------------------------------------------------------------------------------------------- CT


def grow_ct(hu: np.ndarray, spacing, seed, kind: str, lungs: np.ndarray | None = None,
            background: list | None = None, cache: dict | None = None, _grid: tuple | None = None,
            device=None, layers: "CTLayers | None" = None) -> Extent:
    """The region of ``kind`` at voxel ``seed`` of the HU array ``hu`` (z, y, x; ``spacing`` mm in that order).
    ``lungs``: the aerated lungs (bool, same grid; default: found by HU around the point) for the territory,
    the lung's level and the share limit; ``background``: voxels the region must not reach. Raises :class:`NoExtent`.
    ``cache``: a dict kept for one volume's findings (:func:`find_in_ct`): the coarse planes of a large kind's
    box, and what is found on them, are made once for the findings and candidates that ask for the same
    box (on the real CT's reading, a mass and an opacity grow from one voxel; every large kind's box is the
    whole volume). ``_grid``: the coarse planes this ``hu`` is (set by the call that made them). ``device``:
    where the HU are smoothed (:func:`smoothed_hu`). ``layers``: the volume's smoothed HU and aerated lung
    made once (:func:`ct_layers`), read on the box instead of being made for it (without ``lungs``, on the
    volume's own grid)."""
    if method_of(kind, 3) is None:
        raise NoExtent(f"no image method for {kind!r} on CT")
    spacing = tuple(float(s) for s in spacing)
    hi = limits_mm(kind)[1]
    box = search_box(hu.shape, seed, hi, spacing)
    size = int(np.prod([b.stop - b.start for b in box]))
    if size > MAX_BOX_VOXELS and lungs is None and not background:  # a large kind on a fine grid: coarser planes
        step = int(np.ceil(np.sqrt(size / MAX_BOX_VOXELS)))
        grid = ("blocks", _key(box), step)
        small = _shared(cache, grid, lambda: block_mean(np.asarray(hu[box], np.float32), step))
        local = (seed[0] - box[0].start, min((seed[1] - box[1].start) // step, small.shape[1] - 1),
                 min((seed[2] - box[2].start) // step, small.shape[2] - 1))
        found = grow_ct(small, (spacing[0], spacing[1] * step, spacing[2] * step), local, kind, cache=cache,
                        _grid=grid, device=device)
        mask = zeros(hu.shape, bool)
        blocks_back(found.mask, step, fill=False, out=mask[box])
        return Extent(mask, found.diameter_mm, found.size_mm, tuple(int(s) for s in seed), found.method, box)
    shared = cache if _grid is not None and lungs is None else None  # only coarse planes are kept (small arrays)

    def lung():  # on the box only: grow() reads the same box (search_box), the territory is made from it
        if layers is not None and lungs is None and _grid is None:  # the volume's own, made once for its findings
            levels = layers.smooth[box][layers.aerated[box]]
            return layers.smooth, layers.aerated, float(np.median(levels)) if levels.size > 20 else LUNG_HU
        smooth = only_box(hu.shape, np.float32)
        smooth[box] = smoothed_hu(hu[box], spacing, device)
        aerated = only_box(hu.shape, bool)
        aerated[box] = aerated_lung(smooth[box]) if lungs is None else lungs[box] & (smooth[box] < -600)
        levels = smooth[box][aerated[box]]
        return smooth, aerated, float(np.median(levels)) if levels.size > 20 else LUNG_HU

    smooth, aerated, lung_level = _shared(shared, (_grid, "lung", _key(box)), lung)
    terr = None
    if method_of(kind, 3) != "air":  # made when grow() gets that far (a point inside its kind's values)

        def make_territory():
            out = only_box(hu.shape, bool)
            out[box] = territory(aerated[box])
            return out

        terr = partial(_shared, shared, (_grid, "territory", _key(box)), make_territory)
    # the share limit: of the lungs given, else of the aerated lung in the box when the box is the kind's
    # (airspace, fluid: a whole chest); a focal region is held by its diameter
    lungs_size = float(lungs.sum()) if lungs is not None else (np.inf if kind in FOCAL else float(aerated[box].sum()))
    return grow(smooth, spacing, seed, kind, lung_level, MIN_CONTRAST_HU, terr, background, lungs_size, " HU")


def _key(box: tuple[slice, ...]) -> tuple[tuple[int, int], ...]:
    return tuple((s.start, s.stop) for s in box)


def _shared(cache: dict | None, key, make):
    """``make()``, or what ``cache`` holds for ``key``: made once, also when findings ask side by side."""
    if cache is None:
        return make()
    with cache.setdefault(("lock", key), threading.Lock()):
        if key not in cache:
            cache[key] = make()
        return cache[key]


NEGLIGIBLE_SIGMA = 0.15  # voxels: a Gaussian this narrow moves a value by under 1e-9 of its neighbours' difference


def smoothed_hu(hu: np.ndarray, spacing, device=None) -> np.ndarray:
    """float32 ``hu`` smoothed with a Gaussian of 0.6 of the finest spacing (mm) along every axis; an axis
    whose sigma is under :data:`NEGLIGIBLE_SIGMA` voxels (z on a thin-section grid's thick slices: 0.14) is
    left alone rather than filtered with weights of 1e-11. With scipy, or on ``device`` when it is a GPU
    (:func:`filters.gaussian_filter_direct`: the same values bit for bit, and the host's cores and the
    interpreter free meanwhile: scipy's filter holds both)."""
    sigma = _sigmas(spacing)
    if device is None or torch.device(device).type != "cuda":
        return ndimage.gaussian_filter(np.asarray(hu, np.float32), sigma)
    a = np.ascontiguousarray(hu, dtype=np.float32)
    t = _to_device(torch.from_numpy(a if a.flags.writeable else a.copy()), device)
    return filters.gaussian_filter_direct(t, sigma).cpu().numpy()


def _sigmas(spacing) -> list[float]:
    """:func:`smoothed_hu`'s Gaussian per axis, in voxels (0: the axis left alone)."""
    sigma = [0.6 * min(spacing) / s for s in spacing]
    return [x if x >= NEGLIGIBLE_SIGMA else 0.0 for x in sigma]


def aerated_lung(hu: np.ndarray) -> np.ndarray:
    """Aerated lung by HU (-990..-400; the air outside the body and in the airways' lumen is darker than
    lung only in part, so thin bridges are opened in-plane)."""
    return open_in_plane((hu < -400) & (hu > -990), square=True)


@dataclass
class CTLayers:
    """What a CT's image-extent searches read besides its HU, made once for the whole volume
    (:func:`ct_layers`), before its findings are known: the smoothed HU (:func:`smoothed_hu`) and the aerated
    lung in them (:func:`aerated_lung`). Made per search box, they differ only next to the box's sides (the
    smoothing reflects there, the opening stops there). The lungs' territory is still made per box, from the
    box's aerated lung: made for the whole volume, a plane's hulls take in whole lung pieces, and on the H200
    (run CC) the regions then grew larger and took longer to separate, against the same grounding table."""

    smooth: np.ndarray  # float32
    aerated: np.ndarray  # bool


SMOOTH_SLAB = 32  # planes smoothed at a time on a GPU (its float64 passes: 70 MB a 512 x 512 slab, not 2 GB)


def ct_layers(hu: np.ndarray, spacing, device=None) -> CTLayers:
    """The :class:`CTLayers` of the HU volume ``hu`` (z, y, x; ``spacing`` mm in that order). On a GPU
    ``device`` the smoothing runs there in slabs of planes (the same values bit for bit), on a stream of its
    own (:func:`maps.side_stream`, the calling thread's) so that it does not wait for the model's queued work;
    the aerated lung is made on the host."""
    spacing = tuple(float(s) for s in spacing)
    if device is None or torch.device(device).type != "cuda":
        smooth = smoothed_hu(hu, spacing)
    else:
        with maps.side_stream():
            smooth = smoothed_in_slabs(hu, spacing, device)
    return CTLayers(smooth, aerated_lung(smooth))


def smoothed_in_slabs(hu: np.ndarray, spacing, device=None, slab: int = SMOOTH_SLAB) -> np.ndarray:
    """:func:`smoothed_hu` of ``hu`` made ``slab`` planes at a time, each with the planes its z kernel reaches
    (scipy's radius, truncate 4) around it: the same values bit for bit (z is smoothed first, then each
    plane on its own, as a whole volume's are)."""
    out = np.empty(hu.shape, np.float32)
    reach = int(4.0 * _sigmas(spacing)[0] + 0.5)
    for z0 in range(0, hu.shape[0], slab):
        z1 = min(hu.shape[0], z0 + slab)
        lo, hi = max(0, z0 - reach), min(hu.shape[0], z1 + reach)
        out[z0:z1] = smoothed_hu(hu[lo:hi], spacing, device)[z0 - lo : z1 - lo]
    return out


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


# --------------------------------------------------------------------------------------- radiographs


def noise_level(pixels: np.ndarray) -> float:
    """Pixel noise of a film: the median absolute deviation of its finest detail, as a standard deviation."""
    a = np.asarray(pixels, np.float32)
    fine = a - ndimage.uniform_filter(a, 3)
    return max(1.4826 * float(np.median(np.abs(fine - np.median(fine)))), 1e-3)


def grow_radiograph(pixels: np.ndarray, spacing, seed, kind: str, fields=None,
                    background: list | None = None, search_mm: float = 0.0, cap_mm: float | None = None,
                    cache: dict | None = None) -> Extent:
    """The region of ``kind`` at pixel ``seed`` (row, col) of a film (bright = dense; ``spacing`` mm per row
    and column). ``fields``: the lung fields (:class:`anatomy.LungFields`) for the territory, the lung's level and the share
    limit; ``search_mm``: the point may move this far to the densest spot near it (a click on a lesion's
    edge, an attention peak beside it); ``cap_mm``: the region reaches no farther from the seed. Raises
    :class:`NoExtent`. ``cache``: the film's :func:`film_cache` (made once for all of its findings; made
    here when not given)."""
    if method_of(kind, 2) is None:
        raise NoExtent(f"no image method for {kind!r} on a radiograph")
    cache = film_cache(pixels, fields) if cache is None else cache
    step = cache["step"]
    found = _grow_film(_work_spacing(spacing, step), _to_work(seed, cache), kind, cache["fields"],
                       [_to_work(b, cache) for b in background] if background else background, search_mm, cap_mm, cache)
    return _to_film(found, cache)


def _work_spacing(spacing, step: int) -> tuple[float, ...]:
    return tuple(float(s) * step for s in spacing)


def _to_work(point, cache: dict) -> tuple[int, ...]:
    """A film pixel's index on the film's working copy (:func:`film_cache`)."""
    return tuple(min(int(c) // cache["step"], n - 1) for c, n in zip(point, cache["smooth"].shape))


def _to_film(found: Extent, cache: dict) -> Extent:
    """An extent found on the working copy, on the film's own pixels (each block's answer to its pixels, the
    remainder that made no block left out; the seed at its block's centre)."""
    step, shape = cache["step"], cache["shape"]
    if step == 1:
        return found
    seed = tuple(min(c * step + step // 2, n - 1) for c, n in zip(found.seed, shape))
    return Extent(blocks_back(found.mask, step, shape, False), found.diameter_mm, found.size_mm, seed, found.method)


def _grow_film(spacing, seed, kind: str, fields, background, search_mm: float, cap_mm: float | None,
               cache: dict) -> Extent:
    """:func:`grow_radiograph` on the film's working copy (``cache``; everything in its pixels)."""
    film = cache["smooth"]
    if search_mm > 0:
        win = _box(film.shape, seed, [max(1, int(round(search_mm / s))) for s in spacing])
        k = np.unravel_index(int(np.argmax(film[win])), film[win].shape)
        seed = tuple(int(w.start + i) for w, i in zip(win, k))
    hi = limits_mm(kind)[1]
    box = _box(film.shape, seed, [int(np.ceil(SEARCH * hi / s)) + 2 for s in spacing])
    terr, lungs_size = None, np.inf
    if fields is not None and (terr := cache["territory"]) is not None:
        aerated = (fields.right if fields.right is not None else False) | (fields.left if fields.left is not None else False)
        lungs_size = float(aerated.sum())
        dark = film[box][aerated[box]]
    else:
        dark = film[box][film[box] <= np.percentile(film[box], 30)]
    if dark.size == 0:
        dark = film[box][film[box] <= np.percentile(film[box], 30)]
    lung_level = float(np.median(dark)) if dark.size else float(film.min())
    if cap_mm is not None:
        rows, cols = np.ogrid[: film.shape[0], : film.shape[1]]
        disc = ((rows - seed[0]) * spacing[0]) ** 2 + ((cols - seed[1]) * spacing[1]) ** 2 <= cap_mm**2
        terr = disc if terr is None else terr & disc
    return grow(film, spacing, seed, kind, lung_level, MIN_CONTRAST_NOISE * cache["noise"], terr, background,
                lungs_size)


# ---------------------------------------------------------------------- attention says where: the seed

SEARCH_LEVEL = 0.3  # the attention's region searched for the finding: its gated map at >= this of its peak


def _search_region(heat: np.ndarray, support: tuple[slice, ...] | None = None) -> np.ndarray:
    """Where attention points: the connected region around the gated map's peak at SEARCH_LEVEL
    (``support``: the box outside which the map is zero, :func:`maps.peak_region`'s)."""
    from .maps import peak_region

    return peak_region(heat, SEARCH_LEVEL, support=support)


BLOB_SCALES_MM = (2.0, 4.0, 8.0, 16.0, 32.0, 64.0)  # radii of the blobs looked for (radius = 1.4 sigma)
BLOB_REACH = 2.0  # a film's region reaches at most this many of its blob's radius from the seed


FFT_FROM_TAPS = 32  # a blob filter whose kernel reaches this many pixels runs through the FFT on the CPU too


def blobs(pixels: np.ndarray, spacing, kind: str, device=None,
          responses: dict | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(strength, radius_mm, centres) per pixel: how much each pixel is the centre of a bright blob (the
    scale-normalised negative Laplacian of Gaussian, the largest over the radii up to half the kind's
    size), the radius it is strongest at, and where the strength peaks (its local maxima above 0). A
    lesion is a blob; a rib's or the heart's edge is an edge. Called on a film's working copy
    (:func:`film_cache`: a big film's block average, so a 2k film costs what a 1k film does). ``device``: a
    CUDA device filters there (:mod:`filters`, equal to scipy's to float rounding); otherwise scipy on the CPU.
    ``responses``: the film's filter response per radius, filled and reused (a film's findings of different
    kinds share their common radii: a nodule's four are among an opacity's six)."""
    s, r = _blobs(np.asarray(pixels, np.float32), spacing, kind, device, {} if responses is None else responses)
    return s, r, _peaks(s)


def _peaks(strength: np.ndarray) -> np.ndarray:
    """bool: the local maxima (3 x 3) of ``strength`` above 0."""
    return (strength == ndimage.maximum_filter(strength, size=3)) & (strength > 0)


def _scales(radii, spacing, shape) -> list[tuple[float, list[float]]]:
    """(radius in mm, its Gaussian's sigma per axis in pixels) for each of ``radii`` in turn, up to the first
    whose filter no longer fits an image of ``shape``."""
    out = []
    for r in radii:
        sigma = [r / 1.4 / s for s in spacing]
        if max(sigma) * 4 > max(shape):
            break
        out.append((r, sigma))
    return out


def _response(laplace, sigma):
    """A blob filter's response from the Laplacian of Gaussian at ``sigma`` (a numpy array or a tensor): its
    negative, scale-normalised."""
    return -laplace * float(np.mean(sigma) ** 2)


def _blobs(a: np.ndarray, spacing, kind: str, device, responses: dict) -> tuple[np.ndarray, np.ndarray]:
    top = limits_mm(kind)[1] / 2
    strength = np.full(a.shape, -np.inf, np.float32)
    radius = np.zeros(a.shape, np.float32)
    on_gpu = device is not None and torch.device(device).type == "cuda"
    t = None
    for r, sigma in _scales([r for r in BLOB_SCALES_MM if r <= top] or [BLOB_SCALES_MM[0]], spacing, a.shape):
        if r not in responses:
            # the GPU, and long kernels on the CPU, through the FFT (filters); short kernels with scipy
            fft = on_gpu or int(filters.TRUNCATE * max(sigma) + 0.5) >= FFT_FROM_TAPS
            if fft and t is None:
                t = torch.as_tensor(a, dtype=torch.float64, device=device if on_gpu else "cpu")
            laplace = filters.gaussian_laplace(t, sigma).float().cpu().numpy() if fft else ndimage.gaussian_laplace(a, sigma)
            responses[r] = _response(laplace, sigma)
        response = responses[r]
        better = response > strength
        np.copyto(strength, response, where=better)  # in place, no gathered copies
        np.copyto(radius, np.float32(r), where=better)
    return strength, radius


FILM_WORK_SIDE = 1024  # a larger film's extent is found on its block average (2048 x 2458: 3 x 3 blocks)


def film_step(shape) -> int:
    """The block side of a film's working copy (1: the film itself)."""
    return int(np.ceil(max(shape) / FILM_WORK_SIDE))


@dataclass
class BlobResponses:
    """A film's blob filter responses (:func:`blobs`) at ``radii`` (mm), one float32 image each in ``stack``
    (radius, rows, columns) on the film's working copy: made ahead for many films at once
    (:func:`film_blob_responses`) and handed to the film's :func:`film_cache`."""

    radii: tuple[float, ...]
    stack: torch.Tensor

    def as_dict(self) -> dict[float, np.ndarray]:
        return {r: self.stack[k].numpy() for k, r in enumerate(self.radii)}


def _work_on(pixels: np.ndarray, step: int, device) -> torch.Tensor:
    """A film's working copy on ``device``, float32, the same values as :func:`block_mean`'s: whole numbers
    (a film's 8-bit pixels) summed exactly in integers there and divided once, other values averaged here."""
    a = np.asarray(pixels)
    a = a if a.flags.writeable else a.copy()  # (torch takes no read-only array, e.g. a PIL image's)
    if a.dtype == bool or (a.dtype.kind in "iu" and a.itemsize <= 2) or step == 1:
        t = _to_device(torch.from_numpy(np.ascontiguousarray(a)), device)
        if step == 1:
            return t.float()
        t = t[: a.shape[0] // step * step, : a.shape[1] // step * step]
        rows, cols = t.shape[0] // step, t.shape[1] // step
        total = t.to(torch.int32).reshape(rows, step, cols, step).sum((1, 3), dtype=torch.int32)
        return total.float() / float(step * step)
    return _to_device(torch.from_numpy(block_mean(a, step)), device)


def _to_device(t: torch.Tensor, device) -> torch.Tensor:
    """``t`` on ``device``: to a GPU through page-locked memory (a copy from pageable memory is staged by the
    driver, blocking the other threads' launches meanwhile), on the calling thread's stream."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def film_blob_responses(films: list[np.ndarray], spacings: list, device, host=torch.empty,
                        group: int = 8) -> list[BlobResponses]:
    """Each film's blob filter responses at every radius :func:`blobs` may ask of it (all of
    :data:`BLOB_SCALES_MM` whose kernel fits the working copy), filtered for ``group`` films of one shape
    and spacing at a time on ``device`` (:func:`filters.gaussian_laplace` on a stack, float64): what
    ``read_many`` makes on its GPU for a batch's films before their maps are made in worker processes,
    where the filter is most of a film's map work. The values are the device path's of :func:`blobs`
    (equal to scipy's to float rounding). ``spacings``: each film's (row, column) mm per pixel;
    ``host(shape, dtype=...)``: where each film's stack is put (e.g. shared memory)."""
    out: list[BlobResponses | None] = [None] * len(films)
    alike: dict[tuple, list[int]] = {}  # films of one shape and spacing: filtered together
    for i, (pixels, spacing) in enumerate(zip(films, spacings)):
        alike.setdefault((np.shape(pixels), tuple(float(s) for s in spacing)), []).append(i)
    for (shape, spacing), members in alike.items():
        step = film_step(shape)
        work_spacing = _work_spacing(spacing, step)
        for start in range(0, len(members), group):
            some = members[start : start + group]
            work = torch.stack([_work_on(films[i], step, device) for i in some]).double()
            scales = _scales(BLOB_SCALES_MM, work_spacing, work.shape[1:])  # the radii _blobs may ask for
            radii = [r for r, _ in scales]
            responses = [_response(filters.gaussian_laplace(work, sigma).float(), sigma) for _, sigma in scales]
            stack = torch.stack(responses, 1) if responses else work.new_zeros((len(some), 0, *work.shape[1:]),
                                                                                dtype=torch.float32)
            if stack.device.type == "cuda":  # off the GPU through page-locked memory, then copied here
                staged = torch.empty(stack.shape, dtype=stack.dtype, pin_memory=True)
                staged.copy_(stack, non_blocking=True)
                torch.cuda.current_stream(stack.device).synchronize()
                stack = staged
            for k, i in enumerate(some):
                kept = host(tuple(stack.shape[1:]), dtype=torch.float32)
                kept.copy_(stack[k])
                out[i] = BlobResponses(tuple(radii), kept)
    return out


def film_cache(pixels: np.ndarray, fields=None, device=None, responses: dict | None = None) -> dict:
    """What the film's findings share, made once before they are looked at side by side: the film's working
    copy (a film over :data:`FILM_WORK_SIDE` pixels averaged over ``step`` x ``step`` blocks, its lung fields
    likewise: a 2048 x 2458 film of 0.17 mm pixels becomes 819 x 682 of 0.52 mm, a 3 mm nodule still six
    pixels across, at a ninth of the work), its lung territory, smoothed copy and noise (the cache :func:`find_on_radiograph` and
    :func:`grow_radiograph` take); ``device``: where its blobs are filtered (:func:`blobs`); ``responses``:
    its blob filter responses per radius where they were made ahead (:func:`film_blob_responses`)."""
    from .anatomy import LungFields

    step = film_step(pixels.shape)
    work = np.asarray(pixels, np.float32) if step == 1 else block_mean(pixels, step)
    if fields is not None and step > 1:
        fields = LungFields(*(None if m is None else block_mean(m, step) >= 0.5
                              for m in (fields.right, fields.left)))
    return {"step": step, "shape": tuple(pixels.shape), "pixels": work, "fields": fields,
            "territory": film_territory(fields.right, fields.left) if fields is not None else None,
            "smooth": filters.smoothed(work, 1.0, device), "noise": noise_level(work), "device": device,
            "responses": dict(responses or {}), "lock": threading.Lock()}


def find_on_radiograph(pixels: np.ndarray, spacing, heat: np.ndarray, kind: str, fields=None,
                       cache: dict | None = None) -> Extent:
    """A finding's extent on a film from its gated attention map ``heat``. Attention says where: of the
    bright blobs (:func:`blobs`, local maxima at least half as strong as the strongest) in the region
    attention points at, inside the lungs' territory, the one nearest the attention's peak is the seed.
    The image says how far: the kind's rule from that seed (:func:`grow_radiograph`), no farther than
    :data:`BLOB_REACH` times the blob's radius (a lesion against the heart does not take the heart).
    ``cache``: the film's :func:`film_cache`, kept across its findings (its territory and blobs are the
    film's, not the finding's; made here when not given). Raises :class:`NoExtent` with the reason."""
    if method_of(kind, 2) is None:
        raise NoExtent(f"no image method for {kind!r} on a radiograph")
    cache = film_cache(pixels, fields) if cache is None else cache
    step = cache["step"]
    heat = heat if step == 1 else block_mean(np.asarray(heat, np.float32), step)
    spacing = _work_spacing(spacing, step)
    search = _search_region(heat)
    terr = cache["territory"]
    if terr is not None:
        search &= terr
    if not search.any():
        raise NoExtent("attention points outside the lungs")
    scales = ("blobs", tuple(r for r in BLOB_SCALES_MM if r <= limits_mm(kind)[1] / 2))
    with cache["lock"]:  # the film's blobs at these radii and where they peak, once (findings run side by side)
        if scales not in cache:
            cache[scales] = blobs(cache["pixels"], spacing, kind, cache.get("device"), cache["responses"])
    strength, radius, tops = cache[scales]
    peaks = search & tops
    if peaks.any():
        peaks &= strength >= 0.5 * strength[peaks].max()
    if not peaks.any():
        raise NoExtent("no bright blob where attention points")
    at = np.array(np.unravel_index(int(np.argmax(np.where(search, heat, -np.inf))), heat.shape), float)
    candidates = np.argwhere(peaks)
    seed = tuple(int(i) for i in candidates[int(np.argmin((((candidates - at) * spacing) ** 2).sum(axis=1)))])
    cap = None if method_of(kind, 2) == "fluid" else BLOB_REACH * float(radius[seed])
    return _to_film(_grow_film(spacing, seed, kind, cache["fields"], None, 0.0, cap, cache), cache)


CANDIDATES = 3  # CT: dense regions tried where attention points, most attended first
# candidates tried ahead in a thread of their own while the one before is tried (0: one after another): the
# answer is the same (the first candidate in order that is a kind), only the wait for a failed one's successor
# shorter; worth it where cores are free beside the maps (a GPU host), an A/B of bench/prefill_ab.py (candidates-1)
CANDIDATES_AHEAD = 0
_CANDIDATES_POOL: ThreadPoolExecutor | None = None
_CANDIDATES_LOCK = threading.Lock()
DEEPEST_FINE_VOXELS = 1_000_000  # a larger region's deepest voxel is looked for on 2 x 2 in-plane blocks first


def near_box(near: np.ndarray | Boxed, spacing, kind: str) -> tuple[slice, ...]:
    """The box around ``near`` (the attention's own region, non-empty; as a :class:`Boxed`, from its box) grown by
    the kind's largest diameter per axis. A region that stands for the finding must reach into ``near`` or have
    its centre there (the reader's rule), and a region grown from a seed reaches no farther than its own
    diameter: a seed farther out than that cannot give one. This keeps a diffuse attention's search (half a
    chest) to where it points most."""
    hi = limits_mm(kind)[1]
    near = boxed(near)
    return grown(near.box, [int(np.ceil(hi / s)) + 1 for s in spacing], near.mask.shape)


def deepest(part: np.ndarray, spacing) -> tuple[int, ...]:
    """The voxel of ``part`` farthest inside it (the maximum of its inside distance). A part whose bounding
    box holds more than :data:`DEEPEST_FINE_VOXELS` is measured on 2 x 2 in-plane blocks wholly inside it (a
    quarter of the work; the voxel found is within a voxel of the finest answer)."""
    box = bounds(part, [1] * part.ndim)
    sub = part[box]
    step = 2 if sub.size > DEEPEST_FINE_VOXELS and min(sub.shape[1:]) >= 8 else 1
    if step == 2:
        coarse = block_min(sub, 2)  # a block is inside when all four of its voxels are
        if coarse.any():
            sub, spacing = coarse, (spacing[0], 2 * spacing[1], 2 * spacing[2])
        else:
            step = 1
    k = np.unravel_index(int(np.argmax(inside_distance(sub, spacing))), sub.shape)
    k = (k[0], k[1] * step, k[2] * step)
    return tuple(int(i + b.start) for i, b in zip(k, box))


def _candidates_pool() -> ThreadPoolExecutor:
    global _CANDIDATES_POOL
    with _CANDIDATES_LOCK:
        if _CANDIDATES_POOL is None:
            _CANDIDATES_POOL = ThreadPoolExecutor(4, thread_name_prefix="candidates")
        return _CANDIDATES_POOL


def _on_side_stream(fn, *args):
    with maps.side_stream():  # a GPU's smoothing of coarse planes not queued behind the model's steps
        return fn(*args)


def find_in_ct(hu: np.ndarray, spacing, heat: np.ndarray, kind: str, near: np.ndarray | Boxed | None = None,
               cache: dict | None = None, support: tuple[slice, ...] | None = None, device=None,
               search: np.ndarray | Boxed | None = None, layers: "CTLayers | None" = None) -> Extent:
    """A finding's extent in a CT from its gated attention map ``heat`` (display grid): of the dense regions
    (above -500 HU, smoothed) in the region attention points at, the most attended one that the kind's rule
    (:func:`grow_ct`, from its deepest voxel) accepts as a ``kind`` (a mass beside a nodule is not the
    nodule). ``near``: the attention's own region (the mask it would give); the search then keeps to within
    the kind's largest diameter of it (:func:`near_box`). Raises :class:`NoExtent` with the first
    candidate's reason. ``cache``: one dict for all of a volume's findings (:func:`grow_ct`'s); ``support``:
    the box outside which ``heat`` is zero (its gate's), searched alone; ``device``: where the HU are smoothed
    (:func:`smoothed_hu`: the same values anywhere); ``search``: the region attention points at, when already
    found (:func:`maps.peak_regions` at :data:`SEARCH_LEVEL`); ``layers``: the volume's smoothed HU and aerated
    lung made once for its findings (:func:`ct_layers`), read on the box (else made for the box). ``near`` and
    ``search`` may come as :class:`Boxed` masks: their boxes are then read instead of found."""
    if method_of(kind, 3) is None:
        raise NoExtent(f"no image method for {kind!r} on CT")
    found = boxed(_search_region(heat, support) if search is None else search)
    box, search = found.box, found.mask
    if box is None:
        raise NoExtent("attention gives no region")
    near = None if near is None else boxed(near)
    if near is not None and near.any():
        box = tuple(slice(max(a.start, b.start), min(a.stop, b.stop)) for a, b in zip(box, near_box(near, spacing, kind)))
    # findings whose attention spans the same box (a mass and an opacity in one lung) smooth it once
    sub = layers.smooth[box] if layers is not None else _shared(cache, ("smoothed", _key(box)),
                                                                lambda: smoothed_hu(hu[box], spacing, device))
    if method_of(kind, 3) == "air":
        dense = sub < -950
    elif method_of(kind, 3) == "fluid":
        dense = (sub >= -20) & (sub <= 60)
    else:
        dense = sub >= -500
    dense &= search[box]
    if method_of(kind, 3) in ("focal", "airspace"):
        dense &= _shared(cache, ("territory", _key(box)),
                         lambda: territory(layers.aerated[box] if layers is not None else aerated_lung(sub)))
    labelled = components.label_later(dense)  # in a helper process, if any, while the attention is read here
    values = heat[box][dense]  # the attention on the labelled voxels (every voxel of dense has a label)
    labels, n = labelled()
    if n == 0:
        raise NoExtent("no region of its density where attention points")
    # each region's summed attention (sum_labels, through bincount: 10x faster)
    weight = np.bincount(labels[dense], weights=values, minlength=n + 1)[1:]
    order = [int(lab) + 1 for lab in np.argsort(weight)[::-1][:CANDIDATES]]  # the most attended first

    def tried(k: int) -> Extent | NoExtent:  # candidate k's region, or why it is not a `kind`
        # (deepest() looks at the region's own box: no find_objects over thousands of regions for the few tried)
        at = deepest(labels == order[k], spacing)
        seed = tuple(int(i + b.start) for i, b in zip(at, box))
        try:
            return grow_ct(hu, spacing, seed, kind, cache=cache, device=device, layers=layers)
        except NoExtent as e:  # its reason only: a traceback would hold the frames on its way and their arrays
            return e.with_traceback(None)

    ahead: dict[int, Future] = {}
    failed = got = None
    try:
        for k in range(len(order)):  # the first that is a `kind`
            for j in range(k + 1, min(k + 1 + CANDIDATES_AHEAD, len(order))):
                if j not in ahead:
                    ahead[j] = _candidates_pool().submit(_on_side_stream, tried, j)
            got = ahead.pop(k).result() if k in ahead else tried(k)
            if isinstance(got, Extent):
                return got
            failed = failed or got
        raise failed
    finally:
        # a failed candidate's traceback holds this frame: kept in a local once the search ends (found or not),
        # it would be a cycle that only the cyclic collector frees, late (arrays do not count towards its
        # runs), with the arrays of every frame on its way (a 134-slice CT: about 200 MB a reading, and the
        # heap grown for the next reading's volumes)
        failed = got = None
