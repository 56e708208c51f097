"""``biwm play`` in headless Chromium (Playwright with Debian's /usr/bin/chromium; skipped without
them): the page streams the toy-lab student's frames, a held turn key moves the image the way the
true toy world moves, a second viewer is told the model is busy, and a closed tab frees the session.
BIWM_PLAY_SCREENSHOT=docs/play.png keeps the screenshot (README)."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, biwm_cmd, image_shift, subprocess_env, true_turn_shift

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

try:
    from playwright.sync_api import sync_playwright
except ImportError:
    sync_playwright = None

pytestmark = [
    pytest.mark.skipif(sync_playwright is None, reason="needs the playwright package (pip install playwright)"),
    pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason=f"needs Debian's chromium at {CHROMIUM} "
                       "(apt-get install -y chromium; .ci/run installs it)"),
]


@pytest.fixture
def play_url(tmp_path):
    """``biwm play`` on the toy-lab student on a free port; yields the URL it prints."""
    proc = subprocess.Popen([*biwm_cmd(), "play", str(ROOT / "examples" / "weights" / "toyworld-student"),
                             "--port", "0", "--record-dir", str(tmp_path / "rec")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=subprocess_env(PYTHONUNBUFFERED="1", COLUMNS="200"))
    lines = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("open http://127.0.0.1:"):
                break
        assert lines and lines[-1].startswith("open http://127.0.0.1:"), "".join(lines)
        yield lines[-1].split()[1]
    finally:
        proc.terminate()
        proc.wait(30)


def gray(jpeg_b64: str) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(jpeg_b64)))
    assert image.format == "JPEG"
    return np.asarray(image.convert("RGB"), dtype=np.float64).mean(-1)


def test_browser_drives_the_model_with_held_keys_and_refuses_a_second_viewer(play_url, tmp_path):
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 900, "height": 520})
        page.goto(play_url + "?paused=1")
        page.wait_for_function("window.biwm.hello !== null", timeout=120_000)
        assert page.text_content("#status").startswith("paused: held-out scene 0 of toyworld")

        # hold the right arrow (turn right, the page's 'l') and generate one chunk with it
        page.keyboard.down("ArrowRight")
        page.click("#step")
        page.wait_for_function("window.biwm.frames.length >= 4 && window.biwm.latencies.length >= 1",
                               timeout=180_000)
        frames = page.evaluate("window.biwm.frames.map(f => ({chunk: f.chunk, index: f.index, keys: f.keys, "
                               "jpeg: window.biwm.base64(f.jpeg)}))")
        assert [f["keys"] for f in frames] == [["l"]] * 4 and [f["index"] for f in frames] == [0, 1, 2, 3]
        assert page.evaluate("window.biwm.latencies[0]") > 0
        assert page.text_content("#latency").endswith(" ms")
        assert "L" in page.inner_text(".keys span.on")

        # a second viewer is told the model is busy
        second = browser.new_page()
        second.goto(play_url)
        second.wait_for_function("window.biwm.status.startsWith('busy')", timeout=60_000)
        assert "another viewer is driving the model" in second.text_content("#status")

        shot = Path(os.environ.get("BIWM_PLAY_SCREENSHOT") or tmp_path / "play.png")
        page.screenshot(path=str(shot))
        page.keyboard.up("ArrowRight")

        # the turn moves the room left, as it does in the true toy world from the same start
        images = [gray(f["jpeg"]) for f in frames]
        assert images[0].shape == (32, 32) and images[0].std() > 10  # a room, not a flat image
        model = [image_shift(images[i], images[i + 1])[1] for i in range(3)]
        truth = [dx for _, dx in true_turn_shift(0, 4, "l*4")[1:]]
        assert np.mean(truth) <= -1.5 and np.mean(model) <= -1.0, (model, truth)

        # closing the tab frees the session: the second viewer gets it on reload
        page.close()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            second.reload()
            second.wait_for_function("window.biwm.hello !== null || window.biwm.status.startsWith('busy')",
                                     timeout=60_000)
            if second.evaluate("window.biwm.hello !== null"):
                break
            time.sleep(1)
        assert second.evaluate("window.biwm.hello !== null")
        browser.close()
    assert Image.open(shot).size == (900, 520)
