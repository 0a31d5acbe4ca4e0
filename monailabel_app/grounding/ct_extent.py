"""A CT finding's extent (:mod:`extent`'s rule on Hounsfield units): the region grown from a voxel
(:func:`grow_ct`, a large kind on coarser planes), the volume's smoothed HU and aerated lung made once for its
findings (:func:`ct_layers`), and the search among the dense regions attention points at, most attended first
(:func:`find_in_ct`)."""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from scipy import ndimage

from . import components, distances, filters, helper_processes, maps
from ..allocator import zeros
from .blocks import block_mean, block_min, blocks_back
from .boxes import Boxed, bounds, boxed, grown
from .extent import (FOCAL, Extent, NoExtent, _search_region, _to_device, grow, inside_distance, limits_mm,
                     method_of, search_box)
from .morphology import open_in_plane
from .territory import territory


MAX_BOX_VOXELS = 2_000_000  # CT: a larger search box (a mass on a 512-pixel grid) is looked at on coarser planes
LUNG_HU = -850.0  # aerated lung when the image gives no lung around the point
MIN_CONTRAST_HU = 150.0  # a focal or airspace region must stand this far above the lung around it


def only_box(shape, dtype) -> np.ndarray:
    """An image-sized array whose box alone the caller writes and reads: left uncleared (a CT's float32 volume
    is 140 MB, cleared again for every grown region; tests fill it with values that would change a region
    read outside its box)."""
    return np.empty(shape, dtype)


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
        small, step, grid = _coarse_planes(hu, box, cache)
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
            out[box] = territory(aerated[box], device=device)
            return out

        terr = partial(_shared, shared, (_grid, "territory", _key(box)), make_territory)
    # the share limit: of the lungs given, else of the aerated lung in the box when the box is the kind's
    # (airspace, fluid: a whole chest); a focal region is held by its diameter
    lungs_size = float(lungs.sum()) if lungs is not None else (np.inf if kind in FOCAL else float(aerated[box].sum()))
    return grow(smooth, spacing, seed, kind, lung_level, MIN_CONTRAST_HU, terr, background, lungs_size, " HU")


def _coarse_planes(hu: np.ndarray, box: tuple[slice, ...], cache: dict | None):
    """(``hu``'s box as coarse planes: in-plane block means, their step, their key in ``cache``), made once per box
    in ``cache``: the planes a large kind's box (over :data:`MAX_BOX_VOXELS`) is grown on."""
    step = int(np.ceil(np.sqrt(int(np.prod([b.stop - b.start for b in box])) / MAX_BOX_VOXELS)))
    grid = ("blocks", _key(box), step)
    return _shared(cache, grid, lambda: block_mean(np.asarray(hu[box], np.float32), step)), step, grid


def whole_volume_planes(hu: np.ndarray, cache: dict) -> None:
    """The coarse planes of the whole volume, made into ``cache`` (:func:`find_in_ct`'s for the volume's findings)
    now: every large kind's search box on a clinical CT is the whole volume (a mass's, an effusion's), so its
    first candidate's growth (:func:`grow_ct`) finds them made instead of reading the volume (40-57 ms for 134-200
    planes of 512 x 512 on this project's 2-core CPU). Nothing for a volume small enough to be grown on as it is."""
    if hu.size > MAX_BOX_VOXELS:
        _coarse_planes(hu, tuple(slice(0, n) for n in hu.shape), cache)


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


CANDIDATES = 3  # CT: dense regions tried where attention points, most attended first
# candidates tried ahead in a thread of their own while the one before is tried (0: one after another), where
# helper processes run (a GPU host's cores beside the maps; on two cores the findings' searches already share
# them: cpu_maps.md): the answer is the same (the first candidate in order that is a kind), only the wait for a
# failed one's successor shorter. The CT's three chains with the maps after the answer (bench/prefill_ab.py's
# candidates-N, medians of three interleaved rounds): none ahead 0.707 s, one 0.620 s on run CQ's H100 host (the
# decode beside them unchanged, 4.42 ms a token); one 0.892, two 0.858 s on run CS's H200 host; one 0.639, two
# 0.600 s on run CU's H100 host (two shorter in every round there). With CANDIDATES = 3, two is all of them.
CANDIDATES_AHEAD = 2
_CANDIDATES_POOL: ThreadPoolExecutor | None = None
_CANDIDATES_LOCK = threading.Lock()
DEEPEST_FINE_VOXELS = 1_000_000  # a larger region's deepest voxel is looked for on 2 x 2 in-plane blocks first
# a GPU reader's deepest voxels measured on its GPU (deepest_index_torch: the same voxels as edt's) instead of in a
# helper process: the last chain's longest step on run CS's H200 host (0.18-0.2 s). On run CV's H100 host the chains
# went from 0.654 to 0.587 s (medians, maps after the answer), but torch's blocks slowed the decode beside them from
# 4.56 to 4.63-4.64 ms a token (run CW). With distances' Triton kernel beside an H100's decode (run CZ, a slow host,
# two rounds) the readings took 2.606 and 2.634 s against 2.617 and 2.679 s, the decode 4.49-4.53 against 4.41-4.46
# ms a token. On since run DB (an H100, three rounds): with the decode kernel beside it the readings were the
# shortest in every round (2.583-2.598 s against the library's then 2.667-2.702 s), the maps ending 0.047-0.050 s
# after the answer against 0.113-0.148 s. The CPU reader keeps edt in its helpers (no GPU: device None)
DEEPEST_ON_DEVICE = True


