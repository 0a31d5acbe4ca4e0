"""The reading page's parts without a browser: the viewer's drawing (sides, colours, CT windows), the page's
words in both languages, the exports (PDF with the Chinese font, the edited report), the shared queue, and
``medgemma-label doctor``."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from monailabel_app.errors import InputError
from monailabel_app.io.xray import Geometry, Radiograph
from monailabel_app.phantoms.films import make_phantom
from monailabel_app.serve.guards import Busy, InferenceQueue
from monailabel_app.serve.web import export, texts
from monailabel_app.serve.web.viewer import COLOURS, WINDOWS, render, view_of, window

CJK = re.compile(r"[\u4e00-\u9fff]")


@pytest.fixture(scope="module")
def reading(reader):
    ph = make_phantom(0)  # one opacity in the patient's right middle zone
    return reader.read(Radiograph(ph.image, Geometry.plain(*ph.image.shape)), language="zh")


def test_every_word_of_the_page_exists_in_chinese_and_english():
    for key, (zh, en) in texts.TEXTS.items():
        assert zh and en and zh != en or key in ("ct", "export_json", "export_sr"), key
        assert CJK.search(zh) or key in ("ct",), f"{key}: the Chinese text has no Chinese"
        assert not CJK.search(en), f"{key}: Chinese in the English text"
    for kind, (zh, en) in texts.ERRORS.items():
        assert CJK.search(zh) and not CJK.search(en), kind
    assert texts.PRESETS["zh"][1] == "这个异常的密度和边界特征如何？" and len(texts.PRESETS["en"]) == 3
    assert texts.check_lang("en") == "en" and texts.check_lang("fr") == "zh" and texts.check_lang(None) == "zh"
    assert texts.error("zh", "busy", "x").startswith("服务器繁忙") and texts.error("en", "input", "bad").endswith(": bad")


def test_the_viewer_draws_each_mask_in_its_colour_on_the_patients_side_with_markers(reading):
    view = view_of(reading)
    assert view.modality == "xray" and view.names and view.labels.shape == reading.radiograph.pixels.shape
    rgb = render(view, heatmap=False, opacity=1.0)
    scale = rgb.shape[0] // view.base.shape[0]
    assert rgb.shape[0] >= 512 and rgb.shape[:2] == (view.base.shape[0] * scale, view.base.shape[1] * scale)
    mask = np.repeat(np.repeat(view.labels == 1, scale, 0), scale, 1)
    inside = rgb[mask]
    assert (np.abs(inside - np.array(COLOURS[0])) <= 1).all()  # opacity 1: the colour itself
    assert np.nonzero(mask)[1].mean() < rgb.shape[1] / 2  # the patient's right, on the image's left
    yellow = (rgb[..., 0] > 200) & (rgb[..., 1] > 200) & (rgb[..., 2] < 60)
    cols = np.nonzero(yellow)[1]
    assert (cols < rgb.shape[1] * 0.15).any() and (cols > rgb.shape[1] * 0.85).any()  # "R" left, "L" right
    hidden = render(view, heatmap=False, shown=[], opacity=1.0)
    assert not (np.abs(hidden[mask] - np.array(COLOURS[0])) <= 1).all(axis=1).any()  # toggled off: not drawn
    assert (render(view, heatmap=True, shown=[]) != hidden).any()  # the heatmap overlay


def test_ct_windows_map_hounsfield_units_as_the_presets_say():
    hu = np.array([[-1000.0, -600.0, 40.0, 400.0, 1500.0]])
    lung, mediastinum, bone = (window(hu, w) for w in ("lung", "mediastinum", "bone"))
    assert lung[0, 1] in (127, 128) and mediastinum[0, 2] in (127, 128) and bone[0, 3] in (127, 128)
    assert lung[0, 0] < 60 and mediastinum[0, 1] == 0 and mediastinum[0, 3] == 255 and bone[0, 4] == 255
    assert set(WINDOWS) == {"lung", "mediastinum", "bone"}


def test_the_pdf_embeds_a_chinese_font_and_keeps_the_edited_report(reading, tmp_path, monkeypatch):
    from pypdf import PdfReader

    if export.cjk_font() is None:
        pytest.skip("no CJK TrueType font (scripts/install-browser.sh installs fonts-wqy-microhei)")
    edited = reading.result_json()["structured_report"]["text"] + "\n医师补充：建议随访复查。"
    data = export.reading_json(reading, edited)
    assert data["structured_report"]["edited"] and data["structured_report"]["text"] == edited
    assert "generated_text" in data["structured_report"]
    assert not export.reading_json(reading, None)["structured_report"]["edited"]
    path = export.write_pdf(data, render(view_of(reading)), str(tmp_path / "r.pdf"), "zh")
    text = "".join(p.extract_text() for p in PdfReader(path).pages)
    assert "建议随访复查" in text and "影像所见" in text and "右肺中野" in text
    json_path = export.write_json(data, str(tmp_path / "r.json"))
    assert json.loads(open(json_path, encoding="utf-8").read())["structured_report"]["text"] == edited
    monkeypatch.setenv(export.FONT_ENV, str(tmp_path / "missing.ttf"))
    with pytest.raises(InputError, match="fonts-wqy-microhei"):
        export.write_pdf(data, None, str(tmp_path / "r2.pdf"), "zh")


def test_a_png_reading_has_no_sr_and_says_why(reading, tmp_path):
    from monailabel_app.io.writers import write_in_geometry

    from PIL import Image

    labels = write_in_geometry(reading.labels, reading.geometry, str(tmp_path / "l.nrrd"))
    png = tmp_path / "phantom.png"
    Image.fromarray(reading.radiograph.pixels).save(png)
    with pytest.raises(InputError, match="need DICOM input"):
        export.write_sr(str(png), labels, export.reading_json(reading), str(tmp_path / "sr"))


def test_the_queue_is_shared_and_bounded():
    queue = InferenceQueue(max_queue=2)
    with queue.slot(), queue.slot():
        assert queue.in_flight == 2
        with pytest.raises(Busy) as e:
            with queue.slot():
                pass
        assert e.value.retry_s >= 1 and "limit 2" in str(e.value)
    assert queue.in_flight == 0


def test_doctor_reports_each_check_and_fails_on_a_bad_model(tmp_path, monkeypatch, capsys):
    from monailabel_app import doctor

    monkeypatch.setenv("MEDGEMMA_CPU_BF16", "none")
    assert doctor.main(["--precision", "auto"]) == 0
    out = capsys.readouterr().out
    for name in ("python", "torch", "cuda", "cpu bf16", "precision", "model", "memory", "dcmqi", "pdf font"):
        assert f"] {name}" in out, name
    assert "fp32 on cpu: CPU without native bf16" in out and "no AVX512-BF16/AMX" in out
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    assert doctor.main(["--model", str(tmp_path), "--json"]) == 1
    checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)}
    assert checks["model"]["status"] == "fail" and "safetensors" in checks["model"]["detail"]
    monkeypatch.setenv("MEDGEMMA_CPU_BF16", "amx")
    assert doctor.main([]) == 0 and "bf16 on cpu: CPU has native bf16 (AMX)" in capsys.readouterr().out
    assert doctor.main(["--studies", "http://127.0.0.1:9/dicom-web"]) == 1  # an unreachable PACS fails
    assert "not reachable" in capsys.readouterr().out


def test_the_app_command_prints_the_page_and_logs_the_precision_signals(tmp_path):
    """``medgemma-label app``: the server with its page, its address printed, the log file written."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import requests

    from monailabel_app.serve.server import PACKAGE_PARENT, free_port

    port, log = free_port(), tmp_path / "logs" / "server.log"
    env = {**os.environ, "PYTHONPATH": PACKAGE_PARENT, "MONAI_LABEL_SESSION_PATH": str(tmp_path / "sessions"),
           "MEDGEMMA_PRECISION": "fp32"}
    proc = subprocess.Popen([sys.executable, "-m", "monailabel_app.cli", "app", "--studies", str(tmp_path / "studies"),
                             "--port", str(port), "--log-file", str(log)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    (tmp_path / "studies").mkdir()
    try:
        deadline, lines = time.time() + 120, []
        while time.time() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "reading page: http" in line or proc.poll() is not None:
                break
        assert f"http://127.0.0.1:{port}/reader/" in lines[-1], "".join(lines)[-3000:]
        assert requests.get(f"http://127.0.0.1:{port}/reader/", timeout=30).status_code == 200
        text = log.read_text(encoding="utf-8")
        assert re.search(r"Loaded .* on cpu in fp32 \(.*\).*vision tower float32, language model float32", text), text
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def test_the_health_panel_and_the_doctors_table_speak_the_pages_language(reader, reading):
    from types import SimpleNamespace

    from monailabel_app import doctor
    from monailabel_app.serve.web.page import ReadingPage, Session

    page = ReadingPage(SimpleNamespace(_infers={"medgemma": SimpleNamespace(reader=reader)}, studies=""))
    session = Session(turns=[("", reading)], current=0)
    zh, en = page.health(session, "zh"), page.health(session, "en")
    assert "精度" in zh and "排队" in zh and "合计" in zh and "生成" in zh and "词元" in zh
    assert "Precision" in en and "Queue" in en and "total" in en and not CJK.search(en.replace(reading.report, ""))
    assert "prompt" not in en and "decoder" not in en  # token and step counts are not shown as seconds
    for check in doctor.run_checks():
        name = check.name.partition(" ")[0] if check.name[4:].isdigit() else check.name
        assert name in texts.CHECKS, f"the doctor's check {check.name!r} has no name on the page"
    table = page.doctor("zh")
    assert table.startswith("| 检查项 | 结果 | 详情 |") and "| 模型 | 通过 |" in table and "| PDF 中文字体 |" in table
    assert "| model | ok |" in page.doctor("en")


def test_a_sessions_view_is_built_once_per_reading(reading):
    from monailabel_app.serve.web.page import Session

    session = Session(turns=[("", reading)], current=0)
    view = session.view()
    assert session.view() is view  # the slider redraws from it
    session.turns.append(("again", reading.__class__(**{**reading.__dict__})))
    session.current = 1
    assert session.view() is not view and session.view().names == view.names


def test_a_findings_line_says_its_measured_diameter_in_the_readings_language():
    from types import SimpleNamespace

    from monailabel_app.language.findings import Finding
    from monailabel_app.serve.web.page import finding_line

    findings = [Finding(kind="nodule", text="右肺上叶结节。"), Finding(kind="cardiomegaly", text="心影增大。")]
    extras = [{"extent": "image", "measured": {"diameter_mm": 17.6}}, {"extent": "attention"}]
    zh = SimpleNamespace(findings=findings, extras=extras, language="zh")
    assert finding_line(zh, 1) == "1. 右肺上叶结节。（图像测量最大径 18 mm）"
    assert finding_line(zh, 2) == "2. 心影增大。"  # no outline from the image: no size claimed
    en = SimpleNamespace(findings=findings, extras=extras, language="en")
    assert finding_line(en, 1).endswith("(longest diameter measured in the image: 18 mm)")
