#!/usr/bin/env python
"""Grounding evaluation on held-out phantoms, X-ray and CT, with the image-matters control and ablations.

    .venv/bin/python bench/grounding.py [--seeds 0:150] [--ct-seeds 0:30] [--model DIR] [--language en|zh]
                                        [--out bench/results/grounding.md] [--json FILE] [--no-ablations]

Per modality it prints (and writes as markdown) the four maps side by side: (a) raw attention, (b) final
masks, (c) the text-only baseline, (d) chance, with pointing game (within half a token cell, and strict)
and Dice; then rows for

* the control: the same final-mask method on the phantom's lesion-free twin, the model made to say its
  original words (it must lose >= 0.3 of the pointing game: the masks come from the image);
* the image extent off (``"extent": "attention"``): the masks as the attention's own region;
* ablations of the mask method: each gate removed, and for CT direct attention instead of rollout.

Definitions in monailabel_app/jobs/evaluation.py; the method in monailabel_app/grounding/ and reader.py.
Seeds 0..99999 were never used in training; calibration used 20000 and up.
"""

import argparse
import copy
import json
import os
import sys
import time
from contextlib import contextmanager

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from monailabel_app.grounding.study_maps import DEFAULT_CT_GATES, DEFAULT_XRAY_GATES, entry_for  # noqa: E402
from monailabel_app.jobs.evaluation import evaluate, evaluate_ct, lobe_priors, table, zone_priors  # noqa: E402
from monailabel_app.phantoms.ct import make_ct_phantom, phantom_volume  # noqa: E402
from monailabel_app.reader import Reader  # noqa: E402


@contextmanager
def settings(reader, ct: bool, **overrides):
    """Temporarily change the reader's grounding settings for one modality."""
    saved = copy.deepcopy(reader.info.grounding)
    (reader.info.grounding["ct"] if ct else reader.info.grounding).update(overrides)
    try:
        yield
    finally:
        reader.info.grounding = saved


def ct_reader(reader, control: bool = False, language: str = "en"):
    """``read(phantom)`` for :func:`evaluate_ct` straight through the engine (control: on the twin)."""

    def read(ph):
        reading = reader.read(phantom_volume(ph), language=language)
        if control:
            twin = phantom_volume(make_ct_phantom(ph.seed, lesions=False))
            reading = reader.read(twin, answer=reading.report, language=language)
        return reading.findings_json(), reading.labels

    return read


def method(entry: dict, language: str, gates: str) -> str:
    """The mask method's row name: the entry as it applies to answers in ``language`` (study_maps.entry_for)."""
    g = entry_for(entry, language)
    which = f"; the entry for answers in {language}" if g is not entry else ""
    return f"(b) final masks: layers {g['layers']}{' rolled out' if g.get('rollout') else ''}, {gates} (the method{which})"


def row(name: str, result: dict) -> str:
    s = result["maps"]["b_final_masks"]
    detected = f" {result['lesions_detected']:.3f} |" if "lesions_detected" in result else ""
    return f"| {name} | {s['pointing']:.3f} | {s['pointing_strict']:.3f} | {s['dice']:.3f} |{detected}"


def run_xray(reader, seeds, ablations: bool, language: str = "en") -> tuple[dict, list[str]]:
    priors = zone_priors()
    main = evaluate(reader, seeds, priors, language=language)
    rows = [row(method(reader.info.grounding, language, "side + zone gates, extent from the image"), main),
            row("control: lesion-free twin, the model's own words",
                evaluate(reader, seeds, priors, control=True, language=language))]
    with settings(reader, False, extent="attention"):
        rows.append(row("image extent off: the attention's own region (the masks before issue 19)",
                        evaluate(reader, seeds, priors, language=language)))
    if ablations:
        gates = reader.info.grounding.get("gates", DEFAULT_XRAY_GATES)
        for g in gates:
            with settings(reader, False, gates=[x for x in gates if x != g]):
                rows.append(row(f"ablation: without the {g} gate", evaluate(reader, seeds, priors)))
        with settings(reader, False, gates=[]):
            rows.append(row("ablation: no gates (raw heatmap's half-max region)", evaluate(reader, seeds, priors)))
        rollout = bool(reader.info.grounding.get("rollout"))
        with settings(reader, False, rollout=not rollout):
            rows.append(row(f"ablation: {'direct attention instead of rollout' if rollout else 'rollout'}",
                            evaluate(reader, seeds, priors)))
    return main, rows


