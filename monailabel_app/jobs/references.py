"""Studies with what is known about them: reference lesions (masks, kind, site, size) and report text.

    phantom_studies(xray=100, ct=30)     synthetic phantoms, every lesion exact (held-out seeds 0, 1, ...)
    folder_studies(DIR)                  real studies, each with whatever reference it has beside it

In a folder (``folder_studies``), studies are found as ``batch`` finds them (image files, DICOM series
folders); what is beside them gives the reference:

* **LIDC-IDRI XML** (any ``*.xml`` whose root is an LIDC read message, anywhere under DIR): the readers'
  outlines on the series its header names, slices matched by SOP Instance UID (:mod:`jobs.lidc`). Outlines of one nodule by several
  readers (overlapping) are one lesion: the voxels at least half of its readers drew.
* **DICOM RTSTRUCT** (a DICOM file of modality RTSTRUCT anywhere under DIR): each ROI's planar contours on
  the series it references (by SeriesInstanceUID, else FrameOfReferenceUID), filled slice by slice in
  patient coordinates. ROIs interpreted as anatomy (ORGAN, EXTERNAL, AVOIDANCE, ...) are not lesions.
* **Label maps**: ``NAME_label.nii.gz`` / ``NAME_seg.nii.gz`` (or ``.nrrd``, ``.mha``) beside the study
  ``NAME``: each connected region of each label value is one lesion; ``NAME_label.json`` (``{"1": "right
  upper lobe nodule"}``) names a value's kind and site.
* **Boxes** on radiographs: ``boxes.csv`` (``image,y0,x0,y1,x1`` in pixels, optional ``finding``) or a COCO
  JSON, as ``calibrate`` takes them.
* **Report text**: ``reports.csv`` (``study,report``) or ``NAME.txt`` beside the study: the reference
  findings come from it through the same findings layer as the model's answers.

A lesion's kind and site come from its name (LIDC: nodule; a box's or ROI's text through the findings
layer); where no side is given, it is the side of the patient its centre lies on (patient coordinates:
left of the body's centre, or the film's middle for a radiograph shown as PA). Its size is its longest
in-plane diameter (mm) on its largest plane.
"""

from __future__ import annotations

import csv
import functools
import glob
import json
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from scipy import ndimage

from ..errors import InputError
from ..language.findings import read_answer

ANATOMY_ROI_TYPES = {"ORGAN", "EXTERNAL", "AVOIDANCE", "BOLUS", "SUPPORT", "FIXATION", "CONTROL", "ISOCENTER",
                     "MARKER", "REGISTRATION", "CAVITY", "CONTRAST_AGENT", "BRACHY_CHANNEL", "BRACHY_ACCESSORY",
                     "BRACHY_SRC_APP", "BRACHY_CHNL_SHLD", "DOSE_REGION"}
LABEL_SUFFIXES = ("_label", "_seg")
VOLUME_EXTS = (".nii.gz", ".nii", ".nrrd", ".mha")
# what a reference folder holds beside its studies and is not a study itself
NOT_STUDIES = ("*_label.*", "*_seg.*", "annotations/*", "*/annotations/*", "*.xml", "*.json", "*.csv", "*.txt")


@dataclass
class Lesion:
    """A reference lesion: its mask on the study's stored grid (numpy order) and what it is."""

    mask: np.ndarray
    kind: str = "lesion"  # "lesion": kind not known (matches any kind)
    side: str = ""
    level: str = ""  # zone (radiograph) or lobe level (CT); "" when not known
    diameter_mm: float = float("nan")
    source: str = ""


@dataclass
class RefStudy:
    id: str
    modality: str  # "xray" or "ct"
    load: Callable  # () -> Radiograph | CTVolume
    lesions: list[Lesion] = field(default_factory=list)
    report: str = ""  # reference report text, when given
    seed: int | None = None  # phantoms

    def reference_findings(self) -> list[tuple[str, str, str]]:
        """(kind, side, level) of what the study has: from the report text when given, else its lesions."""
        if self.report:
            return [(f.kind, f.side, f.level) for f in read_answer(self.report).findings]
        return [(les.kind, les.side, les.level) for les in self.lesions]

    @property
    def has_reference(self) -> bool:
        return bool(self.report) or bool(self.lesions) or self.seed is not None


# ------------------------------------------------------------------------------------------ geometry


