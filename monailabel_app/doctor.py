"""``medgemma-label doctor``: what this machine can run, checked before a reading (the seed's pre-start checks).

    medgemma-label doctor [--model ID|DIR] [--device auto|cpu|cuda] [--precision auto|...] [--studies URL] [--json]

Each check is ``ok``, ``warn`` or ``fail`` with what it found: Python, torch and CUDA versions; the GPU's
name, compute capability and bf16 support; the CPU's bf16 instructions; the precision a reading would use
and why (with the fp16 fallback warning); the model folder (safetensors, a Gemma 3 config, no remote code);
free memory against what the weights need; the PACS when one is configured; dcmqi (DICOM SEG); the
Chinese font of the page's PDF export. Exit status 1 when a check fails, else 0.
"""

from __future__ import annotations

import glob
import os
import platform
import shutil
import sys
from dataclasses import asdict, dataclass

OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass
class Check:
    name: str
    status: str
    detail: str


def _versions() -> list[Check]:
    import torch
    import transformers

    out = [Check("python", OK, platform.python_version()),
           Check("torch", OK, f"{torch.__version__}, transformers {transformers.__version__}")]
    if torch.cuda.is_available():
        out.append(Check("cuda", OK, f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)"))
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            out.append(Check(f"gpu {i}", OK, f"{torch.cuda.get_device_name(i)}, compute capability {major}.{minor}"))
        bf16 = torch.cuda.is_bf16_supported()
        out.append(Check("gpu bf16", OK if bf16 else WARN, f"torch.cuda.is_bf16_supported() = {bf16}"))
    else:
        out.append(Check("cuda", WARN, f"no CUDA device (torch built with CUDA {torch.version.cuda}): readings run "
                                       "on the CPU, far slower for MedGemma-4B"))
    return out


def _cpu() -> Check:
    from .model.loading import cpu_bf16_kind

    kind = cpu_bf16_kind()
    if kind:
        return Check("cpu bf16", OK, f"native bf16 ({'AMX' if kind == 'amx' else 'AVX512-BF16'})")
    return Check("cpu bf16", WARN, "no AVX512-BF16/AMX: bf16 on this CPU would be emulated (fp32 is used instead)")


def _precision(device: str, precision: str) -> tuple[list[Check], str, str]:
    from .errors import InputError
    from .model.loading import choose_device, choose_precision

    try:
        dev = choose_device(device)
        chosen, why = choose_precision(dev, precision)
    except InputError as e:
        return [Check("precision", FAIL, str(e))], "cpu", "fp32"
    checks = [Check("precision", OK, f"{chosen} on {dev}: {why}")]
    if chosen == "fp16":
        checks.append(Check("fp16 fallback", WARN, "fp16 instead of bf16: Gemma 3 can overflow in fp16; a non-finite "
                                                   "answer is retried in fp32"))
    return checks, dev, chosen


def parameter_count(path: str) -> int:
    """Parameters in the folder's safetensors files, from their headers (no weights are read)."""
    import json
    import struct

    total = 0
    for file in glob.glob(os.path.join(path, "*.safetensors")):
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, t in header.items():
            if name != "__metadata__":
                count = 1
                for d in t["shape"]:
                    count *= d
                total += count
    return total


def _model(ref: str | None) -> tuple[list[Check], int]:
    """Checks of the model folder (or the hub cache for an id), and its parameter count (0: unknown)."""
    from .model.loading import ModelLoadError, _check_local_folder
    from .phantoms.model import PHANTOM_MODEL_DIR

    ref = ref or PHANTOM_MODEL_DIR
    path = ref
    if not os.path.isdir(ref):
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(ref, "config.json")
        except Exception:  # not a valid repo id
            found = None
        if not isinstance(found, str):
            return [Check("model", FAIL, f"{ref!r} is no local folder and not in the Hugging Face cache (no "
                                         "internet here: download it elsewhere and give the folder)")], 0
        path = os.path.dirname(found)
    try:
        _check_local_folder(path)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (ModelLoadError, OSError, ValueError) as e:
        return [Check("model", FAIL, str(e))], 0
    if getattr(config, "model_type", "") != "gemma3":
        return [Check("model", FAIL, f"{path}: model_type {getattr(config, 'model_type', None)!r}, not gemma3")], 0
    count = parameter_count(path)
    return [Check("model", OK, f"{path}: Gemma 3, {count / 1e6:.1f} M parameters in safetensors, no remote code")], count


BYTES_PER_PARAMETER = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1, "int4": 0.5}


def _memory(device: str, precision: str, parameters: int) -> Check:
    """Free memory where the model runs against its weights in ``precision`` plus a fifth for working memory."""
    import torch

    if not parameters:
        return Check("memory", WARN, "model size unknown: memory not checked")
    need = parameters * BYTES_PER_PARAMETER.get(precision, 2) * 1.2
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info()
        where = "GPU"
    else:
        import psutil

        free = psutil.virtual_memory().available
        where = "RAM"
    return Check("memory", OK if free >= need else FAIL,
                 f"{where} free {free / 2**30:.1f} GiB; the model needs about {need / 2**30:.2f} GiB in {precision}")


def _pacs(url: str | None) -> list[Check]:
    if not url or not url.startswith(("http://", "https://")):
        return []
    import requests

    try:
        r = requests.get(url.rstrip("/") + "/studies", params={"limit": 1}, timeout=5,
                         headers={"Accept": "application/dicom+json"})
        status = OK if r.status_code in (200, 204) else FAIL
        return [Check("pacs", status, f"{url}: HTTP {r.status_code}")]
    except requests.RequestException as e:
        return [Check("pacs", FAIL, f"{url} not reachable: {type(e).__name__}")]


def _tools() -> list[Check]:
    from .serve.web.export import FONT_ENV, cjk_font

    here = os.path.dirname(sys.executable)
    seg = shutil.which("itkimage2segimage") or shutil.which("itkimage2segimage", path=here)
    font = cjk_font()
    return [
        Check("dcmqi", OK if seg else WARN, seg or "itkimage2segimage not found (pip install dcmqi): MONAI Label "
                                                   "cannot write DICOM SEG for a PACS"),
        Check("pdf font", OK if font else WARN, font or f"no CJK TrueType font (apt install fonts-wqy-microhei or "
                                                        f"set {FONT_ENV}): the page's PDF export fails"),
    ]


def run_checks(model: str | None = None, device: str = "auto", precision: str = "auto",
               studies: str | None = None) -> list[Check]:
    checks = _versions() + [_cpu()]
    prec, dev, chosen = _precision(device, precision)
    checks += prec
    model_checks, size = _model(model)
    checks += model_checks + [_memory(dev, chosen, size)] + _pacs(studies) + _tools()
    return checks


def format_checks(checks: list[Check]) -> str:
    mark = {OK: "ok  ", WARN: "WARN", FAIL: "FAIL"}
    return "\n".join(f"[{mark[c.status]}] {c.name:14s} {c.detail}" for c in checks)


def main(argv=None) -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="medgemma-label doctor", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="hub id or folder (default: the embedded phantom model)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--studies", default=None, help="the server's studies: a DICOMweb URL is checked for reachability")
    ap.add_argument("--json", action="store_true", help="print the checks as JSON")
    args = ap.parse_args(argv)
    checks = run_checks(args.model, args.device, args.precision, args.studies)
    print(json.dumps([asdict(c) for c in checks], indent=2) if args.json else format_checks(checks))
    return 1 if any(c.status == FAIL for c in checks) else 0
