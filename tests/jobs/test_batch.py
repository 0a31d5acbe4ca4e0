"""``medgemma-label batch``: a folder of phantoms and real studies (one corrupt), its manifest, a SIGKILL
mid-run and the rerun, content-hash resume, and the Ray engine against the local one."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from monailabel_app.io.writers import write_in_geometry
from monailabel_app.jobs.batch import FIELDS, Manifest, comparable
from monailabel_app.phantoms.ct import make_ct_phantom, phantom_volume
from monailabel_app.phantoms.films import make_phantom
from tests.conftest import auto_precision, shared

LIDC = ("ct/lidc/LIDC-IDRI-0001/1.3.6.1.4.1.14519.5.2.1.6279.6001.298806137288633453246975630178/"
        "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192")


def make_dataset(root, real: bool = True):
    """Phantoms (X-ray and CT), real studies linked from ../shared/data (not copied), one corrupt file."""
    os.makedirs(root / "phantoms", exist_ok=True)
    for seed in (3, 4, 5):
        Image.fromarray(make_phantom(seed).image).save(root / "phantoms" / f"xray_{seed}.png")
    vol = phantom_volume(make_ct_phantom(2))
    write_in_geometry(vol.hu, vol.geometry, str(root / "phantoms" / "ct_2.nii.gz"), np.float32)
    data = open(shared("cxr/nih/00000001_000.png"), "rb").read()
    (root / "corrupt.png").write_bytes(data[:4000])
    if real:
        os.symlink(shared("cxr/dicom/RG1_UNCR.dcm"), root / "cr.dcm")
        os.symlink(shared("cxr/nih/00000001_000.png"), root / "nih.png")
        series = root / "lidc"
        series.mkdir()
        for f in sorted(glob.glob(os.path.join(shared(LIDC), "*"))):
            os.symlink(f, series / os.path.basename(f))
    return root


def batch(*args, **kw):
    return subprocess.run([sys.executable, "-m", "monailabel_app.cli", "batch", "--no-progress", *map(str, args)],
                          capture_output=True, text=True, timeout=1200, **kw)


def batch_here(capsys, *args):
    """:func:`batch` through the CLI's ``main`` in this process (a second interpreter's imports are 15 s of a
    test: the module's reference run and the Ray engine's run the command as a process)."""
    from monailabel_app.cli import main

    capsys.readouterr()
    try:
        code = main(["batch", "--no-progress", *map(str, args)])
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(["batch", *map(str, args)], code, out.out, out.err)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("dataset"))


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    """One uninterrupted run."""
    out = tmp_path_factory.mktemp("reference")
    r = batch("-i", dataset, "-o", out)
    assert r.returncode == 1, r.stderr[-3000:]  # 1: a study failed (the corrupt one), all others done
    return out, r


def rows_of(out):
    with open(out / "manifest.jsonl") as f:
        return [json.loads(line) for line in f]


def test_manifest_is_complete_and_the_corrupt_study_is_recorded(dataset, reference):
    out, run = reference
    rows = rows_of(out)
    assert [r["study"] for r in rows] == ["corrupt.png", "cr.dcm", "lidc", "nih.png", "phantoms/ct_2.nii.gz",
                                          "phantoms/xray_3.png", "phantoms/xray_4.png", "phantoms/xray_5.png"]
    status = {r["study"]: r["status"] for r in rows}
    assert status.pop("corrupt.png") == "failed" and set(status.values()) == {"ok"}
    corrupt = rows[0]
    assert "truncated" in corrupt["error"] and corrupt["findings"] == [] and not corrupt["outputs"]
    for r in rows[1:]:
        assert set(FIELDS) <= set(r)
        folder = out / r["outputs"]["dir"]
        result = json.loads((folder / "findings.json").read_text())
        assert result["report"] == r["report"] and [f["name"] for f in result["findings"]] == r["findings"]
        assert (out / r["label_file"]).is_file() and r["model"] and r["precision"] == auto_precision()
    modality = {r["study"]: r["modality"] for r in rows[1:]}
    assert modality == {"cr.dcm": "xray", "lidc": "ct", "nih.png": "xray", "phantoms/ct_2.nii.gz": "ct",
                        "phantoms/xray_3.png": "xray", "phantoms/xray_4.png": "xray", "phantoms/xray_5.png": "xray"}
    phantom = next(r for r in rows if r["study"] == "phantoms/xray_3.png")
    assert phantom["report"] == make_phantom(3).report
    with open(out / "manifest.csv") as f:
        lines = f.read().splitlines()
    assert lines[0].split(",")[:3] == ["study", "content_hash", "status"] and len(lines) == len(rows) + 1
    assert "8 studies in the manifest: read now 8 (7 ok, 1 failed)" in run.stdout


def test_a_rerun_reads_nothing_and_a_renamed_copy_is_not_read_again(dataset, reference, tmp_path):
    out, _ = reference
    before = rows_of(out)
    r = batch("-i", dataset, "-o", out)
    assert "read now 1 (0 ok, 1 failed), already done 7" in r.stdout  # the failed study is retried
    after = rows_of(out)
    assert comparable(after) == comparable(before)
    assert [a["finished_at"] for a in after[1:]] == [b["finished_at"] for b in before[1:]]  # not read again


def test_sigkill_mid_run_then_rerun_equals_an_uninterrupted_run(dataset, reference, tmp_path, capsys):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "monailabel_app.cli", "batch", "--no-progress", "-i", str(dataset),
                             "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    manifest = out / "manifest.jsonl"
    while time.time() < deadline:  # kill once three studies are done (the CT series is read next)
        if manifest.exists() and len(manifest.read_text().splitlines()) >= 3:
            break
        assert proc.poll() is None, "the batch finished before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = {r["study"]: r for r in Manifest(str(out)).load().values()}
    assert 3 <= len(first) < 8

    r = batch_here(capsys, "-i", dataset, "-o", out)
    assert r.returncode == 1, r.stderr[-3000:]
    rows = rows_of(out)
    assert comparable(rows) == comparable(rows_of(reference[0]))
    for study, record in first.items():  # what the first run finished was not read again
        if record["status"] == "ok":
            assert next(x for x in rows if x["study"] == study)["finished_at"] == record["finished_at"]
    assert f"already done {sum(x['status'] == 'ok' for x in first.values())}" in r.stdout
    # nothing half-written or orphaned: every folder is a manifest's, every output file reads
    folders = {x["outputs"]["dir"] for x in rows if x["status"] == "ok"}
    assert {f"studies/{d}" for d in os.listdir(out / "studies")} == folders
    assert not glob.glob(str(out / "**" / ".tmp-*"), recursive=True)
    import SimpleITK as sitk

    for x in rows:
        if x["status"] == "ok":
            json.loads((out / x["outputs"]["dir"] / "findings.json").read_text())
            sitk.ReadImage(str(out / x["label_file"]))


def test_decode_batches_give_the_one_by_one_manifest_and_masks(tmp_path, capsys):
    """--batch-size 2 (radiographs generated two at a time, the CT alone, the corrupt file failing at its
    load) against one study at a time, both in fp32: the same manifest apart from timings, the same masks."""
    import SimpleITK as sitk

    data = make_dataset(tmp_path / "small", real=False)
    runs = {}
    for size in (1, 2):
        out = tmp_path / f"size{size}"
        r = batch_here(capsys, "-i", data, "-o", out, "--precision", "fp32", "--batch-size", size)
        assert r.returncode == 1 and "5 studies in the manifest: read now 5 (4 ok, 1 failed)" in r.stdout, r.stderr[-3000:]
        runs[size] = (out, rows_of(out))
    (one, single), (two, batched) = runs.values()
    assert comparable(batched) == comparable(single)
    for a, b in zip(single, batched):
        if a["status"] == "ok":
            x = sitk.GetArrayFromImage(sitk.ReadImage(str(one / a["label_file"])))
            y = sitk.GetArrayFromImage(sitk.ReadImage(str(two / b["label_file"])))
            assert np.array_equal(x, y), a["study"]
    bad = batch_here(capsys, "-i", data, "-o", tmp_path / "bad", "--batch-size", 0)
    assert bad.returncode == 2 and "--batch-size must be at least 1" in bad.stderr


def test_ray_engine_gives_the_local_engines_manifest(reference, tmp_path):
    """The phantoms and the corrupt file through two Ray replicas: the local reference run's rows for them."""
    pytest.importorskip("ray")
    data = make_dataset(tmp_path / "small", real=False)
    ray_out = tmp_path / "ray"
    r = batch("-i", data, "-o", ray_out, "--engine", "ray", "--workers", "2")
    assert r.returncode == 1, r.stderr[-3000:]
    studies = {x["study"] for x in rows_of(ray_out)}
    assert len(studies) == 5
    assert comparable(rows_of(ray_out)) == comparable([x for x in rows_of(reference[0]) if x["study"] in studies])
    workers = {x["worker"] for x in rows_of(ray_out) if x["status"] == "ok"}
    assert len(workers) == 2  # both replicas read studies
    assert "worker " in r.stdout and "studies/s while reading" in r.stdout