def spacing_of(study) -> tuple[float, ...]:
    """mm per index along the stored array's axes (numpy order). Radiographs without a spacing in their
    file use the film size :func:`xray.pixel_spacing_mm` assumes."""
    from ..io.ct import CTVolume
    from ..io.xray import pixel_spacing_mm

    if isinstance(study, CTVolume):
        return tuple(float(s) for s in reversed(study.geometry.spacing))
    return pixel_spacing_mm(study)[0]


def to_patient_mm(study, index) -> np.ndarray:
    """Patient coordinates (mm; LPS for CT) of a stored-array index (numpy order, may be fractional)."""
    from ..io.ct import CTVolume

    index = np.asarray(index, float)
    if not isinstance(study, CTVolume):
        return index[::-1] * np.asarray(spacing_of(study))[::-1]  # (x, y) on the film
    g = study.geometry
    d = np.asarray(g.direction, float).reshape(3, 3)
    return np.asarray(g.origin, float) + d @ (np.asarray(g.spacing, float) * index[::-1])


def centre_index(mask: np.ndarray) -> tuple[float, ...]:
    return tuple(float(c) for c in ndimage.center_of_mass(mask))


def longest_diameter_mm(mask: np.ndarray, spacing) -> float:
    """Longest in-plane diameter (mm) on the mask's largest plane (axial for a volume): the measure the
    masks' own ``measured`` diameter uses (:func:`grounding.extent.longest_diameter`)."""
    from ..grounding.extent import longest_diameter

    return longest_diameter(mask, tuple(float(s) for s in spacing)) if mask.any() else float("nan")


def side_of(study, mask: np.ndarray) -> str:
    """The patient's side the mask's centre lies on: CT by patient X against the body's centre (same
    slab), a radiograph by the film's middle (shown as PA: the patient's right on the image's left)."""
    from ..grounding.anatomy import body_mask
    from ..io.ct import CTVolume

    c = centre_index(mask)
    if not isinstance(study, CTVolume):
        return "right" if c[1] < mask.shape[1] / 2 else "left"
    zs = np.nonzero(mask.reshape(mask.shape[0], -1).any(1))[0]
    hu = study.to_input(study.hu)
    body = body_mask(hu[zs.min(): zs.max() + 1])
    if not body.any():
        return ""
    b = np.asarray(centre_index(body)) + [zs.min(), 0, 0]
    x_lesion, x_body = to_patient_mm(study, c)[0], to_patient_mm(study, b)[0]
    return "left" if x_lesion > x_body else "right"  # LPS: +X is the patient's left


def lesion_from(study, mask: np.ndarray, text: str = "", kind: str = "", source: str = "") -> Lesion:
    """A lesion of ``mask`` named by ``text`` (kind and site through the findings layer)."""
    found = read_answer(text).findings if text else []
    f = found[0] if found else None
    return Lesion(mask, kind or (f.kind if f else "lesion"), (f.side if f and f.side else side_of(study, mask)),
                  f.level if f else "", longest_diameter_mm(mask, spacing_of(study)), source)


# ------------------------------------------------------------------------------------------ phantoms


def phantom_studies(xray: int = 100, ct: int = 30, first_seed: int = 0) -> list[RefStudy]:
    """``xray`` radiograph and ``ct`` CT phantoms from the held-out seeds (0..19999; calibration uses 20000+)."""
    from ..io.xray import Geometry, Radiograph
    from ..phantoms.ct import make_ct_phantom, phantom_volume
    from ..phantoms.films import make_phantom

    out = []
    for seed in range(first_seed, first_seed + xray):
        ph = make_phantom(seed)
        study = Radiograph(ph.image, Geometry.plain(*ph.image.shape), source={"format": "phantom", "seed": seed})
        spacing = spacing_of(study)
        lesions = [Lesion(les.mask, les.kind, les.side, les.level, longest_diameter_mm(les.mask, spacing), "phantom")
                   for les in ph.lesions]
        out.append(RefStudy(f"xray_phantom_{seed}", "xray", lambda s=study: s, lesions, seed=seed))
    for seed in range(first_seed, first_seed + ct):
        def load(seed=seed):
            return phantom_volume(make_ct_phantom(seed))

        ph = make_ct_phantom(seed)
        spacing = tuple(reversed(ph.spacing))
        lesions = [Lesion(les.mask, les.kind, les.side, les.level, longest_diameter_mm(les.mask, spacing), "phantom")
                   for les in ph.lesions]
        out.append(RefStudy(f"ct_phantom_{seed}", "ct", load, lesions, seed=seed))
    return out


