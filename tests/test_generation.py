"""What the model is shown: a film's grey square and a CT's RGB slices handed over as arrays give the
processor's pixel values of the RGB PIL images they stand for, with either image processor and on a GPU."""

import numpy as np
import pytest
import torch
from PIL import Image

from monailabel_app.generation import build_inputs, processor_image
from monailabel_app.phantom_model import build_processor
from monailabel_app.phantoms import make_phantom
from monailabel_app.xray import pad_to_square

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
