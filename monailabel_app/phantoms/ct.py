"""Synthetic chest CT phantoms in Hounsfield units, with known lesions (test data, not anatomy).

A phantom is a torso section: air outside, a soft-tissue body with a fat rim, ribs, a spine, two lungs
(about -860 HU with texture) shaped as tapering ellipsoids from apex to base, and a heart in the lower
anterior mediastinum bulging to the patient's left. Each lung is cut into lobes by fissure planes:

* oblique fissure (both lungs): the lower lobe is the part below a plane that runs from high at the back
  to low at the front (``u > 0.9 - 0.6 v``, with ``u`` 0 at the apex and 1 at the base, ``v`` 0 at the
  front and 1 at the back of the lung);
* horizontal fissure (right lung): above the oblique fissure, ``u > 0.5`` is the middle lobe.

So the lobes are right upper/middle/lower and left upper/lower. Each phantom carries 1-3 lesions in
distinct lobes: ``nodule`` (a ball of 9-13 mm radius) or ``mass`` (16-22 mm), at random depths, with the
exact voxel mask (lesion in lung) and the reference findings text in the project's report format
(``"nodule in the right upper lobe."``). Everything is deterministic by seed.

Array layout: ``hu[z, y, x]`` with index z increasing toward the patient's head, y toward the back and x
toward the patient's left: world (LPS) axes, direction identity. Shown as an axial slice, a ``hu[z]``
plane is in the radiological display convention (patient right on the image's left, anterior at the
top). :func:`to_image` gives the SimpleITK image; :func:`save` writes it in any stored orientation as
NIfTI, NRRD or a DICOM CT series.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from ..language.report import Finding, format_findings

LOBES = (("right", "upper"), ("right", "middle"), ("right", "lower"), ("left", "upper"), ("left", "lower"))
CT_KINDS = ("nodule", "mass")
LESION_COUNT_P = (0.45, 0.35, 0.2)  # 1, 2, 3 lesions
RADIUS_MM = {"nodule": (9.0, 13.0), "mass": (16.0, 22.0)}
AIR, FAT, SOFT, LUNG, BONE, LESION = -1000.0, -95.0, 40.0, -860.0, 650.0, 25.0


@dataclass
class CTLesion:
    kind: str
    side: str
    level: str  # lobe: upper / middle / lower
    mask: np.ndarray  # bool (z, y, x)
    center: tuple[int, int, int]  # voxel (z, y, x) where the lesion was placed
    radius_mm: float

    @property
    def lobe(self) -> str:
        return f"{self.side} {self.level} lobe"


@dataclass
class CTPhantom:
    seed: int
    hu: np.ndarray  # int16 (z, y, x), LPS axes
    spacing: tuple[float, float, float]  # (x, y, z) mm, ITK order
    origin: tuple[float, float, float]  # LPS mm of voxel (0, 0, 0)
    lesions: list[CTLesion]
    lungs: dict[str, np.ndarray] = field(default_factory=dict)
    lobes: np.ndarray | None = None  # uint8 (z, y, x): index into LOBES + 1, 0 outside the lungs
    body: np.ndarray | None = None

    @property
    def findings(self) -> list[Finding]:
        return [Finding(kind=les.kind, side=les.side, level=les.level, region="lobe") for les in self.lesions]

    @property
    def report(self) -> str:
        return format_findings(self.findings)


def _smooth_noise(rng, shape, sigma):
    return ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma) * (2.5 * sigma)


def make_ct_phantom(seed: int, lesions: bool = True) -> CTPhantom:
    """Draw CT phantom number ``seed`` (same seed, same voxels, lesions and text). ``lesions=False`` gives
    its lesion-free twin: the same anatomy and noise, the lesions drawn on a scratch copy and dropped."""
    rng = np.random.default_rng(seed)
    sxy, sz = rng.uniform(2.6, 3.4), rng.uniform(4.0, 5.5)
    bx, by = rng.uniform(150, 175), rng.uniform(100, 125)  # body semi-axes, mm
    lung_h = rng.uniform(170, 210)
    above, below = rng.uniform(10, 25), rng.uniform(15, 35)
    nx, ny = int(np.ceil(2 * bx * 1.12 / sxy)), int(np.ceil(2 * by * 1.2 / sxy))
    nz = int(np.ceil((lung_h + above + below) / sz))
    zz = (np.arange(nz, dtype=np.float32) * sz)[:, None, None]  # mm, broadcast over the volume
    yy = (np.arange(ny, dtype=np.float32) * sxy)[None, :, None]
    xx = (np.arange(nx, dtype=np.float32) * sxy)[None, None, :]
    cx, cy = nx * sxy / 2 + rng.normal(0, 4), ny * sxy / 2 + rng.normal(0, 4)
    z_base = below + rng.normal(0, 3)
    z_apex = z_base + lung_h

    body2 = ((xx - cx) / bx) ** 2 + ((yy - cy) / by) ** 2
    body = np.broadcast_to(body2 <= 1, (nz, ny, nx))
    hu = np.full((nz, ny, nx), AIR, np.float32)
    hu[body] = SOFT
    hu[body & (body2 > 0.80)] = FAT
    # ribs: arcs inside the body wall, one every ~25 mm of height
    rib_period, rib_phase = rng.uniform(22, 28), rng.uniform(0, 25)
    rib_z = np.abs(((zz - rib_phase) % rib_period) - rib_period / 2) < 4
    ribs = body & (body2 > 0.62) & (body2 < 0.72) & rib_z & (yy > cy - 0.9 * by)
    hu[ribs] = BONE
    # spine: a cylinder behind the mediastinum, cortical rim brighter
    sr = 0.17 * by
    sd = np.hypot(xx - cx, yy - (cy + 0.62 * by))
    hu[np.broadcast_to(sd <= sr, hu.shape)] = BONE * 0.7
    hu[np.broadcast_to((sd <= sr) & (sd > sr * 0.75), hu.shape)] = BONE * 1.3

    u = (z_apex - zz) / lung_h  # 0 at the apex, 1 at the base
    taper = np.sqrt(np.clip(u / 0.55, 0, 1))
    lungs, lobes = {}, np.zeros((nz, ny, nx), np.uint8)
    ly, ry = cy + 0.04 * by, 0.70 * by
    heart = (((xx - (cx + 0.14 * bx)) / (0.30 * bx)) ** 2 + ((yy - (cy - 0.22 * by)) / (0.42 * by)) ** 2
             + ((zz - (z_base + 0.18 * lung_h)) / (0.22 * lung_h)) ** 2) <= 1
    for side, sign in (("right", -1), ("left", +1)):  # patient right at low x
        lx, rx = cx + sign * 0.47 * bx, 0.36 * bx * rng.uniform(0.95, 1.05)
        r2 = ((xx - lx) / rx) ** 2 + ((yy - ly) / ry) ** 2
        lung = (r2 <= taper**2) & (u >= 0) & (u <= 1) & body & ~heart & (sd > sr * 1.2)
        lungs[side] = lung
        v = np.clip((yy - (ly - ry)) / (2 * ry), 0, 1)  # 0 front, 1 back
        lower = u > 0.9 - 0.6 * v
        if side == "right":
            parts = {"upper": ~lower & (u <= 0.5), "middle": ~lower & (u > 0.5), "lower": lower}
        else:
            parts = {"upper": ~lower, "lower": lower}
        for level, part in parts.items():
            lobes[lung & part] = LOBES.index((side, level)) + 1
    lung_any = lungs["right"] | lungs["left"]
    hu[heart & body] = SOFT + 10
    hu[lung_any] = LUNG + 35 * _smooth_noise(rng, hu.shape, 1.0)[lung_any]

    n = int(rng.choice(3, p=LESION_COUNT_P)) + 1
    chosen = [LOBES[i] for i in sorted(rng.choice(len(LOBES), size=n, replace=False))]
    spacing_zyx = (sz, sxy, sxy)
    found, canvas = [], hu if lesions else hu.copy()
    for side, level in chosen:
        kind = str(rng.choice(CT_KINDS))
        r = rng.uniform(*RADIUS_MM[kind])
        lobe = lobes == LOBES.index((side, level)) + 1
        box = ndimage.find_objects(lobe.astype(np.uint8))[0]
        depth = ndimage.distance_transform_edt(np.pad(lobe[box], 1), sampling=spacing_zyx)[1:-1, 1:-1, 1:-1]
        inside = np.argwhere(depth >= min(0.6 * r, 0.8 * depth.max())) + [b.start for b in box]
        pz, py, px = inside[rng.integers(len(inside))]
        # the ball, computed in a box around it
        reach = [int(np.ceil((r + 8) / s)) for s in spacing_zyx]
        near = tuple(slice(max(0, c - e), c + e + 1) for c, e in zip((pz, py, px), reach))
        d = np.sqrt((zz[near[0]] - pz * sz) ** 2 + (yy[:, near[1]] - py * sxy) ** 2 + (xx[:, :, near[2]] - px * sxy) ** 2)
        ball = np.zeros(hu.shape, np.float32)
        ball[near] = 1.0 / (1.0 + np.exp((d - r) / 1.2)) * lung_any[near]
        canvas[near] += ball[near] * (LESION - canvas[near])
        found.append(CTLesion(kind, side, level, (ball >= 0.5) & lung_any, (int(pz), int(py), int(px)), float(r)))
    lesions = found if lesions else []
    hu += rng.normal(0, 18, hu.shape).astype(np.float32) * body
    hu = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    origin = (-nx * sxy / 2, -ny * sxy / 2, -z_base - 0.5 * lung_h)
    return CTPhantom(seed, hu, (sxy, sxy, sz), origin, lesions, lungs, lobes, body)


def phantom_volume(ph: CTPhantom):
    """The phantom as a loaded :class:`ct.CTVolume` (its array is already in the display convention)."""
    from ..io.ct import CTVolume, Orientation
    from ..io.xray import Geometry

    geometry = Geometry(tuple(ph.hu.shape), ph.spacing, ph.origin, (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    return CTVolume(ph.hu.astype(np.float32), ph.spacing[::-1], geometry, Orientation((0, 1, 2), (False,) * 3),
                    source={"format": "phantom", "seed": ph.seed})


# ------------------------------------------------------------------------------------------- export


def to_image(array: np.ndarray, spacing, origin):
    """SimpleITK image of a (z, y, x) LPS-axes array (direction identity)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(array)
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(o) for o in origin])
    return img


