import json
import logging
import os
import shutil

import pytest
import torch

from monailabel_app import allocator
from monailabel_app.errors import InputError
from monailabel_app.io.xray import Geometry, Radiograph
from monailabel_app.model import loading
from monailabel_app.model.loading import ModelLoadError, choose_precision, load_model
from monailabel_app.phantoms.films import make_phantom
from monailabel_app.phantoms.model import PHANTOM_MODEL_DIR
from monailabel_app.reader import Reader


@pytest.mark.parametrize("kind,precision,reason,warns", [
    (None, "fp32", "CPU without native bf16: fp32 fallback", True),  # AVX2 only: bf16 would be emulated
    ("avx512_bf16", "bf16", "CPU has native bf16 (AVX512-BF16)", False),
    ("amx", "bf16", "CPU has native bf16 (AMX)", False),
])
def test_precision_policy_for_each_kind_of_cpu(monkeypatch, caplog, kind, precision, reason, warns):
    monkeypatch.delenv(loading.PRECISION_ENV, raising=False)
    monkeypatch.setattr(loading, "cpu_bf16_kind", lambda: kind)
    with caplog.at_level(logging.WARNING):
        assert choose_precision("cpu") == (precision, reason)
    assert ("no bf16 instructions" in caplog.text) == warns
    caplog.clear()
    # an explicit precision wins on every CPU; bf16 where it is emulated says so
    assert choose_precision("cpu", "float32") == ("fp32", "requested")
    with caplog.at_level(logging.WARNING):
        assert choose_precision("cpu", "BF16") == ("bf16", "requested")
    assert ("emulated" in caplog.text) == (kind is None)
    with pytest.raises(InputError, match="unknown precision"):
        choose_precision("cpu", "int3")
    with pytest.raises(InputError, match="needs a CUDA device"):  # bitsandbytes weights: GPU only
        choose_precision("cpu", "int4")


@pytest.mark.parametrize("bf16,precision,warns", [(True, "bf16", False), (False, "fp16", True)])
def test_precision_policy_on_gpus(monkeypatch, caplog, bf16, precision, warns):
    monkeypatch.delenv(loading.PRECISION_ENV, raising=False)
    monkeypatch.setattr(loading, "cpu_bf16_kind", lambda: None)  # the CPU does not matter on a GPU
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    with caplog.at_level(logging.WARNING):
        assert choose_precision("cuda")[0] == precision
    assert ("fp16" in caplog.text) == warns
    assert choose_precision("cuda", "8bit") == ("int8", "requested")


@pytest.mark.parametrize("flags,kind", [
    ("fpu sse2 avx avx2 fma", None),
    ("avx2 avx512f avx512_bf16 avx512_vnni", "avx512_bf16"),
    ("avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8", "amx"),
])
def test_the_cpu_probe_reads_the_flags(tmp_path, monkeypatch, flags, kind):
    monkeypatch.delenv(loading.CPU_PROBE_ENV, raising=False)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert loading.cpu_bf16_kind(str(cpuinfo)) == kind
    assert loading.cpu_bf16_kind(str(tmp_path / "none")) is None  # no /proc: no bf16 claimed
    # the probe can be forced, to run the suite as on another CPU
    for forced, expect in (("none", None), ("avx512_bf16", "avx512_bf16"), ("AMX", "amx")):
        monkeypatch.setenv(loading.CPU_PROBE_ENV, forced)
        assert loading.cpu_bf16_kind(str(cpuinfo)) == expect
    monkeypatch.setenv(loading.CPU_PROBE_ENV, "sse")
    with pytest.raises(ValueError, match="none, avx512_bf16 or amx"):
        loading.cpu_bf16_kind(str(cpuinfo))


