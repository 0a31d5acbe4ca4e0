"""Talk to a MONAI Label server running the medgemma app over its public REST API only.

Plain Python (``requests`` and the standard library), so the test suite runs it against a real server;
the Slicer widget (``MedGemma.py``) only shows what these classes return.

* :class:`MedGemmaClient`: ``/info/``, upload to the datastore, ``/infer/{model}`` (multipart answer:
  the result JSON and the label file), click to correct (points in, a finding's mask grown from them), the heatmap download, saving a label (on a PACS: DICOM SEG + SR). Server errors become :class:`ServerError`
  with the HTTP status and the server's own message.
* :class:`InferJob`: one request in a background thread that can be cancelled (the answer, when it comes,
  is dropped) and polled by a timer.
* :class:`StudyConversation`: the questions and answers about one study; the first question starts a
  server-side conversation, each later one continues it.
* :class:`ReadingResult` / :class:`Finding`: a result parsed for display: report, findings with their
  segment name and label value, where to jump (the strongest slice, or the peak pixel).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP

import requests

SLICER_PARAMS = {"result_extension": ".nrrd", "result_dtype": "uint8"}


class ServerError(RuntimeError):
    """The server answered with an error (or could not be reached): ``status`` and its message."""

    def __init__(self, status: int | None, message: str):
        super().__init__(f"{'HTTP ' + str(status) if status else 'no answer'}: {message}")
        self.status, self.message = status, message


class Cancelled(RuntimeError):
    """The request was cancelled by the user."""


@dataclass
class Finding:
    label: int  # label value in the label file
    name: str  # segment name (unique per result)
    text: str  # the sentence of the report
    side: str
    strongest_slice: int | None  # CT: the input's slice index with the strongest map
    world_z_mm: float | None  # CT: that slice's patient z
    peak: list[int]  # array index of the gated map's peak (numpy order of the label file)
    diameter_mm: float | None = None  # longest diameter, when the mask's outline came from the image


@dataclass
class ReadingResult:
    report: str
    findings: list[Finding]
    label_names: dict  # segment name -> label value, as the stock plugin reads it
    modality: str
    label_file: str  # local path of the downloaded label file
    heatmap_url: str | None
    conversation: dict | None
    raw: dict = field(default_factory=dict)
    structured_report: str = ""  # 影像所见 / 诊断意见 (or Findings / Impression), in the language asked
    language: str = "en"

    @classmethod
    def parse(cls, result: dict, label_file: str) -> "ReadingResult":
        findings = []
        for f in result.get("findings", []):
            strongest = f.get("strongest_slice") or {}
            findings.append(Finding(
                label=int(f["label"]), name=f["name"], text=f.get("text", ""), side=f.get("side", ""),
                strongest_slice=strongest.get("index"), world_z_mm=strongest.get("world_z_mm"),
                peak=list(f.get("peak_voxel") or f.get("peak_pixel") or []),
                diameter_mm=(f.get("measured") or {}).get("diameter_mm"),
            ))
        return cls(report=result.get("report", ""), findings=findings, label_names=dict(result.get("label_names", {})),
                   modality=result.get("modality", ""), label_file=label_file,
                   heatmap_url=(result.get("heatmap") or {}).get("url"),
                   conversation=result.get("conversation"), raw=result,
                   structured_report=(result.get("structured_report") or {}).get("text", ""),
                   language=result.get("language", "en"))

    def segment_for(self, name: str) -> Finding:
        return next(f for f in self.findings if f.name == name)


class MedGemmaClient:
    def __init__(self, server_url: str, model: str = "medgemma", timeout: float = 600.0):
        self.url = server_url.rstrip("/")
        self.model, self.timeout = model, timeout
        self.session = requests.Session()

    def _call(self, method: str, path: str, **kwargs) -> requests.Response:
        try:
            r = self.session.request(method, self.url + path, timeout=kwargs.pop("timeout", self.timeout), **kwargs)
        except requests.RequestException as e:
            raise ServerError(None, f"cannot reach {self.url}: {e}") from e
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise ServerError(r.status_code, detail if isinstance(detail, str) else json.dumps(detail))
        return r

    def info(self) -> dict:
        return self._call("GET", "/info/", timeout=30).json()

    def upload(self, path: str, image_id: str | None = None) -> str:
        """Put a local image file into the server's datastore; returns its image id."""
        image_id = image_id or os.path.basename(path).split(".")[0]
        with open(path, "rb") as f:
            self._call("PUT", "/datastore/", params={"image": image_id},
                       files={"file": (os.path.basename(path), f)}, data={"params": "{}"})
        return image_id

    def infer(self, image_id: str, question: str | None = None, conversation: str | None = None,
              max_new_tokens: int | None = None, **params) -> ReadingResult:
        body = dict(SLICER_PARAMS, **params)
        if question:
            body["question"] = question
        if conversation:
            body["conversation"] = conversation
        if max_new_tokens:
            body["max_new_tokens"] = max_new_tokens
        r = self._call("POST", f"/infer/{self.model}", params={"image": image_id}, data={"params": json.dumps(body)})
        result, label = _split_multipart(r)
        fd, label_file = tempfile.mkstemp(suffix=body["result_extension"], prefix="medgemma_label_")
        with os.fdopen(fd, "wb") as f:
            f.write(label)
        return ReadingResult.parse(result, label_file)

    def correct(self, image_id: str, foreground: list, finding=None, kind: str | None = None,
                background: list | None = None) -> ReadingResult:
        """Click to correct: ``foreground`` (and ``background``) points as ``[i, j, k]`` voxel indices of the
        uploaded image; the mask of ``finding`` (label value or segment name) of the image's latest reading is
        grown again from them in the image, or a new finding of ``kind`` is added. No generation: quick."""
        params = {"foreground": [list(p) for p in foreground], "background": [list(p) for p in background or []]}
        if finding is not None:
            params["finding"] = finding
        if kind:
            params["kind"] = kind
        return self.infer(image_id, **params)

    def save(self, image_id: str, label_file: str, result: ReadingResult | None = None, tag: str = "final",
             label_info: list[dict] | None = None) -> dict:
        """Save a (possibly corrected) label for ``image_id`` in the datastore; on a PACS a ``final`` label is
        stored there as DICOM SEG + SR. ``result``: the reading it came from (its report and findings go
        into the SR); ``label_info``: segment names as [{"name", "idx"}] when they differ from the reading's.
        The server's answer: with a PACS, ``dicom`` names the stored SEG and SR."""
        params = {}
        if result is not None:
            params["reading"] = result.raw
        if label_info is not None:
            params["label_info"] = label_info
        with open(label_file, "rb") as f:
            r = self._call("PUT", "/datastore/label", params={"image": image_id, "tag": tag},
                           files={"label": (os.path.basename(label_file), f)}, data={"params": json.dumps(params)})
        return r.json()

    def heatmap(self, result: ReadingResult) -> str | None:
        """Download the result's float heatmap (same geometry as the label file); its local path."""
        if not result.heatmap_url:
            return None
        r = self._call("GET", result.heatmap_url)
        name = re.search(r'filename="?([^";]+)', r.headers.get("content-disposition", ""))
        suffix = next((ext for ext in (".nii.gz", ".nrrd", ".nii", ".mha") if name and name.group(1).endswith(ext)),
                      ".nii.gz")
        fd, path = tempfile.mkstemp(suffix=suffix, prefix="medgemma_heatmap_")
        with os.fdopen(fd, "wb") as f:
            f.write(r.content)
        return path


