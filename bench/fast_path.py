#!/usr/bin/env python
"""The project's GPU path next to plain transformers ``generate``, in one run on one card.

    python bench/fast_path.py [--only speed,batch,job,precision,restart,phantom,profile,prefill,decode,searches] [--out bench/results/fast_path.md]

MedGemma-4B shapes with random weights (``bench/medgemma_shapes.py``: built from config, no download),
bf16, 200 new tokens. Both paths are made to say the same 200-token report (the project path by teacher
forcing, ``Reader.read(answer=...)``; plain ``generate`` with ``min_new_tokens``), so they do the same
decode work; the project path also computes every finding's heatmap and mask.

* **speed**: one chest X-ray (a 2048 x 2458 phantom film) and one CT (a 200 x 512 x 512 phantom volume,
  85 slices shown, 21,000+ prompt tokens): prefill, ms per decode token, end to end, peak GPU memory
  above the weights; the project path with and without attention capture (its cost).
* **batch**: X-ray throughput at batch 1, 8, 32 (``Reader.read_many``), generation alone and with masks.
* **job** (only when asked for): the curation job itself (``batch.run_local``, what ``medgemma-label batch``
  runs) on phantom films written as PNG files: decode batches two at a time, every output written.
* **precision**: the same X-ray reading in fp32, bf16, fp16, int8 (torchao weight-only, and bitsandbytes),
  int4 (bitsandbytes NF4), loaded through ``load_model`` from a saved folder: latency, peak memory, and the
  share of 64 freely generated tokens equal to bf16's; plus int8 (torchao) against bf16 on the phantom model.
* **restart**: a server's start as a new process (load the saved folder, warm up the X-ray shape with
  ``torch.compile``, answer one X-ray) twice: with an empty compile cache and with the cache the first left.
* **profile** (only when asked for): one reading per study under torch.profiler (the CUDA kernels) and its
  maps under cProfile.
* **prefill** (only when asked for): each study's prefill, its wall time against its GPU kernel time and
  launches, its host operators and its kernels; ``--prefill-chunks 1024,0`` compares a long prompt's
  prefill in chunks of query rows with the dense one (also in the speed part).
* **decode** (only when asked for): the kernels of one reading's decode steps alone, per step.
* **searches** (only when asked for): the CT's findings' image-extent searches on the host's CPU, one after
  another, in threads and in worker processes (``--search-workers``), and where one round's time goes.
* **phantom**: the phantom model in each precision against fp32 on held-out phantoms: finding text
  exact match, mask Dice, pointing game.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import statistics
import sys
import tempfile
import time
import contextlib
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from medgemma_shapes import build, global_layers, grounding, save  # noqa: E402

from monailabel_app import map_processes  # noqa: E402
from monailabel_app.grounding import helper_processes, maps  # noqa: E402
from monailabel_app.io.xray import Geometry, Radiograph  # noqa: E402
from monailabel_app.model import decoding, prefill_attention  # noqa: E402
from monailabel_app.model.capture import CAPTURE_ATTN  # noqa: E402
from monailabel_app.model.decoding import prefill_and_decode  # noqa: E402
from monailabel_app.model.generation import build_inputs  # noqa: E402
from monailabel_app.model.loading import ModelInfo  # noqa: E402
from monailabel_app.phantoms.ct import make_ct_phantom, phantom_volume  # noqa: E402
from monailabel_app.phantoms.films import make_phantom  # noqa: E402
from monailabel_app.phantoms.model import CT_QUESTION, DEFAULT_QUESTION  # noqa: E402
from monailabel_app.reader import MAPS_WHILE_DECODING_ENV, WARM_UP_ANSWERS, Reader  # noqa: E402

NEW = 200
# the findings said (the start of each 200-token report): the ones a server's warm-up maps
XRAY_FINDINGS, CT_FINDINGS = WARM_UP_ANSWERS["xray"], WARM_UP_ANSWERS["ct"]
LINES: list[str] = []


def emit(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def sync() -> None:
    torch.cuda.synchronize()


def xray(seed: int, rows: int = 2458, cols: int = 2048) -> Radiograph:
    img = Image.fromarray(make_phantom(seed).image).resize((cols, rows), Image.BILINEAR)
    return Radiograph(np.asarray(img), Geometry.plain(rows, cols))


def ct(seed: int, shape=(200, 512, 512)):
    from dataclasses import replace

    from scipy import ndimage

    ph = make_ct_phantom(seed)
    factors = [n / m for n, m in zip(shape, ph.hu.shape)]
    hu = ndimage.zoom(ph.hu.astype(np.float32), factors, order=1)
    spacing = tuple(s / f for s, f in zip(ph.spacing, factors[::-1]))
    return phantom_volume(replace(ph, hu=hu, spacing=spacing))


def report(tokenizer, findings: str, n: int = NEW) -> str:
    """``findings`` padded with a normal sentence to exactly ``n`` tokens with the end of turn."""
    filler = " The cardiomediastinal silhouette is within normal limits."
    ids = tokenizer(findings, add_special_tokens=False)["input_ids"]
    more = tokenizer(filler, add_special_tokens=False)["input_ids"]
    while len(ids) < n - 1:
        ids += more
    for cut in range(n - 1, n - 20, -1):
        text = tokenizer.decode(ids[:cut])
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) == n - 1:
            return text
    raise RuntimeError("cannot make a report of exactly n tokens")


def reader_for(model, processor, precision: str) -> Reader:
    info = ModelInfo(id="medgemma-4b-shapes (random weights)", precision=precision, device="cuda",
                     precision_reason="benchmark", parameters=sum(p.numel() for p in model.parameters()),
                     grounding={**grounding(model.config), "source": "benchmark"})
    return Reader(model="medgemma-4b-shapes", loaded=(model, processor, info))


def plain_generate(model, inputs) -> dict:
    """The anchor: transformers ``generate``, SDPA attention, no capture, ``NEW`` tokens."""
    model.set_attn_implementation("sdpa")
    try:
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
            sync()
            t0 = time.perf_counter()
            model(**inputs, logits_to_keep=1)
            sync()
            prefill = time.perf_counter() - t0
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            out = model.generate(**inputs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
            sync()
            total = time.perf_counter() - t0
    finally:
        model.set_attn_implementation(CAPTURE_ATTN)
    assert out.shape[1] - inputs["input_ids"].shape[1] == NEW
    return {"prefill": prefill, "ms_token": 1000 * (total - prefill) / (NEW - 1), "total": total,
            "peak": torch.cuda.max_memory_allocated() - base, "tokens": inputs["input_ids"].shape[1]}


def fresh(study):
    """A copy of ``study`` with its own pixel array: the reader's anatomy cache does not know it (as for
    every new study in real use)."""
    from dataclasses import replace

    return replace(study, hu=study.hu.copy()) if hasattr(study, "hu") else replace(study, pixels=study.pixels.copy())


def project_read(reader, study, answer, runs: int = 3) -> dict:
    """The project path, end to end: preprocessing, generation with capture, maps and masks (anatomy
    found anew each time). Each reading is dropped once timed, as a server drops it once answered. A process's
    heap grows over its first CT readings, and their page faults slow the decode to 6-7 ms a token (runs CI, CJ);
    three readings kept at once made it grow further (on the 2-core VM with a 200-slice CT: to 13.1 GB over five
    readings, against 9.2 GB with each dropped, the faults stopping after the fifth either way)."""
    reader.read(study, answer=answer)  # warm-up (compiles and captures the decode step for this shape)
    got = []
    for _ in range(runs):
        copy = fresh(study)
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        r = reader.read(copy, answer=answer)
        sync()
        got.append((time.perf_counter() - t0, r.latencies, len(r.findings), torch.cuda.max_memory_allocated() - base,
                    resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults))
        del r, copy
    total, lat, findings, peak, faults = sorted(got, key=lambda g: g[0])[len(got) // 2]
    assert lat["new_tokens"] == NEW, lat
    return {"prefill": lat["decoder_prefill"], "ms_token": 1000 * lat["decoder_decode"] / lat["decoder_decode_steps"],
            "total": total, "peak": peak, "maps": lat["maps"], "prepare": lat["prepare"], "findings": findings,
            "slices": lat.get("slices", 0.0),
            "maps_ahead": lat.get("maps_ahead", 0), "maps_ahead_wait": lat.get("maps_ahead_wait", 0.0),
            "anatomy_wait": lat.get("anatomy_wait", 0.0), "ready_lead": lat.get("maps_ready_lead"),
            "host": {k: lat.get(f"decoder_decode_{k}", 0.0) for k in ("launch", "look", "callbacks", "rows")},
            "tokens": lat["prompt_tokens"], "faults": faults}


def slices_note(d) -> str:
    """A CT's slices made for the model (before its preprocessing; counted in its maps before 2026-12-06)."""
    return f"slices {d['slices']:.3f} s, " if d.get("slices") else ""


