"""Maps built with torch on the model's device, against the plain per-plane construction, and the same
reading on the CPU and on a GPU (where there is one: the lent H200 runs this file too)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monailabel_app.ct import model_slices
from monailabel_app.ct_phantoms import make_ct_phantom, phantom_volume
from monailabel_app.grounding import ct_maps, maps
from monailabel_app.phantoms import make_phantom
from monailabel_app.xray import Geometry, Radiograph, pad_to_square

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# documented tolerance of a device's heatmap against the plain construction: float rounding of two linear steps
HEAT_TOLERANCE = 1e-5  # of the heatmap's maximum


def _film(side: int) -> np.ndarray:
    """A phantom film at ``side`` pixels (the lent GPU has no copy of the shared data)."""
    from PIL import Image

    return np.asarray(Image.fromarray(make_phantom(23).image).resize((side, side), Image.BILINEAR), np.float32)


def _reference_volume(grids, ms, depth):
    """The construction before the device maps: every model slice upsampled, then full planes blended linearly
    in z between the two nearest sampled slices (the nearest one outside the sampled range)."""
    order = np.argsort(ms.indices)
    zs, planes = np.asarray(ms.indices, float)[order], np.stack([maps.grid_to_pixels(g, ms.pad) for g in grids])[order]
    pos = np.interp(np.arange(depth, dtype=float), zs, np.arange(len(zs), dtype=float))
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, len(zs) - 1)
    w = (pos - lo).astype(np.float32)[:, None, None]
    return planes[lo] * (1 - w) + planes[hi] * w


@pytest.mark.parametrize("device", DEVICES)
def test_volume_heatmap_on_the_device_equals_the_plane_by_plane_construction(device):
    ph = make_ct_phantom(3)
    vol = phantom_volume(ph)
    ms = model_slices(vol, 20)  # fewer model slices than display slices: z is interpolated
    grids = np.random.default_rng(0).random((len(ms.indices), 16, 16)).astype(np.float32)
    got = ct_maps.volume_heatmap(grids, ms, vol.shape[0], device)
    assert got.device.type == device and got.dtype == torch.float32 and tuple(got.shape) == vol.shape
    ref = _reference_volume(grids, ms, vol.shape[0])
    assert np.abs(got.cpu().numpy() - ref).max() <= HEAT_TOLERANCE * ref.max()


@pytest.mark.parametrize("device", DEVICES)
def test_gates_on_the_device_keep_the_body_and_the_named_side(device):
    body = np.zeros((3, 8, 10), bool)
    body[:, 1:7, 2:10] = True  # off-centre: the midline at x = 5.5
    heat = torch.ones(3, 8, 10, device=device)
    cols = ct_maps.side_columns(body, "right")
    m = ct_maps.gated(heat, torch.as_tensor(body, device=device), torch.as_tensor(cols, device=device)).cpu().numpy()
    assert (m == (body & cols[None, None, :])).all()
    assert (ct_maps.gated(heat, torch.as_tensor(body, device=device), None).cpu().numpy() == body).all()
    on_cpu = ct_maps.gated(np.ones((3, 8, 10), np.float32), body, cols)  # the CPU's numpy path, the same rule
    assert on_cpu.dtype == np.float32 and (on_cpu == m).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("side", ["right", "left", ""])
def test_a_gated_map_made_on_its_gates_box_equals_the_whole_volumes(device, side):
    """The reader gates each finding's heatmap on its gate's box only (the allowed voxels' box narrowed to the
    side's columns) and copies that box off the device: the same float32 array as gating the whole volume, and
    zero outside the box; a side with no allowed voxel gives no box and an all-zero map."""
    rng = np.random.default_rng(5)
    allowed = np.zeros((6, 20, 24), bool)
    allowed[1:5, 3:17, 2:21] = rng.random((4, 14, 19)) > 0.3  # lungs-like: holes inside, off-centre
    body = np.zeros_like(allowed)
    body[:, 2:18, 1:22] = True
    heat = rng.random(allowed.shape).astype(np.float32)
    cols = ct_maps.side_columns(body, side) if side else None
    whole = ct_maps.gated(heat, allowed, cols)
    box = ct_maps.gate_box(maps_box(allowed), cols)
    on = (lambda a: torch.as_tensor(a, device=device)) if device != "cpu" else (lambda a: a)
    got = ct_maps.gated_map(on(heat), on(allowed), None if cols is None else on(cols), box)
    assert got.dtype == np.float32 and np.array_equal(got, whole)
    outside = np.ones(allowed.shape, bool)
    outside[box] = False
    assert not got[outside].any() and whole[box].any()
    if side:  # the box keeps to the side's columns
        assert cols[box[2]].all()
    assert ct_maps.gate_box(None, cols) is None
    assert not ct_maps.gated_map(on(heat), on(allowed), None, None).any()
    assert ct_maps.gate_box(maps_box(allowed), np.zeros(24, bool)) is None


def test_zeros_outside_a_box_leave_the_box_alone():
    """gated_map's output comes uninitialised (each voxel written once): every voxel outside its box must be
    zeroed, whatever memory it got, and none inside (the caller writes those)."""
    out = np.full((5, 7, 9), np.nan, np.float32)
    box = (slice(1, 4), slice(2, 5), slice(3, 8))
    ct_maps._zero_outside(out, box)
    inside = np.zeros(out.shape, bool)
    inside[box] = True
    assert np.isnan(out[inside]).all() and (out[~inside] == 0).all()


def maps_box(mask):
    from monailabel_app.grounding.extent import bounding_box

    return bounding_box(mask)


@pytest.mark.parametrize("device", DEVICES)
def test_radiograph_grids_upsample_in_one_batch(device):
    image = make_phantom(11).image
    _, pad = pad_to_square(image)
    grids = np.random.default_rng(1).random((3, 16, 16)).astype(np.float32)
    got = maps.grids_to_pixels(torch.as_tensor(grids, device=device), pad).cpu().numpy()
    for g, h in zip(grids, got):
        assert h.shape == image.shape
        assert np.abs(h - maps.grid_to_pixels(g, pad)).max() <= HEAT_TOLERANCE * h.max()


def test_findings_run_side_by_side_and_keep_their_order():
    order = maps.each(lambda a, b: (a, b, __import__("threading").current_thread().name), range(6), "abcdef")
    assert [(a, b) for a, b, _ in order] == list(zip(range(6), "abcdef"))
    if maps.MAP_THREADS > 1:
        assert any(name.startswith("maps") for *_, name in order)
    # a call from inside the pool runs where it is (it would otherwise wait on itself)
    nested = maps.each(lambda k: maps.each(lambda j: j * k, range(3)), range(4))
    assert nested == [[0, k, 2 * k] for k in range(4)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the lent H200)")
def test_a_reading_on_the_gpu_equals_the_cpu_reading():
    """The phantom model in fp32 on both: the same report, masks that agree: per finding at most 1 % of the
    two masks' union differs, or one voxel (a region cut from attention at half its peak: the two devices'
    float rounding may put a voxel at that level on either side; a Dice of 0.99 cannot hold for the 14-voxel
    region of phantom CT 4's nodule, 14 against 15 voxels on the H200)."""
    from monailabel_app.reader import Reader

    cpu, gpu = Reader(device="cpu", precision="fp32"), Reader(device="cuda", precision="fp32")
    film = make_phantom(23)
    studies = [Radiograph(film.image, Geometry.plain(*film.image.shape)), phantom_volume(make_ct_phantom(4))]
    for study in studies:
        a, b = cpu.read(study), gpu.read(study)
        assert a.report == b.report and a.findings
        for k in range(1, len(a.findings) + 1):
            x, y = a.labels == k, b.labels == k
            assert (x ^ y).sum() <= max(1, 0.01 * (x | y).sum()), (study.source, k, x.sum(), y.sum())
            h, g = a.heatmaps[k - 1], b.heatmaps[k - 1]  # the GPU's copied back beside its search
            assert h.shape == g.shape and np.abs(h - g).max() <= 10 * HEAT_TOLERANCE * h.max(), (study.source, k)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the lent H200)")
def test_a_tensor_copied_to_the_host_later_has_the_values_its_stream_was_making():
    """maps.to_host_later from a pool thread's own stream while that stream is still busy: the copy waits for
    the values made on that stream (not for the default stream's work, nor for nothing)."""
    from concurrent.futures import ThreadPoolExecutor

    def made_on_a_side_stream():
        with maps.side_stream():
            torch.cuda._sleep(200_000_000)  # the stream busy for a while (about 0.1 s)
            t = torch.arange(1 << 20, device="cuda", dtype=torch.float32) * 3
            return maps.to_host_later(t)

    with ThreadPoolExecutor(1, thread_name_prefix="maps") as pool:
        later = pool.submit(made_on_a_side_stream).result()
    got = later.result()
    assert np.array_equal(got, np.arange(1 << 20, dtype=np.float32) * 3)
