#!/usr/bin/env python
"""Demo: a real MONAI Label server with the embedded phantom model answers chest X-rays and CTs.

The phantom model is a tiny synthetic TEST model, not MedGemma: it reads X-ray phantoms well, real
X-rays not at all, and CT not yet (its answers there only show that the whole path, I/O and geometry
included, works).

Builds a datastore under ``out/demo/studies`` (three X-ray phantoms and a CT phantom, plus real X-rays
and CTs of ../shared/data when that folder is there: linked, or a DICOM series zipped), starts the server, calls ``/infer/medgemma`` for each
image through ``MONAILabelClient`` exactly as the 3D Slicer plugin does (``.nrrd``, ``uint8``), and
prints the findings, the mask sizes and the round-trip times. Results land in ``out/demo/results``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
from monailabel.client import MONAILabelClient  # noqa: E402
from PIL import Image  # noqa: E402

from monailabel_app.phantoms import ct as ct_phantoms  # noqa: E402
from monailabel_app.phantoms.films import make_phantom  # noqa: E402
from monailabel_app.serve.server import ServerProcess  # noqa: E402

SHARED = os.path.join(ROOT, "..", "shared", "data", "cxr")
CT_SHARED = os.path.join(ROOT, "..", "shared", "data", "ct")
REAL = {"real_nih_cardiomegaly.png": "nih/00000001_000.png", "real_cr_jpeg2000.dcm": "dicom/RG1_J2KR.dcm",
        "real_siim_cr.dcm": "siim/*.dcm"}


def build_studies(folder: str, seeds: list[int]) -> dict[str, str]:
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    truth = {}
    for seed in seeds:
        ph = make_phantom(seed)
        Image.fromarray(ph.image).save(os.path.join(folder, f"phantom_{seed}.png"))
        truth[f"phantom_{seed}"] = ph.report
    for name, pattern in REAL.items():
        for path in sorted(glob.glob(os.path.join(SHARED, pattern)))[:1]:
            os.symlink(os.path.abspath(path), os.path.join(folder, name))
            truth[name.split(".")[0]] = "(real X-ray: the phantom model cannot read it)"
    ph = ct_phantoms.make_ct_phantom(4)
    ct_phantoms.save(ph, os.path.join(folder, "ct_phantom_4.nii.gz"), "RAS")
    truth["ct_phantom_4"] = ph.report
    series = os.path.join(CT_SHARED, "totalsegmentator", "example_ct_dicom")
    if os.path.isdir(series):
        shutil.make_archive(os.path.join(folder, "real_ct_dicom_series"), "zip", series)
        truth["real_ct_dicom_series"] = "(real CT, 20 slices: the phantom model cannot read it)"
    return truth


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "out", "demo"))
    ap.add_argument("--seeds", default="7,11,23", help="phantom seeds (held-out: the model never saw them)")
    ap.add_argument("--keep-serving", action=argparse.BooleanOptionalAction, default=None,
                    help="keep the server and its reading page up at the end (default: when run from a terminal)")
    args = ap.parse_args(argv)
    studies, results = os.path.join(args.out, "studies"), os.path.join(args.out, "results")
    truth = build_studies(studies, [int(s) for s in args.seeds.split(",")])
    os.makedirs(results, exist_ok=True)
    print(f"datastore: {studies} ({len(truth)} images)\nstarting MONAI Label server ...", flush=True)
    with ServerProcess(studies) as server:
        client = MONAILabelClient(server.url)
        info = client.info()["models"]["medgemma"]
        print(f"server {server.url}: model {info['model']['id']} [{info['model']['label']}] "
              f"in {info['model']['precision']} on {info['model']['device']}\n")
        for image_id, expected in truth.items():
            t0 = time.perf_counter()
            label_file, params = client.infer("medgemma", image_id, {"result_extension": ".nrrd", "result_dtype": "uint8"})
            dt = time.perf_counter() - t0
            label = sitk.ReadImage(label_file)
            arr = sitk.GetArrayFromImage(label)
            dest = os.path.join(results, f"{image_id}_label.nrrd")
            shutil.move(label_file, dest)
            with open(os.path.join(results, f"{image_id}.json"), "w") as f:
                json.dump(params, f, indent=2)
            print(f"{image_id}  ({dt:.2f} s round trip, label {label.GetSize()} spacing {label.GetSpacing()})")
            print(f"  expected: {expected}\n  answer:   {params['report']}")
            for fnd in params["findings"]:
                where = (f"strongest slice {fnd['strongest_slice']}" if "strongest_slice" in fnd
                         else f"peak at row/col {fnd['peak_pixel']}")
                print(f"    segment {fnd['label']} '{fnd['name']}': {int((arr == fnd['label']).sum())} voxels, "
                      f"{where}, score {fnd['score']:.2f}")
            if "heatmap" in params:
                print(f"  heatmap: {server.url}{params['heatmap']['url']}")
        first = next(iter(truth))  # the same phantom asked in Chinese: the Chinese report and structured report
        _, params = client.infer("medgemma", first, {"question": "请描述这张胸片的异常"})
        with open(os.path.join(results, f"{first}_zh.json"), "w", encoding="utf-8") as f:
            json.dump(params, f, indent=2, ensure_ascii=False)
        print(f"\n{first} asked in Chinese (请描述这张胸片的异常):\n  answer:   {params['report']}\n"
              + "\n".join("  " + line for line in params["structured_report"]["text"].splitlines()))
        reading_page(server.url, os.path.join(studies, f"{first}.png"), results)
        print(f"\nlabels and result JSON in {results}")
        if args.keep_serving or (args.keep_serving is None and sys.stdin.isatty()):
            print(f"\n阅片页面 / reading page: {server.url}/reader/  (English: {server.url}/reader/?lang=en)\n"
                  "press Enter or Ctrl+C to stop the server", flush=True)
            try:
                input()
            except (KeyboardInterrupt, EOFError):
                pass
    return 0


def reading_page(url: str, image: str, results: str) -> None:
    """The reading page on the same server, driven as the browser drives it (Gradio's client): the first
    phantom uploaded and read in Chinese, its overlay and its PDF report saved."""
    from gradio_client import Client, handle_file

    page = Client(url + "/reader/", verbose=False)
    t0 = time.perf_counter()
    shown = page.predict(handle_file(image), None, "请描述这张胸片的异常", "zh", api_name="/analyse")
    dt = time.perf_counter() - t0
    # the outputs as the client sees them (the browser session's state stays on the server): chat, image,
    # slider, window, masks, jump, turn, report, answer, status, health
    overlay, report, status = shown[1], shown[7], shown[9]
    overlay_dest = os.path.join(results, "reading_page_overlay.png")
    shutil.copy(overlay, overlay_dest)
    pdf_dest = os.path.join(results, "reading_page_report.pdf")
    try:
        files, _ = page.predict(report, "zh", 1, "lung", True, [1], 0.45, api_name="/export_pdf")
        shutil.copy(files[0], pdf_dest)
    except Exception as e:  # no Chinese TrueType font here: the page says so, the demo goes on
        pdf_dest = f"not written: {e}"
    print(f"\nreading page {url}/reader/: {os.path.basename(image)} read in Chinese in {dt:.2f} s ({status.strip()})\n"
          f"  overlay {overlay_dest}\n  PDF report {pdf_dest}")


if __name__ == "__main__":
    sys.exit(main())
