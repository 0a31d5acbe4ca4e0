"""One reading end to end in-process: text, masks and their side of the patient, in every precision
this machine runs (``reader_in``); exact comparisons in fp32 (``reader``)."""

import gc
import threading
import time
import types

import numpy as np
import pytest
import torch

from monailabel_app.errors import InputError
from monailabel_app.io.xray import Geometry, Radiograph
from monailabel_app.model.loading import PRECISIONS
from monailabel_app.phantoms.films import make_phantom


def _read(reader, image, **kw):
    return reader.read(Radiograph(image, Geometry.plain(*image.shape)), **kw)


@pytest.mark.parametrize("seed", [7, 11, 23, 42])
def test_reading_a_phantom(reader_in, seed):
    reader = reader_in
    ph = make_phantom(seed)
    r = _read(reader, ph.image)
    assert r.report == ph.report
    assert r.labels.shape == ph.image.shape and r.labels.dtype == np.uint8
    assert set(np.unique(r.labels)) <= set(range(len(r.findings) + 1))
    assert len(r.heatmaps) == len(r.findings) == len(ph.lesions)
    for k, (f, h) in enumerate(zip(r.findings, r.heatmaps), start=1):
        assert h.shape == ph.image.shape and (r.labels == k).any()
        assert 0 < f.score <= 1
    res = r.result_json()
    assert res["label_names"] == {n: k for k, n in enumerate(r.names, start=1)}
    assert res["model"]["label"].endswith("NOT MedGemma)")
    assert res["model"]["layers"] == reader.layers and res["model"]["dropped_layers"] == {}
    assert res["model"]["attention"] == ("rollout" if reader.info.grounding["rollout"] else "direct")
    assert PRECISIONS[res["model"]["precision"]] == reader.model.dtype  # the result says what ran


def test_named_side_and_mask_side_agree_with_the_patient(reader_in):
    """Patient right is the image's left on a PA radiograph: text and mask must both say so."""
    checked = {"right": 0, "left": 0}
    for seed in range(0, 80):
        ph = make_phantom(seed)
        if len(ph.lesions) != 1:
            continue
        les = ph.lesions[0]
        r = _read(reader_in, ph.image)
        if r.report != ph.report:  # a model error (zone accuracy is tested on its own): not this test's question
            continue
        body_mid = (np.nonzero(ph.lungs["right"].any(0))[0].max() + np.nonzero(ph.lungs["left"].any(0))[0].min()) / 2
        mask_col = np.nonzero(r.labels == 1)[1].mean()
        peak_col = np.unravel_index(np.argmax(r.mask_maps[0]), r.mask_maps[0].shape)[1]
        assert (mask_col < body_mid) == (les.side == "right") and (peak_col < body_mid) == (les.side == "right")
        checked[les.side] += 1
    assert min(checked.values()) >= 5, checked


def test_empty_image_gives_an_empty_label_map(reader_in):
    ph = next(make_phantom(s) for s in range(100) if not make_phantom(s).lesions)
    r = _read(reader_in, ph.image)
    assert r.findings == [] and r.labels.shape == ph.image.shape and not r.labels.any()


@pytest.mark.parametrize("question,tokens,words", [
    ("x" * 3000, 10, "characters long"),
    (["a list"], 10, "must be text"),
    (None, -1, "between 1 and"),
    (None, 10**6, "between 1 and"),
    (None, "many", "whole number"),
    (None, 2.5, "whole number"),
])
def test_bad_params(reader, question, tokens, words):
    ph = make_phantom(7)
    with pytest.raises(InputError, match=words):
        _read(reader, ph.image, question=question, max_new_tokens=tokens)


def test_user_question_and_token_limit(reader):
    ph = make_phantom(11)
    r = _read(reader, ph.image, question="What are the findings?", max_new_tokens=4)
    assert r.question == "What are the findings?" and r.latencies["new_tokens"] <= 4
    assert r.latencies["stop_reason"] in ("max_new_tokens", "eos", "repetition")


def test_a_box_in_the_answer_gates_the_mask(reader_in, monkeypatch):
    """MedGemma 1.5 gives boxes as [y0, x0, y1, x1] in 0..1000 of its input square: the finding's mask
    must stay inside that box (mapped through the padding), wherever the attention peaks. Checked on the
    attention's own masks (``"extent": "attention"``), which reach beyond the box without it."""
    from monailabel_app.grounding import maps
    from monailabel_app.io.xray import SquarePad
    from monailabel_app.language.report import parse_report

    reader = reader_in
    monkeypatch.setitem(reader.info.grounding, "extent", "attention")
    ph = make_phantom(11)  # taller than wide: padded left and right
    plain = _read(reader, ph.image, answer="nodule in the right middle zone.")
    pad = SquarePad(*ph.image.shape)
    ys, xs = np.nonzero(plain.labels == 1)
    assert len(ys)
    # a box over the upper-left part of the mask only: the boxed mask must be a subset of it
    cy, cx = int(np.median(ys)), int(np.median(xs))
    box = [round((v + off) * 1000 / pad.side) for v, off in ((ys.min(), pad.top), (xs.min(), pad.left), (cy, pad.top),
                                                              (cx, pad.left))]
    text = f"nodule in the right middle zone [{box[0]}, {box[1]}, {box[2]}, {box[3]}]."
    assert parse_report(text)[0].box == tuple(float(b) for b in box)
    boxed = _read(reader, ph.image, answer=text)
    assert boxed.findings[0].box is not None and boxed.report == text
    rows, cols = maps.box_factors(ph.image.shape, boxed.findings[0].box, pad, pad.side / reader.grid / 2)
    inside = (rows[:, None] * cols[None, :]) > 0
    m = boxed.labels == 1
    assert m.any() and not (m & ~inside).any()
    assert ((plain.labels == 1) & ~inside).any()  # without the box the mask reaches beyond it: the box cut it
    # invalid boxes are ignored, not guessed
    assert parse_report("nodule in the right middle zone [500, 10, 400, 20].")[0].box is None


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * (a & b).sum() / max(1, a.sum() + b.sum())


