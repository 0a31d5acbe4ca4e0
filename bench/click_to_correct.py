#!/usr/bin/env python
"""Masks from a point (grounding/extent.py, correction.py) measured on real outlines, real lungs and phantoms,
and the time a click-to-correct request takes through a real MONAI Label server.

    .venv/bin/python bench/click_to_correct.py [--out bench/results/click_to_correct.md] [--points 10]

1. LIDC-IDRI-0001 (../shared/data/ct/lidc): the four radiologists' outlines of its nodule, read from the
   original XML. From the centre of each outline and from ``--points`` random points at least 3 mm inside
   it, the mask grown as a "nodule", scored (Dice) against every reader's outline, next to the readers'
   agreement with each other.
2. Points in clear lung (no lesion there), given as "nodule": the real films' lung masks
   (../shared/data/cxr/lungseg2d) and the real CT's lung lobes (TotalSegmentator example): how often a
   region is refused (it must be, or stay small: never a whole lung).
3. Phantoms with exact lesions: from each lesion's centre and from random points inside it, Dice per kind.
4. Seconds per click-to-correct request (HTTP, the server's own answer, median of 5) on the LIDC CT, a CT
   phantom and a radiograph: after a reading (the study kept), and on an image never read (loaded first).
"""

import argparse
import glob
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import SimpleITK as sitk
from PIL import Image
from scipy import ndimage

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
SHARED = os.path.join(ROOT, "..", "shared", "data")

from monailabel_app.grounding import ct_extent, extent, film_extent  # noqa: E402
from monailabel_app.grounding.anatomy import xray_lung_fields  # noqa: E402
from monailabel_app.io.study import load_study  # noqa: E402
from monailabel_app.io.xray import ASSUMED_FILM_MM  # noqa: E402
from monailabel_app.jobs.evaluation import dice  # noqa: E402
from monailabel_app.jobs.lidc import read_outlines, series_uids  # noqa: E402
from monailabel_app.phantoms.ct import make_ct_phantom, save  # noqa: E402
from monailabel_app.phantoms.films import make_phantom  # noqa: E402


def interior_points(mask, spacing, n, rng, depth_mm=3.0):
    depth = ndimage.distance_transform_edt(mask, sampling=spacing)
    inside = np.argwhere(depth >= depth_mm)
    picks = [tuple(int(i) for i in np.unravel_index(int(np.argmax(depth)), mask.shape))]
    if len(inside) and n:
        picks += [tuple(int(i) for i in p) for p in inside[rng.choice(len(inside), min(n, len(inside)), replace=False)]]
    return picks


def lidc(n_points, rng):
    series = glob.glob(os.path.join(SHARED, "ct", "lidc", "LIDC-IDRI-0001", "1*", "1*"))[0]
    volume = load_study(series, "auto")
    outlines = [o for o in read_outlines(os.path.join(SHARED, "ct", "lidc", "LIDC-IDRI-0001", "annotations", "69.xml"),
                                         series_uids(series), volume.geometry.shape) if o.voxels > 100]
    masks = [volume.orientation.to_display(o.mask) for o in outlines]
    readers = [dice(a, b) for i, a in enumerate(masks) for b in masks[i + 1 :]]
    lungs = ct_extent.aerated_lung(volume.hu).sum()
    rows, scores, sizes, diameters, seconds = [], [], [], [], []
    for o, m in zip(outlines, masks):
        own = []
        for p in interior_points(m, volume.spacing, n_points, rng):
            t0 = time.perf_counter()
            e = ct_extent.grow_ct(volume.hu, volume.spacing, p, "nodule")
            seconds.append(time.perf_counter() - t0)
            d = [dice(e.mask, r) for r in masks]
            own.append(d[outlines.index(o)])
            scores += d
            sizes.append(int(e.mask.sum()))
            diameters.append(e.diameter_mm)
        rows.append(f"| reader {o.reader} ({o.voxels} voxels) | {len(own)} | {np.mean(own):.3f} | {min(own):.3f} |")
    lines = [
        "## 1. LIDC-IDRI-0001: a point inside the radiologists' nodule", "",
        f"Readers' agreement with each other (Dice, 6 pairs): median {np.median(readers):.3f}, "
        f"range {min(readers):.3f}..{max(readers):.3f}.", "",
        f"Masks from {len(sizes)} points against every reader's outline ({len(scores)} pairs): **median Dice "
        f"{np.median(scores):.3f}**, mean {np.mean(scores):.3f}, min {min(scores):.3f}; mask sizes {min(sizes)}.."
        f"{max(sizes)} voxels (the lungs in the slab: {lungs}); longest axial diameter {min(diameters):.1f}.."
        f"{max(diameters):.1f} mm; {np.median(seconds):.2f} s per point (median, the region only).", "",
        "| points inside the outline of | points | Dice with that reader (mean) | min |", "|---|---|---|---|", *rows, ""]
    return lines, {"median_dice": float(np.median(scores)), "readers_median": float(np.median(readers))}


