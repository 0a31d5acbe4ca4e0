"""Gemma 3's RMS norms, compiled for the GPU prefill: transformers' arithmetic, installed only inside the block."""

import logging
from types import SimpleNamespace

import pytest
import torch
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

from monailabel_app.model import fused_norms

from tests.model.test_decoding import tiny_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_norm_is_transformers_gemma3_rms_norm(dtype):
    torch.manual_seed(0)
    norm = Gemma3RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(0, 0.5)
    x = (torch.randn(3, 17, 64) * 4).to(dtype)
    assert torch.equal(fused_norms.rms_norm(x, norm.weight, norm.eps), norm(x))
    # not a plain copy of its input: the scale changes every row
    assert not torch.allclose(fused_norms.rms_norm(x, norm.weight, norm.eps).float(), x.float(), atol=1e-2)


def test_nothing_is_installed_on_the_cpu_without_compiling_or_for_a_short_prompt():
    model = tiny_model("cpu")
    for compile in (True, False):
        with fused_norms.installed(model, compile) as count:
            assert count == 0
            assert not any("forward" in m.__dict__ for m in fused_norms.norms(model))
    assert not fused_norms.wanted(model, True, 10**6)  # the CPU
    on_gpu = SimpleNamespace(device=torch.device("cuda"))  # what the policy reads, not a GPU to run on
    assert fused_norms.wanted(on_gpu, True, fused_norms.MIN_TOKENS)
    assert not fused_norms.wanted(on_gpu, True, fused_norms.MIN_TOKENS - 1)  # a film's prompt
    assert not fused_norms.wanted(on_gpu, False, 10**6)


def test_installed_norms_give_the_models_logits_and_are_removed_after(monkeypatch):
    model = tiny_model("cpu")
    found = fused_norms.norms(model)
    assert len(found) == 4 * 6 + 2  # six in each of 4 text layers, the final norm, the projector's
    ids = torch.tensor([[2, 5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    monkeypatch.setattr(fused_norms, "wanted", lambda model, compile, tokens: True)
    with fused_norms.installed(model, True) as count, torch.no_grad():
        assert count == len(found) and all("forward" in m.__dict__ for m in found)
        inside = model(input_ids=ids).logits
    assert not any("forward" in m.__dict__ for m in found)
    assert torch.allclose(inside, before, atol=1e-5)


def test_a_failed_compile_leaves_transformers_arithmetic(monkeypatch, caplog):
    def refuse(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", refuse)
    monkeypatch.setattr(fused_norms, "_compiled", None)
    monkeypatch.setattr(fused_norms, "_failed", [])
    monkeypatch.setattr(fused_norms, "wanted", lambda model, compile, tokens: True)
    model = tiny_model("cpu")
    ids = torch.tensor([[2, 5, 6, 7]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with caplog.at_level(logging.WARNING), fused_norms.installed(model, True):
            inside = model(input_ids=ids).logits
    assert torch.equal(inside, before)
    assert "compiling the RMS norms failed (no compiler here)" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the norms are compiled for CUDA prefills only")
def test_a_gpu_prefill_with_compiled_norms_gives_generates_tokens(monkeypatch):
    """On the GPU, with the norms compiled for every prefill (the threshold lowered to the tiny prompt), the
    decoder's tokens and log-probabilities are transformers' ``generate``'s, and the norms were the compiled ones."""
    from tests.model.test_decoding import batch, prompt, reference

    from monailabel_app.model.decoding import prefill_and_decode

    model = tiny_model("cuda")
    monkeypatch.setattr(fused_norms, "MIN_TOKENS", 1)
    calls = []
    real = fused_norms._forward
    monkeypatch.setattr(fused_norms, "_forward", lambda self, x: calls.append(1) or real(self, x))
    torch.manual_seed(1)
    images = (torch.rand(2, 3, 28, 28) * 2 - 1).cuda()
    inputs = batch([prompt([5, 6, 7, 8])], images)
    result = prefill_and_decode(model, inputs, [3], 4, 12, stop_loops=False, compile=True)
    tokens, logp = reference(model, inputs, 12)
    assert calls and not fused_norms._failed
    assert [r.token_ids for r in result.rows] == tokens
    assert torch.allclose(torch.tensor([r.logprobs for r in result.rows]), logp.cpu(), atol=1e-4)
    assert not any("forward" in m.__dict__ for m in fused_norms.norms(model))
