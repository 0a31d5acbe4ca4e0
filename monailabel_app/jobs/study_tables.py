"""The study's three tables from its manifest: CSVs, plots with 95 % bootstrap intervals, ``report.md``.

Every cell is a statistic over studies with its 95 % percentile interval from a bootstrap that resamples
studies (:data:`BOOTSTRAP` draws, seeded by the cell's name: the same manifest gives the same tables) and
its n. Ratios (error per lesion, recall, F1, detection) are pooled: the sums of the resampled studies'
numerators over the sums of their denominators. Latency is the median over studies.

* ``localisation.csv`` (table 1): per precision and modality: localisation error, pointing, report
  agreement (precision, recall, F1, studies all matching), latency (total, prefill, decode, maps), peak memory;
* ``multi_turn.csv`` (table 2): per precision: logic breaks per 10 chains, key-term errors per answer;
* ``low_dose.csv`` (table 3): per precision and dose: detection of lesions >= 5 mm, false positives per study.

A precision the run could not load is a row saying so, in every table.
"""

from __future__ import annotations

import csv
import math
import os
import zlib
from collections import Counter

import numpy as np

from .studies import MIN_DIAMETER_MM, score_chain

BOOTSTRAP = 1000
MODALITY_NAMES = {"ct": "CT", "xray": "X-ray"}


# ------------------------------------------------------------------------------------------ statistics


def ratio_ci(num, den, name: str, scale: float = 1.0) -> dict:
    """Pooled ratio sum(num) / sum(den) over studies, with its bootstrap interval (studies resampled)."""
    num, den = np.asarray(num, float), np.asarray(den, float)
    n = int(den.sum()) if den.size and np.allclose(den, np.round(den)) else len(den)
    if den.sum() <= 0:
        return {"value": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0, "studies": len(den)}
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    idx = rng.integers(0, len(den), size=(BOOTSTRAP, len(den)))
    sn, sd = num[idx].sum(1), den[idx].sum(1)
    boots = sn[sd > 0] / sd[sd > 0]
    lo, hi = np.percentile(boots, [2.5, 97.5]) if boots.size else (float("nan"),) * 2
    return {"value": scale * num.sum() / den.sum(), "lo": scale * float(lo), "hi": scale * float(hi), "n": n,
            "studies": len(den)}


def median_ci(values, name: str) -> dict:
    values = np.asarray([x for x in values if x is not None], float)
    if not values.size:
        return {"value": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0, "studies": 0}
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    boots = np.median(values[rng.integers(0, values.size, size=(BOOTSTRAP, values.size))], axis=1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"value": float(np.median(values)), "lo": float(lo), "hi": float(hi), "n": int(values.size),
            "studies": int(values.size)}


def cell(stat: dict, digits: int = 2, unit: str = "") -> str:
    if stat is None or stat["n"] == 0 or math.isnan(stat["value"]):
        return f"– (n={stat['n'] if stat else 0})"
    return f"{stat['value']:.{digits}f}{unit} [{stat['lo']:.{digits}f}–{stat['hi']:.{digits}f}] (n={stat['n']})"


# ------------------------------------------------------------------------------------------ tables


def _groups(records, condition, keys):
    out: dict[tuple, list] = {}
    for r in records:
        if r.get("condition") == condition and r.get("status") == "ok":
            out.setdefault(tuple(r[k] for k in keys), []).append(r)
    for rows in out.values():
        rows.sort(key=lambda r: r["study"])
    return out


def _unavailable(records, precisions=()) -> dict[str, str]:
    """Precisions without a result, and why: could not run here, or no unit of theirs finished (a run
    stopped before it reached them)."""
    out = {r["precision"]: r["error"] for r in records if r.get("status") == "unavailable"}
    ran = {r.get("precision") for r in records if r.get("status") == "ok"}
    return {**{p: "no unit of this precision finished (the run stopped before it)" for p in precisions
               if p not in ran and p not in out}, **out}


