"""Pre-label a whole dataset: every study read once, its outputs and one manifest line each.

    medgemma-label batch --input DIR|http://pacs/dicom-web --out OUT [--engine local|ray]

* **Studies**: in a folder, every image file (radiograph or CT volume, any format the reader takes) and
  every folder of DICOM files (one series); from a PACS (a DICOMweb URL), every CT/CR/DX series.
* **Outputs**: ``OUT/studies/<content hash>/`` holds the single-study CLI's files (findings.json, mask,
  heatmap(s), overlay). They are written in a temporary folder and renamed when complete, so a killed run
  never leaves a half-written folder that looks done.
* **Manifest**: ``OUT/manifest.jsonl`` gets one line per study as it finishes (flushed to disk: a kill
  loses at most the line being written, which is ignored); at the end both ``manifest.jsonl`` and
  ``manifest.csv`` are rewritten in input order, one line per study (atomically).
* **Resumable by content**: a study whose content hash has a finished line is not read again (renamed or
  copied studies included); a changed file is read again; failed studies are retried. A study that fails
  is recorded with its error and the run goes on.
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import io
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone

from ..errors import InputError
from ..io.ct import is_dicom_file

STUDY_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".zip")
FIELDS = ("study", "content_hash", "status", "error", "modality", "report", "findings", "outputs", "label_file",
          "model", "precision", "device", "latency_s", "finished_at", "worker")
TIMING_FIELDS = ("latency_s", "finished_at", "worker")  # differ between runs of the same data


@dataclass
class Study:
    id: str  # relative path in the input folder, or a series UID
    path: str = ""  # file or series folder ("" until fetched, for a PACS)
    hash: str = ""


# ------------------------------------------------------------------------------------------ studies


def find_studies(root: str, exclude: tuple[str, ...] = ()) -> list[Study]:
    """Studies under ``root``, sorted by id: a folder whose files are all DICOM is one study (a series);
    elsewhere every file with a study extension is one, and subfolders are searched. ``exclude``: glob
    patterns on the study id (its path relative to ``root``), e.g. ``*_mask.png``."""
    if not os.path.isdir(root):
        raise InputError(f"--input {root!r} is not a folder (or a DICOMweb URL)")
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files = sorted(f for f in files if not f.startswith("."))
        rel = os.path.relpath(folder, root)
        if folder != root and len(files) > 1 and all(is_dicom_file(os.path.join(folder, f)) for f in files):
            found.append(Study(rel.replace(os.sep, "/"), folder))
            dirs[:] = []
            continue
        for f in files:
            if f.lower().endswith(STUDY_EXTENSIONS) or is_dicom_file(os.path.join(folder, f)):
                rid = os.path.normpath(os.path.join(rel, f)).replace(os.sep, "/")
                found.append(Study(rid, os.path.join(folder, f)))
    return sorted((s for s in found if not any(fnmatch.fnmatch(s.id, p) for p in exclude)), key=lambda s: s.id)


def content_hash(path: str) -> str:
    """SHA-256 of a file's bytes; of a folder, of its files' hashes in sorted order (names do not count)."""
    def file_hash(p: str) -> str:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    if os.path.isdir(path):
        hashes = sorted(file_hash(os.path.join(r, n)) for r, _, names in os.walk(path) for n in names if not n.startswith("."))
        return hashlib.sha256("\n".join(hashes).encode()).hexdigest()
    return file_hash(path)


# ------------------------------------------------------------------------------------------ manifest


class Manifest:
    """``manifest.jsonl`` (appended as studies finish, compacted at the end) and ``manifest.csv``."""

    def __init__(self, out: str):
        self.jsonl, self.csv = os.path.join(out, "manifest.jsonl"), os.path.join(out, "manifest.csv")

    def load(self) -> dict[str, dict]:
        """The latest record per study; an unreadable line (a kill mid-write) is ignored."""
        records = {}
        if os.path.exists(self.jsonl):
            with open(self.jsonl, encoding="utf-8") as f:
                for line in f:
                    try:
                        r = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(r, dict) and "study" in r:
                        records[r["study"]] = r
        return records

    def append(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with open(self.jsonl, "a+", encoding="utf-8") as f:
            f.seek(0, os.SEEK_END)
            if f.tell():  # a kill mid-write can leave a line without its newline: start a fresh one
                f.seek(f.tell() - 1)
                if f.read(1) != "\n":
                    f.write("\n")
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def compact(self, order: list[str]) -> list[dict]:
        """Rewrite both files, one line per study: ``order`` first, then studies no longer in the input."""
        records = self.load()
        ids = [s for s in order if s in records] + sorted(set(records) - set(order))
        rows = [records[s] for s in ids]
        _atomic_write(self.jsonl, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "findings": "; ".join(r.get("findings") or []),
                        "outputs": (r.get("outputs") or {}).get("dir", "") if isinstance(r.get("outputs"), dict) else ""})
        _atomic_write(self.csv, buf.getvalue())
        return rows


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _atomic_write(path: str, text: str) -> None:
    from ..io.writers import replace_atomically

    replace_atomically(path, lambda f: f.write(text.encode("utf-8")))


def comparable(rows: list[dict]) -> list[dict]:
    """Manifest rows without the fields that differ between two runs over the same data."""
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]


# ------------------------------------------------------------------------------------------ one study


def study_dir(out: str, digest: str) -> str:
    return os.path.join(out, "studies", digest[:24])


def _record(reader, study: Study) -> dict:
    return {"study": study.id, "content_hash": study.hash, "status": "ok", "error": "", "modality": "",
            "report": "", "findings": [], "outputs": {}, "label_file": "", "model": reader.info.id,
            "precision": reader.info.precision, "device": reader.info.device}


def _done(record: dict, t0: float, share: int = 1) -> dict:
    """The record's timing: its seconds (a batch's divided among its studies), when, and where."""
    record.update(latency_s=round((time.perf_counter() - t0) / share, 3), finished_at=_now(),
                  worker=f"{socket.gethostname()}:{os.getpid()}")
    return record


def _failed(record: dict, e: Exception) -> dict:
    record.update(status="failed", error=str(e) if isinstance(e, InputError) else f"{type(e).__name__}: {e}")
    return record


# threads that write a batch's outputs side by side (NIfTI compression and PNG encoding release the GIL: a
# 2048 x 2458 film's four float heatmaps, mask and overlay take 2.7-3.6 s of one core here)
WRITERS = min(8, os.cpu_count() or 1)


def _write(reading, record: dict, out: str, study: Study) -> None:
    """The reading's outputs in a temporary folder, renamed into ``OUT/studies/<hash>`` when complete."""
    from ..io.writers import write_reading

    final = study_dir(out, study.hash)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.join(out, "studies"))
    try:
        result = write_reading(reading, tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        rel = os.path.relpath(final, out).replace(os.sep, "/")
        record.update(modality=reading.modality, report=reading.report, findings=[f["name"] for f in result["findings"]],
                      outputs={"dir": rel, "files": result["files"]}, label_file=f"{rel}/{result['files']['mask']}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_study(reader, study: Study, out: str, question: str | None, max_new_tokens: int,
               language: str = "auto", loaded=None) -> dict:
    """Read one study and write its outputs (atomically); its manifest record, ok or failed. ``loaded``: the
    study already loaded (not read from its path again)."""
    t0 = time.perf_counter()
    record = _record(reader, study)
    try:
        _write(reader.read(study.path if loaded is None else loaded, question, max_new_tokens, language=language),
               record, out, study)
    except Exception as e:  # a fault on one study must not stop the dataset; it is recorded with its type
        _failed(record, e)
    return _done(record, t0)


def read_studies(reader, studies: list[Study], out: str, question: str | None, max_new_tokens: int,
                 language: str = "auto") -> list[dict]:
    """Several radiographs generated as one decode batch (``Reader.read_many``), each written as
    :func:`read_study` writes it. Each study is loaded on its own first (a file that cannot be read fails
    alone, and a CT is read by itself); if the batch fails as a whole its studies are read one by one, so a
    fault stays with its study. The records, in the order of ``studies``."""
    from ..io.study import load_study
    from ..io.xray import Radiograph
    from ..reader import check_memory

    t0 = time.perf_counter()
    records: dict[str, dict] = {}
    films: list[tuple[Study, Radiograph]] = []
    for s in studies:
        try:
            loaded = load_study(s.path, "auto", reader.limits)
            check_memory(loaded, reader.limits.memory_guard_mib)
        except Exception as e:
            records[s.id] = _done(_failed(_record(reader, s), e), t0)
            continue
        if isinstance(loaded, Radiograph):
            films.append((s, loaded))
        else:
            records[s.id] = read_study(reader, s, out, question, max_new_tokens, language, loaded)
    if films:
        t1 = time.perf_counter()
        written: dict[int, tuple[dict, Future]] = {}

        def write(k: int, reading) -> None:  # as each reading is made, while the others' maps go on
            record = _record(reader, films[k][0])
            written[k] = record, writers.submit(_write, reading, record, out, films[k][0])

        with ThreadPoolExecutor(WRITERS, thread_name_prefix="write") as writers:
            try:
                reader.read_many([f for _, f in films], question, max_new_tokens, batch_size=len(films),
                                 language=language, on_reading=write)
            except Exception:  # noqa: BLE001 (the studies not handed over are read one by one: errors stay theirs)
                pass
        for k, (s, film) in enumerate(films):
            if k not in written:
                records[s.id] = read_study(reader, s, out, question, max_new_tokens, language, film)
                continue
            record, done = written[k]
            if done.exception() is not None:
                _failed(record, done.exception())
            records[s.id] = _done(record, t1, len(films))
    return [records[s.id] for s in studies]


# ------------------------------------------------------------------------------------------ the run


@dataclass
class Plan:
    """What a run does: the studies in input order, which to read, which are done already."""

    order: list[str]
    todo: list[Study]
    skipped: int
    records: list[dict]  # decided without reading: content another finished study had, fetches that failed


def prepare(out: str, studies: list[Study], fetch=None) -> tuple[Manifest, Plan]:
    """Clean what a killed run left (temporary folders), hash the studies and decide what to read."""
    os.makedirs(os.path.join(out, "studies"), exist_ok=True)
    for name in os.listdir(os.path.join(out, "studies")):
        if name.startswith(".tmp-"):
            shutil.rmtree(os.path.join(out, "studies", name), ignore_errors=True)
    for name in os.listdir(out):
        if name.startswith(".tmp-"):
            os.unlink(os.path.join(out, name))
    manifest = Manifest(out)
    records = manifest.load()
    done = {r["content_hash"]: r for r in records.values()
            if r.get("status") == "ok" and os.path.isfile(os.path.join(out, (r.get("outputs") or {}).get("dir", "-"), "findings.json"))}
    todo, reused, skipped = [], [], 0
    for s in studies:
        if fetch is not None and not s.path:
            try:
                s.path = fetch(s.id)
            except Exception as e:  # the PACS failed for this series: recorded, the others go on
                reused.append({"study": s.id, "content_hash": "", "status": "failed",
                               "error": str(getattr(e, "detail", "") or e), "finished_at": _now()})
                continue
        try:
            s.hash = content_hash(s.path)
        except OSError:
            todo.append(s)  # unreadable: read_study records why
            s.hash = f"unreadable:{s.id}"
            continue
        old = done.get(s.hash)
        if old is None:
            todo.append(s)
        elif records.get(s.id, {}).get("content_hash") == s.hash and records[s.id].get("status") == "ok":
            skipped += 1
        else:  # same content under another name: its outputs serve this study too
            reused.append({**old, "study": s.id})
            skipped += 1
    return manifest, Plan([s.id for s in studies], todo, skipped, reused)


BATCHES_IN_FLIGHT = 2  # decode batches a local run reads at once (run_local)


def auto_batch_size(reader) -> int:
    """Radiographs per decode batch when none is asked for: 16 on a GPU (one study at a time leaves most of
    its generation rate unused), 1 on the CPU (a batch there is no faster and holds every study's memory)."""
    return 16 if str(reader.info.device).startswith("cuda") else 1


def run_local(reader, out: str, manifest: Manifest, plan: Plan, question=None, max_new_tokens: int = 128,
              progress: bool = True, language: str = "auto", batch_size: int | None = None) -> list[dict]:
    """Read the plan's studies in this process, ``batch_size`` radiographs per decode batch (default:
    :func:`auto_batch_size`; CTs one at a time); the finished records.

    Batches go two at a time (:data:`BATCHES_IN_FLIGHT`): while one batch's maps are made and its outputs
    written, the next is loaded and generates (the model reads one batch at a time; a batch's maps and
    writes leave it idle otherwise). One study at a time (the CPU's default), they go one after another: there
    the cores are the model's."""
    from tqdm import tqdm

    size = auto_batch_size(reader) if batch_size is None else batch_size
    if size < 1:
        raise InputError(f"--batch-size must be at least 1 (got {size})")
    for r in plan.records:
        manifest.append(r)
    finished = []
    bar = tqdm(total=len(plan.todo), unit="study", desc="pre-labelling", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)

    def read(chunk: list[Study]) -> list[dict]:
        return [read_study(reader, chunk[0], out, question, max_new_tokens, language)] if size == 1 else \
            read_studies(reader, chunk, out, question, max_new_tokens, language)

    chunks = [plan.todo[start : start + size] for start in range(0, len(plan.todo), size)]
    with ThreadPoolExecutor(BATCHES_IN_FLIGHT if size > 1 else 1, thread_name_prefix="batch") as pool:
        flying = [pool.submit(read, c) for c in chunks[:BATCHES_IN_FLIGHT]]
        for k, chunk in enumerate(chunks):
            records = flying.pop(0).result()  # (a batch's records in order; read_studies records its faults)
            if k + BATCHES_IN_FLIGHT < len(chunks):
                flying.append(pool.submit(read, chunks[k + BATCHES_IN_FLIGHT]))
            for record in records:
                manifest.append(record)
                finished.append(record)
            bar.update(len(chunk))
            bar.set_postfix(failed=sum(r["status"] != "ok" for r in finished))
    bar.close()
    return finished


def summary(rows: list[dict], finished: list[dict], skipped: int, seconds: float) -> str:
    ok = sum(r["status"] == "ok" for r in finished)
    failed = [r for r in finished if r["status"] != "ok"]
    lines = [f"{len(rows)} studies in the manifest: read now {len(finished)} ({ok} ok, {len(failed)} failed), "
             f"already done {skipped}; {seconds:.1f} s"
             + (f", {len(finished) / seconds:.2f} studies/s" if finished and seconds > 0 else "")]
    per_worker: dict[str, list[float]] = {}
    for r in finished:
        per_worker.setdefault(r.get("worker", "?"), []).append(float(r.get("latency_s") or 0))
    if len(per_worker) > 1:
        for w, lat in sorted(per_worker.items()):
            lines.append(f"  worker {w}: {len(lat)} studies, {len(lat) / max(sum(lat), 1e-9):.2f} studies/s while reading")
    lines += [f"  failed: {r['study']}: {r['error']}" for r in failed]
    return "\n".join(lines)
