"""A reading as DICOM: a SEG (one segment per finding) and an SR (TID 1500 measurement report).

Both reference the source series they were computed on, so a PACS viewer shows the masks on the right
frames and links each finding's text to its segment:

* :func:`read_sources` reads the source images' headers (a DICOM file, a series folder or a zip);
* :func:`label_frames` puts a label map (any file SimpleITK reads, in any patient geometry) onto the
  source frames, by patient coordinates for CT slices and pixel for pixel for a radiograph;
* :func:`build_seg` and :func:`build_sr` make the objects with highdicom; :func:`export` does all three.

The reading is the result JSON the server returns (``report``, ``findings``, ``label_names``,
``model``). Segment names come from ``label_names``, or from the annotator's ``label_info`` when a
corrected label is saved. Each SR finding carries its text, its location (coded site and laterality
where the words name them), and the model and precision that produced it.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

from ..errors import InputError

APP = "monailabel-medgemma"
SEG_SERIES_NUMBER = 9901
SR_SERIES_NUMBER = 9902
DISCLAIMER = "model output, not a diagnosis"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version(APP)
    except Exception:  # running from a checkout that is not installed
        return "0.1.0"


# ------------------------------------------------------------------------------------------ sources


# type 2 attributes (present, may be empty) that SEG and SR copy from their source: some sources leave them out
TYPE_2_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                        "ReferringPhysicianName", "AccessionNumber", "StudyID")


def read_sources(path: str) -> list:
    """Headers (no pixels) of the source images of ``path``: one DICOM file, a series folder or a zip.

    Single-frame images of one series only; sorted by instance number."""
    import pydicom

    if path.lower().endswith(".zip"):
        from .ct import _safe_extract

        with tempfile.TemporaryDirectory(prefix="medgemma_src_") as tmp:
            _safe_extract(path, tmp)
            return read_sources(tmp)
    if os.path.isdir(path):
        files = [os.path.join(r, n) for r, _, names in os.walk(path) for n in sorted(names) if not n.startswith(".")]
    elif os.path.isfile(path):
        files = [path]
    else:
        raise InputError(f"source not found: {os.path.basename(path)}", status=404)
    sources = []
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:
            continue  # not DICOM (a README, a thumbnail)
        if "Rows" in ds:
            _uids_from_file_meta(ds)
            for keyword in TYPE_2_PATIENT_STUDY:  # present, possibly empty, in every SEG/SR derived from it
                if keyword not in ds:
                    setattr(ds, keyword, "")
            sources.append(ds)
    if not sources:
        raise InputError("DICOM SEG/SR need DICOM input: the study holds no DICOM image")
    missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID") if not sources[0].get(k)]
    if missing:
        raise InputError(f"the source images have no {', '.join(missing)} (de-identified without new UIDs?): "
                         "a DICOM SEG/SR cannot reference them")
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in sources}
    if len(series) > 1:
        raise InputError(f"the source holds {len(series)} DICOM series: SEG/SR reference one")
    if any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in sources):
        raise InputError("DICOM SEG/SR export supports single-frame source images (not enhanced multi-frame)")
    return sorted(sources, key=lambda ds: int(ds.get("InstanceNumber", 0) or 0))


def _uids_from_file_meta(ds) -> None:
    """An empty SOP class/instance UID in the dataset, taken from the file meta, which names the same
    object (some de-identification tools blank the dataset's copy only)."""
    meta = getattr(ds, "file_meta", None)
    for key, meta_key in (("SOPClassUID", "MediaStorageSOPClassUID"), ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
        if not ds.get(key) and meta is not None and meta.get(meta_key):
            setattr(ds, key, meta.get(meta_key))


def has_patient_geometry(ds) -> bool:
    return all(k in ds for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"))


def label_frames(label_path: str, sources: list) -> np.ndarray:
    """The label map at ``label_path`` on the source frames: (frames, rows, cols) uint8, frame i on source i.

    CT slices (with patient position and orientation): each frame is resampled (nearest neighbour) from
    the label's own patient geometry, so a label in any axis order or direction lands on the right
    voxels. A radiograph (no patient geometry): the label must have the image's rows and columns."""
    import SimpleITK as sitk

    try:
        label = sitk.ReadImage(label_path)
    except RuntimeError as e:
        raise InputError(f"the label file cannot be read: {str(e).strip()[-200:]}") from e
    if label.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("the label has several components per voxel: a label map is scalar")
    if not all(has_patient_geometry(ds) for ds in sources):
        if len(sources) != 1:
            raise InputError("source images without patient position: only a single radiograph is supported")
        plane = np.squeeze(sitk.GetArrayFromImage(label))
        rows, cols = int(sources[0].Rows), int(sources[0].Columns)
        if plane.shape != (rows, cols):
            raise InputError(f"the label is {plane.shape} pixels, the radiograph {rows}x{cols}: they must match")
        return _as_labels(plane[None])
    if label.GetDimension() == 2:
        label = sitk.JoinSeries(label)
    frames = []
    for ds in sources:
        ref = sitk.Image(int(ds.Columns), int(ds.Rows), 1, sitk.sitkUInt8)
        row_dir, col_dir = (np.array(ds.ImageOrientationPatient[:3], float), np.array(ds.ImageOrientationPatient[3:], float))
        ref.SetDirection([float(v) for v in np.column_stack([row_dir, col_dir, np.cross(row_dir, col_dir)]).ravel()])
        ref.SetOrigin([float(v) for v in ds.ImagePositionPatient])
        ref.SetSpacing([float(ds.PixelSpacing[1]), float(ds.PixelSpacing[0]), 1.0])
        out = sitk.Resample(label, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, label.GetPixelID())
        frames.append(sitk.GetArrayFromImage(out)[0])
    return _as_labels(np.stack(frames))


def _as_labels(a: np.ndarray) -> np.ndarray:
    if not np.isfinite(a).all() or (a < 0).any() or (a != np.round(a)).any() or a.max(initial=0) > 255:
        raise InputError("the label map must hold whole numbers 0..255 (0: background, k: segment k)")
    return a.astype(np.uint8)


# ------------------------------------------------------------------------------------------ segments


def segment_names(reading: dict | None, label_info=None) -> dict[int, str]:
    """Label value -> segment name: the annotator's ``label_info`` (a list of {name, idx} as the MONAI
    Label Slicer plugin sends, or a {name: idx} mapping) when given, else the reading's ``label_names``."""
    given = label_info if label_info else (reading or {}).get("label_names") or {}
    if isinstance(given, dict):
        pairs = given.items()
    elif isinstance(given, list):
        pairs = [(d.get("name"), d.get("idx", d.get("label"))) for d in given if isinstance(d, dict)]
    else:
        raise InputError("label_info must be a list of {name, idx} or a {name: label value} mapping")
    names = {}
    for name, idx in pairs:
        try:
            value = int(idx)
        except (TypeError, ValueError):
            raise InputError(f"label_info entry {name!r} has no whole-number label value ({idx!r})") from None
        if 1 <= value <= 255:
            names[value] = str(name or f"label {value}")
    return names


_KIND_CODES = {  # codes from pydicom's DICOM code dictionary (names as there)
    "nodule": ("SCT", "Nodule"), "opacity": ("DCM", "Opacity"), "effusion": ("SCT", "PleuralEffusion"),
    "pneumothorax": ("SCT", "Pneumothorax"), "cardiomegaly": ("SCT", "Cardiomegaly"), "lesion": ("SCT", "Lesion"),
}


def kind_code(kind: str):
    """A coded finding type for a finding kind (SCT "Finding" where the dictionary has no better code)."""
    from pydicom.sr.codedict import codes

    scheme, name = _KIND_CODES.get(kind or "", ("SCT", "Finding"))
    return getattr(getattr(codes, scheme), name)


def finding_site(finding: dict):
    """A coded site (lung, or the lobe for CT lobes) with laterality, when the words name a side."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    side = {"right": codes.SCT.Right, "left": codes.SCT.Left}.get(finding.get("side", ""))
    location, level = finding.get("location", ""), finding.get("level", "")
    anatomy = codes.SCT.Lung
    if location.endswith("lobe"):
        if level == "upper":
            anatomy = codes.SCT.UpperLobeOfLung
        elif level == "lower":
            anatomy = codes.SCT.LowerLobeOfLung
        elif level == "middle" and finding.get("side") == "right":
            anatomy, side = codes.SCT.MiddleLobeOfRightLung, None  # lateral by definition
    if side is None and anatomy == codes.SCT.Lung and not finding.get("side"):
        return None
    return hd.sr.FindingSite(anatomic_location=anatomy, laterality=side)


def model_name(model: dict) -> str:
    """The model as DICOM names it (64 characters at most): its label (the phantom model says it is a test
    model), else its id; a local folder by its name only, never the server's file system path."""
    name = str(model.get("label") or model.get("id") or "unknown")
    return (os.path.basename(name.rstrip("/")) if os.sep in name and not model.get("label") else name)[:64]


def _algorithm(model: dict):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return hd.AlgorithmIdentificationSequence(
        name=model_name(model), version=_version(), family=codes.cid7162.ArtificialIntelligence,
        parameters={"precision": str(model.get("precision", "")), "device": str(model.get("device", ""))},
    )


def _creation_copies(sources: list) -> list:
    """Copies highdicom can build from: a lossy-compressed source without the ratio/method it copies
    (allowed by the standard, common in the wild) is presented as lossless; the result is marked after."""
    out = []
    for ds in sources:
        if ds.get("LossyImageCompression") == "01" and not ("LossyImageCompressionRatio" in ds and "LossyImageCompressionMethod" in ds):
            ds = ds.copy()
            ds.LossyImageCompression = "00"
        out.append(ds)
    return out


def build_seg(sources: list, frames: np.ndarray, names: dict[int, str], reading: dict | None):
    """A binary DICOM SEG with one segment per named label value present in ``names`` (renumbered 1..N
    in label-value order); unnamed values in the label become "label k" segments."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    values = sorted(set(names) | {int(v) for v in np.unique(frames) if v})
    if not values:
        return None, {}
    findings = {f.get("label"): f for f in (reading or {}).get("findings", [])}
    number = {v: k for k, v in enumerate(values, start=1)}
    lut = np.zeros(256, np.uint8)
    for v, k in number.items():
        lut[v] = k
    algorithm = _algorithm((reading or {}).get("model") or {})
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number[v], segment_label=names.get(v, f"label {v}")[:64],
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=kind_code(findings.get(v, {}).get("kind", "")),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
        )
        for v in values
    ]
    seg = hd.seg.Segmentation(
        source_images=_creation_copies(sources), pixel_array=lut[frames],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
        series_instance_uid=hd.UID(), series_number=SEG_SERIES_NUMBER, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer=APP, manufacturer_model_name=model_name((reading or {}).get("model") or {}),
        software_versions=_version(), device_serial_number="0",
        series_description=f"MedGemma attention masks ({DISCLAIMER})"[:64],
    )
    if any(ds.get("LossyImageCompression") == "01" for ds in sources):
        seg.LossyImageCompression = "01"
    return seg, number


def build_sr(sources: list, seg, segment_numbers: dict[int, int], reading: dict):
    """A Comprehensive 3D SR holding a TID 1500 measurement report: the report text, and per finding
    with a segment a measurement group (tracking identifier = the finding's name, its text, coded kind
    and site, the model and precision as algorithm) referencing that segment."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    model = reading.get("model") or {}
    algorithm = hd.sr.AlgorithmIdentification(
        name=model_name(model), version=_version(),
        parameters=[f"precision={model.get('precision', '')}", f"device={model.get('device', '')}"],
    )
    series_uid = str(sources[0].SeriesInstanceUID)
    groups = []
    for f in reading.get("findings", []):
        number = segment_numbers.get(f.get("label"))
        if seg is None or number is None:
            continue
        site = finding_site(f)
        group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=str(f.get("name", ""))[:64]),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID, segment_number=number,
                source_series=hd.sr.SourceSeriesForSegmentation(series_uid),
            ),
            finding_type=kind_code(f.get("kind", "")), algorithm_id=algorithm,
            finding_sites=[site] if site is not None else None,
        )
        group[0].ContentSequence.append(hd.sr.TextContentItem(
            name=codes.DCM.Finding, value=str(f.get("text", "")), relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
        groups.append(group)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name=APP, model_name=model_name(model)),
    )
    procedure = codes.LN.CTUnspecifiedBodyRegion if reading.get("modality") == "ct" else hd.sr.CodedConcept(
        "413815006", "SCT", "Chest imaging")
    content = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=procedure, imaging_measurements=groups,
    )
    content[0].ContentSequence.append(hd.sr.TextContentItem(
        name=codes.DCM.Findings, value=str(reading.get("report", "")), relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    structured = (reading.get("structured_report") or {}).get("text")
    if structured:  # the structured report, in the language asked for (Chinese or English)
        content[0].ContentSequence.append(hd.sr.TextContentItem(
            name=codes.DCM.Impression, value=str(structured), relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    # evidence: the SEG (referenced in the content) as current evidence, the source images as pertinent other
    # evidence (highdicom's split; its TID 1600 image library would need SpacingBetweenSlices, often absent)
    evidence = list(sources) + ([seg] if seg is not None else [])
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence, content=content, series_instance_uid=hd.UID(), series_number=SR_SERIES_NUMBER,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=APP,
        series_description=f"MedGemma findings ({DISCLAIMER})"[:64], is_complete=True, is_final=False,
    )
    sr.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: Chinese reports and findings (ASCII reads the same)
    return sr


def export(study_path: str, label_path: str, reading: dict | None, label_info=None) -> tuple:
    """(SEG or None, SR or None) for the label at ``label_path`` on the DICOM study at ``study_path``.

    No SEG when the label names no segment and holds none; no SR without a reading (an annotator's own
    label saved without a model reading)."""
    sources = read_sources(study_path)
    frames = label_frames(label_path, sources)
    seg, numbers = build_seg(sources, frames, segment_names(reading, label_info), reading)
    sr = build_sr(sources, seg, numbers, reading) if reading else None
    return seg, sr


def write(objects, out_dir: str) -> dict[str, str]:
    """Write SEG/SR datasets as ``seg.dcm`` / ``sr.dcm`` in ``out_dir``; their paths by kind."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for kind, ds in zip(("seg", "sr"), objects):
        if ds is not None:
            paths[kind] = os.path.join(out_dir, f"{kind}.dcm")
            ds.save_as(paths[kind])
    return paths
