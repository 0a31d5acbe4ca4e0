"""The static-cache decoder gives the tokens and probabilities of transformers' own ``generate``:
with a sliding window shorter than the sequence (ring buffer), and for a left-padded batch."""

import functools
import gc
import weakref

import pytest
import torch

from monailabel_app.model import decoding
from monailabel_app.model.capture import CAPTURE_ATTN
from monailabel_app.model.decoding import StaticKV, prefill_and_decode

IMAGE, BOI, EOI, VOCAB = 290, 288, 289, 300


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


@pytest.fixture(scope="module", params=DEVICES)
def tiny(request):
    """The tiny model on the CPU and, where there is one, on a GPU (where the decode step is a CUDA graph)."""
    return tiny_model(request.param)


def tiny_model(device: str):
    """A random Gemma 3 (4 text layers: three sliding with window 8, one global; 2 x 2 image tokens)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(0)
    cfg = Gemma3Config(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, sliding_window=8,
                         layer_types=["sliding_attention"] * 3 + ["full_attention"], max_position_embeddings=512),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14, vision_use_head=False),
        mm_tokens_per_image=4, image_token_index=IMAGE, boi_token_index=BOI, eoi_token_index=EOI)
    cfg._attn_implementation = CAPTURE_ATTN
    model = Gemma3ForConditionalGeneration._from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.to(device)


def prompt(text: list[int], images: int = 2):
    ids, types = [2], [0]
    for _ in range(images):
        ids += [BOI] + [IMAGE] * 4 + [EOI]
        types += [0] + [1] * 4 + [0]
    ids += text
    types += [0] * len(text)
    return ids, types


def batch(prompts, images):
    width = max(len(i) for i, _ in prompts)
    ids = torch.tensor([[0] * (width - len(i)) + i for i, _ in prompts])
    types = torch.tensor([[0] * (width - len(t)) + t for _, t in prompts])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i, _ in prompts])
    out = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "pixel_values": images}
    return {k: v.to(images.device) for k, v in out.items()}


def reference(model, inputs, new):
    model.set_attn_implementation("sdpa")
    try:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=new, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
    finally:
        model.set_attn_implementation(CAPTURE_ATTN)
    width = inputs["input_ids"].shape[1]
    logp = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], 1)  # (B, new, vocab)
    tokens = out.sequences[:, width:]
    return tokens.tolist(), logp.gather(-1, tokens[..., None])[..., 0]


def test_decoder_matches_generate_with_a_sliding_ring_and_left_padding(tiny):
    torch.manual_seed(1)
    images = (torch.rand(4, 3, 28, 28) * 2 - 1).to(tiny.device)
    prompts = [prompt([5, 6, 7, 8, 9, 10, 11]), prompt([12, 13])]  # 20 and 15 tokens: left padding 5
    new = 24  # 44 positions: far past the window of 8
    inputs = batch(prompts, images)
    result = prefill_and_decode(tiny, inputs, [1, 3], 4, new, stop_loops=False)
    rows, attention, layers, dropped = result.rows, result.attention, result.layers, result.dropped
    tokens, logp = reference(tiny, inputs, new)
    assert [r.token_ids for r in rows] == tokens
    assert torch.allclose(torch.tensor([r.logprobs for r in rows]), logp.cpu(), atol=1e-4)
    assert layers == [3] and 1 in dropped  # a sliding layer cannot see every image token
    assert attention.shape == (new, 1, 2, 4, 8)
    # each row alone gives the same answer as inside the batch
    for b, p in enumerate(prompts):
        alone = prefill_and_decode(tiny, batch([p], images[2 * b: 2 * b + 2]), [3], 4, new, stop_loops=False)
        assert alone.rows[0].token_ids == rows[b].token_ids


def test_forced_tokens_and_end_of_turn(tiny):
    images = torch.rand(2, 3, 28, 28, device=tiny.device)
    inputs = batch([prompt([5, 6])], images)
    rows = prefill_and_decode(tiny, inputs, [3], 4, 30, forced=[[7, 8, 9, 1]], eos=[1]).rows
    assert rows[0].token_ids == [7, 8, 9, 1] and rows[0].stop_reason == "eos"
    own = prefill_and_decode(tiny, inputs, [3], 4, 30, stop_loops=False).rows
    first = own[0].token_ids[0]
    cut = prefill_and_decode(tiny, inputs, [3], 4, 30, eos=[first]).rows
    assert cut[0].token_ids == [first] and cut[0].stop_reason == "eos"
    bare = prefill_and_decode(tiny, inputs, [], 4, 30, stop_loops=False)  # no capture at all
    assert bare.attention is None and bare.rows[0].token_ids == own[0].token_ids
    assert all(prefill_and_decode(tiny, inputs, layers, 4, 30).context is None for layers in ([], [3]))  # unasked
    kept = prefill_and_decode(tiny, inputs, [3], 4, 30, keep=True)
    assert len(kept.context.ids) == inputs["input_ids"].shape[1] + len(kept.rows[0].token_ids) - 1
    if tiny.device.type == "cuda":  # the decode steps ran as CUDA graph replays
        assert any(d.graph is not None for d in tiny.__dict__["_medgemma_decoders"].values())


def test_static_kv_masks_see_the_window_and_not_the_padding():
    from transformers import Gemma3TextConfig

    cfg = Gemma3TextConfig(num_hidden_layers=2, num_key_value_heads=1, head_dim=4, sliding_window=4,
                           layer_types=["sliding_attention", "full_attention"])
    kv = StaticKV(cfg, batch=2, length=10, device="cpu", dtype=torch.float32)
    assert kv.sizes == [4, 10] and kv.full_layers == [1]
    kv.slot.fill_(6)
    masks = kv.masks(torch.tensor([0, 3]))
    full, ring = masks["full_attention"], masks["sliding_attention"]
    assert full[0, 0, 0].tolist() == [True] * 7 + [False] * 3
    assert full[1, 0, 0].tolist() == [False] * 3 + [True] * 4 + [False] * 3
    # ring slot r holds position 6 - ((6 - r) mod 4): 4, 5, 6, 3 -> the window 3..6, padding below 3
    assert ring[0, 0, 0].tolist() == [True] * 4
    assert ring[1, 0, 0].tolist() == [True] * 4
    kv.slot.fill_(2)
    # early on the ring holds positions 0, 1, 2 and nothing (-1); row 0's position 0 is padding
    assert kv.masks(torch.tensor([1, 0]))["sliding_attention"][:, 0, 0].tolist() == [
        [False, True, True, False], [True, True, True, False]]
    # two spare slots: the ring holds 6 positions, the window still 4 of them
    spare = StaticKV(cfg, batch=1, length=10, device="cpu", dtype=torch.float32, spare=2)
    assert spare.sizes == [6, 10] and spare.full_layers == [1]
    spare.slot.fill_(8)  # slots hold 6, 7, 8, 3, 4, 5: the window is 5..8
    assert spare.masks(torch.tensor([0]))["sliding_attention"][0, 0, 0].tolist() == [True] * 3 + [False, False, True]


def test_a_kept_context_is_the_answers_own_after_steps_run_past_its_end(monkeypatch):
    """Steps run past the end of an answer (the rest of its replay, and one more replay in flight) never
    overwrite what the kept context holds: its keys on every layer, the sliding rings included, are those of
    a prefill of the same tokens (they used to overwrite a ring's oldest positions)."""
    from transformers import DynamicCache

    model = tiny_model("cpu")  # sliding window 8: the ring is in use past 8 positions
    torch.manual_seed(1)
    images = torch.rand(2, 3, 28, 28) * 2 - 1
    inputs = batch([prompt([5, 6, 7])], images)
    first = prefill_and_decode(model, inputs, [3], 4, 30, stop_loops=False).rows[0].token_ids[0]
    for ahead in ("1", "3"):  # 8 and 24 steps past the answer's one token
        monkeypatch.setenv(decoding.AHEAD_ENV, ahead)
        kept = prefill_and_decode(model, inputs, [3], 4, 30, eos=[first], stop_loops=False, keep=True)
        assert kept.rows[0].token_ids == [first]
        ctx, n = kept.context, len(kept.context.ids)
        ids = torch.tensor([ctx.ids])
        types = torch.nn.functional.pad(inputs["token_type_ids"], (0, n - inputs["token_type_ids"].shape[1]))
        cache = DynamicCache(config=model.config.get_text_config())
        with torch.no_grad():
            model(input_ids=ids, pixel_values=images, token_type_ids=types, attention_mask=torch.ones_like(ids),
                  use_cache=True, **{decoding._cache_keyword(model.forward): cache})
        for i, k in enumerate(ctx.keys):
            ref = cache.layers[i].keys
            m = min(k.shape[2], ref.shape[2])
            assert m >= 7 and torch.allclose(k[:, :, -m:], ref[:, :, -m:], atol=1e-5), (ahead, i)


@pytest.mark.parametrize("vocab", [1000, 4096])  # one block; 256 blocks of 16
def test_the_chosen_tokens_log_probability_without_a_full_log_softmax(vocab):
    from monailabel_app.model.decoding import chosen_logprob

    logits = torch.randn(3, vocab) * 5
    chosen = torch.tensor([0, 17, vocab - 1])
    lp, bad = chosen_logprob(logits, chosen)
    ref = torch.log_softmax(logits, -1).gather(1, chosen[:, None])[:, 0]
    assert torch.allclose(lp, ref, atol=1e-5) and not bad.any()
    logits[1, 5] = float("nan")
    logits[2, 9] = float("inf")
    _, bad = chosen_logprob(logits, chosen)
    assert bad.tolist() == [False, True, True]  # an fp16 overflow anywhere in a row is seen


@pytest.mark.parametrize("vocab", [1000, 4096])
def test_greedy_by_blocks_is_argmax(vocab):
    """The block-wise argmax is torch's: the first maximum of a row, also with ties across and within
    blocks, and the first NaN where there is one."""
    from monailabel_app.model.decoding import greedy

    torch.manual_seed(4)
    logits = torch.randint(-3, 4, (64, vocab)).float()  # many ties
    assert torch.equal(greedy(logits), logits.argmax(-1))
    logits[:, vocab // 2] = 10.0
    logits[:, vocab - 3] = 10.0
    logits[5, 40] = float("nan")
    logits[5, 7] = float("nan")
    logits[6, vocab - 1] = float("inf")
    got = greedy(logits)
    assert torch.equal(got, logits.argmax(-1)) and got[0] == vocab // 2 and got[5] == 7 and got[6] == vocab - 1


def test_the_vision_tower_in_batches_gives_the_same_features_and_reading(monkeypatch):
    """Images encoded a few at a time (an 85-slice CT's prefill memory) give the features and the reading
    of one pass over all of them (the MLPs' GELU left apart, as the single pass has it: a GPU would fuse it)."""
    import numpy as np

    from monailabel_app.model import vision_mlp
    from monailabel_app.model.decoding import batch_vision_tower
    from monailabel_app.phantoms.ct import make_ct_phantom, phantom_volume
    from monailabel_app.reader import Reader

    monkeypatch.setattr(vision_mlp, "ENABLED", False)

    one, few = Reader(precision="fp32"), Reader(precision="fp32")
    size = one.model.config.vision_config.image_size
    pixels = torch.randn(7, 3, size, size, device=one.model.device)  # the model's device (the H200 too)
    with torch.inference_mode():
        whole = one.model.model.vision_tower(pixel_values=pixels).last_hidden_state
        batch_vision_tower(few.model, images=3)
        batch_vision_tower(few.model, images=5)  # once per model: the first stays
        parts = few.model.model.vision_tower(pixel_values=pixels).last_hidden_state
    assert parts.shape == whole.shape and torch.allclose(parts, whole, atol=1e-5)
    volume = phantom_volume(make_ct_phantom(4))
    a, b = one.read(volume), few.read(volume)
    assert a.report == b.report and np.array_equal(a.labels, b.labels)


def test_the_vision_tower_copies_its_patch_embeddings_once_not_at_every_layer_norm(monkeypatch):
    """SigLIP's patch embeddings come out transposed in memory and every layer norm copied them (0.23 s of a
    CT's prefill on an H200): after :func:`batch_vision_tower` one copy per pass, and the same features (the MLPs'
    GELU left apart, which a GPU would fuse)."""
    from torch.profiler import ProfilerActivity, profile

    from monailabel_app.model import vision_mlp
    from monailabel_app.model.decoding import batch_vision_tower
    from monailabel_app.reader import Reader

    monkeypatch.setattr(vision_mlp, "ENABLED", False)

    model = Reader(precision="fp32").model
    tower = model.model.vision_tower
    size = model.config.vision_config.image_size
    pixels = torch.randn(2, 3, size, size, device=model.device)

    def hidden_copies():
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            out = tower(pixel_values=pixels).last_hidden_state
        n = sum(e.count for e in prof.key_averages(group_by_input_shape=True)
                if e.key == "aten::clone" and e.input_shapes and list(e.input_shapes[0]) == list(out.shape))
        return n, out

    before, plain = hidden_copies()
    batch_vision_tower(model)
    after, fixed = hidden_copies()
    assert after <= 1, f"{after} copies of the hidden states (before the fix: {before})"
    assert torch.equal(plain, fixed)


def test_a_decode_step_is_compiled_in_every_shape_a_server_meets():
    """decoding.compile_step over more shapes than TorchDynamo's default recompile limit (8): every one compiled (the
    ninth and later ran uncompiled before), each decoder's own state stepped, and the process's limit unchanged for
    other code. TorchDynamo's eager backend here: the limit is TorchDynamo's, whatever compiles the graphs."""
    import torch._dynamo

    class Step:  # a decoder's step: a method reading its own buffers, one fixed shape per decoder
        def __init__(self, n):
            self.cache = torch.zeros(1, n)

        def step(self):
            self.cache.add_(1)
            return self.cache.sum()

    limit = torch._dynamo.config.recompile_limit
    frames = torch._dynamo.utils.counters["frames"]
    shapes = limit + 4
    compiled_before = frames["ok"]
    for n in range(1, shapes + 1):
        step = decoding.compile_step(Step(n).step, backend="eager")
        assert step().item() == n and step().item() == 2 * n
    assert frames["ok"] - compiled_before == shapes
    assert torch._dynamo.config.recompile_limit == limit


def test_the_compile_mode_from_the_environment(monkeypatch, caplog):
    from monailabel_app.model.decoding import COMPILE_MODE_ENV, compile_mode

    monkeypatch.delenv(COMPILE_MODE_ENV, raising=False)
    assert compile_mode() is None
    monkeypatch.setenv(COMPILE_MODE_ENV, " Max-Autotune ")
    assert compile_mode() == "max-autotune-no-cudagraphs"  # never Inductor's own CUDA graphs inside ours
    monkeypatch.setenv(COMPILE_MODE_ENV, "reduce-overhead")
    assert compile_mode() is None and "not one of default, max-autotune" in caplog.text


@pytest.mark.parametrize("rollout", [False, True])
def test_progress_sees_the_answer_grow_and_its_final_rows(tiny, monkeypatch, rollout):
    """While it decodes, the progress callback gets each prefix of the final answer (every CHECK_EVERY steps)
    and rows equal to the final attention's first rows (the same copies: rolled out the same); decoding with
    two replays in flight gives the same answer, and an answer that ends early still ends where it ends."""
    images = (torch.rand(2, 3, 28, 28) * 2 - 1).to(tiny.device)
    inputs = batch([prompt([5, 6, 7])], images)
    seen = []

    def progress(ids, rows, layers):
        seen.append((list(ids), rows() if len(seen) % 2 else None, list(layers)))  # rows on every other look

    plain = prefill_and_decode(tiny, inputs, [3], 4, 30, rollout=rollout, stop_loops=False)
    live = prefill_and_decode(tiny, inputs, [3], 4, 30, rollout=rollout, stop_loops=False, progress=progress)
    final = live.rows[0].token_ids
    assert final == plain.rows[0].token_ids and len(final) == 30
    assert [len(ids) for ids, _, _ in seen] == [9, 17, 25]  # never after the last look
    for ids, rows, layers in seen:
        assert ids == final[: len(ids)] and layers == live.layers == [3]
        if rows is not None:
            assert rows.shape == (len(ids), 1, 1, 4, 8) and rows.device.type == "cpu"
            assert torch.equal(rows, live.attention[: len(ids)])
    torch.testing.assert_close(live.attention, plain.attention.cpu().float())
    # the decode loop's host seconds: launching, looking at the tokens, and the callbacks (here the progress)
    host = {k: live.seconds[f"decode_{k}"] for k in ("launch", "look", "callbacks")}
    assert all(v >= 0 for v in host.values()) and host["callbacks"] > 0 and sum(host.values()) <= live.seconds["decode"]
    for ahead in ("1", "2", "3"):
        monkeypatch.setenv(decoding.AHEAD_ENV, ahead)
        again = prefill_and_decode(tiny, inputs, [3], 4, 30, rollout=rollout, stop_loops=False, progress=progress)
        assert again.rows[0].token_ids == final
        stop = prefill_and_decode(tiny, inputs, [3], 4, 30, eos=[final[10]], stop_loops=False, progress=progress)
        assert stop.rows[0].token_ids == final[: final.index(final[10]) + 1]


@pytest.mark.parametrize("rollout", [False, True])
def test_rows_rolled_out_by_the_replays_equal_the_rows_rolled_out_after(tiny, monkeypatch, rollout):
    """A study's decode rows rolled out inside its replays (``ROLL_IN_REPLAY``: the loop then only copies them)
    are the rows rolled out from the recording afterwards, with and without progress (the rows copied while it
    decodes, or taken at the end), and the answer is the same."""
    images = (torch.rand(2, 3, 28, 28) * 2 - 1).to(tiny.device)
    inputs = batch([prompt([5, 6, 7])], images)
    seen = []

    def progress(ids, rows, layers):
        seen.append(rows())

    monkeypatch.setattr(decoding, "ROLL_IN_REPLAY", "never")
    after = prefill_and_decode(tiny, inputs, [3], 4, 30, rollout=rollout, stop_loops=False)
    monkeypatch.setattr(decoding, "ROLL_IN_REPLAY", "always")
    for watch in (None, progress):
        rolled = prefill_and_decode(tiny, inputs, [3], 4, 30, rollout=rollout, stop_loops=False, progress=watch)
        decoder = next(reversed(tiny.__dict__["_medgemma_decoders"].values()))
        assert decoder.rolls_rows and decoder.recorder.products is not None
        assert rolled.rows[0].token_ids == after.rows[0].token_ids and rolled.rolled_out == after.rolled_out
        torch.testing.assert_close(rolled.attention.cpu(), after.attention.cpu().float())
    assert seen and all(torch.equal(rows, rolled.attention[: len(rows)]) for rows in seen)
    if rollout:  # the rows are rolled out: not the rows as recorded
        monkeypatch.setattr(decoding, "ROLL_IN_REPLAY", "never")
        raw = prefill_and_decode(tiny, inputs, [3], 4, 30, rollout=False, stop_loops=False)
        assert not torch.allclose(raw.attention.cpu().float(), rolled.attention.cpu())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked staging: GPU only")
def test_a_step_without_a_cuda_graph_gives_its_rows_to_a_map_thread(monkeypatch, caplog):
    """A GPU step that cannot be captured (bitsandbytes int8; run CY's decode kernel before its fix) runs eagerly and
    its loop does not copy the rows: a finding's map thread, outside inference mode, asks for them (progress's
    ``rows``) and gets the answer's own. Its copy into the decode's staging failed before (an inference tensor
    updated outside inference mode), and the maps were then made after the answer."""
    import threading

    model = tiny_model("cuda")
    inputs = batch([prompt([5, 6, 7])], (torch.rand(2, 3, 28, 28) * 2 - 1).cuda())

    def no_graph(*args, **kwargs):
        raise RuntimeError("not capturable here")

    monkeypatch.setattr(decoding.torch.cuda, "graph", no_graph)
    got, errors = [], []

    def progress(ids, rows, layers):
        def mapping():
            try:
                got.append(rows())
            except RuntimeError as e:
                errors.append(e)
        thread = threading.Thread(target=mapping)
        thread.start()
        thread.join()

    live = prefill_and_decode(model, inputs, [3], 4, 30, stop_loops=False, progress=progress)
    assert not any(d.use_graph for d in model.__dict__["_medgemma_decoders"].values())
    assert not errors and got and all(torch.equal(rows, live.attention[: len(rows)]) for rows in got)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs: GPU only")
def test_a_decode_step_is_captured_while_another_thread_waits_for_the_cuda_device():
    """A thread waiting for the card on a stream of its own (a map thread's copies back, a batch's blob filters)
    while a new decode shape is captured: the capture forbids the capturing thread's unsafe calls alone
    (``decoding.CAPTURE_MODE``), so the step is captured (run DV's probe broke it under torch's default) and the
    other thread's waits all succeed; the answer is the one the graph gives without the other thread."""
    import threading
    import time

    model = tiny_model("cuda")
    inputs = batch([prompt([5, 6, 7])], (torch.rand(2, 3, 28, 28) * 2 - 1).cuda())
    stop, waits, errors = threading.Event(), [], []

    def waiting():
        one = torch.zeros(1, device="cuda")
        with torch.cuda.stream(torch.cuda.Stream()):
            while not stop.is_set():
                try:
                    waits.append(one.add_(1).item())
                except RuntimeError as e:
                    errors.append(e)

    thread = threading.Thread(target=waiting)
    thread.start()
    try:
        while not waits:
            time.sleep(0.001)
        before = len(waits)
        live = prefill_and_decode(model, inputs, [3], 4, 30, stop_loops=False)
        during = len(waits) - before
    finally:
        stop.set()
        thread.join()
    decoders = list(model.__dict__["_medgemma_decoders"].values())
    assert decoders and all(d.use_graph and d.graph is not None for d in decoders)
    assert not errors and during > 0  # (it waited while the reading ran, its capture among it)
    assert prefill_and_decode(model, inputs, [3], 4, 30, stop_loops=False).rows[0].token_ids == live.rows[0].token_ids


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked staging: GPU only")
def test_the_rows_copies_reuse_the_decoders_page_locked_staging():
    """Each answer's rows go through the decoder's one page-locked staging (pinned once per shape, not per copy)
    and land as the same rows the answer keeps, answer after answer."""
    model = tiny_model("cuda")
    images = (torch.rand(2, 3, 28, 28) * 2 - 1).to(model.device)
    inputs = batch([prompt([5, 6, 7])], images)
    stagings = []

    def progress(ids, rows, layers):
        stagings.append(rows.func.__self__.staging)

    first = prefill_and_decode(model, inputs, [3], 4, 30, rollout=True, stop_loops=False, progress=progress)
    again = prefill_and_decode(model, inputs, [3], 4, 30, rollout=True, stop_loops=False, progress=progress)
    assert stagings and all(s is stagings[0] for s in stagings) and stagings[0].is_pinned()
    assert stagings[0].shape == (30, 1, 1, 4, 8)
    assert torch.equal(first.attention, again.attention)
    plain = prefill_and_decode(model, inputs, [3], 4, 30, rollout=True, stop_loops=False)
    torch.testing.assert_close(again.attention, plain.attention.cpu().float())


def test_replays_in_flight_from_the_environment(monkeypatch):
    monkeypatch.delenv(decoding.AHEAD_ENV, raising=False)
    assert decoding.replays_ahead(1, False) == 1 and decoding.replays_ahead(1, True) == 2
    assert decoding.replays_ahead(1, True, long=True) == decoding.LONG_AHEAD == 3  # a CT, its maps beside
    assert decoding.replays_ahead(8, False) == 2
    assert decoding.replays_ahead(8, True, graphs=False) == 1  # eager steps run as they are launched
    monkeypatch.setenv(decoding.AHEAD_ENV, "1")
    assert decoding.replays_ahead(8, True) == 1
    monkeypatch.setenv(decoding.AHEAD_ENV, "many")
    with pytest.raises(ValueError, match="MEDGEMMA_DECODE_AHEAD"):
        decoding.replays_ahead(1, False)


def test_the_prefill_masks_are_transformers_own(monkeypatch):
    """The prefill's masks (made here, not through transformers' vmap) equal those transformers builds for the
    same left-padded batch of two images each, past the sliding window: the text decoder gets the same masks,
    and so the same answer."""
    model = tiny_model("cpu")
    torch.manual_seed(5)
    images = torch.rand(4, 3, 28, 28) * 2 - 1
    inputs = batch([prompt([5, 6, 7, 8, 9, 10, 11]), prompt([12, 13])], images)
    seen = []
    lm = model.model.language_model
    real = lm.forward

    @functools.wraps(real)  # the decoder picks the cache's keyword from the signature: transformers' own
    def spy(*a, **kw):
        seen.append(kw["attention_mask"])
        return real(*a, **kw)

    monkeypatch.setattr(lm, "forward", spy)
    ours = prefill_and_decode(model, inputs, [3], 4, 6, stop_loops=False)
    mine = seen[0]  # the prefill's (the decode steps' follow)
    seen.clear()
    monkeypatch.setattr(decoding, "prefill_masks", lambda *a: a[2])  # transformers' own masks
    theirs = prefill_and_decode(model, inputs, [3], 4, 6, stop_loops=False)
    own = seen[0]
    assert set(mine) == set(own) == {"full_attention", "sliding_attention"}
    valid = inputs["attention_mask"].bool()  # queries at padding see nothing that matters
    for kind in mine:
        a, b = mine[kind][:, 0], own[kind][:, 0]
        assert a.shape == b.shape == (2, 20, 20) and a.dtype == b.dtype == torch.bool
        assert torch.equal(a[valid], b[valid]), kind
    assert not torch.equal(mine["full_attention"], mine["sliding_attention"])  # the window (8) cuts in
    assert [r.token_ids for r in ours.rows] == [r.token_ids for r in theirs.rows]
    assert torch.equal(ours.attention, theirs.attention)


@pytest.mark.parametrize("new", [1, 2, 3])
def test_answers_of_one_two_and_three_tokens(tiny, new):
    """The shortest answers a request may ask for: on a GPU the decoder's warm-up steps run before its graph
    is captured, and they once indexed past buffers sized for the answer (a device assert: the process's GPU
    was lost for every later request)."""
    images = torch.rand(2, 3, 28, 28, device=tiny.device)
    inputs = batch([prompt([5, 6, 7])], images)
    result = prefill_and_decode(tiny, inputs, [3], 4, new, stop_loops=False)
    tokens, logp = reference(tiny, inputs, new)
    assert [r.token_ids for r in result.rows] == tokens and len(tokens[0]) == new
    assert torch.allclose(torch.tensor([r.logprobs for r in result.rows]), logp.cpu(), atol=1e-4)
    assert result.attention.shape[0] == new
    forced = prefill_and_decode(tiny, inputs, [3], 4, 30, forced=[[7]]).rows[0]  # a forced one-token answer
    assert forced.token_ids == [7]
    if tiny.device.type == "cuda":
        assert any(d.graph is not None and d.max_new == new for d in tiny.__dict__["_medgemma_decoders"].values())
    kept = decoding.kept_decoders(tiny)  # as /info/ lists them: captured on a GPU, stepped eagerly on the CPU
    assert any(d["max_new_tokens"] == new and d["captured"] == (tiny.device.type == "cuda") for d in kept), kept


def test_a_decoder_dropped_from_the_cache_is_freed_at_once():
    """Decoders are kept per shape (GRAPH_CACHE of them); one dropped for a new shape lets its cache and graphs
    go at once, not when the cyclic collector next runs (it refers to itself through its step; a CT's cache on
    a GPU is gigabytes)."""
    model = tiny_model("cpu")
    gc.collect()
    gc.disable()
    try:
        for compiled in (False, True):
            made = decoding.decoder_for(model, 1, 256, 4 + compiled, [3], 4, [])
            if compiled:  # as prepare() compiles a GPU's step: a callable that holds its decoder
                made._compiled = made.step
            first, made = weakref.ref(made), None
            for length in range(512, 256 * (decoding.GRAPH_CACHE + 2), 256):  # new shapes: the first dropped
                decoding.decoder_for(model, 1, length, 4 + compiled, [3], 4, [])
            assert first() is None, compiled
            assert len(model.__dict__["_medgemma_decoders"]) == decoding.GRAPH_CACHE
    finally:
        gc.enable()


def test_a_gpu_with_room_keeps_more_decoders_and_a_full_one_two(monkeypatch):
    """The policy, on the driver's free memory faked: a CPU keeps GRAPH_CACHE decoders; a GPU with
    GRAPH_CACHE_FREE bytes free one more per new shape, up to GRAPH_CACHE_MAX; without them GRAPH_CACHE."""
    free = {"bytes": decoding.GRAPH_CACHE_FREE}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 80 << 30))
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert decoding.room_for_decoders(gpu) and not decoding.room_for_decoders(cpu)
    assert [decoding.decoders_to_keep(gpu, kept) for kept in range(10)] == \
        [decoding.GRAPH_CACHE] * decoding.GRAPH_CACHE + [min(k + 1, decoding.GRAPH_CACHE_MAX)
                                                        for k in range(decoding.GRAPH_CACHE, 10)]
    assert all(decoding.decoders_to_keep(cpu, kept) == decoding.GRAPH_CACHE for kept in range(10))
    free["bytes"] -= 1
    assert not decoding.room_for_decoders(gpu)
    assert all(decoding.decoders_to_keep(gpu, kept) == decoding.GRAPH_CACHE for kept in range(10))


