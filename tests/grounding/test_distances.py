"""The distance inside a mask (edt) against scipy's distance_transform_edt, which it replaces."""

import numpy as np
from scipy import ndimage

from monailabel_app.grounding.distances import inside, inside_here


def test_distance_inside_equals_scipys_to_float32_rounding():
    rng = np.random.default_rng(7)
    for shape, spacing in (((12, 40, 35), (2.5, 0.6, 0.7)), ((50, 61), (0.4, 0.9)), ((9, 9, 9), (1.0, 1.0, 1.0))):
        mask = ndimage.gaussian_filter(rng.normal(size=shape), 1.5) > -0.2
        mask[(0,) * len(shape)] = True  # a corner inside: the array's edge is not a border
        got = inside(mask[..., 1:], spacing)  # a view, not contiguous
        want = ndimage.distance_transform_edt(mask[..., 1:], sampling=spacing)
        assert got.dtype == np.float32 and got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-5 * max(1.0, want.max())
        assert not got[~mask[..., 1:]].any()
    assert inside(np.zeros((0, 4), bool), (1.0, 1.0)).shape == (0, 4)


def test_distances_on_several_threads_are_the_same_bits():
    """edt on several threads of its own (a map thread's call: it holds the interpreter anyway) gives the
    one-thread distances bit for bit."""
    rng = np.random.default_rng(8)
    for shape, spacing in (((30, 70, 66), (2.5, 0.6, 0.7)), ((120, 97), (0.4, 0.9))):
        mask = ndimage.gaussian_filter(rng.normal(size=shape), 2.0) > -0.3
        one = inside_here(mask, spacing, 1)
        for threads in (2, 4):
            assert np.array_equal(inside_here(mask, spacing, threads), one), threads


def test_squared_distances_in_torch_are_edts_to_float32_rounding():
    """distances.squared_inside_torch (the deepest voxel's distances on a GPU): the root of its squared distances
    is edt's distance to float32 rounding, with the array's edge not a border, 0 outside, inf where nothing
    is outside; on blobs, a box (every depth of a plateau tied) and blobs that touch the array's edges."""
    import torch

    from monailabel_app.grounding.distances import squared_inside_torch

    rng = np.random.default_rng(9)
    box = np.zeros((14, 30, 26), bool)
    box[2:12, 5:25, 4:22] = True
    cases = [(box, (2.5, 0.6, 0.7))]
    for shape, spacing in (((12, 40, 35), (2.5, 0.6, 0.7)), ((20, 33, 47), (1.0, 1.0, 1.0)), ((7, 64, 9), (0.8, 3.0, 0.5))):
        mask = ndimage.gaussian_filter(rng.normal(size=shape), 1.5) > -0.2
        mask[0, 0, :] = True  # the array's edge inside: not a border
        cases.append((mask, spacing))
    for mask, spacing in cases:
        want = inside_here(mask, spacing)
        got = squared_inside_torch(torch.from_numpy(mask), spacing)
        assert got.dtype == torch.float64 and tuple(got.shape) == mask.shape
        assert np.abs(got.sqrt().numpy() - want).max() <= 1e-5 * max(1.0, float(want.max()))
        assert not got.numpy()[~mask].any()
    whole = squared_inside_torch(torch.ones((3, 4, 5), dtype=torch.bool), (1.0, 1.0, 1.0))
    assert torch.isinf(whole).all()  # nothing outside: inf, as edt gives
    assert not squared_inside_torch(torch.zeros((3, 4, 5), dtype=torch.bool), (1.0, 1.0, 1.0)).any()


def test_the_envelope_kernel_gives_torchs_values_bit_for_bit():
    """envelope_kernel (the GPU's lower envelopes in one Triton kernel, the default on a GPU) gives the torch
    blocks' values bit for bit: here in Triton's interpreter on the CPU (a fresh process: the mode is read when
    the kernel is defined), on lines longer than its blocks of 64 and not a multiple of them, lines wholly
    outside and lines with nothing outside (inf). test_device_maps runs the same check compiled on the GPU."""
    assert envelope_check("cpu", TRITON_INTERPRET="1") == ["same"] * 3


