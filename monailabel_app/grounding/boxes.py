"""Bounding boxes of masks, found on the planes that hold them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def bounds(mask: np.ndarray, margin=None) -> tuple[slice, ...]:
    """The bounding box of a non-empty bool ``mask``, grown by ``margin`` voxels per axis (default none) and
    kept inside the array. The first axis' extent comes from one pass; the other axes' from the planes in it
    only: a region on a few planes of a CT volume costs a fourth of a reduction over the whole array per axis
    (7.0 -> 1.8 ms for 15 of 134 planes of 512 x 512). A volume's rows and columns come from one pass over
    those planes (their union, one plane) instead of a pass per axis: 3.3 -> 1.4 ms for 90 planes."""
    margin = [0] * mask.ndim if margin is None else margin
    first = np.nonzero(mask.any(axis=tuple(range(1, mask.ndim))))[0]
    planes = mask[int(first[0]) : int(first[-1]) + 1]
    if mask.ndim == 3:
        union = planes.any(axis=0)
        idx = [first, np.nonzero(union.any(axis=1))[0], np.nonzero(union.any(axis=0))[0]]
    else:
        idx = [first] + [np.nonzero(planes.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))[0]
                         for axis in range(1, mask.ndim)]
    return tuple(slice(max(0, int(i[0]) - m), min(n, int(i[-1]) + m + 1)) for i, m, n in zip(idx, margin, mask.shape))


@dataclass(frozen=True)
class Boxed:
    """A bool ``mask`` with its bounding box (None: the mask is empty). The masks' code passes a region found
    on a box together with its bounding box, so that the next step reads the box instead of passing over the
    whole volume to find it again (a 134-slice 512² CT: 35 MB a pass)."""

    mask: np.ndarray
    box: tuple[slice, ...] | None

    @classmethod
    def of(cls, mask: np.ndarray) -> "Boxed":
        """``mask`` with its bounding box, found now."""
        return cls(mask, bounds(mask) if mask.any() else None)

    def any(self) -> bool:
        return self.box is not None

    def copy(self) -> "Boxed":
        return Boxed(self.mask.copy(), self.box)


def boxed(mask) -> Boxed:
    """``mask`` as a :class:`Boxed` (a bool array's box found now)."""
    return mask if isinstance(mask, Boxed) else Boxed.of(np.asarray(mask, bool))


def within(outer: tuple[slice, ...], inner: tuple[slice, ...]) -> tuple[slice, ...]:
    """``inner`` (a box within the box ``outer``, in its coordinates) in the coordinates ``outer`` is in."""
    return tuple(slice(o.start + i.start, o.start + i.stop) for o, i in zip(outer, inner))


def grown(box: tuple[slice, ...], margin, shape) -> tuple[slice, ...]:
    """``box`` grown by ``margin`` voxels per axis, kept inside an array of ``shape``: :func:`bounds` of a mask
    with that margin, from the mask's own bounding box."""
    return tuple(slice(max(0, b.start - m), min(n, b.stop + m)) for b, m, n in zip(box, margin, shape))


def union(boxes) -> tuple[slice, ...] | None:
    """The smallest box that holds every one of ``boxes`` (None entries: empty masks; None if all are)."""
    boxes = [b for b in boxes if b is not None]
    if not boxes:
        return None
    return tuple(slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes)) for a in range(len(boxes[0])))
