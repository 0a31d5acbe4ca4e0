"""A CT's image-extent searches in worker processes (search_processes) against the map threads': the same
readings, the HU's shared block removed with the study's maps, a search's reason kept, and when a reader
uses them."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from monailabel_app import search_processes, shared_blocks
from monailabel_app.ct_phantoms import make_ct_phantom, phantom_volume
from monailabel_app.grounding import extent


def _blocks() -> set[str]:
    return {n for n in os.listdir(shared_blocks.SHM_DIR) if n.startswith("medgemma-")}


@pytest.fixture
def pooled(reader, monkeypatch):
    """The session's phantom reader with two search processes, put back to the map threads afterwards."""
    monkeypatch.setenv(search_processes.ENV, "2")
    assert reader.search_pool() is not None and reader.search_pool().workers == 2
    try:
        yield reader
    finally:
        reader._search_processes.shutdown()
        reader._search_processes = None


def test_a_ct_searched_in_processes_reads_as_in_the_map_threads(pooled, monkeypatch):
    """Phantom CTs whose findings take the image's extent: the same label maps and finding extras (extent,
    measures, seed point) from the search processes as from the map threads, and no block left behind."""
    before = _blocks()
    extents = []
    for seed in (4, 7):
        vol = phantom_volume(make_ct_phantom(seed))
        gen = pooled.read(vol).generation
        in_processes = pooled.remap(vol, gen)
        monkeypatch.setattr(pooled, "search_pool", lambda: None)
        in_threads = pooled.remap(vol, gen)
        monkeypatch.undo()
        monkeypatch.setenv(search_processes.ENV, "2")
        assert np.array_equal(in_processes.labels, in_threads.labels), seed
        assert in_processes.extras == in_threads.extras, seed
        extents += [e["extent"] for e in in_processes.extras]
    assert "image" in extents  # the searches found regions, not only reasons
    del in_processes, in_threads
    assert _blocks() <= before


def test_a_search_in_a_process_gives_the_same_region_or_reason(pooled):
    """find() against extent.find_in_ct in this process: a lesion's region (mask, seed, measures), and the
    reason where attention points at no region of the kind's density."""
    ph = make_ct_phantom(4)
    vol = phantom_volume(ph)
    pool = pooled.search_pool()
    shared = pool.volume(vol.hu)
    grid = np.indices(vol.shape)
    outcomes = []
    for lesion, kind in ((ph.lesions[0], ph.lesions[0].kind), (ph.lesions[0], "pneumothorax")):
        centre = np.argwhere(lesion.mask).mean(axis=0)
        heat = np.exp(-sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, vol.spacing)) / 450.0)
        heat = heat.astype(np.float32)
        heat[heat < 0.01] = 0.0  # a gated map: zero outside its support box
        box = extent.bounding_box(heat > 0)
        own = heat >= 0.5
        try:
            here = extent.find_in_ct(vol.hu, vol.spacing, heat, kind, own, {}, box)
        except extent.NoExtent as e:
            with pytest.raises(extent.NoExtent) as got:
                pool.find(shared, vol.spacing, heat, kind, own, box)
            assert str(got.value) == str(e)
            outcomes.append("reason")
            continue
        there = pool.find(shared, vol.spacing, heat, kind, own, box)
        assert np.array_equal(here.mask, there.mask) and here.seed == there.seed and here.json() == there.json()
        outcomes.append("region")
    assert outcomes == ["region", "reason"]


def test_a_studys_block_goes_with_it():
    before = _blocks()
    volume = search_processes.Volume.of(np.arange(24, dtype=np.int16).reshape(2, 3, 4))
    made = _blocks() - before
    assert len(made) == 1
    del volume
    assert not (_blocks() & made)


def test_how_many_search_processes(monkeypatch):
    monkeypatch.delenv(search_processes.ENV, raising=False)
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert search_processes.workers_for(gpu, cores=16) == search_processes.DEFAULT_WORKERS
    assert search_processes.workers_for(gpu, cores=4) == 0  # the cores are the decode's and the maps'
    assert search_processes.workers_for(cpu, cores=64) == 0  # without a GPU the cores are the model's
    monkeypatch.setenv(search_processes.ENV, "3")
    assert search_processes.workers_for(cpu, cores=2) == 3
    monkeypatch.setenv(search_processes.ENV, "two")
    with pytest.raises(ValueError, match=search_processes.ENV):
        search_processes.workers_for(gpu)