# ------------------------------------------------------------------------------------------ a folder


def folder_studies(root: str, limits=None) -> list[RefStudy]:
    """Every study under ``root`` with the references found beside it (see the module docstring)."""
    from ..io.study import detect, load_study
    from .batch import find_studies

    studies = find_studies(root, exclude=NOT_STUDIES)
    studies = [s for s in studies if not _is_rtstruct(s.path)]
    if not studies:
        raise InputError(f"--data {root!r}: no studies found")
    reports = _reports(root)
    boxes = read_boxes(root) if _has_boxes(root) else {}
    lidc = _by_series(p for p in glob.glob(os.path.join(root, "**", "*.xml"), recursive=True) if _is_lidc(p))
    rtstructs = _rtstructs(root)
    out = []
    for s in studies:
        modality = detect(s.path)

        def load(path=s.path, modality=modality):
            return load_study(path, modality, limits)

        ref = RefStudy(s.id, modality, functools.cache(load), report=reports.get(s.id, "") or _text_beside(s.path))
        lesions: list[Lesion] = []
        if modality == "ct" and os.path.isdir(s.path) and (lidc or rtstructs):
            series, frame = _series_of(s.path)
            xml = lidc.get(series, []) + lidc.get("", [])  # "": a file that names no series is tried on each
            if xml:
                lesions += lidc_lesions(ref.load(), s.path, xml)
            for ds in rtstructs:
                if _references(ds, series, frame):
                    lesions += rtstruct_lesions(ref.load(), ds)
        label = _label_map_beside(s.path)
        if label:
            lesions += label_map_lesions(ref.load(), label)
        rel = os.path.relpath(s.path, root).replace(os.sep, "/")
        for box, text in boxes.get(rel) or boxes.get(os.path.basename(s.path), []):
            study = ref.load()
            lesions.append(lesion_from(study, box_mask(study.pixels.shape, box), text, source="box"))
        ref.lesions = lesions
        out.append(ref)
    return out


def _reports(root: str) -> dict[str, str]:
    path = os.path.join(root, "reports.csv")
    if not os.path.isfile(path):
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"study", "report"} <= set(rows[0]):
        raise InputError(f"{path}: needs the columns study,report")
    return {r["study"]: r["report"] or "" for r in rows}


def _text_beside(path: str) -> str:
    stem = _stem(path)
    txt = os.path.join(os.path.dirname(os.path.normpath(path)), stem + ".txt")
    if os.path.isfile(txt):
        with open(txt, encoding="utf-8") as f:
            return f.read().strip()
    return ""


def _stem(path: str) -> str:
    name = os.path.basename(os.path.normpath(path))
    for ext in (*VOLUME_EXTS, ".dcm", ".png", ".jpg", ".jpeg", ".zip", ".bmp", ".tif", ".tiff"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def _dicom_files(root: str) -> list[str]:
    from ..io.ct import is_dicom_file

    return [os.path.join(r, n) for r, _, names in os.walk(root) for n in sorted(names)
            if not n.startswith(".") and is_dicom_file(os.path.join(r, n))]


# ---- boxes (shared with calibrate)


def _has_boxes(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "boxes.csv")) or any(_is_coco(p) for p in glob.glob(os.path.join(folder, "*.json")))


def _is_coco(path: str) -> bool:
    try:
        with open(path) as f:
            return {"images", "annotations"} <= set(json.load(f))
    except (OSError, ValueError, TypeError):
        return False


def box_mask(shape, box) -> np.ndarray:
    """The pixels of ``box`` ([y0, x0, y1, x1] in pixels, edges rounded outward) as a mask of ``shape``."""
    y0, x0, y1, x1 = box
    m = np.zeros(shape, bool)
    m[max(0, int(np.floor(y0))): int(np.ceil(y1)), max(0, int(np.floor(x0))): int(np.ceil(x1))] = True
    return m


