"""Measure grounding on phantoms honestly: the model's maps next to a words-only baseline and chance.

For every lesion of every held-out phantom, the finding that names the lesion's zone is looked up in
the model's answer (a lesion whose zone the model did not name scores 0 everywhere but chance). Four maps:

(a) raw: the finding's attention heatmap (:func:`study_maps.finding_grid` on the configured layers);
(b) final: the finding's mask in the label map the server returns;
(c) text-only: no image at all, the average lesion mask of the named zone (from calibration phantoms,
    in image-relative coordinates);
(d) chance: a uniformly random point / a random mask of the final mask's size (exact expectations).

Pointing game: a hit when the map's maximum (for a mask: its centre of mass) lies within half a token
cell (in the image's pixels) of the lesion; strict pointing (inside the lesion itself) is reported too,
since the 16 x 16 token grid cannot resolve nodules smaller than a cell. Dice: (b) its own mask;
(a) and (c) their top-k pixels with k the lesion's size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from ..io.ct import sample_slices
from ..io.xray import Geometry, Radiograph
from ..language.report import LEVELS, SIDES
from ..phantoms.ct import LOBES, make_ct_phantom
from ..phantoms.films import make_phantom

CALIBRATION_SEEDS = range(20000, 20600)
PRIOR_SIZE = 128


def zone_priors(seeds=CALIBRATION_SEEDS) -> dict[tuple[str, str], np.ndarray]:
    """Average lesion mask per zone on a PRIOR_SIZE^2 image-relative grid (the words-only baseline)."""
    acc = {(s, lv): np.zeros((PRIOR_SIZE, PRIOR_SIZE)) for s in SIDES for lv in LEVELS}
    for seed in seeds:
        ph = make_phantom(seed)
        for les in ph.lesions:
            acc[(les.side, les.level)] += _resize(les.mask.astype(float), (PRIOR_SIZE, PRIOR_SIZE))
    return {k: v / max(v.max(), 1e-9) for k, v in acc.items()}


def _resize(a: np.ndarray, shape) -> np.ndarray:
    return ndimage.zoom(a, (shape[0] / a.shape[0], shape[1] / a.shape[1]), order=1, grid_mode=True, mode="nearest")


def _top_k(h: np.ndarray, k: int) -> np.ndarray:
    flat = np.argsort(h, axis=None)[::-1][:k]
    m = np.zeros(h.size, bool)
    m[flat] = True
    return m.reshape(h.shape)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return float(2 * (a & b).sum() / s) if s else 0.0


@dataclass
class Scores:
    hits: list = field(default_factory=list)
    strict: list = field(default_factory=list)
    dice: list = field(default_factory=list)

    def add(self, hit, strict, d):
        self.hits.append(float(hit))
        self.strict.append(float(strict))
        self.dice.append(float(d))

    def summary(self) -> dict:
        return {"pointing": float(np.mean(self.hits)), "pointing_strict": float(np.mean(self.strict)),
                "dice": float(np.mean(self.dice)) if not all(np.isnan(self.dice)) else float("nan")}


def evaluate(reader, seeds, priors=None, control: bool = False, language: str = "en") -> dict:
    """Zone accuracy and the (a)-(d) table on phantom ``seeds``, the model asked in ``language``.

    ``control``: the image-matters control. The model's own words on each phantom are kept, but its maps
    and masks come from the phantom's lesion-free twin (same anatomy, the lesions never drawn) with the
    model made to say those words (:meth:`Reader.read` ``answer``); scored against the real lesions.
    """
    priors = priors or zone_priors()
    maps = {name: Scores() for name in ("a_raw_attention", "b_final_masks", "c_text_only", "d_chance")}
    lesions = named = kind_ok = empty_ok = empties = 0
    for seed in seeds:
        ph = make_phantom(seed)
        reading = reader.read(Radiograph(ph.image, Geometry.plain(*ph.image.shape)), language=language)
        if control:
            twin = make_phantom(seed, lesions=False).image
            reading = reader.read(Radiograph(twin, Geometry.plain(*twin.shape)), answer=reading.report, language=language)
        if not ph.lesions:
            empties += 1
            empty_ok += not reading.findings
        tol = reading.pad.side / reader.grid / 2
        for les in ph.lesions:
            lesions += 1
            dist = ndimage.distance_transform_edt(~les.mask)
            n, area = les.mask.sum(), les.mask.size
            k = next((i for i, f in enumerate(reading.findings) if (f.side, f.level) == (les.side, les.level)), None)
            final_size = int((reading.labels == k + 1).sum()) if k is not None else int(n)
            maps["d_chance"].add((dist <= tol).mean(), n / area, 2 * final_size * n / (area * (final_size + n)))
            if k is None:
                for name in ("a_raw_attention", "b_final_masks", "c_text_only"):
                    maps[name].add(0, 0, 0)
                continue
            named += 1
            kind_ok += reading.findings[k].kind == les.kind
            h = reading.heatmaps[k]
            p = np.unravel_index(int(np.argmax(h)), h.shape)
            maps["a_raw_attention"].add(dist[p] <= tol, les.mask[p], dice(_top_k(h, n), les.mask))
            m = reading.labels == k + 1
            c = tuple(int(round(x)) for x in ndimage.center_of_mass(m)) if m.any() else p
            maps["b_final_masks"].add(dist[c] <= tol, les.mask[c], dice(m, les.mask))
            prior = _resize(priors[(les.side, les.level)], h.shape)
            q = np.unravel_index(int(np.argmax(prior)), prior.shape)
            maps["c_text_only"].add(dist[q] <= tol, les.mask[q], dice(_top_k(prior, n), les.mask))
    return {
        "images": len(seeds),
        "lesions": lesions,
        "zone_accuracy": named / max(1, lesions),
        "kind_accuracy": kind_ok / max(1, lesions),
        "empty_images_answered_empty": empty_ok / max(1, empties),
        "maps": {name: s.summary() for name, s in maps.items()},
    }


def table(result: dict) -> str:
    where = "lobe" if "false_findings_per_volume" in result else "zone"
    tail = (f"false findings per volume {result['false_findings_per_volume']:.2f}, lesions detected by their "
            f"finding's final mask {result['lesions_detected']:.3f}" if where == "lobe"
            else f"empty images answered empty {result['empty_images_answered_empty']:.3f}")
    lines = [
        f"{result['images']} held-out phantoms, {result['lesions']} lesions: {where} accuracy "
        f"{result['zone_accuracy']:.3f}, kind accuracy {result['kind_accuracy']:.3f}, {tail}",
        "| map | pointing (half-token tolerance) | pointing (strict) | Dice |",
        "|---|---|---|---|",
    ]
    for name, s in result["maps"].items():
        lines.append(f"| {name} | {s['pointing']:.3f} | {s['pointing_strict']:.3f} | {s['dice']:.3f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- CT

CT_CALIBRATION_SEEDS = range(20000, 20200)
CT_PRIOR_SIZE = 32


def lobe_priors(seeds=CT_CALIBRATION_SEEDS) -> dict[tuple[str, str], np.ndarray]:
    """Average lesion mask per lobe on a CT_PRIOR_SIZE^3 volume-relative grid (the words-only baseline)."""
    size = (CT_PRIOR_SIZE,) * 3
    acc = {lobe: np.zeros(size) for lobe in LOBES}
    for seed in seeds:
        for les in make_ct_phantom(seed).lesions:
            acc[(les.side, les.level)] += _resize3(les.mask.astype(float), size)
    return {k: v / max(v.max(), 1e-9) for k, v in acc.items()}


def _resize3(a: np.ndarray, shape) -> np.ndarray:
    return ndimage.zoom(a, [t / s for t, s in zip(shape, a.shape)], order=1, grid_mode=True, mode="nearest")


def ct_hit_sampling(shape, spacing_zyx, shown: int, grid: int) -> tuple[float, float, float]:
    """``distance_transform_edt`` sampling under which distance 1 is the CT pointing tolerance: half a
    token cell in-plane, half the interval between the ``shown`` slices along z (at least one slice)."""
    nz, ny, nx = shape
    sz, sy, sx = spacing_zyx
    tol_xy = max(ny * sy, nx * sx) / grid / 2
    tol_z = max(sz, (nz - 1) / max(1, shown - 1) * sz / 2)
    return sz / tol_z, sy / tol_xy, sx / tol_xy


def evaluate_ct(read, seeds, max_slices: int, grid: int = 16, priors=None, text_only: bool = True) -> dict:
    """Lobe accuracy and the (a)-(d) table in 3-D on CT phantom ``seeds``. ``text_only=False`` leaves out
    row (c), the words-only baseline, and the 200 calibration phantoms its ``priors`` are drawn from.

    ``read(phantom)`` returns ``(findings, labels)`` on the phantom's voxel grid: findings as dicts with
    ``side``, ``level``, ``kind`` and ``attention_peak`` (z, y, x of the raw attention's maximum), labels
    the returned label map (finding k -> k). Hits use a tolerance of half a token cell in-plane and half
    the slice-sampling interval along z (an ellipsoid around the lesion); strict means inside the lesion.
    """
    priors = (priors or lobe_priors()) if text_only else None
    named_rows = ("a_raw_attention", "b_final_masks") + (("c_text_only",) if text_only else ())
    maps = {name: Scores() for name in (*named_rows, "d_chance")}
    lesions = named = kind_ok = extra = detected = 0
    for seed in seeds:
        ph = make_ct_phantom(seed)
        findings, labels = read(ph)
        sampling = ct_hit_sampling(ph.hu.shape, ph.spacing[::-1], len(sample_slices(ph.hu.shape[0], max_slices)), grid)
        truth = {(les.side, les.level) for les in ph.lesions}
        extra += sum((f["side"], f["level"]) not in truth for f in findings)
        for les in ph.lesions:
            lesions += 1
            dist = ndimage.distance_transform_edt(~les.mask, sampling=sampling)
            n, size = int(les.mask.sum()), les.mask.size
            k = next((i for i, f in enumerate(findings) if (f["side"], f["level"]) == (les.side, les.level)), None)
            final_size = int((labels == k + 1).sum()) if k is not None else n
            maps["d_chance"].add((dist <= 1).mean(), n / size, 2 * final_size * n / (size * (final_size + n)))
            if k is None:
                for name in named_rows:
                    maps[name].add(0, 0, 0)
                continue
            named += 1
            kind_ok += findings[k]["kind"] == les.kind
            p = tuple(findings[k]["attention_peak"])
            maps["a_raw_attention"].add(dist[p] <= 1, les.mask[p], float("nan"))
            m = labels == k + 1
            detected += bool((m & les.mask).any())
            c = tuple(int(round(x)) for x in ndimage.center_of_mass(m)) if m.any() else p
            maps["b_final_masks"].add(dist[c] <= 1, les.mask[c], dice(m, les.mask))
            if priors is None:
                continue
            prior = _resize3(priors[(les.side, les.level)], ph.hu.shape)
            q = np.unravel_index(int(np.argmax(prior)), prior.shape)
            maps["c_text_only"].add(dist[q] <= 1, les.mask[q], dice(_top_k(prior, n), les.mask))
    return {
        "images": len(seeds),
        "lesions": lesions,
        "zone_accuracy": named / max(1, lesions),
        "kind_accuracy": kind_ok / max(1, lesions),
        "false_findings_per_volume": extra / max(1, len(seeds)),
        "lesions_detected": detected / max(1, lesions),  # the finding's final mask overlaps the lesion
        "maps": {name: s.summary() for name, s in maps.items()},
    }