def test_the_envelope_kernel_compiled_for_an_h100_rounds_as_torch_does():
    """The kernel compiled for an H100 (sm_90; no GPU needed) with the options it is launched with: float64
    products and sums, and no fused multiply-add. Triton fuses them by default; on an H100 the fused kernel's
    values then differed from torch's blocks by 2.8e-14 (run CX). The interpreter test cannot see this."""
    import re

    import pytest

    triton = pytest.importorskip("triton", reason="Triton is declared on Linux only")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from monailabel_app.grounding import envelope_kernel

    signature = {"f_ptr": "*fp64", "out_ptr": "*fp64", "n": "i32", "w_ptr": "*fp64", "BLOCK_I": "constexpr",
                 "BLOCK_Q": "constexpr"}
    source = ASTSource(fn=envelope_kernel._envelope, signature=signature,
                       constexprs={"BLOCK_I": envelope_kernel.BLOCK_I, "BLOCK_Q": envelope_kernel.BLOCK_Q})
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=envelope_kernel.OPTIONS).asm["ptx"]
    assert re.search(r"\bmul\.rn\.f64\b", ptx) and re.search(r"\badd\.rn\.f64\b", ptx)
    assert not re.search(r"\bfma\.rn\.f64\b", ptx)


def test_a_kernel_that_cannot_be_built_leaves_torchs_blocks_with_a_warning(monkeypatch, caplog):
    """Where the GPU's default kernel fails (no Triton, no compiler for its launcher), squared_inside_torch says
    so once and gives the blocks' values from then on; a kernel asked for by name raises instead."""
    import logging

    import pytest
    import torch

    from monailabel_app.grounding import distances, envelope_kernel

    def broken(flat, w):
        raise RuntimeError("no compiler for the launcher")

    monkeypatch.setattr(envelope_kernel, "lower_envelopes", broken)
    monkeypatch.setattr(distances, "ENVELOPE_KERNEL", True)
    monkeypatch.setattr(distances, "_kernel_by_default", lambda mask: distances.ENVELOPE_KERNEL)  # as on a GPU
    mask = torch.zeros((4, 9, 8), dtype=torch.bool)
    mask[1:3, 2:7, 1:6] = True
    want = distances.squared_inside_torch(mask, (2.5, 0.6, 0.7), kernel=False)
    with caplog.at_level(logging.WARNING, logger=distances.__name__):
        assert torch.equal(distances.squared_inside_torch(mask, (2.5, 0.6, 0.7)), want)
        assert torch.equal(distances.squared_inside_torch(mask, (2.5, 0.6, 0.7)), want)
    assert [r.getMessage()[:31] for r in caplog.records] == ["the GPU's distance kernel faile"]
    assert distances.ENVELOPE_KERNEL is False
    with pytest.raises(RuntimeError, match="no compiler"):
        distances.squared_inside_torch(mask, (2.5, 0.6, 0.7), kernel=True)


def envelope_check(device: str, **env) -> list[str]:
    """:data:`ENVELOPE_CHECK` run in a fresh process on ``device`` with ``env`` added: its lines."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-c", ENVELOPE_CHECK, device], env=dict(os.environ, **env),
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[2])
    if done.returncode and env.get("TRITON_INTERPRET") and "only 0-dimensional arrays can be converted" in done.stderr:
        import numpy
        import pytest
        import triton

        pytest.skip(f"Triton {triton.__version__}'s interpreter cannot take a loop bound given at launch under NumPy "
                    f"{numpy.__version__} (it makes a scalar a 1-element array; Triton 3.8 does not): the project's "
                    "numpy<2 or a newer Triton runs this check")
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split("\n")[:-1]


# compares squared_inside_torch with the kernel against without it on argv[1]'s device; prints "same" per case
ENVELOPE_CHECK = """
import sys
import numpy as np, torch
from scipy import ndimage
from monailabel_app.grounding.distances import squared_inside_torch
rng = np.random.default_rng(11)
cases = []
for shape, spacing in (((4, 70, 9), (2.5, 0.6, 0.7)), ((130, 3, 5), (0.8, 3.0, 0.5))):
    mask = ndimage.gaussian_filter(rng.normal(size=shape), 1.5) > -0.3
    cases.append((mask, spacing))
mask = np.zeros((3, 66, 4), bool)
mask[:, 1:65, 1:3] = True  # lines wholly outside (x = 0, 3) and a plateau
mask[1] = True  # a plane with nothing outside along y and x
cases.append((mask, (1.0, 0.5, 0.5)))
for mask, spacing in cases:
    t = torch.from_numpy(mask).to(sys.argv[1])
    a = squared_inside_torch(t, spacing, kernel=True)
    b = squared_inside_torch(t, spacing, kernel=False)
    print("same" if torch.equal(a, b) else f"differ {mask.shape}: {(a - b).abs().max().item()}")
"""