def read_boxes(folder: str) -> dict[str, list[tuple[list[float], str]]]:
    """Image name -> [(box [y0, x0, y1, x1] in pixels, finding text)] from ``boxes.csv`` (columns
    ``image,y0,x0,y1,x1``, optional ``finding``) or a COCO JSON (``bbox`` ``[x, y, width, height]``)."""
    boxes: dict[str, list] = {}
    table = os.path.join(folder, "boxes.csv")
    if os.path.isfile(table):
        with open(table, newline="") as f:
            for i, row in enumerate(csv.DictReader(f), start=2):
                try:
                    box = [float(row[k]) for k in ("y0", "x0", "y1", "x1")]
                except (KeyError, TypeError, ValueError):
                    raise InputError(f"{table} line {i}: needs image,y0,x0,y1,x1 numbers (pixels)") from None
                boxes.setdefault(row["image"], []).append((box, row.get("finding") or ""))
    else:
        for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
            if not _is_coco(path):
                continue
            with open(path) as f:
                coco = json.load(f)
            files = {im["id"]: im["file_name"] for im in coco["images"]}
            cats = {c["id"]: c.get("name", "") for c in coco.get("categories", [])}
            for a in coco["annotations"]:
                x, y, w, h = a["bbox"]
                boxes.setdefault(files[a["image_id"]], []).append(([y, x, y + h, x + w], cats.get(a.get("category_id"), "")))
    if not boxes:
        raise InputError(f"{folder}: no boxes.csv and no COCO JSON with images and annotations")
    return boxes


# ---- LIDC


def _is_lidc(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return b"LidcReadMessage" in head or b"readingSession" in head


def _by_series(xml_paths) -> dict[str, list[str]]:
    """LIDC XML files by the SeriesInstanceUid of their header ("" when it names none)."""
    import xml.etree.ElementTree as ET

    out: dict[str, list[str]] = {}
    for p in sorted(xml_paths):
        uid = ""
        try:
            for _, node in ET.iterparse(p):
                if node.tag.rsplit("}", 1)[-1] == "SeriesInstanceUid":
                    uid = (node.text or "").strip()
                    break
        except (ET.ParseError, OSError):
            pass  # read_outlines says what is wrong with it
        out.setdefault(uid, []).append(p)
    return out


def _series_of(folder: str) -> tuple[str, str]:
    """(SeriesInstanceUID, FrameOfReferenceUID) of the DICOM series in ``folder``."""
    import pydicom

    from ..io.ct import is_dicom_file

    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path) and is_dicom_file(path):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            return str(ds.get("SeriesInstanceUID", "")), str(ds.get("FrameOfReferenceUID", ""))
    return "", ""