def test_reading_many_at_once_equals_reading_each(reader_in):
    """Batched generation (left padding where the questions differ in length; a CT in its own batch)
    gives every study the answer, findings and masks it gets alone: exactly in fp32; in 16 bits (the
    padded rows round differently) the same words and masks that overlap almost entirely."""
    from monailabel_app.phantoms.ct import make_ct_phantom, phantom_volume

    reader = reader_in
    exact = reader.model.dtype == torch.float32
    films = [Radiograph(make_phantom(s).image, Geometry.plain(*make_phantom(s).image.shape)) for s in (1, 11, 23)]
    studies = films + [phantom_volume(make_ct_phantom(2))]
    alone = [reader.read(s) for s in studies]
    together = reader.read_many(studies, batch_size=2)
    for a, b in zip(alone, together):
        assert a.report == b.report and a.names == b.names
        if exact:
            assert np.array_equal(a.labels, b.labels)
            assert all(np.allclose(x, y, atol=1e-5) for x, y in zip(a.heatmaps, b.heatmaps))
        else:
            for k in range(1, len(a.names) + 1):
                assert _dice(a.labels == k, b.labels == k) >= 0.9
            for x, y in zip(a.heatmaps, b.heatmaps):
                assert np.unravel_index(np.argmax(x), x.shape) == np.unravel_index(np.argmax(y), y.shape) or \
                    np.corrcoef(x.ravel(), y.ravel())[0, 1] > 0.99
    # different questions in one batch: the shorter chat is padded on the left, answers unchanged
    from monailabel_app.io.xray import pad_to_square
    from monailabel_app.model.generation import generate, generate_batch

    image = pad_to_square(films[1].pixels)[0]
    chats = [([image], "Describe the findings in this chest X-ray, zone by zone, please."), ([image], "Findings?")]
    layers = reader.layers
    batch = generate_batch(reader.model, reader.processor, chats, layers, 40)
    for (content, q), gen in zip(chats, batch):
        one = generate(reader.model, reader.processor, content, q, layers, 40)
        assert gen.token_ids == one.token_ids and gen.prompt_tokens == one.prompt_tokens
        assert torch.allclose(gen.attention.float(), one.attention.float(), atol=1e-5 if exact else 2e-2)
    assert batch[0].prompt_tokens > batch[1].prompt_tokens


def test_read_many_makes_the_next_batch_inputs_while_a_batch_generates(reader, monkeypatch):
    """The second batch's inputs are being made before the first batch's generation starts (it waits for
    that here; without the overlap it would wait in vain), and each batch generates from inputs made ahead."""
    import threading

    films = [Radiograph(make_phantom(s).image, Geometry.plain(*make_phantom(s).image.shape)) for s in (3, 5)]
    made, second = [], threading.Event()
    prepare, generate = reader._prepare, reader._generate

    def counting_prepare(chats, answers=None):
        made.append(len(chats))
        if len(made) == 2:
            second.set()
        return prepare(chats, answers)

    overlapped = []

    def waiting_generate(chats, *args, prepared=None, **kwargs):
        assert prepared is not None and prepared.studies == chats
        overlapped.append(second.wait(30) if not overlapped else True)
        return generate(chats, *args, prepared=prepared, **kwargs)

    monkeypatch.setattr(reader, "_prepare", counting_prepare)
    monkeypatch.setattr(reader, "_generate", waiting_generate)
    readings = reader.read_many(films, batch_size=1, max_new_tokens=24)
    assert made == [1, 1] and overlapped == [True, True]
    monkeypatch.undo()
    assert [r.report for r in readings] == [reader.read(f, max_new_tokens=24).report for f in films]


def test_film_maps_in_worker_processes_equal_the_maps_made_here(reader, monkeypatch):
    """read_many with map processes (as on a GPU; forced here): every film's reading is the one its maps
    give in this process, array for array, with the caller's own study and generation put back."""
    from monailabel_app import map_processes

    films = [Radiograph(make_phantom(s).image, Geometry.plain(*make_phantom(s).image.shape)) for s in (2, 9, 14)]

    def read_with(processes: str, device: str = "cpu", streamed: bool = False):
        monkeypatch.setenv(map_processes.ENV, processes)
        monkeypatch.setenv(map_processes.DEVICE_ENV, device)
        try:
            if streamed:  # each reading handed over as it is made, none kept
                got: dict = {}
                kept = reader.read_many(films, batch_size=2, max_new_tokens=48,
                                        on_reading=lambda i, r: got.setdefault(i, []).append(r))
                assert kept == [None] * len(films) and sorted(got) == list(range(len(films)))
                assert all(len(v) == 1 for v in got.values())
                readings = [got[i][0] for i in range(len(films))]
            else:
                readings = reader.read_many(films, batch_size=2, max_new_tokens=48)
            assert (reader._map_processes.workers if reader._map_processes else 0) == int(processes)
            if int(processes):
                assert reader._map_processes.device.type == device
            return readings
        finally:
            if reader._map_processes is not None:
                reader._map_processes.shutdown()
                reader._map_processes = None

    here = read_with("0")
    before = _blocks()
    compared = [read_with("2", streamed=True)]
    if reader.maps_device.type == "cuda":  # workers that map on the GPU too
        compared.append(read_with("2", "cuda"))
    for film, a, b in ((f, a, b) for there in compared for f, a, b in zip(films, here, there)):
        assert b.study is film and b.report == a.report and b.names == a.names and b.extras == a.extras
        assert b.generation.token_ids == a.generation.token_ids and b.latencies["maps"] > 0
        for name in map_processes.SHARED_FIELDS:
            x, y = getattr(a, name), getattr(b, name)
            for u, v in zip(*((x, y) if isinstance(x, list) else ([x], [y]))):
                assert isinstance(v, np.ndarray) and v.dtype == u.dtype and v.shape == u.shape
                if reader.maps_device.type == "cpu" or name == "model_inputs":  # the same CPU code: exact
                    assert np.array_equal(u, v)
                elif name != "labels":  # maps on the GPU here, on the CPU there: within the device maps' tolerance
                    assert np.allclose(u, v, atol=1e-5, rtol=1e-4)
        assert sum(np.count_nonzero(b.labels == k) > 0 for k in range(1, len(b.names) + 1)) == len(b.names)
    del a, b, u, v, x, y
    compared.clear()
    gc.collect()
    assert _blocks() == before  # the readings' shared blocks removed with the readings (their pool is shut)


