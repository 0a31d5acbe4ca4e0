#!/usr/bin/env python
"""The CT prefill's parts and their variants, interleaved in one process (the H200 hosts lent differ by up to 20 %).

    python bench/prefill_ab.py [--rounds 3] [--parts tower,norms,prefill,reading] [--variants default,eager-norms]
                               [--study ct|xray]

The benchmark's 85-slice CT (``fast_path.ct``; or its film, ``--study xray``) through MedGemma-4B's shapes in bf16
(random weights). Variants:

- ``default``: the RMS norms compiled during the prefill (:mod:`fused_norms`; in the prefill part whatever the
  prompt's length, in the reading part as the library chooses: from 4,096 tokens);
- ``eager-norms``: transformers' own RMS norms (eight kernels each);
- ``cudnn``: cuDNN's fused attention put first (``sdpa_kernel(..., set_priority=True)``);
- ``compiled``: each vision encoder layer ``torch.compile``d;
- ``gelu-apart``: the vision MLPs' GELU a kernel of its own after the first product (``vision_mlp.ENABLED`` off;
  the library puts it in the product's epilogue on CUDA since run DJ);
- ``decode-first`` (the ``reading`` part): the reading's own thread (preprocessing, prefill, decode loop) on a CUDA
  stream of the highest priority, so that the decode's kernels go before the map threads' when both wait (run BW;
  run BX found no gain for the decode's own stream at that priority, so the library keeps the default);
- ``labels`` (the ``reading`` part): the piece at a point (``components.component_at``) from the whole labelling
  brought back from the helper and compared here, as before the helper gave the piece alone.
- ``box-layers`` (the ``reading`` part): each CT search smooths its box and makes its territory (as before
  ``ct_extent.ct_layers``, the volume's made once beside the prefill).
- ``tokenised`` (the ``reading`` part): every prompt tokenised anew (as before ``prompt_ids``).
- ``rows-after`` (the ``reading`` part): the decode rows rolled out by the loop's copies (as before
  ``decoding.ROLL_IN_REPLAY``: the replays roll them out themselves).
- ``ahead-N`` (the ``reading`` part): N decode replays in flight (``decoding.AHEAD_ENV``; the library's: 3 for a CT).
- ``switch-MS`` (the ``reading`` part): the interpreter's switch interval MS milliseconds (Python's: 5).
- ``maps-urgent`` (the ``reading`` part): the map threads' own streams at a priority above the decode's
  (``maps.SIDE_PRIORITY`` -1; the library's: 0), so that the findings' kernels go first when both wait. Where the
  decode ends the reading, "maps made before the answer" (``Reading.maps_ready_lead``; negative: after it) tells
  how much sooner the findings' chains end: what a faster decode (an H200's) would then wait for.
- ``levels-serial`` (the ``reading`` part): a finding's two levels' pieces found one after the other, as before
  ``maps.LEVELS_TOGETHER`` (the library's: side by side in two helpers).
- ``candidates-N`` (the ``reading`` part): a CT search's next N candidates tried in threads while the one before
  is, where helpers run (``ct_extent.CANDIDATES_AHEAD``; the library's: 2 since run CU, 0 is one after another).
- ``deepest-gpu`` (the ``reading`` part): the searches' deepest voxels measured on the GPU
  (``ct_extent.DEEPEST_ON_DEVICE``: the library's since run DB), the lower envelopes in one Triton kernel;
  ``deepest-gpu-blocks``: in torch's blocks (``distances.ENVELOPE_KERNEL`` off; run CW's); ``deepest-host``: in a
  helper process, with edt (the library's before run DB).
- ``territory-gpu`` (the ``reading`` part): the CT searches' lung territories made on the GPU
  (``territory.ON_DEVICE``, :mod:`territory_device`; the library's: in slabs over the helper processes).
- ``probe`` (the ``reading`` part): a thread of its own beside the readings, every 2 ms either a one-element kernel
  on its own stream waited for (``.item()``) or a 0.5 ms sleep, each timed; those made while the model writes
  (within 50 ms of the decode loop's look at the tokens) summarised after the variant's readings: how long
  a wait for the card, and for the interpreter's lock, takes beside the decode and the findings' maps.
- ``decode-kernel`` (the ``reading`` part): a decode step's attention over 4,096 keys or more (a CT's full layers)
  in one Triton kernel split over the keys (``capture.DECODE_KERNEL_FROM``: the library's since run DB);
  ``decode-kernel-all``: every layer's (its sliding rings' too); ``decode-torch``: the torch path in every layer
  (the library's before run DB). Each is a decoder of its own (compiled in the reading not kept; the decoders
  kept per model are two, so an A/B takes one of these with ``default``).
- ``edt-N`` (the ``reading`` part): a helper's distance transforms (the deepest voxels' and the openings') on N
  of edt's threads (``distances.HELPER_THREADS``; the library's: 1).
- ``helpers-N`` (the ``reading`` part): N label and distance helper processes (``helper_processes``; the
  library's: 8 on the H200's 16 cores).
- ``after`` (the ``reading`` part): the maps made after the answer (``MEDGEMMA_MAPS_WHILE_DECODING=0``), so that
  "maps after the answer" is the findings' chains' own length on any card. Beside the decode it is hidden whenever
  the decode is longer (an H100's decode is 0.13 s longer than an H200's: run CO's A/B saw no variant there).

Variants combine with ``+``: ``after+edt-2`` is ``edt-2`` with the maps after the answer.

Parts:

- ``tower``: the vision tower alone over the 85 images in passes of ``--batches`` (the library's contiguous patch
  embeddings installed), the median of five after a warm one; the features' largest difference from the first
  variant's; the attention kernel's name; the peak memory above what was allocated before.
- ``norms``: one RMS norm of a CT prompt's hidden states (22,532 x 2,560) and of its queries (8 heads of 256),
  transformers' against the compiled one (the median of 20 calls).
- ``prefill``: ``prefill_and_decode`` with one new token (capture as in a reading; the decode step not
  compiled, the norms as the variant says), the median of five, and the tower's share by CUDA events.
- ``reading``: ``fast_path.project_read`` (the whole reading with masks, the median of three).
- ``prepare``: a CT's preprocessing split: the model slices windowed on the GPU (``ct.model_slices``) and the
  model inputs made from them (``build_inputs``: chat template, tokens, image processor), the median of five
  after a warm one, then one ``build_inputs`` under cProfile (the 20 costliest calls by cumulative time).

Compiled variants start from a reset compiler (the kernels are chosen while tracing).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import ExitStack, contextmanager
from unittest import mock

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import fast_path  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from fast_path import CT_FINDINGS, XRAY_FINDINGS, ct, emit, project_read, reader_for, report, xray  # noqa: E402
from medgemma_shapes import build  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from monailabel_app import reader as reader_module  # noqa: E402
from monailabel_app.grounding import components, ct_extent, distances, maps, study_maps, territory  # noqa: E402
from monailabel_app.model import capture, decoding, fused_norms, prompt_ids, vision_mlp  # noqa: E402
from monailabel_app.model.capture import CAPTURE_ATTN  # noqa: E402
from monailabel_app.model.decoding import batch_vision_tower, prefill_and_decode  # noqa: E402
from monailabel_app.model.generation import build_inputs  # noqa: E402
from monailabel_app.phantoms.model import CT_QUESTION, DEFAULT_QUESTION  # noqa: E402
from monailabel_app.reader import MAPS_WHILE_DECODING_ENV  # noqa: E402

CUDNN_FIRST = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
               SDPBackend.MATH]


def vision_model(model):
    """The SigLIP transformer (transformers 5.17 wraps it in ``vision_model``, later versions do not)."""
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower)


def encoder_layers(model):
    return vision_model(model).encoder.layers


@contextmanager
def variant(model, names: str):
    """The block run with variant ``names`` (see the module's docstring; several joined by ``+``)."""
    parts = names.split("+")
    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(fused_norms, "ENABLED", "eager-norms" not in parts))
        for name in parts:
            one_variant(stack, model, name)
        yield