def lidc_lesions(volume, folder: str, xml_paths: list[str]) -> list[Lesion]:
    """The nodules outlined in any of ``xml_paths`` on the series ``folder``: one lesion per nodule, the
    voxels at least half of the readers who outlined it drew."""
    from .lidc import read_outlines, series_uids

    uids = series_uids(folder)
    outlines = []
    for p in xml_paths:
        outlines += read_outlines(p, uids, volume.geometry.shape)
    groups: list[list] = []
    for o in outlines:  # a nodule: outlines that overlap (by any reader)
        touching = [any((o.mask & x.mask).any() for x in g) for g in groups]
        merged = [o] + [x for g, t in zip(groups, touching) if t for x in g]
        groups = [g for g, t in zip(groups, touching) if not t] + [merged]
    lesions = []
    for g in groups:
        votes = np.sum([x.mask for x in g], axis=0)
        readers = len({x.reader for x in g})
        mask = votes >= max(1, (readers + 1) // 2)
        lesions.append(lesion_from(volume, mask, kind="nodule", source=f"LIDC XML, {readers} reader(s)"))
    return lesions


# ---- RTSTRUCT


def _is_rtstruct(path: str) -> bool:
    if not os.path.isfile(path):
        return False
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"])
    except Exception:  # noqa: BLE001 (not DICOM)
        return False
    return str(ds.get("Modality", "")) == "RTSTRUCT"


def _rtstructs(root: str) -> list:
    """Every RTSTRUCT under ``root``, read once."""
    import pydicom

    return [pydicom.dcmread(p) for p in _dicom_files(root) if _is_rtstruct(p)]


def _references(ds, series: str, frame: str) -> bool:
    """Whether the RTSTRUCT ``ds`` is drawn on this series (by SeriesInstanceUID; an RTSTRUCT that names
    no series, by its frame of reference)."""
    referenced = {str(s.SeriesInstanceUID) for fr in ds.get("ReferencedFrameOfReferenceSequence", [])
                  for st in fr.get("RTReferencedStudySequence", []) for s in st.get("RTReferencedSeriesSequence", [])}
    frames = {str(fr.FrameOfReferenceUID) for fr in ds.get("ReferencedFrameOfReferenceSequence", [])}
    return series in referenced or (not referenced and frame in frames)


def rtstruct_lesions(volume, ds) -> list[Lesion]:
    """The lesion ROIs of the RTSTRUCT ``ds`` (a pydicom dataset drawn on ``volume``'s series)."""
    from PIL import Image, ImageDraw

    from ..correction import index_of_mm

    names = {int(r.ROINumber): str(r.get("ROIName", "")) for r in ds.get("StructureSetROISequence", [])}
    types = {int(o.ReferencedROINumber): str(o.get("RTROIInterpretedType", "") or "").upper()
             for o in ds.get("RTROIObservationsSequence", [])}
    shape = volume.geometry.shape
    lesions = []
    for roi in ds.get("ROIContourSequence", []):
        number = int(roi.ReferencedROINumber)
        if types.get(number, "") in ANATOMY_ROI_TYPES:
            continue
        mask = np.zeros(shape, bool)
        for c in roi.get("ContourSequence", []):
            if str(c.get("ContourGeometricType", "CLOSED_PLANAR")) not in ("CLOSED_PLANAR", "POINT") or not c.get("ContourData"):
                continue
            xyz = np.asarray(c.ContourData, float).reshape(-1, 3)
            ijk = np.array([index_of_mm(volume.geometry, p, "ContourData") for p in xyz])
            k = int(round(float(np.median(ijk[:, 2]))))
            if not 0 <= k < shape[0]:
                continue
            img = Image.new("1", (shape[2], shape[1]), 0)
            pts = [(float(i), float(j)) for i, j in ijk[:, :2]]
            if len(pts) >= 3:
                ImageDraw.Draw(img).polygon(pts, fill=1, outline=1)
            mask[k] ^= np.array(img, bool)  # contours inside contours are holes (XOR, as viewers draw them)
        if mask.any():
            lesions.append(lesion_from(volume, mask, names.get(number, ""), source=f"RTSTRUCT ROI {names.get(number, number)!r}"))
    return lesions


# ---- label maps


def _label_map_beside(path: str) -> str | None:
    folder, stem = os.path.dirname(os.path.normpath(path)), _stem(path)
    for suffix in LABEL_SUFFIXES:
        for ext in VOLUME_EXTS:
            p = os.path.join(folder, stem + suffix + ext)
            if os.path.isfile(p):
                return p
    return None


def label_map_lesions(study, path: str) -> list[Lesion]:
    """Each connected region of each label value of the label map ``path`` (on the study's stored grid, or
    resampled onto it by patient coordinates, nearest neighbour), named by ``NAME_label.json`` when given."""
    import SimpleITK as sitk

    from ..io.ct import CTVolume

    try:
        img = sitk.ReadImage(path)
    except RuntimeError as e:
        raise InputError(f"cannot read the label map {os.path.basename(path)}: {e}") from None
    g = study.geometry
    arr = sitk.GetArrayFromImage(img)
    if arr.shape != tuple(g.shape) and arr.reshape(-1).size != int(np.prod(g.shape)):
        ref = sitk.Image([int(n) for n in reversed(g.shape)], sitk.sitkUInt8)
        ref.SetSpacing(g.spacing)
        ref.SetOrigin(g.origin)
        ref.SetDirection(g.direction)
        arr = sitk.GetArrayFromImage(sitk.Resample(img, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    arr = arr.reshape(g.shape) if isinstance(study, CTVolume) else arr.reshape(study.pixels.shape)
    names_path = os.path.splitext(path[:-3] if path.endswith(".gz") else path)[0] + ".json"
    names = {}
    if os.path.isfile(names_path):
        with open(names_path, encoding="utf-8") as f:
            names = {int(k): str(v) for k, v in json.load(f).items()}
    lesions = []
    for value in sorted(int(v) for v in np.unique(arr) if v > 0):
        regions, n = ndimage.label(arr == value)
        for r in range(1, n + 1):
            lesions.append(lesion_from(study, regions == r, names.get(value, ""), source=f"label {value}"))
    return lesions
