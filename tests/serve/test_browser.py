"""The web page in a real headless browser (Debian's chromium + chromium-driver, driven by Selenium):
type a prompt, press Generate, an image appears and it shows what the prompt says (the shipped
shapes model, scored by the example's evaluator); the screenshot is saved and its path printed.

Setup installs the browser with apt-get when it is missing and this runs as root; the test is
skipped, with the reason, only where no browser can be installed (no apt-get, not root, offline)."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from examples.shapes.evaluate import score_image
from tests.serve.conftest import make_state, running_server


def png_pixels(data_url: str):
    import base64
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB"))


def find_or_install_browser() -> tuple[str, str]:
    def found():
        return shutil.which("chromium"), shutil.which("chromedriver")

    if not all(found()) and shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"]
        if subprocess.run(install, env=env, capture_output=True, timeout=600).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
            subprocess.run(install, env=env, capture_output=True, timeout=600)
    browser, driver = found()
    if not (browser and driver):
        pytest.skip("no chromium + chromedriver on PATH and they could not be installed here "
                    "(needs root and Debian's apt-get with a reachable mirror: apt-get install chromium chromium-driver)")
    return browser, driver


PROMPT = "a red circle above a blue square"


def test_page_generates_an_image_in_headless_chromium(shapes_engine, tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in requirements.txt: pip install it")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = find_or_install_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1000,800"):
        options.add_argument(flag)
    with running_server(make_state(shapes_engine, buckets=(1, 4), max_wait_ms=5)) as url:
        driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
        try:
            driver.get(url + "/")
            driver.find_element(By.ID, "prompt").send_keys(PROMPT)
            for field, value in (("steps", "25"), ("cfg", "1")):  # the shapes model's settings (MODEL_CARD.md)
                box = driver.find_element(By.ID, field)
                box.clear()
                box.send_keys(value)
            driver.find_element(By.ID, "generate").click()
            image = WebDriverWait(driver, 60).until(ec.visibility_of_element_located((By.CSS_SELECTOR, "#images img.result")))
            src = image.get_attribute("src")
            assert src.startswith("data:image/png;base64,")
            assert driver.execute_script("return arguments[0].naturalWidth", image) == shapes_engine.resolution
            score = score_image(png_pixels(src), PROMPT)
            assert score.both_correct == 2, f"the page's image does not show {PROMPT!r}: {score}"
            assert "flow" in driver.find_element(By.ID, "timing").text  # the stage times are shown
            assert driver.find_element(By.ID, "error").text == ""
            shot = tmp_path_factory.mktemp("serve_browser") / "serve_page.png"
            assert driver.save_screenshot(str(shot))
            print(f"screenshot: {shot}")
        finally:
            driver.quit()
