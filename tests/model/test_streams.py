"""The kept CUDA streams: one per device, use and priority (:mod:`monailabel_app.model.streams`)."""

import pytest
import torch

from monailabel_app.model import streams


def test_no_stream_off_cuda():
    assert streams.kept("cpu", "rows") is None
    assert streams.kept(torch.device("cpu"), "inputs", priority=-1) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA streams: GPU only")
def test_one_stream_per_device_use_and_priority():
    rows = streams.kept("cuda", "rows", priority=-1)
    assert streams.kept(torch.device("cuda", torch.cuda.current_device()), "rows", priority=-1) is rows
    assert rows.priority < streams.kept("cuda", "inputs").priority  # lower: sooner
    assert streams.kept("cuda", "inputs") is not rows and streams.kept("cuda", "rows") is not rows
