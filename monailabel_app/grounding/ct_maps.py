"""Attention of a finding's tokens to a CT's slices -> a 3-D heatmap on the voxels -> one mask per finding.

1. **Per-slice grids.** Each captured row (generated token x layer x head; only layers whose keys cover
   the whole sequence: in Gemma 3 the global layers) is scaled to sum 1 over the image tokens of *all*
   slices, so the share each slice got is kept, then averaged: an ``(n_slices, g, g)`` map.
2. **Back to the voxels.** Each slice's grid goes through the same pad/resize inverse as a radiograph
   (:func:`maps.grid_to_pixels`) onto its axial plane at its source slice; slices that were not sampled
   get the linear interpolation of the two nearest sampled slices along z (the nearest one outside the
   sampled range). All of this happens on the display array (z toward the head, y back, x left).
3. **Kept inside the body.** The heatmap is zeroed outside the HU body mask (:func:`anatomy.body_mask`); a
   finding that names a side is zeroed on the other side of the body's midline (patient right = low x).
4. **Mask.** The lesion's own region in HU where attention points (:mod:`extent`), else the 3-D connected
   region around the peak at the threshold (as for radiographs); overlaps go to the finding with the larger
   scaled heatmap (:func:`maps.assign`).

Per finding the result reports the slice range of its mask and the strongest slice (the slice of the
heatmap's peak), as indices of the input's own slice axis and as patient z in mm, plus the model
slice (``SLICE n``) that drew most of the finding's attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import blocks, maps
from ..allocator import zeros
from ..io.ct import CTVolume, ModelSlices


def slice_grids(attention, rows: list[int], grid: int, n_images: int) -> np.ndarray:
    """(n_images, grid, grid): attention of the finding's token rows to each slice's image tokens."""
    if not rows:
        return np.zeros((n_images, grid, grid), np.float32)
    a = attention[rows]  # (tokens, layers, heads, n_images * grid * grid)
    a = a / a.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return a.mean(dim=(0, 1, 2)).reshape(n_images, grid, grid).numpy().astype(np.float32)


def _z_weights(indices: list[int], depth: int):
    """Per display slice: the two sampled slices (positions in ``order``) it lies between and the weight
    of the second (the nearest one outside the sampled range)."""
    order = np.argsort(indices)
    zs = np.asarray(indices, float)[order]
    if len(zs) == 1:
        zero = np.zeros(depth, int)
        return zero, zero, np.zeros(depth), order
    pos = np.interp(np.arange(depth, dtype=float), zs, np.arange(len(zs), dtype=float))
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, len(zs) - 1)
    return lo, hi, pos - lo, order


def volume_heatmap(grids: np.ndarray, ms: ModelSlices, depth: int, device="cpu") -> torch.Tensor:
    """float32 (z, y, x) on the display grid from per-slice token grids, as a tensor on ``device``.

    The z interpolation runs on the token grids first and each display slice's grid is then upsampled
    once (both steps are linear, so the order does not change the result beyond float rounding): one
    bilinear pass over the volume instead of an upsampling per model slice and a blend of full planes."""
    lo, hi, w, order = _z_weights(ms.indices, depth)
    g = torch.as_tensor(np.asarray(grids, np.float32)[order], device=device)
    wt = torch.as_tensor(w, dtype=torch.float32, device=device)[:, None, None]
    per_slice = g[torch.as_tensor(lo, device=device)] * (1 - wt) + g[torch.as_tensor(hi, device=device)] * wt
    return maps.grids_to_pixels(per_slice, ms.pad)


def gated(heat, allowed, columns, out: np.ndarray | None = None):
    """The heatmap kept inside ``allowed`` (the body, or the lungs: bool, same grid) and, for a finding that
    names a side, on that side's ``columns`` (bool (x,), :func:`side_columns`), zero elsewhere. Tensors (a
    GPU's) or numpy arrays (the CPU's: numpy is 3-4x faster there than torch; there the gate is a product,
    the same as keeping or zeroing for a heatmap, which is finite and >= 0, and 1.7x faster than a masked
    copy), written into ``out`` when given (numpy)."""
    if isinstance(heat, np.ndarray):
        m = np.multiply(heat, allowed, out=out, dtype=np.float32)
        if columns is not None and not columns.all():
            m *= columns  # broadcast over the last axis
        return m
    m = torch.where(allowed, heat, torch.zeros((), dtype=heat.dtype, device=heat.device))
    if columns is not None:
        m *= columns  # broadcast over the last axis (an index_put of the other side's columns is 10x slower)
    return m


def gate_box(allowed_box: tuple[slice, ...] | None, columns: np.ndarray | None) -> tuple[slice, ...] | None:
    """The box outside which a finding's gated map is zero: the allowed voxels' box (``allowed_box``, None
    when none is allowed) narrowed to the side's ``columns`` (a run of display columns); None when empty."""
    if allowed_box is None:
        return None
    if columns is None:
        return allowed_box
    xs = np.flatnonzero(columns)
    if not xs.size:
        return None
    x0, x1 = max(int(xs[0]), allowed_box[2].start), min(int(xs[-1]) + 1, allowed_box[2].stop)
    return (*allowed_box[:2], slice(x0, x1)) if x0 < x1 else None