def test_decoders_of_shapes_in_turn_are_kept_while_there_is_room_and_freed_when_it_goes(monkeypatch):
    """Three shapes in turn, twice, with room: the second round reuses every decoder (no new warm-up or
    capture); GRAPH_CACHE_MAX bounds them; once the room goes, the next new shape leaves GRAPH_CACHE, the ones
    dropped freed at once."""
    model = tiny_model("cpu")
    room = {"now": True}
    monkeypatch.setattr(decoding, "room_for_decoders", lambda device: room["now"])
    monkeypatch.setattr(decoding, "GRAPH_CACHE_MAX", 4)
    shapes = [256, 512, 768]
    made = {length: decoding.decoder_for(model, 1, length, 4, [3], 4, []) for length in shapes}
    again = {length: decoding.decoder_for(model, 1, length, 4, [3], 4, []) for length in reversed(shapes)}
    assert all(again[length] is made[length] for length in shapes)
    for length in (1024, 1280):  # the second over the bound: the least recently used goes (768's, reused first)
        decoding.decoder_for(model, 1, length, 4, [3], 4, [])
    kept = model.__dict__["_medgemma_decoders"]
    assert [key[1] for key in kept] == [512, 256, 1024, 1280]
    gone = [weakref.ref(decoder) for decoder in kept.values()][:-1]
    made = again = None
    room["now"] = False
    decoding.decoder_for(model, 1, 1536, 4, [3], 4, [])
    assert [key[1] for key in kept] == [1280, 1536]  # GRAPH_CACHE
    assert all(ref() is None for ref in gone)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuBLAS workspaces: GPU only")
