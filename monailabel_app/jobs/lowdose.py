"""Do the findings hold up at lower CT dose? Simulated reduced dose, the findings at each, their agreement.

    medgemma-label lowdose -i CT [CT ...] | --phantoms N  -o OUT [--doses 1.0,0.5,0.25,0.1] [--precisions fp32,bf16]

**Simulation** (projection domain, slice by slice; Zeng et al., "A simple low-dose X-ray CT simulation from
high-dose scan", IEEE Trans. Nucl. Sci. 62(5), 2015): each axial slice's attenuation (HU -> mu, water
0.0192/mm) is forward-projected (parallel beam, scikit-image ``radon``), giving line integrals ``p``. The
scan is taken as acquired with ``photons`` incident per detector bin, so its own data already carry the
full-dose noise. Data at dose fraction ``a`` would have Poisson counts of mean ``a N`` (N = photons
exp(-p)) plus electronic noise of variance ``sigma_e^2``; the noise to add to ``p`` has variance

    (1 - a) / a / N * (1 + (1 + a) / a * sigma_e^2 / N)

(Gaussian of that variance: the approximation of the paper, accurate at CT count levels). Only that
noise is filtered back-projected (ramp filter) and added to the slice, so the scan itself is never
re-reconstructed: the mean HU is kept and the noise standard deviation grows as 1/sqrt(a).

**Agreement** with the reference (first precision, dose 1.0), per study, precision and dose: share of
reference findings present (same kind), at the same place (same kind, side and level), extra findings,
mask Dice of the findings at the same place, Pearson correlation of the heatmaps; on phantoms also the
lesions detected (the finding's mask overlaps the lesion) and the pointing game against the known
lesions. Writes ``lowdose.csv``, ``agreement.png``, ``examples.png`` and ``report.md``.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import zlib

import numpy as np

MU_WATER = 0.0192  # 1/mm, water at about 70 keV
PHOTONS = 1.5e5  # incident photons per detector bin at full dose (a clinical order of magnitude)
ELECTRONIC_NOISE = 10.0  # standard deviation of the detector's electronic noise, in counts
CSV_FIELDS = ("study", "precision", "dose", "findings", "reference_findings", "present", "same_place", "extra",
              "mask_dice", "heatmap_r", "lesions", "detected", "pointing", "added_noise_sd_hu", "report")


# ------------------------------------------------------------------------------------------ simulation


def _square(hu: np.ndarray) -> tuple[np.ndarray, tuple[slice, slice]]:
    ny, nx = hu.shape
    side = max(ny, nx)
    out = np.full((side, side), -1000.0, np.float64)  # air around a non-square slice
    y0, x0 = (side - ny) // 2, (side - nx) // 2
    crop = (slice(y0, y0 + ny), slice(x0, x0 + nx))
    out[crop] = hu
    return out, crop


def reduced_dose(hu: np.ndarray, pixel_mm: float, doses, photons: float = PHOTONS,
                 electronic_noise: float = ELECTRONIC_NOISE, angles: int = 180, seed: int = 0) -> dict[float, np.ndarray]:
    """The volume ``hu`` (z, y, x; axial slices) at each dose fraction in ``doses`` (1.0: the scan itself).

    One forward projection per slice serves every dose; each dose's noise is drawn from its own seeded
    generator (same study, same seed: same volumes)."""
    from skimage.transform import iradon, radon

    doses = [float(d) for d in doses]
    if any(not (0 < d <= 1) for d in doses):
        raise ValueError(f"dose fractions must be in (0, 1], got {doses}")
    out = {d: np.array(hu, np.float32, copy=True) for d in doses}
    lower = [d for d in doses if d < 1]
    if not lower:
        return out
    theta = np.linspace(0.0, 180.0, angles, endpoint=False)
    for z in range(hu.shape[0]):
        square, crop = _square(hu[z])
        mu = MU_WATER * np.clip(1.0 + square / 1000.0, 0.0, None)
        p = radon(mu, theta, circle=False) * pixel_mm  # line integrals (dimensionless)
        counts = photons * np.exp(-p)
        for d in lower:
            rng = np.random.default_rng([seed, int(round(d * 1e6)), z])
            var = (1 - d) / d / counts * (1 + (1 + d) / d * electronic_noise**2 / counts)
            noise = rng.standard_normal(p.shape) * np.sqrt(var)
            dmu = iradon(noise / pixel_mm, theta, circle=False, filter_name="ramp", output_size=square.shape[0])
            out[d][z] += (1000.0 * dmu / MU_WATER)[crop].astype(np.float32)
    return out


def acquired(hu_clean: np.ndarray, pixel_mm: float, photons: float = PHOTONS, electronic_noise: float = ELECTRONIC_NOISE,
             angles: int = 180, seed: int = 0) -> np.ndarray:
    """A noise-free volume as if scanned with ``photons`` per bin: the full-dose noise a real scan has
    (Poisson counts, electronic noise, log, the same filtered back-projection). For test phantoms."""
    from skimage.transform import iradon, radon

    theta = np.linspace(0.0, 180.0, angles, endpoint=False)
    out = np.array(hu_clean, np.float32, copy=True)
    for z in range(hu_clean.shape[0]):
        square, crop = _square(hu_clean[z])
        p = radon(MU_WATER * np.clip(1.0 + square / 1000.0, 0.0, None), theta, circle=False) * pixel_mm
        rng = np.random.default_rng([seed, z])
        counts = rng.poisson(photons * np.exp(-p)) + rng.normal(0.0, electronic_noise, p.shape)
        p_noisy = -np.log(np.clip(counts, 1.0, None) / photons)
        dmu = iradon((p_noisy - p) / pixel_mm, theta, circle=False, filter_name="ramp", output_size=square.shape[0])
        out[z] += (1000.0 * dmu / MU_WATER)[crop].astype(np.float32)
    return out


# ------------------------------------------------------------------------------------------ agreement


def _match(ref: list, other: list) -> tuple[list[tuple[int, int]], int, int]:
    """(pairs at the same place, findings present, extra) of ``other``'s findings against ``ref``'s
    (Finding objects, index pairs into the lists; same place = same kind, side and level)."""
    pairs, used = [], set()
    for i, f in enumerate(ref):
        j = next((j for j, g in enumerate(other) if j not in used and (g.kind, g.side, g.level) == (f.kind, f.side, f.level)), None)
        if j is not None:
            pairs.append((i, j))
            used.add(j)
    present = len(pairs)
    for i, f in enumerate(ref):
        if any(i == a for a, _ in pairs):
            continue
        j = next((j for j, g in enumerate(other) if j not in used and g.kind == f.kind), None)
        if j is not None:
            used.add(j)
            present += 1
    return pairs, present, len(other) - len(used)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 1.0


def _heatmap(reading) -> np.ndarray | None:
    return np.max(np.stack(reading.heatmaps), axis=0) if reading.heatmaps else None


def agreement(ref, reading) -> dict:
    """How ``reading`` agrees with ``ref`` (two readings of one study on the same grid)."""
    pairs, present, extra = _match(ref.findings, reading.findings)
    n = len(ref.findings)
    dice = [_dice(ref.labels == i + 1, reading.labels == j + 1) for i, j in pairs]
    h0, h1 = _heatmap(ref), _heatmap(reading)
    r = float("nan")
    if h0 is not None and h1 is not None and h0.std() > 0 and h1.std() > 0:
        r = float(np.corrcoef(h0.ravel(), h1.ravel())[0, 1])
    return {"reference_findings": n, "findings": len(reading.findings), "present": present / n if n else float("nan"),
            "same_place": len(pairs) / n if n else float("nan"), "extra": extra,
            "mask_dice": float(np.mean(dice)) if dice else float("nan"), "heatmap_r": r}


# ------------------------------------------------------------------------------------------ the study


@dataclasses.dataclass
class Study:
    name: str
    volume: object  # ct.CTVolume
    phantom: object = None  # ct_phantoms.CTPhantom when the truth is known


def load_studies(paths, phantoms: int = 0, limits=None) -> list[Study]:
    from ..io.ct import load_ct
    from ..phantoms.ct import make_ct_phantom, phantom_volume

    studies = [Study(os.path.basename(os.path.normpath(p)), load_ct(p, limits)) for p in paths]
    for seed in range(phantoms):
        ph = make_ct_phantom(seed)
        studies.append(Study(f"ct_phantom_{seed}", phantom_volume(ph), ph))
    return studies


def run(studies: list[Study], doses, precisions, out: str, model=None, device: str = "auto", question=None,
        max_new_tokens: int = 128, photons: float = PHOTONS, electronic_noise: float = ELECTRONIC_NOISE,
        angles: int = 180, log=print) -> list[dict]:
    """Simulate, read and compare; write the CSV, the plots and the report; the CSV rows."""
    from ..reader import Reader
    from .evaluation import evaluate_ct

    doses = sorted({float(d) for d in doses} | {1.0}, reverse=True)
    os.makedirs(out, exist_ok=True)
    volumes = {}
    for s in studies:
        spacing = float(np.mean(s.volume.spacing[1:]))
        volumes[s.name] = reduced_dose(s.volume.hu, spacing, doses, photons, electronic_noise, angles,
                                       seed=zlib.crc32(s.name.encode()) if s.phantom is None else s.phantom.seed)
        log(f"simulated {s.name}: {s.volume.shape} at doses {doses}")
    rows, readings = [], {}
    reference = {}
    for precision in precisions:
        reader = Reader(model, device=device, precision=precision)
        for d in doses:
            for s in studies:
                vol = dataclasses.replace(s.volume, hu=volumes[s.name][d])
                reading = reader.read(vol, question, max_new_tokens)
                readings[(precision, d, s.name)] = reading
                reference.setdefault(s.name, reading)  # the first precision's full dose
                row = {"study": s.name, "precision": reader.info.precision, "dose": d, "report": reading.report,
                       **agreement(reference[s.name], reading),
                       "added_noise_sd_hu": float(np.std(volumes[s.name][d] - s.volume.hu))}
                if s.phantom is not None:
                    truth = evaluate_ct(lambda ph, r=reading: (r.findings_json(), r.labels), [s.phantom.seed],
                                        reader.ct["max_slices"], text_only=False)  # its baseline unused here
                    row.update(lesions=truth["lesions"], detected=truth["lesions_detected"],
                               pointing=truth["maps"]["b_final_masks"]["pointing"])
                rows.append(row)
                log(f"{s.name} {reader.info.precision} dose {d:g}: {reading.report}")
    write_csv(rows, os.path.join(out, "lowdose.csv"))
    table = summarise(rows)
    plot_agreement(table, os.path.join(out, "agreement.png"), readings[(precisions[0], 1.0, studies[0].name)].model.get("label")
                   or readings[(precisions[0], 1.0, studies[0].name)].model.get("id", ""))
    plot_examples(studies[0], doses, [readings[(precisions[0], d, studies[0].name)] for d in doses], volumes[studies[0].name],
                  os.path.join(out, "examples.png"))
    write_report(table, rows, studies, doses, dict(photons=photons, electronic_noise=electronic_noise, angles=angles),
                 os.path.join(out, "report.md"))
    return rows


# ------------------------------------------------------------------------------------------ outputs


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:g}" if k == "dose" else f"{v:.4f}" if isinstance(v, float) and not math.isnan(v)
                            else "" if isinstance(v, float) else v) for k, v in r.items()})


def _mean(values) -> float:
    v = [x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(v)) if v else float("nan")


def summarise(rows: list[dict]) -> list[dict]:
    """Per precision and dose: the means over studies (lesion-weighted for the phantom truth)."""
    out = []
    for key in dict.fromkeys((r["precision"], r["dose"]) for r in rows):
        group = [r for r in rows if (r["precision"], r["dose"]) == key]
        lesions = sum(r.get("lesions", 0) for r in group)
        weighted = lambda k: (sum(r.get(k, 0) * r.get("lesions", 0) for r in group) / lesions) if lesions else float("nan")  # noqa: E731
        out.append({"precision": key[0], "dose": key[1], "studies": len(group),
                    **{k: _mean(r[k] for r in group) for k in ("present", "same_place", "mask_dice", "heatmap_r", "added_noise_sd_hu")},
                    "extra": _mean(r["extra"] for r in group), "lesions": lesions,
                    "detected": weighted("detected"), "pointing": weighted("pointing")})
    return out


def plot_agreement(table: list[dict], path: str, model: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = ["-", "--", ":", "-."]
    for p_i, precision in enumerate(dict.fromkeys(t["precision"] for t in table)):
        rows = [t for t in table if t["precision"] == precision]
        x = [t["dose"] for t in rows]
        for key, colour in (("present", "C0"), ("same_place", "C1"), ("mask_dice", "C2"), ("heatmap_r", "C3"),
                            ("detected", "C4"), ("pointing", "C5")):
            y = [t[key] for t in rows]
            if all(math.isnan(v) for v in y):
                continue
            ax.plot(x, y, styles[p_i % 4], color=colour, marker="o", label=f"{key.replace('_', ' ')} ({precision})")
    ax.set_xscale("log")
    doses = sorted({t["dose"] for t in table})
    ax.set_xticks(doses, [f"{d:g}" for d in doses])
    ax.minorticks_off()
    ax.set_xlabel("dose fraction (1.0 = the scan as acquired)")
    ax.set_ylabel("agreement with full dose / truth")
    ax.set_ylim(-0.05, 1.05)
    ax.invert_xaxis()
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title(f"Findings at simulated reduced dose ({model})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_examples(study: Study, doses, readings, volumes: dict, path: str) -> None:
    """One slice (the reference's strongest finding, else the middle) at every dose, masks outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref, z = readings[0], None
    if ref.extras and ref.extras[0].get("strongest_slice"):
        z = ref.extras[0]["strongest_slice"]["index"]
    z = study.volume.shape[0] // 2 if z is None else int(z)
    fig, axes = plt.subplots(1, len(doses), figsize=(3.2 * len(doses), 3.6))
    for ax, d, reading in zip(np.atleast_1d(axes), doses, readings):
        ax.imshow(np.clip(volumes[d][z], -1000, 400), cmap="gray", vmin=-1000, vmax=400)
        labels = reading.display_labels if reading.display_labels is not None else None
        if labels is not None and labels[z].any():
            ax.contour(labels[z], levels=np.arange(0.5, labels.max() + 1), cmap="autumn", linewidths=1.2)
        ax.set_title(f"dose {d:g}: {len(reading.findings)} finding(s)", fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{study.name}, display slice {z} (patient left on the image right)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt(v) -> str:
    return "-" if isinstance(v, float) and math.isnan(v) else (f"{v:.3f}" if isinstance(v, float) else str(v))


def write_report(table: list[dict], rows: list[dict], studies, doses, sim: dict, path: str) -> None:
    lines = ["# Findings at simulated reduced CT dose", "",
             f"{len(studies)} studies ({sum(s.phantom is not None for s in studies)} phantoms with known lesions); doses "
             f"{', '.join(f'{d:g}' for d in doses)}; simulation: projection-domain noise insertion (Zeng et al. 2015), "
             f"{sim['photons']:.3g} photons per bin at full dose, electronic noise {sim['electronic_noise']:g} counts, "
             f"{sim['angles']} views, filtered back-projection of the added noise only.", "",
             "Agreement with the reference (first precision, dose 1.0), mean over studies; detected / pointing: phantoms "
             "against their known lesions (lesion-weighted).", "",
             "| precision | dose | present | same place | extra / study | mask Dice | heatmap r | detected | pointing | added noise SD (HU) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for t in table:
        lines.append(f"| {t['precision']} | {t['dose']:g} | {_fmt(t['present'])} | {_fmt(t['same_place'])} | {_fmt(t['extra'])} | "
                     f"{_fmt(t['mask_dice'])} | {_fmt(t['heatmap_r'])} | {_fmt(t['detected'])} | {_fmt(t['pointing'])} | "
                     f"{_fmt(t['added_noise_sd_hu'])} |")
    lines += ["", "Per study: `lowdose.csv`. Plots: `agreement.png` (agreement vs dose), `examples.png` (one slice "
              "of the first study at every dose with its masks).", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))
