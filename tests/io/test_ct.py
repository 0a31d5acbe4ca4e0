"""CT loading, the display convention and the MedGemma 1.5 slice recipe, on phantoms and real scans."""

from __future__ import annotations

import glob
import json
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import shared
from monailabel_app.errors import InputError
from monailabel_app.grounding.ct_maps import side_gate, slice_info, volume_heatmap
from monailabel_app.io.ct import Limits, load_ct, model_slices, ModelSlices, sample_slices, window_rgb
from monailabel_app.io.study import detect
from monailabel_app.io.xray import SquarePad
from monailabel_app.phantoms import ct as ct_phantoms

SEED = 4  # three lesions, two on the patient's right
STORED = {  # name -> (file suffix, stored orientation)
    "nifti_lps": (".nii.gz", "LPS"),
    "nifti_ras": (".nii.gz", "RAS"),
    "nrrd_ail": (".nrrd", "AIL"),  # axes permuted too: i anterior, j inferior, k left
    "dicom_series": ("", "LPS"),
    "dicom_series_ras": ("", "RAS"),
}


@pytest.fixture(scope="module")
def phantom():
    return ct_phantoms.make_ct_phantom(SEED)


@pytest.fixture(scope="module")
def stored(phantom, tmp_path_factory):
    d = tmp_path_factory.mktemp("ct_stored")
    return {name: ct_phantoms.save(phantom, str(d / (name + suffix)), code) for name, (suffix, code) in STORED.items()}


@pytest.mark.parametrize("name", sorted(STORED))
def test_every_format_and_stored_orientation_loads_to_the_same_display_array(phantom, stored, name):
    vol = load_ct(stored[name])
    assert vol.shape == phantom.hu.shape
    assert np.abs(vol.hu - phantom.hu).max() <= 1.0  # DICOM stores HU + 1024 as uint16: exact after rescale
    assert np.allclose(vol.spacing, phantom.spacing[::-1], atol=1e-4)
    # the input geometry is the file's own, and display slice z maps back to the right patient z
    img = sitk.ReadImage(stored[name]) if not os.path.isdir(stored[name]) else None
    if img is not None:
        assert vol.geometry.shape == sitk.GetArrayFromImage(img).shape
    for z in (0, vol.shape[0] - 1):
        assert vol.world_z(z) == pytest.approx(phantom.origin[2] + z * phantom.spacing[2], abs=1e-3)


def test_saved_model_inputs_are_identical_across_formats(stored):
    reference = model_slices(load_ct(stored["nifti_lps"]), 20)
    for name in STORED:
        other = model_slices(load_ct(stored[name]), 20)
        assert other.indices == reference.indices
        diff = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(other.images, reference.images))
        assert diff <= 1, name


def test_display_convention_puts_patient_right_on_the_image_left(phantom, stored):
    """Phantom lesion on the patient's right: in the display array it is at low x, whatever the file."""
    right = [les for les in phantom.lesions if les.side == "right"]
    assert right
    for name in STORED:
        vol = load_ct(stored[name])
        mask = ct_phantoms.make_ct_phantom(SEED).lesions[0].mask  # display grid == phantom grid
        assert vol.hu[mask].mean() > -300  # the lesion is where the display array says
        for les in phantom.lesions:
            xs = np.nonzero(les.mask)[2]
            assert (xs.mean() < vol.shape[2] / 2) == (les.side == "right")


def test_real_ct_liver_on_the_patient_right_and_lungs_above_kidneys():
    """TotalSegmentator organ map (model output) of the real example CT, read through the CT loader."""
    seg = load_ct(shared("ct", "totalsegmentator", "example_seg.nii.gz")).hu
    centre = {k: np.array(np.nonzero(seg == k)).mean(axis=1) for k in (1, 2, 5, 14)}  # spleen, kidney_r, liver, lung_ll_r
    assert centre[5][2] < seg.shape[2] / 2 < centre[1][2]  # liver at low x (patient right), spleen at high x
    assert centre[14][0] > centre[2][0]  # right lower lobe superior to the right kidney: z grows toward the head
    ctv = load_ct(shared("ct", "totalsegmentator", "example_ct_sm.nii.gz"))
    assert ctv.shape == seg.shape
    assert 0 < np.median(ctv.hu[seg == 5]) < 200  # liver voxels are soft tissue in the CT too