def localisation_table(records, precisions) -> list[dict]:
    rows = []
    groups = _groups(records, "reading", ("precision", "modality"))
    missing = _unavailable(records, precisions)
    for p in precisions:
        if p in missing:
            rows.append({"precision": p, "modality": "", "note": f"not run: {missing[p]}"})
            continue
        for modality in ("xray", "ct"):
            group = groups.get((p, modality))
            if not group:
                continue
            name = f"{p}/{modality}"
            matched = [[les for les in r["lesions"] if les["error_mm"] is not None] for r in group]
            agree = [r["agreement"] for r in group if r.get("agreement")]
            lat = [r["latency"] for r in group]
            row = {"precision": p, "modality": modality, "loaded_precision": group[0].get("loaded_precision", p),
                   "device": group[0].get("device", ""), "studies": len(group),
                   "lesions": sum(len(r["lesions"]) for r in group),
                   "localisation_error_mm": ratio_ci([sum(les["error_mm"] for les in m) for m in matched],
                                                     [len(m) for m in matched], name + "/error"),
                   "matched_on_site": ratio_ci([sum(les["on_site"] for les in m) for m in matched],
                                               [len(m) for m in matched], name + "/on_site", 100),
                   "pointing": ratio_ci([sum(les["hit"] for les in r["lesions"]) for r in group],
                                        [len(r["lesions"]) for r in group], name + "/pointing", 100),
                   "agreement_precision": ratio_ci([a["tp"] for a in agree], [a["predicted"] for a in agree], name + "/p", 100),
                   "agreement_recall": ratio_ci([a["tp"] for a in agree], [a["reference"] for a in agree], name + "/r", 100),
                   "agreement_f1": ratio_ci([2 * a["tp"] for a in agree], [a["predicted"] + a["reference"] for a in agree],
                                            name + "/f1", 100),
                   "all_match": ratio_ci([float(a["tp"] == a["predicted"] == a["reference"]) for a in agree],
                                         [1.0] * len(agree), name + "/all", 100),
                   "latency_s": median_ci([x["total_s"] for x in lat], name + "/latency"),
                   "prefill_s": median_ci([x["prefill_s"] for x in lat], name + "/prefill"),
                   "decode_s": median_ci([x["decode_s"] for x in lat], name + "/decode"),
                   "maps_s": median_ci([x["maps_s"] for x in lat], name + "/maps"),
                   "peak_memory_gib": max(x["peak_memory_gib"] for x in lat),
                   "peak_memory_kind": lat[0]["peak_memory_kind"], "note": ""}
            if row["studies"] and not agree:
                row["note"] = "no reference findings"
            rows.append(row)
    return rows


def multi_turn_table(records, precisions) -> list[dict]:
    rows = []
    groups = _groups(records, "chain", ("precision",))
    missing = _unavailable(records, precisions)
    for p in precisions:
        if p in missing:
            rows.append({"precision": p, "note": f"not run: {missing[p]}"})
            continue
        group = groups.get((p,))
        if not group:
            continue
        chains = [score_chain(r["chain"]["answers"], r["chain"]["reference"]) for r in group]
        scored = [c for c in chains if c["key_term_errors"] is not None]
        reasons = Counter(b for c in chains for b in c["breaks"] if b)
        rows.append({"precision": p, "language": group[0].get("language", ""), "chains": len(chains),
                     "answers": sum(len(c["answers"]) for c in chains),
                     "logic_breaks_per_10": ratio_ci([sum(bool(b) for b in c["breaks"]) for c in chains], [1.0] * len(chains),
                                                     f"{p}/breaks", 10),
                     "chains_with_a_break": ratio_ci([float(any(c["breaks"])) for c in chains], [1.0] * len(chains),
                                                     f"{p}/chains_broken", 100),
                     "key_term_error_rate": ratio_ci([sum(c["key_term_errors"]) for c in scored],
                                                     [len(c["key_term_errors"]) for c in scored], f"{p}/key_terms", 100),
                     "break_reasons": "; ".join(f"{k}: {n}" for k, n in sorted(reasons.items())), "note": ""})
    return rows


