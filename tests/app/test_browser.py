"""A real browser against `streamlit run app/main.py`: headless Debian Chromium driven by
Playwright (no browser download).  Waits for the dashboard, moves an intervention control in
the lab, checks the displayed gold mass changes, and saves screenshots of the three pages
(into $LENS_SCREENSHOTS if set, e.g. docs/screenshots for the README)."""

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists() and not os.environ.get("CI"),
    reason="Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    env = {**os.environ, "LENS_APP_MODEL": "tiny-llama", "LENS_APP_DATASET": "synthetic-limit:docs=40,items=5,queries=6",
           "LENS_APP_N": "4,16", "LENS_APP_QUERIES": "2"}
    records = tmp_path_factory.mktemp("records")
    env["LENS_APP_RECORDS"] = str(records)
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "app" / "main.py"), "--server.port", str(port),
         "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/_stcore/health", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("streamlit did not come up: " + (proc.stdout.read() if proc.stdout else ""))
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_dashboard_and_a_live_intervention_in_chromium(server, tmp_path):
    from playwright.sync_api import sync_playwright

    shots = Path(os.environ.get("LENS_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"],
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(server, timeout=120_000)
        page.get_by_text("hit@1 at N=16 (none)").wait_for(timeout=300_000)
        page.get_by_text("R_sum per layer").first.wait_for(timeout=120_000)
        page.screenshot(path=str(shots / "dashboard.png"), full_page=True)

        page.goto(server + "/inspector", timeout=120_000)
        page.get_by_text("retrieval band").wait_for(timeout=300_000)
        page.screenshot(path=str(shots / "inspector.png"), full_page=True)

        page.goto(server + "/lab", timeout=120_000)
        label = page.get_by_text(re.compile(r"gold mass at layer \d+ after"))
        label.wait_for(timeout=300_000)
        metric = page.locator('[data-testid="stMetric"]').filter(has_text=re.compile(r"gold mass at layer \d+ after"))
        before = metric.locator('[data-testid="stMetricValue"]').inner_text()
        page.locator('[data-testid="stCheckbox"]').filter(has_text="temperature").first.click()  # switch it on
        page.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden", timeout=300_000)
        slider = page.get_by_role("slider").first  # temperature t, the first lab control
        slider.focus()
        for _ in range(10):
            slider.press("ArrowLeft")  # t: 1.0 -> 0.5
        deadline = time.time() + 300
        after = before
        while time.time() < deadline and after == before:
            time.sleep(0.5)
            after = metric.locator('[data-testid="stMetricValue"]').inner_text()
        # each arrow press reruns the page: wait until the last rerun is done, so the value read and
        # the screenshot are those of t = 0.5, not of a step on the way
        time.sleep(1.0)
        page.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden", timeout=300_000)
        after = metric.locator('[data-testid="stMetricValue"]').inner_text()
        page.screenshot(path=str(shots / "lab.png"), full_page=True)
        browser.close()
    assert after != before, f"gold mass stayed {before} after moving the temperature slider"
