"""The lungs' territory made in torch (a GPU reader's), against the host's: the same voxels on random lungs, shapes
that make its labelling and its hulls work hard, and a real CT's aerated lung; and which territory a CT search
asks for."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from conftest import shared
from monailabel_app.grounding import ct_extent, extent, territory as territory_module, territory_device
from monailabel_app.grounding.territory import territory, territory_here
from monailabel_app.grounding.territory_device import Runs, territory_on_device, territory_torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
IN_PLANE = np.zeros((3, 3, 3), bool)
IN_PLANE[1] = True  # 8-connected within a plane


def _serpentine(side: int) -> np.ndarray:
    """A one-pixel path over a side x side plane, every other row joined to the next at alternate ends: one piece
    whose first and last pixels lie about side^2 / 2 steps apart."""
    plane = np.zeros((side, side), bool)
    plane[::2] = True
    for k, y in enumerate(range(1, side, 2)):
        plane[y, -1 if k % 2 == 0 else 0] = True
    return plane


def _lungs(seed: int, shape=(14, 70, 90)) -> np.ndarray:
    """Random lung-like pieces, with the planes the rule treats apart: none, under ``min_pixels``, at the two
    limits, a thin strip, pieces touching every border, diagonal chains both ways (8-connected only), runs on
    consecutive rows a column apart and meeting at a corner, a serpentine."""
    rng = np.random.default_rng(seed)
    vol = ndimage.gaussian_filter(rng.normal(size=shape), (0, 3, 3)) > 0.12
    vol[3] = False
    vol[4] = False
    vol[4, 10:13, 10:15] = True  # 15 pixels: no territory
    vol[5] = False
    vol[5, 20, 10:30] = True  # exactly 20: kept, not opened
    vol[6] = False
    vol[6, 20:24, 10:30] = True  # exactly 80: kept, not opened (a pixel more is opened)
    vol[7] &= np.arange(shape[2])[None] < 12  # a thin strip
    vol[8] = True  # a whole plane: every border
    vol[9] = False
    diagonal = np.arange(min(shape[1:]))
    vol[9, diagonal, diagonal] = True  # one piece through corners alone
    vol[9, diagonal[:-3], diagonal[:-3] + 3] = True  # and another beside it
    vol[10] = False
    side = min(shape[1:])
    vol[10, :side, :side] = _serpentine(side)
    vol[11] = vol[10]  # the same pieces in the next plane: never joined across planes
    vol[12] = False
    vol[12, diagonal[:40], 50 - diagonal[:40]] = True  # a chain through lower-left corners alone
    vol[12, 50, 10:13] = vol[12, 51, 14:17] = True  # two runs a column apart on consecutive rows: two pieces
    vol[12, 55, 10:13] = vol[12, 56, 13:17] = True  # meeting at a corner: one
    return vol


@pytest.mark.parametrize("device", DEVICES)
def test_the_runs_pieces_are_scipys_8_connected_pieces_of_each_plane(device):
    """The runs cover the mask exactly; their pieces are those of ``ndimage.label`` with the in-plane structure
    (a one-to-one map between the numbers), each numbered by its first run; the serpentine's far end reached."""
    rows = _lungs(0).shape[1]
    for seed in range(3):
        vol = _lungs(seed)
        runs = Runs.of(torch.as_tensor(vol, device=device))
        line, start, end, piece = (x.cpu().numpy() for x in (runs.line, runs.start, runs.end, runs.piece))
        painted = np.zeros(vol.shape, bool)
        for at, s, e in zip(line, start, end):
            painted[at // rows, at % rows, s : e + 1] = True
        assert np.array_equal(painted, vol)
        want, n = ndimage.label(vol, structure=IN_PLANE)
        theirs = want[line // rows, line % rows, start]
        assert np.unique(np.stack([piece, theirs]), axis=1).shape[1] == n == len(np.unique(piece))
        assert all(np.flatnonzero(piece == p)[0] == p for p in np.unique(piece))  # its first run's index
        plane = line // rows
        assert len(np.unique(piece[plane == 10])) == 1  # the serpentine: one piece
        assert not set(piece[plane == 10]) & set(piece[plane == 11])  # never joined across planes


@pytest.mark.parametrize("device", DEVICES)
def test_the_territory_made_in_torch_is_the_hosts(device):
    for seed in range(4):
        vol = _lungs(seed)
        want = territory_here(vol)
        assert want[4].sum() == 0 and want[5].any() and (want ^ vol).any()
        got = territory_torch(torch.as_tensor(vol, device=device)).cpu().numpy()
        assert np.array_equal(got, want)
    assert np.array_equal(territory_on_device(vol[:, 5:, 7:], 20, device), territory_here(vol[:, 5:, 7:]))  # a view
    empty = np.zeros((3, 9, 9), bool)
    assert not territory_torch(torch.as_tensor(empty, device=device)).any()


def test_a_real_cts_territory_made_in_torch_is_the_hosts():
    """The aerated lung of a real CT (TotalSegmentator's example at a clinical in-plane size), whole and in a
    search box that cuts its pieces."""
    pytest.importorskip("SimpleITK")
    from monailabel_app.io.study import load_study

    study = load_study(shared("ct", "totalsegmentator", "example_ct.nii.gz"), "ct")
    hu = ndimage.zoom(study.hu, (1, 2.5, 2.5), order=0)
    aerated = ct_extent.aerated_lung(ct_extent.smoothed_hu(hu, (3.0, 1.2, 1.2)))
    assert aerated.sum() > 1_000_000
    for box in ((slice(None),) * 3, (slice(10, 60), slice(60, 200), slice(40, 250))):
        want = territory_here(aerated[box])
        assert (want ^ aerated[box]).sum() > 1000
        assert np.array_equal(territory_on_device(aerated[box], 20, "cpu"), want)


def test_a_gpu_readers_ct_territory_is_asked_of_its_device(monkeypatch):
    """With the switch on, territory() makes a CT box's planes on the device where it is a GPU (here the device's
    code runs on the CPU under that name), not for one plane (a film's) or another device; with the library's
    switch (off) in the helpers or here; a CT search passes its device on."""
    asked = []

    def on_device(lungs, min_pixels, device):
        asked.append(str(device))
        return territory_on_device(lungs, min_pixels, "cpu")

    monkeypatch.setattr(territory_device, "territory_on_device", on_device)
    assert territory_module.ON_DEVICE is False  # (slower beside the decode: fast_path.md, runs DS-DU)
    monkeypatch.setattr(territory_module, "ON_DEVICE", True)
    vol = _lungs(1)
    assert np.array_equal(territory(vol, device=torch.device("cuda", 0)), territory_here(vol))
    assert asked == ["cuda:0"]
    territory(vol, device="cpu")
    territory(vol[7], device="cuda")
    monkeypatch.setattr(territory_module, "ON_DEVICE", False)
    territory(vol, device="cuda")
    assert asked == ["cuda:0"]
    monkeypatch.setattr(territory_module, "ON_DEVICE", True)
    seen = []
    monkeypatch.setattr(ct_extent, "territory", lambda lungs, device=None: seen.append(device) or territory_here(lungs))
    hu = np.full((20, 60, 60), -850.0, np.float32)
    hu[8:13, 25:35, 25:35] = 30.0  # a nodule in aerated lung
    heat = np.zeros(hu.shape, np.float32)
    heat[8:13, 25:35, 25:35] = 1.0
    try:
        ct_extent.find_in_ct(hu, (1.0, 1.0, 1.0), heat, "nodule", device="cpu")
    except extent.NoExtent:
        pass
    assert seen and set(seen) == {"cpu"}
