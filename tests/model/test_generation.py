"""What the model is shown: a film's grey square and a CT's RGB slices handed over as arrays give the
processor's pixel values of the RGB PIL images they stand for, with either image processor and on a GPU; a
prompt seen before gives the processor's own inputs without being tokenised again."""

from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from monailabel_app.io.xray import pad_to_square
from monailabel_app.model import prompt_ids
from monailabel_app.model.generation import build_inputs, processor_image
from monailabel_app.phantoms.films import make_phantom
from monailabel_app.phantoms.model import build_processor

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


@pytest.fixture(scope="module", params=["torchvision", "pil"])
def processor(request):
    return build_processor(torchvision=request.param == "torchvision")


def _pixels(processor, content, device):
    inputs = build_inputs(processor, content, "Findings?", None, device, torch.float32)
    return inputs["pixel_values"].cpu(), inputs["input_ids"].cpu()


@pytest.mark.parametrize("device", DEVICES)
def test_a_grey_square_is_shown_as_its_rgb_image(processor, device):
    square, pad = pad_to_square(make_phantom(11).image[:, 40:])  # not square: padded left and right
    assert square.ndim == 2 and pad.left > 0
    rgb = Image.fromarray(np.repeat(square[..., None], 3, axis=2))
    kept = square.copy()
    shown, ids = _pixels(processor, [square], device)
    assert np.array_equal(square, kept)  # the processor worked on a view of it: the reading keeps it as it was
    want, want_ids = _pixels(processor, [rgb], device)
    assert torch.equal(ids, want_ids)
    assert torch.equal(shown, want)
    assert not torch.equal(shown, _pixels(processor, [Image.fromarray(np.ascontiguousarray(square.T)).convert("RGB")],
                                           device)[0])  # the test can tell a transposed film apart


@pytest.mark.parametrize("device", DEVICES)
def test_rgb_slices_are_shown_as_their_images(processor, device):
    rng = np.random.default_rng(3)
    slices = [rng.integers(0, 256, (48, 48, 3), dtype=np.uint8) for _ in range(2)]
    shown, _ = _pixels(processor, [slices[0], "SLICE 1", slices[1], "SLICE 2"], device)
    want, _ = _pixels(processor, [Image.fromarray(slices[0]), "SLICE 1", Image.fromarray(slices[1]), "SLICE 2"], device)
    assert shown.shape[0] == 2 and torch.equal(shown, want)


def test_a_grey_square_is_not_copied_three_times_for_a_tensor_processor():
    square = np.zeros((64, 64), np.uint8)
    t = processor_image(square, torch.device("cpu"))
    assert t.shape == (3, 64, 64) and t.stride(0) == 0  # three views of one plane


@pytest.mark.parametrize("bad", [np.zeros((8, 8), np.float32), np.zeros((8, 8, 4), np.uint8), np.zeros(8, np.uint8)])
def test_an_image_that_is_not_grey_or_rgb_uint8_is_refused(bad):
    with pytest.raises(ValueError, match="uint8"):
        processor_image(bad, torch.device("cpu"))


def _prefix_ends(tok, ids):  # the definition: each prefix decoded
    return [len(tok.decode(ids[: i + 1], skip_special_tokens=True)) for i in range(len(ids))]


def test_token_ends_are_each_prefixs_decoded_length():
    """Token ends found a block at a time are each prefix's decoded length: for English and Chinese answers,
    special tokens among them, and characters written as byte tokens (byte fallback) across a block's start,
    whole or cut off at the end; with a known prefix kept."""
    import random

    from monailabel_app.model.generation import ENDS_BLOCK, _token_ends

    tok = build_processor().tokenizer
    vocab = tok.get_vocab()
    byte = [vocab[f"<0x{b:02X}>"] for b in "肺".encode()] + [vocab[f"<0x{b:02X}>"] for b in "🫁".encode()]
    assert len(byte) == 7  # (the phantom tokenizer falls back to bytes)
    words = tok("Nodule in the right upper zone. 右肺上叶见一结节，约8毫米。左侧少量胸腔积液。",
                add_special_tokens=False)["input_ids"]
    special = sorted(tok.all_special_ids)
    rng = random.Random(3)
    rows = [words * 3, words + [special[0]] + words, words[: ENDS_BLOCK - 2] + byte + words]
    for _ in range(40):  # byte runs (whole characters, parts, orphans) anywhere, mostly near block starts
        row = [rng.choice(words) for _ in range(rng.randrange(1, 70))]
        for _ in range(rng.randrange(0, 4)):
            at = min(len(row), rng.choice([ENDS_BLOCK - 1, ENDS_BLOCK - 2, 2 * ENDS_BLOCK - 3, rng.randrange(70)]))
            run = byte[:3] if rng.random() < 0.5 else byte[3:]
            row[at:at] = run[: rng.randrange(1, len(run) + 1)] if rng.random() < 0.3 else run
        if rng.random() < 0.3:
            row.insert(rng.randrange(len(row) + 1), rng.choice(special))
        rows.append(row)
    for row in rows:
        want = _prefix_ends(tok, row)
        assert _token_ends(tok, row) == want
        cut = len(row) // 3
        assert _token_ends(tok, row, want[:cut]) == want
    assert any(a > b for row in rows for a, b in zip(_prefix_ends(tok, row), _prefix_ends(tok, row)[1:]))  # (a byte
    # run's prefixes decode to more replacement characters than the whole character: ends that go back)


