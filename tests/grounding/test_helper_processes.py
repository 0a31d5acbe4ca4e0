"""Labels, distances and the lung territory in helper processes: the same arrays as in the calling thread, the interpreter free
while they run, a killed helper replaced without a wrong answer, and a CT reading the same with them."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

from conftest import shared
from monailabel_app.grounding import components, distances, helper_processes
from monailabel_app.io.study import load_study

SPACING = (2.5, 0.6, 0.7)


@pytest.fixture(scope="module")
def masks():
    """Masks of a real CT (TotalSegmentator's example) at a clinical in-plane size: body, lungs, bone."""
    from scipy import ndimage

    pytest.importorskip("SimpleITK")  # (the lent GPU's machine has none)
    study = load_study(shared("ct", "totalsegmentator", "example_ct.nii.gz"), "ct")
    hu = ndimage.zoom(study.hu, (1, 2.5, 2.5), order=0)
    return [hu > -500, (hu > -950) & (hu < -200), hu > 200]


@pytest.fixture
def helpers():
    helper_processes.start(2)
    yield helper_processes
    helper_processes.stop()


def test_how_many_helpers(monkeypatch):
    monkeypatch.delenv(helper_processes.ENV, raising=False)
    assert helper_processes.helpers_for(torch.device("cuda"), cores=16) == helper_processes.DEFAULT_HELPERS == 8
    assert helper_processes.helpers_for(torch.device("cuda"), cores=64) == 8
    assert helper_processes.helpers_for(torch.device("cuda"), cores=6) == 3  # half the cores
    assert helper_processes.helpers_for(torch.device("cuda"), cores=2) == 0  # no core to go to
    assert helper_processes.helpers_for(torch.device("cpu"), cores=16) == 0
    monkeypatch.setenv(helper_processes.ENV, "2")
    assert helper_processes.helpers_for(torch.device("cpu"), cores=2) == 2
    for bad in ("two", "-1", "100"):
        monkeypatch.setenv(helper_processes.ENV, bad)
        with pytest.raises(ValueError, match=helper_processes.ENV):
            helper_processes.helpers_for(torch.device("cuda"))


def test_the_helpers_give_the_arrays_made_here(masks, helpers, monkeypatch):
    assert all(m.size >= helper_processes.MIN_VOXELS for m in masks)
    before = helpers.served()
    for m, edt_threads in zip(masks, (1, 2, 1)):  # a helper's distances on one of edt's threads or more
        monkeypatch.setattr(distances, "HELPER_THREADS", edt_threads)
        for full in (False, True):
            there, here = components.label(m, full), components.label_here(m, full)
            assert there[1] == here[1] > 0 and there[0].dtype == here[0].dtype
            assert np.array_equal(there[0], here[0])
        box = m[:, 40:-40, 30:]  # a view, as the searches pass their boxes
        there, here = distances.inside(box, SPACING), distances.inside_here(box, SPACING)
        assert there.dtype == here.dtype == np.float32 and np.array_equal(there, here)
    assert helpers.served() - before == 3 * len(masks)
    small = masks[0][:8, :64, :32]  # under MIN_VOXELS: made here
    assert small.size < helper_processes.MIN_VOXELS
    assert np.array_equal(distances.inside(small, SPACING), distances.inside_here(small, SPACING))
    assert helpers.served() - before == 3 * len(masks)


def test_a_label_started_in_a_helper_is_taken_later_as_the_label_made_here(masks, helpers):
    """components.label_later: the helper labels while the calling thread goes on (here it labels another
    mask meanwhile); the answer is the one made here. Without helpers, or for a small mask, it is made here
    when asked for."""
    before = helpers.served()
    later = components.label_later(masks[0])
    other = components.label_here(masks[1])  # the calling thread's own work meanwhile
    there, here = later(), components.label_here(masks[0])
    assert there[1] == here[1] > 0 and np.array_equal(there[0], here[0]) and helpers.served() == before + 1
    assert np.array_equal(components.label_later(masks[1])()[0], other[0]) and helpers.served() == before + 2
    small = masks[2][:8, :64, :32]
    assert np.array_equal(components.label_later(small, True)()[0], components.label_here(small, True)[0])
    helpers.stop()
    assert np.array_equal(components.label_later(masks[2])()[0], components.label_here(masks[2])[0])
    assert helpers.served() == before + 2


def test_a_maps_two_levels_found_side_by_side_in_helpers_are_the_ones_found_in_turn(helpers, monkeypatch):
    """maps.peak_regions with helpers: the search level's piece and the finding's own (a higher level) started in
    two helpers at once, the higher one on the box of everything above it (maps.LEVELS_TOGETHER), give the
    regions, boxes and peak found one after the other on the lower piece's box: smooth maps with several
    blobs, zero outside a gate's box, the peak given or found."""
    from scipy import ndimage

    from monailabel_app.grounding import maps

    taken, real = [], maps._two_levels_together
    monkeypatch.setattr(maps, "_two_levels_together", lambda *a: taken.append(real(*a)) or taken[-1])
    rng = np.random.default_rng(11)
    for i in range(6):
        heat = np.zeros((40, 160, 150), np.float32)
        box = (slice(2, 38), slice(10 + i, 150), slice(5, 140 - i))
        heat[box] = ndimage.gaussian_filter(rng.random(heat[box].shape), (2, 6, 6)).astype(np.float32)
        heat[box] -= heat[box].min()  # >= 0, as a gated map
        span = maps.support_range(heat, box)
        given = None if i % 2 else tuple(int(j) for j in np.unravel_index(int(np.argmax(heat)), heat.shape))
        got = {}
        for together in (False, True):
            monkeypatch.setattr(maps, "LEVELS_TOGETHER", together)
            before = helpers.served()
            got[together] = maps.peak_regions(heat, (0.5, 0.3), box, span, given)
            assert helpers.served() - before == 2
        a, b = got[False], got[True]
        assert a.peak == b.peak and a.regions[0].mask.any() and a.regions[1].mask.any()
        for x, y in zip(a.regions, b.regions):
            assert x.box == y.box and np.array_equal(x.mask, y.mask)
        assert (a.regions[0].mask <= a.regions[1].mask).all()  # the finding's own region lies in the search's
    assert len(taken) == 6 and all(t is not None for t in taken)  # side by side each time it was on


def test_the_helpers_say_how_long_they_computed(masks, helpers):
    """Each answered call counts under its name with the seconds its helper computed it: more than nothing, less
    than the calls took here (the benchmarks' timelines split a call's wall time with them)."""
    before = helper_processes.computing()
    t0 = time.perf_counter()
    for m in masks:
        distances.inside(m, SPACING)
        components.label(m)
    wall = time.perf_counter() - t0
    after = helper_processes.computing()
    for op in ("inside", "label"):
        n0, s0 = before.get(op, (0, 0.0))
        n1, s1 = after[op]
        assert n1 - n0 == len(masks) and s1 - s0 > 0
    assert sum(after[op][1] - before.get(op, (0, 0.0))[1] for op in ("inside", "label")) < wall


def test_the_lung_territory_made_in_slabs_by_the_helpers_is_the_territory_made_here(masks, helpers):
    """The territory is made plane by plane: split in two slabs, one per helper, side by side, it is the same
    voxels; a slab whose helper died is made here, the same again."""
    from monailabel_app.grounding.territory import territory, territory_here

    lungs = masks[1][:, 60:-60]  # a view, as the searches pass their boxes
    here = territory_here(lungs)
    assert here.any() and (here & ~lungs).any()  # hulls filled beyond the lung's own voxels
    before = helpers.served()
    assert np.array_equal(territory(lungs), here) and helpers.served() == before + 2
    assert np.array_equal(territory(lungs[:, :40, :40]), territory_here(lungs[:, :40, :40]))  # small: made here
    assert helpers.served() == before + 2
    victim = helpers._POOL.idle.queue[0]
    os.kill(victim.process.pid, signal.SIGKILL)
    victim.process.wait()
    assert np.array_equal(territory(lungs), here) and helpers.served() == before + 3


def test_the_interpreter_runs_other_threads_while_a_helper_works(masks, helpers):
    """While a helper makes a distance map (about a second here), this thread keeps running Python: it gets
    through many rounds of its own work before the call returns. Made in the calling thread, edt holds the
    interpreter for the whole call and this thread gets through a hundredth of them (checked)."""
    big = np.concatenate([masks[0]] * 3)
    done = threading.Event()
    worker = threading.Thread(target=lambda: (distances.inside(big, SPACING), done.set()))
    worker.start()
    rounds = 0
    try:
        for _ in range(10**6):  # wait (in Python) until the call is with a helper
            if helpers.busy():
                break
        else:
            pytest.fail("the call never reached a helper")
        while not done.is_set():
            sum(i * i for i in range(2000))  # about a millisecond of Python
            rounds += 1
    finally:
        worker.join()
    assert rounds >= 2000, rounds  # 17,000 here; 200 with edt in the calling thread


def test_a_killed_helper_is_replaced_and_its_call_made_here(masks, helpers):
    m = masks[1]
    here = components.label_here(m)
    victims = list(helpers._POOL.idle.queue)
    for helper in victims:
        os.kill(helper.process.pid, signal.SIGKILL)
        helper.process.wait()
    before = helpers.served()
    labels, n = components.label(m)  # its helper is dead: made here
    assert n == here[1] and np.array_equal(labels, here[0]) and helpers.served() == before
    labels, n = components.label(m)  # the other dead one: made here too
    assert np.array_equal(labels, here[0])
    alive = list(helpers._POOL.idle.queue)
    assert len(alive) == 2 and all(h.alive() for h in alive) and not set(alive) & set(victims)
    labels, n = components.label(m)
    assert np.array_equal(labels, here[0]) and helpers.served() == before + 1


def test_stopping_the_helpers_while_calls_are_under_way_lets_every_call_finish(masks):
    """stop() while one call is with the only helper and another waits for it: the first finishes there, the
    second is made in its own thread, and stop() returns (it had held a lock the first call needed)."""
    helper_processes.start(1)
    big = np.concatenate([masks[0]] * 3)
    got = {}
    first = threading.Thread(target=lambda: got.setdefault("first", distances.inside(big, SPACING)))
    first.start()
    for _ in range(10**6):
        if helper_processes.busy():
            break
    second = threading.Thread(target=lambda: got.setdefault("second", components.label(masks[1])))
    second.start()
    stopper = threading.Thread(target=helper_processes.stop)
    stopper.start()
    for t in (first, second, stopper):
        t.join(timeout=120)
        assert not t.is_alive()
    assert helper_processes.start(0) == 0
    assert np.array_equal(got["first"], distances.inside_here(big, SPACING))
    assert np.array_equal(got["second"][0], components.label_here(masks[1])[0])


def test_a_ct_reading_with_helpers_equals_the_reading_without(reader):
    from monailabel_app.phantoms import ct as ct_phantoms

    volume = ct_phantoms.phantom_volume(ct_phantoms.make_ct_phantom(2))
    answer = "Nodule in the right lower lobe. Mass in the left upper lobe. Effusion in the right lower lobe."
    without = reader.read(volume, answer=answer)
    helper_processes.start(2)
    try:
        reader.forget_anatomy()
        before = helper_processes.served()
        with_helpers = reader.read(volume, answer=answer)
        assert helper_processes.served() > before
    finally:
        helper_processes.stop()
    assert np.array_equal(with_helpers.labels, without.labels) and with_helpers.labels.any()
    assert with_helpers.extras == without.extras


def test_a_forked_child_makes_its_calls_itself_and_leaves_the_parents_helpers_alone(masks, helpers):
    """A process forked from one with helpers (a bench's forked search workers) does not talk to its parent's
    helpers (their sockets would carry two processes' calls): its calls are made in its own thread, and its
    exit leaves the parent's helpers running."""
    import multiprocessing

    here = components.label_here(masks[0])
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        count, served, n = pool.apply(_in_a_child, (masks[0],))
    assert count == 0 and served == 0 and n == here[1]
    assert all(h.alive() for h in helpers._POOL.idle.queue) and helpers.start(0) == 2
    before = helpers.served()
    assert np.array_equal(components.label(masks[0])[0], here[0]) and helpers.served() == before + 1


def _in_a_child(mask):
    labels, n = components.label(mask)
    return helper_processes.start(0), helper_processes.served(), n


def test_the_piece_at_a_point_from_a_helper_is_the_piece_found_here(helpers):
    """A helper's piece at a point (the mask's, or the nearest where the point is outside) is the one found in
    the calling thread, for both connectivities, on a view of a larger mask."""
    from scipy import ndimage

    rng = np.random.default_rng(11)
    vol = ndimage.gaussian_filter(rng.normal(size=(24, 96, 80)), 0.8) > 0.25
    mask = vol[:, 8:, 4:]
    assert mask.size >= helper_processes.MIN_VOXELS
    faces, edges = components.label_here(mask)[0], components.label_here(mask, True)[0]
    grows = (np.bincount(faces.ravel())[faces] < np.bincount(edges.ravel())[edges]) & mask  # joined by edges
    inside = tuple(int(i) for i in np.argwhere(grows)[0])  # where the connectivity matters
    outside = tuple(int(i) for i in np.argwhere(faces == 0)[len(np.argwhere(faces == 0)) // 2])
    before = helpers.served()
    for point in (inside, outside):
        pieces = [components.component_at(mask, point, full) for full in (False, True)]
        assert point == outside or not np.array_equal(*pieces)
        for full, there in zip((False, True), pieces):
            assert there.dtype == bool and there.any()
            assert np.array_equal(there, components.component_here(mask, point, full))
    assert helpers.served() - before == 4


def test_a_helper_loads_what_its_calls_use_without_torch():
    """A helper imports its calls' modules as it starts, and none of them brings torch in (its import took a
    helper's first territory call 4.5 s on an H100's host when the territory's module imported it)."""
    import subprocess
    import sys

    code = ("import sys; from monailabel_app.grounding import helper_processes; helper_processes.load(); "
            "print(sorted(m for m in ('torch', 'monailabel_app.grounding.territory', "
            "'monailabel_app.grounding.components', 'monailabel_app.grounding.distances') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=helper_processes.ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == str(sorted(["monailabel_app.grounding.territory",
                                                       "monailabel_app.grounding.components",
                                                       "monailabel_app.grounding.distances"]))
