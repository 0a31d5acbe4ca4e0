"""Read a chest radiograph into display-ready pixels and its geometry; pad it to square for the model.

Formats: PNG/JPEG/BMP/TIFF (8- or 16-bit grey), DICOM CR/DX (modality LUT, VOI LUT or window, or a
percentile window when the file has none; MONOCHROME1 inverted; compressed transfer syntaxes such as
JPEG 2000 through pylibjpeg), and NIfTI/NRRD/MHA holding a single 2-D plane (e.g. a radiograph that 3D
Slicer sends as a one-slice volume).

Pixels come out as uint8 (rows, cols), bright = dense, as a radiologist would see them. The geometry
is that of the file as read (array shape, spacing, origin, direction); label maps and heatmaps are
written back in exactly this geometry (:mod:`monailabel_app.io.writers`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError
from .file_checks import check_declared_size, check_finite_nifti, check_gzip, malformed_values_refused

RASTER_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
VOLUME_EXTENSIONS = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
# SOP classes that are not images (structured reports, segmentations, ...)
_NON_IMAGE_SOP_PREFIXES = {
    "1.2.840.10008.5.1.4.1.1.88.": "a structured report (SR)",
    "1.2.840.10008.5.1.4.1.1.66.4": "a segmentation (SEG)",
    "1.2.840.10008.5.1.4.1.1.481.": "a radiotherapy object",
    "1.2.840.10008.5.1.4.1.1.11.": "a presentation state",
}
MAX_PIXELS = 64_000_000  # refuse absurd headers before decoding


@dataclass
class Geometry:
    """Where the pixels sit: array shape as stored (numpy order) and ITK-style spacing/origin/direction."""

    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @classmethod
    def plain(cls, rows: int, cols: int, spacing=(1.0, 1.0)) -> "Geometry":
        return cls((rows, cols), tuple(float(s) for s in spacing), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))


@dataclass
class Radiograph:
    pixels: np.ndarray  # uint8 (rows, cols), bright = dense
    geometry: Geometry
    source: dict = field(default_factory=dict)  # format and what was applied, for the result


def _window_to_uint8(a: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise InputError("image contains NaN or infinite pixel values")
    if lo is None or hi is None:
        lo, hi = np.percentile(a, (0.5, 99.5))
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((a - lo) * (255.0 / (hi - lo)), 0, 255).astype(np.uint8)


def _is_dicom(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


def _lower_name(path: str) -> str:
    return os.path.basename(path).lower()


def load_radiograph(path: str) -> Radiograph:
    """Read ``path`` (any supported format, chosen by content and name); raise :class:`InputError`."""
    if not os.path.isfile(path):
        raise InputError(f"image file not found: {os.path.basename(path)}", status=404)
    if os.path.getsize(path) == 0:
        raise InputError("image file is empty (0 bytes)")
    name = _lower_name(path)
    with malformed_values_refused():
        if _is_dicom(path) or name.endswith(".dcm"):
            return _load_dicom(path)
        if name.endswith(VOLUME_EXTENSIONS):
            return _load_volume_plane(path)
        return _load_raster(path)


def _load_raster(path: str) -> Radiograph:
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with Image.open(path) as im:
            im.load()
            mode, fmt = im.mode, im.format
            if mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr", "LA"):
                rgb = np.asarray(im.convert("RGB"), dtype=np.int16)
                chroma = np.abs(rgb[..., 0] - rgb[..., 1]).mean() + np.abs(rgb[..., 1] - rgb[..., 2]).mean()
                if chroma > 6.0:
                    raise InputError(
                        f"colour image (mean channel difference {chroma:.1f}): a radiograph is grey; "
                        "give the X-ray itself, not a photo or a coloured rendering"
                    )
                a = np.asarray(im.convert("L"))
            else:
                a = np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise InputError(f"not a readable image ({os.path.basename(path)}): {e}") from e
    if a.ndim != 2 or min(a.shape) < 16:
        raise InputError(f"image too small or not 2-D: shape {a.shape}; need at least 16x16 pixels")
    pixels = a if a.dtype == np.uint8 else _window_to_uint8(a)
    return Radiograph(pixels, Geometry.plain(*a.shape), {"format": fmt, "mode": mode})


def _load_dicom(path: str) -> Radiograph:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(path, force=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"not a readable DICOM file: {e}") from e
    sop = str(ds.get("SOPClassUID", ""))
    for prefix, what in _NON_IMAGE_SOP_PREFIXES.items():
        if sop.startswith(prefix):
            raise InputError(f"DICOM object is {what}, not an image (SOP class {sop})")
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise InputError("DICOM file has no pixel data (not an image, or truncated before the pixels)")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if rows * cols * frames > MAX_PIXELS:
        raise InputError(f"DICOM header claims {frames}x{rows}x{cols} pixels: too large (limit {MAX_PIXELS})")
    if frames > 1:
        raise InputError(f"DICOM holds {frames} frames (a 3-D volume): only single radiographs are supported")
    modality = str(ds.get("Modality", ""))
    try:
        raw = ds.pixel_array
    except Exception as e:  # pydicom raises many types for bad/truncated/unsupported pixel data
        raise InputError(f"DICOM pixel data cannot be decoded: {type(e).__name__}: {e}") from e
    if raw.ndim == 3 and raw.shape[-1] in (3, 4):
        raise InputError(f"DICOM image is colour ({ds.get('PhotometricInterpretation')}): a radiograph is grey")
    if raw.ndim != 2:
        raise InputError(f"DICOM pixel array has shape {raw.shape}: not a single 2-D radiograph")
    values = apply_modality_lut(raw, ds)
    has_voi = "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds)
    applied = "percentile window 0.5-99.5%"
    if has_voi:
        voi = apply_voi_lut(values, ds, index=0)
        lo, hi = float(np.min(voi)), float(np.max(voi))
        if "VOILUTSequence" not in ds:  # window: its output range is the window itself
            c, w = ds.WindowCenter, ds.WindowWidth
            c = float(c[0] if isinstance(c, pydicom.multival.MultiValue) else c)
            w = float(w[0] if isinstance(w, pydicom.multival.MultiValue) else w)
            lo, hi = c - w / 2.0, c + w / 2.0
            pixels = _window_to_uint8(values, lo, hi)
            applied = f"window C={c:g} W={w:g}"
        else:
            pixels = _window_to_uint8(voi, lo, hi)
            applied = "VOI LUT"
    else:
        pixels = _window_to_uint8(values)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric == "MONOCHROME1":
        pixels = 255 - pixels
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    row_sp, col_sp = (float(spacing[0]), float(spacing[1])) if spacing else (1.0, 1.0)
    if not (row_sp > 0 and col_sp > 0):  # some files carry 0 or negative spacing: keep the pixel grid
        row_sp, col_sp, spacing = 1.0, 1.0, None
    geom = Geometry((rows, cols), (col_sp, row_sp), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
    source = {
        "format": "DICOM",
        "modality": modality,
        "photometric": photometric,
        "transfer_syntax": str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else "",
        "windowing": applied,
        "sop_instance_uid": str(ds.get("SOPInstanceUID", "")),
        "pixel_spacing": "file" if spacing else "none",
    }
    return Radiograph(pixels, geom, source)


def _load_volume_plane(path: str) -> Radiograph:
    import SimpleITK as sitk

    name = _lower_name(path)
    check_gzip(path)
    check_declared_size(path, MAX_PIXELS)
    check_finite_nifti(path)
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(path)
        reader.ReadImageInformation()
        size = reader.GetSize()
        if int(np.prod(size, dtype=np.float64)) * reader.GetNumberOfComponents() > MAX_PIXELS:
            raise InputError(f"image header claims size {size}: too large (limit {MAX_PIXELS} voxels)")
        img = reader.Execute()
    except RuntimeError as e:
        raise InputError(f"not a readable image volume ({os.path.basename(path)}): {str(e).strip()[-200:]}") from e
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("image has several components per pixel (colour or vector): a radiograph is grey")
    arr = sitk.GetArrayFromImage(img)
    plane = np.squeeze(arr)
    if max(arr.shape) < 16:
        raise InputError(f"image too small: shape {arr.shape}; a radiograph needs at least 16x16 pixels")
    if plane.ndim != 2:
        raise InputError(
            f"image is a {arr.ndim}-D volume of shape {arr.shape}, not a radiograph: read it as a CT volume "
            "(modality 'auto' or 'ct')"
        )
    if min(plane.shape) < 16:
        raise InputError(f"image plane too small: {plane.shape}; need at least 16x16 pixels")
    geom = Geometry(arr.shape, img.GetSpacing(), img.GetOrigin(), img.GetDirection())
    return Radiograph(_window_to_uint8(plane), geom, {"format": name.split(".", 1)[-1], "pixel_spacing": "file"})


ASSUMED_FILM_MM = 430.0  # a chest film's longer side when the file gives no pixel spacing (17-inch detector)


def pixel_spacing_mm(radiograph: Radiograph) -> tuple[tuple[float, float], bool]:
    """((row, column) mm per pixel, whether the file said so). A PNG/JPEG (or a DICOM without spacing) says
    nothing: its longer side is taken as :data:`ASSUMED_FILM_MM`, the size of a chest detector, so that
    millimetre limits stay of the right order (1 mm per pixel would make a 1024-pixel film a metre wide)."""
    g = radiograph.geometry
    if radiograph.source.get("pixel_spacing") == "file":
        keep = [s for n, s in zip(g.shape, g.spacing[::-1]) if n > 1] if len(g.spacing) == len(g.shape) else []
        row, col = keep[-2:] if len(keep) >= 2 else (g.spacing[-1], g.spacing[0])
        return (float(row), float(col)), True
    mm = ASSUMED_FILM_MM / max(radiograph.pixels.shape)
    return (mm, mm), False


# ----------------------------------------------------------------------------- model input geometry


@dataclass
class SquarePad:
    """How a (rows, cols) image was centred in a square of side ``side`` (zero padding)."""

    rows: int
    cols: int

    @property
    def side(self) -> int:
        return max(self.rows, self.cols)

    @property
    def top(self) -> int:
        return (self.side - self.rows) // 2

    @property
    def left(self) -> int:
        return (self.side - self.cols) // 2


def pad_to_square(pixels: np.ndarray) -> tuple[np.ndarray, SquarePad]:
    """Centre ``pixels`` (uint8 rows x cols) in a black square and return it, with the padding. The square
    stays grey (side x side): the model is shown it as RGB with three equal channels
    (:func:`generation.build_inputs` makes them without copying it three times)."""
    pad = SquarePad(*pixels.shape)
    square = np.zeros((pad.side, pad.side), np.uint8)
    square[pad.top : pad.top + pad.rows, pad.left : pad.left + pad.cols] = pixels
    return square, pad