def low_dose_table(records, precisions, dose) -> list[dict]:
    rows = []
    missing = _unavailable(records, precisions)
    full = _groups([r for r in records if r.get("modality") == "ct"], "reading", ("precision",))
    low = _groups(records, "dose", ("precision",))
    for p in precisions:
        if p in missing:
            rows.append({"precision": p, "dose": "", "note": f"not run: {missing[p]}"})
            continue
        for d, group in ((1.0, full.get((p,))), (dose, low.get((p,)))):
            if not group:
                continue
            big = [[les for les in r["lesions"] if les["diameter_mm"] >= MIN_DIAMETER_MM] for r in group]
            fp = [r for r in group if r.get("false_positives") is not None]
            rows.append({"precision": p, "dose": d, "studies": len(group),
                         "detection": ratio_ci([sum(les["detected"] for les in b) for b in big], [len(b) for b in big],
                                               f"{p}/{d}/detection", 100),
                         "false_positives_per_study": ratio_ci([r["false_positives"] for r in fp], [1.0] * len(fp),
                                                               f"{p}/{d}/fp"),
                         "note": ""})
    return rows


# ------------------------------------------------------------------------------------------ files


def _flat(row: dict) -> dict:
    out = {}
    for k, val in row.items():
        if isinstance(val, dict):
            for part in ("value", "lo", "hi", "n"):
                x = val[part]
                out[f"{k}_{part}" if part != "value" else k] = "" if isinstance(x, float) and math.isnan(x) else (
                    round(x, 4) if isinstance(x, float) else x)
        else:
            out[k] = round(val, 4) if isinstance(val, float) else val
    return out


def write_csv(rows: list[dict], path: str) -> None:
    flat = [_flat(r) for r in rows]
    fields = list(dict.fromkeys(k for r in flat for k in r))
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(flat)


def _errorbars(ax, labels, stats, colour, offset=0.0, label=None):
    xs = np.arange(len(labels)) + offset
    vals = [s["value"] if s and s["n"] else np.nan for s in stats]
    lo = [s["value"] - s["lo"] if s and s["n"] else 0 for s in stats]
    hi = [s["hi"] - s["value"] if s and s["n"] else 0 for s in stats]
    ax.errorbar(xs, vals, yerr=[lo, hi], fmt="o", color=colour, capsize=4, label=label)


def plot(tables: dict, precisions: list[str], out: str, title: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    t1 = [r for r in tables["localisation"] if r.get("modality")]
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.8))
    for ax, (key, ylabel) in zip(axes, (("localisation_error_mm", "localisation error (mm)"), ("pointing", "pointing (%)"),
                                        ("agreement_f1", "report agreement F1 (%)"), ("latency_s", "time per reading (s)"))):
        for i, modality in enumerate(("xray", "ct")):
            stats = [next((r[key] for r in t1 if r["precision"] == p and r["modality"] == modality), None) for p in precisions]
            _errorbars(ax, precisions, stats, f"C{i}", (i - 0.5) * 0.2, MODALITY_NAMES[modality])
        _axis(ax, ylabel, precisions)
    axes[0].legend(fontsize=8)
    files.append(_save(fig, out, "precision.png", f"{title}: per precision, 95 % bootstrap intervals (not run: no point)"))

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
    t2 = tables["multi_turn"]
    for ax, (key, ylabel) in zip(axes, (("logic_breaks_per_10", "logic breaks per 10 chains"),
                                        ("key_term_error_rate", "key-term errors (% of answers)"))):
        _errorbars(ax, precisions, [next((r.get(key) for r in t2 if r["precision"] == p), None) for p in precisions], "C2")
        _axis(ax, ylabel, precisions)
    files.append(_save(fig, out, "multi_turn.png", f"{title}: three-question chain"))

    t3 = [r for r in tables["low_dose"] if r.get("dose") != ""]
    if t3:
        fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
        for ax, (key, ylabel) in zip(axes, (("detection", "detection of lesions ≥ 5 mm (%)"),
                                            ("false_positives_per_study", "false positives per study"))):
            for i, p in enumerate(precisions):
                rows = sorted((r for r in t3 if r["precision"] == p), key=lambda r: -r["dose"])
                if not rows:
                    continue
                xs = [r["dose"] for r in rows]
                vals = [r[key]["value"] for r in rows]
                err = [[r[key]["value"] - r[key]["lo"] for r in rows], [r[key]["hi"] - r[key]["value"] for r in rows]]
                ax.errorbar(xs, vals, yerr=err, marker="o", capsize=4, color=f"C{i}", label=p)
            ax.set_xscale("log")
            ax.invert_xaxis()
            ax.set_xlabel("dose fraction")
            _axis(ax, ylabel)
        axes[0].legend(fontsize=8)
        files.append(_save(fig, out, "low_dose.png", f"{title}: detection vs simulated dose"))
    return files


