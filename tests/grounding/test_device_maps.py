"""Maps built with torch on the model's device, against the plain per-plane construction, and the same
reading on the CPU and on a GPU (where there is one: the lent H200 runs this file too)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monailabel_app.grounding import ct_maps, maps
from monailabel_app.io.ct import model_slices, window_rgb, windowed
from monailabel_app.io.xray import Geometry, Radiograph, pad_to_square
from monailabel_app.phantoms.ct import make_ct_phantom, phantom_volume
from monailabel_app.phantoms.films import make_phantom

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


@pytest.mark.parametrize("device", DEVICES + ["cpu-tensors"])
@pytest.mark.parametrize("side", ["right", "left", ""])
def test_a_gated_map_made_on_its_gates_box_equals_the_whole_volumes(device, side, monkeypatch):
    """The reader gates each finding's heatmap on its gate's box only (the allowed voxels' box narrowed to the
    side's columns) and copies that box off the device: the same float32 array as gating the whole volume, and
    zero outside the box; a side with no allowed voxel gives no box and an all-zero map. Its range and peak,
    read as it is made (numpy a slab of planes at a time: slabs of one plane and of several; torch by the
    device), are support_range's and argmax's, also with ties for the maximum and a map that is all zero."""
    rng = np.random.default_rng(5)
    allowed = np.zeros((6, 20, 24), bool)
    allowed[1:5, 3:17, 2:21] = rng.random((4, 14, 19)) > 0.3  # lungs-like: holes inside, off-centre
    body = np.zeros_like(allowed)
    body[:, 2:18, 1:22] = True
    on = (lambda a: torch.as_tensor(a, device=device.split("-")[0])) if device != "cpu" else (lambda a: a)
    from monailabel_app.grounding import blocks

    for trial, slab in enumerate((blocks.SLAB_BYTES, 1, 2 * 14 * 19 * 4, 1, 1)):
        monkeypatch.setattr(blocks, "SLAB_BYTES", slab)
        heat = rng.random(allowed.shape).astype(np.float32)
        if trial == 3:  # ties for the maximum on two planes, the later one first in its own plane
            heat[allowed] = np.minimum(heat[allowed], 0.5)
            heat[3, 4, 3] = heat[2, 15, 19] = 2.0
            allowed[3, 4, 3] = allowed[2, 15, 19] = True
        if trial == 4:
            heat[:] = 0
        cols = ct_maps.side_columns(body, side) if side else None
        whole = ct_maps.gated(heat, allowed, cols)
        box = ct_maps.gate_box(maps_box(allowed), cols)
        made = ct_maps.gated_map(on(heat), on(allowed), None if cols is None else on(cols), box)
        got = made.map
        assert got.dtype == np.float32 and np.array_equal(got, whole)
        outside = np.ones(allowed.shape, bool)
        outside[box] = False
        assert not got[outside].any() and (whole[box].any() or trial == 4)
        assert made.span == maps.support_range(whole, box) == (float(whole.min()), float(whole.max()))
        want = np.unravel_index(int(np.argmax(whole)), whole.shape) if whole.max() > 0 else None
        assert made.peak == want, (trial, slab)
        if side:  # the box keeps to the side's columns
            assert cols[box[2]].all()
    assert ct_maps.gate_box(None, cols) is None
    empty = ct_maps.gated_map(on(heat), on(allowed), None, None)
    assert not empty.map.any() and empty.span == (0.0, 0.0) and empty.peak is None
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
            # the GPU's heatmap, copied back beside its search: the CPU's within the two devices' attention
            # (fp32 on each; 0.35 % of the film's maximum on the H200)
            h, g = a.heatmaps[k - 1], b.heatmaps[k - 1]
            assert h.shape == g.shape and np.abs(h - g).max() <= 0.02 * h.max(), (study.source, k)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the lent H200)")
def test_a_gpu_readers_ct_gates_are_made_beside_the_model(monkeypatch, caplog):
    """On a GPU a CT reading starts its gates as its anatomy is found (CTMaps.shared_ahead), beside the model; they
    are made once, by it or by a first finding that came sooner. test_a_reading_on_the_gpu_equals_the_cpu_reading
    checks the masks."""
    from monailabel_app.grounding.study_maps import CTMaps
    from monailabel_app.reader import MAPS_WHILE_DECODING_ENV, Reader

    monkeypatch.delenv(MAPS_WHILE_DECODING_ENV, raising=False)
    made, started, profile, ahead = [], [], ct_maps.column_profile, CTMaps.shared_ahead
    monkeypatch.setattr(ct_maps, "column_profile", lambda body: made.append(1) or profile(body))
    monkeypatch.setattr(CTMaps, "shared_ahead", lambda self, settings: started.append(ahead(self, settings)))
    reading = Reader(device="cuda", precision="fp32").read(phantom_volume(make_ct_phantom(4)))
    assert reading.findings and len(started) == 1 and started[0].result() is None and len(made) == 1
    assert "made beside the model, failed" not in caplog.text  # (shared_ahead logs its failure, never raises)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the lent H200)")
def test_a_threads_side_stream_on_the_gpu_is_its_own_at_the_priority_asked_for(monkeypatch):
    """maps.side_stream: one stream per thread and SIDE_PRIORITY, not the default stream, at that priority."""
    from concurrent.futures import ThreadPoolExecutor

    torch.cuda.init()

    def stream_here():
        with maps.side_stream():
            first = torch.cuda.current_stream()
        with maps.side_stream():
            assert torch.cuda.current_stream() == first
        return first

    with ThreadPoolExecutor(1) as pool:
        plain = pool.submit(stream_here).result()
        monkeypatch.setattr(maps, "SIDE_PRIORITY", -1)
        urgent = pool.submit(stream_here).result()
    assert plain != torch.cuda.default_stream() and plain.priority == 0
    assert urgent != plain and urgent.priority == -1
    assert stream_here() not in (plain, urgent)  # this thread's own


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


@pytest.mark.parametrize("device", DEVICES)
def test_the_films_laplacian_of_gaussian_in_torch_equals_scipys(device):
    """The blob filter the GPU runs (scipy's kernels and border, float64, FFT) against scipy itself, on a
    phantom film and at a radius whose kernel is wider than the film (the border reflected twice)."""
    from scipy import ndimage

    from monailabel_app.grounding import filters

    film = _film(128)
    for sigma in ((1.5, 1.5), (3.0, 4.5), (40.0, 40.0)):
        ref = ndimage.gaussian_laplace(film, sigma)
        got = filters.gaussian_laplace(torch.as_tensor(film, dtype=torch.float64, device=device), sigma).cpu().numpy()
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), sigma


def test_kernels_sharing_one_fft_of_the_lines_give_each_ones_own_correlation():
    """The blob filter's two terms start from one FFT of the reflected lines: bit for bit what each kernel
    gives alone; kernels of different lengths (different borders) cannot share it."""
    from monailabel_app.grounding import filters

    t = torch.as_tensor(_film(96), dtype=torch.float64)
    kernels = [filters.gaussian_kernel(7.0, order)[::-1].copy() for order in (2, 0)]
    for axis in (0, 1):
        shared = filters.correlate1d_each(t, kernels, axis)
        assert all(torch.equal(s, filters.correlate1d(t, k, axis)) for s, k in zip(shared, kernels))
    with pytest.raises(ValueError, match="one length"):
        filters.correlate1d_each(t, [kernels[0], filters.gaussian_kernel(3.0, 0)], 0)


def test_fft_lengths_are_the_smallest_made_of_2_3_and_5():
    from monailabel_app.grounding.filters import fft_length

    def smooth(m):
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        return m == 1

    got = [fft_length(n) for n in range(1, 3001)]
    want = [next(m for m in range(n, 2 * n + 1) if smooth(m)) for n in range(1, 3001)]
    assert got == want and fft_length(1819) == 1875


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the lent H200)")
def test_blobs_on_the_gpu_equal_the_cpus():
    from monailabel_app.grounding.film_extent import blobs

    film = _film(1024)
    s_cpu, r_cpu, _ = blobs(film, (0.4, 0.4), "opacity")
    s_gpu, r_gpu, _ = blobs(film, (0.4, 0.4), "opacity", "cuda")
    assert np.abs(s_gpu - s_cpu).max() <= 1e-4 * np.abs(s_cpu).max()
    assert (r_gpu == r_cpu).mean() > 0.999


@pytest.mark.parametrize("device", DEVICES)
def test_the_films_smoothing_in_torch_equals_scipys(device):
    from scipy import ndimage

    from monailabel_app.grounding import filters

    film = np.random.default_rng(2).random((60, 45)).astype(np.float32) * 4000
    got = filters.gaussian_filter(torch.as_tensor(film, dtype=torch.float64, device=device), 1.0).cpu().numpy()
    assert np.abs(got - ndimage.gaussian_filter(film, 1.0)).max() <= 1e-3  # grey levels up to 4000


@pytest.mark.parametrize("device", DEVICES)
def test_a_batchs_blob_responses_made_at_once_equal_each_films_own(device):
    """read_many on a GPU filters a batch's films for blobs at once (film_extent.film_blob_responses): per film the
    radii and responses its own blobs() makes on that device; films of two shapes and spacings in one call,
    in groups. On the CPU the long kernels (FFT either way) agree bit for bit, scipy's short ones to float
    rounding; the working copy is block_mean's, bit for bit."""
    from PIL import Image

    from monailabel_app import map_processes
    from monailabel_app.grounding import film_extent, filters
    from monailabel_app.grounding.blocks import block_mean

    image = Image.fromarray(make_phantom(11).image)
    big = [np.asarray(image.resize((1300, 1100), Image.BILINEAR)), np.asarray(image.resize((1300, 1100)).rotate(3))]
    small = np.asarray(image.resize((300, 400), Image.BILINEAR))
    films, spacings = [big[0], small, big[1], big[0]], [(0.3, 0.3), (0.5, 0.6), (0.3, 0.3), (0.3, 0.3)]
    host = map_processes.shared_empty if device == "cpu" else torch.empty
    got = film_extent.film_blob_responses(films, spacings, device, host=host, group=2)
    for film, spacing, made in zip(films, spacings, got):
        step = film_extent.film_step(film.shape)
        assert step == (2 if film is not small else 1)
        work = block_mean(film, step) if step > 1 else film.astype(np.float32)
        assert np.array_equal(film_extent._work_on(film, step, device).cpu().numpy(), work)
        own: dict = {}
        work_spacing = film_extent._work_spacing(spacing, step)
        film_extent._blobs(work, work_spacing, "opacity", None if device == "cpu" else device, own)
        assert made.radii == tuple(own) and len(made.radii) == 6 and made.stack.device.type == "cpu"
        assert made.stack.is_shared() == (host is map_processes.shared_empty)
        for r, response in made.as_dict().items():
            taps = int(filters.TRUNCATE * max(r / 1.4 / s for s in work_spacing) + 0.5)
            if device == "cpu" and taps >= film_extent.FFT_FROM_TAPS:
                assert np.array_equal(response, own[r]), r
            else:
                assert np.abs(response - own[r]).max() <= 1e-6 * np.abs(own[r]).max(), r
    floats = np.random.default_rng(3).random((31, 40)).astype(np.float32)  # other values: block_mean's own
    assert np.array_equal(film_extent._work_on(floats, 3, device).cpu().numpy(), block_mean(floats, 3))


@pytest.mark.parametrize("device", DEVICES)
def test_the_cts_smoothing_in_torch_equals_scipys_bit_for_bit(device):
    """The CT search's smoothing (short kernels) summed as scipy's C code sums a symmetric kernel, in float64,
    each axis stored in float32: scipy's array exactly, on random HU and on a phantom CT at a thin-section
    grid's sigmas (z left out), an isotropic one and a kernel of three taps; and smoothed_hu on the device."""
    from scipy import ndimage

    from monailabel_app.grounding import ct_extent, filters

    rng = np.random.default_rng(7)
    noise = rng.normal(-500, 400, (9, 37, 41)).astype(np.float32)
    phantom = phantom_volume(make_ct_phantom(3)).hu[:20].astype(np.float32)
    for a in (noise, phantom):
        for sigmas in ((0.0, 0.6, 0.497), (0.6, 0.6, 0.6), (0.2, 1.3, 0.7)):
            got = filters.gaussian_filter_direct(torch.as_tensor(a, device=device), sigmas).cpu().numpy()
            assert got.dtype == np.float32 and np.array_equal(got, ndimage.gaussian_filter(a, sigmas)), sigmas
    spacing = (2.5, 0.59, 0.72)
    on = None if device == "cpu" else device
    assert np.array_equal(ct_extent.smoothed_hu(phantom, spacing, on), ct_extent.smoothed_hu(phantom, spacing))


@pytest.mark.parametrize("device", DEVICES)
def test_a_cts_search_layers_made_on_the_device_in_slabs_are_the_cpus_whole_volume(device, monkeypatch):
    """ct_extent.ct_layers on a GPU smooths slabs of planes there (each with the planes its z kernel reaches):
    the smoothed HU and aerated lung of the whole volume on the CPU, bit for bit; the slabs on the CPU too,
    with z smoothed (an isotropic grid) and not (thick slices)."""
    from monailabel_app.grounding import ct_extent

    vol = phantom_volume(make_ct_phantom(3))
    for spacing in (vol.spacing, (2.5, 0.59, 0.72)):
        whole = ct_extent.ct_layers(vol.hu, spacing)
        assert np.array_equal(ct_extent.smoothed_in_slabs(vol.hu, spacing, None, slab=7), whole.smooth)
        if device != "cpu":
            monkeypatch.setattr(ct_extent, "SMOOTH_SLAB", 7)
            slabs = ct_extent.ct_layers(vol.hu, spacing, device)
            for name in ("smooth", "aerated"):
                assert np.array_equal(getattr(slabs, name), getattr(whole, name)), (spacing, name)
        assert whole.aerated.any() and not whole.aerated.all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the lent H200)")
@pytest.mark.parametrize("deepest_on_device", [False, True], ids=["deepest-host", "deepest-cuda"])
def test_a_cts_extents_searched_with_the_gpus_smoothing_are_the_cpus(monkeypatch, deepest_on_device):
    """find_in_ct with its HU smoothed on the GPU (and its candidates' deepest voxels measured there,
    ct_extent.DEEPEST_ON_DEVICE): the same regions, seeds and measures as on the CPU, for each lesion of a
    phantom CT under attention centred on it, on the voxels and on coarse planes (a small MAX_BOX_VOXELS: the
    large kinds' way on a clinical grid)."""
    from monailabel_app.grounding import ct_extent

    monkeypatch.setattr(ct_extent, "DEEPEST_ON_DEVICE", deepest_on_device)
    ph = make_ct_phantom(4)
    vol = phantom_volume(ph)
    grid = np.indices(vol.shape)
    found = 0
    for most in (ct_extent.MAX_BOX_VOXELS, 20_000):
        monkeypatch.setattr(ct_extent, "MAX_BOX_VOXELS", most)
        for lesion in ph.lesions:
            centre = np.argwhere(lesion.mask).mean(axis=0)
            d2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, vol.spacing))
            heat = np.exp(-d2 / (2 * 15.0**2)).astype(np.float32)
            cpu, gpu = (_outcome(vol, heat, lesion.kind, device) for device in (None, "cuda"))
            assert cpu[1:] == gpu[1:] and np.array_equal(cpu[0], gpu[0]), (most, lesion.kind, cpu[1:], gpu[1:])
            found += int((cpu[0] & lesion.mask).sum() >= 0.8 * lesion.mask.sum())
    assert found >= 3  # each lesion on the voxels (the coarse planes miss the small masses)


