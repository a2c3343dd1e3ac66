"""minidl.ext.report: the page holds every section, its pictures inline and nothing from
outside, escapes what it shows, picks the most confident mistakes; and a real browser
(headless Chromium, driven over the DevTools protocol on a pipe, standard library
only) opens it offline, on a laptop's and a phone's width: no failed request, no
request but data: and the file itself, every image decoded, no sideways scrolling."""
import base64
import json
import os
import re
import select
import shutil
import signal

import numpy as np
import pytest

import minidl
from minidl import Conv2D, Dense, Flatten, MaxPool2D, ReLU, Sequential
from minidl.ext import report

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# The flags this machine's closed network needs (no background connections), a fresh
# profile, no sandbox (tests run as root in CI).
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars",
                  "--remote-debugging-pipe"]
SECTION_IDS = [key for key, _ in report.SECTIONS]


def small_run(n=40, seed=0):
    """A small CNN, untrained (so it makes mistakes), 8x8 test images of 3 classes, and
    a History of 3 epochs with GradientRecorder's keys."""
    minidl.manual_seed(seed)
    model = Sequential(Conv2D(1, 4, 3, padding=1), ReLU(), MaxPool2D(2), Flatten(),
                       Dense(4 * 4 * 4, 3)).eval()
    rng = np.random.default_rng(seed)
    images = rng.random((n, 1, 8, 8)).astype(np.float32)
    labels = rng.integers(0, 3, n)
    epochs = np.arange(1, 4)
    history = {"loss": list(1 / epochs), "accuracy": list(1 - 0.5 / epochs),
               "val_loss": list(1.2 / epochs), "val_accuracy": list(1 - 0.6 / epochs),
               "lr": [1e-3] * 3, "act_mean/0:Conv2D": [0.1, 0.2, 0.3],
               "act_std/0:Conv2D": [1.0, 0.9, 0.8], "act_mean/1:ReLU": [0.4, 0.5, 0.5],
               "act_std/1:ReLU": [0.6, 0.6, 0.7], "dead_relu/1:ReLU": [0.5, 0.45, 0.4],
               "grad_norm/0.weight": [1.0, 0.5, 0.3], "grad_norm/4.bias": [0.2, 0.1, 0.1]}
    return model, history, images, labels


@pytest.fixture
def page(tmp_path):
    model, history, images, labels = small_run()
    path = tmp_path / "report.html"
    size = report.write_report(path, model, history, images, labels,
                               settings={"model": "small", "note": "<b>&</b>"},
                               lrs=list(np.linspace(1e-4, 1e-3, 30)), steps_per_epoch=10,
                               title="small <run>")
    assert size == path.stat().st_size
    return path


def test_the_page_holds_every_section_with_inline_pictures_only(page):
    text = page.read_text()
    assert re.findall(r'<section id="([\w-]+)">', text) == SECTION_IDS
    sources = re.findall(r'src="([^"]*)"', text)
    assert len(sources) == 7 + report.GALLERY_SIZE
    assert all(source.startswith("data:image/png;base64,") for source in sources)
    for source in sources:                      # each a whole PNG
        assert base64.b64decode(source.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")
    outside = re.sub(r'src="data:[^"]*"', "", text)
    assert not re.search(r"(https?:)?//|<script|<link|@import|url\(", outside)
    assert '<meta name="viewport" content="width=device-width' in text
    # what the page shows is escaped
    assert "&lt;b&gt;&amp;&lt;/b&gt;" in text and "<b>&</b>" not in text
    assert "<title>small &lt;run&gt;</title>" in text


def test_sections_without_their_data_say_so(tmp_path):
    model, history, images, labels = small_run()
    plain = {key: values for key, values in history.items() if "/" not in key}
    dense = Sequential(Flatten(), Dense(64, 3)).eval()
    text = report.build_report(dense, plain, images, labels)
    assert "No activation statistics in the history" in text
    assert "No gradient norms in the history" in text
    assert "top level has no convolution" in text
    # without lrs: the curves only; no mistakes: a note instead of the gallery
    logits = dense.predict(images)
    text = report.build_report(dense, plain, images, logits.argmax(axis=1))
    assert "No test image is misclassified" in text and text.count("<img") == 3


def test_the_gallery_shows_the_most_confident_mistakes_first():
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.95, 0.05], [0.3, 0.7]])
    labels = np.array([1, 1, 0, 1, 0])
    np.testing.assert_array_equal(report.most_confident_mistakes(probabilities, labels, 2),
                                  [3, 0])
    np.testing.assert_array_equal(report.most_confident_mistakes(probabilities, labels, 9),
                                  [3, 0, 4, 2])


def test_a_model_without_class_scores_is_a_clear_error():
    _, history, images, labels = small_run()
    with pytest.raises(ValueError, match=r"report: the model gives outputs of shape "
                                         r"\(40, 2, 6, 6\), not class scores"):
        report.build_report(Sequential(Conv2D(1, 2, 3)), history, images, labels)
    with pytest.raises(ValueError, match="report: the labels go up to 2, but the model "
                                         "gives 2 class scores"):
        report.build_report(Sequential(Flatten(), Dense(64, 2)), history, images, labels)