def test_a_films_blob_responses_made_ahead_reach_its_map_process(reader):
    """read_many on a GPU filters a batch's films for blobs at once and hands each film's responses to its map
    process in shared memory. The worker's reading with them is the one made here with them, array for
    array, and here (on the CPU: the same values to float rounding) the one made without them. Responses
    that show no blob anywhere give another reading: the worker uses what it is given."""
    from monailabel_app import map_processes
    from monailabel_app.grounding import film_extent
    from monailabel_app.io.xray import pixel_spacing_mm

    films = [Radiograph(make_phantom(s).image, Geometry.plain(*make_phantom(s).image.shape)) for s in (2, 14)]
    gens = [reader.read(f, max_new_tokens=48).generation for f in films]
    blobs = film_extent.film_blob_responses([f.pixels for f in films], [pixel_spacing_mm(f)[0] for f in films], "cpu",
                                       host=map_processes.shared_empty)
    none = [film_extent.BlobResponses(b.radii, torch.zeros_like(b.stack)) for b in blobs]
    pool = map_processes.MapProcesses(reader.info, reader.grid, 1)
    try:
        there = [pool.remap(f, g, b).result()[0] for f, g, b in zip(films, gens, blobs)]
        blind = [pool.remap(f, g, b).result()[0] for f, g, b in zip(films, gens, none)]
    finally:
        pool.shutdown()
    for f, g, b, n, got, got_blind in zip(films, gens, blobs, none, there, blind):
        for with_, here in ((got, reader.remap(f, g, blobs=b)), (got, reader.remap(f, g)),
                            (got_blind, reader.remap(f, g, blobs=n))):
            assert with_.extras == here.extras and np.array_equal(with_.labels, here.labels)
            assert all(np.array_equal(x, y) for x, y in zip(with_.mask_maps, here.mask_maps))
    assert any(e.get("extent") == "image" for r in there for e in r.extras)
    assert [r.extras for r in blind] != [r.extras for r in there]


def test_readings_handed_over_as_they_are_made_equal_the_list(reader):
    """read_many's on_reading gets each study's reading once, as the list would hold it (maps in threads
    here); a failing hand-over raises after the other studies are handed over."""
    films = [Radiograph(make_phantom(s).image, Geometry.plain(*make_phantom(s).image.shape)) for s in (3, 8, 21)]
    listed = reader.read_many(films, batch_size=2, max_new_tokens=32)
    got: dict = {}
    assert reader.read_many(films, batch_size=2, max_new_tokens=32, on_reading=got.__setitem__) == [None] * 3
    assert sorted(got) == [0, 1, 2]
    for a, b in zip(listed, (got[i] for i in range(3))):
        assert a.report == b.report and a.extras == b.extras and np.array_equal(a.labels, b.labels)
        assert b.latencies["new_tokens"] == a.latencies["new_tokens"] and b.question == a.question

    def refuse_the_second(i, reading):
        if i == 1:
            raise OSError("disk full")
        got[i] = "again"

    with pytest.raises(OSError, match="disk full"):
        reader.read_many(films, batch_size=2, max_new_tokens=32, on_reading=refuse_the_second)
    assert got[0] == got[2] == "again"


def test_a_batch_that_fails_to_generate_raises_after_the_batches_before_are_handed_over(reader, monkeypatch):
    """The second batch's generation fails: the first batch's readings (made in a map process) are all handed
    over before read_many raises, so a caller never gets one after it has moved on."""
    from monailabel_app import map_processes

    films = [Radiograph(make_phantom(s).image, Geometry.plain(*make_phantom(s).image.shape)) for s in (3, 8, 21)]
    generate, calls, got = reader._generate, [], {}

    def second_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory in the second batch")
        return generate(*args, **kwargs)

    monkeypatch.setenv(map_processes.ENV, "1")
    monkeypatch.setattr(reader, "_generate", second_fails)
    try:
        with pytest.raises(RuntimeError, match="second batch"):
            reader.read_many(films, batch_size=2, max_new_tokens=24, on_reading=got.__setitem__)
        assert sorted(got) == [0, 1] and reader._map_processes is not None
    finally:
        if reader._map_processes is not None:
            reader._map_processes.shutdown()
            reader._map_processes = None