def _outcome(vol, heat, kind, device) -> tuple:
    """(mask, seed, measures) of find_in_ct, or (no mask, the reason)."""
    from monailabel_app.grounding import ct_extent, extent

    try:
        e = ct_extent.find_in_ct(vol.hu, vol.spacing, heat, kind, cache={}, device=device)
        return e.mask, e.seed, e.json()
    except extent.NoExtent as x:
        return np.zeros(vol.shape, bool), str(x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the lent H200)")
def test_the_envelope_kernel_compiled_for_cuda_gives_torchs_values():
    """The deepest voxel's lower envelopes in the Triton kernel, compiled for the GPU, give the torch blocks'
    values there bit for bit (test_distances checks it in Triton's interpreter)."""
    from tests.grounding.test_distances import envelope_check

    assert envelope_check("cuda") == ["same"] * 3


@pytest.mark.parametrize("device", DEVICES)
def test_the_deepest_voxel_measured_with_torch_is_edts(device):
    """ct_extent.deepest's voxel from torch's distances (on a GPU: the search's longest step off the host's
    cores) is the one edt's give: on a phantom CT's lesions and dense regions, a box (its depths tied on a
    plateau: the first in C order), and parts over DEEPEST_FINE_VOXELS measured on 2 x 2 blocks. On the CPU the
    torch path is called alone (the reader keeps edt there)."""
    from monailabel_app.grounding import components, ct_extent

    ph = make_ct_phantom(4)
    vol = phantom_volume(ph)
    labels, _ = components.label_here(vol.hu >= -500)
    sizes = np.bincount(labels.ravel())[1:]
    parts = [(labels == k + 1, vol.spacing) for k in np.argsort(sizes)[::-1][:4]]
    parts += [(les.mask, vol.spacing) for les in ph.lesions]
    box = np.zeros((30, 80, 90), bool)
    box[5:25, 10:70, 20:80] = True
    grids = np.ogrid[:60, :240, :240]
    big = sum(((g - c) * s / r) ** 2 for g, c, s, r in zip(grids, (29, 118, 121), (2.5, 0.7, 0.7), (70, 80, 75))) <= 1
    parts += [(box, (2.5, 0.6, 0.7)), (big, (2.5, 0.7, 0.7))]
    assert big.sum() > ct_extent.DEEPEST_FINE_VOXELS
    for part, spacing in parts:
        want = ct_extent.deepest(part, spacing)
        if device == "cuda":
            assert ct_extent.deepest(part, spacing, device) == want
        else:
            sub = part[ct_extent.bounds(part, [1, 1, 1])]
            at = ct_extent.deepest_index_torch(sub, spacing, device)
            assert at == np.unravel_index(int(np.argmax(ct_extent.inside_distance(sub, spacing))), sub.shape)
    # the box's depth is 18 mm (half its 36 mm in y) on a plateau of 6 x 2 x 10 voxels; its first in C order
    assert ct_extent.deepest(box, (2.5, 0.6, 0.7)) == (12, 39, 45)