def clear_lung(rng, n=5):
    refused = total = 0
    largest = 0.0
    for png in sorted(glob.glob(os.path.join(SHARED, "cxr", "lungseg2d", "[0-9].jpg"))):
        pixels = np.asarray(Image.open(png).convert("L"))
        lung = np.asarray(Image.open(png.replace(".jpg", "-mask.png")).convert("L")) > 127
        spacing = (ASSUMED_FILM_MM / max(pixels.shape),) * 2
        fields = xray_lung_fields(pixels)
        for p in interior_points(lung, spacing, n, rng, depth_mm=10.0)[1:]:
            total += 1
            try:
                e = film_extent.grow_radiograph(pixels, spacing, p, "nodule", fields)
                largest = max(largest, e.mask.sum() / lung.sum())
            except extent.NoExtent:
                refused += 1
    film = (refused, total, largest)
    ct = sitk.ReadImage(os.path.join(SHARED, "ct", "totalsegmentator", "example_ct.nii.gz"))
    hu = sitk.GetArrayFromImage(ct).astype(np.float32)
    seg = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(SHARED, "ct", "totalsegmentator", "example_seg.nii.gz")))
    lung = np.isin(seg, [10, 11, 12, 13, 14])
    spacing = ct.GetSpacing()[::-1]
    refused = total = 0
    largest_ct = 0.0
    for p in interior_points(lung, spacing, n * 4, rng, depth_mm=10.0)[1:]:
        total += 1
        try:
            e = ct_extent.grow_ct(hu, spacing, p, "nodule")
            largest_ct = max(largest_ct, e.mask.sum() / lung.sum())
        except extent.NoExtent:
            refused += 1
    return ["## 2. Points in clear lung, given as a nodule", "",
            "| image | points | refused (no region) | largest region kept, share of the lungs |", "|---|---|---|---|",
            f"| 4 real films (lungseg2d), points >= 10 mm inside the lung masks | {film[1]} | {film[0]} | {film[2]:.4f} |",
            f"| real CT (TotalSegmentator example, 3 mm), points >= 10 mm inside the lobes | {total} | {refused} | "
            f"{largest_ct:.4f} |", ""]


