"""The vision tower's MLPs with their GELU in the first product's epilogue (vision_mlp): installed on SigLIP's tanh-GELU
MLPs only, used only where the device's epilogue gives the tanh GELU (a CUDA card; not PyTorch's CPU kernel, whose
GELU is the exact one), and the same products as the module's own."""

import pytest
import torch
import torch.nn.functional as F

from monailabel_app.model import vision_mlp


def siglip_mlp(hidden=24, inner=40, act="gelu_pytorch_tanh"):
    from transformers.models.siglip.configuration_siglip import SiglipVisionConfig
    from transformers.models.siglip.modeling_siglip import SiglipMLP

    return SiglipMLP(SiglipVisionConfig(hidden_size=hidden, intermediate_size=inner, hidden_act=act)).eval()


def test_installed_on_the_phantom_towers_mlps_and_only_on_tanh_gelu_plain_layers():
    from monailabel_app.reader import Reader

    tower = Reader(precision="fp32").model.model.vision_tower
    layers = tower.config.num_hidden_layers
    assert vision_mlp.install(tower) == layers
    encoder = getattr(tower, "vision_model", tower).encoder
    assert all("forward" in layer.mlp.__dict__ for layer in encoder.layers)
    erf, no_bias = siglip_mlp(act="gelu"), siglip_mlp()
    no_bias.fc1.bias = None
    assert vision_mlp.install(erf) == 0 and vision_mlp.install(no_bias) == 0


def test_an_installed_mlp_gives_the_modules_own_output_on_this_device():
    """Here (the CPU in CI) the probe decides: the module's own forward where the epilogue is not the tanh GELU (the
    same numbers), the epilogue where it is (the same to float32's rounding)."""
    mlp = siglip_mlp()
    x = torch.randn(2, 5, 24) * 3
    own = mlp(x)
    vision_mlp.install(mlp)
    got = mlp(x)
    assert got.shape == own.shape
    if vision_mlp.epilogue_is_tanh_gelu(x.device):
        assert torch.allclose(got, own, rtol=1e-4, atol=1e-5)
    else:
        assert torch.equal(got, own)


def test_the_epilogue_path_adds_the_bias_and_multiplies_as_the_module(monkeypatch):
    """The epilogue's path run on the CPU (its probe overridden): the GELU of the bias-added first product, which on
    this CPU is the exact GELU or the tanh one, then the second product, over a (images, patches, width) batch."""
    monkeypatch.setitem(vision_mlp._PROBED, "cpu", True)
    mlp = siglip_mlp()
    vision_mlp.install(mlp)
    x = torch.randn(3, 7, 24) * 3
    got = mlp(x)
    first = F.linear(x, mlp.fc1.weight, mlp.fc1.bias)
    outs = [mlp.fc2(F.gelu(first, approximate=a)) for a in ("none", "tanh")]
    assert got.shape == (3, 7, 24)
    assert any(torch.allclose(got, out, atol=1e-5) for out in outs)
    monkeypatch.setattr(vision_mlp, "ENABLED", False)
    assert torch.equal(mlp(x), mlp.fc2(F.gelu(first, approximate="tanh")))
    monkeypatch.setattr(vision_mlp, "ENABLED", True)
    mlp.fc1.bias = None  # (a layer changed after install: its own forward)
    assert torch.equal(mlp(x), mlp.fc2(F.gelu(F.linear(x, mlp.fc1.weight), approximate="tanh")))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuBLASLt's epilogue: GPU only")
def test_on_the_gpu_the_epilogue_is_the_tanh_gelu_to_the_models_precision():
    """On CUDA in MedGemma's SigLIP widths: float32 the module's own output to float32's rounding; bfloat16 within a
    step or two of bfloat16 of its largest value (the epilogue rounds after the GELU, the module before it)."""
    assert vision_mlp.epilogue_is_tanh_gelu(torch.device("cuda"))
    for dtype, tolerance in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        mlp = siglip_mlp(1152, 4304).to("cuda", dtype)
        x = torch.randn(4, 4096, 1152, device="cuda", dtype=dtype)
        with torch.inference_mode():
            own = mlp(x)
            vision_mlp.install(mlp)
            got = mlp(x)
        assert ((got.float() - own.float()).abs().max() / own.float().abs().max()).item() < tolerance, dtype