# ------------------------------------------------------------------ a prompt seen before (prompt_ids)


def _ct_content(n: int = 3, seed: int = 5) -> list:
    rng = np.random.default_rng(seed)
    content = []
    for i in range(n):
        content += [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8), f"SLICE {i + 1}"]
    return content


def _tokenisations(processor) -> tuple[list, object]:
    """(a list that grows by one per call of the processor's tokenizer, the patch that counts them)."""
    calls: list = []
    cls = type(processor.tokenizer)
    real = cls.__call__

    def counted(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    return calls, mock.patch.object(cls, "__call__", counted)


def _own(processor, content, question):  # the processor's own inputs, nothing kept
    from monailabel_app.model.generation import chat_messages

    messages = chat_messages([c if isinstance(c, str) else Image.fromarray(c) for c in content], question)
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt")


def test_a_prompt_seen_before_is_not_tokenised_again_and_gives_the_processors_inputs(processor):
    prompt_ids.forget()
    content = _ct_content()
    calls, counting = _tokenisations(processor)
    with counting:
        first = build_inputs(processor, content, "Findings?", None, "cpu", torch.float32)
        assert len(calls) == 1
        again = build_inputs(processor, _ct_content(seed=6), "Findings?", None, "cpu", torch.float32)  # other images
        assert len(calls) == 1  # the same prompt: its ids kept, only the images processed
        other = build_inputs(processor, content, "Any nodule?", None, "cpu", torch.float32)
        assert len(calls) == 2
    want = _own(processor, _ct_content(seed=6), "Findings?")
    assert set(again) == set(want) and all(torch.equal(again[k], want[k]) for k in want)
    assert not torch.equal(again["pixel_values"], first["pixel_values"])  # the new images, not the kept ones
    want = _own(processor, content, "Any nodule?")
    assert all(torch.equal(other[k], want[k]) for k in want)
    assert other["input_ids"].shape != first["input_ids"].shape  # the question is in the ids


@pytest.mark.parametrize("way", ["differs", "fails"])
def test_prompts_are_tokenised_anew_where_the_image_processor_alone_differs_or_fails(processor, caplog, way):
    prompt_ids.forget()
    content = _ct_content()
    real = prompt_ids._images

    def alone(*args):  # an image processor whose own call is not what the processor makes of the images
        if way == "fails":
            raise TypeError("got multiple values for keyword argument 'return_tensors'")
        out = real(*args)
        return {**out, "pixel_values": out["pixel_values"] + 1}

    calls, counting = _tokenisations(processor)
    with counting, mock.patch.object(prompt_ids, "_images", alone):
        got = [build_inputs(processor, content, "Findings?", None, "cpu", torch.float32) for _ in range(2)]
    assert len(calls) == 2 and "tokenised anew" in caplog.text
    want = _own(processor, content, "Findings?")
    assert all(torch.equal(g["pixel_values"], want["pixel_values"]) for g in got)
    prompt_ids.forget()


def test_the_callers_image_processor_arguments_are_left_as_they_were(processor):
    """The processor is given a copy of them (transformers 5.17 adds its own keys to the dict it gets)."""
    prompt_ids.forget()
    kwargs: dict = {"do_resize": True}
    seen = []
    real = prompt_ids._images

    def recorded(proc, images, processor_kwargs):
        seen.append(dict(processor_kwargs))
        return real(proc, images, processor_kwargs)

    with mock.patch.object(prompt_ids, "_images", recorded):
        for _ in range(2):
            prompt_ids.inputs(processor, _messages_of(_ct_content()), _images_of(_ct_content()), kwargs)
    assert kwargs == {"do_resize": True} and seen == [{"do_resize": True}] * 2  # the check, then the kept prompt


def _messages_of(content):
    from monailabel_app.model.generation import chat_messages

    return chat_messages([c if isinstance(c, str) else Image.fromarray(c) for c in content], "Findings?")


def _images_of(content):
    return [Image.fromarray(c) for c in content if not isinstance(c, str)]


def test_only_the_latest_prompts_are_kept(processor):
    prompt_ids.forget()
    content = _ct_content(1)
    calls, counting = _tokenisations(processor)
    with counting, mock.patch.object(prompt_ids, "KEPT", 2):
        for q in ("a?", "b?", "c?", "c?", "b?", "a?"):
            build_inputs(processor, content, q, None, "cpu", torch.float32)
    assert len(calls) == 4  # a, b, c made; c and b kept; a dropped when c came, made again


def test_inputs_written_into_do_not_change_the_kept_prompt(processor):
    prompt_ids.forget()
    content = _ct_content()
    first = build_inputs(processor, content, "Findings?", None, "cpu", torch.float32)
    again = build_inputs(processor, content, "Findings?", None, "cpu", torch.float32)  # from what was kept
    want = again["input_ids"].clone()
    again["input_ids"].fill_(0)  # a caller writing into its inputs
    third = build_inputs(processor, content, "Findings?", None, "cpu", torch.float32)
    assert torch.equal(third["input_ids"], want) and torch.equal(first["input_ids"], want)
