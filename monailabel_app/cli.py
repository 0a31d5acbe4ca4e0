"""``medgemma-label``: read a chest radiograph or a CT volume from the command line, or draw phantoms.

    medgemma-label -i STUDY -o OUTDIR [--model ID|DIR] [--question TEXT] [--precision auto|bf16|fp32|fp16]
                   [--device auto|cpu|cuda] [--max-new-tokens N] [--modality auto|ct|xray]
                   [--max-slices N] [--resample] [--save-inputs]
    medgemma-label -i STUDY -o OUTDIR --kind KIND (--point I,J,K | --point-mm X,Y,Z) [--background I,J,K]
                   (a mask grown from a point in the image; no language model)
    medgemma-label phantom --seed N [--count K] --out DIR
    medgemma-label phantom --ct --seed N [--count K] --out DIR [--format nifti|nrrd|dicom] [--orientation LPS]
    medgemma-label calibrate [--model ID|DIR] --data phantoms|ct-phantoms|DIR [--count N] [--out FILE] [--language en|zh]
    medgemma-label serve --studies DIR|DICOMWEB_URL [--host 127.0.0.1] [--port 8000] [--conf KEY VALUE ...] [--log-file F]
    medgemma-label app [--studies DIR|DICOMWEB_URL] [--port 8000] [--conf KEY VALUE ...] [--log-file F]   (reading page)
    medgemma-label doctor [--model ID|DIR] [--device ...] [--precision ...] [--studies URL] [--json]
    medgemma-label batch -i DIR|DICOMWEB_URL -o OUTDIR [--engine local|ray] [--address ADDR] [--workers N]
    medgemma-label lowdose -i CT [CT ...] -o OUTDIR [--doses 1.0,0.5,0.25,0.1] [--precisions fp32,bf16]
    medgemma-label findings [--text TEXT | -f FILE | < FILE] [--language auto|zh|en]
    medgemma-label study --data phantoms|DIR --out OUTDIR [--model M] [--precisions fp32,bf16,fp16,int8,int4]
                   [--dose 0.2] [--language zh|en] [--xray 100] [--ct 30]   (precision, multi-turn, low-dose tables)

STUDY is a radiograph (PNG/JPEG, DICOM CR/DX, a one-plane NIfTI/NRRD) or a CT volume (NIfTI/NRRD/MHA,
a DICOM series folder or .zip, an enhanced multi-frame or single-slice CT DICOM); the kind is decided
from the content unless --modality says.

Without ``--model`` the embedded phantom model is used: a tiny synthetic TEST model, not MedGemma.
Exit status: 0 done, 2 bad input (the message says what was wrong), 3 the model could not be loaded, 4 the
outputs could not be written (disk full, no permission); batch: 1 when some studies failed (each is in
the manifest with its error).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import numpy as np
from PIL import Image


CT_FORMATS = {"nifti": ".nii.gz", "nrrd": ".nrrd", "dicom": ""}


def _lesion_labels(shape, lesions) -> np.ndarray:
    """uint8 label array of a phantom's lesions (lesion k -> k)."""
    labels = np.zeros(shape, np.uint8)
    for k, les in enumerate(lesions, start=1):
        labels[les.mask] = k
    return labels


def _write_json(path: str, meta: dict) -> None:
    from .io.writers import write_json

    write_json(path, meta)


def _ct_phantoms(args) -> int:
    from .phantoms import ct as ct_phantoms

    for seed in range(args.seed, args.seed + args.count):
        ph = ct_phantoms.make_ct_phantom(seed)
        stem = os.path.join(args.out, f"ct_phantom_{seed:06d}")
        image = ct_phantoms.save(ph, stem + CT_FORMATS[args.format], args.orientation)
        ct_phantoms.save(ph, stem + "_mask.nii.gz", args.orientation, array=_lesion_labels(ph.hu.shape, ph.lesions))
        meta = {
            "seed": seed,
            "report": ph.report,
            "image": os.path.basename(image),
            "stored_orientation": args.orientation,
            "lesions": [
                {"label": k, "kind": les.kind, "lobe": les.lobe, "radius_mm": round(les.radius_mm, 1),
                 "voxels": int(les.mask.sum())}
                for k, les in enumerate(ph.lesions, start=1)
            ],
            "note": "synthetic CT phantom in HU; label k in the mask is lesion k",
        }
        _write_json(stem + ".json", meta)
        print(f"{image}  {ph.report}")
    return 0


