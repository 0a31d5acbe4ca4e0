"""The reading page's exports: the (edited) structured report as PDF with an embedded Chinese font, the
reading as JSON, and a DICOM SR (with its SEG) for DICOM studies, stored to the PACS when the study came
from one.

The PDF font: ``MEDGEMMA_PDF_FONT`` (a TrueType .ttf/.ttc with CJK glyphs), else the first of the usual
Debian CJK TrueType fonts found (``fonts-wqy-microhei``, ``fonts-wqy-zenhei``, ``fonts-arphic-uming``,
``fonts-droid-fallback``). ReportLab embeds a subset of it, so the PDF reads the same on any machine.
"""

from __future__ import annotations

import datetime
import io
import json
import os

import numpy as np

from ...errors import InputError

FONT_ENV = "MEDGEMMA_PDF_FONT"
FONT_CANDIDATES = (
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/truetype/arphic/uming.ttc",
    "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",
)


def cjk_font() -> str | None:
    """Path of the TrueType font the PDF embeds, or None."""
    forced = os.environ.get(FONT_ENV, "").strip()
    if forced:
        return forced if os.path.isfile(forced) else None
    return next((p for p in FONT_CANDIDATES if os.path.isfile(p)), None)


def reading_json(reading, report_text: str | None = None, conversation: dict | None = None) -> dict:
    """The reading's result JSON, with the report as edited on the page (``edited`` says whether it was)."""
    out = reading.result_json()
    sr = out["structured_report"]
    if report_text is not None and report_text.strip() != sr["text"].strip():
        sr["generated_text"], sr["text"], sr["edited"] = sr["text"], report_text, True
    else:
        sr["edited"] = False
    if conversation:
        out["conversation"] = conversation
    return out


def write_json(data: dict, path: str) -> str:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=2)
    return path


def write_pdf(data: dict, image: np.ndarray | None, path: str, lang: str = "zh") -> str:
    """A one-page report: title, disclaimer, study, the structured report, the image with its masks and the
    findings' legend, the model and precision. Raises InputError when no CJK font is installed."""
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.units import mm
    from reportlab.lib.utils import ImageReader
    from reportlab.pdfbase import pdfmetrics
    from reportlab.pdfbase.ttfonts import TTFont
    from reportlab.pdfgen import canvas

    from . import texts
    from .viewer import COLOURS

    font_path = cjk_font()
    if font_path is None:
        raise InputError(f"no Chinese TrueType font for the PDF: install fonts-wqy-microhei or set {FONT_ENV}", status=500)
    if "ReportCJK" not in pdfmetrics.getRegisteredFontNames():
        pdfmetrics.registerFont(TTFont("ReportCJK", font_path, subfontIndex=0))
    c = canvas.Canvas(path, pagesize=A4)
    c.setTitle(texts.text(lang, "title"))
    width, height = A4
    x, y = 18 * mm, height - 20 * mm

    def line(s: str, size: float = 10.5, gap: float = 1.5):
        nonlocal y
        c.setFont("ReportCJK", size)
        for part in _wrap(s, c, size, width - 2 * x):
            if y < 20 * mm:
                c.showPage()
                y = height - 20 * mm
                c.setFont("ReportCJK", size)
            c.drawString(x, y, part)
            y -= size * gap

    line(texts.text(lang, "title"), 16)
    line(texts.text(lang, "banner"), 8.5)
    source = data.get("source") or {}
    line(f"{texts.text(lang, 'viewer')}: {source.get('name') or source.get('format') or ''}  "
         f"({texts.text(lang, 'ct' if data.get('modality') == 'ct' else 'xray')})  "
         f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}", 9)
    y -= 4
    for para in (data.get("structured_report") or {}).get("text", "").splitlines():
        line(para, 11)
    y -= 4
    if image is not None:
        side = min(95 * mm, y - 40 * mm)
        if side > 30 * mm:
            h, w = image.shape[:2]
            draw_w, draw_h = side * w / max(h, w), side * h / max(h, w)
            c.drawImage(ImageReader(_png(image)), x, y - draw_h, draw_w, draw_h)
            lx, ly = x + draw_w + 6 * mm, y - 4 * mm
            c.setFont("ReportCJK", 9)
            for f in data.get("findings", []):
                r, g, b = COLOURS[(f["label"] - 1) % len(COLOURS)]
                c.setFillColorRGB(r / 255, g / 255, b / 255)
                c.rect(lx, ly - 1, 8, 8, fill=1, stroke=0)
                c.setFillColorRGB(0, 0, 0)
                c.drawString(lx + 12, ly, f"{f['label']}. {f.get('text', '')}"[:60])
                ly -= 13
            y -= draw_h + 8 * mm
    model = data.get("model") or {}
    line(f"{texts.text(lang, 'model')}: {model.get('name') or model.get('id', '')}  {model.get('label', '')}", 8)
    line(f"{texts.text(lang, 'precision')}: {model.get('precision', '')} ({model.get('precision_reason', '')}), "
         f"{texts.text(lang, 'device')}: {model.get('device', '')}", 8)
    c.save()
    return path


def _png(image: np.ndarray) -> io.BytesIO:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    buf.seek(0)
    return buf


def _wrap(s: str, c, size: float, max_width: float) -> list[str]:
    """Lines of ``s`` that fit ``max_width`` (Chinese breaks anywhere; English at spaces when it can)."""
    out, current = [], ""
    for ch in s:
        if c.stringWidth(current + ch, "ReportCJK", size) > max_width and current:
            cut = current.rfind(" ")
            if cut > len(current) // 2 and not ch.isspace():
                out.append(current[:cut])
                current = current[cut + 1 :]
            else:
                out.append(current)
                current = ""
        current += ch
    return out + [current] if current or not out else out


def write_sr(study_path: str, labels_path: str, data: dict, out_dir: str) -> dict[str, str]:
    """SEG and SR files for a DICOM study (InputError when the study is not DICOM)."""
    from ...io import dicom_export

    seg, sr = dicom_export.export(study_path, labels_path, data)
    return dicom_export.write((seg, sr), out_dir)