def phantoms(rng, n=2):
    xray, ct = {}, {}
    for seed in range(150):
        ph = make_phantom(seed)
        fields = xray_lung_fields(ph.image)
        mm = ASSUMED_FILM_MM / max(ph.image.shape)
        for les in ph.lesions:
            for p in interior_points(les.mask, (mm, mm), n, rng, depth_mm=mm):
                try:
                    grown = film_extent.grow_radiograph(ph.image, (mm, mm), p, les.kind, fields, search_mm=2 * mm)
                    d = dice(grown.mask, les.mask)
                except extent.NoExtent:
                    d = 0.0
                xray.setdefault(les.kind, []).append(d)
    for seed in range(30):
        ph = make_ct_phantom(seed)
        hu = ph.hu.astype(np.float32)
        for les in ph.lesions:
            for p in interior_points(les.mask, ph.spacing[::-1], n, rng, depth_mm=3.0):
                try:
                    d = dice(ct_extent.grow_ct(hu, ph.spacing[::-1], p, les.kind).mask, les.mask)
                except extent.NoExtent:
                    d = 0.0
                ct.setdefault(les.kind, []).append(d)
    lines = ["## 3. Phantoms: from the lesion's centre and 2 random points inside it", "",
             "| modality | kind | points | mean Dice | refused or Dice < 0.5 |", "|---|---|---|---|---|"]
    for name, table in (("radiograph (seeds 0..149)", xray), ("CT (seeds 0..29)", ct)):
        for kind, v in sorted(table.items()):
            lines.append(f"| {name} | {kind} | {len(v)} | {np.mean(v):.3f} | {sum(x < 0.5 for x in v)} |")
    return lines + [""]


def timing():
    import requests

    from monailabel_app.serve.server import ServerProcess

    sys.path.insert(0, os.path.join(ROOT, "plugins", "slicer", "MedGemma"))
    from MedGemmaLib.client import _split_multipart

    folder = tempfile.mkdtemp(prefix="click_bench_")
    series = glob.glob(os.path.join(SHARED, "ct", "lidc", "LIDC-IDRI-0001", "1*", "1*"))[0]
    shutil.make_archive(os.path.join(folder, "lidc"), "zip", series)
    ph = make_ct_phantom(3)
    save(ph, os.path.join(folder, "ct_phantom.nii.gz"))
    film = make_phantom(5)
    Image.fromarray(film.image).save(os.path.join(folder, "film.png"))
    lidc_point = [315, 366, 6]  # [i, j, k]: inside the nodule (reader 0's deepest voxel)
    points = {"lidc": lidc_point, "ct_phantom": list(ph.lesions[0].center[::-1]),
              "film": [film.lesions[0].center[1], film.lesions[0].center[0]]}
    kinds = {"lidc": "nodule", "ct_phantom": ph.lesions[0].kind, "film": film.lesions[0].kind}
    rows = ["## 4. Seconds per click-to-correct request (HTTP, this CPU, median of 5)", "",
            "| image | first click, image never read (loads it) | after a reading (study kept) | the server's own |",
            "|---|---|---|---|"]
    with ServerProcess(folder) as server:
        def click(image, params):
            t0 = time.perf_counter()
            r = requests.post(f"{server.url}/infer/medgemma?image={image}", data={"params": json.dumps(params)},
                              timeout=300)
            r.raise_for_status()
            return time.perf_counter() - t0, r

        for image in ("lidc", "ct_phantom", "film"):
            cold, _ = click(image, {"foreground": [points[image]], "kind": kinds[image]})
            click(image, {})  # a reading: what a click corrects
            warm, own = [], []
            for _ in range(5):
                s, r = click(image, {"foreground": [points[image]], "finding": 1})
                warm.append(s)
                own.append(_split_multipart(r)[0]["latencies"]["correct"])
            rows.append(f"| {image} | {cold:.2f} | {np.median(warm):.2f} | {np.median(own):.2f} |")
    shutil.rmtree(folder, ignore_errors=True)
    return rows + [""]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=10, help="random points inside each LIDC outline (besides its centre)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-server", action="store_true", help="skip the request timing")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    lines = [f"# Masks from a point ({time.strftime('%Y-%m-%d')}, this CPU: {os.cpu_count()} cores)", ""]
    lidc_lines, _ = lidc(args.points, rng)
    lines += lidc_lines
    print("\n".join(lines), flush=True)
    for part in (clear_lung(rng), phantoms(rng)) + (() if args.no_server else (timing(),)):
        lines += part
        print("\n".join(part), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
