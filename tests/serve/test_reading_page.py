"""The reading page in a real browser: headless Chromium (Debian's) driven by Selenium, on a real server.

One server and one browser for the module, the steps in order as a radiologist takes them: open the page
(Chinese), upload a radiograph, ask in Chinese, read the report and see the masks on the right side of the
rendered image; a follow-up with its own masks; English; a CT as a DICOM series .zip with the slice
slider; PDF and SR exports opened; a corrupt file; a second browser session; the network log.
Screenshots of each step go to ``$MEDGEMMA_TEST_ARTIFACTS`` (default ``.test-artifacts/``, not committed).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import time

import numpy as np
import pytest
import requests
from PIL import Image

from monailabel_app.serve.web.viewer import COLOURS
from tests.conftest import ROOT

CHROMIUM, DRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    if os.environ.get("MEDGEMMA_REQUIRE_BROWSER") == "1":
        raise RuntimeError("chromium and chromium-driver are required (scripts/install-browser.sh)")
    pytest.skip("no chromium/chromedriver here (scripts/install-browser.sh installs them)", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

ARTIFACTS = os.environ.get("MEDGEMMA_TEST_ARTIFACTS") or os.path.join(ROOT, ".test-artifacts")


def _browser() -> webdriver.Chrome:
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1500",
                "--disable-gpu", "--no-first-run", "--disable-background-networking", "--disable-sync",
                "--disable-component-update", "--disable-default-apps"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    return webdriver.Chrome(options=opts, service=webdriver.ChromeService(DRIVER))


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    from monailabel_app.phantoms import ct as ct_phantoms
    from monailabel_app.phantoms.films import make_phantom

    folder = tmp_path_factory.mktemp("page")
    Image.fromarray(make_phantom(0).image).save(folder / "phantom0.png")  # one opacity, patient right
    series = folder / "ct_series"
    ct_phantoms.save(ct_phantoms.make_ct_phantom(2), str(series))
    shutil.make_archive(str(folder / "ct_phantom2"), "zip", str(series))
    shutil.rmtree(series)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return folder


@pytest.fixture(scope="module")
def page(server):
    browser = _browser()
    browser.base = server.url
    os.makedirs(ARTIFACTS, exist_ok=True)
    yield browser
    browser.quit()


def _shot(browser, name: str) -> None:
    browser.save_screenshot(os.path.join(ARTIFACTS, f"reading-page-{name}.png"))


def _wait(browser, condition, seconds: float = 60, what: str = ""):
    try:
        return WebDriverWait(browser, seconds, poll_frequency=0.1).until(lambda b: condition(b))
    except TimeoutException:
        _shot(browser, "timeout")
        raise AssertionError(f"waited {seconds} s for {what}; page text: {browser.find_element(By.TAG_NAME, 'body').text[:2000]}")


def _text(browser, elem_id: str) -> str:
    return browser.find_element(By.ID, elem_id).get_attribute("textContent")


def _value(browser, elem_id: str) -> str:
    return browser.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input").get_attribute("value")


def _upload(browser, path) -> None:
    clear = browser.find_elements(By.CSS_SELECTOR, "#upload button[aria-label='Clear'], #upload button[title='Clear']")
    if clear:
        clear[0].click()
    browser.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(path))
    stem = os.path.basename(str(path)).split(".")[0]
    _wait(browser, lambda b: stem in _text(b, "upload").replace("\u200b", ""), 30, "the upload")


def _type(browser, elem_id: str, text: str) -> None:
    box = browser.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input")
    box.clear()
    box.send_keys(text)


def _links(browser) -> list[str]:
    return browser.execute_script("return [...document.querySelectorAll('#files a[href]')].map(a => a.href)")


def _viewer_pixels(browser) -> np.ndarray:
    """The viewer's image as drawn, once the browser has loaded it and Gradio's progress overlay is gone: the
    status line and the image's new address arrive together, but the image loads after them (CI once caught a
    follow-up's image before it was drawn)."""

    def loaded(b):
        img = b.find_element(By.CSS_SELECTOR, "#viewer img")
        return b.execute_script("const i = arguments[0]; return i.complete && i.naturalWidth > 0 && "
                                "!document.querySelector('#viewer .wrap:not(.hide)')", img) and img

    img = _wait(browser, loaded, 30, "the viewer's image to load")
    return np.asarray(Image.open(io.BytesIO(img.screenshot_as_png)).convert("RGB")).astype(int)


