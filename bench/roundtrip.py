#!/usr/bin/env python
"""Server round-trip time per study on this machine: MONAILabelClient.infer as the Slicer plugin calls it.

    .venv/bin/python bench/roundtrip.py [--repeats 5]

Starts a real MONAI Label server (embedded phantom model) on a datastore of phantoms, the real X-rays
and the real CTs of ../shared/data (the 20-slice DICOM series as a zip, the TotalSegmentator NIfTI),
then prints per study the median and min round trip and the server's own stage times.
"""

import argparse
import glob
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from monailabel.client import MONAILabelClient  # noqa: E402
from PIL import Image  # noqa: E402

from monailabel_app.phantoms import ct as ct_phantoms  # noqa: E402
from monailabel_app.phantoms.films import make_phantom  # noqa: E402
from monailabel_app.serve.server import ServerProcess  # noqa: E402

SHARED = os.path.join(ROOT, "..", "shared", "data")
CXR = os.path.join(SHARED, "cxr")
CT_SERIES = os.path.join(SHARED, "ct", "totalsegmentator", "example_ct_dicom")
CT_VOLUME = os.path.join(SHARED, "ct", "totalsegmentator", "example_ct.nii.gz")
IMAGES = {"real_nih_512.png": "nih/00000001_000.png", "real_siim_cr_1024.dcm": "siim/*.dcm",
          "real_cr_j2k_1955x1841.dcm": "dicom/RG1_J2KR.dcm", "real_cr_uncompressed_1955x1841.dcm": "dicom/RG1_UNCR.dcm"}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    studies = tempfile.mkdtemp(prefix="roundtrip-")
    Image.fromarray(make_phantom(11).image).save(os.path.join(studies, "phantom_11.png"))
    for name, pattern in IMAGES.items():
        shutil.copy(sorted(glob.glob(os.path.join(CXR, pattern)))[0], os.path.join(studies, name))
    ct_phantoms.save(ct_phantoms.make_ct_phantom(4), os.path.join(studies, "ct_phantom_4.nii.gz"))
    shutil.make_archive(os.path.join(studies, "real_ct_dicom_series_20x512x512"), "zip", CT_SERIES)
    shutil.copy(CT_VOLUME, os.path.join(studies, "real_ct_totalseg_112x101x122.nii.gz"))
    ct_ids = ["ct_phantom_4", "real_ct_dicom_series_20x512x512", "real_ct_totalseg_112x101x122"]
    params = {"result_extension": ".nrrd", "result_dtype": "uint8"}
    with ServerProcess(studies) as server:
        client = MONAILabelClient(server.url)
        client.infer("medgemma", "phantom_11", params)  # warm-up
        print(f"{'image':40s} {'median s':>9s} {'min s':>7s}   server stages (last run)")
        for image_id in ["phantom_11"] + [n.split(".")[0] for n in IMAGES] + ct_ids:
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                _, res = client.infer("medgemma", image_id, params)
                times.append(time.perf_counter() - t0)
            lat = res["latencies"]
            stages = " ".join(f"{k}={lat[k]:.3f}" for k in ("load_image", "prepare", "generate", "maps", "total"))
            print(f"{image_id:40s} {statistics.median(times):9.3f} {min(times):7.3f}   {stages} "
                  f"prompt={lat['prompt_tokens']} new={lat['new_tokens']}", flush=True)
    shutil.rmtree(studies, ignore_errors=True)


if __name__ == "__main__":
    main()