def test_real_dicom_series_and_its_nifti_segmentation_agree_in_display_space():
    series = shared("ct", "totalsegmentator", "example_ct_dicom")
    vol = load_ct(series)
    seg = load_ct(shared("ct", "totalsegmentator", "example_seg_dicom.nii.gz")).hu
    assert vol.shape == seg.shape == (20, 512, 512)
    liver, spleen = seg == 5, seg == 1
    assert np.nonzero(liver)[2].mean() < 256 < np.nonzero(spleen)[2].mean()
    assert 20 < np.median(vol.hu[liver]) < 200 and (vol.hu[seg > 0] < -900).mean() < 0.03


def test_lidc_series_sorted_by_position_matches_its_nifti_conversion():
    folder = glob.glob(shared("ct", "lidc", "LIDC-IDRI-0001") + "/1*/1*")[0]
    vol = load_ct(folder)
    ref = load_ct(shared("ct", "lidc", "LIDC-IDRI-0001", "annotations", "ct.nii.gz"))
    assert vol.shape == ref.shape == (16, 512, 512)
    assert np.abs(vol.hu - ref.hu).max() <= 1.0
    assert vol.world_z(vol.shape[0] - 1) == pytest.approx(-95.0, abs=0.01)  # the top file is -95.000000.dcm


def test_enhanced_multiframe_and_single_slices():
    multi = load_ct(shared("ct", "dicom_slices", "eCT_Supplemental.dcm"))
    assert multi.shape[0] == 2 and multi.source["format"] == "DICOM enhanced multi-frame"
    assert multi.world_z(1) > multi.world_z(0)
    for name in ("0.dcm", "693_UNCR.dcm", "CT_small.dcm"):
        one = load_ct(shared("ct", "dicom_slices", name))
        assert one.shape[0] == 1 and -1100 < np.median(one.hu) < 1500
        assert detect(shared("ct", "dicom_slices", name)) == "ct"


def test_modality_detection():
    assert detect(shared("ct", "totalsegmentator", "example_ct.nii.gz")) == "ct"
    assert detect(shared("ct", "totalsegmentator", "example_ct_dicom")) == "ct"
    assert detect(shared("cxr", "dicom", "dx_image.dcm")) == "xray"
    assert detect(shared("cxr", "nih", "00000001_000.png")) == "xray"


def test_dicom_folder_zipped_reads_the_same(tmp_path):
    series = shared("ct", "totalsegmentator", "example_ct_dicom")
    z = shutil.make_archive(str(tmp_path / "series"), "zip", series)
    assert np.array_equal(load_ct(z).hu, load_ct(series).hu)


def test_sampling_is_uniform_head_first_and_keeps_both_ends():
    s = sample_slices(300, 85)
    assert len(s) == 85 and s[0] == 299 and s[-1] == 0 and s == sorted(s, reverse=True)
    steps = -np.diff(s)
    assert steps.max() - steps.min() <= 1
    assert sample_slices(20, 85) == list(range(19, -1, -1))
    with pytest.raises(InputError):
        sample_slices(10, 0)


def test_three_hu_windows():
    hu = np.array([[-2000.0, -1024.0, -135.0, 0.0, 40.0, 80.0, 215.0, 1024.0, 3000.0]])
    rgb = window_rgb(hu)[0].astype(int)
    assert rgb[:, 0].tolist() == [0, 0, 111, 128, 132, 137, 154, 255, 255]  # R: -1024..1024
    assert rgb[:, 1].tolist() == [0, 0, 0, 98, 128, 157, 255, 255, 255]  # G: -135..215
    assert rgb[:, 2].tolist() == [0, 0, 0, 0, 128, 255, 255, 255, 255]  # B: 0..80


