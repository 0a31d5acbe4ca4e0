"""An attention layer's queries, keys and values as one matrix product in the decode step, and an MLP's
gate and up projections likewise.

A decode step multiplies one new token per row by every weight matrix: each product only reads its
weights, so its time is their bytes over the card's bandwidth, when the library picks a good kernel. For
MedGemma-4B's small projections it does not: on an H200, cuBLAS takes 15 us for the 5 MB key projection
(350 GB/s) and 6.5 us for the queries', keys' and values' 21 MB together (3.2 TB/s;
``bench/results/decode_gemm.md``). :func:`fuse` puts the three weight matrices into one tensor and makes the
three ``nn.Linear`` weights views of it (no second copy; prefill, saving and loading see the same modules);
:func:`fused_forward` is the layer's attention with one product for the three, which the decode step
(:mod:`decoding`) fuses once per decoder and installs on each layer while it traces or runs the step.
Everything after the product is transformers' own Gemma 3 attention (norms, rotary positions, the cache, the registered attention function).

Quantised layers (torchao tensor subclasses, bitsandbytes modules) keep their own three products.
"""

from __future__ import annotations

import sys
import types
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

NEEDED = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm", "head_dim", "scaling", "layer_idx")


def _plain_linear(m) -> bool:
    return type(m) is torch.nn.Linear and type(m.weight.data) is torch.Tensor


def fuse(attn) -> bool:
    """Give ``attn`` (a Gemma 3 attention module) one (q + k + v, hidden) weight ``qkv_weight`` whose rows are
    the three projections' weights, those weights becoming views of it. False (and nothing changed) for a
    module that is not plain ``nn.Linear`` projections of one dtype and device."""
    if not all(hasattr(attn, a) for a in NEEDED):
        return False
    return _fuse_rows(attn, ("q_proj", "k_proj", "v_proj"), "qkv")


def fuse_mlp(mlp) -> bool:
    """Give ``mlp`` (a Gemma 3 MLP) one (2 x intermediate, hidden) weight ``gate_up_weight``, the gate's and
    the up projection's rows (their weights become views of it), as :func:`fuse` does for an attention layer:
    at one row per token cuBLAS reads the 105 MB of the two at 3.6 TB/s, against 3.4 for each alone
    (``bench/results/decode_gemm.md``). False (and nothing changed) where they are not plain ``nn.Linear``."""
    if not all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return False
    return _fuse_rows(mlp, ("gate_proj", "up_proj"), "gate_up")


def _fuse_rows(owner, names: tuple[str, ...], prefix: str) -> bool:
    """``owner``'s linear modules ``names`` as row blocks of one weight ``{prefix}_weight`` (and bias), their
    own weights views of it; ``{prefix}_sizes``: their output sizes. False where they cannot share one."""
    mods = [getattr(owner, n) for n in names]
    if not all(_plain_linear(m) for m in mods) or len({(m.weight.dtype, m.weight.device) for m in mods}) != 1 \
            or len({m.bias is None for m in mods}) != 1:
        return False
    fused = getattr(owner, f"{prefix}_weight", None)
    if fused is not None and all(_shares(m.weight, fused) for m in mods):
        return True  # already (and still: a move to another device makes new tensors)
    with torch.no_grad():
        weight = torch.cat([m.weight.detach() for m in mods])
        bias = None if mods[0].bias is None else torch.cat([m.bias.detach() for m in mods])
    sizes = [m.out_features for m in mods]
    for m, w, b in zip(mods, weight.split(sizes), bias.split(sizes) if bias is not None else [None] * len(mods)):
        m.weight = torch.nn.Parameter(w, requires_grad=False)
        if b is not None:
            m.bias = torch.nn.Parameter(b, requires_grad=False)
    setattr(owner, f"{prefix}_weight", weight)
    setattr(owner, f"{prefix}_bias", bias)
    setattr(owner, f"{prefix}_sizes", sizes)
    return True


def _shares(part: torch.Tensor, whole: torch.Tensor) -> bool:
    return part.device == whole.device and part.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()


def fused_forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
    """transformers' ``Gemma3Attention.forward`` with the three projections as one product (installed on a
    module by :func:`installed`; ``self`` is the attention module)."""
    cache = kwargs.pop("cache", kwargs.pop("past_key_values", None))  # the keyword's name changed in transformers 5.2x
    shape = (*hidden_states.shape[:-1], -1, self.head_dim)
    qkv = F.linear(hidden_states, self.qkv_weight, self.qkv_bias)
    query, key, value = (t.view(shape).transpose(1, 2) for t in qkv.split(self.qkv_sizes, dim=-1))
    query, key = self.q_norm(query), self.k_norm(key)
    modeling = sys.modules[type(self).__module__]
    cos, sin = position_embeddings
    query, key = modeling.apply_rotary_pos_emb(query, key, cos, sin)
    if cache is not None:
        key, value = cache.update(key, value, self.layer_idx)
    impl = self.config._attn_implementation
    attend = modeling.eager_attention_forward if impl == "eager" else ALL_ATTENTION_FUNCTIONS[impl]
    out, weights = attend(self, query, key, value, attention_mask, dropout=0.0, scaling=self.scaling,
                          sliding_window=getattr(self, "sliding_window", None), **kwargs)
    return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights


def fused_mlp_forward(self, x):
    """transformers' ``Gemma3MLP.forward`` with the gate and up projections as one product."""
    gate, up = F.linear(x, self.gate_up_weight, self.gate_up_bias).split(self.gate_up_sizes, dim=-1)
    return self.down_proj(self.act_fn(gate) * up)


@contextmanager
def installed(fused, mlps=()):
    """:func:`fused_forward` on each attention module of ``fused`` (modules :func:`fuse` accepted) and
    :func:`fused_mlp_forward` on each MLP of ``mlps`` (:func:`fuse_mlp`), for the duration (the modules' own
    forward after)."""
    try:
        for m in fused:
            m.forward = types.MethodType(fused_forward, m)
        for m in mlps:
            m.forward = types.MethodType(fused_mlp_forward, m)
        yield
    finally:
        for m in [*fused, *mlps]:
            m.__dict__.pop("forward", None)
