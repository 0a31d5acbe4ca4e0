"""Decide what a study is (a radiograph or a CT volume) from its content, and load it.

``modality="auto"`` (the default) decides by content, never by the caller's guess:

* a folder or a ``.zip``: a DICOM series, read as CT; a folder holding one DICOM radiograph (how a PACS
  series of a CR/DX arrives) is that radiograph;
* a DICOM file: CT when its Modality is CT or its SOP class is a CT image (one slice or enhanced
  multi-frame), otherwise a radiograph (CR/DX/...);
* NIfTI / NRRD / MHA: CT when it has more than one slice, or one plane in Hounsfield units (air at
  -1000); otherwise a radiograph sent as a one-slice volume;
* PNG / JPEG / ...: a radiograph.

``modality="ct"`` or ``"xray"`` forces the reader (and its checks) instead.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import InputError
from .ct import CTVolume, Limits, is_ct_dicom, load_ct
from .xray import VOLUME_EXTENSIONS, Radiograph, load_radiograph

MODALITIES = ("auto", "ct", "xray")


def check_modality(modality) -> str:
    m = (modality or "auto")
    if not isinstance(m, str) or m.lower() not in MODALITIES:
        raise InputError(f"'modality' must be one of {', '.join(MODALITIES)}, got {modality!r}")
    return m.lower()


def detect(path: str) -> str:
    """``"ct"`` or ``"xray"`` for ``path`` (see the module docstring)."""
    if os.path.isdir(path):
        return "xray" if single_radiograph(path) else "ct"
    if path.lower().endswith(".zip"):
        return "ct"
    if not os.path.isfile(path):
        raise InputError(f"image not found: {os.path.basename(path)}", status=404)
    with open(path, "rb") as f:
        head = f.read(132)
    name = os.path.basename(path).lower()
    if (len(head) == 132 and head[128:132] == b"DICM") or name.endswith(".dcm"):
        import pydicom

        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception:  # unreadable: let the radiograph reader say what is wrong
            return "xray"
        return "ct" if is_ct_dicom(ds) else "xray"
    if name.endswith(VOLUME_EXTENSIONS):
        return _volume_kind(path)
    return "xray"


def single_radiograph(folder: str) -> str | None:
    """The one file of ``folder`` when it is its only file and a DICOM image that is not CT, else None."""
    files = [os.path.join(r, n) for r, _, names in os.walk(folder) for n in names if not n.startswith(".")]
    if len(files) != 1:
        return None
    import pydicom

    try:
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    except Exception:
        return None
    return None if is_ct_dicom(ds) or "Rows" not in ds else files[0]


def _volume_kind(path: str) -> str:
    import SimpleITK as sitk

    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(path)
        reader.ReadImageInformation()
        size = reader.GetSize()
    except RuntimeError:
        return "xray"  # unreadable: the reader reports the error
    if reader.GetDimension() >= 3 and int(np.prod(size[2:])) > 1:
        return "ct"
    try:
        plane = sitk.GetArrayFromImage(reader.Execute())
    except RuntimeError:
        return "xray"
    return "ct" if np.isfinite(plane).all() and plane.min() <= -500 else "xray"


def load_study(path: str, modality: str = "auto", limits: Limits | None = None) -> Radiograph | CTVolume:
    modality = check_modality(modality)
    kind = detect(path) if modality == "auto" else modality
    if kind == "ct":
        return load_ct(path, limits)
    if os.path.isdir(path):
        single = single_radiograph(path)
        if not single:
            raise InputError("this folder is not one DICOM radiograph: a folder of several images is a CT series")
        path = single
    return load_radiograph(path)
