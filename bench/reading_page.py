"""The reading page's own costs in a real browser (Debian's headless Chromium), on the embedded model.

    .venv/bin/python bench/reading_page.py [--runs 5] [--out bench/results/reading_page.md]

* page usable: from navigating to /reader/ (the server already answering /info/) to the 分析 button shown;
* 分析 -> report on screen, next to the server's own reading time for that request (its latencies' total,
  from the server's log line) and the page's overhead (the difference): a phantom radiograph.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from PIL import Image  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from monailabel_app.phantoms.films import make_phantom  # noqa: E402
from monailabel_app.serve.server import ServerProcess  # noqa: E402


def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1500"):
        opts.add_argument(arg)
    return webdriver.Chrome(options=opts, service=webdriver.ChromeService(shutil.which("chromedriver")))


def text(b, elem_id):
    return b.find_element(By.ID, elem_id).get_attribute("textContent")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "reading_page.md"))
    args = ap.parse_args(argv)
    folder = tempfile.mkdtemp(prefix="page-bench-")
    image = os.path.join(folder, "phantom0.png")
    Image.fromarray(make_phantom(0).image).save(image)
    usable, on_screen, server_s = [], [], []
    with ServerProcess(folder) as server:
        b = browser()
        try:
            for _ in range(args.runs):
                t0 = time.perf_counter()
                b.get(server.url + "/reader/")
                WebDriverWait(b, 30, 0.05).until(lambda d: d.find_elements(By.ID, "analyse") and text(d, "analyse").strip() == "分析")
                usable.append(time.perf_counter() - t0)
            b.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(image)
            WebDriverWait(b, 30, 0.05).until(lambda d: "phantom0" in text(d, "upload"))
            for n in range(1, args.runs + 1):
                t0 = time.perf_counter()
                b.find_element(By.ID, "analyse").click()
                WebDriverWait(b, 60, 0.02).until(lambda d: f"第 {n} 次阅片完成" in text(d, "status"))
                on_screen.append(time.perf_counter() - t0)
                totals = re.findall(r'"total": ([0-9.]+)', server.log_tail(200000))
                server_s.append(float(totals[-1]))
        finally:
            b.quit()
    shutil.rmtree(folder, ignore_errors=True)
    med = statistics.median
    overhead = [a - s for a, s in zip(on_screen, server_s)]
    lines = [f"# The reading page in headless Chromium ({time.strftime('%Y-%m-%d')}, this CPU, embedded phantom model, "
             f"median of {args.runs})", "",
             "| measure | median (s) | all runs (s) |", "|---|---|---|",
             f"| page usable after navigating (server up) | {med(usable):.2f} | {', '.join(f'{x:.2f}' for x in usable)} |",
             f"| 分析 -> report on screen | {med(on_screen):.2f} | {', '.join(f'{x:.2f}' for x in on_screen)} |",
             f"| the server's own reading (latencies total) | {med(server_s):.2f} | {', '.join(f'{x:.2f}' for x in server_s)} |",
             f"| the page's overhead (difference) | {med(overhead):.2f} | {', '.join(f'{x:.2f}' for x in overhead)} |", ""]
    text_out = "\n".join(lines)
    print(text_out)
    with open(args.out, "w") as f:
        f.write(text_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
