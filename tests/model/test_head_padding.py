"""The vision tower's heads zero-padded for its attention (head_padding): the same features as the heads' own width,
used only on the long unmasked calls of a device it is switched on for."""

import pytest
import torch

from monailabel_app.model import head_padding


def test_only_long_unmasked_narrow_heads_on_a_padded_device_are_padded(monkeypatch):
    monkeypatch.setattr(head_padding, "WIDTH", 96)
    q = torch.zeros(1, 2, head_padding.LONG, 72)
    assert not head_padding.wanted(q, None)  # the CPU is not a padded device
    monkeypatch.setattr(head_padding, "DEVICES", ("cpu",))
    assert head_padding.wanted(q, None)
    assert not head_padding.wanted(q, torch.ones(1, 1, head_padding.LONG, head_padding.LONG, dtype=torch.bool))
    assert not head_padding.wanted(q[:, :, :-1], None)  # short: text, a decode step
    assert not head_padding.wanted(torch.zeros(1, 2, head_padding.LONG, 96), None)
    assert not head_padding.wanted(torch.zeros(1, 2, head_padding.LONG, 256), None)
    monkeypatch.setattr(head_padding, "WIDTH", 0)
    assert not head_padding.wanted(q, None)


def test_the_phantom_towers_features_are_the_same_with_its_heads_padded(monkeypatch):
    """Every layer of the phantom model's tower padded (on the CPU here, switched on for the test): the same features
    in float32, so the scale is the heads' own width's and the padded columns are cut off."""
    from monailabel_app.reader import Reader

    model = Reader(precision="fp32").model
    tower = model.model.vision_tower
    config = model.config.vision_config
    size, width = config.image_size, config.hidden_size // config.num_attention_heads
    pixels = torch.randn(3, 3, size, size)
    with torch.inference_mode():
        own = tower(pixel_values=pixels).last_hidden_state
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[1].shape)
        return padded(*args, **kwargs)

    padded = head_padding.padded
    monkeypatch.setattr(head_padding, "padded", counted)
    monkeypatch.setattr(head_padding, "WIDTH", width + 24)
    monkeypatch.setattr(head_padding, "DEVICES", ("cpu",))
    monkeypatch.setattr(head_padding, "LONG", 1)
    with torch.inference_mode():
        got = tower(pixel_values=pixels).last_hidden_state
    assert len(calls) == config.num_hidden_layers and all(shape[-1] == width for shape in calls)
    assert got.shape == own.shape and torch.allclose(got, own, atol=1e-5)
    assert not torch.equal(got, tower(pixel_values=torch.randn_like(pixels)).last_hidden_state)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("width", [80, 96, 128])
def test_siglips_attention_padded_on_the_gpu_is_the_same_to_bf16s_rounding(monkeypatch, width):
    """MedGemma's tower shape (16 heads of 72 over 4,096 patches) in bf16 on the GPU, through the library's
    attention function, padded and not."""
    from transformers.models.siglip.configuration_siglip import SiglipVisionConfig
    from transformers.models.siglip.modeling_siglip import SiglipAttention

    from monailabel_app.model.capture import CAPTURE_ATTN

    config = SiglipVisionConfig(hidden_size=1152, num_attention_heads=16)
    config._attn_implementation = CAPTURE_ATTN
    attention = SiglipAttention(config).to("cuda", torch.bfloat16).eval()
    x = torch.randn(2, 4096, 1152, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        own = attention(x)[0].float()
        monkeypatch.setattr(head_padding, "WIDTH", width)
        got = attention(x)[0].float()
    assert head_padding.wanted(torch.zeros(1, 16, 4096, 72, device="cuda"), None)
    assert torch.allclose(got, own, atol=2e-2, rtol=2e-2), float((got - own).abs().max())
