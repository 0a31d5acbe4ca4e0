"""The vision tower's MLPs with their GELU in the first product's epilogue, on CUDA.

SigLIP's MLP is ``fc2(gelu_tanh(fc1(x)))``. Over a CT's 85 images of 4,096 patches, the GELU between the two
products is a kernel of its own that reads and writes the whole (images x 4,096 x 4,304) activation in each of
27 layers: 58 ms of the prefill on an H200 (run BL, ``bench/results/fast_path_profiles.md``). On CUDA
``torch._addmm_activation(..., use_gelu=True)`` adds the bias and applies the tanh GELU in cuBLASLt's epilogue
while the product's tile is still in registers, so that pass is gone. The numbers: the epilogue applies the GELU
to the float32 sum before rounding, transformers' path to the bias-added product rounded to the model's type
(a difference of about one step of bfloat16).

PyTorch's CPU kernel for the same call applies the exact (erf) GELU, not the tanh one, so the epilogue is used
only where a probe on the device (:func:`epilogue_is_tanh_gelu`, once per device) finds it gives the tanh GELU;
everywhere else, and for quantised or bias-free layers, the module's own forward runs. :data:`ENABLED` off
(``bench/prefill_ab.py``'s ``gelu-apart``) gives transformers' path.
"""

from __future__ import annotations

import logging
import types

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

ENABLED = True
TANH_GELU = ("gelu_pytorch_tanh",)  # the activations the epilogue computes (SigLIP's in MedGemma)
_PROBED: dict[str, bool] = {}  # device -> whether the call gives the tanh GELU there


def epilogue_is_tanh_gelu(device: torch.device) -> bool:
    """Whether ``torch._addmm_activation(..., use_gelu=True)`` on ``device`` gives the bias-added product's tanh
    GELU (float32, a small product; once per device): True on CUDA (cuBLASLt's epilogue, or PyTorch's own tanh
    GELU after the product where that is not taken), False on the CPU (its exact GELU)."""
    key = str(device)
    if key not in _PROBED:
        generator = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(shape, generator=generator).to(device) * 3 for shape in ((64, 96), (128, 96), (128,)))
        got = torch._addmm_activation(b, x, w.t(), use_gelu=True)
        want = F.gelu(F.linear(x, w, b), approximate="tanh")
        _PROBED[key] = bool(torch.allclose(got, want, rtol=1e-4, atol=1e-4))
        if not _PROBED[key]:
            logger.info("the product's GELU epilogue on %s is not the tanh GELU: the vision MLPs keep theirs", key)
    return _PROBED[key]


def install(tower) -> int:
    """:func:`forward` on each SigLIP MLP of ``tower`` whose activation is the tanh GELU and whose first product is
    a plain ``nn.Linear`` with a bias; the number installed."""
    mlps = [m for m in tower.modules() if _takes(m)]
    for mlp in mlps:
        mlp.forward = types.MethodType(forward, mlp)
    return len(mlps)


def _takes(mlp) -> bool:
    fc1 = getattr(mlp, "fc1", None)
    config = getattr(mlp, "config", None)
    return (hasattr(mlp, "fc2") and getattr(config, "hidden_act", None) in TANH_GELU and type(fc1) is torch.nn.Linear
            and type(fc1.weight.data) is torch.Tensor and fc1.bias is not None)


def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """The MLP with its GELU in ``fc1``'s epilogue where the device gives the tanh GELU, else its own forward (also
    once its first product is no longer a plain layer: quantised after :func:`install`)."""
    if not (ENABLED and _takes(self) and epilogue_is_tanh_gelu(hidden_states.device)):
        return type(self).forward(self, hidden_states)
    flat = hidden_states.reshape(-1, hidden_states.shape[-1])
    act = torch._addmm_activation(self.fc1.bias, flat, self.fc1.weight.t(), use_gelu=True)
    return self.fc2(act.view(*hidden_states.shape[:-1], act.shape[-1]))