def _blocks() -> set:
    import os

    from monailabel_app.grounding import shared_blocks

    return {n for n in os.listdir(shared_blocks.SHM_DIR) if n.startswith("medgemma-")} \
        if os.path.isdir(shared_blocks.SHM_DIR) else set()


def test_a_readings_arrays_cross_in_one_shared_block_and_leave_none_behind(reader):
    """A worker packs a reading's image-sized arrays into one block of shared memory; the caller's arrays are
    the same values, shapes and types, writable, and the block's name is gone once they are taken (its memory
    goes with the last array). Without shared memory the arrays go by pipe, unchanged."""
    import copy
    import pickle

    from monailabel_app import map_processes

    film = Radiograph(make_phantom(5).image, Geometry.plain(*make_phantom(5).image.shape))
    reading = reader.read(film, max_new_tokens=48)
    before = _blocks()
    sent = copy.copy(reading)
    sent.study = sent.generation = None  # (as a worker sends it: the caller has them)
    sent, block = map_processes._pack(sent)
    if block is None:
        pytest.skip("no shared memory here")
    assert block[0] in _blocks() - before
    assert all(not isinstance(v, np.ndarray) for name in map_processes.SHARED_FIELDS
               for v in (getattr(sent, name) if isinstance(getattr(sent, name), list) else [getattr(sent, name)]))
    assert len(pickle.dumps(sent)) < 50_000  # places, not the arrays
    got = map_processes._unpack(pickle.loads(pickle.dumps(sent)), block)
    assert _blocks() == before
    for name in map_processes.SHARED_FIELDS:
        x, y = getattr(reading, name), getattr(got, name)
        for u, v in zip(*((x, y) if isinstance(x, list) else ([x], [y]))):
            assert v.dtype == u.dtype and v.shape == u.shape and np.array_equal(u, v) and v.flags.writeable
    was = int(reading.labels[0, 0])
    got.labels[0, 0] = was + 1  # (the caller may write; the worker's arrays were copied)
    assert got.labels[0, 0] == was + 1 and reading.labels[0, 0] == was


def test_shared_blocks_go_back_to_the_workers_and_are_removed_when_not_wanted():
    """A block whose last array goes is given back (up to ``keep`` waiting) and taken again for a reading that
    fits, a smaller one passed over and put back; beyond ``keep``, or once closed, blocks are removed; a block a
    reading still holds at closing is removed when the reading goes. A reused block carries the new reading."""
    import queue

    from monailabel_app.grounding import shared_blocks

    before = _blocks()
    back = shared_blocks.Returned(queue.Queue(), keep=1)
    first = shared_blocks.take(back.queue, 4096)
    if first is None:
        pytest.skip("no shared memory here")
    name, capacity, mapping = first
    np.frombuffer(mapping, np.uint8)[:] = 1
    mapping.close()
    arrays = np.frombuffer(back.lend(name, capacity), np.uint8)
    assert back.queue.qsize() == 0 and arrays[0] == 1
    del arrays
    gc.collect()
    assert back.queue.queue[0] == (name, capacity)  # given back
    bigger = shared_blocks.take(back.queue, 8192)  # too small: passed over, put back
    assert bigger[0] != name and back.queue.queue[0] == (name, capacity)
    again = shared_blocks.take(back.queue, 1000)
    assert again[0] == name and again[1] == capacity and back.queue.qsize() == 0  # taken again
    again[2].close()
    bigger[2].close()
    held = np.frombuffer(back.lend(name, capacity), np.uint8)
    idle = np.frombuffer(back.lend(bigger[0], bigger[1]), np.uint8)
    del idle
    gc.collect()
    assert back.queue.qsize() == 1 and bigger[0] in _blocks()  # one waiting (keep=1)
    extra = shared_blocks.take(None, 64)
    extra[2].close()
    gone = np.frombuffer(back.lend(extra[0], extra[1]), np.uint8)
    del gone
    gc.collect()
    assert extra[0] not in _blocks() and back.queue.qsize() == 1  # beyond keep: removed
    back.close()
    assert bigger[0] not in _blocks() and name in _blocks()  # the idle one removed, the held one kept
    del held
    gc.collect()
    assert _blocks() == before
    at_exit = shared_blocks.Returned(queue.Queue(), keep=1)  # at exit: held blocks removed too, still readable
    name, capacity, mapping = shared_blocks.take(None, 4096)
    mapping.write(b"kept")
    mapping.close()
    held = np.frombuffer(at_exit.lend(name, capacity), np.uint8)
    at_exit.close(held_too=True)
    assert _blocks() == before and bytes(held[:4]) == b"kept"


def test_a_reused_block_carries_the_new_reading(reader):
    import copy
    import queue

    from monailabel_app import map_processes
    from monailabel_app.grounding import shared_blocks

    back = shared_blocks.Returned(queue.Queue(), keep=2)
    readings = [reader.read(Radiograph(make_phantom(s).image, Geometry.plain(*make_phantom(s).image.shape)),
                            max_new_tokens=48) for s in (7, 9)]
    size = lambda r: sum(a.nbytes for a in r.heatmaps + r.mask_maps + r.model_inputs) + r.labels.nbytes  # noqa: E731
    readings.sort(key=size, reverse=True)  # the second fits in the first's block
    assert size(readings[0]) != size(readings[1]) or not np.array_equal(readings[0].labels, readings[1].labels)
    names = []
    for reading in readings:
        sent = copy.copy(reading)
        sent.study = sent.generation = None
        sent, block = map_processes._pack(sent, back.queue)
        if block is None:
            pytest.skip("no shared memory here")
        names.append(block[0])
        got = map_processes._unpack(sent, block, back)
        assert all(np.array_equal(u, v) for u, v in zip(reading.heatmaps, got.heatmaps))
        assert np.array_equal(reading.labels, got.labels)
        del got, sent  # (the same reading: its arrays were put back in place)
        gc.collect()
    assert names[0] == names[1]  # the second reading came in the first's block
    back.close()
    assert names[0] not in _blocks()


