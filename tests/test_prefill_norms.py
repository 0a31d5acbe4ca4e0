"""A long prefill's RMSNorms compiled into one kernel each (monailabel_app/prefill_norms.py)."""

import pytest
import torch

from monailabel_app import prefill_norms
from monailabel_app.prefill_attention import LONG

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")


def test_the_norm_is_transformers_gemma3_rmsnorm_bit_for_bit():
    """The arithmetic compiled is transformers' own: the same bits in bf16 and float32, for a layer's hidden
    states and for a query's heads."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    torch.manual_seed(0)
    for shape, dtype in (((2, 37, 64), torch.bfloat16), ((1, 11, 4, 16), torch.bfloat16), ((3, 64), torch.float32)):
        norm = Gemma3RMSNorm(shape[-1]).to(dtype)
        with torch.no_grad():
            norm.weight.normal_(0, 0.5)
        x = (torch.randn(shape) * 3).to(dtype)
        assert torch.equal(prefill_norms.rms_norm(x, norm.weight, norm.eps), norm(x))


def test_which_prefills_run_their_norms_compiled(monkeypatch):
    class Model:
        device = torch.device("cuda")

    monkeypatch.delenv(prefill_norms.FUSED_ENV, raising=False)
    assert prefill_norms.wanted(Model(), LONG) and not prefill_norms.wanted(Model(), LONG - 1)
    Model.device = torch.device("cpu")
    assert not prefill_norms.wanted(Model(), 10 * LONG)  # the CPU keeps the library's norms
    Model.device = torch.device("cuda")
    monkeypatch.setenv(prefill_norms.FUSED_ENV, "0")
    assert not prefill_norms.wanted(Model(), 10 * LONG)


def _tiny(device):
    from tests.test_decoding import tiny_model

    return tiny_model(device)


def test_the_norms_go_through_the_kernel_in_the_block_only(monkeypatch):
    """Inside the block every RMSNorm of the language model calls the norm kernel (here its eager arithmetic:
    the CPU has no compiled one to test) and gives the same outputs; after it, the modules are as they were."""
    model = _tiny("cpu")
    calls = []

    def counted(x, weight, eps):
        calls.append(x.shape)
        return prefill_norms.rms_norm(x, weight, eps)

    monkeypatch.setitem(prefill_norms._COMPILED, "fn", counted)
    ids = torch.tensor([[2, 5, 6, 7, 8, 9]])
    with torch.inference_mode():
        plain = model(input_ids=ids).logits
        with prefill_norms.fused(model):
            inside = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    layers = model.config.text_config.num_hidden_layers
    assert len(calls) == 6 * layers + 1  # four per layer, its queries' and keys', and the final norm
    assert torch.equal(inside, plain) and torch.equal(after, plain)
    norms = [m for m in model.model.language_model.modules() if type(m).__name__ == prefill_norms.NORM_CLASS]
    assert norms and all("forward" not in m.__dict__ for m in norms)
    with prefill_norms.fused(model, on=False):
        assert all("forward" not in m.__dict__ for m in norms)


@GPU
def test_the_compiled_norm_on_the_gpu_rounds_as_the_eager_one():
    """The compiled kernel on a CT prefill's shapes: its mean is summed in another order, so an output may
    differ from eager's by one bf16 rounding step, never more; the tiny model's logits stay within that."""
    torch.manual_seed(0)
    fn = prefill_norms._compiled()
    for shape in ((1, LONG + 17, 2560), (1, LONG + 17, 8, 256)):
        x = (torch.randn(shape, device="cuda") * 4).bfloat16()
        w = torch.randn(shape[-1], device="cuda") * 0.5
        got, want = fn(x, w, 1e-6).float(), prefill_norms.rms_norm(x, w, 1e-6).float()
        step = want.abs().clamp_min(1e-30) * 2.0**-7  # one bf16 step at that magnitude
        assert ((got - want).abs() <= step).all()
        assert (got == want).float().mean() > 0.98
    model = _tiny("cuda")
    ids = torch.tensor([[2, 5, 6, 7, 8, 9]], device="cuda")
    with torch.inference_mode():
        plain = model(input_ids=ids).logits
        with prefill_norms.fused(model):
            inside = model(input_ids=ids).logits
    torch.testing.assert_close(inside, plain, rtol=2e-2, atol=2e-2)
    assert "failed" not in prefill_norms._COMPILED