def test_fill_between_sampled_slices_is_linear_and_constant_outside():
    grids = np.stack([np.full((4, 4), 1.0), np.full((4, 4), 3.0)])
    ms = ModelSlices(indices=[6, 2], images=[], pad=SquarePad(2, 2))  # given head first: slice 6 = 1.0, slice 2 = 3.0
    vol = volume_heatmap(grids, ms, 9).numpy()
    assert vol[:, 0, 0].tolist() == [3.0, 3.0, 3.0, 2.5, 2.0, 1.5, 1.0, 1.0, 1.0]


def test_side_gate_follows_the_body_midline():
    body = np.zeros((2, 4, 10), bool)
    body[:, :, 2:10] = True  # body off-centre: midline at x = 5.5
    right = side_gate(body, "right")
    assert right[0, 0].tolist() == [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]
    assert (side_gate(body, "left") + right == 1).all() and (side_gate(body, "") == 1).all()


def test_slice_info_from_the_gates_box_and_the_label_maps_planes_is_the_whole_arrays(phantom):
    """A finding's strongest slice found in its gate's box (ties: the first voxel, as argmax), its slice range
    from the planes the label map has: what the whole arrays give, also for a map whose maximum is the
    zeros outside the box."""
    volume = ct_phantoms.phantom_volume(phantom)
    rng = np.random.default_rng(5)
    shape = volume.shape
    box = (slice(3, shape[0] - 2), slice(10, 50), slice(5, 40))
    grids = rng.random((4, 8, 8)).astype(np.float32)
    for trial in range(4):
        heat = np.zeros(shape, np.float32)
        heat[box] = rng.random(tuple(b.stop - b.start for b in box)).astype(np.float32)
        if trial == 1:
            heat[5, 20, 30] = heat[9, 12, 7] = heat.max() + 1  # a tie: the first plane's
        if trial == 2:
            heat[box] -= 2.0  # all below the zeros outside: the strongest voxel is outside the box
        mask = np.zeros(shape, bool)
        mask[6 + trial : 9 + trial, 20:30, 10:20] = trial != 3  # none in the last trial
        want = slice_info(volume, grids, heat, mask)
        span = (float(min(heat[box].min(), 0)), float(max(heat[box].max(), 0)))
        got = slice_info(volume, grids, heat, mask[4:12], box, span, 4)
        assert got == want and (want["slice_range"] is None) == (trial == 3)
        assert slice_info(volume, grids, heat, mask, box) == want


def _image(arr, direction=None, spacing=(1.0, 1.0, 1.0)):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    if direction is not None:
        img.SetDirection(direction)
    return img


def test_oblique_volume_refused_unless_resampled_and_results_come_back_on_its_grid(tmp_path):
    ph = ct_phantoms.make_ct_phantom(SEED)
    img = ct_phantoms.to_image(ph.hu, ph.spacing, ph.origin)
    rot = sitk.VersorTransform((0, 0, 1), np.radians(30))  # 30 degrees about the patient's z axis
    img.SetDirection(np.array(rot.GetMatrix()).reshape(3, 3).ravel().tolist())
    path = str(tmp_path / "oblique.nii.gz")
    sitk.WriteImage(img, path)
    with pytest.raises(InputError, match="off the patient's axes"):
        load_ct(path)
    vol = load_ct(path, Limits(resample=True))
    assert vol.orientation is None and vol.source["resampled"]
    back = vol.to_input(vol.hu)
    assert back.shape == ph.hu.shape
    inner = ph.body & ~ct_phantoms.make_ct_phantom(SEED).lungs["right"]
    assert np.median(np.abs(back - ph.hu)[inner]) < 40  # linear resampling there and back


