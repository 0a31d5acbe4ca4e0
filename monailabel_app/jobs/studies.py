"""The seed article's three studies as one resumable run: precision x localisation, agreement and latency;
multi-turn coherence; low-dose robustness.

    medgemma-label study --data phantoms|DIR --out OUT [--model M] [--precisions fp32,bf16,fp16,int8,int4]
                         [--dose 0.2] [--language zh|en] [--xray 100] [--ct 30]

**The plan**: every study x precision x condition is one unit of work:

* ``reading``: the study read with the modality's default question in ``--language`` (findings, masks,
  timings): localisation, report agreement, latency, and detection at full dose;
* ``chain``: the seed's three chained questions in ``--language`` (:data:`CHAIN`): the first asked with the
  images, the other two as follow-ups in the same conversation (:meth:`Reader.converse`: words only);
* ``dose``: a CT study at the reduced dose (``lowdose``'s projection-domain simulation), read as in
  ``reading``: detection and false positives.

Units go through ``batch``'s manifest (``OUT/manifest.jsonl``, a line per finished unit, flushed): a killed
run started again with the same arguments reads only what is missing, and gives the same tables (greedy
decoding, seeded simulation and bootstrap). A precision that cannot run here (int8/int4 without CUDA, a
failed load) is recorded once, with why, and shown so in the tables. Each unit's record holds what the
tables need (findings, their masks' centres, the matched reference lesions, answers, timings), so the
tables (:mod:`jobs.study_tables`) are computed from the manifest alone.

**Definitions** (the README repeats them before each table):

* *Localisation error*: millimetres, in patient coordinates, between a finding's mask centroid and the
  centre of the reference lesion it is matched to. A lesion is matched to the findings at its site (same
  side and level where both say one), the nearest of them; when none is at its site, to the nearest
  finding anywhere (and counted as off-site). A reading without findings misses its lesions. *Pointing*:
  the lesion's share whose matched finding's mask centroid lies within half a token cell of it (in-plane;
  along z half the slice sampling interval), as ``evaluation``'s pointing game.
* *Report agreement*: findings matched one to one on (kind, side, level) with the reference findings (a
  reference kind "lesion" matches any kind; an empty side or level matches any): precision, recall and F1
  pooled over studies, and the share of studies whose findings all match.
* *Latency*: the reading's end-to-end seconds (image to masks) with its prefill / decode / maps split;
  median over studies, warm (the first study of each precision is read once more before timing). Peak
  memory: on CUDA the reading's peak allocated; on a CPU the process's peak resident set.
* *Multi-turn*: a later answer is a *logic break* when it denies a finding of the first answer (negates its
  kind at its site, or says there is nothing) or names a finding that is none of the first answer's: on
  the other side, at another lobe or zone, or of another kind; when the first answer had no finding, a
  later answer that names one is a break. A finding is the first answer's when its kind and site agree
  (an unnamed side or level agrees with any). An answer has a *key-term error* when
  it names a finding whose kind and site match no reference finding, or negates a reference finding at its
  site. Logic breaks per 10 chains; key-term errors per answer.
* *Low dose*: a lesion of at least :data:`MIN_DIAMETER_MM` is *detected* when a finding's mask touches it;
  a finding whose mask touches no reference lesion is a *false positive*.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import sys
import time
import zlib

import numpy as np
from scipy import ndimage

from ..errors import InputError
from ..language import vocabulary as v
from ..language.findings import read_answer
from ..phantoms.model import SEED_CHAIN_ZH
from .references import RefStudy, centre_index, spacing_of, to_patient_mm

CHAIN = {
    "zh": SEED_CHAIN_ZH,
    "en": ("What abnormality is in the right upper lobe?", "What are the density and margins of this abnormality?",
           "Considering the findings above, what is the most likely diagnosis?"),
}
MIN_DIAMETER_MM = 5.0
LOW_DOSE_CACHE_BYTES = 2 * 2**30  # simulated volumes kept for the next precision (beyond: simulated again)
CONDITIONS = ("reading", "chain", "dose")
SETTINGS = "study.json"
SETTINGS_KEYS = ("data", "model", "dose", "language", "xray", "ct", "max_new_tokens")


@dataclasses.dataclass
class Unit:
    study: RefStudy
    precision: str
    condition: str  # reading / chain / dose

    @property
    def key(self) -> str:
        return f"{self.study.id}|{self.precision}|{self.condition}"


def plan(studies: list[RefStudy], precisions: list[str], dose: float | None) -> list[Unit]:
    """Precision first (one model load each), then readings, chains and the reduced dose."""
    units = []
    for p in precisions:
        units += [Unit(s, p, "reading") for s in studies]
        units += [Unit(s, p, "chain") for s in studies]
        if dose is not None and dose < 1:
            units += [Unit(s, p, "dose") for s in studies if s.modality == "ct"]
    return units


def check_settings(out: str, settings: dict) -> None:
    """A run into ``out`` continues one with the same settings (precisions may be added), or starts one."""
    path = os.path.join(out, SETTINGS)
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        differs = {k: (old.get(k), settings.get(k)) for k in SETTINGS_KEYS if old.get(k) != settings.get(k)}
        if differs:
            raise InputError(f"{out} holds a study run with other settings "
                             f"({', '.join(f'{k}: {a!r} there, {b!r} now' for k, (a, b) in differs.items())}): "
                             f"use another --out")
    os.makedirs(out, exist_ok=True)
    with open(path, "w") as f:
        json.dump(settings, f, indent=1)


# ------------------------------------------------------------------------------------------ matching


def kinds_match(a: str, b: str) -> bool:
    return a == b or "lesion" in (a, b)


def sites_agree(side_a: str, level_a: str, side_b: str, level_b: str) -> bool:
    side = not side_a or not side_b or side_a == side_b or "bilateral" in (side_a, side_b)
    return side and (not level_a or not level_b or level_a == level_b)


def agreement_counts(predicted: list[tuple], reference: list[tuple]) -> dict:
    """True positives of a one-to-one match on (kind, side, level): exact first, then loose (unknown parts)."""
    used, tp = set(), 0
    for exact in (True, False):
        for i, (k, s, lv) in enumerate(reference):
            if ("r", i) in used:
                continue
            for j, (pk, ps, pl) in enumerate(predicted):
                if ("p", j) in used:
                    continue
                ok = (pk, ps, pl) == (k, s, lv) if exact else kinds_match(pk, k) and sites_agree(ps, pl, s, lv)
                if ok:
                    used |= {("r", i), ("p", j)}
                    tp += 1
                    break
    return {"tp": tp, "predicted": len(predicted), "reference": len(reference)}


def _tolerance_sampling(reading, study, n_shown: int, grid: int) -> tuple[float, ...]:
    """``distance_transform_edt`` sampling under which distance 1 is the pointing tolerance."""
    from .evaluation import ct_hit_sampling

    if reading.modality == "ct":
        return ct_hit_sampling(reading.labels.shape, spacing_of(study), n_shown, grid)
    return (grid * 2 / reading.pad.side,) * 2


def _labels(reading, shape) -> np.ndarray:
    labels = np.asarray(reading.labels)
    return labels.reshape(shape) if labels.size == int(np.prod(shape)) else labels


def score_reading(reading, ref: RefStudy, grid: int) -> dict:
    """What the tables need from one reading against its reference (JSON-ready)."""
    study = reading.study
    shape = ref.lesions[0].mask.shape if ref.lesions else np.asarray(reading.labels).shape
    labels = _labels(reading, shape)
    findings = []
    for k, f in enumerate(reading.findings, start=1):
        m = labels == k
        c = centre_index(m) if m.any() else None
        findings.append({"kind": f.kind, "side": f.side, "level": f.level, "certainty": f.certainty,
                         "voxels": int(m.sum()), "centre_mm": None if c is None else to_patient_mm(study, c).round(2).tolist(),
                         "touches": any(bool((m & les.mask).any()) for les in ref.lesions)})
    sampling = _tolerance_sampling(reading, study, len(reading.inputs_index), grid) if ref.lesions else None
    lesions = []
    for les in ref.lesions:
        centre = to_patient_mm(study, centre_index(les.mask))
        item = {"kind": les.kind, "side": les.side, "level": les.level, "diameter_mm": round(float(les.diameter_mm), 2),
                "source": les.source, "matched": None, "on_site": False, "error_mm": None, "hit": 0.0, "strict": 0.0,
                "detected": bool(any(((labels == k) & les.mask).any() for k in range(1, len(reading.findings) + 1)))}
        placed = [i for i, f in enumerate(findings) if f["centre_mm"] is not None]
        at_site = [i for i in placed if sites_agree(findings[i]["side"], findings[i]["level"], les.side, les.level)]
        candidates = at_site or placed
        if candidates:
            dist = {i: float(np.linalg.norm(np.asarray(findings[i]["centre_mm"]) - centre)) for i in candidates}
            best = min(candidates, key=lambda i: (dist[i], i))
            m = labels == best + 1
            c = tuple(int(round(x)) for x in centre_index(m))
            edt = ndimage.distance_transform_edt(~les.mask, sampling=sampling)
            item.update(matched=best, on_site=bool(at_site), error_mm=round(dist[best], 3),
                        hit=float(edt[c] <= 1), strict=float(les.mask[c]))
        lesions.append(item)
    predicted = [(f.kind, f.side, f.level) for f in reading.findings]
    return {"findings": findings, "lesions": lesions, "report": reading.report,
            "agreement": agreement_counts(predicted, ref.reference_findings()) if ref.has_reference else None,
            "false_positives": sum(not f["touches"] for f in findings) if ref.lesions or ref.seed is not None else None}


# ------------------------------------------------------------------------------------------ multi-turn


def _no_findings_statement(answer) -> bool:
    return not answer.findings and any(m.certainty == v.NEGATED and m.kind == "lesion" for m in answer.mentions)


def _same(f, g) -> bool:
    return kinds_match(f.kind, g.kind) and sites_agree(f.side, f.level, g.side, g.level)


def logic_break(first: list, text: str) -> str:
    """Why ``text`` (a later answer) breaks with the first answer's findings ``first``; "" when it does not.
    It denies one of them (negates its kind at its site, or says there is nothing), or names a finding that
    is none of them: on the other side, at another lobe or zone, or of another kind. When the first answer
    named nothing, naming a finding is a break."""
    a = read_answer(text)
    if not first:
        return "names a finding the first answer did not" if a.findings else ""
    for m in a.mentions:
        if m.certainty == v.NEGATED and any(_same(m, f) for f in first):
            return "denies it"
    for f in a.findings:
        if any(_same(f, g) for g in first):
            continue
        same_kind = [g for g in first if kinds_match(f.kind, g.kind)]
        if not same_kind:
            return "another kind"
        if any(sites_agree(f.side, "", g.side, "") for g in same_kind):
            return "another lobe or zone"  # a finding of its kind is on that side, at another level
        return "another side"
    return ""


def key_term_error(text: str, reference: list[tuple]) -> bool:
    """Whether ``text`` names a finding no reference finding has (kind and site), or negates one that is there."""
    a = read_answer(text)
    for f in a.findings:
        if not any(kinds_match(f.kind, k) and sites_agree(f.side, f.level, s, lv) for k, s, lv in reference):
            return True
    for m in a.mentions:
        if m.certainty == v.NEGATED and any(kinds_match(m.kind, k) and sites_agree(m.side, m.level, s, lv)
                                            for k, s, lv in reference):
            return True
    return False


def score_chain(answers: list[str], reference: list[tuple] | None) -> dict:
    """The chain's record: its answers and reference (the tables score them again, with the rules of the
    code that makes the tables), the first answer's findings, the breaks and key-term errors."""
    first = read_answer(answers[0]).findings
    breaks = [logic_break(first, t) for t in answers[1:]]
    return {"answers": answers, "reference": None if reference is None else [list(x) for x in reference],
            "first_findings": [{"kind": f.kind, "side": f.side, "level": f.level} for f in first],
            "breaks": breaks,
            "key_term_errors": None if reference is None else [key_term_error(t, reference) for t in answers]}