def test_the_environment_chooses_the_precision_of_auto(monkeypatch):
    monkeypatch.setattr(loading, "cpu_bf16_kind", lambda: None)
    monkeypatch.setenv(loading.PRECISION_ENV, "bfloat16")
    assert choose_precision("cpu") == ("bf16", "MEDGEMMA_PRECISION=bf16 in the environment")
    assert choose_precision("cpu", "fp32") == ("fp32", "requested")  # what a caller sets explicitly wins
    monkeypatch.setenv(loading.PRECISION_ENV, "int4")
    with pytest.raises(InputError, match="needs a CUDA device"):
        choose_precision("cpu")
    monkeypatch.setenv(loading.PRECISION_ENV, "fp9")
    with pytest.raises(InputError, match="unknown precision"):
        choose_precision("cpu")
    monkeypatch.setenv(loading.PRECISION_ENV, "bf16")
    model, _, info = load_model(PHANTOM_MODEL_DIR, "cpu")
    assert model.dtype == torch.bfloat16 and info.precision_reason.startswith("MEDGEMMA_PRECISION")


def test_load_logs_what_and_how(caplog):
    with caplog.at_level(logging.INFO, logger="monailabel_app.model.loading"):
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


def test_int8_engine_is_torchao_unless_asked_for_bitsandbytes(monkeypatch):
    monkeypatch.delenv(loading.INT8_ENV, raising=False)
    assert loading.int8_engine() == "torchao"  # installed with the test extras
    monkeypatch.setenv(loading.INT8_ENV, "bitsandbytes")
    assert loading.int8_engine() == "bitsandbytes"
    monkeypatch.setenv(loading.INT8_ENV, "gptq")
    with pytest.raises(ModelLoadError, match="torchao or bitsandbytes"):
        loading.int8_engine()


def test_int8_weight_only_keeps_the_phantom_models_answers():
    """torchao's int8 weights on every linear layer of the phantom model but the tied output head: the same
    reports as its own weights on phantom films (weights are what changes, not what is read)."""
    from torchao.quantization import Int8Tensor

    plain, quantised = Reader(precision="fp32"), Reader(precision="fp32")
    loading.int8_weight_only(quantised.model)
    lm = quantised.model.model.language_model
    assert isinstance(lm.layers[0].mlp.gate_proj.weight, Int8Tensor)
    assert quantised.model.lm_head.weight.data_ptr() == lm.embed_tokens.weight.data_ptr()  # still tied, not quantised
    films = [make_phantom(s) for s in (3, 7, 11, 23)]
    for ph in films:
        study = Radiograph(ph.image, Geometry.plain(*ph.image.shape))
        assert quantised.read(study).report == plain.read(study).report


def test_warm_up_reads_each_modality_and_says_where_it_stands(caplog):
    """Each modality read twice: the model's own answer, then the warm-up's findings said (mapped whatever the
    model answers on a phantom) in the same decode shape; where they do not fit, the model's own answer again."""
    reader = Reader(precision="fp32")
    assert reader.warm["state"] == "not started"
    with caplog.at_level(logging.INFO, logger="monailabel_app"):
        warm = reader.warm_up(max_new_tokens=40, heap_reserve=1 << 28)
    assert warm["state"] == "done" and [s["modality"] for s in warm["shapes"]] == ["xray", "ct"]
    assert [s["findings_mapped"] for s in warm["shapes"]] == [3, 3]
    assert {key[2] for key in reader.model.__dict__["_medgemma_decoders"]} == {40}  # no shape for the answers'
    assert reader._warm_up_answer("ct", 40) and reader._warm_up_answer("ct", 32) is None  # 34 tokens and the end
    assert warm["heap_reserved_gib"] == (0.25 if allocator.keep_freed_memory() else 0.0)  # 256 MiB grown
    ct = warm["shapes"][1]
    # the warm-up CT shows the model as many slices as it takes (the phantom is stretched along z)
    assert ct["prompt_tokens"] > int(reader.ct["max_slices"]) * reader.grid**2
    assert sum("warm-up" in r.getMessage() for r in caplog.records) == 3
    assert sum("heap grown by" in r.getMessage() for r in caplog.records) == (1 if allocator.keep_freed_memory() else 0)
