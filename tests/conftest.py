"""Shared fixtures: the real data beside the project, the phantom-model readers (each loaded once).

Precision: ``reader`` runs in fp32, set explicitly, for tests that compare numbers exactly (whatever the
CPU, and whatever ``MEDGEMMA_PRECISION`` says); ``reader_in`` runs a test once in each precision this
machine can run (fp32 and bf16 everywhere, bf16 emulated on CPUs without bf16 instructions; fp16 too on a
GPU), for behaviour that must hold in every precision, with tolerances that fit 16-bit formats.
"""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.normpath(os.path.join(ROOT, "..", "shared", "data"))
CXR = os.path.join(SHARED, "cxr")

# held-out phantom seeds (training used seeds >= 10**6; layer choice used 20000-20119)
TEST_SEEDS = range(0, 1000)


def shared(*parts: str) -> str:
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        pytest.fail(f"missing shared test data: {path} (../shared/data beside the project root)")
    return path


EXACT = "fp32"


def precisions_here() -> list[str]:
    import torch

    return ["fp32", "bf16"] + (["fp16"] if torch.cuda.is_available() else [])


def auto_precision() -> str:
    """What precision "auto" gives a server or a command started here (the CPU's probe, MEDGEMMA_PRECISION)."""
    from monailabel_app.model.loading import choose_device, choose_precision

    return choose_precision(choose_device())[0]


_readers: dict = {}


def reader_for(precision: str):
    """The phantom-model reader in ``precision`` (set explicitly), loaded once per test session."""
    from monailabel_app.reader import Reader

    if precision not in _readers:
        _readers[precision] = Reader(precision=precision)
    return _readers[precision]


@pytest.fixture(scope="session")
def reader():
    return reader_for(EXACT)


@pytest.fixture(params=precisions_here())
def reader_in(request):
    return reader_for(request.param)


@pytest.fixture(scope="module")
def server(studies, request):
    """A real MONAI Label server on the calling test module's own ``studies`` folder. It warms up at start as a
    GPU server does (``--conf warm_up true``; compiled artefacts, where there are any, in its work folder) where
    the module sets ``SERVER_WARM_UP = True`` (test_server.py: the warm-up is tested there, beside its other
    requests); elsewhere not (``false``): on the CPU each module's warm-up read four phantom studies beside its
    tests, a minute of the suite in all."""
    from monailabel_app.serve.server import ServerProcess

    warm = "true" if getattr(request.module, "SERVER_WARM_UP", False) else "false"
    # a warm-up grows the heap by a quarter GiB here, not the 4 GiB a GPU server's does
    with ServerProcess(str(studies), conf={"warm_up": warm, "heap_reserve_gb": "0.25"}) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    from monailabel.client import MONAILabelClient

    return MONAILabelClient(server.url)
