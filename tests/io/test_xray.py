import glob
import gzip
import os

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from PIL import Image

from conftest import CXR, shared
from monailabel_app.errors import InputError
from monailabel_app.io.xray import load_radiograph, pad_to_square


def test_png_8_and_16_bit(tmp_path):
    a = (np.arange(64 * 80).reshape(64, 80) % 251).astype(np.uint8)
    Image.fromarray(a).save(tmp_path / "a.png")
    r = load_radiograph(str(tmp_path / "a.png"))
    assert np.array_equal(r.pixels, a) and r.geometry.shape == (64, 80)
    b = (np.arange(64 * 80).reshape(64, 80) * 10).astype(np.uint16)
    Image.fromarray(b).save(tmp_path / "b.png")
    r16 = load_radiograph(str(tmp_path / "b.png"))
    assert r16.pixels.dtype == np.uint8 and r16.pixels.shape == (64, 80)
    assert r16.pixels[0, 0] == 0 and r16.pixels[-1, -1] == 255  # windowed, not saturated


def test_cr_jpeg2000_equals_uncompressed_and_monochrome1_is_inverted():
    unc = load_radiograph(shared("cxr", "dicom", "RG1_UNCR.dcm"))
    j2k = load_radiograph(shared("cxr", "dicom", "RG1_J2KR.dcm"))
    assert j2k.source["transfer_syntax"] == "1.2.840.10008.1.2.4.90"  # JPEG 2000 lossless
    assert np.array_equal(unc.pixels, j2k.pixels)
    assert unc.source["photometric"] == "MONOCHROME1" and unc.source["windowing"].startswith("window")
    # displayed as a radiologist sees a PA chest: spine/mediastinum (central band) brighter than the
    # lungs on either side at mid height; a missed MONOCHROME1 inversion would make it darker
    p = unc.pixels.astype(float)
    rows, cols = p.shape
    mid = p[int(rows * 0.35) : int(rows * 0.6)]
    centre = mid[:, int(cols * 0.45) : int(cols * 0.55)].mean()
    lungs = np.r_[mid[:, int(cols * 0.2) : int(cols * 0.3)].ravel(), mid[:, int(cols * 0.7) : int(cols * 0.8)].ravel()].mean()
    assert centre > lungs + 20


