"""The page in headless Chromium (Playwright, Debian's /usr/bin/chromium): upload, draw, no console errors, no CSP
violations. Screenshots go to /tmp/mnist-k8s-page-*.png for a human to look at."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import ROOT, copy_version, mnist_test_digits, need, need_module, Server, wait_for

pytestmark = pytest.mark.browser
CHROMIUM = os.environ.get("MNIST_K8S_CHROMIUM", "/usr/bin/chromium")
SHOTS = Path(os.environ.get("MNIST_K8S_SCREENSHOTS", "/tmp"))


CSP_WATCH = """
window.__csp = [];
document.addEventListener('securitypolicyviolation', e => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));
"""


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    d = tmp_path_factory.mktemp("browser-models")
    copy_version(trained, d)
    with Server(d) as s:
        wait_for(lambda: s.version(), timeout=30)
        yield s


@pytest.fixture(scope="session", autouse=True)
def sync_api():
    """Playwright's sync API, once a Chromium to drive is there too; if either is missing, skip on a laptop and
    fail in CI (`helpers.need`). Session-scoped, so that it runs before the session's model is trained."""
    api = need_module("playwright.sync_api", "pip install playwright (this project drives Debian's chromium with it)")
    need(CHROMIUM, "install Debian's chromium, or set MNIST_K8S_CHROMIUM to a Chromium binary")
    return api


@pytest.fixture(scope="module")
def browser(sync_api):
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM,
                              args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield b
        b.close()


class Console:
    "Collects console errors, page errors and failed requests of a page."
    def __init__(self, page, allow=()):
        self.errors, self.allow = [], allow
        page.on("console", lambda m: m.type == "error" and self._add(f"console: {m.text}"))
        page.on("pageerror", lambda e: self._add(f"pageerror: {e}"))
        page.on("requestfailed", lambda r: self._add(f"requestfailed: {r.url} {r.failure}"))

    def _add(self, msg):
        if not any(a in msg for a in self.allow):
            self.errors.append(msg)


@pytest.fixture
def page(browser, server):
    ctx = browser.new_context(viewport={"width": 1200, "height": 860}, device_scale_factor=1)
    pg = ctx.new_page()
    pg.add_init_script(CSP_WATCH)
    pg.console = Console(pg)
    pg.goto(server.url + "/")
    pg.wait_for_load_state("networkidle")
    yield pg
    assert pg.evaluate("window.__csp") == [], "CSP violations"
    assert pg.console.errors == []
    ctx.close()


def wait_digit(page, timeout=15000) -> str:
    page.wait_for_selector("#digit.has", timeout=timeout)   # (wait_for_function would need 'unsafe-eval')
    return page.text_content("#digit").strip()


def bar_heights(page) -> list[float]:
    return page.evaluate("[...document.querySelectorAll('#chart .fill')].map(e => e.getBoundingClientRect().height)")


def test_page_loads_with_model_card(page, server):
    assert page.title().startswith("Digit recognizer")
    assert server.version() in page.text_content("#model-facts")
    assert page.is_hidden("#no-model")
    assert page.is_visible("#pad") and page.is_visible("#chart")
    page.screenshot(path=str(SHOTS / "mnist-k8s-page-empty.png"), full_page=True)


def test_upload_a_real_digit(page, server, tmp_path):
    # the first real test digit the served model gets right through the API: the page must show that answer
    data, label = next((d, l) for d, l in mnist_test_digits(50)
                       if server.post("/predict", files={"file": ("d.png", d, "image/png")}).json()["digit"] == l)
    f = tmp_path / "digit.png"
    f.write_bytes(data)
    page.set_input_files("#file", str(f))
    assert wait_digit(page) == str(label)
    assert f"{label}" in page.text_content("#confidence")
    assert page.is_visible("#preview")
    page.wait_for_timeout(500)   # let the bars finish their transition
    heights = bar_heights(page)
    assert len(heights) == 10 and max(heights) > 50 and heights.index(max(heights)) == label
    page.screenshot(path=str(SHOTS / "mnist-k8s-page-upload.png"), full_page=True)


def draw(page, strokes):
    "Draw polylines given in canvas units (0..280) with the mouse."
    box = page.locator("#pad").bounding_box()
    k = box["width"] / 280
    for line in strokes:
        (x0, y0), rest = line[0], line[1:]
        page.mouse.move(box["x"] + x0 * k, box["y"] + y0 * k)
        page.mouse.down()
        for x, y in rest:
            page.mouse.move(box["x"] + x * k, box["y"] + y * k, steps=12)
        page.mouse.up()


def test_draw_a_one_and_a_seven(page):
    draw(page, [[(150, 40), (140, 240)]])
    assert wait_digit(page) == "1"
    page.wait_for_timeout(500)
    heights = bar_heights(page)
    assert max(heights) > 50 and heights.index(max(heights)) == 1
    page.screenshot(path=str(SHOTS / "mnist-k8s-page-drawn-1.png"), full_page=True)

    page.click("#clear")
    page.wait_for_timeout(500)
    assert page.text_content("#digit").strip() == "?" and max(bar_heights(page)) < 1
    assert page.is_disabled("#predict")
    draw(page, [[(70, 55), (215, 55), (125, 245)]])
    assert wait_digit(page) == "7"
    page.click("#predict")                       # the button predicts too
    page.wait_for_timeout(400)
    assert page.text_content("#digit").strip() == "7"
    page.screenshot(path=str(SHOTS / "mnist-k8s-page-drawn-7.png"), full_page=True)