def _colour_mask(rgb: np.ndarray, colour) -> np.ndarray:
    return (np.abs(rgb - np.array(colour)) <= 14).all(axis=2)


def _drawn(browser, colour) -> bool:
    """Whether more than 20 of the viewer's pixels have ``colour`` (a mask's outline)."""
    return bool(_colour_mask(_viewer_pixels(browser), colour).sum() > 20)


def _reading_number(status: str) -> int:
    found = re.search(r"第 (\d+) 次阅片完成|Reading (\d+) done", status)
    return int(found.group(1) or found.group(2)) if found else 0


def _read(browser, before: str) -> str:
    """Wait for the next reading's status line (the status numbers this session's readings); return it."""
    n = _reading_number(before) + 1
    return _wait(browser, lambda b: _reading_number(s := _text(b, "status")) == n and s, 90, f"reading {n}")


def test_the_page_opens_in_chinese_within_seconds(page):
    t0 = time.perf_counter()
    page.get(page.base + "/reader/")
    _wait(page, lambda b: b.find_elements(By.ID, "analyse") and _text(b, "analyse").strip() == "分析", 30, "the page")
    print(f"page usable {time.perf_counter() - t0:.2f} s (bench/reading_page.py measures it)")
    assert "研究用途" in _text(page, "banner") and "上传影像" in _text(page, "upload")
    _shot(page, "1-opened")


def test_a_radiograph_read_in_chinese_shows_report_findings_and_masks_on_the_patients_right(page, studies, server):
    _upload(page, studies / "phantom0.png")
    _type(page, "question", "请描述这张胸片的异常")
    before = _text(page, "status")
    t0 = time.perf_counter()
    page.find_element(By.ID, "analyse").click()
    status = _read(page, before)
    on_screen = time.perf_counter() - t0
    report = _value(page, "report")
    assert "影像所见" in report and "右肺中野" in report, report
    assert "右肺中野" in _text(page, "chat")
    assert "右肺中野" in _value(page, "answer")
    _wait(page, lambda b: _drawn(b, COLOURS[0]), 20, "the first finding's outline")
    rgb = _viewer_pixels(page)
    outline = _colour_mask(rgb, COLOURS[0])
    xs = np.nonzero(outline)[1]
    assert xs.mean() < rgb.shape[1] / 2, "a right-sided finding drawn on the image's right (the patient's left)"
    log = server.log_tail(20000)
    print(f"analyse -> report on screen {on_screen:.2f} s ({status})")
    _shot(page, "2-radiograph-zh")
    assert "medgemma:" in log  # the page read through the server's own infer task (its log line)


def test_a_follow_up_answers_in_the_same_conversation_with_its_own_masks(page):
    before = _text(page, "status")
    _type(page, "follow", "它在哪里？")
    page.find_element(By.ID, "ask").click()
    _read(page, before)
    chat = _text(page, "chat")
    assert chat.count("它在哪里") == 1 and "右肺中野" in chat.split("它在哪里")[1], chat
    turns = page.find_elements(By.CSS_SELECTOR, "#turn input[type=radio]")
    assert len(turns) == 2
    # the second answer's own mask (a re-render may follow the first frame: waited for, at most 20 s)
    _wait(page, lambda b: _drawn(b, COLOURS[0]), 20, "the follow-up's mask")
    _shot(page, "3-follow-up")


def test_english_by_the_selector(page):
    page.find_element(By.XPATH, "//*[@id='lang']//label[contains(., 'English')]").click()
    _wait(page, lambda b: _text(b, "analyse").strip() == "Analyse", 20, "English labels")
    assert "For research" in _text(page, "banner") and _text(page, "ask").strip() == "Ask"
    before = _text(page, "status")
    page.find_element(By.ID, "analyse").click()  # the same image, asked again: the answer in English
    _read(page, before)
    assert "Findings" in _value(page, "report") and "right middle zone" in _value(page, "answer")
    _shot(page, "4-english")