@pytest.mark.parametrize("name", ["dicom/RG1_UNCR.dcm", "dicom/dx_image.dcm", "siim/*.dcm", "nih/00000001_000.png", "lungseg2d/1.jpg"])
def test_real_xrays_keep_orientation_and_geometry_of_a_standard_reader(name):
    path = sorted(glob.glob(os.path.join(CXR, name)))[0]
    r = load_radiograph(path)
    ref = sitk.ReadImage(path)
    ref_arr = np.squeeze(sitk.GetArrayFromImage(ref)).astype(float)
    assert r.pixels.shape == ref_arr.shape[-2:] if ref_arr.ndim == 2 else r.pixels.shape == ref_arr.shape[:2]
    if ref_arr.ndim == 3:  # RGB JPEG
        ref_arr = ref_arr.mean(axis=-1)
    # same orientation as ITK/GDCM reads it (no transpose or flip): strong correlation, either sign
    # (our pixels are displayed bright = dense; MONOCHROME1 files are inverted relative to ITK)
    corr = np.corrcoef(r.pixels.astype(float).ravel(), ref_arr.ravel())[0, 1]
    assert abs(corr) > 0.9, corr
    assert np.allclose(np.array(r.geometry.spacing) > 0, True)
    if path.endswith(".dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        sp = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
        if sp and float(sp[0]) > 0:
            assert r.geometry.spacing == (float(sp[1]), float(sp[0]))


def _bad(tmp_path, name, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def test_bad_inputs_say_what_is_wrong(tmp_path):
    rng = np.random.default_rng(0)
    cases = {
        _bad(tmp_path, "empty.png", b""): "empty",
        _bad(tmp_path, "noise.png", rng.bytes(4000)): "not a readable image",
        _bad(tmp_path, "noise.dcm", rng.bytes(4000)): "DICOM",
        _bad(tmp_path, "noise.nii.gz", rng.bytes(4000)): "truncated or corrupt",
        str(tmp_path / "missing.png"): "not found",
    }
    good = open(shared("cxr", "dicom", "RG1_UNCR.dcm"), "rb").read()
    cases[_bad(tmp_path, "truncated.dcm", good[: len(good) // 3])] = "pixel data"
    cases[shared("dicom_objects", "sr_document.dcm")] = "structured report"
    cases[shared("dicom_objects", "seg_image_ct_binary_single_frame.dcm")] = "segmentation"
    cases[shared("ct", "totalsegmentator", "example_ct_sm.nii.gz")] = "3-D volume"
    colour = np.zeros((64, 64, 3), np.uint8)
    colour[..., 0] = 200
    Image.fromarray(colour).save(tmp_path / "photo.png")
    cases[str(tmp_path / "photo.png")] = "colour"
    nii = gzip.compress(open(shared("ct", "totalsegmentator", "example_ct_sm.nii.gz"), "rb").read()[:5000])
    cases[_bad(tmp_path, "cut.nii.gz", gzip.decompress(nii)[:3000])] = "corrupt"
    for path, words in cases.items():
        with pytest.raises(InputError) as e:
            load_radiograph(path)
        assert words.lower() in str(e.value).lower(), (path, str(e.value))
        assert 400 <= e.value.status < 500


def test_one_slice_volume_is_a_radiograph(tmp_path):
    a = (np.arange(40 * 50).reshape(1, 40, 50) % 200).astype(np.int16)
    img = sitk.GetImageFromArray(a)
    img.SetSpacing((0.5, 0.7, 2.0))
    img.SetOrigin((10.0, -5.0, 3.0))
    sitk.WriteImage(img, str(tmp_path / "plane.nrrd"))
    r = load_radiograph(str(tmp_path / "plane.nrrd"))
    assert r.pixels.shape == (40, 50) and r.geometry.shape == (1, 40, 50)
    assert r.geometry.spacing == (0.5, 0.7, 2.0) and r.geometry.origin == (10.0, -5.0, 3.0)


@pytest.mark.parametrize("shape", [(30, 50), (50, 30), (40, 40)])
def test_pad_to_square_centres_the_image(shape):
    a = np.full(shape, 7, np.uint8)
    sq, pad = pad_to_square(a)
    assert sq.shape == (max(shape), max(shape)) and sq.dtype == np.uint8  # grey: shown as RGB by the processor
    assert np.array_equal(sq[pad.top : pad.top + shape[0], pad.left : pad.left + shape[1]], a)
    assert sq.sum() == a.sum()
    assert abs(pad.top - (pad.side - pad.rows - pad.top)) <= 1 and abs(pad.left - (pad.side - pad.cols - pad.left)) <= 1


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_real_pa_radiograph_is_not_mirrored(n):
    """Real PA chest X-rays with reference lung masks: lungs are dark in our pixels, and the heart
    narrows the patient's LEFT lung, which must be on the image's right."""
    r = load_radiograph(shared("cxr", "lungseg2d", f"{n}.jpg"))
    mask = np.array(Image.open(shared("cxr", "lungseg2d", f"{n}-mask.png")).convert("L")) > 127
    assert mask.shape == r.pixels.shape
    assert r.pixels[mask].mean() < r.pixels[~mask].mean()
    half = mask.shape[1] // 2
    assert mask[:, :half].sum() > mask[:, half:].sum()


def test_voi_lut_sequence_is_applied(tmp_path):
    """A DICOM VOI LUT (here a threshold at 128) decides the displayed values, not a percentile window."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = pydicom.dcmread(shared("cxr", "dicom", "dx_image.dcm"))
    raw = ds.pixel_array.copy()
    for tag in ("WindowCenter", "WindowWidth"):
        if tag in ds:
            delattr(ds, tag)
    lut = Dataset()
    lut.LUTDescriptor = [256, 0, 8]
    lut.add_new(0x00283006, "US", [0] * 128 + [255] * 128)  # LUTData
    ds.VOILUTSequence = Sequence([lut])
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.save_as(tmp_path / "voi.dcm")
    r = load_radiograph(str(tmp_path / "voi.dcm"))
    assert r.source["windowing"] == "VOI LUT"
    assert set(np.unique(r.pixels)) <= {0, 255}
    assert np.array_equal(r.pixels == 255, raw >= 128)