def save(ph: CTPhantom, path: str, orientation: str = "LPS", array: np.ndarray | None = None) -> str:
    """Write the phantom (or ``array`` on its grid, e.g. a lesion mask) stored in ``orientation``.

    ``orientation`` is a DICOM-style three-letter code for the stored index axes (``LPS``: i toward the
    patient's left, j toward the back, k toward the head; ``RAS``: i toward the right, ...). The world
    position of every voxel is the same whatever the code. ``path`` ending in ``.nii``/``.nii.gz``/
    ``.nrrd``/``.mha`` writes one file; any other path is a folder for a DICOM CT series.
    """
    import SimpleITK as sitk

    img = sitk.DICOMOrient(to_image(ph.hu if array is None else array, ph.spacing, ph.origin), orientation)
    if path.lower().endswith((".nii", ".nii.gz", ".nrrd", ".mha")):
        sitk.WriteImage(img, path, useCompression=True)
        return path
    return write_dicom_series(img, path, description=f"CT phantom seed {ph.seed} (synthetic)")


def write_dicom_series(img, folder: str, description: str = "synthetic CT") -> str:
    """A real DICOM CT series (one CT Image Storage file per slice) of a SimpleITK HU image.

    Stored as unsigned 16-bit with RescaleIntercept -1024, so readers must apply the modality rescale.
    Files are named in a shuffled order and InstanceNumber runs against the slice order, so a reader
    that sorts by name or number alone gets the volume wrong.
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    import SimpleITK as sitk

    os.makedirs(folder, exist_ok=True)
    arr = sitk.GetArrayFromImage(img)
    d = np.array(img.GetDirection()).reshape(3, 3)
    sx, sy, sz = img.GetSpacing()
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    order = np.random.default_rng(len(arr)).permutation(len(arr))
    for k in range(arr.shape[0]):
        pos = img.TransformIndexToPhysicalPoint((0, 0, k))
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientName, ds.PatientID = "CT", "Phantom^Synthetic", "PHANTOM"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SeriesDescription, ds.SeriesNumber = description, 1
        ds.InstanceNumber = int(arr.shape[0] - k)
        ds.ImagePositionPatient = [f"{p:.6f}" for p in pos]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*d[:, 0], *d[:, 1])]
        ds.PixelSpacing = [f"{sy:.6f}", f"{sx:.6f}"]  # row spacing, column spacing
        ds.SliceThickness = f"{sz:.6f}"
        ds.Rows, ds.Columns = arr.shape[1], arr.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = -600, 1500
        ds.PixelData = (arr[k].astype(np.int32) + 1024).clip(0, 65535).astype(np.uint16).tobytes()
        ds.save_as(os.path.join(folder, f"IM{order[k]:04d}.dcm"), write_like_original=False)
    return folder
