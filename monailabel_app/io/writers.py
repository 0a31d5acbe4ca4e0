"""Write a reading: label map and heatmaps in the input's geometry, findings JSON, overlay PNG, inputs.

Label maps and heatmaps take the input's exact array shape, spacing, origin and direction
(:class:`monailabel_app.io.xray.Geometry`), so a viewer lays them on the image voxel for voxel. Formats by
extension: ``.nii.gz``/``.nii``/``.nrrd``/``.mha`` (SimpleITK) or ``.png`` (8-bit, 2-D only).

The combined heatmap is, per pixel, the largest of the findings' side-gated heatmaps each scaled to
0..1 (the values the masks are thresholded on); the per-finding heatmaps keep the raw attention values.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
from PIL import Image, ImageDraw

from ..errors import InputError
from .xray import Geometry

LABEL_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha", ".png")
DTYPES = {"uint8": np.uint8, "uint16": np.uint16, "int16": np.int16, "int32": np.int32, "float32": np.float32}
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]


def check_extension(ext: str) -> str:
    ext = (ext or ".nii.gz").lower()
    if not ext.startswith("."):
        ext = "." + ext
    if ext not in LABEL_EXTENSIONS:
        raise InputError(f"unsupported result_extension {ext!r}: use one of {', '.join(LABEL_EXTENSIONS)}")
    return ext


def check_dtype(name: str | None, default: str) -> np.dtype:
    name = (name or default).lower()
    if name not in DTYPES:
        raise InputError(f"unsupported result_dtype {name!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def write_in_geometry(plane: np.ndarray, geometry: Geometry, path: str, dtype=np.uint8) -> str:
    """Write a (rows, cols) plane at ``path`` in ``geometry``; atomically (temp file, then rename)."""
    arr = np.asarray(plane).astype(dtype).reshape(geometry.shape)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    ext = next(e for e in LABEL_EXTENSIONS if path.lower().endswith(e))
    fd, tmp = tempfile.mkstemp(suffix=ext, dir=folder)
    os.close(fd)
    try:
        if ext == ".png":
            if arr.ndim != 2 and np.squeeze(arr).ndim != 2:
                raise InputError("a .png result needs a 2-D image")
            Image.fromarray(np.squeeze(arr).astype(np.uint8 if dtype == np.uint8 else np.uint16)).save(tmp)
        else:
            import SimpleITK as sitk

            img = sitk.GetImageFromArray(arr)
            img.SetSpacing([float(s) for s in geometry.spacing])
            img.SetOrigin([float(o) for o in geometry.origin])
            img.SetDirection([float(d) for d in geometry.direction])
            sitk.WriteImage(img, tmp, useCompression=ext != ".nii")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _blend(grey: np.ndarray, labels: np.ndarray, alpha: float) -> np.ndarray:
    base = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
    for k in range(1, int(labels.max(initial=0)) + 1):
        m = labels == k
        base[m] = (1 - alpha) * base[m] + alpha * np.array(PALETTE[(k - 1) % len(PALETTE)], np.float32)
    return base.clip(0, 255).astype(np.uint8)


def overlay_png(reading, path: str, alpha: float = 0.45) -> str:
    """The image with coloured masks, each labelled with its finding name, and the report.

    Radiograph: the whole image. CT: one axial slice per finding (its strongest slice, display
    convention, lung window), side by side.
    """
    marks = []  # (tile, row, col, k)
    if reading.modality == "ct":
        vol = reading.study
        grey = np.clip((vol.hu + 1000.0) * (255.0 / 1400.0), 0, 255).astype(np.uint8)
        tiles = []
        zs = [int(np.unravel_index(int(np.argmax(h)), h.shape)[0]) for h in reading.display_heatmaps] or [vol.shape[0] // 2]
        for t, z in enumerate(zs):
            tiles.append(_blend(grey[z], reading.display_labels[z], alpha))
            if t < len(reading.display_heatmaps):
                r, c = np.unravel_index(int(np.argmax(reading.display_heatmaps[t][z])), grey.shape[1:])
                marks.append((t, r, c, t + 1))
        up = max(1, -(-256 // tiles[0].shape[0]))  # small CT slices: enlarge so the labels stay readable
        width = tiles[0].shape[1] * up
        strip = np.concatenate(tiles, axis=1)
        img = Image.fromarray(strip).resize((strip.shape[1] * up, strip.shape[0] * up), Image.NEAREST)
        marks = [(t, r * up, c * up, k) for t, r, c, k in marks]
    else:
        img = Image.fromarray(_blend(reading.radiograph.pixels, reading.labels.reshape(reading.radiograph.pixels.shape), alpha))
        width = 0
        for k, h in enumerate(reading.mask_maps, start=1):
            h2 = h.reshape(reading.radiograph.pixels.shape)
            r, c = np.unravel_index(int(np.argmax(h2)), h2.shape)
            marks.append((0, r, c, k))
    scale = max(1, round(max(img.size) / 512))
    draw = ImageDraw.Draw(img)
    for t, r, c, k in marks:
        c += t * width
        colour = PALETTE[(k - 1) % len(PALETTE)]
        draw.ellipse([c - 3 * scale, r - 3 * scale, c + 3 * scale, r + 3 * scale], outline=colour, width=scale)
        draw.text((c + 5 * scale, r - 5 * scale), f"{k}: {reading.names[k - 1]}", fill=colour)
    draw.text((4, 4), reading.report[:200], fill=(255, 255, 255))
    replace_atomically(path, lambda f: img.save(f, format="PNG"))
    return path


def save_inputs(reading, folder: str) -> str:
    """``inputs/image_NNN.png`` (the exact RGB squares handed to the processor, before its own resize)
    and ``inputs/index.json`` (per image: where it came from; for CT the source slice and its patient z)."""
    os.makedirs(folder, exist_ok=True)
    index = []
    for n, (square, info) in enumerate(zip(reading.model_inputs, reading.inputs_index)):
        name = f"image_{n:03d}.png"
        Image.fromarray(square).convert("RGB").save(os.path.join(folder, name))  # a film's grey, as shown
        index.append({"image": name, **info, "square_side": reading.pad.side, "pad_top": reading.pad.top,
                      "pad_left": reading.pad.left})
    with open(os.path.join(folder, "index.json"), "w") as f:
        json.dump(index, f, indent=2)
    return folder


def write_reading(reading, out_dir: str, save_model_inputs: bool = False) -> dict:
    """The CLI's output folder: findings.json, mask.nii.gz, heatmap.nii.gz, overlay.png[, inputs/]."""
    os.makedirs(out_dir, exist_ok=True)
    geom = reading.geometry
    files = {
        "mask": write_in_geometry(reading.labels, geom, os.path.join(out_dir, "mask.nii.gz"), np.uint8),
        "heatmap": write_in_geometry(
            reading.combined_heatmap(), geom,
            os.path.join(out_dir, "heatmap.nii.gz"), np.float32,
        ),
        "overlay": overlay_png(reading, os.path.join(out_dir, "overlay.png")),
    }
    for k, h in enumerate(reading.heatmaps, start=1):
        files[f"heatmap_{k}"] = write_in_geometry(h, geom, os.path.join(out_dir, "heatmaps", f"finding_{k}.nii.gz"), np.float32)
    if save_model_inputs:
        files["inputs"] = save_inputs(reading, os.path.join(out_dir, "inputs"))
    result = reading.result_json()
    result["files"] = {k: os.path.relpath(v, out_dir) for k, v in files.items()}
    write_json(os.path.join(out_dir, "findings.json"), result)  # last, whole or not at all: the folder's "done"
    return result


def replace_atomically(path: str, write) -> None:
    """Write ``path`` through ``write(file)`` on a temporary file in its folder, flushed to disk, then
    renamed into place: a reader sees the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str, data) -> str:
    """JSON written to a temporary file and renamed into place (a full disk never leaves half a file)."""
    text = json.dumps(data, indent=2, ensure_ascii=False).encode("utf-8")
    replace_atomically(path, lambda f: f.write(text))
    return path
