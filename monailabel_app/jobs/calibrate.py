"""Calibrate how the maps read a model's attention, from studies with reference lesions.

    medgemma-label calibrate --model M --data phantoms|ct-phantoms|DIR [--count N] [--out FILE] [--language zh]

For each reference study the model answers once per attention method (direct, rolled out inside each
image), recording every layer it can; then every choice of layers (one or two layers, or all), each
method and each mask threshold is scored from those recordings, with the engine's own map and mask
code (:meth:`Reader.remap`), so nothing is generated twice. Score: mean pointing game of the final
masks plus their mean Dice against the references (a reference whose finding the model did not name
scores 0). The best choice is written to ``grounding.json`` beside the model (or ``--out``), merged with
what is there for the other modality, with the scores and the data it was measured on.

``--language zh`` asks the questions in Chinese and stores the result as the modality's ``"zh"`` entry
(layers and threshold; the attention method stays the modality's, since attention is recorded before the
answer's language is known): a model can look at the image differently while it writes Chinese, and the
reader uses that entry for Chinese answers (:func:`study_maps.in_language`).

References:

* ``phantoms`` / ``ct-phantoms``: synthetic phantoms from the calibration seeds (20000 and up; the
  held-out test seeds are 0..19999), each lesion with its exact mask and its zone or lobe.
* ``DIR`` with radiographs and either ``boxes.csv`` (columns ``image,y0,x0,y1,x1`` in pixels, optional
  ``finding``, e.g. "nodule in the right upper zone", to match the model's finding by side and level) or
  a COCO JSON (``*.json`` with ``images`` and ``annotations``; ``bbox`` is ``[x, y, width, height]``).
  A box becomes a rectangular mask; without a finding text a box is matched to the finding whose mask
  lies closest to it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import time
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from ..grounding.study_maps import LANGUAGE_ENTRIES, entry_for
from ..language.report import parse_report
from .evaluation import CALIBRATION_SEEDS, CT_CALIBRATION_SEEDS, ct_hit_sampling, dice

THRESHOLDS = (0.3, 0.4, 0.5, 0.6)


@dataclass
class Reference:
    """One study and its reference lesions: bool masks on the study's input grid, each with the
    (side, level) it lies in when known."""

    study: object  # Radiograph or CTVolume
    masks: list[np.ndarray]
    places: list[tuple[str, str] | None] = field(default_factory=list)
    name: str = ""


def phantom_references(count: int, ct: bool = False) -> list[Reference]:
    from ..io.xray import Geometry, Radiograph
    from ..phantoms.ct import make_ct_phantom, phantom_volume
    from ..phantoms.films import make_phantom

    refs = []
    for seed in (CT_CALIBRATION_SEEDS if ct else CALIBRATION_SEEDS)[:count]:
        ph = make_ct_phantom(seed) if ct else make_phantom(seed)
        study = phantom_volume(ph) if ct else Radiograph(ph.image, Geometry.plain(*ph.image.shape))
        refs.append(Reference(study, [les.mask for les in ph.lesions], [(les.side, les.level) for les in ph.lesions],
                              f"{'ct-' if ct else ''}phantom {seed}"))
    return refs


def box_references(folder: str) -> list[Reference]:
    """Radiographs in ``folder`` with boxes from ``boxes.csv`` or a COCO JSON (see the module docstring)."""
    from ..io.study import load_study
    from .references import box_mask, read_boxes

    boxes = read_boxes(folder)
    refs = []
    for image, items in sorted(boxes.items()):
        study = load_study(os.path.join(folder, image), "xray")
        masks, places = [], []
        for box, text in items:
            masks.append(box_mask(study.pixels.shape, box))
            found = parse_report(text) if text else []
            places.append((found[0].side, found[0].level) if found else None)
        refs.append(Reference(study, masks, places, image))
    return refs


def _score(reading, ref: Reference, grid: int) -> tuple[list[float], list[float]]:
    """Pointing hits and Dice of the reading's masks for each reference lesion."""
    if reading.modality == "ct":  # the same tolerance as grounding.evaluate_ct
        sampling = ct_hit_sampling(reading.labels.shape, ref.study.spacing, len(reading.inputs_index), grid)
    else:
        sampling = (grid * 2 / reading.pad.side,) * 2
    hits, dices = [], []
    for mask, place in zip(ref.masks, ref.places):
        dist = ndimage.distance_transform_edt(~mask, sampling=sampling)
        candidates = [k for k, f in enumerate(reading.findings, start=1)
                      if place is None or (f.side, f.level) == place]
        best = (0.0, 0.0)
        for k in candidates:
            m = reading.labels == k
            if not m.any():
                continue
            c = tuple(int(round(x)) for x in ndimage.center_of_mass(m))
            best = max(best, (float(dist[c] <= 1), dice(m, mask)))
        hits.append(best[0])
        dices.append(best[1])
    return hits, dices