def one_variant(stack: ExitStack, model, name: str) -> None:
    """Variant ``name``'s changes entered on ``stack``."""
    if "cudnn" in name:
        stack.enter_context(sdpa_kernel(CUDNN_FIRST, set_priority=True))
    if name == "gelu-apart":
        stack.enter_context(mock.patch.object(vision_mlp, "ENABLED", False))
    if name == "decode-first":
        stack.enter_context(torch.cuda.stream(torch.cuda.Stream(priority=-5)))  # (the nearest valid one)
    if name == "labels":
        stack.enter_context(mock.patch.object(components, "component_at", labelled_piece))
    if name == "box-layers":
        stack.enter_context(mock.patch.object(study_maps.CTMaps, "_layers", lambda self, kind: None))
        stack.enter_context(mock.patch.object(reader_module, "image_extent", lambda settings: False))
    if name == "tokenised":
        stack.enter_context(mock.patch.object(prompt_ids, "KEPT", 0))
    if name == "rows-after":
        stack.enter_context(mock.patch.object(decoding, "ROLL_IN_REPLAY", "never"))
    if name.startswith("ahead-"):
        stack.enter_context(mock.patch.dict(os.environ, {decoding.AHEAD_ENV: name.split("-")[1]}))
    if name.startswith("switch-"):
        stack.enter_context(fast_path.switch_interval(float(name.split("-")[1])))
    if name == "maps-urgent":
        stack.enter_context(mock.patch.object(maps, "SIDE_PRIORITY", -1))
    if name == "levels-serial":
        stack.enter_context(mock.patch.object(maps, "LEVELS_TOGETHER", False))
    if name.startswith("candidates-"):
        stack.enter_context(mock.patch.object(ct_extent, "CANDIDATES_AHEAD", int(name.split("-")[1])))
    if name.startswith("deepest-"):
        stack.enter_context(mock.patch.object(ct_extent, "DEEPEST_ON_DEVICE", name != "deepest-host"))
    if name == "territory-gpu":
        stack.enter_context(mock.patch.object(territory, "ON_DEVICE", True))
    if name == "deepest-gpu-blocks":
        stack.enter_context(mock.patch.object(distances, "ENVELOPE_KERNEL", False))
    if name in ("decode-kernel", "decode-kernel-all", "decode-torch"):  # (not decode-first)
        stack.enter_context(mock.patch.object(capture, "DECODE_KERNEL_FROM", {"decode-torch": None,
                                                                              "decode-kernel-all": 0}.get(name, 4096)))
    if name.startswith("edt-"):
        stack.enter_context(mock.patch.object(distances, "HELPER_THREADS", int(name.split("-")[1])))
    if name.startswith("helpers-"):
        stack.enter_context(fast_path.helpers(int(name.split("-")[1])))
    if "compiled" in name:
        layers = encoder_layers(model)
        torch._dynamo.reset()
        for layer in layers:
            layer.compile(dynamic=True)
        stack.callback(lambda: [setattr(layer, "_compiled_call_impl", None) for layer in layers])
    if name == "after":
        stack.enter_context(fast_path.environment(MAPS_WHILE_DECODING_ENV, "0"))
    if name == "probe":
        stack.enter_context(probe())