def test_a_batch_that_fails_as_a_whole_is_read_study_by_study(tmp_path, monkeypatch):
    """read_many raising for a batch: its films are read one by one from what was loaded, each recorded."""
    from monailabel_app.jobs import batch as job
    from tests.conftest import reader_for

    reader = reader_for("fp32")
    studies = []
    for seed in (3, 4):
        path = tmp_path / f"xray_{seed}.png"
        Image.fromarray(make_phantom(seed).image).save(path)
        studies.append(job.Study(path.name, str(path), job.content_hash(str(path))))
    os.makedirs(tmp_path / "out" / "studies")

    def broken(*args, **kwargs):
        raise RuntimeError("the batch's decode failed")

    monkeypatch.setattr(reader, "read_many", broken)
    records = job.read_studies(reader, studies, str(tmp_path / "out"), None, 64)
    assert [r["status"] for r in records] == ["ok", "ok"] and [r["study"] for r in records] == ["xray_3.png", "xray_4.png"]
    assert records[0]["report"] == make_phantom(3).report


def test_a_batchs_readings_are_written_as_they_are_made_and_a_failed_write_stays_with_its_study(tmp_path, monkeypatch):
    """read_studies writes each reading as read_many hands it over (side by side). A batch that fails after
    handing some over keeps those and reads only the rest one by one; a write that fails is recorded for
    its study alone."""
    from monailabel_app.jobs import batch as job
    from tests.conftest import reader_for

    reader = reader_for("fp32")
    studies = []
    for seed in (3, 4, 5):
        path = tmp_path / f"xray_{seed}.png"
        Image.fromarray(make_phantom(seed).image).save(path)
        studies.append(job.Study(path.name, str(path), job.content_hash(str(path))))
    os.makedirs(tmp_path / "out" / "studies")
    real, one_by_one = reader.read_many, []

    def fails_after_the_first(films, *args, on_reading=None, **kwargs):
        real(films[:1], *args, on_reading=on_reading, **kwargs)
        raise RuntimeError("the batch's decode failed")

    monkeypatch.setattr(reader, "read_many", fails_after_the_first)
    monkeypatch.setattr(reader, "read", lambda study, *a, **k: one_by_one.append(study) or type(reader).read(reader, study, *a, **k))
    write = job._write

    def refuse(reading, record, out, study):
        if study.id == "xray_5.png":
            raise OSError("no space left on device")
        write(reading, record, out, study)

    monkeypatch.setattr(job, "_write", refuse)
    records = job.read_studies(reader, studies, str(tmp_path / "out"), None, 64)
    assert [r["study"] for r in records] == ["xray_3.png", "xray_4.png", "xray_5.png"]
    assert [r["status"] for r in records] == ["ok", "ok", "failed"] and "no space left" in records[2]["error"]
    assert len(one_by_one) == 2 and records[0]["report"] == make_phantom(3).report  # the first was handed over
    assert all(os.path.isfile(tmp_path / "out" / r["label_file"]) for r in records[:2])


