"""``mdm serve`` in a real browser: headless Chromium (the Debian package) driven by Playwright.

Missing Playwright or Chromium fails these tests: set MATRYOSHKA_SKIP_BROWSER=1 to skip them
on purpose. A failing test leaves a screenshot in tmp/artifacts/ (or MATRYOSHKA_ARTIFACTS).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from .serve_runs import train_class_run, train_text_run

if os.environ.get("MATRYOSHKA_SKIP_BROWSER") == "1":
    pytest.skip("MATRYOSHKA_SKIP_BROWSER=1", allow_module_level=True)

CHROMIUM = os.environ.get("MATRYOSHKA_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("MATRYOSHKA_ARTIFACTS", Path(__file__).resolve().parent.parent / "tmp" / "artifacts"))
TIMEOUT_MS = 60_000  # generous: a loaded 2-core machine renders slowly


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from matryoshka.serve.app import build_app
    from matryoshka.serve.catalog import load_models

    root = tmp_path_factory.mktemp("browser")
    models = load_models([str(train_class_run(root)), str(train_text_run(root))])
    demo = build_app(models)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/", list(models)
    demo.close()


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(
            "playwright is not installed (pip install -c constraints.txt playwright); "
            "set MATRYOSHKA_SKIP_BROWSER=1 to skip the browser tests"
        )
    if not Path(CHROMIUM).is_file():
        pytest.fail(
            f"no Chromium at {CHROMIUM} (apt-get install chromium, or set MATRYOSHKA_CHROMIUM); "
            "set MATRYOSHKA_SKIP_BROWSER=1 to skip the browser tests"
        )
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server, request):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(server[0])
    page.wait_for_selector("#generate")
    failed_before = request.session.testsfailed
    yield page
    if request.session.testsfailed > failed_before:  # the test's own report comes before this teardown
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
    page.close()


def expect(locator):
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


def status(page) -> str:
    return page.inner_text("#status")


def wait_for_status(page, pattern: str) -> None:
    page.wait_for_function(f"document.querySelector('#status').innerText.match(/{pattern}/)", timeout=TIMEOUT_MS)


def choose(page, dropdown: str, option: str) -> None:
    page.click(f"{dropdown} input")
    page.get_by_role("option", name=option, exact=True).click()


def set_number(page, field: str, value: str) -> None:
    page.fill(f"{field} input", value)
    page.press(f"{field} input", "Tab")  # gradio reads a number when the field loses focus


def gallery_captions(page) -> list[str]:
    return [c.strip() for c in page.locator("#pyramid .caption-label").all_inner_texts()]


def test_class_model_generates_every_level(page):
    assert page.is_visible("#class") and not page.is_visible("#prompt")
    choose(page, "#class", "dogs")
    set_number(page, "#num", "2")
    page.click("#generate")
    wait_for_status(page, "Done")
    assert gallery_captions(page) == ["16² level", "8² level"]
    command = page.inner_text("#command")
    assert re.search(r"mdm sample \S+class --num 2 .*--class 1", command)
    assert page.locator("#download a").count() >= 1


def test_text_model_takes_a_prompt(page, server):
    choose(page, "#model", f"{server[1][1]} (step 2)")
    page.wait_for_selector("#prompt textarea")
    assert not page.is_visible("#class")
    page.get_by_text("red square", exact=True).first.click()  # a training prompt as an example
    expect(page.locator("#prompt textarea")).to_have_value("red square", timeout=TIMEOUT_MS)
    page.fill("#prompt textarea", "green star")
    page.click("#generate")
    wait_for_status(page, "Done")
    assert gallery_captions(page) == ["16² level", "8² level"]
    assert "--prompt 'green star'" in page.inner_text("#command")


def test_a_bad_value_shows_a_message_and_the_page_keeps_working(page):
    set_number(page, "#steps", "0")
    page.click("#generate")
    page.get_by_text("Steps: must be a whole number from 1 to 1000, got 0").first.wait_for()
    assert "Traceback" not in page.content()
    set_number(page, "#steps", "2")
    page.click("#generate")
    wait_for_status(page, "Done")
    assert gallery_captions(page) == ["16² level", "8² level"]


def test_stop_cancels_a_long_generation(page):
    set_number(page, "#steps", "1000")
    set_number(page, "#num", "16")
    page.click("#generate")
    wait_for_status(page, r"Step \d+ of 1000")
    assert any(t.name == "mdm-generate" for t in threading.enumerate())
    page.click("#stop")
    wait_for_status(page, "Stopped")
    deadline = time.monotonic() + 10
    while any(t.name == "mdm-generate" for t in threading.enumerate()):  # the sampler itself ends, too
        assert time.monotonic() < deadline, "the generation kept running after Stop"
        time.sleep(0.1)
    assert "Done" not in status(page)
    set_number(page, "#steps", "2")
    page.click("#generate")
    wait_for_status(page, "Done")
    page.click("#stop")  # a finished generation left nothing behind to stop
    wait_for_status(page, "Nothing to stop")