def test_decoders_made_in_turn_leave_no_gpu_memory_behind(monkeypatch):
    """Three decode shapes in turn, four rounds (each decoder new: GRAPH_CACHE keeps two), each reading with its
    rows copied while it decodes and rolled out: from the second round on, the allocated memory is the same after
    every round. A stream made anew per decoder (its warm-up) or per reading (the rows) brought a 32 MiB cuBLAS
    workspace that torch keeps for the process (:mod:`streams`; run CN: +0.12-0.16 GiB a round)."""
    monkeypatch.setenv("MEDGEMMA_COMPILE", "0")  # the streams are the same; compiling each shape takes a while
    monkeypatch.setattr(decoding, "GRAPH_CACHE_MAX", decoding.GRAPH_CACHE)  # each decoder new, whatever the room
    model = tiny_model("cuda")
    inputs = batch([prompt([5, 6, 7])], (torch.rand(2, 3, 28, 28) * 2 - 1).cuda())
    after = []
    for _ in range(4):
        for new in (24, 32, 40):
            prefill_and_decode(model, inputs, [3], 4, new, rollout=True, stop_loops=False,
                               progress=lambda ids, rows, layers: rows())
        gc.collect()
        torch.cuda.synchronize()
        after.append(torch.cuda.memory_allocated())
    assert max(after[1:]) - min(after[1:]) < 4 << 20, [a / 2**20 for a in after]  # MiB: under one workspace