@dataclass
class Gated:
    """:func:`gated_map`'s answer: the gated map (float32 on the CPU, zero outside its gate's box), its range
    (what :func:`maps.support_range` gives with that box) and its peak (the first voxel at its maximum in C
    order, as ``np.argmax`` finds it; None unless the maximum lies above zero: a flat map has no peak)."""

    map: np.ndarray
    span: tuple[float, float]
    peak: tuple[int, ...] | None


def gated_map(heat, allowed, columns, box: tuple[slice, ...] | None) -> Gated:
    """:func:`gated` as a float32 numpy array on the CPU, computed on the gate's ``box`` only
    (:func:`gate_box`: zero outside it) and copied off a GPU from that box alone; with its range and peak,
    read as it is made (on the CPU a slab of planes at a time, each still in cache; on a GPU by the device,
    whose ``argmax`` gives the first index of the maximum) instead of in three more passes over the box."""
    if box is None:
        return Gated(zeros(tuple(heat.shape), np.float32), (0.0, 0.0), None)
    out = np.empty(tuple(heat.shape), np.float32)
    _zero_outside(out, box)
    cols = None if columns is None else columns[box[2]]
    if isinstance(heat, np.ndarray):
        lo, hi, at = _gated_in_slabs(heat, allowed, cols, box, out)
    else:
        sub = gated(heat[box], allowed[box], cols)
        lo_t, hi_t = torch.aminmax(sub)
        first = torch.argmax(sub.reshape(-1))
        out[box] = sub.cpu().numpy()
        lo, hi = float(lo_t), float(hi_t)
        at = tuple(int(i) + b.start for i, b in zip(np.unravel_index(int(first), tuple(sub.shape)), box))
    if any(b.stop - b.start < n for b, n in zip(box, out.shape)):  # the zeros outside the box
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    return Gated(out, (lo, hi), at if hi > 0 else None)