@pytest.mark.parametrize("lacking", ["shared memory", "room in it", "leave to write there"])
def test_a_reading_goes_by_pipe_without_shared_memory(reader, monkeypatch, tmp_path, lacking):
    """No shared memory, no leave to write there, or too little left in it (its pages are reserved before they
    are written: writing past a full /dev/shm would kill the worker): the arrays go by pipe, and no block is
    left behind."""
    import copy
    import errno
    import os

    from monailabel_app import map_processes
    from monailabel_app.grounding import shared_blocks

    film = Radiograph(make_phantom(6).image, Geometry.plain(*make_phantom(6).image.shape))
    reading = reader.read(film, max_new_tokens=32)
    before = _blocks()
    if lacking == "shared memory":
        monkeypatch.setattr(shared_blocks, "SHM_DIR", str(tmp_path / "none"))
    elif lacking == "room in it":
        def full(fd, offset, size):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(os, "posix_fallocate", full)
    else:
        def refused(path, flags, mode=0o777):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        monkeypatch.setattr(os, "open", refused)
    sent, block = map_processes._pack(copy.copy(reading))
    assert block is None and map_processes._unpack(sent, block) is sent and _blocks() == before
    assert np.array_equal(sent.labels, reading.labels) and sent.heatmaps[0] is reading.heatmaps[0]


def test_map_workers_run_at_the_niceness_asked_for(reader, monkeypatch):
    """MEDGEMMA_MAP_PROCESS_NICE lowers the workers' priority below this process's (0 by default); values
    outside 0-19 are refused with the variable's name."""
    import os

    from monailabel_app import map_processes

    assert map_processes.niceness() == 0
    for bad in ("-1", "20", "low"):
        monkeypatch.setenv(map_processes.NICE_ENV, bad)
        with pytest.raises(ValueError, match=map_processes.NICE_ENV):
            map_processes.niceness()
    here = os.getpriority(os.PRIO_PROCESS, 0)
    for nice in (0, 3):
        monkeypatch.setenv(map_processes.NICE_ENV, str(nice))
        pool = map_processes.MapProcesses(reader.info, reader.grid, 1)
        try:
            assert pool._pool.submit(os.getpriority, os.PRIO_PROCESS, 0).result() == min(19, here + nice)
        finally:
            pool.shutdown()


def test_map_process_count():
    from monailabel_app.map_processes import workers_for

    assert workers_for(torch.device("cuda"), 16) == 15 and workers_for(torch.device("cuda"), 64) == 15
    assert workers_for(torch.device("cuda"), 2) == 0 and workers_for(torch.device("cpu"), 16) == 0


def test_where_map_processes_map(monkeypatch):
    from monailabel_app.map_processes import DEVICE_ENV, device_for

    cuda = torch.device("cuda", 0)
    assert device_for(cuda).type == "cpu"  # the default: the workers' CPUs
    monkeypatch.setenv(DEVICE_ENV, "cuda")
    assert device_for(cuda) == cuda and device_for(torch.device("cpu")).type == "cpu"  # no GPU: the CPU
    monkeypatch.setenv(DEVICE_ENV, "tpu")
    with pytest.raises(ValueError, match="cpu or cuda"):
        device_for(cuda)


def test_blobs_made_ahead_unless_switched_off(monkeypatch):
    from monailabel_app.map_processes import BLOBS_AHEAD_ENV, blobs_ahead

    monkeypatch.delenv(BLOBS_AHEAD_ENV, raising=False)
    assert blobs_ahead()
    monkeypatch.setenv(BLOBS_AHEAD_ENV, "0")
    assert not blobs_ahead()
    monkeypatch.setenv(BLOBS_AHEAD_ENV, "yes")
    with pytest.raises(ValueError, match="0 or 1"):
        blobs_ahead()


@pytest.mark.parametrize("seed", [1, 7, 11, 42])  # (seed 23: the model names the wrong zone in Chinese)
def test_reading_a_phantom_in_chinese(reader_in, seed):
    """A Chinese question gets the Chinese report ("右肺中野见结节。"), its findings with masks on the same
    side as the English reading's, and the structured report in Chinese."""
    from monailabel_app.language.report import format_findings

    ph = make_phantom(seed)
    zh = _read(reader_in, ph.image, question="请描述这张胸片的异常")
    en = _read(reader_in, ph.image)
    assert zh.language == zh.answer_language == "zh" and zh.report == format_findings(ph.findings, "zh")
    assert [(f.kind, f.side, f.level) for f in zh.findings] == [(f.kind, f.side, f.level) for f in en.findings]
    for k in range(1, len(zh.findings) + 1):
        cols_zh, cols_en = np.nonzero(zh.labels == k)[1], np.nonzero(en.labels == k)[1]
        assert len(cols_zh) and (cols_zh.mean() < ph.image.shape[1] / 2) == (cols_en.mean() < ph.image.shape[1] / 2)
    s = zh.result_json()["structured_report"]
    assert s["language"] == "zh" and s["sections"][0]["title"] == "影像所见" and s["sections"][1]["title"] == "诊断意见"
    lines = s["sections"][1]["lines"]
    assert sorted(line["label"] for line in lines) == list(range(1, len(zh.findings) + 1))
    assert all(line["segment"] == zh.names[line["label"] - 1] and "见" in line["text"] for line in lines)


