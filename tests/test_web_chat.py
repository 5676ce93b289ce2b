"""The web chat page at ``/`` in a real browser: Debian's chromium + chromium-driver, driven by
selenium. The test types a message, waits for the streamed answer, checks that it equals the
API's own (non-streamed, greedy) answer, and saves a screenshot as a test artefact.

Chromium is installed with apt when missing (root, or password-less sudo); where it cannot be,
the test is skipped with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
import test_serve
from test_serve import CYCLE_TEXT, MODEL, LiveServer

from camelid.serve.app import create_app

# The fixtures the cycle model is built from (a tokenizer, a random Llama dir, its engine).
tok, model_dir, engine, cycle_engine = (
    test_serve.tok,
    test_serve.model_dir,
    test_serve.engine,
    test_serve.cycle_engine,
)

ARTEFACTS = Path(os.environ.get("CAMELID_TEST_ARTEFACTS", Path(__file__).parent / "artefacts"))


def _browser() -> tuple[str, str] | str:
    """(chromium, chromedriver) paths, installing them with apt if needed; or why not."""
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if all(found):
        return found  # type: ignore[return-value]
    apt = shutil.which("apt-get")
    if apt is None:
        return "chromium is not installed and there is no apt-get to install it"
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    if sudo and shutil.which("sudo") is None:
        return "chromium is not installed and installing it needs root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in ([*sudo, apt, "update", "-qq"],
                [*sudo, apt, "install", "-y", "-qq", "chromium", "chromium-driver"]):  # fmt: skip
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"could not install chromium with apt ({e})"
        if res.returncode != 0:
            tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["?"]
            return f"could not install chromium with apt: {tail[0]}"
    found = shutil.which("chromium"), shutil.which("chromedriver")
    return found if all(found) else "apt installed chromium but chromium/chromedriver not found"  # type: ignore[return-value]


@pytest.fixture(scope="module")
def browser():
    pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    paths = _browser()
    if isinstance(paths, str):
        pytest.skip(paths)
    chromium, driver_path = paths
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1100,800"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(cycle_engine):
    """The app on a free loopback port, serving a tiny Llama whose chat answers cycle through
    Chinese characters and emoji made of several tokens each (see tests/test_serve.py): a
    character split across stream chunks would show as U+FFFD."""
    engine, _ = cycle_engine
    live = LiveServer(create_app(engine, model_name=MODEL))
    yield live.url
    live.close()


def _api_answer(base: str, text: str, max_tokens: int) -> str:
    body = {"model": "x", "messages": [{"role": "user", "content": text}], "temperature": 0,
            "max_tokens": max_tokens}  # fmt: skip
    with urllib.request.urlopen(base + "/v1/models") as r:
        body["model"] = json.load(r)["data"][0]["id"]
    request = urllib.request.Request(
        base + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request) as r:
        return json.load(r)["choices"][0]["message"]["content"]


def test_the_page_streams_the_api_answer(browser, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_element(By.ID, "model").text not in ("", "…"))
    for field, value in (("temperature", "0"), ("max-tokens", "24")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    text = "Grüße 你好 🙂"
    browser.find_element(By.ID, "input").send_keys(text)
    browser.find_element(By.ID, "send").click()

    def finished(d):
        answers = d.find_elements(By.CSS_SELECTOR, ".msg.assistant")
        return answers and answers[-1].get_attribute("data-finish") not in (None, "")

    wait.until(finished)
    answer = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
    shown = answer.find_element(By.CSS_SELECTOR, ".body").text
    stats = answer.find_element(By.CSS_SELECTOR, ".stats").text
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTEFACTS / "web_chat.png"))

    expected = _api_answer(server, text, 24)
    # The browser's innerText normalises trailing whitespace only.
    assert shown.rstrip() == expected.rstrip(), (shown, expected)
    assert "tokens/s" in stats and "finish:" in stats
    assert CYCLE_TEXT[:4] in shown and "🎉" in shown
    assert "\ufffd" not in shown  # no character broken across stream chunks

    # The conversation is kept: a second turn is sent with the first one's history.
    browser.find_element(By.ID, "input").send_keys("and again")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 2
               and finished(d))  # fmt: skip
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.user")) == 2
