"""Load a Gemma 3 vision-language model (MedGemma or the phantom model) and choose its precision.

A model is a Hugging Face id (e.g. ``google/medgemma-4b-it``, from the local cache or the hub) or a
local folder. Only ``safetensors`` weights are accepted and ``trust_remote_code`` is never set: the
architecture is transformers' own ``Gemma3ForConditionalGeneration``.

Precision policy (``precision="auto"``):

* CUDA with native bf16 -> bf16 (MedGemma's own precision);
* CUDA without bf16 -> fp16, logged as a WARNING (Gemma 3 can overflow in fp16; the engine checks the
  output and retries in fp32 when it does);
* CPU with bf16 instructions (AVX512-BF16 or AMX) -> bf16; other CPUs -> fp32 with a WARNING, since bf16
  is emulated there and several times slower. Measured in ``bench/cpu_precision.py``
  (``bench/results/cpu_precision.md``): on an AVX512-BF16 CPU, MedGemma-4B's layers run faster in bf16
  (prefill about 3x, a whole X-ray reading about 1.3x); asked for on a CPU without, bf16 gets a WARNING.

``MEDGEMMA_PRECISION`` in the environment stands in for ``auto``. An explicit ``bf16``/``fp32``/``fp16``
overrides the policy; ``int8``/``int4`` quantise the linear layers (optional extra ``[quant]``, CUDA only;
computation in bf16, else fp16): ``int8`` as int8 weights with torchao (weight-only: the decode step still
compiles and is captured as a CUDA graph; ``bench/results/fast_path.md``), or with bitsandbytes where torchao
is missing or ``MEDGEMMA_INT8=bitsandbytes`` (its int8 matmul cannot be captured: it steps eagerly, many
times slower; a WARNING says so); ``int4`` as NF4 with bitsandbytes. What
was loaded, where and in which precision is logged at INFO, and returned in :class:`ModelInfo` for
``/info/`` and every result.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from dataclasses import asdict, dataclass, field

import torch

from ..errors import InputError
from .capture import CAPTURE_ATTN

logger = logging.getLogger(__name__)

PRECISIONS = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
QUANTISED = ("int8", "int4")  # torchao / bitsandbytes, CUDA only
INT8_ENV = "MEDGEMMA_INT8"  # torchao (default when installed) | bitsandbytes: which library quantises int8
_ALIASES = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16", "half": "fp16", "float": "fp32",
            "8bit": "int8", "4bit": "int4", "nf4": "int4"}
GROUNDING_FILE = "grounding.json"
PRECISION_ENV = "MEDGEMMA_PRECISION"  # stands in for precision "auto" (tests, servers in one chosen precision)
CPU_PROBE_ENV = "MEDGEMMA_CPU_BF16"  # none | avx512_bf16 | amx: what the CPU probe says (to test as on another CPU)


class ModelLoadError(RuntimeError):
    """The model cannot be loaded (missing, not safetensors, not Gemma 3, corrupt)."""


@dataclass
class ModelInfo:
    id: str
    precision: str
    device: str
    precision_reason: str
    parameters: int
    label: str = ""
    grounding: dict = field(default_factory=dict)

    def public(self) -> dict:
        d = asdict(self)
        d.pop("grounding")
        return d


def normalise_precision(name: str | None) -> str:
    name = (name or "auto").strip().lower()
    name = _ALIASES.get(name, name)
    if name != "auto" and name not in PRECISIONS and name not in QUANTISED:
        raise InputError(f"unknown precision {name!r}: use one of auto, bf16, fp32, fp16, int8, int4", status=422)
    return name


def cpu_bf16_kind(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """The CPU's bf16 instructions: ``"amx"`` (AMX-BF16 tiles, Intel Sapphire Rapids and later),
    ``"avx512_bf16"`` (AVX512-BF16 dot products: AMD Zen 4, Intel Cooper Lake) or None (AVX2 at best:
    torch emulates bf16 there). The policy's capability probe: ``MEDGEMMA_CPU_BF16`` (``none``,
    ``avx512_bf16``, ``amx``) overrides what ``/proc/cpuinfo`` says, to run the suite as on another CPU."""
    forced = os.environ.get(CPU_PROBE_ENV, "").strip().lower()
    if forced:
        if forced not in ("none", "avx512_bf16", "amx"):
            raise ValueError(f"{CPU_PROBE_ENV}={forced!r}: use none, avx512_bf16 or amx")
        return None if forced == "none" else forced
    try:
        with open(cpuinfo) as f:
            flags = set(f.read().split())
    except OSError:
        return None
    if "amx_bf16" in flags:
        return "amx"
    return "avx512_bf16" if "avx512_bf16" in flags else None


def choose_precision(device: str, requested: str = "auto") -> tuple[str, str]:
    """(precision, reason) for ``device`` under the policy above. ``MEDGEMMA_PRECISION`` in the environment
    stands in for ``"auto"`` (a whole test suite, or a server, in one chosen precision)."""
    requested = normalise_precision(requested)
    source = "requested"
    if requested == "auto" and os.environ.get(PRECISION_ENV, "").strip():
        requested = normalise_precision(os.environ[PRECISION_ENV])
        source = f"{PRECISION_ENV}={requested} in the environment"
    if requested in QUANTISED and not device.startswith("cuda"):
        raise InputError(f"precision {requested} (quantised) needs a CUDA device, not {device!r}", status=422)
    if requested != "auto":
        if requested == "bf16" and device == "cpu" and cpu_bf16_kind() is None:
            logger.warning("bf16 asked for on a CPU without bf16 instructions: emulated, several times slower than fp32")
        return requested, source
    if device.startswith("cuda"):
        if torch.cuda.is_bf16_supported():
            return "bf16", "GPU has native bf16"
        logger.warning("GPU has no native bf16: using fp16 (guarded: fp32 retry on overflow)")
        return "fp16", "GPU without bf16: fp16 fallback"
    kind = cpu_bf16_kind()
    if kind == "amx":
        return "bf16", "CPU has native bf16 (AMX)"
    if kind == "avx512_bf16":
        return "bf16", "CPU has native bf16 (AVX512-BF16)"
    logger.warning("CPU has no bf16 instructions (no AVX512-BF16/AMX): using fp32 instead of bf16")
    return "fp32", "CPU without native bf16: fp32 fallback"


def choose_device(requested: str | None = None) -> str:
    requested = (requested or "auto").strip().lower()
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {requested!r} asked for but CUDA is not available here", status=422)
    if requested != "cpu" and not requested.startswith("cuda"):
        raise InputError(f"unknown device {requested!r}: use auto, cpu or cuda[:N]", status=422)
    return requested


def _check_local_folder(path: str) -> None:
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelLoadError(f"model folder {path} has no config.json")
    if not glob.glob(os.path.join(path, "*.safetensors")):
        other = [os.path.basename(p) for p in glob.glob(os.path.join(path, "*.bin")) + glob.glob(os.path.join(path, "*.pt*"))]
        hint = f" (found {', '.join(other)}: convert them to safetensors)" if other else ""
        raise ModelLoadError(f"model folder {path} has no .safetensors weights{hint}; only safetensors are loaded")


DEFAULT_CT_SLICES = 85  # MedGemma 1.5: up to 85 axial slices per CT


def load_grounding(path: str, model) -> dict:
    """Layers, threshold and attention method for the maps, and the CT recipe's slice count:
    ``grounding.json`` beside the model, else every global layer and MedGemma 1.5's 85 slices. CT
    settings live under ``"ct"`` (``layers``, ``rollout``, ``max_slices``): a CT is far longer than a
    sliding window, so only global layers can link the answer to early slices, and by then a slice's
    content has gathered in a few of its tokens, so CT attention is rolled out inside each slice
    (:mod:`capture`). Radiographs default to direct attention (``"rollout": false``)."""
    text_cfg = model.config.text_config
    layer_types = getattr(text_cfg, "layer_types", None) or ["full_attention"] * text_cfg.num_hidden_layers
    global_layers = [i for i, t in enumerate(layer_types) if t == "full_attention"]
    grounding = {
        "layers": global_layers,
        "threshold": 0.5,
        "rollout": False,
        "ct": {"layers": global_layers, "rollout": True, "max_slices": DEFAULT_CT_SLICES, "threshold": 0.5},
        "source": "default: every global-attention layer",
    }
    file = os.path.join(path, GROUNDING_FILE) if os.path.isdir(path) else None
    if file and os.path.isfile(file):
        with open(file) as f:
            found = json.load(f)
        grounding["ct"].update(found.pop("ct", {}))
        grounding.update(found)
        grounding["source"] = GROUNDING_FILE
    return grounding


def _dtype_of(module) -> str:
    """The dtype of a module's first weight (``int8`` and the like where the first layer is quantised)."""
    if module is None:
        return "absent"
    for p in module.parameters():
        return str(p.dtype).replace("torch.", "")
    return "no weights"