def _gated_in_slabs(heat: np.ndarray, allowed: np.ndarray, cols, box: tuple[slice, ...], out: np.ndarray):
    """The gated box written into ``out``, a slab of planes at a time (:data:`blocks.SLAB_BYTES`): (its minimum, its maximum, the first
    voxel at the maximum in C order: in the first slab that reaches it)."""
    z0, z1 = box[0].start, box[0].stop
    plane = max(1, (box[1].stop - box[1].start) * (box[2].stop - box[2].start) * 4)
    step = max(1, blocks.SLAB_BYTES // plane)  # the block reductions' slabs: one knob for both
    lo, hi, top = np.inf, -np.inf, z0
    for z in range(z0, z1, step):
        slab = (slice(z, min(z + step, z1)), box[1], box[2])
        done = gated(heat[slab], allowed[slab], cols, out=out[slab])  # written in place
        low, high = float(done.min()), float(done.max())
        lo = min(lo, low)
        if high > hi:  # the first slab that reaches the maximum holds its first voxel
            hi, top = high, z
    slab = (slice(top, min(top + step, z1)), box[1], box[2])
    at = maps.first_at(out[slab], hi)
    return lo, hi, tuple(int(i) + b.start for i, b in zip(at, slab))


def _peak_plane(heat: np.ndarray, support: tuple[slice, ...] | None, span: tuple[float, float] | None) -> int:
    """The plane of ``heat``'s first voxel (C order) at its maximum, as ``np.argmax`` finds it: in the box
    ``support`` when the maximum is above the zeros outside it (every voxel at the maximum is then inside)."""
    if support is not None:
        sub = heat[support]
        hi = float(sub.max()) if span is None else span[1]
        if hi > 0:
            return support[0].start + maps.first_at(sub, hi)[0]
    return int(np.unravel_index(int(np.argmax(heat)), heat.shape)[0])


def _zero_outside(out: np.ndarray, box: tuple[slice, ...]) -> None:
    """Zeros in ``out`` (3-D) everywhere but ``box``, which its caller writes: each voxel written once."""
    (z0, z1), (y0, y1), (x0, x1) = ((b.start, b.stop) for b in box)
    out[:z0] = 0
    out[z1:] = 0
    out[z0:z1, :y0] = 0
    out[z0:z1, y1:] = 0
    out[z0:z1, y0:y1, :x0] = 0
    out[z0:z1, y0:y1, x1:] = 0


def side_gate(body: np.ndarray, side: str) -> np.ndarray:
    """float32 (z, y, x): 1 on the patient's ``side`` of the body's midline (display x), else 0."""
    gate = np.ones(body.shape, np.float32)
    gate[:, :, ~side_columns(body, side)] = 0
    return gate


def column_profile(body: np.ndarray) -> np.ndarray:
    """The body's voxels per display column (x), whose centre is the midline of :func:`side_columns`: summed a
    plane's rows at a time in int32 (a CT's 134 planes of 512 x 512 in 9 ms against 14 for numpy's sum over two
    axes; the same counts)."""
    return body.sum(axis=0, dtype=np.int32).sum(axis=0)


def side_columns(body: np.ndarray, side: str, profile: np.ndarray | None = None) -> np.ndarray:
    """bool (x,): the display columns on the patient's ``side`` of the body's midline (all for no side);
    ``profile``: the body's :func:`column_profile`, when already made (a study's two sides share it)."""
    x = np.arange(body.shape[2])
    if side not in ("right", "left"):
        return np.ones(body.shape[2], bool)
    weights = column_profile(body) if profile is None else profile
    mid = float(np.average(x, weights=weights)) if weights.any() else body.shape[2] / 2
    return x < mid if side == "right" else x >= mid  # patient right = low x on the display grid


def slice_info(volume: CTVolume, grids: np.ndarray, heat: np.ndarray, mask: np.ndarray,
               support: tuple[slice, ...] | None = None, span: tuple[float, float] | None = None,
               from_z: int = 0) -> dict:
    """Slice range of the mask (None when the mask is empty) and the strongest slice, in the input's slice
    indices and patient z. ``support``, ``span``: the box outside which ``heat`` is zero and its range, when
    known (the strongest voxel found in the box); ``mask``: the planes from ``from_z`` on (where the label map
    has any)."""
    zs = from_z + np.nonzero(mask.any(axis=(1, 2)))[0]
    return slice_info_of_planes(volume, grids, heat, (int(zs.min()), int(zs.max())) if len(zs) else None, support,
                                span)


def slice_info_of_planes(volume: CTVolume, grids: np.ndarray, heat: np.ndarray, planes: tuple[int, int] | None,
                         support: tuple[slice, ...] | None = None, span: tuple[float, float] | None = None,
                         peak: tuple[int, ...] | None = None) -> dict:
    """:func:`slice_info` from the mask's first and last display plane (None: an empty mask), as
    :func:`maps.assign` gives them without another pass over the label map; ``peak``: ``heat``'s peak, when
    already found (:class:`maps.Peaks`)."""

    def where(z: int) -> dict:
        return {"index": volume.display_to_stored_index(int(z)), "world_z_mm": round(volume.world_z(int(z)), 2)}

    out = {"strongest_slice": where(_peak_plane(heat, support, span) if peak is None else peak[0]),
           "model_slice": int(np.argmax(grids.sum(axis=(1, 2)))) + 1}
    out["slice_range"] = None
    if planes is not None:
        lo, hi = where(planes[0]), where(planes[1])
        out["slice_range"] = {"index": sorted([lo["index"], hi["index"]]) if lo["index"] is not None else None,
                              "world_z_mm": sorted([lo["world_z_mm"], hi["world_z_mm"]])}
    return out