def _axis(ax, ylabel: str, precisions=None) -> None:
    if precisions is not None:
        ax.set_xticks(range(len(precisions)), precisions)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def _save(fig, out, name, title: str) -> str:
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, name), dpi=100)
    plt.close(fig)
    return name


def report_md(tables: dict, settings: dict, records: list[dict]) -> str:
    failed = [r for r in records if r.get("status") == "failed"]
    finished = sum(r.get("status") == "ok" for r in records)
    lines = [f"# Precision, multi-turn and low-dose study: {settings.get('model_label') or settings.get('model')}", "",
             f"Data: {settings['data']} ({settings.get('studies', '?')} studies); answers in "
             f"{'Chinese' if settings['language'] == 'zh' else 'English'}; reduced dose {settings.get('dose')}; "
             f"device {settings.get('device', '')}. Each cell: value [95 % bootstrap interval over studies] (n). "
             "Definitions: the README's \"Precision, multi-turn and low-dose study\".",
             f"Units finished: {finished} of {settings.get('planned_units', '?')} planned.", ""]
    if failed:
        lines += [f"{len(failed)} units failed and are left out of the tables (their errors are in manifest.jsonl).", ""]
    lines += ["## 1. Localisation, report agreement and time per reading", ""]
    lines += _md(("precision", "modality", "localisation error (mm)", "pointing (%)", "report agreement F1 (%)",
                  "all findings match (%)", "time per reading (s)", "prefill / decode / maps (s)", "peak memory (GiB)"),
                 tables["localisation"], lambda r: (
        MODALITY_NAMES[r["modality"]], cell(r["localisation_error_mm"], 1), cell(r["pointing"], 1),
        cell(r["agreement_f1"], 1), cell(r["all_match"], 1), cell(r["latency_s"], 2),
        f"{r['prefill_s']['value']:.2f} / {r['decode_s']['value']:.2f} / {r['maps_s']['value']:.2f}",
        f"{r['peak_memory_gib']:.2f} ({r['peak_memory_kind']})"))
    lines += ["", "## 2. Multi-turn coherence (the three chained questions)", "",
              "Questions: " + " / ".join(f"“{q}”" for q in settings.get("chain", [])), ""]
    lines += _md(("precision", "chains", "logic breaks per 10 chains", "chains with a break (%)",
                  "key-term error rate (% of answers)", "breaks by reason"), tables["multi_turn"], lambda r: (
        r["chains"], cell(r["logic_breaks_per_10"], 2), cell(r["chains_with_a_break"], 1),
        cell(r["key_term_error_rate"], 1), r["break_reasons"] or "–"))
    lines += ["", f"## 3. CT at reduced dose: lesions ≥ {MIN_DIAMETER_MM:g} mm", ""]
    lines += _md(("precision", "dose", "studies", "detection (%)", "false positives per study"), tables["low_dose"],
                 lambda r: (f"{r['dose']:g}", r["studies"], cell(r["detection"], 1), cell(r["false_positives_per_study"], 2)))
    lines += ["", "Files: `localisation.csv`, `multi_turn.csv`, `low_dose.csv`, `precision.png`, `multi_turn.png`, "
              "`low_dose.png`; every unit's record in `manifest.jsonl`.", ""]
    return "\n".join(lines)


def _md(header: tuple, rows: list[dict], cells) -> list[str]:
    """A markdown table: each row's precision, then ``cells(row)``; a precision not run says why instead."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        rest = [r["note"]] + [""] * (len(header) - 2) if r.get("note", "").startswith("not run") else list(cells(r))
        out.append("| " + " | ".join(str(x) for x in [r["precision"], *rest]) + " |")
    return out


def write_tables(records: list[dict], settings: dict, out: str) -> dict:
    """All outputs of the run in ``out``; the tables."""
    precisions = settings["precisions"]
    tables = {"localisation": localisation_table(records, precisions), "multi_turn": multi_turn_table(records, precisions),
              "low_dose": low_dose_table(records, precisions, settings.get("dose"))}
    for name, rows in tables.items():
        write_csv(rows, os.path.join(out, f"{name}.csv"))
    plot(tables, precisions, out, settings.get("model_label") or os.path.basename(str(settings.get("model"))))
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write(report_md(tables, settings, records))
    return tables
