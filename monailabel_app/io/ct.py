"""Read a CT volume into Hounsfield units in the display convention, and render the model's slices.

Sources: NIfTI / NRRD / MHA files, a DICOM series folder (or a ``.zip`` of one), an enhanced multi-frame
CT file, a single CT DICOM slice. DICOM slices are sorted by their position along the slice normal
(never by file name or InstanceNumber) and each slice's rescale slope/intercept is applied.

Two geometries are kept:

* the **input geometry** (:class:`xray.Geometry`: array shape as stored, spacing, origin, direction);
  masks and heatmaps go back in exactly this geometry;
* the **display array** ``hu[z, y, x]``: z toward the patient's head, y toward the back, x toward the
  patient's left. An axial plane ``hu[z]`` is what a DICOM viewer shows: patient right on the image's
  left, anterior at the top. It is a pure axis permutation / flip of the stored array (exact, no
  interpolation), whatever the file format or stored orientation. Volumes whose axes are oblique to the
  patient's axes (more than ``max_obliquity_deg``) are refused unless ``resample`` is set; then they are
  resampled (linear) onto a patient-aligned grid and the results are resampled back.

MedGemma 1.5 recipe (:func:`sample_slices`, :func:`window_rgb`): up to ``max_slices`` axial slices
sampled uniformly over the volume, presented from the head down (``SLICE 1`` is the most superior),
each rendered as RGB of three HU windows: R -1024..1024, G -135..215, B 0..80.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import zipfile
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError
from .file_checks import check_declared_size, check_finite_nifti, check_gzip, malformed_values_refused
from .xray import Geometry, SquarePad

logger = logging.getLogger(__name__)

WINDOWS = ((-1024.0, 1024.0), (-135.0, 215.0), (0.0, 80.0))  # R, G, B
CT_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
}
MAX_ZIP_BYTES = 4 << 30


@dataclass
class Limits:
    """What the server accepts as a CT volume (all configurable)."""

    min_slices: int = 1
    max_voxels: int = 256 * 1024 * 1024
    max_obliquity_deg: float = 10.0
    resample: bool = False  # resample oblique volumes onto a patient-aligned grid instead of refusing
    min_side: int = 16  # in-plane pixels
    memory_guard_mib: float = 0.0  # refuse a study whose estimated working memory is larger (0: no guard)


@dataclass
class Orientation:
    """Display array = ``flip(transpose(stored, perm), flips)``; exact and invertible."""

    perm: tuple[int, int, int]
    flips: tuple[bool, bool, bool]

    def to_display(self, stored: np.ndarray) -> np.ndarray:
        a = np.transpose(stored, self.perm)
        return np.ascontiguousarray(a[tuple(slice(None, None, -1) if f else slice(None) for f in self.flips)])

    def to_stored(self, display: np.ndarray, copy: bool = True) -> np.ndarray:
        """``copy=False``: a view of ``display`` (strided), for arrays only read or copied on writing."""
        a = np.transpose(display[tuple(slice(None, None, -1) if f else slice(None) for f in self.flips)], np.argsort(self.perm))
        return np.ascontiguousarray(a) if copy else a


@dataclass
class CTVolume:
    hu: np.ndarray  # float32 display array (z toward head, y toward back, x toward patient left)
    spacing: tuple[float, float, float]  # mm along the display axes (z, y, x)
    geometry: Geometry  # the input's stored geometry
    orientation: Orientation | None  # None when resampled
    display_image: object = None  # SimpleITK image of the display grid (resampled volumes only)
    input_image: object = None  # SimpleITK reference of the input grid (resampled volumes only)
    source: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)

    def to_input(self, display: np.ndarray, nearest: bool = False, copy: bool = True) -> np.ndarray:
        """An array on the display grid, back on the input's stored grid (same shape as the input).
        ``copy=False``: a reoriented input may come back as a view of ``display`` (a heatmap that is only
        read, or written through a copy of its own: a volume's transposed copy costs 0.2 s)."""
        if self.orientation is not None:
            return self.orientation.to_stored(display, copy).reshape(self.geometry.shape)
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(np.asarray(display, np.float32))
        img.CopyInformation(self.display_image)
        out = sitk.Resample(img, self.input_image, sitk.Transform(), sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear, 0.0)
        return sitk.GetArrayFromImage(out).reshape(self.geometry.shape)

    def display_index(self, stored) -> tuple[int, int, int]:
        """The display-grid index (z, y, x) of the stored array's index ``stored`` (numpy order)."""
        if self.orientation is None:  # resampled: through patient space
            point = self.input_image.TransformIndexToPhysicalPoint(tuple(int(i) for i in reversed(stored)))
            ijk = self.display_image.TransformPhysicalPointToIndex(point)
            return tuple(int(min(max(i, 0), n - 1)) for i, n in zip(reversed(ijk), self.shape))
        o, out = self.orientation, []
        for a in range(3):
            t = int(stored[o.perm[a]])
            out.append(self.shape[a] - 1 - t if o.flips[a] else t)
        return tuple(out)

    def stored_index(self, display) -> tuple[int, int, int]:
        """The stored array's index (numpy order) of the display-grid index ``display`` (z, y, x)."""
        if self.orientation is None:
            point = self.display_image.TransformIndexToPhysicalPoint(tuple(int(i) for i in reversed(display)))
            ijk = self.input_image.TransformPhysicalPointToIndex(point)
            return tuple(int(min(max(i, 0), n - 1)) for i, n in zip(reversed(ijk), self.geometry.shape))
        o, out = self.orientation, [0, 0, 0]
        for a in range(3):
            d = int(display[a])
            out[o.perm[a]] = self.shape[a] - 1 - d if o.flips[a] else d
        return tuple(out)

    def display_to_stored_index(self, z: int) -> int | None:
        """Index along the stored slice axis of display slice ``z`` (None when resampled)."""
        if self.orientation is None:
            return None
        stored_axis = self.orientation.perm[0]
        n = self.geometry.shape[stored_axis]
        return n - 1 - z if self.orientation.flips[0] else z

    def world_z(self, z: int) -> float:
        """Patient z (LPS, mm; larger = toward the head) of the centre of display slice ``z``."""
        img = self.display_image if self.orientation is None else None
        if img is not None:
            return float(img.TransformIndexToPhysicalPoint((0, 0, int(z)))[2])
        g = self.geometry
        d = np.array(g.direction).reshape(3, 3)
        index = [0, 0, 0]  # ITK index order (i, j, k) = numpy axes (2, 1, 0)
        stored_axis = self.orientation.perm[0]
        index[2 - stored_axis] = self.display_to_stored_index(z)
        return float((np.array(g.origin) + d @ (np.array(index) * np.array(g.spacing)))[2])


# ------------------------------------------------------------------------------------- the recipe


def sample_slices(n: int, max_slices: int) -> list[int]:
    """Display slice indices to show, head first: all of them, or ``max_slices`` spread uniformly."""
    if max_slices < 1:
        raise InputError(f"max_slices must be at least 1, got {max_slices}")
    if n <= max_slices:
        picked = np.arange(n)
    else:
        picked = np.unique(np.round(np.linspace(0, n - 1, max_slices)).astype(int))
    return [int(z) for z in picked[::-1]]  # display z grows toward the head: head first


@dataclass
class ModelSlices:
    """The images handed to the processor for one CT: display slice ``indices[n]`` is ``SLICE n+1``."""

    indices: list[int]  # display z of each image, head first
    images: list[np.ndarray]  # uint8 RGB squares (before the processor's own resize)
    pad: SquarePad  # how each axial plane sits in its square
    on_device: list | None = None  # the same squares on a GPU, channels first (uint8 torch tensors), when made there

    @property
    def shown(self) -> list:
        """Each square as the processor is handed it: on the GPU where it was made there."""
        return self.on_device if self.on_device is not None else self.images


def model_slices(volume: "CTVolume", max_slices: int, indices: list[int] | None = None,
                 device=None) -> ModelSlices:
    """Sample (or take the given display ``indices``), pad to square with air (-1024 HU) and window the
    slices the model will read. ``device`` a GPU: the planes are uploaded once (:func:`upload_planes`) and windowed
    there (:func:`windowed`, the same bytes as :func:`window_rgb`), then copied back once for
    :attr:`ModelSlices.images`; 85 slices of 512 x 512 took 0.14-0.42 s through numpy on this project's CPU, in a
    CT's preprocessing."""
    if indices is None:
        indices = sample_slices(volume.shape[0], max_slices)
    pad = SquarePad(volume.shape[1], volume.shape[2])
    if device is not None and str(device).startswith("cuda"):
        import torch

        planes = upload_planes(volume.hu, indices, device)
        square = torch.full((len(indices), pad.side, pad.side), -1024.0, dtype=torch.float32, device=device)
        square[:, pad.top : pad.top + pad.rows, pad.left : pad.left + pad.cols] = planes
        rgb = windowed(square)  # (n, 3, side, side)
        host = rgb.permute(0, 2, 3, 1).contiguous().cpu().numpy()
        return ModelSlices(indices, list(host), pad, list(rgb))
    images = []
    for z in indices:
        square = np.full((pad.side, pad.side), -1024.0, np.float32)
        square[pad.top : pad.top + pad.rows, pad.left : pad.left + pad.cols] = volume.hu[z]
        images.append(window_rgb(square))
    return ModelSlices(indices, images, pad)


_STAGING: dict = {}  # device -> (a kept page-locked float32 buffer, the event of its last upload)
_STAGING_LOCK = threading.Lock()
_NO_PAGE_LOCKED: set = set()  # devices where no page-locked buffer could be had: not tried (nor warned) again


def upload_planes(hu: np.ndarray, indices: list[int], device):
    """``hu[indices]`` (float32) on the GPU ``device``: gathered by torch into a page-locked buffer kept per device
    (grown to the largest CT's planes; reused once its last upload has read it) and uploaded from there without a
    stop. 85 planes of 512 x 512 on an H100's host (run DP): gathered by numpy 8.7 ms and uploaded from pageable
    memory 8.1 ms, from page-locked memory 1.6 ms. An array torch cannot view (not float32, or a flipped view)
    is gathered by numpy first; where no page-locked memory can be had, the planes go up from pageable memory."""
    import torch

    key = str(torch.device(device))
    if key in _NO_PAGE_LOCKED:
        return torch.from_numpy(np.ascontiguousarray(hu[indices], np.float32)).to(device)
    if hu.dtype != np.float32 or any(s < 0 for s in hu.strides):
        hu = np.ascontiguousarray(hu[indices], np.float32)
        indices = list(range(len(indices)))
    n, rows, cols = len(indices), hu.shape[1], hu.shape[2]
    with _STAGING_LOCK:
        buffer, last = _STAGING.get(key, (None, None))
        if last is not None:
            last.synchronize()  # its last upload has read the buffer
        if buffer is None or buffer.numel() < n * rows * cols:
            try:
                buffer = torch.empty(n * rows * cols, dtype=torch.float32, pin_memory=True)
            except RuntimeError as e:
                logger.warning("a CT's planes go up from pageable memory: no page-locked buffer (%s)", e)
                _STAGING.pop(key, None)
                _NO_PAGE_LOCKED.add(key)
                return upload_planes(hu, indices, device)
        staged = buffer[: n * rows * cols].view(n, rows, cols)
        torch.index_select(torch.from_numpy(hu), 0, torch.tensor(indices, dtype=torch.long), out=staged)
        planes = staged.to(device, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        _STAGING[key] = (buffer, done)
    return planes


def interleave(images: list, label: str = "SLICE") -> list:
    """Chat content for a CT: each image followed by the text ``SLICE n`` (n from 1)."""
    content = []
    for n, image in enumerate(images, start=1):
        content += [image, f"{label} {n}"]
    return content


def window_rgb(hu_plane: np.ndarray) -> np.ndarray:
    """uint8 (rows, cols, 3): the plane through the three MedGemma CT windows (R wide, G soft, B brain)."""
    out = np.empty(hu_plane.shape + (3,), np.uint8)
    for c, (lo, hi) in enumerate(WINDOWS):
        out[..., c] = np.rint(np.clip((hu_plane - lo) * (255.0 / (hi - lo)), 0, 255)).astype(np.uint8)
    return out


def windowed(hu_planes):
    """:func:`window_rgb` in torch, where ``hu_planes`` (n, rows, cols, float32) are: uint8 (n, 3, rows, cols),
    channels first. The same float32 operations in the same order (no fused kernels: each is its own), rounded
    half to even as ``np.rint``: the same bytes (tested)."""
    import torch

    return torch.stack([((hu_planes - lo) * (255.0 / (hi - lo))).clamp_(0, 255).round_().to(torch.uint8)
                        for lo, hi in WINDOWS], 1)


# ------------------------------------------------------------------------------------------ loading


def is_ct_dicom(ds) -> bool:
    return str(ds.get("SOPClassUID", "")) in CT_SOP_CLASSES or str(ds.get("Modality", "")).upper() == "CT"


def load_ct(path: str, limits: Limits | None = None) -> CTVolume:
    """Read a CT volume from ``path`` (file, DICOM folder or zip); raise :class:`InputError`."""
    limits = limits or Limits()
    with malformed_values_refused():
        if os.path.isdir(path):
            image, source = _read_dicom_folder(path, limits)
        elif path.lower().endswith(".zip"):
            with tempfile.TemporaryDirectory(prefix="medgemma_zip_") as tmp:
                _safe_extract(path, tmp)
                image, source = _read_dicom_folder(tmp, limits)
            source["format"] = "DICOM series (zip)"
        elif not os.path.isfile(path):
            raise InputError(f"image not found: {os.path.basename(path)}", status=404)
        elif is_dicom_file(path):
            image, source = _read_dicom_files([path], limits)
        else:
            image, source = _read_volume_file(path, limits)
        return _to_volume(image, source, limits)


def is_dicom_file(path: str) -> bool:
    """A ``.dcm`` name, or the DICM magic of a DICOM Part 10 file (False for a file that cannot be read)."""
    if path.lower().endswith(".dcm"):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _safe_extract(zip_path: str, folder: str) -> None:
    try:
        with zipfile.ZipFile(zip_path) as z:
            total = sum(i.file_size for i in z.infolist())
            if total > MAX_ZIP_BYTES:
                raise InputError(f"zip expands to {total / 2**30:.1f} GiB: over the {MAX_ZIP_BYTES >> 30} GiB limit")
            for info in z.infolist():
                if info.is_dir():
                    continue
                name = os.path.basename(info.filename)
                if not name or name.startswith("."):
                    continue
                # flatten: never write outside the folder, whatever the member's path says
                with z.open(info) as src, open(os.path.join(folder, f"{len(os.listdir(folder)):06d}_{name}"), "wb") as dst:
                    shutil.copyfileobj(src, dst)
    except zipfile.BadZipFile as e:
        raise InputError(f"not a readable zip file: {e}") from e


def _read_volume_file(path: str, limits: Limits):
    import SimpleITK as sitk

    check_gzip(path)
    check_declared_size(path, limits.max_voxels)
    check_finite_nifti(path)
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(path)
        reader.ReadImageInformation()
        size, dim = reader.GetSize(), reader.GetDimension()
        if dim == 4 and size[3] > 1:
            raise InputError(f"image is 4-D (size {size}): a CT volume has three dimensions, not a time series or channels")
        if int(np.prod(size, dtype=np.float64)) > limits.max_voxels:
            raise InputError(f"volume has {int(np.prod(size, dtype=np.float64))} voxels {tuple(size)}: over the limit of {limits.max_voxels}")
        if reader.GetNumberOfComponents() != 1:
            raise InputError("image has several components per voxel (colour or vector): a CT volume is scalar HU")
        img = reader.Execute()
    except RuntimeError as e:
        raise InputError(f"not a readable image volume ({os.path.basename(path)}): {str(e).strip()[-200:]}") from e
    if img.GetDimension() == 4:
        img = img[:, :, :, 0]
    if img.GetDimension() == 2:
        img = sitk.JoinSeries(img)
    name = os.path.basename(path).lower()
    return sitk.Cast(img, sitk.sitkFloat32), {"format": name.split(".", 1)[-1]}


def _read_dicom_folder(folder: str, limits: Limits):
    files = []
    for root, _, names in os.walk(folder):
        files += [os.path.join(root, n) for n in sorted(names) if not n.startswith(".") and n.upper() != "DICOMDIR"]
    if not files:
        raise InputError("the DICOM folder is empty")
    return _read_dicom_files(files, limits, folder=True)


def _read_dicom_files(files: list[str], limits: Limits, folder: bool = False):
    import pydicom
    from pydicom.errors import InvalidDicomError

    headers = []
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
        except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            if folder:
                continue  # not DICOM: skip it (README, thumbnails, ...)
            raise InputError(f"not a readable DICOM file: {type(e).__name__}: {e}") from e
        if "SOPClassUID" not in ds and "Rows" not in ds:
            continue
        check_encoding(ds, os.path.basename(f))
        headers.append((f, ds))
    if not headers:
        raise InputError("no DICOM image in the input")
    series = {}
    for f, ds in headers:
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((f, ds))
    if len(series) > 1:
        desc = ", ".join(f"{uid or '?'} ({len(v)} files)" for uid, v in series.items())
        raise InputError(f"the input holds {len(series)} DICOM series ({desc}): give one series at a time")
    (_, members), = series.items()
    not_ct = [ds for _, ds in members if not is_ct_dicom(ds)]
    if not_ct:
        ds = not_ct[0]
        raise InputError(f"DICOM object is not a CT image (Modality {ds.get('Modality', '?')}, SOP class {ds.get('SOPClassUID', '?')})")
    if len(members) == 1 and int(members[0][1].get("NumberOfFrames", 1) or 1) > 1:
        return _read_multiframe(members[0][0], limits)
    return _assemble_slices(members, limits)


def check_encoding(ds, name: str) -> None:
    """Refuse malformed DICOM: a sequence stored as VR UN (invalid encoding) or a non-empty invalid UID.

    Call on a freshly read dataset (before its elements are accessed and converted). Both defects break
    what comes after reading: a mis-encoded sequence is guessed at, and results (SEG/SR) must reference
    the source by valid UIDs. Empty UIDs (anonymised files) are accepted.
    """
    from pydicom.datadict import dictionary_VR
    from pydicom.dataelem import RawDataElement
    from pydicom.uid import UID

    problems = []
    for tag, raw in ds._dict.items():
        if isinstance(raw, RawDataElement) and raw.VR == "UN":
            try:
                if dictionary_VR(tag) == "SQ":
                    problems.append(f"sequence {tag} is encoded with VR UN (malformed sequence)")
            except KeyError:
                pass
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
        value = str(ds.get(key, "") or "")
        if value and not UID(value).is_valid:
            problems.append(f"{key} {value[:24]}... is not a valid UID")
    if problems:
        raise InputError(f"malformed DICOM file {name}: " + "; ".join(problems))


def _pixel_array(path: str, frames_expected: int = 1):
    import pydicom

    try:
        ds = pydicom.dcmread(path, force=True)
        arr = ds.pixel_array
    except Exception as e:  # pydicom raises many types for bad/truncated/unsupported pixel data
        raise InputError(f"DICOM pixel data cannot be decoded ({os.path.basename(path)}): {type(e).__name__}: {e}") from e
    return ds, arr


def _orientation_normal(iop) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    row, col = np.array(iop[:3], float), np.array(iop[3:], float)
    normal = np.cross(row, col)
    if not np.isfinite(normal).all() or np.linalg.norm(normal) < 0.5:
        raise InputError(f"invalid ImageOrientationPatient {list(iop)}")
    return row, col, normal / np.linalg.norm(normal)


def _stack_to_image(planes: list[np.ndarray], positions: list, iop, pixel_spacing, thickness, source):
    """Planes sorted along the normal -> SimpleITK image (checks spacing, duplicates, gaps)."""
    import SimpleITK as sitk

    row, col, normal = _orientation_normal(iop)
    depth = np.array([float(np.dot(p, normal)) for p in positions])
    order = np.argsort(depth, kind="stable")
    depth = depth[order]
    if len(depth) > 1:
        steps = np.diff(depth)
        if (steps < 1e-3).any():
            raise InputError("two slices share one position: the series has duplicate slices")
        if steps.max() - steps.min() > max(0.1 * np.median(steps), 0.05):
            raise InputError(
                f"slices are not evenly spaced (gaps from {steps.min():.2f} to {steps.max():.2f} mm): "
                "a slice is missing or the series mixes acquisitions"
            )
        step = float(np.mean(steps))
    else:
        step = float(thickness or 1.0)
    arr = np.stack([planes[i] for i in order]).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    ps = [float(v) for v in pixel_spacing] if pixel_spacing else [1.0, 1.0]
    if not all(v > 0 for v in ps):
        ps = [1.0, 1.0]
    img.SetSpacing([ps[1], ps[0], step if step > 0 else 1.0])
    img.SetOrigin([float(v) for v in positions[order[0]]])
    img.SetDirection([float(v) for v in np.column_stack([row, col, normal]).ravel()])
    source["slices"] = len(planes)
    return img, source


def _rescaled(ds, arr) -> np.ndarray:
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return arr.astype(np.float32) * slope + intercept


def _assemble_slices(members, limits: Limits):
    first = members[0][1]
    rows, cols = int(first.get("Rows", 0) or 0), int(first.get("Columns", 0) or 0)
    if rows * cols * len(members) > limits.max_voxels:
        raise InputError(f"series has {len(members)} slices of {rows}x{cols}: over the limit of {limits.max_voxels} voxels")
    iop = first.get("ImageOrientationPatient")
    planes, positions = [], []
    for f, ds in members:
        if ds.get("ImagePositionPatient") is None or ds.get("ImageOrientationPatient") is None:
            if len(members) == 1:  # a lone slice without position: place it at the origin, axial
                ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 0], [1, 0, 0, 0, 1, 0]
                iop = ds.ImageOrientationPatient
            else:
                raise InputError(f"slice {os.path.basename(f)} has no ImagePositionPatient/ImageOrientationPatient: cannot order the series")
        if not np.allclose([float(v) for v in ds.ImageOrientationPatient], [float(v) for v in iop], atol=1e-3):
            raise InputError("slices have different orientations: not one volume")
        full, arr = _pixel_array(f)
        if arr.ndim != 2 or arr.shape != (rows, cols):
            raise InputError(f"slice {os.path.basename(f)} has pixel shape {arr.shape}, expected {(rows, cols)}")
        planes.append(_rescaled(full, arr))
        positions.append(np.array([float(v) for v in ds.ImagePositionPatient]))
    source = {"format": "DICOM series" if len(members) > 1 else "DICOM", "modality": str(first.get("Modality", "")),
              "series_instance_uid": str(first.get("SeriesInstanceUID", ""))}
    return _stack_to_image(planes, positions, [float(v) for v in iop], first.get("PixelSpacing"),
                           first.get("SliceThickness"), source)


def _read_multiframe(path: str, limits: Limits):
    """Enhanced (multi-frame) CT: per-frame positions, shared or per-frame orientation and rescale."""
    ds, arr = _pixel_array(path)
    frames = int(ds.NumberOfFrames)
    if arr.ndim != 3 or arr.shape[0] != frames:
        raise InputError(f"multi-frame pixel array has shape {arr.shape}, expected {frames} grey frames")
    if arr.size > limits.max_voxels:
        raise InputError(f"volume has {arr.size} voxels: over the limit of {limits.max_voxels}")
    shared = ds.get("SharedFunctionalGroupsSequence", [None])[0]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None or len(per_frame) != frames:
        raise InputError("multi-frame CT has no per-frame functional groups: frame positions unknown")

    def group(i, name, attr):
        for g in (per_frame[i], shared):
            if g is not None and name in g and attr in g[name][0]:
                return g[name][0].get(attr)
        return None

    iop = group(0, "PlaneOrientationSequence", "ImageOrientationPatient")
    spacing = group(0, "PixelMeasuresSequence", "PixelSpacing")
    thickness = group(0, "PixelMeasuresSequence", "SliceThickness")
    planes, positions = [], []
    for i in range(frames):
        pos = group(i, "PlanePositionSequence", "ImagePositionPatient")
        if pos is None or iop is None:
            raise InputError(f"frame {i + 1} has no position/orientation: cannot build a volume")
        frame_iop = group(i, "PlaneOrientationSequence", "ImageOrientationPatient")
        if not np.allclose([float(v) for v in frame_iop], [float(v) for v in iop], atol=1e-3):
            raise InputError("frames have different orientations: not one volume")
        slope = group(i, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = group(i, "PixelValueTransformationSequence", "RescaleIntercept")
        slope = float(slope if slope is not None else ds.get("RescaleSlope", 1) or 1)
        intercept = float(intercept if intercept is not None else ds.get("RescaleIntercept", 0) or 0)
        planes.append(arr[i].astype(np.float32) * slope + intercept)
        positions.append(np.array([float(v) for v in pos]))
    source = {"format": "DICOM enhanced multi-frame", "modality": str(ds.get("Modality", "")), "frames": frames,
              "series_instance_uid": str(ds.get("SeriesInstanceUID", ""))}
    return _stack_to_image(planes, positions, [float(v) for v in iop], spacing, thickness, source)


# ------------------------------------------------------------------------------- to display space


def _orientation_of(direction: np.ndarray) -> tuple[Orientation, float]:
    """The permutation/flip that takes stored numpy axes to display axes, and the worst obliquity (deg)."""
    # direction columns: world (LPS) direction of ITK index axes i, j, k = numpy axes 2, 1, 0
    world_of_index = np.abs(direction).argmax(axis=0)
    if len(set(world_of_index.tolist())) != 3:
        raise InputError("volume axes are degenerate (two index axes point the same way)")
    cosines = np.abs(direction)[world_of_index, range(3)].clip(-1, 1)
    worst = float(np.degrees(np.arccos(cosines.min())))
    perm, flips = [0, 0, 0], [False, False, False]
    for itk_axis in range(3):
        world = int(world_of_index[itk_axis])  # 0 x (left), 1 y (back), 2 z (head)
        display_axis = 2 - world  # display numpy axes: 0 z, 1 y, 2 x
        perm[display_axis] = 2 - itk_axis
        flips[display_axis] = bool(direction[world, itk_axis] < 0)
    return Orientation(tuple(perm), tuple(flips)), worst


def _to_volume(image, source: dict, limits: Limits) -> CTVolume:
    import SimpleITK as sitk

    stored = sitk.GetArrayFromImage(image).astype(np.float32)
    geometry = Geometry(tuple(stored.shape), image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    if not np.isfinite(stored).all():
        raise InputError("volume contains NaN or infinite voxel values")
    direction = np.array(image.GetDirection()).reshape(3, 3)
    orientation, obliquity = _orientation_of(direction)
    source["obliquity_deg"] = round(obliquity, 2)
    if obliquity > limits.max_obliquity_deg:
        if not limits.resample:
            raise InputError(
                f"volume axes are {obliquity:.1f} degrees off the patient's axes (non-axial or oblique acquisition); "
                f"limit {limits.max_obliquity_deg} degrees: resample it to axial first, or ask the server to resample"
            )
        display_image = _patient_aligned(image)
        hu = sitk.GetArrayFromImage(display_image).astype(np.float32)
        sx, sy, sz = display_image.GetSpacing()
        vol = CTVolume(hu, (sz, sy, sx), geometry, None, display_image, image, source)
        source["resampled"] = True
    else:
        hu = orientation.to_display(stored)
        sp = np.array(image.GetSpacing())[::-1]  # numpy order (k, j, i)
        vol = CTVolume(hu, tuple(float(sp[a]) for a in orientation.perm), geometry, orientation, source=source)
    z, y, x = vol.shape
    if z < limits.min_slices:
        raise InputError(f"volume has {z} axial slices; this server needs at least {limits.min_slices}")
    if min(y, x) < limits.min_side:
        raise InputError(f"axial slices are {y}x{x} pixels: too small (need at least {limits.min_side})")
    if hu.max() - hu.min() < 1e-3:
        raise InputError("volume is blank (every voxel has the same value)")
    source["display_shape"] = list(vol.shape)
    return vol


def _patient_aligned(image):
    """Resample ``image`` (linear) onto a grid aligned with the patient's axes covering the same extent."""
    import SimpleITK as sitk

    size = np.array(image.GetSize())
    corners = np.array([image.TransformContinuousIndexToPhysicalPoint([float(c) for c in (np.array(b) * (size - 1))])
                        for b in np.ndindex(2, 2, 2)])
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    spacing = np.full(3, min(image.GetSpacing()))
    spacing[2] = max(image.GetSpacing())
    out_size = [int(np.ceil((h - l) / s)) + 1 for l, h, s in zip(lo, hi, spacing)]
    ref = sitk.Image(out_size, sitk.sitkFloat32)
    ref.SetSpacing([float(s) for s in spacing])
    ref.SetOrigin([float(v) for v in lo])
    return sitk.Resample(image, ref, sitk.Transform(), sitk.sitkLinear, -1024.0)