def draw_x(page):
    draw(page, [[(60, 50), (220, 230)], [(220, 50), (60, 230)]])


def test_drawing_a_letter_says_not_sure(page):
    draw_x(page)
    wait_digit(page)
    assert page.text_content("#confidence").startswith("Not sure: is this one digit?")
    assert page.text_content("#digit").strip() == "?"
    assert "unsure" in page.get_attribute("#digit", "class")
    assert "most likely" in page.text_content("#timing")
    page.wait_for_timeout(500)
    assert page.locator("#chart .bar.top").count() == 0          # no bar is singled out as the answer
    page.screenshot(path=str(SHOTS / "mnist-k8s-page-not-sure.png"), full_page=True)


def photo_of(label: int, tmp_path) -> Path:
    "A phone-photo-like JPEG of the first MNIST test digit with `label` (bench/corpus.py)."
    import sys
    import numpy as np
    sys.path.insert(0, str(ROOT / "bench"))
    import corpus
    digits, labels = corpus.mnist(str(ROOT / "tests" / "data"), "t10k")
    f = tmp_path / f"photo-{label}.jpg"
    f.write_bytes(corpus.realistic(digits[list(labels).index(label)], "phone_photo", np.random.default_rng(0)))
    return f


def result_is_blank(page) -> bool:
    "No digit, no confidence, no chart: nothing of an earlier answer is left."
    return (page.text_content("#digit").strip() == "?" and "has" not in page.get_attribute("#digit", "class")
            and "sure" not in page.text_content("#confidence") and page.text_content("#timing") == ""
            and page.locator("#chart .bar.top").count() == 0
            and all(t.strip() == "" for t in page.locator("#chart .pct").all_text_contents()))


def test_a_refused_upload_leaves_no_stale_answer(page, tmp_path):
    # the case: a photo of an 8 gets an answer, then an upload the server refuses
    page.set_input_files("#file", str(photo_of(8, tmp_path)))
    wait_digit(page)
    page.wait_for_timeout(500)
    assert max(bar_heights(page)) > 20 and "sure" in page.text_content("#confidence")
    blank = tmp_path / "blank.png"
    from PIL import Image
    Image.new("L", (300, 300), 250).save(blank)
    held = []                                   # hold the request: the old answer must go as soon as it starts
    page.route("**/predict", lambda route: held.append(route))
    page.console.allow = ("status of 422",)     # the browser logs the refused request itself
    page.set_input_files("#file", str(blank))
    wait_for(lambda: held or page.wait_for_timeout(50), timeout=10)
    assert result_is_blank(page) and page.is_hidden("#error") and page.is_visible("#preview")
    held[0].continue_()
    page.wait_for_selector("#error:not([hidden])")
    assert "digit" in page.text_content("#error").lower()
    page.wait_for_timeout(500)                  # the bars' transition
    assert result_is_blank(page) and max(bar_heights(page)) < 1
    assert page.is_visible("#preview")          # the refused image itself stays in view beside the error
    page.unroute("**/predict")
    page.screenshot(path=str(SHOTS / "mnist-k8s-page-refused.png"), full_page=True)


def test_bad_upload_shows_error(page, tmp_path):
    f = tmp_path / "notes.png"
    f.write_bytes(b"this is not an image")
    page.console.allow = ("status of 415",)     # the browser logs the refused request itself
    page.set_input_files("#file", str(f))
    page.wait_for_selector("#error:not([hidden])")
    assert "image" in page.text_content("#error").lower()


def test_page_without_model_then_model_appears(browser, trained, tmp_path):
    with Server(tmp_path) as s:
        ctx = browser.new_context(viewport={"width": 1000, "height": 800})
        pg = ctx.new_page()
        pg.add_init_script(CSP_WATCH)
        console = Console(pg, allow=("status of 503",))    # readiness polling before the model exists
        pg.goto(s.url + "/")
        assert pg.is_visible("#no-model") and "No model is loaded yet" in pg.text_content("#no-model")
        assert pg.is_disabled("#predict")
        pg.screenshot(path=str(SHOTS / "mnist-k8s-page-no-model.png"), full_page=True)
        v = copy_version(trained, tmp_path)
        pg.wait_for_selector("#no-model", state="hidden", timeout=20000)
        assert v in pg.text_content("#model-facts")
        facts = "".join(pg.text_content("#model-facts").split())      # the card as the script drew it ...
        draw(pg, [[(150, 40), (140, 240)]])
        wait_digit(pg)
        assert pg.evaluate("window.__csp") == [] and console.errors == []
        pg.reload()
        assert "".join(pg.text_content("#model-facts").split()) == facts    # ... is the one the server renders
        ctx.close()


def test_docs_page_works_offline(browser, server):
    ctx = browser.new_context()
    pg = ctx.new_page()
    pg.add_init_script(CSP_WATCH)
    console = Console(pg)
    external = []
    pg.on("request", lambda r: None if r.url.startswith(server.url) or r.url.startswith("data:") else external.append(r.url))
    pg.goto(server.url + "/docs")
    pg.wait_for_selector(".opblock-summary-path", timeout=20000)   # Swagger UI rendered the operations
    assert "/predict" in pg.text_content("#swagger-ui")
    assert external == [] and pg.evaluate("window.__csp") == [] and console.errors == []
    ctx.close()