# ------------------------------------------------------------------------------------------ running


def _peak_memory_gib(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def _free_device_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def _latency(reading, seconds: float, device: str) -> dict:
    lat = reading.latencies
    return {"total_s": round(seconds, 4), "prefill_s": lat.get("decoder_prefill"), "decode_s": lat.get("decoder_decode"),
            "maps_s": lat.get("maps"), "new_tokens": lat.get("new_tokens"), "prompt_tokens": lat.get("prompt_tokens"),
            "peak_memory_gib": round(_peak_memory_gib(device), 3),
            "peak_memory_kind": "CUDA peak allocated" if device.startswith("cuda") else "process peak RSS"}


class Runner:
    """Runs units for one precision at a time, keeping the loaded reader and simulated volumes."""

    def __init__(self, model, device: str, language: str, dose: float | None, max_new_tokens: int):
        self.model, self.device, self.language, self.dose = model, device, language, dose
        self.max_new_tokens = max_new_tokens
        self.reader, self.precision, self.warm = None, None, set()
        self._low: dict[str, np.ndarray] = {}

    def reader_for(self, precision: str):
        from ..reader import Reader

        if self.precision != precision:
            self.reader = None  # the last precision's weights go before the next are loaded
            _free_device_cache()
            self.precision = precision
            self.reader = Reader(self.model, device=self.device, precision=precision)
        return self.reader

    def low_dose(self, ref: RefStudy, volume):
        from . import lowdose

        low = self._low.get(ref.id)
        if low is None:  # seeded per study: every precision sees the same noise
            seed = ref.seed if ref.seed is not None else zlib.crc32(ref.id.encode())
            low = lowdose.reduced_dose(volume.hu, float(np.mean(volume.spacing[1:])), [self.dose], seed=seed)[self.dose]
            if sum(v.nbytes for v in self._low.values()) + low.nbytes <= LOW_DOSE_CACHE_BYTES:
                self._low[ref.id] = low
        return dataclasses.replace(volume, hu=low)

    def run(self, unit: Unit) -> dict:
        reader = self.reader_for(unit.precision)
        info = reader.info
        record = {"study": unit.key, "study_id": unit.study.id, "modality": unit.study.modality,
                  "precision": unit.precision, "loaded_precision": info.precision, "device": info.device,
                  "condition": unit.condition, "dose": 1.0 if unit.condition != "dose" else self.dose,
                  "language": self.language, "status": "ok", "error": "",
                  "lesions_in_reference": len(unit.study.lesions)}
        study = unit.study.load()
        if unit.condition == "chain":
            answers = reader.converse(study, list(CHAIN[self.language]), self.max_new_tokens, self.language)
            record["chain"] = score_chain(answers, unit.study.reference_findings() if unit.study.has_reference else None)
            return record
        if unit.condition == "dose":
            study = self.low_dose(unit.study, study)
        warm_key = (unit.precision, unit.study.modality)
        if warm_key not in self.warm:  # the first reading of a kind pays one-off costs: not timed
            reader.read(study, None, self.max_new_tokens, language=self.language)
            self.warm.add(warm_key)
        _reset_peak(info.device)
        t0 = time.perf_counter()
        reading = reader.read(study, None, self.max_new_tokens, language=self.language)
        seconds = time.perf_counter() - t0
        record.update(score_reading(reading, unit.study, reader.grid), latency=_latency(reading, seconds, info.device))
        return record


def unavailable(precision: str, why: str) -> dict:
    return {"study": f"*|{precision}|unavailable", "precision": precision, "condition": "unavailable",
            "status": "unavailable", "error": why}


def run_study(studies: list[RefStudy], precisions: list[str], out: str, settings: dict, model=None,
              device: str = "auto", language: str = "zh", dose: float | None = 0.2, max_new_tokens: int = 128,
              progress: bool = True, log=print) -> list[dict]:
    """Run (or continue) the plan into ``out``; the manifest's records (all units, this run's and earlier)."""
    from tqdm import tqdm

    from ..model.loading import ModelLoadError
    from .batch import Manifest

    check_settings(out, settings)
    manifest = Manifest(out)
    done = {k: r for k, r in manifest.load().items() if r.get("status") in ("ok", "unavailable")}
    planned = plan(studies, precisions, dose)
    units = [u for u in planned if u.key not in done and f"*|{u.precision}|unavailable" not in done]
    if len(units) < len(planned):
        log(f"continuing {out}: {len(done)} units done, {len(units)} to run")
    runner = Runner(model, device, language, dose, max_new_tokens)
    bar = tqdm(units, unit="unit", desc="study", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    failed_precisions: set[str] = set()
    for u in bar:
        if u.precision in failed_precisions:
            continue
        bar.set_postfix_str(f"{u.precision} {u.condition}")
        try:
            record = runner.run(u)
        except (InputError, ModelLoadError) as e:
            if runner.reader is None:  # the precision did not load: it is not run at all
                manifest.append(unavailable(u.precision, str(e)))
                failed_precisions.add(u.precision)
                runner.precision = None
                log(f"precision {u.precision} not run: {e}")
                continue
            record = {"study": u.key, "study_id": u.study.id, "precision": u.precision, "condition": u.condition,
                      "modality": u.study.modality, "status": "failed", "error": str(e)}
        except Exception as e:  # noqa: BLE001 (one study's fault is recorded, the run goes on)
            record = {"study": u.key, "study_id": u.study.id, "precision": u.precision, "condition": u.condition,
                      "modality": u.study.modality, "status": "failed", "error": f"{type(e).__name__}: {e}"}
        manifest.append(record)
    return list(manifest.load().values())


def run(data: str, out: str, model=None, precisions: str = "fp32,bf16", dose: float | None = 0.2, language: str = "zh",
        xray: int = 100, ct: int = 30, device: str = "auto", max_new_tokens: int = 128, progress: bool = True,
        log=print) -> list[dict]:
    """The whole study: references, the plan run (or continued) into ``out``, the tables; the records."""
    from . import study_tables
    from ..model.loading import QUANTISED, PRECISIONS
    from .references import folder_studies, phantom_studies

    names = list(dict.fromkeys(p.strip().lower() for p in str(precisions).split(",") if p.strip()))
    bad = [p for p in names if p not in PRECISIONS and p not in QUANTISED]
    if not names or bad:
        raise InputError(f"--precisions: use some of fp32, bf16, fp16, int8, int4 (got {precisions!r})")
    if language not in CHAIN:
        raise InputError(f"--language must be zh or en, got {language!r}")
    if dose is not None and not (0 <= dose <= 1):
        raise InputError(f"--dose must be a fraction in (0, 1] (or 0: none), got {dose}")
    dose = None if not dose or dose >= 1 else float(dose)
    if data == "phantoms":
        if xray < 0 or ct < 0 or xray + ct == 0:
            raise InputError("--xray and --ct: phantom counts, at least one of them above 0")
        refs = phantom_studies(xray, ct)
    else:
        if not os.path.isdir(data):
            raise InputError(f"--data must be 'phantoms' or a folder, got {data!r}")
        refs = folder_studies(data)
        xray = ct = None
    settings = {"data": data if data == "phantoms" else os.path.abspath(data), "model": model or "phantom model",
                "dose": dose, "language": language, "xray": xray, "ct": ct, "max_new_tokens": max_new_tokens,
                "precisions": names, "chain": list(CHAIN[language]), "studies": len(refs),
                "planned_units": len(plan(refs, names, dose))}
    records = run_study(refs, names, out, settings, model, device, language, dose, max_new_tokens, progress, log)
    ok = [r for r in records if r.get("status") == "ok"]
    settings["device"] = ok[0].get("device", "") if ok else ""
    settings["model_label"] = "phantom model (a synthetic test model, not MedGemma)" if model is None else model
    study_tables.write_tables(records, settings, out)
    return records