def _split_multipart(r: requests.Response) -> tuple[dict, bytes]:
    """(result JSON, label file bytes) of MONAI Label's multipart infer answer."""
    ctype = r.headers.get("content-type", "")
    if "multipart" not in ctype:
        raise ServerError(r.status_code, f"expected a multipart answer, got {ctype or 'no content type'}")
    msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + r.content)
    result, label = None, b""
    for part in msg.iter_parts():
        payload = part.get_payload(decode=True) or b""
        if part.get_filename():
            label = payload
        else:
            result = json.loads(payload.decode() or "{}")
    if result is None:
        raise ServerError(r.status_code, "the answer holds no result JSON")
    return result, label


class InferJob:
    """Run ``fn`` in a background thread; poll :attr:`done`; :meth:`result` returns or raises; a
    cancelled job's answer is dropped (HTTP has no way to stop the server mid-generation)."""

    def __init__(self, fn, *args, **kwargs):
        self._result, self._error = None, None
        self._cancelled = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(fn, args, kwargs), daemon=True)
        self._thread.start()

    def _run(self, fn, args, kwargs):
        try:
            self._result = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 (handed to the caller)
            self._error = e

    @property
    def done(self) -> bool:
        return self._cancelled.is_set() or not self._thread.is_alive()

    def cancel(self) -> None:
        self._cancelled.set()

    def result(self, timeout: float | None = None):
        if self._cancelled.is_set():
            raise Cancelled("cancelled")
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("the request is still running")
        if self._error is not None:
            raise self._error
        return self._result


class StudyConversation:
    """Questions and answers about one datastore image; the server keeps the model's context."""

    def __init__(self, client: MedGemmaClient, image_id: str):
        self.client, self.image_id = client, image_id
        self.conversation_id: str | None = None
        self.turns: list[ReadingResult] = []

    def ask(self, question: str | None = None, **params) -> ReadingResult:
        result = self.client.infer(self.image_id, question, conversation=self.conversation_id or "new", **params)
        if result.conversation:
            self.conversation_id = result.conversation["id"]
        self.turns.append(result)
        return result

    @property
    def history(self) -> list[dict]:
        return (self.turns[-1].conversation or {}).get("history", []) if self.turns else []

    def restart(self) -> None:
        self.conversation_id, self.turns = None, []