@contextmanager
def probe():
    """:func:`one_variant`'s ``probe``: the probe thread for the block, its waits made while the model writes
    summarised at the end (milliseconds above the sleep's own 0.5)."""
    import bisect
    import threading

    stop, looks, samples = threading.Event(), [], []
    check = decoding.Decoder._check

    def looked(self, *args, **kwargs):  # the decode loop's look at the tokens: the model is writing
        looks.append(time.perf_counter())
        return check(self, *args, **kwargs)

    def run():
        while not looks and not stop.is_set():  # the decode step captured first (a wait here would break it)
            time.sleep(0.01)
        one = torch.zeros(1, device="cuda")
        with torch.cuda.stream(torch.cuda.Stream()):
            while not stop.is_set():
                for kind in ("card", "lock"):
                    t0 = time.perf_counter()
                    if kind == "card":
                        one.add_(1).item()
                    else:
                        time.sleep(0.0005)
                    samples.append((kind, t0, (time.perf_counter() - t0) * 1000 - (0.5 if kind == "lock" else 0)))
                    time.sleep(0.002)

    def writing(t: float) -> bool:  # within 50 ms of a look
        i = bisect.bisect(looks, t)
        return any(abs(t - looks[j]) < 0.05 for j in (i - 1, i) if 0 <= j < len(looks))

    thread = threading.Thread(target=run, daemon=True)
    with mock.patch.object(decoding.Decoder, "_check", looked):
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
    looks.sort()
    for kind in ("card", "lock"):
        during = sorted(ms for k, t, ms in samples if k == kind and writing(t))
        if during:
            q = [during[int(f * (len(during) - 1))] for f in (0.5, 0.9, 0.99)]
            emit(f"- probe, {kind} while the model writes: {len(during)} waits, median {q[0]:.2f} ms, 90th percentile "
                 f"{q[1]:.2f}, 99th {q[2]:.2f}, longest {during[-1]:.2f} ms")