@pytest.mark.parametrize("case,words", [
    ("four_d", "4-D"),
    ("nan", "NaN"),
    ("blank", "blank"),
    ("too_small", "too small"),
    ("too_many_voxels", "over the limit"),
    ("too_few_slices", "at least 3"),
    ("bad_sequence", "malformed"),
    ("two_series", "2 DICOM series"),
    ("duplicate_slice", "duplicate"),
    ("missing_slice", "not evenly spaced"),
    ("not_ct", "not a CT image"),
])
def test_bad_volumes_are_refused_with_a_clear_message(tmp_path, case, words):
    limits = Limits(min_slices=3, max_voxels=2_000_000)
    path = str(tmp_path / f"{case}.nii.gz")
    series = shared("ct", "totalsegmentator", "example_ct_dicom")
    files = sorted(glob.glob(series + "/*"))
    if case == "four_d":
        sitk.WriteImage(sitk.JoinSeries([_image(np.zeros((4, 20, 20), np.int16))] * 3), path)
    elif case == "nan":
        a = np.zeros((4, 20, 20), np.float32)
        a[1, 2, 3] = np.nan
        path = path.replace(".nii.gz", ".nrrd")  # NIfTI writing turns NaN into 0
        sitk.WriteImage(_image(a), path)
    elif case == "blank":
        sitk.WriteImage(_image(np.full((4, 20, 20), -1000, np.int16)), path)
    elif case == "too_small":
        sitk.WriteImage(_image(np.random.default_rng(0).normal(0, 100, (4, 8, 8)).astype(np.int16)), path)
    elif case == "too_many_voxels":
        path = series  # 20 x 512 x 512 = 5.2 M voxels
    elif case == "too_few_slices":
        path = shared("ct", "dicom_slices", "eCT_Supplemental.dcm")
    elif case == "bad_sequence":
        path = shared("ct", "dicom_slices", "bad_sequence.dcm")
    elif case in ("two_series", "duplicate_slice", "missing_slice"):
        d = tmp_path / case
        d.mkdir()
        for f in files[:6]:
            shutil.copy(f, d)
        if case == "two_series":
            ct_phantoms.save(ct_phantoms.make_ct_phantom(1), str(d / "other"))
        elif case == "duplicate_slice":
            shutil.copy(files[3], d / "copy_of_3")
        else:
            os.unlink(d / os.path.basename(files[2]))
        path = str(d)
    elif case == "not_ct":
        path = str(tmp_path / "sr")
        os.mkdir(path)
        shutil.copy(shared("dicom_objects", "sr_document.dcm"), path)
    with pytest.raises(InputError) as e:
        load_ct(path, limits)
    assert words.lower() in str(e.value).lower(), str(e.value)


def test_cli_writes_ct_phantom_series(tmp_path):
    from monailabel_app.cli import main

    assert main(["phantom", "--ct", "--seed", "3", "--out", str(tmp_path), "--format", "dicom", "--orientation", "RAS"]) == 0
    meta = json.load(open(tmp_path / "ct_phantom_000003.json"))
    assert meta["report"] == ct_phantoms.make_ct_phantom(3).report
    vol = load_ct(str(tmp_path / "ct_phantom_000003"))
    mask = load_ct(str(tmp_path / "ct_phantom_000003_mask.nii.gz")).hu
    for k, les in enumerate(ct_phantoms.make_ct_phantom(3).lesions, start=1):
        assert np.array_equal(mask == k, les.mask)
    assert vol.shape == mask.shape


def test_planes_without_page_locked_memory_go_up_from_pageable_memory(caplog, monkeypatch):
    """upload_planes where no page-locked buffer can be had (this CPU-only machine: pinning needs a CUDA driver):
    the planes asked for, in their order, and one warning (not tried again); on a GPU machine the same planes
    through the buffer."""
    import torch

    from monailabel_app.io import ct

    monkeypatch.setattr(ct, "_NO_PAGE_LOCKED", set())
    hu = np.random.default_rng(3).normal(-400, 600, (6, 5, 4)).astype(np.float32)
    with caplog.at_level("WARNING"):
        got = ct.upload_planes(hu, [4, 1, 2], "cpu")
        again = ct.upload_planes(hu, [0, 5], "cpu")
    assert np.array_equal(got.numpy(), hu[[4, 1, 2]]) and np.array_equal(again.numpy(), hu[[0, 5]])
    assert caplog.text.count("pageable memory") == (0 if torch.cuda.is_available() else 1), caplog.text