# -- in a real browser ------------------------------------------------------------------------
class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe: commands go to its
    fd 3 and answers come from its fd 4, as JSON texts ended by a NUL byte."""

    def __init__(self, profile, timeout=60):
        commands, self._to_browser = os.pipe()
        self._from_browser, answers = os.pipe()
        devnull = os.open(os.devnull, os.O_WRONLY)
        actions = [(os.POSIX_SPAWN_DUP2, commands, 3), (os.POSIX_SPAWN_DUP2, answers, 4),
                   (os.POSIX_SPAWN_DUP2, devnull, 1), (os.POSIX_SPAWN_DUP2, devnull, 2)]
        self.pid = os.posix_spawn(CHROMIUM, [CHROMIUM, *CHROMIUM_FLAGS,
                                             f"--user-data-dir={profile}", "about:blank"],
                                  os.environ, file_actions=actions)
        for fd in (commands, answers, devnull):
            os.close(fd)
        self.timeout, self.events, self._buffer, self._next_id = timeout, [], b"", 0
        self.session = None

    def send(self, method, **params):
        """The result of one command (in the attached page, once there is one)."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if self.session and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        answer = self._until(lambda m: m.get("id") == self._next_id)
        assert "error" not in answer, (method, answer["error"])
        return answer["result"]

    def wait_for(self, event):
        return self._until(lambda m: m.get("method") == event)

    def _until(self, wanted):
        while True:
            for k, message in enumerate(self.events):
                if wanted(message):
                    return self.events.pop(k)
            ready, _, _ = select.select([self._from_browser], [], [], self.timeout)
            assert ready, f"Chromium did not answer within {self.timeout} s"
            data = os.read(self._from_browser, 1 << 20)
            assert data, "Chromium closed the pipe"
            *messages, self._buffer = (self._buffer + data).split(b"\0")
            self.events += [json.loads(m) for m in messages]

    def open_page(self, url, width, height, mobile=False):
        """Open ``url`` in a new tab of the given size; returns once it has loaded."""
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target,
                                 flatten=True)["sessionId"]
        for domain in ("Page", "Network", "Runtime"):
            self.send(f"{domain}.enable")
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=1, mobile=mobile)
        self.send("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired")

    def evaluate(self, expression):
        return self.send("Runtime.evaluate", expression=expression,
                         returnByValue=True)["result"]["value"]

    def screenshot(self):
        """A PNG of the whole page, top to bottom."""
        size = self.send("Page.getLayoutMetrics")["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        data = self.send("Page.captureScreenshot", format="png", clip=clip,
                         captureBeyondViewport=True)["data"]
        return base64.b64decode(data)

    def close(self):
        try:
            os.write(self._to_browser, json.dumps({"id": 0, "method": "Browser.close"})
                     .encode() + b"\0")
        except OSError:
            pass
        for fd in (self._to_browser, self._from_browser):
            os.close(fd)
        try:
            if os.waitpid(self.pid, 0)[0] == 0:
                os.kill(self.pid, signal.SIGKILL)
        except ChildProcessError:
            pass


def open_in_chromium(path, tmp_path, width, height, mobile=False):
    """What the page looked like in Chromium: its requests, failures, images, sections,
    widths and a screenshot."""
    browser = Chromium(tmp_path / f"profile-{width}")
    try:
        browser.open_page(path.as_uri(), width, height, mobile)
        seen = browser.evaluate("""JSON.stringify({
            images: Array.from(document.images, i => [i.complete, i.naturalWidth, i.alt]),
            sections: Array.from(document.querySelectorAll('section'), s => s.id),
            headings: Array.from(document.querySelectorAll('h2'), h => h.textContent),
            pageWidth: document.documentElement.scrollWidth, viewWidth: innerWidth})""")
        screenshot = browser.screenshot()
        events = browser.events
    finally:
        browser.close()
    requests = [e["params"]["request"]["url"] for e in events
                if e.get("method") == "Network.requestWillBeSent"]
    failed = [e["params"] for e in events if e.get("method") == "Network.loadingFailed"]
    return json.loads(seen), requests, failed, screenshot


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(CHROMIUM) and "CI" not in os.environ,
                    reason="needs Debian's chromium (.ci/run installs it: apt-get install "
                           "chromium)")
@pytest.mark.parametrize("width, height, mobile", [(1280, 900, False), (390, 844, True)],
                         ids=["laptop", "phone"])
def test_chromium_opens_the_page_offline_with_every_image_decoded(page, tmp_path, width,
                                                                  height, mobile):
    seen, requests, failed, screenshot = open_in_chromium(page, tmp_path, width, height, mobile)
    assert not failed, failed
    assert requests and all(url == page.as_uri() or url.startswith("data:image/png")
                            for url in requests), requests
    assert len(seen["images"]) == 7 + report.GALLERY_SIZE
    for complete, natural_width, alt in seen["images"]:
        assert complete and natural_width > 0, alt
    assert seen["sections"] == SECTION_IDS
    assert seen["headings"] == [heading for _, heading in report.SECTIONS]
    assert seen["pageWidth"] <= seen["viewWidth"], "the page scrolls sideways"
    assert screenshot.startswith(b"\x89PNG\r\n\x1a\n") and len(screenshot) > 20000
    (tmp_path / f"report-{width}.png").write_bytes(screenshot)
