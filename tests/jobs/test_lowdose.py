"""Low-dose simulation (noise grows as 1/sqrt(dose), mean HU kept) and ``medgemma-label lowdose`` on
CT phantoms across doses and precisions (CSV, plots, report)."""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from monailabel_app.jobs.lowdose import acquired, reduced_dose

DOSES = [1.0, 0.5, 0.25, 0.1]


@pytest.fixture(scope="module")
def water():
    """A water cylinder (0 HU) in air, 1.5 mm pixels, scanned at the full-dose photon count, then at
    lower doses; the uniform region is a disc well inside the cylinder."""
    n, px = 128, 1.5
    yy, xx = np.mgrid[:n, :n]
    clean = np.where((yy - n / 2) ** 2 + (xx - n / 2) ** 2 < (0.4 * n) ** 2, 0.0, -1000.0)[None].repeat(4, 0)
    full = acquired(clean, px)
    roi = (yy - n / 2) ** 2 + (xx - n / 2) ** 2 < 20**2
    return full, reduced_dose(full, px, DOSES), roi


def test_noise_grows_as_one_over_sqrt_dose(water):
    _, sims, roi = water
    sd = {d: float(v[:, roi].std()) for d, v in sims.items()}
    assert 5 < sd[1.0] < 60  # a clinical noise level at full dose
    for d in DOSES[1:]:
        expected = sd[1.0] / np.sqrt(d)
        assert abs(sd[d] - expected) / expected < 0.15, (d, sd[d], expected)


def test_mean_hu_is_kept(water):
    full, sims, roi = water
    assert np.array_equal(sims[1.0], full)  # dose 1.0 is the scan itself
    for d in DOSES:
        assert abs(float(sims[d][:, roi].mean()) - float(full[:, roi].mean())) < 10
        assert abs(float(sims[d][:, roi].mean())) < 10  # water stays water


def test_same_seed_same_volume_and_doses_differ(water):
    full, sims, _ = water
    again = reduced_dose(full, 1.5, [0.25])
    assert np.array_equal(again[0.25], sims[0.25])
    assert not np.allclose(sims[0.5], sims[0.25])


def test_lowdose_cli_on_phantoms_across_doses_and_precisions(tmp_path):
    out = tmp_path / "lowdose"
    r = subprocess.run([sys.executable, "-m", "monailabel_app.cli", "lowdose", "--phantoms", "1", "--doses", "0.25",
                        "--precisions", "fp32,bf16", "-o", str(out)], capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out / "lowdose.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(x["precision"], x["dose"]) for x in rows] == [("fp32", "1"), ("fp32", "0.25"), ("bf16", "1"), ("bf16", "0.25")]
    ref = rows[0]  # the reference against itself
    assert float(ref["present"]) == float(ref["same_place"]) == float(ref["mask_dice"]) == 1.0
    assert float(ref["added_noise_sd_hu"]) == 0.0 and float(rows[1]["added_noise_sd_hu"]) > 5
    assert all(x["lesions"] and x["detected"] != "" and x["pointing"] != "" for x in rows)  # phantoms: truth known
    report = (out / "report.md").read_text()
    assert "| fp32 | 0.25 |" in report and "| bf16 | 1 |" in report and "Zeng" in report
    for png in ("agreement.png", "examples.png"):
        with Image.open(out / png) as im:
            assert im.size[0] > 300 and im.size[1] > 200
    assert "fp32" in r.stdout and "bf16" in r.stdout


def test_the_rows_truth_is_scored_without_the_words_only_baseline(monkeypatch):
    """The low-dose rows read detected and pointing only: evaluate_ct(text_only=False) draws none of the 200
    calibration phantoms of the words-only priors and leaves that row out; the rows it gives are unchanged."""
    from monailabel_app.jobs import evaluation
    from monailabel_app.phantoms.ct import make_ct_phantom

    ph = make_ct_phantom(3)
    labels = np.zeros(ph.hu.shape, np.uint8)
    for k, les in enumerate(ph.lesions):
        labels[les.mask] = k + 1
    findings = [{"side": les.side, "level": les.level, "kind": les.kind, "attention_peak": les.center}
                for les in ph.lesions]
    priors = evaluation.lobe_priors(range(20000, 20004))
    full = evaluation.evaluate_ct(lambda _: (findings, labels), [3], 85, priors=priors)
    monkeypatch.setattr(evaluation, "lobe_priors", lambda *a: pytest.fail("the priors were drawn"))
    short = evaluation.evaluate_ct(lambda _: (findings, labels), [3], 85, text_only=False)
    assert set(short["maps"]) == {"a_raw_attention", "b_final_masks", "d_chance"}
    assert short["maps"]["b_final_masks"] == full["maps"]["b_final_masks"] and short["lesions_detected"] == 1.0
    assert short["maps"]["b_final_masks"]["pointing"] == 1.0 and "c_text_only" in full["maps"]