def _phantom_main(argv) -> int:
    from .phantoms.films import make_phantom

    ap = argparse.ArgumentParser(prog="medgemma-label phantom", description="Draw synthetic chest X-ray or CT phantoms.")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--count", type=int, default=1, help="draw seeds seed..seed+count-1")
    ap.add_argument("--out", required=True)
    ap.add_argument("--ct", action="store_true", help="chest CT volumes (HU) instead of radiographs")
    ap.add_argument("--format", choices=sorted(CT_FORMATS), default="nifti", help="CT file format")
    ap.add_argument("--orientation", default="LPS", help="stored axis order of CT files, e.g. LPS, RAS, PIL")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.ct:
        return _ct_phantoms(args)
    for seed in range(args.seed, args.seed + args.count):
        ph = make_phantom(seed)
        stem = os.path.join(args.out, f"phantom_{seed:06d}")
        Image.fromarray(ph.image).save(stem + ".png")
        Image.fromarray(_lesion_labels(ph.image.shape, ph.lesions)).save(stem + "_mask.png")
        meta = {
            "seed": seed,
            "report": ph.report,
            "lesions": [
                {"label": k, "kind": les.kind, "side": les.side, "level": les.level, "pixels": int(les.mask.sum())}
                for k, les in enumerate(ph.lesions, start=1)
            ],
            "note": "synthetic phantom; patient right is on the image left",
        }
        _write_json(stem + ".json", meta)
        print(f"{stem}.png  {ph.report}")
    return 0