def labelled_piece(mask, point, full=False):
    """``components.component_at`` as before it: the labels from a helper (four bytes a voxel), compared here."""
    labels, n = components.label(mask, full)
    point = tuple(int(i) for i in point)
    k = labels[point] or (components.nearest_label(labels, point) if n else 0)
    return labels == k if k else np.zeros(np.shape(mask), bool)


def tower(model, pixels: torch.Tensor, batch: int) -> torch.Tensor:
    vision = vision_model(model)  # its class's forward: the library's batching wrapper is on the instance
    return torch.cat([type(vision).forward(vision, pixel_values=pixels[i : i + batch]).last_hidden_state
                      for i in range(0, pixels.shape[0], batch)])


@contextmanager
def tower_clock(model, spans: list):
    """CUDA events around each ``get_image_features`` call in the block (the tower and the projector), as
    (start, end) pairs appended to ``spans``."""
    inner = model.model.get_image_features

    def clocked(*args, **kwargs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = inner(*args, **kwargs)
        end.record()
        spans.append((start, end))
        return out

    model.model.get_image_features = clocked
    try:
        yield
    finally:
        del model.model.get_image_features


def timed(step, runs: int = 5) -> tuple[float, object]:
    out = step()  # warm (compiles a compiled variant)
    torch.cuda.synchronize()
    walls = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = step()
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - t0)
    return statistics.median(walls), out


