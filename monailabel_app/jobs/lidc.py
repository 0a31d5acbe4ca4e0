"""LIDC-IDRI reader annotations (the original XML) as masks on the series' own voxels.

An LIDC XML file holds one ``readingSession`` per radiologist; each ``unblindedReadNodule`` of 3 mm or
more has one ``roi`` per slice: the slice's SOP Instance UID, ``inclusion`` (TRUE: the outline's inside is
nodule; FALSE: a hole to take out) and the outline as ``edgeMap`` points (column ``xCoord``, row
``yCoord`` of that slice's pixels). The outline is drawn on the nodule's edge, so the mask is the filled
polygon *with* its boundary pixels. Smaller nodules (one point) and non-nodules carry no outline and are
skipped. Slices are matched by SOP UID, never by z or file name.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from ..errors import InputError


@dataclass
class Outline:
    reader: int  # the reading session's index in the file
    nodule_id: str
    mask: np.ndarray  # bool, stored array order (slice, row, column) of the series
    characteristics: dict

    @property
    def voxels(self) -> int:
        return int(self.mask.sum())


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _children(node, name):
    return [c for c in node if _local(c.tag) == name]


def _text(node, name, default=""):
    found = _children(node, name)
    return (found[0].text or "").strip() if found else default


def series_uids(folder: str) -> list[str]:
    """SOP Instance UIDs of a DICOM series folder in the loaded volume's stored slice order (by position
    along the slice normal, as :mod:`ct` sorts them)."""
    import pydicom

    rows = []
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 (not a DICOM file: not part of the series)
            continue
        iop = np.array(ds.ImageOrientationPatient, float)
        normal = np.cross(iop[:3], iop[3:])
        rows.append((float(np.dot(normal, np.array(ds.ImagePositionPatient, float))), str(ds.SOPInstanceUID)))
    if not rows:
        raise InputError(f"no DICOM slices in {folder}")
    return [uid for _, uid in sorted(rows)]


def read_outlines(xml_path: str, uids: list[str], shape: tuple[int, int, int]) -> list[Outline]:
    """Every reader's outlined nodules of ``xml_path`` on a series whose stored slices have SOP UIDs ``uids``
    and whose array has ``shape`` (slice, row, column). Nodules with no outline on these slices are left out."""
    try:
        root = ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError) as e:
        raise InputError(f"cannot read the LIDC XML {os.path.basename(xml_path)}: {e}") from e
    index = {uid: k for k, uid in enumerate(uids)}
    out = []
    for reader, session in enumerate(_children(root, "readingSession")):
        for nodule in _children(session, "unblindedReadNodule"):
            mask, holes = np.zeros(shape, bool), np.zeros(shape, bool)
            for roi in _children(nodule, "roi"):
                z = index.get(_text(roi, "imageSOP_UID"))
                points = [(int(_text(e, "xCoord")), int(_text(e, "yCoord"))) for e in _children(roi, "edgeMap")]
                if z is None or len(points) < 3:
                    continue
                img = Image.new("1", (shape[2], shape[1]), 0)
                ImageDraw.Draw(img).polygon(points, fill=1, outline=1)
                plane = np.array(img, bool)
                (holes if _text(roi, "inclusion", "TRUE").upper() == "FALSE" else mask)[z] |= plane
            mask &= ~holes
            if mask.any():
                chars = {_local(c.tag): c.text for c in (_children(nodule, "characteristics") or [[]])[0]}
                out.append(Outline(reader, _text(nodule, "noduleID"), mask, chars))
    return out
