"""Shared fixtures: the real data beside the project, the phantom-model reader (loaded once)."""

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


@pytest.fixture(scope="session")
def reader():
    from monailabel_app.reader import Reader

    return Reader()


@pytest.fixture(scope="module")
def server(studies):
    """A real MONAI Label server on the calling test module's own ``studies`` folder."""
    from monailabel_app.server import ServerProcess

    with ServerProcess(str(studies)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    from monailabel.client import MONAILabelClient

    return MONAILabelClient(server.url)