@pytest.mark.parametrize("device", DEVICES)
def test_the_windows_made_in_torch_are_numpys_bytes(device):
    """Every whole HU from -1100 to 3100 and random fractional ones, through the three windows: torch's uint8
    (channels first) equal to window_rgb's, byte for byte (a CT's slices are windowed on its GPU)."""
    whole = np.arange(-1100, 3101, dtype=np.float32)
    rng = np.random.default_rng(0)
    fractional = rng.normal(-300, 700, whole.size).astype(np.float32)
    planes = np.stack([whole, fractional])[:, None, :]  # (n, rows, cols)
    got = windowed(torch.from_numpy(planes).to(device)).cpu().numpy()  # (n, 3, rows, cols)
    for n in range(len(planes)):
        assert np.array_equal(got[n].transpose(1, 2, 0), window_rgb(planes[n])), n


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the lent H200)")
def test_model_slices_windowed_on_the_gpu_are_the_cpus():
    """A CT's model slices made on the GPU (uploaded once, windowed there): the same squares, and the processor
    handed them there."""
    hu = np.random.default_rng(1).normal(-400, 600, (30, 40, 52)).astype(np.float32)
    volume = type("Volume", (), {"hu": hu, "shape": hu.shape})()
    cpu, gpu = model_slices(volume, 12), model_slices(volume, 12, device="cuda")
    assert cpu.on_device is None and cpu.shown is cpu.images and gpu.shown is gpu.on_device
    assert gpu.indices == cpu.indices and gpu.pad == cpu.pad and len(gpu.images) == len(cpu.images) == 12
    for a, b, t in zip(cpu.images, gpu.images, gpu.on_device):
        assert np.array_equal(a, b) and t.is_cuda and np.array_equal(t.permute(1, 2, 0).cpu().numpy(), a)
    # the planes go up through one kept page-locked buffer: a larger CT's after it (the buffer grown), a smaller
    # one's (reused once its upload has read it), one torch cannot view (flipped rows: gathered by numpy first)
    for other in (np.random.default_rng(2).normal(-400, 600, (50, 60, 44)).astype(np.float32), hu, hu[:, ::-1]):
        volume = type("Volume", (), {"hu": other, "shape": other.shape})()
        made = model_slices(volume, 12, device="cuda")
        assert all(np.array_equal(a, b) for a, b in zip(model_slices(volume, 12).images, made.images))