def attention_kernel(step) -> str:
    """The name of the costliest kernel whose name says attention (or flash / fmha / sdpa)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    found = [(e.self_device_time_total, e.key) for e in prof.key_averages() if e.device_type.name == "CUDA" and any(
        w in e.key.lower() for w in ("attention", "flash", "fmha", "sdpa", "attn"))]
    return max(found)[1][:70] if found else "?"


def norm_part(model) -> None:
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    emit("| input | transformers' norm ms | compiled ms | equal |")
    emit("|---|---|---|---|")
    norm = Gemma3RMSNorm(2560).to("cuda", torch.bfloat16)
    head = Gemma3RMSNorm(256).to("cuda", torch.bfloat16)
    hidden = torch.randn(1, 22532, 2560, device="cuda", dtype=torch.bfloat16)
    queries = torch.randn(1, 22532, 8, 256, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    compiled = torch.compile(fused_norms.rms_norm, dynamic=True, fullgraph=True)
    for label, module, x in (("hidden states 22,532 x 2,560", norm, hidden), ("queries 8 x 22,532 x 256", head, queries)):
        eager_s, a = timed(lambda: module(x), runs=20)
        fused_s, b = timed(lambda: compiled(x, module.weight, module.eps), runs=20)
        emit(f"| {label} | {eager_s * 1000:.3f} | {fused_s * 1000:.3f} | {bool(torch.equal(a, b))} "
             f"(max difference {(a.float() - b.float()).abs().max().item():.3g}) |")
    emit()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", default="16")
    ap.add_argument("--parts", default="norms,prefill,reading")
    ap.add_argument("--variants", default="default,eager-norms")
    ap.add_argument("--study", choices=("ct", "xray"), default="ct")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    names = args.variants.split(",")
    parts = args.parts.split(",")
    model, processor = build("cuda", torch.bfloat16, attn=CAPTURE_ATTN)
    reader = reader_for(model, processor, "bf16")
    batch_vision_tower(model)
    # the library's prefill, without compiling a one-token decode step (minutes a shape): the norms as on CUDA
    stack = ExitStack()
    stack.enter_context(mock.patch.object(fused_norms, "wanted", lambda m, c, t: fused_norms.ENABLED))
    if args.study == "ct":
        study, question, settings, findings = ct(3), CT_QUESTION, reader.ct, CT_FINDINGS
    else:
        study, question, settings, findings = xray(7), DEFAULT_QUESTION, reader.info.grounding, XRAY_FINDINGS
    inputs = build_inputs(processor, reader._content(study), question, None, model.device, model.dtype)
    pixels = inputs["pixel_values"]
    emit(f"### bench/prefill_ab.py on {torch.cuda.get_device_name()} (torch {torch.__version__}): the "
         f"{args.study}, {pixels.shape[0]} images, {inputs['input_ids'].shape[1]} tokens")
    emit()
    if "prepare" in parts and args.study == "ct":
        prepare_part(reader, study, question)
    with torch.inference_mode():
        if "norms" in parts:
            norm_part(model)
        if "tower" in parts:
            tower_part(model, pixels, names, batches, args.rounds)
        if "prefill" in parts:
            prefill_part(model, settings, inputs, names, args.rounds)
    if "reading" in parts:
        stack.close()  # the readings compile their decode step: the library's own choice
        answer = report(processor.tokenizer, findings)
        emit("| round | variant | end to end s | prefill s | ms / decode token | maps after the answer s | "
             "maps made before the answer s | loop: look s | loop: callbacks s (the rows' copies) | page faults |")
        emit("|---|---|---|---|---|---|---|---|---|---|")
        for name in names:  # a reading per variant first, not kept: a variant's own first calls (a kernel's compile)
            with variant(model, name):
                project_read(reader, fast_path.fresh(study), answer)
        for r in range(1, args.rounds + 1):
            for name in names:
                with variant(model, name):
                    f = project_read(reader, fast_path.fresh(study), answer)
                h = f["host"]
                lead = "" if f["ready_lead"] is None else f"{f['ready_lead']:.3f}"
                emit(f"| {r} | {name} | {f['total']:.3f} | {f['prefill']:.3f} | {f['ms_token']:.2f} | {f['maps']:.3f} | "
                     f"{lead} | {h['look']:.3f} | {h['callbacks']:.3f} ({h['rows']:.3f}) | {f['faults']} |")
        emit()


def prepare_part(reader, volume, question) -> None:
    import cProfile
    import io
    import pstats

    from monailabel_app.io.ct import interleave, model_slices

    model, processor = reader.model, reader.processor
    n = reader.ct["max_slices"]

    def slices():
        return model_slices(volume, n, device=model.device)

    content = interleave(slices().shown)

    def inputs():
        return build_inputs(processor, content, question, None, model.device, model.dtype)

    slices_s, _ = timed(slices)
    inputs_s, _ = timed(inputs)
    emit(f"CT preprocessing ({n} slices): model slices {slices_s:.4f} s, model inputs {inputs_s:.4f} s (median of 5)")
    emit()
    prof = cProfile.Profile()
    prof.enable()
    inputs()
    torch.cuda.synchronize()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(20)
    emit("    " + "\n    ".join(out.getvalue().strip().splitlines()))
    emit()


def tower_part(model, pixels, names, batches, rounds) -> None:
    emit("| round | variant | images a pass | tower s | max difference | attention kernel | peak GiB |")
    emit("|---|---|---|---|---|---|---|")
    reference = None
    for r in range(1, rounds + 1):
        for name in names:
            if "compiled" in name and r > 1:
                continue
            for batch in batches:
                with variant(model, name):
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    wall, out = timed(lambda: tower(model, pixels, batch))
                    peak = torch.cuda.max_memory_allocated() - base
                    kernel = attention_kernel(lambda: tower(model, pixels, batch)) if r == 1 else ""
                if reference is None:
                    reference = out.float()
                diff = (out.float() - reference).abs().max().item()
                emit(f"| {r} | {name} | {batch} | {wall:.4f} | {diff:.3g} | {kernel} | {peak / 2**30:.2f} |")
                del out
    emit()


def prefill_part(model, settings, inputs, names, rounds) -> None:
    emit("| round | variant | whole prefill s (median of 5) | of which the tower and projector s |")
    emit("|---|---|---|---|")
    call = (model, inputs, list(settings["layers"]), int(model.config.mm_tokens_per_image), 1,
            bool(settings.get("rollout")))
    for r in range(1, rounds + 1):
        for name in names:
            if "compiled" in name and r > 1:
                continue
            spans: list = []
            with variant(model, name), tower_clock(model, spans):
                res = [prefill_and_decode(*call, compile=False) for _ in range(6)][1:]
            wall = statistics.median(x.seconds["prefill"] for x in res)
            towers = statistics.median(a.elapsed_time(b) / 1000 for a, b in spans[1:])
            emit(f"| {r} | {name} | {wall:.4f} | {towers:.4f} |")
    emit()


if __name__ == "__main__":
    main()