def int8_engine() -> str:
    """Which library makes ``int8``: ``torchao`` when it is installed (unless ``MEDGEMMA_INT8=bitsandbytes``)."""
    wanted = os.environ.get(INT8_ENV, "").strip().lower()
    if wanted not in ("", "torchao", "bitsandbytes"):
        raise ModelLoadError(f"{INT8_ENV} must be torchao or bitsandbytes, got {wanted!r}")
    if wanted == "bitsandbytes":
        return wanted
    try:
        import torchao.quantization  # noqa: F401
    except ImportError:
        if wanted == "torchao":
            raise ModelLoadError(f"{INT8_ENV}=torchao but torchao is not installed: pip install "
                                 "'monailabel-medgemma[quant]'") from None
        return "bitsandbytes"
    return "torchao"


def int8_weight_only(model) -> None:
    """Quantise the linear layers of the language model, the vision tower and the projector to int8 weights
    (per output channel; activations stay in the compute dtype) with torchao, in place. The output head is
    left alone: it shares its weight with the token embedding."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(model.model, Int8WeightOnlyConfig())


def _weights_args(precision: str, device: str) -> dict:
    """``from_pretrained`` arguments for ``precision``: a dtype, or a bitsandbytes quantisation."""
    if precision not in QUANTISED:
        return {"dtype": PRECISIONS[precision]}
    if precision == "int8" and int8_engine() == "torchao":  # quantised after loading (int8_weight_only)
        return {"dtype": torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16}
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as e:
        raise ModelLoadError(f"precision {precision} needs bitsandbytes: pip install 'monailabel-medgemma[quant]' "
                             f"({e})") from e
    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    quant = BitsAndBytesConfig(load_in_8bit=True) if precision == "int8" else BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
    return {"dtype": compute, "quantization_config": quant, "device_map": {"": device}}


def load_model(ref: str, device: str = "auto", precision: str = "auto", label: str = ""):
    """(model, processor, ModelInfo) for a local folder or hub id; raises :class:`ModelLoadError`."""
    from transformers import AutoProcessor, Gemma3ForConditionalGeneration

    device = choose_device(device)
    precision, reason = choose_precision(device, precision)
    local = os.path.isdir(ref)
    if local:
        _check_local_folder(ref)
    elif ref.startswith((".", "/", "~")) or ref.count("/") > 1:  # a path, not a hub id "org/name"
        raise ModelLoadError(f"model folder not found: {ref}")
    weights = _weights_args(precision, device)
    try:
        model = Gemma3ForConditionalGeneration.from_pretrained(
            ref,
            use_safetensors=True,
            trust_remote_code=False,
            attn_implementation=CAPTURE_ATTN,
            **weights,
        )
        processor = AutoProcessor.from_pretrained(ref, trust_remote_code=False)
    except Exception as e:  # any failure here (hub, config, corrupt safetensors header, ...) is a load error
        raise ModelLoadError(f"cannot load model {ref!r}: {type(e).__name__}: {str(e)[:500]}") from e
    engine = int8_engine() if precision == "int8" else "bitsandbytes" if precision == "int4" else None
    if engine != "bitsandbytes":  # bitsandbytes places its quantised weights itself
        model.to(device)
    if engine == "torchao":
        int8_weight_only(model)
        reason += "; int8 weights (torchao, weight-only)"
    elif engine == "bitsandbytes":
        reason += "; bitsandbytes " + ("NF4" if precision == "int4" else "int8")
        if precision == "int8":
            logger.warning("int8 with bitsandbytes: its matmul cannot be captured as a CUDA graph, decoding steps "
                           "eagerly (many times slower than bf16); install torchao for a fast int8")
    model.eval()
    n = sum(p.numel() for p in model.parameters())
    info = ModelInfo(
        id=ref if not local else os.path.abspath(ref),
        precision=precision,
        device=device,
        precision_reason=reason,
        parameters=n,
        label=label,
        grounding=load_grounding(ref, model),
    )
    logger.info(
        "Loaded %s (%s, %.2f M parameters) on %s in %s (%s)%s; vision tower %s, language model %s",
        ref, type(model).__name__, n / 1e6, device, precision, reason, f" [{label}]" if label else "",
        _dtype_of(getattr(model.model, "vision_tower", None)), _dtype_of(getattr(model.model, "language_model", None)),
    )
    return model, processor, info