def lead_note(d) -> str:
    """When the maps started while decoding were all made, against the answer's end, as words for a row."""
    lead = d.get("ready_lead")
    if lead is None:
        return ""
    return f" (all made {abs(lead):.3f} s {'before' if lead >= 0 else 'after'} the answer ended)"


def host_note(d) -> str:
    """The decode loop's host seconds (launching replays, looking at tokens, the callbacks: the rows' copies
    and the findings' maps started) as words for a row."""
    h = d["host"]
    return (f"decode loop's host: launch {h['launch']:.3f} s, look {h['look']:.3f} s, callbacks {h['callbacks']:.3f} s "
            f"(the rows' copies {h['rows']:.3f} s)")


def capture_cost(reader, content, question, answer, rollout: bool, runs: int = 2) -> tuple[float, float]:
    """Generation seconds (prefill + decode) with the capture on the global layers, and with none; both
    as CUDA graphs without ``torch.compile`` (one compile per variant would cost minutes of the lease)."""
    model, proc = reader.model, reader.processor
    inputs = build_inputs(proc, content, question, None, model.device, model.dtype)
    tok = proc.tokenizer
    forced = [tok(answer, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<end_of_turn>")]]
    out = []
    for layers in (global_layers(model.config), []):
        times = []
        for _ in range(runs + 1):
            res = prefill_and_decode(model, inputs, layers, 256, NEW, rollout and bool(layers), forced, [],
                                     compile=False)
            times.append(res.seconds["prefill"] + res.seconds["decode"])
        out.append(statistics.median(times[1:]))
    return out[0], out[1]


def row(name, d) -> str:
    return (f"| {name} | {d['tokens']} | {d['prefill']:.3f} | {d['ms_token']:.2f} | {d['total']:.3f} | "
            f"{gib(d['peak'])} |")


def chunk_label(chunk: int, tokens: int) -> str:
    if tokens < prefill_attention.LONG:
        return ""
    return "; prefill dense" if chunk <= 0 else f"; prefill in chunks of {chunk} rows"


@contextmanager
def prefill_chunk(chunk: int | None):
    """The long prefills' chunk of query rows for the block (None: the library's own)."""
    kept = prefill_attention.CHUNK
    prefill_attention.CHUNK = kept if chunk is None else chunk
    try:
        yield prefill_attention.CHUNK
    finally:
        prefill_attention.CHUNK = kept


@contextmanager
def environment(name: str, value):
    """The environment variable ``name`` set to ``value`` for the block (None: unset)."""
    kept = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = str(value)
    try:
        yield
    finally:
        if kept is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = kept


@contextmanager
def helpers(count):
    """``count`` label and distance helper processes for the block (:mod:`helper_processes`; None: as they are);
    gives the number running in it."""
    kept = helper_processes.start(0)
    if count is not None:
        helper_processes.stop()
        helper_processes.start(count)
    try:
        yield helper_processes.start(0)
    finally:
        if count is not None:
            helper_processes.stop()
            helper_processes.start(kept)


@contextmanager
def switch_interval(ms):
    """The interpreter's switch interval ``ms`` for the block (None: as it is); gives the one in force, in ms."""
    kept = sys.getswitchinterval()
    if ms is not None:
        sys.setswitchinterval(ms / 1000)
    try:
        yield sys.getswitchinterval() * 1000
    finally:
        sys.setswitchinterval(kept)


def speed(model, processor, reader, modalities=("xray", "ct"), anchors: bool = True, chunks=(None,),
          aheads=(None,), helper_counts=(None,), switches=(None,)) -> None:
    """One study per modality: plain ``generate`` (the anchor), the project path with masks, and the capture's
    cost; ``anchors`` False: the project path alone (a short lease). ``chunks``: the long prefill's chunk
    settings to compare (:mod:`prefill_attention`; 0: dense); ``aheads``: the decode replays in flight to compare
    (:data:`decoding.AHEAD_ENV`; None: the library's own); ``helper_counts``: the label and distance helper
    processes to compare (None: the library's own); ``switches``: the interpreter's switch intervals (ms) to
    compare (None: Python's own)."""
    tok = processor.tokenizer
    film, volume = xray(7), ct(3)
    x_answer = report(tok, XRAY_FINDINGS)
    c_answer = report(tok, CT_FINDINGS)
    x_content = reader._content(film)
    c_content = reader._content(volume)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    emit(f"### One study, {NEW} new tokens, bf16 ({torch.cuda.get_device_name()}; weights {gib(weights)} GiB; "
         f"maps on {reader.maps_device})")
    emit()
    emit("| path | prompt tokens | prefill s | ms / decode token | end to end s | peak GiB above weights |")
    emit("|---|---|---|---|---|---|")
    cases = {"xray": ("X-ray", x_content, DEFAULT_QUESTION, film, x_answer),
             "ct": ("CT 85 slices", c_content, CT_QUESTION, volume, c_answer)}
    for name, content, q, study, answer in (cases[m] for m in modalities):
        if anchors:
            inputs = build_inputs(processor, content, q, None, model.device, model.dtype)
            emit(row(f"{name}: plain `generate` (anchor)", plain_generate(model, inputs)))
            del inputs
        gc.collect()
        torch.cuda.empty_cache()
        for chunk, ahead, count, ms in [(c, a, h, w) for c in chunks for a in aheads for h in helper_counts
                                        for w in switches]:
            with prefill_chunk(chunk) as c, environment(decoding.AHEAD_ENV, ahead), helpers(count) as running, \
                    switch_interval(ms) as switch:
                served = helper_processes.served()
                f = project_read(reader, study, answer)  # (its warm-up reading warms the helpers too)
                served = (helper_processes.served() - served) // 4  # per reading
                replays = decoding.replays_ahead(1, True, long=f["tokens"] >= prefill_attention.LONG)
            emit(row(f"{name}: project path, masks included ({f['findings']} findings; {replays} decode replays in "
                     f"flight; {running} helper processes, {served} calls to them a reading; switch interval "
                     f"{switch:g} ms; maps {f['maps']:.3f} s, "
                     f"{f['maps_ahead']} of them made while decoding{lead_note(f)}, {f['maps_ahead_wait']:.3f} s "
                     "waited for, "
                     f"{f['anatomy_wait']:.3f} s waited for the anatomy; {slices_note(f)}"
                     f"preprocessing {f['prepare']:.3f} s; peak with weights {gib(weights + f['peak'])} GiB"
                     f"{chunk_label(c, f['tokens'])}; {host_note(f)}; {f['faults']} page faults)", f))
        if f["maps_ahead"]:  # the same reading with every map made after the answer
            os.environ[MAPS_WHILE_DECODING_ENV] = "0"
            try:
                a = project_read(reader, study, answer)
            finally:
                del os.environ[MAPS_WHILE_DECODING_ENV]
            emit(row(f"{name}: the same, maps made after the answer ({MAPS_WHILE_DECODING_ENV}=0; maps "
                     f"{a['maps']:.3f} s; {host_note(a)})", a))
        if anchors:
            with_c, without = capture_cost(reader, content, q, answer, rollout=name.startswith("CT"))
            emit(f"| {name}: capture cost (graph, no compile) | | | | {with_c:.3f} vs {without:.3f} (no capture): "
                 f"**+{100 * (with_c / without - 1):.1f} %** | |")
        gc.collect()
        torch.cuda.empty_cache()
    emit()


def profile(model, processor, reader, modalities=("xray", "ct"), batch_of: int = 0) -> None:
    """Where a reading's time goes: the CUDA kernels of one reading (torch.profiler; the decode steps are
    CUDA graph replays) and the Python functions of its maps (cProfile, the top 25 by their own time);
    ``batch_of``: also the kernels of one ``read_many`` batch of that many films."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as kernels

    tok = processor.tokenizer
    cases = {"xray": (xray(7), report(tok, XRAY_FINDINGS)), "ct": (ct(3), report(tok, CT_FINDINGS))}
    for name in modalities:
        study, answer = cases[name]
        r = reader.read(study, answer=answer)  # warm-up: compiles and captures this shape
        with kernels(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            r = reader.read(fresh(study), answer=answer)
            sync()
        emit(f"### Profile: {name}, latencies {r.latencies}")
        emit()
        emit("```")
        emit(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))
        emit("```")
        t0 = time.perf_counter()
        reader.remap(fresh(study), r.generation)
        sync()
        pooled = time.perf_counter() - t0
        threads, maps.MAP_THREADS = maps.MAP_THREADS, 1  # cProfile sees one thread: the findings one by one
        try:
            py = cProfile.Profile()
            t0 = time.perf_counter()
            py.enable()
            reader.remap(fresh(study), r.generation)
            sync()
            py.disable()
            alone = time.perf_counter() - t0
        finally:
            maps.MAP_THREADS = threads
        emit(f"Maps: {pooled:.3f} s with {threads} map threads; {alone:.3f} s in one thread under cProfile "
             "(below: by own time, then by cumulative time)")
        emit()
        for order in ("tottime", "cumulative"):
            text = io.StringIO()
            pstats.Stats(py, stream=text).sort_stats(order).print_stats(30)
            emit("```")
            emit(text.getvalue()[-7000:])
            emit("```")
        emit()
    if batch_of:
        films = [xray(s) for s in range(batch_of)]
        answers = [report(tok, XRAY_FINDINGS)] * batch_of
        reader.read_many(films, answers=answers, batch_size=batch_of)  # warm-up
        with kernels(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            got = reader.read_many([fresh(f) for f in films], answers=answers, batch_size=batch_of)
            sync()
            total = time.perf_counter() - t0
        emit(f"### Profile: read_many of {batch_of} films, {total:.2f} s; first study's latencies {got[0].latencies}")
        emit()
        emit("```")
        emit(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))
        emit("```")
        emit()


def searches(reader, processor, workers=(3,), rounds: int = 3) -> None:
    """The CT's findings' image-extent searches (``ct_extent.find_in_ct``) on this host's CPU: recorded from one
    remap of the speed part's CT, then run one after another, in threads and in forked worker processes
    (``bench/ct_search_processes.py``), with one round's top functions."""
    import ct_search_processes

    study, answer = ct(3), report(processor.tokenizer, CT_FINDINGS)
    r = reader.read(study, answer=answer)  # warm-up: compiles and captures this shape
    copy = fresh(study)
    t0 = time.perf_counter()
    reader.remap(copy, r.generation)
    pooled = time.perf_counter() - t0
    with ct_search_processes.recording(copy.hu, copy.spacing):
        reader.remap(copy, r.generation)
    emit(f"### The CT's image-extent searches on the host's CPU (its remap: {pooled:.3f} s with "
         f"{maps.MAP_THREADS} map threads)")
    emit()
    for n in workers:
        ct_search_processes.compare(n, rounds, emit, profile=n == workers[-1])


def prefill(model, processor, reader, modalities=("xray",), runs: int = 5, chunks=(None,)) -> None:
    """Where a prefill's time goes: its wall time (the median of ``runs``, capture as in a reading) against the
    GPU's own kernel time and the number of kernels and host calls under torch.profiler, then its host
    operators by their own CPU time: a prefill whose wall time is far above its kernels waits on launches;
    then its kernels by their GPU time. ``chunks``: the long prefill's chunk settings to compare (0: dense).
    No ``torch.compile`` here: a one-token answer is a decode shape of its own, minutes to compile."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as kernels

    cases = {"xray": (xray(7), DEFAULT_QUESTION, reader.info.grounding), "ct": (ct(3), CT_QUESTION, reader.ct)}
    for name in modalities:
        study, question, settings = cases[name]
        inputs = build_inputs(processor, reader._content(study), question, None, model.device, model.dtype)
        args = (model, inputs, list(settings["layers"]), int(model.config.mm_tokens_per_image), 1,
                bool(settings.get("rollout")))
        for chunk in chunks:
            with prefill_chunk(chunk) as c:
                prefill_and_decode(*args, compile=False)  # warm-up
                walls = []
                for _ in range(runs):
                    walls.append(prefill_and_decode(*args, compile=False).seconds["prefill"])
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                with kernels(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    prefill_and_decode(*args, compile=False)
                    sync()
                peak = torch.cuda.max_memory_allocated() - base
            events = prof.key_averages()
            gpu = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / 1e6
            launches = sum(e.count for e in events if e.device_type.name == "CUDA")
            ops = sum(e.count for e in events if e.device_type.name == "CPU" and e.key.startswith("aten::"))
            tokens = inputs["input_ids"].shape[1]
            emit(f"### Prefill: {name}, {tokens} tokens{chunk_label(c, tokens)}: {statistics.median(walls):.4f} s "
                 f"wall (median of {runs}), {gpu:.4f} s of GPU kernels, {launches} kernels, {ops} aten calls, peak "
                 f"{gib(peak)} GiB above the weights and inputs")
            emit()
            for order in ("self_cpu_time_total", "self_cuda_time_total"):
                emit("```")
                emit(events.table(sort_by=order, row_limit=20, max_name_column_width=60))
                emit("```")
            emit()
            with prefill_chunk(chunk):
                fills_and_copies(lambda: prefill_and_decode(*args, compile=False))


FILLS_AND_COPIES = ("aten::zero_", "aten::fill_", "aten::copy_", "aten::masked_fill_")


def fills_and_copies(step, top: int = 14) -> None:
    """Where ``step()``'s fills (a memset each) and copies come from: those operators grouped by their Python
    stack and input shapes (torch.profiler), the costliest on the GPU first, with the stack's project and
    library frames."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as kernels

    stacks = torch._C._profiler._ExperimentalConfig(verbose=True)  # without it the Python frames stay empty
    with kernels(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True, record_shapes=True,
                 experimental_config=stacks) as prof:
        step()
        sync()
    events = [e for e in prof.key_averages(group_by_input_shape=True, group_by_stack_n=12) if e.key in FILLS_AND_COPIES]
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    emit(f"Fills and copies by where they are called (top {top} of {len(events)}; GPU ms in all calls):")
    emit()
    emit("```")
    for e in events[:top]:
        frames = [f for f in e.stack if "monailabel_app" in f or "transformers" in f or "torch/nn" in f][:5]
        emit(f"{e.device_time_total / 1e3:9.2f} ms {e.count:5d} x {e.key} {str(e.input_shapes)[:120]}")
        for f in frames:
            emit(f"      {f[-110:]}")
    emit("```")
    emit()


def decode(model, processor, reader, modalities=("ct",)) -> None:
    """Where a decode step's time goes: the kernels of one reading's decode alone (``Decoder.run`` under
    torch.profiler: the compiled step's CUDA graph replays, 200 steps), per step, next to its wall time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as kernels

    tok = processor.tokenizer
    cases = {"xray": (xray(7), report(tok, XRAY_FINDINGS)), "ct": (ct(3), report(tok, CT_FINDINGS))}
    run, got = decoding.Decoder.run, {}

    def profiled(self, *args, **kwargs):
        with kernels(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            out = run(self, *args, **kwargs)
            sync()
        got["prof"] = prof
        return out

    for name in modalities:
        study, answer = cases[name]
        reader.read(study, answer=answer)  # warm-up: compiles and captures this shape
        decoding.Decoder.run = profiled
        try:
            r = reader.read(fresh(study), answer=answer)
        finally:
            decoding.Decoder.run = run
        events = got.pop("prof").key_averages()
        steps = r.latencies["decoder_decode_steps"]
        on_gpu = [e for e in events if e.device_type.name == "CUDA"]
        copies = sum(e.self_device_time_total for e in on_gpu if e.key.startswith("Memcpy")) / 1e3
        gpu = sum(e.self_device_time_total for e in on_gpu) / 1e3 - copies
        emit(f"### Decode: {name}, {r.latencies['prompt_tokens']} prompt tokens, {steps} steps profiled: "
             f"{gpu / steps:.3f} ms of GPU kernels a step, {copies / steps:.3f} ms of copies (the attention rows "
             f"taken off the GPU on a stream of their own); {1000 * r.latencies['decoder_decode'] / steps:.2f} ms a "
             "step of wall time under the profiler (without it: the speed part)")
        emit()
        emit("```")
        emit(events.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70))
        emit("```")
        emit()


FILMS = 256  # distinct films in the batch part (more studies than this cycle through them)


def batch(model, processor, reader, sizes=(8, 32, 64), batches: int = 4, threads=(None,), processes=(None,),
          devices=(None,), aheads=(None,), blobs=(None,), nices=(None,)) -> None:
    """Batched radiographs in steady state: ``batches`` batches of each size through one ``read_many`` call
    (a batch's maps are made while the next batch generates, so one batch alone would show no overlap).
    ``threads``: map-pool sizes to compare (None: the library's own, :data:`maps.MAP_THREADS`);
    ``processes``: map worker processes to compare (0: the maps in threads; None: the library's own);
    ``devices``: where the workers map (cpu, cuda; None: the library's own); ``aheads``: decode replays in
    flight (:data:`decoding.AHEAD_ENV`; None: the library's own); ``blobs``: the films' blob filters made
    ahead on the GPU for the workers or not (1, 0: :data:`map_processes.BLOBS_AHEAD_ENV`; None: the library's own);
    ``nices``: the workers' priority below the serving process's (:data:`map_processes.NICE_ENV`)."""
    tok = processor.tokenizer
    distinct = [xray(s) for s in range(min(max(sizes) * batches, FILMS))]
    films = [distinct[i % len(distinct)] for i in range(max(sizes) * batches)]
    answers = [report(tok, XRAY_FINDINGS)] * len(films)
    emit(f"### Batched X-ray throughput, {NEW} new tokens each, bf16, {batches} batches in one `read_many`")
    emit()
    emit("Readings are handed over as they are made (`on_reading`) and dropped, as a curation run's are once "
         "written. Steady state: the studies finished between the first and the last batch's worth, over the "
         "time between (the pipeline full: a batch generating while the batch before is mapped).")
    emit()
    emit("| batch | studies | map processes | workers map on | workers' nice | blobs made ahead | map threads | "
         "replays in flight | generation s | studies/s (generation) | with masks s | studies/s (with masks) | steady state studies/s | "
         "peak GiB |")
    emit("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    default, per_film, per_batch = maps.MAP_THREADS, [], []
    for n_processes, n_threads, device, ahead, blob, nice in [(p, t, d, a, o, c) for p in processes for t in threads
                                                              for d in devices for a in aheads for o in blobs
                                                              for c in nices]:
        if maps._POOL is not None:  # a new pool of this size
            maps._POOL.shutdown()
            maps._POOL = None
        maps.MAP_THREADS = n_threads or default
        if reader._map_processes is not None:
            reader._map_processes.shutdown()
            reader._map_processes = None
        settings = contextlib.ExitStack()  # this configuration's environment variables, restored after it
        for env, value in ((map_processes.ENV, n_processes), (map_processes.DEVICE_ENV, device),
                           (decoding.AHEAD_ENV, ahead), (map_processes.BLOBS_AHEAD_ENV, blob),
                           (map_processes.NICE_ENV, nice)):
            settings.enter_context(environment(env, value))
        with settings:
            workers = map_processes.workers_for(reader.maps_device)
            where = map_processes.device_for(reader.maps_device).type if workers else "-"
            for b in sizes:
                n = b * batches
                reader.read_many(films[:b], answers=answers[:b], batch_size=b)  # warm-up
                sync()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                latencies, at = {}, []

                def done(i, reading):  # what a curation run keeps of a reading once it is written
                    latencies[i] = reading.latencies
                    at.append(time.perf_counter())

                print(f"[bench] timed batch of {n} starts, pid {os.getpid()}", file=sys.stderr, flush=True)  # a profiler's cue
                t0 = time.perf_counter()
                reader.read_many(films[:n], answers=answers[:n], batch_size=b, on_reading=done)
                total = time.perf_counter() - t0
                gen = sum(latencies[k]["generate"] + latencies[k]["prepare"] for k in range(0, n, b))
                assert len(latencies) == n and all(v["new_tokens"] == NEW for v in latencies.values())
                at.sort()
                steady = f"{(n - 2 * b) / (at[n - b - 1] - at[b - 1]):.1f}" if n >= 3 * b else "-"
                ahead_blobs = "yes" if workers and map_processes.blobs_ahead() else "no"
                emit(f"| {b} | {n} | {workers} | {where} | {map_processes.niceness() if workers else '-'} | {ahead_blobs} | {maps.MAP_THREADS if not workers else '-'} | "
                     f"{decoding.replays_ahead(b, False)} | {gen:.3f} | {n / gen:.1f} | {total:.3f} | {n / total:.1f} | "
                     f"{steady} | {gib(torch.cuda.max_memory_allocated() - base)} |")
                per_film.append(f"{b} x {workers or maps.MAP_THREADS} {'processes on ' + where if workers else 'threads'}"
                                f"{', nice ' + str(map_processes.niceness()) if workers else ''}"
                                f"{', blobs ahead' if ahead_blobs == 'yes' else ''}: "
                                f"{statistics.median(v['maps'] for v in latencies.values()):.3f} s")
                per_batch.append(f"{b}{', nice ' + str(map_processes.niceness()) if workers else ''}"
                                 f"{', blobs ahead' if ahead_blobs == 'yes' else ''}: waited for inputs "
                                 + " / ".join(f"{latencies[k]['prepare']:.2f}" for k in range(0, n, b)) + " s, generated in "
                                 + " / ".join(f"{latencies[k]['generate']:.2f}" for k in range(0, n, b)) + " s")
    maps.MAP_THREADS = default
    emit()
    emit("A film's maps, from its generation to its reading (median; in its worker or thread): " + "; ".join(per_film))
    emit()
    emit("Per batch: " + "; ".join(per_batch))
    emit()


def job(reader, processor, films: int = 192, batch_size: int = 64) -> None:
    """The curation job as a user runs it (``batch.run_local``: ``batch_size`` films a decode batch, two
    batches in flight, each reading's outputs written as it is made: NIfTI heatmaps and label map, overlay,
    findings, manifest), on ``films`` distinct 2048 x 2458 phantom films saved as PNG files. The random model
    is made to say the report (its ``read_many`` given the answers), as in the batch part."""
    from monailabel_app.jobs import batch as curation

    answer = report(processor.tokenizer, XRAY_FINDINGS)
    emit(f"### The curation job (`batch.run_local`), {films} films of 2048 x 2458, {NEW} new tokens each, bf16")
    emit()
    emit("| films | batch | batches in flight | map processes | writer threads | whole run s | films/s |")
    emit("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="job-") as tmp:
        source = os.path.join(tmp, "films")
        os.makedirs(source)
        for k in range(films):
            Image.fromarray(xray(k).pixels).save(os.path.join(source, f"film_{k:04d}.png"))
        real = reader.read_many
        reader.read_many = lambda studies, *a, **kw: real(studies, *a, answers=[answer] * len(studies), **kw)
        try:
            for name, n in (("warm-up", batch_size), ("timed", films)):
                out = os.path.join(tmp, name)
                manifest, plan = curation.prepare(out, curation.find_studies(source)[:n])
                t0 = time.perf_counter()
                records = curation.run_local(reader, out, manifest, plan, max_new_tokens=NEW, progress=False,
                                             batch_size=batch_size)
                seconds = time.perf_counter() - t0
                assert len(records) == n and all(r["status"] == "ok" for r in records), records[:2]
        finally:
            reader.read_many = real
    workers = map_processes.workers_for(reader.maps_device)
    emit(f"| {films} | {batch_size} | {curation.BATCHES_IN_FLIGHT} | {workers} | {curation.WRITERS} | {seconds:.3f} | "
         f"{films / seconds:.1f} |")
    emit()


def saved(model, processor, _folder=[]) -> str:
    """The random-weight model saved once as a folder (``load_model`` reads it like a downloaded MedGemma)."""
    if not _folder:
        _folder.append(tempfile.mkdtemp(prefix="m4b-"))
        save(model, processor, _folder[0])
    return _folder[0]


def free_tokens(reader, film, n: int = NEW) -> list[int]:
    """The model's own answer (not forced): as many tokens as the timed read, so that the decode step's shape
    is the one just compiled (a second shape would compile again: minutes for int8)."""
    return reader.read(film, max_new_tokens=n).generation.token_ids


PRECISIONS = (("fp32", None), ("bf16", None), ("fp16", None), ("int8", "torchao"), ("int8", "bitsandbytes"),
              ("int4", None))


def precision(model, processor, rows=PRECISIONS, compile: bool = False) -> None:
    os.environ["MEDGEMMA_COMPILE"] = "1" if compile else "0"  # six loads: CUDA graphs without compiling each
    folder = saved(model, processor)
    film = xray(7)
    answer = report(processor.tokenizer, XRAY_FINDINGS)
    emit("### Precision, MedGemma-4B shapes, one X-ray end to end (masks included), loaded with `load_model`, "
         f"decode as a CUDA graph {'compiled with `torch.compile`' if compile else 'without `torch.compile`'}")
    emit()
    emit("| precision | weights GiB | end to end s | ms / decode token | peak GiB (weights included) | "
         "free tokens = bf16 | note |")
    emit("|---|---|---|---|---|---|---|")
    ref = None
    for p, engine in rows:
        name = f"{p} ({engine})" if engine else p
        try:
            if engine:
                os.environ["MEDGEMMA_INT8"] = engine
            before = torch.cuda.memory_allocated()
            reader = Reader(folder, device="cuda", precision=p)
            weights = torch.cuda.memory_allocated() - before
            f = project_read(reader, film, answer, runs=1)
            tokens = free_tokens(reader, film)
            ref = tokens if p == "bf16" else ref
            same = "" if ref is None else f"{np.mean([a == b for a, b in zip(tokens, ref)]):.2f}"
            emit(f"| {name} | {gib(weights)} | {f['total']:.3f} | {f['ms_token']:.2f} | "
                 f"{gib(weights + f['peak'])} | {same} | {reader.info.precision_reason} |")
        except Exception as e:  # noqa: BLE001 (the table says what failed)
            emit(f"| {name} | | | | | | failed: {type(e).__name__}: {str(e)[:120]} |")
        finally:
            os.environ.pop("MEDGEMMA_INT8", None)
        reader = None
        gc.collect()
        torch.cuda.empty_cache()
    emit()
    if not compile and ("int8", "torchao") in rows:  # the phantom's agreement does not depend on compiling
        int8_agreement()


def int8_agreement(seeds=range(0, 30)) -> None:
    """The phantom model (trained weights: its answers mean something) in int8 (torchao) against bf16."""
    films = [Radiograph(make_phantom(s).image, Geometry.plain(*make_phantom(s).image.shape)) for s in seeds]
    got = {}
    for p in ("bf16", "int8"):
        reader = Reader(device="cuda", precision=p)
        got[p] = [(r.report, r.labels) for r in (reader.read(f) for f in films)]
        note = reader.info.precision_reason
    same = np.mean([a[0] == b[0] for a, b in zip(got["int8"], got["bf16"])])
    dice = [_dice(a[1], b[1]) for a, b in zip(got["int8"], got["bf16"]) if a[1].any() or b[1].any()]
    emit(f"Phantom model, {len(films)} held-out films, int8 ({note}) against bf16: report identical "
         f"{same:.3f}, mask Dice {np.mean(dice):.3f}.")
    emit()


def restart(model, processor) -> None:
    """Restart to the first fast answer: a new process loads the saved folder, warms the X-ray shape up
    (compiled, captured) and answers one X-ray; first with an empty compile cache, then with the one it left
    (also with Inductor's compile workers off: with every kernel in the cache there is nothing to compile).
    Timed from the parent's spawn to the child's answer (the child's exit after it is not the user's wait)."""
    import json
    import subprocess

    folder = saved(model, processor)
    cache = tempfile.mkdtemp(prefix="compile-cache-")
    emit(f"### Restart to the first fast answer (new process, bf16, `torch.compile` on, {NEW} new tokens)")
    emit()
    emit("| compile cache | spawn to first fast answer s | of which: interpreter and imports s | load s | "
         "warm-up (X-ray shape) s | first request after it s | process exit after the answer s |")
    emit("|---|---|---|---|---|---|---|")
    env = {**os.environ, "MEDGEMMA_COMPILE_CACHE": cache, "MEDGEMMA_COMPILE": "1"}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    env.pop("TRITON_CACHE_DIR", None)
    for label, extra in (("empty", {}), ("warm (left by the run above)", {}),
                         ("warm, `TORCHINDUCTOR_COMPILE_THREADS=1`", {"TORCHINDUCTOR_COMPILE_THREADS": "1"})):
        t0 = time.time()
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child-restart", folder],
                             env={**env, **extra}, capture_output=True, text=True, timeout=500)
        ended = time.time()
        line = [x for x in out.stdout.splitlines() if x.startswith("{")]
        if out.returncode or not line:
            emit(f"| {label} | failed: {out.stderr[-300:]} | | | | | |")
            continue
        d = json.loads(line[-1])
        emit(f"| {label} | {d['answered'] - t0:.1f} | {d['started'] - t0:.1f} | {d['load']:.1f} | {d['warm']:.1f} | "
             f"{d['first']:.2f} | {ended - d['answered']:.1f} |")
    emit()


def child_restart(folder: str) -> None:
    import json

    started = time.time()  # the interpreter is up and the modules are imported
    t0 = time.perf_counter()
    reader = Reader(folder, device="cuda", precision="bf16")
    t1 = time.perf_counter()
    reader.warm_up(max_new_tokens=NEW, modalities=("xray",))
    t2 = time.perf_counter()
    reader.read(xray(11), max_new_tokens=NEW)
    sync()
    print(json.dumps({"started": started, "load": t1 - t0, "warm": t2 - t1, "first": time.perf_counter() - t2,
                      "answered": time.time()}), flush=True)


def phantom(device: str = "cuda", xray_seeds=range(0, 30), ct_seeds=range(0, 6)) -> None:
    from monailabel_app.jobs.evaluation import evaluate, evaluate_ct, lobe_priors, zone_priors

    os.environ["MEDGEMMA_COMPILE"] = "0"
    emit(f"### Phantom model: each precision against fp32 ({len(xray_seeds)} X-ray and {len(ct_seeds)} CT held-out "
         f"phantoms, on {torch.cuda.get_device_name() if device == 'cuda' else 'the CPU'})")
    emit()
    emit("| precision | X-ray text = fp32 | X-ray mask Dice vs fp32 | X-ray pointing | CT text = fp32 | "
         "CT mask Dice vs fp32 | CT pointing | note |")
    emit("|---|---|---|---|---|---|---|---|")
    films = [(s, Radiograph(make_phantom(s).image, Geometry.plain(*make_phantom(s).image.shape))) for s in xray_seeds]
    volumes = [(s, phantom_volume(make_ct_phantom(s))) for s in ct_seeds]
    ref = None
    zp, lp = zone_priors(), lobe_priors(range(20000, 20060))
    for p in ("fp32", "bf16", "fp16") + (("int8", "int4") if device == "cuda" else ()):
        try:
            reader = Reader(device=device, precision=p)
            got = {"x": [reader.read(f) for _, f in films], "c": [reader.read(v) for _, v in volumes]}
            got = {k: [(r.report, r.labels) for r in v] for k, v in got.items()}
            xs = evaluate(reader, xray_seeds, zp)["maps"]["b_final_masks"]["pointing"]

            def read(ph):
                r = reader.read(phantom_volume(ph))
                return r.findings_json(), r.labels

            cs = evaluate_ct(read, ct_seeds, reader.ct["max_slices"], reader.grid, lp)["maps"]["b_final_masks"]["pointing"]
            if ref is None:
                ref = got
            cells = []
            for k in ("x", "c"):
                same = np.mean([a[0] == b[0] for a, b in zip(got[k], ref[k])])
                dice = [_dice(a[1], b[1]) for a, b in zip(got[k], ref[k]) if b[1].any() or a[1].any()]
                cells += [f"{same:.3f}", f"{np.mean(dice):.3f}" if dice else "-"]
            emit(f"| {p} | {cells[0]} | {cells[1]} | {xs:.3f} | {cells[2]} | {cells[3]} | {cs:.3f} | "
                 f"{reader.info.precision_reason} |")
        except Exception as e:  # noqa: BLE001
            emit(f"| {p} | | | | | | | failed: {type(e).__name__}: {str(e)[:120]} |")
        reader = None
        gc.collect()
        torch.cuda.empty_cache()
    emit()


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over labels present in either of the label-wise Dice (labels matched by number)."""
    scores = []
    for k in sorted(set(np.unique(a)) | set(np.unique(b)) - {0}):
        x, y = a == k, b == k
        scores.append(2 * (x & y).sum() / max(1, x.sum() + y.sum()))
    return float(np.mean(scores)) if scores else 1.0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="speed,batch,precision,restart,phantom")
    ap.add_argument("--child-restart", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--speed-modalities", default="xray,ct", help="the speed part's studies (xray, ct)")
    ap.add_argument("--no-anchors", action="store_true", help="the speed part: the project path only (no plain "
                    "`generate`, no capture cost)")
    ap.add_argument("--batch-sizes", default="8,32,64", help="the batch part's batch sizes")
    ap.add_argument("--batches", type=int, default=4, help="the batch part: batches of each size in one read_many")
    ap.add_argument("--job-films", type=int, default=192, help="the job part: distinct films read (its decode batch: "
                    "the last of --batch-sizes)")
    ap.add_argument("--map-threads", default="", help="the batch part: map-pool sizes to compare, e.g. 16,8 "
                    "(default: the library's own)")
    ap.add_argument("--map-processes", default="", help="the batch part: map worker processes to compare, e.g. "
                    "15,0 (0: maps in threads; default: the library's own)")
    ap.add_argument("--map-process-devices", default="", help="the batch part: where map workers map, to "
                    "compare, e.g. cpu,cuda (default: the library's own, MEDGEMMA_MAP_PROCESS_DEVICE)")
    ap.add_argument("--decode-ahead", default="", help="the batch and speed parts: decode replays in flight to "
                    "compare, e.g. 2,1")
    ap.add_argument("--helpers", default="", help="the speed and timeline parts: label and distance helper "
                    "processes to compare, e.g. 4,0 (default: the library's own)")
    ap.add_argument("--blobs-ahead", default="", help="the batch part: films' blob filters made ahead on the GPU for "
                    "the map workers or not, to compare, e.g. 1,0 (default: the library's own)")
    ap.add_argument("--map-nice", default="", help="the batch part: the map workers' priority below the serving "
                    "process's to compare, e.g. 0,5 (default: the library's own)")
    ap.add_argument("--prefill-chunks", default="", help="the speed and prefill parts: a long prompt's prefill "
                    "chunk of query rows to compare, e.g. 1024,0 (0: dense; default: the library's own)")
    ap.add_argument("--switch-intervals", default="", help="the speed and timeline parts: the interpreter's switch "
                    "intervals in ms to compare, e.g. 5,1,0.3 (default: Python's own, 5)")
    ap.add_argument("--search-workers", default="3", help="the searches part: threads and processes to compare, "
                    "e.g. 3,4")
    ap.add_argument("--profile-batch", type=int, default=0, help="the profile part: also one read_many batch of this many")
    ap.add_argument("--precisions", default=",".join(f"{p}:{e}" if e else p for p, e in PRECISIONS),
                    help="the precision part's rows (int8:torchao, int8:bitsandbytes)")
    ap.add_argument("--precision-compile", action="store_true",
                    help="the precision part with torch.compile on (each load compiles its decode step)")
    ap.add_argument("--out", default=None, help="markdown file for the tables")
    ap.add_argument("--phantom-device", default="cuda", help="where the phantom comparison runs (cuda or cpu: "
                    "fp32/bf16/fp16 only, bitsandbytes needs CUDA)")
    args = ap.parse_args(argv)
    if args.child_restart:
        return child_restart(args.child_restart)
    parts = args.only.split(",")
    if not torch.cuda.is_available() and (set(parts) - {"phantom"} or args.phantom_device == "cuda"):
        sys.exit("bench/fast_path.py needs a CUDA GPU (except --only phantom --phantom-device cpu)")
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    emit(f"## bench/fast_path.py on {card} (torch {torch.__version__}, "
         f"transformers {__import__('transformers').__version__}), {time.strftime('%Y-%m-%d')}")
    emit()
    if {"speed", "batch", "job", "precision", "restart", "profile", "prefill", "decode", "searches",
            "timeline"} & set(parts):
        t0 = time.perf_counter()
        model, processor = build("cuda", torch.bfloat16, attn=CAPTURE_ATTN)
        print(f"built MedGemma-4B shapes in {time.perf_counter() - t0:.1f} s", flush=True)
        reader = reader_for(model, processor, "bf16")
        if "profile" in parts:
            profile(model, processor, reader, [m for m in args.speed_modalities.split(",") if m], args.profile_batch)
        chunks = [int(c) for c in args.prefill_chunks.split(",") if c] or [None]
        switches = [float(w) for w in args.switch_intervals.split(",") if w] or [None]
        if "speed" in parts:
            speed(model, processor, reader, args.speed_modalities.split(","), not args.no_anchors, chunks,
                  [int(a) for a in args.decode_ahead.split(",") if a] or [None],
                  [int(h) for h in args.helpers.split(",") if h] or [None], switches)
        if "timeline" in parts:
            import map_timeline

            for count, ms in [(h, w) for h in [int(h) for h in args.helpers.split(",") if h] or [None] for w in switches]:
                with helpers(count), switch_interval(ms) as switch:
                    emit(f"### The CT's maps, call by call ({MAPS_WHILE_DECODING_ENV} as the library's own; switch "
                         f"interval {switch:g} ms)")
                    emit()
                    map_timeline.timeline(reader, ct(3), report(processor.tokenizer, CT_FINDINGS), emit, fresh, sync)
        if "searches" in parts:
            searches(reader, processor, [int(w) for w in args.search_workers.split(",")])
        if "decode" in parts:
            decode(model, processor, reader, [m for m in args.speed_modalities.split(",") if m])
        if "prefill" in parts:
            prefill(model, processor, reader, [m for m in args.speed_modalities.split(",") if m], chunks=chunks)
        if "batch" in parts:
            threads = [int(t) for t in args.map_threads.split(",") if t] or [None]
            processes = [int(p) for p in args.map_processes.split(",") if p] or [None]
            devices = [d for d in args.map_process_devices.split(",") if d] or [None]
            aheads = [int(a) for a in args.decode_ahead.split(",") if a] or [None]
            blobs = [int(o) for o in args.blobs_ahead.split(",") if o] or [None]
            nices = [int(c) for c in args.map_nice.split(",") if c] or [None]
            batch(model, processor, reader, [int(b) for b in args.batch_sizes.split(",")], args.batches, threads,
                  processes, devices, aheads, blobs, nices)
        if "job" in parts:
            job(reader, processor, args.job_films, int(args.batch_sizes.split(",")[-1]))
        if "restart" in parts:
            restart(model, processor)
        if "precision" in parts:
            rows = [tuple(r.split(":")) if ":" in r else (r, None) for r in args.precisions.split(",")]
            precision(model, processor, rows, args.precision_compile)
        del reader, model
        gc.collect()
        torch.cuda.empty_cache()
    if "phantom" in parts:
        phantom(args.phantom_device)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "a") as f:
            f.write("\n".join(LINES) + "\n")


if __name__ == "__main__":
    main()