def near_box(near: np.ndarray | Boxed, spacing, kind: str) -> tuple[slice, ...]:
    """The box around ``near`` (the attention's own region, non-empty; as a :class:`Boxed`, from its box) grown by
    the kind's largest diameter per axis. A region that stands for the finding must reach into ``near`` or have
    its centre there (the reader's rule), and a region grown from a seed reaches no farther than its own
    diameter: a seed farther out than that cannot give one. This keeps a diffuse attention's search (half a
    chest) to where it points most."""
    hi = limits_mm(kind)[1]
    near = boxed(near)
    return grown(near.box, [int(np.ceil(hi / s)) + 1 for s in spacing], near.mask.shape)


def deepest(part: np.ndarray, spacing, device=None) -> tuple[int, ...]:
    """The voxel of ``part`` farthest inside it (the maximum of its inside distance). A part whose bounding
    box holds more than :data:`DEEPEST_FINE_VOXELS` is measured on 2 x 2 in-plane blocks wholly inside it (a
    quarter of the work; the voxel found is within a voxel of the finest answer). ``device``: a GPU measures
    the distances there (:func:`deepest_index_torch`: the same voxel), a host core free meanwhile."""
    box = bounds(part, [1] * part.ndim)
    sub = part[box]
    step = 2 if sub.size > DEEPEST_FINE_VOXELS and min(sub.shape[1:]) >= 8 else 1
    if step == 2:
        coarse = block_min(sub, 2)  # a block is inside when all four of its voxels are
        if coarse.any():
            sub, spacing = coarse, (spacing[0], 2 * spacing[1], 2 * spacing[2])
        else:
            step = 1
    if device is not None and torch.device(device).type == "cuda":
        with maps.side_stream():  # not queued behind the model's steps
            k = deepest_index_torch(sub, spacing, device)
    else:
        k = np.unravel_index(int(np.argmax(inside_distance(sub, spacing))), sub.shape)
    k = (k[0], k[1] * step, k[2] * step)
    return tuple(int(i + b.start) for i, b in zip(k, box))


def deepest_index_torch(sub: np.ndarray, spacing, device) -> tuple[int, ...]:
    """``np.argmax`` of :func:`inside_distance` of ``sub`` (edt's float32 depths: the first voxel in C order
    among equal ones) from torch's squared distances on ``device`` (:func:`distances.squared_inside_torch`),
    rounded to float32 before their root, so that depths equal in float32 tie as edt's do. The same voxel as
    edt's on the real CT's seven deepest parts and the tests' shapes (its distances within 1e-6 mm of edt's);
    where two depths differ by edt's own float32 rounding alone, either voxel may be given."""
    t = _to_device(torch.from_numpy(np.ascontiguousarray(sub, dtype=bool)), device)
    depth = distances.squared_inside_torch(t, spacing).to(torch.float32).sqrt_()
    return np.unravel_index(int(torch.argmax(depth.reshape(-1))), sub.shape)


def candidates_ahead() -> int:
    """How many of a CT search's next candidates are tried ahead: :data:`CANDIDATES_AHEAD` where helper processes
    run, none elsewhere."""
    return CANDIDATES_AHEAD if helper_processes.running() else 0


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
                         lambda: territory(layers.aerated[box] if layers is not None else aerated_lung(sub),
                                           device=device))
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
        at = deepest(labels == order[k], spacing, device if DEEPEST_ON_DEVICE else None)
        seed = tuple(int(i + b.start) for i, b in zip(at, box))
        try:
            return grow_ct(hu, spacing, seed, kind, cache=cache, device=device, layers=layers)
        except NoExtent as e:  # its reason only: a traceback would hold the frames on its way and their arrays
            return e.with_traceback(None)

    ahead: dict[int, Future] = {}
    ahead_count = candidates_ahead()
    failed = got = None
    try:
        for k in range(len(order)):  # the first that is a `kind`
            for j in range(k + 1, min(k + 1 + ahead_count, len(order))):
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
