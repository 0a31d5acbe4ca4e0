"""A radiograph finding's extent (:mod:`extent`'s rule on a lightly smoothed film against the lung fields
around the point): the seed from the attention's blobs (:func:`find_on_radiograph`), the region grown from it
(:func:`grow_radiograph`), a big film worked on its block average (:func:`film_cache`), and the blob filters made
ahead for a batch on the GPU (:func:`film_blob_responses`)."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from . import filters
from .blocks import block_mean, blocks_back
from .extent import SEARCH, Extent, NoExtent, _box, _search_region, _to_device, grow, limits_mm, method_of
from .territory import territory


MIN_CONTRAST_NOISE = 4.0  # radiographs: the point's contrast over the film's noise


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