def _model_args(ap, precision: bool = True, language: bool = True) -> None:
    """The options every reading command takes: which model, where, what to ask, how long to answer."""
    ap.add_argument("--model", default=None, help="Hugging Face id or local folder (default: embedded phantom model)")
    ap.add_argument("--question", default=None)
    if language:
        ap.add_argument("--language", choices=("auto", "zh", "en"), default="auto",
                        help="of the answer and the structured report (auto: the question's; 中文: zh)")
    if precision:
        ap.add_argument("--precision", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-new-tokens", type=int, default=128)


def _read_main(argv) -> int:
    ap = argparse.ArgumentParser(prog="medgemma-label", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-i", "--input", required=True, help="radiograph or CT volume (file, DICOM folder or .zip)")
    ap.add_argument("-o", "--out", required=True, help="output folder")
    _model_args(ap)
    ap.add_argument("--modality", default="auto", help="auto (from the content), ct or xray")
    ap.add_argument("--max-slices", type=int, default=None, help="CT: slices shown to the model (default: the model's)")
    ap.add_argument("--resample", action="store_true", help="CT: resample oblique volumes instead of refusing them")
    ap.add_argument("--save-inputs", action="store_true", help="write the exact model input images to OUT/inputs/")
    ap.add_argument("--dicom", action="store_true",
                    help="DICOM input: also write OUT/dicom/seg.dcm (DICOM SEG) and sr.dcm (TID 1500 SR) referencing it")
    clicks = ap.add_argument_group(
        "a mask from a point (no language model unless --question is given too)",
        "--kind and one or more points inside the finding: its mask is grown from the point in the image; "
        "with --question the model reads first and the point's finding is added (or replaces --finding N)")
    clicks.add_argument("--point", action="append", default=[], metavar="I,J,K",
                        help="voxel index of the input (ITK order: column, row, slice; a radiograph I,J)")
    clicks.add_argument("--point-mm", action="append", default=[], metavar="X,Y,Z",
                        help="patient coordinates in mm (DICOM LPS: X toward the patient's left, Y back, Z head); "
                             "write --point-mm=-12.5,30,-40 when X is negative")
    clicks.add_argument("--background", action="append", default=[], metavar="I,J,K",
                        help="a voxel the mask must not reach (ITK order)")
    clicks.add_argument("--kind", default=None, help="the finding's kind, e.g. nodule, mass, consolidation, effusion")
    clicks.add_argument("--finding", default=None, help="with --question: the label (or name) whose mask the point replaces")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from .io import dicom_export
    from .io.ct import Limits
    from .io.writers import write_reading
    from .reader import Reader

    def work():
        if args.dicom:
            dicom_export.read_sources(args.input)  # not DICOM: say so before the model runs
        limits = Limits(resample=args.resample)
        pointed = args.point or args.point_mm
        if pointed and not args.question:
            from .io.study import load_study

            reading = _placed(load_study(args.input, args.modality, limits), args, None)
        else:
            reader = Reader(args.model, device=args.device, precision=args.precision, limits=limits)
            reading = reader.read(args.input, args.question, args.max_new_tokens, args.modality, args.max_slices,
                                  language=args.language)
            if pointed:
                reading = _placed(reading.study, args, reading)
        result = write_reading(reading, args.out, save_model_inputs=args.save_inputs)
        if args.dicom:
            objects = dicom_export.export(args.input, os.path.join(args.out, result["files"]["mask"]), result)
            for kind, path in dicom_export.write(objects, os.path.join(args.out, "dicom")).items():
                result["files"][kind] = os.path.relpath(path, args.out)
            _write_json(os.path.join(args.out, "findings.json"), result)
        return reading, result

    done, status = _guarded(work)
    if status:
        return status
    reading, result = done
    if reading.model.get("id"):
        print(f"model: {reading.model['id']} ({reading.model['precision']} on {reading.model['device']})"
              + (f" [{reading.model['label']}]" if reading.model.get("label") else ""))
    else:
        print("model: none (masks grown from the points given)")
    print(f"report: {reading.report}")
    for f in result["findings"]:
        where = f" strongest slice {f['strongest_slice']}" if "strongest_slice" in f else ""
        print(f"  {f['label']}: {f['name']}  (score {f['score']:.2f}){where}")
    print(result["structured_report"]["text"])
    print(f"wrote {', '.join(result['files'].values())} in {args.out}")
    return 0


def _placed(study, args, base):
    """The reading with the finding grown from ``--point`` / ``--point-mm`` (:mod:`correction`)."""
    from .correction import correct, index_of_mm, input_shape, parse_points
    from .errors import InputError

    def triples(values, option):
        out = []
        for v in values:
            try:
                out.append([float(x) for x in v.split(",")])
            except ValueError:
                raise InputError(f"{option} takes numbers separated by commas, got {v!r}") from None
        return out

    shape = input_shape(study)
    ijk = triples(args.point, "--point") + [index_of_mm(study.geometry, p, "--point-mm")
                                            for p in triples(args.point_mm, "--point-mm")]
    if not args.kind and not args.finding:
        raise InputError("a point needs --kind KIND (what the finding is), or --finding N with --question")
    return correct(study, args.kind, parse_points(ijk, "--point", shape),
                   parse_points(triples(args.background, "--background"), "--background", shape), base, args.finding)


def _guarded(work):
    """``(work(), 0)``; bad input gives ``(None, 2)``, a model that cannot be loaded ``(None, 3)``, each
    with its message on stderr."""
    from .errors import InputError
    from .model.loading import ModelLoadError

    try:
        return work(), 0
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return None, 2
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return None, 3
    except OSError as e:  # the output folder is full or read-only, ...: say so (outputs are renamed into place)
        print(f"error: cannot read or write a file: {e}", file=sys.stderr)
        return None, 4


def _calibrate_main(argv) -> int:
    from .jobs import calibrate
    from .reader import Reader

    ap = argparse.ArgumentParser(prog="medgemma-label calibrate", description=calibrate.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="Hugging Face id or local folder (default: embedded phantom model)")
    ap.add_argument("--data", required=True, help="phantoms, ct-phantoms, or a folder of radiographs with boxes")
    ap.add_argument("--count", type=int, default=60, help="phantoms: how many (calibration seeds from 20000)")
    ap.add_argument("--max-layers", type=int, default=2, help="largest layer combination tried (besides all)")
    ap.add_argument("--out", default=None, help="grounding JSON to write (default: grounding.json in the model folder)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--language", default="en", choices=("en", "zh"),
                    help="ask in this language; zh stores an entry used for Chinese answers (layers, threshold)")
    args = ap.parse_args(argv)
    ct = args.data == "ct-phantoms"

    def work():
        reader = Reader(args.model, device=args.device, precision=args.precision)
        if args.data in ("phantoms", "ct-phantoms"):
            refs = calibrate.phantom_references(args.count, ct=ct)
        else:
            refs = calibrate.box_references(args.data)
        return reader, calibrate.calibrate(reader, refs, ct=ct, max_layers=args.max_layers,
                                                   language=args.language)

    done, status = _guarded(work)
    if status:
        return status
    reader, found = done
    model_dir = reader.model_ref if os.path.isdir(reader.model_ref) else None
    if model_dir is None and not args.out:
        print("error: the model is not a local folder: give --out FILE", file=sys.stderr)
        return 2
    path = calibrate.write_grounding(model_dir, args.out, found, ct, args.data)
    b = found["best"]
    print(f"best for {'CT' if ct else 'radiographs'}{' (Chinese answers)' if args.language == 'zh' else ''}: layers {b['layers']}, rollout {b['rollout']}, threshold "
          f"{b['threshold']}: pointing {b['pointing']:.3f}, Dice {b['dice']:.3f} ({found['studies']} studies, "
          f"{found['lesions']} lesions, {found['tried']} settings); wrote {path}")
    if found["current"]:
        c = found["current"]
        print(f"  the settings it replaces (layers {c['layers']}, rollout {c['rollout']}, threshold {c['threshold']}) "
              f"scored pointing {c['pointing']:.3f}, Dice {c['dice']:.3f} on the same data")
    return 0


def _batch_studies(source: str, out: str, exclude=()):
    """(studies, fetch) for ``--input``: a folder, or a PACS's DICOMweb URL (series fetched into OUT/.pacs-cache;
    credentials from MONAI_LABEL_DICOMWEB_USERNAME / _PASSWORD)."""
    from .jobs import batch

    if not source.startswith(("http://", "https://")):
        return batch.find_studies(source, tuple(exclude)), None
    from .serve.pacs import pacs_from_settings

    pacs = pacs_from_settings(source, cache_path=os.path.join(out, ".pacs-cache"))  # MONAI Label's settings, env
    return [batch.Study(uid) for uid in sorted(pacs.list_images())], pacs.get_image_uri


def _batch_main(argv) -> int:
    from .jobs import batch

    ap = argparse.ArgumentParser(prog="medgemma-label batch", description=batch.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-i", "--input", required=True, help="a folder of studies, or a PACS's DICOMweb URL")
    ap.add_argument("-o", "--out", required=True, help="output folder (studies/, manifest.jsonl, manifest.csv)")
    _model_args(ap)
    ap.add_argument("--engine", choices=("local", "ray"), default="local",
                    help="local: this process; ray: Ray Data, one model replica per worker (pip install '.[ray]')")
    ap.add_argument("--address", default=None, help="ray: the cluster's address (default: a local Ray instance)")
    ap.add_argument("--workers", type=int, default=None, help="ray: model replicas (default: one per GPU, else 2)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="local: radiographs generated as one decode batch (default: 16 on a GPU, 1 on the CPU; "
                         "CTs are read one at a time)")
    ap.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                    help="skip studies whose path (relative to --input) matches, e.g. '*_mask.png' (repeatable)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        ap.error(f"--batch-size must be at least 1 (got {args.batch_size})")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    def work():
        from fastapi import HTTPException

        from .errors import InputError

        t0 = time.perf_counter()
        os.makedirs(args.out, exist_ok=True)
        try:
            studies, fetch = _batch_studies(args.input, args.out, args.exclude)
        except HTTPException as e:  # the PACS cannot list its series
            raise InputError(e.detail, status=e.status_code) from e
        manifest, plan = batch.prepare(args.out, studies, fetch)
        if args.engine == "ray":
            from .jobs.batch_ray import run_ray

            finished = run_ray(args, manifest, plan)
        else:
            from .io.ct import Limits
            from .reader import Reader

            reader = Reader(args.model, device=args.device, precision=args.precision, limits=Limits())
            finished = batch.run_local(reader, args.out, manifest, plan, args.question, args.max_new_tokens,
                                       progress=not args.no_progress, language=args.language,
                                       batch_size=args.batch_size)
        rows = manifest.compact(plan.order)
        return rows, finished, plan, time.perf_counter() - t0

    done, status = _guarded(work)
    if status:
        return status
    rows, finished, plan, seconds = done
    print(batch.summary(rows, finished, plan.skipped, seconds))
    print(f"manifest: {os.path.join(args.out, 'manifest.jsonl')} and manifest.csv")
    return 1 if any(r["status"] != "ok" for r in rows) else 0


def _lowdose_main(argv) -> int:
    from .jobs import lowdose

    ap = argparse.ArgumentParser(prog="medgemma-label lowdose", description=lowdose.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-i", "--input", nargs="*", default=[], help="CT volumes (files, DICOM series folders or zips)")
    ap.add_argument("--phantoms", type=int, default=0, help="also CT phantoms 0..N-1 (known lesions: detection, pointing)")
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--doses", default="1.0,0.5,0.25,0.1", help="dose fractions (1.0, the scan itself, is always added)")
    ap.add_argument("--precisions", default="auto", help="e.g. fp32,bf16: every dose at each (the reference: the first)")
    _model_args(ap, precision=False, language=False)
    ap.add_argument("--photons", type=float, default=lowdose.PHOTONS, help="incident photons per detector bin at full dose")
    ap.add_argument("--electronic-noise", type=float, default=lowdose.ELECTRONIC_NOISE, help="electronic noise SD, counts")
    ap.add_argument("--angles", type=int, default=180, help="projection views over 180 degrees")
    args = ap.parse_args(argv)
    if not args.input and not args.phantoms:
        ap.error("give CT volumes (-i) and/or --phantoms N")

    def work():
        from .errors import InputError

        try:
            doses = [float(d) for d in args.doses.split(",") if d.strip()]
        except ValueError as e:
            raise InputError(f"--doses: {e}") from e
        if any(not (0 < d <= 1) for d in doses):
            raise InputError(f"--doses must be fractions in (0, 1], got {args.doses}")
        studies = lowdose.load_studies(args.input, args.phantoms)
        return lowdose.run(studies, doses, [p.strip() for p in args.precisions.split(",") if p.strip()], args.out,
                           args.model, args.device, args.question, args.max_new_tokens, args.photons,
                           args.electronic_noise, args.angles)

    done, status = _guarded(work)
    if status:
        return status
    with open(os.path.join(args.out, "report.md")) as f:
        print(f.read())
    print(f"wrote lowdose.csv, agreement.png, examples.png and report.md in {args.out}")
    return 0


def _study_main(argv) -> int:
    from .jobs import studies

    ap = argparse.ArgumentParser(prog="medgemma-label study", description=studies.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="phantoms", help="phantoms (default) or a folder of studies with references")
    ap.add_argument("--out", "-o", required=True, help="output folder (a run into it again continues it)")
    ap.add_argument("--model", default=None, help="Hugging Face id or local folder (default: embedded phantom model)")
    ap.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16, int8, int4")
    ap.add_argument("--dose", type=float, default=0.2, help="CT dose fraction to simulate (1 or 0: no low-dose table)")
    ap.add_argument("--language", choices=("zh", "en"), default="zh", help="of the questions and answers")
    ap.add_argument("--xray", type=int, default=100, help="phantoms: radiograph phantoms (held-out seeds 0..N-1)")
    ap.add_argument("--ct", type=int, default=30, help="phantoms: CT phantoms (held-out seeds 0..N-1)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    def work():
        return studies.run(args.data, args.out, args.model, args.precisions, args.dose, args.language, args.xray,
                           args.ct, args.device, args.max_new_tokens, progress=not args.no_progress)

    result, status = _guarded(work)
    if status:
        return status
    with open(os.path.join(args.out, "report.md"), encoding="utf-8") as f:
        print(f.read())
    failed = sum(r.get("status") == "failed" for r in result)
    print(f"wrote report.md, localisation.csv, multi_turn.csv, low_dose.csv and the plots in {args.out}"
          + (f"; {failed} units failed (manifest.jsonl)" if failed else ""))
    return 1 if failed else 0


DEFAULT_HOME = os.path.join(os.path.expanduser("~"), ".cache", "monailabel-medgemma")


def _server_args(prog: str, doc: str, argv, studies_required: bool = True):
    ap = argparse.ArgumentParser(prog=prog, description=doc)
    ap.add_argument("--studies", required=studies_required,
                    help="a folder of studies, or a PACS's DICOMweb URL" +
                         ("" if studies_required else f" (default: {os.path.join(DEFAULT_HOME, 'studies')})"))
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                    help="app settings, as for start_server (models, model, device, precision, max_queue, ...)")
    ap.add_argument("--log-file", default=os.path.join(DEFAULT_HOME, "server.log"),
                    help="the app's own log lines (precision, dtypes, fallbacks, out-of-memory, readings) also go "
                         "here (default: %(default)s)")
    args = ap.parse_args(argv)
    conf = dict(args.conf)
    conf.setdefault("models", "medgemma")
    conf.setdefault("log_file", args.log_file)
    return args, conf


def _server_command(args, conf: dict) -> list[str]:
    from .app import APP_DIR

    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", APP_DIR, "--studies", args.studies,
           "--host", args.host, "--port", str(args.port)]
    for key, value in conf.items():
        cmd += ["--conf", key, value]
    return cmd


def _serve_main(argv) -> int:
    """``medgemma-label serve``: MONAI Label's ``start_server`` for this app, on 127.0.0.1 unless told otherwise
    (MONAI Label itself listens on every interface by default)."""
    args, conf = _server_args("medgemma-label serve", _serve_main.__doc__, argv)
    cmd = _server_command(args, conf)
    os.execv(sys.executable, cmd)
    return 0  # not reached


def _app_main(argv) -> int:
    """``medgemma-label app``: the server with its reading page (``/reader/``, Chinese first) on the embedded
    model unless ``--conf model`` says otherwise; prints the page's address once the server answers, and
    runs until stopped (Ctrl+C)."""
    import signal
    import subprocess

    import requests

    args, conf = _server_args("medgemma-label app", _app_main.__doc__, argv, studies_required=False)
    if not args.studies:
        args.studies = os.path.join(DEFAULT_HOME, "studies")
        os.makedirs(args.studies, exist_ok=True)
    conf["reader_page"] = "true"
    proc = subprocess.Popen(_server_command(args, conf))
    base = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
    try:
        while proc.poll() is None:
            try:
                if requests.get(base + "/info/", timeout=2).status_code in (200, 401):
                    print(f"\n阅片页面 / reading page: {base}/reader/   (English: {base}/reader/?lang=en)\n"
                          f"log: {conf['log_file']}", flush=True)
                    break
            except requests.RequestException:
                time.sleep(0.5)
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        return proc.wait()


def _doctor_main(argv) -> int:
    from .doctor import main

    return main(argv)


def _findings_main(argv) -> int:
    """``medgemma-label findings``: the findings the engine reads in a report or an answer (English, Chinese
    or mixed), as JSON: kind, site, size, certainty, descriptors and span of each; negated mentions apart;
    thinking set aside. Existing reports can be run through it to see what the engine would make of them."""
    from .language.findings import read_answer

    ap = argparse.ArgumentParser(prog="medgemma-label findings", description=_findings_main.__doc__)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--text", help="the report or answer (default: standard input)")
    src.add_argument("-f", "--file", help="a UTF-8 text file holding it")
    ap.add_argument("--language", choices=("auto", "zh", "en"), default="auto",
                    help="the answer's language as reported (auto: Chinese when it has Chinese characters)")
    args = ap.parse_args(argv)
    try:
        if args.text is not None:
            text = args.text
        elif args.file:
            with open(args.file, encoding="utf-8") as f:
                text = f.read()
        else:
            text = sys.stdin.read()
    except (OSError, UnicodeDecodeError) as e:
        print(f"error: cannot read the text: {e}", file=sys.stderr)
        return 2
    answer = read_answer(text)
    out = answer.as_json()
    if args.language != "auto":
        out["language"] = args.language
    print(json.dumps(out, ensure_ascii=False, indent=2))
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "findings":
        return _findings_main(argv[1:])
    if argv and argv[0] == "serve":
        return _serve_main(argv[1:])
    if argv and argv[0] == "app":
        return _app_main(argv[1:])
    if argv and argv[0] == "doctor":
        return _doctor_main(argv[1:])
    if argv and argv[0] == "lowdose":
        return _lowdose_main(argv[1:])
    if argv and argv[0] == "batch":
        return _batch_main(argv[1:])
    if argv and argv[0] == "study":
        return _study_main(argv[1:])
    if argv and argv[0] == "phantom":
        return _phantom_main(argv[1:])
    if argv and argv[0] == "calibrate":
        return _calibrate_main(argv[1:])
    return _read_main(argv)


if __name__ == "__main__":
    sys.exit(main())