def test_a_ct_series_zip_with_the_slice_slider_and_exports(page, studies, tmp_path):
    import pydicom
    from pypdf import PdfReader

    page.find_element(By.XPATH, "//*[@id='lang']//label[contains(., '中文')]").click()
    _wait(page, lambda b: _text(b, "analyse").strip() == "分析", 20, "Chinese labels")
    _upload(page, studies / "ct_phantom2.zip")
    _type(page, "question", "")
    before = _text(page, "status")
    page.find_element(By.ID, "analyse").click()
    _read(page, before)
    assert "影像所见" in _value(page, "report")
    # the slider shows the volume's slices once the reading is drawn (a radiograph leaves it hidden)
    _wait(page, lambda b: (r := b.find_elements(By.CSS_SELECTOR, "#slice input[type=range]")) and r[0].is_displayed()
          and int(r[0].get_attribute("max")) > 2 and int(r[0].get_attribute("value")) > 1, 20, "the slice slider")
    # the reading opens on the first finding's strongest slice, its mask drawn; the first slice has none
    _wait(page, lambda b: _drawn(b, COLOURS[0]), 20, "the finding's slice")
    _shot(page, "5-ct")
    page.find_element(By.CSS_SELECTOR, "#slice input[type=range]").send_keys(Keys.HOME)
    _wait(page, lambda b: not _drawn(b, COLOURS[0]), 20, "the first slice")
    assert page.find_element(By.CSS_SELECTOR, "#slice input[type=range]").get_attribute("value") == "1"
    page.find_element(By.XPATH, "//*[@id='window']//label[contains(., '骨窗')]").click()
    time.sleep(0.5)
    _shot(page, "6-ct-slice-bone")
    # choosing a finding jumps to its strongest slice: its mask is drawn there (on the first slice it is not)
    page.find_element(By.XPATH, "//*[@id='window']//label[contains(., '肺窗')]").click()
    assert not _drawn(page, COLOURS[0])  # still slice 1: no mask of the finding
    box = page.find_element(By.CSS_SELECTOR, "#jump input")
    box.click()
    box.send_keys(Keys.ARROW_DOWN, Keys.ENTER)
    _wait(page, lambda b: b.find_element(By.CSS_SELECTOR, "#slice input[type=range]").get_attribute("value") != "1"
          and _drawn(b, COLOURS[0]), 20, "the first finding's strongest slice")
    _shot(page, "6b-ct-jump")

    for button, suffix in (("export_pdf", ".pdf"), ("export_sr", ".dcm")):
        page.find_element(By.ID, button).click()
        _wait(page, lambda b: any(h.split("?")[0].endswith(suffix) for h in _links(b)), 30, f"the {suffix} file")
    sr_link = next(h for h in _links(page) if h.split("?")[0].endswith("sr.dcm"))
    sr = pydicom.dcmread(io.BytesIO(requests.get(sr_link, timeout=10).content))
    assert sr.SpecificCharacterSet == "ISO_IR 192" and sr.Modality == "SR"
    assert "影像所见" in json.dumps(sr.to_json_dict(), ensure_ascii=False)
    _shot(page, "7-exports")
    page.find_element(By.ID, "export_pdf").click()  # the SR replaced the PDF in the list: export it again
    _wait(page, lambda b: any(h.split("?")[0].endswith(".pdf") for h in _links(b)), 30, "the PDF")
    pdf_link = next(h for h in _links(page) if h.split("?")[0].endswith(".pdf"))
    pdf = PdfReader(io.BytesIO(requests.get(pdf_link, timeout=10).content))
    text = "".join(p.extract_text() for p in pdf.pages)
    assert "影像所见" in text and "研究用途" in text, text[:500]
    fonts = [f.get_object() for p in pdf.pages for f in p["/Resources"]["/Font"].values()]
    assert any("/FontFile2" in f.get("/FontDescriptor", {}) for f in fonts), "the Chinese font is not embedded"