def run_ct(reader, seeds, ablations: bool, language: str = "en") -> tuple[dict, list[str]]:
    priors = lobe_priors()
    slices = reader.ct["max_slices"]
    main = evaluate_ct(ct_reader(reader, language=language), seeds, slices, reader.grid, priors)
    rows = [row(method(reader.ct, language, "body + side + lung gates, extent from the image"), main),
            row("control: lesion-free twin, the model's own words",
                evaluate_ct(ct_reader(reader, control=True, language=language), seeds, slices, reader.grid, priors))]
    with settings(reader, True, extent="attention"):
        rows.append(row("image extent off: the attention's own region (the masks before issue 19)",
                        evaluate_ct(ct_reader(reader, language=language), seeds, slices, reader.grid, priors)))
    if ablations:
        gates = reader.ct.get("gates", DEFAULT_CT_GATES)
        for g in gates:
            with settings(reader, True, gates=[x for x in gates if x != g]):
                rows.append(row(f"ablation: without the {g} gate",
                                evaluate_ct(ct_reader(reader), seeds, slices, reader.grid, priors)))
        rollout = bool(reader.ct.get("rollout"))
        with settings(reader, True, rollout=not rollout):
            rows.append(row(f"ablation: {'direct attention instead of rollout' if rollout else 'rollout'}",
                            evaluate_ct(ct_reader(reader), seeds, slices, reader.grid, priors)))
    return main, rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0:150", help="START:STOP of held-out X-ray phantom seeds ('' to skip)")
    ap.add_argument("--ct-seeds", default="0:30", help="START:STOP of held-out CT phantom seeds ('' to skip)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--no-ablations", action="store_true")
    ap.add_argument("--language", choices=("en", "zh"), default="en", help="ask the model in this language")
    ap.add_argument("--precision", default="fp32", help="fp32 (default: the same numbers on every CPU) or bf16, ...")
    ap.add_argument("--out", default=None, help="write the tables here as markdown")
    ap.add_argument("--json", default=None, help="also write the main results here")
    args = ap.parse_args()
    reader = Reader(args.model, precision=args.precision)
    lines = [f"# Grounding on held-out phantoms ({time.strftime('%Y-%m-%d')}, {reader.info.device}, "
             f"{reader.info.precision}, model {reader.info.public().get('label') or args.model or 'phantom'}, "
             f"asked in {'Chinese' if args.language == 'zh' else 'English'})", ""]
    results = {}
    for key, spec, run in (("xray", args.seeds, run_xray), ("ct", args.ct_seeds, run_ct)):
        if not spec:
            continue
        start, stop = (int(x) for x in spec.split(":"))
        t0 = time.time()
        result, rows = run(reader, range(start, stop), not args.no_ablations, args.language)
        result["seconds"] = round(time.time() - t0, 1)
        results[key] = result
        lines += [f"## {'Radiographs' if key == 'xray' else 'CT volumes'}, seeds {start}..{stop - 1}", "",
                  table(result), "", "| final-mask variant | pointing | pointing (strict) | Dice |"
                  + (" lesions detected |" if key == "ct" else ""), "|---|---|---|---|" + ("---|" if key == "ct" else ""),
                  *rows, "", f"({result['seconds']} s)", ""]
        print("\n".join(lines[-(len(rows) + 8):]), flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
