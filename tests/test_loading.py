import json
import logging
import os
import shutil

import pytest
import torch

from monailabel_app import loading
from monailabel_app.errors import InputError
from monailabel_app.loading import ModelLoadError, choose_precision, load_model
from monailabel_app.phantom_model import PHANTOM_MODEL_DIR
from monailabel_app.phantoms import make_phantom
from monailabel_app.reader import Reader
from monailabel_app.xray import Geometry, Radiograph


def test_precision_policy_on_cpu(monkeypatch, caplog):
    monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level(logging.WARNING):
        assert choose_precision("cpu") == ("fp32", "CPU without native bf16: fp32 fallback")
    assert "no native bf16" in caplog.text
    monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda: True)
    assert choose_precision("cpu")[0] == "bf16"
    assert choose_precision("cpu", "float32") == ("fp32", "requested")
    assert choose_precision("cpu", "BF16") == ("bf16", "requested")
    with pytest.raises(InputError, match="unknown precision"):
        choose_precision("cpu", "int3")
    assert choose_precision("cuda", "8bit") == ("int8", "requested")
    with pytest.raises(InputError, match="needs a CUDA device"):  # bitsandbytes weights: GPU only
        choose_precision("cpu", "int4")


def test_precision_policy_on_gpus(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert choose_precision("cuda") == ("bf16", "GPU has native bf16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with caplog.at_level(logging.WARNING):
        assert choose_precision("cuda")[0] == "fp16"
    assert "fp16" in caplog.text


def test_load_logs_what_and_how(caplog):
    with caplog.at_level(logging.INFO, logger="monailabel_app.loading"):
        model, proc, info = load_model(PHANTOM_MODEL_DIR, "cpu", "bf16")
    assert model.dtype == torch.bfloat16 and info.precision == "bf16" and info.device == "cpu"
    assert "Loaded" in caplog.text and "bf16" in caplog.text
    with open(os.path.join(PHANTOM_MODEL_DIR, "grounding.json")) as f:
        shipped = json.load(f)
    assert info.grounding["layers"] == shipped["layers"] and info.grounding["source"] == "grounding.json"
    assert info.grounding["ct"]["layers"] == shipped["ct"]["layers"] and info.grounding["ct"]["max_slices"] == 20
    assert model.config._attn_implementation == "medgemma_capture"


def test_only_safetensors_and_real_folders(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(os.path.join(PHANTOM_MODEL_DIR, "config.json"), folder)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")  # a pickle: never loaded
    with pytest.raises(ModelLoadError, match="no .safetensors"):
        load_model(str(folder), "cpu")
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(str(tmp_path / "nowhere" / "model"), "cpu")
    corrupt = tmp_path / "c"
    shutil.copytree(PHANTOM_MODEL_DIR, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_model(str(corrupt), "cpu")


def test_fp16_overflow_falls_back_to_fp32_with_a_warning(caplog):
    r = Reader(precision="fp16", device="cpu")
    assert r.model.dtype == torch.float16
    with torch.no_grad():  # make the fp16 forward overflow, as Gemma 3 activations can
        r.model.model.language_model.layers[0].mlp.down_proj.weight.mul_(6e4)
    ph = make_phantom(7)
    with caplog.at_level(logging.WARNING):
        reading = r.read(Radiograph(ph.image, Geometry.plain(*ph.image.shape)))
    assert "reloading in fp32" in caplog.text
    assert r.info.precision == "fp32" and reading.model["precision"] == "fp32"
    assert reading.report == ph.report
