"""A PACS as the MONAI Label datastore, over DICOMweb (QIDO-RS, WADO-RS, STOW-RS).

MONAI Label's own DICOMweb datastore lists CT only, converts every series to NIfTI (a radiograph loses
its MONOCHROME1 and VOI LUT on the way) and writes back a SEG through dcmqi. :class:`PACSDatastore`
keeps its listing, cache and label bookkeeping, and changes what MedGemma needs:

* it lists the series of every modality in ``modalities`` (CT, CR, DX by default);
* a series is fetched whole into a temporary folder and renamed into the cache, so a fetch that the
  PACS breaks off never leaves a partial series that looks complete; the reader gets the DICOM files;
* saving a ``final`` label STOWs a DICOM SEG (one segment per finding) and a TID 1500 SR (the report
  and the findings) built by :mod:`monailabel_app.io.dicom_export`, referencing the source series;
* a PACS that is down, refuses the credentials or has lost the series gives an HTTP error that says so
  (with the PACS's own status), and the server keeps serving.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager

import requests
from fastapi import HTTPException
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag
from pydicom.dataset import Dataset

from ..errors import InputError
from ..io import dicom_export

logger = logging.getLogger(__name__)

MODALITIES = ("CT", "CR", "DX")
KEPT_READINGS = 256


@contextmanager
def pacs_errors(url: str, what: str, series: str = ""):
    """Turn what the DICOMweb client raises into an HTTP error naming the PACS, the step and its answer."""
    try:
        yield
    except HTTPException:
        raise
    except requests.exceptions.HTTPError as e:
        r = e.response
        status = r.status_code if r is not None else 0
        answer = f"HTTP {status} {r.reason if r is not None else ''}".strip()
        if status in (401, 403):
            raise HTTPException(502, f"the PACS at {url} refused this server's credentials ({answer}) while {what}; "
                                     "set MONAI_LABEL_DICOMWEB_USERNAME and MONAI_LABEL_DICOMWEB_PASSWORD") from e
        if status == 404 and series:
            raise HTTPException(404, f"series {series} is not on the PACS at {url} ({answer} while {what})") from e
        body = (r.text or "").strip()[:300] if r is not None else ""
        raise HTTPException(502, f"the PACS at {url} answered {answer} while {what}" + (f": {body}" if body else "")) from e
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
        raise HTTPException(503, f"the PACS at {url} cannot be reached while {what} ({type(e).__name__}); "
                                 "is it running, and is the URL right?") from e


class PACSDatastore(DICOMWebDatastore):
    def __init__(self, client, modalities=MODALITIES, search_filter: dict | None = None, cache_path: str | None = None,
                 cache_expiry_s: float = 180.0):
        self.modalities = tuple(m.strip().upper() for m in modalities if m.strip())
        super().__init__(client, dict(search_filter or {}), cache_path, fetch_by_frame=False, convert_to_nifti=False)
        self._listing: tuple[float, list[str]] | None = None
        self._modality: dict[str, str] = {}
        self._cache_expiry_s = cache_expiry_s
        self._readings: OrderedDict[str, dict] = OrderedDict()  # image id -> the last reading served for it
        self._exports: dict[str, dict] = {}  # label id -> the SEG/SR UIDs its last save wrote
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return self._client.base_url

    # ---------------------------------------------------------------------------------------- listing

    def list_images(self) -> list[str]:
        """Series UIDs of every listed modality (a QIDO search per modality), cached for a while."""
        if self._listing and time.time() - self._listing[0] < self._cache_expiry_s:
            return list(self._listing[1])
        found = {}
        with pacs_errors(self.url, "listing series"):
            for modality in self.modalities:
                for ds in self._client.search_for_series(search_filters={**self._search_filter, "Modality": modality}):
                    found.setdefault(str(Dataset.from_json(ds)["SeriesInstanceUID"].value), modality)
        self._listing = (time.time(), list(found))
        self._modality = found
        return list(found)

    def status(self) -> dict:
        """Counts for ``/info/`` and ``/datastore/``; a PACS that fails gives zero counts and its error, so
        ``/info/`` keeps answering (a client can connect and show what is wrong)."""
        try:
            return super().status()
        except HTTPException as e:
            logger.warning("datastore status: %s", e.detail)
            return {"total": 0, "completed": 0, "label_tags": {}, "error": e.detail}

    def json(self) -> dict:
        """The datastore as ``/datastore/?output=all`` shows it: every listed series (with its modality),
        with the labels this server keeps for it."""
        out = super().json()
        objects = out.setdefault("objects", {})
        for uid in self.list_images():
            entry = objects.setdefault(uid, {"image": {"info": {}, "ext": ""}, "labels": {}})
            entry["image"].setdefault("info", {}).update({"SeriesInstanceUID": uid, "Modality": self._modality.get(uid, "")})
        return out

    def get_labeled_images(self, label_tag=None, labels=None) -> list[str]:
        with pacs_errors(self.url, "listing segmentations"):
            return super().get_labeled_images(label_tag, labels)

    def get_unlabeled_images(self, label_tag=None, labels=None) -> list[str]:
        return sorted(set(self.list_images()) - set(self.get_labeled_images(label_tag, labels)))

    # ---------------------------------------------------------------------------------------- images

    def get_image_uri(self, image_id: str) -> str:
        """The cached series folder of ``image_id``, fetched from the PACS if not cached yet."""
        if not isinstance(image_id, str) or not image_id or os.sep in image_id or image_id.startswith("."):
            raise HTTPException(422, f"not a series instance UID: {image_id!r}")
        folder = os.path.realpath(os.path.join(self._datastore.image_path(), image_id))
        if not (os.path.isdir(folder) and os.listdir(folder)):
            partial = f"{folder}.partial-{os.getpid()}-{threading.get_ident()}"
            shutil.rmtree(partial, ignore_errors=True)
            try:
                with pacs_errors(self.url, f"fetching series {image_id}", series=image_id):
                    self._fetch_series(image_id, partial)
                if not os.path.isdir(partial) or not os.listdir(partial):
                    raise HTTPException(404, f"series {image_id} on the PACS at {self.url} has no instances")
                shutil.rmtree(folder, ignore_errors=True)
                os.replace(partial, folder)
            finally:
                shutil.rmtree(partial, ignore_errors=True)
        self._register(image_id)
        return folder

    def _fetch_series(self, series_uid: str, folder: str) -> None:
        """WADO-RS: every instance of the series, in the transfer syntax the PACS stores it in (``*``).
        Asking for the default (explicit VR little endian) makes the PACS transcode, and Orthanc without a
        JPEG 2000 codec answers 500 for a JPEG 2000 series."""
        hits = self._client.search_for_series(search_filters={"SeriesInstanceUID": series_uid})
        study = next((str(Dataset.from_json(h)["StudyInstanceUID"].value) for h in hits
                      if Dataset.from_json(h).get("SeriesInstanceUID") == series_uid), None)
        if study is None:
            raise HTTPException(404, f"series {series_uid} is not on the PACS at {self.url}")
        os.makedirs(folder, exist_ok=True)
        for ds in self._client.retrieve_series(study, series_uid, media_types=(("application/dicom", "*"),)):
            ds.save_as(os.path.join(folder, f"{ds.SOPInstanceUID}.dcm"))

    def _register(self, image_id: str) -> None:
        """Make the series folder a known image of the local bookkeeping (labels are saved against it)."""
        from monailabel.datastore.local import DataModel, ImageLabelModel

        if image_id in self._datastore.objects:
            return
        from filelock import FileLock

        with FileLock(self._lock_file):
            self._datastore.objects.setdefault(
                image_id, ImageLabelModel(image=DataModel(info={"ts": int(time.time()), "name": image_id}, ext="")))
            self._update_datastore_file(lock=False)

    # ---------------------------------------------------------------------------------------- readings

    def remember_reading(self, image_id: str, reading: dict) -> None:
        """Keep the last reading served for a series: a later save of its label writes its SR."""
        with self._lock:
            self._readings[image_id] = reading
            self._readings.move_to_end(image_id)
            while len(self._readings) > KEPT_READINGS:
                self._readings.popitem(last=False)

    def export_of(self, label_id: str) -> dict:
        return dict(self._exports.get(label_id, {}))

    # ---------------------------------------------------------------------------------------- labels

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict, label_id: str = "") -> str:
        """Keep the label in the local cache; a ``final`` label also goes to the PACS as SEG + SR.

        The SR is built from ``label_info["reading"]`` (the infer result a client sends back) or else
        the last reading this server served for the series; without either only the SEG is written."""
        label_info = dict(label_info or {})
        folder = self.get_image_uri(image_id)
        written = {}
        if label_tag == DefaultLabelTag.FINAL:
            reading = label_info.pop("reading", None) or self._readings.get(image_id)
            try:
                seg, sr = dicom_export.export(folder, label_filename, reading, label_info.get("label_info"))
            except InputError as e:
                raise HTTPException(e.status, f"cannot write DICOM SEG/SR for series {image_id}: {e}") from e
            objects = [ds for ds in (seg, sr) if ds is not None]
            if objects:
                with pacs_errors(self.url, f"storing the SEG/SR of series {image_id}"):
                    self._client.store_instances(objects)
            for kind, ds in (("seg", seg), ("sr", sr)):
                if ds is not None:
                    written[kind] = {"SeriesInstanceUID": str(ds.SeriesInstanceUID), "SOPInstanceUID": str(ds.SOPInstanceUID),
                                     "StudyInstanceUID": str(ds.StudyInstanceUID)}
            label_info["dicom"] = written
            logger.info("stored %s for series %s on %s", ", ".join(written) or "nothing", image_id, self.url)
        label_id = LocalDatastore.save_label(self, image_id, label_filename, label_tag, label_info)
        self._exports[label_id] = written
        return label_id


def pacs_from_settings(url: str, modalities=MODALITIES, cache_path: str | None = None) -> PACSDatastore:
    """The PACS at ``url`` (``--studies http://host:port/dicom-web``) with MONAI Label's settings: its
    credentials, URL prefixes, cache path and expiry, and search filter (whose Modality is replaced by
    ``modalities``, each listed); ``cache_path`` overrides the cache folder. Series are fetched whole: MONAI Label's fetch-by-frame option rebuilds
    files from metadata and frames and loses the transfer syntax."""
    from dicomweb_client.session_utils import create_session_from_user_pass
    from monailabel.config import settings
    from monailabel.datastore.dicom import DICOMwebClientX

    session = None
    if settings.MONAI_LABEL_DICOMWEB_USERNAME and settings.MONAI_LABEL_DICOMWEB_PASSWORD:
        session = create_session_from_user_pass(settings.MONAI_LABEL_DICOMWEB_USERNAME, settings.MONAI_LABEL_DICOMWEB_PASSWORD)
    client = DICOMwebClientX(url=url.rstrip("/").strip(), session=session, qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
                             wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX, stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX)
    search = {k: v for k, v in (settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER or {}).items() if k != "Modality"}
    cache_path = cache_path or (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip() or None
    return PACSDatastore(client, modalities, search, cache_path, settings.MONAI_LABEL_DICOMWEB_CACHE_EXPIRY)