def test_the_answer_language_is_asked_for_or_the_questions(reader):
    ph = make_phantom(11)
    cases = {  # (question, language) -> (asked language, answer has Chinese)
        (None, "auto"): ("en", False), (None, "zh"): ("zh", True), ("请描述这张胸片的异常", "auto"): ("zh", True),
        ("请描述这张胸片的异常", "en"): ("en", False), ("What are the findings?", "zh"): ("zh", True),
    }
    for (question, language), (asked, chinese) in cases.items():
        r = _read(reader, ph.image, question=question, language=language)
        assert r.language == asked and (r.answer_language == "zh") == chinese, (question, language, r.report)
        assert r.findings and r.result_json()["structured_report"]["language"] == asked
    with pytest.raises(InputError, match="'language' must be one of"):
        _read(reader, ph.image, language="fr")


def test_chinese_zone_accuracy_on_held_out_phantoms(reader):
    """The bilingual phantom model names the lesion's zone in Chinese (>= 0.95 of the 201 lesions of seeds
    0..149; measured 0.955, English 0.970: bench/results/grounding_zh.md)."""
    films = [make_phantom(seed) for seed in range(150)]
    readings = reader.read_many([Radiograph(ph.image, Geometry.plain(*ph.image.shape)) for ph in films],
                                language="zh", batch_size=16)  # 192 of 201, as read one by one
    hit = total = 0
    for ph, r in zip(films, readings):
        named = {(f.side, f.level) for f in r.findings}
        for les in ph.lesions:
            total += 1
            hit += (les.side, les.level) in named
    assert total == 201 and hit / total >= 0.95


