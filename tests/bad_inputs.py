"""Bad study files, made on the fly (real third-party objects from ../shared/data where one is needed).

``BAD_FILES``: name -> (maker, expected HTTP status, words the message must hold). A maker writes the
file at the given path. The same files go through the server (as datastore images) and the CLI.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import struct
import zipfile

import numpy as np

from tests.conftest import shared

RNG = np.random.default_rng(1234)
NOISE = RNG.integers(0, 256, 4000, dtype=np.uint8).tobytes()


def _write(data: bytes):
    def make(path):
        with open(path, "wb") as f:
            f.write(data)
    return make


def _copy(*parts):
    return lambda path: shutil.copy(shared(*parts), path)


def _truncated(*parts, keep=1 / 3):
    def make(path):
        data = open(shared(*parts), "rb").read()
        with open(path, "wb") as f:
            f.write(data[: int(len(data) * keep)])
    return make


def _volume(arr, spacing=(1.0, 1.0, 1.0)):
    def make(path):
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(arr)
        if img.GetDimension() == 3:
            img.SetSpacing(spacing)
        sitk.WriteImage(img, path)
    return make


def _nifti(arr):
    def make(path):
        import nibabel as nib

        nib.save(nib.Nifti1Image(arr, np.eye(4)), path)
    return make


def _ct(fill=None):
    a = np.full((6, 32, 32), -1000.0, np.float32)
    a[:, 8:24, 8:24] = 40.0
    if fill is not None:
        a[3, 10, 10] = fill
    return a


def _huge_nifti_header(path):
    """A NIfTI-1 header claiming 100,000^3 float32 voxels and no data."""
    hdr = bytearray(348)
    struct.pack_into("<i", hdr, 0, 348)
    struct.pack_into("<8h", hdr, 40, 3, 100000 % 32768, 100000 % 32768, 100000 % 32768, 1, 1, 1, 1)
    struct.pack_into("<h", hdr, 70, 16)  # float32
    struct.pack_into("<h", hdr, 72, 32)
    struct.pack_into("<8f", hdr, 76, 1, 1, 1, 1, 1, 1, 1, 1)
    struct.pack_into("<f", hdr, 108, 352.0)
    hdr[344:348] = b"n+1\x00"
    with open(path, "wb") as f:
        f.write(bytes(hdr) + b"\x00" * 4)


def _huge_nrrd(path):
    with open(path, "wb") as f:
        f.write(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 100000 100000 100000\nencoding: raw\n\n" + b"\x00" * 64)


def _truncated_gzip(path):
    buf = io.BytesIO()
    import SimpleITK as sitk

    tmp = path + ".full.nii"
    sitk.WriteImage(sitk.GetImageFromArray(_ct()), tmp)
    raw = open(tmp, "rb").read()
    os.unlink(tmp)
    with gzip.GzipFile(fileobj=buf, mode="wb") as g:
        g.write(raw)
    with open(path, "wb") as f:
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])


def _no_pixels(path):
    import pydicom

    ds = pydicom.dcmread(shared("ct", "dicom_slices", "CT_small.dcm"))
    del ds.PixelData
    ds.save_as(path)


def _mr(path):
    import pydicom

    ds = pydicom.dcmread(shared("ct", "dicom_slices", "CT_small.dcm"))
    ds.Modality = "MR"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.save_as(path)


def _colour_photo(path):
    from PIL import Image

    y, x = np.mgrid[:256, :256]
    rgb = np.stack([x, y, 255 - x], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(path)


def _tiny_png(path):
    from PIL import Image

    Image.fromarray(np.full((4, 4), 128, np.uint8)).save(path)


def _zip_of(members: dict):
    def make(path):
        with zipfile.ZipFile(path, "w") as z:
            for name, data in members.items():
                z.writestr(name, data(name) if callable(data) else data)
    return make


def _two_series_zip(path):
    import pydicom

    with zipfile.ZipFile(path, "w") as z:
        for i in range(2):
            ds = pydicom.dcmread(shared("ct", "dicom_slices", "CT_small.dcm"))
            ds.SeriesInstanceUID = pydicom.uid.generate_uid()
            ds.SOPInstanceUID = pydicom.uid.generate_uid()
            buf = io.BytesIO()
            ds.save_as(buf)
            z.writestr(f"slice{i}.dcm", buf.getvalue())


BAD_FILES = {
    "empty.png": (_write(b""), 422, "empty"),
    "noise.dcm": (_write(NOISE), 422, "DICOM"),
    "noise.png": (_write(NOISE), 422, "not a readable image"),
    "noise.nii.gz": (_write(NOISE), 422, "gzip"),
    "noise.nrrd": (_write(NOISE), 422, "not a readable image"),
    "pdf_named.png": (_write(b"%PDF-1.4\n" + NOISE), 422, "not a readable image"),
    "text_named.nii": (_write(b"hello, this is not a volume\n" * 20), 422, "not a readable image"),
    "truncated.dcm": (_truncated("cxr", "dicom", "RG1_UNCR.dcm"), 422, "pixel data"),
    "truncated_gzip.nii.gz": (_truncated_gzip, 422, "truncated or corrupt"),
    "no_pixels.dcm": (_no_pixels, 422, "pixel data"),
    "bad_sequence.dcm": (_copy("ct", "dicom_slices", "bad_sequence.dcm"), 422, "malformed"),
    "sr_as_image.dcm": (_copy("dicom_objects", "sr_document.dcm"), 422, "structured report"),
    "seg_as_image.dcm": (_copy("dicom_objects", "seg_image_ct_binary_single_frame.dcm"), 422, "segmentation"),
    "four_d.nii.gz": (_nifti(np.zeros((16, 16, 3, 2), np.float32)), 422, "4-D"),
    "one_voxel.nii.gz": (_volume(np.zeros((1, 1, 1), np.float32)), 422, "too small"),
    "huge_header.nii": (_huge_nifti_header, 422, "voxels"),
    "huge_header.nrrd": (_huge_nrrd, 422, "100000 x 100000 x 100000 voxels"),
    "nan_voxels.nii.gz": (_nifti(_ct(np.nan).transpose(2, 1, 0)), 422, "NaN"),
    "inf_voxels.nii.gz": (_nifti(_ct(np.inf).transpose(2, 1, 0)), 422, "infinite"),
    "nan_voxels.nrrd": (_volume(_ct(np.nan)), 422, "NaN"),
    "colour_photo.png": (_colour_photo, 422, "colour"),
    "tiny.png": (_tiny_png, 422, "too small"),
    "noise.zip": (_write(NOISE), 422, "zip"),
    "zip_without_dicom.zip": (_zip_of({"readme.txt": b"no images here"}), 422, "no DICOM"),
    "two_series.zip": (_two_series_zip, 422, "2 DICOM series"),
}
# files that are fine as such but wrong for the request's params: name -> (maker, params, status, words)
BAD_FOR_PARAMS = {
    "mr_as_ct.dcm": (_mr, {"modality": "ct"}, 422, "not a CT image"),
}
