"""Click to correct: a finding's mask grown from a point the annotator gives, with no language model.

MONAI Label's interactive way (DeepEdit, DeepGrow): ``foreground`` points (and optional ``background``
points) as voxel indices of the input image, as 3D Slicer sends them: ``[i, j, k]`` in ITK index order
(``i`` the column, ``j`` the row, ``k`` the slice; a radiograph ``[i, j]`` or ``[i, j, 0]``). The CLI also
takes patient coordinates in millimetres (DICOM LPS), turned into indices through the image's origin,
spacing and direction.

The mask comes from the image around the first foreground point, by the kind's rule
(:mod:`grounding.extent`); further foreground points add their own regions, background points cut off
what lies nearer to them. It replaces the mask of an existing finding (``finding``: its label value or
segment name) of the reading it corrects, or is a new finding of ``kind``. Its side is where the point
lies (the patient's right or left of the body's midline), never a guess.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .errors import InputError
from .grounding import ct_extent, ct_maps, extent, film_extent
from .grounding.anatomy import body_mask
from .grounding.study_maps import ASSUMED_SPACING
from .io.ct import CTVolume
from .io.xray import Radiograph, SquarePad, pixel_spacing_mm
from .language.findings import Finding
from .language.report import unique_names
from .language.vocabulary import KINDS_EN
from .reader import Reading

KINDS = tuple(sorted({v.lstrip("~") for v in KINDS_EN.values()}))
MAX_POINTS = 32


def check_kind(kind) -> str:
    if not isinstance(kind, str) or kind.strip().lower() not in KINDS:
        raise InputError(f"'kind' must be one of {', '.join(KINDS)}; got {kind!r}")
    return kind.strip().lower()


def input_shape(study) -> tuple[int, ...]:
    """The array shape points index: a radiograph's pixels (rows, cols), a CT's stored array."""
    return study.pixels.shape if isinstance(study, Radiograph) else study.geometry.shape


def parse_points(value, name: str, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """``[[i, j, k], ...]`` (or one ``[i, j, k]``; ITK order, as Slicer sends) -> array indices in numpy
    order of an input of ``shape``, each checked to lie inside it. InputError says what was wrong."""
    if value is None or value == []:
        return []
    if isinstance(value, str):
        raise InputError(f"'{name}' must be a list of [i, j, k] voxel indices, got text {value[:40]!r}")
    points = value if isinstance(value, (list, tuple)) and value and isinstance(value[0], (list, tuple)) else [value]
    if len(points) > MAX_POINTS:
        raise InputError(f"'{name}' has {len(points)} points; at most {MAX_POINTS}")
    out = []
    for p in points:
        if not isinstance(p, (list, tuple)) or not 2 <= len(p) <= 3 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in p):
            raise InputError(f"'{name}': each point is [i, j, k] (or [i, j] on a radiograph) of numbers, got {p!r}")
        ijk = [int(round(v)) for v in p]
        if len(shape) == 2:
            if len(ijk) == 3 and ijk[2] != 0:
                raise InputError(f"'{name}': {p!r} is not on the radiograph's one plane (k must be 0)")
            index = (ijk[1], ijk[0])
        else:
            if len(ijk) != 3:
                raise InputError(f"'{name}': a CT point needs three indices [i, j, k], got {p!r}")
            index = (ijk[2], ijk[1], ijk[0])
        if not all(0 <= i < n for i, n in zip(index, shape)):
            raise InputError(f"'{name}': {p!r} lies outside the image (size {list(reversed(shape))} as [i, j, k])")
        out.append(index)
    return out


def index_of_mm(geometry, xyz, name: str = "point_mm") -> list[float]:
    """Patient coordinates (LPS, mm) -> ``[i, j, k]`` continuous voxel index of an input of ``geometry``."""
    xyz = np.asarray(xyz, float)
    n = len(geometry.spacing)
    if xyz.shape != (3,) or not np.isfinite(xyz).all():
        raise InputError(f"'{name}' must be three numbers X,Y,Z in mm (patient LPS), got {xyz.tolist()}")
    d = np.asarray(geometry.direction, float).reshape(n, n)
    origin, spacing = np.asarray(geometry.origin, float), np.asarray(geometry.spacing, float)
    if n == 2:  # a radiograph's plane: z must be the plane's own
        ij = np.linalg.solve(d * spacing, xyz[:2] - origin)
        return [float(ij[0]), float(ij[1]), 0.0]
    return np.linalg.solve(d * spacing, xyz - origin).tolist()


def grow_from_points(study, kind: str, foreground: list, background: list) -> tuple[extent.Extent, np.ndarray]:
    """(the first point's extent, the union mask of all foreground points' regions) on the study's working
    grid (radiograph pixels; CT display grid). Raises InputError when the image gives no region there."""
    if not foreground:
        raise InputError("'foreground' needs at least one point inside the finding")
    if isinstance(study, CTVolume):
        fg = [study.display_index(p) for p in foreground]
        bg = [study.display_index(p) for p in background]

        def grow(p):
            return ct_extent.grow_ct(study.hu, study.spacing, p, kind, background=bg)
    else:
        fg, bg = list(foreground), list(background)
        spacing, _ = pixel_spacing_mm(study)

        def grow(p):
            return film_extent.grow_radiograph(study.pixels, spacing, p, kind, background=bg,
                                          search_mm=2 * max(spacing))
    first, mask = None, None
    for p in fg:
        try:
            e = grow(p)
        except extent.NoExtent as e:
            raise InputError(f"no {kind} region at the point {list(p)}: {e}", status=422) from e
        first = first or e
        mask = e.mask if mask is None else mask | e.mask
    return first, mask


def point_ijk(study, index) -> list[int]:
    """A working-grid index (radiograph pixels; CT display grid) as ``[i, j, k]`` of the input (ITK order,
    as the ``foreground`` points are given)."""
    if isinstance(study, CTVolume):
        return [int(i) for i in reversed(study.stored_index(index))]
    return [int(index[1]), int(index[0]), 0]


def side_at(study, index) -> str:
    """The patient's side at a working-grid index: right or left of the body's midline (CT) or the film's
    middle (radiograph, PA display: patient right on the image's left)."""
    if isinstance(study, CTVolume):
        columns = ct_maps.side_columns(body_mask(study.hu[index[0] : index[0] + 1]), "right")
        return "right" if columns[index[2]] else "left"
    return "right" if index[1] < study.pixels.shape[1] / 2 else "left"


def correct(study, kind: str | None, foreground: list, background: list, base: Reading | None = None,
            finding=None) -> Reading:
    """A reading whose finding ``finding`` (label value or name, of ``base``) has the mask grown from the
    points, or with a new finding of ``kind`` added (to ``base``, or alone). ``kind`` defaults to the
    replaced finding's own."""
    index = None
    if finding is not None:
        if base is None:
            raise InputError("no reading of this image to correct: read it first, or give 'kind' for a new finding",
                             status=409)
        index = _finding_index(base, finding)
        kind = check_kind(kind) if kind else base.findings[index].kind
    elif kind is None:
        raise InputError("give 'finding' (the label to replace) or 'kind' (for a new finding) with the points")
    else:
        kind = check_kind(kind)
    first, mask = grow_from_points(study, kind, foreground, background)
    info = {"extent": "image", "measured": first.json(), "placed_by": "point"}
    info["measured"]["point"] = point_ijk(study, first.seed)
    if isinstance(study, Radiograph) and not pixel_spacing_mm(study)[1]:
        info["measured"]["spacing"] = ASSUMED_SPACING
    reading = base if base is not None else _empty_reading(study)
    ct = isinstance(study, CTVolume)
    findings, extras = list(reading.findings), [dict(e) for e in reading.extras]
    extras += [{} for _ in range(len(findings) - len(extras))]
    if index is None:
        findings.append(Finding(kind=kind, side=side_at(study, first.seed), text=f"{kind} (placed by a point)",
                                size_mm=round(first.diameter_mm, 1)))
        extras.append({})
        index = len(findings) - 1
    else:
        findings[index] = dataclasses.replace(findings[index], kind=kind)
    heat = mask.astype(np.float32) * 0.5  # the finding's map: its mask, peaking at the point it grew from
    heat[first.seed] = 1.0
    labels = np.array(reading.display_labels if ct else reading.labels, np.uint8).reshape(mask.shape)
    labels[labels == index + 1] = 0
    labels[mask] = index + 1
    if ct:
        extras[index] = {**ct_maps.slice_info(study, np.zeros((1, 1, 1), np.float32), heat, labels == index + 1),
                         "model_slice": None, **info}
        in_heat, out_labels = study.to_input(heat), study.to_input(labels, nearest=True).astype(np.uint8)
    else:
        extras[index] = info
        in_heat, out_labels = heat.reshape(study.geometry.shape), labels.reshape(study.geometry.shape)
    return dataclasses.replace(
        reading, findings=findings, names=unique_names(findings), extras=extras, labels=out_labels,
        mask_maps=_put(reading.mask_maps, index, in_heat), heatmaps=_put(reading.heatmaps, index, in_heat),
        grids=_put(reading.grids, index, np.zeros((1, 1), np.float32)),
        display_labels=labels if ct else None,
        display_heatmaps=_put(reading.display_heatmaps, index, heat) if ct else [],
        latencies={}, generation=None)


def _put(items: list, index: int, value) -> list:
    """``items`` with ``value`` at ``index`` (replaced, or appended at the end)."""
    out = list(items)
    if index < len(out):
        out[index] = value
    else:
        out.append(value)
    return out


def _finding_index(base: Reading, finding) -> int:
    if isinstance(finding, bool):
        finding = str(finding)
    if isinstance(finding, (int, float)) or (isinstance(finding, str) and finding.strip().isdigit()):
        k = int(finding)
        if 1 <= k <= len(base.findings):
            return k - 1
    elif isinstance(finding, str) and finding in base.names:
        return base.names.index(finding)
    raise InputError(f"'finding' must be a label value 1..{len(base.findings)} or a segment name of the reading "
                     f"({', '.join(base.names) or 'it has no findings'}); got {finding!r}")


def _empty_reading(study) -> Reading:
    """A reading of ``study`` with no findings and no model: what point-placed findings are added to."""
    ct = isinstance(study, CTVolume)
    shape = study.shape if ct else study.pixels.shape
    rows, cols = shape[-2:]
    return Reading(
        report="", findings=[], names=[], grids=[], heatmaps=[], mask_maps=[],
        labels=np.zeros(study.geometry.shape, np.uint8), study=study, geometry=study.geometry,
        pad=SquarePad(rows, cols), model_inputs=[], inputs_index=[], question="",
        model={"name": None, "note": "no language model: masks grown from points in the image"},
        modality="ct" if ct else "xray", display_labels=np.zeros(shape, np.uint8) if ct else None,
    )
