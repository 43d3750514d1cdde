"""The gateway's web page in a real headless Chromium (Debian's chromium + chromedriver, through
selenium), against a token-protected orchestrator on the shared stages: the page asks for the
token, generates with a step count and live previews, shows errors next to their field, and
cancels a generation midway (the denoiser stops)."""

from __future__ import annotations

import base64
import re
import shutil

import pytest
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from factories import PROMPT
from fluxmesh.client import Client
from gateway_process import Gateway, token_orchestrator
from mesh import wait_settled

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
TOKEN = "page-test-token"


@pytest.fixture(scope="module")
def protected(stage_addresses, stage_token, tmp_path_factory):
    """(orchestrator address, gateway) — the orchestrator wants TOKEN."""
    folder = tmp_path_factory.mktemp("page")
    with token_orchestrator(stage_addresses, stage_token, folder, TOKEN) as address:
        gateway = Gateway(address, log=folder / "gateway.log")
        yield address, gateway
        gateway.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.fail(f"the page test needs {CHROMIUM} and {CHROMEDRIVER} (apt install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,1100",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _wait(driver, condition, timeout: float = 60.0, what: str = ""):
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition(d))
    except TimeoutException:
        errors = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".error") if e.text]
        raise AssertionError(
            f"waited {timeout}s for {what}; the page says {_text(driver, 'status')!r}, errors {errors}"
        ) from None


def _text(driver, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).text


def _set(driver, element_id: str, value: str) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def _steps_run(client: Client) -> int:
    return next(int(s.details["steps_run"]) for s in client.info().stages if s.stage == "denoiser")


def test_the_page_generates_shows_errors_and_cancels(browser, protected, dev_cluster, tmp_path):
    address, gateway = protected
    browser.get(gateway.url + "/")
    # without the token the server refuses, and the page says so
    _wait(browser, lambda d: "not connected" in _text(d, "model"), what="a refusal without the token")
    assert "bearer token" in _text(browser, "form-error")
    _set(browser, "token", TOKEN + "\n")
    browser.execute_script("document.getElementById('token').dispatchEvent(new Event('change'))")
    _wait(browser, lambda d: "tiny-dev" in _text(d, "model"), what="the model card with the token")
    assert "dev" in _text(browser, "model") and "16" in _text(browser, "model")

    # an error is shown next to the field it names
    _set(browser, "prompt", PROMPT)
    _set(browser, "width", "100")
    browser.find_element(By.ID, "generate").click()
    size_error = browser.find_element(By.CSS_SELECTOR, '.field[data-param="size"] .error')
    _wait(browser, lambda d: size_error.text, what="the size error")
    assert "width: 100" in size_error.text and "multiple of 16" in size_error.text

    # a generation: step count, one preview per step, the image, the gallery with its seed
    _set(browser, "width", "128")
    _set(browser, "height", "128")
    _set(browser, "steps", "8")
    _set(browser, "seed", "7")
    browser.find_element(By.ID, "generate").click()
    _wait(browser, lambda d: _text(d, "status").startswith("done"), what="the first generation")
    assert size_error.text == ""  # the old error is gone
    preview = browser.find_element(By.ID, "preview")
    assert preview.get_attribute("data-count") == "8" and preview.get_attribute("data-step") == "8"
    figures = browser.find_elements(By.CSS_SELECTOR, "#gallery figure")
    assert len(figures) == 1 and figures[0].get_attribute("data-seed") == "7"
    assert "seed 7" in figures[0].text and "128×128" in figures[0].text and "8 steps" in figures[0].text
    shown = figures[0].find_element(By.TAG_NAME, "img").get_attribute("src")
    with Client(address, token=TOKEN, timeout=60) as client:
        want = client.generate(prompt=PROMPT, width=128, height=128, steps=8, seed=7, guidance=3.5)
    assert base64.b64decode(shown.split(",", 1)[1]) == want.image_data[0]  # the page shows the real image
    screenshot = tmp_path / "page-finished-generation.png"
    browser.save_screenshot(str(screenshot))
    print(f"\nscreenshot of a finished generation: {screenshot}")

    # starting from an image: the page sends an edit (multipart), and shows the SDK's image
    init = tmp_path / "init.png"
    Image.new("RGB", (128, 128), (30, 90, 200)).save(init)
    browser.find_element(By.CSS_SELECTOR, "#editing summary").click()
    browser.find_element(By.ID, "image").send_keys(str(init))
    _set(browser, "strength", "0.5")
    _set(browser, "steps", "4")
    browser.find_element(By.ID, "generate").click()
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery figure")) == 2, what="the edit")
    shown = browser.find_elements(By.CSS_SELECTOR, "#gallery figure img")[0].get_attribute("src")
    with Client(address, token=TOKEN, timeout=60) as client:
        want = client.generate(
            prompt=PROMPT,
            init_image=init.read_bytes(),
            strength=0.5,
            width=128,
            height=128,
            steps=4,
            seed=7,
            guidance=3.5,
        )
    assert base64.b64decode(shown.split(",", 1)[1]) == want.image_data[0]
    browser.execute_script("document.getElementById('image').value = ''")  # back to text to image

    # a second, long generation: watch it count steps and preview, then cancel it midway
    # The denoiser's counters are the operator's view, not a token holder's: read through the
    # shared cluster's own (open) orchestrator, in front of the same denoiser.
    with Client(dev_cluster.address, timeout=60) as client:
        before = _steps_run(client)
        _set(browser, "width", "1024")
        _set(browser, "height", "1024")
        _set(browser, "steps", "100")
        browser.find_element(By.ID, "generate").click()
        _wait(browser, lambda d: re.match(r"step ([2-9]|\d\d) / 100", _text(d, "status")), what="steps counting")
        assert int(preview.get_attribute("data-count")) >= 1
        browser.find_element(By.ID, "cancel").click()
        _wait(browser, lambda d: _text(d, "status") == "cancelled", what="the cancellation")
        ran = wait_settled(lambda: _steps_run(client), what="the denoiser after the cancel") - before
        assert ran < 100  # the denoiser stopped, long before the end
    assert len(browser.find_elements(By.CSS_SELECTOR, "#gallery figure")) == 2
    assert browser.find_element(By.ID, "generate").is_enabled()