def test_a_studys_anatomy_is_found_while_the_model_reads_it(reader, monkeypatch):
    """The reader starts a study's anatomy (lung fields; a CT's body and lungs) before it generates, in the
    background, and its maps read that same result after it: found once, while the model runs. Each image keeps
    its own: a second film between two reads of the first never hands the first one the second's fields."""
    from monailabel_app.grounding import anatomy
    from monailabel_app.phantoms import ct as ct_phantoms

    film = make_phantom(4)
    radiograph = Radiograph(film.image, Geometry.plain(*film.image.shape))
    volume = ct_phantoms.phantom_volume(ct_phantoms.make_ct_phantom(2))
    calls, started = [], []
    for name in ("xray_lung_fields", "ct_body_and_lungs"):
        real = getattr(anatomy, name)
        monkeypatch.setattr(anatomy, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    generate = reader._generate

    def watched(*args, **kwargs):  # what is under way when the model starts
        started.append({name: kept[0] for name, kept in reader._anatomy.items()})
        return generate(*args, **kwargs)

    monkeypatch.setattr(reader, "_generate", watched)
    reader.forget_anatomy()
    first = reader.read(radiograph)
    ct = reader.read(volume)
    assert started[0]["xray"] is radiograph.pixels and started[1]["ct"] is volume.hu
    assert calls == ["xray_lung_fields", "ct_body_and_lungs"]  # once each: the maps used the early result
    assert reader._lung_fields(radiograph.pixels) is reader._lung_fields(radiograph.pixels)
    other = make_phantom(9).image
    assert reader._lung_fields(other) is not None and calls[-1] == "xray_lung_fields"
    again = reader.remap(radiograph, first.generation)  # its own fields again, not the other film's
    assert np.array_equal(again.labels, first.labels) and len(calls) == 4
    body, lungs = reader._ct_anatomy(volume)
    assert body.shape == lungs.shape == volume.shape and lungs.any() and len(calls) == 4
    assert ct.labels.any()
    # a failed anatomy is not kept: the next reading of that image tries again
    monkeypatch.setattr(anatomy, "xray_lung_fields", lambda *a: (_ for _ in ()).throw(MemoryError("no room")))
    odd = np.ascontiguousarray(other[::-1])
    with pytest.raises(MemoryError):
        reader._lung_fields(odd)
    monkeypatch.setattr(anatomy, "xray_lung_fields", lambda *a: "fields")
    assert reader._lung_fields(odd) == "fields"


ANSWER_WITH_TAIL = ("Nodule in the right middle zone. Opacity in the left lower zone. Effusion in the right lower zone."
                    + " The heart is normal." * 4)


def test_a_films_findings_are_mapped_while_the_model_writes(reader, monkeypatch):
    """Findings whose sentences are complete before the answer ends are mapped beside the decode and the
    reading takes those results: the same grids, heatmaps, gated maps, masks and extras as maps made after
    the answer (exact: the same attention rows, rolled out the same)."""
    from monailabel_app import reader as reader_mod
    from monailabel_app.grounding.study_maps import FilmMaps

    image = make_phantom(20011).image
    monkeypatch.setenv(reader_mod.MAPS_WHILE_DECODING_ENV, "0")
    after = _read(reader, image, answer=ANSWER_WITH_TAIL)
    assert after.maps_ahead == 0 and len(after.findings) == 3
    monkeypatch.setenv(reader_mod.MAPS_WHILE_DECODING_ENV, "1")
    made = []
    real = FilmMaps._finding
    monkeypatch.setattr(FilmMaps, "_finding", lambda self, f, *a: made.append(f.kind) or real(self, f, *a))
    ahead = _read(reader, image, answer=ANSWER_WITH_TAIL)
    assert ahead.maps_ahead == ahead.latencies["maps_ahead"] == 3 and sorted(made) == ["effusion", "nodule", "opacity"]
    assert ahead.report == after.report and ahead.extras == after.extras
    assert np.array_equal(ahead.labels, after.labels) and ahead.labels.any()
    for name in ("grids", "heatmaps", "mask_maps"):
        assert all(np.array_equal(a, b) for a, b in zip(getattr(ahead, name), getattr(after, name))), name
    monkeypatch.setenv(reader_mod.MAPS_WHILE_DECODING_ENV, "maybe")
    with pytest.raises(ValueError, match="MEDGEMMA_MAPS_WHILE_DECODING"):
        _read(reader, image)


def test_a_ct_readings_slices_are_timed_apart_from_its_maps(reader, monkeypatch):
    """A CT's slices, made for the model before it generates, are their own stage (``latencies.slices``: once
    counted as maps); the stages add up to the total. A film has none."""
    from monailabel_app import reader as reader_mod
    from monailabel_app.phantoms import ct as ct_phantoms

    volume = ct_phantoms.phantom_volume(ct_phantoms.make_ct_phantom(2))
    made = reader_mod.model_slices

    def slow(*args, **kwargs):  # a slow slicing: the reading's maps stay the same
        time.sleep(0.5)
        return made(*args, **kwargs)

    monkeypatch.setattr(reader_mod, "model_slices", slow)
    t0 = time.perf_counter()
    lat = reader.read(volume).latencies
    wall = time.perf_counter() - t0
    assert lat["maps"] <= wall - lat["prepare"] - lat["generate"] - 0.5, (lat, wall)  # not in the maps'
    assert lat["slices"] >= 0.5 and lat["total"] <= wall, (lat, wall)
    parts = ("load_image", "slices", "prepare", "generate", "maps")
    assert abs(sum(lat[k] for k in parts) - lat["total"]) < 1e-3, lat
    assert "slices" not in reader.read(Radiograph(make_phantom(4).image, Geometry.plain(*make_phantom(4).image.shape))
                                       ).latencies


def test_a_reading_says_whether_its_maps_or_its_answer_ended_last(reader, monkeypatch):
    """Reading.maps_ready_lead: from the maps started while the model wrote being all made to the answer's end.
    Findings held up for a second are made after the answer (a negative lead, within the reading's time after the
    answer); none started (maps after the answer): None, and no latency."""
    import time

    from monailabel_app import reader as reader_mod
    from monailabel_app.grounding.study_maps import FilmMaps

    image = make_phantom(20011).image
    monkeypatch.setenv(reader_mod.MAPS_WHILE_DECODING_ENV, "0")
    after = _read(reader, image, answer=ANSWER_WITH_TAIL)
    assert after.maps_ready_lead is None and "maps_ready_lead" not in after.latencies
    monkeypatch.setenv(reader_mod.MAPS_WHILE_DECODING_ENV, "1")
    real = FilmMaps._finding
    monkeypatch.setattr(FilmMaps, "_finding", lambda self, *a: time.sleep(1.0) or real(self, *a))
    late = _read(reader, image, answer=ANSWER_WITH_TAIL)
    assert late.maps_ahead == 3 and late.latencies["maps_ready_lead"] == round(late.maps_ready_lead, 4)
    assert -late.latencies["maps"] - 0.05 <= late.maps_ready_lead < 0, late.latencies


def test_maps_made_while_writing_are_taken_only_for_the_same_finding(reader):
    """A finding is mapped early only once its sentence is complete, and its early result is taken only when
    the final answer reads the same finding on the same token rows: a finding whose words the final answer
    reads otherwise (here: another side) is mapped anew. The decode loop never waits for the rows: they are
    taken in a thread of their own. A failure while the model writes never reaches the decode."""
    import dataclasses
    from concurrent.futures import Future

    from monailabel_app.grounding.study_maps import FilmMaps
    from monailabel_app.io.xray import pad_to_square
    from monailabel_app.language.findings import read_answer
    from monailabel_app.model.generation import Partial

    image = make_phantom(20011).image
    radiograph = Radiograph(image, Geometry.plain(*image.shape))
    gen = reader.read(radiograph, answer=ANSWER_WITH_TAIL).generation
    settings = reader.info.grounding
    cut = ANSWER_WITH_TAIL.index("left lo") + len("left lo")  # the second sentence still being written
    n = sum(1 for end in gen.token_ends if end <= cut)
    text = gen.text[: gen.token_ends[n - 1]]
    partial = dataclasses.replace(gen, text=text, token_ids=gen.token_ids[:n], token_ends=gen.token_ends[:n],
                                  attention=gen.attention[:n])
    film = FilmMaps(reader, radiograph, pad_to_square(image)[1])
    rows_copied = threading.Event()  # the rows of the answer so far: not yet off the device
    film.ahead(Partial(text, lambda: rows_copied.wait(60) and partial), settings)
    assert not film.started  # the decode loop is back: the rows are taken, and the maps started, beside it
    rows_copied.set()
    film._started()
    assert [key[0] for key in film.started] == ["nodule"]  # not the opacity: its sentence is not complete
    nodule = read_answer(gen.text).findings[0]
    rows = gen.token_range(nodule.span)
    early = film.started[film.key(nodule, rows, gen, settings)].result()
    assert film.finding(nodule, rows, gen, settings) is early and film.reused == 1
    key = film.key(nodule, rows, gen, settings)
    labels, extras = film.finish([key], [early])  # the label map of the findings so far: the nodule alone
    assert np.array_equal(labels, early.region.astype(np.uint8)) and extras == [early.info]
    assert film.started_labels[(key,)].result()[0] is labels
    film.latest_labels = (key, key)  # a label map of more findings started meanwhile: this one gives way
    assert film._finish_started((key,), [film.started[key]]) is None
    for outcome in ("given up", "failed"):  # the answer's findings were these after all: made now
        film.started_labels[(key,)] = gone = Future()
        gone.set_result(None) if outcome == "given up" else gone.set_exception(RuntimeError("failed"))
        again, _ = film.finish([key], [early])
        assert again is not labels and np.array_equal(again, labels)
    other = dataclasses.replace(nodule, side="left")
    fresh = film.finding(other, rows, gen, settings)
    assert fresh is not early and film.reused == 1 and not fresh.gated[:, : image.shape[1] // 2].any()
    film.ahead(Partial(gen.text, lambda: 1 / 0), settings)  # logged, not raised
    film._started()


@pytest.mark.parametrize("while_decoding", ["0", "1"])
def test_a_reading_leaves_nothing_to_the_cyclic_collector(reader, monkeypatch, while_decoding):
    """A reading's arrays go when the reading goes: none is held in a reference cycle, which only Python's
    cyclic collector frees, late (it counts no arrays). A CT search's failed candidates once left about 200 MB a
    reading so (twenty readings of a real CT grew the process from 4.9 to 9.2 GB), and a decoder dropped from the
    cache its KV cache; a label map started while the model wrote and given up for a later one (more findings)
    once held its study's maps through its exception's frames (1.26 GB a reading of the real CT, mapped while the
    model wrote: the heap grew, and a GPU's decode beside the next maps slowed with the page faults). Films and
    CTs, the model's answers and given ones (kinds whose searches fail), maps made after the answer or while the
    model writes (its CT's three findings: two label maps given up), one by one and in batches."""
    from monailabel_app import reader as reader_mod
    from monailabel_app.grounding.study_maps import StudyMaps
    from monailabel_app.phantoms import ct as ct_phantoms

    monkeypatch.setenv(reader_mod.MAPS_WHILE_DECODING_ENV, while_decoding)
    given_up, answered = [], set()
    finish_started, mapped = StudyMaps._finish_started, reader_mod.Reader._mapped

    def counted(self, keys, made):  # a label map started while the model wrote waits for a later one or the
        for _ in range(3000):  # answer's end, so that every one but the last is given up at any speed
            if keys != self.latest_labels or id(self) in answered:
                break
            time.sleep(0.01)
        labels = finish_started(self, keys, made)
        given_up.append(labels is None)
        return labels

    def answered_then_mapped(self, study, *args):
        answered.add(id(study))
        return mapped(self, study, *args)

    monkeypatch.setattr(StudyMaps, "_finish_started", counted)
    monkeypatch.setattr(reader_mod.Reader, "_mapped", answered_then_mapped)
    # and what a CT's findings share made beside the model, as a GPU reader does
    monkeypatch.setattr(reader_mod.Reader, "_makes_shared_ahead", lambda self: while_decoding == "1")

    film = make_phantom(4)
    radiograph = Radiograph(film.image, Geometry.plain(*film.image.shape))
    volume = ct_phantoms.phantom_volume(ct_phantoms.make_ct_phantom(2))
    given = "Nodule in the right upper lobe. Mass in the left lower lobe. Effusion in the right lower lobe."
    studies = [(radiograph, None), (volume, None), (volume, given)]
    batch = [radiograph, volume, radiograph]  # and a batch (read_many: its maps made batch by batch)
    for study, answer in studies:  # first readings: imports and caches made once
        reader.read(study, answer=answer)
    reader.read_many(batch, batch_size=2)
    gc.collect()
    gc.disable()
    try:
        for study, answer in studies:
            reading = reader.read(study, answer=answer)
            assert reading.labels.any()
            del reading
        readings = reader.read_many(batch, batch_size=2)
        assert all(r.labels.any() for r in readings)
        del readings
        gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector finds is kept in gc.garbage, to be looked at
        gc.collect()
        # transformers' BatchFeature.to leaves a small closure cycle per batch (no arrays): not counted
        held = [o for o in gc.garbage if isinstance(o, (types.FrameType, BaseException, torch.Tensor))
                or type(o).__module__.startswith("monailabel_app")]
        assert not held, [type(o).__name__ + (f" {o.f_code.co_name}" if isinstance(o, types.FrameType) else "")
                          for o in held]
        assert given_up.count(True) >= (while_decoding == "1") and (while_decoding == "1") == bool(given_up)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU memory: GPU only")
def test_readings_and_batches_in_turn_leave_no_gpu_memory_behind(reader):
    """Films, a CT and batches read in turn, four rounds, on the GPU reader: from the second round on, the
    allocated memory is the same after every round. Each batch's own threads (read_many makes its pools anew) map
    on streams of their own (:func:`maps.side_stream`, one per thread): a stream that runs a matrix product gets a
    32 MiB cuBLAS workspace that torch keeps for the process, as the decoders' new streams did (run CN)."""
    from monailabel_app.phantoms import ct as ct_phantoms

    assert reader.maps_device.type == "cuda"
    film = make_phantom(4)
    radiograph = Radiograph(film.image, Geometry.plain(*film.image.shape))
    volume = ct_phantoms.phantom_volume(ct_phantoms.make_ct_phantom(2))
    after = []
    for _ in range(4):  # (each reading dropped once made, as a server drops it once answered)
        reader.read(radiograph)
        reader.read(volume)
        reader.read_many([radiograph, volume, radiograph], batch_size=2)
        gc.collect()
        torch.cuda.synchronize()
        after.append(torch.cuda.memory_allocated())
    assert max(after[1:]) - min(after[1:]) < 4 << 20, [a / 2**20 for a in after]  # MiB: under one workspace
