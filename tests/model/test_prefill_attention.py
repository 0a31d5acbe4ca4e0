"""A long prefill's attention by chunks of queries on their spans of keys equals the dense attention."""

import pytest
import torch
from transformers import Gemma3TextConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from monailabel_app.model import prefill_attention
from monailabel_app.model.capture import attention_and_lse
from monailabel_app.model.decoding import prefill_masks


def ct_like_masks(window: int = 24, n: int = 16, images: int = 6, pad: int = 9):
    """Prefill masks of a two-row batch shaped like a CT prompt (text, images of ``n`` tokens each followed by
    a few text tokens, a question), the second row left-padded by ``pad``: (masks, length, padding)."""
    types = [0] * 5
    for _ in range(images):
        types += [1] * n + [0] * 3
    types += [0] * 8
    length = len(types)
    token_types = torch.tensor([types, [0] * pad + types[:-pad]])
    padding = torch.ones(2, length, dtype=torch.long)
    padding[1, :pad] = 0
    config = Gemma3TextConfig(sliding_window=window, layer_types=["sliding_attention", "full_attention"],
                              num_hidden_layers=2)
    return prefill_masks(config, token_types, padding), length, padding


def test_each_chunks_keys_hold_every_key_its_rows_see():
    masks, length, _ = ct_like_masks()
    for kind, mask in masks.items():
        spans = prefill_attention.key_spans(mask, length, chunk=20)
        assert [s[0] for s in spans] == list(range(0, length, 20)) and spans[-1][1] == length
        for q0, q1, k0, k1 in spans:
            rows = mask[:, 0, q0:q1]
            assert not rows[..., :k0].any() and not rows[..., k1:].any(), (kind, q0)
            if rows.any():  # tight: the span's first and last keys are seen
                assert rows[..., k0].any() and rows[..., k1 - 1].any()
        # the saving: a sliding layer's chunks see a window, not the prompt; a full layer's not the future
        work = sum((q1 - q0) * (k1 - k0) for q0, q1, k0, k1 in spans) / length**2
        assert work < (0.5 if kind == "sliding_attention" else 0.75), (kind, work)
        assert prefill_attention.key_spans(mask, length, chunk=20) is spans  # read once per mask


def test_a_chunk_whose_rows_see_nothing_gets_one_masked_key():
    mask = torch.zeros(1, 1, 40, 40, dtype=torch.bool)
    mask[0, 0, 20:, :30] = True
    assert prefill_attention.key_spans(mask, 40, chunk=10)[:2] == [(0, 10, 0, 1), (10, 20, 0, 1)]


class Module(torch.nn.Module):
    num_key_value_groups = 4
    is_causal = True


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the GPU's kernels (cuDNN / memory-efficient attention, bf16)"))])
@pytest.mark.parametrize("kind", ["sliding_attention", "full_attention"])
def test_chunked_attention_and_its_log_sum_exp_equal_the_dense(kind, device):
    """Output (SDPA, as the model's layers call it) and the rollout's log-sum-exp, per chunk of 20 rows against
    the whole prompt at once; the left-padded row's masked rows included. float32 on the CPU, bf16 on a GPU
    (the summation order's rounding: a bf16 step)."""
    masks, length, padding = ct_like_masks()
    mask = masks[kind].to(device)
    dtype, tol = (torch.float32, 1e-5) if device == "cpu" else (torch.bfloat16, 2e-2)
    torch.manual_seed(3)
    q = torch.randn(2, 8, length, 32, device=device, dtype=dtype)
    k, v = (torch.randn(2, 2, length, 32, device=device, dtype=dtype) for _ in range(2))
    dense = sdpa_attention_forward(Module(), q, k, v, mask, scaling=0.2)[0]
    got = prefill_attention.chunked(lambda *a: sdpa_attention_forward(Module(), *a, scaling=0.2)[0], q, k, v, mask,
                                    chunk=20)
    real = padding.bool().to(device)  # rows of real tokens (a padding row sees nothing: the kernel's own value)
    assert got.shape == dense.shape and torch.isfinite(got[real]).all()
    torch.testing.assert_close(got[real].float(), dense[real].float(), atol=tol, rtol=tol)
    out, lse = attention_and_lse(q, k, v, mask, 0.2)
    c_out, c_lse = prefill_attention.chunked(lambda *a: attention_and_lse(*a, 0.2), q, k, v, mask, chunk=20)
    torch.testing.assert_close(c_out[real].float(), out[real].float(), atol=tol, rtol=tol)
    torch.testing.assert_close(c_lse.transpose(1, 2)[real], lse.transpose(1, 2)[real], atol=tol, rtol=tol)


def test_only_long_prefills_with_a_bool_mask_are_chunked(monkeypatch):
    masks, length, _ = ct_like_masks()
    q, k = torch.zeros(2, 8, length, 4), torch.zeros(2, 2, length, 4)
    assert not prefill_attention.wanted(q, k, masks["full_attention"])  # shorter than LONG
    monkeypatch.setattr(prefill_attention, "LONG", length)
    assert prefill_attention.wanted(q, k, masks["full_attention"])
    assert not prefill_attention.wanted(q[:, :, -1:], k, masks["full_attention"][:, :, -1:])  # a decode step
    assert not prefill_attention.wanted(q, k, masks["full_attention"].float())  # an additive mask
    assert not prefill_attention.wanted(q, k, None)


def test_a_ct_read_with_chunked_prefill_says_and_maps_the_same(reader, monkeypatch):
    """The phantom model on a CT of 3 slices (about 800 prompt tokens), its layers' prefill attention dense,
    then in chunks of 96 rows (rollout on: the mixed layers' log-sum-exp per chunk too): the same answer,
    token probabilities and rolled-out attention rows."""
    from PIL import Image

    from monailabel_app.io.ct import interleave, model_slices
    from monailabel_app.model.generation import generate
    from monailabel_app.phantoms.ct import make_ct_phantom, phantom_volume
    from monailabel_app.phantoms.model import CT_QUESTION

    ms = model_slices(phantom_volume(make_ct_phantom(4)), 3)
    content = interleave([Image.fromarray(im) for im in ms.images])
    dense = generate(reader.model, reader.processor, content, CT_QUESTION, [1, 3], max_new_tokens=16, rollout=True)
    monkeypatch.setattr(prefill_attention, "LONG", 256)
    monkeypatch.setattr(prefill_attention, "CHUNK", 96)
    spans = []
    real = prefill_attention.key_spans
    monkeypatch.setattr(prefill_attention, "key_spans", lambda *a, **k: spans.append(1) or real(*a, **k))
    chunked = generate(reader.model, reader.processor, content, CT_QUESTION, [1, 3], max_new_tokens=16, rollout=True)
    assert spans  # the layers went through the chunks
    assert chunked.text == dense.text and chunked.rollout
    assert torch.allclose(chunked.attention, dense.attention, atol=1e-5)
    assert max(abs(a - b) for a, b in zip(chunked.token_probs, dense.token_probs)) < 1e-5