def calibrate(reader, refs: list[Reference], ct: bool = False, max_layers: int = 2, thresholds=THRESHOLDS,
              log=print, language: str = "en") -> dict:
    """Best ``layers``/``rollout``/``threshold`` for one modality; returns the settings and their scores."""
    settings = reader.ct if ct else reader.info.grounding
    saved = dict(settings)
    for lang in LANGUAGE_ENTRIES:  # the recordings and their scoring read the layers asked, no override
        settings.pop(lang, None)
    n_layers = reader.model.config.text_config.num_hidden_layers
    # a language's entry keeps the modality's attention method: a generation records attention before the
    # language of its answer is known
    methods = (bool(saved.get("rollout")),) if language in LANGUAGE_ENTRIES else (False, True)
    recordings = []  # per reference: {rollout: generation on every usable layer}
    try:
        for i, ref in enumerate(refs):
            gens = {}
            for rollout in methods:
                settings.update(layers=list(range(n_layers)), rollout=rollout)
                gens[rollout] = reader.read(ref.study, language=language).generation
            recordings.append(gens)
            log(f"  recorded {i + 1}/{len(refs)}: {ref.name}")
        usable = recordings[0][methods[0]].layers if recordings else []
        subsets = [list(c) for k in range(1, max_layers + 1) for c in itertools.combinations(usable, k)]
        if len(usable) > max_layers:
            subsets.append(list(usable))
        choices = list(itertools.product(methods, subsets, thresholds))
        hits, dices = [[] for _ in choices], [[] for _ in choices]
        for ref, gens in zip(refs, recordings):  # study by study: its anatomy is found once
            for i, (rollout, layers, threshold) in enumerate(choices):
                settings.update(threshold=threshold)
                gen = gens[rollout]
                idx = [gen.layers.index(layer) for layer in layers]
                sub = dataclasses.replace(gen, attention=gen.attention[:, idx], layers=layers)
                h, d = _score(reader.remap(ref.study, sub), ref, reader.grid)
                hits[i] += h
                dices[i] += d
        results = [{"layers": layers, "rollout": rollout, "threshold": threshold,
                    "pointing": round(float(np.mean(h)) if h else 0.0, 4),
                    "dice": round(float(np.mean(d)) if d else 0.0, 4)}
                   for (rollout, layers, threshold), h, d in zip(choices, hits, dices)]
        best = max(results, key=lambda r: (r["pointing"] + r["dice"], -len(r["layers"])))
        now = entry_for(saved, language)
        current = next((r for r in results if (r["layers"], r["rollout"], r["threshold"]) ==
                        (list(now.get("layers", [])), bool(now.get("rollout")), now.get("threshold"))), None)
    finally:
        settings.clear()
        settings.update(saved)
    return {"best": best, "current": current, "tried": len(results), "lesions": sum(len(r.masks) for r in refs),
            "studies": len(refs), "results": results, "language": language}


def write_grounding(model_dir: str, out: str | None, found: dict, ct: bool, data: str) -> str:
    """Merge the calibrated settings into ``grounding.json`` (the other modality's entry is kept)."""
    from ..model.loading import GROUNDING_FILE

    path = out or os.path.join(model_dir, GROUNDING_FILE)
    current = {}
    if os.path.isfile(path):
        with open(path) as f:
            current = json.load(f)
    best = found["best"]
    entry = {"layers": best["layers"], "rollout": best["rollout"], "threshold": best["threshold"],
             "note": f"calibrated {time.strftime('%Y-%m-%d')} on {data}: {found['studies']} studies, "
                     f"{found['lesions']} reference lesions, {found['tried']} settings tried; final masks "
                     f"pointing {best['pointing']:.3f}, Dice {best['dice']:.3f}"}
    language = found.get("language", "en")
    target = current.setdefault("ct", {}) if ct else current
    if language in LANGUAGE_ENTRIES:  # an override for answers in that language (the method is the entry's)
        entry.pop("rollout")
        entry["note"] += f" (answers in {language})"
        target[language] = entry
    else:
        target.update(entry)
    with open(path, "w") as f:
        json.dump(current, f, indent=2)
        f.write("\n")
    return path