def test_a_local_run_reads_the_next_batch_while_the_one_before_is_mapped_and_written(tmp_path, monkeypatch):
    """run_local keeps two decode batches in flight: the second batch's read_many starts before the first's has
    returned (its maps and writes). The manifest keeps the input order and every study's own report."""
    import threading

    from monailabel_app.jobs import batch as job
    from tests.conftest import reader_for

    reader = reader_for("fp32")
    data = tmp_path / "films"
    data.mkdir()
    seeds = (3, 4, 5, 6)
    for seed in seeds:
        Image.fromarray(make_phantom(seed).image).save(data / f"xray_{seed}.png")
    out = str(tmp_path / "out")
    manifest, plan = job.prepare(out, job.find_studies(str(data)))
    real, second_started, calls, overlapped = reader.read_many, threading.Event(), [], []

    def overlapping(films, *args, **kwargs):
        calls.append(len(films))
        if len(calls) == 1:  # the first batch: not done before the second has begun (waits at most a minute)
            overlapped.append(second_started.wait(60))
        else:
            second_started.set()
        return real(films, *args, **kwargs)

    monkeypatch.setattr(reader, "read_many", overlapping)
    records = job.run_local(reader, out, manifest, plan, max_new_tokens=64, progress=False, batch_size=2)
    assert overlapped == [True], "the next batch did not start while the one before was still being read"
    assert calls == [2, 2] and [r["study"] for r in records] == [f"xray_{s}.png" for s in seeds]
    assert [r["status"] for r in records] == ["ok"] * 4
    assert [r["report"] for r in records] == [make_phantom(s).report for s in seeds]
