"""Queries, keys and values as one product in the decode step (an MLP's gate and up likewise): the same
weights (views, no second copy),
the same attention output as transformers' own forward, the same decoding, and quantised or moved
layers handled."""

import torch

from monailabel_app.model import projections
from monailabel_app.model.decoding import prefill_and_decode
from tests.model.test_decoding import batch, prompt, tiny_model


def _param_bytes(model) -> int:
    return sum(p.untyped_storage().nbytes() for p in {p.untyped_storage().data_ptr(): p for p in model.parameters()}.values())


def test_fused_weights_are_the_three_projections_without_a_copy():
    model = tiny_model("cpu")
    attn = model.model.language_model.layers[0].self_attn
    q, k, v = (m.weight.detach().clone() for m in (attn.q_proj, attn.k_proj, attn.v_proj))
    assert projections.fuse(attn)
    assert torch.equal(attn.qkv_weight, torch.cat([q, k, v]))
    for m, w in zip((attn.q_proj, attn.k_proj, attn.v_proj), (q, k, v)):
        assert torch.equal(m.weight, w) and m.weight.untyped_storage().data_ptr() == attn.qkv_weight.untyped_storage().data_ptr()
    fused = attn.qkv_weight
    assert projections.fuse(attn) and attn.qkv_weight is fused  # once
    with torch.no_grad():
        attn.k_proj.weight.add_(1.0)  # a weight written in place is the fused one's rows
    assert torch.equal(attn.qkv_weight[q.shape[0]:q.shape[0] + k.shape[0]], k + 1.0)


def test_fused_forward_equals_the_modules_own():
    model = tiny_model("cpu")
    lm = model.model.language_model
    attn = lm.layers[3].self_attn  # the global layer
    torch.manual_seed(2)
    hidden = torch.randn(2, 5, 64)
    positions = torch.arange(5)[None].expand(2, 5)
    rotary = lm.rotary_emb
    try:
        pe = rotary(hidden, positions, "full_attention")
    except TypeError:  # transformers before one rotary module per layer type
        pe = lm.rotary_emb(hidden, positions)
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    want, _ = attn(hidden_states=hidden, position_embeddings=pe, attention_mask=mask)
    fused = [layer.self_attn for layer in lm.layers if projections.fuse(layer.self_attn)]
    assert len(fused) == 4
    with projections.installed(fused):
        assert "forward" in vars(attn)
        got, _ = attn(hidden_states=hidden, position_embeddings=pe, attention_mask=mask)
    assert "forward" not in vars(attn)  # the module's own forward again
    assert torch.allclose(got, want, atol=1e-5)


def test_the_mlps_gate_and_up_as_one_product():
    """The MLP's gate and up weights become views of one weight, and its fused forward equals its own."""
    model = tiny_model("cpu")
    mlp = model.model.language_model.layers[1].mlp
    gate, up = (m.weight.detach().clone() for m in (mlp.gate_proj, mlp.up_proj))
    torch.manual_seed(3)
    x = torch.randn(2, 5, 64)
    want = mlp(x)
    assert projections.fuse_mlp(mlp) and torch.equal(mlp.gate_up_weight, torch.cat([gate, up]))
    assert mlp.gate_proj.weight.untyped_storage().data_ptr() == mlp.gate_up_weight.untyped_storage().data_ptr()
    fused = mlp.gate_up_weight
    assert projections.fuse_mlp(mlp) and mlp.gate_up_weight is fused  # once
    with projections.installed([], [mlp]):
        got = mlp(x)
    assert "forward" not in vars(mlp)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    other = model.model.language_model.layers[2].mlp
    other.up_proj = _Quantised(other.up_proj.in_features, other.up_proj.out_features, bias=False)
    assert not projections.fuse_mlp(other) and not hasattr(other, "gate_up_weight")


def _read(model, inputs):
    r = prefill_and_decode(model, inputs, [3], 4, 16, stop_loops=False)
    return [row.token_ids for row in r.rows], torch.tensor([row.logprobs for row in r.rows]), r.attention


def test_decoding_with_and_without_the_fused_product_agree(monkeypatch):
    model = tiny_model("cpu")
    torch.manual_seed(1)
    images = torch.rand(4, 3, 28, 28) * 2 - 1
    inputs = batch([prompt([5, 6, 7, 8, 9]), prompt([12, 13])], images)
    fused = _read(model, inputs)
    assert all(hasattr(layer.self_attn, "qkv_weight") for layer in model.model.language_model.layers)
    assert all(hasattr(layer.mlp, "gate_up_weight") for layer in model.model.language_model.layers)
    monkeypatch.setattr(projections, "fuse", lambda attn: False)
    monkeypatch.setattr(projections, "fuse_mlp", lambda mlp: False)
    monkeypatch.setattr(projections, "fused_forward", None)  # would fail if a layer still took it
    monkeypatch.setattr(projections, "fused_mlp_forward", None)
    model.__dict__.pop("_medgemma_decoders", None)  # a new decoder, which fuses nothing
    alone = _read(model, inputs)
    assert fused[0] == alone[0]
    assert torch.allclose(fused[1], alone[1], atol=1e-5) and torch.allclose(fused[2], alone[2], atol=1e-6)


class _Quantised(torch.nn.Linear):
    """A stand-in for a quantised projection module (a bitsandbytes layer is a Linear subclass)."""


def test_quantised_or_moved_layers():
    model = tiny_model("cpu")
    attn = model.model.language_model.layers[1].self_attn
    k = attn.k_proj
    attn.k_proj = _Quantised(k.in_features, k.out_features, bias=False)
    attn.k_proj.weight = k.weight
    assert not projections.fuse(attn) and not hasattr(attn, "qkv_weight")
    other = model.model.language_model.layers[2].self_attn
    assert projections.fuse(other)
    before = _param_bytes(model)
    model.to(torch.float64)  # new tensors: the views are gone, fusing again makes the fused weight anew
    assert projections.fuse(other) and other.qkv_weight.dtype == torch.float64
    assert other.q_proj.weight.untyped_storage().data_ptr() == other.qkv_weight.untyped_storage().data_ptr()
    assert _param_bytes(model) == 2 * before


def test_a_fused_model_saves_and_loads(tmp_path):
    from transformers import Gemma3ForConditionalGeneration

    model = tiny_model("cpu")
    for layer in model.model.language_model.layers:
        projections.fuse(layer.self_attn)
        projections.fuse_mlp(layer.mlp)
    model.save_pretrained(tmp_path, safe_serialization=True)
    back = Gemma3ForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32)
    mine, theirs = model.state_dict(), back.state_dict()
    assert set(mine) == set(theirs)
    assert all(torch.equal(mine[n], theirs[n]) for n in mine)