def test_cancel_stops_waiting_and_the_page_goes_on(page, server):
    """Cancel while a CT is read: the page says so at once; the next reading is served as usual (the model
    finishes the cancelled one on its own: a generation is not interrupted)."""
    done = _reading_number(_text(page, "status"))
    served = server.log_tail(10**6).count("medgemma: ")
    page.find_element(By.ID, "analyse").click()
    page.find_element(By.ID, "cancel").click()
    _wait(page, lambda b: "已取消" in _text(b, "status"), 10, "the cancel")
    # the model finishes the cancelled reading on its own; a click while Gradio is still cancelling can be
    # cancelled with it (seen once in six runs), so the next click waits for the server to have finished
    _wait(page, lambda b: server.log_tail(10**6).count("medgemma: ") > served, 60, "the cancelled reading's end")
    page.find_element(By.ID, "analyse").click()
    _wait(page, lambda b: _reading_number(_text(b, "status")) > done, 90, "the next reading")
    assert "影像所见" in _value(page, "report")


def test_a_corrupt_file_says_what_is_wrong_and_the_page_goes_on(page, studies):
    _upload(page, studies / "corrupt.png")
    page.find_element(By.ID, "analyse").click()
    toast = _wait(page, lambda b: [e for e in b.find_elements(By.CSS_SELECTOR, "[data-testid='toast-body']")
                                   if "输入有误" in e.text], 30, "the error")
    assert "image" in toast[0].text.lower() or "图" in toast[0].text
    _shot(page, "8-corrupt")
    _upload(page, studies / "phantom0.png")
    before = _text(page, "status")
    page.find_element(By.ID, "analyse").click()
    _read(page, before)
    assert "右肺中野" in _value(page, "answer")


def test_two_browser_sessions_stay_apart(page, server):
    other = _browser()
    try:
        other.get(server.url + "/reader/?lang=en")
        _wait(other, lambda b: b.find_elements(By.ID, "analyse") and _text(b, "analyse").strip() == "Analyse", 30, "page 2")
        assert _value(other, "report") == "" and "右肺" not in _text(other, "chat")
        _type(other, "follow", "Where is it?")
        other.find_element(By.ID, "ask").click()  # no image in this session: the first session's is not used
        _wait(other, lambda b: [e for e in b.find_elements(By.CSS_SELECTOR, "[data-testid='toast-body']")
                                if "Upload an image" in e.text], 30, "the no-image message")
        _shot(other, "9-second-session")
    finally:
        other.quit()
    assert "右肺中野" in _value(page, "answer")  # the first session still has its reading


def test_a_study_of_the_server_is_picked_and_read(page, server):
    """The datastore's studies are offered (refreshed on each page load); one is read by its id, here through
    Gradio's own client, as the page's JavaScript calls it."""
    from gradio_client import Client

    config = requests.get(server.url + "/reader/config", timeout=10).json()
    study = next(c for c in config["components"] if c.get("props", {}).get("elem_id") == "study")
    assert "phantom0" in json.dumps(study["props"]["choices"]) and "ct_phantom2" in json.dumps(study["props"]["choices"])
    client = Client(server.url + "/reader/", verbose=False)
    shown = client.predict(None, "phantom0", "", "zh", api_name="/analyse")
    status, report = shown[9], shown[7]  # the outputs the client sees (the session's state stays on the server)
    assert "第 1 次阅片完成" in status and "右肺中野" in report, (status, report)
    with pytest.raises(Exception, match="not in the list of choices"):  # Gradio refuses an unlisted study
        client.predict(None, "no-such-study", "", "zh", api_name="/analyse")
    checks = client.predict("zh", api_name="/doctor")  # the health panel's button: the doctor's checks of this server
    assert "| 精度 | 通过 |" in checks and "| 模型 | 通过 |" in checks and "phantom-gemma3" in checks, checks


def _requests(browser) -> list[str]:
    """The URLs the browser asked for since its log was last read (reading the log empties it)."""
    urls = []
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def test_no_request_leaves_the_machine(page, server):
    """Every request the page made in this module's tests (or, run alone, in opening it) went to this server."""
    urls = _requests(page)
    if not any(u.startswith(server.url + "/reader") for u in urls):  # run on its own: open the page here
        page.get(page.base + "/reader/")
        _wait(page, lambda b: b.find_elements(By.ID, "analyse") and _text(b, "analyse").strip() == "分析", 30, "the page")
        urls += _requests(page)
    assert urls and any(u.startswith(server.url + "/reader") for u in urls)
    outside = [u for u in urls if not u.startswith((server.url, "data:", "blob:"))]
    assert not outside, outside
